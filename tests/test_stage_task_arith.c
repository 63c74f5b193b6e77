/*
 * test_stage_task_arith.c - the task_arithmetic stage (stages/gta.c) against
 * the plain reference in tests/th_gta.c (mergekit-spec.md 2.6), through
 * ms_stage_run_mem, in BF16, F16 and F32, bit for bit, for chunk sizes 1, 7,
 * 100 and numel.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_gta.h"

#define MAXN 400

static float store[MS_MAX_INPUTS * MAXN];

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

static void expect(const struct th_gta *g, const float *want, const char *what)
{
    static float got[MAXN];
    uint64_t chunks[4] = { 1, 7, 100, g->numel };
    for (int ci = 0; ci < 4; ci++) {
        int rc = th_gta_run(g, chunks[ci], got);
        cr_assert_eq(rc, 0, "%s: %s", what, ms_errmsg());
        long d = th_gta_first_diff(got, want, g->numel);
        cr_assert_eq(d, -1, "%s: %s chunk %llu: element %ld is %a, want %a", what,
                     ms_dtype_name(g->dt), (unsigned long long)chunks[ci], d,
                     d >= 0 ? got[d] : 0.0f, d >= 0 ? want[d] : 0.0f);
    }
}

static void random_cases(enum ms_dtype dt, uint64_t seed0, int count)
{
    static float want[MAXN];
    for (int s = 0; s < count; s++) {
        uint64_t seed = seed0 + (uint64_t)s, rs = seed * 0x9E3779B97F4A7C15ULL + 1;
        struct th_gta g = { .method = "task_arithmetic", .dt = dt };
        th_gta_random(&g, store, MAXN, &rs);
        cr_assert_eq(th_gta_ref(&g, want), 0);
        char what[160];
        snprintf(what, sizeof what, "seed %llu (n %llu, %u inputs, base %d, normalize %d, lambda %g)",
                 (unsigned long long)seed, (unsigned long long)g.numel, g.ninputs, g.base,
                 g.normalize, g.lambda);
        expect(&g, want, what);
    }
}

Test(stage_task_arith, random_bf16) { random_cases(MS_DT_BF16, 100, 80); }
Test(stage_task_arith, random_f16) { random_cases(MS_DT_F16, 200, 80); }
Test(stage_task_arith, random_f32) { random_cases(MS_DT_F32, 300, 80); }

/*
 * Hand-computed, exact in every dtype. Base [1, 2] (input 0), A = [2, 2] and
 * B = [0, 4], both weight 0.5:
 *   dA = [1, 0], dB = [-1, 2]; WD_A = [0.5, 0], WD_B = [-0.5, 1]
 *   mixed = [0, 1]; normalize off; lambda 2 -> [0, 2]; out = [1, 4]
 * With normalize on, div = 0.5 + 0.5 = 1: the same.
 * Weights 1 and -1 (sum zero, div guarded to 1), lambda 1:
 *   WD_A = [1, 0], WD_B = [1, -2]; mixed = [2, -2]; /1 -> out = [3, 0]
 */
Test(stage_task_arith, hand_computed)
{
    float base[2] = { 1, 2 }, a[2] = { 2, 2 }, b[2] = { 0, 4 }, out[2], ref[2];
    for (int d = 0; d < 3; d++) {
        for (int norm = 0; norm < 2; norm++) {
            struct th_gta g = { .method = "task_arithmetic", .dt = dts[d], .numel = 2,
                                .ninputs = 3, .base = 0, .in = { base, a, b },
                                .weight = { 0, 0.5, 0.5 }, .density = { 1, 1, 1 },
                                .normalize = norm, .lambda = 2.0 };
            float want[2] = { 1, 4 };
            cr_assert_eq(th_gta_ref(&g, ref), 0);
            cr_assert_eq(th_gta_first_diff(ref, want, 2), -1);
            expect(&g, want, "hand-computed");
        }
        struct th_gta g = { .method = "task_arithmetic", .dt = dts[d], .numel = 2,
                            .ninputs = 3, .base = 0, .in = { base, a, b },
                            .weight = { 0, 1, -1 }, .density = { 1, 1, 1 },
                            .normalize = true, .lambda = 1.0 };
        float want[2] = { 3, 0 };
        cr_assert_eq(th_gta_ref(&g, ref), 0);
        cr_assert_eq(th_gta_first_diff(ref, want, 2), -1);
        cr_assert_eq(th_gta_run(&g, 1, out), 0, "%s", ms_errmsg());
        cr_assert_eq(th_gta_first_diff(out, want, 2), -1, "%s: %g %g", ms_dtype_name(dts[d]),
                     out[0], out[1]);
    }
}

