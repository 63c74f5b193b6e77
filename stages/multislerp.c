/*
 * multislerp.c - the `multislerp` method (mergekit-spec.md 2.5): barycentric
 * interpolation of several models on the hypersphere, through the tangent
 * space at their normalised weighted mean, optionally around a base model.
 *
 * With X_i the non-base models in input order (spec 2.1.2: config order), B
 * the base if it is present, rnd() rounding to the compute dtype D, every
 * vector the whole flattened tensor, and e = float32(eps):
 *   X_i  = rnd(X_i - B)                                  (with a base)
 *   W_i  = rnd(float32(weight_i)); normalize_weights: S = rnd(0 + W_0 + W_1 ...),
 *          w_i = rnd(W_i / S) (no zero guard, spec 7.7); else w_i = W_i
 *   n_i  = rnd(sqrtf(float32(sum X_i^2)))               pass 0
 *   U_i  = rnd(X_i / rnd(n_i + e))
 *   M    = rnd(0 + rnd(U_0*w_0) + rnd(U_1*w_1) ...)      float32 sum over models, in order
 *   mn   = rnd(sqrtf(float32(sum M^2)))                 pass 1
 *   mn < rnd(eps): two models give rnd(rnd(X_0*w_0) + rnd(X_1*w_1)) (+ B), more are an error
 *   m    = rnd(M / mn)
 *   dt_i = rnd(float32(sum rnd(U_i*m)))                 pass 2
 *   T_i  = rnd(U_i - rnd(dt_i*m)); tau = rnd(0 + rnd(T_0*w_0) + ...)
 *   tn   = rnd(rnd(sqrtf(float32(sum tau^2))) + e)      pass 3
 *   r    = rnd(rnd(m*rnd(cosf(tn))) + rnd(tau*rnd(rnd(sinf(tn))/tn)))
 *   out  = rnd(r * rnd(0 + rnd(n_0*w_0) + ...))  (+ B: rnd(out + B))
 * Elementwise steps are torch's per-op roundings. The four whole-tensor sums
 * are exact (ms_xacc) and rounded once to float32 where torch adds in float32
 * in a blocked order: about 1 ulp of a scalar apart in rare cases (spec 7.20).
 * Each pass recomputes the elementwise steps it needs from the inputs, so the
 * stage holds only scalars; the result does not depend on chunking. The four
 * passes are what torch's roundings need: each sum is over values rounded
 * elementwise after dividing by the previous one (U_i by n_i, m by mn, T_i
 * with dt_i), so none can be derived from an earlier pass's sums (in exact
 * arithmetic tau is 0 and the Gram matrix of the X_i would give the rest; in
 * the compute dtype tau is rounding noise that reaches the output, ~1 ulp).
 *
 * Inputs: one non-base model is returned unchanged (the base is then ignored);
 * none is an error.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

enum { MSL_NORMS = 0, MSL_MEAN = 1, MSL_DOTS = 2, MSL_TAN = 3 }; /* reduce passes */

struct mslerp_state {
    int ib;                       /* input index of the base, or -1 */
    uint32_t n;                   /* non-base models N */
    uint32_t it[MS_MAX_INPUTS];   /* their input indices, in input order */
    bool copy;                    /* N == 1: out = X_0 as loaded */
    bool lerp;                    /* mn < eps with N == 2: the linear fallback */
    uint32_t pass;                /* reduce pass under way (end_pass advances it) */
    float w[MS_MAX_INPUTS];       /* w_i */
    float e;                      /* float32(eps) */
    float den[MS_MAX_INPUTS];     /* rnd(n_i + e) */
    float norm[MS_MAX_INPUTS];    /* n_i */
    float mn;                     /* ||M|| */
    float dot[MS_MAX_INPUTS];     /* dt_i */
    float cs, q, avg;             /* rnd(cos tn), rnd(sin tn / tn), rnd(sum n_i w_i) */
    struct ms_xacc acc[MS_MAX_INPUTS]; /* the pass's folded sums */
};

static size_t mslerp_state_size(const struct ms_stage_job *job) { return sizeof(struct mslerp_state); }

static size_t mslerp_partial_size(const struct ms_stage_job *job)
{
    return MS_MIN(job->ninputs, MS_MAX_INPUTS) * sizeof(struct ms_xacc);
}

