/*
 * stage_impl.h - private to stages/: the method descriptors the registry lists,
 * shorthands for declaring parameters, and the exact top-k selection (select.c).
 * A method is "supported" exactly when its ops pointer is non-NULL.
 */
#ifndef MS_STAGE_IMPL_H
#define MS_STAGE_IMPL_H

#include <math.h>

#include "ms_common.h"
#include "ms_isa.h"
#include "ms_stage.h"

/* Every method's descriptor, defined in its own file: ms_method_<name>. */
#define MS_METHOD(name) extern const struct ms_method ms_method_##name;
#include "methods.def"
#undef MS_METHOD

/* Parameter declarations (struct ms_param_decl): per-model (PM) or global (G);
 * REQ: required, no default; lo_open: the range excludes lo. */
#define MS__INF HUGE_VAL
#define MS__PM_REQ(n) \
    { .name = n, .per_model = true, .required = true, .def = NAN, .lo = -MS__INF, .hi = MS__INF }
#define MS__PM(n, d, l, h, lo_o) \
    { .name = n, .per_model = true, .def = d, .lo = l, .hi = h, .lo_open = lo_o }
#define MS__G_REQ(n) { .name = n, .required = true, .def = NAN, .lo = -MS__INF, .hi = MS__INF }
#define MS__G(n, d, l, h) { .name = n, .def = d, .lo = l, .hi = h }
#define MS__G_BOOL(n, d) { .name = n, .is_bool = true, .def = d, .lo = 0, .hi = 1 }

/* Kernel helpers (GTA family, sce). MS__DT_DISPATCH: one switch on the
 * compute dtype calling call(MS_DT_BF16), call(MS_DT_F16) or call(MS_DT_F32),
 * so an always-inline body specialised on the dtype inlines its rounding. */
#define MS__DT_DISPATCH(dt, call)                                                                  \
    do {                                                                                           \
        switch (dt) {                                                                              \
        case MS_DT_BF16: call(MS_DT_BF16); break;                                                  \
        case MS_DT_F16: call(MS_DT_F16); break;                                                    \
        default: call(MS_DT_F32); break;                                                           \
        }                                                                                          \
    } while (0)

/* acc + x, keeping acc's NaN when both are NaN: a sum over models takes the
 * first NaN in model order, as a scalar loop's add does. The compiler may swap
 * a vectorised add's operands, and x86 returns the first operand's NaN, so the
 * order is made explicit. */
static inline __attribute__((always_inline)) float ms__acc_add(float acc, float x)
{
    return acc != acc ? acc : acc + x;
}

/* x * y, x's NaN made quiet when x is NaN: the NaN torch's x * y gives on x86
 * (the first operand's, quieted, when both are NaN; the one NaN operand's when
 * only one is, which is y's here and needs no rule). The multiply twin of
 * ms__acc_add: the compiler may swap a vectorised multiply's operands, so the
 * order is explicit, and the quiet bit is set by integer work, not left to the
 * instruction chosen. */
static inline __attribute__((always_inline)) float ms__mul_first(float x, float y)
{
    return x != x ? ms_f32_from_bits(ms_f32_bits(x) | 0x00400000u) : x * y;
}

/* x + y, x's NaN made quiet when x is NaN: the add twin of ms__mul_first (torch's
 * x + y on x86 when x is NaN), where ms__acc_add keeps an accumulator's NaN as
 * it is. */
static inline __attribute__((always_inline)) float ms__add_first(float x, float y)
{
    return x != x ? ms_f32_from_bits(ms_f32_bits(x) | 0x00400000u) : x + y;
}

/*
 * MS__ISA_VERSIONS(name, fn, PARAMS, ARGS) defines `static void name PARAMS`,
 * which runs fn (a static void function of those parameters) in the version
 * of ms_isa.h that ms_isa_active() names: fn with everything it calls in this
 * file inlined (flatten) and compiled for AVX2 and for AVX-512, or fn itself.
 * The element loops of the stages use it: every step is elementwise or a sum
 * in a fixed order, and the compiler does not reassociate float arithmetic
 * (-ffp-contract=off, no -ffast-math), so every version gives the same bytes
 * (tests/test_isa.c). ARGS passes PARAMS' names on, in parentheses.
 */
#if defined(__x86_64__) && defined(__GNUC__)
#define MS__ISA_VERSIONS(name, fn, PARAMS, ARGS)                                                 \
    __attribute__((target("avx2"), flatten)) static void name##_avx2 PARAMS { fn ARGS; }        \
    __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"), flatten)) static void     \
        name##_avx512 PARAMS { fn ARGS; }                                                        \
    static void name PARAMS                                                                      \
    {                                                                                            \
        switch (ms_isa_active()) {                                                               \
        case MS_ISA_AVX512: name##_avx512 ARGS; return;                                          \
        case MS_ISA_AVX2: name##_avx2 ARGS; return;                                              \
        default: fn ARGS; return;                                                                \
        }                                                                                        \
    }
