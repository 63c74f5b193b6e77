/*
 * test_stage_gta_stored.c - the stored-bytes path of stages/gta.c
 * (ms_stage_ops.stored_passes, reduce_stored, apply_stored) against its float
 * path, bit for bit: every member that takes it (ties, dare_ties, dare_linear,
 * breadcrumbs_ties, breadcrumbs, task_arithmetic), bfloat16 and float16
 * stored, computed in that dtype or in float32, 1, 2, 3 and 5 models besides
 * the base at any position, rescale on and off, chunks of 1, 7, 257 elements
 * and whole, with and without a keep area, tensors spanning the apply blocks
 * (256) and the rescale blocks (4096), and inputs holding NaN, infinities,
 * -0 and subnormals. The reference is ms_stage_run_mem's floats (which
 * test_stage_ties.c and the others check against tests/th_gta.c) encoded by
 * the scalar reference encoders; the float path's inputs are what the stored
 * bytes decode to.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_gta.h"

enum { NMAX = 5000, IN = 6 };

static float fin[IN][NMAX], fout[NMAX];
static uint16_t hin[IN][NMAX], want[NMAX], got[NMAX];

/* Fills the inputs of g (g->ninputs, g->numel, g->base set) with values of dt:
 * the base on a coarse grid, deltas of few magnitudes (many ties) with random
 * signs, a quarter zero; with specials, a NaN (with payload), infinities, -0
 * and subnormals in the base and the models. */
static void fill(struct th_gta *g, enum ms_dtype dt, bool specials, uint64_t *rs)
{
    const uint64_t n = g->numel;
    float *B = fin[g->base];
    for (uint64_t e = 0; e < n; e++)
        B[e] = th_gta_rnd(dt, (float)((int)(th_gta_rand(rs) % 23) - 11) * 0.125f);
    for (uint32_t i = 0; i < g->ninputs; i++) {
        g->in[i] = fin[i];
        if ((int)i == g->base)
            continue;
        for (uint64_t e = 0; e < n; e++) {
            uint64_t r = th_gta_rand(rs);
            float v = r % 4 == 0 ? 0.0f : (float)(r % 7) * 0x1p-6f + (float)(r >> 40 & 3) * 0x1p-9f;
            fin[i][e] = th_gta_rnd(dt, B[e] + ((r >> 8) & 1 ? -v : v));
        }
    }
    if (specials && n >= 8) {
        const float sub = dt == MS_DT_BF16 ? 0x1p-130f : 0x1p-20f;
        uint32_t o = g->base == 0 ? 1 : 0; /* a model */
        B[n / 2] = -0.0f;
        fin[o][n / 2] = 0.0f;
        B[n / 3] = sub;
        fin[o][n / 3 + 1] = -sub;
        fin[o][n - 1] = INFINITY;
        B[n / 5] = -INFINITY;
        memcpy(&fin[o][n / 7], &(uint32_t){ 0xffc50000u }, 4); /* NaN with payload */
        memcpy(&B[n - 2], &(uint32_t){ 0x7fa00000u }, 4);       /* signaling NaN */
    }
}

/* Whether the job asks for a reduce pass (begin). */
static bool multi_pass(const struct ms_stage_job *job)
{
    const struct ms_stage_ops *ops = job->method->ops;
    size_t ss = ops->state_size(job);
    void *st = ms_aligned_alloc(ss);
    cr_assert(st);
    memset(st, 0, ss);
    int r = ops->begin(st, job);
    ms_aligned_free(st);
    cr_assert(r >= 0, "%s", ms_errmsg());
    return r == MS_STAGE_REDUCE;
}

