/*
 * sce.c - SCE: select by variance, calculate weights, erase minority signs
 * (mergekit-spec.md 2.13). No per-model weights; select_topk is global.
 *
 * For one output tensor with base B and the other N models i in input order,
 * rnd() rounding to the compute dtype D:
 *   t_i  = rnd(x_i - B)
 *   select_topk < 1:
 *     var  = rnd(population variance of t over the models), per element
 *     k    = int(float32(count_nonzero(var)) * float32(select_topk))
 *     t_i  = t_i * mask, mask = the k positions of largest |var| (k == 0: none)
 *   S    = rnd(sum t_i), maj = S >= 0 ? +1 : -1, m_i = sign(t_i) == maj
 *   mu_i = rnd(sum rnd(t_i^2) / numel)                (after the variance mask)
 *   ws   = rnd(sum mu) (float32 sum in model order: torch.sum(weights).item())
 *   W_i  = rnd(mu_i / ws), or rnd(1 / N) when |ws| < 1e-6 (float32 division)
 *   ew_i = W_i * m_i
 *   out  = rnd(B + rnd(rnd(sum rnd(t_i*ew_i)) / max(rnd(sum ew_i), rnd(1e-6))))
 * Sums over models accumulate in float32 from +0 in model order and round once.
 *
 * Our rules where mergekit is not reproducible (README):
 *   - the variance is computed per element in double (mean, then the mean of
 *     squared deviations) and rounded once to D; torch's Welford kernel may
 *     differ by an ulp (mergekit-spec.md 7.20);
 *   - topk ties (equal |var|) go to the lower flat index (DESIGN.md 2);
 *   - the whole-tensor sums of mu are exact (ms_xacc), rounded once;
 *   - NaN: every NaN that reaches the output is fixed by the code, as x86
 *     arithmetic in torch's operand order gives it: a * b and a + b keep a's
 *     NaN, quieted, when a is NaN (ms__mul_first, ms__add_first); a sum over
 *     models keeps the first NaN in model order (ms__acc_add); x - y, x / y
 *     and x * y with one NaN operand are the hardware's; an invalid operation
 *     (Inf - Inf, Inf / Inf, Inf * 0) gives the hardware's default NaN. A NaN
 *     mean mu_i is +NaN (the exact sum's NaN; torch's reduction order and its
 *     bf16 rounding of NaN are not reproducible), an Inf one +Inf. sign(NaN)
 *     is 0, never the majority; ew_i = rnd(W_i * mask_i) is NaN where W_i is,
 *     mask 0 or not (torch's tv_weights * erase_mask), so a NaN or Inf delta
 *     that survives the variance mask makes the whole tensor NaN, as in
 *     mergekit. Only the NaN's sign and payload are our rule.
 *
 * Passes (everything is recomputed from the inputs in every pass, but var
 * when a keep area holds it, below):
 *   COUNT    select_topk < 1: count_nonzero(var), and the first histogram
 *            pass of select.c over var (it does not depend on k);
 *   SELECT   0 < k < numel: the remaining histogram pass (F32) and the tie
 *            pass of select.c over var, when needed (the histogram pass's
 *            records predict the cut from the nonzero count so far);
 *   MU       sum rnd(t_i^2) per model after the mask (ms_xacc);
 *   apply    per element, in blocks of SCE_BLOCK.
 * Keep area (select_topk < 1, two models or more, at most SCE_KEEP_MAX
 * elements): COUNT stores each element's var there, and the later passes read
 * it instead of computing the variance again (SELECT needs no deltas then).
 * Without one (the engine could not hold it) every pass recomputes var: the
 * same values, so the same bytes.
 * Stored bytes (bfloat16 or float16 inputs and output computed in that dtype,
 * ms_stage_ops.stored_passes): every pass runs the same kernels on blocks
 * decoded into L1 scratch, the keep area used as above (sce_stored_passes).
 * Memory: the state holds one histogram (32,768 or 65,536 uint64).
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "stage_impl.h"

#define SCE_BLOCK 256 /* elements per inner block: bounds the stack scratch */

