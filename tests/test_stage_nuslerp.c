/*
 * test_stage_nuslerp.c - `nuslerp` (stages/nuslerp.c, mergekit-spec.md 2.4).
 *
 * Expected values come from hand computation and from a plain reference
 * written here from the spec over whole arrays: the vectors are index sets
 * (the whole tensor; each row; each column of the [shape[0], rest] view), the
 * sums are in long double rounded once to float32, every elementwise step is
 * rounded with the independent rounding of tests/th_stage.c. On these sizes
 * the stage (exact sums; fixed-point column sums in row_wise mode) agrees bit
 * for bit in BF16, F16 and F32, with and without a base, at several chunk sizes.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_stage.h"

static const enum ms_dtype dts[3] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };

/* One vector: elements first + k*stride, k < len. */
static void ref_vec(enum ms_dtype dt, const float *x0, const float *x1, const float *b, double t,
                    size_t first, size_t stride, size_t len, float *out)
{
#define R(x) th_stage_round(dt, (x))
#define V(x, j) (b ? R((x)[j] - b[j]) : (x)[j])
    long double s0 = 0, s1 = 0, sc = 0;
    for (size_t k = 0, j = first; k < len; k++, j += stride) {
        s0 += (long double)V(x0, j) * V(x0, j);
        s1 += (long double)V(x1, j) * V(x1, j);
    }
    float lo = R((float)1e-7);
    float n0 = fmaxf(R(sqrtf((float)s0)), lo), n1 = fmaxf(R(sqrtf((float)s1)), lo);
    for (size_t k = 0, j = first; k < len; k++, j += stride)
        sc += R(R(V(x0, j) / n0) * R(V(x1, j) / n1));
    float c = fminf(fmaxf(R((float)sc), -1.0f), 1.0f);
    float th = R(acosf(c)), s = R(sinf(th));
    float c0 = (float)(1 - t), c1 = (float)t;
    float a = R(sinf(R(c0 * th))), bb = R(sinf(R(c1 * th)));
    bool colinear = fabsf(s) < R((float)1e-8);
    for (size_t k = 0, j = first; k < len; k++, j += stride) {
        float v0 = V(x0, j), v1 = V(x1, j);
        float r = colinear ? R(R(c0 * v0) + R(c1 * v1)) : R(R(R(a * v0) + R(bb * v1)) / s);
        out[j] = b ? R(b[j] + r) : r;
    }
#undef V
#undef R
}

enum { FLAT, ROWS, COLS };

static void ref_nuslerp(enum ms_dtype dt, const float *x0, const float *x1, const float *b,
                        double t, int mode, const int64_t *shape, uint32_t ndim, float *out)
{
    size_t numel = 1;
    for (uint32_t i = 0; i < ndim; i++)
        numel *= (size_t)shape[i];
    if (mode == FLAT || ndim == 0) {
        ref_vec(dt, x0, x1, b, t, 0, 1, numel, out);
    } else if (mode == ROWS) {
        size_t row = (size_t)shape[ndim - 1];
        for (size_t r = 0; r < numel / row; r++)
            ref_vec(dt, x0, x1, b, t, r * row, 1, row, out);
    } else {
        size_t inner = numel / (size_t)shape[0];
        for (size_t c = 0; c < inner; c++)
            ref_vec(dt, x0, x1, b, t, c, inner, (size_t)shape[0], out);
    }
}

static struct ms_stage_job mk(const int64_t *shape, uint32_t ndim, enum ms_dtype dt, uint32_t n,
                              int base, double w0, double w1, int mode)
{
    struct ms_stage_job job;
    th_stage_job(&job, "nuslerp", shape, ndim, dt, n);
    job.base = base;
    for (uint32_t i = 0, k = 0; i < n; i++)
        if ((int)i != base)
            th_stage_set(&job, (int)i, "weight", k++ ? w1 : w0);
    th_stage_set(&job, -1, "nuslerp_flatten", mode == FLAT);
    th_stage_set(&job, -1, "nuslerp_row_wise", mode == COLS);
    return job;
}

static void run(const struct ms_stage_job *job, const float *const *in, float *out)
{
    cr_assert_eq(ms_stage_run_mem(job, in, out, 0), 0, "%s", ms_errmsg());
}

