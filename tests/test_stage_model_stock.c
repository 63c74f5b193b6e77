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

/*
 * Mixed input dtypes (no dtype:): a reference that follows mergekit's Python line
 * by line with values that carry their torch dtype (struct tv). Every binary op
 * returns the promotion of its operands' dtypes (equal: that one; bf16 with f16 or
 * anything with f32: f32) and rounds to it; a Python int or float operand takes
 * the tensor's dtype; torch.stack promotes to the common dtype; a mean or a vector
 * sum is a float32 sum rounded once to the tensor's dtype. Nothing is precomputed
 * per step, so the stage's table of step dtypes is checked, not copied.
 */
struct tv {
    float v;
    enum ms_dtype d;
};

static enum ms_dtype tv_pro(enum ms_dtype a, enum ms_dtype b)
{
    return a == b ? a : MS_DT_F32;
}

static struct tv tv_mk(enum ms_dtype d, float v) { return (struct tv){ th_stage_round(d, v), d }; }
static struct tv tv_sub(struct tv a, struct tv b) { return tv_mk(tv_pro(a.d, b.d), a.v - b.v); }
static struct tv tv_add(struct tv a, struct tv b) { return tv_mk(tv_pro(a.d, b.d), a.v + b.v); }
static struct tv tv_mul(struct tv a, struct tv b) { return tv_mk(tv_pro(a.d, b.d), a.v * b.v); }
static struct tv tv_div(struct tv a, struct tv b) { return tv_mk(tv_pro(a.d, b.d), a.v / b.v); }
/* tensor op Python number: the number in the tensor's dtype's op math (float32) */
static struct tv tv_muls(struct tv a, float s) { return tv_mk(a.d, a.v * s); }
static struct tv tv_divs(struct tv a, float s) { return tv_mk(a.d, a.v / s); }
static struct tv tv_radds(float s, struct tv a) { return tv_mk(a.d, s + a.v); }
static struct tv tv_rsubs(float s, struct tv a) { return tv_mk(a.d, s - a.v); }

enum { MX_N = 40 };

/* mergekit model_stock over one flattened vector of MX_N elements. */
static void ref_mixed(const float *const *in, const enum ms_dtype *dt, uint32_t n, int base,
                      float *out, enum ms_dtype *out_dt)
{
    struct tv w0[MX_N], ws[MS_MAX_INPUTS][MX_N], off[MS_MAX_INPUTS][MX_N];
    uint32_t N = 0;
    for (int j = 0; j < MX_N; j++)
        w0[j] = tv_mk(dt[base], in[base][j]);
    for (uint32_t i = 0; i < n; i++) {
        if ((int)i == base)
            continue;
        for (int j = 0; j < MX_N; j++) {
            ws[N][j] = tv_mk(dt[i], in[i][j]);
            off[N][j] = tv_sub(ws[N][j], w0[j]); /* offsets = [w - w_0 for w in ws] */
        }
        N++;
    }
    struct tv cos[MS_MAX_INPUTS * MS_MAX_INPUTS] = { { 0 } };
    uint32_t K = 0;
    for (uint32_t a = 0; a < N; a++)
        for (uint32_t b = a + 1; b < N; b++) {
            long double sa = 0, sb = 0, sp = 0;
            enum ms_dtype pd = tv_pro(off[a][0].d, off[b][0].d);
            for (int j = 0; j < MX_N; j++) {
                sa += (long double)off[a][j].v * off[a][j].v;
                sb += (long double)off[b][j].v * off[b][j].v;
                sp += tv_mul(off[a][j], off[b][j]).v;
            }
            struct tv na = tv_mk(off[a][0].d, sqrtf((float)sa)); /* torch.norm */
            struct tv nb = tv_mk(off[b][0].d, sqrtf((float)sb));
            struct tv np = tv_mul(na, nb);
            struct tv lo = tv_mk(np.d, 1e-6f);                  /* .clamp(min=1e-6) */
            if (np.v < lo.v)
                np = lo;
            struct tv c = tv_div(tv_mk(pd, (float)sp), np);     /* (.. * ..).sum() / .. */
            c.v = fminf(fmaxf(c.v, -1.0f), 1.0f);
            cos[K++] = c;
        }
    enum ms_dtype cd = cos[0].d;                                /* torch.stack promotes */
    for (uint32_t k = 1; k < K; k++)
        cd = tv_pro(cd, cos[k].d);
    float acc = 0;
    for (uint32_t k = 0; k < K; k++)
        acc += cos[k].v;
    struct tv c = tv_mk(cd, acc / (float)K);                    /* .mean(dim=0) */
    struct tv t = tv_div(tv_muls(c, (float)N), tv_radds(1.0f, tv_muls(c, (float)(N - 1))));
    for (int j = 0; j < MX_N; j++) {
        struct tv s = ws[0][j];                                 /* sum(ws): 0 + w_1 is w_1 */
        for (uint32_t i = 1; i < N; i++)
            s = tv_add(s, ws[i][j]);
        struct tv avg = tv_divs(s, (float)N);
        struct tv r = tv_add(tv_mul(t, avg), tv_mul(tv_rsubs(1.0f, t), w0[j]));
        out[j] = r.v;
        *out_dt = r.d;
    }
}

