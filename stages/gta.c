/*
 * gta.c - the "generalized task arithmetic" family (mergekit-spec.md 2.6):
 * task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
 * della and della_linear: one set of passes, a sparsifier per method (enum
 * gta_sparse, mergekit-spec.md 2.7) and the optional TIES sign election.
 *
 * For one output tensor with base B and the other models m in input order:
 *   d_m   = rnd(x_m - B)                        delta in the compute dtype
 *   d_m   = d_m * mask_m                        sparsifier, density < 1 only
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
 * Sparsifiers (mask_m):
 *   magnitude (ties)    the k = int(density*n) largest |d|, lower index first
 *                       among equal magnitudes (DESIGN.md 2).
 *   random (dare_*)     keep element e iff u < p, u = (ms_rng_u32(seed, key,
 *                       input, e) & 0xFFFFFF) * 2^-24 and p = density rounded to
 *                       the work dtype (BF16 for BF16, else F32: 2.1.4).
 *   magnitude_outliers  (breadcrumbs*) the positions [n_bot, n - n_top) of a
 *                       stable ascending sort of |d|: two selections with
 *                       higher index first, keep = top(n - n_bot) && !top(n_top).
 *   della_magprune      per row, the 1-based stable ascending rank of |d|,
 *                       rounded to the work dtype, gives
 *                       p = (density-eps) + rnd(rnd(rank_norm*2)*eps), then the
 *                       random rule above with that p.
 * The random streams are keyed by the input index of the model (its place among
 * the tensor's inputs, in recipe order) and the flat element index, so a mask
 * is the same in every pass and for any chunking. The L1 rescale sums and
 * factor are rounded to the work dtype (F32 for F16 merges with dare/della).
 *
 * Decisions where mergekit is undefined or crashes (documented in README):
 *   - breadcrumbs with n_top == 0 (int(gamma*n) == 0 after the clamp, e.g.
 *     gamma 0 or a tensor of fewer than 1/gamma elements): mergekit's slice
 *     [n_bot:-0] is empty, so the model's delta becomes zero. We do the same
 *     (bit-compatible); such a model then contributes only its weight to the
 *     divisors. The plan is the place to warn about it.
 *   - della on a one-element row: mergekit's rank norm is 0/0 (NaN
 *     probabilities). We use p = density (rounded to the work dtype), the
 *     random rule of dare.
 *   - della ranks along dim 1; for 2-D tensors that is the row. Tensors of 3 or
 *     more dimensions are refused (MS_EUNSUPPORTED) rather than ranked
 *     differently from mergekit.
 *   - della's density +- epsilon outside (0, 1) is an error (mergekit raises
 *     ValueError), for density in (0, 1).
 * The plan reports these refusals and ties' k == 0 before any data is read
 * (gta_check); begin refuses them too, for callers without a plan. Both use
 * the same rules (gta_topk, della_ranks, della_window_ok).
 *
 * Passes (the deltas are recomputed from the inputs in every pass):
 *   SELECT   magnitude and outliers, models with density < 1: histogram passes
 *            and the tie pass of select.c, all selections advancing together;
 *   RESCALE  only with rescale: the L1 sums before/after the mask (ms_xacc);
 *   apply    per element, in blocks of GTA_BLOCK.
 * della is ROWWISE: each chunk holds whole rows. Ranking a row needs one
 * uint32 per element: in the rescale pass that is the tail of the partial
 * (partial_size includes one row); in apply it is the output row itself, whose
 * words hold the row index being sorted (low ib bits) and one keep bit per
 * trimmed model (above it) until the row's outputs overwrite them. So
 * ib + trimmed models <= 32: rows up to 2^17 elements with 15 trimmed models,
 * 2^28 with 4; longer rows are refused by begin. bf16/f16 rows of 512 elements
 * or more are ranked by counting keys instead (della_row_counted: the same
 * ranks, in index order, per-thread tables), which leaves the index field unused.
 * With rescale the rescale pass ranks every row and leaves the keep bits in
 * the chunk's keep area (ms_stage.h, della_keeps; one byte per element with up
 * to 8 trimmed models, else words as above: della_packs), so apply ranks no
 * row again; a job without a keep area ranks in both passes, with the same
 * bytes.
 * Memory: the state holds one histogram (32,768 or 65,536 uint64) per
 * selection (one per trimmed ties model, two per breadcrumbs model).
 */
#include <assert.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "stage_impl.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h> /* gta_split_avx512 */
#endif

#define GTA_BLOCK 256 /* elements per inner block: bounds the stack scratch */
#define GTA_RBLOCK 4096 /* elements per exact-sum call in the rescale pass */

/* ------------------------------------------------------------------------ */
/* Family members                                                            */

enum gta_sparse {
    GTA_SPARSE_NONE,      /* task_arithmetic: density and rescale unused */
    GTA_SPARSE_MAGNITUDE, /* ties: exact top-k by |delta| */
    GTA_SPARSE_RANDOM,    /* dare_*: Bernoulli(density) */
    GTA_SPARSE_OUTLIERS,  /* breadcrumbs*: drop the smallest and the largest |delta| */
    GTA_SPARSE_DELLA,     /* della*: Bernoulli with a per-row rank-based p */
};

struct gta_kind {
    enum gta_sparse sparse;
    bool consensus;       /* TIES sign election ("sum") */
};

static const struct gta_kind kind_task_arithmetic = { GTA_SPARSE_NONE, false };
static const struct gta_kind kind_ties = { GTA_SPARSE_MAGNITUDE, true };
static const struct gta_kind kind_dare_linear = { GTA_SPARSE_RANDOM, false };
static const struct gta_kind kind_dare_ties = { GTA_SPARSE_RANDOM, true };
static const struct gta_kind kind_breadcrumbs = { GTA_SPARSE_OUTLIERS, false };
static const struct gta_kind kind_breadcrumbs_ties = { GTA_SPARSE_OUTLIERS, true };
static const struct gta_kind kind_della = { GTA_SPARSE_DELLA, true };
static const struct gta_kind kind_della_linear = { GTA_SPARSE_DELLA, false };

/* Selections (histogram slots) one trimmed model uses. */
static uint32_t kind_nsel(const struct gta_kind *kind)
{
    if (kind->sparse == GTA_SPARSE_MAGNITUDE)
        return 1;
    return kind->sparse == GTA_SPARSE_OUTLIERS ? 2u : 0u;
}

/* The family member of the job's method: its descriptor's impl. */
static const struct gta_kind *gta_kind_of(const struct ms_stage_job *job)
{
    assert(job->method && job->method->impl);
    return job->method->impl;
}

/* Rules the plan (gta_check) and begin share. */

/* ties: mergekit's k = int(density * numel), computed in double. */
static uint64_t gta_topk(double density, uint64_t numel)
{
    return (uint64_t)(density * (double)numel);
}

/* della ranks along dim 1: a 1-D tensor is one row, a 2-D one has rows; more
 * dimensions would rank differently from mergekit. */
static bool della_ranks(const struct ms_stage_job *job) { return job->ndim <= 2; }

/* della: density +- epsilon strictly inside (0, 1), for density in (0, 1). */
static bool della_window_ok(double density, double eps)
{
    return density - eps > 0.0 && density + eps < 1.0;
}

/* ------------------------------------------------------------------------ */
/* State                                                                     */

enum gta_phase { GTA_SELECT, GTA_RESCALE, GTA_APPLY };

struct gta_model {
    uint32_t input;       /* index of this model's tensor in ms_chunk.in; RNG model id */
    int32_t slot;         /* first of kind_nsel histogram / partial slots, -1 when none */
    int32_t bit;          /* della: keep bit among the trimmed models, -1 when none */
    float w;              /* W = rnd(weight) */
    float factor;         /* rescale: rnd(before/after) in the work dtype */
    float p;              /* random: keep probability; della: that of a one-element row */
    float lo, eps;        /* della: float32(density - epsilon), float32(epsilon) */
    bool trim;            /* a mask applies */
    bool none;            /* the mask keeps nothing (breadcrumbs n_top == 0, della density <= 0) */
    bool scale;           /* the rescale factor applies */
    struct ms__sel sel[2]; /* magnitude: sel[0]; outliers: top(n - n_bot), top(n_top) */
};

/* Set by begin and end_pass (loop thread); read-only for reduce and apply,
 * except what fold writes (sel tie locators, hist, sums), which they never read. */
struct gta_state {
    struct gta_kind kind;
    enum ms_dtype dt;
    enum ms_dtype wdt;    /* work dtype of the random masks and their rescale (2.1.4) */
    uint32_t phase;       /* enum gta_phase */
    uint32_t base;        /* input index of the base */
    uint32_t nm;          /* models other than the base */
    uint32_t nslots;      /* histogram slots */
    uint32_t nbits;       /* della: models with a keep bit */
    uint32_t ib;          /* della: bits of a row index in the apply scratch */
    bool kept;            /* della: the rescale pass set the keep bits in the chunks'
                             keep areas, when they have one (della_reduce) */
    bool rescale, normalize, use_lambda;
    float lambda;         /* float32(lambda) */
    float div;            /* without consensus: the scalar divisor */
    float rank_den;       /* della: rnd(max_rank - min_rank) of a row */
    uint64_t row;         /* della: elements per ranked row */
    uint64_t seed, key;   /* random stream of this tensor */
    size_t hist_len;      /* uint64 entries per slot in hist */
    size_t psize;         /* bytes of one partial */
    struct gta_model m[MS_MAX_INPUTS];
    struct ms_xacc before[MS_MAX_INPUTS], after[MS_MAX_INPUTS]; /* by model */
    uint64_t hist[];      /* nslots * hist_len */
};

/* Partial of a SELECT pass: tie counts, then per-chunk histograms. */
struct gta_part_select {
    uint64_t ties[2 * MS_MAX_INPUTS]; /* by slot */
    uint32_t hist[];                  /* nslots * hist_len */
};
/* Partial of a RESCALE pass. */
struct gta_part_rescale {
    struct ms_xacc before[MS_MAX_INPUTS], after[MS_MAX_INPUTS]; /* by model */
    uint32_t scratch[];               /* della: one row's sort words */
};

static int param_index(const struct ms_stage_job *job, const char *name)
{
    return job->method ? ms_method_param(job->method, name) : -1;
}

/* Histogram slots: kind_nsel per non-base input with density < 1. begin
 * assigns slots in the same order. */
static uint32_t gta_nslots(const struct ms_stage_job *job, const struct gta_kind *kind)
{
    int id = param_index(job, "density");
    if (kind_nsel(kind) == 0 || id < 0)
        return 0;
    uint32_t n = 0;
    for (uint32_t i = 0; i < job->ninputs && i < MS_MAX_INPUTS; i++)
        n += (int)i != job->base && job->pv[i][id] < 1.0;
    return n * kind_nsel(kind);
}

static size_t gta_state_size(const struct ms_stage_job *job)
{
    const struct gta_kind *kind = gta_kind_of(job);
    size_t len = kind_nsel(kind) ? ms__sel_hist_len(job->compute) : 0;
    return sizeof(struct gta_state) + (size_t)gta_nslots(job, kind) * len * sizeof(uint64_t);
}

static size_t gta_partial_size(const struct ms_stage_job *job)
{
    const struct gta_kind *kind = gta_kind_of(job);
    if (kind->sparse == GTA_SPARSE_NONE)
        return 0;
    uint32_t ns = gta_nslots(job, kind);
    size_t sel = ns ? sizeof(struct gta_part_select) +
                          (size_t)ns * ms__sel_hist_len(job->compute) * sizeof(uint32_t)
                    : 0;
    size_t resc = sizeof(struct gta_part_rescale);
    if (kind->sparse == GTA_SPARSE_DELLA)
        resc += (size_t)job->row_len * sizeof(uint32_t);
    return MS_MAX(sel, resc);
}

/* ------------------------------------------------------------------------ */
/* Leaf kernels. Each body is specialised on the dtype through an            */
/* always-inline helper and one switch per call, so rounding inlines.        */

#define GTA_INLINE MS__AI

static void gta_delta(enum ms_dtype dt, float *restrict d, const float *restrict x,
                      const float *restrict b, size_t n)
{
#define CALL(t) ms__k_sub(t, d, x, b, n) /* d = rnd(x - b) */
    MS__DT_DISPATCH(dt, CALL);
#undef CALL
}

/*
 * Where a pass reads its inputs: a chunk's floats (the float path), or its
 * bytes as stored in sdt, BF16 or F16 (the stored path: ms_chunk_stored).
 * in[i] is input i's element 0 of the chunk. The passes take every delta
 * from gta_src_delta, so both give the same deltas, hence the same partials.
 */
struct gta_src {
    const void *in[MS_MAX_INPUTS];
    enum ms_dtype sdt;            /* MS_DT_NONE: floats */
};

/* d = rnd(bf16(x) - bf16(b)) in compute dtype dt: the decode of a bfloat16
 * element is its float's top half, exactly as ms_dtype_decode's. */
