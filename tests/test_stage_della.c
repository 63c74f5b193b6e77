/*
 * test_stage_della.c - della and della_linear (stages/gta.c, della_magprune,
 * mergekit-spec.md 2.6, 2.7) against the plain reference in tests/th_gta.c,
 * bit for bit in BF16, F16 and F32, on 1-D and 2-D tensors, for several
 * chunkings (whole rows) and chunk orders; ranks rounded to bf16; the rule
 * for one-element rows; the kept fraction; validation errors. With rescale,
 * the masks of the rescale pass wait in the keep area for apply: with a keep
 * area, without one, and with the keep area in the output buffer (the
 * engine's resident jobs) the bytes are the same; the keep rule at its
 * boundary u * 2^-24 == p.
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

Test(stage_della, random_bf16) { th_gta_random_cases("della", MS_DT_BF16, 1000, 40); }
Test(stage_della, random_f16) { th_gta_random_cases("della", MS_DT_F16, 2000, 40); }
Test(stage_della, random_f32) { th_gta_random_cases("della", MS_DT_F32, 3000, 40); }
Test(stage_della, linear_random_bf16) { th_gta_random_cases("della_linear", MS_DT_BF16, 4000, 40); }
Test(stage_della, linear_random_f16) { th_gta_random_cases("della_linear", MS_DT_F16, 5000, 40); }
Test(stage_della, linear_random_f32) { th_gta_random_cases("della_linear", MS_DT_F32, 6000, 40); }

/* Two models over rows of 600 (bf16 ranks take about 342 distinct values):
 * the stage matches the reference that rounds ranks to bf16 and differs from
 * one that does not, so the rounding is really exercised. */
Test(stage_della, ranks_are_rounded_to_bf16)
{
    const uint64_t L = 600, n = 4 * 600;
    float *x[3], *got = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float));
    float *exact = malloc(n * sizeof(float));
    uint64_t rs = 600;
    for (int i = 0; i < 3; i++) {
        x[i] = malloc(n * sizeof(float));
        for (uint64_t e = 0; e < n; e++)
            x[i][e] = ms_round_bf16_1((float)((int64_t)th_gta_rand(&rs) >> 40) * 0x1p-24f);
    }
    for (int resc = 0; resc < 2; resc++) {
        struct th_gta g = { .method = "della", .dt = MS_DT_BF16, .numel = n, .row_len = L,
                            .ninputs = 3, .base = 0, .in = { x[0], x[1], x[2] },
                            .weight = { 0, 1, 0.5 }, .density = { 1, 0.5, 0.4 },
                            .epsilon = { 0, 0.45, 0.35 }, .normalize = true, .rescale = resc,
                            .lambda = 1, .seed = 3 };
        cr_assert_eq(th_gta_ref(&g, want), 0);
        g.exact_ranks = true;
        cr_assert_eq(th_gta_ref(&g, exact), 0);
        g.exact_ranks = false;
        cr_assert_neq(th_gta_first_diff(want, exact, n), -1, "bf16 ranks change nothing here");
        const uint64_t chunks[] = { 1, L, 2 * L + 5, n };
        for (int c = 0; c < 4; c++) {
            cr_assert_eq(th_gta_run(&g, chunks[c], got), 0, "%s", ms_errmsg());
            long d = th_gta_first_diff(got, want, n);
            cr_assert_eq(d, -1, "chunk %llu: element %ld is %a, want %a",
                         (unsigned long long)chunks[c], d, d >= 0 ? got[d] : 0,
                         d >= 0 ? want[d] : 0);
        }
    }
    for (int i = 0; i < 3; i++)
        free(x[i]);
    free(got);
    free(want);
    free(exact);
}

/*
 * Runs job through its ops as the engine runs a resident job: the keep area of
 * chunk i is chunk i's own output buffer (ms_stage.h), and apply writes there.
 * Chunks of `chunk` elements (whole rows), reduced and applied in chunk order.
 */
