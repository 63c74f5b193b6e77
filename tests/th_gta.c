/*
 * th_gta.c - reference GTA merge for the tests (see th_gta.h).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "th_gta.h"

uint64_t th_gta_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

float th_gta_rnd(enum ms_dtype dt, float x)
{
    if (dt == MS_DT_BF16)
        return ms_round_bf16_1(x);
    if (dt == MS_DT_F16)
        return (float)(_Float16)x;
    return x;
}

void th_gta_job(const struct th_gta *g, struct ms_stage_job *job, int64_t *shape)
{
    memset(job, 0, sizeof(*job));
    job->name = "t";
    if (g->row_len && g->row_len < g->numel) {
        shape[0] = (int64_t)(g->numel / g->row_len);
        shape[1] = (int64_t)g->row_len;
        job->ndim = 2;
        job->row_len = g->row_len;
    } else {
        shape[0] = (int64_t)g->numel;
        job->ndim = 1;
        job->row_len = g->numel;
    }
    job->shape = shape;
    job->numel = g->numel;
    job->compute = g->dt;
    job->ninputs = g->ninputs;
    job->base = g->base;
    job->method = ms_method_find(g->method);
    const struct ms_method *m = job->method;
    int iw = ms_method_param(m, "weight"), id = ms_method_param(m, "density");
    int ig = ms_method_param(m, "gamma"), ie = ms_method_param(m, "epsilon");
    for (uint32_t i = 0; i < g->ninputs; i++) {
        job->pv[i][iw] = g->weight[i];
        job->pv[i][id] = g->density[i];
        if (ig >= 0)
            job->pv[i][ig] = g->gamma[i];
        if (ie >= 0)
            job->pv[i][ie] = g->epsilon[i];
    }
    job->gv[ms_method_param(m, "normalize")] = g->normalize;
    job->gv[ms_method_param(m, "rescale")] = g->rescale;
    job->gv[ms_method_param(m, "lambda")] = g->lambda;
    job->gv[ms_method_param(m, "int8_mask")] = 0;
    job->seed = g->seed;
    job->key = ms_hash_str(job->name);
}

static double pick(uint64_t *rs, const double *v, size_t n) { return v[th_gta_rand(rs) % n]; }

void th_gta_random(struct th_gta *g, float *store, uint64_t maxn, uint64_t *rs)
{
    static const double weights[] = { 1.0, 0.5, -0.3, 0.7, 1.3, 0.1, 2.0, -1.0, 0.3333 };
    static const double densities[] = { 1.0, 0.9, 0.5, 0.3, 0.25, 0.1, 0.77, 2.0 };
    static const double lambdas[] = { 1.0, 1.0, 0.5, 1.7, -0.25 };
    enum ms_dtype D = g->dt;
    uint64_t n = 1 + th_gta_rand(rs) % maxn;
    g->numel = n;
    g->ninputs = 1 + (uint32_t)(th_gta_rand(rs) % 5);
    g->base = (int)(th_gta_rand(rs) % g->ninputs);
    g->normalize = th_gta_rand(rs) & 1;
    g->rescale = th_gta_rand(rs) & 1;
    g->lambda = pick(rs, lambdas, sizeof(lambdas) / sizeof(lambdas[0]));
    float *B = store + (size_t)g->base * maxn;
    for (uint64_t e = 0; e < n; e++) {
        uint64_t r = th_gta_rand(rs);
        /* Half dyadic values on a coarse grid (exact differences, many
         * repeats), half arbitrary. */
        float v = (r & 1) ? (float)((int)(r >> 8 & 255) - 128) / 64.0f
                          : (float)((double)(int64_t)(r >> 1) * 0x1p-63);
        B[e] = th_gta_rnd(D, v);
    }
    double wsum = 0;
    for (uint32_t i = 0; i < g->ninputs; i++) {
        g->in[i] = store + (size_t)i * maxn;
        g->weight[i] = pick(rs, weights, sizeof(weights) / sizeof(weights[0]));
        g->density[i] = pick(rs, densities, sizeof(densities) / sizeof(densities[0]));
        if ((uint64_t)(g->density[i] * (double)n) == 0)
            g->density[i] = 1.0;
        if ((int)i == g->base)
            continue;
        wsum += g->weight[i];
        float *x = store + (size_t)i * maxn;
        float off[6];
        for (int o = 0; o < 6; o++)
            off[o] = (float)((int)(th_gta_rand(rs) % 64) - 32) / 1024.0f;
        for (uint64_t e = 0; e < n; e++) {
            uint64_t r = th_gta_rand(rs);
            if (r % 4 == 0)
                x[e] = B[e]; /* exact zero delta */
            else if (r % 4 == 1)
                x[e] = th_gta_rnd(D, B[e] + (float)((double)(int64_t)r * 0x1p-66));
            else
                x[e] = th_gta_rnd(D, B[e] + off[(r >> 8) % 6]);
        }
    }
    /* Sometimes make the weights of the other models sum to zero. */
    if (g->ninputs >= 3 && th_gta_rand(rs) % 4 == 0) {
        uint32_t last = g->ninputs - 1 == (uint32_t)g->base ? g->ninputs - 2 : g->ninputs - 1;
        wsum -= g->weight[last];
        g->weight[last] = -wsum;
    }
    g->row_len = 0;
    g->seed = 0;
    if (!strncmp(g->method, "ties", 4) || !strcmp(g->method, "task_arithmetic"))
        return; /* their draws stay as they were */
    static const double gammas[] = { 0.01, 0.1, 0.2, 0.0, 0.5, 0.05 };
    static const double epsilons[] = { 0.15, 0.05, 0.1, 0.2 };
    g->seed = th_gta_rand(rs);
    for (uint32_t i = 0; i < g->ninputs; i++) {
        g->gamma[i] = pick(rs, gammas, sizeof(gammas) / sizeof(gammas[0]));
        double e = pick(rs, epsilons, sizeof(epsilons) / sizeof(epsilons[0]));
        double d = g->density[i];
        if (d < 1.0 && (d + e >= 1.0 || d - e <= 0.0))
            e = (d < 1.0 - d ? d : 1.0 - d) / 2.0;
        g->epsilon[i] = e;
    }
    /* della: a 2-D [rows, L] tensor most of the time (the data stay). */
    if (!strncmp(g->method, "della", 5) && th_gta_rand(rs) % 4 != 0) {
        uint64_t L = 1 + th_gta_rand(rs) % (n < 40 ? n : 40);
        g->row_len = L;
        g->numel = n / L * L;
    }
}