GTA_INLINE void delta_bf16_body(enum ms_dtype dt, float *restrict d, const uint16_t *restrict x,
                                const uint16_t *restrict b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        d[i] = ms_rnd(dt, ms_f32_from_bits((uint32_t)x[i] << 16) -
                              ms_f32_from_bits((uint32_t)b[i] << 16));
}

/* d[0..n) = the deltas rnd(x - b) of input `input` at elements [off, off + n)
 * of the chunk, in the compute dtype st->dt: gta_delta on the floats, or on
 * the stored bytes decoded as the engine decodes them (ms_dtype_decode). */
static void gta_src_delta(const struct gta_state *st, const struct gta_src *src, uint32_t input,
                          uint64_t off, float *restrict d, size_t n)
{
    if (src->sdt == MS_DT_NONE) {
        gta_delta(st->dt, d, (const float *)src->in[input] + off,
                  (const float *)src->in[st->base] + off, n);
        return;
    }
    const uint16_t *x = (const uint16_t *)src->in[input] + off;
    const uint16_t *b = (const uint16_t *)src->in[st->base] + off;
    for (size_t o = 0, k; o < n; o += k) {
        k = MS_MIN((size_t)GTA_BLOCK, n - o);
        if (src->sdt == MS_DT_BF16) {
#define CALL(t) MS__BLOCK_CALL(delta_bf16_body, k, GTA_BLOCK, t, d + o, x + o, b + o)
            MS__DT_DISPATCH(st->dt, CALL);
#undef CALL
        } else {
            float fx[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
            float fb[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
            ms_dtype_decode(src->sdt, x + o, fx, k);
            ms_dtype_decode(src->sdt, b + o, fb, k);
            gta_delta(st->dt, d + o, fx, fb, k);
        }
    }
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
    MS__DT_DISPATCH(dt, CALL);
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
    MS__DT_DISPATCH(dt, CALL);
#undef CALL
}

/* Scalars of the final combination. */
struct gta_fin {
    bool normalize, use_lambda;
    float lambda, div;
};

/* out = rnd(b + post(mixed)): normalize by div (per element, or p->div when
 * div is NULL), then lambda; mixed is overwritten. One loop per step, so the
 * loops vectorise. Where b and mixed are both NaN, b's is kept, quieted
 * (ms__add_first), whatever operand order the compiler gives the add: the
 * float and stored paths (gta_apply_stored) inline this into different code. */
GTA_INLINE void finish_body(enum ms_dtype dt, const struct gta_fin *p, const float *restrict b,
                            float *restrict mixed, const float *restrict div,
                            float *restrict out, size_t n)
{
    if (p->normalize && div) {
        for (size_t i = 0; i < n; i++)
            mixed[i] = ms_rnd(dt, mixed[i] / div[i]);
    } else if (p->normalize) {
        const float d = p->div;
        for (size_t i = 0; i < n; i++)
            mixed[i] = ms_rnd(dt, mixed[i] / d);
    }
    if (p->use_lambda) {
        const float l = p->lambda;
        for (size_t i = 0; i < n; i++)
            mixed[i] = ms_rnd(dt, mixed[i] * l);
    }
    for (size_t i = 0; i < n; i++) /* b's NaN when both are NaN: torch's base + mixed */
        out[i] = ms_rnd(dt, ms__add_first(b[i], mixed[i]));
}

/* Without consensus: mixed = rnd(sum_j wd[j]), scalar divisor. The sums run
 * model by model over the block (the same additions per element, in model
 * order), so the element loops vectorise. */
GTA_INLINE void combine_sum_body(enum ms_dtype dt, const struct gta_fin *p, uint32_t nm,
                                 const float (*restrict wd)[GTA_BLOCK], const float *restrict b,
                                 float *restrict out, size_t n)
{
    float s[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    for (size_t i = 0; i < n; i++)
        s[i] = 0.0f;
    for (uint32_t j = 0; j < nm; j++)
        for (size_t i = 0; i < n; i++)
            s[i] = ms__acc_add(s[i], wd[j][i]);
    for (size_t i = 0; i < n; i++)
        s[i] = ms_rnd(dt, s[i]);
    finish_body(dt, p, b, s, NULL, out, n);
}

/* TIES "sum" consensus: majority sign maj of rnd(sum wd); models whose
 * weighted delta has that sign (v * maj > 0: a zero or NaN has none) form
 * mixed and the divisor. Model by model over the block, as combine_sum_body. */
GTA_INLINE void combine_ties_body(enum ms_dtype dt, const struct gta_fin *p, uint32_t nm,
                                  const float (*restrict wd)[GTA_BLOCK], const float *restrict w,
                                  const float *restrict b, float *restrict out, size_t n)
{
    float maj[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float mixed[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float div[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    for (size_t i = 0; i < n; i++)
        maj[i] = 0.0f;
    for (uint32_t j = 0; j < nm; j++)
        for (size_t i = 0; i < n; i++)
            maj[i] += wd[j][i];
    for (size_t i = 0; i < n; i++) {
        maj[i] = ms_rnd(dt, maj[i]) >= 0.0f ? 1.0f : -1.0f; /* NaN: -1, as (S >= 0)*2 - 1 */
        mixed[i] = 0.0f;
        div[i] = 0.0f;
    }
    for (uint32_t j = 0; j < nm; j++) {
        const float wj = w[j];
        for (size_t i = 0; i < n; i++) {
            float v = wd[j][i];
            float mk = v * maj[i] > 0.0f ? 1.0f : 0.0f; /* exact: maj is +-1 */
            mixed[i] = ms__acc_add(mixed[i], v * mk);
            div[i] = ms__acc_add(div[i], wj * mk);
        }
    }
    for (size_t i = 0; i < n; i++) {
        float d = ms_rnd(dt, div[i]);
        div[i] = d == 0.0f ? 1.0f : d;
        mixed[i] = ms_rnd(dt, mixed[i]);
    }
    finish_body(dt, p, b, mixed, div, out, n);
}

static void gta_combine(enum ms_dtype dt, const struct gta_fin *p, bool consensus, uint32_t nm,
                        const float (*restrict wd)[GTA_BLOCK], const float *restrict w,
                        const float *restrict b, float *restrict out, size_t n)
{
    if (consensus) {
#define CALL(t) combine_ties_body(t, p, nm, wd, w, b, out, n)
        MS__DT_DISPATCH(dt, CALL);
#undef CALL
    } else {
#define CALL(t) combine_sum_body(t, p, nm, wd, b, out, n)
        MS__DT_DISPATCH(dt, CALL);
#undef CALL
    }
}

/* ------------------------------------------------------------------------ */
/* Masks                                                                     */

/* random: keep[i] = u < p for the elements first..first+n-1 of one model. */
static void keep_random(uint64_t stream, float p, uint64_t first, float *restrict keep, size_t n)
{
    uint32_t u[GTA_BLOCK];
    assert(n <= GTA_BLOCK);
    ms_rng_fill(stream, first, u, n);
    for (size_t i = 0; i < n; i++)
        keep[i] = (float)(u[i] & 0xffffffu) * 0x1p-24f < p ? 1.0f : 0.0f;
}

/* masked[i] = d[i] * keep[i]: torch's masked delta, whose magnitudes the
 * rescale's "after" sum adds (a dropped Inf or NaN gives NaN there, as in
 * torch; a dropped finite value gives a zero, which adds nothing). */
GTA_INLINE void masked_body(const float *restrict d, const float *restrict keep,
                            float *restrict masked, size_t n)
{
    for (size_t i = 0; i < n; i++)
        masked[i] = d[i] * keep[i];
}

/*
 * keep[] for n deltas d of model m starting at element `first` of the chunk
 * that starts at chunk_first (magnitude, outliers, random; not della). Calls
 * for one chunk go in element order; run[2] carries the selections' tie counts.
 */
static void gta_keep(const struct gta_state *st, const struct gta_model *m, uint64_t chunk_first,
                     uint64_t first, uint64_t *run, const float *restrict d, float *restrict keep,
                     size_t n)
{
    float top[GTA_BLOCK];
    assert(n <= GTA_BLOCK);
    if (m->none) {
        memset(keep, 0, n * sizeof(float));
        return;
    }
    switch (st->kind.sparse) {
    case GTA_SPARSE_MAGNITUDE:
        ms__sel_mask(&m->sel[0], chunk_first, &run[0], d, keep, n);
        break;
    case GTA_SPARSE_OUTLIERS:
        ms__sel_mask(&m->sel[0], chunk_first, &run[0], d, keep, n);
        ms__sel_mask(&m->sel[1], chunk_first, &run[1], d, top, n);
        for (size_t i = 0; i < n; i++)
            keep[i] = top[i] != 0.0f ? 0.0f : keep[i];
        break;
    case GTA_SPARSE_RANDOM:
        keep_random(ms_rng_stream(st->seed, st->key, m->input), m->p, first, keep, n);
        break;
    default:
        assert(!"della masks come from the row scratch");
        break;
    }
}

/* della: p of the 1-based rank r in a row, in the work dtype w, in mergekit's
 * order: rank = rnd(rnd(r-1) + 1), rn = clamp(rnd(rnd(rank - 1) / den), 0, 1),
 * p = rnd(lo + rnd(rnd(rn*2) * eps)). min_rank is 1 in every dtype. */
static float della_p(const struct gta_state *st, const struct gta_model *m, uint64_t r)
{
    enum ms_dtype w = st->wdt;
    if (st->row == 1)
        return m->p; /* 0/0 in mergekit: see the top of the file */
    float rank = ms_rnd(w, ms_rnd(w, (float)(r - 1)) + 1.0f);
    float rn = ms_rnd(w, ms_rnd(w, rank - 1.0f) / st->rank_den);
    rn = rn < 0.0f ? 0.0f : (rn > 1.0f ? 1.0f : rn);
    float t = ms_rnd(w, rn * 2.0f);
    t = ms_rnd(w, t * m->eps);
    return ms_rnd(w, m->lo + t);
}

/* della row ranking. A row's sort words live in caller scratch (uint32 each,
 * accessed with memcpy: in apply they alias the float output). The low bits
 * (mask) hold a row index; heapsort orders them by (key of |d|, index), which
 * is a stable ascending sort of |d|. */
struct della_row {
    enum ms_dtype dt;
    const float *x, *b;           /* the model's and the base's row */
    unsigned char *words;         /* row_len uint32 */
    uint32_t mask;                /* index field */
};

static inline uint32_t word_get(const unsigned char *w, uint64_t i)
{
    uint32_t v;
    memcpy(&v, w + 4 * i, 4);
    return v;
}
static inline void word_put(unsigned char *w, uint64_t i, uint32_t v) { memcpy(w + 4 * i, &v, 4); }

static inline uint32_t row_idx(const struct della_row *r, uint64_t pos)
{
    return word_get(r->words, pos) & r->mask;
}
static inline void row_set_idx(const struct della_row *r, uint64_t pos, uint32_t idx)
{
    word_put(r->words, pos, (word_get(r->words, pos) & ~r->mask) | idx);
}
static inline uint32_t row_key(const struct della_row *r, uint32_t idx)
{
    return ms__sel_key(r->dt, ms_rnd(r->dt, r->x[idx] - r->b[idx]));
}

static void row_sift(const struct della_row *r, uint64_t root, uint64_t n)
{
    uint32_t v = row_idx(r, root), kv = row_key(r, v);
    for (;;) {
        uint64_t child = 2 * root + 1;
        if (child >= n)
            break;
        uint32_t c = row_idx(r, child), kc = row_key(r, c);
        if (child + 1 < n) {
            uint32_t c2 = row_idx(r, child + 1), k2 = row_key(r, c2);
            if (kc < k2 || (kc == k2 && c < c2)) {
                child++;
                c = c2;
                kc = k2;
            }
        }
        if (!(kv < kc || (kv == kc && v < c)))
            break;
        row_set_idx(r, root, c);
        root = child;
    }
    row_set_idx(r, root, v);
}

/* Sets the index fields of the row's words to 0..n-1 and sorts them. */
static void row_rank(const struct della_row *r, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        row_set_idx(r, i, (uint32_t)i);
    for (uint64_t i = n / 2; i-- > 0;)
        row_sift(r, i, n);
    for (uint64_t end = n; end-- > 1;) {
        uint32_t top = row_idx(r, 0);
        row_set_idx(r, 0, row_idx(r, end));
        row_set_idx(r, end, top);
        row_sift(r, 0, end);
    }
}

/* della keep decision of the element at row index idx with 1-based rank. */
static inline bool della_keep(const struct gta_state *st, const struct gta_model *m,
                              uint64_t element, uint64_t rank)
{
    uint32_t u = ms_rng_u32(st->seed, st->key, m->input, element);
    return (float)(u & 0xffffffu) * 0x1p-24f < della_p(st, m, rank);
}

/*
 * della with 16-bit keys (bf16, f16: ms__sel_key < 2^15): the ranks of a row by
 * counting, in index order, without sorting. rank(i) = 1 + #{j: key_j < key_i}
 * + #{j < i: key_j == key_i}: the position of i in the stable ascending sort
 * of row_rank, so the masks are the same. One pass counts the keys and finds
 * the smallest nonzero and the largest (vector min/max in the key loop); then
 * the counts of the coarse buckets (128 keys: one binade) from the smallest's
 * to the largest's, and of bucket 0 (zeros and subnormals), become start
 * positions, and the second pass ranks by a post-increment. Only the keys
 * present need a start position, so groups of DELLA_GROUP counts that are all
 * zero are skipped (a row of 2048 bf16 deltas holds about 300 distinct keys
 * over some 10 binades). Cost O(L + 128 / DELLA_GROUP * buckets spanned +
 * keys met) per row. The table lives per thread and is left zero after each
 * row.
 * For rows of up to DELLA_PTAB elements the first pass leaves the row's keys
 * in row[], and the ranking turns them into their keep thresholds in place,
 * so the keys are made once and each loop is a plain pass over the row.
 * (Counting in 2 to 8 interleaved segments of the row, to break the chains of
 * increments of one count, was slower: the start positions and the clearing
 * grow with the segments.)
 */
#define DELLA_KEYS 32768u
#define DELLA_FINE 128u /* keys per coarse bucket */
#define DELLA_GROUP 16u
#define DELLA_PTAB 16384u /* della_ptab below */

struct della_count {
    uint32_t fine[DELLA_KEYS];
    uint32_t row[DELLA_PTAB];
};

static _Thread_local struct della_count della_tls;

/*
 * The random rule u < p of della_keep on the 24 bits u24 = u & 0xffffff, as an
 * integer compare: (float)u24 * 2^-24 is exact, and so is p * 2^24 in double,
 * so u24 * 2^-24 < p iff u24 < p * 2^24 iff u24 < ceil(p * 2^24) (u24 is an
 * integer). p is in [0, 1] (della_window_ok), so the threshold is in [0, 2^24].
 */
static uint32_t della_thr(float p)
{
    return (uint32_t)ceil((double)p * 16777216.0);
}

/* della_thr(della_p) by rank for rows of up to DELLA_PTAB elements, cached per
 * thread for a few (dtype, row, rank_den, lo, eps) at once (apply alternates
 * models row by row). Each entry is della_p's own value's threshold: the table
 * changes no bit. */
#define DELLA_PCACHE 4u

struct della_ptab {
    bool valid;
    enum ms_dtype wdt;
    uint64_t row;
    float den, lo, eps, p;
    uint32_t thr[DELLA_PTAB];
};

static _Thread_local struct della_ptab della_ptabs[DELLA_PCACHE];
static _Thread_local uint32_t della_pnext;

static const uint32_t *della_ptab_get(const struct gta_state *st, const struct gta_model *m)
{
    if (st->row > DELLA_PTAB)
        return NULL;
    for (uint32_t i = 0; i < DELLA_PCACHE; i++) {
        const struct della_ptab *t = &della_ptabs[i];
        if (t->valid && t->wdt == st->wdt && t->row == st->row && t->den == st->rank_den &&
            t->lo == m->lo && t->eps == m->eps && t->p == m->p)
            return t->thr;
    }
    struct della_ptab *t = &della_ptabs[della_pnext++ % DELLA_PCACHE];
    *t = (struct della_ptab){ .valid = true, .wdt = st->wdt, .row = st->row,
                              .den = st->rank_den, .lo = m->lo, .eps = m->eps, .p = m->p };
    for (uint64_t r = 1; r <= st->row; r++)
        t->thr[r - 1] = della_thr(della_p(st, m, r));
    return t->thr;
}

/* Rows long enough that counting beats the heap sort (same ranks either way). */
static bool della_counts(const struct gta_state *st)
{
    return st->dt != MS_DT_F32 && st->row >= 512;
}

/* d[i] = rnd(x[i] - b[i]) and keys[i] = ms__sel_key(dt, d[i]): the leaf loop
 * of della's ranking (vectorises; the counting that uses the keys cannot). */
GTA_INLINE void della_keys_body(enum ms_dtype dt, const float *restrict x,
                                const float *restrict b, float *restrict d,
                                uint32_t *restrict keys, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        d[i] = ms_rnd(dt, x[i] - b[i]);
        keys[i] = ms__sel_key(dt, d[i]);
    }
}

static void della_keys(enum ms_dtype dt, const float *restrict x, const float *restrict b,
                       float *restrict d, uint32_t *restrict keys, size_t n)
{
#define CALL(t) della_keys_body(t, x, b, d, keys, n)
    MS__DT_DISPATCH(dt, CALL);
#undef CALL
}

/* della_keys_body, and lo = min(lo, key - 1) (unsigned: a zero key gives
 * UINT32_MAX, so lo + 1 is the smallest nonzero key), hi = max(hi, key). */
GTA_INLINE void della_keys_range_body(enum ms_dtype dt, const float *restrict x,
                                      const float *restrict b, float *restrict d,
                                      uint32_t *restrict keys, uint32_t *lo, uint32_t *hi, size_t n)
{
    uint32_t l = *lo, h = *hi;
    for (size_t i = 0; i < n; i++) {
        d[i] = ms_rnd(dt, x[i] - b[i]);
        uint32_t k = ms__sel_key(dt, d[i]);
        keys[i] = k;
        l = MS_MIN(l, k - 1u);
        h = MS_MAX(h, k);
    }
    *lo = l;
    *hi = h;
}

static void della_keys_range(enum ms_dtype dt, const float *restrict x, const float *restrict b,
                             float *restrict d, uint32_t *restrict keys, uint32_t *lo, uint32_t *hi,
                             size_t n)
{
#define CALL(t) MS__BLOCK_CALL(della_keys_range_body, n, GTA_BLOCK, t, x, b, d, keys, lo, hi)
    MS__DT_DISPATCH(dt, CALL);
#undef CALL
}

/*
 * della_keepmask: the keep decisions of n elements, branch-free: element i is
 * kept iff (u[i] & 0xffffff) < thr[i] (della_thr). With words, ORs bit into
 * words[i] (uint32, memcpy access; with packed, the byte words[i]) of the
 * kept elements; with kept, sets
 * kept[i] = d[i] * keep (1 or 0): torch's masked delta, whose magnitudes the
 * rescale's "after" sum adds (a dropped Inf or NaN gives NaN, a dropped finite
 * value a zero, which adds nothing). Either may be NULL. The scalar reference;
 * the SIMD versions are its callers' MS__ISA_VERSIONS (della_mark_row_isa,
 * della_reduce_isa), which inline it.
 */
GTA_INLINE void della_keepmask_words(const uint32_t *restrict u, const uint32_t *restrict thr,
                                     uint32_t bit, unsigned char *restrict words, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t mk = 0u - (uint32_t)((u[i] & 0xffffffu) < thr[i]);
        word_put(words, i, word_get(words, i) | (bit & mk));
    }
}

GTA_INLINE void della_keepmask_bytes(const uint32_t *restrict u, const uint32_t *restrict thr,
                                     uint32_t bit, unsigned char *restrict bytes, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t mk = 0u - (uint32_t)((u[i] & 0xffffffu) < thr[i]);
        bytes[i] = (unsigned char)(bytes[i] | (bit & mk));
    }
}

GTA_INLINE void della_keepmask_kept(const uint32_t *restrict u, const uint32_t *restrict thr,
                                    const float *restrict d, float *restrict kept, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t mk = 0u - (uint32_t)((u[i] & 0xffffffu) < thr[i]);
        kept[i] = d[i] * ms_f32_from_bits(0x3f800000u & mk); /* d * 1.0f or d * 0.0f */
    }
}

GTA_INLINE void della_keepmask(const uint32_t *restrict u, const uint32_t *restrict thr,
                               const float *restrict d, uint32_t bit, unsigned char *words,
                               bool packed, float *restrict kept, size_t n)
{
    if (words && packed)
        MS__BLOCK_CALL(della_keepmask_bytes, n, GTA_BLOCK, u, thr, bit, words);
    else if (words)
        MS__BLOCK_CALL(della_keepmask_words, n, GTA_BLOCK, u, thr, bit, words);
    if (kept)
        MS__BLOCK_CALL(della_keepmask_kept, n, GTA_BLOCK, u, thr, d, kept);
}

/*
 * della_row_counted's "before" from its key counts. A 16-bit key k of dt
 * (bf16: 8 exponent and 7 mantissa bits; f16: 5 and 10) is the magnitude
 * m(k) * q with m(k) the mantissa with its hidden bit (an integer below 2^11)
 * and q = 2^(max(e, 1) - bias - mantissa bits) the same for every key of a
 * coarse bucket (one exponent e). The sum of count * m(k) over a bucket is an
 * integer below 2^31 * 2^11 (the row length L < 2^31: begin), so S * q is
 * exact in double, with at most 42 significant bits: hi = (float)(S * q) and
 * lo = S * q - hi (at most 18 significant bits) are floats for ms_xacc_add,
 * and their sum is the bucket's exact sum of |d|. The last exponent (Inf,
 * NaN) adds each key met as it is.
 */
static inline uint32_t della_mbits(enum ms_dtype dt) { return dt == MS_DT_BF16 ? 7u : 10u; }

/* The exponent field of key k (all ones: Inf or NaN). */
static inline uint32_t della_kexp(enum ms_dtype dt, uint32_t k) { return k >> della_mbits(dt); }

static inline bool della_kspecial(enum ms_dtype dt, uint32_t k)
{
    return della_kexp(dt, k) == (dt == MS_DT_BF16 ? 255u : 31u);
}

/* Adds S * q (above) for the keys of exponent e, their count cnt and the sum
 * mant of count * (key's mantissa bits) to a. */
static void della_add_bucket(struct ms_xacc *a, enum ms_dtype dt, uint32_t e, uint64_t cnt,
                             uint64_t mant)
{
    const uint32_t mb = della_mbits(dt);
    const int bias = dt == MS_DT_BF16 ? 127 : 15;
    uint64_t S = mant + (e ? cnt << mb : 0);
    double v = ldexp((double)S, (int)(e ? e : 1) - bias - (int)mb);
    float hi = (float)v;
    ms_xacc_add(a, hi);
    ms_xacc_add(a, (float)(v - (double)hi));
}

/* The counts of coarse bucket c of t become start positions from *pos on
 * (advanced past them); with before, adds their exact sum of |d|
 * (della_add_bucket; Inf and NaN keys as they are). */
static inline void della_starts(struct della_count *t, enum ms_dtype dt, uint32_t c, uint32_t *pos,
                                struct ms_xacc *before)
{
    const uint32_t kc = c * DELLA_FINE, pos0 = *pos;
    const uint32_t mmask = (1u << della_mbits(dt)) - 1;
    const bool special = della_kspecial(dt, kc);
    uint32_t p = *pos;
    uint64_t mant = 0; /* sum of count * mantissa bits */
    if (before && special)
        for (uint32_t f = kc; f < kc + DELLA_FINE; f++)
            if (t->fine[f])
                ms_xacc_add(before, ms__sel_key_value(dt, f)); /* Inf, NaN */
    for (uint32_t g = 0; g < DELLA_FINE; g += DELLA_GROUP) {
        uint32_t *grp = &t->fine[kc + g];
        uint32_t any = 0;
        for (uint32_t q = 0; q < DELLA_GROUP; q++)
            any |= grp[q];
        if (!any)
            continue;
        for (uint32_t q = 0; q < DELLA_GROUP; q++) {
            uint32_t w = grp[q];
            grp[q] = p;
            p += w;
            mant += (uint64_t)w * ((kc + g + q) & mmask);
        }
    }
    *pos = p;
    if (before && !special && p != pos0)
        della_add_bucket(before, dt, della_kexp(dt, kc), p - pos0, mant);
}

/*
 * The keep decisions of model m on the row of L elements x, b (elements
 * first..first+L-1 of the tensor), in index order: with words, ORs bit into
 * words[i] of kept elements (uint32 words; with packed, bytes); with before
 * and after, adds every |d| to before (from the key counts: count * magnitude
 * per key, the same exact sum) and |d * keep| to after (della_keepmask_kept: a
 * dropped Inf or NaN makes it NaN, as torch's masked sum). Either or both.
 */
static void della_row_counted(const struct gta_state *st, const struct gta_model *m,
                              const float *restrict x, const float *restrict b, uint64_t first,
                              uint64_t L, unsigned char *words, bool packed, uint32_t bit,
                              struct ms_xacc *before, struct ms_xacc *after)
{
    struct della_count *t = &della_tls;
    const enum ms_dtype dt = st->dt;
    const uint64_t stream = ms_rng_stream(st->seed, st->key, m->input);
    const uint32_t *ttab = della_ptab_get(st, m);
    uint32_t *restrict row = ttab ? t->row : NULL; /* keys, then thresholds */
    uint32_t keys[GTA_BLOCK], u[GTA_BLOCK], thr[GTA_BLOCK];
    float d[GTA_BLOCK], kept[GTA_BLOCK];
    uint32_t lo = UINT32_MAX, hi = 0;
    for (uint64_t i0 = 0; i0 < L; i0 += GTA_BLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)GTA_BLOCK, L - i0);
        della_keys_range(dt, x + i0, b + i0, d, row ? row + i0 : keys, &lo, &hi, n);
        if (row)
            continue;
        for (size_t j = 0; j < n; j++) {
            uint32_t k = keys[j];
            assert(k < DELLA_KEYS);
            t->fine[k]++;
        }
    }
    if (row)
        for (uint64_t i = 0; i < L; i++) {
            assert(row[i] < DELLA_KEYS);
            t->fine[row[i]]++;
        }
    /* fine[k] = #{keys < k} for the keys met (start positions), bucket 0 and
     * then the buckets of the nonzero keys; before gets each bucket's exact
     * sum of |d| */
    const uint32_t c1 = lo == UINT32_MAX ? 1 : MS_MAX((lo + 1) / DELLA_FINE, 1u);
    const uint32_t c2 = lo == UINT32_MAX ? 0 : hi / DELLA_FINE;
    uint32_t pos = 0;
    della_starts(t, dt, 0, &pos, before);
    for (uint32_t c = c1; c <= c2; c++)
        della_starts(t, dt, c, &pos, before);
    assert(pos == L);
    if (row) /* thresholds in place of the keys: ttab[rank - 1] */
        for (uint64_t i = 0; i < L; i++)
            row[i] = ttab[t->fine[row[i]]++];
    for (uint64_t i0 = 0; i0 < L; i0 += GTA_BLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)GTA_BLOCK, L - i0);
        ms_rng_fill(stream, first + i0, u, n);
        const uint32_t *th = thr;
        if (row) {
            th = row + i0;
            if (before)
                gta_delta(dt, d, x + i0, b + i0, n);
        } else {
            della_keys(dt, x + i0, b + i0, d, keys, n);
            for (size_t j = 0; j < n; j++)
                thr[j] = della_thr(della_p(st, m, ++t->fine[keys[j]]));
        }
        unsigned char *w = words ? words + (packed ? 1 : 4) * i0 : NULL;
        della_keepmask(u, th, d, bit, w, packed, before ? kept : NULL, n);
        if (before)
            ms_xacc_sumabs(after, kept, n);
    }
    memset(t->fine, 0, DELLA_FINE * sizeof(t->fine[0]));
    if (c1 <= c2)
        memset(&t->fine[c1 * DELLA_FINE], 0, (c2 - c1 + 1) * DELLA_FINE * sizeof(t->fine[0]));
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
        any |= st->m[j].trim && !st->m[j].none;
    if (st->rescale && any) {
        st->phase = GTA_RESCALE;
        return MS_STAGE_REDUCE;
    }
    st->phase = GTA_APPLY;
    return MS_STAGE_APPLY;
}