static void run_case(const char *method, enum ms_dtype dt, bool f32, uint32_t nm, bool rescale,
                     uint64_t n, bool specials, uint64_t seed)
{
    static const double weights[] = { 1.0, 0.5, -0.3, 0.7, 1.3, 0.1 };
    static const double densities[] = { 0.9, 0.5, 0.3, 0.25, 0.1, 1.0, 0.77 };
    static const double gammas[] = { 0.01, 0.1, 0.2, 0.05 };
    uint64_t rs = seed * 0x9E3779B97F4A7C15ULL + 1;
    struct th_gta g = { .method = method, .dt = dt, .numel = n, .ninputs = nm + 1,
                        .rescale = rescale, .seed = seed };
    g.base = (int)(th_gta_rand(&rs) % g.ninputs);
    g.normalize = th_gta_rand(&rs) & 1;
    g.lambda = th_gta_rand(&rs) % 3 == 0 ? 0.7 : 1.0;
    for (uint32_t i = 0; i < g.ninputs; i++) {
        g.weight[i] = weights[th_gta_rand(&rs) % MS_ARRAY_LEN(weights)];
        g.density[i] = densities[th_gta_rand(&rs) % MS_ARRAY_LEN(densities)];
        if ((uint64_t)(g.density[i] * (double)n) == 0)
            g.density[i] = 1.0;
        g.gamma[i] = gammas[th_gta_rand(&rs) % MS_ARRAY_LEN(gammas)];
    }
    fill(&g, dt, specials, &rs);
    void (*enc)(const float *, uint16_t *, size_t) =
        dt == MS_DT_BF16 ? ms_f32_to_bf16_ref : ms_f32_to_f16_ref;
    void (*dec)(const uint16_t *, float *, size_t) =
        dt == MS_DT_BF16 ? ms_bf16_to_f32_ref : ms_f16_to_f32_ref;
    const void *hp[IN];
    for (uint32_t i = 0; i < g.ninputs; i++) {
        enc(fin[i], hin[i], n);
        dec(hin[i], fin[i], n); /* the float path's inputs: the stored bytes decoded */
        hp[i] = hin[i];
    }
    struct ms_stage_job job;
    int64_t shape[2];
    th_gta_job(&g, &job, shape);
    if (f32)
        job.compute = MS_DT_F32;
    cr_assert_eq(ms_stage_run_mem(&job, g.in, fout, 0), 0, "%s", ms_errmsg());
    enc(fout, want, n);

    const bool multi = multi_pass(&job);
    /* one-pass jobs: apply_stored in the compute dtype only, and no
     * selection (breadcrumbs keeping nothing): declined */
    const bool may_decline = !multi && (f32 || !strncmp(method, "breadcrumbs", 11));
    const uint64_t small[] = { 1, 7, 0 }, mid[] = { 7, 257, 0 }, big[] = { 257, 1000, 0 };
    const uint64_t *chunks = n <= 100 ? small : n <= 300 ? mid : big;
    for (int z = 0; z < 3; z++) {
        bool keep = (z + seed) & 1;
        memset(got, 0x5a, sizeof got);
        int rc = ms_stage_run_stored_keep(&job, dt, hp, got, chunks[z], keep);
        char what[256];
        snprintf(what, sizeof what,
                 "%s dt %d f32 %d nm %u base %d rescale %d normalize %d lambda %g n %llu "
                 "specials %d seed %llu chunk %llu keep %d",
                 method, dt, f32, nm, g.base, rescale, g.normalize, g.lambda,
                 (unsigned long long)n, specials, (unsigned long long)seed,
                 (unsigned long long)chunks[z], keep);
        if (rc == MS_EUNSUPPORTED && may_decline)
            continue;
        cr_assert_eq(rc, 0, "%s: rc %d (multi %d)", what, rc, multi);
        for (uint64_t e = 0; e < n; e++)
            cr_assert_eq(got[e], want[e], "%s: element %llu is %04x, want %04x", what,
                         (unsigned long long)e, got[e], want[e]);
    }
}

static void run_method(const char *method, uint64_t seed0)
{
    static const enum ms_dtype dts[2] = { MS_DT_BF16, MS_DT_F16 };
    static const uint32_t nms[4] = { 1, 2, 3, 5 };
    static const uint64_t sizes[3] = { 100, 300, NMAX };
    uint64_t seed = seed0;
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 4; k++)
            for (int r = 0; r < 2; r++)
                for (int s = 0; s < 3; s++, seed++)
                    run_case(method, dts[d], seed % 3 == 0, nms[k], r, sizes[s], seed % 2 == 0,
                             seed);
}

Test(stage_gta_stored, ties) { run_method("ties", 100); }
Test(stage_gta_stored, dare_ties) { run_method("dare_ties", 200); }
Test(stage_gta_stored, dare_linear) { run_method("dare_linear", 300); }
Test(stage_gta_stored, breadcrumbs_ties) { run_method("breadcrumbs_ties", 400); }
Test(stage_gta_stored, breadcrumbs) { run_method("breadcrumbs", 500); }
Test(stage_gta_stored, task_arithmetic) { run_method("task_arithmetic", 600); }

/* Members whose passes are all taken: a ties job with a selection commits
 * (stored_passes), and della's keep bits stay on the float path. */
Test(stage_gta_stored, ties_commits_and_della_declines)
{
    static const int64_t shape[2] = { 4, 16 };
    uint16_t x[64], b[64], o[64];
    for (int i = 0; i < 64; i++) {
        b[i] = 0x3f80; /* 1.0 */
        x[i] = (uint16_t)(0x3f80 + i);
    }
    const void *in[2] = { b, x };
    struct th_gta g = { .method = "ties", .dt = MS_DT_BF16, .numel = 64, .ninputs = 2,
                        .base = 0, .normalize = true, .lambda = 1.0 };
    g.weight[1] = 1.0;
    g.density[1] = 0.25; /* the 16 largest deltas: x = 1 + (48..63) * 2^-7 */
    g.density[0] = 1.0;
    struct ms_stage_job job;
    int64_t sh[2];
    th_gta_job(&g, &job, sh);
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, in, o, 5), 0);
    for (int i = 0; i < 64; i++) /* normalize: divided by the weight 1; base + kept delta */
        cr_assert_eq(o[i], i >= 48 ? x[i] : b[i], "element %d: %04x", i, o[i]);
    g.method = "della";
    g.epsilon[1] = 0.1;
    g.rescale = true;
    g.row_len = 16;
    th_gta_job(&g, &job, sh);
    job.shape = shape;
    cr_assert_eq(ms_stage_run_stored(&job, MS_DT_BF16, in, o, 0), MS_EUNSUPPORTED);
}
