/*
 * model_stock.c - the `model_stock` method (mergekit-spec.md 2.8): move from
 * the base w0 toward the average of the others by a ratio t that grows with
 * how aligned their task vectors are.
 *
 * With w_1..w_N the other models in input order, rnd() rounding to the compute
 * dtype D, and sums over a vector ("filter_wise: false": the whole flattened
 * tensor; "true": each row, i.e. each vector along the last dim; a 1-D tensor
 * is one row):
 *   o_i   = rnd(w_i - w0)
 *   n_i   = rnd(sqrtf(float32(sum o_i^2)))           torch.norm in D
 *   dot   = rnd(float32(sum rnd(o_i*o_j)))           (o_i*o_j).sum(): products in D first
 *   cos   = clamp(rnd(dot / max(rnd(n_i*n_j), rnd(1e-6))), -1, 1)   for each pair i < j
 *   c     = rnd((0 + cos_12 + cos_13 + ...) / float32(K))   mean of the K pairs, float32 sum
 *   t     = rnd(rnd(N*c) / rnd(1 + rnd((N-1)*c)))
 *   avg   = rnd(rnd(...rnd(rnd(0 + w_1) + w_2)...) / N)
 *   out   = rnd(rnd(t*avg) + rnd(rnd(1 - t)*w0))
 * The elementwise steps follow torch exactly. The vector sums are exact sums
 * (ms_xacc) rounded once to float32, where torch adds in float32 in a blocked
 * order; the two agree except in rare ties of the final rounding (about 1 ulp
 * of a scalar, spec 7.20). The mean of the cosines adds them in pair order.
 *
 * filter_wise false: one reduce pass sums every o_i^2 and rounded o_i*o_j over
 * the tensor; end_pass computes t; apply is elementwise. filter_wise true: the
 * stage is ROWWISE and apply computes each row's t from the row alone (no
 * reduce). Both are independent of chunking.
 *
 * Mixed input dtypes (no dtype:, e.g. a bf16 base and a float16 model): torch
 * promotes op by op, so every step above rounds to the promotion of its own
 * operands' dtypes (struct mstock_dt): o_i to P(dt_i, dt_0); a pair's products,
 * dot, norm product and cosine to P of the two offsets' dtypes; the stacked
 * cosines, their mean and t to P of all pairs'; the running sum 0 + w_1 + ...
 * to P of the models added so far, and avg to its last; t*avg, (1-t)*w0 and
 * their sum to the promotions of their operands. The plan computes in float32
 * then (every value is exact there) and the stage rounds as above.
 *
 * Inputs: the base alone is returned unchanged. Otherwise the base and at least
 * two others are needed: fewer is an error here (mergekit omits an optional
 * weight in that case; that is the plan's decision), as is a missing base.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

#define MS_NMAX (MS_MAX_INPUTS - 1)            /* other models */
#define MS_PMAX (MS_NMAX * (MS_NMAX - 1) / 2)  /* pairs */

/* Sums over one vector: norms of the N offsets, then the K pair dots (i < j, row-major). */
struct mstock_sums {
    struct ms_xacc a[MS_NMAX + MS_PMAX];
};

/* Mixed input dtypes: the dtype of each step (file comment). */
struct mstock_dt {
    enum ms_dtype od[MS_NMAX];    /* o_i */
    enum ms_dtype pd[MS_PMAX];    /* pair (i < j, row-major): product, dot, norms' product, cos */
    enum ms_dtype cd;             /* stacked cosines, their mean, t, 1 - t */
    enum ms_dtype sd[MS_NMAX];    /* running sum after adding w_i */
    enum ms_dtype m1, m2, outd;   /* t*avg, (1-t)*w0, their sum */
};

struct mstock_state {
    uint32_t ib;                  /* input index of the base */
    bool mixed;                   /* inputs of different dtypes: dt applies */
    struct mstock_dt dt;
    uint32_t n;                   /* other models N */
    uint32_t it[MS_NMAX];         /* their input indices, in input order */
    bool copy;                    /* the base alone */
    bool filter_wise;
    float t, omt;                 /* filter_wise false, end_pass: t and rnd(1 - t) */
    struct mstock_sums sums;      /* filter_wise false: folded sums */
};

static size_t mstock_state_size(const struct ms_stage_job *job) { return sizeof(struct mstock_state); }

static size_t mstock_nsums(uint32_t n) { return n + (size_t)n * (n - 1) / 2; }

