/*
 * karcher.c - the `karcher` method (mergekit-spec.md 2.9): the Riemannian
 * (Karcher) mean of the inputs' directions on the unit sphere, scaled by their
 * mean norm. Every input counts, the base included when it is one, each with
 * alpha = 1/N; there are no per-model weights.
 *
 * mergekit iterates on whole vectors: u_i = x_i/n_i (n_i the float32 norm),
 * u = normalised sum a*u_i, then up to max_iter times
 *   d_i = clamp(u.u_i, -1, 1), th_i = acos d_i, T = sum_{th_i >= tol} a*(th_i/sin th_i)*(u_i - d_i*u),
 *   stop if ||T|| < tol, else u = cos(||T||)*u + sin(||T||)*T/||T||, renormalised,
 * and returns (sum_i alpha_i*n_i) * u.
 *
 * Streaming form: every iterate u and every T is a linear combination
 * sum_j c_j u_j of the unit inputs, so the iteration runs on the N coefficients
 * c instead of the vector. One reduce pass sums the Gram matrix x_i.x_j exactly
 * (ms_xacc); then, in double on the loop thread (end_pass),
 *   G_ij = (x_i.x_j) / (n_i*n_j),  u.u_i = (G c)_i,  ||u||^2 = c'Gc,  ||T||^2 likewise,
 * with mergekit's steps, validity rule (n_i > tol), initial guess, fallback to
 * the first valid unit vector, stopping rule and final scale. apply computes
 *   u   = rnd(float32(sum_j (c_j/n_j) * x_j))     (sum in double, inputs in order)
 *   out = rnd(float32(s) * u),   s = sum_i alpha_i*n_i (Python double, zero norms included)
 * which are mergekit's last two roundings.
 *
 * This is the same iteration in exact arithmetic, but not bit-identical to
 * mergekit: mergekit rounds u, T and the scalars d, th, ||T|| to the compute
 * dtype at every step, and its dot products and norms are float32 sums in
 * torch's order; here only the last two steps round. Results differ by about
 * an ulp of the compute dtype in some elements (spec 7.20). The result does not
 * depend on chunking: the Gram sums are exact and apply is elementwise.
 *
 * Inputs: a lone tensor is returned unchanged; no valid input (all norms <= tol)
 * gives zeros.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

#define KARCHER_NG (MS_MAX_INPUTS * (MS_MAX_INPUTS + 1) / 2) /* Gram entries i <= j */

struct karcher_state {
    uint32_t n;                   /* inputs */
    bool copy;                    /* one input: out = x_0 */
    bool zero;                    /* no valid input: out = 0 */
    float scale;                  /* float32(s) */
    double k[MS_MAX_INPUTS];      /* end_pass: u = sum_j k_j x_j, k_j = c_j/n_j */
    /* scalars kept for tests and diagnostics */
    uint32_t iters;               /* iterations run */
    float norm[MS_MAX_INPUTS];    /* float32 norms n_i */
    struct ms_xacc g[KARCHER_NG]; /* folded Gram sums, entry (i <= j) at karcher_gi(n, i, j) */
};

/* Index of Gram entry (i, j), i <= j, row-major over the upper triangle. */
static inline size_t karcher_gi(uint32_t n, uint32_t i, uint32_t j)
{
    return (size_t)i * n - (size_t)i * (i - 1) / 2 + (j - i);
}

static size_t karcher_state_size(const struct ms_stage_job *job) { return sizeof(struct karcher_state); }

static size_t karcher_partial_size(const struct ms_stage_job *job)
{
    size_t n = MS_MIN(job->ninputs, MS_MAX_INPUTS);
    return n * (n + 1) / 2 * sizeof(struct ms_xacc);
}

static int karcher_begin(void *state, const struct ms_stage_job *job)
{
    struct karcher_state *s = state;
    assert(job->ninputs <= MS_MAX_INPUTS);
    if (job->ninputs == 0)
        return ms_error(MS_EPLAN, "%s: karcher merge with no input", job->name);
    s->n = job->ninputs;
    if (s->n == 1) {
        s->copy = true;
        return MS_STAGE_APPLY;
    }
    for (size_t k = 0; k < (size_t)s->n * (s->n + 1) / 2; k++)
        ms_xacc_init(&s->g[k]);
    return MS_STAGE_REDUCE;
}

static void karcher_reduce(const void *state, const struct ms_stage_job *job,
                           const struct ms_chunk *c, void *partial)
{
    const struct karcher_state *s = state;
    struct ms_xacc *g = partial;
    size_t cnt = (size_t)c->count;
    for (uint32_t i = 0; i < s->n; i++)
        for (uint32_t j = i; j < s->n; j++) {
            struct ms_xacc *a = &g[karcher_gi(s->n, i, j)];
            ms_xacc_init(a);
            if (i == j)
                ms_xacc_sumsq(a, c->in[i], cnt);
            else
                ms_xacc_dot(a, c->in[i], c->in[j], cnt);
        }
}

static void karcher_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                         const void *partial)
{
    struct karcher_state *s = state;
    const struct ms_xacc *g = partial;
    for (size_t k = 0; k < (size_t)s->n * (s->n + 1) / 2; k++)
        ms_xacc_merge(&s->g[k], &g[k]);
}

/* x'Gy over the m valid inputs (G is m x m, row-major). */
static double karcher_form(const double *G, const double *x, const double *y, uint32_t m)
{
    double acc = 0;
    for (uint32_t i = 0; i < m; i++) {
        double r = 0;
        for (uint32_t j = 0; j < m; j++)
            r += G[i * m + j] * y[j];
        acc += x[i] * r;
    }
    return acc;
}

