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
#include "ms_isa.h"
#include "ms_stage.h"
#include "th_gta.h"

#define MAXN 400

static float store[MS_MAX_INPUTS * MAXN];
static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

/* NaN as x86 arithmetic in torch's operand order: an op whose first operand
 * is NaN gives that NaN made quiet; rounding to bf16/f16 keeps the sign and
 * the payload's top 7 / 10 bits and sets the quiet bit (NUMERICS.md). These
 * make every NaN of the reference explicit, so that no operand order the
 * compiler picks can change it. */
static float quiet(float x) { return ms_f32_from_bits(ms_f32_bits(x) | 0x00400000u); }
static float mul1(float a, float b) { return isnan(a) ? quiet(a) : a * b; }
static float add1(float a, float b) { return isnan(a) ? quiet(a) : a + b; }

static float R(enum ms_dtype dt, float x)
{
    if (isnan(x) && dt != MS_DT_F32)
        return ms_f32_from_bits(ms_f32_bits(quiet(x)) & (dt == MS_DT_BF16 ? ~0xffffu : ~0x1fffu));
    return th_gta_rnd(dt, x);
}

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
     * to show that the cases below can tell the two apart. A NaN square makes
     * the mean +NaN (our rule: torch's NaN there is not reproducible). */
    double mu[MS_MAX_INPUTS], sum = 0;
    float fsum = 0;
    for (uint32_t j = 0; j < N; j++) {
        double s = 0;
        bool nan = false;
        for (uint64_t e = 0; e < n; e++) {
            float sq = R(D, t[j][e] * t[j][e]);
            if (isnan(sq))
                nan = true;
            else
                s += sq;
        }
        mu[j] = nan ? (double)ms_f32_from_bits(0x7fc00000u) : R(D, (float)(s / (double)n));
        sum += mu[j];
        fsum = add1(fsum, (float)mu[j]);
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
            /* tv_weights * erase_mask: NaN * 0 is NaN */
            float ew = R(D, mul1(W[j], sg == maj ? 1.0f : 0.0f));
            num = add1(num, R(D, mul1(t[j][e], ew)));
            div = add1(div, ew);
        }
        num = R(D, num);
        div = R(D, div);
        div = div < cmin ? cmin : div; /* clamp(min=1e-6) keeps a NaN */
        out[e] = R(D, add1(B[e], R(D, num / div)));
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
    for (int c = 0; c < 6; c++) {
        int rc;
        if (c < 4) {
            if (chunks[c] == 1 && n > 48)
                continue;
            rc = ms_stage_run_mem(&job, in, got, chunks[c]);
        } else if (c == 4) {
            rc = th_stage_run_shuffled(&job, in, got, 13, n + 3);
        } else { /* no keep area: every pass recomputes the variance */
            rc = ms_stage_run_mem_keep(&job, in, got, 7, false);
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

/* Runs sce (3 inputs of 4 elements, select_topk 1) in every compute dtype and
 * chunk sizes 1, 1 + step, ... up to 4, and wants the output's bits. */
static void check_bits4(const float *const in[3], const uint32_t want[4], uint64_t step)
{
    for (int d = 0; d < 3; d++) {
        struct ms_stage_job job;
        int64_t shape[1];
        float out[4];
        sce_job(&job, shape, dts[d], 4, 3, 0, 1.0);
        for (uint64_t chunk = 1; chunk <= 4; chunk += step) {
            cr_assert_eq(ms_stage_run_mem(&job, in, out, chunk), 0, "%s", ms_errmsg());
            for (int e = 0; e < 4; e++)
                cr_assert_eq(ms_f32_bits(out[e]), want[e],
                             "%s chunk %llu element %d: %#x, want %#x", ms_dtype_name(dts[d]),
                             (unsigned long long)chunk, e, ms_f32_bits(out[e]), want[e]);
        }
    }
}

/*
 * Non-finite inputs by hand (mergekit-spec.md 2.13 in torch's IEEE arithmetic
 * on x86), select_topk 1, base B and two models:
 *   B  = [sNaN_B, 0, 0, 0]       sNaN_B = 0xff810000 (signalling, -)
 *   x1 = [+qNaN, P, 0, 2]        P = 0x7fe00000 (quiet, a payload bit)
 *   x2 = [1, -qNaN, 0, -2]
 *   t1 = x1 - B = [+qNaN, P, 0, 2]; t2 = [qB, -qNaN, 0, -2] (qB = sNaN_B
 *   quieted, 0xffc10000). Both means are NaN, +NaN by our rule, so the sum
 *   and W1 = W2 = +NaN, and ew = W * mask is +NaN wherever the mask is 0 too.
 *   0: maj -1 (a NaN sum); num = t1 * ew first = +qNaN; q = +qNaN; out =
 *      B + q = qB (B's NaN first, quieted).
 *   1: num = P * ew = P (t first), q = P / NaN = P, out = 0 + P = P.
 *   2: t = 0, 0: no model has the majority sign, ew = W * 0 = +NaN, so
 *      num = 0 * NaN = +qNaN: out +qNaN (a stage setting ew = 0 there
 *      gives the base, 0).
 *   3: +qNaN likewise.
 * Every value is exact in BF16, F16 and F32 (the payload bits are in the top
 * 7 of the mantissa).
 */
Test(stage_sce, nan_inputs_by_hand)
{
    const float b[4] = { ms_f32_from_bits(0xff810000u), 0, 0, 0 };
    const float x1[4] = { ms_f32_from_bits(0x7fc00000u), ms_f32_from_bits(0x7fe00000u), 0, 2 };
    const float x2[4] = { 1, ms_f32_from_bits(0xffc00000u), 0, -2 };
    const uint32_t want[4] = { 0xffc10000u, 0x7fe00000u, 0x7fc00000u, 0x7fc00000u };
    const float *in[3] = { b, x1, x2 };
    check_bits4(in, want, 1);
}

/*
 * An Inf delta and no NaN input, by hand: B = 0, x1 = [+Inf, 1, 0, 2],
 * x2 = [1, 1, 0, -2], select_topk 1. mu1 = +Inf, mu2 = 1.5, the sum +Inf, so
 * W1 = Inf / Inf = the hardware's default NaN (dn, computed here at run time:
 * 0xffc00000 on x86) and W2 = 1.5 / Inf = 0. ew1 = W1 * mask1 is dn at every
 * element, so every sum of ew is dn and every output dn: one Inf makes the
 * whole tensor NaN, as in mergekit.
 */
Test(stage_sce, an_inf_delta_makes_every_output_nan)
{
    volatile float inf = INFINITY;
    const uint32_t dn = ms_f32_bits(inf / inf);
    const float b[4] = { 0, 0, 0, 0 }, x1[4] = { INFINITY, 1, 0, 2 }, x2[4] = { 1, 1, 0, -2 };
    const float *in[3] = { b, x1, x2 };
    const uint32_t want[4] = { dn, dn, dn, dn };
    check_bits4(in, want, 3);
}

/*
 * Random NaN (both signs, quiet and signalling, with payloads) and +-Inf in
 * every input, the base too, against the reference bit for bit: every NaN the
 * stage returns is fixed by its code (the file comment of stages/sce.c), and
 * the reference makes each one explicit (mul1, add1, R), so sign and payload
 * are compared as well as NaN-ness, whatever the build's optimisation. Some
 * seeds give Inf only, or no non-finite value in a masked-out element.
 */
Test(stage_sce, nonfinite_inputs_match_the_reference)
{
    enum { N = 300, NIN = 3 };
    static float x[NIN][N];
    for (int d = 0; d < 3; d++)
        for (uint64_t seed = 1; seed <= 6; seed++) {
            uint64_t rs = 77 * seed + (uint64_t)d;
            cr_log_info("seed %llu", (unsigned long long)rs);
            for (int i = 0; i < NIN; i++)
                for (uint64_t e = 0; e < N; e++) {
                    float v = (float)((int64_t)th_gta_rand(&rs) >> 50) * 0x1p-10f;
                    uint64_t r = th_gta_rand(&rs) % (29 * seed);
                    if (r == 0 && seed % 3 != 0) {
                        /* sign, quiet bit and two payload bits, all kept by bf16 */
                        uint32_t u = 0x7f800000u | (uint32_t)(th_gta_rand(&rs) & 0x80610000u);
                        v = ms_f32_from_bits((u & 0x007f0000u) ? u : u | 0x00400000u);
                    } else if (r == 1) {
                        v = e & 2 ? INFINITY : -INFINITY;
                    }
                    x[i][e] = isnan(v) ? v : R(dts[d], v);
                }
            const float *in[NIN] = { x[0], x[1], x[2] };
            check(dts[d], N, NIN, (int)(seed % 3), in, 1.0, "nonfinite, topk 1");
            check(dts[d], N, NIN, (int)(seed % 3), in, 0.5, "nonfinite, topk 0.5");
            check(dts[d], N, NIN, (int)(seed % 3), in, 0.02, "nonfinite, topk 0.02");
        }
}


/* ------------------------------------------------------------------------ */
/* The stored-bytes path (ms_stage_ops.stored_passes, reduce_stored,        */
/* apply_stored) in bfloat16 and float16.                                    */

/* Counts of the variance-mask cases the stored checks met (keep all, none, some). */
static int g_mask_seen[3];

/* The k of the variance mask as sce_ref computes it (-1: select_topk 1, no mask). */
static int64_t ref_k(enum ms_dtype D, uint64_t n, uint32_t ninputs, int base,
                     const float *const *in, double topk)
{
    if (topk >= 1.0 || ninputs < 2)
        return -1;
    uint64_t nz = 0;
    for (uint64_t e = 0; e < n; e++) {
        double t[MS_MAX_INPUTS], m = 0, v = 0;
        uint32_t N = 0;
        for (uint32_t i = 0; i < ninputs; i++)
            if ((int)i != base)
                m += t[N++] = R(D, in[i][e] - in[base][e]);
        m /= N;
        for (uint32_t j = 0; j < N; j++)
            v += (t[j] - m) * (t[j] - m);
        nz += R(D, (float)(v / N)) != 0.0f;
    }
    return (int64_t)(uint64_t)((float)nz * (float)topk);
}

/*
 * The stored path on in (floats exact in dt, encoded here), chunks of 1 (small
 * tensors), 7, 257 and the whole tensor, with and without a keep area, gives
 * the bytes of the reference's floats encoded to dt, which are also those of
 * the float path (ms_stage_run_mem) encoded.
 */
static void check_stored(enum ms_dtype dt, uint64_t n, uint32_t ninputs, int base,
                         const float *const *in, double topk, const char *what)
{
    static float want[4096], got[4096];
    static uint16_t raw[MS_MAX_INPUTS][4096], want16[4096], got16[4096];
    cr_assert(n <= 4096 && ninputs <= MS_MAX_INPUTS);
    sce_ref(dt, n, ninputs, base, in, topk, want);
    ms_dtype_encode(dt, want, want16, n);
    const void *rin[MS_MAX_INPUTS];
    for (uint32_t i = 0; i < ninputs; i++) {
        ms_dtype_encode(dt, in[i], raw[i], n);
        rin[i] = raw[i];
    }
    int64_t k = ref_k(dt, n, ninputs, base, in, topk);
    if (k >= 0)
        g_mask_seen[k == 0 ? 1 : (uint64_t)k >= n ? 0 : 2]++;
    struct ms_stage_job job;
    int64_t shape[1];
    sce_job(&job, shape, dt, n, ninputs, base, topk);
    /* the float path, encoded: the stored path's contract */
    cr_assert_eq(ms_stage_run_mem(&job, in, got, 7), 0, "%s", ms_errmsg());
    ms_dtype_encode(dt, got, got16, n);
    cr_assert_eq(memcmp(got16, want16, n * 2), 0, "%s: float path", what);
    const uint64_t chunks[] = { 1, 7, 257, 0 };
    for (int c = 0; c < 4; c++)
        for (int keep = 0; keep < 2; keep++) {
            if (chunks[c] == 1 && n > 64)
                continue;
            memset(got16, 0x5a, sizeof got16);
            int rc = ms_stage_run_stored_keep(&job, dt, rin, got16, chunks[c], keep);
            cr_assert_eq(rc, 0, "%s: %s", what, ms_errmsg());
            for (uint64_t e = 0; e < n; e++)
                cr_assert_eq(got16[e], want16[e],
                             "%s %s topk %g chunk %llu keep %d: element %llu is %#x, want %#x",
                             what, ms_dtype_name(dt), topk, (unsigned long long)chunks[c], keep,
                             (unsigned long long)e, got16[e], want16[e]);
        }
}

/* count random cases; every_mask: the variance mask must have kept all, none
 * and some elements in some of them. */
static void stored_random_cases(enum ms_dtype dt, uint64_t seed0, int count, bool every_mask)
{
    /* 0.99999999 is 1.0f as float32: k = count_nonzero(var), all or some */
    static const double topks[] = { 1.0, 0.5, 0.1, 0.99999999, 0.0, 0.01, 0.333 };
    memset(g_mask_seen, 0, sizeof g_mask_seen);
    for (int s = 0; s < count; s++) {
        uint64_t seed = seed0 + (uint64_t)s, rs = seed * 0x9E3779B97F4A7C15ULL + 1;
        struct th_gta g = { .method = "task_arithmetic", .dt = dt };
        th_gta_random(&g, store, s % 5 ? 48 : 400, &rs); /* data only */
        char what[120];
        snprintf(what, sizeof what, "stored seed %llu (n %llu, %u inputs, base %d)",
                 (unsigned long long)seed, (unsigned long long)g.numel, g.ninputs, g.base);
        check_stored(dt, g.numel, g.ninputs, g.base, g.in, topks[s % 7], what);
    }
    for (int m = 0; m < 3 && every_mask; m++)
        cr_assert_gt(g_mask_seen[m], 0, "no case where the mask keeps %s",
                     m == 0 ? "all" : m == 1 ? "none" : "some");
}

Test(stage_sce, stored_random_bf16) { stored_random_cases(MS_DT_BF16, 400, 70, true); }
Test(stage_sce, stored_random_f16) { stored_random_cases(MS_DT_F16, 500, 70, true); }

/*
 * Two and three models with the base first, in the middle and last, every
 * delta nonzero and distinct in variance (so that select_topk 0.99999999 keeps
 * all), with NaN (quiet and signalling, both signs, payloads), +-Inf, -0 and
 * subnormal values of the dtype in some of them: the stored path against the
 * reference, for select_topk keeping all, none and some.
 */
Test(stage_sce, stored_special_values_and_base_positions)
{
    enum { N = 300 };
    static float x[4][N];
    for (int d = 0; d < 2; d++) {
        enum ms_dtype dt = dts[d];
        /* smallest subnormal and a larger one of dt */
        float sub = dt == MS_DT_BF16 ? 0x1p-133f : 0x1p-24f;
        float sub2 = dt == MS_DT_BF16 ? 0x1p-127f : 0x1p-15f;
        for (uint32_t ninputs = 3; ninputs <= 4; ninputs++)
            for (int bp = 0; bp < 3; bp++)
                for (int special = 0; special < 4; special++) {
                    const int base = bp == 0 ? 0 : bp == 1 ? 1 : (int)ninputs - 1;
                    uint64_t rs = 31 * ninputs + 7 * (uint64_t)base + (uint64_t)special;
                    for (uint32_t i = 0; i < ninputs; i++)
                        for (int e = 0; e < N; e++) {
                            float v = (float)(e % 17 + 1) / 16.0f +
                                      (float)(i + 1) * (float)(e % 5 + 1) / 64.0f;
                            uint64_t r = th_gta_rand(&rs) % 23;
                            if (special == 1 && r == 0)
                                v = e & 1 ? -0.0f : 0.0f;
                            else if (special == 1 && r == 1)
                                v = e & 2 ? sub : -sub2;
                            else if (special == 2 && r == 0)
                                v = e & 1 ? INFINITY : -INFINITY;
                            else if (special == 3 && r == 0)
                                v = ms_f32_from_bits((e & 1 ? 0xff810000u : 0x7fc00000u) |
                                                     (e & 4 ? 0x00200000u : 0));
                            else if (special == 3 && r == 1)
                                v = e & 1 ? -sub : sub2;
                            x[i][e] = isnan(v) ? v : R(dt, v);
                        }
                    const float *in[4] = { x[0], x[1], x[2], x[3] };
                    static const double topks[] = { 1.0, 0.99999999, 0.0, 0.4, 0.02 };
                    for (int t = 0; t < 5; t++) {
                        char what[96];
                        snprintf(what, sizeof what, "%u inputs, base %d, special %d", ninputs,
                                 base, special);
                        check_stored(dt, N, ninputs, base, in, topks[t], what);
                    }
                }
    }
}

/* One model (no variance, no keep area) and an empty selection: the base copied
 * (select_topk < 1) or the model (1), through the stored path. */
Test(stage_sce, stored_one_model)
{
    static float b[64], x[64];
    for (int e = 0; e < 64; e++) {
        b[e] = (float)e / 8.0f;
        x[e] = b[e] + (float)((e % 3) - 1) / 16.0f;
    }
    for (int d = 0; d < 2; d++) {
        const float *in[2] = { b, x }, *in2[2] = { x, b };
        check_stored(dts[d], 64, 2, 0, in, 0.5, "one model");
        check_stored(dts[d], 64, 2, 1, in2, 1.0, "one model, base second");
        check_stored(dts[d], 64, 1, 0, in, 0.5, "base only");
    }
}

/* Every ISA version of the stored kernels gives the reference's bytes. */
Test(stage_sce, stored_every_isa_version)
{
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        if (!ms_isa_available((enum ms_isa)isa))
            continue;
        cr_assert_eq(ms_isa_select(ms_isa_name((enum ms_isa)isa)), 0);
        cr_assert_eq(ms_isa_active(), (enum ms_isa)isa);
        stored_random_cases(MS_DT_BF16, 600, 21, false);
        stored_random_cases(MS_DT_F16, 700, 21, false);
    }
    ms_isa_select("auto");
}

/* A float32 compute dtype (bfloat16 inputs, float32 compute) takes the float path. */
Test(stage_sce, stored_declines_another_compute_dtype)
{
    static float b[16], x[16], y[16];
    static uint16_t rb[16], rx[16], ry[16], out[16];
    for (int e = 0; e < 16; e++) {
        b[e] = (float)e;
        x[e] = b[e] + 1;
        y[e] = b[e] - 0.5f;
    }
    ms_dtype_encode(MS_DT_BF16, b, rb, 16);
    ms_dtype_encode(MS_DT_BF16, x, rx, 16);
    ms_dtype_encode(MS_DT_BF16, y, ry, 16);
    const void *rin[3] = { rb, rx, ry };
    struct ms_stage_job job;
    int64_t shape[1];
    sce_job(&job, shape, MS_DT_F32, 16, 3, 0, 0.5);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, rin, out, 0), MS_EUNSUPPORTED);
}