/* Weights whose rounded sum is exactly zero, normalize on: the scalar divisor
 * is guarded to 1 instead of dividing by zero. */
Test(stage_task_arith, zero_weight_sum_is_guarded)
{
    static float want[MAXN];
    for (int d = 0; d < 3; d++) {
        uint64_t rs = 4242 + (uint64_t)d;
        struct th_gta g = { .method = "task_arithmetic", .dt = dts[d] };
        do /* a case with 3 models besides the base */
            th_gta_random(&g, store, 200, &rs);
        while (g.ninputs != 4);
        const double w[3] = { 0.75, -0.25, -0.5 }; /* exact in every dtype: sum 0 */
        for (uint32_t i = 0, j = 0; i < 4; i++)
            if ((int)i != g.base)
                g.weight[i] = w[j++];
        g.normalize = true;
        cr_assert_eq(th_gta_ref(&g, want), 0);
        for (uint64_t e = 0; e < g.numel; e++)
            cr_assert(isfinite(want[e]));
        expect(&g, want, "zero weight sum");
    }
}

/* density and rescale belong to sparsifiers; task_arithmetic has none, so a
 * density that would keep nothing is not an error and changes nothing. */
Test(stage_task_arith, density_and_rescale_ignored)
{
    static float want[MAXN], got[MAXN];
    uint64_t rs = 99;
    struct th_gta g = { .method = "task_arithmetic", .dt = MS_DT_BF16 };
    th_gta_random(&g, store, 300, &rs);
    g.rescale = false;
    for (uint32_t i = 0; i < g.ninputs; i++)
        g.density[i] = 1.0;
    cr_assert_eq(th_gta_ref(&g, want), 0);
    for (uint32_t i = 0; i < g.ninputs; i++)
        g.density[i] = 1e-6;
    g.rescale = true;
    cr_assert_eq(th_gta_run(&g, 7, got), 0, "%s", ms_errmsg());
    cr_assert_eq(th_gta_first_diff(got, want, g.numel), -1);
}

Test(stage_task_arith, base_only_is_copied)
{
    float base[4] = { 1.5f, -2, -0.0f, 7 }, out[4];
    struct th_gta g = { .method = "task_arithmetic", .dt = MS_DT_F16, .numel = 4, .ninputs = 1,
                        .base = 0, .in = { base }, .weight = { 1 }, .density = { 1 },
                        .normalize = true, .lambda = 3 };
    cr_assert_eq(th_gta_run(&g, 3, out), 0, "%s", ms_errmsg());
    cr_assert_eq(th_gta_first_diff(out, base, 4), -1);
}

/*
 * density 0 (mergekit's sparsify.py): task_arithmetic ignores density; bernoulli
 * (dare_*) draws an all-zero mask and rescaled_masked_tensor returns it as is
 * (after < eps); magnitude_outliers (breadcrumbs*) keeps indices[n_bot:-n_top],
 * an empty slice when target is 0; della_magprune returns zeros for density <= 0.
 * So the merge is x for task_arithmetic and the base for the others (hand
 * values: deltas in quarters, weight 1, so every operation is exact). ties'
 * magnitude() asserts k > 0 (the plan refuses it: test_plan).
 */
