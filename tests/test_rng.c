/*
 * test_rng.c - the counter-based generator and the tensor-name hash
 * (stages/rng.c): purity, statistical sanity, pinned values.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ms_stage.h"

Test(rng, fnv1a_known_vectors)
{
    cr_assert_eq(ms_hash_str(""), UINT64_C(0xcbf29ce484222325));
    cr_assert_eq(ms_hash_str("a"), UINT64_C(0xaf63dc4c8601ec8c));
    cr_assert_eq(ms_hash_str("foobar"), UINT64_C(0x85944171f73967e8));
}

Test(rng, pure_and_keyed)
{
    uint64_t key = ms_hash_str("model.layers.0.mlp.up_proj.weight");
    uint32_t v = ms_rng_u32(42, key, 1, 123456789);
    cr_assert_eq(ms_rng_u32(42, key, 1, 123456789), v);
    /* each argument matters */
    cr_assert_neq(ms_rng_u32(43, key, 1, 123456789), v);
    cr_assert_neq(ms_rng_u32(42, key + 1, 1, 123456789), v);
    cr_assert_neq(ms_rng_u32(42, key, 2, 123456789), v);
    cr_assert_neq(ms_rng_u32(42, key, 1, 123456790), v);
}

/* Pinned outputs: these values are part of the merged bytes of random methods.
 * If this test fails the generator changed, and so did every DARE/DELLA output. */
Test(rng, pinned_values)
{
    static const struct { uint64_t seed, key; uint32_t model; uint64_t el; uint32_t v; } pin[] = {
        { UINT64_C(0x0), UINT64_C(0x0), 0, UINT64_C(0), 0x386382c9u },
        { UINT64_C(0x0), UINT64_C(0x0), 0, UINT64_C(1), 0xf707c888u },
        { UINT64_C(0x2a), UINT64_C(0x0), 0, UINT64_C(0), 0xdf39da34u },
        { UINT64_C(0x2a), UINT64_C(0xcbf29ce484222325), 1, UINT64_C(1000), 0xfc759271u },
        { UINT64_C(0x1), UINT64_C(0x2), 3, UINT64_C(4), 0xf0f5a445u },
        { UINT64_C(0xffffffffffffffff), UINT64_C(0x1234567890abcdef), 15, UINT64_C(1099511627783), 0x83a57d21u },
    };
    for (size_t i = 0; i < sizeof(pin) / sizeof(pin[0]); i++)
        cr_assert_eq(ms_rng_u32(pin[i].seed, pin[i].key, pin[i].model, pin[i].el), pin[i].v,
                     "pin %zu: 0x%08x", i,
                     ms_rng_u32(pin[i].seed, pin[i].key, pin[i].model, pin[i].el));
}

/* Mean and a chi-square of the low byte, the high byte and the middle bits over
 * 4M draws in each of several streams (consecutive elements, as masks use them). */
Test(rng, uniformity)
{
    enum { N = 1 << 22, BINS = 256 };
    static const struct { uint64_t seed; uint32_t model; const char *name; } streams[] = {
        { 0, 0, "embed" }, { 1, 3, "embed" }, { 42, 1, "model.layers.7.self_attn.q_proj.weight" },
    };
    for (size_t s = 0; s < sizeof(streams) / sizeof(streams[0]); s++) {
        uint64_t key = ms_hash_str(streams[s].name);
        static uint32_t lo[BINS], hi[BINS], mid[BINS];
        memset(lo, 0, sizeof(lo));
        memset(hi, 0, sizeof(hi));
        memset(mid, 0, sizeof(mid));
        double sum = 0;
        uint64_t ones = 0;
        for (uint64_t e = 0; e < N; e++) {
            uint32_t v = ms_rng_u32(streams[s].seed, key, streams[s].model, e);
            sum += v * 0x1p-32;
            lo[v & 0xff]++;
            hi[v >> 24]++;
            mid[(v >> 12) & 0xff]++;
            ones += v & 1;
        }
        double mean = sum / N;
        /* sd of the mean of U(0,1) over N draws: 1/sqrt(12N) ~ 1.4e-4 */
        cr_assert(fabs(mean - 0.5) < 6 * sqrt(1.0 / (12.0 * N)), "stream %zu mean %f", s, mean);
        const uint32_t *h[3] = { lo, hi, mid };
        for (int k = 0; k < 3; k++) {
            double chi = 0, expect = (double)N / BINS;
            for (int b = 0; b < BINS; b++)
                chi += (h[k][b] - expect) * (h[k][b] - expect) / expect;
            /* 255 degrees of freedom: mean 255, sd ~22.6; 6 sd either side */
            cr_assert(chi > 255 - 6 * 22.6 && chi < 255 + 6 * 22.6, "stream %zu hist %d chi2 %f",
                      s, k, chi);
        }
        cr_assert(fabs((double)ones / N - 0.5) < 6 * 0.5 / sqrt((double)N));
    }
}

/* Neighbouring streams are not correlated: model m and m+1 at the same element. */
Test(rng, streams_uncorrelated)
{
    enum { N = 1 << 20 };
    uint64_t key = ms_hash_str("w");
    double sxy = 0;
    uint64_t same_bit = 0;
    for (uint64_t e = 0; e < N; e++) {
        uint32_t a = ms_rng_u32(7, key, 0, e), b = ms_rng_u32(7, key, 1, e);
        sxy += (a * 0x1p-32 - 0.5) * (b * 0x1p-32 - 0.5);
        same_bit += ((a ^ b) & 1) == 0;
    }
    /* correlation estimate: sd 1/sqrt(N) after scaling by variance 1/12 */
    double corr = sxy / N * 12;
    cr_assert(fabs(corr) < 6 / sqrt((double)N), "corr %f", corr);
    cr_assert(fabs((double)same_bit / N - 0.5) < 6 * 0.5 / sqrt((double)N));
}

/* The run kernel draws the same values as the per-element function, for any
 * start and length (masks use both: runs in dare, single elements in della). */
Test(rng, fill_matches_u32)
{
    static const struct { uint64_t seed, key; uint32_t model; uint64_t first; } s[] = {
        { 0, 0, 0, 0 }, { 42, UINT64_C(0xcbf29ce484222325), 1, 1000 },
        { UINT64_MAX, UINT64_C(0x1234567890abcdef), 15, UINT64_C(1099511627775) },
        { 7, 9, 3, UINT64_MAX - 40 }, /* the counter wraps as in ms_rng_u32 */
    };
    uint32_t out[301];
    for (size_t k = 0; k < sizeof(s) / sizeof(s[0]); k++) {
        uint64_t st = ms_rng_stream(s[k].seed, s[k].key, s[k].model);
        for (size_t n = 0; n <= 301; n += 37) {
            memset(out, 0xa5, sizeof(out));
            ms_rng_fill(st, s[k].first, out, n);
            for (size_t i = 0; i < n; i++)
                cr_assert_eq(out[i], ms_rng_u32(s[k].seed, s[k].key, s[k].model, s[k].first + i),
                             "stream %zu n %zu i %zu", k, n, i);
            if (n < 301)
                cr_assert_eq(out[n], 0xa5a5a5a5u, "wrote past n");
        }
    }
}
