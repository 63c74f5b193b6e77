/*
 * test_xacc.c - the exact accumulator (stages/xacc.c) against two independent
 * references: integer arithmetic on dyadic values (__int128, converted with the
 * compiler's correctly rounded __int128 -> double), and a Shewchuk/fsum-style
 * exact expansion sum with a correctly rounded final step, written here from
 * the published algorithm. Seeded tests print their seed.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ms_common.h"
#include "ms_isa.h"
#include "ms_stage.h"

static uint64_t t_state;
static uint64_t t_next(void)
{
    /* xorshift64*: independent of the library's generator */
    t_state ^= t_state >> 12;
    t_state ^= t_state << 25;
    t_state ^= t_state >> 27;
    return t_state * UINT64_C(2685821657736338717);
}
static void t_seed(uint64_t s, const char *what)
{
    t_state = s ? s : 1;
    cr_log_info("%s: seed %llu", what, (unsigned long long)s);
}

static uint64_t dbits(double d)
{
    uint64_t u;
    memcpy(&u, &d, 8);
    return u;
}
/* Bit-identical doubles; ctx names the case in the failure message. */
#define ASSERT_SAME_DOUBLE_CTX(a, b, ctx, ...)                                               \
    do {                                                                                  \
        double a_ = (a), b_ = (b);                                                        \
        cr_assert_eq(dbits(a_), dbits(b_), "%a != %a: " ctx, a_, b_, ##__VA_ARGS__);      \
    } while (0)
#define ASSERT_SAME_DOUBLE(a, b) ASSERT_SAME_DOUBLE_CTX(a, b, "")

/* Exact sum of doubles, correctly rounded to nearest (Shewchuk's expansion
 * growth, then the half-way correction of the final rounding). */
static double ref_fsum(const double *x, size_t n)
{
    double p[128];
    size_t np = 0;
    for (size_t k = 0; k < n; k++) {
        double v = x[k];
        size_t i = 0;
        for (size_t j = 0; j < np; j++) {
            double y = p[j];
            if (fabs(v) < fabs(y)) {
                double t = v;
                v = y;
                y = t;
            }
            double hi = v + y;
            double lo = y - (hi - v);
            if (lo != 0)
                p[i++] = lo;
            v = hi;
        }
        cr_assert(i < 128);
        p[i++] = v;
        np = i;
    }
    if (np == 0)
        return 0.0;
    size_t m = np;
    double hi = p[--m], lo = 0;
    while (m > 0) {
        double v = hi, y = p[--m];
        hi = v + y;
        double yr = hi - v;
        lo = y - yr;
        if (lo != 0)
            break;
    }
    if (m > 0 && ((lo < 0 && p[m - 1] < 0) || (lo > 0 && p[m - 1] > 0))) {
        double y = lo * 2, v = hi + y, yr = v - hi;
        if (y == yr)
            hi = v;
    }
    return hi;
}

static float rand_float_wide(void)
{
    /* any finite float, subnormals included, with random sign */
    for (;;) {
        uint32_t u = (uint32_t)t_next();
        if ((u & 0x7f800000u) == 0x7f800000u)
            continue;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
}

Test(xacc, empty_is_zero)
{
    struct ms_xacc a;
    ms_xacc_init(&a);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), 0.0);
    ms_xacc_add(&a, -0.0);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), 0.0);
}

Test(xacc, catastrophic_cancellation)
{
    struct ms_xacc a;
    ms_xacc_init(&a);
    ms_xacc_add(&a, 1e30f);
    ms_xacc_add(&a, 1.0);
    ms_xacc_add(&a, -1e30f);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), 1.0);

    /* largest float squared, a tiny subnormal product, then the large one removed */
    float big = 3.4028234663852886e38f, tiny = 1.401298464324817e-45f;
    ms_xacc_init(&a);
    ms_xacc_add(&a, (double)big * big);
    ms_xacc_add(&a, (double)tiny * tiny);
    ms_xacc_add(&a, -((double)big * big));
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), ldexp(1.0, -298));

    /* negative total */
    ms_xacc_init(&a);
    ms_xacc_add(&a, 3.0);
    ms_xacc_add(&a, -1e20f);
    ms_xacc_add(&a, 1e20f);
    ms_xacc_add(&a, -5.5);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), -2.5);
}

