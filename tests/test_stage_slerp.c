/*
 * test_stage_slerp.c - `slerp` (stages/slerp.c, mergekit-spec.md 2.3).
 *
 * Expected values come from hand computation for tiny cases and from two plain
 * references written here from the spec: a NumPy-literal float32 one
 * (normalise each vector in float32, dot summed in double, scalars in float32)
 * compared within 1 ulp of the element's scale, and a double-precision slerp
 * compared loosely as a check of the formulas. Chunking invariance is exact.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
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

/* ulp of |x| in float32 (x finite) */
static double ulpf(double x)
{
    int e;
    frexp(fabs(x), &e);
    return ldexp(1.0, (e - 24 < -149 ? -149 : e - 24));
}

static void slerp_job(struct ms_stage_job *job, const int64_t *shape, uint32_t ndim,
                      enum ms_dtype dt, uint32_t n, int base, double t)
{
    th_stage_job(job, "slerp", shape, ndim, dt, n);
    job->base = base;
    th_stage_set(job, -1, "t", t);
}

/* NumPy-literal reference; c0/c1 returned for error scales. */
static void ref_slerp32(const float *a, const float *b, size_t n, double t, float *out,
                        float *c0p, float *c1p)
{
    double sa = 0, sb = 0;
    for (size_t i = 0; i < n; i++) {
        sa += (double)a[i] * a[i];
        sb += (double)b[i] * b[i];
    }
    float na = sqrtf((float)sa), nb = sqrtf((float)sb);
    double d = 0;
    for (size_t i = 0; i < n; i++) {
        float ah = na > 1e-8f ? a[i] / na : a[i];
        float bh = nb > 1e-8f ? b[i] / nb : b[i];
        d += (double)ah * bh;
    }
    float dot = (float)d, c0, c1;
    if (fabsf(dot) > 0.9995f) {
        c0 = (float)(1 - t);
        c1 = (float)t;
    } else {
        float th = acosf(dot), st = sinf(th), tt = th * (float)t;
        c0 = sinf(th - tt) / st;
        c1 = sinf(tt) / st;
    }
    for (size_t i = 0; i < n; i++)
        out[i] = c0 * a[i] + c1 * b[i];
    *c0p = c0;
    *c1p = c1;
}

/* Double-precision slerp (no float32 steps). */
static void ref_slerp64(const float *a, const float *b, size_t n, double t, double *out)
{
    double sa = 0, sb = 0, sab = 0;
    for (size_t i = 0; i < n; i++) {
        sa += (double)a[i] * a[i];
        sb += (double)b[i] * b[i];
        sab += (double)a[i] * b[i];
    }
    double na = sqrt(sa), nb = sqrt(sb);
    double dot = sab / ((na > 1e-8 ? na : 1) * (nb > 1e-8 ? nb : 1));
    double c0 = 1 - t, c1 = t;
    if (fabs(dot) <= 0.9995) {
        double th = acos(dot);
        c0 = sin((1 - t) * th) / sin(th);
        c1 = sin(t * th) / sin(th);
    }
    for (size_t i = 0; i < n; i++)
        out[i] = c0 * a[i] + c1 * b[i];
}

static void run(const struct ms_stage_job *job, const float *const *in, float *out)
{
    cr_assert_eq(ms_stage_run_mem(job, in, out, 0), 0, "%s", ms_errmsg());
}

Test(slerp, registered) { cr_assert(ms_method_find("slerp")->ops); }

Test(slerp, hand_orthogonal_pair)
{
    /* a = (1, 0), b = (0, 1), t = 0.5: theta = pi/2, both coefficients sin(pi/4) */
    static const int64_t shape[1] = { 2 };
    float a[2] = { 1, 0 }, b[2] = { 0, 1 }, out[2];
    const float *in[2] = { a, b };
    struct ms_stage_job job;
    slerp_job(&job, shape, 1, MS_DT_F32, 2, 0, 0.5);
    run(&job, in, out);
    float h = (float)sqrt(0.5); /* 0x1.6a09e6p-1 */
    cr_assert(th_stage_ulps(out[0], h) <= 1 && th_stage_ulps(out[1], h) <= 1, "%a %a", out[0],
              out[1]);
}

