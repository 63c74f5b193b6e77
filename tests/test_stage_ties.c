/*
 * test_stage_ties.c - the ties stage (stages/gta.c) against the plain
 * reference in tests/th_gta.c (mergekit-spec.md 2.6, 2.7), through the
 * in-memory driver ms_stage_run_mem, in BF16, F16 and F32, bit for bit and for
 * several chunk sizes.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_gta.h"

#define MAXN 400

static float store[MS_MAX_INPUTS * MAXN];

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

/* Runs g at chunk sizes 1 (small tensors only), 7, 100 and numel and compares
 * each output with want, bit for bit. */
Test(stage_ties, random_bf16) { th_gta_random_cases("ties", MS_DT_BF16, 1000, 30); }
Test(stage_ties, random_f16) { th_gta_random_cases("ties", MS_DT_F16, 2000, 30); }
Test(stage_ties, random_f32) { th_gta_random_cases("ties", MS_DT_F32, 3000, 30); }

/*
 * Hand-computed, exact in every dtype. Base 10 everywhere (input 1), density
 * 0.5 so k = int(0.5*4) = 2, weights 1 and 0.5, normalize on:
 *   dA = [ 1, -2, 3, 0]  top-2 |dA|: idx 2 (3), idx 1 (2)     -> [ 0, -2, 3, 0]
 *   dB = [-1,  1, 1, 2]  top-2 |dB|: idx 3 (2), then the tie at
 *                        1 goes to the lowest index, idx 0    -> [-1,  0, 0, 2]
 *   WD_A = [0, -2, 3, 0], WD_B = [-0.5, 0, 0, 1]
 *   S = [-0.5, -2, 3, 1] -> maj = [-1, -1, +1, +1]
 *   mask_A = [0, 1, 1, 0] (a zero has no sign), mask_B = [1, 0, 0, 1]
 *   mixed = [-0.5, -2, 3, 1], div = [0.5, 1, 1, 0.5]
 *   mixed/div = [-1, -2, 3, 2] -> out = 10 + that = [9, 8, 13, 12]
 */
Test(stage_ties, hand_computed)
{
    float a[4] = { 11, 8, 13, 10 }, base[4] = { 10, 10, 10, 10 }, b[4] = { 9, 11, 11, 12 };
    float want[4] = { 9, 8, 13, 12 };
    for (int d = 0; d < 3; d++) {
        struct th_gta g = { .method = "ties", .dt = dts[d], .numel = 4, .ninputs = 3, .base = 1,
                            .in = { a, base, b }, .weight = { 1.0, 0, 0.5 },
                            .density = { 0.5, 1, 0.5 }, .normalize = true, .lambda = 1.0 };
        float ref[4];
        cr_assert_eq(th_gta_ref(&g, ref), 0);
        cr_assert_eq(th_gta_first_diff(ref, want, 4), -1, "reference disagrees with the hand result");
        th_gta_expect(&g, want, "hand-computed");
    }
}

/*
 * Sign election corner cases (F32, density 1, normalize on, base 0):
 *   e0: dA = 1, dB = 1, wA = 1, wB = -1: WD = [1, -1], S = 0 counts as +1:
 *       only A matches: mixed 1, div 1 -> 1
 *   e1: dA = 0, dB = -1, weights 1, 1: S = -1, the zero never matches:
 *       mixed -1, div wB = 1 -> -1
 *   e2: dA = 0, dB = 0: S = 0, nobody matches: mixed 0, div 0 -> 1 -> 0
 *   e3: dA = 1, dB = -2, wA = 1, wB = -1: WD = [1, 2], both match, div =
 *       1 + -1 = 0 -> 1: mixed 3 -> 3 (weights summing to zero)
 */
