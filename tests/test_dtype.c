/*
 * test_dtype.c - dtype names and the f16/bf16 conversion kernels (ms_dtype.h).
 *
 * Oracles independent of the code under test: for bf16 decode the bit shift
 * (uint32_t)h << 16; for f16 the compiler's _Float16 conversions (or, where
 * the compiler has no _Float16, ldexp and a nearest-candidate search); for
 * rounding to bf16 the nearest of the two neighbouring candidates, chosen by
 * comparing distances in double (ties to the even one). Random inputs come from a seeded
 * generator; the seed is printed so a failure can be replayed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ms_common.h"
#include "ms_dtype.h"

#define NPAT 65536u
#define NRANDOM 4000000u
#define SEED 0x5eed1234abcdull

/* ------------------------------------------------------------------ helpers */

static uint64_t rng_state;

static uint64_t rng_next(void)
{
    /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_seed(uint64_t s)
{
    rng_state = s;
    cr_log_info("seed 0x%llx", (unsigned long long)s);
}

/* Random f32 bit patterns: half uniform over all 2^32 (NaN, inf, subnormals
 * included), half with exponents around the f16 range where the rounding cases
 * are (f16 subnormals, normals and overflow). */
static uint32_t random_f32_bits(void)
{
    uint64_t r = rng_next();
    uint32_t u = (uint32_t)r;
    if (r >> 63) {
        uint32_t e = 95 + (uint32_t)((r >> 32) % 56); /* 2^-32 .. 2^23 */
        u = (u & 0x807fffffu) | e << 23;
    }
    return u;
}

static bool f32_is_nan_bits(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }

#ifdef __FLT16_MAX__ /* the compiler has _Float16 (gcc; clang 15+ on x86-64) */

static float f16_oracle_decode(uint16_t h)
{
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}

static uint16_t f16_oracle_encode(float f)
{
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
}

#else /* no _Float16: the same oracle from ldexp and a nearest-candidate search */

static float f16_oracle_decode(uint16_t h)
{
    unsigned e = (h >> 10) & 31u, m = h & 1023u;
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    if (e == 31)
        return ms_f32_from_bits(sign | 0x7f800000u | (m ? 0x00400000u | m << 13 : 0));
    double v = e ? ldexp(1024.0 + m, (int)e - 25) : ldexp(m, -24);
    return (float)(sign ? -v : v);
}

static uint16_t f16_oracle_encode(float f)
{
    uint32_t u = ms_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (f32_is_nan_bits(u))
        return (uint16_t)(sign | 0x7e00u | ((u >> 13) & 0x3ffu));
    double a = fabs((double)f);
    if (a >= 65520.0)
        return (uint16_t)(sign | 0x7c00u);
    /* Largest finite pattern whose value is <= a (values grow with the pattern). */
    uint16_t lo = 0, hi = 0x7bff;
    while (lo < hi) {
        uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
        if ((double)f16_oracle_decode(mid) <= a)
            lo = mid;
        else
            hi = (uint16_t)(mid - 1);
    }
    double vlo = f16_oracle_decode(lo);
    double vhi = lo == 0x7bff ? 65536.0 : (double)f16_oracle_decode((uint16_t)(lo + 1));
    double dlo = a - vlo, dhi = vhi - a;
    unsigned pick = dlo < dhi ? lo : dhi < dlo ? lo + 1u : (lo & 1u) ? lo + 1u : lo;
    return (uint16_t)(sign | pick);
}

#endif

static bool f16_is_nan(uint16_t h) { return (h & 0x7fffu) > 0x7c00u; }
static bool bf16_is_nan(uint16_t h) { return (h & 0x7fffu) > 0x7f80u; }

/* Value of a bf16 magnitude pattern in double, with the infinity pattern
 * standing for 2^128, the value rounding treats it as. */
static double bf16_value_for_rounding(uint16_t mag)
{
    if (mag == 0x7f80u)
        return ldexp(1.0, 128);
    return (double)ms_f32_from_bits((uint32_t)mag << 16);
}

/* Reference rounding of a non-NaN float to bf16: nearest of the truncated
 * pattern and the next one up, by distance in double; ties go to the even one. */
static uint16_t bf16_nearest(float f)
{
    uint32_t u = ms_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u)
        return (uint16_t)(sign | 0x7f80u);
    uint16_t lo = (uint16_t)(a >> 16), hi = (uint16_t)(lo + 1);
    double x = fabs((double)f);
    double dlo = x - bf16_value_for_rounding(lo), dhi = bf16_value_for_rounding(hi) - x;
    uint16_t pick = dlo < dhi ? lo : dhi < dlo ? hi : ((lo & 1u) ? hi : lo);
    return (uint16_t)(sign | pick);
}