Test(slerp, hand_45_degrees)
{
    /* a = (1, 0), b = (1, 1): dot = 1/sqrt 2, theta = pi/4; t = 0.5 gives
     * s0 = s1 = sin(pi/8)/sin(pi/4) = 0.5411961001461970, out = (2 s, s). */
    static const int64_t shape[1] = { 2 };
    float a[2] = { 1, 0 }, b[2] = { 1, 1 }, out[2];
    const float *in[2] = { a, b };
    struct ms_stage_job job;
    slerp_job(&job, shape, 1, MS_DT_F32, 2, 0, 0.5);
    run(&job, in, out);
    double s = 0.5411961001461970;
    cr_assert(th_stage_ulps(out[0], (float)(2 * s)) <= 1, "%a vs %a", out[0], (float)(2 * s));
    cr_assert(th_stage_ulps(out[1], (float)s) <= 1, "%a vs %a", out[1], (float)s);
    /* t = 0.25 on the same pair: s0 = sin(3pi/16)/sin(pi/4), s1 = sin(pi/16)/sin(pi/4) */
    slerp_job(&job, shape, 1, MS_DT_F32, 2, 0, 0.25);
    run(&job, in, out);
    double s0 = sin(3 * M_PI / 16) / sin(M_PI / 4), s1 = sin(M_PI / 16) / sin(M_PI / 4);
    cr_assert(th_stage_ulps(out[0], (float)(s0 + s1)) <= 1, "%a vs %a", out[0], (float)(s0 + s1));
    cr_assert(th_stage_ulps(out[1], (float)s1) <= 1, "%a vs %a", out[1], (float)s1);
}

Test(slerp, colinear_falls_back_to_lerp)
{
    static const int64_t shape[1] = { 3 };
    float a[3] = { 1, 2, 3 }, b[3] = { 2, 4, 6 }, nb[3] = { -1, -2, -3 }, out[3];
    struct ms_stage_job job;
    const float *in[2] = { a, b };
    slerp_job(&job, shape, 1, MS_DT_BF16, 2, 0, 0.25);
    run(&job, in, out);
    /* 0.75 a + 0.25 b = 1.25 a */
    cr_assert(out[0] == 1.25f && out[1] == 2.5f && out[2] == 3.75f, "%a %a %a", out[0], out[1],
              out[2]);
    /* opposite directions: |dot| = 1, lerp too: t = 0.5 -> 0 */
    const float *in2[2] = { a, nb };
    slerp_job(&job, shape, 1, MS_DT_BF16, 2, 0, 0.5);
    run(&job, in2, out);
    cr_assert(out[0] == 0 && out[1] == 0 && out[2] == 0);
    /* t = 0.1: float32(1 - 0.1) and float32(0.1) as NumPy 2 takes them */
    slerp_job(&job, shape, 1, MS_DT_F32, 2, 0, 0.1);
    run(&job, in, out);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(fbits(out[i]), fbits(0.9f * a[i] + 0.1f * b[i]));
}

Test(slerp, t0_gives_base_t1_gives_other)
{
    static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    static const int64_t shape[2] = { 13, 21 };
    enum { N = 13 * 21 };
    static float x[N], y[N], out[N];
    for (int d = 0; d < 3; d++) {
        uint64_t s = 500 + (uint64_t)d;
        for (int i = 0; i < N; i++) {
            x[i] = th_stage_value(dts[d], &s, 1.0f);
            y[i] = th_stage_value(dts[d], &s, 2.0f);
        }
        for (int base = 0; base < 2; base++) {
            const float *in[2] = { base ? y : x, base ? x : y }; /* x is always the base */
            struct ms_stage_job job;
            slerp_job(&job, shape, 2, dts[d], 2, base, 0.0);
            run(&job, in, out);
            for (int i = 0; i < N; i++)
                cr_assert(out[i] == x[i], "dt %d base %d t=0 element %d", dts[d], base, i);
            slerp_job(&job, shape, 2, dts[d], 2, base, 1.0);
            run(&job, in, out);
            for (int i = 0; i < N; i++)
                cr_assert(out[i] == y[i], "dt %d base %d t=1 element %d: %a vs %a", dts[d], base,
                          i, out[i], y[i]);
        }
    }
}

