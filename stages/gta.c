/*
 * gta.c - the "generalized task arithmetic" family (mergekit-spec.md 2.6):
 * task_arithmetic and ties now; dare_*, breadcrumbs* and della* plug in as
 * further sparsifiers (enum gta_sparse) on the same passes.
 *
 * For one output tensor with base B and the other models m in input order:
 *   d_m   = rnd(x_m - B)                        delta in the compute dtype
 *   d_m   = sparsify(d_m)                       ties: magnitude top-k (2.7)
 *   d_m   = rnd(d_m * rnd(before/after))        optional L1 rescale (2.7)
 *   WD_m  = rnd(W_m * d_m),  W_m = rnd(weight_m)
 *   consensus ("sum"): S = rnd(sum WD), maj = S >= 0 ? +1 : -1,
 *           mask_m = sign(WD_m) == maj, mixed = rnd(sum WD*mask),
 *           div = rnd(sum W*mask), 0 -> 1 (per element)
 *   else:   mixed = rnd(sum WD), div = rnd(sum W), |div| < 1e-8 -> 1 (scalar)
 *   normalize: mixed = rnd(mixed / div); lambda != 1: mixed = rnd(mixed * lambda)
 *   out   = rnd(B + mixed)
 * Sums over models accumulate in float32 from +0 in model order and round once
 * (mergekit-spec.md 0, rule 2).
 *
 * Passes (the deltas are recomputed from the inputs in every pass):
 *   SELECT   magnitude only, models with density < 1: histogram passes and the
 *            tie pass of select.c, all models advancing together;
 *   RESCALE  only with rescale: the L1 sums before/after the mask (ms_xacc);
 *   apply    per element, in blocks of GTA_BLOCK.
 * Memory: the state holds one histogram (32,768 or 65,536 uint64) per trimmed
 * model, whatever the tensor size.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "stage_impl.h"

#define GTA_BLOCK 256 /* elements per inner block: bounds the stack scratch */

/* ------------------------------------------------------------------------ */
/* Family members                                                            */

enum gta_sparse {
    GTA_SPARSE_NONE,      /* task_arithmetic: density and rescale unused */
    GTA_SPARSE_MAGNITUDE, /* ties: exact top-k by |delta| */
};

struct gta_kind {
    enum gta_sparse sparse;
    bool consensus;       /* TIES sign election ("sum") */
};

static const struct gta_kind kind_task_arithmetic = { GTA_SPARSE_NONE, false };
static const struct gta_kind kind_ties = { GTA_SPARSE_MAGNITUDE, true };

/* ------------------------------------------------------------------------ */
/* State                                                                     */

enum gta_phase { GTA_SELECT, GTA_RESCALE, GTA_APPLY };

struct gta_model {
    uint32_t input;       /* index of this model's tensor in ms_chunk.in */
    int32_t slot;         /* histogram / partial slot, -1 when not trimmed */
    float w;              /* W = rnd(weight) */
    float factor;         /* rescale: rnd(before/after) */
    bool trim;            /* the selection mask applies (k < numel) */
    bool scale;           /* the rescale factor applies */
    struct ms__sel sel;   /* valid when slot >= 0 */
};

/* Set by begin and end_pass (loop thread); read-only for reduce and apply,
 * except what fold writes (sel tie locators, hist, sums), which they never read. */
struct gta_state {
    struct gta_kind kind;
    enum ms_dtype dt;
    uint32_t phase;       /* enum gta_phase */
    uint32_t base;        /* input index of the base */
    uint32_t nm;          /* models other than the base */
    uint32_t nslots;      /* trimmed-model slots (density < 1) */
    bool rescale, normalize, use_lambda;
    float lambda;         /* float32(lambda) */
    float div;            /* without consensus: the scalar divisor */
    size_t hist_len;      /* uint64 entries per slot in hist */
    size_t psize;         /* bytes of one partial */
    struct gta_model m[MS_MAX_INPUTS];
    struct ms_xacc before[MS_MAX_INPUTS], after[MS_MAX_INPUTS]; /* by slot */
    uint64_t hist[];      /* nslots * hist_len */
};

