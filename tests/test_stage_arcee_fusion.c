/*
 * test_stage_arcee_fusion.c - the arcee_fusion stage (stages/arcee_fusion.c,
 * mergekit-spec.md 2.11) against a plain reference written here from the spec:
 * per-row softmax and kl, the importances sorted with qsort (NaN last) and
 * the quantiles read at int(q * (n - 1)), bit for bit in BF16, F16 and F32, on
 * 1-D and 2-D tensors, for several chunkings (whole rows) and chunk orders.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_gta.h"

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

static float R(enum ms_dtype dt, float x) { return th_gta_rnd(dt, x); }

static int asc_nan_last(const void *pa, const void *pb)
{
    float x = *(const float *)pa, y = *(const float *)pb;
    if (isnan(x) || isnan(y))
        return isnan(x) - isnan(y);
    return (x > y) - (x < y);
}

/* Importance of every element (rows of L). */
static void ref_imp(enum ms_dtype D, const float *p, const float *b, uint64_t n, uint64_t L,
                    float *imp)
{
    for (uint64_t r = 0; r < n; r += L) {
        float mp = -INFINITY, mb = -INFINITY;
        for (uint64_t i = r; i < r + L; i++) {
            mp = p[i] > mp || isnan(p[i]) ? p[i] : mp;
            mb = b[i] > mb || isnan(b[i]) ? b[i] : mb;
        }
        double sp = 0, sb = 0;
        for (uint64_t i = r; i < r + L; i++) {
            sp += expf(p[i] - mp);
            sb += expf(b[i] - mb);
        }
        double kls = 0;
        for (uint64_t i = r; i < r + L; i++) {
            float P = R(D, R(D, (float)(expf(p[i] - mp) / sp)) + 1e-8f);
            float Q = R(D, R(D, (float)(expf(b[i] - mb) / sb)) + 1e-8f);
            kls += R(D, P * R(D, logf(R(D, P / Q))));
        }
        float kl = R(D, (float)kls);
        for (uint64_t i = r; i < r + L; i++)
            imp[i] = R(D, fabsf(R(D, p[i] - b[i])) * kl);
    }
}

/* The reference; returns the number of negative importances. */
static uint64_t ref_fusion(enum ms_dtype D, const float *p, const float *b, uint64_t n,
                           uint64_t L, float *out, float *thr_out)
{
    float *imp = malloc(n * sizeof(float)), *s = malloc(n * sizeof(float));
    ref_imp(D, p, b, n, L, imp);
    memcpy(s, imp, n * sizeof(float));
    qsort(s, n, sizeof(float), asc_nan_last);
    const float qs[3] = { 0.25f, 0.5f, 0.75f };
    float qv[3];
    for (int q = 0; q < 3; q++)
        qv[q] = s[(uint64_t)(qs[q] * (float)(n - 1))];
    float thr = R(D, qv[1] + R(D, 1.5f * R(D, qv[2] - qv[0])));
    uint64_t neg = 0;
    for (uint64_t e = 0; e < n; e++) {
        neg += imp[e] < 0;
        out[e] = b[e] + R(D, p[e] - b[e]) * (imp[e] >= thr ? 1.0f : 0.0f);
    }
    if (thr_out)
        *thr_out = thr;
    free(imp);
    free(s);
    return neg;
}

static void af_job(struct ms_stage_job *job, int64_t *shape, enum ms_dtype dt, uint64_t n,
                   uint64_t L, uint32_t ninputs, int base)
{
    memset(job, 0, sizeof(*job));
    job->name = "t";
    if (L < n) {
        shape[0] = (int64_t)(n / L);
        shape[1] = (int64_t)L;
        job->ndim = 2;
    } else {
        shape[0] = (int64_t)n;
        job->ndim = 1;
    }
    job->shape = shape;
    job->numel = n;
    job->row_len = L;
    job->compute = dt;
    job->ninputs = ninputs;
    job->base = base;
    job->method = ms_method_find("arcee_fusion");
    job->key = ms_hash_str("t");
}

/* Runs base b and model p (input order by base_first) at several chunkings. */
static uint64_t check(enum ms_dtype dt, const float *p, const float *b, uint64_t n, uint64_t L,
                      bool base_first, const char *what)
{
    float *want = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    uint64_t neg = ref_fusion(dt, p, b, n, L, want, NULL);
    struct ms_stage_job job;
    int64_t shape[2];
    af_job(&job, shape, dt, n, L, 2, base_first ? 0 : 1);
    const float *in[2] = { base_first ? b : p, base_first ? p : b };
    const uint64_t chunks[] = { 1, 7, 3 * L + 1, n };
    for (int c = 0; c < 5; c++) {
        int rc = c < 4 ? ms_stage_run_mem(&job, in, got, chunks[c])
                       : th_stage_run_shuffled(&job, in, got, 2 * L, n);
        cr_assert_eq(rc, 0, "%s: %s", what, ms_errmsg());
        long d = th_gta_first_diff(got, want, n);
        cr_assert_eq(d, -1, "%s %s run %d: element %ld is %a, want %a", what, ms_dtype_name(dt),
                     c, d, d >= 0 ? got[d] : 0, d >= 0 ? want[d] : 0);
    }
    free(want);
    free(got);
    return neg;
}

