/*
 * select.c - exact top-k by magnitude over a stream with bounded memory
 * (contract in stage_impl.h; DESIGN.md 2 and 3, peers-and-formats.md 4.2).
 *
 * Algorithm. The magnitude |x| of a value representable in the dtype maps to an
 * integer key whose order is the order of |x| (ms__sel_key). For F16/BF16 the
 * key has 15 bits: one counting pass over 32,768 bins finds the bin T where the
 * count from the top reaches k. For F32 the key has 31 bits: a first pass
 * counts the high 15 bits and finds the boundary bin H, a second counts the low
 * 16 bits of the elements in H only. Then `above` elements have key > T and
 * `need` = k - above of the `at` elements with key == T are selected.
 *
 * Ties at T are selected by flat index. When 0 < need < at, one more pass
 * counts each chunk's key-T elements; folding those counts in chunk order finds
 * the chunk holding the cut and how many of its ties lie before the cut. That
 * is O(1) state: apply decides every tie from (its chunk's first element, its
 * rank inside its chunk) alone, so the result is independent of the chunking
 * as long as every pass and apply use the same chunks (the protocol's promise).
 *
 * Fused tie count. While n < 2^32 the uint64 accumulator holds uint32 counts
 * in its first half; the second half records, for each chunk folded in chunk
 * order in the pass that decides T (the only pass of F16/BF16, F32's second),
 * the chunk's counts over a window of bins around the threshold predicted from
 * the histogram folded so far. If T lies in the window of every chunk up to
 * the one holding the cut, end_hist folds those counts as the tie pass would
 * (the same counts: a bin of this level holds exactly the elements of its key)
 * and the tie pass is skipped; otherwise it runs. The windows are as wide as
 * the area allows for the chunk count chunk 0's size implies; the state does
 * not grow.
 *
 * NaN. BF16 counting takes the magnitude's bit pattern as the bin (no NaN
 * test in the loop), so a NaN lands in the bin of its payload, 0x7f81..0x7fff,
 * all above +Inf's 0x7f80; the end of the pass moves them into the NaN key
 * 0x7fff before looking for T, so every NaN ranks as one magnitude.
 */
#include <assert.h>
#include <string.h>

#include "stage_impl.h"

/* ------------------------------------------------------------------------ */
/* Lifecycle                                                                 */

void ms__sel_init(struct ms__sel *s, enum ms_dtype dt, uint64_t n, uint64_t k, bool high_first)
{
    assert(dt == MS_DT_F32 || dt == MS_DT_F16 || dt == MS_DT_BF16);
    memset(s, 0, sizeof(*s));
    s->dt = dt;
    s->n = n;
    s->k = MS_MIN(k, n);
    s->high_first = high_first;
    s->all_ties = true;
    s->phase = MS__SEL_DONE;
    if (s->k == 0)
        s->key = UINT32_MAX; /* above every key: selects nothing */
    else if (s->k == n)
        s->key = 0;          /* every key is >= 0: selects everything */
    else
        s->phase = MS__SEL_HIST;
}

void ms__sel_init_kth(struct ms__sel *s, enum ms_dtype dt, uint64_t n, uint64_t k)
{
    assert(k >= 1 && k <= n);
    ms__sel_init(s, dt, n, k, false);
    s->exact = true;
    s->phase = MS__SEL_HIST; /* also for k == n: the key of the minimum is wanted */
}

/* ------------------------------------------------------------------------ */
/* Counting kernels. Each is a leaf loop specialised on the dtype so the key
 * computation inlines; the scalar form is the reference. The histogram count
 * has no SIMD version (its increments scatter); the tie count and the mask
 * have (SEL_ISA below).                                                     */

static inline __attribute__((always_inline)) void count_body(enum ms_dtype dt, uint32_t shift,
                                                             uint32_t *restrict hist,
                                                             const float *restrict x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        hist[ms__sel_key(dt, x[i]) >> shift]++;
}

/* BF16: the bin is the magnitude's bit pattern (NaN payloads in bins above
 * 0x7f80: see the top), four independent loads per step. */