/* Partial of a SELECT pass: tie counts, then per-chunk histograms. */
struct gta_part_select {
    uint64_t ties[MS_MAX_INPUTS];   /* by slot */
    uint32_t hist[];                /* nslots * hist_len */
};
/* Partial of a RESCALE pass. */
struct gta_part_rescale {
    struct ms_xacc before[MS_MAX_INPUTS], after[MS_MAX_INPUTS]; /* by slot */
};

static int param_index(const struct ms_stage_job *job, const char *name)
{
    return job->method ? ms_method_param(job->method, name) : -1;
}

/* Trimmed models need a histogram slot: non-base inputs with density < 1.
 * begin assigns slots in the same order. */
static uint32_t gta_nslots(const struct ms_stage_job *job, const struct gta_kind *kind)
{
    int id = param_index(job, "density");
    if (kind->sparse != GTA_SPARSE_MAGNITUDE || id < 0)
        return 0;
    uint32_t n = 0;
    for (uint32_t i = 0; i < job->ninputs && i < MS_MAX_INPUTS; i++)
        n += (int)i != job->base && job->pv[i][id] < 1.0;
    return n;
}

static size_t gta_state_size(const struct ms_stage_job *job, const struct gta_kind *kind)
{
    size_t len = kind->sparse == GTA_SPARSE_MAGNITUDE ? ms__sel_hist_len(job->compute) : 0;
    return sizeof(struct gta_state) + (size_t)gta_nslots(job, kind) * len * sizeof(uint64_t);
}

static size_t gta_partial_size(const struct ms_stage_job *job, const struct gta_kind *kind)
{
    uint32_t ns = gta_nslots(job, kind);
    if (ns == 0)
        return 0;
    size_t sel = sizeof(struct gta_part_select) +
                 (size_t)ns * ms__sel_hist_len(job->compute) * sizeof(uint32_t);
    return MS_MAX(sel, sizeof(struct gta_part_rescale));
}

/* ------------------------------------------------------------------------ */
/* Leaf kernels. Each body is specialised on the dtype through an            */
/* always-inline helper and one switch per call, so rounding inlines.        */

#define GTA_INLINE static inline __attribute__((always_inline))
#define GTA_DISPATCH(dt, call)                                                                     \
    do {                                                                                           \
        switch (dt) {                                                                              \
        case MS_DT_BF16: call(MS_DT_BF16); break;                                                  \
        case MS_DT_F16: call(MS_DT_F16); break;                                                    \
        default: call(MS_DT_F32); break;                                                           \
        }                                                                                          \
    } while (0)

/* d = rnd(x - b) */
GTA_INLINE void delta_body(enum ms_dtype dt, float *restrict d, const float *restrict x,
                           const float *restrict b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        d[i] = ms_rnd(dt, x[i] - b[i]);
}

static void gta_delta(enum ms_dtype dt, float *restrict d, const float *restrict x,
                      const float *restrict b, size_t n)
{
#define CALL(t) delta_body(t, d, x, b, n)
    GTA_DISPATCH(dt, CALL);
#undef CALL
}

/* d = d * keep (exact 0/1; signed zeros as torch's mask product); then, with
 * scale, d = rnd(d * f). */
GTA_INLINE void mask_body(enum ms_dtype dt, float *restrict d, const float *restrict keep,
                          bool scale, float f, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float v = d[i] * keep[i];
        d[i] = scale ? ms_rnd(dt, v * f) : v;
    }
}

static void gta_mask(enum ms_dtype dt, float *restrict d, const float *restrict keep, bool scale,
                     float f, size_t n)
{
#define CALL(t) mask_body(t, d, keep, scale, f, n)
    GTA_DISPATCH(dt, CALL);
#undef CALL
}