/* Bits of a row index 0..n-1 (at least 1). */
static uint32_t index_bits(uint64_t n)
{
    uint32_t b = 1;
    while (b < 64 && (n - 1) >> b)
        b++;
    return b;
}

static int gta_begin(void *state, const struct ms_stage_job *job)
{
    struct gta_state *st = state;
    const struct gta_kind *kind = gta_kind_of(job);
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
    int ilam = param_index(job, "lambda"), igam = param_index(job, "gamma");
    int ieps = param_index(job, "epsilon");
    if (iw < 0)
        return ms_error(MS_EINVAL, "tensor '%s': %s declares no weight", name, mname);
    if ((kind->sparse == GTA_SPARSE_OUTLIERS && igam < 0) ||
        (kind->sparse == GTA_SPARSE_DELLA && ieps < 0))
        return ms_error(MS_EINVAL, "tensor '%s': %s declares no %s", name, mname,
                        kind->sparse == GTA_SPARSE_DELLA ? "epsilon" : "gamma");

    bool random = kind->sparse == GTA_SPARSE_RANDOM || kind->sparse == GTA_SPARSE_DELLA;
    st->kind = *kind;
    st->dt = dt;
    st->wdt = random && dt != MS_DT_BF16 ? MS_DT_F32 : dt;
    st->base = (uint32_t)job->base;
    st->normalize = inorm >= 0 && job->gv[inorm] != 0.0;
    st->rescale = kind->sparse != GTA_SPARSE_NONE && iresc >= 0 && job->gv[iresc] != 0.0;
    double lambda = ilam >= 0 ? job->gv[ilam] : 1.0;
    st->use_lambda = lambda != 1.0;
    st->lambda = (float)lambda;
    st->seed = job->seed;
    st->key = job->key;
    st->hist_len = kind_nsel(kind) ? ms__sel_hist_len(dt) : 0;
    st->psize = gta_partial_size(job);
    const uint64_t n = job->numel;

    bool select = false;
    for (uint32_t i = 0; i < job->ninputs; i++) {
        if ((int)i == job->base)
            continue;
        struct gta_model *m = &st->m[st->nm++];
        m->input = i;
        m->w = ms_rnd_param(dt, job->pv[i][iw]);
        m->slot = -1;
        m->bit = -1;
        double density = id >= 0 ? job->pv[i][id] : 1.0;
        if (kind->sparse == GTA_SPARSE_NONE || !(density < 1.0))
            continue; /* every sparsifier returns a density >= 1 delta unchanged */
        m->trim = true;
        switch (kind->sparse) {
        case GTA_SPARSE_MAGNITUDE: {
            /* mergekit: k = int(density * numel) in double, asserted > 0. */
            uint64_t k = gta_topk(density, n);
            if (k == 0 && n > 0)
                return ms_error(MS_EPLAN,
                                "tensor '%s': density %g keeps no element of %llu "
                                "(int(density*numel) == 0)",
                                name, density, (unsigned long long)n);
            m->slot = (int32_t)st->nslots++;
            m->trim = k < n;
            ms__sel_init(&m->sel[0], dt, n, k, false);
            select |= ms__sel_phase(&m->sel[0]) != MS__SEL_DONE;
            break;
        }
        case GTA_SPARSE_OUTLIERS: {
            /* target = int(density*n), n_top = int(gamma*n), n_bot = n - target
             * - n_top; n_bot < 0 moves into n_top. Keep ascending [n_bot, n - n_top). */
            int64_t target = (int64_t)(density * (double)n);
            int64_t n_top = (int64_t)(job->pv[i][igam] * (double)n);
            int64_t n_bot = (int64_t)n - target - n_top;
            if (n_bot < 0) {
                n_top += n_bot;
                n_bot = 0;
            }
            m->slot = (int32_t)st->nslots;
            st->nslots += 2;
            if (n_top <= 0) {
                m->none = true; /* mergekit's [n_bot:-0] slice is empty */
                break;
            }
            ms__sel_init(&m->sel[0], dt, n, n - (uint64_t)n_bot, true);
            ms__sel_init(&m->sel[1], dt, n, (uint64_t)n_top, true);
            select |= ms__sel_phase(&m->sel[0]) != MS__SEL_DONE ||
                      ms__sel_phase(&m->sel[1]) != MS__SEL_DONE;
            break;
        }
        case GTA_SPARSE_RANDOM:
            m->p = ms_rnd_param(st->wdt, density);
            break;
        case GTA_SPARSE_DELLA: {
            if (!(density > 0.0)) {
                m->none = true; /* mergekit: density <= 0 gives zeros */
                break;
            }
            double eps = job->pv[i][ieps];
            if (!della_window_ok(density, eps))
                return ms_error(MS_EPLAN,
                                "tensor '%s': %s density %g +/- epsilon %g must lie "
                                "strictly inside (0, 1)",
                                name, mname, density, eps);
            m->lo = (float)(density - eps);
            m->eps = (float)eps;
            m->p = ms_rnd_param(st->wdt, density);
            m->bit = (int32_t)st->nbits++;
            break;
        }
        default:
            break;
        }
    }
    assert(st->nslots == gta_nslots(job, kind));

    /* Without consensus the divisor is one scalar: rnd(sum W), guarded. */
    float s = 0.0f;
    for (uint32_t j = 0; j < st->nm; j++)
        s += st->m[j].w;
    s = ms_rnd(dt, s);
    st->div = fabsf(s) < 1e-8 ? 1.0f : s;

    if (n == 0 || st->nm == 0) {
        st->phase = GTA_APPLY;
        return MS_STAGE_APPLY;
    }
    if (st->nbits > 0) {
        /* della ranks along dim 1 (a 1-D tensor is one row). */
        if (!della_ranks(job))
            return ms_error(MS_EUNSUPPORTED,
                            "tensor '%s': %s on a %u-D tensor (mergekit ranks along dim 1; "
                            "only 1-D and 2-D tensors are supported)",
                            name, mname, job->ndim);
        st->row = job->row_len;
        st->ib = index_bits(st->row);
        if (st->row == 0 || n % st->row != 0 || st->ib + st->nbits > 32)
            return ms_error(MS_EUNSUPPORTED,
                            "tensor '%s': %s rows of %llu elements with %u trimmed models "
                            "exceed the ranking scratch (row index bits + models <= 32)",
                            name, mname, (unsigned long long)st->row, st->nbits);
        enum ms_dtype w = st->wdt;
        float max_rank = ms_rnd(w, ms_rnd(w, (float)(st->row - 1)) + 1.0f);
        st->rank_den = ms_rnd(w, max_rank - 1.0f);
    }
    if (select) {
        st->phase = GTA_SELECT;
        return MS_STAGE_REDUCE;
    }
    return gta_after_select(st);
}

