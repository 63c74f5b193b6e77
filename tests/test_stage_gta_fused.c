/*
 * test_stage_gta_fused.c - the fused bfloat16 apply of stages/gta.c (jobs of
 * 1 to 3 models besides the base, every member but della) against the plain
 * reference in tests/th_gta.c, bit for bit: tensors of several whole blocks
 * (256 elements) and a tail, many equal magnitudes so that the selections'
 * cut falls inside a block, every variant of the loop (random or range masks,
 * consensus, normalize/lambda, rescale), and chunk sizes that put the cut at a
 * block's start, inside one, or in a later chunk.
 */
#include <criterion/criterion.h>
#include <stdio.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "th_gta.h"

enum { N = 3 * 256 + 77 };

static float in[4][N], want[N], got[N];

/* Base values on a coarse grid; deltas drawn from five magnitudes (and 0) with
 * random signs, so the kept sets end inside runs of equal magnitudes. */
static void fill(uint64_t *rs)
{
    for (int e = 0; e < N; e++) {
        in[0][e] = th_gta_rnd(MS_DT_BF16, (float)(e % 11) * 0.5f - 2.0f);
        for (int m = 1; m < 4; m++) {
            uint64_t r = th_gta_rand(rs) % 7;
            float v = r == 0 ? 0.0f : (float)r * 0x1p-5f;
            in[m][e] = th_gta_rnd(MS_DT_BF16, in[0][e] + ((th_gta_rand(rs) & 1) ? -v : v));
        }
    }
}

static void check(const struct th_gta *g, const char *what)
{
    cr_assert_eq(th_gta_ref(g, want), 0, "%s", what);
    const uint64_t chunks[] = { N, 256, 300, 97 };
    for (size_t ci = 0; ci < MS_ARRAY_LEN(chunks); ci++) {
        cr_assert_eq(th_gta_run(g, chunks[ci], got), 0, "%s", ms_errmsg());
        long i = th_gta_first_diff(got, want, N);
        cr_assert_eq(i, -1, "%s chunk %llu: element %ld is %a, want %a", what,
                     (unsigned long long)chunks[ci], i, i >= 0 ? got[i] : 0.0f,
                     i >= 0 ? want[i] : 0.0f);
    }
}

Test(stage_gta_fused, every_variant_bf16)
{
    static const char *const methods[] = { "ties", "breadcrumbs_ties", "breadcrumbs",
                                            "dare_ties", "dare_linear", "task_arithmetic" };
    uint64_t rs = 2027;
    fill(&rs);
    for (size_t mi = 0; mi < MS_ARRAY_LEN(methods); mi++)
        for (uint32_t nm = 1; nm <= 3; nm++)
            for (int v = 0; v < 8; v++) { /* normalize, rescale, lambda */
                struct th_gta g = { .method = methods[mi], .dt = MS_DT_BF16, .numel = N,
                                    .ninputs = nm + 1, .base = 0, .normalize = v & 1,
                                    .rescale = (v >> 1) & 1, .lambda = v & 4 ? 0.7 : 1.0,
                                    .seed = 5 };
                for (uint32_t i = 0; i <= nm; i++) {
                    g.in[i] = in[i];
                    g.weight[i] = i == 2 ? -0.3 : 0.6;
                    g.density[i] = i == 3 ? 1.0 : 0.35 + 0.2 * i; /* model 3 untrimmed */
                    g.gamma[i] = 0.05;
                }
                char what[120];
                snprintf(what, sizeof what, "%s nm %u normalize %d rescale %d lambda %g",
                         methods[mi], nm, g.normalize, g.rescale, g.lambda);
                check(&g, what);
            }
}

/* The base in another place than first, and a model whose mask keeps nothing
 * (breadcrumbs with int(gamma * n) == 0) next to trimmed ones. */
Test(stage_gta_fused, base_last_and_empty_mask)
{
    uint64_t rs = 99;
    fill(&rs);
    struct th_gta g = { .method = "breadcrumbs_ties", .dt = MS_DT_BF16, .numel = N,
                        .ninputs = 4, .base = 3, .in = { in[1], in[2], in[3], in[0] },
                        .weight = { 0.5, 0.25, 1.0, 0 }, .density = { 0.5, 0.4, 0.3, 1 },
                        .gamma = { 0.02, 0.0, 0.1, 0 }, .normalize = true, .lambda = 1.0 };
    check(&g, "breadcrumbs_ties base last, gamma 0");
}