enum sce_phase { SCE_COUNT, SCE_SELECT, SCE_MU, SCE_APPLY };

/* Set by begin and end_pass (loop thread); read-only for reduce and apply. */
struct sce_state {
    enum ms_dtype dt;
    uint32_t phase;          /* enum sce_phase */
    uint32_t base;           /* input index of the base */
    uint32_t nm;             /* models other than the base */
    uint32_t in[MS_MAX_INPUTS]; /* their input indices */
    bool topk;               /* select_topk < 1: the variance mask applies */
    bool keep_all;           /* the variance mask keeps every element (k == numel) */
    bool keep_none;          /* the variance mask keeps nothing (k == 0) */
    bool count_hist;         /* COUNT also fills hist (the first histogram pass) */
    double select_topk;
    uint64_t nonzero;        /* COUNT fold: elements with var != 0 */
    float w[MS_MAX_INPUTS];  /* W_i */
    float clamp_min;         /* rnd(1e-6) */
    struct ms__sel sel;      /* SELECT: top k of |var| */
    size_t hist_len;
    size_t psize;
    struct ms_xacc mu[MS_MAX_INPUTS];
    uint64_t hist[];         /* hist_len */
};

/* Partials (one pass at a time). */
struct sce_part {
    uint64_t count;          /* COUNT: nonzero variances; SELECT ties pass: ties */
    struct ms_xacc mu[MS_MAX_INPUTS]; /* MU */
    uint32_t hist[];         /* SELECT hist pass */
};

static size_t sce_state_size(const struct ms_stage_job *job)
{
    return sizeof(struct sce_state) + ms__sel_hist_len(job->compute) * sizeof(uint64_t);
}

static size_t sce_partial_size(const struct ms_stage_job *job)
{
    return sizeof(struct sce_part) + ms__sel_hist_len(job->compute) * sizeof(uint32_t);
}

/*
 * A keep area holds var between passes (file comment). It is asked for only up
 * to SCE_KEEP_MAX elements: a resident tensor keeps in its own output buffer at
 * no cost, while for a larger one (an embedding, rarely resident) the engine
 * would reserve a keep pool of numel * 4 bytes out of the budget, as
 * multislerp.c found (peak RSS past budget + 32 MiB at 512M); those recompute.
 */
#define SCE_KEEP_MAX ((uint64_t)16 << 20)
static bool sce_keeps(const struct ms_stage_job *job)
{
    int itop = job->method ? ms_method_param(job->method, "select_topk") : -1;
    bool base = job->base >= 0 && (uint32_t)job->base < job->ninputs;
    return itop >= 0 && job->gv[itop] < 1.0 && base && job->ninputs >= 3 &&
           job->numel <= SCE_KEEP_MAX;
}

/* ------------------------------------------------------------------------ */
/* Kernels. Each is specialised on the compute dtype and on how the inputs  */
/* are held (floats, or stored bytes) through always-inline helpers and one */
/* switch per chunk, so rounding and decoding inline; the element loops run */
/* model by model over a block (the same operations per element as one     */
/* element at a time), so they vectorise.                                    */

#define SCE_INLINE static inline __attribute__((always_inline))

/*
 * One chunk as the kernels see it, from either path. sdt says how in and out
 * hold elements: MS_DT_F32 for the float path's floats, MS_DT_BF16 or
 * MS_DT_F16 for stored bytes (the stored path runs only when the compute dtype
 * is that dtype: sce_stored_passes). Borrowed from the chunk for one call.
 */
struct sce_view {
    uint64_t first, count;        /* element range of the output tensor */
    const void *in[MS_MAX_INPUTS]; /* count elements of sdt each */
    void *out;                    /* apply: count elements of sdt; reduce: NULL */
    float *keep;                  /* the chunk's kept variances (COUNT writes them), or NULL */
};