int th_gta_run(const struct th_gta *g, uint64_t chunk, float *out)
{
    struct ms_stage_job job;
    int64_t shape[2];
    th_gta_job(g, &job, shape);
    return ms_stage_run_mem(&job, g->in, out, chunk);
}

int th_stage_run_shuffled(const struct ms_stage_job *job, const float *const *in, float *out,
                          uint64_t chunk, uint64_t rs)
{
    const struct ms_stage_ops *ops = job->method->ops;
    uint64_t n = job->numel;
    if (chunk == 0 || chunk > n)
        chunk = n ? n : 1;
    if (ops->flags & MS_STAGE_ROWWISE) {
        uint64_t row = job->row_len ? job->row_len : 1;
        chunk = (chunk / row ? chunk / row : 1) * row;
    }
    uint64_t nch = n ? (n + chunk - 1) / chunk : 0;
    size_t ssize = ops->state_size ? ops->state_size(job) : 0;
    size_t psize = ops->partial_size ? ops->partial_size(job) : 0;
    size_t pstride = (psize + 63) / 64 * 64 + 64;
    void *state = ms_aligned_alloc(ssize + 64);
    unsigned char *pp = ms_aligned_alloc(pstride * (nch ? nch : 1));
    uint64_t *order = malloc((nch ? nch : 1) * sizeof(uint64_t));
    memset(state, 0, ssize + 64);
    int rc = ops->begin ? ops->begin(state, job) : MS_STAGE_APPLY;
    uint32_t pass = 0;
    for (;;) {
        for (uint64_t i = 0; i < nch; i++)
            order[i] = i;
        for (uint64_t i = nch; i > 1; i--) {
            uint64_t j = th_gta_rand(&rs) % i, t = order[i - 1];
            order[i - 1] = order[j];
            order[j] = t;
        }
        if (rc != MS_STAGE_REDUCE)
            break;
        for (uint64_t k = 0; k < nch; k++) {
            uint64_t i = order[k];
            struct ms_chunk c;
            memset(&c, 0, sizeof(c));
            c.first = i * chunk;
            c.count = n - c.first < chunk ? n - c.first : chunk;
            c.index = (uint32_t)i;
            c.pass = pass;
            for (uint32_t m = 0; m < job->ninputs; m++)
                c.in[m] = in[m] + c.first;
            memset(pp + i * pstride, 0x5a, pstride);
            ops->reduce(state, job, &c, pp + i * pstride);
        }
        for (uint64_t i = 0; i < nch; i++) {
            struct ms_chunk c;
            memset(&c, 0, sizeof(c));
            c.first = i * chunk;
            c.count = n - c.first < chunk ? n - c.first : chunk;
            c.index = (uint32_t)i;
            c.pass = pass;
            ops->fold(state, job, &c, pp + i * pstride);
        }
        rc = ops->end_pass(state, job);
        pass++;
    }
    if (rc == MS_STAGE_APPLY) {
        for (uint64_t k = 0; k < nch; k++) {
            uint64_t i = order[k];
            struct ms_chunk c;
            memset(&c, 0, sizeof(c));
            c.first = i * chunk;
            c.count = n - c.first < chunk ? n - c.first : chunk;
            c.index = (uint32_t)i;
            c.pass = pass;
            for (uint32_t m = 0; m < job->ninputs; m++)
                c.in[m] = in[m] + c.first;
            c.out = out + c.first;
            ops->apply(state, job, &c);
        }
    }
    ms_aligned_free(pp);
    ms_aligned_free(state);
    free(order);
    return rc;
}

