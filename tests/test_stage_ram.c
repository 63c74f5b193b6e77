/*
 * test_stage_ram.c - `ram` (stages/ram.c, mergekit-spec.md 2.14).
 *
 * Expected values come from hand computation and from a plain reference
 * written here from the spec (masks, counts, per-op rounding with the
 * independent rounding of tests/th_stage.c); ram is elementwise, so the
 * comparison is bit for bit in BF16, F16 and F32, at several chunk sizes.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

/* The spec over whole arrays: in[base] is B, the others are the task models in order. */
static void ref_ram(enum ms_dtype dt, const float *const *in, uint32_t n, int base, double eps,
                    size_t numel, float *out)
{
#define R(x) th_stage_round(dt, (x))
    float e = R((float)eps);
    for (size_t j = 0; j < numel; j++) {
        float B = in[base][j], tv[MS_MAX_INPUTS];
        bool nz[MS_MAX_INPUTS];
        uint32_t cnt = 0, k = 0;
        for (uint32_t i = 0; i < n; i++) {
            if ((int)i == base)
                continue;
            tv[k] = R(in[i][j] - B);
            nz[k] = fabsf(tv[k]) > e;
            cnt += nz[k];
            k++;
        }
        float acc = 0.0f;
        for (uint32_t i = 0; i < k; i++) {
            float z = nz[i] ? tv[i] : tv[i] * 0.0f;
            float uterm = cnt == 1 ? z : z * 0.0f;
            float sterm = R((cnt > 1 ? z : z * 0.0f) / (float)(cnt > 1 ? cnt : 1));
            acc += R(uterm + sterm);
        }
        out[j] = R(B + R(acc));
    }
#undef R
}

/* The base, then models whose deltas are around 0.03 and exactly zero at
 * every fifth element (shifted per model, so counts 0..n-1 all occur). */
static void gen_inputs(enum ms_dtype dt, uint32_t n, int base, float (*store)[19 * 21], int numel,
                       uint64_t *s)
{
    for (int j = 0; j < numel; j++)
        store[base][j] = th_stage_value(dt, s, 0.05f);
    for (uint32_t i = 0; i < n; i++)
        if ((int)i != base)
            for (int j = 0; j < numel; j++) {
                float v = th_stage_value(dt, s, 0.05f);
                store[i][j] = (j + (int)i) % 5 == 0 ? store[base][j]
                                                    : th_stage_round(dt, store[base][j] + 0.6f * v);
            }
}

Test(ram, registered) { cr_assert(ms_method_find("ram")->ops); }

Test(ram, hand_computed)
{
    /* base 0; x1 = [1, 0, 2, 0], x2 = [0, 0, 4, -3]: counts [1, 0, 2, 1]:
     * elt 0 unique to x1 -> 1; elt 1 untouched -> 0; elt 2 shared -> 2/2 + 4/2 = 3;
     * elt 3 unique to x2 -> -3. With base 10 everywhere: 10 + that. */
    static const int64_t shape[1] = { 4 };
    float z[4] = { 0, 0, 0, 0 }, ten[4] = { 10, 10, 10, 10 };
    float x1[4] = { 1, 0, 2, 0 }, x2[4] = { 0, 0, 4, -3 }, out[4];
    float y1[4] = { 11, 10, 12, 10 }, y2[4] = { 10, 10, 14, 7 };
    for (int d = 0; d < 3; d++) {
        const float *in[3] = { x1, z, x2 };
        struct ms_stage_job job;
        th_stage_job(&job, "ram", shape, 1, dts[d], 3);
        job.base = 1;
        cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
        cr_assert(out[0] == 1 && out[1] == 0 && out[2] == 3 && out[3] == -3, "%a %a %a %a",
                  out[0], out[1], out[2], out[3]);
        const float *in2[3] = { ten, y1, y2 };
        job.base = 0;
        cr_assert_eq(ms_stage_run_mem(&job, in2, out, 0), 0, "%s", ms_errmsg());
        cr_assert(out[0] == 11 && out[1] == 10 && out[2] == 13 && out[3] == 7);
    }
}

Test(ram, base_rules)
{
    static const int64_t shape[1] = { 3 };
    float a[3] = { 1, -0.0f, 3 }, out[3];
    const float *in[2] = { a, a };
    struct ms_stage_job job;
    th_stage_job(&job, "ram", shape, 1, MS_DT_BF16, 1);
    job.base = 0;
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0);
    cr_assert(!memcmp(a, out, sizeof(a)));
    th_stage_job(&job, "ram", shape, 1, MS_DT_BF16, 2); /* no base: error naming the tensor */
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
    cr_assert(strstr(ms_errmsg(), "t:"), "%s", ms_errmsg());
}

Test(ram, random_vs_reference_bit_exact)
{
    static const int64_t shape[2] = { 19, 21 };
    enum { N = 19 * 21 };
    static float store[6][N], out[N], want[N];
    static const double epss[3] = { 1e-5, 0.01, 0.03 };
    for (int d = 0; d < 3; d++)
        for (uint32_t n = 2; n <= 6; n += 2)
            for (int k = 0; k < 3; k++) {
                uint64_t s = 5200 + (uint64_t)d * 100 + n * 10 + (uint64_t)k;
                cr_log_info("seed %llu", (unsigned long long)s);
                int base = (int)(s % n);
                const float *in[6];
                gen_inputs(dts[d], n, base, store, N, &s);
                for (uint32_t i = 0; i < n; i++)
                    in[i] = store[i];
                struct ms_stage_job job;
                th_stage_job(&job, "ram", shape, 2, dts[d], n);
                job.base = base;
                th_stage_set(&job, -1, "epsilon", epss[k]);
                static const uint64_t sizes[] = { 0, 1, 7, 21, 100 };
                th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
                ref_ram(dts[d], in, n, base, epss[k], N, want);
                for (int j = 0; j < N; j++)
                    cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                              "dt %d n %u eps %g elt %d: %a vs %a", dts[d], n, epss[k], j, out[j],
                              want[j]);
            }
}