/* ------------------------------------------------------------------ names */

Test(dtype, names_round_trip)
{
    for (int i = 0; i < MS_DT_COUNT; i++) {
        const char *n = ms_dtype_name((enum ms_dtype)i);
        cr_assert_not_null(n, "dtype %d has no name", i);
        cr_assert_eq(ms_dtype_from_name(n, strlen(n)), (enum ms_dtype)i, "%s", n);
        /* Not NUL-terminated: a longer buffer with len given. */
        char buf[32];
        snprintf(buf, sizeof buf, "%s\"}", n);
        cr_assert_eq(ms_dtype_from_name(buf, strlen(n)), (enum ms_dtype)i, "%s", n);
        /* Proper prefixes are not names (unless the prefix is itself a name). */
        enum ms_dtype p = ms_dtype_from_name(n, strlen(n) - 1);
        cr_assert(p == MS_DT_NONE || strlen(ms_dtype_name(p)) == strlen(n) - 1, "%s", n);
    }
    cr_assert_null(ms_dtype_name(MS_DT_COUNT));
    cr_assert_null(ms_dtype_name(MS_DT_NONE));
    static const char *const bad[] = { "", "bf16", "BF", "F", "F8", "float32", "F32 ",
                                       "F8_E4M3FN", "C128", "BFLOAT16" };
    for (size_t i = 0; i < MS_ARRAY_LEN(bad); i++)
        cr_assert_eq(ms_dtype_from_name(bad[i], strlen(bad[i])), MS_DT_NONE, "%s", bad[i]);
    cr_assert_eq(ms_dtype_from_name(NULL, 0), MS_DT_NONE);
}

Test(dtype, exact_spellings)
{
    static const char *const want[MS_DT_COUNT] = {
        "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
        "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
        "C64", "F64", "I64", "U64",
    };
    static const unsigned bits[MS_DT_COUNT] = {
        8, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 64, 64, 64, 64,
    };
    for (int i = 0; i < MS_DT_COUNT; i++) {
        cr_assert_str_eq(ms_dtype_name((enum ms_dtype)i), want[i]);
        cr_assert_eq(ms_dtype_bits((enum ms_dtype)i), bits[i], "%s", want[i]);
        bool compute = i == MS_DT_F16 || i == MS_DT_BF16 || i == MS_DT_F32;
        cr_assert_eq(ms_dtype_is_compute((enum ms_dtype)i), compute, "%s", want[i]);
        cr_assert_eq(ms_dtype_is_float((enum ms_dtype)i), compute || i == MS_DT_F64, "%s",
                     want[i]);
    }
}

Test(dtype, recipe_names)
{
    cr_assert_eq(ms_dtype_from_recipe("bfloat16"), MS_DT_BF16);
    cr_assert_eq(ms_dtype_from_recipe("torch.bfloat16"), MS_DT_BF16);
    cr_assert_eq(ms_dtype_from_recipe("float16"), MS_DT_F16);
    cr_assert_eq(ms_dtype_from_recipe("torch.float16"), MS_DT_F16);
    cr_assert_eq(ms_dtype_from_recipe("float32"), MS_DT_F32);
    cr_assert_eq(ms_dtype_from_recipe("torch.float32"), MS_DT_F32);
    cr_assert_eq(ms_dtype_from_recipe("int64"), MS_DT_I64);
    static const char *const bad[] = { "bf16", "fp16", "half", "float", "float64", "torch.",
                                       "", "Bfloat16", "torch.torch.float16", "float32 ",
                                       "torch_float32" };
    for (size_t i = 0; i < MS_ARRAY_LEN(bad); i++)
        cr_assert_eq(ms_dtype_from_recipe(bad[i]), MS_DT_NONE, "'%s'", bad[i]);
    cr_assert_eq(ms_dtype_from_recipe(NULL), MS_DT_NONE);
}