Test(model_stock, mixed_input_dtypes_promote_op_by_op)
{
    static const enum ms_dtype combos[][4] = {
        { MS_DT_BF16, MS_DT_F16, MS_DT_F16, MS_DT_F16 },
        { MS_DT_F16, MS_DT_BF16, MS_DT_F16, MS_DT_BF16 },
        { MS_DT_BF16, MS_DT_BF16, MS_DT_F16, MS_DT_BF16 },
        { MS_DT_F32, MS_DT_BF16, MS_DT_BF16, MS_DT_BF16 },
        { MS_DT_BF16, MS_DT_BF16, MS_DT_BF16, MS_DT_F32 },
    };
    static float store[4][MX_N], out[MX_N], want[MX_N], same[MX_N];
    static const int64_t shape[1] = { MX_N };
    int differs = 0;
    for (size_t k = 0; k < MS_ARRAY_LEN(combos); k++) {
        for (uint32_t n = 3; n <= 4; n++) {
            uint64_t s = 9100 + k * 10 + n;
            float dir[MX_N];
            for (int j = 0; j < MX_N; j++) {
                store[0][j] = th_stage_value(MS_DT_F32, &s, 0.05f);
                dir[j] = th_stage_value(MS_DT_F32, &s, 0.01f);
            }
            const float *in[4];
            for (uint32_t i = 0; i < n; i++) {
                for (int j = 0; j < MX_N; j++)
                    store[i][j] = th_stage_round(combos[k][i],
                                                 i ? store[0][j] + dir[j] +
                                                         th_stage_value(MS_DT_F32, &s, 0.01f)
                                                   : store[0][j]);
                in[i] = store[i];
            }
            enum ms_dtype od;
            ref_mixed(in, combos[k], n, 0, want, &od);
            struct ms_stage_job job;
            enum ms_dtype D = combos[k][0];
            for (uint32_t i = 1; i < n; i++)
                D = tv_pro(D, combos[k][i]);
            th_stage_job(&job, "model_stock", shape, 1, D, n); /* the plan's promotion */
            job.base = 0;
            for (uint32_t i = 0; i < n; i++)
                job.in_dt[i] = combos[k][i];
            static const uint64_t sizes[] = { 0, 1, 7 };
            th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
            for (int j = 0; j < MX_N; j++)
                cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                          "combo %zu n %u elt %d: %a vs %a", k, n, j, out[j], want[j]);
            cr_assert_eq(od, D, "the result is the promotion of all inputs");
            /* promoting everything to float32 up front (the old rule) gives other bytes */
            memset(job.in_dt, 0, sizeof job.in_dt);
            cr_assert_eq(ms_stage_run_mem(&job, in, same, 0), 0);
            differs += memcmp(same, want, sizeof want) != 0;
        }
    }
    cr_assert_gt(differs, 0, "no case tells op-by-op promotion from float32 up front");
}

/* bfloat16 with filter_wise false keeps avg and w0 in the keep area from the
 * reduce pass (stages/model_stock.c); the engine's fallback without one
 * recomputes avg in apply: both give the reference's bytes, for N = 2 and 3
 * other models (N = 3: avg = rnd(sum / 3), a rounded division), every chunking;
 * with NaN and infinities among the inputs too (where the long double
 * reference is not meant to follow: keep and replay are compared bit for bit,
 * NaN payloads included). */