long th_gta_first_diff(const float *a, const float *b, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)))
            return (long)i;
    return -1;
}

/* Magnitude order for qsort: |d| descending as float32, NaN first (torch's
 * argsort(descending=True): NaN compares greater than every number), then
 * lower index. */
static const float *cmp_d;
static int cmp_mag(const void *pa, const void *pb)
{
    uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
    float x = fabsf(cmp_d[a]), y = fabsf(cmp_d[b]);
    bool xn = isnan(x), yn = isnan(y);
    if (xn != yn)
        return xn ? -1 : 1;
    if (!xn && x != y)
        return x > y ? -1 : 1;
    return a < b ? -1 : a > b;
}

/* Stable ascending order of |d| as float32, NaN last (torch.sort), ties by
 * index: what a stable ascending sort gives. */
static int cmp_asc(const void *pa, const void *pb)
{
    uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
    float x = fabsf(cmp_d[a]), y = fabsf(cmp_d[b]);
    bool xn = isnan(x), yn = isnan(y);
    if (xn != yn)
        return xn ? 1 : -1;
    if (!xn && x != y)
        return x < y ? -1 : 1;
    return a < b ? -1 : a > b;
}

/* u < p with u from the element's 24 random bits (mergekit-spec.md 2.7). */
static bool draw(uint64_t seed, uint32_t model, uint64_t e, float p)
{
    uint32_t r = ms_rng_u32(seed, ms_hash_str("t"), model, e);
    return (float)(r & 0xFFFFFF) / 16777216.0f < p;
}

/*
 * Step 4: the sparsifier of g->method on delta d of input `input` (density < 1).
 * Fills mask (0/1) and returns the work dtype, or -1 / -2 on mergekit's
 * assertion / ValueError.
 */
