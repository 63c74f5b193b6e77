/*
 * test_stage_dare.c - dare_linear and dare_ties (stages/gta.c, random
 * sparsifier, mergekit-spec.md 2.6, 2.7) against the plain reference in
 * tests/th_gta.c, bit for bit in BF16, F16 and F32, for several chunkings and
 * chunk orders; plus the statistics of the mask, its independence of the
 * chunking, p = bf16(density), and the L1 (not 1/density) rescale.
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

Test(stage_dare, linear_random_bf16) { th_gta_random_cases("dare_linear", MS_DT_BF16, 1000, 40); }
Test(stage_dare, linear_random_f16) { th_gta_random_cases("dare_linear", MS_DT_F16, 2000, 40); }
Test(stage_dare, linear_random_f32) { th_gta_random_cases("dare_linear", MS_DT_F32, 3000, 40); }
Test(stage_dare, ties_random_bf16) { th_gta_random_cases("dare_ties", MS_DT_BF16, 4000, 40); }
Test(stage_dare, ties_random_f16) { th_gta_random_cases("dare_ties", MS_DT_F16, 5000, 40); }
Test(stage_dare, ties_random_f32) { th_gta_random_cases("dare_ties", MS_DT_F32, 6000, 40); }

/* One model over a zero base with delta 1 everywhere, weight 1, no rescale:
 * the output is the mask itself. */
static void mask_case(struct th_gta *g, float *base, float *ones, uint64_t n, enum ms_dtype dt,
                      double density, uint64_t seed)
{
    memset(g, 0, sizeof(*g));
    g->method = "dare_linear";
    g->dt = dt;
    g->numel = n;
    g->ninputs = 2;
    g->base = 0;
    g->in[0] = base;
    g->in[1] = ones;
    g->weight[0] = 0;
    g->weight[1] = 1;
    g->density[0] = 1;
    g->density[1] = density;
    g->lambda = 1;
    g->seed = seed;
}

/* The kept fraction of a large tensor lies within 5 sigma of p, and every
 * element follows u < p exactly (u from ms_rng_u32 of its flat index). */
Test(stage_dare, kept_fraction_and_exact_rule)
{
    const uint64_t n = 1u << 20;
    float *base = calloc(n, sizeof(float)), *ones = malloc(n * sizeof(float));
    float *out = malloc(n * sizeof(float));
    for (uint64_t e = 0; e < n; e++)
        ones[e] = 1.0f;
    const double dens[3] = { 0.3, 0.9, 0.05 };
    for (int d = 0; d < 3; d++) {
        for (int di = 0; di < 3; di++) {
            struct th_gta g;
            mask_case(&g, base, ones, n, dts[d], dens[di], 12345 + (uint64_t)di);
            cr_assert_eq(th_gta_run(&g, 65536, out), 0, "%s", ms_errmsg());
            float p = dts[d] == MS_DT_BF16 ? ms_round_bf16_1((float)dens[di]) : (float)dens[di];
            uint64_t kept = 0;
            for (uint64_t e = 0; e < n; e++) {
                uint32_t r = ms_rng_u32(g.seed, ms_hash_str("t"), 1, e);
                bool k = (float)(r & 0xFFFFFF) * 0x1p-24f < p;
                cr_assert_eq(out[e], k ? 1.0f : 0.0f, "element %llu", (unsigned long long)e);
                kept += k;
            }
            double mean = (double)n * p, sd = sqrt((double)n * p * (1 - p));
            cr_assert(fabs((double)kept - mean) < 5 * sd,
                      "%s density %g: kept %llu, expected %g +- %g",
                      ms_dtype_name(dts[d]), dens[di], (unsigned long long)kept, mean, 5 * sd);
        }
    }
    free(base);
    free(ones);
    free(out);
}

/* bf16 merges draw against p = bf16(0.3) = 0.30078125: elements with u in
 * [0.3, 0.30078125) are kept in BF16 and dropped in F32. */
