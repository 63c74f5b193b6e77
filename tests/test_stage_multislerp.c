/*
 * test_stage_multislerp.c - `multislerp` (stages/multislerp.c,
 * mergekit-spec.md 2.5).
 *
 * Expected values come from hand computation and from a plain reference
 * written here from the spec over whole arrays: every elementwise step rounded
 * (the independent rounding of tests/th_stage.c), the four whole-tensor sums
 * in long double rounded once to float32. The stage's sums are exact, so on
 * these sizes the two agree bit for bit in BF16, F16 and F32, with and without
 * a base, at several chunk sizes. The stage guesses two of the sums and
 * checks the guesses (stages/multislerp.c); a driver here counts its passes,
 * so that the tests also reach the passes that follow a wrong guess.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

enum { NMAX = 1 << 16, NREF = 8 };

static void ref_multislerp(enum ms_dtype dt, const float *const *in, uint32_t n, int base,
                           const double *weight, bool normalize, double eps, size_t numel,
                           float *out)
{
#define R(x) th_stage_round(dt, (x))
    static float X[NREF][NMAX], U[NREF][NMAX], M[NMAX], T[NREF][NMAX], tau[NMAX];
    cr_assert(numel <= NMAX && n <= NREF);
    uint32_t it[MS_MAX_INPUTS], N = 0;
    for (uint32_t i = 0; i < n; i++)
        if ((int)i != base)
            it[N++] = i;
    float w[MS_MAX_INPUTS], ws = 0.0f, e = (float)eps;
    for (uint32_t i = 0; i < N; i++) {
        w[i] = R((float)weight[it[i]]);
        ws += w[i];
    }
    if (normalize)
        for (uint32_t i = 0; i < N; i++)
            w[i] = R(w[i] / R(ws));
    float nrm[MS_MAX_INPUTS];
    for (uint32_t i = 0; i < N; i++) {
        long double ss = 0;
        for (size_t j = 0; j < numel; j++) {
            X[i][j] = base >= 0 ? R(in[it[i]][j] - in[base][j]) : in[it[i]][j];
            ss += (long double)X[i][j] * X[i][j];
        }
        nrm[i] = R(sqrtf((float)ss));
        for (size_t j = 0; j < numel; j++)
            U[i][j] = R(X[i][j] / R(nrm[i] + e));
    }
    long double ss = 0;
    for (size_t j = 0; j < numel; j++) {
        float acc = 0.0f;
        for (uint32_t i = 0; i < N; i++)
            acc += R(U[i][j] * w[i]);
        M[j] = R(acc);
        ss += (long double)M[j] * M[j];
    }
    float mn = R(sqrtf((float)ss));
    if (mn < R((float)eps)) {
        cr_assert(N == 2);
        for (size_t j = 0; j < numel; j++) {
            float r = R(R(X[0][j] * w[0]) + R(X[1][j] * w[1]));
            out[j] = base >= 0 ? R(r + in[base][j]) : r;
        }
        return;
    }
    for (size_t j = 0; j < numel; j++)
        M[j] = R(M[j] / mn);
    for (uint32_t i = 0; i < N; i++) {
        long double dot = 0;
        for (size_t j = 0; j < numel; j++)
            dot += R(U[i][j] * M[j]);
        float dt_i = R((float)dot);
        for (size_t j = 0; j < numel; j++)
            T[i][j] = R(U[i][j] - R(dt_i * M[j]));
    }
    ss = 0;
    for (size_t j = 0; j < numel; j++) {
        float acc = 0.0f;
        for (uint32_t i = 0; i < N; i++)
            acc += R(T[i][j] * w[i]);
        tau[j] = R(acc);
        ss += (long double)tau[j] * tau[j];
    }
    float tn = R(R(sqrtf((float)ss)) + e);
    float cs = R(cosf(tn)), q = R(R(sinf(tn)) / tn);
    float avg = 0.0f;
    for (uint32_t i = 0; i < N; i++)
        avg += R(nrm[i] * w[i]);
    avg = R(avg);
    for (size_t j = 0; j < numel; j++) {
        float r = R(R(R(M[j] * cs) + R(tau[j] * q)) * avg);
        out[j] = base >= 0 ? R(r + in[base][j]) : r;
    }
#undef R
}

static struct ms_stage_job mk(const int64_t *shape, uint32_t ndim, enum ms_dtype dt, uint32_t n,
                              int base, const double *w)
{
    struct ms_stage_job job;
    th_stage_job(&job, "multislerp", shape, ndim, dt, n);
    job.base = base;
    for (uint32_t i = 0; i < n; i++)
        th_stage_set(&job, (int)i, "weight", w[i]);
    return job;
}

Test(multislerp, registered) { cr_assert(ms_method_find("multislerp")->ops); }

Test(multislerp, hand_computed)
{
    /* (1, 0) and (0, 1), weights 0.5: U = X, M = (0.5, 0.5), m = (1, 1)/sqrt 2,
     * the tangents cancel (tau = 0, tn = eps): r = m, times the mean norm 1:
     * out = (0.70710678, 0.70710678), the slerp midpoint. */
    static const int64_t shape[1] = { 2 };
    static const double w[3] = { 0.5, 0.5, 0 };
    float a[2] = { 1, 0 }, b[2] = { 0, 1 }, out[2];
    const float *in[2] = { a, b };
    struct ms_stage_job job = mk(shape, 1, MS_DT_F32, 2, -1, w);
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
    cr_assert(th_stage_ulps(out[0], (float)M_SQRT1_2) <= 1 &&
                  th_stage_ulps(out[1], (float)M_SQRT1_2) <= 1,
              "%a %a", out[0], out[1]);
    /* The same around a base (10, 10): task vectors (1, 0), (0, 1). */
    float ten[2] = { 10, 10 }, a1[2] = { 11, 10 }, b1[2] = { 10, 11 };
    const float *in1[3] = { a1, ten, b1 };
    static const double w1[3] = { 0.5, 0, 0.5 };
    job = mk(shape, 1, MS_DT_F32, 3, 1, w1);
    cr_assert_eq(ms_stage_run_mem(&job, in1, out, 0), 0, "%s", ms_errmsg());
    cr_assert(th_stage_ulps(out[0], 10.0f + (float)M_SQRT1_2) <= 1, "%a", out[0]);
}

