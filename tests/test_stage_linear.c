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

/* ---- the stored-bytes path (ms_stage_ops.apply_stored): bf16 in, bf16 out */

/* begin, then apply_stored over chunks of `chunk` elements (the last shorter),
 * last chunk first; returns what apply_stored returned for the first call. */
static bool run_stored(const struct ms_stage_job *job, const uint16_t *const *in, uint16_t *out,
                       uint64_t chunk)
{
    const struct ms_stage_ops *ops = job->method->ops;
    cr_assert(ops->apply_stored);
    size_t sz = ops->state_size ? ops->state_size(job) : 0;
    void *st = calloc(1, sz ? sz : 1);
    cr_assert(st);
    cr_assert_eq(ops->begin(st, job), MS_STAGE_APPLY);
    bool took = true;
    uint64_t nch = (job->numel + chunk - 1) / chunk;
    for (uint64_t k = nch; k-- > 0;) {
        struct ms_chunk_stored c = { .first = k * chunk };
        c.count = MS_MIN(chunk, job->numel - c.first);
        for (uint32_t i = 0; i < job->ninputs; i++)
            c.in[i] = in[i] + c.first;
        c.out = out + c.first;
        took = ops->apply_stored(st, job, &c);
        if (!took)
            break;
    }
    free(st);
    return took;
}

static bool bf16_is_nan(uint16_t h) { return (h & 0x7fffu) > 0x7f80u; }

/* The stored path against the spec formula (ref_linear) in bf16, on values of
 * every size (overflow to Inf, subnormals, signed zeros, Inf - Inf = NaN), in
 * chunks that end inside and on the kernel's blocks; NaN results compare as NaN. */
Test(linear, stored_bf16_gives_the_encoded_reference)
{
    static const int64_t shape[1] = { 3001 };
    enum { NUMEL = 3001 };
    static const uint32_t ns[] = { 1, 2, 3, 5 };
    static const uint64_t sizes[] = { NUMEL, 1, 7, 512, 513, 1000 };
    static const uint16_t special[] = { 0x0000, 0x8000, 0x7f80, 0xff80, 0x0001, 0x807f,
                                        0x7f7f, 0xff7f, 0x3f80, 0x0080 };
    static float x[5][NUMEL], ref[NUMEL];
    static uint16_t raw[5][NUMEL], out[NUMEL];
    uint64_t s = 4242;
    for (size_t t = 0; t < MS_ARRAY_LEN(ns); t++) {
        uint32_t n = ns[t];
        const float *in[5];
        const uint16_t *rin[5];
        double w[5];
        for (uint32_t i = 0; i < n; i++) {
            for (int j = 0; j < NUMEL; j++) {
                float v = th_stage_value(MS_DT_BF16, &s, j % 3 ? 0.01f * (float)(i + 1) : 1e37f);
                if ((j * 7 + i * 13) % 53 == 0)
                    v = ms_bf16_to_f32_1(special[(j / 53 + i) % MS_ARRAY_LEN(special)]);
                x[i][j] = v;
                raw[i][j] = (uint16_t)(ms_f32_bits(v) >> 16); /* exact in bf16 */
            }
            in[i] = x[i];
            rin[i] = raw[i];
            w[i] = (double)th_stage_value(MS_DT_F32, &s, 1.0f) + 0.1 * (i + 1) + 0.3333333333;
        }
        for (int nz = 0; nz < 2; nz++) {
            struct ms_stage_job job;
            linear_job(&job, shape, 1, MS_DT_BF16, n, w, nz != 0);
            ref_linear(MS_DT_BF16, n, w, nz != 0, in, NUMEL, ref);
            for (size_t c = 0; c < MS_ARRAY_LEN(sizes); c++) {
                memset(out, 0x5a, sizeof out);
                cr_assert(run_stored(&job, rin, out, sizes[c]));
                for (int j = 0; j < NUMEL; j++) {
                    uint16_t want = (uint16_t)(ms_f32_bits(ref[j]) >> 16);
                    if (isnan(ref[j]))
                        cr_assert(bf16_is_nan(out[j]), "n %u norm %d chunk %llu element %d: %#x",
                                  n, nz, (unsigned long long)sizes[c], j, out[j]);
                    else
                        cr_assert_eq(out[j], want, "n %u norm %d chunk %llu element %d: %#x "
                                     "want %#x", n, nz, (unsigned long long)sizes[c], j, out[j],
                                     want);
                }
            }
        }
    }
}

/* Where NaNs meet (several inputs NaN at one element, with payloads and signs),
 * the stored path keeps the float path's NaN: the first in model order
 * (ms__acc_add), encoded as ms_f32_to_bf16_ref does. */
Test(linear, stored_bf16_keeps_the_float_paths_nan)
{
    static const int64_t shape[1] = { 1100 };
    enum { NUMEL = 1100 };
    static const uint16_t nans[] = { 0x7fc0, 0xffc1, 0x7f81, 0xff90, 0x7fff, 0xffa5 };
    static float x[3][NUMEL], fout[NUMEL];
    static uint16_t raw[3][NUMEL], out[NUMEL], want[NUMEL];
    uint64_t s = 77;
    const float *in[3];
    const uint16_t *rin[3];
    for (uint32_t i = 0; i < 3; i++) {
        for (int j = 0; j < NUMEL; j++) {
            uint16_t h = (uint16_t)(ms_f32_bits(th_stage_value(MS_DT_BF16, &s, 1.0f)) >> 16);
            if ((j + i) % 3 == 0 || j % 5 == 0) /* two or three NaNs at most elements */
                h = nans[(j + 2 * i) % MS_ARRAY_LEN(nans)];
            raw[i][j] = h;
            x[i][j] = ms_bf16_to_f32_1(h);
        }
        in[i] = x[i];
        rin[i] = raw[i];
    }
    double w[3] = { 0.5, -0.3, 0.2 };
    for (int nz = 0; nz < 2; nz++) {
        struct ms_stage_job job;
        linear_job(&job, shape, 1, MS_DT_BF16, 3, w, nz != 0);
        run1(&job, in, fout);
        ms_f32_to_bf16_ref(fout, want, NUMEL);
        cr_assert(run_stored(&job, rin, out, 333));
        for (int j = 0; j < NUMEL; j++)
            cr_assert_eq(out[j], want[j], "norm %d element %d: %#x want %#x", nz, j, out[j],
                         want[j]);
    }
}

/* float16 and float32 compute: apply_stored declines and writes nothing. */
Test(linear, stored_declines_other_compute_dtypes)
{
    static const int64_t shape[1] = { 40 };
    static uint16_t raw[2][40], out[40];
    const uint16_t *rin[2] = { raw[0], raw[1] };
    double w[2] = { 0.5, 0.5 };
    static const enum ms_dtype dts[] = { MS_DT_F16, MS_DT_F32 };
    for (size_t d = 0; d < 2; d++) {
        struct ms_stage_job job;
        linear_job(&job, shape, 1, dts[d], 2, w, true);
        memset(out, 0x5a, sizeof out);
        cr_assert(!run_stored(&job, rin, out, 40));
        for (int j = 0; j < 40; j++)
            cr_assert_eq(out[j], 0x5a5a);
    }
}