Test(model_stock, keep_area_and_replay_give_the_same_bytes)
{
    enum { R_ = 11, C_ = 37, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float store[4][N], out[N], alt[N], want[N];
    for (uint32_t n = 3; n <= 4; n++)
        for (int special = 0; special < 2; special++) {
            uint64_t s = 5150 + n * 10 + (uint64_t)special;
            int base = (int)(n - 2);
            const float *in[4];
            for (uint32_t i = 0; i < n; i++) {
                for (int j = 0; j < N; j++)
                    store[i][j] = th_stage_round(
                        MS_DT_BF16, (j % 5 - 2) * 0.03f + th_stage_value(MS_DT_F32, &s, 0.02f));
                in[i] = store[i];
            }
            if (special) {
                store[0][17] = INFINITY;
                store[1][40] = -INFINITY;
                store[n - 1][99] = NAN;
            }
            struct ms_stage_job job;
            th_stage_job(&job, "model_stock", shape, 2, MS_DT_BF16, n);
            job.base = base;
            cr_assert(job.method->ops->keeps && job.method->ops->keeps(&job));
            static const uint64_t sizes[] = { 0, 1, 5, C_, 1000, 1100 };
            th_stage_run_sweep(&job, in, out, sizes, MS_ARRAY_LEN(sizes));
            ref_vec(MS_DT_BF16, in, n, base, 0, N, want);
            for (int j = 0; j < N && !special; j++)
                cr_assert(ms_f32_bits(out[j]) == ms_f32_bits(want[j]),
                          "n %u elt %d: %a vs %a", n, j, out[j], want[j]);
            for (size_t k = 0; k < MS_ARRAY_LEN(sizes); k++) {
                cr_assert_eq(ms_stage_run_mem_keep(&job, in, alt, sizes[k], false), 0, "%s",
                             ms_errmsg());
                cr_assert(!memcmp(out, alt, sizeof out), "n %u special %d chunk %llu: replay differs",
                          n, special, (unsigned long long)sizes[k]);
            }
        }
    /* filter_wise true and float16 take no keep area */
    struct ms_stage_job job;
    th_stage_job(&job, "model_stock", shape, 2, MS_DT_F16, 3);
    job.base = 0;
    cr_assert(!job.method->ops->keeps(&job));
    th_stage_job(&job, "model_stock", shape, 2, MS_DT_BF16, 3);
    job.base = 0;
    th_stage_set(&job, -1, "filter_wise", 1);
    cr_assert(!job.method->ops->keeps(&job));
}

/*
 * The stored-bytes path (stages/model_stock.c: reduce_stored and apply_stored on
 * bfloat16 or float16 bytes; filter_wise true and the base alone through
 * apply_stored alone) writes the float path's floats encoded to the stored dtype,
 * with and without a keep area, for N = 2 and 3 other models, the base first or
 * last, computed in the stored dtype or in float32 (a recipe's dtype: float32
 * over 16-bit files), chunks smaller and larger than its 1024-element blocks, and
 * tensors holding subnormals, -0, infinities and NaN. The float path (checked
 * above) is the reference, encoded by the scalar reference encoder; on finite
 * inputs the reference of this file (ref_vec) is checked too.
 */
Test(model_stock, stored_path_gives_the_float_path_bytes)
{
    enum { R_ = 23, C_ = 97, N = R_ * C_ };
    static const int64_t shape[2] = { R_, C_ };
    static float x[4][N], out[N], ref[N];
    static uint16_t h[4][N], want[N], got[N];
    static const uint64_t sizes[] = { 0, 1, 7, 257, 1500 };
    static const enum ms_dtype sdts[2] = { MS_DT_BF16, MS_DT_F16 };
    int runs = 0;
    for (int d = 0; d < 2; d++)
        for (uint32_t n = 3; n <= 4; n++)
            for (int mode = 0; mode < 3; mode++) {
                enum ms_dtype dt = sdts[d];
                uint64_t s = 8200 + (uint64_t)d * 100 + n * 10 + (uint64_t)mode;
                cr_log_info("seed %llu", (unsigned long long)s);
                float dir[N];
                for (int j = 0; j < N; j++) {
                    x[0][j] = th_stage_value(dt, &s, 0.05f);
                    dir[j] = th_stage_value(MS_DT_F32, &s, 0.01f);
                }
                for (uint32_t i = 1; i < n; i++)
                    for (int j = 0; j < N; j++)
                        x[i][j] = th_stage_round(dt, x[0][j] + dir[j] +
                                                         th_stage_value(MS_DT_F32, &s, 0.01f));
                if (mode >= 1) { /* subnormals and -0; mode 2 also infinities and a NaN */
                    x[1][10] = dt == MS_DT_BF16 ? 0x1p-130f : 0x1p-20f;
                    x[0][11] = dt == MS_DT_BF16 ? -0x1p-133f : -0x1p-23f;
                    x[n - 1][1200] = -0.0f;
                    x[0][1201] = -0.0f;
                    if (mode == 2) {
                        x[0][300] = INFINITY;
                        x[1][1800] = -INFINITY;
                        memcpy(&x[n - 1][2100], &(uint32_t){ 0xffc50000u }, 4);
                    }
                }
                void (*enc)(const float *, uint16_t *, size_t) =
                    dt == MS_DT_BF16 ? ms_f32_to_bf16_ref : ms_f32_to_f16_ref;
                void (*dec)(const uint16_t *, float *, size_t) =
                    dt == MS_DT_BF16 ? ms_bf16_to_f32_ref : ms_f16_to_f32_ref;
                const float *in[4];
                const void *hin[4];
                for (uint32_t i = 0; i < n; i++) {
                    enc(x[i], h[i], N);
                    dec(h[i], x[i], N); /* the float path's inputs: what the bytes decode to */
                    in[i] = x[i];
                    hin[i] = h[i];
                }
                for (int bp = 0; bp < 2; bp++)
                    for (int fw = 0; fw < 2; fw++)
                        for (int cf = 0; cf < 2; cf++) {
                            enum ms_dtype comp = cf ? MS_DT_F32 : dt;
                            int base = bp ? (int)n - 1 : 0;
                            struct ms_stage_job job;
                            th_stage_job(&job, "model_stock", shape, 2, comp, n);
                            job.base = base;
                            th_stage_set(&job, -1, "filter_wise", fw);
                            if (fw && cf) { /* one pass: apply_stored sees the compute dtype */
                                cr_assert_eq(ms_stage_run_stored(&job, dt, hin, got, 0),
                                             MS_EUNSUPPORTED);
                                continue;
                            }
                            cr_assert_eq(ms_stage_run_mem(&job, in, out, 0), 0, "%s",
                                         ms_errmsg());
                            enc(out, want, N);
                            if (mode == 0) {
                                for (size_t j0 = 0; j0 < N; j0 += fw ? C_ : N)
                                    ref_vec(comp, in, n, base, j0, fw ? C_ : N, ref);
                                enc(ref, got, N);
                                cr_assert(!memcmp(got, want, sizeof want),
                                          "dt %d n %u fw %d: float path vs reference", dt, n,
                                          fw);
                            }
                            for (size_t z = 0; z < MS_ARRAY_LEN(sizes); z++)
                                for (int kp = 0; kp < 2; kp++) {
                                    memset(got, 0x5a, sizeof got);
                                    cr_assert_eq(ms_stage_run_stored_keep(&job, dt, hin, got,
                                                                          sizes[z], kp),
                                                 0, "%s", ms_errmsg());
                                    for (int j = 0; j < N; j++)
                                        cr_assert_eq(got[j], want[j],
                                                     "dt %d n %u mode %d base %d fw %d compute "
                                                     "%d chunk %llu keep %d elt %d: %04x want "
                                                     "%04x",
                                                     dt, n, mode, base, fw, comp,
                                                     (unsigned long long)sizes[z], kp, j,
                                                     got[j], want[j]);
                                    runs++;
                                }
                        }
            }
    cr_assert_eq(runs, 2 * 2 * 3 * 2 * 3 * 5 * 2);
}

/* The base alone (a one-pass copy) takes apply_stored in its own dtype: the
 * stored bytes unchanged, -0 and a NaN's payload included. */
Test(model_stock, stored_path_copies_the_base_alone)
{
    static const int64_t shape[1] = { 5 };
    uint16_t x[5] = { 0x3f80, 0x8000, 0xffc5, 0x0001, 0x7f80 }, o[5];
    const void *in[1] = { x };
    struct ms_stage_job job;
    th_stage_job(&job, "model_stock", shape, 1, MS_DT_BF16, 1);
    job.base = 0;
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, in, o, 2), 0);
    cr_assert(!memcmp(x, o, sizeof x));
}
