/*
 * test_stage_karcher.c - `karcher` (stages/karcher.c, mergekit-spec.md 2.9).
 *
 * The stage iterates in coefficient space over a Gram matrix; the reference
 * here is mergekit's literal vector iteration, written from the spec in double
 * over whole arrays (unit vectors x_i/n_i with float32 norms n_i, the update
 * u = cos|T| u + sin|T| T/|T|, renormalisation, stopping rules), ending with
 * the same two roundings (u to D, then float32(s)*u to D). The two are the
 * same computation in exact arithmetic, so they agree within one ulp of the
 * compute dtype (float32 here). Hand-computed cases check the geometry; chunking
 * invariance is exact. In bf16/f16 the stage follows mergekit's per-step rounding:
 * ref_karcher_dt is a whole-array port of mergekit's loop with the rounding after
 * each torch op written out, and the stage must equal it bit for bit.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

enum { NMAX = 4096 };

static double dotv(const double *a, const double *b, size_t n)
{
    double s = 0;
    for (size_t j = 0; j < n; j++)
        s += a[j] * b[j];
    return s;
}

/* mergekit's karcher_merge_tensors, vector by vector, in double. Returns the iterations run. */
static int ref_karcher(enum ms_dtype dt, const float *const *in, uint32_t n, size_t numel,
                       int max_iter, double tol, float *out)
{
    static double u[MS_MAX_INPUTS][NMAX], m[NMAX], T[NMAX];
    double nrm[MS_MAX_INPUTS], alpha = 1.0 / n, s = 0, asum = 0;
    uint32_t v[MS_MAX_INPUTS], nv = 0;
    cr_assert(numel <= NMAX);
    for (uint32_t i = 0; i < n; i++) {
        long double ss = 0;
        for (size_t j = 0; j < numel; j++)
            ss += (long double)in[i][j] * in[i][j];
        nrm[i] = sqrtf((float)ss);
        for (size_t j = 0; j < numel; j++)
            u[i][j] = nrm[i] == 0 ? 0 : in[i][j] / nrm[i];
        if (nrm[i] > tol) {
            v[nv++] = i;
            asum += alpha;
        }
        s += alpha * nrm[i];
    }
    if (!nv) {
        for (size_t j = 0; j < numel; j++)
            out[j] = 0;
        return 0;
    }
    double a = alpha / asum;
    for (size_t j = 0; j < numel; j++) {
        m[j] = 0;
        for (uint32_t k = 0; k < nv; k++)
            m[j] += a * u[v[k]][j];
    }
    double nu = sqrt(dotv(m, m, numel));
    for (size_t j = 0; j < numel; j++)
        m[j] = nu < tol ? u[v[0]][j] : m[j] / nu;
    int it;
    for (it = 0; it < max_iter; it++) {
        memset(T, 0, sizeof(T));
        for (uint32_t k = 0; k < nv; k++) {
            double d = dotv(m, u[v[k]], numel);
            d = d < -1 ? -1 : d > 1 ? 1 : d;
            double th = acos(d);
            if (th < tol)
                continue;
            for (size_t j = 0; j < numel; j++)
                T[j] += a * (th / sin(th)) * (u[v[k]][j] - d * m[j]);
        }
        double nt = sqrt(dotv(T, T, numel));
        if (nt < tol)
            break;
        for (size_t j = 0; j < numel; j++)
            m[j] = cos(nt) * m[j] + sin(nt) * (T[j] / nt);
        double un = sqrt(dotv(m, m, numel));
        if (un > tol)
            for (size_t j = 0; j < numel; j++)
                m[j] /= un;
    }
    for (size_t j = 0; j < numel; j++)
        out[j] = th_stage_round(dt, (float)s * th_stage_round(dt, (float)m[j]));
    return it;
}

/* |a - b| in units of the compute dtype's ulp at b. */
static double ulps_d(enum ms_dtype dt, float a, float b)
{
    int mant = dt == MS_DT_BF16 ? 8 : dt == MS_DT_F16 ? 11 : 24;
    int emin = dt == MS_DT_BF16 ? -126 : dt == MS_DT_F16 ? -14 : -126;
    int e;
    frexp(fmax(fabs(a), fabs(b)), &e);
    e = e - 1 < emin ? emin : e - 1;
    return fabs((double)a - b) / ldexp(1.0, e - (mant - 1));
}