Test(stage_task_arith, density_zero_per_method)
{
    static const char *const methods[] = { "task_arithmetic", "dare_ties", "dare_linear",
                                           "breadcrumbs", "breadcrumbs_ties", "della",
                                           "della_linear" };
    static float b[40], x[40], got[40];
    for (int e = 0; e < 40; e++) {
        b[e] = (float)e / 8.0f;
        x[e] = b[e] + (float)((e % 5) - 2) / 4.0f;
    }
    for (size_t k = 0; k < MS_ARRAY_LEN(methods); k++) {
        for (int d = 0; d < 3; d++) {
            struct th_gta g = { .method = methods[k], .dt = dts[d], .numel = 40, .ninputs = 2,
                                .base = 0, .in = { b, x }, .weight = { 0, 1 },
                                .density = { 1, 0 }, .gamma = { 0, 0.1 },
                                .epsilon = { 0, 0.15 }, .lambda = 1.0, .row_len = 8 };
            g.rescale = strncmp(methods[k], "dare", 4) == 0 || strncmp(methods[k], "della", 5) == 0;
            g.normalize = !strcmp(methods[k], "della");
            bool ta = !strcmp(methods[k], "task_arithmetic");
            for (uint64_t c = 1; c <= 40; c += 13) {
                cr_assert_eq(th_gta_run(&g, c, got), 0, "%s: %s", methods[k], ms_errmsg());
                long i = th_gta_first_diff(got, ta ? x : b, 40);
                cr_assert_eq(i, -1, "%s %s chunk %llu: element %ld is %a, want %a", methods[k],
                             ms_dtype_name(dts[d]), (unsigned long long)c, i, i >= 0 ? got[i] : 0,
                             i >= 0 ? (ta ? x : b)[i] : 0);
            }
        }
    }
}

/*
 * Which torch (NUMERICS.md): `mixed_delta *= self.lambda_` multiplies a bf16/f16
 * tensor by a Python float. Current PyTorch's mul_kernel (aten/src/ATen/native/cpu/
 * BinaryOpsKernel.cpp, reduced-float branch) reads the scalar as
 * original_scalar_value<float>: 3 * 0.3f, rounded once. Hand values:
 *   bf16: 3 * 0.3f = 0.90000004 -> 230/256 = 0.8984375 (torch 1.x narrowed the scalar
 *         to bf16(0.3) = 0.30078125 first: 0.90234375 -> 231/256)
 *   f16:  3 * 0.3f -> 1843/2048 (narrowed: 3 * 1229/4096 = 1843.5/2048 -> 1844/2048)
 */
Test(stage_task_arith, python_scalar_is_float32_in_mul)
{
    static const float b[2] = { 0.0f, 0.0f }, x[2] = { 3.0f, -3.0f };
    static const struct { enum ms_dtype dt; float want; } c[] = {
        { MS_DT_BF16, 230.0f / 256.0f }, { MS_DT_F16, 1843.0f / 2048.0f },
        { MS_DT_F32, 0.90000004f },
    };
    for (size_t k = 0; k < MS_ARRAY_LEN(c); k++) {
        struct th_gta g = { .method = "task_arithmetic", .dt = c[k].dt, .numel = 2,
                            .ninputs = 2, .base = 0, .in = { b, x }, .weight = { 0, 1 },
                            .density = { 1, 1 }, .lambda = 0.3 };
        float got[2];
        cr_assert_eq(th_gta_run(&g, 1, got), 0, "%s", ms_errmsg());
        cr_assert_eq(got[0], c[k].want, "%s: got %a", ms_dtype_name(c[k].dt), got[0]);
        cr_assert_eq(got[1], -c[k].want, "%s: got %a", ms_dtype_name(c[k].dt), got[1]);
    }
}

/*
 * Every method of the family on inputs with NaN of both signs, +-Inf and
 * zero deltas against the reference bit for bit (NaN payloads included): in
 * the sums over models the first NaN in model order is the one kept, whatever
 * vector width adds them; the rescale pass sees a dropped Inf or NaN (d * 0 is
 * NaN). Rows of 600 so della's bf16/f16 rows are ranked by counting. The
 * magnitude selections (ties, breadcrumbs*) get non-finite values only in the
 * untrimmed model: how they rank NaN is not what this test is about.
 */