Test(nuslerp, registered) { cr_assert(ms_method_find("nuslerp")->ops); }

Test(nuslerp, hand_computed)
{
    static const int64_t shape[1] = { 2 };
    float a[2] = { 1, 0 }, b[2] = { 0, 1 }, a2[2] = { 2, 4 }, b2[2] = { 1, 2 }, out[2];
    const float *in[2] = { a, b };
    /* (1, 0), (0, 1), weights 1 and 1: t = 0.5, th = pi/2, s = 1, both
     * coefficients sin(pi/4): out = (0.70710677, 0.70710677) */
    struct ms_stage_job job = mk(shape, 1, MS_DT_F32, 2, -1, 1, 1, FLAT);
    run(&job, in, out);
    cr_assert(th_stage_ulps(out[0], (float)M_SQRT1_2) <= 1 &&
                  th_stage_ulps(out[1], (float)M_SQRT1_2) <= 1, "%a %a", out[0], out[1]);
    /* weights 1 and 3: t = 0.75: out = (sin(pi/8), sin(3pi/8)) */
    job = mk(shape, 1, MS_DT_F32, 2, -1, 1, 3, FLAT);
    run(&job, in, out);
    cr_assert(th_stage_ulps(out[0], (float)sin(M_PI / 8)) <= 2 &&
                  th_stage_ulps(out[1], (float)sin(3 * M_PI / 8)) <= 2, "%a %a", out[0], out[1]);
    /* weights summing to 0: t = 0.5 */
    job = mk(shape, 1, MS_DT_F32, 2, -1, 1, -1, FLAT);
    run(&job, in, out);
    cr_assert(th_stage_ulps(out[0], (float)M_SQRT1_2) <= 1);
    /* colinear (2, 4) and (1, 2), t = 0.25: cos = 1, sin = 0: the lerp
     * 0.75*(2, 4) + 0.25*(1, 2) = (1.75, 3.5), exact in BF16 */
    const float *in2[2] = { a2, b2 };
    job = mk(shape, 1, MS_DT_BF16, 2, -1, 3, 1, FLAT);
    run(&job, in2, out);
    cr_assert(out[0] == 1.75f && out[1] == 3.5f, "%a %a", out[0], out[1]);
    /* with a base (10, 10): task vectors (1, 0), (0, 1) */
    float ten[2] = { 10, 10 }, x0[2] = { 11, 10 }, x1[2] = { 10, 11 };
    const float *in3[3] = { ten, x0, x1 };
    job = mk(shape, 1, MS_DT_F32, 3, 0, 1, 1, FLAT);
    run(&job, in3, out);
    cr_assert(th_stage_ulps(out[0], 10.0f + (float)M_SQRT1_2) <= 1, "%a", out[0]);
}

Test(nuslerp, input_rules)
{
    static const int64_t shape[1] = { 3 };
    float a[3] = { 1, -0.0f, 3 }, out[3];
    const float *in[3] = { a, a, a };
    struct ms_stage_job job = mk(shape, 1, MS_DT_BF16, 1, -1, 1, 1, FLAT);
    run(&job, in, out);
    cr_assert(!memcmp(a, out, sizeof(a)));
    job = mk(shape, 1, MS_DT_BF16, 2, 0, 1, 1, FLAT); /* the base and one model */
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
    cr_assert(strstr(ms_errmsg(), "t:"), "%s", ms_errmsg());
    job = mk(shape, 1, MS_DT_BF16, 3, -1, 1, 1, FLAT); /* three models, no base */
    cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), MS_EPLAN);
}

Test(nuslerp, row_wise_column_cap)
{
    /* 2 x (2^23) columns: over the state cap; the error names the tensor */
    static const int64_t shape[2] = { 2, INT64_C(1) << 23 };
    struct ms_stage_job job = mk(shape, 2, MS_DT_BF16, 2, -1, 1, 1, COLS);
    size_t ssize = job.method->ops->state_size(&job);
    cr_assert(ssize < 4096, "%zu", ssize);
    void *state = calloc(1, ssize);
    cr_assert_eq(job.method->ops->begin(state, &job), MS_EUNSUPPORTED);
    cr_assert(strstr(ms_errmsg(), "t:") && strstr(ms_errmsg(), "columns"), "%s", ms_errmsg());
    free(state);
}