/* The block [off, off + n) of every input as floats: pointers into the float
 * path's chunk, or the stored bytes decoded into buf (the float path's values:
 * the engine decodes those with the same conversion). */
SCE_INLINE void sce_load(enum ms_dtype sdt, const struct sce_state *st, const struct sce_view *v,
                         uint64_t off, size_t n, float (*restrict buf)[SCE_BLOCK],
                         const float **in)
{
    for (uint32_t k = 0; k <= st->nm; k++) {
        if (sdt == MS_DT_F32) {
            in[k] = (const float *)v->in[k] + off;
            continue;
        }
        const uint16_t *src = (const uint16_t *)v->in[k] + off;
        if (sdt == MS_DT_BF16)
            for (size_t i = 0; i < n; i++)
                buf[k][i] = ms_bf16_to_f32_1(src[i]);
        else
            ms_f16_to_f32(src, buf[k], n);
        in[k] = buf[k];
    }
}

/* t[j][i] = rnd(x_j - B) for every model, over n elements of the block. */
SCE_INLINE void sce_deltas(enum ms_dtype dt, const struct sce_state *st, const float *const *in,
                           float (*restrict t)[SCE_BLOCK], size_t n)
{
    const float *b = in[st->base];
    for (uint32_t j = 0; j < st->nm; j++) {
        const float *x = in[st->in[j]];
        for (size_t i = 0; i < n; i++)
            t[j][i] = ms_rnd(dt, x[i] - b[i]);
    }
}

/* var[i] = rnd(population variance of t[.][i]) computed in double: the sum
 * in model order, mean = sum / N, then the squared deviations in model order. */
SCE_INLINE void sce_var(enum ms_dtype dt, uint32_t nm, const float (*restrict t)[SCE_BLOCK],
                        float *restrict var, size_t n)
{
    const double N = (double)nm;
    double s[SCE_BLOCK], v[SCE_BLOCK];
    /* s and v start from the first term rather than from +0: 0 + x is x but
     * for x = -0, a mean whose sign only reaches var through a square. */
    for (size_t i = 0; i < n; i++)
        s[i] = t[0][i];
    for (uint32_t j = 1; j < nm; j++)
        for (size_t i = 0; i < n; i++)
            s[i] += t[j][i];
    /* x / N is x * (1 / N) when N is a power of two (both are the exact
     * quotient rounded once), and a multiplication is cheaper. */
    const bool pow2 = (nm & (nm - 1)) == 0;
    const double inv = 1.0 / N;
    if (pow2)
        for (size_t i = 0; i < n; i++)
            s[i] *= inv;
    else
        for (size_t i = 0; i < n; i++)
            s[i] /= N;
    for (size_t i = 0; i < n; i++) {
        double d = t[0][i] - s[i];
        v[i] = d * d;
    }
    for (uint32_t j = 1; j < nm; j++)
        for (size_t i = 0; i < n; i++) {
            double d = t[j][i] - s[i];
            v[i] += d * d;
        }
    if (pow2)
        for (size_t i = 0; i < n; i++)
            var[i] = ms_rnd(dt, (float)(v[i] * inv));
    else
        for (size_t i = 0; i < n; i++)
            var[i] = ms_rnd(dt, (float)(v[i] / N));
}

/* Deltas of the block at off with the variance mask applied (t * mask, exact
 * 0/1); the variances come from the keep area when it holds them. */
