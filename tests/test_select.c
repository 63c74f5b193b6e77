/*
 * test_select.c - exact streaming top-k by magnitude (stages/select.c).
 *
 * Every selection is checked against a full sort of (|x|, index) pairs with the
 * index as tiebreak (lower index first, or higher first for high_first),
 * written here independently, on data with many equal magnitudes, in BF16, F16
 * and F32, with random k and several chunkings (1, 7, 100, numel, random).
 * The test drives the protocol as the engine does: partials reduced per chunk
 * in reverse order, folds strictly in chunk order.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../stages/stage_impl.h"
#include "ms_dtype.h"

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

static uint64_t rnd_next(uint64_t *s)
{
    /* xorshift64* */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static double rnd_unit(uint64_t *s) { return (double)(rnd_next(s) >> 11) * 0x1p-53; }

static float round_to(enum ms_dtype dt, float v)
{
    if (dt == MS_DT_BF16)
        return ms_round_bf16_1(v);
    if (dt == MS_DT_F16)
        return (float)(_Float16)v;
    return v;
}

/* Reference order: NaN above everything, then |x| descending, then index. */
static const float *g_x;
static int g_high_first;

static int ref_cmp(const void *pa, const void *pb)
{
    uint32_t a = *(const uint32_t *)pa, b = *(const uint32_t *)pb;
    float xa = fabsf(g_x[a]), xb = fabsf(g_x[b]);
    int na = isnan(xa), nb = isnan(xb);
    if (na != nb)
        return na ? -1 : 1;
    if (!na && xa != xb)
        return xa > xb ? -1 : 1;
    if (a == b)
        return 0;
    return ((a < b) != g_high_first) ? -1 : 1;
}

/* keep[i] = 1 for the first k elements of the reference order. */
static void ref_select(const float *x, uint32_t n, uint32_t k, int high_first, unsigned char *keep)
{
    uint32_t *idx = malloc((size_t)n * sizeof(*idx));
    cr_assert(idx);
    for (uint32_t i = 0; i < n; i++)
        idx[i] = i;
    g_x = x;
    g_high_first = high_first;
    qsort(idx, n, sizeof(*idx), ref_cmp);
    memset(keep, 0, n);
    for (uint32_t i = 0; i < k; i++)
        keep[idx[i]] = 1;
    free(idx);
}

/* How drive folds the histograms. */
enum fold_mode {
    FOLD_ANY,   /* ms__sel_fold_hist, chunks in reverse order: no records, tie pass */
    FOLD_AT,    /* ms__sel_fold_hist_at in chunk order: the tie pass only as fallback */
};

/* Runs a selection over x as the engine would, with chunk 0 of first0
 * elements (0: chunk) and the others of chunk, and writes the 0/1 mask.
 * Returns the number of passes. */