Test(xacc, rounding_ties_and_sticky)
{
    struct ms_xacc a;
    /* 1 + 2^-53: a tie, to even -> 1 */
    ms_xacc_init(&a);
    ms_xacc_add(&a, 1.0);
    ms_xacc_add(&a, ldexp(1.0, -53));
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), 1.0);
    /* 1 + 2^-53 + 2^-298: just above the tie -> up */
    ms_xacc_add(&a, ldexp(1.0, -298));
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), 1.0 + ldexp(1.0, -52));
    /* 1 + 2^-52 + 2^-53: a tie, to even -> 1 + 2^-51 */
    ms_xacc_init(&a);
    ms_xacc_add(&a, 1.0);
    ms_xacc_add(&a, ldexp(1.0, -52));
    ms_xacc_add(&a, ldexp(1.0, -53));
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), 1.0 + ldexp(1.0, -51));
    /* the same, negative */
    ms_xacc_init(&a);
    ms_xacc_add(&a, -1.0);
    ms_xacc_add(&a, -ldexp(1.0, -52));
    ms_xacc_add(&a, -ldexp(1.0, -53));
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), -(1.0 + ldexp(1.0, -51)));
    /* carry out of the mantissa: (2^53 - 1) + 1/2 is a tie, odd: rounds to 2^53 */
    ms_xacc_init(&a);
    ms_xacc_add(&a, (double)16777215.0f * 536870912.0f); /* (2^24-1) * 2^29 */
    ms_xacc_add(&a, (double)16777215.0f * 32.0f);        /* (2^24-1) * 2^5 */
    ms_xacc_add(&a, 31.0f);                               /* total 2^53 - 1 */
    ms_xacc_add(&a, 0.5);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), 9007199254740992.0);
}

Test(xacc, subnormal_products)
{
    float s = 1.401298464324817e-45f; /* 2^-149 */
    float s2 = 1.1754942106924411e-38f; /* largest subnormal */
    float x[4] = { s, s2, -s, 3.0f };
    float y[4] = { s, s2, s2, s };
    struct ms_xacc a;
    ms_xacc_init(&a);
    ms_xacc_dot(&a, x, y, 4);
    double terms[4];
    for (int i = 0; i < 4; i++)
        terms[i] = (double)x[i] * (double)y[i];
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), ref_fsum(terms, 4));
    ms_xacc_init(&a);
    ms_xacc_sumsq(&a, x, 1);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), ldexp(1.0, -298));
}

Test(xacc, nonfinite)
{
    struct ms_xacc a, b;
    ms_xacc_init(&a);
    ms_xacc_add(&a, 1.0);
    ms_xacc_add(&a, INFINITY);
    cr_assert(isinf(ms_xacc_value(&a)) && ms_xacc_value(&a) > 0);
    ms_xacc_init(&b);
    ms_xacc_add(&b, -INFINITY);
    cr_assert(isinf(ms_xacc_value(&b)) && ms_xacc_value(&b) < 0);
    ms_xacc_merge(&a, &b);
    cr_assert(isnan(ms_xacc_value(&a)));
    ms_xacc_init(&a);
    ms_xacc_add(&a, NAN);
    ms_xacc_add(&a, 2.0);
    cr_assert(isnan(ms_xacc_value(&a)));
    /* kernels: an Inf input makes Inf, Inf*0 makes NaN, a NaN input makes NaN */
    float x[3] = { 1.0f, INFINITY, 2.0f }, z[3] = { 1.0f, 0.0f, 1.0f };
    ms_xacc_init(&a);
    ms_xacc_sumabs(&a, x, 3);
    cr_assert(isinf(ms_xacc_value(&a)));
    ms_xacc_init(&a);
    ms_xacc_dot(&a, x, z, 3);
    cr_assert(isnan(ms_xacc_value(&a)));
    x[1] = -NAN;
    ms_xacc_init(&a);
    ms_xacc_sumsq(&a, x, 3);
    cr_assert(isnan(ms_xacc_value(&a)));
    /* finite again after init; float overflow does not happen in double */
    x[1] = 3e38f;
    ms_xacc_init(&a);
    ms_xacc_sumsq(&a, x, 3);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), 5.0 + (double)x[1] * x[1]);
}

/* Integer reference: x_i = k_i * 2^-20, |k_i| < 2^24, so x_i*y_i = k*k' * 2^-40
 * and the sum is an __int128 times 2^-40. */