/* ------------------------------------------------------------------ decode */

static uint16_t all_patterns[NPAT];
static float out_a[NPAT], out_b[NPAT];

static void fill_patterns(void)
{
    for (uint32_t i = 0; i < NPAT; i++)
        all_patterns[i] = (uint16_t)i;
}

Test(dtype, bf16_decode_all_patterns)
{
    fill_patterns();
    ms_bf16_to_f32(all_patterns, out_a, NPAT);
    ms_bf16_to_f32_ref(all_patterns, out_b, NPAT);
    for (uint32_t h = 0; h < NPAT; h++) {
        uint32_t want = h << 16;
        cr_assert_eq(ms_f32_bits(ms_bf16_to_f32_1((uint16_t)h)), want, "bf16 %04x", h);
        cr_assert_eq(ms_f32_bits(out_a[h]), want, "fast bf16 %04x", h);
        cr_assert_eq(ms_f32_bits(out_b[h]), want, "ref bf16 %04x", h);
    }
}

Test(dtype, f16_decode_all_patterns)
{
    fill_patterns();
    ms_f16_to_f32(all_patterns, out_a, NPAT);
    ms_f16_to_f32_ref(all_patterns, out_b, NPAT);
    for (uint32_t h = 0; h < NPAT; h++) {
        float want = f16_oracle_decode((uint16_t)h);
        uint32_t wb = ms_f32_bits(want);
        uint32_t got = ms_f32_bits(ms_f16_to_f32_1((uint16_t)h));
        if (f16_is_nan((uint16_t)h)) {
            /* A quiet NaN of the same sign, payload in the top bits. */
            cr_assert(f32_is_nan_bits(got) && (got & 0x00400000u), "f16 %04x -> %08x", h, got);
            cr_assert_eq(got >> 31, h >> 15u, "f16 %04x sign", h);
            cr_assert_eq((got >> 13) & 0x1ffu, h & 0x1ffu, "f16 %04x payload", h);
        }
        cr_assert_eq(got, wb, "f16 %04x: %08x, oracle %08x", h, got, wb);
        cr_assert_eq(ms_f32_bits(out_a[h]), wb, "fast f16 %04x", h);
        cr_assert_eq(ms_f32_bits(out_b[h]), wb, "ref f16 %04x", h);
    }
}

/* ------------------------------------------------------- encode round trip */

Test(dtype, bf16_encode_round_trip_all_patterns)
{
    static uint16_t back_fast[NPAT], back_ref[NPAT];
    fill_patterns();
    ms_bf16_to_f32(all_patterns, out_a, NPAT);
    ms_f32_to_bf16(out_a, back_fast, NPAT);
    ms_f32_to_bf16_ref(out_a, back_ref, NPAT);
    for (uint32_t h = 0; h < NPAT; h++) {
        uint16_t got = ms_f32_to_bf16_1(out_a[h]);
        cr_assert_eq(back_fast[h], got, "fast != scalar for bf16 %04x", h);
        cr_assert_eq(back_ref[h], got, "ref != scalar for bf16 %04x", h);
        if (bf16_is_nan((uint16_t)h)) {
            cr_assert(bf16_is_nan(got) && (got & 0x40u), "bf16 NaN %04x -> %04x not quiet", h, got);
            cr_assert_eq(got, h | 0x40u, "bf16 NaN %04x -> %04x", h, got);
        } else {
            cr_assert_eq(got, h, "bf16 %04x -> %04x", h, got);
        }
        cr_assert_eq(ms_f32_bits(ms_round_bf16_1(out_a[h])), ms_f32_bits(ms_bf16_to_f32_1(got)));
    }
}