/*
 * della's keep area (ms_stage.h: count * MS_KEEP_BYTES bytes per chunk). With
 * at most 8 models with a keep bit (della_packs), the rescale pass stores one
 * byte per element, model m's keep bit at m->bit, in the last quarter of the
 * chunk's area: element i's byte at 3 * count + i. So reduce clears and
 * writes, and apply reads, a quarter of the bytes (the pages are still all
 * touched where chunk areas are about a huge page, as in the 512M bench: only
 * an engine keep pool of 1 byte per element would save them), and the
 * layout holds where the area is the chunk's output (resident jobs): apply
 * reads a block's bytes before it writes the block's floats, and the floats of
 * elements [0, i) end at byte 4i <= 3 * count + i, element i's byte. With more
 * models, element i's uint32 at byte 4i holds m's bit at ib + m->bit, as the
 * output words of della_mark_row.
 */
static bool della_packs(const struct gta_state *st) { return st->nbits <= 8; }

/* The first keep byte (della_packs) or word of chunk c's keep area. */
static unsigned char *della_keep_start(const struct gta_state *st, const struct ms_chunk *c)
{
    unsigned char *k = c->keep;
    return k && della_packs(st) ? k + 3 * (size_t)c->count : k;
}

/* della rescale pass over one chunk of whole rows: before += |d|, after +=
 * |d * keep| (the kept |d|, and NaN for a dropped Inf or NaN, as torch's
 * masked sum), for model m; words is one row of scratch. With
 * keep (della_keep_start of the chunk's keep area), also sets m's keep bit of
 * each kept element (della_packs above), so that apply reads the masks instead
 * of ranking the rows again. */
static void della_reduce(const struct gta_state *st, const struct gta_model *m,
                         const struct ms_chunk *c, unsigned char *words, unsigned char *keep,
                         struct ms_xacc *before, struct ms_xacc *after)
{
    const float *x = c->in[m->input], *b = c->in[st->base];
    const uint64_t L = st->row;
    const bool packed = della_packs(st);
    const uint32_t bit = 1u << ((packed ? 0 : st->ib) + (uint32_t)m->bit);
    const size_t kb = packed ? 1 : MS_KEEP_BYTES; /* keep bytes per element */
    assert(c->count % L == 0 && m->bit >= 0);
    if (della_counts(st)) {
        /* every |d| into before, every |d * keep| into after */
        for (uint64_t r0 = 0; r0 < c->count; r0 += L)
            della_row_counted(st, m, x + r0, b + r0, c->first + r0, L,
                              keep ? keep + kb * r0 : NULL, packed, bit, before, after);
        return;
    }
    float d[GTA_RBLOCK] __attribute__((aligned(MS_ALIGN)));
    for (uint64_t off = 0; off < c->count; off += GTA_RBLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)GTA_RBLOCK, c->count - off);
        gta_delta(st->dt, d, x + off, b + off, n);
        ms_xacc_sumabs(before, d, n);
    }
    for (uint64_t r0 = 0; r0 < c->count; r0 += L) {
        struct della_row r = { .dt = st->dt, .x = x + r0, .b = b + r0, .words = words,
                               .mask = UINT32_MAX };
        row_rank(&r, L);
        for (uint64_t pos = 0; pos < L; pos++) {
            uint32_t idx = row_idx(&r, pos);
            float v = ms_rnd(st->dt, r.x[idx] - r.b[idx]);
            if (!della_keep(st, m, c->first + r0 + idx, pos + 1)) {
                if (!isfinite(v))
                    ms_xacc_add(after, NAN); /* torch's Inf * 0 or NaN * 0 */
                continue;
            }
            ms_xacc_add(after, fabsf(v));
            if (keep && packed)
                keep[r0 + idx] = (unsigned char)(keep[r0 + idx] | bit);
            else if (keep)
                word_put(keep, r0 + idx, word_get(keep, r0 + idx) | bit);
        }
    }
}