/* Sums a pass folds: one per model for norms and dots, else one. */
static uint32_t mslerp_nsums(const struct mslerp_state *s)
{
    return s->pass == MSL_NORMS || s->pass == MSL_DOTS ? s->n : 1;
}

static int mslerp_begin(void *state, const struct ms_stage_job *job)
{
    struct mslerp_state *s = state;
    int pw = ms_method_param(job->method, "weight");
    int pn = ms_method_param(job->method, "normalize_weights");
    int pe = ms_method_param(job->method, "eps");
    assert(pw >= 0 && pn >= 0 && pe >= 0 && job->ninputs <= MS_MAX_INPUTS);
    const enum ms_dtype d = job->compute;
    s->ib = job->base >= 0 && (uint32_t)job->base < job->ninputs ? job->base : -1;
    for (uint32_t i = 0; i < job->ninputs; i++)
        if ((int)i != s->ib)
            s->it[s->n++] = i;
    if (s->n == 0)
        return ms_error(MS_EPLAN, "%s: multislerp needs at least one model besides the base",
                        job->name);
    if (s->n == 1) {
        s->copy = true;
        return MS_STAGE_APPLY;
    }
    float sum = 0.0f;
    for (uint32_t i = 0; i < s->n; i++) {
        s->w[i] = ms_rnd_param(d, job->pv[s->it[i]][pw]);
        sum += s->w[i];
    }
    if (job->gv[pn] != 0) {
        sum = ms_rnd(d, sum);
        for (uint32_t i = 0; i < s->n; i++)
            s->w[i] = ms_rnd(d, s->w[i] / sum);
    }
    s->e = (float)job->gv[pe];
    s->pass = MSL_NORMS;
    for (uint32_t i = 0; i < s->n; i++)
        ms_xacc_init(&s->acc[i]);
    return MS_STAGE_REDUCE;
}

/* X_i of element j: the model minus the base when there is one. */
static inline float mslerp_x(enum ms_dtype d, const struct mslerp_state *s,
                             const struct ms_chunk *c, uint32_t i, size_t j)
{
    float x = c->in[s->it[i]][j];
    return s->ib >= 0 ? ms_rnd(d, x - c->in[s->ib][j]) : x;
}

/*
 * The elementwise chain runs over blocks of MSL_B elements, one step at a
 * time over the block through leaf kernels (restrict parameters, a constant
 * trip count for full blocks: loops the compiler vectorises), with every value
 * rounded exactly as the per-element formulas above say: each element sees
 * the same operations in the same order, so the block size changes no byte.
 */
#define MSL_B 1024

/* u = rnd(rnd(x - b) / den), or rnd(x / den) without a base (b NULL): U_i */
MS__AI void mslerp_k_unit(enum ms_dtype d, float *restrict u, const float *restrict x,
                          const float *restrict b, float den, size_t n)
{
    if (b)
        for (size_t k = 0; k < n; k++)
            u[k] = ms_rnd(d, ms_rnd(d, x[k] - b[k]) / den);
    else
        for (size_t k = 0; k < n; k++)
            u[k] = ms_rnd(d, x[k] / den);
}

/* v += rnd(u * w) */
MS__AI void mslerp_k_axpy(enum ms_dtype d, float *restrict v, const float *restrict u, float w,
                          size_t n)
{
    for (size_t k = 0; k < n; k++)
        v[k] += ms_rnd(d, u[k] * w);
}

/* u = rnd(u - rnd(dot * m)): T_i in place */
MS__AI void mslerp_k_tan(enum ms_dtype d, float *restrict u, const float *restrict m, float dot,
                         size_t n)
{
    for (size_t k = 0; k < n; k++)
        u[k] = ms_rnd(d, u[k] - ms_rnd(d, dot * m[k]));
}

/* y = rnd(rnd(rnd(m*cs) + rnd(v*q)) * avg), then rnd(y + b) with a base (b non-NULL) */
MS__AI void mslerp_k_out(enum ms_dtype d, float *restrict y, const float *restrict m,
                         const float *restrict v, const float *restrict b, float cs, float q,
                         float avg, size_t n)
{
    if (b)
        for (size_t k = 0; k < n; k++) {
            float r = ms_rnd(d, ms_rnd(d, m[k] * cs) + ms_rnd(d, v[k] * q));
            y[k] = ms_rnd(d, ms_rnd(d, r * avg) + b[k]);
        }
    else
        for (size_t k = 0; k < n; k++) {
            float r = ms_rnd(d, ms_rnd(d, m[k] * cs) + ms_rnd(d, v[k] * q));
            y[k] = ms_rnd(d, r * avg);
        }
}