Test(multislerp, antipodal)
{
    /* (1, 2) and (-1, -2) with equal weights: the mean is 0. Two models fall
     * back to 0.5*X0 + 0.5*X1 = 0; three are an error. */
    static const int64_t shape[1] = { 2 };
    static const double w[3] = { 1, 1, 1 };
    float a[2] = { 1, 2 }, b[2] = { -1, -2 }, z[2] = { 0, 0 }, out[2];
    const float *in[3] = { a, b, z };
    struct ms_stage_job job = mk(shape, 1, MS_DT_BF16, 2, -1, w);
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
    cr_assert(out[0] == 0 && out[1] == 0);
    float a2[2] = { 2, 4 }, b2[2] = { -1, -2 }, c2[2] = { -1, -2 };
    static const double w2[3] = { 0.5, 0.25, 0.25 }; /* 0.5*(1,2)/|.| + ... = 0 */
    const float *in2[3] = { a2, b2, c2 };
    job = mk(shape, 1, MS_DT_F32, 3, -1, w2);
    cr_assert_eq(ms_stage_run_mem(&job, in2, out, 0), MS_EDATA);
    cr_assert(strstr(ms_errmsg(), "t:"), "%s", ms_errmsg());
}

Test(multislerp, input_rules)
{
    static const int64_t shape[1] = { 3 };
    static const double w[2] = { 1, 1 };
    float a[3] = { 1, -0.0f, 3 }, b[3] = { 5, 6, 7 }, out[3];
    const float *in[2] = { a, b };
    struct ms_stage_job job = mk(shape, 1, MS_DT_BF16, 2, 1, w); /* one model plus the base */
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0);
    cr_assert(!memcmp(a, out, sizeof(a))); /* returned unchanged, the base ignored */
    job = mk(shape, 1, MS_DT_BF16, 1, 0, w); /* the base alone */
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
}