/* The versions of ms_isa.h of della_reduce, as gta_apply_range's. */
MS__ISA_VERSIONS(della_reduce_isa, della_reduce,
                 (const struct gta_state *st, const struct gta_model *m, const struct ms_chunk *c,
                  unsigned char *words, unsigned char *keep, struct ms_xacc *before,
                  struct ms_xacc *after),
                 (st, m, c, words, keep, before, after))

/* The selection of m whose partial histogram selection q folds: breadcrumbs'
 * two selections count the same deltas into the same bins while both are at
 * the same level (and, at F32's second, in the same high bin), so the second
 * folds the first's histogram and none is counted for it. */
static uint32_t gta_hist_of(const struct gta_model *m, uint32_t q)
{
    const struct ms__sel *a = &m->sel[0], *b = &m->sel[1];
    bool same = q == 1 && ms__sel_phase(a) == MS__SEL_HIST && ms__sel_phase(b) == MS__SEL_HIST &&
                a->level == b->level && (a->level == 0 || a->hi == b->hi);
    return same ? 0 : q;
}

/* SELECT pass of model m over chunk c: the deltas of each block once, then
 * the histogram or tie count of each of its unfinished selections. */
static void gta_select_model(const struct gta_state *st, const struct gta_model *m,
                             const struct gta_src *src, uint64_t count,
                             struct gta_part_select *p)
{
    float d[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    const uint32_t nsel = kind_nsel(&st->kind);
    for (uint64_t off = 0; off < count; off += GTA_BLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)GTA_BLOCK, count - off);
        gta_src_delta(st, src, m->input, off, d, n);
        for (uint32_t q = 0; q < nsel; q++) {
            const struct ms__sel *sel = &m->sel[q];
            int32_t slot = m->slot + (int32_t)q;
            switch (ms__sel_phase(sel)) {
            case MS__SEL_HIST:
                if (gta_hist_of(m, q) == q)
                    ms__sel_count(sel, p->hist + (size_t)slot * st->hist_len, d, n);
                break;
            case MS__SEL_TIES:
                p->ties[slot] += ms__sel_count_ties(sel, d, n);
                break;
            default:
                break;
            }
        }
    }
}

/* The versions of ms_isa.h of gta_select_model, as gta_apply_range's. */
MS__ISA_VERSIONS(gta_select_model_isa, gta_select_model,
                 (const struct gta_state *st, const struct gta_model *m,
                  const struct gta_src *src, uint64_t count, struct gta_part_select *p),
                 (st, m, src, count, p))

/*
 * The rescale sums of one model's block from its deltas d and keep (0/1):
 * before += sum |d|, after += sum |d * keep|. The scalar reference sums both
 * streams whole (gta_rescale_sums); with AVX-512 the block is split into its
 * kept and dropped terms (packed in order, vcompressps), summed once each:
 * after takes the kept ones, before the dropped ones and, at the end of the
 * chunk (gta_rescale_chunk), after's limbs too, so every term is summed once
 * instead of twice. The exact sums (ms_xacc) make the limbs the same either
 * way; a dropped Inf or NaN, which makes d * 0 a NaN term of after, is noted in
 * *nf and added to after as one NaN.
 */
GTA_INLINE void gta_rescale_sums(const float *restrict d, const float *restrict keep,
                                 float *restrict masked, size_t n, struct ms_xacc *before,
                                 struct ms_xacc *after)
{
    masked_body(d, keep, masked, n);
    ms_xacc_sumabs(before, d, n);
    ms_xacc_sumabs(after, masked, n);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define GTA_SPLIT 1
/* kept/dropped: n + 16 floats each. Returns the count of kept terms. */
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"))) static inline size_t
gta_split_avx512(const float *restrict d, const float *restrict keep, float *restrict kept,
                 float *restrict dropped, size_t n, bool *nf)
{
    const __m512 zero = _mm512_setzero_ps();
    const __m512i ex = _mm512_set1_epi32(0x7f800000);
    size_t nk = 0, nd = 0, i = 0;
    __mmask16 bad = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(d + i);
        __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(keep + i), zero, _CMP_NEQ_UQ);
        _mm512_storeu_ps(kept + nk, _mm512_maskz_compress_ps(k, v));
        _mm512_storeu_ps(dropped + nd, _mm512_maskz_compress_ps((__mmask16)~k, v));
        unsigned c = (unsigned)__builtin_popcount((unsigned)k);
        nk += c;
        nd += 16 - c;
        bad |= _mm512_mask_cmpeq_epi32_mask((__mmask16)~k,
                                            _mm512_and_si512(_mm512_castps_si512(v), ex), ex);
    }
    for (; i < n; i++) {
        bool k = keep[i] != 0.0f;
        kept[nk] = d[i];
        dropped[nd] = d[i];
        nk += k;
        nd += !k;
        bad |= !k && (ms_f32_bits(d[i]) & 0x7f800000u) == 0x7f800000u;
    }
    *nf |= bad != 0;
    return nk;
}
#else
#define GTA_SPLIT 0
#endif

/* RESCALE pass over chunk c (not della: della_reduce), for every trimmed
 * model: before[j] = sum |d|, after[j] = sum |d * mask| (exact). Block by
 * block, model by model inside a block, so that the base's block is read from
 * memory once for all the models. */
static void gta_rescale_chunk(const struct gta_state *st, const struct gta_src *src,
                              uint64_t first, uint64_t count, struct gta_part_rescale *p)
{
    float rd[GTA_RBLOCK] __attribute__((aligned(MS_ALIGN)));
    float keep[GTA_RBLOCK] __attribute__((aligned(MS_ALIGN)));
    float kept[GTA_RBLOCK + 16] __attribute__((aligned(MS_ALIGN)));
    float dropped[GTA_RBLOCK + 16] __attribute__((aligned(MS_ALIGN)));
    uint64_t run[MS_MAX_INPUTS][2];
    bool nf[MS_MAX_INPUTS] = { false };
    const bool split = GTA_SPLIT && ms_isa_active() == MS_ISA_AVX512;
    memset(run, 0, sizeof run);
    /* keep[] in GTA_BLOCK pieces; a model's masks in element order (run[j]:
     * its selections' tie counts). */
    for (uint64_t off = 0; off < count; off += GTA_RBLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)GTA_RBLOCK, count - off);
        for (uint32_t j = 0; j < st->nm; j++) {
            const struct gta_model *m = &st->m[j];
            if (!m->trim || m->none)
                continue;
            gta_src_delta(st, src, m->input, off, rd, n);
            for (size_t o = 0; o < n; o += GTA_BLOCK) {
                size_t k = MS_MIN((size_t)GTA_BLOCK, n - o);
                gta_keep(st, m, first, first + off + o, run[j], rd + o, keep + o, k);
            }
#if GTA_SPLIT
            if (split) {
                size_t nk = gta_split_avx512(rd, keep, kept, dropped, n, &nf[j]);
                ms_xacc_sumabs(&p->after[j], kept, nk);
                ms_xacc_sumabs(&p->before[j], dropped, n - nk);
                continue;
            }
#endif
            gta_rescale_sums(rd, keep, kept, n, &p->before[j], &p->after[j]);
        }
    }
    if (!split)
        return;
    static const float nan_term = NAN;
    for (uint32_t j = 0; j < st->nm; j++) { /* before: the dropped terms, then the kept */
        ms_xacc_merge(&p->before[j], &p->after[j]);
        if (nf[j])
            ms_xacc_sumabs(&p->after[j], &nan_term, 1);
    }
}

/* The versions of ms_isa.h of gta_rescale_chunk, as gta_apply_range's
 * (elementwise rounding, integer masks and ranks: no value changes). */
MS__ISA_VERSIONS(gta_rescale_chunk_isa, gta_rescale_chunk,
                 (const struct gta_state *st, const struct gta_src *src, uint64_t first,
                  uint64_t count, struct gta_part_rescale *p),
                 (st, src, first, count, p))

/* A SELECT pass, or a RESCALE pass but della's, over the chunk
 * [first, first + count) whose inputs src holds. */
static void gta_reduce_src(const struct gta_state *st, const struct gta_src *src, uint64_t first,
                           uint64_t count, void *partial)
{
    assert(count < ((uint64_t)1 << 32)); /* uint32 histogram counts */
    memset(partial, 0, st->psize);
    if (st->phase == GTA_SELECT) {
        struct gta_part_select *p = partial;
        for (uint32_t j = 0; j < st->nm; j++)
            if (st->m[j].slot >= 0 && !st->m[j].none)
                gta_select_model_isa(st, &st->m[j], src, count, p);
        return;
    }
    assert(st->phase == GTA_RESCALE && st->kind.sparse != GTA_SPARSE_DELLA);
    struct gta_part_rescale *p = partial;
    for (uint32_t j = 0; j < st->nm; j++) {
        ms_xacc_init(&p->before[j]);
        ms_xacc_init(&p->after[j]);
    }
    gta_rescale_chunk_isa(st, src, first, count, p);
}

static void gta_reduce(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                       void *partial)
{
    const struct gta_state *st = state;
    const bool della = st->kind.sparse == GTA_SPARSE_DELLA;
    if (st->phase == GTA_SELECT || !della) {
        struct gta_src src = { .sdt = MS_DT_NONE };
        for (uint32_t i = 0; i < job->ninputs; i++)
            src.in[i] = c->in[i];
        gta_reduce_src(st, &src, c->first, c->count, partial);
        return;
    }
    assert(c->count < ((uint64_t)1 << 32));
    memset(partial, 0, st->psize);

    assert(st->phase == GTA_RESCALE);
    struct gta_part_rescale *p = partial;
    unsigned char *keep = della_keep_start(st, c);
    if (keep) /* no keep bit set yet */
        memset(keep, 0, (size_t)c->count * (della_packs(st) ? 1 : MS_KEEP_BYTES));
    for (uint32_t j = 0; j < st->nm; j++) {
        const struct gta_model *m = &st->m[j];
        if (!m->trim || m->none)
            continue;
        ms_xacc_init(&p->before[j]);
        ms_xacc_init(&p->after[j]);
        della_reduce_isa(st, m, c, (unsigned char *)p->scratch, keep, &p->before[j],
                         &p->after[j]);
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
            if (m->slot < 0 || m->none)
                continue;
            for (uint32_t q = 0; q < kind_nsel(&st->kind); q++) {
                int32_t slot = m->slot + (int32_t)q;
                size_t from = (size_t)(m->slot + (int32_t)gta_hist_of(m, q)) * st->hist_len;
                switch (ms__sel_phase(&m->sel[q])) {
                case MS__SEL_HIST:
                    ms__sel_fold_hist_at(&m->sel[q], state_hist(st, slot), p->hist + from,
                                         c->first, c->count,
                                         ms__sel_share(&m->sel[q], c->first + c->count));
                    break;
                case MS__SEL_TIES:
                    ms__sel_fold_ties(&m->sel[q], c->first, p->ties[slot]);
                    break;
                default:
                    break;
                }
            }
        }
        return;
    }
    assert(st->phase == GTA_RESCALE);
    const struct gta_part_rescale *p = partial;
    for (uint32_t j = 0; j < st->nm; j++) {
        const struct gta_model *m = &st->m[j];
        if (!m->trim || m->none)
            continue;
        ms_xacc_merge(&st->before[j], &p->before[j]);
        ms_xacc_merge(&st->after[j], &p->after[j]);
    }
}

static int gta_end_pass(void *state, const struct ms_stage_job *job)
{
    struct gta_state *st = state;
    if (st->phase == GTA_SELECT) {
        bool more = false;
        for (uint32_t j = 0; j < st->nm; j++) {
            struct gta_model *m = &st->m[j];
            if (m->slot < 0 || m->none)
                continue;
            for (uint32_t q = 0; q < kind_nsel(&st->kind); q++) {
                struct ms__sel *sel = &m->sel[q];
                if (ms__sel_phase(sel) == MS__SEL_HIST)
                    ms__sel_end_hist(sel, state_hist(st, m->slot + (int32_t)q));
                else if (ms__sel_phase(sel) == MS__SEL_TIES)
                    ms__sel_end_ties(sel);
                more |= ms__sel_phase(sel) != MS__SEL_DONE;
            }
        }
        return more ? MS_STAGE_REDUCE : gta_after_select(st);
    }

    /* L1 rescale (mergekit-spec.md 2.7), in the work dtype: before = rnd(sum
     * |d|), after = rnd(sum |masked|); both >= 1e-7 gives rnd(before/after). */
    assert(st->phase == GTA_RESCALE);
    for (uint32_t j = 0; j < st->nm; j++) {
        struct gta_model *m = &st->m[j];
        if (!m->trim || m->none)
            continue;
        float before = ms_rnd(st->wdt, (float)ms_xacc_value(&st->before[j]));
        float after = ms_rnd(st->wdt, (float)ms_xacc_value(&st->after[j]));
        m->scale = !(before < 1e-7 || after < 1e-7);
        m->factor = m->scale ? ms_rnd(st->wdt, before / after) : 1.0f;
    }
    st->kept = st->nbits > 0;
    st->phase = GTA_APPLY;
    return MS_STAGE_APPLY;
}

