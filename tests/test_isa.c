/*
 * test_isa.c - every version of every dispatched kernel (ms_isa.h) gives the
 * bytes of the scalar reference: bf16/f16 decode and encode against the
 * element-by-element references of base/dtype.c (*_ref), the RNG fill against
 * ms_rng_u32 element by element, the exact-sum kernels (stages/xacc.c) against
 * ms_xacc_add term by term; on odd lengths, misaligned starts, NaN (quiet
 * and signalling, with payloads), infinities, subnormals and rounding ties.
 * End to end: every example recipe merged with MERGESTREAM_ISA=scalar and with
 * each other available version gives identical files, and a value the CPU or
 * the build cannot run is refused with a one-line error.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms_dtype.h"
#include "ms_isa.h"
#include "ms_stage.h"
#include "th.h"

#ifndef MS_SOURCE_DIR
#define MS_SOURCE_DIR "."
#endif

enum { N = 4096 + 61 };

static uint32_t g_lcg = 1;
static uint32_t next_u32(void)
{
    g_lcg = g_lcg * 1664525u + 1013904223u;
    return g_lcg ^ (g_lcg >> 16);
}

/* float bit patterns: the specials and the ties first, then random bits of every kind */
static void fill_f32(uint32_t *u, size_t n)
{
    static const uint32_t special[] = {
        0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, /* zeros, infinities */
        0x7fc00000u, 0xffc00001u, 0x7f800001u, 0xff812345u, /* quiet and signalling NaNs */
        0x7fbfffffu, 0x7fff8000u, 0x00000001u, 0x807fffffu, /* NaN payloads, f32 subnormals */
        0x3f808000u, 0x3f818000u, 0x3f80c000u, 0x3f807fffu, /* bf16 ties (to even: down, up) */
        0x7f7f8000u, 0x7f7fffffu, 0xff7f8000u,              /* bf16 ties to infinity */
        0x3f801000u, 0x3f803000u, 0x3f802fffu, 0x3f801001u, /* f16 ties and near ties */
        0x477fe000u, 0x477ff000u, 0x477fefffu, 0xc77ff000u, /* f16 overflow boundary 65520 */
        0x38800000u, 0x387fe000u, 0x33800000u, 0x33000000u, /* f16 normal/subnormal edges */
        0x33000001u, 0x33c00000u, 0x34200000u, 0x80800000u, /* f16 subnormal ties */
    };
    size_t ns = sizeof special / sizeof special[0];
    for (size_t i = 0; i < n; i++) {
        if (i < ns) {
            u[i] = special[i];
            continue;
        }
        uint32_t r = next_u32();
        switch (i % 4) {
        case 0: u[i] = r; break; /* any bits */
        case 1: u[i] = (r & 0x8000ffffu) | (uint32_t)(0x30 + (r >> 24) % 32) << 23; break;
        case 2: u[i] = (r & 0xffff0000u) | 0x8000u; break; /* bf16 ties */
        default: u[i] = (r & 0x80000000u) | (0x38000000u + (r & 0x0fffe000u) / 2) | 0x1000u;
        }
    }
}

static const char *ref_name = "ref";

Test(isa, dtype_kernels_give_the_reference_bytes)
{
    static uint32_t bits[N + 4];
    static uint16_t h[N + 4], want16[N + 4], got16[N + 4];
    static float wantf[N + 4], gotf[N + 4];
    fill_f32(bits, N + 4);
    for (size_t i = 0; i < N + 4; i++)
        h[i] = (uint16_t)next_u32();
    static const size_t lens[] = { 0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 1000, N };
    int versions = 0;
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        const struct ms_dtype_kernels *k = ms_dtype_kernels((enum ms_isa)isa);
        if (!k) {
            cr_log_info("%s: not available here", ms_isa_name((enum ms_isa)isa));
            continue;
        }
        versions++;
        for (size_t a = 0; a < 4; a++) /* misaligned starts */
            for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
                size_t n = lens[l];
                const float *f = (const float *)(const void *)(bits + a);
                ms_f32_to_bf16_ref(f, want16, n);
                k->f32_to_bf16(f, got16 + a, n);
                cr_assert(!memcmp(want16, got16 + a, n * 2), "%s f32_to_bf16 n=%zu start %zu",
                          ms_isa_name((enum ms_isa)isa), n, a);
                ms_f32_to_f16_ref(f, want16, n);
                k->f32_to_f16(f, got16 + a, n);
                cr_assert(!memcmp(want16, got16 + a, n * 2), "%s f32_to_f16 n=%zu start %zu",
                          ms_isa_name((enum ms_isa)isa), n, a);
                ms_bf16_to_f32_ref(h + a, wantf, n);
                k->bf16_to_f32(h + a, gotf + a, n);
                cr_assert(!memcmp(wantf, gotf + a, n * 4), "%s bf16_to_f32 n=%zu start %zu",
                          ms_isa_name((enum ms_isa)isa), n, a);
                ms_f16_to_f32_ref(h + a, wantf, n);
                k->f16_to_f32(h + a, gotf + a, n);
                cr_assert(!memcmp(wantf, gotf + a, n * 4), "%s f16_to_f32 n=%zu start %zu",
                          ms_isa_name((enum ms_isa)isa), n, a);
            }
        /* every 16-bit pattern decoded, and encoded back */
        static uint16_t all[65536], back[65536], backref[65536];
        static float df[65536], dref[65536];
        for (uint32_t i = 0; i < 65536; i++)
            all[i] = (uint16_t)i;
        k->f16_to_f32(all, df, 65536);
        ms_f16_to_f32_ref(all, dref, 65536);
        cr_assert(!memcmp(df, dref, sizeof df), "%s f16 patterns", ms_isa_name((enum ms_isa)isa));
        k->f32_to_f16(df, back, 65536);
        ms_f32_to_f16_ref(dref, backref, 65536);
        cr_assert(!memcmp(back, backref, sizeof back), "%s f16 round trip",
                  ms_isa_name((enum ms_isa)isa));
    }
    cr_assert(versions >= 1);
    cr_log_info("%d versions against %s", versions, ref_name);
}