Test(stage_task_arith, nonfinite_inputs_in_every_method)
{
    static const char *const methods[] = { "task_arithmetic", "ties", "dare_linear", "dare_ties",
                                           "breadcrumbs", "breadcrumbs_ties", "della",
                                           "della_linear" };
    enum { L = 600, N = 2 * L, NIN = 4 };
    static float x[NIN][N], want[N];
    for (int d = 0; d < 3; d++) {
        for (size_t m = 0; m < sizeof methods / sizeof methods[0]; m++) {
            bool sel = strstr(methods[m], "ties") == methods[m] ||
                       strstr(methods[m], "breadcrumbs") == methods[m];
            uint64_t rs = 77 + m;
            for (int i = 0; i < NIN; i++)
                for (uint64_t e = 0; e < N; e++) {
                    float v = (float)((int64_t)th_gta_rand(&rs) >> 50) * 0x1p-10f;
                    uint64_t r = th_gta_rand(&rs) % 23;
                    if (r == 0 && (!sel || i == 3))
                        v = (r ^ e) & 1 ? NAN : -NAN;
                    else if (r == 1 && (!sel || i == 3))
                        v = e & 2 ? INFINITY : -INFINITY;
                    else if (r == 2 && i > 0)
                        v = x[0][e]; /* zero delta */
                    x[i][e] = th_gta_rnd(dts[d], v);
                }
            for (int resc = 0; resc < 2; resc++) {
                struct th_gta g = { .method = methods[m], .dt = dts[d], .numel = N,
                                    .ninputs = NIN, .base = 1, .row_len = L,
                                    .in = { x[0], x[1], x[2], x[3] },
                                    .weight = { 0.7, 0, 0.5, -0.25 },
                                    .density = { 0.5, 1, 0.3, 1 },
                                    .gamma = { 0.1, 0, 0.05, 0.1 },
                                    .epsilon = { 0.2, 0, 0.1, 0.1 },
                                    .normalize = !resc, .rescale = resc, .lambda = resc ? 1 : 0.5,
                                    .seed = 5 + (uint64_t)m };
                cr_assert_eq(th_gta_ref(&g, want), 0, "%s", methods[m]);
                char what[120];
                snprintf(what, sizeof what, "%s rescale %d", methods[m], resc);
                th_gta_expect(&g, want, what);
            }
        }
    }
}

/* ---- the stored-bytes path (ms_stage_ops.apply_stored): bf16 in, bf16 out */

#define SMAXN 1200 /* several of the kernel's 256-element blocks */

/* begin (which must run no reduce pass), then apply_stored over chunks of
 * `chunk` elements (the last shorter), last chunk first; returns what
 * apply_stored returned for the first call (false: it declined). */
static bool run_stored(const struct th_gta *g, const uint16_t *const *in, uint16_t *out,
                       uint64_t chunk)
{
    struct ms_stage_job job;
    int64_t shape[2];
    th_gta_job(g, &job, shape);
    const struct ms_stage_ops *ops = job.method->ops;
    cr_assert(ops->apply_stored, "%s", g->method);
    void *st = calloc(1, ops->state_size(&job));
    cr_assert(st);
    cr_assert_eq(ops->begin(st, &job), MS_STAGE_APPLY, "%s", g->method);
    bool took = true;
    for (uint64_t k = (g->numel + chunk - 1) / chunk; k-- > 0;) {
        struct ms_chunk_stored c = { .first = k * chunk };
        c.count = MS_MIN(chunk, g->numel - c.first);
        for (uint32_t i = 0; i < g->ninputs; i++)
            c.in[i] = in[i] + c.first;
        c.out = out + c.first;
        took = ops->apply_stored(st, &job, &c);
        if (!took)
            break;
    }
    free(st);
    return took;
}

/* The stored path of g at several chunkings gives want (bf16 bits), every bit
 * (NaN payloads too). */