Test(nuslerp, random_vs_reference_bit_exact)
{
    static const int64_t s2[2] = { 14, 27 }, s3[3] = { 3, 5, 19 }, s1[1] = { 301 };
    static const int64_t *shapes[3] = { s2, s3, s1 };
    static const uint32_t ndims[3] = { 2, 3, 1 };
    static const double ws[3][2] = { { 1, 0.5 }, { 0.3, 0.9 }, { 1, 1 } };
    enum { NMAX = 14 * 27 };
    static float x0[NMAX], x1[NMAX], bb[NMAX], out[NMAX], want[NMAX];
    for (int d = 0; d < 3; d++)
        for (int sh = 0; sh < 3; sh++)
            for (int mode = FLAT; mode <= COLS; mode++)
                for (int withbase = 0; withbase < 2; withbase++)
                    for (int near = 0; near < 2; near++) {
                        uint64_t s = 10400 + (uint64_t)d * 1000 + (uint64_t)sh * 100 +
                                     (uint64_t)mode * 10 + (uint64_t)withbase * 2 + (uint64_t)near;
                        cr_log_info("seed %llu", (unsigned long long)s);
                        struct ms_stage_job job = mk(shapes[sh], ndims[sh], dts[d],
                                                     2 + (uint32_t)withbase,
                                                     withbase ? (int)(s % 3) : -1, ws[sh][0],
                                                     ws[sh][1], mode);
                        size_t n = (size_t)job.numel;
                        for (size_t j = 0; j < n; j++) {
                            bb[j] = th_stage_value(dts[d], &s, 0.05f);
                            float e0 = th_stage_value(MS_DT_F32, &s, 0.02f);
                            float e1 = th_stage_value(MS_DT_F32, &s, 0.02f);
                            /* near: x1 close to x0 (angles small), else independent */
                            x0[j] = th_stage_round(dts[d], bb[j] + e0);
                            x1[j] = th_stage_round(dts[d], near ? x0[j] + 0.05f * e1 : bb[j] + e1);
                        }
                        const float *in[3];
                        const float *xs[2] = { x0, x1 };
                        for (uint32_t i = 0, k = 0; i < job.ninputs; i++)
                            in[i] = (int)i == job.base ? bb : xs[k++];
                        uint64_t row = job.row_len;
                        uint64_t sizes[] = { 0, 1, 7, row, 3 * row + 1 };
                        th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
                        double w0 = ws[sh][0], w1 = ws[sh][1];
                        ref_nuslerp(dts[d], x0, x1, withbase ? bb : NULL, w1 / (w0 + w1), mode,
                                    shapes[sh], ndims[sh], want);
                        for (size_t j = 0; j < n; j++)
                            cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                                      "dt %d shape %d mode %d base %d near %d elt %zu: %a vs %a",
                                      dts[d], sh, mode, job.base, near, j, out[j], want[j]);
                    }
}

/*
 * Mixed input dtypes (no dtype:): mergekit's nuslerp() line by line over one
 * flattened vector, with values that carry their torch dtype (struct tv): a binary
 * op on two tensors returns the promotion of their dtypes (equal: that one; else
 * float32 here) rounded to it; a Python float operand takes the tensor's dtype
 * (float32 op math); a vector sum or norm is a float32 sum rounded once to the
 * tensor's dtype. No step dtype is precomputed.
 */
struct tv {
    float v;
    enum ms_dtype d;
};
static enum ms_dtype tv_pro(enum ms_dtype a, enum ms_dtype b) { return a == b ? a : MS_DT_F32; }
static struct tv tv_mk(enum ms_dtype d, float v) { return (struct tv){ th_stage_round(d, v), d }; }
static struct tv tv_sub(struct tv a, struct tv b) { return tv_mk(tv_pro(a.d, b.d), a.v - b.v); }
static struct tv tv_add(struct tv a, struct tv b) { return tv_mk(tv_pro(a.d, b.d), a.v + b.v); }
static struct tv tv_mul(struct tv a, struct tv b) { return tv_mk(tv_pro(a.d, b.d), a.v * b.v); }
static struct tv tv_div(struct tv a, struct tv b) { return tv_mk(tv_pro(a.d, b.d), a.v / b.v); }
static struct tv tv_smul(float s, struct tv a) { return tv_mk(a.d, s * a.v); }
static struct tv tv_fn(float (*f)(float), struct tv a) { return tv_mk(a.d, f(a.v)); }

