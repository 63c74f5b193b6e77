/*
 * ram.c - the `ram` and `ramplus_tl` methods (mergekit-spec.md 2.14):
 * reinforced agent merging of task vectors.
 *
 * With B the base, x_i the other models in input order (spec 2.1.2: config
 * order), rnd() rounding to the compute dtype D and E = rnd(float32(epsilon))
 * (torch compares a D tensor with a Python scalar cast to D):
 *   tv_i  = rnd(x_i - B)
 *   nz_i  = |tv_i| > E                    (a NaN delta counts as zero)
 *   cnt   = sum_i nz_i; unique = cnt == 1; shared = cnt > 1
 *   z_i   = tv_i * nz_i                   (a mask multiplies as exact 0/1)
 *   ram:  term_i = rnd(rnd(z_i*unique) + rnd(rnd(z_i*shared) / max(cnt, 1)))
 *         out    = rnd(B + rnd(0 + term_0 + term_1 ...))   float32 sum over models, in order
 * ramplus_tl scales the unique term by a per-model float32 factor
 *   sh_i = #{positions where nz_i and shared}, un_i = #{nz_i and unique}   (whole tensor)
 *   rho_i = float32(sh_i) / max(float32(un_i), float32(epsilon))
 *   lam_i = 1 + float32(r) * min(max(rho_i, 0), float32(alpha))            (float32)
 *   term_i = rnd(z_i*unique) * lam_i + rnd(rnd(z_i*shared) / max(cnt, 1)) (float32)
 *   out    = B + (0 + term_0 + term_1 ...)                                 (float32)
 * lam is a dimensioned float32 tensor, so torch promotes the unique term, the
 * model sum and the final addition to float32: ramplus_tl's values are float32
 * whatever D is, and apply does not round them to D (spec 2.1.4, 7.10): its
 * plan-time dtypes rule makes the result float32 unless out_dtype is set.
 *
 * ram is elementwise (apply only) and bit-exact. ramplus_tl counts sh_i and un_i
 * in one reduce pass (integers: order-free), then applies; it is bit-exact too.
 *
 * Inputs: the base (required) plus any number of others; the base alone is
 * returned unchanged. Without the base's tensor the job is an error.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

struct ram_counts {
    uint64_t sh[MS_MAX_INPUTS], un[MS_MAX_INPUTS]; /* by input index; the base's stay 0 */
};

struct ram_state {
    bool plus;                    /* ramplus_tl */
    bool copy;                    /* the base alone: out = B */
    uint32_t ib;                  /* input index of the base */
    uint32_t nt;                  /* task models */
    uint32_t it[MS_MAX_INPUTS];   /* their input indices, in input order */
    float eps;                    /* E, in D */
    float lam[MS_MAX_INPUTS];     /* ramplus_tl: lam_i by task number (end_pass) */
    struct ram_counts n;          /* ramplus_tl: folded counts */
};

static size_t ram_state_size(const struct ms_stage_job *job) { return sizeof(struct ram_state); }
static size_t ram_partial_size(const struct ms_stage_job *job) { return sizeof(struct ram_counts); }

/* begin of both methods; plus: ramplus_tl. */
static int ram_start(struct ram_state *s, const struct ms_stage_job *job, bool plus)
{
    int pe = ms_method_param(job->method, "epsilon");
    assert(pe >= 0 && job->ninputs <= MS_MAX_INPUTS);
    s->plus = plus;
    if (job->base < 0 || (uint32_t)job->base >= job->ninputs)
        return ms_error(MS_EPLAN, "%s: %s needs the base model's tensor", job->name,
                        job->method->name);
    s->ib = (uint32_t)job->base;
    for (uint32_t i = 0; i < job->ninputs; i++)
        if (i != s->ib)
            s->it[s->nt++] = i;
    if (s->nt == 0) {
        s->copy = true;
        return MS_STAGE_APPLY;
    }
    s->eps = ms_rnd_param(job->compute, job->gv[pe]);
    return s->plus ? MS_STAGE_REDUCE : MS_STAGE_APPLY;
}

static int ram_begin(void *state, const struct ms_stage_job *job)
{
    return ram_start(state, job, false);
}

static int ramplus_begin(void *state, const struct ms_stage_job *job)
{
    return ram_start(state, job, true);
}

/* The masks of one element: bit i of the result is nz of task i; *cnt their number. */
static inline uint32_t ram_mask(enum ms_dtype d, const struct ram_state *s,
                                const struct ms_chunk *c, size_t j, float *restrict tv,
                                uint32_t *cnt)
{
    const float b = c->in[s->ib][j];
    uint32_t m = 0, k = 0;
    for (uint32_t i = 0; i < s->nt; i++) {
        tv[i] = ms_rnd(d, c->in[s->it[i]][j] - b);
        bool nz = fabsf(tv[i]) > s->eps;
        m |= (uint32_t)nz << i;
        k += nz;
    }
    *cnt = k;
    return m;
}

static inline void ram_count(enum ms_dtype d, const struct ram_state *s, const struct ms_chunk *c,
                             struct ram_counts *p)
{
    float tv[MS_MAX_INPUTS];
    for (size_t j = 0; j < (size_t)c->count; j++) {
        uint32_t cnt, m = ram_mask(d, s, c, j, tv, &cnt);
        uint64_t *dst = cnt == 1 ? p->un : p->sh;
        if (cnt == 0)
            continue;
        for (uint32_t i = 0; i < s->nt; i++)
            dst[i] += (m >> i) & 1u;
    }
}