static size_t mstock_partial_size(const struct ms_stage_job *job)
{
    int pf = ms_method_param(job->method, "filter_wise");
    if (pf >= 0 && job->gv[pf] != 0)
        return 0; /* no reduce pass */
    uint32_t n = job->ninputs ? MS_MIN(job->ninputs - 1, MS_NMAX) : 0;
    return mstock_nsums(n) * sizeof(struct ms_xacc);
}

static int mstock_begin(void *state, const struct ms_stage_job *job)
{
    struct mstock_state *s = state;
    int pf = ms_method_param(job->method, "filter_wise");
    assert(pf >= 0 && job->ninputs <= MS_MAX_INPUTS);
    if (job->ninputs == 1 && job->base == 0) {
        s->copy = true;
        return MS_STAGE_APPLY;
    }
    if (job->ninputs < 3)
        return ms_error(MS_EPLAN, "%s: model_stock needs at least 3 tensors (the base plus two "
                        "others), got %u", job->name, job->ninputs);
    if (job->base < 0 || (uint32_t)job->base >= job->ninputs)
        return ms_error(MS_EPLAN, "%s: model_stock needs the base model's tensor", job->name);
    s->ib = (uint32_t)job->base;
    for (uint32_t i = 0; i < job->ninputs; i++)
        if (i != s->ib)
            s->it[s->n++] = i;
    s->filter_wise = job->gv[pf] != 0;
    enum ms_dtype d0 = ms_stage_in_dt(job, s->ib);
    for (uint32_t i = 0; i < s->n; i++)
        s->mixed |= ms_stage_in_dt(job, s->it[i]) != d0;
    if (s->mixed) {
        struct mstock_dt *t = &s->dt;
        size_t k = 0;
        for (uint32_t i = 0; i < s->n; i++) {
            enum ms_dtype di = ms_stage_in_dt(job, s->it[i]);
            t->od[i] = ms_dt_promote(di, d0);
            t->sd[i] = i ? ms_dt_promote(t->sd[i - 1], di) : di;
        }
        for (uint32_t i = 0; i < s->n; i++)
            for (uint32_t l = i + 1; l < s->n; l++, k++) {
                t->pd[k] = ms_dt_promote(t->od[i], t->od[l]);
                t->cd = k ? ms_dt_promote(t->cd, t->pd[k]) : t->pd[k];
            }
        t->m1 = ms_dt_promote(t->cd, t->sd[s->n - 1]);
        t->m2 = ms_dt_promote(t->cd, d0);
        t->outd = ms_dt_promote(t->m1, t->m2);
    }
    if (s->filter_wise)
        return MS_STAGE_APPLY;
    for (size_t k = 0; k < mstock_nsums(s->n); k++)
        ms_xacc_init(&s->sums.a[k]);
    return MS_STAGE_REDUCE;
}

/* Adds element j of the chunk to the vector sums a[] (norms then pair dots). */
static inline void mstock_add(enum ms_dtype d, const struct mstock_state *s,
                              const struct ms_chunk *c, size_t j, struct ms_xacc *a)
{
    float o[MS_NMAX];
    const float w0 = c->in[s->ib][j];
    for (uint32_t i = 0; i < s->n; i++) {
        o[i] = ms_rnd(d, c->in[s->it[i]][j] - w0);
        ms_xacc_add(&a[i], (double)o[i] * o[i]);
    }
    size_t k = s->n;
    for (uint32_t i = 0; i < s->n; i++)
        for (uint32_t l = i + 1; l < s->n; l++)
            ms_xacc_add(&a[k++], (double)ms_rnd(d, o[i] * o[l]));
}

/* mstock_add for mixed input dtypes. */
static void mstock_add_mx(const struct mstock_state *s, const struct ms_chunk *c, size_t j,
                          struct ms_xacc *a)
{
    const struct mstock_dt *t = &s->dt;
    float o[MS_NMAX];
    const float w0 = c->in[s->ib][j];
    for (uint32_t i = 0; i < s->n; i++) {
        o[i] = ms_rnd(t->od[i], c->in[s->it[i]][j] - w0);
        ms_xacc_add(&a[i], (double)o[i] * o[i]);
    }
    size_t k = s->n, p = 0;
    for (uint32_t i = 0; i < s->n; i++)
        for (uint32_t l = i + 1; l < s->n; l++)
            ms_xacc_add(&a[k++], (double)ms_rnd(t->pd[p++], o[i] * o[l]));
}