Test(isa, f32_encoders_match_the_reference_on_a_sweep_of_all_floats)
{
    /* every 4099th 32-bit pattern (a prime stride: every exponent, many mantissas) */
    enum { M = 1 << 16 };
    static uint32_t u[M];
    static uint16_t want[M], got[M];
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        const struct ms_dtype_kernels *k = ms_dtype_kernels((enum ms_isa)isa);
        if (!k)
            continue;
        uint64_t p = 0;
        while (p < (UINT64_C(1) << 32)) {
            size_t n = 0;
            for (; n < M && p < (UINT64_C(1) << 32); n++, p += 4099)
                u[n] = (uint32_t)p;
            const float *f = (const float *)(const void *)u;
            ms_f32_to_bf16_ref(f, want, n);
            k->f32_to_bf16(f, got, n);
            cr_assert(!memcmp(want, got, n * 2), "%s bf16 sweep", ms_isa_name((enum ms_isa)isa));
            ms_f32_to_f16_ref(f, want, n);
            k->f32_to_f16(f, got, n);
            cr_assert(!memcmp(want, got, n * 2), "%s f16 sweep", ms_isa_name((enum ms_isa)isa));
        }
    }
}

Test(isa, rng_fill_gives_ms_rng_u32_in_every_version)
{
    static uint32_t got[N + 3];
    static const size_t lens[] = { 0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 1000, N };
    static const uint64_t firsts[] = { 0, 1, 7, UINT64_C(1) << 33, UINT64_MAX - 5000 };
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        const struct ms_stage_kernels *k = ms_stage_kernels((enum ms_isa)isa);
        if (!k)
            continue;
        for (size_t f = 0; f < sizeof firsts / sizeof firsts[0]; f++)
            for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
                uint64_t seed = 42 + f, key = 0x1234567890abcdefu;
                uint32_t model = (uint32_t)l;
                size_t a = l % 3; /* misaligned output */
                k->rng_fill(ms_rng_stream(seed, key, model), firsts[f], got + a, lens[l]);
                for (size_t i = 0; i < lens[l]; i++)
                    cr_assert_eq(got[a + i], ms_rng_u32(seed, key, model, firsts[f] + i),
                                 "%s first %llu n=%zu i=%zu", ms_isa_name((enum ms_isa)isa),
                                 (unsigned long long)firsts[f], lens[l], i);
            }
    }
}

/* The exact-sum kernels: every version's limbs against ms_xacc_add of each term
 * (tests/test_xacc.c goes through exponents, limb spans and lane capacity). */