static void expect_stored_bits(const struct th_gta *g, const uint16_t *want, const char *what)
{
    static uint16_t raw[MS_MAX_INPUTS][SMAXN], out[SMAXN];
    const uint16_t *rin[MS_MAX_INPUTS];
    for (uint32_t i = 0; i < g->ninputs; i++) {
        for (uint64_t e = 0; e < g->numel; e++) {
            uint32_t u = ms_f32_bits(g->in[i][e]);
            cr_assert_eq(u & 0xffffu, 0u, "%s: input %u element %llu is not bf16", what, i,
                         (unsigned long long)e);
            raw[i][e] = (uint16_t)(u >> 16);
        }
        rin[i] = raw[i];
    }
    const uint64_t sizes[] = { g->numel, 1, 7, 256, 257, 1000 };
    for (size_t c = 0; c < MS_ARRAY_LEN(sizes); c++) {
        memset(out, 0x5a, sizeof out);
        cr_assert(run_stored(g, rin, out, sizes[c]), "%s: declined", what);
        for (uint64_t e = 0; e < g->numel; e++)
            cr_assert_eq(out[e], want[e], "%s chunk %llu: element %llu is %#x, want %#x", what,
                         (unsigned long long)sizes[c], (unsigned long long)e, out[e], want[e]);
    }
}

/* ... against the reference's floats encoded by ms_f32_to_bf16_ref. */
static void expect_stored(const struct th_gta *g, const char *what)
{
    static float ref[SMAXN];
    static uint16_t want[SMAXN];
    cr_assert_eq(th_gta_ref(g, ref), 0, "%s", what);
    ms_f32_to_bf16_ref(ref, want, g->numel);
    expect_stored_bits(g, want, what);
}

/*
 * task_arithmetic in bf16 through the stored path gives the reference's
 * bytes on random cases (zero deltas, weights summing to zero, normalize,
 * lambda); so do dare_* without rescale (masks keyed by the element) and
 * ties with every density 1 (the sign election, no mask), which run no
 * reduce pass either.
 */
Test(stage_task_arith, stored_bf16_gives_the_encoded_reference)
{
    static float st[MS_MAX_INPUTS * SMAXN];
    static const char *const methods[] = { "task_arithmetic", "dare_linear", "dare_ties",
                                           "ties" };
    for (size_t k = 0; k < MS_ARRAY_LEN(methods); k++) {
        for (int s = 0; s < 40; s++) {
            uint64_t rs = 9000 + 100 * k + (uint64_t)s;
            struct th_gta g = { .method = methods[k], .dt = MS_DT_BF16 };
            th_gta_random(&g, st, SMAXN, &rs);
            g.rescale = false;
            g.seed = rs;
            if (!strcmp(methods[k], "ties"))
                for (uint32_t i = 0; i < g.ninputs; i++)
                    g.density[i] = 1.0;
            char what[160];
            snprintf(what, sizeof what, "%s seed %d (n %llu, %u inputs, base %d)", methods[k], s,
                     (unsigned long long)g.numel, g.ninputs, g.base);
            expect_stored(&g, what);
        }
    }
}

/*
 * NaN of both signs and with payloads (a signalling one among them), +-Inf,
 * and several NaN at one element: the stored path writes the float path's
 * bytes (the float path is tied to the reference elsewhere; where the base and
 * the mixed delta are both NaN the reference leaves the operand order of its
 * add to the compiler, the stage keeps the base's, as torch's base + mixed).
 * By hand, element 0: every input NaN, the base 0xff90 (signalling), so the
 * output is the base's NaN quieted, 0xffd0. Also the base alone: its NaN come
 * out quieted, as the float path's encode makes them.
 */