static unsigned drive_fold(struct ms__sel *s, const float *x, uint64_t n, uint64_t first0,
                           uint64_t chunk, enum fold_mode mode, float *keep)
{
    if (first0 == 0 || first0 > n)
        first0 = MS_MIN(chunk, n);
    uint64_t nchunks = n == 0 ? 0 : 1 + (n - first0 + chunk - 1) / chunk;
#define CHUNK_FIRST(c) ((c) == 0 ? 0 : first0 + ((c) - 1) * chunk)
#define CHUNK_COUNT(c) MS_MIN((c) == 0 ? first0 : chunk, n - CHUNK_FIRST(c))
    size_t len = ms__sel_hist_len(s->dt);
    uint64_t *acc = calloc(len, sizeof(*acc));
    uint32_t *part = malloc(len * sizeof(*part));
    uint64_t *ties = malloc((size_t)(nchunks ? nchunks : 1) * sizeof(*ties));
    cr_assert(acc && part && ties);
    unsigned passes = 0;
    while (ms__sel_phase(s) != MS__SEL_DONE) {
        cr_assert(passes < 3, "more than three passes");
        if (ms__sel_phase(s) == MS__SEL_HIST) {
            for (uint64_t i = 0; i < nchunks; i++) {
                uint64_t c = mode == FOLD_ANY ? nchunks - 1 - i : i;
                uint64_t first = CHUNK_FIRST(c), cnt = CHUNK_COUNT(c);
                memset(part, 0, ms__sel_bins(s) * sizeof(*part));
                ms__sel_count(s, part, x + first, (size_t)cnt);
                if (mode == FOLD_ANY)
                    ms__sel_fold_hist(s, acc, part);
                else
                    ms__sel_fold_hist_at(s, acc, part, first, cnt,
                                         ms__sel_share(s, first + cnt));
            }
            ms__sel_end_hist(s, acc);
            for (size_t b = 0; b < len; b++)
                cr_assert_eq(acc[b], 0, "accumulator not cleared");
        } else {
            for (uint64_t c = nchunks; c-- > 0;) {
                uint64_t first = CHUNK_FIRST(c), cnt = CHUNK_COUNT(c);
                /* Counted in two halves to check that counts are additive. */
                size_t h = (size_t)cnt / 2;
                ties[c] = ms__sel_count_ties(s, x + first, h) +
                          ms__sel_count_ties(s, x + first + h, (size_t)cnt - h);
            }
            for (uint64_t c = 0; c < nchunks; c++)
                ms__sel_fold_ties(s, CHUNK_FIRST(c), ties[c]);
            ms__sel_end_ties(s);
        }
        passes++;
    }
    /* Apply in reverse chunk order, each chunk in uneven pieces. */
    for (uint64_t c = nchunks; c-- > 0;) {
        uint64_t first = CHUNK_FIRST(c), cnt = CHUNK_COUNT(c), run = 0;
        for (uint64_t off = 0; off < cnt;) {
            uint64_t piece = MS_MIN(cnt - off, 1 + (off % 5) * 3);
            ms__sel_mask(s, first, &run, x + first + off, keep + first + off, (size_t)piece);
            off += piece;
        }
    }
#undef CHUNK_FIRST
#undef CHUNK_COUNT
    free(acc);
    free(part);
    free(ties);
    return passes;
}

/* The selection of k with high_first hf over x, folded both ways: the masks
 * must be the same, and so must the cut (key, chunk, rank); returns the
 * passes of each in *p_any, *p_at. */
static void drive_both(enum ms_dtype dt, const float *x, uint64_t n, uint64_t k, bool hf,
                       uint64_t first0, uint64_t chunk, float *keep, unsigned *p_any,
                       unsigned *p_at)
{
    struct ms__sel a, b;
    float *keep_any = malloc((n ? n : 1) * sizeof(float));
    cr_assert(keep_any);
    ms__sel_init(&a, dt, n, k, hf);
    ms__sel_init(&b, dt, n, k, hf);
    *p_any = drive_fold(&a, x, n, first0, chunk, FOLD_ANY, keep_any);
    *p_at = drive_fold(&b, x, n, first0, chunk, FOLD_AT, keep);
    cr_assert(!memcmp(keep, keep_any, n * sizeof(float)),
              "%s n %llu k %llu chunk %llu/%llu: the recorded cut selects other elements",
              ms_dtype_name(dt), (unsigned long long)n, (unsigned long long)k,
              (unsigned long long)first0, (unsigned long long)chunk);
    cr_assert_eq(a.key, b.key);
    cr_assert_eq(a.all_ties, b.all_ties);
    if (!a.all_ties) {
        cr_assert_eq(a.cut_first, b.cut_first);
        cr_assert_eq(a.cut_r, b.cut_r);
    }
    cr_assert(*p_at <= *p_any);
    free(keep_any);
}

static unsigned drive(struct ms__sel *s, const float *x, uint64_t n, uint64_t chunk, float *keep)
{
    return drive_fold(s, x, n, 0, chunk, FOLD_AT, keep);
}

/* Values of dt with many equal magnitudes: a small pool of magnitudes, random
 * signs and zeros; for F32 the pool shares high 16 bits, so the second level
 * and its ties matter. special adds +-Inf and NaN. */
static void gen(enum ms_dtype dt, uint64_t *rs, float *x, uint32_t n, int special)
{
    uint32_t npool = 1 + (uint32_t)(rnd_next(rs) % 40);
    float pool[40];
    uint32_t hi = 0x3c00u + (uint32_t)(rnd_next(rs) % 0x400u); /* shared F32 high half */
    for (uint32_t p = 0; p < npool; p++) {
        float v;
        if (dt == MS_DT_F32 && (rnd_next(rs) & 1))
            v = ms_f32_from_bits(hi << 16 | (uint32_t)(rnd_next(rs) % 64u) << 4);
        else if (dt == MS_DT_F16 && (rnd_next(rs) & 3) == 0)
            v = (float)(rnd_next(rs) % 1024u) * 0x1p-24f; /* subnormal f16 */
        else
            v = (float)(rnd_unit(rs) * pow(2.0, (double)(rnd_next(rs) % 20) - 10.0));
        pool[p] = round_to(dt, v);
    }
    for (uint32_t i = 0; i < n; i++) {
        uint64_t r = rnd_next(rs);
        float v = (r % 7 == 0) ? 0.0f : pool[(r >> 8) % npool];
        if (special && (r >> 40) % 50 == 0)
            v = (r >> 50) & 1 ? INFINITY : NAN;
        x[i] = (r >> 60) & 1 ? -v : v;
    }
}