#else
#define MS__ISA_VERSIONS(name, fn, PARAMS, ARGS) \
    static void name PARAMS { fn ARGS; }
#endif

/*
 * MS__BLOCK_CALL(f, nb, B, ...) calls the always-inline block function f with
 * nb elements, as the compile-time constant B when nb == B: with a constant
 * trip count GCC's -O2 vectoriser (cost model "very cheap") takes the loops,
 * which it leaves scalar for an unknown count. The tail block runs the same
 * code with the variable count: same operations, same bytes.
 */
#define MS__BLOCK_CALL(f, nb, B, ...) \
    ((nb) == (B) ? f(__VA_ARGS__, (B)) : f(__VA_ARGS__, (nb)))

/*
 * Leaf kernels of the stages' element loops, each op rounded to d (ms_rnd).
 * Always inlined, so that d is a constant at every call (a variable d works,
 * branch by branch) and restrict holds; with a constant n (MS__BLOCK_CALL) the
 * -O2 vectoriser takes them. y may not overlap the inputs.
 */
#define MS__AI static inline __attribute__((always_inline))

/* y = rnd(x - b) */
/* Keep-area words holding two bfloat16 values, exact (each float is a bf16
 * value already): lo in the low half, hi in the high half of kp[k]. */
MS__AI void ms__k_bf16_pair_put(uint32_t *restrict kp, const float *restrict lo,
                                const float *restrict hi, size_t n)
{
    for (size_t k = 0; k < n; k++)
        kp[k] = ms_f32_bits(lo[k]) >> 16 | (ms_f32_bits(hi[k]) & 0xffff0000u);
}

MS__AI void ms__k_bf16_pair_get(float *restrict lo, float *restrict hi,
                                const uint32_t *restrict kp, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        lo[k] = ms_f32_from_bits(kp[k] << 16);
        hi[k] = ms_f32_from_bits(kp[k] & 0xffff0000u);
    }
}

MS__AI void ms__k_sub(enum ms_dtype d, float *restrict y, const float *restrict x,
                      const float *restrict b, size_t n)
{
    for (size_t k = 0; k < n; k++)
        y[k] = ms_rnd(d, x[k] - b[k]);
}

/* y = rnd(x * z) */
MS__AI void ms__k_mul(enum ms_dtype d, float *restrict y, const float *restrict x,
                      const float *restrict z, size_t n)
{
    for (size_t k = 0; k < n; k++)
        y[k] = ms_rnd(d, x[k] * z[k]);
}

/* y = rnd(y + x), y's NaN kept when both are NaN (ms__acc_add) */
MS__AI void ms__k_acc(enum ms_dtype d, float *restrict y, const float *restrict x, size_t n)
{
    for (size_t k = 0; k < n; k++)
        y[k] = ms_rnd(d, ms__acc_add(y[k], x[k]));
}

/* y = rnd(x / v) */
MS__AI void ms__k_div(enum ms_dtype d, float *restrict y, const float *restrict x, float v,
                      size_t n)
{
    for (size_t k = 0; k < n; k++)
        y[k] = ms_rnd(d, x[k] / v);
}

/* ======================================================================== */
/* select.c - exact top-k by magnitude over a stream (GTA family)            */
/* ======================================================================== */
/*
 * Selects the k elements of largest magnitude of a stream of n values (one
 * model's delta over one tensor), exactly and with bounded memory: counting
 * passes over a histogram of the magnitude's bit pattern (peers-and-formats.md
 * 4.2), plus at most one pass that locates the tie cut in chunk order.
 *
 * The order is: larger |x| first; NaN above +Inf (as mergekit's descending
 * argsort); among equal magnitudes the lower flat index first (DESIGN.md 2),
 * or the higher index first when the selection is created with high_first
 * (what a stable ascending sort's top end holds: breadcrumbs' n_top).
 * A two-sided selection (keep ascending positions [n_bot, n - n_top)) is two
 * selections with high_first over the same stream:
 *     keep = in_top(n - n_bot) && !in_top(n_top).
 *
 * Values must be exactly representable in the selection's dtype (F32, F16 or
 * BF16); the 16-bit types take one counting pass, F32 two.
 *
 * Protocol, mirroring the stage protocol (all on the stage's threads as noted):
 *   ms__sel_init                              begin (loop thread)
 *   while ms__sel_phase() != MS__SEL_DONE:    one reduce pass per step
 *     HIST: ms__sel_count per chunk (worker) into a zeroed uint32 partial of
 *           ms__sel_bins() entries; ms__sel_fold_hist_at (loop, strictly in
 *           chunk order) or ms__sel_fold_hist (loop, any order) into an
 *           accumulator of ms__sel_hist_len(dt) uint64, zero at init;
 *           ms__sel_end_hist at end_pass (zeroes the accumulator again)
 *     TIES: ms__sel_count_ties per chunk (worker); ms__sel_fold_ties (loop,
 *           strictly in chunk order); ms__sel_end_ties at end_pass
 *   ms__sel_mask per chunk in apply (worker), with the same chunks as the passes.
 * Workers read only fields that change in init/end_*; fold changes the others.
 * A chunk holds fewer than 2^32 elements (uint32 partial counts).
 *
 * Fused tie count: while n < 2^32 the accumulator counts in uint32 (no bin
 * exceeds n) and its other half records, per chunk, the counts of a window of
 * bins around the threshold predicted from the histogram folded so far
 * (ms__sel_fold_hist_at). When every chunk up to the one holding the cut has
 * T in its window, ms__sel_end_hist locates the cut from them and the TIES
 * pass is skipped, with the same result: the tie pass is the fallback.
 */
