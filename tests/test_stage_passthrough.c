/*
 * test_stage_passthrough.c - `passthrough` (stages/passthrough.c,
 * mergekit-spec.md 2.12): the one input unchanged, or rnd(x * float32(scale)).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

Test(passthrough, registered) { cr_assert(ms_method_find("passthrough")->ops); }

Test(passthrough, unset_scale_copies_bits)
{
    static const int64_t shape[2] = { 3, 4 };
    struct ms_stage_job job;
    th_stage_job(&job, "passthrough", shape, 2, MS_DT_BF16, 1);
    cr_assert(isnan(job.pv[0][0])); /* the default is "None" */
    float x[12], out[12];
    for (int i = 0; i < 12; i++)
        x[i] = th_stage_round(MS_DT_BF16, (float)i * 0.37f - 2.0f);
    x[3] = -0.0f;
    x[4] = INFINITY;
    x[5] = -NAN;
    const float *in[1] = { x };
    static const uint64_t sizes[] = { 12, 1, 5 };
    th_stage_run_sweep(&job, in, out, sizes, 3);
    cr_assert(!memcmp(x, out, sizeof(x)));
}

Test(passthrough, hand_scaled)
{
    static const int64_t shape[1] = { 4 };
    struct ms_stage_job job;
    float x[4] = { 1.0f, 3.0f, -0.5f, 0.0f }, out[4];
    const float *in[1] = { x };
    /* f32: 0.1 as float32 times x */
    th_stage_job(&job, "passthrough", shape, 1, MS_DT_F32, 1);
    th_stage_set(&job, 0, "scale", 0.1);
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0);
    cr_assert(out[0] == 0.1f && out[1] == 0.1f * 3.0f && out[2] == -0.05f, "%a", out[2]);
    cr_assert_eq(fbits(out[3]), 0u);
    /* bf16: 1 * 0.1f -> 0.10009765625; 3 * 0.1f = 0.30000001 -> 0.30078125 */
    th_stage_job(&job, "passthrough", shape, 1, MS_DT_BF16, 1);
    th_stage_set(&job, 0, "scale", 0.1);
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0);
    cr_assert(out[0] == 0.10009765625f && out[1] == 0.30078125f, "%a %a", out[0], out[1]);
    /* a scale whose bf16 rounding would change the result: s = 1 + 2^-8 + 2^-20 */
    float y[1] = { 1.0078125f }, o1[1];
    const float *in1[1] = { y };
    static const int64_t one[1] = { 1 };
    th_stage_job(&job, "passthrough", one, 1, MS_DT_BF16, 1);
    double s = 1.0 + ldexp(1, -8) + ldexp(1, -20);
    th_stage_set(&job, 0, "scale", s);
    cr_assert_eq(ms_stage_run_mem(&job, in1, o1, 0), 0);
    /* x*s = (1 + 2^-7)(1 + 2^-8 + 2^-20) = 1 + 2^-7 + 2^-8 + 2^-15 + ...: just above
     * the midpoint between 1 + 2^-7 and 1 + 2^-6 -> 1 + 2^-6. With s rounded to bf16
     * first (1 + 2^-8 is a tie -> 1.0) the result would be x itself. */
    cr_assert(o1[0] == 1.015625f, "%a", o1[0]);
}

Test(passthrough, random_vs_reference_all_dtypes)
{
    static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    static const int64_t shape[2] = { 17, 19 };
    enum { N = 17 * 19 };
    for (int d = 0; d < 3; d++) {
        uint64_t seed = 31 + (uint64_t)d;
        cr_log_info("seed %llu", (unsigned long long)seed);
        uint64_t st = seed;
        static float x[N], out[N];
        for (int i = 0; i < N; i++)
            x[i] = th_stage_value(dts[d], &st, 3.0f);
        const float *in[1] = { x };
        struct ms_stage_job job;
        th_stage_job(&job, "passthrough", shape, 2, dts[d], 1);
        double scale = -1.2345678901;
        th_stage_set(&job, 0, "scale", scale);
        static const uint64_t sizes[] = { N, 1, 7, 64 };
        th_stage_run_sweep(&job, in, out, sizes, 4);
        for (int i = 0; i < N; i++) {
            float ref = th_stage_round(dts[d], (float)((double)x[i] * (float)scale));
            cr_assert_eq(fbits(out[i]), fbits(ref), "dt %d element %d", dts[d], i);
        }
    }
}

Test(passthrough, wrong_input_count_is_an_error)
{
    static const int64_t shape[1] = { 2 };
    struct ms_stage_job job;
    th_stage_job(&job, "passthrough", shape, 1, MS_DT_F32, 2);
    float x[2] = { 1, 2 }, out[2];
    const float *in[2] = { x, x };
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
    cr_assert(strstr(ms_errmsg(), "exactly one"));
}
