/*
 * test_stage_linear.c - `linear` (stages/linear.c, mergekit-spec.md 2.2) against
 * hand-computed values and a plain reference written here from the spec
 * formulas (double arithmetic, rounded with th_stage_round). Linear is exact in
 * every compute dtype, so comparisons are bit for bit.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

/* The spec's formulas, element by element. */
static void ref_linear(enum ms_dtype dt, uint32_t n, const double *w, bool normalize,
                       const float *const *in, uint64_t numel, float *out)
{
    float W[MS_MAX_INPUTS], acc = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        W[i] = th_stage_round(dt, (float)w[i]);
        acc = (float)((double)acc + W[i]);
    }
    float wsum = th_stage_round(dt, acc);
    for (uint64_t j = 0; j < numel; j++) {
        float s = 0.0f;
        for (uint32_t i = 0; i < n; i++)
            s = (float)((double)s + th_stage_round(dt, (float)((double)W[i] * in[i][j])));
        s = th_stage_round(dt, s);
        out[j] = normalize ? th_stage_round(dt, (float)((double)s / wsum)) : s;
    }
}

static void linear_job(struct ms_stage_job *job, const int64_t *shape, uint32_t ndim,
                       enum ms_dtype dt, uint32_t n, const double *w, bool normalize)
{
    th_stage_job(job, "linear", shape, ndim, dt, n);
    for (uint32_t i = 0; i < n; i++)
        th_stage_set(job, (int)i, "weight", w[i]);
    th_stage_set(job, -1, "normalize", normalize);
}

static void run1(const struct ms_stage_job *job, const float *const *in, float *out)
{
    cr_assert_eq(ms_stage_run_mem(job, in, out, 0), 0, "%s", ms_errmsg());
}

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

Test(linear, registered) { cr_assert(ms_method_find("linear")->ops); }

Test(linear, hand_bf16)
{
    static const int64_t shape[1] = { 3 };
    struct ms_stage_job job;
    /* 1 + 2^-8 is a bf16 tie: S rounds to even (1.0); normalized by 2 -> 0.5.
     * 3 + 3 = 6; 0.5 + 2^-8 is exact in bf16 and halves exactly. */
    float x0[3] = { 1.0f, 3.0f, 0.5f }, x1[3] = { 0.00390625f, 3.0f, 0.00390625f };
    const float *in[2] = { x0, x1 };
    float out[3];
    double w[2] = { 1.0, 1.0 };
    linear_job(&job, shape, 1, MS_DT_BF16, 2, w, false);
    run1(&job, in, out);
    cr_assert(out[0] == 1.0f && out[1] == 6.0f && out[2] == 0.50390625f);
    linear_job(&job, shape, 1, MS_DT_BF16, 2, w, true);
    run1(&job, in, out);
    cr_assert(out[0] == 0.5f && out[1] == 3.0f && out[2] == 0.251953125f);

    /* the weight is rounded to bf16 first: 0.3 -> 0.30078125 */
    double w3[1] = { 0.3 };
    linear_job(&job, shape, 1, MS_DT_BF16, 1, w3, false);
    run1(&job, in, out);
    cr_assert(out[0] == 0.30078125f, "%a", out[0]);
    /* 3 * 77/256 = 231/256: 8 significant bits, exact in bf16; 0.5 * 77/256 too */
    cr_assert(out[1] == 0.90234375f && out[2] == 0.150390625f, "%a %a", out[1], out[2]);
    linear_job(&job, shape, 1, MS_DT_BF16, 1, w3, true);
    run1(&job, in, out);
    /* divided by the same rounded weight: back to the input exactly */
    cr_assert(out[0] == 1.0f && out[1] == 3.0f && out[2] == 0.5f, "%a %a", out[0], out[1]);
    /* 2 models, w = 0.3 each: W = 77/256 = 154/512; x = 1 and 1 + 2^-7: products
     * 154/512 and rnd(77/256 * 129/128 = 155.2/512) = 155/512 (ulp 2^-9 below 0.5);
     * sum 309/512 = 154.5/256 is a tie at ulp 2^-8 -> 154/256 (even). */
    double w33[2] = { 0.3, 0.3 };
    float y0[3] = { 1.0f, 1.0f, 1.0f }, y1[3] = { 1.0078125f, 1.0078125f, 1.0078125f };
    const float *in2[2] = { y0, y1 };
    linear_job(&job, shape, 1, MS_DT_BF16, 2, w33, false);
    run1(&job, in2, out);
    cr_assert(out[0] == 0.6015625f, "%a", out[0]);
}

Test(linear, per_op_rounding_matters_bf16)
{
    /* w = 0.3 (W = 77/256) on 1 and 1 + 2^-7: per-op rounding gives 154/256 (see
     * hand_bf16); float32 arithmetic rounded once at the end would give 155/256. */
    static const int64_t shape[1] = { 1 };
    struct ms_stage_job job;
    float x0[1] = { 1.0f }, x1[1] = { 1.0078125f }, out[1], ref[1];
    const float *in[2] = { x0, x1 };
    double w[2] = { 0.3, 0.3 };
    linear_job(&job, shape, 1, MS_DT_BF16, 2, w, false);
    run1(&job, in, out);
    ref_linear(MS_DT_BF16, 2, w, false, in, 1, ref);
    float once = th_stage_round(MS_DT_BF16, 0.30078125f * 1.0f + 0.30078125f * 1.0078125f);
    cr_assert(out[0] == 0.6015625f && ref[0] == out[0] && once == 0.60546875f, "%a %a %a",
              out[0], ref[0], once);
}