static int run_keep_in_out(const struct ms_stage_job *job, const float *const *in, float *out,
                           uint64_t chunk)
{
    const struct ms_stage_ops *ops = job->method->ops;
    const uint64_t n = job->numel, row = job->row_len ? job->row_len : 1;
    chunk = (chunk / row ? chunk / row : 1) * row;
    size_t ssize = ops->state_size(job), psize = ops->partial_size(job);
    void *state = ms_aligned_alloc(ssize + 64), *part = ms_aligned_alloc(psize + 64);
    cr_assert(state && part);
    memset(state, 0, ssize + 64);
    memset(out, 0xff, n * sizeof(float)); /* the keep area's "undefined" content */
    int rc = ops->begin(state, job);
    for (uint32_t pass = 0; rc == MS_STAGE_REDUCE; pass++) {
        for (uint64_t first = 0; first < n; first += chunk) {
            struct ms_chunk c = { .first = first, .count = MS_MIN(chunk, n - first),
                                  .index = (uint32_t)(first / chunk), .pass = pass,
                                  .keep = out + first };
            for (uint32_t i = 0; i < job->ninputs; i++)
                c.in[i] = in[i] + first;
            memset(part, 0x5a, psize);
            ops->reduce(state, job, &c, part);
            ops->fold(state, job, &c, part);
        }
        rc = ops->end_pass(state, job);
    }
    for (uint64_t first = 0; rc == MS_STAGE_APPLY && first < n; first += chunk) {
        struct ms_chunk c = { .first = first, .count = MS_MIN(chunk, n - first),
                              .index = (uint32_t)(first / chunk), .out = out + first,
                              .keep = out + first };
        for (uint32_t i = 0; i < job->ninputs; i++)
            c.in[i] = in[i] + first;
        ops->apply(state, job, &c);
    }
    ms_aligned_free(state);
    ms_aligned_free(part);
    return rc;
}

/* g through ms_stage_run_mem (a keep area of its own), without a keep area and
 * with the keep area in the output (run_keep_in_out), chunks of `chunk`
 * elements: each must give want. */
static void expect_every_keep(const struct th_gta *g, uint64_t chunk, const float *want,
                              const char *what)
{
    float *got = malloc(g->numel * sizeof(float));
    struct ms_stage_job job;
    int64_t shape[2];
    th_gta_job(g, &job, shape);
    cr_assert(job.method->ops->keeps(&job) == (g->rescale != 0), "%s: keeps", what);
    for (int how = 0; how < 3; how++) {
        int rc = how == 0   ? ms_stage_run_mem(&job, g->in, got, chunk)
                 : how == 1 ? ms_stage_run_mem_keep(&job, g->in, got, chunk, false)
                            : run_keep_in_out(&job, g->in, got, chunk);
        cr_assert_eq(rc, 0, "%s: %s", what, ms_errmsg());
        long d = th_gta_first_diff(got, want, g->numel);
        cr_assert_eq(d, -1, "%s, chunk %llu, %s: element %ld is %a, want %a", what,
                     (unsigned long long)chunk,
                     how == 0 ? "keep area" : how == 1 ? "no keep area" : "keep area in out", d,
                     d >= 0 ? got[d] : 0, d >= 0 ? want[d] : 0);
    }
    free(got);
}

/* Rows of 512 elements and more in bf16/f16 are ranked by counting keys
 * (stages/gta.c), shorter ones and float32 by the heap sort: long rows with
 * many ties, zeros, both signs, Inf and NaN match the reference sort in every
 * chunking, with and without the rescale pass. With finite (1 or 2), the
 * deltas are finite, so that the rescale's sum of |d| (taken from the key
 * counts in the counted ranking) is finite: spread over some 140 binades
 * (subnormals, zeros, values near 8), or with 2 all below 2^-14 (subnormal in
 * f16, where they make the sum). */