SCE_INLINE void sce_masked(enum ms_dtype dt, const struct sce_state *st, const struct sce_view *v,
                           const float *const *in, uint64_t off, uint64_t *run,
                           float (*restrict t)[SCE_BLOCK], size_t n)
{
    float var[SCE_BLOCK], keep[SCE_BLOCK];
    sce_deltas(dt, st, in, t, n);
    if (!st->topk || st->keep_all)
        return;
    if (st->keep_none) {
        memset(keep, 0, sizeof(keep));
    } else if (v->keep) {
        ms__sel_mask(&st->sel, v->first, run, v->keep + off, keep, n);
    } else {
        sce_var(dt, st->nm, (const float(*)[SCE_BLOCK])t, var, n);
        ms__sel_mask(&st->sel, v->first, run, var, keep, n);
    }
    for (uint32_t j = 0; j < st->nm; j++)
        for (size_t i = 0; i < n; i++)
            t[j][i] *= keep[i];
}

/* MU terms of one model's block: sq = rnd(t^2) (a masked t gives 0, which
 * adds nothing to the exact sum; NaN stays NaN). */
SCE_INLINE void sce_squares(enum ms_dtype dt, const float *restrict t, float *restrict sq,
                            size_t n)
{
    for (size_t i = 0; i < n; i++)
        sq[i] = ms_rnd(dt, t[i] * t[i]);
}

/* out = rnd(b + rnd(rnd(num) / max(rnd(div), lo))); the clamp keeps a NaN */
SCE_INLINE void sce_out(enum ms_dtype dt, float *restrict out, const float *restrict b,
                        const float *restrict num, const float *restrict div, float lo, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float d = ms_rnd(dt, div[i]);
        d = d < lo ? lo : d;
        out[i] = ms_rnd(dt, ms__add_first(b[i], ms_rnd(dt, ms_rnd(dt, num[i]) / d)));
    }
}

/* The reduce pass of the current phase over the chunk, into p (zeroed but for
 * the xacc sums, which the caller initialises). */
SCE_INLINE void sce_reduce_body(enum ms_dtype dt, enum ms_dtype sdt, const struct sce_state *st,
                                const struct sce_view *v, struct sce_part *p, bool hist)
{
    float t[MS_MAX_INPUTS][SCE_BLOCK], buf[MS_MAX_INPUTS][SCE_BLOCK];
    float var[SCE_BLOCK], sq[SCE_BLOCK];
    const float *in[MS_MAX_INPUTS];
    float *kv = v->keep;
    uint64_t run = 0;
    for (uint64_t off = 0; off < v->count; off += SCE_BLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)SCE_BLOCK, v->count - off);
        const float *vb = var;
        switch (st->phase) {
        case SCE_COUNT:
            sce_load(sdt, st, v, off, n, buf, in);
            sce_deltas(dt, st, in, t, n);
            sce_var(dt, st->nm, (const float(*)[SCE_BLOCK])t, var, n);
            if (kv)
                memcpy(kv + off, var, n * sizeof(float));
            for (size_t i = 0; i < n; i++)
                p->count += var[i] != 0.0f; /* NaN counts, as count_nonzero */
            if (hist)
                ms__sel_count(&st->sel, p->hist, var, n);
            break;
        case SCE_SELECT:
            if (kv) {
                vb = kv + off;
            } else {
                sce_load(sdt, st, v, off, n, buf, in);
                sce_deltas(dt, st, in, t, n);
                sce_var(dt, st->nm, (const float(*)[SCE_BLOCK])t, var, n);
            }
            if (hist)
                ms__sel_count(&st->sel, p->hist, vb, n);
            else
                p->count += ms__sel_count_ties(&st->sel, vb, n);
            break;
        case SCE_MU:
            sce_load(sdt, st, v, off, n, buf, in);
            sce_masked(dt, st, v, in, off, &run, t, n);
            for (uint32_t j = 0; j < st->nm; j++) {
                sce_squares(dt, t[j], sq, n);
                ms_xacc_sumabs(&p->mu[j], sq, n);
            }
            break;
        default:
            assert(!"no reduce in apply");
        }
    }
}