static void ram_reduce(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                       void *partial)
{
    const struct ram_state *s = state;
    struct ram_counts *p = partial;
    memset(p, 0, sizeof(*p));
    switch (job->compute) {
    case MS_DT_BF16:
        ram_count(MS_DT_BF16, s, c, p);
        break;
    case MS_DT_F16:
        ram_count(MS_DT_F16, s, c, p);
        break;
    default:
        ram_count(MS_DT_F32, s, c, p);
        break;
    }
}

static void ram_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                     const void *partial)
{
    struct ram_state *s = state;
    const struct ram_counts *p = partial;
    for (uint32_t i = 0; i < s->nt; i++) {
        s->n.sh[i] += p->sh[i];
        s->n.un[i] += p->un[i];
    }
}

static int ram_end_pass(void *state, const struct ms_stage_job *job)
{
    struct ram_state *s = state;
    int pr = ms_method_param(job->method, "r"), pa = ms_method_param(job->method, "alpha");
    int pe = ms_method_param(job->method, "epsilon");
    assert(pr >= 0 && pa >= 0 && pe >= 0);
    /* An int64 count clamped with a float bound is a float32 tensor (torch). */
    float eps = (float)job->gv[pe], r = (float)job->gv[pr], alpha = (float)job->gv[pa];
    for (uint32_t i = 0; i < s->nt; i++) {
        float un = (float)s->n.un[i];
        float rho = (float)s->n.sh[i] / (un < eps ? eps : un);
        rho = rho < 0.0f ? 0.0f : rho;
        rho = rho > alpha ? alpha : rho;
        s->lam[i] = 1.0f + r * rho;
    }
    return MS_STAGE_APPLY;
}

/* out[j] for one chunk; d is a constant in each caller. */
static inline void ram_chunk(enum ms_dtype d, const struct ram_state *s, const struct ms_chunk *c)
{
    float tv[MS_MAX_INPUTS];
    for (size_t j = 0; j < (size_t)c->count; j++) {
        uint32_t cnt, m = ram_mask(d, s, c, j, tv, &cnt);
        float uq = cnt == 1 ? 1.0f : 0.0f, sh = cnt > 1 ? 1.0f : 0.0f;
        float div = (float)(cnt > 1 ? cnt : 1); /* exact in every D for <= 16 models */
        float acc = 0.0f;
        for (uint32_t i = 0; i < s->nt; i++) {
            float z = tv[i] * (float)((m >> i) & 1u);
            float tu = ms_rnd(d, z * uq), ts = ms_rnd(d, ms_rnd(d, z * sh) / div);
            acc += s->plus ? tu * s->lam[i] + ts : ms_rnd(d, tu + ts);
        }
        float b = c->in[s->ib][j];
        c->out[j] = s->plus ? b + acc : ms_rnd(d, b + ms_rnd(d, acc));
    }
}

static void ram_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    const struct ram_state *s = state;
    if (s->copy) {
        memcpy(c->out, c->in[s->ib], (size_t)c->count * sizeof(float));
        return;
    }
    switch (job->compute) {
    case MS_DT_BF16:
        ram_chunk(MS_DT_BF16, s, c);
        break;
    case MS_DT_F16:
        ram_chunk(MS_DT_F16, s, c);
        break;
    default:
        assert(job->compute == MS_DT_F32);
        ram_chunk(MS_DT_F32, s, c);
        break;
    }
}

static const struct ms_stage_ops ram_ops = {
    .state_size = ram_state_size,
    .begin = ram_begin,
    .apply = ram_apply,
};

static const struct ms_stage_ops ramplus_ops = {
    .state_size = ram_state_size,
    .partial_size = ram_partial_size,
    .begin = ramplus_begin,
    .reduce = ram_reduce,
    .fold = ram_fold,
    .end_pass = ram_end_pass,
    .apply = ram_apply,
};

/* ramplus_tl's values are float32 whatever the inputs (see the top of the file). */
static void ramplus_dtypes(const struct ms_stage_job *job, const enum ms_dtype *load,
                           enum ms_dtype *compute, enum ms_dtype *out)
{
    *out = MS_DT_F32;
}

static const struct ms_plan_ops ramplus_plan = {
    .dtypes = ramplus_dtypes,
};

const struct ms_method ms_method_ram = {
    .name = "ram",
    .summary = "reinforced agent merging",
    .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 1,
    .params = { MS__G("epsilon", 1e-5, 0, MS__INF) },
    .card = { "RAM", NULL },
    .ops = &ram_ops,
};

const struct ms_method ms_method_ramplus_tl = {
    .name = "ramplus_tl",
    .summary = "RAM+ with overlap-scaled unique deltas",
    .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 3,
    .params = { MS__G("r", 0.1, -MS__INF, MS__INF), MS__G("alpha", 0.2, -MS__INF, MS__INF),
                MS__G("epsilon", 1e-5, 0, MS__INF) },
    .card = { "RAM+", NULL },
    .plan = &ramplus_plan,
    .ops = &ramplus_ops,
};