/* v[k] = rnd(0 + rnd(u_0[k]*w_0) + rnd(u_1[k]*w_1) ...): the weighted sum over the models. */
MS__AI void mslerp_wsum(const enum ms_dtype d, const struct mslerp_state *s, float u[][MSL_B],
                        float *restrict v, size_t nb)
{
    for (size_t k = 0; k < nb; k++)
        v[k] = 0.0f;
    for (uint32_t i = 0; i < s->n; i++)
        mslerp_k_axpy(d, v, u[i], s->w[i], nb);
    for (size_t k = 0; k < nb; k++)
        v[k] = ms_rnd(d, v[k]);
}

/*
 * Keep area (bfloat16 compute only, ms_stage.h): one uint32 per element holding
 * two bfloat16 values of the chain, exact (every value is rounded to bf16):
 * the low half M after pass 1, then m after pass 2; the high half tau after
 * pass 3. Passes 2 and 3 then skip the weighted sums and the division they
 * would redo, and apply reads m and tau instead of replaying the chain. Without
 * a keep area (or in another compute dtype) every pass replays the chain from
 * the inputs: the same operations on the same values, the same bytes.
 */
MS__AI void mslerp_k_put_lo(uint32_t *restrict kp, const float *restrict x, size_t n)
{
    for (size_t k = 0; k < n; k++)
        kp[k] = ms_f32_bits(x[k]) >> 16;
}

MS__AI void mslerp_k_put_both(uint32_t *restrict kp, const float *restrict lo,
                              const float *restrict hi, size_t n)
{
    for (size_t k = 0; k < n; k++)
        kp[k] = ms_f32_bits(lo[k]) >> 16 | (ms_f32_bits(hi[k]) & 0xffff0000u);
}

MS__AI void mslerp_k_get(float *restrict lo, float *restrict hi, const uint32_t *restrict kp,
                         size_t n)
{
    for (size_t k = 0; k < n; k++)
        lo[k] = ms_f32_from_bits(kp[k] << 16);
    if (hi)
        for (size_t k = 0; k < n; k++)
            hi[k] = ms_f32_from_bits(kp[k] & 0xffff0000u);
}

/*
 * The chain for elements [j0, j0 + nb) as far as pass `upto` needs it: adds
 * the block's terms to a[] when upto is a reduce pass, and writes the output
 * values to c->out when upto is MSL_TAN + 1 (apply).
 */
MS__AI void mslerp_block(const enum ms_dtype d, const struct mslerp_state *s,
                         const struct ms_chunk *c, uint32_t upto, struct ms_xacc *a, size_t j0,
                         size_t nb)
{
    float u[MS_MAX_INPUTS][MSL_B], v[MSL_B], m[MSL_B];
    const float *b = s->ib >= 0 ? c->in[s->ib] + j0 : NULL;
    uint32_t *kp = d == MS_DT_BF16 && c->keep ? (uint32_t *)c->keep + j0 : NULL;
    if (upto == MSL_NORMS) { /* sum X_i^2 */
        for (uint32_t i = 0; i < s->n; i++) {
            const float *x = c->in[s->it[i]] + j0;
            if (b) {
                ms__k_sub(d, u[i], x, b, nb);
                x = u[i];
            }
            ms_xacc_sumsq(&a[i], x, nb);
        }
        return;
    }
    if (kp && upto > MSL_TAN) { /* apply: m and tau kept (read before out, maybe the same memory) */
        mslerp_k_get(m, v, kp, nb);
        mslerp_k_out(d, c->out + j0, m, v, b, s->cs, s->q, s->avg, nb);
        return;
    }
    for (uint32_t i = 0; i < s->n; i++) /* U_i */
        mslerp_k_unit(d, u[i], c->in[s->it[i]] + j0, b, s->den[i], nb);
    if (kp && upto == MSL_TAN) {
        mslerp_k_get(m, NULL, kp, nb); /* m */
    } else {
        if (kp && upto == MSL_DOTS)
            mslerp_k_get(v, NULL, kp, nb); /* M */
        else
            mslerp_wsum(d, s, u, v, nb); /* M */
        if (upto == MSL_MEAN) {
            if (kp)
                mslerp_k_put_lo(kp, v, nb);
            ms_xacc_sumsq(&a[0], v, nb);
            return;
        }
        ms__k_div(d, m, v, s->mn, nb);
        if (kp)
            mslerp_k_put_lo(kp, m, nb);
    }
    if (upto == MSL_DOTS) {
        for (uint32_t i = 0; i < s->n; i++) {
            ms__k_mul(d, v, u[i], m, nb);
            ms_xacc_sum(&a[i], v, nb);
        }
        return;
    }
    for (uint32_t i = 0; i < s->n; i++) /* T_i, in place */
        mslerp_k_tan(d, u[i], m, s->dot[i], nb);
    mslerp_wsum(d, s, u, v, nb); /* tau */
    if (upto == MSL_TAN) {
        if (kp)
            mslerp_k_put_both(kp, m, v, nb);
        ms_xacc_sumsq(&a[0], v, nb);
        return;
    }
    mslerp_k_out(d, c->out + j0, m, v, b, s->cs, s->q, s->avg, nb);
}

