/*
 * test_stage_ramplus_tl.c - `ramplus_tl` (stages/ram.c, mergekit-spec.md 2.14).
 *
 * Expected values come from hand computation and from a plain reference
 * written here from the spec: per-model counts of shared and unique positions
 * over the whole tensor, lam_i = 1 + r*clamp(sh_i/max(un_i, eps), 0, alpha) in
 * float32, the unique term promoted to float32 (so the result is float32, not
 * rounded to the compute dtype). Bit for bit in BF16, F16 and F32, at several
 * chunk sizes (the counts are integers: order-free).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

enum { ROWS = 19, COLS = 21, NUMEL = ROWS * COLS };

static void ref_ramplus(enum ms_dtype dt, const float *const *in, uint32_t n, int base,
                        double eps, double r, double alpha, size_t numel, float *out)
{
#define R(x) th_stage_round(dt, (x))
    static float tv[MS_MAX_INPUTS][NUMEL];
    static bool nz[MS_MAX_INPUTS][NUMEL];
    static uint32_t cnt[NUMEL];
    float e = R((float)eps);
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        if ((int)i == base)
            continue;
        for (size_t j = 0; j < numel; j++) {
            tv[k][j] = R(in[i][j] - in[base][j]);
            nz[k][j] = fabsf(tv[k][j]) > e;
        }
        k++;
    }
    for (size_t j = 0; j < numel; j++) {
        cnt[j] = 0;
        for (uint32_t i = 0; i < k; i++)
            cnt[j] += nz[i][j];
    }
    float lam[MS_MAX_INPUTS];
    for (uint32_t i = 0; i < k; i++) {
        uint64_t sh = 0, un = 0;
        for (size_t j = 0; j < numel; j++) {
            sh += nz[i][j] && cnt[j] > 1;
            un += nz[i][j] && cnt[j] == 1;
        }
        float rho = (float)sh / fmaxf((float)un, (float)eps);
        rho = fminf(fmaxf(rho, 0.0f), (float)alpha);
        lam[i] = 1.0f + (float)r * rho;
    }
    for (size_t j = 0; j < numel; j++) {
        float acc = 0.0f;
        for (uint32_t i = 0; i < k; i++) {
            float z = nz[i][j] ? tv[i][j] : tv[i][j] * 0.0f;
            float uterm = (cnt[j] == 1 ? z : z * 0.0f) * lam[i];
            float sterm = R((cnt[j] > 1 ? z : z * 0.0f) / (float)(cnt[j] > 1 ? cnt[j] : 1));
            acc += uterm + sterm;
        }
        out[j] = in[base][j] + acc;
    }
#undef R
}

/* The base, then models whose deltas are around 0.03 and exactly zero at
 * every fifth element (shifted per model, so counts 0..n-1 all occur). */
static void gen_inputs(enum ms_dtype dt, uint32_t n, int base, float (*store)[NUMEL], uint64_t *s)
{
    for (int j = 0; j < NUMEL; j++)
        store[base][j] = th_stage_value(dt, s, 0.05f);
    for (uint32_t i = 0; i < n; i++)
        if ((int)i != base)
            for (int j = 0; j < NUMEL; j++) {
                float v = th_stage_value(dt, s, 0.05f);
                store[i][j] = (j + (int)i) % 5 == 0 ? store[base][j]
                                                    : th_stage_round(dt, store[base][j] + 0.6f * v);
            }
}

Test(ramplus_tl, registered) { cr_assert(ms_method_find("ramplus_tl")->ops); }