static void della_rows(enum ms_dtype dt, uint64_t L, int finite)
{
    const uint64_t n = 3 * L;
    float *x[3], *got = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float));
    uint64_t rs = L + dt + 1000 * (uint64_t)finite;
    for (int i = 0; i < 3; i++) {
        x[i] = malloc(n * sizeof(float));
        for (uint64_t e = 0; e < n; e++) {
            float v = (float)((int64_t)th_gta_rand(&rs) >> 52) * 0x1p-8f; /* few values: ties */
            if (finite && i > 0)
                v = ldexpf((float)((int64_t)th_gta_rand(&rs) >> 56),
                           finite == 2 ? -21 - (int)(th_gta_rand(&rs) % 4)
                                       : -(int)(th_gta_rand(&rs) % 140));
            if (!finite && i > 0 && e % 97 == 5)
                v = e % 2 ? INFINITY : -INFINITY;
            if (!finite && i > 0 && e % 131 == 7)
                v = NAN;
            if (i > 0 && e % 13 == 0)
                v = x[0][e]; /* zero delta */
            x[i][e] = dt == MS_DT_BF16 ? ms_round_bf16_1(v) : ms_rnd(dt, v);
        }
        if (finite && i == 0)
            memset(x[0], 0, n * sizeof(float)); /* the deltas are the models' values */
    }
    for (int resc = 0; resc < 2; resc++) {
        struct th_gta g = { .method = resc ? "della" : "della_linear", .dt = dt, .numel = n,
                            .row_len = L, .ninputs = 3, .base = 0, .in = { x[0], x[1], x[2] },
                            .weight = { 0, 0.7, 0.5 }, .density = { 1, 0.5, 0.3 },
                            .epsilon = { 0, 0.2, 0.1 }, .normalize = true, .rescale = resc,
                            .lambda = 1, .seed = 11 };
        cr_assert_eq(th_gta_ref(&g, want), 0);
        const uint64_t chunks[] = { L, 2 * L + 1, n };
        char what[64];
        snprintf(what, sizeof what, "%s L %llu", g.method, (unsigned long long)L);
        for (int c = 0; c < 3; c++)
            expect_every_keep(&g, chunks[c], want, what);
    }
    for (int i = 0; i < 3; i++)
        free(x[i]);
    free(got);
    free(want);
}

static void della_long_rows(enum ms_dtype dt, uint64_t L)
{
    for (int finite = 0; finite < 3; finite++)
        della_rows(dt, L, finite);
}

/* Short rows (the heap sort) in every dtype, with the keep area, without it
 * and with it in the output. */
Test(stage_della, keep_area_short_rows)
{
    for (int k = 0; k < 3; k++)
        della_long_rows(dts[k], 100);
}

Test(stage_della, counted_ranks_bf16) { della_long_rows(MS_DT_BF16, 512); della_long_rows(MS_DT_BF16, 2051); }
Test(stage_della, counted_ranks_f16)
{
    della_long_rows(MS_DT_F16, 777);
    della_long_rows(MS_DT_F16, 5000);
}
Test(stage_della, long_rows_f32) { della_long_rows(MS_DT_F32, 600); }

/* bf16 rows at the counted ranking's threshold table limit (16,384 elements:
 * the row's keys wait in a per-thread buffer) and one longer (ranked from
 * the key counts alone): both match the reference sort. */
Test(stage_della, counted_ranks_longest_rows)
{
    della_rows(MS_DT_BF16, 16384, 0);
    della_rows(MS_DT_BF16, 16385, 0);
    della_rows(MS_DT_BF16, 16385, 1);
}

/* nm trimmed models (nm + 1 inputs, the base last): up to 8 keep their bits in
 * one keep byte per element, more in a keep word (stages/gta.c, della_packs);
 * every keep way and chunking matches the reference, rows of L (100: the heap
 * sort; 600 in bf16: counted ranks). */
static void della_many_models(enum ms_dtype dt, uint32_t nm, uint64_t L)
{
    const uint64_t n = 3 * L;
    float *x[MS_MAX_INPUTS], *want = malloc(n * sizeof(float));
    uint64_t rs = 77 + nm + L;
    struct th_gta g = { .method = "della", .dt = dt, .numel = n, .row_len = L,
                        .ninputs = nm + 1, .base = (int)nm, .normalize = true, .rescale = true,
                        .lambda = 1, .seed = 5 };
    for (uint32_t i = 0; i <= nm; i++) {
        x[i] = malloc(n * sizeof(float));
        for (uint64_t e = 0; e < n; e++) {
            float v = (float)((int64_t)th_gta_rand(&rs) >> 54) * 0x1p-6f;
            x[i][e] = dt == MS_DT_BF16 ? ms_round_bf16_1(v) : ms_rnd(dt, v);
        }
        g.in[i] = x[i];
        g.weight[i] = 0.25 + 0.125 * (i % 5);
        g.density[i] = 0.3 + 0.05 * (i % 7);
        g.epsilon[i] = 0.1;
    }
    cr_assert_eq(th_gta_ref(&g, want), 0);
    const uint64_t chunks[] = { L, 2 * L, n };
    char what[64];
    snprintf(what, sizeof what, "%u models, L %llu", nm, (unsigned long long)L);
    for (int c = 0; c < 3; c++)
        expect_every_keep(&g, chunks[c], want, what);
    for (uint32_t i = 0; i <= nm; i++)
        free(x[i]);
    free(want);
}