Test(dtype, f16_encode_round_trip_all_patterns)
{
    static uint16_t back_fast[NPAT], back_ref[NPAT];
    fill_patterns();
    ms_f16_to_f32(all_patterns, out_a, NPAT);
    ms_f32_to_f16(out_a, back_fast, NPAT);
    ms_f32_to_f16_ref(out_a, back_ref, NPAT);
    for (uint32_t h = 0; h < NPAT; h++) {
        uint16_t got = ms_f32_to_f16_1(out_a[h]);
        cr_assert_eq(back_fast[h], got, "fast != scalar for f16 %04x", h);
        cr_assert_eq(back_ref[h], got, "ref != scalar for f16 %04x", h);
        if (f16_is_nan((uint16_t)h)) {
            cr_assert(f16_is_nan(got) && (got & 0x200u), "f16 NaN %04x -> %04x not quiet", h, got);
            cr_assert_eq(got, h | 0x200u, "f16 NaN %04x -> %04x", h, got);
        } else {
            cr_assert_eq(got, h, "f16 %04x -> %04x", h, got);
        }
        cr_assert_eq(got, f16_oracle_encode(out_a[h]), "oracle disagrees for f16 %04x", h);
    }
}

/* ------------------------------------------------------- rounding at ties */

/*
 * For every pair of neighbours (h, h+1) of one sign: the exact midpoint rounds
 * to the even one, and the floats just below and just above it to the nearer.
 * h+1 may be the infinity pattern (the overflow threshold).
 */
Test(dtype, bf16_ties_and_neighbours)
{
    long checked = 0;
    for (uint32_t s = 0; s < 2; s++) {
        for (uint32_t mag = 0; mag < 0x7f80u; mag++) {
            uint16_t lo = (uint16_t)(s << 15 | mag), hi = (uint16_t)(lo + 1);
            /* Within a binade and across one, the f32 midpoint's bits are linear. */
            uint32_t mid = (uint32_t)lo << 16 | 0x8000u;
            uint32_t probes[3] = { mid - 1, mid, mid + 1 };
            uint16_t want[3] = { lo, (lo & 1u) ? hi : lo, hi };
            for (int k = 0; k < 3; k++) {
                float f = ms_f32_from_bits(probes[k]);
                uint16_t ref = bf16_nearest(f);
                cr_assert_eq(ref, want[k], "oracle: %08x -> %04x want %04x", probes[k], ref,
                             want[k]);
                uint16_t fast;
                ms_f32_to_bf16(&f, &fast, 1);
                cr_assert_eq(ms_f32_to_bf16_1(f), ref, "%08x -> %04x want %04x", probes[k],
                             ms_f32_to_bf16_1(f), ref);
                cr_assert_eq(fast, ref, "fast: %08x", probes[k]);
                checked++;
            }
        }
    }
    cr_assert_eq(checked, 2 * 0x7f80 * 3);
}