static void count_bf16(uint32_t *restrict hist, const float *restrict x, size_t n)
{
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t a = ms_f32_bits(x[i]) >> 16 & 0x7fffu, b = ms_f32_bits(x[i + 1]) >> 16 & 0x7fffu;
        uint32_t c = ms_f32_bits(x[i + 2]) >> 16 & 0x7fffu, d = ms_f32_bits(x[i + 3]) >> 16 & 0x7fffu;
        hist[a]++;
        hist[b]++;
        hist[c]++;
        hist[d]++;
    }
    for (; i < n; i++)
        hist[ms_f32_bits(x[i]) >> 16 & 0x7fffu]++;
}

void ms__sel_count(const struct ms__sel *s, uint32_t *restrict hist, const float *restrict x,
                   size_t n)
{
    assert(s->phase == MS__SEL_HIST);
    switch (s->dt) {
    case MS_DT_BF16:
        count_bf16(hist, x, n);
        break;
    case MS_DT_F16:
        count_body(MS_DT_F16, 0, hist, x, n);
        break;
    default:
        if (s->level == 0) {
            count_body(MS_DT_F32, 16, hist, x, n);
        } else {
            const uint32_t hi = s->hi;
            for (size_t i = 0; i < n; i++) {
                uint32_t key = ms__sel_key(MS_DT_F32, x[i]);
                hist[key & 0xffffu] += (key >> 16) == hi;
            }
        }
        break;
    }
}

/* The accumulator holds uint32 counts while the stream has fewer than 2^32
 * elements: a bin never counts more than n elements, so it cannot wrap. */
static bool sel_narrow(const struct ms__sel *s)
{
    return s->n < ((uint64_t)1 << 32);
}

/* The narrow accumulator's records area (the uint64 accumulator's second half
 * seen as uint32: ms__sel_hist_len(dt) words). The uint64 array is only
 * accessed as uint32 while narrow (and memset), so no object is read through
 * the other type. */
static uint32_t *sel_records(const struct ms__sel *s, uint64_t *acc)
{
    return (uint32_t *)acc + ms__sel_hist_len(s->dt);
}

void ms__sel_fold_hist(const struct ms__sel *s, uint64_t *restrict acc,
                       const uint32_t *restrict part)
{
    size_t bins = ms__sel_bins(s);
    if (sel_narrow(s)) {
        uint32_t *restrict a = (uint32_t *)acc;
        for (size_t b = 0; b < bins; b++)
            a[b] += part[b];
        return;
    }
    for (size_t b = 0; b < bins; b++)
        acc[b] += part[b];
}

uint64_t ms__sel_share(const struct ms__sel *s, uint64_t folded)
{
    /* (k - above) <= n and folded <= n: the product fits while n < 2^32. */
    if (!sel_narrow(s) || s->n == 0)
        return 0;
    return (s->k - s->above) * MS_MIN(folded, s->n) / s->n;
}

/*
 * Records of the chunks' ties (narrow accumulator, final level, not an order
 * statistic). Layout of the records area, uint32 words:
 *   [0] W, window bins per record (0: no records in this pass)
 *   [1] records written, [2] first element of the next chunk expected
 *   then per chunk in chunk order: first element, lo, counts of bins [lo, lo+W)
 * W is fixed at chunk 0 from the chunk count its size implies; a chunk that
 * does not fit is not recorded, nor is any after it.
 */
#define SEL_REC_HDR 3u
#define SEL_REC_MIN 16u /* smallest useful window: fewer bins and the tie pass runs */