Test(stage_della, keep_bytes_and_words)
{
    const uint32_t nms[] = { 1, 8, 9, 14 };
    for (int k = 0; k < 4; k++) {
        della_many_models(MS_DT_BF16, nms[k], 100);
        della_many_models(MS_DT_BF16, nms[k], 600);
        della_many_models(MS_DT_F32, nms[k], 100);
    }
}

/* A one-element row has rank norm 0/0 in mergekit. Our rule: p = density, so
 * della on an [n, 1] tensor is dare_ties (della_linear is dare_linear). */
Test(stage_della, one_element_rows_are_dare)
{
    static float a[MAXN], b[MAXN];
    for (int d = 0; d < 3; d++) {
        for (int s = 0; s < 12; s++) {
            uint64_t rs = 300 + (uint64_t)s;
            const char *m = s & 1 ? "della" : "della_linear";
            struct th_gta g = { .method = m, .dt = dts[d] };
            th_gta_random(&g, store, 200, &rs);
            g.row_len = 1;
            if (g.numel == 1)
                g.row_len = 0; /* 1-D of one element: also one row */
            cr_assert_eq(th_gta_ref(&g, b), 0);
            th_gta_expect(&g, b, "one-element rows");
            g.method = s & 1 ? "dare_ties" : "dare_linear";
            cr_assert_eq(th_gta_run(&g, 7, a), 0, "%s", ms_errmsg());
            cr_assert_eq(th_gta_first_diff(a, b, g.numel), -1, "%s on [n, 1] differs from %s", m,
                         g.method);
        }
    }
}

/* The kept fraction over a large tensor is within 5 sigma of sum(p) over the
 * ranks (F32: p is (density - eps) + 2 eps (rank-1)/(L-1) up to rounding). */
Test(stage_della, kept_fraction)
{
    const uint64_t L = 1000, n = 1000 * 500;
    float *base = calloc(n, sizeof(float)), *x = malloc(n * sizeof(float));
    float *out = malloc(n * sizeof(float));
    uint64_t rs = 5;
    for (uint64_t e = 0; e < n; e++)
        x[e] = (float)(1 + th_gta_rand(&rs) % 1000000) * 0x1p-20f;
    struct th_gta g = { .method = "della_linear", .dt = MS_DT_F32, .numel = n, .row_len = L,
                        .ninputs = 2, .base = 0, .in = { base, x }, .weight = { 0, 1 },
                        .density = { 1, 0.4 }, .epsilon = { 0, 0.3 }, .lambda = 1, .seed = 11 };
    cr_assert_eq(th_gta_run(&g, 64 * L, out), 0, "%s", ms_errmsg());
    double mean = 0, var = 0;
    for (uint64_t r = 0; r < L; r++) {
        double p = 0.1 + 0.6 * (double)r / (double)(L - 1);
        mean += p;
        var += p * (1 - p);
    }
    mean *= (double)(n / L);
    var *= (double)(n / L);
    uint64_t kept = 0, kept_small = 0, kept_large = 0;
    for (uint64_t e = 0; e < n; e++) {
        kept += out[e] != 0.0f;
        cr_assert(out[e] == 0.0f || out[e] == x[e]);
    }
    /* Larger magnitudes are kept more often: compare the extremes of a row. */
    for (uint64_t r0 = 0; r0 < n; r0 += L) {
        float lo = INFINITY, hi = 0;
        uint64_t il = 0, ih = 0;
        for (uint64_t i = 0; i < L; i++) {
            if (x[r0 + i] < lo)
                lo = x[r0 + i], il = i;
            if (x[r0 + i] > hi)
                hi = x[r0 + i], ih = i;
        }
        kept_small += out[r0 + il] != 0.0f;
        kept_large += out[r0 + ih] != 0.0f;
    }
    cr_assert(fabs((double)kept - mean) < 5 * sqrt(var), "kept %llu, expected %g +- %g",
              (unsigned long long)kept, mean, 5 * sqrt(var));
    cr_assert(kept_small < 100 && kept_large > 300, "smallest kept %llu/500, largest %llu/500",
              (unsigned long long)kept_small, (unsigned long long)kept_large);
    free(base);
    free(x);
    free(out);
}