/* out = rnd(B + rnd(rnd(sum rnd(t*ew)) / max(rnd(sum ew), clamp))) over the
 * chunk, ew = rnd(W * (sign(t) == maj)), maj the sign of rnd(sum t) (NaN: -1),
 * each product and sum with the NaN rule of the file comment; stored: the
 * floats encoded to sdt (exact: they are values of the compute dtype sdt). */
SCE_INLINE void sce_apply_body(enum ms_dtype dt, enum ms_dtype sdt, const struct sce_state *st,
                               const struct sce_view *v)
{
    float t[MS_MAX_INPUTS][SCE_BLOCK], buf[MS_MAX_INPUTS][SCE_BLOCK];
    float maj[SCE_BLOCK], num[SCE_BLOCK], div[SCE_BLOCK], fo[SCE_BLOCK];
    const float *in[MS_MAX_INPUTS];
    uint64_t run = 0;
    for (uint64_t off = 0; off < v->count; off += SCE_BLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)SCE_BLOCK, v->count - off);
        sce_load(sdt, st, v, off, n, buf, in);
        sce_masked(dt, st, v, in, off, &run, t, n);
        for (size_t i = 0; i < n; i++)
            maj[i] = 0.0f;
        for (uint32_t j = 0; j < st->nm; j++)
            for (size_t i = 0; i < n; i++)
                maj[i] += t[j][i];
        for (size_t i = 0; i < n; i++) {
            maj[i] = ms_rnd(dt, maj[i]) >= 0.0f ? 1.0f : -1.0f;
            num[i] = 0.0f;
            div[i] = 0.0f;
        }
        for (uint32_t j = 0; j < st->nm; j++) {
            /* w0 = rnd(W * 0), ew where the sign is not the majority's (W * False):
             * +0 for a finite W (>= 0 here), W's NaN for a NaN one */
            const float w = st->w[j], w0 = ms_rnd(dt, ms__mul_first(w, 0.0f));
            for (size_t i = 0; i < n; i++) {
                float x = t[j][i];
                float ew = x * maj[i] > 0.0f ? w : w0; /* sign(x) == maj; maj is +-1 */
                num[i] = ms__acc_add(num[i], ms_rnd(dt, ms__mul_first(x, ew)));
                div[i] = ms__acc_add(div[i], ew);
            }
        }
        if (sdt == MS_DT_F32) {
            sce_out(dt, (float *)v->out + off, in[st->base], num, div, st->clamp_min, n);
            continue;
        }
        sce_out(dt, fo, in[st->base], num, div, st->clamp_min, n);
        uint16_t *y = (uint16_t *)v->out + off;
        if (sdt == MS_DT_BF16)
            for (size_t i = 0; i < n; i++)
                y[i] = ms_f32_to_bf16_1(fo[i]);
        else
            ms_f32_to_f16(fo, y, n);
    }
}

/* One call per (compute dtype, sdt) pair the paths use: the float path in any
 * compute dtype, the stored one in bfloat16 or float16 (sdt == dt). */
#define SCE_DISPATCH(dt, sdt, call)                                                                \
    do {                                                                                           \
        if ((sdt) == MS_DT_BF16)                                                                   \
            call(MS_DT_BF16, MS_DT_BF16);                                                          \
        else if ((sdt) == MS_DT_F16)                                                               \
            call(MS_DT_F16, MS_DT_F16);                                                            \
        else if ((dt) == MS_DT_BF16)                                                               \
            call(MS_DT_BF16, MS_DT_F32);                                                           \
        else if ((dt) == MS_DT_F16)                                                                \
            call(MS_DT_F16, MS_DT_F32);                                                            \
        else                                                                                       \
            call(MS_DT_F32, MS_DT_F32);                                                            \
    } while (0)

static void sce_reduce_range(const struct sce_state *st, enum ms_dtype sdt,
                             const struct sce_view *v, struct sce_part *p, bool hist)
{
#define CALL(t, s) sce_reduce_body(t, s, st, v, p, hist)
    SCE_DISPATCH(st->dt, sdt, CALL);
#undef CALL
}

