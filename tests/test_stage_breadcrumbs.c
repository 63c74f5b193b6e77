/*
 * test_stage_breadcrumbs.c - breadcrumbs and breadcrumbs_ties (stages/gta.c,
 * magnitude_outliers, mergekit-spec.md 2.6, 2.7) against the plain reference
 * in tests/th_gta.c, bit for bit in BF16, F16 and F32, for several chunkings
 * and chunk orders; the two-sided selection against a stable sort; and the
 * n_top == 0 rule (the delta becomes zero, as mergekit's [n_bot:-0] slice).
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

Test(stage_breadcrumbs, random_bf16) { th_gta_random_cases("breadcrumbs", MS_DT_BF16, 1000, 40); }
Test(stage_breadcrumbs, random_f16) { th_gta_random_cases("breadcrumbs", MS_DT_F16, 2000, 40); }
Test(stage_breadcrumbs, random_f32) { th_gta_random_cases("breadcrumbs", MS_DT_F32, 3000, 40); }
Test(stage_breadcrumbs, ties_random_bf16)
{
    th_gta_random_cases("breadcrumbs_ties", MS_DT_BF16, 4000, 40);
}
Test(stage_breadcrumbs, ties_random_f16) { th_gta_random_cases("breadcrumbs_ties", MS_DT_F16, 5000, 40); }
Test(stage_breadcrumbs, ties_random_f32) { th_gta_random_cases("breadcrumbs_ties", MS_DT_F32, 6000, 40); }

/* Stable ascending order of |d| (NaN last), written here again on purpose. */
static const float *sort_d;
static int by_mag_stable(const void *pa, const void *pb)
{
    uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
    float x = fabsf(sort_d[a]), y = fabsf(sort_d[b]);
    if (isnan(x) || isnan(y)) {
        if (isnan(x) && isnan(y))
            return a < b ? -1 : 1;
        return isnan(x) ? 1 : -1;
    }
    if (x != y)
        return x < y ? -1 : 1;
    return a < b ? -1 : a > b;
}

/*
 * The kept set is exactly the positions [n_bot, n - n_top) of a stable
 * ascending sort of |delta|, on data full of ties (a coarse grid), for many
 * densities and gammas, with the base 0, weight 1 and no rescale, so that the
 * output is delta where kept and 0 elsewhere.
 */
Test(stage_breadcrumbs, two_sided_selection_is_a_stable_sort)
{
    const uint64_t n = 3000;
    float *base = calloc(n, sizeof(float)), *x = malloc(n * sizeof(float));
    float *out = malloc(n * sizeof(float));
    uint64_t *idx = malloc(n * sizeof(uint64_t));
    char *kept = malloc(n);
    uint64_t rs = 17;
    for (uint64_t e = 0; e < n; e++) {
        int v = (int)(th_gta_rand(&rs) % 21) - 10; /* 21 values: every magnitude repeats */
        x[e] = (float)v / 8.0f;
    }
    x[5] = NAN; /* a NaN delta sorts last (the largest) */
    const double dens[] = { 0.5, 0.9, 0.1, 0.99 };
    const double gams[] = { 0.01, 0.1, 0.3, 0.002 };
    for (int d = 0; d < 3; d++) {
        for (size_t di = 0; di < 4; di++) {
            for (size_t gi = 0; gi < 4; gi++) {
                struct th_gta g = { .method = "breadcrumbs", .dt = dts[d], .numel = n,
                                    .ninputs = 2, .base = 0, .in = { base, x },
                                    .weight = { 0, 1 }, .density = { 1, dens[di] },
                                    .gamma = { 0, gams[gi] }, .lambda = 1 };
                long long target = (long long)(dens[di] * n), n_top = (long long)(gams[gi] * n);
                long long n_bot = (long long)n - target - n_top;
                if (n_bot < 0) {
                    n_top += n_bot;
                    n_bot = 0;
                }
                for (uint64_t e = 0; e < n; e++)
                    idx[e] = e;
                sort_d = x;
                qsort(idx, n, sizeof(uint64_t), by_mag_stable);
                memset(kept, 0, n);
                for (long long p = n_bot; p < (long long)n - n_top; p++)
                    kept[idx[p]] = 1;
                const uint64_t chunks[] = { 97, 1000, n };
                for (int c = 0; c < 3; c++) {
                    cr_assert_eq(th_gta_run(&g, chunks[c], out), 0, "%s", ms_errmsg());
                    for (uint64_t e = 0; e < n; e++) {
                        /* A dropped NaN stays NaN (NaN * 0, as torch); a dropped number
                         * gives +0: the model sum starts at +0. */
                        float want = kept[e] || isnan(x[e]) ? x[e] : 0.0f;
                        cr_assert(!memcmp(&out[e], &want, 4) || (isnan(want) && isnan(out[e])),
                                  "%s density %g gamma %g chunk %llu: element %llu is %g, want %g",
                                  ms_dtype_name(dts[d]), dens[di], gams[gi],
                                  (unsigned long long)chunks[c], (unsigned long long)e, out[e],
                                  want);
                    }
                }
            }
        }
    }
    free(base);
    free(x);
    free(out);
    free(idx);
    free(kept);
}