/* density +- epsilon must lie strictly inside (0, 1) (mergekit: ValueError),
 * reported by begin with the tensor's name. */
Test(stage_della, epsilon_out_of_range_is_an_error)
{
    static float z[100], out[100];
    const double cases[][2] = { { 0.1, 0.15 }, { 0.9, 0.1 }, { 0.5, 0.5 } };
    for (int i = 0; i < 3; i++) {
        struct th_gta g = { .method = "della", .dt = MS_DT_BF16, .numel = 100, .ninputs = 2,
                            .base = 0, .in = { z, z }, .weight = { 1, 1 },
                            .density = { 1, cases[i][0] }, .epsilon = { 0, cases[i][1] },
                            .lambda = 1 };
        cr_assert_eq(th_gta_ref(&g, out), -2);
        cr_assert(th_gta_run(&g, 10, out) < 0);
        cr_assert(strstr(ms_errmsg(), "tensor 't': della density") &&
                      strstr(ms_errmsg(), "strictly inside (0, 1)"),
                  "message: %s", ms_errmsg());
    }
    /* density >= 1 is returned unchanged without the check, as mergekit. */
    struct th_gta g = { .method = "della", .dt = MS_DT_BF16, .numel = 100, .ninputs = 2,
                        .base = 0, .in = { z, z }, .weight = { 1, 1 }, .density = { 1, 1 },
                        .epsilon = { 0, 0.5 }, .lambda = 1 };
    cr_assert_eq(th_gta_run(&g, 10, out), 0, "%s", ms_errmsg());
}

/* Refused: 3-D tensors (mergekit ranks along dim 1) and rows too long for the
 * apply scratch with many trimmed models. */
Test(stage_della, unsupported_shapes)
{
    static float z[4096], out[4096];
    struct th_gta g = { .method = "della", .dt = MS_DT_F32, .numel = 24, .ninputs = 2, .base = 0,
                        .in = { z, z }, .weight = { 1, 1 }, .density = { 1, 0.5 },
                        .epsilon = { 0, 0.1 }, .lambda = 1 };
    struct ms_stage_job job;
    int64_t shape[3] = { 2, 3, 4 };
    th_gta_job(&g, &job, shape);
    job.ndim = 3;
    job.shape = shape;
    job.row_len = 4;
    cr_assert_eq(ms_stage_run_mem(&job, g.in, out, 0), MS_EUNSUPPORTED);
    cr_assert(strstr(ms_errmsg(), "3-D"), "message: %s", ms_errmsg());

    /* 2^18-element rows need 18 index bits: 15 trimmed models do not fit. */
    const uint64_t n = 1u << 18;
    float *big = calloc(n, sizeof(float)), *bo = malloc(n * sizeof(float));
    struct th_gta h = { .method = "della_linear", .dt = MS_DT_F32, .numel = n, .ninputs = 16,
                        .base = 0, .lambda = 1 };
    for (int i = 0; i < 16; i++) {
        h.in[i] = big;
        h.weight[i] = 1;
        h.density[i] = 0.5;
        h.epsilon[i] = 0.1;
    }
    cr_assert_eq(th_gta_run(&h, 0, bo), MS_EUNSUPPORTED);
    cr_assert(strstr(ms_errmsg(), "ranking scratch"), "message: %s", ms_errmsg());
    h.ninputs = 8; /* 18 + 7 bits fit */
    cr_assert_eq(th_gta_run(&h, 0, bo), 0, "%s", ms_errmsg());
    free(big);
    free(bo);
}