Test(stage_task_arith, stored_bf16_nonfinite_keeps_the_float_paths_nan)
{
    static const uint16_t special[] = { 0x7fc0, 0xffc1, 0x7f81, 0xff90, 0x7fff, 0xffa5,
                                        0x7f80, 0xff80 };
    static const char *const methods[] = { "task_arithmetic", "dare_linear", "dare_ties" };
    enum { N = 1100, NIN = 4 };
    static float x[NIN][N], fl[N];
    static uint16_t want[N];
    uint64_t rs = 31;
    for (int i = 0; i < NIN; i++)
        for (int e = 0; e < N; e++) {
            float v = (float)((int64_t)th_gta_rand(&rs) >> 50) * 0x1p-10f;
            if ((e + i) % 3 == 0 || e % 5 == 0) /* two or more non-finite at most elements */
                v = ms_bf16_to_f32_1(special[(e + 3 * i) % MS_ARRAY_LEN(special)]);
            x[i][e] = th_gta_rnd(MS_DT_BF16, v);
            if (v != v) /* keep the payload: th_gta_rnd would quiet a signalling NaN */
                x[i][e] = v;
        }
    for (size_t m = 0; m < MS_ARRAY_LEN(methods); m++)
        for (int norm = 0; norm < 2; norm++) {
            struct th_gta g = { .method = methods[m], .dt = MS_DT_BF16, .numel = N,
                                .ninputs = NIN, .base = 1, .in = { x[0], x[1], x[2], x[3] },
                                .weight = { 0.7, 0, 0.5, -0.25 }, .density = { 0.5, 1, 0.3, 1 },
                                .normalize = norm, .lambda = norm ? 1 : 0.5, .seed = 3 + m };
            char what[80];
            snprintf(what, sizeof what, "%s normalize %d", methods[m], norm);
            cr_assert_eq(th_gta_run(&g, 100, fl), 0, "%s", ms_errmsg());
            ms_f32_to_bf16_ref(fl, want, N);
            cr_assert_eq(want[0], 0xffd0, "%s: the float path's element 0 is %#x", what, want[0]);
            expect_stored_bits(&g, want, what);
        }
    struct th_gta g = { .method = "task_arithmetic", .dt = MS_DT_BF16, .numel = N, .ninputs = 1,
                        .base = 0, .in = { x[0] }, .weight = { 1 }, .density = { 1 },
                        .lambda = 1 };
    expect_stored(&g, "base only");
}

/* Compute dtypes other than bfloat16 and float16, and masks that are not the
 * element's own (breadcrumbs with gamma 0 keeps nothing and runs no reduce
 * pass), are declined with nothing written. (della's row-wise ops have no
 * stored path; float16 jobs: test_stage_gta_stored.c.) */
Test(stage_task_arith, stored_declines_other_dtypes_and_masks)
{
    static float b[40], a[40];
    static uint16_t raw[2][40], out[40];
    const uint16_t *rin[2] = { raw[0], raw[1] };
    for (int e = 0; e < 40; e++) {
        b[e] = (float)e / 8.0f;
        a[e] = b[e] + 0.25f;
        raw[0][e] = (uint16_t)(ms_f32_bits(b[e]) >> 16);
        raw[1][e] = (uint16_t)(ms_f32_bits(a[e]) >> 16);
    }
    static const struct { const char *method; enum ms_dtype dt; double density; } c[] = {
        { "task_arithmetic", MS_DT_F32, 1 },
        { "dare_linear", MS_DT_F32, 0.5 }, { "breadcrumbs", MS_DT_BF16, 0.5 },
    };
    for (size_t k = 0; k < MS_ARRAY_LEN(c); k++) {
        struct th_gta g = { .method = c[k].method, .dt = c[k].dt, .numel = 40, .ninputs = 2,
                            .base = 0, .in = { b, a }, .weight = { 0, 1 },
                            .density = { 1, c[k].density }, .gamma = { 0, 0 },
                            .epsilon = { 0, 0.1 }, .lambda = 1, .row_len = 8 };
        memset(out, 0x5a, sizeof out);
        cr_assert(!run_stored(&g, rin, out, 40), "%s %s", c[k].method,
                  ms_dtype_name(c[k].dt));
        for (int e = 0; e < 40; e++)
            cr_assert_eq(out[e], 0x5a5a, "%s", c[k].method);
    }
}
