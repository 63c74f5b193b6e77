/*
 * test_stage_sce.c - the sce stage (stages/sce.c, mergekit-spec.md 2.13)
 * against a plain whole-array reference written here from the spec (sort-based
 * top-k of |var|, lower index first among ties), bit for bit in BF16, F16 and
 * F32, for several chunkings and chunk orders.
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

static float R(enum ms_dtype dt, float x) { return th_gta_rnd(dt, x); }

static const float *sort_v;
static int by_var_desc(const void *pa, const void *pb)
{
    uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
    float x = fabsf(sort_v[a]), y = fabsf(sort_v[b]);
    if (isnan(x) != isnan(y))
        return isnan(x) ? -1 : 1;
    if (!isnan(x) && x != y)
        return x > y ? -1 : 1;
    return a < b ? -1 : a > b;
}

/* The reference merge; in[] are the inputs, base their base index. */
static bool g_exact_wsum;

static void sce_ref(enum ms_dtype D, uint64_t n, uint32_t ninputs, int base,
                    const float *const *in, double topk, float *out)
{
    const float *B = in[base];
    float *t[MS_MAX_INPUTS];
    uint32_t N = 0;
    for (uint32_t i = 0; i < ninputs; i++) {
        if ((int)i == base)
            continue;
        t[N] = malloc(n * sizeof(float));
        for (uint64_t e = 0; e < n; e++)
            t[N][e] = R(D, in[i][e] - B[e]);
        N++;
    }
    if (N == 0) {
        memcpy(out, B, n * sizeof(float));
        return;
    }
    if (topk < 1.0) {
        float *var = malloc(n * sizeof(float));
        uint64_t nz = 0;
        for (uint64_t e = 0; e < n; e++) {
            double m = 0, v = 0;
            for (uint32_t j = 0; j < N; j++)
                m += t[j][e];
            m /= N;
            for (uint32_t j = 0; j < N; j++)
                v += (t[j][e] - m) * (t[j][e] - m);
            var[e] = R(D, (float)(v / N));
            nz += var[e] != 0.0f;
        }
        uint64_t k = (uint64_t)((float)nz * (float)topk);
        uint64_t *idx = malloc(n * sizeof(uint64_t));
        float *mask = calloc(n, sizeof(float));
        for (uint64_t e = 0; e < n; e++)
            idx[e] = e;
        sort_v = var;
        qsort(idx, n, sizeof(uint64_t), by_var_desc);
        for (uint64_t e = 0; e < k; e++)
            mask[idx[e]] = 1.0f;
        for (uint32_t j = 0; j < N; j++)
            for (uint64_t e = 0; e < n; e++)
                t[j][e] *= mask[e];
        free(var);
        free(idx);
        free(mask);
    }
    /* sce_weight: weights = mean(tvs**2) in D; weight_sum = torch.sum(weights).item()
     * (float32 accumulation, one rounding to D); weights / weight_sum (a float32
     * scalar). g_exact_wsum: the exact double sum instead (what we did before),
     * to show that the cases below can tell the two apart. */
    double mu[MS_MAX_INPUTS], sum = 0;
    float fsum = 0;
    for (uint32_t j = 0; j < N; j++) {
        double s = 0;
        for (uint64_t e = 0; e < n; e++)
            s += R(D, t[j][e] * t[j][e]);
        mu[j] = R(D, (float)(s / (double)n));
        sum += mu[j];
        fsum += (float)mu[j];
    }
    float W[MS_MAX_INPUTS];
    fsum = R(D, fsum);
    for (uint32_t j = 0; j < N; j++) {
        if (g_exact_wsum)
            W[j] = R(D, (float)(fabs(sum) < 1e-6 ? 1.0 / N : mu[j] / sum));
        else
            W[j] = fabs((double)fsum) < 1e-6 ? R(D, 1.0f / (float)N) : R(D, (float)mu[j] / fsum);
    }
    float cmin = R(D, (float)1e-6);
    for (uint64_t e = 0; e < n; e++) {
        float S = 0;
        for (uint32_t j = 0; j < N; j++)
            S += t[j][e];
        float maj = R(D, S) >= 0 ? 1.0f : -1.0f;
        float num = 0, div = 0;
        for (uint32_t j = 0; j < N; j++) {
            float sg = t[j][e] > 0 ? 1.0f : (t[j][e] < 0 ? -1.0f : 0.0f);
            float ew = R(D, W[j] * (sg == maj ? 1.0f : 0.0f));
            num += R(D, t[j][e] * ew);
            div += ew;
        }
        num = R(D, num);
        div = R(D, div);
        div = div < cmin ? cmin : div;
        out[e] = R(D, B[e] + R(D, num / div));
    }
    for (uint32_t j = 0; j < N; j++)
        free(t[j]);
}

static void sce_job(struct ms_stage_job *job, int64_t *shape, enum ms_dtype dt, uint64_t n,
                    uint32_t ninputs, int base, double topk)
{
    memset(job, 0, sizeof(*job));
    shape[0] = (int64_t)n;
    job->name = "t";
    job->ndim = 1;
    job->shape = shape;
    job->numel = n;
    job->row_len = n;
    job->compute = dt;
    job->ninputs = ninputs;
    job->base = base;
    job->method = ms_method_find("sce");
    job->gv[ms_method_param(job->method, "select_topk")] = topk;
    job->key = ms_hash_str("t");
}