void ms__sel_fold_hist_at(const struct ms__sel *s, uint64_t *restrict acc,
                          const uint32_t *restrict part, uint64_t first, uint64_t count,
                          uint64_t want)
{
    ms__sel_fold_hist(s, acc, part);
    if (!sel_narrow(s) || s->exact || (s->dt == MS_DT_F32 && s->level == 0) || count == 0)
        return;
    const uint32_t room = (uint32_t)ms__sel_hist_len(s->dt);
    const uint32_t bins = (uint32_t)ms__sel_bins(s);
    uint32_t *rec = sel_records(s, acc);
    if (first == 0) {
        uint64_t chunks = (s->n + count - 1) / count;
        uint64_t per = (room - SEL_REC_HDR) / chunks;
        rec[0] = per >= 2 + SEL_REC_MIN ? (uint32_t)MS_MIN(per - 2, (uint64_t)bins) : 0;
        rec[1] = 0;
        rec[2] = 0;
    }
    const uint32_t w = rec[0];
    if (w == 0 || first != rec[2])
        return;
    uint64_t used = SEL_REC_HDR + (uint64_t)rec[1] * (w + 2);
    if (used + w + 2 > room) {
        rec[2] = UINT32_MAX; /* no room: this chunk and the later ones go unrecorded */
        return;
    }
    /* Predicted threshold bin: where the count from the top of the histogram
     * folded so far reaches want (at least 1). */
    const uint32_t *a = (const uint32_t *)acc;
    uint64_t target = MS_MAX(want, (uint64_t)1), cum = 0;
    uint32_t p = bins;
    while (p > 0 && cum < target)
        cum += a[--p];
    uint32_t lo = p > w / 2 ? p - w / 2 : 0;
    lo = MS_MIN(lo, bins - w);
    uint32_t *r = rec + used;
    r[0] = (uint32_t)first;
    r[1] = lo;
    memcpy(r + 2, part + lo, (size_t)w * sizeof(*part));
    rec[1]++;
    rec[2] = (uint32_t)(first + count);
}

/* Folds the recorded tie counts of bin `bin` (the level's bin of T) in chunk
 * order, as the tie pass would; leaves the TIES phase for DONE when they
 * locate the cut, or resets the fold for the tie pass. */
static void sel_ties_from_records(struct ms__sel *s, uint32_t bin, const uint32_t *rec)
{
    const uint32_t w = rec[0], nrec = rec[1];
    /* BF16's NaN key holds the raw bins 0x7f81..0x7fff: not one recorded bin. */
    if (w != 0 && !(s->dt == MS_DT_BF16 && bin > 0x7f80u)) {
        const uint32_t *r = rec + SEL_REC_HDR;
        for (uint32_t i = 0; i < nrec && !s->located; i++, r += w + 2) {
            if (bin < r[1] || bin - r[1] >= w)
                break; /* T outside this chunk's window */
            ms__sel_fold_ties(s, r[0], r[2 + (bin - r[1])]);
        }
        if (s->located) {
            s->phase = MS__SEL_DONE;
            return;
        }
    }
    s->seen = 0;
    s->located = false;
}

/* Enters the tie phase for threshold key T, or finishes when every tie is in
 * or the records (NULL: none) locate the cut. */
static void sel_set_threshold(struct ms__sel *s, uint32_t key, uint64_t need, uint64_t at,
                              uint32_t bin, const uint32_t *rec)
{
    s->key = key;
    s->need = need;
    s->at = at;
    if (need == at) {
        s->all_ties = true;
        s->phase = MS__SEL_DONE;
        return;
    }
    /* The cut sits between tie ranks cut-1 and cut in ascending index order:
     * the low side is selected unless higher indices rank first. */
    s->all_ties = false;
    s->cut = s->high_first ? at - need : need;
    s->seen = 0;
    s->located = false;
    s->phase = MS__SEL_TIES;
    if (rec)
        sel_ties_from_records(s, bin, rec);
}

/* First raw bin that count_bf16 fills with NaNs (through the NaN key 0x7fff),
 * or 0 when the current level's bins are keys already. */
static uint32_t sel_nan_bins(const struct ms__sel *s)
{
    return s->dt == MS_DT_BF16 ? 0x7f81u : 0u;
}