Test(xacc, dyadic_integer_reference)
{
    t_seed(12345, "dyadic");
    enum { N = 200000 };
    static float x[N], y[N];
    for (int rep = 0; rep < 20; rep++) {
        size_t n = 1 + t_next() % N;
        __int128 dot = 0, ss = 0, sa = 0;
        for (size_t i = 0; i < n; i++) {
            int32_t kx = (int32_t)(t_next() % (1u << 25)) - (1 << 24);
            int32_t ky = (int32_t)(t_next() % (1u << 25)) - (1 << 24);
            if (rep & 1) { /* sums that cancel to something small */
                kx = (int32_t)(i & 1 ? -kx : kx);
            }
            x[i] = ldexpf((float)kx, -20);
            y[i] = ldexpf((float)ky, -20);
            dot += (__int128)kx * ky;
            ss += (__int128)kx * kx;
            sa += kx < 0 ? -kx : kx;
        }
        struct ms_xacc a;
        ms_xacc_init(&a);
        ms_xacc_dot(&a, x, y, n);
        ASSERT_SAME_DOUBLE_CTX(ms_xacc_value(&a), ldexp((double)dot, -40), "dot rep %d", rep);
        ms_xacc_init(&a);
        ms_xacc_sumsq(&a, x, n);
        ASSERT_SAME_DOUBLE_CTX(ms_xacc_value(&a), ldexp((double)ss, -40), "ss rep %d", rep);
        ms_xacc_init(&a);
        ms_xacc_sumabs(&a, x, n);
        ASSERT_SAME_DOUBLE_CTX(ms_xacc_value(&a), ldexp((double)sa, -20), "sa rep %d", rep);
    }
}

/* Wide exponent range, subnormals included: against the expansion sum. */
Test(xacc, wide_random_against_fsum)
{
    t_seed(777, "wide");
    enum { N = 4000 };
    static float x[N], y[N];
    static double terms[N];
    for (int rep = 0; rep < 300; rep++) {
        size_t n = 1 + t_next() % N;
        for (size_t i = 0; i < n; i++) {
            x[i] = rand_float_wide();
            /* keep some products in a narrow band so that cancellation happens */
            y[i] = (t_next() & 3) ? rand_float_wide() : ldexpf(1.0f, -60) / (x[i] ? x[i] : 1.0f);
            if (!isfinite(y[i]))
                y[i] = 1.0f;
            terms[i] = (double)x[i] * (double)y[i];
        }
        if (rep % 3 == 0) /* exact cancellation of everything but one term */
            for (size_t i = 1; i + 1 < n; i += 2) {
                x[i + 1] = -x[i];
                y[i + 1] = y[i];
                terms[i + 1] = -terms[i];
            }
        struct ms_xacc a;
        ms_xacc_init(&a);
        ms_xacc_dot(&a, x, y, n);
        ASSERT_SAME_DOUBLE_CTX(ms_xacc_value(&a), ref_fsum(terms, n), "rep %d n %zu", rep, n);
        /* the scalar entry point agrees with the kernel */
        struct ms_xacc b;
        ms_xacc_init(&b);
        for (size_t i = 0; i < n; i++)
            ms_xacc_add(&b, terms[i]);
        cr_assert(!memcmp(a.limb, b.limb, sizeof(a.limb)) && a.nonfinite == b.nonfinite);
    }
}

Test(xacc, order_and_split_independence)
{
    t_seed(4242, "order");
    enum { N = 5000 };
    static float x[N], y[N], xs[N], ys[N];
    for (size_t i = 0; i < N; i++) {
        x[i] = rand_float_wide();
        y[i] = (float)((double)(t_next() >> 11) * 0x1p-53 * 2.0 - 1.0);
    }
    struct ms_xacc ref;
    ms_xacc_init(&ref);
    ms_xacc_dot(&ref, x, y, N);
    for (int rep = 0; rep < 50; rep++) {
        /* Fisher-Yates shuffle of the pairs */
        memcpy(xs, x, sizeof(x));
        memcpy(ys, y, sizeof(y));
        for (size_t i = N - 1; i > 0; i--) {
            size_t j = t_next() % (i + 1);
            float t = xs[i]; xs[i] = xs[j]; xs[j] = t;
            t = ys[i]; ys[i] = ys[j]; ys[j] = t;
        }
        /* random split points, partial accumulators merged in a random order */
        struct ms_xacc part[8], tot;
        size_t cut[9] = { 0 };
        for (int k = 1; k < 8; k++)
            cut[k] = t_next() % (N + 1);
        cut[8] = N;
        for (int k = 1; k < 8; k++) /* insertion sort */
            for (int j = k; j > 0 && cut[j] < cut[j - 1]; j--) {
                size_t t = cut[j]; cut[j] = cut[j - 1]; cut[j - 1] = t;
            }
        for (int k = 0; k < 8; k++) {
            ms_xacc_init(&part[k]);
            ms_xacc_dot(&part[k], xs + cut[k], ys + cut[k], cut[k + 1] - cut[k]);
        }
        ms_xacc_init(&tot);
        int start = (int)(t_next() % 8);
        for (int k = 0; k < 8; k++)
            ms_xacc_merge(&tot, &part[(start + 5 * k) % 8]);
        cr_assert(!memcmp(tot.limb, ref.limb, sizeof(ref.limb)), "rep %d", rep);
        ASSERT_SAME_DOUBLE(ms_xacc_value(&tot), ms_xacc_value(&ref));
    }
}