Test(dtype, f16_ties_and_neighbours)
{
    for (uint32_t s = 0; s < 2; s++) {
        for (uint32_t mag = 0; mag < 0x7c00u; mag++) {
            uint16_t lo = (uint16_t)(s << 15 | mag), hi = (uint16_t)(lo + 1);
            double vlo = f16_oracle_decode(lo);
            double vhi = mag == 0x7bffu ? (s ? -65536.0 : 65536.0) : f16_oracle_decode(hi);
            double dmid = (vlo + vhi) / 2; /* exact: 12 significant bits */
            float mid = (float)dmid;
            cr_assert_eq((double)mid, dmid);
            float probes[3] = { nextafterf(mid, 0.0f), mid, nextafterf(mid, s ? -INFINITY
                                                                             : INFINITY) };
            uint16_t want[3] = { lo, (lo & 1u) ? hi : lo, hi };
            for (int k = 0; k < 3; k++) {
                float f = probes[k];
                cr_assert_eq(f16_oracle_encode(f), want[k], "oracle: %a", (double)f);
                uint16_t fast, ref;
                ms_f32_to_f16(&f, &fast, 1);
                ms_f32_to_f16_ref(&f, &ref, 1);
                cr_assert_eq(ms_f32_to_f16_1(f), want[k], "%a -> %04x want %04x", (double)f,
                             ms_f32_to_f16_1(f), want[k]);
                cr_assert_eq(fast, want[k], "fast: %a -> %04x", (double)f, fast);
                cr_assert_eq(ref, want[k], "ref: %a", (double)f);
            }
        }
    }
    /* Below half the smallest subnormal rounds to zero; the tie too (zero is even). */
    cr_assert_eq(ms_f32_to_f16_1(0x1p-25f), 0);
    cr_assert_eq(ms_f32_to_f16_1(-0x1p-25f), 0x8000u);
    cr_assert_eq(ms_f32_to_f16_1(nextafterf(0x1p-25f, 1.0f)), 1);
    cr_assert_eq(ms_f32_to_f16_1(0x1p-149f), 0);
    cr_assert_eq(ms_f32_to_f16_1(INFINITY), 0x7c00u);
    cr_assert_eq(ms_f32_to_f16_1(-INFINITY), 0xfc00u);
    cr_assert_eq(ms_f32_to_f16_1(1e10f), 0x7c00u);
}

/* ------------------------------------------------------------------ random */

#define RCHUNK 65536u

Test(dtype, random_f32_fast_ref_oracle, .timeout = 120)
{
    static float x[RCHUNK], r1[RCHUNK], r2[RCHUNK];
    static uint16_t fa[RCHUNK], fr[RCHUNK];
    rng_seed(SEED);
    for (uint32_t done = 0; done < NRANDOM; done += RCHUNK) {
        for (uint32_t i = 0; i < RCHUNK; i++)
            x[i] = ms_f32_from_bits(random_f32_bits());

        /* bf16 */
        ms_f32_to_bf16(x, fa, RCHUNK);
        ms_f32_to_bf16_ref(x, fr, RCHUNK);
        memcpy(r1, x, sizeof x);
        ms_dtype_round(MS_DT_BF16, r1, RCHUNK);
        for (uint32_t i = 0; i < RCHUNK; i++) {
            uint32_t u = ms_f32_bits(x[i]);
            cr_assert_eq(fa[i], fr[i], "bf16 fast %04x ref %04x for %08x", fa[i], fr[i], u);
            if (f32_is_nan_bits(u))
                cr_assert_eq(fr[i], (uint16_t)(u >> 16 | 0x40u), "bf16 NaN %08x", u);
            else
                cr_assert_eq(fr[i], bf16_nearest(x[i]), "bf16 %08x -> %04x want %04x", u,
                             fr[i], bf16_nearest(x[i]));
            cr_assert_eq(ms_f32_bits(r1[i]), (uint32_t)fr[i] << 16, "bf16 round %08x", u);
        }

        /* f16 */
        ms_f32_to_f16(x, fa, RCHUNK);
        ms_f32_to_f16_ref(x, fr, RCHUNK);
        memcpy(r1, x, sizeof x);
        ms_dtype_round(MS_DT_F16, r1, RCHUNK);
        ms_f16_to_f32_ref(fr, r2, RCHUNK);
        for (uint32_t i = 0; i < RCHUNK; i++) {
            uint32_t u = ms_f32_bits(x[i]);
            cr_assert_eq(fa[i], fr[i], "f16 fast %04x ref %04x for %08x", fa[i], fr[i], u);
            cr_assert_eq(fr[i], f16_oracle_encode(x[i]), "f16 %08x -> %04x oracle %04x", u,
                         fr[i], f16_oracle_encode(x[i]));
            cr_assert_eq(ms_f32_bits(r1[i]), ms_f32_bits(r2[i]), "f16 round %08x", u);
            cr_assert_eq(ms_f32_bits(ms_round_f16_1(x[i])), ms_f32_bits(r2[i]));
        }
    }
}

/* ------------------------------------------------------------- in place */