Test(linear, weights_sum_to_zero)
{
    static const int64_t shape[1] = { 4 };
    static const enum ms_dtype dts[3] = { MS_DT_F32, MS_DT_F16, MS_DT_BF16 };
    struct ms_stage_job job;
    float x0[4] = { 2.0f, 2.0f, 3.0f, -0.0f }, x1[4] = { 3.0f, 2.0f, 2.0f, -0.0f }, out[4];
    const float *in[2] = { x0, x1 };
    double w[2] = { 1.0, -1.0 };
    for (int d = 0; d < 3; d++) {
        linear_job(&job, shape, 1, dts[d], 2, w, true);
        run1(&job, in, out);
        cr_assert(isinf(out[0]) && out[0] < 0, "%a", out[0]); /* -1 / 0 */
        cr_assert(isnan(out[1]));                             /* 0 / 0 */
        cr_assert(isinf(out[2]) && out[2] > 0);               /* 1 / 0 */
        cr_assert(isnan(out[3]));
        linear_job(&job, shape, 1, dts[d], 2, w, false);
        run1(&job, in, out);
        cr_assert(out[0] == -1.0f && out[1] == 0.0f && out[2] == 1.0f);
        /* rnd(-0 * 1) = -0 and rnd(-0 * -1) = +0; the sum from torch's +0 identity is +0 */
        cr_assert_eq(fbits(out[3]), 0u);
    }
}

Test(linear, negative_zero_sum_is_positive)
{
    /* torch's sum starts from +0.0: an all -0 column sums to +0 */
    static const int64_t shape[1] = { 1 };
    struct ms_stage_job job;
    float x0[1] = { -0.0f }, x1[1] = { -0.0f }, out[1];
    const float *in[2] = { x0, x1 };
    double w[2] = { 1.0, 2.0 };
    linear_job(&job, shape, 1, MS_DT_F32, 2, w, false);
    run1(&job, in, out);
    cr_assert_eq(fbits(out[0]), 0u);
    double w1[1] = { 1.0 };
    linear_job(&job, shape, 1, MS_DT_F32, 1, w1, false);
    run1(&job, in, out);
    cr_assert_eq(fbits(out[0]), 0u);
}

/* Random inputs: dtype x normalize x model count, bit-exact against the reference,
 * and the same bytes for chunk sizes 1, 7, 64 and numel. */
struct lin_case {
    enum ms_dtype dt;
    bool normalize;
    uint32_t n;
};

static struct lin_case *lin_cases(size_t *count)
{
    static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    static const uint32_t ns[4] = { 1, 2, 3, 5 };
    struct lin_case *c = cr_malloc(sizeof(*c) * 24);
    size_t k = 0;
    for (int d = 0; d < 3; d++)
        for (int nz = 0; nz < 2; nz++)
            for (int m = 0; m < 4; m++)
                c[k++] = (struct lin_case){ dts[d], nz != 0, ns[m] };
    *count = k;
    return c;
}

static void lin_free(struct criterion_test_params *p) { cr_free(p->params); }

ParameterizedTestParameters(linear, random_vs_reference)
{
    size_t n;
    struct lin_case *c = lin_cases(&n);
    return cr_make_param_array(struct lin_case, c, n, lin_free);
}

ParameterizedTest(struct lin_case *lc, linear, random_vs_reference)
{
    static const int64_t shape[2] = { 23, 29 };
    enum { NUMEL = 23 * 29 };
    uint64_t seed = 1000 + (uint64_t)lc->dt * 100 + lc->normalize * 10 + lc->n;
    cr_log_info("seed %llu", (unsigned long long)seed);
    uint64_t s = seed;
    static float x[5][NUMEL];
    const float *in[5];
    double w[5];
    for (uint32_t i = 0; i < lc->n; i++) {
        for (int j = 0; j < NUMEL; j++)
            x[i][j] = th_stage_value(lc->dt, &s, (float)(i + 1));
        in[i] = x[i];
        w[i] = (double)th_stage_value(MS_DT_F32, &s, 1.0f) + 0.1 * (i + 1) + 0.3333333333;
    }
    struct ms_stage_job job;
    linear_job(&job, shape, 2, lc->dt, lc->n, w, lc->normalize);
    static float out[NUMEL], ref[NUMEL];
    static const uint64_t sizes[] = { NUMEL, 1, 7, 64, 100, 29 * 4 + 1 };
    th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
    ref_linear(lc->dt, lc->n, w, lc->normalize, in, NUMEL, ref);
    for (int j = 0; j < NUMEL; j++)
        cr_assert_eq(fbits(out[j]), fbits(ref[j]), "element %d: %a vs %a (dt %d n %u norm %d)", j,
                     out[j], ref[j], lc->dt, lc->n, lc->normalize);
    /* outputs are representable in the compute dtype */
    for (int j = 0; j < NUMEL; j++)
        cr_assert_eq(fbits(th_stage_round(lc->dt, out[j])), fbits(out[j]));
}

Test(linear, independent_rounding_agrees_with_kernels)
{
    /* the test's rounding and the library's agree on every bf16/f16 rounding of a
     * spread of float bit patterns (sanity of the reference itself) */
    uint64_t s = 99;
    for (int k = 0; k < 200000; k++) {
        s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
        uint32_t u = (uint32_t)((s * UINT64_C(2685821657736338717)) >> 32);
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f))
            continue;
        cr_assert_eq(fbits(th_stage_round(MS_DT_BF16, f)), fbits(ms_rnd(MS_DT_BF16, f)), "%a", f);
        cr_assert_eq(fbits(th_stage_round(MS_DT_F16, f)), fbits(ms_rnd(MS_DT_F16, f)), "%a", f);
    }
}