Test(multislerp, random_vs_reference_bit_exact)
{
    enum { R_ = 12, C_ = 31, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float store[7][N], out[N], want[N];
    for (int d = 0; d < 3; d++)
        for (uint32_t n = 2; n <= 6; n += 2)
            for (int withbase = 0; withbase < 2; withbase++)
                for (int norm = 0; norm < 2; norm++) {
                    uint64_t s = 9300 + (uint64_t)d * 1000 + n * 100 + (uint64_t)withbase * 10 +
                                 (uint64_t)norm;
                    cr_log_info("seed %llu", (unsigned long long)s);
                    uint32_t nin = n + (uint32_t)withbase;
                    int base = withbase ? (int)(s % nin) : -1;
                    double w[MS_MAX_INPUTS];
                    const float *in[7];
                    static float common[N];
                    for (int j = 0; j < N; j++)
                        common[j] = th_stage_value(MS_DT_F32, &s, 0.05f);
                    for (uint32_t i = 0; i < nin; i++) {
                        for (int j = 0; j < N; j++)
                            store[i][j] = th_stage_round(
                                dts[d], common[j] + th_stage_value(MS_DT_F32, &s, 0.03f));
                        w[i] = 0.2 + 0.1 * (double)((s >> 7) % 7);
                        in[i] = store[i];
                    }
                    struct ms_stage_job job = mk(shape, 2, dts[d], nin, base, w);
                    th_stage_set(&job, -1, "normalize_weights", norm);
                    static const uint64_t sizes[] = { 0, 1, 7, C_, 100 };
                    th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
                    ref_multislerp(dts[d], in, nin, base, w, norm, 1e-8, N, want);
                    for (int j = 0; j < N; j++)
                        cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                                  "dt %d n %u base %d norm %d elt %d: %a vs %a", dts[d], n, base,
                                  norm, j, out[j], want[j]);
                }
}

/* bfloat16 keeps M, m and tau in the keep area (stages/multislerp.c); the
 * engine's fallback without one replays the chain: both give the reference's
 * bytes, with and without a base, for every chunking. */