Test(xacc, capacity_many_large_terms)
{
    /* 2^20 copies of the largest float squared, then the same negated but one:
     * exercises the top limbs' headroom and the carry of the value. */
    struct ms_xacc a, b;
    float big = 3.4028234663852886e38f;
    ms_xacc_init(&a);
    float v[1024];
    for (int i = 0; i < 1024; i++)
        v[i] = big;
    for (int k = 0; k < 1024; k++)
        ms_xacc_sumsq(&a, v, 1024);
    double bb = (double)big * big;
    ASSERT_SAME_DOUBLE(ms_xacc_value(&a), ldexp(bb, 20));
    b = a;
    ms_xacc_add(&b, 1.0);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&b), ldexp(bb, 20));
    for (int k = 0; k < 1024; k++)
        for (int i = 0; i < 1024; i++)
            ms_xacc_add(&b, -bb);
    ASSERT_SAME_DOUBLE(ms_xacc_value(&b), 1.0);
}

/* The binned kernels against their scalar reference (ms_xacc_add of each exact
 * term): identical limbs for long runs that cross the bin flush (2 * 2^14
 * terms) with the largest mantissas piled into one bin, wide random values,
 * subnormals, zeros of both signs, and calls of odd lengths one after another. */
Test(xacc, kernels_match_term_by_term_reference)
{
    t_seed(99, "kernels");
    enum { N = 100003 };
    static float x[N], y[N];
    for (size_t i = 0; i < N; i++) {
        switch (i % 5) {
        case 0: x[i] = -0x1.fffffep+3f; y[i] = 0x1.fffffep-1f; break; /* one bin, full mantissa */
        case 1: x[i] = 0x1.fffffep+3f; y[i] = 0x1.fffffep+3f; break;
        case 2: x[i] = rand_float_wide(); y[i] = rand_float_wide(); break;
        case 3: x[i] = (i & 8) ? 0x1p-149f * (float)(i % 1000) : -0.0f; y[i] = 0x1.8p-140f; break;
        default: x[i] = rand_float_wide(); y[i] = -x[i]; break;
        }
    }
    static const size_t cuts[] = { 0, 1, 7, 32768, 32771, 65536 + 13, N };
    for (int kind = 0; kind < 4; kind++) {
        struct ms_xacc got, want;
        ms_xacc_init(&got);
        ms_xacc_init(&want);
        for (size_t c = 0; c + 1 < sizeof(cuts) / sizeof(cuts[0]); c++) {
            size_t a = cuts[c], n = cuts[c + 1] - cuts[c];
            if (kind == 0)
                ms_xacc_dot(&got, x + a, y + a, n);
            else if (kind == 1)
                ms_xacc_sumsq(&got, x + a, n);
            else if (kind == 2)
                ms_xacc_sumabs(&got, x + a, n);
            else
                ms_xacc_sum(&got, x + a, n);
        }
        for (size_t i = 0; i < N; i++)
            ms_xacc_add(&want, kind == 0   ? (double)x[i] * (double)y[i]
                               : kind == 1 ? (double)x[i] * (double)x[i]
                               : kind == 2 ? fabs((double)x[i])
                                           : (double)x[i]);
        cr_assert(!memcmp(got.limb, want.limb, sizeof(want.limb)), "kernel %d limbs", kind);
        cr_assert_eq(got.nonfinite, want.nonfinite);
        ASSERT_SAME_DOUBLE(ms_xacc_value(&got), ms_xacc_value(&want));
    }
}