void ms__sel_end_hist(struct ms__sel *s, uint64_t *acc)
{
    assert(s->phase == MS__SEL_HIST);
    const bool narrow = sel_narrow(s);
    uint32_t *a32 = (uint32_t *)acc;
#define SEL_BIN(b) (narrow ? (uint64_t)a32[b] : acc[b])
    size_t bins = ms__sel_bins(s);
    uint32_t nan0 = sel_nan_bins(s);
    if (nan0) {
        for (uint32_t b = nan0; b < 0x7fffu; b++) {
            if (narrow) {
                a32[0x7fff] += a32[b]; /* at most n in all: no wrap */
                a32[b] = 0;
            } else {
                acc[0x7fff] += acc[b];
                acc[b] = 0;
            }
        }
    }
    uint64_t target = s->k - s->above; /* elements still to select at this level */
    uint64_t cum = 0;
    size_t b = bins;
    /* Scan from the top: b is the bin where the running count reaches target.
     * target >= 1 and the bins hold >= target elements, so the loop stops. */
    while (b-- > 0) {
        if (cum + SEL_BIN(b) >= target)
            break;
        cum += SEL_BIN(b);
    }
    assert(b < bins && target > cum);
    uint64_t at = SEL_BIN(b), need = target - cum;
#undef SEL_BIN
    s->above += cum;
    const uint32_t *rec = narrow ? sel_records(s, acc) : NULL;

    if (s->dt != MS_DT_F32) {
        sel_set_threshold(s, (uint32_t)b, need, at, (uint32_t)b, rec);
    } else if (s->level == 0) {
        if (need == at && !s->exact) {
            /* The whole high bin is selected: key >= b << 16, no second level. */
            s->key = (uint32_t)b << 16;
            s->need = s->at = 0;
            s->all_ties = true;
            s->phase = MS__SEL_DONE;
        } else {
            s->hi = (uint32_t)b;
            s->level = 1;
        }
    } else {
        sel_set_threshold(s, s->hi << 16 | (uint32_t)b, need, at, (uint32_t)b, rec);
    }
    /* The histogram, and when narrow the records after their use. */
    memset(acc, 0, narrow ? ms__sel_hist_len(s->dt) * sizeof(*acc) : bins * sizeof(*acc));
}

static inline __attribute__((always_inline)) uint64_t ties_body(enum ms_dtype dt, uint32_t key,
                                                                 const float *restrict x, size_t n)
{
    uint64_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ms__sel_key(dt, x[i]) == key;
    return c;
}

static uint64_t ties_c(enum ms_dtype dt, uint32_t key, const float *restrict x, size_t n)
{
    switch (dt) {
    case MS_DT_BF16: return ties_body(MS_DT_BF16, key, x, n);
    case MS_DT_F16: return ties_body(MS_DT_F16, key, x, n);
    default: return ties_body(MS_DT_F32, key, x, n);
    }
}

void ms__sel_fold_ties(struct ms__sel *s, uint64_t first, uint64_t ties)
{
    assert(s->phase == MS__SEL_TIES);
    if (!s->located && s->seen + ties >= s->cut) {
        s->cut_first = first;
        s->cut_r = s->cut - s->seen;
        s->located = true;
    }
    s->seen += ties;
}

void ms__sel_end_ties(struct ms__sel *s)
{
    assert(s->phase == MS__SEL_TIES && s->located && s->seen == s->at);
    s->phase = MS__SEL_DONE;
}

/* ------------------------------------------------------------------------ */
/* Apply                                                                     */

/* keep[i] = key > T || (key == T && tie), tie constant over the run. */
static inline __attribute__((always_inline)) void mask_body(enum ms_dtype dt, uint32_t key,
                                                            bool tie, const float *restrict x,
                                                            float *restrict keep, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t k = ms__sel_key(dt, x[i]);
        keep[i] = (k > key || (k == key && tie)) ? 1.0f : 0.0f;
    }
}

static void mask_c(enum ms_dtype dt, uint32_t key, bool tie, const float *restrict x,
                   float *restrict keep, size_t n)
{
    switch (dt) {
    case MS_DT_BF16:
        mask_body(MS_DT_BF16, key, tie, x, keep, n);
        break;
    case MS_DT_F16:
        mask_body(MS_DT_F16, key, tie, x, keep, n);
        break;
    default:
        mask_body(MS_DT_F32, key, tie, x, keep, n);
        break;
    }
}

/*
 * The versions of ms_isa.h of the two vectorisable leaf loops (the tie count
 * and the mask of a chunk without the cut): the same C compiled for each
 * target with the body inlined (integer keys: no value can change).
 */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"), flatten)) static uint64_t