static const enum ms_dtype float_types[] = { MS_DT_F16, MS_DT_BF16, MS_DT_F32, MS_DT_F64 };
static const size_t sizes[] = { 0, 1, 2, 3, 7, 31, 32, 33, 100, 1023, 1024, 1025, 2049, 5000 };

static void fill_raw(enum ms_dtype dt, unsigned char *raw, size_t n)
{
    size_t esz = ms_dtype_bits(dt) / 8;
    for (size_t i = 0; i < n; i++) {
        if (dt == MS_DT_F64) {
            /* Doubles near float range, so narrowing rounds rather than overflows. */
            double d = ldexp((double)(int64_t)rng_next() / 0x1p63, (int)(rng_next() % 300) - 150);
            memcpy(raw + i * esz, &d, esz);
        } else {
            uint32_t u = random_f32_bits();
            memcpy(raw + i * esz, &u, esz);
        }
    }
}

Test(dtype, decode_in_place_equals_out_of_place)
{
    rng_seed(SEED + 1);
    size_t maxn = 5000;
    unsigned char *buf = ms_aligned_alloc(maxn * 8 + 8);
    float *ref = ms_aligned_alloc(maxn * sizeof(float));
    float *mis = ms_aligned_alloc(maxn * sizeof(float));
    cr_assert(buf && ref && mis);
    for (size_t t = 0; t < MS_ARRAY_LEN(float_types); t++) {
        enum ms_dtype dt = float_types[t];
        size_t esz = ms_dtype_bits(dt) / 8;
        for (size_t s = 0; s < MS_ARRAY_LEN(sizes); s++) {
            size_t n = sizes[s];
            fill_raw(dt, buf, n);
            ms_dtype_decode(dt, buf, ref, n);
            /* Decoding matches the element conversion of each type. */
            for (size_t i = 0; i < n; i++) {
                uint16_t h;
                uint32_t u;
                double d;
                float want;
                switch (dt) {
                case MS_DT_F16: memcpy(&h, buf + 2 * i, 2); want = f16_oracle_decode(h); break;
                case MS_DT_BF16: memcpy(&h, buf + 2 * i, 2); want = ms_bf16_to_f32_1(h); break;
                case MS_DT_F32: memcpy(&u, buf + 4 * i, 4); want = ms_f32_from_bits(u); break;
                default: memcpy(&d, buf + 8 * i, 8); want = (float)d; break;
                }
                cr_assert_eq(ms_f32_bits(ref[i]), ms_f32_bits(want), "%s n=%zu element %zu",
                             ms_dtype_name(dt), n, i);
            }
            /* The same bytes at an odd address must decode the same. */
            memmove(buf + 1, buf, n * esz);
            ms_dtype_decode(dt, buf + 1, mis, n);
            cr_assert(n == 0 || !memcmp(ref, mis, n * sizeof(float)), "%s n=%zu misaligned",
                      ms_dtype_name(dt), n);
            memmove(buf, buf + 1, n * esz);
            ms_dtype_decode(dt, buf, (float *)buf, n);
            cr_assert(n == 0 || !memcmp(ref, buf, n * sizeof(float)), "%s n=%zu in place",
                      ms_dtype_name(dt), n);
        }
    }
    ms_aligned_free(buf);
    ms_aligned_free(ref);
    ms_aligned_free(mis);
}