/* Random models: rows of L, the fine-tune a small perturbation of the base,
 * sometimes equal to it (kl 0, importance 0), sometimes tiny (kl may round
 * below zero, giving negative importances). */
static uint64_t random_pair(enum ms_dtype dt, uint64_t n, uint64_t L, uint64_t *rs, float *p,
                            float *b)
{
    for (uint64_t r = 0; r < n; r += L) {
        int kind = (int)(th_gta_rand(rs) % 4);
        for (uint64_t i = r; i < r + L; i++) {
            b[i] = R(dt, (float)((int64_t)th_gta_rand(rs) >> 40) * 0x1p-22f);
            float eps = kind == 0 ? 0.0f : kind == 1 ? 0x1p-12f : 0x1p-5f;
            p[i] = R(dt, b[i] + eps * (float)((int)(th_gta_rand(rs) % 9) - 4));
        }
    }
    return n;
}

static void random_cases(enum ms_dtype dt, uint64_t seed0, int count)
{
    static float p[6000], b[6000];
    uint64_t negs = 0;
    for (int s = 0; s < count; s++) {
        uint64_t rs = (seed0 + (uint64_t)s) * 0x9E3779B97F4A7C15ULL + 1;
        uint64_t L = 1 + th_gta_rand(&rs) % 64, rows = 1 + th_gta_rand(&rs) % 80;
        if (s % 4 == 0)
            rows = 1; /* 1-D */
        uint64_t n = L * rows;
        random_pair(dt, n, L, &rs, p, b);
        char what[100];
        snprintf(what, sizeof what, "seed %llu (rows %llu x %llu)",
                 (unsigned long long)(seed0 + (uint64_t)s), (unsigned long long)rows,
                 (unsigned long long)L);
        negs += check(dt, p, b, n, L, s & 1, what);
    }
    cr_log_info("%s: %llu negative importances met", ms_dtype_name(dt), (unsigned long long)negs);
}

Test(stage_arcee_fusion, random_bf16) { random_cases(MS_DT_BF16, 10, 60); }
Test(stage_arcee_fusion, random_f16) { random_cases(MS_DT_F16, 20, 60); }
Test(stage_arcee_fusion, random_f32) { random_cases(MS_DT_F32, 30, 60); }

/* Negative importances (kl rounded below zero) put quantiles among the
 * negatives: built directly so the path is certainly taken. A row whose
 * model equals the base except for tiny shifts gives kl <= 0 in bf16 here;
 * the test asserts it found such rows. */
Test(stage_arcee_fusion, quantiles_among_negatives)
{
    static float p[4096], b[4096];
    uint64_t found = 0;
    for (uint64_t s = 0; s < 200 && found < 5; s++) {
        uint64_t rs = s + 1, L = 16 + s % 7, n = L * 40;
        for (uint64_t i = 0; i < n; i++) {
            b[i] = R(MS_DT_BF16, (float)((int)(th_gta_rand(&rs) % 64) - 32) / 8.0f);
            p[i] = R(MS_DT_BF16, b[i] + (float)((int)(th_gta_rand(&rs) % 3) - 1) / 64.0f);
        }
        float want[4096], thr;
        uint64_t neg = ref_fusion(MS_DT_BF16, p, b, n, L, want, &thr);
        if (neg * 4 > n) {
            found++;
            check(MS_DT_BF16, p, b, n, L, true, "negatives");
        }
    }
    cr_assert(found >= 1, "no case with a quarter of the importances negative");
}

/* Quantile positions: the order statistic int(q*(n-1)) of a sort, for sizes
 * around the rounding of q*(n-1); equal values everywhere but one element. */
Test(stage_arcee_fusion, small_sizes)
{
    static float p[64], b[64];
    for (int d = 0; d < 3; d++) {
        for (uint64_t n = 1; n <= 12; n++) {
            uint64_t rs = n;
            random_pair(dts[d], n, n, &rs, p, b);
            check(dts[d], p, b, n, n, true, "1-D small");
            check(dts[d], p, b, n, 1, false, "one-element rows");
        }
    }
}

/* Only the base: a copy. */
Test(stage_arcee_fusion, base_only)
{
    float b[5] = { 1, -2, 0.5f, 0, 3 }, out[5];
    struct ms_stage_job job;
    int64_t shape[2];
    af_job(&job, shape, MS_DT_BF16, 5, 5, 1, 0);
    const float *in[1] = { b };
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 2), 0);
    cr_assert_eq(th_gta_first_diff(out, b, 5), -1);
}

Test(stage_arcee_fusion, registered)
{
    cr_assert_not_null(ms_method_find("arcee_fusion")->ops);
    cr_assert(ms_method_find("arcee_fusion")->ops->flags & MS_STAGE_ROWWISE);
}
