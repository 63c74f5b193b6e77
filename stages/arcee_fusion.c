/*
 * arcee_fusion.c - importance-thresholded fusion of the base b and one other
 * model p (mergekit-spec.md 2.11). With only the base present, the base.
 *
 * Per row (last dim; a 1-D tensor is one row), rnd() rounding to the compute
 * dtype D:
 *   P_e  = rnd(rnd(softmax(p)_e) + 1e-8),  Q_e = rnd(rnd(softmax(b)_e) + 1e-8)
 *   kl   = rnd(sum_e rnd(P_e * rnd(log(rnd(P_e / Q_e)))))
 *   imp_e = rnd(rnd(|p_e - b_e|) * kl)
 * Over the whole tensor (n elements), with q(a) the element at ascending
 * index int(float32(a) * float32(n - 1)) of the sorted imp values:
 *   thr  = rnd(q(0.5) + rnd(1.5 * rnd(q(0.75) - q(0.25))))
 *   out  = b + rnd(p - b) * (imp >= thr)          in float32 (see below)
 *
 * Our rules where mergekit is not reproducible (README):
 *   - quantiles are exact over all elements. mergekit samples 1,000,000
 *     elements at random (torch RNG, not reproducible) when a tensor has more;
 *     below that both are the same order statistic. We find them with the
 *     streaming selection of select.c (order statistics by magnitude): a first
 *     pass counts the negative importances (kl can round below zero), then the
 *     wanted index lies among the negatives (the (i+1)-th largest magnitude
 *     there) or among the rest (the (n-i)-th largest), NaN last as torch sorts.
 *   - softmax and the kl sum use libm expf/logf with double sums, rounded as
 *     above; torch's vectorised kernels may differ by an ulp before rounding.
 *   - mergekit's mask is float32, so the last two operations promote to
 *     float32 and its result is float32 whatever D (mergekit issue #604); we
 *     return those float32 values, and the result dtype is float32 (plan hook
 *     af_dtypes) unless out_dtype says otherwise.
 *
 * Passes: NEG (count imp < 0), then QUANT (histogram passes of three order
 * statistics advancing together), then apply. ROWWISE: every chunk holds
 * whole rows, so the softmax normalisers and kl come from the chunk alone.
 * Memory: the state holds three histograms (32,768 or 65,536 uint64 each).
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "stage_impl.h"

#define AF_BLOCK 256
#define AF_NQ 3

static const float af_q[AF_NQ] = { 0.25f, 0.5f, 0.75f };

enum af_phase { AF_NEG, AF_QUANT, AF_APPLY };

struct af_state {
    enum ms_dtype dt;
    uint32_t phase;          /* enum af_phase */
    uint32_t base, other;    /* input indices */
    bool copy;               /* only the base: out = b */
    uint64_t neg;            /* NEG fold: importances < 0 */
    bool qneg[AF_NQ];        /* quantile q lies among the negative importances */
    struct ms__sel sel[AF_NQ];
    float thr;               /* threshold in D */
    size_t hist_len;
    uint64_t hist[];         /* AF_NQ * hist_len */
};

struct af_part {
    uint64_t neg;
    uint32_t hist[];         /* AF_NQ * hist_len */
};

static size_t af_state_size(const struct ms_stage_job *job)
{
    return sizeof(struct af_state) + AF_NQ * ms__sel_hist_len(job->compute) * sizeof(uint64_t);
}

static size_t af_partial_size(const struct ms_stage_job *job)
{
    return sizeof(struct af_part) + AF_NQ * ms__sel_hist_len(job->compute) * sizeof(uint32_t);
}

/* ------------------------------------------------------------------------ */
/* Importance                                                                */

/* Softmax normaliser of a row: its maximum and sum of exp(x - max). */
struct af_norm {
    float max;
    double sum;
};

static struct af_norm af_softmax_norm(const float *x, uint64_t L)
{
    struct af_norm s = { -INFINITY, 0.0 };
    for (uint64_t i = 0; i < L; i++)
        s.max = x[i] > s.max || isnan(x[i]) ? x[i] : s.max;
    for (uint64_t i = 0; i < L; i++)
        s.sum += (double)expf(x[i] - s.max);
    return s;
}

/* rnd(rnd(softmax_e) + 1e-8) */
static inline float af_prob(enum ms_dtype dt, const struct af_norm *s, float x)
{
    float sm = ms_rnd(dt, (float)((double)expf(x - s->max) / s->sum));
    return ms_rnd(dt, sm + 1e-8f);
}