Test(stage_dare, bf16_probability_is_rounded)
{
    const uint64_t n = 1u << 16;
    float *base = calloc(n, sizeof(float)), *ones = malloc(n * sizeof(float));
    float *ob = malloc(n * sizeof(float)), *of = malloc(n * sizeof(float));
    for (uint64_t e = 0; e < n; e++)
        ones[e] = 1.0f;
    struct th_gta g;
    mask_case(&g, base, ones, n, MS_DT_BF16, 0.3, 99);
    cr_assert_eq(th_gta_run(&g, 1000, ob), 0);
    mask_case(&g, base, ones, n, MS_DT_F32, 0.3, 99);
    cr_assert_eq(th_gta_run(&g, 1000, of), 0);
    uint64_t between = 0;
    for (uint64_t e = 0; e < n; e++) {
        float u = (float)(ms_rng_u32(99, ms_hash_str("t"), 1, e) & 0xFFFFFF) * 0x1p-24f;
        if (u >= 0.3f && u < 0.30078125f) {
            between++;
            cr_assert_eq(ob[e], 1.0f);
            cr_assert_eq(of[e], 0.0f);
        } else {
            cr_assert_eq(ob[e], of[e]);
        }
    }
    cr_assert(between > 10, "only %llu elements in the window", (unsigned long long)between);
    free(base);
    free(ones);
    free(ob);
    free(of);
}

/* The mask is the same for any chunking and chunk order, in the reduce
 * (rescale) pass and in apply: outputs with rescale on are identical. */
Test(stage_dare, mask_independent_of_chunking)
{
    const uint64_t n = 5000;
    float *x[3], *out = malloc(n * sizeof(float)), *ref = malloc(n * sizeof(float));
    uint64_t rs = 4242;
    for (int i = 0; i < 3; i++) {
        x[i] = malloc(n * sizeof(float));
        for (uint64_t e = 0; e < n; e++)
            x[i][e] = ms_round_bf16_1((float)((int)(th_gta_rand(&rs) % 200) - 100) / 64.0f);
    }
    for (int d = 0; d < 3; d++) {
        struct th_gta g = { .method = "dare_ties", .dt = dts[d], .numel = n, .ninputs = 3,
                            .base = 1, .in = { x[0], x[1], x[2] }, .weight = { 0.7, 0, 0.4 },
                            .density = { 0.3, 1, 0.6 }, .normalize = true, .rescale = true,
                            .lambda = 1, .seed = 7 };
        cr_assert_eq(th_gta_ref(&g, ref), 0);
        const uint64_t chunks[] = { 1, 7, 64, 4999, n };
        for (size_t c = 0; c < sizeof(chunks) / sizeof(chunks[0]); c++) {
            cr_assert_eq(th_gta_run(&g, chunks[c], out), 0);
            cr_assert_eq(th_gta_first_diff(out, ref, n), -1, "chunk %llu",
                         (unsigned long long)chunks[c]);
            struct ms_stage_job job;
            int64_t shape[2];
            th_gta_job(&g, &job, shape);
            for (uint64_t order = 0; order < 3; order++) {
                cr_assert_eq(th_stage_run_shuffled(&job, g.in, out, chunks[c], order * 77 + 1), 0);
                cr_assert_eq(th_gta_first_diff(out, ref, n), -1, "shuffled chunk %llu",
                             (unsigned long long)chunks[c]);
            }
        }
    }
    for (int i = 0; i < 3; i++)
        free(x[i]);
    free(out);
    free(ref);
}

/* The rescale matches L1 norms: with every delta 1, the kept elements become
 * rnd(n / kept), not 1/density. */
Test(stage_dare, rescale_is_l1_not_inverse_density)
{
    const uint64_t n = 1000;
    static float base[1000], ones[1000], out[1000];
    for (uint64_t e = 0; e < n; e++)
        ones[e] = 1.0f;
    struct th_gta g;
    mask_case(&g, base, ones, n, MS_DT_F32, 0.5, 31);
    g.rescale = true;
    cr_assert_eq(th_gta_run(&g, 100, out), 0);
    uint64_t kept = 0;
    for (uint64_t e = 0; e < n; e++)
        kept += out[e] != 0.0f;
    float f = (float)n / (float)kept;
    cr_assert(kept != n / 2, "kept exactly n/2 (%llu): the test cannot tell",
              (unsigned long long)kept);
    for (uint64_t e = 0; e < n; e++)
        cr_assert(out[e] == 0.0f || out[e] == f, "element %llu: %a, want 0 or %a",
                  (unsigned long long)e, out[e], f);
}