ties_avx2(enum ms_dtype dt, uint32_t key, const float *restrict x, size_t n)
{
    return ties_c(dt, key, x, n);
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"), flatten)) static uint64_t
ties_avx512(enum ms_dtype dt, uint32_t key, const float *restrict x, size_t n)
{
    return ties_c(dt, key, x, n);
}

__attribute__((target("avx2"), flatten)) static void
mask_avx2(enum ms_dtype dt, uint32_t key, bool tie, const float *restrict x, float *restrict keep,
          size_t n)
{
    mask_c(dt, key, tie, x, keep, n);
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"), flatten)) static void
mask_avx512(enum ms_dtype dt, uint32_t key, bool tie, const float *restrict x,
            float *restrict keep, size_t n)
{
    mask_c(dt, key, tie, x, keep, n);
}
#define SEL_ISA(f, ...)                                                                            \
    (ms_isa_active() == MS_ISA_AVX512 ? f##_avx512(__VA_ARGS__)                                    \
     : ms_isa_active() == MS_ISA_AVX2 ? f##_avx2(__VA_ARGS__)                                      \
                                      : f##_c(__VA_ARGS__))
#else
#define SEL_ISA(f, ...) f##_c(__VA_ARGS__)
#endif

uint64_t ms__sel_count_ties(const struct ms__sel *s, const float *restrict x, size_t n)
{
    assert(s->phase == MS__SEL_TIES);
    return SEL_ISA(ties, s->dt, s->key, x, n);
}

void ms__sel_mask(const struct ms__sel *s, uint64_t chunk_first, uint64_t *run,
                  const float *restrict x, float *restrict keep, size_t n)
{
    assert(s->phase == MS__SEL_DONE);
    if (s->all_ties || chunk_first != s->cut_first) {
        /* Every tie of this chunk is on one side of the cut. */
        bool tie = s->all_ties || ((chunk_first < s->cut_first) != s->high_first);
        SEL_ISA(mask, s->dt, s->key, tie, x, keep, n);
        return;
    }
    /* The chunk holding the cut: its first cut_r ties are the low side. A run
     * of elements wholly before or after the cut takes the vector mask; only
     * the run where the tie count crosses cut_r is decided element by element. */
    const uint32_t key = s->key;
    const enum ms_dtype dt = s->dt;
    uint64_t r = *run;
    if (r >= s->cut_r) {
        SEL_ISA(mask, dt, key, s->high_first, x, keep, n); /* past the cut: r stays past it */
        return;
    }
    uint64_t t = SEL_ISA(ties, dt, key, x, n);
    if (r + t <= s->cut_r) {
        SEL_ISA(mask, dt, key, !s->high_first, x, keep, n);
        *run = r + t;
        return;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t k = ms__sel_key(dt, x[i]);
        bool sel = k > key;
        if (k == key)
            sel = (r++ < s->cut_r) != s->high_first;
        keep[i] = sel ? 1.0f : 0.0f;
    }
    *run = r;
}

/* A selection as a key bound: key >= bound where the tie side is `tie`
 * (key == T selected or not). T + 1 cannot wrap: T is UINT32_MAX only for
 * k == 0, whose every tie side is "selected" (all_ties). */
static uint32_t sel_bound(const struct ms__sel *s, bool tie)
{
    assert(tie || s->key != UINT32_MAX);
    return tie ? s->key : s->key + 1u;
}

uint64_t ms__sel_bounds(const struct ms__sel *s, uint64_t chunk_first, uint32_t lo[2])
{
    assert(s->phase == MS__SEL_DONE);
    if (s->all_ties || chunk_first != s->cut_first) {
        lo[0] = lo[1] = sel_bound(s, s->all_ties || ((chunk_first < s->cut_first) != s->high_first));
        return 0;
    }
    lo[0] = sel_bound(s, !s->high_first); /* ties ranked below cut_r */
    lo[1] = sel_bound(s, s->high_first);
    return s->cut_r;
}

size_t ms__sel_cut_pos(const struct ms__sel *s, uint64_t cut_r, uint64_t *run,
                       const float *restrict x, size_t n, bool *found)
{
    assert(s->phase == MS__SEL_DONE && cut_r > 0);
    uint64_t r = *run;
    *found = true;
    if (r >= cut_r)
        return 0;
    uint64_t t = SEL_ISA(ties, s->dt, s->key, x, n);
    if (r + t < cut_r) {
        *run = r + t;
        *found = false;
        return n;
    }
    size_t i = 0;
    for (; r < cut_r; i++) /* the block holds the cut_r-th tie: the loop stops */
        r += ms__sel_key(s->dt, x[i]) == s->key;
    *run = r;
    return i;
}