Test(dtype, encode_in_place_equals_out_of_place)
{
    rng_seed(SEED + 2);
    size_t maxn = 5000;
    float *src = ms_aligned_alloc(maxn * 8);
    unsigned char *ref = ms_aligned_alloc(maxn * 8);
    unsigned char *mis = ms_aligned_alloc(maxn * 8 + 8);
    cr_assert(src && ref && mis);
    for (size_t t = 0; t < MS_ARRAY_LEN(float_types); t++) {
        enum ms_dtype dt = float_types[t];
        size_t esz = ms_dtype_bits(dt) / 8;
        for (size_t s = 0; s < MS_ARRAY_LEN(sizes); s++) {
            size_t n = sizes[s];
            for (size_t i = 0; i < n; i++)
                src[i] = ms_f32_from_bits(random_f32_bits());
            ms_dtype_encode(dt, src, ref, n);
            ms_dtype_encode(dt, src, mis + 1, n);
            cr_assert(n == 0 || !memcmp(ref, mis + 1, n * esz), "%s n=%zu misaligned",
                      ms_dtype_name(dt), n);
            ms_dtype_encode(dt, src, src, n);
            cr_assert(n == 0 || !memcmp(ref, src, n * esz), "%s n=%zu in place",
                      ms_dtype_name(dt), n);
            /* And back: decode(encode(x)) == round(x) for the compute types. */
            if (ms_dtype_is_compute(dt)) {
                float *dec = (float *)mis;
                ms_dtype_decode(dt, ref, dec, n);
                for (size_t i = 0; i < n; i++) {
                    uint32_t want;
                    if (dt == MS_DT_BF16)
                        want = (uint32_t)((const uint16_t *)ref)[i] << 16;
                    else if (dt == MS_DT_F16)
                        want = ms_f32_bits(f16_oracle_decode(((const uint16_t *)ref)[i]));
                    else
                        want = ((const uint32_t *)ref)[i];
                    cr_assert_eq(ms_f32_bits(dec[i]), want, "%s element %zu", ms_dtype_name(dt),
                                 i);
                }
            }
        }
    }
    ms_aligned_free(src);
    ms_aligned_free(ref);
    ms_aligned_free(mis);
}

Test(dtype, f64_narrowing_rounds_to_nearest_even)
{
    /* 1 + 2^-24 is the tie between 1 and 1 + 2^-23: even is 1. */
    double d[4] = { 1.0 + 0x1p-24, 1.0 + 0x1p-24 + 0x1p-40, -(1.0 + 3 * 0x1p-24), 1e300 };
    float f[4];
    ms_dtype_decode(MS_DT_F64, d, f, 4);
    cr_assert_eq(f[0], 1.0f);
    cr_assert_eq(f[1], 1.0f + 0x1p-23f);
    cr_assert_eq(f[2], -(1.0f + 0x1p-22f)); /* tie: mantissa 2 is even */
    cr_assert(isinf(f[3]));
}

Test(dtype, round_f32_is_identity)
{
    float x[3] = { 1.0f + 0x1p-23f, -0x1p-140f, NAN };
    uint32_t before[3];
    for (int i = 0; i < 3; i++)
        before[i] = ms_f32_bits(x[i]);
    ms_dtype_round(MS_DT_F32, x, 3);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(ms_f32_bits(x[i]), before[i]);
}

/* ms_dtype_decode_up: raw bytes at the top of the float buffer decode to the
 * same floats as an out-of-place decode, for sizes around the staging edges. */
Test(dtype, decode_up_matches_out_of_place)
{
    const enum ms_dtype dts[] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    const size_t lens[] = { 0, 1, 2, 3, 31, 1023, 1024, 1025, 2047, 2048, 2049, 5000, 70001 };
    for (size_t d = 0; d < 3; d++) {
        size_t esz = ms_dtype_bits(dts[d]) / 8;
        for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
            size_t n = lens[k];
            uint16_t *src16 = malloc(n * 4 + 4);
            float *want = malloc(n * 4 + 4), *buf = malloc(n * 4 + 4);
            for (size_t i = 0; i < n * 2; i++)
                src16[i] = (uint16_t)(i * 2654435761u >> 7) & 0x7bff;
            ms_dtype_decode(dts[d], src16, want, n);
            unsigned char *top = (unsigned char *)buf + n * (4 - esz);
            memcpy(top, src16, n * esz);
            ms_dtype_decode_up(dts[d], top, buf, n);
            for (size_t i = 0; i < n; i++)
                cr_assert_eq(ms_f32_bits(buf[i]), ms_f32_bits(want[i]), "%s n=%zu i=%zu",
                             ms_dtype_name(dts[d]), n, i);
            free(src16);
            free(want);
            free(buf);
        }
    }
}