/*
 * n_top == 0 (int(gamma*n) == 0 after the clamp): mergekit's slice [n_bot:-0]
 * keeps nothing, so the model's delta is zero. gamma 0, and a 50-element
 * tensor with the default gamma 0.01: the output is the base. With a second
 * model the zeroed one still counts in the linear divisor (weights sum).
 */
Test(stage_breadcrumbs, zero_n_top_zeroes_the_delta)
{
    static float base[50], x[50], y[50], out[50], want[50];
    for (int e = 0; e < 50; e++) {
        base[e] = (float)(e % 7) / 4.0f;
        x[e] = base[e] + (float)((e % 5) - 2) / 16.0f;
        y[e] = base[e] - (float)((e % 3) - 1) / 8.0f;
    }
    const double gams[2] = { 0.0, 0.01 };
    for (int d = 0; d < 3; d++) {
        for (int gi = 0; gi < 2; gi++) {
            struct th_gta g = { .method = "breadcrumbs", .dt = dts[d], .numel = 50, .ninputs = 2,
                                .base = 0, .in = { base, x }, .weight = { 0, 1 },
                                .density = { 1, 0.5 }, .gamma = { 0, gams[gi] },
                                .normalize = true, .rescale = true, .lambda = 1 };
            cr_assert_eq(th_gta_run(&g, 7, out), 0, "%s", ms_errmsg());
            for (int e = 0; e < 50; e++)
                cr_assert_eq(out[e], base[e], "gamma %g element %d: %g, want the base %g",
                             gams[gi], e, out[e], base[e]);
            /* A second, untrimmed model: out = base + (0*1 + dy*1)/(1+1). */
            g.ninputs = 3;
            g.in[2] = y;
            g.weight[2] = 1;
            g.density[2] = 1;
            g.gamma[2] = 0;
            cr_assert_eq(th_gta_ref(&g, want), 0);
            th_gta_expect(&g, want, "n_top == 0 with a second model");
            for (int e = 0; e < 50; e++) {
                float dy = y[e] - base[e];
                float w = base[e] + dy / 2.0f; /* exact: dyadic data */
                cr_assert_eq(out[e] = want[e], w, "element %d", e);
            }
            g.method = "breadcrumbs_ties";
            cr_assert_eq(th_gta_ref(&g, want), 0);
            th_gta_expect(&g, want, "n_top == 0, ties");
        }
    }
}

/* gamma large enough that n_bot < 0: n_top shrinks to n - target and the
 * bottom keeps everything (density 0.9, gamma 0.5: keep the smallest 90%). */
Test(stage_breadcrumbs, clamp_when_n_bot_negative)
{
    static float base[100], x[100], out[100];
    for (int e = 0; e < 100; e++)
        x[e] = (float)(e + 1) / 128.0f; /* |delta| ascending with the index */
    struct th_gta g = { .method = "breadcrumbs", .dt = MS_DT_F32, .numel = 100, .ninputs = 2,
                        .base = 0, .in = { base, x }, .weight = { 0, 1 }, .density = { 1, 0.9 },
                        .gamma = { 0, 0.5 }, .lambda = 1 };
    cr_assert_eq(th_gta_run(&g, 7, out), 0);
    for (int e = 0; e < 100; e++)
        cr_assert_eq(out[e], e < 90 ? x[e] : 0.0f, "element %d", e);
}

Test(stage_breadcrumbs, registered)
{
    cr_assert_not_null(ms_method_find("breadcrumbs")->ops);
    cr_assert_not_null(ms_method_find("breadcrumbs_ties")->ops);
}