enum { MXN = 60 };

static void ref_mixed(const float *x0, const float *x1, const float *b, const enum ms_dtype *dt,
                      double t, float *out, enum ms_dtype *out_dt)
{
    struct tv v0[MXN], v1[MXN];
    for (int j = 0; j < MXN; j++) {
        struct tv a = tv_mk(dt[0], x0[j]), c = tv_mk(dt[1], x1[j]);
        v0[j] = b ? tv_sub(a, tv_mk(dt[2], b[j])) : a; /* tensors[k] - base_tensor */
        v1[j] = b ? tv_sub(c, tv_mk(dt[2], b[j])) : c;
    }
    /* _normalize: x / torch.norm(x).clamp(min=1e-7) */
    long double s0 = 0, s1 = 0;
    for (int j = 0; j < MXN; j++) {
        s0 += (long double)v0[j].v * v0[j].v;
        s1 += (long double)v1[j].v * v1[j].v;
    }
    struct tv n0 = tv_mk(v0[0].d, sqrtf((float)s0)), n1 = tv_mk(v1[0].d, sqrtf((float)s1));
    struct tv l0 = tv_mk(n0.d, 1e-7f), l1 = tv_mk(n1.d, 1e-7f);
    n0 = n0.v < l0.v ? l0 : n0;
    n1 = n1.v < l1.v ? l1 : n1;
    long double sc = 0;
    enum ms_dtype pd = tv_pro(v0[0].d, v1[0].d);
    for (int j = 0; j < MXN; j++)
        sc += tv_mul(tv_div(v0[j], n0), tv_div(v1[j], n1)).v;  /* torch.sum(v0_u * v1_u) */
    struct tv cos = tv_mk(pd, (float)sc);
    cos.v = fminf(fmaxf(cos.v, -1.0f), 1.0f);
    struct tv th = tv_fn(acosf, cos), sth = tv_fn(sinf, th);
    bool colinear = fabsf(sth.v) < tv_mk(sth.d, 1e-8f).v;
    float c0 = (float)(1 - t), c1 = (float)t;
    for (int j = 0; j < MXN; j++) {
        struct tv r = colinear ? tv_add(tv_smul(c0, v0[j]), tv_smul(c1, v1[j]))
                               : tv_div(tv_add(tv_mul(tv_fn(sinf, tv_smul(c0, th)), v0[j]),
                                               tv_mul(tv_fn(sinf, tv_smul(c1, th)), v1[j])),
                                        sth);
        if (colinear) /* res[colinear] = ...: stored into res, of the main branch's dtype */
            r = tv_mk(tv_pro(tv_pro(pd, v0[j].d), v1[j].d), r.v);
        if (b)
            r = tv_add(tv_mk(dt[2], b[j]), r);
        out[j] = r.v;
        *out_dt = r.d;
    }
}