/* della, apply: marks the keep bits of every trimmed model for the row whose
 * outputs (L floats) are at words, then leaves them for gta_apply_range. */
static void della_mark_row(const struct gta_state *st, const struct ms_chunk *c, uint64_t r0,
                           unsigned char *words)
{
    const uint64_t L = st->row;
    const uint32_t mask = (uint32_t)(((uint64_t)1 << st->ib) - 1);
    for (uint64_t i = 0; i < L; i++)
        word_put(words, i, 0);
    for (uint32_t j = 0; j < st->nm; j++) {
        const struct gta_model *m = &st->m[j];
        if (m->bit < 0)
            continue;
        uint32_t bit = 1u << (st->ib + (uint32_t)m->bit);
        if (della_counts(st)) {
            della_row_counted(st, m, c->in[m->input] + r0, c->in[st->base] + r0, c->first + r0,
                              L, words, false, bit, NULL, NULL);
            continue;
        }
        struct della_row r = { .dt = st->dt, .x = c->in[m->input] + r0,
                               .b = c->in[st->base] + r0, .words = words, .mask = mask };
        row_rank(&r, L);
        for (uint64_t pos = 0; pos < L; pos++) {
            uint32_t idx = row_idx(&r, pos);
            if (della_keep(st, m, c->first + r0 + idx, pos + 1))
                word_put(words, idx, word_get(words, idx) | bit);
        }
    }
}

/* della, apply: keep[i] = 1 or 0, model m's keep bit of element off + i of
 * chunk c, i < n: from the keep area when the rescale pass filled it (bytes or
 * words, della_packs), else from the output words (della_mark_row). */
GTA_INLINE void della_keep_floats(const struct gta_state *st, const struct gta_model *m,
                                  const struct ms_chunk *c, uint64_t off, float *restrict keep,
                                  size_t n)
{
    if (st->kept && c->keep && della_packs(st)) {
        const unsigned char *kb = (const unsigned char *)c->keep + 3 * (size_t)c->count + off;
        const uint32_t sh = (uint32_t)m->bit;
        for (size_t i = 0; i < n; i++)
            keep[i] = (kb[i] >> sh) & 1u ? 1.0f : 0.0f;
        return;
    }
    const unsigned char *words = st->kept && c->keep
                                     ? (const unsigned char *)c->keep + (size_t)off * MS_KEEP_BYTES
                                     : (const unsigned char *)(c->out + off);
    const uint32_t sh = st->ib + (uint32_t)m->bit;
    for (size_t i = 0; i < n; i++)
        keep[i] = (word_get(words, i) >> sh) & 1u ? 1.0f : 0.0f;
}

/* Output elements [off0, off0+count) of chunk c, from in (in[i]: input i's
 * element off0) into out (element off0): c's own (c->in + off0, c->out +
 * off0) or scratch holding them; c gives the geometry (and della's keep bits,
 * della_keep_floats, read before out is written there). */