Test(multislerp, keep_area_and_replay_give_the_same_bytes)
{
    enum { R_ = 9, C_ = 37, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float store[4][N], out[N], alt[N], want[N];
    for (int withbase = 0; withbase < 2; withbase++) {
        uint64_t s = 4711 + (uint64_t)withbase;
        uint32_t nin = 3 + (uint32_t)withbase;
        int base = withbase ? 1 : -1;
        double w[MS_MAX_INPUTS] = { 0.5, 0.3, 0.2, 0.4 };
        const float *in[4];
        for (uint32_t i = 0; i < nin; i++) {
            for (int j = 0; j < N; j++)
                store[i][j] = th_stage_round(MS_DT_BF16, th_stage_value(MS_DT_F32, &s, 0.05f));
            in[i] = store[i];
        }
        struct ms_stage_job job = mk(shape, 2, MS_DT_BF16, nin, base, w);
        cr_assert(job.method->ops->keeps && job.method->ops->keeps(&job));
        static const uint64_t sizes[] = { 0, 1, 5, C_, 256, 300 };
        th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
        ref_multislerp(MS_DT_BF16, in, nin, base, w, true, 1e-8, N, want);
        cr_assert(!memcmp(out, want, sizeof out), "base %d: keep area differs from reference", base);
        for (size_t k = 0; k < MS_ARRAY_LEN(sizes); k++) {
            cr_assert_eq(ms_stage_run_mem_keep(&job, in, alt, sizes[k], false), 0, "%s",
                         ms_errmsg());
            cr_assert(!memcmp(out, alt, sizeof out), "base %d chunk %llu: replay differs", base,
                      (unsigned long long)sizes[k]);
        }
    }
}

/*
 * Runs the stage protocol over chunks of `chunk` elements (0: one chunk),
 * forward, with a keep area when keep, and returns the number of reduce
 * passes; out gets the result. A plain driver (ms_stage_run_mem is the
 * reference one): here only the count of passes is new.
 */
static uint32_t run_counting(const struct ms_stage_job *job, const float *const *in, float *out,
                             uint64_t chunk, bool keep)
{
    const struct ms_stage_ops *ops = job->method->ops;
    if (!chunk)
        chunk = job->numel;
    void *state = calloc(1, ops->state_size(job));
    void *part = malloc(ops->partial_size(job));
    uint32_t *kp = keep ? calloc(job->numel, MS_KEEP_BYTES) : NULL;
    cr_assert(state && part && (kp || !keep));
    uint32_t passes = 0;
    int r = ops->begin(state, job);
    for (; r == MS_STAGE_REDUCE; passes++) {
        cr_assert(passes < 10);
        for (uint64_t f = 0; f < job->numel; f += chunk) {
            struct ms_chunk c = { .first = f, .count = MS_MIN(chunk, job->numel - f),
                                  .index = (uint32_t)(f / chunk), .pass = passes };
            for (uint32_t i = 0; i < job->ninputs; i++)
                c.in[i] = in[i] + f;
            c.keep = kp ? kp + f : NULL;
            memset(part, 0xff, ops->partial_size(job));
            ops->reduce(state, job, &c, part);
            ops->fold(state, job, &c, part);
        }
        r = ops->end_pass(state, job);
    }
    cr_assert_eq(r, MS_STAGE_APPLY, "%s", ms_errmsg());
    for (uint64_t f = 0; f < job->numel; f += chunk) {
        struct ms_chunk c = { .first = f, .count = MS_MIN(chunk, job->numel - f),
                              .index = (uint32_t)(f / chunk), .pass = passes, .out = out + f };
        for (uint32_t i = 0; i < job->ninputs; i++)
            c.in[i] = in[i] + f;
        c.keep = kp ? kp + f : NULL;
        ops->apply(state, job, &c);
    }
    free(state);
    free(part);
    free(kp);
    return passes;
}

/*
 * Tensors larger than the stage's sample (16 Ki elements) with heavy-tailed
 * values: the guesses of mn and the dots, corrected from a sample only, now and
 * then come out one bf16 ulp off, and the stage runs its chain again with the
 * exact figure. Every run gives the reference's bytes, whatever the number of
 * passes; the seeds include runs that needed one extra pass (a wrong mn, or
 * wrong dots) and two (a wrong mn, then wrong dots re-guessed with the exact
 * one): 2 reduce passes when every guess holds, 4 at most. Small tensors are
 * sampled whole, so their guesses always hold.
 */
Test(multislerp, wrong_guesses_cost_passes_not_bytes, .timeout = 120)
{
    enum { R_ = 64, C_ = 1000, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float store[4][N], out[N], want[N];
    uint32_t seen[6] = { 0 };
    for (uint64_t seed = 21; seed <= 40; seed++) {
        uint64_t s = 0x5eed0000u + seed;
        uint32_t nin = 3 + (uint32_t)(seed % 2);
        int base = seed % 2 ? 0 : -1;
        double w[MS_MAX_INPUTS] = { 0.5, 0.3, 0.2, 0.4 };
        const float *in[4];
        for (uint32_t i = 0; i < nin; i++) {
            for (int j = 0; j < N; j++) {
                /* a shared direction plus noise, scaled by 2^0..2^7 at random */
                uint64_t t = 0x9e3779b97f4a7c15u * (seed * 131 + (uint64_t)j);
                float common = (float)((t >> 40) % 2001) / 1000.0f - 1.0f;
                float x = common + th_stage_value(MS_DT_F32, &s, 0.3f);
                store[i][j] = th_stage_round(MS_DT_BF16, ldexpf(x, (int)((t >> 20) % 8)));
            }
            in[i] = store[i];
        }
        struct ms_stage_job job = mk(shape, 2, MS_DT_BF16, nin, base, w);
        ref_multislerp(MS_DT_BF16, in, nin, base, w, true, 1e-8, N, want);
        static const uint64_t sizes[] = { 0, 7000 };
        for (size_t k = 0; k < MS_ARRAY_LEN(sizes); k++)
            for (int keep = 0; keep < 2; keep++) {
                uint32_t passes = run_counting(&job, in, out, sizes[k], keep);
                cr_assert(passes >= 2 && passes <= 4, "seed %llu: %u passes",
                          (unsigned long long)seed, passes);
                seen[passes]++;
                for (int j = 0; j < N; j++)
                    cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                              "seed %llu chunk %llu keep %d (%u passes) elt %d: %a vs %a",
                              (unsigned long long)seed, (unsigned long long)sizes[k], keep,
                              passes, j, out[j], want[j]);
            }
    }
    cr_log_info("reduce passes: 2: %u, 3: %u, 4: %u", seen[2], seen[3], seen[4]);
    cr_assert(seen[2] > 0 && seen[3] > 0 && seen[4] > 0, "2: %u, 3: %u, 4: %u", seen[2], seen[3],
              seen[4]);

    /* A small tensor is sampled whole: its guesses hold. */
    enum { NS = 2000 };
    static const int64_t small[1] = { NS };
    const float *in[3] = { store[0], store[1], store[2] };
    struct ms_stage_job job = mk(small, 1, MS_DT_BF16, 3, -1, (const double[]){ 0.5, 0.3, 0.2 });
    cr_assert_eq(run_counting(&job, in, out, 0, false), 2);
    cr_assert_eq(run_counting(&job, in, out, 333, true), 2);
}

/* ------------------------------------------------------------------------ */
/* The stored-bytes path (ms_stage_ops.stored_passes, reduce_stored,         */
/* apply_stored): bfloat16 or float16 bytes in, the same dtype out.           */

static void enc16(enum ms_dtype dt, const float *x, uint16_t *h, size_t n)
{
    (dt == MS_DT_BF16 ? ms_f32_to_bf16_ref : ms_f32_to_f16_ref)(x, h, n);
}

static void dec16(enum ms_dtype dt, const uint16_t *h, float *x, size_t n)
{
    (dt == MS_DT_BF16 ? ms_bf16_to_f32_ref : ms_f16_to_f32_ref)(h, x, n);
}

/*
 * For bfloat16 and float16 bytes, computed in that dtype or in float32, N = 2,
 * 3 and 4 models with and without a base (at the first, a middle or the last
 * position), ordinary values and tensors holding -0 and subnormals (or an Inf
 * and a NaN: every output NaN), at chunk sizes 1, 7, 257 and whole (blocks of
 * 1024 with a tail), with and without a keep area: the stored path writes the
 * float path's floats encoded by the scalar reference encoder, and on ordinary
 * values the independent reference's.
 */
Test(multislerp, stored_path_gives_the_float_path_bytes, .timeout = 120)
{
    enum { R_ = 26, C_ = 100, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float store[5][N], out[N], want[N];
    static uint16_t hin[5][N], got[N], wantb[N], refb[N];
    static const uint64_t sizes[] = { 1, 7, 257, 0 };
    static const enum ms_dtype sdts[2] = { MS_DT_BF16, MS_DT_F16 };
    for (int d = 0; d < 2; d++)
        for (int f32 = 0; f32 < 2; f32++)
            for (uint32_t n = 2; n <= 4; n++)
                for (int bpos = -1; bpos < 3; bpos++)
                    for (int mode = 0; mode < 3; mode++) {
                        enum ms_dtype dt = sdts[d], cdt = f32 ? MS_DT_F32 : dt;
                        uint64_t s = 880000 + (uint64_t)d * 10000 + (uint64_t)f32 * 1000 +
                                     n * 100 + (uint64_t)(bpos + 1) * 10 + (uint64_t)mode;
                        uint32_t nin = n + (bpos >= 0);
                        int base = bpos < 0 ? -1 : bpos == 0 ? 0 : bpos == 1 ? 1 : (int)nin - 1;
                        double w[MS_MAX_INPUTS];
                        const float *in[5];
                        const void *hp[5];
                        for (uint32_t i = 0; i < nin; i++) {
                            for (int j = 0; j < N; j++)
                                store[i][j] = th_stage_value(dt, &s, 0.02f + 0.01f * (float)i);
                            w[i] = 0.2 + 0.1 * (double)((s >> 9) % 5);
                        }
                        if (mode >= 1) {
                            store[0][3] = -0.0f;
                            store[nin - 1][1500] = -0.0f;
                            store[0][10] = dt == MS_DT_BF16 ? 0x1p-130f : 0x1p-20f;
                            store[nin - 1][1030] = dt == MS_DT_BF16 ? -0x1p-133f : -0x1p-23f;
                            if (mode == 2) {
                                store[nin - 1][2000] = INFINITY;
                                memcpy(&store[0][2047], &(uint32_t){ 0xffc50000u }, 4);
                            }
                        }
                        for (uint32_t i = 0; i < nin; i++) {
                            enc16(dt, store[i], hin[i], N);
                            dec16(dt, hin[i], store[i], N); /* what the float path sees */
                            in[i] = store[i];
                            hp[i] = hin[i];
                        }
                        struct ms_stage_job job = mk(shape, 2, cdt, nin, base, w);
                        th_stage_set(&job, -1, "normalize_weights", (double)(s % 2));
                        cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
                        enc16(dt, out, wantb, N);
                        if (mode < 2) {
                            ref_multislerp(cdt, in, nin, base, w, s % 2, 1e-8, N, want);
                            enc16(dt, want, refb, N);
                            cr_assert(!memcmp(refb, wantb, sizeof refb), "seed %llu: float path",
                                      (unsigned long long)s);
                        }
                        for (size_t z = 0; z < MS_ARRAY_LEN(sizes); z++)
                            for (int keep = 0; keep < 2; keep++) {
                                memset(got, 0x5a, sizeof got);
                                cr_assert_eq(ms_stage_run_stored_keep(&job, dt, hp, got, sizes[z],
                                                                      keep),
                                             0, "%s", ms_errmsg());
                                for (int j = 0; j < N; j++)
                                    cr_assert_eq(got[j], wantb[j],
                                                 "seed %llu chunk %llu keep %d elt %d: %04x "
                                                 "want %04x",
                                                 (unsigned long long)s,
                                                 (unsigned long long)sizes[z], keep, j, got[j],
                                                 wantb[j]);
                            }
                    }
}

/*
 * The stored path's other applies: the linear fallback of two antipodal
 * models (0.5 (1, 2) + 0.5 (-1, -2) = 0, around a base (3, -5): the base),
 * three such models an error, and one model returned as stored (a signalling
 * NaN quieted: bfloat16 0x7f81 -> 0x7fc1, float16 0x7c01 -> 0x7e01, as the
 * float path's encode does).
 */
Test(multislerp, stored_lerp_error_and_copy)
{
    static const int64_t shape[1] = { 2 };
    static const double w[3] = { 1, 1, 1 };
    uint16_t a[2], b[2], bb[2], o[2];
    enc16(MS_DT_BF16, (const float[]){ 1, 2 }, a, 2);
    enc16(MS_DT_BF16, (const float[]){ -1, -2 }, b, 2);
    const void *in[3] = { a, b };
    struct ms_stage_job job = mk(shape, 1, MS_DT_BF16, 2, -1, w);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, in, o, 0), 0, "%s", ms_errmsg());
    cr_assert(o[0] == 0 && o[1] == 0, "%04x %04x", o[0], o[1]);
    /* around a base: the task vectors (1, 2) and (-1, -2) */
    uint16_t a1[2], b1[2];
    enc16(MS_DT_BF16, (const float[]){ 4, -3 }, a1, 2);
    enc16(MS_DT_BF16, (const float[]){ 2, -7 }, b1, 2);
    enc16(MS_DT_BF16, (const float[]){ 3, -5 }, bb, 2);
    const void *in1[3] = { a1, bb, b1 };
    job = mk(shape, 1, MS_DT_BF16, 3, 1, w);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, in1, o, 1), 0, "%s", ms_errmsg());
    cr_assert(o[0] == bb[0] && o[1] == bb[1], "%04x %04x", o[0], o[1]);
    /* three antipodal models: an error */
    uint16_t a2[2], c2[2];
    enc16(MS_DT_F16, (const float[]){ 2, 4 }, a2, 2);
    enc16(MS_DT_F16, (const float[]){ -1, -2 }, c2, 2);
    const void *in2[3] = { a2, c2, c2 };
    job = mk(shape, 1, MS_DT_F32, 3, -1, (const double[]){ 0.5, 0.25, 0.25 });
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_F16, in2, o, 0), MS_EDATA);
    /* one model (plus the base): as stored, NaN quieted */
    for (int d = 0; d < 2; d++) {
        enum ms_dtype dt = d ? MS_DT_F16 : MS_DT_BF16;
        uint16_t x[2] = { d ? 0x7c01 : 0x7f81, 0x3f80 }, y[2] = { 0x1234, 0x4321 };
        const void *in3[2] = { y, x };
        job = mk(shape, 1, dt, 2, 0, w);
        cr_assert_eq(ms_stage_run_stored(&job, dt, in3, o, 0), 0, "%s", ms_errmsg());
        cr_assert(o[0] == (d ? 0x7e01 : 0x7fc1) && o[1] == 0x3f80, "%04x %04x", o[0], o[1]);
    }
}