/*
 * A dropped Inf (no NaN anywhere): mergekit's masked delta has Inf * 0 = NaN
 * there, so after = sum |masked| is NaN, the factor before / after is NaN and
 * every element of the model's rescaled delta is NaN (the < 1e-7 guards are
 * false for NaN); the merge is base + NaN, NaN everywhere (by hand). A kept
 * Inf instead gives before = after = Inf, factor NaN too. Both models of
 * dare_linear, every dtype, chunks that split and do not split the tensor.
 */
Test(stage_dare, rescale_with_a_dropped_inf_is_nan)
{
    enum { N = 300 };
    static float base[N], x[N], out[N];
    for (int d = 0; d < 3; d++) {
        for (int kept = 0; kept < 2; kept++) {
            struct th_gta g;
            mask_case(&g, base, x, N, dts[d], 0.5, 7);
            g.rescale = true;
            /* the element the mask drops (kept = 0) or keeps (1), by the rule of
             * NUMERICS.md: kept iff (u & 0xffffff) * 2^-24 < p, p = 0.5 */
            uint64_t e0 = 0;
            while (((float)(ms_rng_u32(7, ms_hash_str("t"), 1, e0) & 0xffffffu) * 0x1p-24f <
                    0.5f) != (kept != 0))
                e0++;
            cr_assert_lt(e0, N);
            for (int e = 0; e < N; e++) {
                base[e] = 0.0f;
                x[e] = e == (int)e0 ? INFINITY : 1.0f;
            }
            for (uint64_t c = 1; c <= N; c += 149) {
                cr_assert_eq(th_gta_run(&g, c, out), 0, "%s", ms_errmsg());
                for (int e = 0; e < N; e++)
                    cr_assert(isnan(out[e]), "%s kept %d chunk %llu: element %d is %a",
                              ms_dtype_name(dts[d]), kept, (unsigned long long)c, e, out[e]);
            }
        }
    }
}

/* Density >= 1 leaves a model untouched: with all densities 1, dare_linear is
 * task_arithmetic bit for bit. Another seed changes a trimmed merge. */
Test(stage_dare, density_one_is_task_arithmetic_and_seed_matters)
{
    static float a[MAXN], b[MAXN];
    for (int d = 0; d < 3; d++) {
        for (int s = 0; s < 10; s++) {
            uint64_t rs = 900 + (uint64_t)s;
            struct th_gta g = { .method = "dare_linear", .dt = dts[d] };
            th_gta_random(&g, store, 200, &rs);
            for (uint32_t i = 0; i < g.ninputs; i++)
                g.density[i] = 1.0;
            cr_assert_eq(th_gta_run(&g, 7, a), 0);
            g.method = "task_arithmetic";
            cr_assert_eq(th_gta_run(&g, 7, b), 0);
            cr_assert_eq(th_gta_first_diff(a, b, g.numel), -1);
        }
    }
    static float base[MAXN], ones[MAXN];
    for (int e = 0; e < MAXN; e++)
        ones[e] = 1.0f;
    struct th_gta g;
    mask_case(&g, base, ones, MAXN, MS_DT_BF16, 0.5, 1);
    cr_assert_eq(th_gta_run(&g, 7, a), 0);
    g.seed = 2;
    cr_assert_eq(th_gta_run(&g, 7, b), 0);
    cr_assert_neq(th_gta_first_diff(a, b, MAXN), -1, "the seed does not change the mask");
}

Test(stage_dare, registered)
{
    cr_assert_not_null(ms_method_find("dare_linear")->ops);
    cr_assert_not_null(ms_method_find("dare_ties")->ops);
}