static void check(enum ms_dtype dt, uint64_t n, uint32_t ninputs, int base,
                  const float *const *in, double topk, const char *what)
{
    static float want[4096], got[4096];
    sce_ref(dt, n, ninputs, base, in, topk, want);
    struct ms_stage_job job;
    int64_t shape[1];
    sce_job(&job, shape, dt, n, ninputs, base, topk);
    const uint64_t chunks[] = { 1, 7, 100, n };
    for (int c = 0; c < 5; c++) {
        int rc;
        if (c < 4) {
            if (chunks[c] == 1 && n > 48)
                continue;
            rc = ms_stage_run_mem(&job, in, got, chunks[c]);
        } else {
            rc = th_stage_run_shuffled(&job, in, got, 13, n + 3);
        }
        cr_assert_eq(rc, 0, "%s: %s", what, ms_errmsg());
        long d = th_gta_first_diff(got, want, n);
        cr_assert_eq(d, -1, "%s %s topk %g run %d: element %ld is %a, want %a", what,
                     ms_dtype_name(dt), topk, c, d, d >= 0 ? got[d] : 0, d >= 0 ? want[d] : 0);
    }
}

static void random_cases(enum ms_dtype dt, uint64_t seed0, int count)
{
    static const double topks[] = { 1.0, 0.5, 0.1, 0.9, 0.0, 0.01, 0.333 };
    for (int s = 0; s < count; s++) {
        uint64_t seed = seed0 + (uint64_t)s, rs = seed * 0x9E3779B97F4A7C15ULL + 1;
        struct th_gta g = { .method = "task_arithmetic", .dt = dt };
        th_gta_random(&g, store, s % 5 ? 48 : 250, &rs); /* data only */
        char what[120];
        snprintf(what, sizeof what, "seed %llu (n %llu, %u inputs, base %d)",
                 (unsigned long long)seed, (unsigned long long)g.numel, g.ninputs, g.base);
        check(dt, g.numel, g.ninputs, g.base, g.in, topks[s % 7], what);
    }
}

Test(stage_sce, random_bf16) { random_cases(MS_DT_BF16, 100, 42); }
Test(stage_sce, random_f16) { random_cases(MS_DT_F16, 200, 42); }
Test(stage_sce, random_f32) { random_cases(MS_DT_F32, 300, 42); }

/* Many equal variances (a coarse grid, 4 models): the top-k cut falls inside
 * runs of ties, which go to the lower flat index. */
Test(stage_sce, variance_ties_lower_index_first)
{
    static float x[5][4096];
    uint64_t rs = 9;
    for (int i = 0; i < 5; i++)
        for (int e = 0; e < 4096; e++)
            x[i][e] = i == 0 ? 1.0f : 1.0f + (float)((int)(th_gta_rand(&rs) % 5) - 2) / 4.0f;
    const float *in[5] = { x[0], x[1], x[2], x[3], x[4] };
    for (int d = 0; d < 3; d++)
        for (double k = 0.05; k < 1.0; k += 0.3)
            check(dts[d], 4096, 5, 0, in, k, "ties of var");
}

/* One model: var is 0 everywhere, so select_topk < 1 keeps nothing and the
 * output is the base; select_topk 1 gives the model itself. */
Test(stage_sce, one_model)
{
    static float b[64], x[64], out[64];
    for (int e = 0; e < 64; e++) {
        b[e] = (float)e / 8.0f;
        x[e] = b[e] + (float)((e % 3) - 1) / 16.0f;
    }
    const float *in[2] = { b, x };
    for (int d = 0; d < 3; d++) {
        struct ms_stage_job job;
        int64_t shape[1];
        sce_job(&job, shape, dts[d], 64, 2, 0, 0.5);
        cr_assert_eq(ms_stage_run_mem(&job, in, out, 7), 0);
        cr_assert_eq(th_gta_first_diff(out, b, 64), -1);
        sce_job(&job, shape, dts[d], 64, 2, 0, 1.0);
        cr_assert_eq(ms_stage_run_mem(&job, in, out, 7), 0);
        for (int e = 0; e < 64; e++)
            cr_assert_eq(out[e], R(dts[d], x[e]), "element %d", e);
    }
}

Test(stage_sce, registered) { cr_assert_not_null(ms_method_find("sce")->ops); }

/* mergekit divides by the weight sum rounded to D (sce_weight: torch.sum(...).item()).
 * The random cases above follow that rule; here, over the same kind of data, the
 * rule with an exact sum gives other bytes in some cases, so they can see it. */
Test(stage_sce, weight_sum_is_rounded_to_the_compute_dtype)
{
    static float want_exact[4096], want[4096];
    int seen = 0;
    for (int s = 0; s < 200 && !seen; s++) {
        uint64_t rs = (uint64_t)(900 + s) * 0x9E3779B97F4A7C15ULL + 1;
        struct th_gta g = { .method = "task_arithmetic", .dt = MS_DT_BF16 };
        th_gta_random(&g, store, 48, &rs);
        g_exact_wsum = true;
        sce_ref(MS_DT_BF16, g.numel, g.ninputs, g.base, g.in, 1.0, want_exact);
        g_exact_wsum = false;
        sce_ref(MS_DT_BF16, g.numel, g.ninputs, g.base, g.in, 1.0, want);
        if (th_gta_first_diff(want, want_exact, g.numel) < 0)
            continue;
        seen++;
        check(MS_DT_BF16, g.numel, g.ninputs, g.base, g.in, 1.0, "rounded weight sum");
    }
    cr_assert_gt(seen, 0, "no case where the rounded weight sum matters");
}