Test(nuslerp, mixed_input_dtypes_promote_op_by_op)
{
    /* dtypes of x0, x1 and the base (BOOL: no base) */
    static const enum ms_dtype combos[][3] = {
        { MS_DT_BF16, MS_DT_F16, MS_DT_BOOL }, { MS_DT_F16, MS_DT_BF16, MS_DT_BOOL },
        { MS_DT_BF16, MS_DT_F16, MS_DT_BF16 }, { MS_DT_BF16, MS_DT_BF16, MS_DT_F16 },
        { MS_DT_F32, MS_DT_BF16, MS_DT_BF16 }, { MS_DT_F16, MS_DT_F16, MS_DT_BF16 },
    };
    static float x0[MXN], x1[MXN], bb[MXN], out[MXN], want[MXN], old[MXN];
    static const int64_t shape[1] = { MXN };
    int differs = 0;
    for (size_t k = 0; k < MS_ARRAY_LEN(combos); k++)
        for (int colin = 0; colin < 2; colin++) {
            uint64_t s = 12400 + k * 10 + (uint64_t)colin;
            bool hb = combos[k][2] != MS_DT_BOOL;
            for (int j = 0; j < MXN; j++) {
                float base = th_stage_value(MS_DT_F32, &s, 0.05f);
                float e0 = th_stage_value(MS_DT_F32, &s, 0.02f);
                float e1 = th_stage_value(MS_DT_F32, &s, 0.02f);
                bb[j] = hb ? th_stage_round(combos[k][2], base) : 0;
                x0[j] = th_stage_round(combos[k][0], bb[j] + e0);
                /* colin: x1 - base = 2 (x0 - base) exactly, in every dtype here */
                x1[j] = colin ? bb[j] + 2 * (x0[j] - bb[j])
                              : th_stage_round(combos[k][1], bb[j] + e1);
                if (colin && th_stage_round(combos[k][1], x1[j]) != x1[j])
                    x0[j] = x1[j] = bb[j] = 0; /* not representable: zero keeps it colinear */
            }
            enum ms_dtype od, D = tv_pro(combos[k][0], combos[k][1]);
            if (hb)
                D = tv_pro(D, combos[k][2]);
            ref_mixed(x0, x1, hb ? bb : NULL, combos[k], 0.3 / 1.3, want, &od);
            cr_assert_eq(od, D, "combo %zu: the result is the promotion of the inputs", k);
            struct ms_stage_job job = mk(shape, 1, D, hb ? 3 : 2, hb ? 2 : -1, 1.0, 0.3, FLAT);
            job.in_dt[0] = combos[k][0];
            job.in_dt[1] = combos[k][1];
            if (hb)
                job.in_dt[2] = combos[k][2];
            const float *in[3] = { x0, x1, bb };
            uint64_t sizes[] = { 0, 1, 7 };
            th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
            for (int j = 0; j < MXN; j++)
                cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                          "combo %zu colin %d elt %d: %a vs %a", k, colin, j, out[j], want[j]);
            memset(job.in_dt, 0, sizeof job.in_dt); /* the old rule: float32 up front */
            run(&job, in, old);
            differs += memcmp(old, want, sizeof want) != 0;
        }
    cr_assert_gt(differs, 0, "no case tells op-by-op promotion from float32 up front");
}

/*
 * The stored-bytes path (stages/nuslerp.c: both reduce passes and apply on
 * bfloat16 or float16 bytes for the whole-vector mode; apply_stored alone for
 * the per-row mode and a copy) writes the float path's floats encoded to the
 * stored dtype (the keep flag changes nothing: nuslerp keeps nothing), without
 * a base and with the base at each position, computed in the stored dtype or in
 * float32 (whole-vector mode), for chunks smaller and larger than its
 * 1024-element blocks, ordinary, colinear (x1 = x0: sin th = 0) and nearly
 * aligned vectors, and tensors holding subnormals, -0, infinities and NaN. The
 * float path (checked above) is the reference, encoded by the scalar reference
 * encoder; on finite inputs ref_nuslerp is checked too. The columns mode stays
 * on the float path.
 */
