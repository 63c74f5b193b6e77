/*
 * th_gta.c - reference GTA merge for the tests (see th_gta.h).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

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
    shape[0] = (int64_t)g->numel;
    job->name = "t";
    job->ndim = 1;
    job->shape = shape;
    job->numel = g->numel;
    job->row_len = g->numel;
    job->compute = g->dt;
    job->ninputs = g->ninputs;
    job->base = g->base;
    job->method = ms_method_find(g->method);
    const struct ms_method *m = job->method;
    int iw = ms_method_param(m, "weight"), id = ms_method_param(m, "density");
    for (uint32_t i = 0; i < g->ninputs; i++) {
        job->pv[i][iw] = g->weight[i];
        job->pv[i][id] = g->density[i];
    }
    job->gv[ms_method_param(m, "normalize")] = g->normalize;
    job->gv[ms_method_param(m, "rescale")] = g->rescale;
    job->gv[ms_method_param(m, "lambda")] = g->lambda;
    job->gv[ms_method_param(m, "int8_mask")] = 0;
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
}

int th_gta_run(const struct th_gta *g, uint64_t chunk, float *out)
{
    struct ms_stage_job job;
    int64_t shape[1];
    th_gta_job(g, &job, shape);
    return ms_stage_run_mem(&job, g->in, out, chunk);
}

long th_gta_first_diff(const float *a, const float *b, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)))
            return (long)i;
    return -1;
}

/* Magnitude order for qsort: |d| descending as float32, then lower index. */
static const float *cmp_d;
static int cmp_mag(const void *pa, const void *pb)
{
    uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
    float x = fabsf(cmp_d[a]), y = fabsf(cmp_d[b]);
    if (x != y)
        return x > y ? -1 : 1;
    return a < b ? -1 : a > b;
}

int th_gta_ref(const struct th_gta *g, float *out)
{
    enum ms_dtype D = g->dt;
    uint64_t n = g->numel;
    bool ties = strcmp(g->method, "ties") == 0;
    const float *B = g->in[g->base];
    float *delta[MS_MAX_INPUTS], W[MS_MAX_INPUTS];
    uint32_t nm = 0;

    /* Step 2: deltas of the other models, in input order. */
    for (uint32_t i = 0; i < g->ninputs; i++) {
        if ((int)i == g->base)
            continue;
        float *d = malloc(n * sizeof(float));
        for (uint64_t e = 0; e < n; e++)
            d[e] = th_gta_rnd(D, g->in[i][e] - B[e]);
        W[nm] = th_gta_rnd(D, (float)g->weight[i]);
        double density = g->density[i];
        delta[nm++] = d;

        /* Step 4: magnitude sparsifier (ties only). */
        if (!ties || density >= 1.0)
            continue;
        uint64_t k = (uint64_t)(density * (double)n);
        if (k == 0) {
            for (uint32_t j = 0; j < nm; j++)
                free(delta[j]);
            return -1;
        }
        uint64_t *idx = malloc(n * sizeof(uint64_t));
        float *mask = calloc(n, sizeof(float));
        for (uint64_t e = 0; e < n; e++)
            idx[e] = e;
        cmp_d = d;
        qsort(idx, n, sizeof(uint64_t), cmp_mag);
        for (uint64_t e = 0; e < k; e++)
            mask[idx[e]] = 1.0f;
        double before = 0, after = 0;
        for (uint64_t e = 0; e < n; e++) {
            before += fabs((double)d[e]);
            after += fabs((double)(d[e] * mask[e]));
        }
        float fb = th_gta_rnd(D, (float)before), fa = th_gta_rnd(D, (float)after);
        bool scale = g->rescale && !(fb < 1e-7 || fa < 1e-7);
        float f = scale ? th_gta_rnd(D, fb / fa) : 1.0f;
        for (uint64_t e = 0; e < n; e++) {
            float masked = d[e] * mask[e];
            d[e] = scale ? th_gta_rnd(D, masked * f) : masked;
        }
        free(idx);
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
        if (ties) { /* step 6 */
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