/* d = rnd(w * d) */
GTA_INLINE void weigh_body(enum ms_dtype dt, float *restrict d, float w, size_t n)
{
    for (size_t i = 0; i < n; i++)
        d[i] = ms_rnd(dt, w * d[i]);
}

static void gta_weigh(enum ms_dtype dt, float *restrict d, float w, size_t n)
{
#define CALL(t) weigh_body(t, d, w, n)
    GTA_DISPATCH(dt, CALL);
#undef CALL
}

/* Scalars of the final combination. */
struct gta_fin {
    bool normalize, use_lambda;
    float lambda, div;
};

/* out = rnd(b + post(mixed)): normalize by div, then lambda. */
GTA_INLINE float finish_1(enum ms_dtype dt, const struct gta_fin *p, float b, float mixed,
                          float div)
{
    if (p->normalize)
        mixed = ms_rnd(dt, mixed / div);
    if (p->use_lambda)
        mixed = ms_rnd(dt, mixed * p->lambda);
    return ms_rnd(dt, b + mixed);
}

/* Without consensus: mixed = rnd(sum_j wd[j]), scalar divisor. */
GTA_INLINE void combine_sum_body(enum ms_dtype dt, const struct gta_fin *p, uint32_t nm,
                                 const float (*restrict wd)[GTA_BLOCK], const float *restrict b,
                                 float *restrict out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float s = 0.0f;
        for (uint32_t j = 0; j < nm; j++)
            s += wd[j][i];
        out[i] = finish_1(dt, p, b[i], ms_rnd(dt, s), p->div);
    }
}

/* TIES "sum" consensus: majority sign of rnd(sum wd); models whose weighted
 * delta has that sign (a zero has none) form mixed and the divisor. */
GTA_INLINE void combine_ties_body(enum ms_dtype dt, const struct gta_fin *p, uint32_t nm,
                                  const float (*restrict wd)[GTA_BLOCK], const float *restrict w,
                                  const float *restrict b, float *restrict out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float s = 0.0f;
        for (uint32_t j = 0; j < nm; j++)
            s += wd[j][i];
        int maj = ms_rnd(dt, s) >= 0.0f ? 1 : -1; /* NaN: -1, as (S >= 0)*2 - 1 */
        float mixed = 0.0f, div = 0.0f;
        for (uint32_t j = 0; j < nm; j++) {
            float v = wd[j][i];
            int sg = (v > 0.0f) - (v < 0.0f);
            float mk = sg == maj ? 1.0f : 0.0f;
            mixed += v * mk;
            div += w[j] * mk;
        }
        div = ms_rnd(dt, div);
        if (div == 0.0f)
            div = 1.0f;
        out[i] = finish_1(dt, p, b[i], ms_rnd(dt, mixed), div);
    }
}

static void gta_combine(enum ms_dtype dt, const struct gta_fin *p, bool consensus, uint32_t nm,
                        const float (*restrict wd)[GTA_BLOCK], const float *restrict w,
                        const float *restrict b, float *restrict out, size_t n)
{
    if (consensus) {
#define CALL(t) combine_ties_body(t, p, nm, wd, w, b, out, n)
        GTA_DISPATCH(dt, CALL);
#undef CALL
    } else {
#define CALL(t) combine_sum_body(t, p, nm, wd, b, out, n)
        GTA_DISPATCH(dt, CALL);
#undef CALL
    }
}

/* ------------------------------------------------------------------------ */
/* Stage operations                                                          */

static uint64_t *state_hist(struct gta_state *st, int32_t slot)
{
    return st->hist + (size_t)slot * st->hist_len;
}

/* After the selection: the rescale pass when asked for, else apply. */
static int gta_after_select(struct gta_state *st)
{
    bool any = false;
    for (uint32_t j = 0; j < st->nm; j++)
        any |= st->m[j].trim;
    if (st->rescale && any) {
        st->phase = GTA_RESCALE;
        return MS_STAGE_REDUCE;
    }
    st->phase = GTA_APPLY;
    return MS_STAGE_APPLY;
}

