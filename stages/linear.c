/*
 * linear.c - the `linear` method (mergekit-spec.md 2.2): a weighted sum of the
 * inputs, optionally divided by the sum of the weights.
 *
 * With D the compute dtype and rnd() rounding to it (section 0):
 *   W_i = rnd(float32(w_i))                        weights as a D tensor (rule 0.5)
 *   S   = rnd(0 + rnd(W_0*X_0) + rnd(W_1*X_1) ...)  float32 accumulation in input order
 *   out = rnd(S / rnd(0 + W_0 + W_1 ...))           normalize: true (no zero guard)
 *   out = S                                         normalize: false
 * The accumulations start from +0.0 as torch's sum does (its additive identity),
 * which matters only for the sign of a zero. Every element depends only on its own
 * inputs, so the method needs no reduce pass and is exact in every compute dtype.
 */
#include <assert.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

struct linear_state {
    float w[MS_MAX_INPUTS];       /* W_i, already in D */
    float wsum;                   /* rnd(sum W_i) */
    bool normalize;
};

static size_t linear_state_size(const struct ms_stage_job *job) { return sizeof(struct linear_state); }

static int linear_begin(void *state, const struct ms_stage_job *job)
{
    struct linear_state *s = state;
    int pw = ms_method_param(job->method, "weight");
    int pn = ms_method_param(job->method, "normalize");
    assert(pw >= 0 && pn >= 0 && job->ninputs <= MS_MAX_INPUTS);
    if (job->ninputs == 0)
        return ms_error(MS_EPLAN, "%s: linear merge with no input", job->name);
    float acc = 0.0f;
    for (uint32_t i = 0; i < job->ninputs; i++) {
        s->w[i] = ms_rnd_param(job->compute, job->pv[i][pw]);
        acc += s->w[i];
    }
    s->wsum = ms_rnd(job->compute, acc);
    s->normalize = job->gv[pn] != 0;
    return MS_STAGE_APPLY;
}

/* Kernels; d is a constant in each caller so that ms_rnd inlines to one path. */

/* acc[j] += rnd(w * x[j]); where both are NaN acc's is kept (ms__acc_add: the
 * first NaN in model order, whatever operand order a vector add gets) */
MS__AI void linear_axpy(enum ms_dtype d, float *restrict acc, const float *restrict x, float w,
                        size_t n)
{
    for (size_t j = 0; j < n; j++)
        acc[j] = ms__acc_add(acc[j], ms_rnd(d, w * x[j]));
}

/* y[j] = rnd(y[j]), then y[j] = rnd(y[j] / div) when normalizing */
MS__AI void linear_finish(enum ms_dtype d, float *restrict y, bool normalize, float div, size_t n)
{
    if (normalize)
        for (size_t j = 0; j < n; j++)
            y[j] = ms_rnd(d, ms_rnd(d, y[j]) / div);
    else
        for (size_t j = 0; j < n; j++)
            y[j] = ms_rnd(d, y[j]);
}

/* Elements per block: the accumulator stays in L1 across the inputs. */
#define LINEAR_BLOCK 512

MS__AI void linear_block(enum ms_dtype d, const struct linear_state *s,
                         const struct ms_stage_job *job, const struct ms_chunk *c, size_t b,
                         size_t m)
{
    float *restrict y = c->out + b;
    for (size_t j = 0; j < m; j++)
        y[j] = 0.0f;
    for (uint32_t i = 0; i < job->ninputs; i++)
        linear_axpy(d, y, c->in[i] + b, s->w[i], m);
    linear_finish(d, y, s->normalize, s->wsum, m);
}

MS__AI void linear_chunk(enum ms_dtype d, const struct linear_state *s,
                         const struct ms_stage_job *job, const struct ms_chunk *c)
{
    size_t n = (size_t)c->count;
    for (size_t b = 0; b < n; b += LINEAR_BLOCK) {
        size_t m = MS_MIN((size_t)LINEAR_BLOCK, n - b);
        MS__BLOCK_CALL(linear_block, m, LINEAR_BLOCK, d, s, job, c, b);
    }
}

/* linear_chunk specialised for the compute dtype (a constant in each call). */
static void linear_run(const struct linear_state *s, const struct ms_stage_job *job,
                       const struct ms_chunk *c)
{
    switch (job->compute) {
    case MS_DT_BF16: linear_chunk(MS_DT_BF16, s, job, c); break;
    case MS_DT_F16: linear_chunk(MS_DT_F16, s, job, c); break;
    default:
        assert(job->compute == MS_DT_F32);
        linear_chunk(MS_DT_F32, s, job, c);
        break;
    }
}

MS__ISA_VERSIONS(linear_run_isa, linear_run,
                 (const struct linear_state *s, const struct ms_stage_job *job,
                  const struct ms_chunk *c),
                 (s, job, c))

static void linear_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    linear_run_isa(state, job, c);
}

/*
 * The stored-bytes path (ms_stage_ops.apply_stored), bfloat16 compute only:
 * linear_block's operations in the same order on the same values, read from
 * the stored elements (a bf16 element is its float's top 16 bits) and written
 * encoded (ms_f32_to_bf16_1 of the value before its last rounding is the
 * encoding of the rounded value), so decode, apply and encode become one pass
 * over L1-sized blocks.
 */