/* run_counting on the stored path: the same protocol through reduce_stored and
 * apply_stored, bfloat16 bytes. */
static uint32_t run_counting_stored(const struct ms_stage_job *job, const uint16_t *const *in,
                                    uint16_t *out, uint64_t chunk, bool keep)
{
    const struct ms_stage_ops *ops = job->method->ops;
    if (!chunk)
        chunk = job->numel;
    void *state = calloc(1, ops->state_size(job));
    void *part = malloc(ops->partial_size(job));
    uint32_t *kp = keep ? calloc(job->numel, MS_KEEP_BYTES) : NULL;
    cr_assert(state && part && (kp || !keep));
    uint32_t passes = 0;
    int r = ops->begin(state, job);
    cr_assert(r != MS_STAGE_REDUCE || ops->stored_passes(state, job, MS_DT_BF16));
    for (; r == MS_STAGE_REDUCE; passes++) {
        cr_assert(passes < 10);
        for (uint64_t f = 0; f < job->numel; f += chunk) {
            struct ms_chunk_stored c = { .first = f, .count = MS_MIN(chunk, job->numel - f),
                                         .index = (uint32_t)(f / chunk), .pass = passes,
                                         .dt = MS_DT_BF16 };
            for (uint32_t i = 0; i < job->ninputs; i++)
                c.in[i] = in[i] + f;
            c.keep = kp ? kp + f : NULL;
            memset(part, 0xff, ops->partial_size(job));
            ops->reduce_stored(state, job, &c, part);
            struct ms_chunk fc = { .first = c.first, .count = c.count, .index = c.index,
                                   .pass = passes };
            ops->fold(state, job, &fc, part);
        }
        r = ops->end_pass(state, job);
    }
    cr_assert_eq(r, MS_STAGE_APPLY, "%s", ms_errmsg());
    for (uint64_t f = 0; f < job->numel; f += chunk) {
        struct ms_chunk_stored c = { .first = f, .count = MS_MIN(chunk, job->numel - f),
                                     .index = (uint32_t)(f / chunk), .pass = passes,
                                     .out = out + f, .dt = MS_DT_BF16 };
        for (uint32_t i = 0; i < job->ninputs; i++)
            c.in[i] = in[i] + f;
        c.keep = kp ? kp + f : NULL;
        cr_assert(ops->apply_stored(state, job, &c));
    }
    free(state);
    free(part);
    free(kp);
    return passes;
}