/* mstock_t for mixed input dtypes. */
static float mstock_t_mx(const struct mstock_dt *t, uint32_t n, const struct ms_xacc *a)
{
    float nrm[MS_NMAX];
    for (uint32_t i = 0; i < n; i++)
        nrm[i] = ms_rnd(t->od[i], sqrtf((float)ms_xacc_value(&a[i])));
    float acc = 0.0f;
    size_t k = n, p = 0;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t l = i + 1; l < n; l++, p++) {
            enum ms_dtype d = t->pd[p];
            const float lo = ms_rnd_param(d, 1e-6);
            float np = ms_rnd(d, nrm[i] * nrm[l]);
            np = np < lo ? lo : np;
            float cs = ms_rnd(d, ms_rnd(d, (float)ms_xacc_value(&a[k++])) / np);
            cs = cs < -1.0f ? -1.0f : cs;
            cs = cs > 1.0f ? 1.0f : cs;
            acc += cs;
        }
    enum ms_dtype d = t->cd;
    float c = ms_rnd(d, acc / (float)p);
    float fn = (float)n;
    return ms_rnd(d, ms_rnd(d, fn * c) / ms_rnd(d, 1.0f + ms_rnd(d, (fn - 1.0f) * c)));
}

/* mstock_mix for mixed input dtypes. */
static void mstock_mix_mx(const struct mstock_state *s, const struct ms_chunk *c, size_t j0,
                          size_t j1, float tv, float omt)
{
    const struct mstock_dt *t = &s->dt;
    const float *w0 = c->in[s->ib];
    const float fn = (float)s->n;
    for (size_t j = j0; j < j1; j++) {
        float sum = 0.0f;
        for (uint32_t i = 0; i < s->n; i++)
            sum = ms_rnd(t->sd[i], sum + c->in[s->it[i]][j]);
        float avg = ms_rnd(t->sd[s->n - 1], sum / fn);
        c->out[j] = ms_rnd(t->outd, ms_rnd(t->m1, tv * avg) + ms_rnd(t->m2, omt * w0[j]));
    }
}

/* t from one vector's sums, all in D as the file comment says. */
static float mstock_t(enum ms_dtype d, uint32_t n, const struct ms_xacc *a)
{
    float nrm[MS_NMAX];
    for (uint32_t i = 0; i < n; i++)
        nrm[i] = ms_rnd(d, sqrtf((float)ms_xacc_value(&a[i])));
    const float lo = ms_rnd_param(d, 1e-6);
    float acc = 0.0f;
    size_t k = n;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t l = i + 1; l < n; l++) {
            float np = ms_rnd(d, nrm[i] * nrm[l]);
            np = np < lo ? lo : np;
            float cs = ms_rnd(d, ms_rnd(d, (float)ms_xacc_value(&a[k++])) / np);
            cs = cs < -1.0f ? -1.0f : cs;
            cs = cs > 1.0f ? 1.0f : cs;
            acc += cs;
        }
    float c = ms_rnd(d, acc / (float)(k - n));
    float fn = (float)n;
    return ms_rnd(d, ms_rnd(d, fn * c) / ms_rnd(d, 1.0f + ms_rnd(d, (fn - 1.0f) * c)));
}

static void mstock_reduce(const void *state, const struct ms_stage_job *job,
                          const struct ms_chunk *c, void *partial)
{
    const struct mstock_state *s = state;
    struct ms_xacc *a = partial;
    for (size_t k = 0; k < mstock_nsums(s->n); k++)
        ms_xacc_init(&a[k]);
    for (size_t j = 0; j < (size_t)c->count; j++) {
        if (s->mixed)
            mstock_add_mx(s, c, j, a);
        else
            mstock_add(job->compute, s, c, j, a);
    }
}

static void mstock_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                        const void *partial)
{
    struct mstock_state *s = state;
    const struct ms_xacc *a = partial;
    for (size_t k = 0; k < mstock_nsums(s->n); k++)
        ms_xacc_merge(&s->sums.a[k], &a[k]);
}

static int mstock_end_pass(void *state, const struct ms_stage_job *job)
{
    struct mstock_state *s = state;
    if (s->mixed) {
        s->t = mstock_t_mx(&s->dt, s->n, s->sums.a);
        s->omt = ms_rnd(s->dt.cd, 1.0f - s->t);
    } else {
        s->t = mstock_t(job->compute, s->n, s->sums.a);
        s->omt = ms_rnd(job->compute, 1.0f - s->t);
    }
    return MS_STAGE_APPLY;
}