static void check_case(enum ms_dtype dt, uint64_t seed, int special)
{
    uint64_t rs = seed;
    uint32_t n = 1 + (uint32_t)(rnd_next(&rs) % 600);
    float *x = malloc(n * sizeof(float)), *keep = malloc(n * sizeof(float));
    unsigned char *want = malloc(n);
    cr_assert(x && keep && want);
    gen(dt, &rs, x, n, special);
    uint64_t chunks[5] = { 1, 7, 100, n, 1 + rnd_next(&rs) % n };
    for (int hf = 0; hf < 2; hf++) {
        uint32_t ks[4] = { (uint32_t)(rnd_next(&rs) % (n + 1)), (uint32_t)(rnd_next(&rs) % (n + 1)),
                           1, n - 1 };
        for (int ki = 0; ki < 4; ki++) {
            uint32_t k = ks[ki];
            ref_select(x, n, k, hf, want);
            for (int ci = 0; ci < 5; ci++) {
                if (chunks[ci] == 1 && n > 150)
                    continue; /* per-chunk histogram folds make tiny chunks slow */
                unsigned passes, passes_any;
                drive_both(dt, x, n, k, hf, 0, chunks[ci], keep, &passes_any, &passes);
                uint64_t kept = 0;
                for (uint32_t i = 0; i < n; i++) {
                    cr_assert(keep[i] == 0.0f || keep[i] == 1.0f);
                    kept += keep[i] == 1.0f;
                    cr_assert_eq(keep[i] == 1.0f, want[i] == 1,
                                 "%s seed %llu n %u k %u high_first %d chunk %llu: element %u "
                                 "(%a) %s but should not be",
                                 ms_dtype_name(dt), (unsigned long long)seed, n, k, hf,
                                 (unsigned long long)chunks[ci], i, x[i],
                                 keep[i] == 1.0f ? "kept" : "dropped");
                }
                cr_assert_eq(kept, k, "seed %llu: kept %llu of k %u", (unsigned long long)seed,
                             (unsigned long long)kept, k);
                unsigned maxp = (dt == MS_DT_F32 ? 2 : 1) + 1;
                cr_assert(passes <= maxp, "%u passes", passes);
            }
        }
    }
    free(x);
    free(keep);
    free(want);
}

/* ------------------------------------------------------------------------ */
/* Keys                                                                      */

Test(select, key_f16_is_the_bit_pattern)
{
    for (uint32_t h = 0; h < 0x8000u; h++) {
        float v = ms_f16_to_f32_1((uint16_t)h);
        uint32_t want = h > 0x7c00u ? 0x7fffu : h;
        cr_assert_eq(ms__sel_key(MS_DT_F16, v), want, "f16 %04x", h);
        cr_assert_eq(ms__sel_key(MS_DT_F16, -v), want, "f16 -%04x", h);
    }
}

Test(select, key_bf16_is_the_bit_pattern)
{
    for (uint32_t h = 0; h < 0x8000u; h++) {
        float v = ms_bf16_to_f32_1((uint16_t)h);
        uint32_t want = h > 0x7f80u ? 0x7fffu : h;
        cr_assert_eq(ms__sel_key(MS_DT_BF16, v), want, "bf16 %04x", h);
        cr_assert_eq(ms__sel_key(MS_DT_BF16, -v), want, "bf16 -%04x", h);
    }
}