static double karcher_len(const double *G, const double *x, uint32_t m)
{
    double q = karcher_form(G, x, x, m);
    return sqrt(q > 0 ? q : 0);
}

static int karcher_end_pass(void *state, const struct ms_stage_job *job)
{
    struct karcher_state *s = state;
    int pi = ms_method_param(job->method, "max_iter"), pt = ms_method_param(job->method, "tol");
    assert(pi >= 0 && pt >= 0);
    const double tol = job->gv[pt];
    const long max_iter = (long)job->gv[pi];
    const uint32_t n = s->n;

    /* Norms (float32, as torch.linalg.norm of float32(t)), the global scale
     * over all inputs and the valid ones. */
    const double alpha = 1.0 / n;
    double scale = 0.0, asum = 0.0;
    uint32_t v[MS_MAX_INPUTS], m = 0;
    for (uint32_t i = 0; i < n; i++) {
        s->norm[i] = sqrtf((float)ms_xacc_value(&s->g[karcher_gi(n, i, i)]));
        scale += alpha * s->norm[i];
        if (s->norm[i] > tol) {
            v[m++] = i;
            asum += alpha;
        }
    }
    s->scale = (float)scale;
    if (m == 0) {
        s->zero = true;
        return MS_STAGE_APPLY;
    }
    const double a = alpha / asum;

    /* Gram matrix of the valid unit vectors. */
    double G[MS_MAX_INPUTS * MS_MAX_INPUTS];
    for (uint32_t i = 0; i < m; i++)
        for (uint32_t j = 0; j < m; j++) {
            uint32_t p = MS_MIN(v[i], v[j]), q = MS_MAX(v[i], v[j]);
            G[i * m + j] = ms_xacc_value(&s->g[karcher_gi(n, p, q)]) /
                           ((double)s->norm[p] * (double)s->norm[q]);
        }

    /* Initial guess: the normalised mean, or the first valid unit vector. */
    double c[MS_MAX_INPUTS], T[MS_MAX_INPUTS];
    for (uint32_t i = 0; i < m; i++)
        c[i] = a;
    double nu = karcher_len(G, c, m);
    for (uint32_t i = 0; i < m; i++)
        c[i] = nu < tol ? (i == 0) : c[i] / nu;

    s->iters = 0;
    for (long it = 0; it < max_iter; it++) {
        s->iters++;
        for (uint32_t i = 0; i < m; i++)
            T[i] = 0;
        for (uint32_t i = 0; i < m; i++) {
            double d = 0; /* u.u_i = (G c)_i */
            for (uint32_t j = 0; j < m; j++)
                d += G[i * m + j] * c[j];
            d = d < -1 ? -1 : d > 1 ? 1 : d;
            double th = acos(d);
            if (th < tol)
                continue;
            double f = a * (th / sin(th));
            T[i] += f; /* f*(u_i - d*u) */
            for (uint32_t j = 0; j < m; j++)
                T[j] -= f * d * c[j];
        }
        double nt = karcher_len(G, T, m);
        if (nt < tol)
            break;
        double cn = cos(nt), sn = sin(nt) / nt;
        for (uint32_t i = 0; i < m; i++)
            c[i] = cn * c[i] + sn * T[i];
        double un = karcher_len(G, c, m);
        if (un > tol)
            for (uint32_t i = 0; i < m; i++)
                c[i] /= un;
    }
    for (uint32_t i = 0; i < m; i++)
        s->k[v[i]] = c[i] / s->norm[v[i]];
    return MS_STAGE_APPLY;
}

/* y[j] = rnd(scale * rnd(float32(sum_i k_i x_i[j]))); d is a constant in each caller. */
static inline void karcher_kern(enum ms_dtype d, const struct karcher_state *s,
                                const struct ms_chunk *c, size_t cnt)
{
    for (size_t j = 0; j < cnt; j++) {
        double u = 0;
        for (uint32_t i = 0; i < s->n; i++)
            u += s->k[i] * c->in[i][j];
        c->out[j] = ms_rnd(d, s->scale * ms_rnd(d, (float)u));
    }
}

static void karcher_apply(const void *state, const struct ms_stage_job *job,
                          const struct ms_chunk *c)
{
    const struct karcher_state *s = state;
    size_t cnt = (size_t)c->count;
    if (s->copy) {
        memcpy(c->out, c->in[0], cnt * sizeof(float));
        return;
    }
    if (s->zero) {
        for (size_t j = 0; j < cnt; j++)
            c->out[j] = 0.0f;
        return;
    }
    switch (job->compute) {
    case MS_DT_BF16:
        karcher_kern(MS_DT_BF16, s, c, cnt);
        break;
    case MS_DT_F16:
        karcher_kern(MS_DT_F16, s, c, cnt);
        break;
    default:
        assert(job->compute == MS_DT_F32);
        karcher_kern(MS_DT_F32, s, c, cnt);
        break;
    }
}

static const struct ms_stage_ops karcher_ops = {
    .state_size = karcher_state_size,
    .partial_size = karcher_partial_size,
    .begin = karcher_begin,
    .reduce = karcher_reduce,
    .fold = karcher_fold,
    .end_pass = karcher_end_pass,
    .apply = karcher_apply,
};

const struct ms_method ms_method_karcher = {
    .name = "karcher",
    .summary = "Riemannian (Karcher) mean of the models",
    .flags = MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 2,
    .params = { MS__G("max_iter", 10, 0, 100000), MS__G("tol", 1e-5, 0, MS__INF) },
    .card = { "Karcher Mean", "https://en.wikipedia.org/wiki/Karcher_mean" },
    .ops = &karcher_ops,
};