Test(isa, xacc_kernels_give_the_limbs_of_ms_xacc_add)
{
    static uint32_t bx[N + 4], by[N + 4];
    fill_f32(bx, N + 4);
    fill_f32(by, N + 4);
    for (size_t i = 0; i < N + 4; i += 3) /* shift y against x: specials meet ordinary values */
        by[i] = bx[(i * 7) % (N + 4)];
    static const size_t lens[] = { 0, 1, 3, 7, 8, 9, 15, 16, 17, 33, 1000, 1023, 1025, N };
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        const struct ms_xacc_kernels *k = ms_xacc_kernels((enum ms_isa)isa);
        if (!k)
            continue;
        for (int pass = 0; pass < 2; pass++) {
            if (pass == 1) /* finite only: the blocks take the vector path when they can */
                for (size_t i = 0; i < N + 4; i++) {
                    if ((bx[i] & 0x7f800000u) == 0x7f800000u)
                        bx[i] &= 0xbfffffffu;
                    if ((by[i] & 0x7f800000u) == 0x7f800000u)
                        by[i] &= 0xbfffffffu;
                }
            for (size_t a = 0; a < 4; a++)
                for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
                    size_t n = lens[l];
                    const float *x = (const float *)(const void *)(bx + a),
                                *y = (const float *)(const void *)(by + a);
                    struct ms_xacc want[4], got[4];
                    for (int f = 0; f < 4; f++) {
                        ms_xacc_init(&want[f]);
                        ms_xacc_init(&got[f]);
                    }
                    for (size_t i = 0; i < n; i++) {
                        ms_xacc_add(&want[0], (double)x[i] * (double)y[i]);
                        ms_xacc_add(&want[1], (double)x[i] * (double)x[i]);
                        ms_xacc_add(&want[2], (double)x[i]);
                        ms_xacc_add(&want[3], fabs((double)x[i]));
                    }
                    k->dot(&got[0], x, y, n);
                    k->sumsq(&got[1], x, n);
                    k->sum(&got[2], x, n);
                    k->sumabs(&got[3], x, n);
                    for (int f = 0; f < 4; f++)
                        cr_assert(!memcmp(got[f].limb, want[f].limb, sizeof(want[f].limb)) &&
                                      got[f].nonfinite == want[f].nonfinite,
                                  "%s kernel %d n=%zu start %zu pass %d",
                                  ms_isa_name((enum ms_isa)isa), f, n, a, pass);
                }
        }
    }
}

/* ------------------------------------------------------------ end to end */

static char *g_dir;

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    char cmd[8192], *err = NULL;
    snprintf(cmd, sizeof cmd,
             "cd '%s' && mkdir b && ln -s '%s/ms-mkmodel' b/ms-mkmodel && "
             "sh '%s/tools/demo-models.sh' b >/dev/null",
             g_dir, MS_BUILD_DIR, MS_SOURCE_DIR);
    int rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 0, "demo models: %s", err);
    free(err);
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

Test(isa, every_example_merges_to_the_same_bytes_in_every_version, .init = setup, .fini = teardown,
     .timeout = 600)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/recipes/examples", MS_SOURCE_DIR);
    int nisa = 0;
    for (int isa = 1; isa < MS_ISA_COUNT; isa++)
        nisa += ms_isa_available((enum ms_isa)isa);
    if (!nisa)
        cr_skip_test("only the scalar version runs on this CPU or build");
    DIR *d = opendir(path);
    cr_assert(d, "%s", path);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 4, ".yml"))
            continue;
        for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
            if (!ms_isa_available((enum ms_isa)isa))
                continue;
            /* float16 output too: the f16 encoders run */
            char cmd[8192], *err = NULL;
            snprintf(cmd, sizeof cmd,
                     "cd '%s/b' && rm -rf v%d && mkdir v%d && cd v%d && ln -s ../demo demo && "
                     "MERGESTREAM_ISA=%s mergestream merge '%s/%s' o -q -j2 && "
                     "sed 's/^dtype:.*//' '%s/%s' > r16.yml && echo 'dtype: float16' >> r16.yml && "
                     "MERGESTREAM_ISA=%s mergestream merge r16.yml o16 -q && "
                     "{ test %d = 0 || { diff -r ../v0/o o && diff -r ../v0/o16 o16; }; } >&2",
                     g_dir, isa, isa, isa, ms_isa_name((enum ms_isa)isa), path, de->d_name, path,
                     de->d_name, ms_isa_name((enum ms_isa)isa), isa);
            int rc = th_run(cmd, NULL, &err);
            cr_assert_eq(rc, 0, "%s with %s: exit %d\n%s", de->d_name,
                         ms_isa_name((enum ms_isa)isa), rc, err);
            free(err);
        }
        n++;
    }
    closedir(d);
    cr_assert_gt(n, 10);
}

Test(isa, a_version_that_cannot_run_is_refused)
{
    char *out = NULL, *err = NULL;
    int rc = th_run("MERGESTREAM_ISA=sse9 mergestream plan /nonexistent.yml", &out, &err);
    cr_assert_neq(rc, 0);
    cr_assert(strstr(err, "MERGESTREAM_ISA: 'sse9' is not one of scalar, avx2, avx512"), "%s", err);
    free(out);
    free(err);
}