/* ------------------------------------------------------------------------ */
/* Every version of the kernels (ms_isa.h: scalar bins, AVX2, AVX-512 blocks)  */
/* against ms_xacc_add of each exact term, limb for limb.                      */

static double term_of(int kind, const float *x, const float *y, size_t i)
{
    switch (kind) {
    case 0: return (double)x[i] * (double)y[i];
    case 1: return (double)x[i] * (double)x[i];
    case 2: return (double)x[i];
    default: return fabs((double)x[i]);
    }
}

static const char *const kind_name[4] = { "dot", "sumsq", "sum", "sumabs" };

static void call_kernel(const struct ms_xacc_kernels *k, int kind, struct ms_xacc *a,
                        const float *x, const float *y, size_t n)
{
    switch (kind) {
    case 0: k->dot(a, x, y, n); break;
    case 1: k->sumsq(a, x, n); break;
    case 2: k->sum(a, x, n); break;
    default: k->sumabs(a, x, n); break;
    }
}

/* Runs every available version and kind on x[start..start+n) (and y) as one
 * call, and as calls over the pieces between cuts, into an accumulator that
 * already holds a term; compares the limbs and the non-finite flags with
 * ms_xacc_add term by term. Returns the number of versions checked. */
static int check_versions(const char *what, const float *x, const float *y, size_t start,
                          size_t n)
{
    int versions = 0;
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        const struct ms_xacc_kernels *k = ms_xacc_kernels((enum ms_isa)isa);
        if (!k)
            continue;
        versions++;
        for (int kind = 0; kind < 4; kind++) {
            struct ms_xacc want, got, split;
            ms_xacc_init(&want);
            ms_xacc_add(&want, 0x1.8p-3); /* the kernels add to what is there */
            got = split = want;
            for (size_t i = 0; i < n; i++)
                ms_xacc_add(&want, term_of(kind, x + start, y + start, i));
            call_kernel(k, kind, &got, x + start, y + start, n);
            cr_assert(!memcmp(got.limb, want.limb, sizeof(want.limb)) &&
                          got.nonfinite == want.nonfinite,
                      "%s: %s %s start %zu n %zu: limbs differ", what,
                      ms_isa_name((enum ms_isa)isa), kind_name[kind], start, n);
            /* uneven pieces: blocks and tails fall elsewhere */
            size_t step = n / 3 + 5;
            for (size_t o = 0; o < n; o += step)
                call_kernel(k, kind, &split, x + start + o, y + start + o, MS_MIN(step, n - o));
            cr_assert(!memcmp(split.limb, want.limb, sizeof(want.limb)) &&
                          split.nonfinite == want.nonfinite,
                      "%s: %s %s start %zu n %zu in pieces of %zu: limbs differ", what,
                      ms_isa_name((enum ms_isa)isa), kind_name[kind], start, n, step);
        }
    }
    return versions;
}

/* A float 1.f * 2^e2 (normal e2 in [-126, 127]) with a random mantissa and sign. */
static float float_at(int e2, bool max_mantissa)
{
    uint32_t frac = max_mantissa ? 0x7fffffu : (uint32_t)t_next() & 0x7fffffu;
    uint32_t u = (uint32_t)(e2 + 127) << 23 | frac | ((uint32_t)t_next() & 0x80000000u);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

enum { VN = 3 * 4096 + 77 };

/* Lengths 0..40 and around the vector blocks (1024) and lanes, at starts 0..3. */
static void check_lengths(const char *what, const float *x, const float *y)
{
    static const size_t lens[] = { 1023, 1024, 1025, 2047, 2048 + 9, 3 * 1024 + 7, 4096 + 3 };
    for (size_t start = 0; start < 4; start++) {
        for (size_t n = 0; n <= 40; n++)
            check_versions(what, x, y, start, n);
        for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++)
            check_versions(what, x, y, start, lens[l]);
    }
}