enum ms__sel_phase { MS__SEL_DONE = 0, MS__SEL_HIST = 1, MS__SEL_TIES = 2 };

#define MS__SEL_BINS_MAX 65536u   /* largest histogram (F32 second level) */

struct ms__sel {                  /* plain data: lives in a stage's state */
    enum ms_dtype dt;             /* F32, F16 or BF16 */
    uint32_t phase;               /* enum ms__sel_phase */
    uint32_t level;               /* HIST: 0 = high (or only) bits, 1 = F32 low 16 bits */
    uint32_t hi;                  /* F32 level 1: the boundary bin of level 0 */
    bool high_first;              /* ties: higher index ranks first */
    bool all_ties;                /* DONE: every element with key == T is selected */
    uint64_t n, k;                /* stream length; elements to select (k <= n) */
    uint32_t key;                 /* DONE/TIES: threshold key T; key > T is selected */
    uint64_t above;               /* elements with key above the current boundary bin */
    uint64_t need, at;            /* TIES: elements with key == T: to select, present */
    uint64_t cut;                 /* TIES: ties with rank < cut in index order are the low side */
    uint64_t seen;                /* TIES fold: ties in the chunks folded so far */
    uint64_t cut_first;           /* first element of the chunk holding the cut (located) */
    uint64_t cut_r;               /* ties of that chunk on the low side (1..) */
    bool located;
    bool exact;                   /* ms__sel_init_kth: T is always the exact k-th key */
};

/* Starts a selection of k of n elements (k > n is taken as n). k == 0 and
 * k == n need no pass. */
void ms__sel_init(struct ms__sel *s, enum ms_dtype dt, uint64_t n, uint64_t k, bool high_first);
/*
 * Starts an order statistic (arcee_fusion's quantiles): the key of the k-th
 * largest magnitude, 1 <= k <= n. Unlike ms__sel_init it runs the counting
 * passes even for k == n, and for F32 it always resolves both levels, so once
 * the phase has left MS__SEL_HIST, s->key is exactly that key (the tie pass
 * is not needed and may be skipped). ms__sel_key_value turns it into |x|.
 */
void ms__sel_init_kth(struct ms__sel *s, enum ms_dtype dt, uint64_t n, uint64_t k);
static inline enum ms__sel_phase ms__sel_phase(const struct ms__sel *s)
{
    return (enum ms__sel_phase)s->phase;
}
/* uint64 accumulator entries a selection over dt needs (32,768 or 65,536). */
static inline size_t ms__sel_hist_len(enum ms_dtype dt)
{
    return dt == MS_DT_F32 ? 65536u : 32768u;
}
/* Histogram entries the current HIST pass uses (<= ms__sel_hist_len). */
static inline size_t ms__sel_bins(const struct ms__sel *s)
{
    return s->dt == MS_DT_F32 && s->level == 1 ? 65536u : 32768u;
}
/* HIST pass, worker: hist[key bin of x[i]] += 1 for n values (hist zeroed by the caller).
 * BF16 counts the magnitude's bit pattern, so a NaN lands in its payload's bin
 * (0x7f81..0x7fff); ms__sel_end_hist moves those into the NaN key's bin. */
void ms__sel_count(const struct ms__sel *s, uint32_t *restrict hist, const float *restrict x,
                   size_t n);
/* HIST pass, loop thread: acc += part over ms__sel_bins(s) entries. */
void ms__sel_fold_hist(const struct ms__sel *s, uint64_t *restrict acc,
                       const uint32_t *restrict part);