Test(select, key_f32_orders_magnitudes)
{
    uint64_t rs = 12345;
    for (int i = 0; i < 100000; i++) {
        float a = ms_f32_from_bits((uint32_t)rnd_next(&rs)), b = ms_f32_from_bits((uint32_t)rnd_next(&rs));
        if (isnan(a) || isnan(b))
            continue;
        uint32_t ka = ms__sel_key(MS_DT_F32, a), kb = ms__sel_key(MS_DT_F32, b);
        cr_assert_eq(fabsf(a) < fabsf(b), ka < kb);
        cr_assert_eq(fabsf(a) == fabsf(b), ka == kb);
    }
    cr_assert_eq(ms__sel_key(MS_DT_F32, NAN), 0x7fffffffu);
    cr_assert_eq(ms__sel_key(MS_DT_F32, -INFINITY), 0x7f800000u);
}

/* ------------------------------------------------------------------------ */
/* Selection against a full sort                                             */

Test(select, bf16_matches_stable_sort) { for (uint64_t s = 1; s <= 16; s++) check_case(MS_DT_BF16, s * 7919, 0); }
Test(select, f16_matches_stable_sort) { for (uint64_t s = 1; s <= 16; s++) check_case(MS_DT_F16, s * 104729, 0); }
Test(select, f32_matches_stable_sort) { for (uint64_t s = 1; s <= 16; s++) check_case(MS_DT_F32, s * 1299709, 0); }

Test(select, inf_and_nan_rank_on_top)
{
    for (uint64_t s = 1; s <= 8; s++) {
        check_case(MS_DT_BF16, s * 31, 1);
        check_case(MS_DT_F16, s * 37, 1);
        check_case(MS_DT_F32, s * 41, 1);
    }
}

/* All elements equal: the answer is decided by the tie rule alone. Every
 * chunking here leaves room for records (at most 257 chunks), whose window
 * holds the one key: the recorded counts locate the cut, no tie pass. */
Test(select, all_equal_keeps_lowest_indices)
{
    enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    float x[257], keep[257];
    for (int d = 0; d < 3; d++) {
        for (int i = 0; i < 257; i++)
            x[i] = (i & 1) ? -0.5f : 0.5f;
        uint64_t chunks[4] = { 1, 7, 100, 257 };
        for (int ci = 0; ci < 4; ci++) {
            unsigned passes, passes_any;
            drive_both(dts[d], x, 257, 100, false, 0, chunks[ci], keep, &passes_any, &passes);
            cr_assert_eq(passes_any, dts[d] == MS_DT_F32 ? 3u : 2u);
            cr_assert_eq(passes, dts[d] == MS_DT_F32 ? 2u : 1u);
            for (int i = 0; i < 257; i++)
                cr_assert_eq(keep[i], i < 100 ? 1.0f : 0.0f, "chunk %llu element %d",
                             (unsigned long long)chunks[ci], i);
        }
    }
}

Test(select, trivial_k_needs_no_pass)
{
    float x[5] = { 1, -2, 0, 3, NAN }, keep[5];
    struct ms__sel s;
    ms__sel_init(&s, MS_DT_F32, 5, 0, false);
    cr_assert_eq(drive(&s, x, 5, 2, keep), 0u);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(keep[i], 0.0f);
    ms__sel_init(&s, MS_DT_BF16, 5, 9, false);
    cr_assert_eq(drive(&s, x, 5, 2, keep), 0u);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(keep[i], 1.0f);
}

/* F32 where the level-0 boundary bin is taken whole: no second level, no ties. */
Test(select, f32_whole_high_bin_skips_second_level)
{
    float x[6] = { 3.0f, 1.0f, 1.0000001f, 2.0f, 1.0000002f, 0.5f }, keep[6];
    struct ms__sel s;
    ms__sel_init(&s, MS_DT_F32, 6, 2, false); /* 3 and 2 are alone in their bins */
    cr_assert_eq(drive(&s, x, 6, 4, keep), 1u);
    float want[6] = { 1, 0, 0, 1, 0, 0 };
    for (int i = 0; i < 6; i++)
        cr_assert_eq(keep[i], want[i], "element %d", i);
}

/*
 * Two-sided use (what breadcrumbs needs): keep ascending stable-sort positions
 * [n_bot, n - n_top) = in_top(n - n_bot) && !in_top(n_top), both with the
 * higher index ranking first among ties.
 */