Test(xacc, versions_every_exponent)
{
    t_seed(2024, "versions exponents");
    static float x[VN], y[VN];
    /* runs of 1..300 elements of one float exponent, exponents swept up and down
     * (float subnormals included), signs and mantissas random */
    int e = -149;
    for (size_t i = 0; i < VN;) {
        size_t run = 1 + t_next() % 300;
        for (size_t j = 0; j < run && i < VN; j++, i++) {
            x[i] = e < -126 ? ldexpf((float)(1 + t_next() % 0x7fffff), -149) *
                                  (t_next() & 1 ? 1.0f : -1.0f)
                            : float_at(e, false);
            y[i] = float_at((int)(t_next() % 254) - 126, false);
        }
        e += 7;
        if (e > 127)
            e -= 277;
    }
    check_lengths("exponent sweep", x, y);
    /* every element random over all finite floats: most blocks span too many limbs */
    for (size_t i = 0; i < VN; i++) {
        x[i] = rand_float_wide();
        y[i] = rand_float_wide();
    }
    check_lengths("wide", x, y);
}

Test(xacc, versions_zeros_subnormals_nonfinite)
{
    t_seed(31337, "versions specials");
    static float x[VN], y[VN];
    static const float special[] = { 0.0f, -0.0f, 0x1p-149f, -0x1p-149f, 0x1.fffffcp-127f,
                                     INFINITY, -INFINITY, NAN, -NAN };
    for (int pass = 0; pass < 3; pass++) {
        for (size_t i = 0; i < VN; i++) {
            uint64_t r = t_next() % 100;
            if (pass == 0) /* zeros of both signs and subnormals, nothing else */
                x[i] = r < 60 ? (r & 1 ? -0.0f : 0.0f) : special[2 + r % 3];
            else if (pass == 1) /* ordinary values, now and then an Inf or a NaN */
                x[i] = r < 2 ? special[5 + t_next() % 4] : float_at((int)(r % 20) - 10, false);
            else if ((i / 1024) % 2) /* all zero blocks, */
                x[i] = r & 1 ? -0.0f : 0.0f;
            else /* then blocks of a few values */
                x[i] = r < 5 ? float_at(-3, false) : 0.0f;
            y[i] = t_next() % 7 == 0 ? 0.0f : float_at((int)(t_next() % 40) - 20, false);
        }
        check_lengths("specials", x, y);
    }
}

/* Blocks that span exactly 1, 2, 3 and 4 limbs (the vector path takes up to 3),
 * with terms at both edges of a limb (shift 0 and 31 inside it). */
Test(xacc, versions_limb_spans_and_edges)
{
    t_seed(555, "versions spans");
    static float x[VN], y[VN];
    /* a float 1.f * 2^E is m * 2^(E - 52) as a double: shifted exponent E + 300,
     * limb (E + 300) / 32, shift (E + 300) % 32 */
    for (int span = 1; span <= 5; span++) {
        for (size_t i = 0; i < VN; i++) {
            int base = 20; /* E = 20: limb 10, shift 0 */
            int limb_off = (int)(t_next() % (uint64_t)span);
            int sh = t_next() & 1 ? 31 : (int)(t_next() % 32);
            int e2 = base - 32 * limb_off + sh;
            x[i] = float_at(e2, t_next() & 1);
            y[i] = float_at((int)(t_next() % 8) - 4, t_next() & 1);
        }
        check_lengths("spans", x, y);
    }
}

/* Long same-sign runs of the largest integer a lane can receive: a float with
 * the full mantissa at shift 31 of its limb (E = 19 or -13: E + 300 = 31 mod 32),
 * and products of such (x = y = 1.fffffe * 2^9: the product 1.fffffc * 2^19). */
Test(xacc, versions_lane_capacity)
{
    static float x[VN], y[VN];
    static const float v[] = { 0x1.fffffep19f, -0x1.fffffep19f, 0x1.fffffep-13f, 0x1.fffffep9f,
                               -0x1.fffffep9f };
    for (size_t k = 0; k < sizeof v / sizeof v[0]; k++) {
        for (size_t i = 0; i < VN; i++)
            x[i] = y[i] = v[k];
        check_versions("capacity", x, y, 0, VN);
        check_versions("capacity", x, y, 1, VN - 1);
        /* the same, with the other limb below it in every other block */
        for (size_t i = 0; i < VN; i += 2048 + 17)
            x[i] = ldexpf(v[k], -40);
        check_versions("capacity", x, y, 0, VN);
    }
    /* long: 2^18 terms of the largest float square and largest |float| */
    enum { LONG = 1 << 18 };
    static float big[LONG];
    for (size_t i = 0; i < LONG; i++)
        big[i] = i & 1 ? -0x1.fffffep127f : 0x1.fffffep127f;
    check_versions("largest", big, big, 0, LONG);
}