static void sce_apply_range(const struct sce_state *st, enum ms_dtype sdt,
                            const struct sce_view *v)
{
#define CALL(t, s) sce_apply_body(t, s, st, v)
    SCE_DISPATCH(st->dt, sdt, CALL);
#undef CALL
}

/*
 * The versions of ms_isa.h: the two above with everything they call inlined
 * (flatten) and compiled for each target. Every step is elementwise or a sum
 * over models in model order per element, and the compiler does not
 * reassociate float arithmetic (no -ffast-math, -ffp-contract=off), so a wider
 * vector changes no value; tests/test_isa.c compares the versions.
 */
MS__ISA_VERSIONS(sce_reduce_isa, sce_reduce_range,
                 (const struct sce_state *st, enum ms_dtype sdt, const struct sce_view *v,
                  struct sce_part *p, bool hist),
                 (st, sdt, v, p, hist))
MS__ISA_VERSIONS(sce_apply_isa, sce_apply_range,
                 (const struct sce_state *st, enum ms_dtype sdt, const struct sce_view *v),
                 (st, sdt, v))

/* ------------------------------------------------------------------------ */
/* Stage operations                                                          */

static int sce_after_select(struct sce_state *st)
{
    st->phase = SCE_MU;
    return MS_STAGE_REDUCE;
}

static int sce_begin(void *state, const struct ms_stage_job *job)
{
    struct sce_state *st = state;
    const char *name = job->name ? job->name : "?";
    enum ms_dtype dt = job->compute;
    if (dt != MS_DT_F32 && dt != MS_DT_F16 && dt != MS_DT_BF16)
        return ms_error(MS_EINVAL, "tensor '%s': sce cannot compute in %s", name,
                        ms_dtype_name(dt) ? ms_dtype_name(dt) : "?");
    if (job->ninputs > MS_MAX_INPUTS)
        return ms_error(MS_EINVAL, "tensor '%s': %u inputs, at most %d", name, job->ninputs,
                        MS_MAX_INPUTS);
    if (job->base < 0 || (uint32_t)job->base >= job->ninputs)
        return ms_error(MS_EPLAN, "tensor '%s': sce needs the base model's tensor", name);
    int itop = job->method ? ms_method_param(job->method, "select_topk") : -1;
    st->dt = dt;
    st->base = (uint32_t)job->base;
    for (uint32_t i = 0; i < job->ninputs; i++)
        if ((int)i != job->base)
            st->in[st->nm++] = i;
    st->select_topk = itop >= 0 ? job->gv[itop] : 1.0;
    st->topk = st->select_topk < 1.0;
    st->clamp_min = ms_rnd_param(dt, 1e-6);
    st->hist_len = ms__sel_hist_len(dt);
    st->psize = sce_partial_size(job);
    if (st->nm == 0 || job->numel == 0) {
        st->phase = SCE_APPLY;
        return MS_STAGE_APPLY;
    }
    st->phase = st->topk ? SCE_COUNT : SCE_MU;
    /* The histogram of |var| does not depend on k: COUNT gathers it too
     * (through a provisional selection, in its counting phase when n >= 2),
     * so the selection's first histogram pass is not a pass of its own. */
    st->count_hist = st->topk && job->numel >= 2;
    if (st->count_hist)
        ms__sel_init(&st->sel, dt, job->numel, 1, false);
    return MS_STAGE_REDUCE;
}

/* The view of a float path chunk (sdt MS_DT_F32) or a stored one. */
static void sce_view_of(struct sce_view *v, const struct sce_state *st, const struct ms_chunk *c,
                        const struct ms_chunk_stored *sc)
{
    v->first = c ? c->first : sc->first;
    v->count = c ? c->count : sc->count;
    for (uint32_t k = 0; k <= st->nm; k++)
        v->in[k] = c ? (const void *)c->in[k] : sc->in[k];
    v->out = c ? (void *)c->out : sc->out;
    v->keep = c ? c->keep : sc->keep;
}