static int sparsify_mask(const struct th_gta *g, uint32_t input, const float *d, float *mask,
                         enum ms_dtype *work)
{
    enum ms_dtype D = g->dt;
    uint64_t n = g->numel;
    double density = g->density[input];
    const char *me = g->method;
    bool random = !strncmp(me, "dare", 4) || !strncmp(me, "della", 5);
    enum ms_dtype W = random && D != MS_DT_BF16 ? MS_DT_F32 : D;
    *work = W;
    uint64_t *idx = malloc((n ? n : 1) * sizeof(uint64_t));
    for (uint64_t e = 0; e < n; e++) {
        idx[e] = e;
        mask[e] = 0.0f;
    }
    cmp_d = d;
    int rc = 0;
    if (!strcmp(me, "ties")) {
        uint64_t k = (uint64_t)(density * (double)n);
        if (k == 0) {
            rc = -1;
        } else {
            qsort(idx, n, sizeof(uint64_t), cmp_mag);
            for (uint64_t e = 0; e < k; e++)
                mask[idx[e]] = 1.0f;
        }
    } else if (!strncmp(me, "dare", 4)) {
        float p = th_gta_rnd(W, (float)density);
        for (uint64_t e = 0; e < n; e++)
            mask[e] = draw(g->seed, input, e, p) ? 1.0f : 0.0f;
    } else if (!strncmp(me, "breadcrumbs", 11)) {
        long long target = (long long)(density * (double)n);
        long long n_top = (long long)(g->gamma[input] * (double)n);
        long long n_bot = (long long)n - target - n_top;
        if (n_bot < 0) {
            n_top += n_bot;
            n_bot = 0;
        }
        qsort(idx, n, sizeof(uint64_t), cmp_asc);
        /* indices[n_bot:-n_top]: a Python slice, empty when n_top == 0. */
        long long end = n_top == 0 ? 0 : (long long)n - n_top;
        for (long long e = n_bot; e < end; e++)
            mask[idx[e]] = 1.0f;
    } else if (!strncmp(me, "della", 5)) {
        double eps = g->epsilon[input];
        if (density <= 0.0) {
            /* zeros */
        } else if (density + eps >= 1.0 || density - eps <= 0.0) {
            rc = -2;
        } else {
            uint64_t L = g->row_len && g->row_len < n ? g->row_len : n;
            float *rank = malloc(L * sizeof(float));
            for (uint64_t r0 = 0; r0 < n; r0 += L) {
                cmp_d = d + r0;
                for (uint64_t i = 0; i < L; i++)
                    idx[i] = i;
                qsort(idx, L, sizeof(uint64_t), cmp_asc);
                for (uint64_t pos = 0; pos < L; pos++) {
                    float r0f = g->exact_ranks ? (float)pos : th_gta_rnd(W, (float)pos);
                    rank[idx[pos]] = g->exact_ranks ? r0f + 1 : th_gta_rnd(W, r0f + 1.0f);
                }
                float lo = rank[0], hi = rank[0];
                for (uint64_t i = 1; i < L; i++) {
                    lo = rank[i] < lo ? rank[i] : lo;
                    hi = rank[i] > hi ? rank[i] : hi;
                }
                for (uint64_t i = 0; i < L; i++) {
                    float p;
                    if (L == 1) {
                        p = th_gta_rnd(W, (float)density); /* our rule for 0/0 */
                    } else {
                        float num = th_gta_rnd(W, rank[i] - lo), den = th_gta_rnd(W, hi - lo);
                        float rn = th_gta_rnd(W, num / den);
                        rn = rn < 0 ? 0 : rn > 1 ? 1 : rn;
                        float t = th_gta_rnd(W, th_gta_rnd(W, rn * 2) * (float)eps);
                        p = th_gta_rnd(W, (float)(density - eps) + t);
                    }
                    mask[r0 + i] = draw(g->seed, input, r0 + i, p) ? 1.0f : 0.0f;
                }
            }
            free(rank);
        }
    }
    free(idx);
    return rc;
}

