/*
 * test_stage_model_stock.c - `model_stock` (stages/model_stock.c,
 * mergekit-spec.md 2.8).
 *
 * Expected values come from hand computation and from a plain reference
 * written here from the spec over whole arrays (sums in long double, rounded
 * once to float32; per-op rounding with the independent rounding of
 * tests/th_stage.c). The stage's sums are exact, so on these sizes the two
 * agree bit for bit in BF16, F16 and F32, flattened and filter-wise, at
 * several chunk sizes.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

/* One vector [j0, j0+len) of every input. */
static void ref_vec(enum ms_dtype dt, const float *const *in, uint32_t n, int base, size_t j0,
                    size_t len, float *out)
{
#define R(x) th_stage_round(dt, (x))
    uint32_t it[MS_MAX_INPUTS], N = 0;
    for (uint32_t i = 0; i < n; i++)
        if ((int)i != base)
            it[N++] = i;
    const float *w0 = in[base];
    float nrm[MS_MAX_INPUTS];
    for (uint32_t i = 0; i < N; i++) {
        long double ss = 0;
        for (size_t j = j0; j < j0 + len; j++) {
            float o = R(in[it[i]][j] - w0[j]);
            ss += (long double)o * o;
        }
        nrm[i] = R(sqrtf((float)ss));
    }
    float acc = 0.0f;
    uint32_t K = 0;
    for (uint32_t a = 0; a < N; a++)
        for (uint32_t b = a + 1; b < N; b++) {
            long double dot = 0;
            for (size_t j = j0; j < j0 + len; j++)
                dot += R(R(in[it[a]][j] - w0[j]) * R(in[it[b]][j] - w0[j]));
            float np = fmaxf(R(nrm[a] * nrm[b]), R((float)1e-6));
            float cs = R(R((float)dot) / np);
            acc += fminf(fmaxf(cs, -1.0f), 1.0f);
            K++;
        }
    float c = R(acc / (float)K);
    float t = R(R((float)N * c) / R(1.0f + R((float)(N - 1) * c)));
    for (size_t j = j0; j < j0 + len; j++) {
        float sum = 0.0f;
        for (uint32_t i = 0; i < N; i++)
            sum = R(sum + in[it[i]][j]);
        float avg = R(sum / (float)N);
        out[j] = R(R(t * avg) + R(R(1.0f - t) * w0[j]));
    }
#undef R
}

static void run(const struct ms_stage_job *job, const float *const *in, float *out)
{
    cr_assert_eq(ms_stage_run_mem(job, in, out, 0), 0, "%s", ms_errmsg());
}

Test(model_stock, registered) { cr_assert(ms_method_find("model_stock")->ops); }

Test(model_stock, hand_computed)
{
    static const int64_t shape[1] = { 2 };
    float z[2] = { 0, 0 }, e1[2] = { 1, 0 }, e2[2] = { 0, 1 }, d2[2] = { 2, 0 }, out[2];
    struct ms_stage_job job;
    for (int d = 0; d < 3; d++) {
        /* Orthogonal task vectors: cos = 0, t = 0: the base. */
        const float *in1[3] = { z, e1, e2 };
        th_stage_job(&job, "model_stock", shape, 1, dts[d], 3);
        job.base = 0;
        run(&job, in1, out);
        cr_assert(out[0] == 0 && out[1] == 0);
        /* Three equal task vectors: cos = 1, t = 3*1/(1 + 2*1) = 1: the average. */
        const float *in2[4] = { d2, z, d2, d2 };
        th_stage_job(&job, "model_stock", shape, 1, dts[d], 4);
        job.base = 1;
        run(&job, in2, out);
        cr_assert(out[0] == 2 && out[1] == 0, "%a %a", out[0], out[1]);
    }
    /* w1 = (1, 0), w2 = (1, 1), base 0: cos = 1/sqrt 2, t = 2c/(1 + c) = 0.828427...,
     * avg = (1, 0.5): out = (0.828427, 0.414214) (float32, within a few ulps). */
    float e11[2] = { 1, 1 };
    const float *in3[3] = { z, e1, e11 };
    th_stage_job(&job, "model_stock", shape, 1, MS_DT_F32, 3);
    job.base = 0;
    run(&job, in3, out);
    double c = 1 / sqrt(2.0), t = 2 * c / (1 + c);
    cr_assert(th_stage_ulps(out[0], (float)t) <= 4 && th_stage_ulps(out[1], (float)(t / 2)) <= 4,
              "%a %a", out[0], out[1]);
}

Test(model_stock, input_rules)
{
    static const int64_t shape[1] = { 3 };
    float a[3] = { 1, -0.0f, 3 }, out[3];
    const float *in[3] = { a, a, a };
    struct ms_stage_job job;
    th_stage_job(&job, "model_stock", shape, 1, MS_DT_BF16, 1);
    job.base = 0;
    run(&job, in, out);
    cr_assert(!memcmp(a, out, sizeof(a)));
    th_stage_job(&job, "model_stock", shape, 1, MS_DT_BF16, 2);
    job.base = 0;
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
    cr_assert(strstr(ms_errmsg(), "t:"), "%s", ms_errmsg());
    th_stage_job(&job, "model_stock", shape, 1, MS_DT_BF16, 3); /* no base */
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
}

Test(model_stock, random_vs_reference_bit_exact)
{
    enum { R_ = 13, C_ = 29, N = R_ * C_ };
    static float store[6][N], out[N], want[N];
    for (int d = 0; d < 3; d++)
        for (uint32_t n = 3; n <= 6; n++)
            for (int fw = 0; fw < 2; fw++)
                for (int nd = 1; nd <= 2; nd++) {
                    uint64_t s = 7100 + (uint64_t)d * 1000 + n * 100 + (uint64_t)fw * 10 +
                                 (uint64_t)nd;
                    cr_log_info("seed %llu", (unsigned long long)s);
                    int base = (int)(s % n);
                    for (int j = 0; j < N; j++)
                        store[base][j] = th_stage_value(dts[d], &s, 0.05f);
                    /* a shared direction plus noise: cosines well away from 0 */
                    float dir[N];
                    for (int j = 0; j < N; j++)
                        dir[j] = th_stage_value(MS_DT_F32, &s, 0.01f);
                    const float *in[6];
                    for (uint32_t i = 0; i < n; i++) {
                        if ((int)i != base)
                            for (int j = 0; j < N; j++)
                                store[i][j] = th_stage_round(
                                    dts[d], store[base][j] + dir[j] +
                                                th_stage_value(MS_DT_F32, &s, 0.01f));
                        in[i] = store[i];
                    }
                    static const int64_t shape2[2] = { R_, C_ }, shape1[1] = { N };
                    struct ms_stage_job job;
                    th_stage_job(&job, "model_stock", nd == 2 ? shape2 : shape1, (uint32_t)nd,
                                 dts[d], n);
                    job.base = base;
                    th_stage_set(&job, -1, "filter_wise", fw);
                    static const uint64_t sizes[] = { 0, 1, 7, C_, 3 * C_ };
                    th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
                    size_t len = fw && nd == 2 ? C_ : N;
                    for (size_t j0 = 0; j0 < N; j0 += len)
                        ref_vec(dts[d], in, n, base, j0, len, want);
                    for (int j = 0; j < N; j++)
                        cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                                  "dt %d n %u fw %d ndim %d elt %d: %a vs %a", dts[d], n, fw, nd,
                                  j, out[j], want[j]);
                }
}