/* kl of one row of p against b. */
static float af_kl(enum ms_dtype dt, const float *p, const float *b, uint64_t L)
{
    struct af_norm sp = af_softmax_norm(p, L), sb = af_softmax_norm(b, L);
    double sum = 0.0;
    for (uint64_t i = 0; i < L; i++) {
        float P = af_prob(dt, &sp, p[i]), Q = af_prob(dt, &sb, b[i]);
        float lg = ms_rnd(dt, logf(ms_rnd(dt, P / Q)));
        sum += ms_rnd(dt, P * lg);
    }
    return ms_rnd(dt, (float)sum);
}

/* imp[i] = rnd(rnd(|p - b|) * kl) for n elements. */
static void af_imp(enum ms_dtype dt, const float *p, const float *b, float kl, float *imp,
                   size_t n)
{
    for (size_t i = 0; i < n; i++)
        imp[i] = ms_rnd(dt, fabsf(ms_rnd(dt, p[i] - b[i])) * kl);
}

/* The stream a quantile selection counts: the negatives (others 0) or the
 * rest (negatives 0). */
static void af_side(bool neg, const float *imp, float *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        v[i] = (imp[i] < 0.0f) == neg ? imp[i] : 0.0f;
}

/* ------------------------------------------------------------------------ */
/* Stage operations                                                          */

static int af_begin(void *state, const struct ms_stage_job *job)
{
    struct af_state *st = state;
    const char *name = job->name ? job->name : "?";
    enum ms_dtype dt = job->compute;
    if (dt != MS_DT_F32 && dt != MS_DT_F16 && dt != MS_DT_BF16)
        return ms_error(MS_EINVAL, "tensor '%s': arcee_fusion cannot compute in %s", name,
                        ms_dtype_name(dt) ? ms_dtype_name(dt) : "?");
    if (job->base < 0 || (uint32_t)job->base >= job->ninputs)
        return ms_error(MS_EPLAN, "tensor '%s': arcee_fusion needs the base model's tensor", name);
    if (job->ninputs > 2)
        return ms_error(MS_EPLAN, "tensor '%s': arcee_fusion takes the base and one model, got %u "
                        "inputs", name, job->ninputs);
    st->dt = dt;
    st->base = (uint32_t)job->base;
    st->other = job->ninputs == 2 ? 1u - st->base : st->base;
    st->copy = job->ninputs < 2;
    st->hist_len = ms__sel_hist_len(dt);
    if (st->copy || job->numel == 0) {
        st->phase = AF_APPLY;
        return MS_STAGE_APPLY;
    }
    st->phase = AF_NEG;
    return MS_STAGE_REDUCE;
}

/* NEG: counts imp < 0; QUANT: histograms of the selections still counting. */
static void af_reduce(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                      void *partial)
{
    const struct af_state *st = state;
    struct af_part *p = partial;
    const uint64_t L = job->row_len ? job->row_len : 1;
    const float *x = c->in[st->other], *b = c->in[st->base];
    float imp[AF_BLOCK], v[AF_BLOCK];
    assert(c->count % L == 0 && c->count < ((uint64_t)1 << 32));
    p->neg = 0;
    if (st->phase == AF_QUANT)
        for (int q = 0; q < AF_NQ; q++)
            if (ms__sel_phase(&st->sel[q]) == MS__SEL_HIST)
                memset(p->hist + q * st->hist_len, 0, ms__sel_bins(&st->sel[q]) * sizeof(uint32_t));
    for (uint64_t r0 = 0; r0 < c->count; r0 += L) {
        float kl = af_kl(st->dt, x + r0, b + r0, L);
        for (uint64_t off = r0; off < r0 + L; off += AF_BLOCK) {
            size_t n = (size_t)MS_MIN((uint64_t)AF_BLOCK, r0 + L - off);
            af_imp(st->dt, x + off, b + off, kl, imp, n);
            if (st->phase == AF_NEG) {
                for (size_t i = 0; i < n; i++)
                    p->neg += imp[i] < 0.0f;
                continue;
            }
            for (int q = 0; q < AF_NQ; q++) {
                if (ms__sel_phase(&st->sel[q]) != MS__SEL_HIST)
                    continue;
                af_side(st->qneg[q], imp, v, n);
                ms__sel_count(&st->sel[q], p->hist + q * st->hist_len, v, n);
            }
        }
    }
}