Test(slerp, orthogonal_vectors_half_way)
{
    /* b rotates each pair of a by 90 degrees: a.b = 0 exactly and |a| = |b|, so
     * out = sin(pi/4) a + sin(pi/4) b with float32 coefficient sinf(0x1.921fb6p-1) */
    static const int64_t shape[1] = { 1000 };
    static float a[1000], b[1000], out[1000];
    uint64_t s = 77;
    for (int i = 0; i < 1000; i += 2) {
        a[i] = th_stage_value(MS_DT_F32, &s, 1.0f);
        a[i + 1] = th_stage_value(MS_DT_F32, &s, 1.0f);
        b[i] = -a[i + 1];
        b[i + 1] = a[i];
    }
    const float *in[2] = { a, b };
    struct ms_stage_job job;
    slerp_job(&job, shape, 1, MS_DT_F32, 2, 0, 0.5);
    run(&job, in, out);
    float c = 0x1.6a09e6p-1f; /* sinf(float32(pi/2) / 2) / sinf(float32(pi/2)) */
    for (int i = 0; i < 1000; i++)
        cr_assert_eq(fbits(out[i]), fbits(c * a[i] + c * b[i]), "element %d", i);
}

Test(slerp, single_input_is_copied)
{
    static const int64_t shape[1] = { 5 };
    float a[5] = { 1, -2, 0.5f, -0.0f, 3 }, out[5];
    const float *in[1] = { a };
    struct ms_stage_job job;
    slerp_job(&job, shape, 1, MS_DT_BF16, 1, 0, 0.3);
    run(&job, in, out);
    cr_assert(!memcmp(a, out, sizeof(a)));
    slerp_job(&job, shape, 1, MS_DT_BF16, 1, -1, 0.3); /* the other model alone */
    run(&job, in, out);
    cr_assert(!memcmp(a, out, sizeof(a)));
}

Test(slerp, zero_base_is_not_normalised)
{
    /* na = 0 <= eps: a stays 0, dot = 0, theta = pi/2 -> out = sin(t pi/2) b */
    static const int64_t shape[1] = { 3 };
    float a[3] = { 0, 0, 0 }, b[3] = { 1, -2, 4 }, out[3];
    const float *in[2] = { a, b };
    struct ms_stage_job job;
    slerp_job(&job, shape, 1, MS_DT_F32, 2, 0, 0.5);
    run(&job, in, out);
    float c = 0x1.6a09e6p-1f;
    for (int i = 0; i < 3; i++)
        cr_assert_eq(fbits(out[i]), fbits(c * b[i]), "%a", out[i]);
}

Test(slerp, bad_inputs_are_errors)
{
    static const int64_t shape[1] = { 2 };
    float a[2] = { 1, 2 }, out[2];
    const float *in[3] = { a, a, a };
    struct ms_stage_job job;
    slerp_job(&job, shape, 1, MS_DT_F32, 2, -1, 0.5);
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
    slerp_job(&job, shape, 1, MS_DT_F32, 3, 0, 0.5);
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
}

/* Random tensors in each dtype and at several t: exact chunking invariance, the
 * NumPy-literal reference within 1 ulp of each element's scale, the double
 * slerp within a loose bound. */
Test(slerp, random_vs_references)
{
    static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    static const double ts[5] = { 0.3, 0.5, 0.77, -0.2, 1.4 };
    static const int64_t shape[2] = { 31, 37 };
    enum { N = 31 * 37 };
    static float a[N], b[N], out[N], ref[N];
    static double ref64[N];
    uint64_t exact = 0, total = 0;
    for (int d = 0; d < 3; d++)
        for (int k = 0; k < 5; k++)
            for (int mode = 0; mode < 3; mode++) {
                uint64_t seed = 9000 + (uint64_t)d * 100 + (uint64_t)k * 10 + (uint64_t)mode;
                cr_log_info("seed %llu", (unsigned long long)seed);
                uint64_t s = seed;
                for (int i = 0; i < N; i++) {
                    a[i] = th_stage_value(dts[d], &s, 0.02f);
                    b[i] = th_stage_value(dts[d], &s, 0.03f);
                    /* mode 1: b = a + small noise (dot near 0.9); mode 2: nearly colinear */
                    if (mode)
                        b[i] = th_stage_round(dts[d], a[i] + (mode == 1 ? 0.5f : 0.01f) * b[i]);
                }
                const float *in[2] = { a, b };
                struct ms_stage_job job;
                slerp_job(&job, shape, 2, dts[d], 2, 0, ts[k]);
                static const uint64_t sizes[] = { N, 1, 7, 64, 37 * 3 };
                th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
                float c0, c1;
                ref_slerp32(a, b, N, ts[k], ref, &c0, &c1);
                ref_slerp64(a, b, N, ts[k], ref64);
                for (int i = 0; i < N; i++) {
                    double scale = fabs((double)c0 * a[i]) + fabs((double)c1 * b[i]);
                    double err = fabs((double)out[i] - ref[i]);
                    cr_assert(err <= ulpf(scale), "dt %d t %g mode %d elt %d: %a vs %a",
                              dts[d], ts[k], mode, i, out[i], ref[i]);
                    cr_assert(fabs((double)out[i] - ref64[i]) <= 1e-5 * scale + 1e-30,
                              "dt %d t %g mode %d elt %d: %a vs double %a", dts[d], ts[k], mode,
                              i, out[i], ref64[i]);
                    exact += fbits(out[i]) == fbits(ref[i]);
                    total++;
                }
            }
    cr_log_info("bit-identical to the NumPy-literal reference: %llu of %llu",
                (unsigned long long)exact, (unsigned long long)total);
    cr_assert(exact * 10 >= total * 9);
}

