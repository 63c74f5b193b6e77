/*
 * slerp.c - the `slerp` method (mergekit-spec.md 2.3): spherical interpolation
 * between the base a and the other model b over the whole flattened tensor,
 * in float32 with NumPy >= 2 scalar semantics. t = 0 gives a, t = 1 gives b.
 *
 * One reduce pass sums a.a, b.b and a.b exactly (ms_xacc), then, all in float32:
 *   na = sqrtf(float(a.a))            NumPy's norm: sqrt of a float32 dot
 *   da = na > 1e-8f ? na : 1          the vector is normalised only above eps
 *   dot = float((a.b) / (da*db))      see "dot" below
 *   |dot| > 0.9995f:  res = float32(1-t)*a + float32(t)*b     (lerp)
 *   otherwise:        th = acosf(dot), tt = th*float32(t),
 *                     s0 = sinf(th - tt)/sinf(th), s1 = sinf(tt)/sinf(th),
 *                     res = s0*a + s1*b
 * Every product and sum is a float32 operation (no FMA: -ffp-contract=off).
 * apply writes res as float32; the result dtype is the base tensor's (slerp_dtypes):
 * the engine rounds to it and then, when a recipe sets out_dtype, to that, as
 * mergekit's .to(base.dtype) followed by its writer's cast.
 *
 * dot: NumPy computes sum(a/na * b/nb) with a pairwise float32 sum, whose order
 * depends on the array layout and SIMD width. We compute the exact a.b divided
 * by na*nb in double and round once; the two differ by about one float32 ulp
 * of dot at most for ordinary tensors (accepted: mergekit-spec.md 2.3, 7.20).
 * The norms likewise come from the exact sum rounded to float32 rather than from
 * a BLAS sdot. libm's acosf/sinf may differ from NumPy's own float32 kernels by
 * an ulp. All of these are whole-tensor scalars, so the result never depends on
 * chunking.
 *
 * One input present (the other model lacks the tensor): it is copied unchanged.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

struct slerp_sums {
    struct ms_xacc aa, bb, ab;
};

struct slerp_state {
    struct slerp_sums sums;       /* folded in chunk order (order-free anyway) */
    uint32_t ia, ib;              /* input index of a (the base) and b */
    bool copy;                    /* one input: out = in[ia] */
    float c0, c1;                 /* end_pass: res = c0*a + c1*b */
    /* the scalars, kept for tests and diagnostics */
    float na, nb, dot;
    bool lerp;
};

static size_t slerp_state_size(const struct ms_stage_job *job) { return sizeof(struct slerp_state); }
static size_t slerp_partial_size(const struct ms_stage_job *job) { return sizeof(struct slerp_sums); }

static int slerp_begin(void *state, const struct ms_stage_job *job)
{
    struct slerp_state *s = state;
    if (job->ninputs == 1) {
        s->copy = true;
        s->ia = 0;
        return MS_STAGE_APPLY;
    }
    if (job->ninputs != 2)
        return ms_error(MS_EPLAN, "%s: slerp merges exactly 2 tensors, got %u", job->name,
                        job->ninputs);
    if (job->base != 0 && job->base != 1)
        return ms_error(MS_EPLAN, "%s: slerp needs the base model among its 2 inputs", job->name);
    s->ia = (uint32_t)job->base;
    s->ib = 1 - s->ia;
    ms_xacc_init(&s->sums.aa);
    ms_xacc_init(&s->sums.bb);
    ms_xacc_init(&s->sums.ab);
    return MS_STAGE_REDUCE;
}

static void slerp_reduce(const void *state, const struct ms_stage_job *job,
                         const struct ms_chunk *c, void *partial)
{
    const struct slerp_state *s = state;
    struct slerp_sums *p = partial;
    const float *a = c->in[s->ia], *b = c->in[s->ib];
    size_t n = (size_t)c->count;
    ms_xacc_init(&p->aa);
    ms_xacc_init(&p->bb);
    ms_xacc_init(&p->ab);
    ms_xacc_sumsq(&p->aa, a, n);
    ms_xacc_sumsq(&p->bb, b, n);
    ms_xacc_dot(&p->ab, a, b, n);
}

static void slerp_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                       const void *partial)
{
    struct slerp_state *s = state;
    const struct slerp_sums *p = partial;
    ms_xacc_merge(&s->sums.aa, &p->aa);
    ms_xacc_merge(&s->sums.bb, &p->bb);
    ms_xacc_merge(&s->sums.ab, &p->ab);
}

static int slerp_end_pass(void *state, const struct ms_stage_job *job)
{
    struct slerp_state *s = state;
    int pt = ms_method_param(job->method, "t");
    assert(pt >= 0);
    double t = job->gv[pt];
    float t32 = (float)t;
    s->na = sqrtf((float)ms_xacc_value(&s->sums.aa));
    s->nb = sqrtf((float)ms_xacc_value(&s->sums.bb));
    /* NumPy >= 2 compares a float32 with a Python float in float32. */
    float da = s->na > 1e-8f ? s->na : 1.0f, db = s->nb > 1e-8f ? s->nb : 1.0f;
    s->dot = (float)(ms_xacc_value(&s->sums.ab) / ((double)da * (double)db));
    s->lerp = fabsf(s->dot) > 0.9995f;
    if (s->lerp) {
        s->c0 = (float)(1.0 - t); /* (1 - t) is a Python float, then a weak float32 */
        s->c1 = t32;
    } else {
        float th = acosf(s->dot);
        float sth = sinf(th);
        float tt = th * t32;
        s->c0 = sinf(th - tt) / sth;
        s->c1 = sinf(tt) / sth;
    }
    return MS_STAGE_APPLY;
}