Test(select, two_sided_matches_ascending_stable_sort)
{
    enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    for (uint64_t seed = 1; seed <= 20; seed++) {
        uint64_t rs = seed * 65537;
        enum ms_dtype dt = dts[seed % 3];
        uint32_t n = 1 + (uint32_t)(rnd_next(&rs) % 800);
        float *x = malloc(n * sizeof(float)), *a = malloc(n * sizeof(float)),
              *b = malloc(n * sizeof(float));
        uint32_t *idx = malloc(n * sizeof(uint32_t));
        gen(dt, &rs, x, n, 0);
        uint32_t n_top = (uint32_t)(rnd_next(&rs) % (n + 1));
        uint32_t n_bot = (uint32_t)(rnd_next(&rs) % (n - n_top + 1));
        /* Reference: ascending stable sort (ties: lower index first). */
        for (uint32_t i = 0; i < n; i++)
            idx[i] = i;
        g_x = x;
        g_high_first = 1; /* descending with high index first == reversed ascending stable */
        qsort(idx, n, sizeof(*idx), ref_cmp);
        /* idx is the descending order; ascending position of idx[j] is n-1-j. */
        unsigned char *want = calloc(n, 1);
        for (uint32_t j = 0; j < n; j++) {
            uint32_t pos = n - 1 - j;
            want[idx[j]] = pos >= n_bot && pos < n - n_top;
        }
        uint64_t chunk = 1 + rnd_next(&rs) % n;
        struct ms__sel top, mid;
        ms__sel_init(&top, dt, n, n_top, true);
        ms__sel_init(&mid, dt, n, n - n_bot, true);
        drive(&top, x, n, chunk, a);
        drive(&mid, x, n, chunk, b);
        for (uint32_t i = 0; i < n; i++)
            cr_assert_eq(b[i] == 1.0f && a[i] == 0.0f, want[i] == 1,
                         "seed %llu n %u n_top %u n_bot %u element %u",
                         (unsigned long long)seed, n, n_top, n_bot, i);
        free(x);
        free(a);
        free(b);
        free(idx);
        free(want);
    }
}

/* ------------------------------------------------------------------------ */
/* BF16 NaN payloads                                                         */

/*
 * Every bf16 NaN pattern, quiet and signalling, of either sign (0x7f81..0x7fff,
 * 0xff81..0xffff: 254 of them) ranks as the one NaN magnitude, above +-Inf:
 * among them only the index decides. The NaNs come first in ascending then
 * descending pattern order (so no payload is always the last NaN), then Infs
 * and finite values; k from 1 to past the NaNs (cuts next to each end of
 * either sign's run of payloads) is checked against the reference over
 * several chunkings.
 */