static int gta_begin(void *state, const struct ms_stage_job *job, const struct gta_kind *kind)
{
    struct gta_state *st = state;
    const char *name = job->name ? job->name : "?";
    const char *mname = job->method ? job->method->name : "?";
    enum ms_dtype dt = job->compute;
    if (dt != MS_DT_F32 && dt != MS_DT_F16 && dt != MS_DT_BF16)
        return ms_error(MS_EINVAL, "tensor '%s': %s cannot compute in %s", name, mname,
                        ms_dtype_name(dt) ? ms_dtype_name(dt) : "?");
    if (job->ninputs > MS_MAX_INPUTS)
        return ms_error(MS_EINVAL, "tensor '%s': %u inputs, at most %d", name, job->ninputs,
                        MS_MAX_INPUTS);
    if (job->base < 0 || (uint32_t)job->base >= job->ninputs)
        return ms_error(MS_EPLAN, "tensor '%s': %s needs the base model's tensor", name, mname);
    int iw = param_index(job, "weight"), id = param_index(job, "density");
    int inorm = param_index(job, "normalize"), iresc = param_index(job, "rescale");
    int ilam = param_index(job, "lambda");
    if (iw < 0)
        return ms_error(MS_EINVAL, "tensor '%s': %s declares no weight", name, mname);

    st->kind = *kind;
    st->dt = dt;
    st->base = (uint32_t)job->base;
    st->normalize = inorm >= 0 && job->gv[inorm] != 0.0;
    st->rescale = kind->sparse != GTA_SPARSE_NONE && iresc >= 0 && job->gv[iresc] != 0.0;
    double lambda = ilam >= 0 ? job->gv[ilam] : 1.0;
    st->use_lambda = lambda != 1.0;
    st->lambda = (float)lambda;
    st->hist_len = kind->sparse == GTA_SPARSE_MAGNITUDE ? ms__sel_hist_len(dt) : 0;
    st->psize = gta_partial_size(job, kind);

    bool select = false;
    for (uint32_t i = 0; i < job->ninputs; i++) {
        if ((int)i == job->base)
            continue;
        struct gta_model *m = &st->m[st->nm++];
        m->input = i;
        m->w = ms_rnd_param(dt, job->pv[i][iw]);
        m->slot = -1;
        double density = id >= 0 ? job->pv[i][id] : 1.0;
        if (kind->sparse != GTA_SPARSE_MAGNITUDE || !(density < 1.0))
            continue;
        /* mergekit: k = int(density * numel) in double, asserted > 0. */
        uint64_t k = (uint64_t)(density * (double)job->numel);
        if (k == 0 && job->numel > 0)
            return ms_error(MS_EPLAN,
                            "tensor '%s': density %g keeps no element of %llu "
                            "(int(density*numel) == 0)",
                            name, density, (unsigned long long)job->numel);
        m->slot = (int32_t)st->nslots++;
        m->trim = k < job->numel;
        ms__sel_init(&m->sel, dt, job->numel, k, false);
        select |= ms__sel_phase(&m->sel) != MS__SEL_DONE;
    }
    assert(st->nslots == gta_nslots(job, kind));

    /* Without consensus the divisor is one scalar: rnd(sum W), guarded. */
    float s = 0.0f;
    for (uint32_t j = 0; j < st->nm; j++)
        s += st->m[j].w;
    s = ms_rnd(dt, s);
    st->div = fabsf(s) < 1e-8 ? 1.0f : s;

    if (job->numel == 0 || st->nm == 0) {
        st->phase = GTA_APPLY;
        return MS_STAGE_APPLY;
    }
    if (select) {
        st->phase = GTA_SELECT;
        return MS_STAGE_REDUCE;
    }
    return gta_after_select(st);
}