/* y[j] = rnd(rnd(t*avg) + rnd(omt*w0)) over elements [j0, j1) of the chunk. */
static inline void mstock_mix(enum ms_dtype d, const struct mstock_state *s,
                              const struct ms_chunk *c, size_t j0, size_t j1, float t, float omt)
{
    const float *w0 = c->in[s->ib];
    const float fn = (float)s->n;
    for (size_t j = j0; j < j1; j++) {
        float sum = 0.0f;
        for (uint32_t i = 0; i < s->n; i++)
            sum = ms_rnd(d, sum + c->in[s->it[i]][j]);
        float avg = ms_rnd(d, sum / fn);
        c->out[j] = ms_rnd(d, ms_rnd(d, t * avg) + ms_rnd(d, omt * w0[j]));
    }
}

static inline void mstock_chunk(enum ms_dtype d, const struct mstock_state *s,
                                const struct ms_stage_job *job, const struct ms_chunk *c)
{
    size_t n = (size_t)c->count;
    if (!s->filter_wise) {
        mstock_mix(d, s, c, 0, n, s->t, s->omt);
        return;
    }
    /* One t per row; ROWWISE chunks hold whole rows. */
    size_t row = (size_t)MS_MAX(job->row_len, 1);
    assert(n % row == 0);
    struct mstock_sums a;
    for (size_t r0 = 0; r0 < n; r0 += row) {
        for (size_t k = 0; k < mstock_nsums(s->n); k++)
            ms_xacc_init(&a.a[k]);
        for (size_t j = r0; j < r0 + row; j++)
            mstock_add(d, s, c, j, a.a);
        float t = mstock_t(d, s->n, a.a);
        mstock_mix(d, s, c, r0, r0 + row, t, ms_rnd(d, 1.0f - t));
    }
}

/* mstock_chunk for mixed input dtypes. */
static void mstock_chunk_mx(const struct mstock_state *s, const struct ms_stage_job *job,
                            const struct ms_chunk *c)
{
    size_t n = (size_t)c->count;
    if (!s->filter_wise) {
        mstock_mix_mx(s, c, 0, n, s->t, s->omt);
        return;
    }
    size_t row = (size_t)MS_MAX(job->row_len, 1);
    assert(n % row == 0);
    struct mstock_sums a;
    for (size_t r0 = 0; r0 < n; r0 += row) {
        for (size_t k = 0; k < mstock_nsums(s->n); k++)
            ms_xacc_init(&a.a[k]);
        for (size_t j = r0; j < r0 + row; j++)
            mstock_add_mx(s, c, j, a.a);
        float t = mstock_t_mx(&s->dt, s->n, a.a);
        mstock_mix_mx(s, c, r0, r0 + row, t, ms_rnd(s->dt.cd, 1.0f - t));
    }
}

static void mstock_apply(const void *state, const struct ms_stage_job *job,
                         const struct ms_chunk *c)
{
    const struct mstock_state *s = state;
    if (s->copy) {
        memcpy(c->out, c->in[s->ib], (size_t)c->count * sizeof(float));
        return;
    }
    if (s->mixed) {
        mstock_chunk_mx(s, job, c);
        return;
    }
    switch (job->compute) {
    case MS_DT_BF16:
        mstock_chunk(MS_DT_BF16, s, job, c);
        break;
    case MS_DT_F16:
        mstock_chunk(MS_DT_F16, s, job, c);
        break;
    default:
        assert(job->compute == MS_DT_F32);
        mstock_chunk(MS_DT_F32, s, job, c);
        break;
    }
}

static const struct ms_stage_ops mstock_ops = {
    .flags = MS_STAGE_ROWWISE,
    .state_size = mstock_state_size,
    .partial_size = mstock_partial_size,
    .begin = mstock_begin,
    .reduce = mstock_reduce,
    .fold = mstock_fold,
    .end_pass = mstock_end_pass,
    .apply = mstock_apply,
};

/* 2.8: the base and one other model: mergekit leaves an optional tensor out and
 * fails on any other. */
static int mstock_plan_inputs(const struct ms_plan_ctx *ctx, const struct ms_stage_job *job)
{
    if (job->ninputs != 2)
        return MS_PLAN_KEEP;
    if (ctx->optional)
        return MS_PLAN_SKIP;
    return ctx->problem(ctx, MS_EPLAN, "stock2", "%s: merge method 'model_stock' needs the base "
                        "and at least two other models; tensor '%s' has only one other",
                        ctx->where, job->name);
}

static const struct ms_plan_ops mstock_plan = {
    .inputs = mstock_plan_inputs,
};

const struct ms_method ms_method_model_stock = {
    .name = "model_stock",
    .summary = "Model Stock: interpolate toward the base by cosine",
    .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 1,
    .params = { MS__G_BOOL("filter_wise", 0) },
    .card = { "Model Stock", "https://arxiv.org/abs/2403.19522" },
    .plan = &mstock_plan,
    .ops = &mstock_ops,
};