/* ------------------------------------------------------------------------ */
/* The double path of the vector kernels (xacc.c): a block's limb is summed   */
/* in double when b + spread + ceil(log2 m) <= 53 (b: significant bits of the */
/* terms). Blocks built at that limit and one over it, where one over needs   */
/* 54 bits for the block's sum (a double sum would round): limbs against      */
/* ms_xacc_add term by term (check_versions), value against an __int128 sum   */
/* of the terms as integer multiples of the smallest term's last bit.         */

/* The exact sum of the terms of x[0..n) (and y), rounded once: every term is
 * m * 2^e with m an integer below 2^53; the terms span at most 60 bits (and
 * there are fewer than 2^13 of them). */
static double ref_i128(int kind, const float *x, const float *y, size_t n)
{
    int emin = INT32_MAX;
    for (size_t i = 0; i < n; i++) {
        double t = term_of(kind, x, y, i);
        int e;
        if (t != 0) {
            frexp(t, &e);
            emin = MS_MIN(emin, e - 53);
        }
    }
    if (emin == INT32_MAX)
        return 0.0;
    __int128 s = 0;
    for (size_t i = 0; i < n; i++) {
        double t = term_of(kind, x, y, i);
        if (t == 0)
            continue;
        int e;
        double f = frexp(t, &e);
        int64_t m = (int64_t)ldexp(f, 53); /* t = m * 2^(e - 53) */
        cr_assert(e - 53 - emin <= 60 && n < 8192);
        s += (__int128)((unsigned __int128)(__int128)m << (e - 53 - emin)); /* m may be negative */
    }
    return ldexp((double)s, emin); /* __int128 -> double rounds once, to nearest */
}

/* The default version and every version's limbs on x[0..n) (and y): */
static void check_block(const char *what, int kind, const float *x, const float *y, size_t n)
{
    check_versions(what, x, y, 0, n);
    struct ms_xacc a;
    ms_xacc_init(&a);
    switch (kind) {
    case 0: ms_xacc_dot(&a, x, y, n); break;
    case 1: ms_xacc_sumsq(&a, x, n); break;
    case 2: ms_xacc_sum(&a, x, n); break;
    default: ms_xacc_sumabs(&a, x, n); break;
    }
    ASSERT_SAME_DOUBLE_CTX(ms_xacc_value(&a), ref_i128(kind, x, y, n), "%s %s", what,
                           kind_name[kind]);
}

enum { DB = 1024 }; /* the vector kernels' block */

/* (2^b - 1) * 2^(e - b + 1) and (2^(b-1) + 1) * 2^(e - b + 1): b significant
 * bits, exponent e. */
static float bits_max(int b, int e) { return ldexpf((float)((1u << b) - 1), e - b + 1); }
static float bits_min(int b, int e) { return ldexpf((float)((1u << (b - 1)) + 1), e - b + 1); }

/* One limb (exponents 20..51 of a float: limb 10), b significant bits: 1023
 * terms of the largest b-bit value at 2^51 and one of exponent 51 - s, its last
 * bit set. The sum has its top bit at 60 and its last at 51 - s - b + 1: it
 * needs s + b + 10 bits (b + s + log2 1024 > 53: one over needs 54). Signs:
 * all positive, alternating (mixed), and pairs that cancel to 0. */
Test(xacc, double_path_spread_limit)
{
    static float x[2 * DB + 24], y[2 * DB + 24];
    static const int bs[] = { 16, 22, 24 };
    for (size_t bi = 0; bi < sizeof bs / sizeof bs[0]; bi++) {
        int b = bs[bi], limit = 53 - b - 10;
        for (int s = limit - 1; s <= limit + 1; s++) {
            for (int sg = 0; sg < 3; sg++) {
                size_t n = sizeof x / sizeof x[0];
                for (size_t i = 0; i < n; i++) {
                    float v = bits_max(b, 51);
                    x[i] = sg == 0 ? v : (sg == 1 ? (i % 3 ? v : -v) : (i & 1 ? -v : v));
                    y[i] = 1.0f; /* dot: the same terms */
                }
                /* the small term in both blocks (and its negation beside it for sg 2) */
                for (size_t blk = 0; blk < 2; blk++) {
                    size_t at = blk * DB + 2 * (37 + 100 * blk);
                    x[at] = bits_min(b, 51 - s);
                    x[at + 1] = sg == 2 ? -x[at] : x[at + 1];
                    if (sg == 2)
                        x[at + 2] = -(x[at + 3] = x[at + 2]); /* keep the pairs cancelling */
                }
                char what[64];
                snprintf(what, sizeof what, "limit b %d s %d signs %d", b, s, sg);
                for (int kind = 0; kind < 4; kind++) {
                    if (kind == 1)
                        continue; /* squares: below */
                    check_block(what, kind, x, y, DB);
                    check_block(what, kind, x, y, n);
                }
            }
        }
    }
}