/* ms_f32_to_bf16_1, with the NaN case as a select so that the loops vectorise */
MS__AI uint32_t linear_bf16_bits(float f)
{
    uint32_t u = ms_f32_bits(f);
    uint32_t q = (u >> 16) | 0x40u;
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? q : r;
}

/* ms_round_bf16_1 through linear_bf16_bits */
MS__AI float linear_round_bf16(float f) { return ms_f32_from_bits(linear_bf16_bits(f) << 16); }

/* f[j] = the float of stored bf16 x[j] */
MS__AI void linear_decode_bf16(float *restrict f, const uint16_t *restrict x, size_t n)
{
    for (size_t j = 0; j < n; j++)
        f[j] = ms_f32_from_bits((uint32_t)x[j] << 16);
}

/* acc[j] += rnd(w * f[j]): linear_axpy in bf16 */
MS__AI void linear_axpy_bf16(float *restrict acc, const float *restrict f, float w, size_t n)
{
    for (size_t j = 0; j < n; j++)
        acc[j] = ms__acc_add(acc[j], linear_round_bf16(w * f[j]));
}

/* out[j] = the bf16 encoding of linear_finish's y[j] */
MS__AI void linear_finish_bf16(uint16_t *restrict out, const float *restrict y, bool normalize,
                               float div, size_t n)
{
    if (normalize)
        for (size_t j = 0; j < n; j++)
            out[j] = (uint16_t)linear_bf16_bits(linear_round_bf16(y[j]) / div);
    else
        for (size_t j = 0; j < n; j++)
            out[j] = (uint16_t)linear_bf16_bits(y[j]);
}

MS__AI void linear_stored_block(const struct linear_state *s, const struct ms_stage_job *job,
                                const struct ms_chunk_stored *c, size_t b, size_t m)
{
    float y[LINEAR_BLOCK], f[LINEAR_BLOCK];
    for (size_t j = 0; j < m; j++)
        y[j] = 0.0f;
    for (uint32_t i = 0; i < job->ninputs; i++) {
        linear_decode_bf16(f, (const uint16_t *)c->in[i] + b, m);
        linear_axpy_bf16(y, f, s->w[i], m);
    }
    linear_finish_bf16((uint16_t *)c->out + b, y, s->normalize, s->wsum, m);
}

static void linear_stored_run(const struct linear_state *s, const struct ms_stage_job *job,
                              const struct ms_chunk_stored *c)
{
    size_t n = (size_t)c->count;
    for (size_t b = 0; b < n; b += LINEAR_BLOCK) {
        size_t m = MS_MIN((size_t)LINEAR_BLOCK, n - b);
        MS__BLOCK_CALL(linear_stored_block, m, LINEAR_BLOCK, s, job, c, b);
    }
}

MS__ISA_VERSIONS(linear_stored_isa, linear_stored_run,
                 (const struct linear_state *s, const struct ms_stage_job *job,
                  const struct ms_chunk_stored *c),
                 (s, job, c))

static bool linear_apply_stored(const void *state, const struct ms_stage_job *job,
                                const struct ms_chunk_stored *c)
{
    if (job->compute != MS_DT_BF16)
        return false;
    linear_stored_isa(state, job, c);
    return true;
}

static const struct ms_stage_ops linear_ops = {
    .state_size = linear_state_size,
    .begin = linear_begin,
    .apply = linear_apply,
    .apply_stored = linear_apply_stored,
};

/* Weights that sum to zero under normalize: true divide by zero: every element is
 * NaN or infinite. mergekit does the same (no zero guard), so it is a warning. */
static int linear_check(const struct ms_plan_ctx *ctx, const struct ms_stage_job *job)
{
    int pw = ms_method_param(job->method, "weight");
    int pn = ms_method_param(job->method, "normalize");
    if (job->gv[pn] == 0)
        return 0;
    float acc = 0.0f;
    for (uint32_t i = 0; i < job->ninputs; i++)
        acc += ms_rnd_param(job->compute, job->pv[i][pw]);
    if (ms_rnd(job->compute, acc) == 0.0f)
        ctx->tally(ctx, job->name);
    return 0;
}

static void linear_tally_warn(const char *recipe, size_t count, const char *first)
{
    ms_log_warn("%s: the weights sum to zero for %zu tensor%s (e.g. '%s') with normalize: true; "
                "as in mergekit, dividing by the sum makes them NaN or infinite (set other "
                "weights or normalize: false)", recipe, count, count == 1 ? "" : "s", first);
}

static const struct ms_plan_ops linear_plan = {
    .check = linear_check,
    .tally_warn = linear_tally_warn,
};

const struct ms_method ms_method_linear = {
    .name = "linear",
    .summary = "weighted average of the models",
    .flags = MS_M_BASE_INPUT | MS_M_BASE_PARAMS,
    .min_inputs = 1,
    .nparams = 2,
    .params = { MS__PM_REQ("weight"), MS__G_BOOL("normalize", 1) },
    .card = { "Linear", "https://arxiv.org/abs/2203.05482" },
    .plan = &linear_plan,
    .ops = &linear_ops,
};