/* Same bits (NaN never expected here). */
static bool ks_same(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

static void run(const struct ms_stage_job *job, const float *const *in, float *out)
{
    cr_assert_eq(ms_stage_run_mem(job, in, out, 0), 0, "%s", ms_errmsg());
}

Test(karcher, registered) { cr_assert(ms_method_find("karcher")->ops); }

Test(karcher, hand_computed)
{
    static const int64_t shape[1] = { 2 };
    struct ms_stage_job job;
    float out[2];
    /* (2, 0) and (0, 2): the mean direction is (1, 1)/sqrt 2, the mean norm 2:
     * out = (sqrt 2, sqrt 2) = 1.41421356 */
    float a[2] = { 2, 0 }, b[2] = { 0, 2 };
    const float *in[2] = { a, b };
    th_stage_job(&job, "karcher", shape, 1, MS_DT_F32, 2);
    run(&job, in, out);
    cr_assert(th_stage_ulps(out[0], (float)M_SQRT2) <= 2 && th_stage_ulps(out[1], (float)M_SQRT2) <= 2,
              "%a %a", out[0], out[1]);
    /* (3, 4) and a zero vector: only (3, 4) is valid, u = (0.6, 0.8), but the
     * scale counts both norms: s = (5 + 0)/2 = 2.5: out = (1.5, 2) */
    float c[2] = { 3, 4 }, z[2] = { 0, 0 };
    const float *in2[2] = { c, z };
    run(&job, in2, out);
    cr_assert(th_stage_ulps(out[0], 1.5f) <= 1 && th_stage_ulps(out[1], 2.0f) <= 1, "%a %a",
              out[0], out[1]);
    /* all zero: zeros */
    const float *in3[2] = { z, z };
    run(&job, in3, out);
    cr_assert(out[0] == 0 && out[1] == 0);
    /* one input: returned unchanged */
    th_stage_job(&job, "karcher", shape, 1, MS_DT_BF16, 1);
    const float *in4[1] = { c };
    run(&job, in4, out);
    cr_assert(out[0] == 3 && out[1] == 4);
}

/* Random directions, near (fine-tunes) and far apart (the iteration matters):
 * float32 within one ulp of the double reference, exact chunking invariance
 * (bf16/f16 follow mergekit's per-step rounding: tested below). */
Test(karcher, random_vs_vector_iteration)
{
    enum { R_ = 11, C_ = 37, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float store[6][N], out[N], want[N];
    double max_ulps_seen = 0;
    int iterated = 0;
    for (int d = 2; d < 3; d++)
        for (uint32_t n = 2; n <= 6; n += 2)
            for (int far = 0; far < 2; far++)
                for (int mi = 0; mi < 2; mi++) {
                    uint64_t s = 8200 + (uint64_t)d * 1000 + n * 100 + (uint64_t)far * 10 +
                                 (uint64_t)mi;
                    cr_log_info("seed %llu", (unsigned long long)s);
                    const float *in[6];
                    for (int j = 0; j < N; j++)
                        store[0][j] = th_stage_value(dts[d], &s, 0.05f);
                    for (uint32_t i = 1; i < n; i++)
                        for (int j = 0; j < N; j++) {
                            float e = th_stage_value(MS_DT_F32, &s, far ? 0.05f : 0.003f);
                            store[i][j] = th_stage_round(dts[d], (far ? 0.3f : 1.0f + 0.1f * i) *
                                                                         store[0][j] + e);
                        }
                    for (uint32_t i = 0; i < n; i++)
                        in[i] = store[i];
                    int max_iter = mi ? 100 : 10;
                    double tol = mi ? 1e-9 : 1e-5;
                    struct ms_stage_job job;
                    th_stage_job(&job, "karcher", shape, 2, dts[d], n);
                    th_stage_set(&job, -1, "max_iter", max_iter);
                    th_stage_set(&job, -1, "tol", tol);
                    static const uint64_t sizes[] = { 0, 1, 7, C_, 100 };
                    th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
                    iterated += ref_karcher(dts[d], in, n, N, max_iter, tol, want) > 0;
                    for (int j = 0; j < N; j++) {
                        double u = ulps_d(dts[d], out[j], want[j]);
                        cr_assert(u <= 1, "dt %d n %u far %d elt %d: %a vs %a (%g ulps)", dts[d],
                                  n, far, j, out[j], want[j], u);
                        max_ulps_seen = fmax(max_ulps_seen, u);
                    }
                }
    cr_log_info("largest difference: %g ulp; %d cases iterated", max_ulps_seen, iterated);
    cr_assert(iterated > 0);
}

/* max_iter 0 keeps the initial guess (the normalised mean); with iterations
 * the far-apart case moves away from it. */
Test(karcher, iterations_matter)
{
    static const int64_t shape[1] = { 3 };
    float a[3] = { 1, 0, 0 }, b[3] = { 0, 1, 0 }, c[3] = { 0.2f, 0.1f, 1 }, o0[3], o1[3], r[3];
    const float *in[3] = { a, b, c };
    struct ms_stage_job job;
    th_stage_job(&job, "karcher", shape, 1, MS_DT_F32, 3);
    th_stage_set(&job, -1, "max_iter", 0);
    run(&job, in, o0);
    th_stage_set(&job, -1, "max_iter", 50);
    th_stage_set(&job, -1, "tol", 1e-12);
    run(&job, in, o1);
    cr_assert(fabsf(o0[2] - o1[2]) > 1e-4f, "%a %a", o0[2], o1[2]);
    ref_karcher(MS_DT_F32, in, 3, 3, 50, 1e-12, r);
    for (int j = 0; j < 3; j++)
        cr_assert(th_stage_ulps(o1[j], r[j]) <= 2, "elt %d: %a vs %a", j, o1[j], r[j]);
}

/* ------------------------------------------------------------------------ */
/* bf16/f16: mergekit's loop with every torch op rounded to D.               */

/* Whole-array ops in the shape of mergekit's tensor code; R(x) rounds to dt.
 * A reduction is the float32 value of the exact sum (long double holds these
 * small sums of float products exactly), as docs/NUMERICS.md says torch's
 * float32 accumulation is approximated. */
static enum ms_dtype R_dt;
static float R(float x) { return th_stage_round(R_dt, x); }

static float vnorm32(const float *a, size_t n)
{
    long double ss = 0;
    for (size_t j = 0; j < n; j++)
        ss += (long double)a[j] * a[j];
    return sqrtf((float)ss);
}

static float vdot32(const float *a, const float *b, size_t n)
{
    long double ss = 0;
    for (size_t j = 0; j < n; j++)
        ss += (long double)a[j] * b[j];
    return (float)ss;
}

/* mergekit's karcher_merge_tensors in dt. Returns the iterations begun. */
static int ref_karcher_dt(enum ms_dtype dt, const float *const *in, uint32_t n, size_t numel,
                          int max_iter, double tol, float *out)
{
    static float units[MS_MAX_INPUTS][NMAX], u[NMAX], T[NMAX], tmp[NMAX];
    double norms[MS_MAX_INPUTS], alphas = 1.0 / n;
    R_dt = dt;
    cr_assert(numel <= NMAX);
    for (uint32_t i = 0; i < n; i++) {
        float nn = vnorm32(in[i], numel); /* torch.linalg.norm(t.float()) */
        norms[i] = nn == 0 ? 0.0 : nn;
        for (size_t j = 0; j < numel; j++)
            units[i][j] = nn == 0 ? 0 : R(in[i][j] / nn); /* (t / n).to(t.dtype) */
    }
    uint32_t valid[MS_MAX_INPUTS], nv = 0;
    for (uint32_t i = 0; i < n; i++)
        if (norms[i] > tol)
            valid[nv++] = i;
    if (!nv) {
        for (size_t j = 0; j < numel; j++)
            out[j] = 0;
        return 0;
    }
    double alpha_sum = 0;
    for (uint32_t k = 0; k < nv; k++)
        alpha_sum += alphas;
    double na = alphas / alpha_sum; /* every normalised alpha */
    for (size_t j = 0; j < numel; j++)
        u[j] = 0;
    for (uint32_t k = 0; k < nv; k++)
        for (size_t j = 0; j < numel; j++)
            u[j] = R(u[j] + R((float)na * units[valid[k]][j])); /* u += a * ui */
    double norm_u = vnorm32(u, numel);
    for (size_t j = 0; j < numel; j++)
        u[j] = norm_u < tol ? units[valid[0]][j] : R(u[j] / (float)norm_u);
    int it;
    for (it = 0; it < max_iter; it++) {
        for (size_t j = 0; j < numel; j++)
            T[j] = 0;
        for (uint32_t k = 0; k < nv; k++) {
            const float *ui = units[valid[k]];
            float dot = R(vdot32(u, ui, numel)); /* torch.dot in dt */
            dot = fminf(fmaxf(dot, -1.0f), 1.0f);
            float theta = R(acosf(dot));
            if (theta < tol)
                continue;
            float sin_theta = R(sinf(theta));
            float f = R((float)na * R(theta / sin_theta));
            for (size_t j = 0; j < numel; j++)
                tmp[j] = R(ui[j] - R(dot * u[j]));
            for (size_t j = 0; j < numel; j++)
                T[j] = R(T[j] + R(f * tmp[j]));
        }
        float norm_T = vnorm32(T, numel);
        if (norm_T < tol) {
            it++;
            break;
        }
        float cos_n = R(cosf(norm_T)), sin_n = R(sinf(norm_T)); /* cast to dt by the mul */
        for (size_t j = 0; j < numel; j++)
            u[j] = R(R(cos_n * u[j]) + R(sin_n * R(T[j] / norm_T)));
        float u_norm = vnorm32(u, numel);
        if (u_norm > tol)
            for (size_t j = 0; j < numel; j++)
                u[j] = R(u[j] / u_norm);
    }
    double s = 0;
    for (uint32_t i = 0; i < n; i++)
        s += alphas * norms[i];
    for (size_t j = 0; j < numel; j++)
        out[j] = R((float)s * u[j]);
    return it;
}

/* The step form's two ways (ms_stage.h keep area, stages/karcher.c): with a keep
 * area (ms_stage_run_mem, each size of sizes) and replaying every iterate without
 * one (the engine's fallback), the same bytes; out gets them. */
static void run_keep_and_replay(const struct ms_stage_job *job, const float *const *in, float *out,
                                const uint64_t *sizes, int nsizes)
{
    static float alt[4096];
    cr_assert(job->numel <= MS_ARRAY_LEN(alt));
    th_stage_run_sweep(job, in, out, sizes, nsizes);
    for (int k = 0; k < nsizes; k++) {
        cr_assert_eq(ms_stage_run_mem_keep(job, in, alt, sizes[k], false), 0, "%s", ms_errmsg());
        cr_assert(!memcmp(out, alt, (size_t)job->numel * sizeof(float)),
                  "chunk %llu: without a keep area the bytes differ",
                  (unsigned long long)sizes[k]);
    }
}

/* Three inputs run to exactly max_iter (tol 1e-30) in dt: with and without a keep
 * area at each size of sizes, bit for bit the per-step reference's bytes. */
static void check_every_iteration(enum ms_dtype dt, const int64_t *shape, int ndim,
                                  const float *const in[3], int max_iter,
                                  const uint64_t *sizes, int nsizes)
{
    static float out[4096], want[4096];
    struct ms_stage_job job;
    th_stage_job(&job, "karcher", shape, ndim, dt, 3);
    th_stage_set(&job, -1, "max_iter", max_iter);
    th_stage_set(&job, -1, "tol", 1e-30);
    run_keep_and_replay(&job, in, out, sizes, nsizes);
    int it = ref_karcher_dt(dt, in, 3, (size_t)job.numel, max_iter, 1e-30, want);
    cr_assert_eq(it, max_iter, "the reference should run every iteration");
    for (uint64_t j = 0; j < job.numel; j++)
        cr_assert(ks_same(out[j], want[j]), "dt %d max_iter %d elt %llu: %a vs %a", dt, max_iter,
                  (unsigned long long)j, out[j], want[j]);
}

/* bf16 and f16 equal the per-step reference bit for bit, whatever the chunking;
 * near and far directions, 2-7 inputs, one of them zero in some cases, tol small
 * (the loop runs to max_iter or a fixed point) and large (stops early). */
Test(karcher, step_rounding_bf16_f16)
{
    enum { R_ = 9, C_ = 41, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float store[7][N], out[N], want[N], dbl[N];
    int cases = 0, differs = 0;
    double worst = 0;
    for (int d = 0; d < 2; d++)
        for (uint32_t n = 2; n <= 7; n++)
            for (int far = 0; far < 2; far++)
                for (int mi = 0; mi < 3; mi++) {
                    uint64_t s =
                        9300 + (uint64_t)d * 1000 + n * 100 + (uint64_t)far * 10 + (uint64_t)mi;
                    const float *in[7];
                    for (int j = 0; j < N; j++)
                        store[0][j] = th_stage_value(dts[d], &s, 0.05f);
                    for (uint32_t i = 1; i < n; i++)
                        for (int j = 0; j < N; j++) {
                            float e = th_stage_value(MS_DT_F32, &s, far ? 0.05f : 0.003f);
                            store[i][j] = th_stage_round(
                                dts[d], (far ? 0.3f : 1.0f + 0.1f * i) * store[0][j] + e);
                            if (n == 5 && i == 2)
                                store[i][j] = 0; /* a zero input: not valid, counts in s */
                        }
                    for (uint32_t i = 0; i < n; i++)
                        in[i] = store[i];
                    int max_iter = mi == 0 ? 10 : mi == 1 ? 40 : 3;
                    double tol = mi == 0 ? 1e-5 : mi == 1 ? 1e-12 : 0.05;
                    struct ms_stage_job job;
                    th_stage_job(&job, "karcher", shape, 2, dts[d], n);
                    th_stage_set(&job, -1, "max_iter", max_iter);
                    th_stage_set(&job, -1, "tol", tol);
                    static const uint64_t sizes[] = { 0, 7, C_, 100 };
                    run_keep_and_replay(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
                    ref_karcher_dt(dts[d], in, n, N, max_iter, tol, want);
                    for (int j = 0; j < N; j++)
                        cr_assert(ks_same(out[j], want[j]),
                                  "dt %d n %u far %d mi %d elt %d: %a vs %a", dts[d], n, far, mi, j,
                                  out[j], want[j]);
                    /* how far mergekit's rounding is from the exact iteration */
                    ref_karcher(dts[d], in, n, N, max_iter, tol, dbl);
                    for (int j = 0; j < N; j++) {
                        double uu = ulps_d(dts[d], want[j], dbl[j]);
                        differs += uu > 0;
                        worst = fmax(worst, uu);
                    }
                    cases++;
                }
    cr_log_info("%d cases; vs the exact iteration: %d elements differ, up to %g ulps", cases,
                differs, worst);
    cr_assert(differs > 0, "the cases should exercise the per-step rounding");
}

/* bf16 iterates end in a short cycle (|T| never drops below a tiny tol): the
 * stage jumps ahead once u repeats, and gives the reference's bytes for every
 * phase of the cycle that max_iter can land on; so does f16. */
Test(karcher, step_cycles)
{
    enum { N = 64 };
    static const int64_t shape[1] = { N };
    static float a[N], b[N], c3[N];
    for (int d = 0; d < 2; d++)
        for (int max_iter = 3000; max_iter < 3010; max_iter++) {
            uint64_t s = 77;
            for (int j = 0; j < N; j++) {
                a[j] = th_stage_value(dts[d], &s, 1.0f);
                b[j] = th_stage_round(dts[d], a[j] + th_stage_value(MS_DT_F32, &s, 0.2f));
                c3[j] = th_stage_round(dts[d], -a[j] + th_stage_value(MS_DT_F32, &s, 0.9f));
            }
            const float *in[3] = { a, b, c3 };
            static const uint64_t sizes[] = { 0, 5 };
            check_every_iteration(dts[d], shape, 1, in, max_iter, sizes, MS_ARRAY_LEN(sizes));
        }
}

/* Fine-tunes near their base (as tools/ms-mkmodel makes them), bf16 and f16, tol
 * tiny: past the first iteration the D-rounded dots, hence every scalar, repeat
 * while a few elements of u keep moving and no short cycle forms, the case where
 * the dots pass also sums |T| with the previous iteration's scalars and the |T|
 * pass is skipped. Same bytes as the reference at every max_iter, every chunking,
 * with and without a keep area. */
Test(karcher, step_scalars_repeat)
{
    enum { N = 4096 };
    static const int64_t shape[2] = { 64, 64 };
    static float a[N], b[N], c3[N];
    for (int d = 0; d < 2; d++) {
        uint64_t s = 4242 + (uint64_t)d;
        for (int j = 0; j < N; j++) {
            a[j] = th_stage_value(dts[d], &s, 0.02f);
            b[j] = th_stage_round(dts[d], a[j] + th_stage_value(MS_DT_F32, &s, 0.01f));
            c3[j] = th_stage_round(dts[d], a[j] + th_stage_value(MS_DT_F32, &s, 0.01f));
        }
        const float *in[3] = { a, b, c3 };
        static const uint64_t sizes[] = { 0, 64, 1000 };
        for (int max_iter = 1; max_iter <= 8; max_iter++)
            check_every_iteration(dts[d], shape, 2, in, max_iter, sizes, MS_ARRAY_LEN(sizes));
    }
}

/* Runs job as one chunk through the stage's ops by hand, with a keep area, and
 * returns the reduce passes it asked for; out gets the result. */
static int run_counting_passes(const struct ms_stage_job *job, const float *const *in, float *out)
{
    const struct ms_stage_ops *ops = job->method->ops;
    void *state = calloc(1, ops->state_size(job));
    void *partial = malloc(ops->partial_size(job));
    void *keep = malloc((size_t)job->numel * MS_KEEP_BYTES);
    cr_assert(state && partial && keep);
    struct ms_chunk c = { .first = 0, .count = job->numel, .out = out, .keep = keep };
    for (uint32_t i = 0; i < job->ninputs; i++)
        c.in[i] = in[i];
    int r = ops->begin(state, job), passes = 0;
    while (r == MS_STAGE_REDUCE) {
        cr_assert(passes < 1000);
        c.pass = (uint32_t)passes++;
        ops->reduce(state, job, &c, partial);
        ops->fold(state, job, &c, partial);
        r = ops->end_pass(state, job);
    }
    cr_assert_eq(r, MS_STAGE_APPLY);
    c.pass = (uint32_t)passes;
    ops->apply(state, job, &c);
    free(state);
    free(partial);
    free(keep);
    return passes;
}

/* Inputs so close that every D-rounded dot is 1 (theta 0 < tol, every input
 * skipped): T is zero and the iteration stops, mergekit's bytes. At iteration 0
 * that is known from the dots pass: the norms, ||u_0|| and the dots, 3 passes
 * (no |T| pass). Farther inputs that get there at a later iteration (as the
 * bench's fine-tunes do at the third) give the reference's bytes too, with no
 * |T| pass in their last iteration. */
Test(karcher, step_all_skipped_stops)
{
    enum { N = 4096 };
    static const int64_t shape[2] = { 64, 64 };
    static float a[N], b[N], c3[N], out[N], want[N], alt[N];
    static const float noise[] = { 0.0f, 0.02f, 0.1f, 0.5f };
    int later = 0;
    for (int d = 0; d < 2; d++)
        for (int nz = 0; nz < (int)MS_ARRAY_LEN(noise); nz++) {
            uint64_t s = 5150 + (uint64_t)d * 10 + (uint64_t)nz;
            for (int j = 0; j < N; j++) {
                a[j] = th_stage_value(dts[d], &s, 0.02f);
                b[j] = th_stage_round(dts[d], a[j] * (1 + th_stage_value(MS_DT_F32, &s, noise[nz])));
                c3[j] = th_stage_round(dts[d], a[j] * (1 + th_stage_value(MS_DT_F32, &s, noise[nz])));
            }
            const float *in[3] = { a, b, c3 };
            struct ms_stage_job job;
            th_stage_job(&job, "karcher", shape, 2, dts[d], 3);
            th_stage_set(&job, -1, "max_iter", 10);
            th_stage_set(&job, -1, "tol", 1e-5);
            int passes = run_counting_passes(&job, in, out);
            int it = ref_karcher_dt(dts[d], in, 3, N, 10, 1e-5, want);
            for (int j = 0; j < N; j++)
                cr_assert(ks_same(out[j], want[j]), "dt %d noise %g elt %d: %a vs %a", dts[d],
                          noise[nz], j, out[j], want[j]);
            static const uint64_t sizes[] = { 0, 64, 1000 };
            run_keep_and_replay(&job, in, alt, sizes, MS_ARRAY_LEN(sizes));
            cr_assert(!memcmp(out, alt, sizeof out), "dt %d noise %g: the ways differ", dts[d],
                      noise[nz]);
            cr_log_info("dt %d noise %g: %d iterations, %d passes", dts[d], noise[nz], it, passes);
            if (nz == 0)
                cr_assert_eq(passes, 3, "dt %d: equal inputs stop after the dots pass", dts[d]);
            /* stopped early: at most 3 passes per iteration before the last one
             * and 1 (the dots) for the last, plus the norms and ||u_0|| */
            if (it < 10)
                cr_assert_leq(passes, 2 + 3 * (it - 1) + 1, "dt %d noise %g: %d passes for %d",
                              dts[d], noise[nz], passes, it);
            later += it > 1 && it < 10;
        }
    cr_assert(later > 0, "a case should stop at a later iteration");
}

/* ------------------------------------------------------------------------ */
/* The stored-bytes path (ms_stage_ops.stored_passes) in bf16 and f16.       */

/*
 * Every reduce pass and apply on the stored bytes give the float path's bytes:
 * ms_stage_run_stored_keep with and without a keep area, at chunk sizes 1, 7,
 * 257 and the whole tensor, against the float path (ms_stage_run_mem, whose
 * bytes the tests above check against the per-step reference) encoded by the
 * scalar reference encoder. Cases: near fine-tunes run to max_iter (the scalars
 * repeat: guessed |T| and ||u'||), far-apart inputs with a zero input (not
 * valid), equal inputs (all skipped: stop at the dots pass), a short cycle,
 * subnormals and -0, an Inf and a NaN input, every input zero (zeros out).
 */
Test(karcher, stored_path_gives_the_float_path_bytes, .timeout = 120)
{
    enum { R_ = 47, C_ = 50, N = R_ * C_, NI = 4 }; /* over KS_NB (2048): two norm blocks */
    static const int64_t shape[2] = { R_, C_ };
    static float f[NI][N], out[N];
    static uint16_t h[NI][N], want[N], got[N];
    static const uint64_t sizes[] = { 1, 7, 257, 0 };
    static const enum ms_dtype sdts[2] = { MS_DT_BF16, MS_DT_F16 };
    int iterated = 0;
    for (int d = 0; d < 2; d++)
        for (int mode = 0; mode < 7; mode++) {
            enum ms_dtype dt = sdts[d];
            uint64_t s = 6100 + (uint64_t)d * 100 + (uint64_t)mode;
            cr_log_info("seed %llu", (unsigned long long)s);
            uint32_t n = mode == 1 ? 4 : 3;
            for (int j = 0; j < N; j++) {
                f[0][j] = th_stage_value(dt, &s, 0.05f);
                for (uint32_t i = 1; i < n; i++) {
                    float e = th_stage_value(MS_DT_F32, &s, mode == 1 ? 0.05f : 0.01f);
                    f[i][j] = mode == 2   ? f[0][j]
                              : mode == 3 ? th_stage_round(dt, (i == 2 ? -1.0f : 1.0f) * f[0][j] +
                                                                   80 * e)
                              : mode == 1 ? th_stage_round(dt, 0.3f * f[0][j] + e)
                                          : th_stage_round(dt, f[0][j] + e);
                }
            }
            if (mode == 1)
                memset(f[2], 0, sizeof f[2]); /* a zero input: not valid, counts in s */
            if (mode == 4 || mode == 5) { /* subnormals, -0; mode 5 also an Inf and a NaN */
                float sub = dt == MS_DT_BF16 ? 0x1p-130f : 0x1p-20f;
                for (int j = 0; j < N; j += 5) {
                    f[0][j] = j % 2 ? -0.0f : sub;
                    f[1][j + 1] = -sub;
                }
                if (mode == 5) {
                    f[2][100] = INFINITY;
                    memcpy(&f[1][300], &(uint32_t){ 0xffc50000u }, 4);
                }
            }
            if (mode == 6)
                for (uint32_t i = 0; i < n; i++)
                    memset(f[i], 0, sizeof f[i]);
            void (*enc)(const float *, uint16_t *, size_t) =
                dt == MS_DT_BF16 ? ms_f32_to_bf16_ref : ms_f32_to_f16_ref;
            void (*dec)(const uint16_t *, float *, size_t) =
                dt == MS_DT_BF16 ? ms_bf16_to_f32_ref : ms_f16_to_f32_ref;
            const float *in[NI];
            const void *hin[NI];
            for (uint32_t i = 0; i < n; i++) {
                enc(f[i], h[i], N);
                dec(h[i], f[i], N); /* the float path's inputs: what the bytes decode to */
                in[i] = f[i];
                hin[i] = h[i];
            }
            struct ms_stage_job job;
            th_stage_job(&job, "karcher", shape, 2, dt, n);
            int max_iter = mode == 3 ? 41 : mode == 1 ? 10 : 6;
            double tol = mode == 1 ? 1e-5 : 1e-30;
            th_stage_set(&job, -1, "max_iter", max_iter);
            th_stage_set(&job, -1, "tol", tol);
            cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s", ms_errmsg());
            enc(out, want, N);
            int it = ref_karcher_dt(dt, in, n, N, max_iter, tol, out);
            cr_log_info("dt %d mode %d: %d iterations", dt, mode, it);
            iterated += it > 1;
            for (size_t z = 0; z < MS_ARRAY_LEN(sizes); z++)
                for (int keep = 0; keep < 2; keep++) {
                    memset(got, 0x5a, sizeof got);
                    cr_assert_eq(ms_stage_run_stored_keep(&job, dt, hin, got, sizes[z], keep), 0,
                                 "%s", ms_errmsg());
                    for (int j = 0; j < N; j++)
                        cr_assert_eq(got[j], want[j],
                                     "dt %d mode %d chunk %llu keep %d elt %d: %04x want %04x", dt,
                                     mode, (unsigned long long)sizes[z], keep, j, got[j], want[j]);
                }
        }
    cr_assert_geq(iterated, 10, "the cases should iterate");
}

/* The stored path takes the step form only: the float32 coefficient form (bf16
 * bytes, float32 compute), a lone input (one pass) and bytes of a dtype other
 * than the compute dtype stay on the float path. */
Test(karcher, stored_path_declines_other_jobs)
{
    static const int64_t shape[1] = { 16 };
    uint16_t x[16] = { 0x3f80 }, y[16] = { 0x4000 }, o[16];
    const void *in[2] = { x, y };
    struct ms_stage_job job;
    th_stage_job(&job, "karcher", shape, 1, MS_DT_F32, 2);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, in, o, 0), MS_EUNSUPPORTED);
    th_stage_job(&job, "karcher", shape, 1, MS_DT_BF16, 1);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, in, o, 0), MS_EUNSUPPORTED);
    th_stage_job(&job, "karcher", shape, 1, MS_DT_BF16, 2);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_F16, in, o, 0), MS_EUNSUPPORTED);
}