Test(select, bf16_every_nan_payload_ranks_as_nan)
{
    enum { NNAN = 254, N = NNAN + 40 };
    float x[N], keep[N];
    unsigned char want[N];
    for (int order = 0; order < 2; order++) {
        for (int i = 0; i < NNAN; i++) {
            uint32_t j = order ? (uint32_t)(NNAN - 1 - i) : (uint32_t)i;
            uint32_t h = (j < 127 ? 0x7f81u + j : 0xff81u + (j - 127)) << 16;
            x[i] = ms_f32_from_bits(h);
            cr_assert(isnan(x[i]));
        }
        for (int i = NNAN; i < N; i++)
            x[i] = i % 4 == 0 ? (i & 1 ? -INFINITY : INFINITY)
                              : ms_round_bf16_1((float)(i - NNAN) * (i & 1 ? -0.37f : 0.37f));
        uint64_t chunks[3] = { 7, 64, N };
        static const uint32_t ks[] = { 1, 2, 3, 64, 126, 127, 128, 129, 200, 252, 253, 254, 255,
                                       256, 266 };
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
            uint32_t k = ks[ki];
            ref_select(x, N, k, 0, want);
            for (int ci = 0; ci < 3; ci++) {
                unsigned p_any, p_at;
                drive_both(MS_DT_BF16, x, N, k, false, 0, chunks[ci], keep, &p_any, &p_at);
                for (int i = 0; i < N; i++)
                    cr_assert_eq(keep[i] == 1.0f, want[i] == 1,
                                 "order %d k %u chunk %llu: element %d (bf16 %04x) %s",
                                 order, k, (unsigned long long)chunks[ci], i,
                                 ms_f32_bits(x[i]) >> 16, keep[i] == 1.0f ? "kept" : "dropped");
            }
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Records of the histogram pass (the fused tie count)                        */

/*
 * Ties at the cut spread over many chunks: n values from a pool of three
 * magnitudes (and zeros), 1, 1 + 2^-7 and 1 + 2^-6 (neighbouring bf16 keys,
 * f16 keys 8 apart: inside every window, wherever a chunk predicts the
 * cut among them), k cutting through each, for
 * chunkings with room for records (hit: no tie pass) and without (more
 * chunks than the records area holds windows of SEL_REC_MIN bins: tie pass),
 * against the full sort and the unfused fold.
 */
Test(select, recorded_ties_across_chunks)
{
    enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    const uint32_t n = 12000;
    float *x = malloc(n * sizeof(float)), *keep = malloc(n * sizeof(float));
    unsigned char *want = malloc(n);
    cr_assert(x && keep && want);
    uint64_t rs = 4242;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t r = rnd_next(&rs) % 8;
        float v = r == 0 ? 0.0f : r < 3 ? 1.0f : r < 6 ? 1.0078125f : 1.015625f;
        x[i] = (rnd_next(&rs) & 1) ? -v : v;
    }
    /* Chunks of 4: 3000 chunks; the records area of the 16-bit types is
     * 32,768 words: (32768 - 3) / 3000 = 10 words each, below a record of a
     * 16-bin window (18 words): no records, the tie pass runs. F32's second
     * level has 65,536: 21 words, 19-bin windows: records. */
    const uint64_t chunks[] = { 4, 13, 100, 1000, 5999, n };
    const uint32_t ks[] = { 3000, 5000, 7777, 10000 };
    for (int d = 0; d < 3; d++) {
        for (size_t ki = 0; ki < MS_ARRAY_LEN(ks); ki++) {
            for (int hf = 0; hf < 2; hf++) {
                ref_select(x, n, ks[ki], hf, want);
                for (size_t ci = 0; ci < MS_ARRAY_LEN(chunks); ci++) {
                    unsigned p_any, p_at;
                    drive_both(dts[d], x, n, ks[ki], hf, 0, chunks[ci], keep, &p_any, &p_at);
                    for (uint32_t i = 0; i < n; i++)
                        cr_assert_eq(keep[i] == 1.0f, want[i] == 1, "element %u", i);
                    unsigned lv = dts[d] == MS_DT_F32 ? 2u : 1u;
                    cr_assert_eq(p_any, lv + 1);
                    bool tie_pass = chunks[ci] == 4 && dts[d] != MS_DT_F32;
                    cr_assert_eq(p_at, tie_pass ? lv + 1 : lv,
                                 "%s k %u chunk %llu: %u passes", ms_dtype_name(dts[d]), ks[ki],
                                 (unsigned long long)chunks[ci], p_at);
                }
            }
        }
    }
    free(x);
    free(keep);
    free(want);
}

/*
 * The threshold far from where the first chunks predict it: the first half
 * holds only large magnitudes, so chunk 0's window lies around them and misses
 * the final T (a small magnitude, 2^-20 below): the tie pass runs, with the
 * same answer. With the halves swapped, the windows of the chunks up to the
 * cut hold T: no tie pass.
 */
Test(select, recorded_window_missing_the_cut_falls_back)
{
    const uint32_t n = 4000;
    float x[4000], keep[4000];
    unsigned char want[4000];
    for (int swap = 0; swap < 2; swap++) {
        for (uint32_t i = 0; i < n; i++) {
            bool large = (i < n / 2) != swap;
            x[i] = large ? (float)(1 + i % 7) : 0x1p-20f;
        }
        for (int d = 0; d < 2; d++) {
            enum ms_dtype dt = d ? MS_DT_F16 : MS_DT_BF16;
            if (dt == MS_DT_F16)
                for (uint32_t i = 0; i < n; i++)
                    x[i] = x[i] == 0x1p-20f ? 0x1p-14f : x[i]; /* a normal f16 */
            /* k = 3000: all 2000 large ones and 1000 of the 2000 small ties. */
            ref_select(x, n, 3000, 0, want);
            unsigned p_any, p_at;
            drive_both(dt, x, n, 3000, false, 0, 100, keep, &p_any, &p_at);
            for (uint32_t i = 0; i < n; i++)
                cr_assert_eq(keep[i] == 1.0f, want[i] == 1, "swap %d element %u", swap, i);
            cr_assert_eq(p_any, 2u);
            cr_assert_eq(p_at, swap ? 1u : 2u, "swap %d: %u passes", swap, p_at);
        }
    }
}

/*
 * Room for records runs out: chunk 0 of 10 elements sizes the windows for
 * n / 10 = 200 chunks (163 words each, so 161-bin windows), the later chunks
 * of 1 element are 1990: the area holds (32768 - 3) / 163 = 201 records
 * (chunks 0..200, elements 0..209), and no chunk after them is recorded. All 2000 elements tie:
 * k = 150 puts the cut inside the recorded chunks (no tie pass), k = 1500
 * past them (tie pass).
 */
Test(select, records_out_of_room)
{
    float x[2000], keep[2000];
    for (int i = 0; i < 2000; i++)
        x[i] = i & 1 ? -3.0f : 3.0f;
    const uint32_t ks[2] = { 150, 1500 };
    for (int ki = 0; ki < 2; ki++) {
        unsigned p_any, p_at;
        drive_both(MS_DT_BF16, x, 2000, ks[ki], false, 10, 1, keep, &p_any, &p_at);
        for (uint32_t i = 0; i < 2000; i++)
            cr_assert_eq(keep[i], i < ks[ki] ? 1.0f : 0.0f, "k %u element %u", ks[ki], i);
        cr_assert_eq(p_any, 2u);
        cr_assert_eq(p_at, ki == 0 ? 1u : 2u, "k %u: %u passes", ks[ki], p_at);
    }
}

/*
 * The uint32 accumulator near its limit, by construction (no 4G-element
 * stream): the partials of two chunks are written directly, every element in
 * bin 5 (the bf16 subnormal 0x0005).
 * n = 2^32 - 1 (uint32 counts): chunk 0 holds 2^31, chunk 1 2^31 - 1
 * elements, the bin reaches 2^32 - 1 without wrapping. k = n - 1: at = n,
 * need = k, cut = k = 2^32 - 2; chunk 0's 2^31 ties are below it, so the cut
 * is in chunk 1 (first 2^31) at rank 2^32 - 2 - 2^31 = 2^31 - 2, found from
 * the records: no tie pass.
 * n = 2^32 + 1 (uint64 counts, no records): chunk 1 holds 2^31 + 1, the bin
 * 2^32 + 1 (uint32 would wrap to 1); k = 2^32: the tie pass is needed, its
 * fold puts the cut in chunk 1 at rank 2^32 - 2^31 = 2^31.
 */
Test(select, uint32_counts_up_to_the_limit)
{
    uint64_t *acc = calloc(ms__sel_hist_len(MS_DT_BF16), sizeof(*acc));
    uint32_t *part = calloc(32768, sizeof(*part));
    cr_assert(acc && part);
    const uint64_t h = (uint64_t)1 << 31;
    for (int wide = 0; wide < 2; wide++) {
        uint64_t n = wide ? ((uint64_t)1 << 32) + 1 : ((uint64_t)1 << 32) - 1;
        uint64_t c1 = n - h;
        struct ms__sel s;
        ms__sel_init(&s, MS_DT_BF16, n, n - 1, false);
        part[5] = (uint32_t)h;
        ms__sel_fold_hist_at(&s, acc, part, 0, h, ms__sel_share(&s, h));
        part[5] = (uint32_t)c1;
        ms__sel_fold_hist_at(&s, acc, part, h, c1, ms__sel_share(&s, n));
        ms__sel_end_hist(&s, acc);
        for (size_t b = 0; b < ms__sel_hist_len(MS_DT_BF16); b++)
            cr_assert_eq(acc[b], 0, "accumulator not cleared");
        cr_assert_eq(s.key, 5u);
        cr_assert_eq(s.at, n, "wide %d: at %llu", wide, (unsigned long long)s.at);
        cr_assert_eq(s.need, n - 1);
        if (wide) {
            cr_assert_eq(ms__sel_phase(&s), MS__SEL_TIES);
            ms__sel_fold_ties(&s, 0, h);
            ms__sel_fold_ties(&s, h, c1);
            ms__sel_end_ties(&s);
        }
        cr_assert_eq(ms__sel_phase(&s), MS__SEL_DONE);
        cr_assert_eq(s.cut_first, h);
        cr_assert_eq(s.cut_r, wide ? h : h - 2);
        /* The last two low-side ties of chunk 1 and the first high-side one. */
        float v = ms_f32_from_bits(0x00050000u), xs[3] = { v, -v, v }, keep[3];
        uint64_t run = s.cut_r - 2;
        ms__sel_mask(&s, h, &run, xs, keep, 3);
        cr_assert(keep[0] == 1.0f && keep[1] == 1.0f && keep[2] == 0.0f);
    }
    free(acc);
    free(part);
}