/* The reduce pass of either path: sdt as struct sce_view. */
static void sce_reduce_view(const struct sce_state *st, enum ms_dtype sdt,
                            const struct sce_view *v, struct sce_part *p)
{
    assert(v->count < ((uint64_t)1 << 32)); /* uint32 histogram counts */
    p->count = 0;
    for (uint32_t j = 0; j < MS_MAX_INPUTS; j++)
        ms_xacc_init(&p->mu[j]);
    bool hist = (st->phase == SCE_SELECT && ms__sel_phase(&st->sel) == MS__SEL_HIST) ||
                (st->phase == SCE_COUNT && st->count_hist);
    if (hist)
        memset(p->hist, 0, ms__sel_bins(&st->sel) * sizeof(uint32_t));
    sce_reduce_isa(st, sdt, v, p, hist);
}

static void sce_reduce(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                       void *partial)
{
    const struct sce_state *st = state;
    struct sce_view v;
    sce_view_of(&v, st, c, NULL);
    sce_reduce_view(st, MS_DT_F32, &v, partial);
}

static void sce_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                     const void *partial)
{
    struct sce_state *st = state;
    const struct sce_part *p = partial;
    switch (st->phase) {
    case SCE_COUNT:
        st->nonzero += p->count;
        /* The records' predicted cut: k as end_pass will compute it, over the
         * chunks folded so far. */
        if (st->count_hist)
            ms__sel_fold_hist_at(&st->sel, st->hist, p->hist, c->first, c->count,
                                 (uint64_t)((float)st->nonzero * (float)st->select_topk));
        break;
    case SCE_SELECT:
        if (ms__sel_phase(&st->sel) == MS__SEL_HIST)
            ms__sel_fold_hist_at(&st->sel, st->hist, p->hist, c->first, c->count,
                                 ms__sel_share(&st->sel, c->first + c->count));
        else
            ms__sel_fold_ties(&st->sel, c->first, p->count);
        break;
    case SCE_MU:
        for (uint32_t j = 0; j < st->nm; j++)
            ms_xacc_merge(&st->mu[j], &p->mu[j]);
        break;
    default:
        break;
    }
}

static int sce_end_pass(void *state, const struct ms_stage_job *job)
{
    struct sce_state *st = state;
    switch (st->phase) {
    case SCE_COUNT: {
        /* int(count_nonzero(var) * select_topk): an int64 tensor times a Python
         * float is a float32 product. */
        uint64_t k = (uint64_t)((float)st->nonzero * (float)st->select_topk);
        st->keep_none = k == 0;
        st->keep_all = k >= job->numel;
        if (st->keep_none || st->keep_all)
            return sce_after_select(st);
        /* 0 < k < numel: numel >= 2, so COUNT filled hist; the selection's
         * first histogram pass is done (ms__sel_end_hist zeroes hist). */
        assert(st->count_hist);
        ms__sel_init(&st->sel, st->dt, job->numel, k, false);
        ms__sel_end_hist(&st->sel, st->hist);
        if (ms__sel_phase(&st->sel) == MS__SEL_DONE)
            return sce_after_select(st);
        st->phase = SCE_SELECT;
        return MS_STAGE_REDUCE;
    }
    case SCE_SELECT:
        if (ms__sel_phase(&st->sel) == MS__SEL_HIST)
            ms__sel_end_hist(&st->sel, st->hist);
        else
            ms__sel_end_ties(&st->sel);
        return ms__sel_phase(&st->sel) != MS__SEL_DONE ? MS_STAGE_REDUCE : sce_after_select(st);
    case SCE_MU: {
        /* mu_i = mean(rnd(t_i^2)) in D; mergekit's weight_sum is
         * torch.sum(weights).item(): a float32 sum rounded to D, and
         * weights / weight_sum divides by it as a float32 scalar. */
        float mu[MS_MAX_INPUTS], sum = 0.0f;
        for (uint32_t j = 0; j < st->nm; j++) {
            mu[j] = ms_rnd(st->dt, (float)(ms_xacc_value(&st->mu[j]) / (double)job->numel));
            sum = ms__acc_add(sum, mu[j]);
        }
        sum = ms_rnd(st->dt, sum);
        for (uint32_t j = 0; j < st->nm; j++)
            st->w[j] = fabsf(sum) < 1e-6 ? ms_rnd(st->dt, 1.0f / (float)st->nm)
                                         : ms_rnd(st->dt, mu[j] / sum);
        st->phase = SCE_APPLY;
        return MS_STAGE_APPLY;
    }
    default:
        return ms_error(MS_EINVAL, "tensor '%s': sce pass out of order", job->name);
    }
}