static void gta_apply_range(const struct gta_state *st, const struct ms_chunk *c,
                            const float *const *in, float *out, uint64_t off0, uint64_t count,
                            uint64_t (*run)[2])
{
    float wd[MS_MAX_INPUTS][GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float keep[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float w[MS_MAX_INPUTS];
    const float *b = in[st->base];
    const bool della = st->kind.sparse == GTA_SPARSE_DELLA;
    const struct gta_fin fin = { .normalize = st->normalize, .use_lambda = st->use_lambda,
                                 .lambda = st->lambda, .div = st->div };
    for (uint32_t j = 0; j < st->nm; j++)
        w[j] = st->m[j].w;

    for (uint64_t off = off0; off < off0 + count; off += GTA_BLOCK) {
        size_t n = (size_t)MS_MIN((uint64_t)GTA_BLOCK, off0 + count - off);
        for (uint32_t j = 0; j < st->nm; j++) {
            const struct gta_model *m = &st->m[j];
            gta_delta(st->dt, wd[j], in[m->input] + (off - off0), b + (off - off0), n);
            if (m->trim) {
                if (!della || m->none) {
                    gta_keep(st, m, c->first, c->first + off, run[j], wd[j], keep, n);
                } else {
                    della_keep_floats(st, m, c, off, keep, n);
                }
                gta_mask(st->dt, wd[j], keep, m->scale, m->factor, n);
            }
            gta_weigh(st->dt, wd[j], m->w, n);
        }
        gta_combine(st->dt, &fin, st->kind.consensus, st->nm, (const float(*)[GTA_BLOCK])wd, w,
                    b + (off - off0), out + (off - off0), n);
    }
}

/*
 * The versions of ms_isa.h: gta_apply_range with everything it calls inlined
 * (flatten) and compiled for each target. Every step is elementwise, or a sum
 * over models in model order for each element, and the compiler does not
 * reassociate float arithmetic (no -ffast-math, -ffp-contract=off), so a wider
 * vector changes no value; tests/test_isa.c merges every example with each.
 */
MS__ISA_VERSIONS(gta_apply_range_isa, gta_apply_range,
                 (const struct gta_state *st, const struct ms_chunk *c, const float *const *in,
                  float *out, uint64_t off0, uint64_t count, uint64_t (*run)[2]),
                 (st, c, in, out, off0, count, run))

/* The versions of ms_isa.h of della_mark_row, as gta_apply_range's. */
MS__ISA_VERSIONS(della_mark_row_isa, della_mark_row,
                 (const struct gta_state *st, const struct ms_chunk *c, uint64_t r0,
                  unsigned char *words),
                 (st, c, r0, words))

/* ------------------------------------------------------------------------ */
/* Fused apply                                                               */

/*
 * gta_apply_range's steps for every element in one loop, the values kept in
 * registers: for jobs of at most GTA_FUSED_MAX models besides the base, with
 * no della mask, the model count, the mask kind and the consensus are compile
 * time constants of the loop (gta_fused_block), so the model loops unroll and
 * the element loop vectorises. Each model's mask is a rule on its own delta:
 *   range   keep iff lo <= ms__sel_key(d) < hi: magnitude (hi = UINT32_MAX),
 *           outliers (lo from top(n - n_bot), hi from top(n_top): keep =
 *           top(n - n_bot) && !top(n_top)), untrimmed (0, UINT32_MAX), a mask
 *           keeping nothing (UINT32_MAX, 0); the bounds of ms__sel_bounds;
 *   random  keep iff (u & 0xffffff) * 2^-24 < p (keep_random), p = 2 for an
 *           untrimmed model (always kept).
 * A kept untrimmed delta is d * 1 = d (a NaN d is quiet already: the rounding
 * of a difference), so the operations and their order are gta_apply_range's:
 * the same bytes (tests/test_stage_gta.c, fused_*; tests/test_isa.c).
 */
#define GTA_FUSED_MAX 3

/* The per-model constants of one run of elements. */
struct gta_fused {
    const float *x[GTA_FUSED_MAX];    /* the models' inputs at the run */
    const uint32_t *u[GTA_FUSED_MAX]; /* random: the run's u */
    uint32_t lo[GTA_FUSED_MAX], hi[GTA_FUSED_MAX]; /* range bounds */
    float p[GTA_FUSED_MAX];           /* random: keep probability */
    float f[GTA_FUSED_MAX];           /* rescale factor, 1 without */
    float w[GTA_FUSED_MAX];           /* W */
    struct gta_fin fin;
};

/* ms_rnd for the fused loop: bfloat16 as ms_round_bf16_1 (NaN: sign and top
 * payload kept, made quiet; else round to nearest even), computed on the
 * float's 32-bit pattern, so the vectorised loop keeps 32-bit lanes instead of
 * narrowing to 16-bit words and back at every rounding. */
GTA_INLINE float fused_rnd(enum ms_dtype dt, float x)
{
    if (dt != MS_DT_BF16)
        return ms_rnd(dt, x);
    uint32_t u = ms_f32_bits(x);
    uint32_t q = (u & 0xffff0000u) | 0x00400000u;
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return ms_f32_from_bits((u & 0x7fffffffu) > 0x7f800000u ? q : r);
}

/* One model's weighted masked delta rnd(W * rnd(mask(rnd(x - b)) * f)) (range
 * or random rule; with sc, f the rescale factor, or 1 for a model without). */
GTA_INLINE float fused_model(enum ms_dtype dt, bool random, bool sc, float x, float b,
                             uint32_t u, uint32_t lo, uint32_t hi, float p, float f, float w)
{
    float d = fused_rnd(dt, x - b);
    bool keep;
    if (random) {
        keep = (float)(u & 0xffffffu) * 0x1p-24f < p;
    } else {
        uint32_t k = ms__sel_key(dt, d);
        keep = k >= lo && k < hi;
    }
    float v = d * (keep ? 1.0f : 0.0f);
    if (sc)
        v = fused_rnd(dt, v * f); /* f = 1 for a model without rescale: rnd(v * 1) = v */
    return fused_rnd(dt, w * v);
}

/* The consensus of the weighted deltas v of W w: the sign vote, then the
 * running sums of the agreeing ones (combine_ties_body's steps). */
GTA_INLINE void fused_vote(float maj, float v, float w, float *mx, float *dv)
{
    float mk = v * maj > 0.0f ? 1.0f : 0.0f; /* exact: maj is +-1 */
    *mx = ms__acc_add(*mx, v * mk);
    *dv = ms__acc_add(*dv, w * mk);
}

/* The variant of the fused loop: compile-time flags. Without GF_SCALE no model
 * rescales; without GF_POST neither normalize nor lambda applies (with it, a
 * step not asked for divides or multiplies by 1, which changes no value: the
 * operand is rounded to the dtype already). */
enum { GF_RANDOM = 1, GF_CONSENSUS = 2, GF_POST = 4, GF_SCALE = 8, GF_VARIANTS = 16 };

/*
 * Three loops over the block, each with a short dependency chain per element
 * so that the out-of-order core overlaps many elements (one loop doing
 * everything per element is latency-bound: measured slower than the old
 * separate steps): the weighted masked deltas per model, the combination into
 * mixed (and the per-element divisor), then normalize, lambda and the base.
 * The models are written out one by one (nm is a constant), so the loops have
 * no inner loop and vectorise.
 */
GTA_INLINE void fused_body(enum ms_dtype dt, uint32_t nm, unsigned v, const struct gta_fused *q,
                           const float *restrict b, float *restrict out, size_t n)
{
    float wd[GTA_FUSED_MAX][GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float mix[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float div[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    const bool random = v & GF_RANDOM, consensus = v & GF_CONSENSUS, post = v & GF_POST;
    const bool sc = v & GF_SCALE, norm = q->fin.normalize;
    for (uint32_t j = 0; j < nm; j++) {
        const float *restrict x = q->x[j];
        const uint32_t *restrict u = q->u[j];
        const uint32_t lo = q->lo[j], hi = q->hi[j];
        const float p = q->p[j], f = q->f[j], w = q->w[j];
        float *restrict y = wd[j];
        for (size_t i = 0; i < n; i++)
            y[i] = fused_model(dt, random, sc, x[i], b[i], random ? u[i] : 0, lo, hi, p, f, w);
    }
    const float *restrict v0 = wd[0], *restrict v1 = wd[nm > 1 ? 1 : 0];
    const float *restrict v2 = wd[nm > 2 ? 2 : 0];
    const float w0 = q->w[0], w1 = q->w[nm > 1 ? 1 : 0], w2 = q->w[nm > 2 ? 2 : 0];
    if (consensus) {
        for (size_t i = 0; i < n; i++) {
            float s = 0.0f + v0[i]; /* combine_ties_body's plain sum from +0 */
            if (nm > 1)
                s += v1[i];
            if (nm > 2)
                s += v2[i];
            const float maj = fused_rnd(dt, s) >= 0.0f ? 1.0f : -1.0f; /* NaN: -1 */
            float mx = 0.0f, dv = 0.0f;
            fused_vote(maj, v0[i], w0, &mx, &dv);
            if (nm > 1)
                fused_vote(maj, v1[i], w1, &mx, &dv);
            if (nm > 2)
                fused_vote(maj, v2[i], w2, &mx, &dv);
            mix[i] = fused_rnd(dt, mx);
            float dd = fused_rnd(dt, dv);
            div[i] = dd == 0.0f || !norm ? 1.0f : dd;
        }
    } else {
        const float sdiv = norm ? q->fin.div : 1.0f;
        for (size_t i = 0; i < n; i++) {
            float s = ms__acc_add(0.0f, v0[i]);
            if (nm > 1)
                s = ms__acc_add(s, v1[i]);
            if (nm > 2)
                s = ms__acc_add(s, v2[i]);
            mix[i] = fused_rnd(dt, s);
            div[i] = sdiv;
        }
    }
    if (post) {
        for (size_t i = 0; i < n; i++)
            mix[i] = fused_rnd(dt, mix[i] / div[i]);
        if (q->fin.use_lambda) {
            const float lambda = q->fin.lambda;
            for (size_t i = 0; i < n; i++)
                mix[i] = fused_rnd(dt, mix[i] * lambda);
        }
    }
    for (size_t i = 0; i < n; i++)
        out[i] = fused_rnd(dt, ms__add_first(b[i], mix[i]));
}

/* fused_body with its constants: bfloat16, nm in 1..GTA_FUSED_MAX, variant v. */
static void gta_fused_block(uint32_t nm, unsigned v, const struct gta_fused *q,
                            const float *restrict b, float *restrict out, size_t n)
{
    assert(nm >= 1 && nm <= GTA_FUSED_MAX && v < GF_VARIANTS && n <= GTA_BLOCK);
#define F1(NM, V)                                                                                      case (NM - 1) * GF_VARIANTS + V:                                                               \
        MS__BLOCK_CALL(fused_body, n, GTA_BLOCK, MS_DT_BF16, NM, V, q, b, out);                    \
        break;
#define F4(NM, V) F1(NM, V) F1(NM, V + 1) F1(NM, V + 2) F1(NM, V + 3)
#define F16(NM) F4(NM, 0) F4(NM, 4) F4(NM, 8) F4(NM, 12)
    switch ((nm - 1) * GF_VARIANTS + v) {
    F16(1)
    F16(2)
    F16(3)
    default: break;
    }
#undef F16
#undef F4
#undef F1
}

/* Whether gta_fused_range takes the job (see the section's top). */
static bool gta_fused_ok(const struct gta_state *st)
{
    return st->dt == MS_DT_BF16 && st->kind.sparse != GTA_SPARSE_DELLA && st->nm >= 1 &&
           st->nm <= GTA_FUSED_MAX;
}

/* ms_f32_to_bf16_1, with the NaN case as a select so that the loop vectorises */
GTA_INLINE uint32_t gta_bf16_bits(float f)
{
    uint32_t u = ms_f32_bits(f);
    uint32_t q = (u >> 16) | 0x40u;
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? q : r;
}

/* A selection's key bound in the chunk: lo[0] for the elements before the
 * absolute element offset sw, lo[1] from sw on (sw = UINT64_MAX until the
 * cut is found; cut_r == 0: no cut in the chunk, lo[0] == lo[1]). */
struct gta_bound {
    const struct ms__sel *s;
    uint32_t lo[2];
    uint64_t cut_r, run, sw;
};

/* Output elements [off0, off0 + count) of chunk c (gta_fused_ok), calls in
 * element order from the chunk's start (the selections' cut state). With sc
 * (the stored path: c gives the geometry only), the inputs are sc's bfloat16
 * elements, decoded block by block into scratch, and the floats of each block
 * are encoded into sc->out: the float path's floats, as the engine encodes
 * them. */
static void gta_fused_range(const struct gta_state *st, const struct ms_chunk *c,
                            const struct ms_chunk_stored *sc, uint64_t off0, uint64_t count)
{
    static const uint32_t u_any[GTA_BLOCK]; /* untrimmed random models: p = 2 keeps all */
    uint32_t u[GTA_FUSED_MAX][GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float d[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    /* sc: the block's inputs (the models', then the base's) and outputs */
    float fx[GTA_FUSED_MAX + 1][GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float fy[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    const float *xb[GTA_FUSED_MAX + 1]; /* the models' and base's floats at the block */
    float *yb;
    struct gta_bound bd[2 * GTA_FUSED_MAX];
    uint32_t bdi[GTA_FUSED_MAX][2]; /* index in bd of lo and hi, or UINT32_MAX: fixed */
    uint64_t stream[GTA_FUSED_MAX];
    uint32_t nbd = 0;
    const uint32_t nm = st->nm;
    const bool random = st->kind.sparse == GTA_SPARSE_RANDOM;
    struct gta_fused q = { .fin = { .normalize = st->normalize, .use_lambda = st->use_lambda,
                                    .lambda = st->lambda, .div = st->div } };
    for (uint32_t j = 0; j < nm; j++) {
        const struct gta_model *m = &st->m[j];
        q.w[j] = m->w;
        q.f[j] = m->trim && m->scale ? m->factor : 1.0f;
        q.p[j] = m->trim ? m->p : 2.0f;
        q.u[j] = u_any;
        q.lo[j] = 0;
        q.hi[j] = UINT32_MAX;
        bdi[j][0] = bdi[j][1] = UINT32_MAX;
        if (!m->trim)
            continue;
        if (m->none) { /* keeps nothing (random masks are never none) */
            q.lo[j] = UINT32_MAX;
            q.hi[j] = 0;
            continue;
        }
        if (random) {
            stream[j] = ms_rng_stream(st->seed, st->key, m->input);
            q.u[j] = u[j];
            continue;
        }
        for (uint32_t k = 0; k < kind_nsel(&st->kind); k++) {
            struct gta_bound *t = &bd[nbd];
            t->s = &m->sel[k];
            t->cut_r = ms__sel_bounds(t->s, c->first, t->lo);
            t->run = 0;
            t->sw = UINT64_MAX;
            if (t->cut_r == 0) { /* one bound for the chunk */
                (k == 0 ? q.lo : q.hi)[j] = t->lo[0];
                continue;
            }
            bdi[j][k] = nbd++;
        }
    }
    assert(off0 == 0 || nbd == 0); /* the cut state starts at the chunk's start */
    unsigned variant = (random ? GF_RANDOM : 0) | (st->kind.consensus ? GF_CONSENSUS : 0) |
                       (st->normalize || st->use_lambda ? GF_POST : 0);
    for (uint32_t j = 0; j < nm; j++)
        variant |= q.f[j] != 1.0f ? GF_SCALE : 0;

    const uint64_t end = off0 + count;
    for (uint64_t off = off0; off < end; off += GTA_BLOCK) {
        const size_t n = (size_t)MS_MIN((uint64_t)GTA_BLOCK, end - off);
        for (uint32_t j = 0; j <= nm; j++) {
            uint32_t in = j < nm ? st->m[j].input : st->base;
            if (sc) {
                const uint16_t *restrict h = (const uint16_t *)sc->in[in] + off;
                for (size_t i = 0; i < n; i++)
                    fx[j][i] = ms_f32_from_bits((uint32_t)h[i] << 16);
                xb[j] = fx[j];
            } else {
                xb[j] = c->in[in] + off;
            }
        }
        yb = sc ? fy : c->out + off;
        if (random)
            for (uint32_t j = 0; j < nm; j++)
                if (q.u[j] != u_any)
                    ms_rng_fill(stream[j], c->first + off, u[j], n);
        /* Selections whose cut is still ahead: is it in this block? */
        for (uint32_t j = 0; j < nm; j++) {
            for (uint32_t k = 0; k < 2; k++) {
                if (bdi[j][k] == UINT32_MAX || bd[bdi[j][k]].sw != UINT64_MAX)
                    continue;
                struct gta_bound *g = &bd[bdi[j][k]];
                bool found;
                gta_delta(st->dt, d, xb[j], xb[nm], n);
                size_t e = ms__sel_cut_pos(g->s, g->cut_r, &g->run, d, n, &found);
                if (found)
                    g->sw = off + e;
            }
        }
        /* The block, in runs between the switch points inside it. */
        for (uint64_t s0 = off; s0 < off + n;) {
            uint64_t s1 = off + n;
            for (uint32_t t = 0; t < nbd; t++)
                if (bd[t].sw > s0 && bd[t].sw < s1)
                    s1 = bd[t].sw;
            for (uint32_t j = 0; j < nm; j++) {
                q.x[j] = xb[j] + (s0 - off);
                if (random && q.u[j] != u_any)
                    q.u[j] = u[j] + (s0 - off);
                for (uint32_t k = 0; k < 2; k++)
                    if (bdi[j][k] != UINT32_MAX) {
                        const struct gta_bound *g = &bd[bdi[j][k]];
                        (k == 0 ? q.lo : q.hi)[j] = g->lo[s0 < g->sw ? 0 : 1];
                    }
            }
            gta_fused_block(nm, variant, &q, xb[nm] + (s0 - off), yb + (s0 - off),
                            (size_t)(s1 - s0));
            s0 = s1;
        }
        if (sc) {
            uint16_t *restrict h = (uint16_t *)sc->out + off;
            for (size_t i = 0; i < n; i++)
                h[i] = (uint16_t)gta_bf16_bits(fy[i]);
        }
    }
}

/* The versions of ms_isa.h of gta_fused_range, as gta_apply_range's. */
MS__ISA_VERSIONS(gta_fused_range_isa, gta_fused_range,
                 (const struct gta_state *st, const struct ms_chunk *c,
                  const struct ms_chunk_stored *sc, uint64_t off0, uint64_t count),
                 (st, c, sc, off0, count))

static void gta_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    const struct gta_state *st = state;
    assert(st->phase == GTA_APPLY);
    if (st->nm == 0) {
        memcpy(c->out, c->in[st->base], (size_t)c->count * sizeof(float));
        return;
    }
    uint64_t run[MS_MAX_INPUTS][2];
    memset(run, 0, sizeof(run));
    if (gta_fused_ok(st)) {
        gta_fused_range_isa(st, c, NULL, 0, c->count);
        return;
    }
    if (st->nbits == 0 || (st->kept && c->keep)) {
        gta_apply_range_isa(st, c, c->in, c->out, 0, c->count, run);
        return;
    }
    const float *in[MS_MAX_INPUTS];
    /* della without the masks of a rescale pass: row by row, the output row is
     * the ranking scratch first. */
    assert(c->count % st->row == 0);
    for (uint64_t r0 = 0; r0 < c->count; r0 += st->row) {
        della_mark_row_isa(st, c, r0, (unsigned char *)(c->out + r0));
        for (uint32_t i = 0; i < job->ninputs; i++)
            in[i] = c->in[i] + r0;
        gta_apply_range_isa(st, c, in, c->out + r0, r0, st->row, run);
    }
}

/*
 * The stored-bytes path: every pass on the elements as stored, bfloat16 or
 * float16 (ms_stage_ops.stored_passes, reduce_stored, apply_stored), for every
 * member but della (its rankings and keep bits stay on the float path); and
 * apply_stored alone for one-pass jobs. The reduce passes take their deltas
 * from gta_src_delta, the stored elements decoded as the engine decodes them,
 * so the partials are the float path's. apply runs the fused loop on blocks
 * decoded into scratch (bfloat16 compute, 1..GTA_FUSED_MAX models: the fused
 * instantiations are the float path's, with no stored variant of their own),
 * else gta_apply_range on GTA_BLOCK elements of every input decoded into
 * scratch, and encodes its floats to the stored dtype (bfloat16 by
 * gta_bf16_bits, ms_f32_to_bf16_1's bits; float16 by ms_dtype_encode): what
 * the engine writes from the float path's floats, rounded to that dtype when
 * the compute dtype is float32, with the chunks of the passes.
 * One-pass jobs (c->pass 0) may see any piece of a chunk (the engine's
 * sub-blocks): they are taken only when every mask depends on the element
 * index alone (no model trimmed, or random masks).
 */

static bool gta_stored_passes(const void *state, const struct ms_stage_job *job,
                              enum ms_dtype dt)
{
    const struct gta_state *st = state;
    return (dt == MS_DT_BF16 || dt == MS_DT_F16) && (st->dt == dt || st->dt == MS_DT_F32) &&
           st->kind.sparse != GTA_SPARSE_DELLA;
}

static void gta_reduce_stored(const void *state, const struct ms_stage_job *job,
                              const struct ms_chunk_stored *c, void *partial)
{
    const struct gta_state *st = state;
    struct gta_src src = { .sdt = c->dt };
    assert(c->dt == MS_DT_BF16 || c->dt == MS_DT_F16);
    for (uint32_t i = 0; i < job->ninputs; i++)
        src.in[i] = c->in[i];
    gta_reduce_src(st, &src, c->first, c->count, partial);
}

/* Elements [off, off + n) of the stored chunk c (geometry ck): decoded, gta_apply_range
 * (or gta_apply's copy of the base), encoded into c->out. run: the chunk's
 * selection cut state, calls in element order. */
GTA_INLINE void gta_stored_block(const struct gta_state *st, uint32_t ninputs,
                                 const struct ms_chunk *ck, const struct ms_chunk_stored *c,
                                 size_t off, uint64_t (*run)[2], size_t n)
{
    float f[MS_MAX_INPUTS][GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    float y[GTA_BLOCK] __attribute__((aligned(MS_ALIGN)));
    const float *in[MS_MAX_INPUTS];
    const bool bf16 = c->dt == MS_DT_BF16;
    for (uint32_t i = 0; i < ninputs; i++) {
        const uint16_t *restrict x = (const uint16_t *)c->in[i] + off;
        if (bf16)
            for (size_t j = 0; j < n; j++)
                f[i][j] = ms_f32_from_bits((uint32_t)x[j] << 16);
        else
            ms_dtype_decode(c->dt, x, f[i], n);
        in[i] = f[i];
    }
    const float *res = y;
    if (st->nm == 0)
        res = f[st->base];
    else
        gta_apply_range(st, ck, in, y, off, n, run);
    uint16_t *restrict out = (uint16_t *)c->out + off;
    if (bf16)
        for (size_t j = 0; j < n; j++)
            out[j] = (uint16_t)gta_bf16_bits(res[j]);
    else
        ms_dtype_encode(c->dt, res, out, n);
}

static void gta_stored_run(const struct gta_state *st, uint32_t ninputs,
                           const struct ms_chunk_stored *c)
{
    const struct ms_chunk ck = { .first = c->first, .count = c->count, .index = c->index,
                                 .pass = c->pass };
    uint64_t run[MS_MAX_INPUTS][2];
    memset(run, 0, sizeof(run));
    size_t n = (size_t)c->count;
    for (size_t off = 0; off < n; off += GTA_BLOCK) {
        size_t m = MS_MIN((size_t)GTA_BLOCK, n - off);
        MS__BLOCK_CALL(gta_stored_block, m, GTA_BLOCK, st, ninputs, &ck, c, off, run);
    }
}

/* The versions of ms_isa.h of gta_stored_run, as gta_apply_range's. */
MS__ISA_VERSIONS(gta_stored_isa, gta_stored_run,
                 (const struct gta_state *st, uint32_t ninputs, const struct ms_chunk_stored *c),
                 (st, ninputs, c))

/* Declines (writes nothing) a dtype other than BF16 and F16, or other than the
 * compute dtype unless that is F32; della's keep bits; and, in one-pass jobs, a
 * selection's mask (it depends on the chunking). */
static bool gta_apply_stored(const void *state, const struct ms_stage_job *job,
                             const struct ms_chunk_stored *cs)
{
    const struct gta_state *st = state;
    assert(st->phase == GTA_APPLY);
    /* one-pass jobs: the stored dtype is the compute dtype (ms_stage.h) */
    struct ms_chunk_stored cc = *cs;
    const struct ms_chunk_stored *c = &cc;
    if (cs->pass == 0)
        cc.dt = st->dt;
    if ((c->dt != MS_DT_BF16 && c->dt != MS_DT_F16) || (st->dt != c->dt && st->dt != MS_DT_F32) ||
        st->nbits > 0)
        return false;
    for (uint32_t j = 0; j < st->nm && c->pass == 0; j++)
        if (st->m[j].trim && st->kind.sparse != GTA_SPARSE_RANDOM)
            return false;
    if (c->dt == MS_DT_BF16 && gta_fused_ok(st)) {
        const struct ms_chunk ck = { .first = c->first, .count = c->count, .index = c->index,
                                     .pass = c->pass };
        gta_fused_range_isa(st, &ck, c, 0, c->count);
        return true;
    }
    gta_stored_isa(st, job->ninputs, c);
    return true;
}

/* ------------------------------------------------------------------------ */
/* Plan-time rules                                                           */

/* The family computes in the base's dtype and returns it (mergekit-spec.md 2.1.4). */
static void gta_dtypes(const struct ms_stage_job *job, const enum ms_dtype *load,
                       enum ms_dtype *compute, enum ms_dtype *out)
{
    *compute = *out = load[job->base >= 0 ? job->base : 0];
}

/*
 * Checks made before any data is read (mergekit fails mid-merge): ties keeping
 * no element (2.7: mergekit asserts), della's density +- epsilon inside (0, 1)
 * and its ranking along dim 1 of a 2-D tensor. breadcrumbs inputs whose
 * int(gamma*numel) is 0 lose their whole delta, as in mergekit (7.3): tallied
 * for one warning (crumbs_tally_warn).
 */
static int gta_check(const struct ms_plan_ctx *ctx, const struct ms_stage_job *job)
{
    const struct gta_kind *kind = gta_kind_of(job);
    bool della = kind->sparse == GTA_SPARSE_DELLA, crumbs = kind->sparse == GTA_SPARSE_OUTLIERS;
    int pd = param_index(job, "density"), pe = param_index(job, "epsilon"),
        pg = param_index(job, "gamma");
    if (pd < 0)
        return 0;
    if (della && !della_ranks(job))
        return ctx->problem(ctx, MS_EUNSUPPORTED, NULL, "tensor '%s' has %u dimensions: della "
                            "ranks along dim 1 of a matrix (mergekit's rows), which this tensor "
                            "does not have", job->name, job->ndim);
    int rc = 0;
    for (uint32_t i = 0; i < job->ninputs; i++) {
        if ((int)i == job->base)
            continue;
        double d = job->pv[i][pd];
        char key[160];
        if (!(d < 1.0))
            continue; /* no trimming */
        if (kind->sparse == GTA_SPARSE_MAGNITUDE && gta_topk(d, job->numel) == 0) {
            snprintf(key, sizeof key, "k0:%u", ctx->model_id(ctx, i));
            rc = ctx->problem(ctx, MS_EPLAN, key, "density %g keeps no element of tensor '%s' (%"
                              PRIu64 " elements) of model '%s': int(density*numel) == 0 "
                              "(mergekit fails here too)", d, job->name, job->numel,
                              ctx->model_ref(ctx, i));
        }
        if (della && pe >= 0 && d > 0 && !della_window_ok(d, job->pv[i][pe])) {
            snprintf(key, sizeof key, "della:%u", ctx->model_id(ctx, i));
            rc = ctx->problem(ctx, MS_EPLAN, key, "della: density %g +- epsilon %g must lie "
                              "inside (0, 1) for model '%s' tensor '%s' (set a smaller epsilon)",
                              d, job->pv[i][pe], ctx->model_ref(ctx, i), job->name);
        }
        if (crumbs && pg >= 0 && (uint64_t)(job->pv[i][pg] * (double)job->numel) == 0)
            ctx->tally(ctx, job->name);
    }
    return rc;
}

static void crumbs_tally_warn(const char *recipe, size_t count, const char *first)
{
    ms_log_warn("%s: int(gamma*numel) == 0 for %zu model tensor%s (e.g. '%s'): as in mergekit, "
                "breadcrumbs zeroes their whole delta; raise gamma to keep them",
                recipe, count, count == 1 ? "" : "s", first);
}

static const struct ms_plan_ops gta_plan = {
    .dtypes = gta_dtypes,
    .check = gta_check,
    .tally_warn = crumbs_tally_warn,
};

/* ------------------------------------------------------------------------ */
/* Ops tables and the family's methods                                       */

static const struct ms_stage_ops gta_ops = {
    .state_size = gta_state_size,
    .partial_size = gta_partial_size,
    .begin = gta_begin,
    .reduce = gta_reduce,
    .fold = gta_fold,
    .end_pass = gta_end_pass,
    .apply = gta_apply,
    .apply_stored = gta_apply_stored,
    .stored_passes = gta_stored_passes,
    .reduce_stored = gta_reduce_stored,
};

/* della with rescale: a rescale pass will rank every trimmed model's rows, and
 * its keep bits can wait in the keep area for apply (della_reduce). The same
 * conditions as begin's for a rescale pass with keep bits. */
static bool della_keeps(const struct ms_stage_job *job)
{
    int id = param_index(job, "density"), iresc = param_index(job, "rescale");
    if (id < 0 || iresc < 0 || job->gv[iresc] == 0.0 || !della_ranks(job) || job->numel == 0)
        return false;
    for (uint32_t i = 0; i < job->ninputs && i < MS_MAX_INPUTS; i++)
        if ((int)i != job->base && job->pv[i][id] > 0.0 && job->pv[i][id] < 1.0)
            return true;
    return false;
}

/* della ranks whole rows. */
static const struct ms_stage_ops gta_rowwise_ops = {
    .flags = MS_STAGE_ROWWISE,
    .state_size = gta_state_size,
    .partial_size = gta_partial_size,
    .keeps = della_keeps,
    .begin = gta_begin,
    .reduce = gta_reduce,
    .fold = gta_fold,
    .end_pass = gta_end_pass,
    .apply = gta_apply,
};

#define GTA_FLAGS (MS_M_BASE_REQUIRED | MS_M_BASE_INPUT | MS_M_BASE_SHAPE)
#define GTA_WEIGHT_DENSITY MS__PM_REQ("weight"), MS__PM("density", 1.0, 0, MS__INF, false)
#define GTA_GLOBALS(norm, resc)                                                                    \
    MS__G_BOOL("normalize", norm), MS__G_BOOL("rescale", resc),                                    \
        MS__G("lambda", 1.0, -MS__INF, MS__INF), MS__G_BOOL("int8_mask", 0)

const struct ms_method ms_method_task_arithmetic = {
    .name = "task_arithmetic",
    .summary = "base + weighted sum of task vectors",
    .flags = GTA_FLAGS,
    .min_inputs = 1,
    .nparams = 6,
    .params = { GTA_WEIGHT_DENSITY, GTA_GLOBALS(0, 0) },
    .card = { "Task Arithmetic", "https://arxiv.org/abs/2212.04089" },
    .plan = &gta_plan,
    .ops = &gta_ops,
    .impl = &kind_task_arithmetic,
};

const struct ms_method ms_method_ties = {
    .name = "ties",
    .summary = "TIES: trim by magnitude, elect signs, disjoint mean",
    .flags = GTA_FLAGS,
    .min_inputs = 1,
    .nparams = 6,
    .params = { GTA_WEIGHT_DENSITY, GTA_GLOBALS(1, 0) },
    .card = { "TIES", "https://arxiv.org/abs/2306.01708" },
    .plan = &gta_plan,
    .ops = &gta_ops,
    .impl = &kind_ties,
};

const struct ms_method ms_method_dare_ties = {
    .name = "dare_ties",
    .summary = "DARE random drop with TIES sign election",
    .flags = GTA_FLAGS,
    .min_inputs = 1,
    .nparams = 6,
    .params = { GTA_WEIGHT_DENSITY, GTA_GLOBALS(0, 1) },
    .card = { "DARE TIES", "https://arxiv.org/abs/2311.03099" },
    .plan = &gta_plan,
    .ops = &gta_ops,
    .impl = &kind_dare_ties,
};

const struct ms_method ms_method_dare_linear = {
    .name = "dare_linear",
    .summary = "DARE random drop, linear combination",
    .flags = GTA_FLAGS,
    .min_inputs = 1,
    .nparams = 6,
    .params = { GTA_WEIGHT_DENSITY, GTA_GLOBALS(0, 1) },
    .card = { "Linear DARE", "https://arxiv.org/abs/2311.03099" },
    .plan = &gta_plan,
    .ops = &gta_ops,
    .impl = &kind_dare_linear,
};

const struct ms_method ms_method_breadcrumbs = {
    .name = "breadcrumbs",
    .summary = "drop the largest and smallest deltas",
    .flags = GTA_FLAGS,
    .min_inputs = 1,
    .nparams = 7,
    .params = { GTA_WEIGHT_DENSITY, MS__PM("gamma", 0.01, 0, 1, false), GTA_GLOBALS(0, 0) },
    .card = { "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795" },
    .plan = &gta_plan,
    .ops = &gta_ops,
    .impl = &kind_breadcrumbs,
};

const struct ms_method ms_method_breadcrumbs_ties = {
    .name = "breadcrumbs_ties",
    .summary = "breadcrumbs with TIES sign election",
    .flags = GTA_FLAGS,
    .min_inputs = 1,
    .nparams = 7,
    .params = { GTA_WEIGHT_DENSITY, MS__PM("gamma", 0.01, 0, 1, false), GTA_GLOBALS(0, 0) },
    .card = { "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795" },
    .plan = &gta_plan,
    .ops = &gta_ops,
    .impl = &kind_breadcrumbs_ties,
};

const struct ms_method ms_method_della = {
    .name = "della",
    .summary = "DELLA magnitude-ranked drop with sign election",
    .flags = GTA_FLAGS,
    .min_inputs = 1,
    .nparams = 7,
    .params = { GTA_WEIGHT_DENSITY, MS__PM("epsilon", 0.15, 0, 1, false), GTA_GLOBALS(1, 1) },
    .card = { "DELLA", "https://arxiv.org/abs/2406.11617" },
    .plan = &gta_plan,
    .ops = &gta_rowwise_ops,
    .impl = &kind_della,
};

const struct ms_method ms_method_della_linear = {
    .name = "della_linear",
    .summary = "DELLA magnitude-ranked drop, linear combination",
    .flags = GTA_FLAGS,
    .min_inputs = 1,
    .nparams = 7,
    .params = { GTA_WEIGHT_DENSITY, MS__PM("epsilon", 0.15, 0, 1, false), GTA_GLOBALS(0, 1) },
    .card = { "Linear DELLA", "https://arxiv.org/abs/2406.11617" },
    .plan = &gta_plan,
    .ops = &gta_rowwise_ops,
    .impl = &kind_della_linear,
};