static void gta_reduce(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                       void *partial)
{
    const struct gta_state *st = state;
    float d[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float keep[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    const float *b = c->in[st->base];
    assert(c->count < ((uint64_t)1 << 32)); /* uint32 histogram counts */
    memset(partial, 0, st->psize);

    if (st->phase == GTA_SELECT) {
        struct gta_part_select *p = partial;
        for (uint32_t j = 0; j < st->nm; j++) {
            const struct gta_model *m = &st->m[j];
            enum ms__sel_phase ph = m->slot >= 0 ? ms__sel_phase(&m->sel) : MS__SEL_DONE;
            if (ph == MS__SEL_DONE)
                continue;
            uint32_t *hist = p->hist + (size_t)m->slot * st->hist_len;
            uint64_t ties = 0;
            const float *x = c->in[m->input];
            for (uint64_t off = 0; off < c->count; off += GTA_BLOCK) {
                size_t n = (size_t)MS_MIN((uint64_t)GTA_BLOCK, c->count - off);
                gta_delta(st->dt, d, x + off, b + off, n);
                if (ph == MS__SEL_HIST)
                    ms__sel_count(&m->sel, hist, d, n);
                else
                    ties += ms__sel_count_ties(&m->sel, d, n);
            }
            p->ties[m->slot] = ties;
        }
        return;
    }

    assert(st->phase == GTA_RESCALE);
    struct gta_part_rescale *p = partial;
    for (uint32_t j = 0; j < st->nm; j++) {
        const struct gta_model *m = &st->m[j];
        if (!m->trim)
            continue;
        struct ms_xacc *before = &p->before[m->slot], *after = &p->after[m->slot];
        ms_xacc_init(before);
        ms_xacc_init(after);
        const float *x = c->in[m->input];
        uint64_t run = 0;
        for (uint64_t off = 0; off < c->count; off += GTA_BLOCK) {
            size_t n = (size_t)MS_MIN((uint64_t)GTA_BLOCK, c->count - off);
            gta_delta(st->dt, d, x + off, b + off, n);
            ms_xacc_sumabs(before, d, n);
            ms__sel_mask(&m->sel, c->first, &run, d, keep, n);
            gta_mask(st->dt, d, keep, false, 1.0f, n);
            ms_xacc_sumabs(after, d, n);
        }
    }
}

static void gta_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                     const void *partial)
{
    struct gta_state *st = state;
    if (st->phase == GTA_SELECT) {
        const struct gta_part_select *p = partial;
        for (uint32_t j = 0; j < st->nm; j++) {
            struct gta_model *m = &st->m[j];
            if (m->slot < 0)
                continue;
            switch (ms__sel_phase(&m->sel)) {
            case MS__SEL_HIST:
                ms__sel_fold_hist(&m->sel, state_hist(st, m->slot),
                                  p->hist + (size_t)m->slot * st->hist_len);
                break;
            case MS__SEL_TIES:
                ms__sel_fold_ties(&m->sel, c->first, p->ties[m->slot]);
                break;
            default:
                break;
            }
        }
        return;
    }
    assert(st->phase == GTA_RESCALE);
    const struct gta_part_rescale *p = partial;
    for (uint32_t j = 0; j < st->nm; j++) {
        const struct gta_model *m = &st->m[j];
        if (!m->trim)
            continue;
        ms_xacc_merge(&st->before[m->slot], &p->before[m->slot]);
        ms_xacc_merge(&st->after[m->slot], &p->after[m->slot]);
    }
}

static int gta_end_pass(void *state, const struct ms_stage_job *job)
{
    struct gta_state *st = state;
    if (st->phase == GTA_SELECT) {
        bool more = false;
        for (uint32_t j = 0; j < st->nm; j++) {
            struct gta_model *m = &st->m[j];
            if (m->slot < 0)
                continue;
            if (ms__sel_phase(&m->sel) == MS__SEL_HIST)
                ms__sel_end_hist(&m->sel, state_hist(st, m->slot));
            else if (ms__sel_phase(&m->sel) == MS__SEL_TIES)
                ms__sel_end_ties(&m->sel);
            more |= ms__sel_phase(&m->sel) != MS__SEL_DONE;
        }
        return more ? MS_STAGE_REDUCE : gta_after_select(st);
    }

    /* L1 rescale (mergekit-spec.md 2.7): before = rnd(sum |d|), after =
     * rnd(sum |masked|); both >= 1e-7 gives the factor rnd(before/after). */
    assert(st->phase == GTA_RESCALE);
    for (uint32_t j = 0; j < st->nm; j++) {
        struct gta_model *m = &st->m[j];
        if (!m->trim)
            continue;
        float before = ms_rnd(st->dt, (float)ms_xacc_value(&st->before[m->slot]));
        float after = ms_rnd(st->dt, (float)ms_xacc_value(&st->after[m->slot]));
        m->scale = !(before < 1e-7 || after < 1e-7);
        m->factor = m->scale ? ms_rnd(st->dt, before / after) : 1.0f;
    }
    st->phase = GTA_APPLY;
    return MS_STAGE_APPLY;
}

static void gta_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    const struct gta_state *st = state;
    assert(st->phase == GTA_APPLY);
    const float *b = c->in[st->base];
    if (st->nm == 0) {
        memcpy(c->out, b, (size_t)c->count * sizeof(float));
        return;
    }
    float wd[MS_MAX_INPUTS][GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float keep[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float w[MS_MAX_INPUTS];
    uint64_t run[MS_MAX_INPUTS] = { 0 };
    const struct gta_fin fin = { .normalize = st->normalize, .use_lambda = st->use_lambda,
                                 .lambda = st->lambda, .div = st->div };
    for (uint32_t j = 0; j < st->nm; j++)
        w[j] = st->m[j].w;

    for (uint64_t off = 0; off < c->count; off += GTA_BLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)GTA_BLOCK, c->count - off);
        for (uint32_t j = 0; j < st->nm; j++) {
            const struct gta_model *m = &st->m[j];
            gta_delta(st->dt, wd[j], c->in[m->input] + off, b + off, n);
            if (m->trim) {
                ms__sel_mask(&m->sel, c->first, &run[j], wd[j], keep, n);
                gta_mask(st->dt, wd[j], keep, m->scale, m->factor, n);
            }
            gta_weigh(st->dt, wd[j], m->w, n);
        }
        gta_combine(st->dt, &fin, st->kind.consensus, st->nm, (const float(*)[GTA_BLOCK])wd, w,
                    b + off, c->out + off, n);
    }
}

/* ------------------------------------------------------------------------ */
/* Ops tables                                                                */

#define GTA_OPS(method, kind)                                                                      \
    static size_t method##_state_size(const struct ms_stage_job *job)                             \
    {                                                                                              \
        return gta_state_size(job, &kind);                                                         \
    }                                                                                              \
    static size_t method##_partial_size(const struct ms_stage_job *job)                           \
    {                                                                                              \
        return gta_partial_size(job, &kind);                                                       \
    }                                                                                              \
    static int method##_begin(void *state, const struct ms_stage_job *job)                        \
    {                                                                                              \
        return gta_begin(state, job, &kind);                                                       \
    }                                                                                              \
    const struct ms_stage_ops ms_stage_##method##_ops = {                                          \
        .state_size = method##_state_size,                                                         \
        .partial_size = method##_partial_size,                                                     \
        .begin = method##_begin,                                                                   \
        .reduce = gta_reduce,                                                                      \
        .fold = gta_fold,                                                                          \
        .end_pass = gta_end_pass,                                                                  \
        .apply = gta_apply,                                                                        \
    }

GTA_OPS(task_arithmetic, kind_task_arithmetic);
GTA_OPS(ties, kind_ties);