int th_gta_ref(const struct th_gta *g, float *out)
{
    enum ms_dtype D = g->dt;
    uint64_t n = g->numel;
    const char *me = g->method;
    bool consensus = !strcmp(me, "ties") || !strcmp(me, "dare_ties") ||
                     !strcmp(me, "breadcrumbs_ties") || !strcmp(me, "della");
    bool sparse = strcmp(me, "task_arithmetic") != 0;
    const float *B = g->in[g->base];
    float *delta[MS_MAX_INPUTS], W[MS_MAX_INPUTS];
    uint32_t nm = 0;

    /* Step 2: deltas of the other models, in input order. */
    for (uint32_t i = 0; i < g->ninputs; i++) {
        if ((int)i == g->base)
            continue;
        float *d = malloc((n ? n : 1) * sizeof(float));
        for (uint64_t e = 0; e < n; e++)
            d[e] = th_gta_rnd(D, g->in[i][e] - B[e]);
        W[nm] = th_gta_rnd(D, (float)g->weight[i]);
        double density = g->density[i];
        delta[nm++] = d;

        /* Step 4: the sparsifier, then the L1 rescale in the work dtype. */
        if (!sparse || density >= 1.0)
            continue;
        float *mask = malloc((n ? n : 1) * sizeof(float));
        enum ms_dtype Wd;
        int rc = sparsify_mask(g, i, d, mask, &Wd);
        if (rc < 0) {
            free(mask);
            for (uint32_t j = 0; j < nm; j++)
                free(delta[j]);
            return rc;
        }
        double before = 0, after = 0;
        for (uint64_t e = 0; e < n; e++) {
            before += fabs((double)d[e]);
            after += fabs((double)(d[e] * mask[e]));
        }
        float fb = th_gta_rnd(Wd, (float)before), fa = th_gta_rnd(Wd, (float)after);
        bool scale = g->rescale && !(fb < 1e-7 || fa < 1e-7);
        float f = scale ? th_gta_rnd(Wd, fb / fa) : 1.0f;
        for (uint64_t e = 0; e < n; e++) {
            float masked = d[e] * mask[e];
            d[e] = scale ? th_gta_rnd(D, th_gta_rnd(Wd, masked * f)) : masked;
        }
        free(mask);
    }

    /* Step 3: no other model. */
    if (nm == 0) {
        memcpy(out, B, n * sizeof(float));
        return 0;
    }

    /* Step 7 divisor (without consensus). */
    float wsum = 0.0f;
    for (uint32_t j = 0; j < nm; j++)
        wsum += W[j];
    wsum = th_gta_rnd(D, wsum);
    if (fabsf(wsum) < 1e-8)
        wsum = 1.0f;

    for (uint64_t e = 0; e < n; e++) {
        float wd[MS_MAX_INPUTS];
        for (uint32_t j = 0; j < nm; j++)
            wd[j] = th_gta_rnd(D, W[j] * delta[j][e]); /* step 5 */
        float mixed = 0.0f, div;
        if (consensus) { /* step 6 */
            float S = 0.0f;
            for (uint32_t j = 0; j < nm; j++)
                S += wd[j];
            S = th_gta_rnd(D, S);
            float maj = S >= 0.0f ? 1.0f : -1.0f;
            div = 0.0f;
            for (uint32_t j = 0; j < nm; j++) {
                float sign = wd[j] > 0.0f ? 1.0f : (wd[j] < 0.0f ? -1.0f : 0.0f);
                float m = sign == maj ? 1.0f : 0.0f;
                mixed += wd[j] * m;
                div += W[j] * m;
            }
            mixed = th_gta_rnd(D, mixed);
            div = th_gta_rnd(D, div);
            if (div == 0.0f)
                div = 1.0f;
        } else { /* step 7 */
            for (uint32_t j = 0; j < nm; j++)
                mixed += wd[j];
            mixed = th_gta_rnd(D, mixed);
            div = wsum;
        }
        if (g->normalize) /* step 8 */
            mixed = th_gta_rnd(D, mixed / div);
        if (g->lambda != 1.0) /* step 9 */
            mixed = th_gta_rnd(D, mixed * (float)g->lambda);
        out[e] = th_gta_rnd(D, B[e] + mixed); /* step 10 */
    }
    for (uint32_t j = 0; j < nm; j++)
        free(delta[j]);
    return 0;
}

/* Runs g at chunk sizes 1 (small tensors only), 7, 100 and numel, and with
 * the shuffled driver, and compares each output with want, bit for bit. */
void th_gta_expect(const struct th_gta *g, const float *want, const char *what)
{
    float *got = malloc((g->numel ? g->numel : 1) * sizeof *got);
    cr_assert(got);
    uint64_t chunks[4] = { 1, 7, 100, g->numel };
    for (int ci = 0; ci < 5; ci++) {
        int rc;
        if (ci < 4) {
            if (chunks[ci] == 1 && g->numel > 48)
                continue;
            rc = th_gta_run(g, chunks[ci], got);
        } else {
            struct ms_stage_job job;
            int64_t shape[2];
            th_gta_job(g, &job, shape);
            rc = th_stage_run_shuffled(&job, g->in, got, 7, g->numel * 31 + 5);
        }
        cr_assert_eq(rc, 0, "%s: %s", what, ms_errmsg());
        long d = th_gta_first_diff(got, want, g->numel);
        cr_assert_eq(d, -1, "%s: %s run %d: element %ld is %a, want %a", what,
                     ms_dtype_name(g->dt), ci, d, d >= 0 ? got[d] : 0.0f,
                     d >= 0 ? want[d] : 0.0f);
    }
    free(got);
}

void th_gta_random_cases(const char *method, enum ms_dtype dt, uint64_t seed0, int count)
{
    static float store[MS_MAX_INPUTS * TH_GTA_MAXN], want[TH_GTA_MAXN];
    for (int s = 0; s < count; s++) {
        uint64_t seed = seed0 + (uint64_t)s, rs = seed * 0x9E3779B97F4A7C15ULL + 1;
        struct th_gta g = { .method = method, .dt = dt };
        th_gta_random(&g, store, s % 5 ? 48 : 250, &rs);
        cr_assert_eq(th_gta_ref(&g, want), 0);
        char what[200];
        snprintf(what, sizeof what,
                 "%s seed %llu (n %llu, %u inputs, base %d, normalize %d, rescale %d, lambda %g)",
                 method, (unsigned long long)seed, (unsigned long long)g.numel, g.ninputs, g.base,
                 g.normalize, g.rescale, g.lambda);
        th_gta_expect(&g, want, what);
    }
}