static void sce_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    const struct sce_state *st = state;
    assert(st->phase == SCE_APPLY);
    if (st->nm == 0) {
        memcpy(c->out, c->in[st->base], (size_t)c->count * sizeof(float));
        return;
    }
    struct sce_view v;
    sce_view_of(&v, st, c, NULL);
    sce_apply_isa(st, MS_DT_F32, &v);
}

/*
 * The stored-bytes path (ms_stage_ops.stored_passes): inputs and output in
 * bfloat16 or float16, computed in that dtype (a float32 compute dtype takes
 * the float path). Every block of SCE_BLOCK elements is decoded into float
 * scratch that stays in L1 and the float path's kernels run on it, so every
 * pass sees the float path's values and writes its partials; apply's floats
 * are values of the stored dtype, and their encoding is the float path's.
 * The keep area is used as on the float path (it only never overlaps in or
 * out here).
 */
static bool sce_stored_passes(const void *state, const struct ms_stage_job *job,
                              enum ms_dtype dt)
{
    const struct sce_state *st = state;
    return (dt == MS_DT_BF16 || dt == MS_DT_F16) && st->dt == dt;
}

static void sce_reduce_stored(const void *state, const struct ms_stage_job *job,
                              const struct ms_chunk_stored *c, void *partial)
{
    const struct sce_state *st = state;
    struct sce_view v;
    assert(c->dt == st->dt);
    sce_view_of(&v, st, NULL, c);
    sce_reduce_view(st, c->dt, &v, partial);
}

static bool sce_apply_stored(const void *state, const struct ms_stage_job *job,
                             const struct ms_chunk_stored *c)
{
    const struct sce_state *st = state;
    if ((c->dt != MS_DT_BF16 && c->dt != MS_DT_F16) || c->dt != st->dt)
        return false;
    assert(st->phase == SCE_APPLY);
    if (st->nm == 0) {
        memcpy(c->out, c->in[st->base], (size_t)c->count * sizeof(uint16_t));
        return true;
    }
    struct sce_view v;
    sce_view_of(&v, st, NULL, c);
    sce_apply_isa(st, c->dt, &v);
    return true;
}

static const struct ms_stage_ops sce_ops = {
    .state_size = sce_state_size,
    .partial_size = sce_partial_size,
    .keeps = sce_keeps,
    .begin = sce_begin,
    .reduce = sce_reduce,
    .fold = sce_fold,
    .end_pass = sce_end_pass,
    .apply = sce_apply,
    .apply_stored = sce_apply_stored,
    .stored_passes = sce_stored_passes,
    .reduce_stored = sce_reduce_stored,
};

const struct ms_method ms_method_sce = {
    .name = "sce",
    .summary = "select by variance, calculate weights, erase minority signs",
    .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 2,
    .params = { MS__G("select_topk", 1.0, 0, 1), MS__G_BOOL("int8_mask", 0) },
    .card = { "SCE", "https://arxiv.org/abs/2408.07990" },
    .ops = &sce_ops,
};