/* The same for squares of bf16 values (8 bits, squares 16): 1023 of
 * (255 * 2^18)^2 (exponent 51) and one (255 * 2^j)^2 (exponent 15 + 2j, last
 * bit 2j): spread s = 2 (18 - j), the sum needs 26 + s bits; 16 + s + 10 <= 53
 * takes s = 26 to the double path, s = 28 not. */
Test(xacc, double_path_squares_limit)
{
    static float x[DB], y[DB];
    for (int j = 3; j <= 6; j++) {
        for (size_t i = 0; i < DB; i++) {
            x[i] = (i & 1 ? -255.0f : 255.0f) * 0x1p18f;
            y[i] = 1.0f;
        }
        x[500] = 255.0f * ldexpf(1.0f, j);
        char what[64];
        snprintf(what, sizeof what, "squares spread %d", 2 * (18 - j));
        check_block(what, 1, x, y, DB);
    }
}

/* Two limbs (10: exponents 20..51, 9: -12..19), each checked on its own
 * while the block spans more than 53 - 22 - 10 = 21 binades. b = 22. Limb 10:
 * a quarter of the terms, exponent 41, some exactly at its lower edge 2^20
 * (spread 21: at the limit). Limb 9: 768 terms of exponent 19 and one of
 * exponent 19 - s with its last bit set: 768 * (2^22 - 1) * 2^-2 has its top
 * bit at 29, the small term its last at -2 - s, so s = 22 needs 54 bits. */
Test(xacc, double_path_two_limbs)
{
    static float x[DB + 8], y[DB + 8];
    for (int s = 20; s <= 22; s++) {
        for (int sg = 0; sg < 2; sg++) {
            for (size_t i = 0; i < DB + 8; i++) {
                float v = i % 16 == 0 ? 0x1p20f : i % 4 == 0 ? bits_max(22, 41) : bits_max(22, 19);
                x[i] = sg && (i & 2) ? -v : v;
                y[i] = 1.0f;
            }
            x[701] = bits_min(22, 19 - s);
            char what[64];
            snprintf(what, sizeof what, "two limbs s %d signs %d", s, sg);
            for (int kind = 0; kind < 4; kind++)
                if (kind != 1)
                    check_block(what, kind, x, y, DB + 8);
        }
    }
}

/* bf16 values (8 bits) in windows of a few binades, float subnormals among
 * them, zeros, an Inf or NaN in some blocks: most blocks take the double path,
 * the others the int64 path or the bins; pieces and tails as check_versions. */
Test(xacc, double_path_bf16_windows)
{
    t_seed(4242, "bf16 windows");
    static float x[4 * DB + 13], y[4 * DB + 13];
    size_t n = sizeof x / sizeof x[0];
    static const int lo[] = { -20, -140, -149, 100 }; /* exponent windows */
    for (int w = 0; w < 4; w++) {
        for (int width = 4; width <= 40; width += 12) {
            for (size_t i = 0; i < n; i++) {
                int e = lo[w] + (int)(t_next() % (uint64_t)width);
                e = MS_MIN(e, 127);
                uint32_t m8 = 128 | (uint32_t)(t_next() & 127);
                float v = ldexpf((float)m8, e - 7); /* subnormal below 2^-126: fewer bits */
                uint64_t r = t_next() % 64;
                x[i] = r < 8 ? 0.0f : (t_next() & 1 ? -v : v);
                y[i] = ldexpf((float)(128 | (t_next() & 127)), (int)(t_next() % 16) - 14);
            }
            if (width == 28) {
                x[DB + 5] = INFINITY;
                x[3 * DB + 700] = NAN;
            }
            char what[64];
            snprintf(what, sizeof what, "bf16 window %d width %d", lo[w], width);
            check_versions(what, x, y, 0, n);
            check_versions(what, x, y, 3, n - 3);
            if (width <= 16 && lo[w] < 100) /* the terms span at most 60 bits */
                for (int kind = 0; kind < 4; kind++)
                    check_block(what, kind, x, y, n);
        }
    }
}