Test(nuslerp, stored_path_gives_the_float_path_bytes)
{
    enum { R_ = 19, C_ = 131, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float x[3][N], out[N], ref[N];
    static uint16_t h[3][N], want[N], got[N];
    static const uint64_t sizes[] = { 0, 1, 7, 257, 1500 };
    static const enum ms_dtype sdts[2] = { MS_DT_BF16, MS_DT_F16 };
    int runs = 0;
    for (int d = 0; d < 2; d++)
        for (int mode = 0; mode < 4; mode++) {
            enum ms_dtype dt = sdts[d];
            uint64_t s = 12300 + (uint64_t)d * 100 + (uint64_t)mode;
            cr_log_info("seed %llu", (unsigned long long)s);
            for (int j = 0; j < N; j++) {
                x[2][j] = th_stage_value(dt, &s, 0.05f); /* the base when there is one */
                float e0 = th_stage_value(MS_DT_F32, &s, 0.02f);
                float e1 = th_stage_value(MS_DT_F32, &s, 0.02f);
                x[0][j] = th_stage_round(dt, x[2][j] + e0);
                x[1][j] = th_stage_round(dt, mode == 1 ? x[0][j] + 0.05f * e1 : x[2][j] + e1);
            }
            if (mode == 2) /* colinear */
                memcpy(x[1], x[0], sizeof x[0]);
            if (mode == 3) { /* subnormals, -0, infinities (row 2) and a NaN (row 15) */
                x[0][10] = dt == MS_DT_BF16 ? 0x1p-130f : 0x1p-20f;
                x[2][11] = dt == MS_DT_BF16 ? -0x1p-133f : -0x1p-23f;
                x[1][1200] = -0.0f;
                x[2][1201] = -0.0f;
                x[0][2 * C_ + 5] = INFINITY;
                x[2][2 * C_ + 9] = -INFINITY;
                memcpy(&x[1][15 * C_ + 3], &(uint32_t){ 0xffc50000u }, 4);
            }
            void (*enc)(const float *, uint16_t *, size_t) =
                dt == MS_DT_BF16 ? ms_f32_to_bf16_ref : ms_f32_to_f16_ref;
            void (*dec)(const uint16_t *, float *, size_t) =
                dt == MS_DT_BF16 ? ms_bf16_to_f32_ref : ms_f16_to_f32_ref;
            for (int i = 0; i < 3; i++) {
                enc(x[i], h[i], N);
                dec(h[i], x[i], N); /* the float path's inputs: what the bytes decode to */
            }
            for (int base = -1; base < 3; base++)
                for (int vm = FLAT; vm <= COLS; vm++)
                    for (int cf = 0; cf < 2; cf++) {
                        enum ms_dtype comp = cf ? MS_DT_F32 : dt;
                        uint32_t n = base < 0 ? 2 : 3;
                        struct ms_stage_job job = mk(shape, 2, comp, n, base, 0.3, 0.9, vm);
                        const float *in[3];
                        const void *hin[3];
                        for (uint32_t i = 0, k = 0; i < n; i++) {
                            uint32_t src = (int)i == base ? 2 : k++;
                            in[i] = x[src];
                            hin[i] = h[src];
                        }
                        if (vm == COLS || (vm == ROWS && cf)) { /* float path only */
                            cr_assert_eq(ms_stage_run_stored(&job, dt, hin, got, 0),
                                         MS_EUNSUPPORTED);
                            continue;
                        }
                        run(&job, in, out);
                        enc(out, want, N);
                        if (mode < 3) {
                            ref_nuslerp(comp, x[0], x[1], base >= 0 ? x[2] : NULL,
                                        0.9 / (0.3 + 0.9), vm, shape, 2, ref);
                            enc(ref, got, N);
                            cr_assert(!memcmp(got, want, sizeof want),
                                      "dt %d mode %d base %d vm %d: float path vs reference", dt,
                                      mode, base, vm);
                        }
                        for (size_t z = 0; z < MS_ARRAY_LEN(sizes); z++)
                            for (int kp = 0; kp < 2; kp++) {
                                memset(got, 0x5a, sizeof got);
                                cr_assert_eq(ms_stage_run_stored_keep(&job, dt, hin, got,
                                                                      sizes[z], kp),
                                             0, "%s", ms_errmsg());
                                for (int j = 0; j < N; j++)
                                    cr_assert_eq(got[j], want[j],
                                                 "dt %d mode %d base %d vm %d compute %d chunk "
                                                 "%llu keep %d elt %d: %04x want %04x",
                                                 dt, mode, base, vm, comp,
                                                 (unsigned long long)sizes[z], kp, j, got[j],
                                                 want[j]);
                                runs++;
                            }
                    }
        }
    cr_assert_eq(runs, 2 * 4 * 4 * 3 * 5 * 2);
}

/* One tensor (a one-pass copy) takes apply_stored in its own dtype: the stored
 * bytes unchanged, -0 and a NaN's payload included. */
Test(nuslerp, stored_path_copies_a_single_input)
{
    static const int64_t shape[1] = { 5 };
    uint16_t x[5] = { 0x3c00, 0x8000, 0xfe45, 0x0001, 0x7c00 }, o[5];
    const void *in[1] = { x };
    struct ms_stage_job job = mk(shape, 1, MS_DT_F16, 1, -1, 1, 1, FLAT);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_F16, in, o, 3), 0);
    cr_assert(!memcmp(x, o, sizeof x));
}