/*
 * y[j] = c0*a[j] + c1*b[j] in float32, each product rounded (no FMA). NaN rule
 * (any version, any position): a term c*x that meets a NaN x gives x's NaN
 * (quieted), else the product; the sum keeps the a-term's NaN when both terms
 * are NaN (ms__acc_add). Two NaN meet only when the tensor holds a NaN (the
 * coefficients are NaN then): the compiler may put either operand of a vector
 * or scalar mul/add first, and x86 returns the first one's NaN, so the choice
 * is made explicit here.
 */
MS__AI float slerp_term(float c, float x)
{
    return x != x ? x + x : c * x;
}

static void slerp_mix(float *restrict y, const float *restrict a, const float *restrict b,
                      float c0, float c1, size_t n)
{
    for (size_t j = 0; j < n; j++)
        y[j] = ms__acc_add(slerp_term(c0, a[j]), slerp_term(c1, b[j]));
}

MS__ISA_VERSIONS(slerp_mix_isa, slerp_mix,
                 (float *restrict y, const float *restrict a, const float *restrict b, float c0,
                  float c1, size_t n),
                 (y, a, b, c0, c1, n))

static void slerp_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    const struct slerp_state *s = state;
    size_t n = (size_t)c->count;
    if (s->copy)
        memcpy(c->out, c->in[s->ia], n * sizeof(float));
    else
        slerp_mix_isa(c->out, c->in[s->ia], c->in[s->ib], s->c0, s->c1, n);
}

/*
 * The stored-bytes path (ms_stage_ops.stored_passes), bfloat16 or float16
 * inputs and output: each block of SLERP_SB elements is decoded into float
 * scratch that stays in L1, and the float kernels run on it, so the terms
 * summed and the floats mixed are the float path's; apply's floats are encoded
 * to the stored dtype, which is what rounding them to the base's dtype and
 * encoding gives (one round to nearest even; NaN quieted either way).
 */
#define SLERP_SB 2048u            /* elements per block: 3 * 8 KiB of floats */

static bool slerp_stored_passes(const void *state, const struct ms_stage_job *job,
                                enum ms_dtype dt)
{
    return dt == MS_DT_BF16 || dt == MS_DT_F16;
}

static void slerp_reduce_stored(const void *state, const struct ms_stage_job *job,
                                const struct ms_chunk_stored *c, void *partial)
{
    const struct slerp_state *s = state;
    struct slerp_sums *p = partial;
    const uint16_t *a = c->in[s->ia], *b = c->in[s->ib];
    _Alignas(MS_ALIGN) float fa[SLERP_SB], fb[SLERP_SB];
    assert(c->dt == MS_DT_BF16 || c->dt == MS_DT_F16);
    ms_xacc_init(&p->aa);
    ms_xacc_init(&p->bb);
    ms_xacc_init(&p->ab);
    for (size_t off = 0, n = (size_t)c->count, m; off < n; off += m) {
        m = MS_MIN((size_t)SLERP_SB, n - off);
        ms_dtype_decode(c->dt, a + off, fa, m);
        ms_dtype_decode(c->dt, b + off, fb, m);
        ms_xacc_sumsq(&p->aa, fa, m);
        ms_xacc_sumsq(&p->bb, fb, m);
        ms_xacc_dot(&p->ab, fa, fb, m);
    }
}

static bool slerp_apply_stored(const void *state, const struct ms_stage_job *job,
                               const struct ms_chunk_stored *c)
{
    const struct slerp_state *s = state;
    if (c->dt != MS_DT_BF16 && c->dt != MS_DT_F16)
        return false;
    size_t n = (size_t)c->count;
    const uint16_t *a = c->in[s->ia], *b = c->in[s->ib];
    uint16_t *y = c->out;
    _Alignas(MS_ALIGN) float fa[SLERP_SB], fb[SLERP_SB], fy[SLERP_SB];
    for (size_t off = 0, m; off < n; off += m) {
        m = MS_MIN((size_t)SLERP_SB, n - off);
        ms_dtype_decode(c->dt, a + off, fa, m);
        if (s->copy) { /* decoded and encoded, not copied: a signalling NaN is quieted */
            ms_dtype_encode(c->dt, fa, y + off, m);
            continue;
        }
        ms_dtype_decode(c->dt, b + off, fb, m);
        slerp_mix_isa(fy, fa, fb, s->c0, s->c1, m);
        ms_dtype_encode(c->dt, fy, y + off, m);
    }
    return true;
}

static const struct ms_stage_ops slerp_ops = {
    .state_size = slerp_state_size,
    .partial_size = slerp_partial_size,
    .begin = slerp_begin,
    .reduce = slerp_reduce,
    .fold = slerp_fold,
    .end_pass = slerp_end_pass,
    .apply = slerp_apply,
    .apply_stored = slerp_apply_stored,
    .stored_passes = slerp_stored_passes,
    .reduce_stored = slerp_reduce_stored,
};

/* mergekit computes in float32 and casts the result to the base's dtype. */
static void slerp_dtypes(const struct ms_stage_job *job, const enum ms_dtype *load,
                         enum ms_dtype *compute, enum ms_dtype *out)
{
    *compute = MS_DT_F32;
    *out = load[job->base >= 0 ? job->base : 0];
}

static const struct ms_plan_ops slerp_plan = {
    .dtypes = slerp_dtypes,
};

const struct ms_method ms_method_slerp = {
    .name = "slerp",
    .summary = "spherical interpolation between the base and one model",
    .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT,
    .min_inputs = 1,
    .max_inputs = 2,
    .nparams = 1,
    .params = { MS__G_REQ("t") },
    .card = { "SLERP", "https://en.wikipedia.org/wiki/Slerp", .hide_base = true },
    .plan = &slerp_plan,
    .ops = &slerp_ops,
};