/* HIST pass, loop thread, strictly in chunk order: ms__sel_fold_hist of the
 * chunk [first, first + count), which also records the chunk's counts around
 * the threshold predicted for `want` elements to select among the elements
 * folded so far (ms__sel_share(s, first + count) for a fixed k). */
void ms__sel_fold_hist_at(const struct ms__sel *s, uint64_t *restrict acc,
                          const uint32_t *restrict part, uint64_t first, uint64_t count,
                          uint64_t want);
/* The share of the elements still to select at this level in the first
 * `folded` elements of the stream: (k - above) * folded / n. */
uint64_t ms__sel_share(const struct ms__sel *s, uint64_t folded);
/* End of a HIST pass: finds the boundary bin, advances the phase (past TIES
 * when the records locate the cut), zeroes acc. */
void ms__sel_end_hist(struct ms__sel *s, uint64_t *acc);
/* TIES pass, worker: elements of x whose key is T. */
uint64_t ms__sel_count_ties(const struct ms__sel *s, const float *restrict x, size_t n);
/* TIES pass, loop thread, strictly in chunk order: the chunk starting at
 * element `first` holds `ties` elements with key T. */
void ms__sel_fold_ties(struct ms__sel *s, uint64_t first, uint64_t ties);
void ms__sel_end_ties(struct ms__sel *s);
/*
 * Apply, worker: keep[i] = 1.0f if element i of x is selected, else 0.0f, for
 * n consecutive elements of the chunk that starts at element chunk_first.
 * Calls for one chunk go in element order: *run carries the count of key-T
 * elements already met in this chunk (0 at the chunk's first element; once it
 * reaches the cut, any value at or past it) and is updated for the next call
 * on the same chunk.
 */
void ms__sel_mask(const struct ms__sel *s, uint64_t chunk_first, uint64_t *run,
                  const float *restrict x, float *restrict keep, size_t n);

/*
 * Apply, worker: the selection of the chunk that starts at element chunk_first
 * as key bounds: an element is selected iff its key (ms__sel_key) is >= lo[0]
 * while fewer than cut_r elements of key T came before it in the chunk, and
 * >= lo[1] after that (lo[0] == lo[1] but for the chunk holding the cut).
 * Returns cut_r, or 0 when the chunk does not hold the cut (lo[0] for all).
 * The same decisions as ms__sel_mask.
 */
uint64_t ms__sel_bounds(const struct ms__sel *s, uint64_t chunk_first, uint32_t lo[2]);
/*
 * Apply, worker, in the chunk holding the cut (cut_r from ms__sel_bounds), for
 * n consecutive elements x of it, calls in element order: *run counts the
 * key-T elements met before x in the chunk (0 at the chunk's first element)
 * and is advanced. Returns e: the elements before x + e take lo[0], those from
 * x + e on take lo[1]; *found tells whether the switch lies in this run (e < n,
 * or e == n with the cut_r-th key-T element last), after which lo[1] holds for
 * the rest of the chunk.
 */
size_t ms__sel_cut_pos(const struct ms__sel *s, uint64_t cut_r, uint64_t *run,
                       const float *restrict x, size_t n, bool *found);

/* Order-preserving key of |x| for x representable in dt: the 15-bit pattern
 * of |x| for F16/BF16, the 31-bit pattern for F32; every NaN maps to the
 * largest key (above +Inf). */
static inline uint32_t ms__sel_key(enum ms_dtype dt, float x)
{
    uint32_t u = ms_f32_bits(x) & 0x7fffffffu;
    if (dt == MS_DT_F32)
        return u > 0x7f800000u ? 0x7fffffffu : u;
    if (u > 0x7f800000u)
        return 0x7fffu;
    if (dt == MS_DT_BF16)
        return u >> 16;
    /* F16: re-bias a normal value; a subnormal one is a multiple of 2^-24. */
    if (u >= 0x47800000u) /* >= 65536: only +Inf is representable there */
        return 0x7c00u;
    if (u >= 0x38800000u) /* >= 2^-14 */
        return (u >> 13) - ((127u - 15u) << 10);
    return (uint32_t)(ms_f32_from_bits(u) * 0x1p24f);
}

/* The magnitude whose key is `key` in dt (inverse of ms__sel_key on |x|;
 * the NaN key gives NaN). */
static inline float ms__sel_key_value(enum ms_dtype dt, uint32_t key)
{
    if (dt == MS_DT_F32)
        return ms_f32_from_bits(key == 0x7fffffffu ? 0x7fc00000u : key);
    if (key >= 0x7fffu)
        return ms_f32_from_bits(0x7fc00000u);
    if (dt == MS_DT_BF16)
        return ms_f32_from_bits(key << 16);
    return ms_f16_to_f32_1((uint16_t)key);
}

#endif