/* The wrong guesses of wrong_guesses_cost_passes_not_bytes on the stored path:
 * the float path's passes at the same chunking (2, 3 or 4, each count met),
 * the reference's bytes. */
Test(multislerp, stored_wrong_guesses_cost_passes_not_bytes, .timeout = 120)
{
    enum { R_ = 64, C_ = 1000, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float store[4][N], out[N], want[N];
    static uint16_t h[4][N], got[N], wantb[N];
    uint32_t seen[6] = { 0 };
    for (uint64_t seed = 21; seed <= 40; seed++) {
        uint64_t s = 0x5eed0000u + seed;
        uint32_t nin = 3 + (uint32_t)(seed % 2);
        int base = seed % 2 ? 0 : -1;
        double w[MS_MAX_INPUTS] = { 0.5, 0.3, 0.2, 0.4 };
        const float *in[4];
        const uint16_t *hin[4];
        for (uint32_t i = 0; i < nin; i++) {
            for (int j = 0; j < N; j++) {
                uint64_t t = 0x9e3779b97f4a7c15u * (seed * 131 + (uint64_t)j);
                float common = (float)((t >> 40) % 2001) / 1000.0f - 1.0f;
                float x = common + th_stage_value(MS_DT_F32, &s, 0.3f);
                store[i][j] = th_stage_round(MS_DT_BF16, ldexpf(x, (int)((t >> 20) % 8)));
            }
            enc16(MS_DT_BF16, store[i], h[i], N);
            in[i] = store[i];
            hin[i] = h[i];
        }
        struct ms_stage_job job = mk(shape, 2, MS_DT_BF16, nin, base, w);
        ref_multislerp(MS_DT_BF16, in, nin, base, w, true, 1e-8, N, want);
        enc16(MS_DT_BF16, want, wantb, N);
        static const uint64_t sizes[] = { 0, 7000 };
        for (size_t k = 0; k < MS_ARRAY_LEN(sizes); k++)
            for (int keep = 0; keep < 2; keep++) {
                /* the sample, hence the guesses, depend on the chunking */
                uint32_t fpasses = run_counting(&job, in, out, sizes[k], keep);
                uint32_t passes = run_counting_stored(&job, hin, got, sizes[k], keep);
                cr_assert_eq(passes, fpasses, "seed %llu chunk %llu keep %d",
                             (unsigned long long)seed, (unsigned long long)sizes[k], keep);
                seen[passes]++;
                cr_assert(!memcmp(got, wantb, sizeof got), "seed %llu chunk %llu keep %d",
                          (unsigned long long)seed, (unsigned long long)sizes[k], keep);
            }
    }
    cr_assert(seen[2] > 0 && seen[3] > 0 && seen[4] > 0, "2: %u, 3: %u, 4: %u", seen[2], seen[3],
              seen[4]);
}