Test(stage_della, registered)
{
    cr_assert_not_null(ms_method_find("della")->ops);
    cr_assert_not_null(ms_method_find("della_linear")->ops);
    cr_assert(ms_method_find("della")->ops->flags & MS_STAGE_ROWWISE);
}

/*
 * The keep rule at its boundary: element e of model i is kept iff u24 * 2^-24
 * < p, u24 = ms_rng_u32(seed, key, i, e) & 0xffffff. With epsilon 0 every rank
 * has p = density in the work dtype: bf16 0.5 (p * 2^24 = 2^23, an integer)
 * and, for f16 (work dtype float32), float32(0.2) = 13421773 * 2^-26 (p * 2^24
 * = 3355443.25). Seeds are searched until a row of 512 (the counted ranking)
 * holds an element with u24 on each side of p * 2^24 at distance below 1:
 * u24 = 2^23 - 1 kept and 2^23 dropped; 3355443 kept and 3355444 dropped.
 * della_linear, weight 1, no normalize: the output is the delta (rescaled
 * with rescale) or zero, with the masks of apply and those of the rescale pass.
 */
static void della_boundary(enum ms_dtype dt, double density, uint32_t keep_u, uint32_t drop_u)
{
    enum { L = 512 };
    static float base[L], x[L], got[L];
    for (int e = 0; e < L; e++)
        x[e] = ms_f32_from_bits((0x3c00u + (uint32_t)e) << 16); /* bf16 and f16 values */
    if (dt == MS_DT_F16)
        for (int e = 0; e < L; e++)
            x[e] = ms_rnd(MS_DT_F16, x[e]);
    const uint32_t want_u[2] = { keep_u, drop_u };
    for (int side = 0; side < 2; side++) {
        uint64_t seed = 0;
        int hit = -1;
        for (; hit < 0 && seed < (1u << 20); seed++) {
            uint32_t u[L];
            ms_rng_fill(ms_rng_stream(seed, ms_hash_str("t"), 1), 0, u, L);
            for (int e = 0; e < L && hit < 0; e++)
                if ((u[e] & 0xffffffu) == want_u[side])
                    hit = e;
        }
        seed--;
        cr_assert(hit >= 0, "no seed puts u24 = %u in a row", want_u[side]);
        for (int resc = 0; resc < 2; resc++) {
            struct th_gta g = { .method = "della_linear", .dt = dt, .numel = L, .row_len = L,
                                .ninputs = 2, .base = 0, .in = { base, x },
                                .weight = { 0, 1 }, .density = { 1, density },
                                .epsilon = { 0, 0 }, .rescale = resc, .lambda = 1,
                                .seed = seed };
            cr_assert_eq(th_gta_run(&g, 0, got), 0, "%s", ms_errmsg());
            bool kept = got[hit] != 0.0f;
            cr_assert_eq(kept, side == 0, "%s seed %llu element %d u24 %u: %s",
                         ms_dtype_name(dt), (unsigned long long)seed, hit, want_u[side],
                         kept ? "kept" : "dropped");
            for (int e = 0; e < L; e++) {
                uint32_t u = ms_rng_u32(seed, ms_hash_str("t"), 1, (uint64_t)e) & 0xffffffu;
                bool k = (double)u < (double)(float)density * 16777216.0;
                cr_assert_eq(got[e] != 0.0f, k, "%s seed %llu element %d u24 %u",
                             ms_dtype_name(dt), (unsigned long long)seed, e, u);
            }
        }
    }
}

Test(stage_della, keep_rule_boundary)
{
    della_boundary(MS_DT_BF16, 0.5, (1u << 23) - 1, 1u << 23);
    della_boundary(MS_DT_F16, 0.2, 3355443u, 3355444u);
}