/* Two NaN meet in slerp's mix only when the tensor holds a NaN, which makes
 * the coefficients NaN (c0, c1 with the payload K of the whole-tensor sums).
 * The rule (stages/slerp.c): an element's own NaN wins over the coefficient's,
 * and the a-term's NaN over the b-term's; so out[j] is a[j]'s NaN where a[j] is
 * NaN, else K, at every position and for every chunking (the old loop's
 * vector body gave a's NaN and its scalar tail the coefficient's, so the bytes
 * depended on where a chunk ended). */
Test(slerp, nan_payloads_follow_the_rule_at_every_position_and_chunking)
{
    enum { N = 37 };
    static const int64_t shape[1] = { N };
    float a[N], b[N], out[N];
    uint64_t st = 5;
    for (int j = 0; j < N; j++) {
        a[j] = th_stage_value(MS_DT_F32, &st, 1.0f);
        b[j] = th_stage_value(MS_DT_F32, &st, 1.0f);
    }
    static const int apos[] = { 3, 17, 35, 36 };
    static const uint32_t apay[] = { 0x7fc00011u, 0xffc00022u, 0x7fc00044u, 0x7fd00055u };
    for (int k = 0; k < 4; k++) {
        memcpy(&a[apos[k]], &apay[k], 4);
        uint32_t bp = 0x7fc00033u + (uint32_t)k;
        memcpy(&b[apos[k]], &bp, 4);
    }
    uint32_t b5 = 0xffc00066u; /* b alone NaN: the a-term (K) wins */
    memcpy(&b[5], &b5, 4);
    const float *in[2] = { a, b };
    struct ms_stage_job job;
    slerp_job(&job, shape, 1, MS_DT_F32, 2, 0, 0.3);
    static const uint64_t sizes[] = { 0, 1, 2, 5, 16, 17, 36 };
    th_stage_run_sweep(&job, in, out, sizes, 7);
    uint32_t want_k = fbits(out[0]);
    cr_assert(out[0] != out[0], "%a", out[0]);
    for (int j = 0, k = 0; j < N; j++) {
        uint32_t want = k < 4 && j == apos[k] ? apay[k++] : want_k;
        cr_assert_eq(fbits(out[j]), want, "element %d: %08x, want %08x", j, fbits(out[j]), want);
    }
}

/*
 * The stored-bytes path (ms_stage_ops.stored_passes: reduce_stored and
 * apply_stored on bfloat16 or float16) writes the float path's floats encoded
 * to that dtype,
 * for chunks smaller and larger than its 2048-element blocks, ordinary tensors
 * (slerp and lerp), and tensors holding subnormals, infinities and NaN. The
 * reference is the float path (ms_stage_run_mem, whose values the tests above
 * check) encoded by the scalar reference encoder.
 */