static void af_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                    const void *partial)
{
    struct af_state *st = state;
    const struct af_part *p = partial;
    if (st->phase == AF_NEG) {
        st->neg += p->neg;
        return;
    }
    for (int q = 0; q < AF_NQ; q++)
        if (ms__sel_phase(&st->sel[q]) == MS__SEL_HIST)
            ms__sel_fold_hist(&st->sel[q], st->hist + q * st->hist_len,
                              p->hist + q * st->hist_len);
}

static int af_end_pass(void *state, const struct ms_stage_job *job)
{
    struct af_state *st = state;
    const uint64_t n = job->numel;
    if (st->phase == AF_NEG) {
        /* Ascending index i = int(q * (n - 1)), a float32 product. Among the
         * `neg` negatives it is the (i+1)-th largest magnitude; else the
         * (n-i)-th largest of the rest (whose padding zeros are never above). */
        for (int q = 0; q < AF_NQ; q++) {
            uint64_t i = (uint64_t)(af_q[q] * (float)(n - 1));
            if (i > n - 1)
                i = n - 1;
            st->qneg[q] = i < st->neg;
            ms__sel_init_kth(&st->sel[q], st->dt, n, st->qneg[q] ? i + 1 : n - i);
        }
        st->phase = AF_QUANT;
        return MS_STAGE_REDUCE;
    }
    assert(st->phase == AF_QUANT);
    bool more = false;
    for (int q = 0; q < AF_NQ; q++) {
        if (ms__sel_phase(&st->sel[q]) == MS__SEL_HIST)
            ms__sel_end_hist(&st->sel[q], st->hist + q * st->hist_len);
        more |= ms__sel_phase(&st->sel[q]) == MS__SEL_HIST; /* the tie pass is not needed */
    }
    if (more)
        return MS_STAGE_REDUCE;
    float qv[AF_NQ];
    for (int q = 0; q < AF_NQ; q++) {
        float mag = ms__sel_key_value(st->dt, st->sel[q].key);
        qv[q] = st->qneg[q] ? -mag : mag;
    }
    enum ms_dtype dt = st->dt;
    st->thr = ms_rnd(dt, qv[1] + ms_rnd(dt, 1.5f * ms_rnd(dt, qv[2] - qv[0])));
    st->phase = AF_APPLY;
    return MS_STAGE_APPLY;
}

static void af_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    const struct af_state *st = state;
    assert(st->phase == AF_APPLY);
    const float *b = c->in[st->base];
    if (st->copy) {
        memcpy(c->out, b, (size_t)c->count * sizeof(float));
        return;
    }
    const uint64_t L = job->row_len ? job->row_len : 1;
    const float *x = c->in[st->other];
    float imp[AF_BLOCK];
    assert(c->count % L == 0);
    for (uint64_t r0 = 0; r0 < c->count; r0 += L) {
        float kl = af_kl(st->dt, x + r0, b + r0, L);
        for (uint64_t off = r0; off < r0 + L; off += AF_BLOCK) {
            size_t n = (size_t)MS_MIN((uint64_t)AF_BLOCK, r0 + L - off);
            af_imp(st->dt, x + off, b + off, kl, imp, n);
            for (size_t i = 0; i < n; i++) {
                float mask = imp[i] >= st->thr ? 1.0f : 0.0f;
                c->out[off + i] = b[off + i] + ms_rnd(st->dt, x[off + i] - b[off + i]) * mask;
            }
        }
    }
}

/* mergekit's mask is `.float()`: with two inputs the blend promotes to float32
 * whatever D (mergekit issue #604); only the base present, the base as it is. */
static void af_dtypes(const struct ms_stage_job *job, const enum ms_dtype *load,
                      enum ms_dtype *compute, enum ms_dtype *out)
{
    (void)load;
    (void)compute;
    if (job->ninputs == 2)
        *out = MS_DT_F32;
}

static const struct ms_plan_ops af_plan = {
    .dtypes = af_dtypes,
};

static const struct ms_stage_ops af_ops = {
    .flags = MS_STAGE_ROWWISE,
    .state_size = af_state_size,
    .partial_size = af_partial_size,
    .begin = af_begin,
    .reduce = af_reduce,
    .fold = af_fold,
    .end_pass = af_end_pass,
    .apply = af_apply,
};

const struct ms_method ms_method_arcee_fusion = {
    .name = "arcee_fusion",
    .summary = "importance-thresholded fusion of two models",
    .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT,
    .min_inputs = 1,
    .max_inputs = 2,
    .nparams = 0,
    .card = { "Arcee Fusion", NULL },
    .plan = &af_plan,
    .ops = &af_ops,
};