MS__AI void mslerp_blocks(const enum ms_dtype d, const struct mslerp_state *s,
                          const struct ms_chunk *c, uint32_t upto, struct ms_xacc *a)
{
    size_t n = (size_t)c->count;
    for (size_t j0 = 0; j0 < n; j0 += MSL_B) {
        size_t nb = MS_MIN((size_t)MSL_B, n - j0);
        MS__BLOCK_CALL(mslerp_block, nb, MSL_B, d, s, c, upto, a, j0);
    }
}

/* The chain specialised for the compute dtype (D is a constant in each). */
static void mslerp_run(enum ms_dtype d, const struct mslerp_state *s, const struct ms_chunk *c,
                       uint32_t upto, struct ms_xacc *a)
{
    switch (d) {
    case MS_DT_BF16: mslerp_blocks(MS_DT_BF16, s, c, upto, a); break;
    case MS_DT_F16: mslerp_blocks(MS_DT_F16, s, c, upto, a); break;
    default:
        assert(d == MS_DT_F32);
        mslerp_blocks(MS_DT_F32, s, c, upto, a);
        break;
    }
}

MS__ISA_VERSIONS(mslerp_run_isa, mslerp_run,
                 (enum ms_dtype d, const struct mslerp_state *s, const struct ms_chunk *c,
                  uint32_t upto, struct ms_xacc *a),
                 (d, s, c, upto, a))

static void mslerp_reduce(const void *state, const struct ms_stage_job *job,
                          const struct ms_chunk *c, void *partial)
{
    const struct mslerp_state *s = state;
    struct ms_xacc *a = partial;
    for (uint32_t i = 0; i < mslerp_nsums(s); i++)
        ms_xacc_init(&a[i]);
    mslerp_run_isa(job->compute, s, c, s->pass, a);
}

static void mslerp_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                        const void *partial)
{
    struct mslerp_state *s = state;
    const struct ms_xacc *a = partial;
    for (uint32_t i = 0; i < mslerp_nsums(s); i++)
        ms_xacc_merge(&s->acc[i], &a[i]);
}

/* rnd(sqrtf(float32(sum))): torch.norm in D from an exact sum of squares. */
static float mslerp_norm(enum ms_dtype d, const struct ms_xacc *a)
{
    return ms_rnd(d, sqrtf((float)ms_xacc_value(a)));
}