Test(stage_ties, sign_election_and_zero_divisor)
{
    float base[4] = { 0, 0, 0, 0 };
    /* Per element weights differ, so run each element as its own case. */
    struct {
        float a, b;
        double wa, wb;
        float want;
    } cases[] = {
        { 1, 1, 1, -1, 1 },
        { 0, -1, 1, 1, -1 },
        { 0, 0, 1, 1, 0 },
        { 1, -2, 1, -1, 3 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (int d = 0; d < 3; d++) {
            float a[1] = { cases[i].a }, b[1] = { cases[i].b }, out[1], ref[1];
            struct th_gta g = { .method = "ties", .dt = dts[d], .numel = 1, .ninputs = 3,
                                .base = 0, .in = { base, a, b },
                                .weight = { 0, cases[i].wa, cases[i].wb },
                                .density = { 1, 1, 1 }, .normalize = true, .lambda = 1.0 };
            cr_assert_eq(th_gta_ref(&g, ref), 0);
            cr_assert_eq(ref[0], cases[i].want, "case %zu: reference %g", i, ref[0]);
            cr_assert_eq(th_gta_run(&g, 1, out), 0, "%s", ms_errmsg());
            cr_assert_eq(out[0], cases[i].want, "case %zu %s: got %g want %g", i,
                         ms_dtype_name(dts[d]), out[0], cases[i].want);
        }
    }
}

/* Different densities per model (a density gradient), rescale and lambda, on a
 * tensor large enough for ties at the threshold in every model. */
Test(stage_ties, density_per_model_with_rescale)
{
    static float want[MAXN];
    const uint64_t n = 200;
    for (int d = 0; d < 3; d++) {
        uint64_t rs = 77 + (uint64_t)d;
        for (uint32_t i = 0; i < 4; i++)
            for (uint64_t e = 0; e < n; e++) {
                uint64_t r = th_gta_rand(&rs);
                store[i * MAXN + e] = i == 0 ? (float)(int)(r % 17) / 16.0f
                                             : store[e] + (float)((int)(r % 9) - 4) / 64.0f;
            }
        for (int resc = 0; resc < 2; resc++) {
            struct th_gta g = { .method = "ties", .dt = dts[d], .numel = n, .ninputs = 4,
                                .base = 0, .in = { store, store + MAXN, store + 2 * MAXN,
                                                   store + 3 * MAXN },
                                .weight = { 0, 0.6, 0.3, 0.45 }, .density = { 1, 0.2, 0.5, 0.8 },
                                .normalize = true, .rescale = resc, .lambda = 0.9 };
            cr_assert_eq(th_gta_ref(&g, want), 0);
            th_gta_expect(&g, want, resc ? "densities, rescale" : "densities");
        }
    }
}

Test(stage_ties, normalize_off_and_lambda)
{
    static float want[MAXN];
    for (int d = 0; d < 3; d++) {
        for (int s = 0; s < 10; s++) {
            uint64_t rs = 500 + (uint64_t)s;
            struct th_gta g = { .method = "ties", .dt = dts[d] };
            th_gta_random(&g, store, 60, &rs);
            g.normalize = s & 1;
            g.lambda = s & 2 ? 1.0 : 3.5;
            cr_assert_eq(th_gta_ref(&g, want), 0);
            th_gta_expect(&g, want, "normalize/lambda");
        }
    }
}

Test(stage_ties, base_only_is_copied)
{
    float base[5] = { 1.5f, -2, 0, -0.0f, 7 }, out[5];
    struct th_gta g = { .method = "ties", .dt = MS_DT_BF16, .numel = 5, .ninputs = 1, .base = 0,
                        .in = { base }, .weight = { 1 }, .density = { 0.5 }, .normalize = true,
                        .lambda = 2 };
    cr_assert_eq(th_gta_run(&g, 2, out), 0, "%s", ms_errmsg());
    cr_assert_eq(th_gta_first_diff(out, base, 5), -1);
}

Test(stage_ties, density_keeping_nothing_is_an_error)
{
    static float z[100], out[100];
    struct th_gta g = { .method = "ties", .dt = MS_DT_F32, .numel = 100, .ninputs = 2, .base = 0,
                        .in = { z, z }, .weight = { 1, 1 }, .density = { 1, 0.001 },
                        .normalize = true, .lambda = 1 };
    cr_assert_eq(th_gta_ref(&g, out), -1);
    int rc = th_gta_run(&g, 10, out);
    cr_assert(rc < 0);
    cr_assert(strstr(ms_errmsg(), "tensor 't': density 0.001 keeps no element of 100"),
              "message: %s", ms_errmsg());
}

/*
 * NaN and Inf in a trimmed delta (issue 17). mergekit's magnitude() keeps
 * torch.argsort(|d|.float(), descending=True)[:k], and torch orders NaN above
 * every number, Inf included. Base 0, one model of weight 1, normalize on:
 *   case A: d = [1, NaN, 3, Inf, 2, 0.5], k = int(0.5*6) = 3: NaN, Inf, 3
 *           are kept -> masked [0, NaN, 3, Inf, 0, 0]; maj = [+, -, +, +, +, +]
 *           (S = NaN counts as -1); mixed = WD*mask = [0, NaN*0 = NaN, 3, Inf,
 *           0, 0], div = [0->1, 0->1, 1, 1, 0->1, 0->1]
 *           -> out [0, NaN, 3, Inf, 0, 0]. Ranking NaN last would keep 2 (idx 4).
 *   case B: d = [Inf, NaN, 1, 2], k = int(0.25*4) = 1: only NaN is kept;
 *           masked[0] = Inf*0 = NaN -> out [NaN, NaN, 0, 0]. Ranking Inf above
 *           NaN would give out[0] = Inf.
 * Exact in BF16, F16 and F32; NaN compared as "is NaN", the rest bit for bit.
 */
static void expect_nan_aware(const float *got, const float *want, size_t n, const char *what,
                             int dt)
{
    for (size_t i = 0; i < n; i++) {
        if (isnan(want[i]))
            cr_assert(isnan(got[i]), "%s %s: element %zu is %a, want NaN", what,
                      ms_dtype_name(dts[dt]), i, got[i]);
        else
            cr_assert(!memcmp(&got[i], &want[i], sizeof(float)), "%s %s: element %zu is %a, want %a",
                      what, ms_dtype_name(dts[dt]), i, got[i], want[i]);
    }
}

Test(stage_ties, nan_ranks_above_every_magnitude)
{
    float base[6] = { 0 }, a[6] = { 1, NAN, 3, INFINITY, 2, 0.5f };
    float want_a[6] = { 0, NAN, 3, INFINITY, 0, 0 };
    float b[4] = { INFINITY, NAN, 1, 2 }, want_b[4] = { NAN, NAN, 0, 0 };
    struct {
        float *x, *want;
        uint64_t n;
        double density;
        const char *what;
    } cases[] = { { a, want_a, 6, 0.5, "case A" }, { b, want_b, 4, 0.25, "case B" } };
    for (size_t c = 0; c < 2; c++) {
        for (int d = 0; d < 3; d++) {
            struct th_gta g = { .method = "ties", .dt = dts[d], .numel = cases[c].n,
                                .ninputs = 2, .base = 0, .in = { base, cases[c].x },
                                .weight = { 0, 1 }, .density = { 1, cases[c].density },
                                .normalize = true, .lambda = 1.0 };
            float ref[6], out[6];
            cr_assert_eq(th_gta_ref(&g, ref), 0);
            expect_nan_aware(ref, cases[c].want, cases[c].n, "reference", d);
            for (uint64_t chunk = 1; chunk <= cases[c].n; chunk++) {
                cr_assert_eq(th_gta_run(&g, chunk, out), 0, "%s", ms_errmsg());
                expect_nan_aware(out, cases[c].want, cases[c].n, cases[c].what, d);
            }
        }
    }
}

/*
 * Ties at the cut spread over many chunks (select.c's records of the
 * histogram pass, or the tie pass when there is no room for them): two models
 * whose deltas take three magnitudes 1/16, 1/16 + 1/2048, 1/16 + 1/1024 (next
 * to each other in every dtype's keys) and zero, densities cutting through a
 * run of equal magnitudes, rescale on and off, against the reference, for
 * chunks of 3 (2,000 chunks: no records in bf16/f16), 64, 999 and numel.
 */
Test(stage_ties, cut_ties_across_chunks)
{
    enum { N = 6000 };
    static float in[3][N], want[N], got[N];
    uint64_t rs = 2026;
    for (int d = 0; d < 3; d++) {
        for (int e = 0; e < N; e++) {
            in[0][e] = th_gta_rnd(dts[d], (float)(e % 13) * 0.25f);
            for (int m = 1; m < 3; m++) {
                uint64_t r = th_gta_rand(&rs) % 6;
                float v = r == 0 ? 0.0f : r < 3 ? 0x1p-4f : r < 5 ? 0x1.02p-4f : 0x1.04p-4f;
                in[m][e] = th_gta_rnd(dts[d], in[0][e] + ((th_gta_rand(&rs) & 1) ? -v : v));
            }
        }
        for (int resc = 0; resc < 2; resc++) {
            struct th_gta g = { .method = "ties", .dt = dts[d], .numel = N, .ninputs = 3,
                                .base = 0, .in = { in[0], in[1], in[2] },
                                .weight = { 0, 0.7, 0.4 }, .density = { 1, 0.45, 0.2 },
                                .normalize = true, .rescale = resc, .lambda = 1.0 };
            cr_assert_eq(th_gta_ref(&g, want), 0);
            const uint64_t chunks[] = { 3, 64, 999, N };
            for (size_t ci = 0; ci < MS_ARRAY_LEN(chunks); ci++) {
                cr_assert_eq(th_gta_run(&g, chunks[ci], got), 0, "%s", ms_errmsg());
                long i = th_gta_first_diff(got, want, N);
                cr_assert_eq(i, -1, "%s rescale %d chunk %llu: element %ld is %a, want %a",
                             ms_dtype_name(dts[d]), resc, (unsigned long long)chunks[ci], i,
                             i >= 0 ? got[i] : 0.0f, i >= 0 ? want[i] : 0.0f);
            }
        }
    }
}

/* The registry points ties and task_arithmetic at their stages. */
Test(stage_ties, registered)
{
    cr_assert_not_null(ms_method_find("ties")->ops);
    cr_assert_not_null(ms_method_find("task_arithmetic")->ops);
}