/*
 * A dropped Inf makes the rescale NaN (mergekit's rescaled_masked_tensor:
 * masked = delta * mask holds Inf * 0 = NaN, so after = sum |masked| is NaN,
 * `after < eps` is false and the result is masked * (before / after) = NaN
 * everywhere). By hand, for della_linear, one model, weight 1, base 0, no
 * normalize, epsilon 0 (every rank has p = 0.5, exact in bf16 and float32:
 * element e is kept iff u24(e) < 2^23), a row of finite values and one +-Inf
 * at element h:
 *   h dropped: before = Inf, after = NaN, factor = rnd(Inf / NaN) = NaN;
 *   h kept:    before = Inf, after = Inf, factor = rnd(Inf / Inf) = NaN;
 * so every output is rnd(0 + rnd(1 * rnd(masked * NaN))) = NaN either way.
 * Without rescale the masked delta is the output: the kept values, +0 for a
 * dropped finite value (the base is +0) and NaN for the dropped Inf. Rows of
 * 512 bf16 (counted ranking), 100 bf16 and 64 float32 (heap sort), with the
 * keep area, without one and with it in the output, every chunking.
 */
static void della_inf_row(enum ms_dtype dt, uint64_t L, bool drop, float inf)
{
    const uint64_t h = 3;
    float *base = calloc(L, sizeof(float)), *x = malloc(L * sizeof(float));
    float *got = malloc(L * sizeof(float));
    for (uint64_t e = 0; e < L; e++)
        x[e] = (float)(e % 7 + 1) * 0.25f; /* exact in bf16 */
    x[h] = inf;
    uint64_t seed = 0;
    for (;; seed++) { /* element h dropped (or kept) by the seed's stream */
        uint32_t u = ms_rng_u32(seed, ms_hash_str("t"), 1, h) & 0xffffffu;
        if ((u >= (1u << 23)) == drop)
            break;
    }
    for (int resc = 0; resc < 2; resc++) {
        struct th_gta g = { .method = "della_linear",
                            .dt = dt,
                            .numel = L,
                            .row_len = L,
                            .ninputs = 2,
                            .base = 0,
                            .in = { base, x },
                            .weight = { 0, 1 },
                            .density = { 1, 0.5 },
                            .epsilon = { 0, 0 },
                            .rescale = resc,
                            .lambda = 1,
                            .seed = seed };
        struct ms_stage_job job;
        int64_t shape[2];
        th_gta_job(&g, &job, shape);
        const uint64_t chunks[] = { L, 0 };
        for (int c = 0; c < 2; c++) {
            for (int how = 0; how < 3; how++) {
                int rc = how == 0   ? ms_stage_run_mem(&job, g.in, got, chunks[c])
                         : how == 1 ? ms_stage_run_mem_keep(&job, g.in, got, chunks[c], false)
                                    : run_keep_in_out(&job, g.in, got, chunks[c] ? chunks[c] : L);
                cr_assert_eq(rc, 0, "%s", ms_errmsg());
                for (uint64_t e = 0; e < L; e++) {
                    uint32_t u = ms_rng_u32(seed, ms_hash_str("t"), 1, e) & 0xffffffu;
                    bool kept = u < (1u << 23);
                    float want = resc ? NAN : !kept ? (e == h ? NAN : 0.0f) : x[e];
                    bool ok = isnan(want) ? isnan(got[e])
                                          : got[e] == want && signbit(got[e]) == signbit(want);
                    cr_assert(ok,
                              "%s L %llu %s %s, rescale %d, how %d: element %llu "
                              "(%s) is %a, want %a",
                              ms_dtype_name(dt), (unsigned long long)L, inf > 0 ? "+Inf" : "-Inf",
                              drop ? "dropped" : "kept", resc, how, (unsigned long long)e,
                              kept ? "kept" : "dropped", got[e], want);
                }
            }
        }
    }
    free(base);
    free(x);
    free(got);
}

Test(stage_della, dropped_inf_makes_the_rescale_nan)
{
    const struct {
        enum ms_dtype dt;
        uint64_t L;
    } rows[] = {
        { MS_DT_BF16, 512 },
        { MS_DT_BF16, 100 },
        { MS_DT_F32, 64 },
        { MS_DT_F16, 600 },
    };
    for (int r = 0; r < 4; r++)
        for (int drop = 0; drop < 2; drop++) {
            della_inf_row(rows[r].dt, rows[r].L, drop, INFINITY);
            della_inf_row(rows[r].dt, rows[r].L, drop, -INFINITY);
        }
}
