/*
 * nearswap.c - the `nearswap` method (mergekit-spec.md 2.10): take the other
 * model b where it is within t of the base a, and move toward it elsewhere.
 *
 * Elementwise, in the compute dtype D with torch's per-op rounding (section 0):
 *   ad  = |rnd(a - b)|
 *   cl  = max(ad, rnd(1e-6))          clamp(min=1e-6): torch casts the bound to D
 *   w   = rnd(rnd(1/cl) * float32(t)) t / tensor is reciprocal(tensor) * t (rule 0.4)
 *   w   = min(max(w, 0), 1)
 *   out = rnd(rnd(w*b) + rnd(rnd(1 - w) * a))
 * Every element depends only on its own inputs: no reduce pass, and the result
 * is mergekit's bit for bit in every compute dtype (spec 7.20). NaN propagates
 * through the clamps as torch's does; where both operands of a product or of
 * the sum are NaN, the first one's is kept (ms__mul_first, ms__acc_add), as
 * x86 gives it in torch's operand order.
 *
 * Inputs: the base (required) and exactly one other model. The base alone is
 * returned unchanged; a lone tensor that is not the base's is an error, as in
 * mergekit (the base tensor is required).
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

struct nearswap_state {
    uint32_t ia, ib;              /* input index of a (the base) and b */
    bool copy;                    /* the base alone: out = a */
    float t;                      /* float32(t) */
    float lo;                     /* rnd(1e-6): the clamp bound in D */
};

static size_t nearswap_state_size(const struct ms_stage_job *job)
{
    return sizeof(struct nearswap_state);
}

static int nearswap_begin(void *state, const struct ms_stage_job *job)
{
    struct nearswap_state *s = state;
    int pt = ms_method_param(job->method, "t");
    assert(pt >= 0);
    if (job->base < 0 || (uint32_t)job->base >= job->ninputs)
        return ms_error(MS_EPLAN, "%s: nearswap needs the base model's tensor", job->name);
    s->ia = (uint32_t)job->base;
    if (job->ninputs == 1) {
        s->copy = true;
        return MS_STAGE_APPLY;
    }
    if (job->ninputs != 2)
        return ms_error(MS_EPLAN, "%s: nearswap merges the base and exactly one other model, "
                        "got %u tensors", job->name, job->ninputs);
    s->ib = 1 - s->ia;
    s->t = (float)job->gv[pt];
    s->lo = ms_rnd_param(job->compute, 1e-6);
    return MS_STAGE_APPLY;
}

/* y[j] = nearswap(a[j], b[j]) as in the file comment; d is a constant in each caller. */
MS__AI void nearswap_kern(enum ms_dtype d, float *restrict y, const float *restrict a,
                          const float *restrict b, float t, float lo, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        float ad = fabsf(ms_rnd(d, a[j] - b[j]));
        float cl = ad < lo ? lo : ad;                 /* NaN stays NaN */
        float w = ms_rnd(d, ms_rnd(d, 1.0f / cl) * t);
        w = w < 0.0f ? 0.0f : w;
        w = w > 1.0f ? 1.0f : w;
        float wb = ms_rnd(d, ms__mul_first(w, b[j]));
        y[j] = ms_rnd(d, ms__acc_add(wb, ms_rnd(d, ms__mul_first(ms_rnd(d, 1.0f - w), a[j]))));
    }
}

/* Elements per block: a constant trip count for the vectoriser (MS__BLOCK_CALL). */
#define NEARSWAP_BLOCK 512

MS__AI void nearswap_chunk(enum ms_dtype d, float *restrict y, const float *restrict a,
                           const float *restrict b, float t, float lo, size_t n)
{
    for (size_t k = 0; k < n; k += NEARSWAP_BLOCK) {
        size_t m = MS_MIN((size_t)NEARSWAP_BLOCK, n - k);
        MS__BLOCK_CALL(nearswap_kern, m, NEARSWAP_BLOCK, d, y + k, a + k, b + k, t, lo);
    }
}

/* nearswap_chunk specialised for the compute dtype (a constant in each call). */
static void nearswap_run(enum ms_dtype d, float *restrict y, const float *restrict a,
                         const float *restrict b, float t, float lo, size_t n)
{
    switch (d) {
    case MS_DT_BF16: nearswap_chunk(MS_DT_BF16, y, a, b, t, lo, n); break;
    case MS_DT_F16: nearswap_chunk(MS_DT_F16, y, a, b, t, lo, n); break;
    default:
        assert(d == MS_DT_F32);
        nearswap_chunk(MS_DT_F32, y, a, b, t, lo, n);
        break;
    }
}

MS__ISA_VERSIONS(nearswap_run_isa, nearswap_run,
                 (enum ms_dtype d, float *restrict y, const float *restrict a,
                  const float *restrict b, float t, float lo, size_t n),
                 (d, y, a, b, t, lo, n))

static void nearswap_apply(const void *state, const struct ms_stage_job *job,
                           const struct ms_chunk *c)
{
    const struct nearswap_state *s = state;
    size_t n = (size_t)c->count;
    const float *a = c->in[s->ia];
    if (s->copy) {
        memcpy(c->out, a, n * sizeof(float));
        return;
    }
    nearswap_run_isa(job->compute, c->out, a, c->in[s->ib], s->t, s->lo, n);
}

static const struct ms_stage_ops nearswap_ops = {
    .state_size = nearswap_state_size,
    .begin = nearswap_begin,
    .apply = nearswap_apply,
};

const struct ms_method ms_method_nearswap = {
    .name = "nearswap",
    .summary = "take the other model where it is near the base",
    .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT,
    .min_inputs = 1,
    .max_inputs = 2,
    .nparams = 1,
    .params = { MS__G_REQ("t") },
    .card = { "NearSwap", NULL },
    .ops = &nearswap_ops,
};