Test(ramplus_tl, hand_computed)
{
    /* base 0 (input 1); x1 = [1, 0, 2, 0, 0.5], x2 = [0, 0, 4, -3, 0.5]:
     * counts [1, 0, 2, 1, 2]; x1: shared 2 (elts 2, 4), unique 1 -> rho = 2 -> alpha 0.2;
     * x2: shared 2, unique 1 -> the same. lam = 1 + 0.1f*0.2f (float32) for both:
     * out = [lam*1, 0, 2/2 + 4/2, lam*-3, 0.5/2 + 0.5/2] = [lam, 0, 3, -3 lam, 0.5].
     * With alpha = 5, r = 0.5: rho = 2 -> lam = 1 + 0.5*2 = 2: out = [2, 0, 3, -6, 0.5].
     * In BF16 compute too: lam is float32 and the unique term is not rounded to D. */
    static const int64_t shape[1] = { 5 };
    float z[5] = { 0 }, x1[5] = { 1, 0, 2, 0, 0.5f }, x2[5] = { 0, 0, 4, -3, 0.5f }, out[5];
    const float *in[3] = { x1, z, x2 };
    float lam = 1.0f + 0.1f * 0.2f;
    for (int d = 0; d < 3; d++) {
        struct ms_stage_job job;
        th_stage_job(&job, "ramplus_tl", shape, 1, dts[d], 3);
        job.base = 1;
        cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
        float want[5] = { lam, 0, 3, -3 * lam, 0.5f };
        for (int j = 0; j < 5; j++)
            cr_assert(out[j] == want[j], "dt %d elt %d: %a vs %a", dts[d], j, out[j], want[j]);
        th_stage_set(&job, -1, "alpha", 5);
        th_stage_set(&job, -1, "r", 0.5);
        cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
        cr_assert(out[0] == 2 && out[1] == 0 && out[2] == 3 && out[3] == -6 && out[4] == 0.5f);
    }
}

Test(ramplus_tl, no_unique_positions)
{
    /* x1 and x2 change the same elements: un = 0, so rho = sh/eps is large and
     * clamps to alpha; there is no unique term to scale: out = the mean deltas. */
    static const int64_t shape[1] = { 3 };
    float z[3] = { 0 }, x1[3] = { 1, 2, 0 }, x2[3] = { 3, 2, 0 }, out[3];
    const float *in[3] = { z, x1, x2 };
    struct ms_stage_job job;
    th_stage_job(&job, "ramplus_tl", shape, 1, MS_DT_BF16, 3);
    job.base = 0;
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
    cr_assert(out[0] == 2 && out[1] == 2 && out[2] == 0);
}

Test(ramplus_tl, random_vs_reference_bit_exact)
{
    static const int64_t shape[2] = { ROWS, COLS };
    static float store[6][NUMEL], out[NUMEL], want[NUMEL];
    static const double epss[3] = { 1e-5, 0.01, 0.03 };
    static const double rs[3] = { 0.1, 0.5, -0.3 }, alphas[3] = { 0.2, 1.5, 0.05 };
    for (int d = 0; d < 3; d++)
        for (uint32_t n = 2; n <= 6; n += 2)
            for (int k = 0; k < 3; k++) {
                uint64_t s = 6300 + (uint64_t)d * 100 + n * 10 + (uint64_t)k;
                cr_log_info("seed %llu", (unsigned long long)s);
                int base = (int)(s % n);
                const float *in[6];
                gen_inputs(dts[d], n, base, store, &s);
                for (uint32_t i = 0; i < n; i++)
                    in[i] = store[i];
                struct ms_stage_job job;
                th_stage_job(&job, "ramplus_tl", shape, 2, dts[d], n);
                job.base = base;
                th_stage_set(&job, -1, "epsilon", epss[k]);
                th_stage_set(&job, -1, "r", rs[k]);
                th_stage_set(&job, -1, "alpha", alphas[k]);
                static const uint64_t sizes[] = { 0, 1, 7, 21, 100 };
                th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
                ref_ramplus(dts[d], in, n, base, epss[k], rs[k], alphas[k], NUMEL, want);
                for (int j = 0; j < NUMEL; j++)
                    cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                              "dt %d n %u eps %g elt %d: %a vs %a", dts[d], n, epss[k], j, out[j],
                              want[j]);
            }
}