static int mslerp_end_pass(void *state, const struct ms_stage_job *job)
{
    struct mslerp_state *s = state;
    const enum ms_dtype d = job->compute;
    switch (s->pass) {
    case MSL_NORMS:
        for (uint32_t i = 0; i < s->n; i++) {
            s->norm[i] = mslerp_norm(d, &s->acc[i]);
            s->den[i] = ms_rnd(d, s->norm[i] + s->e);
        }
        break;
    case MSL_MEAN: {
        s->mn = mslerp_norm(d, &s->acc[0]);
        int pe = ms_method_param(job->method, "eps");
        assert(pe >= 0);
        if (s->mn < ms_rnd_param(d, job->gv[pe])) {
            if (s->n != 2)
                return ms_error(MS_EDATA, "%s: multislerp: the weighted sum of the models' "
                                "directions is zero (antipodal models whose weights cancel); "
                                "change the weights", job->name);
            s->lerp = true;
            return MS_STAGE_APPLY;
        }
        break;
    }
    case MSL_DOTS:
        for (uint32_t i = 0; i < s->n; i++)
            s->dot[i] = ms_rnd(d, (float)ms_xacc_value(&s->acc[i]));
        break;
    default: {
        assert(s->pass == MSL_TAN);
        float tn = ms_rnd(d, mslerp_norm(d, &s->acc[0]) + s->e);
        s->cs = ms_rnd(d, cosf(tn));
        s->q = ms_rnd(d, ms_rnd(d, sinf(tn)) / tn);
        float avg = 0.0f; /* rnd(0 + rnd(n_0*w_0) + ...) */
        for (uint32_t i = 0; i < s->n; i++)
            avg += ms_rnd(d, s->norm[i] * s->w[i]);
        s->avg = ms_rnd(d, avg);
        return MS_STAGE_APPLY;
    }
    }
    s->pass++;
    for (uint32_t i = 0; i < mslerp_nsums(s); i++)
        ms_xacc_init(&s->acc[i]);
    return MS_STAGE_REDUCE;
}

/* The linear fallback (mn < eps, two models). */
static inline void mslerp_lerp(enum ms_dtype d, const struct mslerp_state *s,
                               const struct ms_chunk *c)
{
    for (size_t j = 0; j < (size_t)c->count; j++) {
        float r = ms_rnd(d, ms_rnd(d, mslerp_x(d, s, c, 0, j) * s->w[0]) +
                                ms_rnd(d, mslerp_x(d, s, c, 1, j) * s->w[1]));
        c->out[j] = s->ib >= 0 ? ms_rnd(d, r + c->in[s->ib][j]) : r;
    }
}

static void mslerp_apply(const void *state, const struct ms_stage_job *job,
                         const struct ms_chunk *c)
{
    const struct mslerp_state *s = state;
    if (s->copy) {
        memcpy(c->out, c->in[s->it[0]], (size_t)c->count * sizeof(float));
        return;
    }
    if (s->lerp)
        mslerp_lerp(job->compute, s, c);
    else
        mslerp_run_isa(job->compute, s, c, MSL_TAN + 1, NULL);
}

/*
 * The keep area pays in bfloat16 compute with two models or more (see
 * mslerp_k_put_lo), and is asked for only up to MSL_KEEP_MAX elements: larger
 * tensors (embeddings) are rarely resident, and for them the engine would
 * reserve a keep pool of numel * 4 bytes out of the budget; at the default 512M
 * that pool (262 MB for a 65.5 M-element embedding) took peak RSS from 465 to
 * 598 MB on the bench, past budget + 32 MiB. Those tensors replay the chain.
 */
#define MSL_KEEP_MAX ((uint64_t)16 << 20)
static bool mslerp_keeps(const struct ms_stage_job *job)
{
    bool base = job->base >= 0 && (uint32_t)job->base < job->ninputs;
    return job->compute == MS_DT_BF16 && job->ninputs - (base ? 1u : 0u) >= 2 &&
           job->numel <= MSL_KEEP_MAX;
}

static const struct ms_stage_ops mslerp_ops = {
    .state_size = mslerp_state_size,
    .keeps = mslerp_keeps,
    .partial_size = mslerp_partial_size,
    .begin = mslerp_begin,
    .reduce = mslerp_reduce,
    .fold = mslerp_fold,
    .end_pass = mslerp_end_pass,
    .apply = mslerp_apply,
};

const struct ms_method ms_method_multislerp = {
    .name = "multislerp",
    .summary = "barycentric slerp of several models",
    .flags = MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 3,
    .params = { MS__PM_REQ("weight"), MS__G_BOOL("normalize_weights", 1),
                MS__G("eps", 1e-8, 0, MS__INF) },
    .card = { "Multi-SLERP", NULL },
    .ops = &mslerp_ops,
};