Test(slerp, stored_path_gives_the_float_path_bytes)
{
    enum { N = 6000 };
    static const int64_t shape[2] = { 60, 100 };
    static float a[N], b[N], out[N];
    static uint16_t ha[N], hb[N], want[N], got[N];
    static const double ts[3] = { 0.3, 0.77, 1.4 };
    static const uint64_t sizes[] = { 0, 1, 7, 64, 2047, 2048, 2049, 5000 };
    static const enum ms_dtype dts[2] = { MS_DT_BF16, MS_DT_F16 };
    for (int d = 0; d < 2; d++)
    for (int k = 0; k < 3; k++)
        for (int mode = 0; mode < 4; mode++) {
            enum ms_dtype dt = dts[d];
            uint64_t s = 7100 + (uint64_t)d * 100 + (uint64_t)k * 10 + (uint64_t)mode;
            cr_log_info("seed %llu", (unsigned long long)s);
            for (int i = 0; i < N; i++) {
                a[i] = th_stage_value(dt, &s, 0.02f);
                b[i] = th_stage_value(dt, &s, 0.03f);
                if (mode == 1) /* nearly colinear: lerp */
                    b[i] = th_stage_round(dt, a[i] + 0.01f * b[i]);
            }
            if (mode >= 2) { /* subnormals and zeros; mode 3 also an Inf and a NaN */
                a[10] = dt == MS_DT_BF16 ? 0x1p-130f : 0x1p-20f;
                b[11] = dt == MS_DT_BF16 ? -0x1p-133f : -0x1p-23f;
                a[2500] = -0.0f;
                if (mode == 3) {
                    b[3000] = INFINITY;
                    memcpy(&a[4097], &(uint32_t){ 0xffc50000u }, 4);
                }
            }
            void (*enc)(const float *, uint16_t *, size_t) =
                dt == MS_DT_BF16 ? ms_f32_to_bf16_ref : ms_f32_to_f16_ref;
            enc(a, ha, N);
            enc(b, hb, N);
            /* the float path's inputs are what the stored bytes decode to */
            void (*dec)(const uint16_t *, float *, size_t) =
                dt == MS_DT_BF16 ? ms_bf16_to_f32_ref : ms_f16_to_f32_ref;
            dec(ha, a, N);
            dec(hb, b, N);
            for (int base = 0; base < 2; base++) {
                struct ms_stage_job job;
                slerp_job(&job, shape, 2, MS_DT_F32, 2, base, ts[k]);
                const float *in[2] = { a, b };
                cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0);
                enc(out, want, N);
                const void *hin[2] = { ha, hb };
                for (size_t z = 0; z < MS_ARRAY_LEN(sizes); z++) {
                    memset(got, 0x5a, sizeof got);
                    cr_assert_eq(ms_stage_run_stored(&job, dt, hin, got, sizes[z]), 0);
                    for (int i = 0; i < N; i++)
                        cr_assert_eq(got[i], want[i],
                                     "dt %d t %g mode %d base %d chunk %llu elt %d: %04x want %04x",
                                     dt, ts[k], mode, base, (unsigned long long)sizes[z], i,
                                     got[i], want[i]);
                }
            }
        }
}

/* A single input on the stored path gives the float path's bytes: its copy
 * quiets a signalling NaN as the float path's encode does (hand values:
 * bf16 0x7f81 -> 0x7fc1, 0xff81 -> 0xffc1; f16 0x7c01 -> 0x7e01), and keeps
 * every other value, quiet NaNs and -0 included. */
Test(slerp, stored_copy_quiets_signalling_nans)
{
    static const int64_t shape[1] = { 6 };
    static const uint16_t bx[6] = { 0x7f81, 0xff81, 0x7fc5, 0x8000, 0x3f80, 0x0001 };
    static const uint16_t bw[6] = { 0x7fc1, 0xffc1, 0x7fc5, 0x8000, 0x3f80, 0x0001 };
    static const uint16_t hx[6] = { 0x7c01, 0xfc01, 0x7e05, 0x8000, 0x3c00, 0x0001 };
    static const uint16_t hw[6] = { 0x7e01, 0xfe01, 0x7e05, 0x8000, 0x3c00, 0x0001 };
    const uint16_t *xs[2] = { bx, hx }, *ws[2] = { bw, hw };
    static const enum ms_dtype dts[2] = { MS_DT_BF16, MS_DT_F16 };
    for (int d = 0; d < 2; d++) {
        uint16_t o[6];
        const void *in[1] = { xs[d] };
        struct ms_stage_job job;
        slerp_job(&job, shape, 1, dts[d], 1, 0, 0.5);
        cr_assert_eq(ms_stage_run_stored(&job, dts[d], in, o, 0), 0);
        for (int i = 0; i < 6; i++)
            cr_assert_eq(o[i], ws[d][i], "dtype %d element %d: 0x%04x, want 0x%04x", d, i, o[i],
                         ws[d][i]);
    }
}

/* A single input (a one-pass copy under a float32 compute dtype) stays on the
 * float path: one-pass jobs see apply_stored in the compute dtype only. */
Test(slerp, stored_path_declines_one_pass_jobs)
{
    static const int64_t shape[1] = { 16 };
    uint16_t x[16] = { 0 }, y[16] = { 0 }, o[16];
    const void *in[2] = { x, y };
    struct ms_stage_job job;
    slerp_job(&job, shape, 1, MS_DT_F32, 1, 0, 0.5);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, in, o, 0), MS_EUNSUPPORTED);
}
