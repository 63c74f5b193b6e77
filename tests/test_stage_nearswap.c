/*
 * test_stage_nearswap.c - `nearswap` (stages/nearswap.c, mergekit-spec.md 2.10).
 *
 * Expected values come from hand computation and from a plain reference
 * written here from the spec's formula, with the independent rounding of
 * tests/th_stage.c; elementwise, so the comparison is bit for bit in BF16, F16
 * and F32, at several chunk sizes.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

static void job_for(struct ms_stage_job *job, const int64_t *shape, uint32_t ndim,
                    enum ms_dtype dt, uint32_t n, int base, double t)
{
    th_stage_job(job, "nearswap", shape, ndim, dt, n);
    job->base = base;
    th_stage_set(job, -1, "t", t);
}

/* The spec, element by element: w = clamp(t / clamp(|a-b|, 1e-6), 0, 1) with
 * the division as reciprocal * t, out = w*b + (1-w)*a, each op rounded. */
static float ref_nearswap(enum ms_dtype dt, float a, float b, double t)
{
#define R(x) th_stage_round(dt, (x))
    float lo = R((float)1e-6);
    float ad = fabsf(R(a - b));
    if (ad < lo)
        ad = lo;
    float w = R(R(1.0f / ad) * (float)t);
    w = fminf(fmaxf(w, 0.0f), 1.0f);
    return R(R(w * b) + R(R(1.0f - w) * a));
#undef R
}

Test(nearswap, registered) { cr_assert(ms_method_find("nearswap")->ops); }

Test(nearswap, hand_computed)
{
    /* t = 0.5, a = base = [0, 0, 0, 1], b = [0.25, 1, -2, 1]:
     *   |a-b| = [0.25, 1, 2, 0] -> clamp -> [0.25, 1, 2, 1e-6]
     *   t/that = [2, 0.5, 0.25, 5e5] -> clamp(0, 1) -> w = [1, 0.5, 0.25, 1]
     *   out = w*b + (1-w)*a = [0.25, 0.5, -0.5, 1]  (exact in every dtype) */
    static const int64_t shape[1] = { 4 };
    float a[4] = { 0, 0, 0, 1 }, b[4] = { 0.25f, 1, -2, 1 }, out[4];
    const float want[4] = { 0.25f, 0.5f, -0.5f, 1 };
    for (int d = 0; d < 3; d++) {
        for (int base = 0; base < 2; base++) {
            const float *in[2] = { base ? b : a, base ? a : b };
            struct ms_stage_job job;
            job_for(&job, shape, 1, dts[d], 2, base, 0.5);
            cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
            for (int i = 0; i < 4; i++)
                cr_assert(out[i] == want[i], "dt %d base %d elt %d: %a", dts[d], base, i, out[i]);
        }
    }
}

Test(nearswap, base_alone_is_copied_and_errors)
{
    static const int64_t shape[1] = { 3 };
    float a[3] = { 1, -0.0f, 3 }, out[3];
    const float *in[3] = { a, a, a };
    struct ms_stage_job job;
    job_for(&job, shape, 1, MS_DT_BF16, 1, 0, 0.1);
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0);
    cr_assert(!memcmp(a, out, sizeof(a)));
    job_for(&job, shape, 1, MS_DT_BF16, 1, -1, 0.1); /* a lone non-base tensor */
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
    job_for(&job, shape, 1, MS_DT_BF16, 3, 0, 0.1);
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
    cr_assert(strstr(ms_errmsg(), "t:"), "%s", ms_errmsg()); /* names the tensor */
}

Test(nearswap, random_vs_reference_bit_exact)
{
    static const int64_t shape[2] = { 17, 23 };
    enum { N = 17 * 23 };
    static const double ts[4] = { 0.001, 0.01, 0.05, 0.3 };
    static float a[N], b[N], out[N];
    for (int d = 0; d < 3; d++)
        for (int k = 0; k < 4; k++) {
            uint64_t s = 4100 + (uint64_t)d * 10 + (uint64_t)k;
            cr_log_info("seed %llu", (unsigned long long)s);
            for (int i = 0; i < N; i++) {
                a[i] = th_stage_value(dts[d], &s, 0.05f);
                /* b near a: |a-b| around t, sometimes equal */
                float e = th_stage_value(dts[d], &s, 0.02f);
                b[i] = i % 11 == 0 ? a[i] : th_stage_round(dts[d], a[i] + e);
            }
            const float *in[2] = { a, b };
            struct ms_stage_job job;
            job_for(&job, shape, 2, dts[d], 2, 0, ts[k]);
            static const uint64_t sizes[] = { 0, 1, 7, 23, 100 };
            th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
            for (int i = 0; i < N; i++) {
                float want = ref_nearswap(dts[d], a[i], b[i], ts[k]);
                cr_assert(ms_f32_bits(out[i]) == ms_f32_bits(want),
                          "dt %d t %g elt %d: %a vs %a (a %a b %a)", dts[d], ts[k], i, out[i],
                          want, a[i], b[i]);
            }
        }
}

/*
 * NaN operands, by hand, as x86 arithmetic in torch's operand order gives them
 * (t 0.5, a the base):
 *   a = [-P, 1], b = [-qNaN, -P] with P = NaN payload 0x00600000 (bit 21 and
 *   the quiet bit), -P = 0xffe00000, -qNaN = 0xffc00000.
 *   a - b = [-P, -P] (a's NaN; the only NaN), |.| = +P, 1/+P * t = +P, the
 *   clamps keep it: w = +P (0x7fe00000) at both elements.
 *   w * b: both NaN at element 0, w first: +P (b first would give -qNaN);
 *   element 1: +P (b first: -P). (1 - w) * a = +P, and +P + +P = +P.
 * out = [+P, +P] in every dtype (the payload is in bf16's top bits).
 */
Test(nearswap, nan_operands_keep_torch_order)
{
    /* the pair repeated over two whole vector blocks (NEARSWAP_BLOCK 512) and a tail */
    enum { N = 1030 };
    static const int64_t shape[1] = { N };
    static float a[N], b[N], out[N];
    for (int i = 0; i < N; i++) {
        a[i] = i % 2 ? 1.0f : ms_f32_from_bits(0xffe00000u);
        b[i] = ms_f32_from_bits(i % 2 ? 0xffe00000u : 0xffc00000u);
    }
    const float *in[2] = { a, b };
    for (int d = 0; d < 3; d++) {
        struct ms_stage_job job;
        job_for(&job, shape, 1, dts[d], 2, 0, 0.5);
        cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
        for (int i = 0; i < N; i++)
            cr_assert_eq(ms_f32_bits(out[i]), 0x7fe00000u, "dt %d elt %d: %#x", dts[d], i,
                         ms_f32_bits(out[i]));
    }
}
