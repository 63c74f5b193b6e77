/*
 * test_isa.c - every version of every dispatched kernel (ms_isa.h) gives the
 * bytes of the scalar reference: bf16/f16 decode and encode against the
 * element-by-element references of base/dtype.c (*_ref), the RNG fill against
 * ms_rng_u32 element by element, the exact-sum kernels (stages/xacc.c) against
 * ms_xacc_add term by term; on odd lengths, misaligned starts, NaN (quiet
 * and signalling, with payloads), infinities, subnormals and rounding ties.
 * The element loops of linear, nuslerp, model_stock, multislerp and nearswap
 * (MS__ISA_VERSIONS in stages/stage_impl.h): each version, run in a child
 * process, gives the scalar version's bytes in every mode and compute dtype.
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
#include <sys/wait.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_isa.h"
#include "ms_stage.h"
#include "th.h"
#include "th_gta.h"
#include "th_stage.h"

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

/* ------------------------------------------------------ inline f16 rounding */

/* ms_round_f16_1 (the stages' ms_rnd for float16) in loops of a constant count,
 * which the compiler vectorises, compiled for the baseline and for each ISA
 * version's target: every one must give ms_f16_to_f32_1(ms_f32_to_f16_1(x)). */
#define RND16_BLOCK 64
#define RND16_BODY                                                                                \
    {                                                                                             \
        size_t i = 0;                                                                             \
        for (; i + RND16_BLOCK <= n; i += RND16_BLOCK)                                            \
            for (size_t k = 0; k < RND16_BLOCK; k++)                                              \
                y[i + k] = ms_round_f16_1(x[i + k]);                                              \
        for (; i < n; i++)                                                                        \
            y[i] = ms_round_f16_1(x[i]);                                                          \
    }
static void rnd16_scalar(float *restrict y, const float *restrict x, size_t n) RND16_BODY
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void rnd16_avx2(float *restrict y, const float *restrict x,
                                                       size_t n) RND16_BODY
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"))) static void
rnd16_avx512(float *restrict y, const float *restrict x, size_t n) RND16_BODY
#endif

Test(isa, inline_f16_rounding_gives_the_conversion_round_trip_in_every_version)
{
    void (*fns[MS_ISA_COUNT])(float *restrict, const float *restrict, size_t) = {
        rnd16_scalar,
#if defined(__x86_64__) && defined(__GNUC__)
        rnd16_avx2, rnd16_avx512,
#endif
    };
    enum { M = 1 << 16 };
    static uint32_t u[M];
    static float got[M];
    /* the specials and ties of fill_f32, then every 257th pattern and the
     * neighbourhood of every f16 boundary exponent */
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        if (!fns[isa] || !ms_isa_available((enum ms_isa)isa))
            continue;
        for (int pass = 0; pass < 2; pass++) {
            uint64_t p = 0;
            while (p < (UINT64_C(1) << 32)) {
                size_t n = 0;
                if (pass == 0) {
                    fill_f32(u, M);
                    n = M;
                    p = UINT64_C(1) << 32;
                } else {
                    for (; n < M && p < (UINT64_C(1) << 32); n++, p += 257)
                        u[n] = (uint32_t)p;
                }
                const float *x = (const float *)(const void *)u;
                fns[isa](got, x, n);
                for (size_t i = 0; i < n; i++) {
                    float w = ms_f16_to_f32_1(ms_f32_to_f16_1(x[i]));
                    cr_assert(!memcmp(&w, &got[i], 4), "%s: x=%08x gives %08x, want %08x",
                              ms_isa_name((enum ms_isa)isa), u[i], ms_f32_bits(got[i]),
                              ms_f32_bits(w));
                }
            }
        }
        /* every exponent, its mantissas around the 13 dropped bits' half point */
        for (uint32_t s = 0; s < 2; s++) {
            size_t n = 0;
            for (uint32_t e = 0; e < 256; e++)
                for (uint32_t m = 0; m < 64 && n < M; m++)
                    u[n++] = s << 31 | e << 23 | ((m * 0x9e3779b1u) & 0x7fe000u) | (0xfffu + m % 3);
            const float *x = (const float *)(const void *)u;
            fns[isa](got, x, n);
            for (size_t i = 0; i < n; i++) {
                float w = ms_f16_to_f32_1(ms_f32_to_f16_1(x[i]));
                cr_assert(!memcmp(&w, &got[i], 4), "%s: x=%08x", ms_isa_name((enum ms_isa)isa),
                          u[i]);
            }
        }
    }
}

/* ------------------------------------------------------------ stage methods */

/* A stage job: method, inputs, base, and up to two parameters (per-model ones
 * get v for input 0 and v + 0.25 * i for input i); mixed: inputs of bf16, f16,
 * bf16, ... with compute float32; special: NaN, infinities and subnormals among
 * the values (elementwise methods only: a NaN in a whole-tensor sum makes every
 * output NaN). */
struct isa_case {
    const char *method;
    uint32_t ninputs;
    int base;
    const char *p1, *p2;
    double v1, v2;
    bool mixed, special;
};

static const struct isa_case isa_cases[] = {
    { "linear", 3, -1, "weight", "normalize", 0.3, 1, false, true },
    { "linear", 4, -1, "weight", "normalize", -0.7, 0, false, true },
    { "nuslerp", 2, -1, "weight", NULL, 0.5, 0, false, false },
    { "nuslerp", 3, 1, "weight", NULL, 0.4, 0, false, false },
    { "nuslerp", 3, 0, "weight", "nuslerp_flatten", 0.4, 0, false, false },
    { "nuslerp", 2, -1, "nuslerp_flatten", "nuslerp_row_wise", 0, 1, false, false },
    { "nuslerp", 3, 2, "weight", "nuslerp_flatten", 0.4, 0, true, false },
    { "model_stock", 3, 0, NULL, NULL, 0, 0, false, false },
    { "model_stock", 4, 2, "filter_wise", NULL, 1, 0, false, false },
    { "model_stock", 4, 1, "filter_wise", NULL, 0, 0, true, false },
    { "model_stock", 3, 0, "filter_wise", NULL, 1, 0, true, false },
    { "multislerp", 3, -1, "weight", NULL, 0.2, 0, false, false },
    { "multislerp", 4, 0, "weight", "normalize_weights", 0.6, 0, false, false },
    { "slerp", 2, 0, "t", NULL, 0.3, 0, false, false },
    { "slerp", 2, 1, "t", NULL, 0.7, 0, false, true }, /* NaN coefficients: the NaN rule */
    { "nearswap", 2, 0, "t", NULL, 0.02, 0, false, true },
    { "nearswap", 2, 1, "t", NULL, 0.5, 0, false, false },
};
#define ISA_NCASES (sizeof isa_cases / sizeof isa_cases[0])

static const int64_t isa_shape[2] = { 23, 300 }; /* rows end mid-block */
static const uint64_t isa_chunks[] = { 0, 2100, 1 };
#define ISA_NUMEL (23 * 300)

/* The input values of case k, input i: exact in dt. */
static void isa_case_inputs(size_t k, uint32_t i, enum ms_dtype dt, float *x)
{
    static const uint32_t special[] = { 0x7fc00000u, 0xffc12345u, 0x7f800000u, 0xff800000u,
                                        0x00000001u, 0x80010000u, 0x00800000u, 0x80000000u };
    uint64_t st = 0x9e3779b97f4a7c15u * (k * 64 + i + 1);
    for (size_t j = 0; j < ISA_NUMEL; j++) {
        x[j] = th_stage_value(dt, &st, 0.05f) + (i == 0 ? 0.0f : 0.01f * (float)i);
        x[j] = th_stage_round(dt, x[j]);
        if (isa_cases[k].special && (j * 7 + i * 131) % 97 == 0) {
            float v;
            uint32_t u = special[(j / 97 + i) % 8];
            memcpy(&v, &u, 4);
            x[j] = th_stage_round(dt, v);
        }
    }
}

/* Runs every case in every compute dtype and chunk size, writing the outputs
 * to path: in a child process, with MERGESTREAM_ISA already set. */
static int isa_cases_run(const char *path)
{
    static const enum ms_dtype dts[] = { MS_DT_BF16, MS_DT_F16, MS_DT_F32 };
    static float in[6][ISA_NUMEL], out[ISA_NUMEL];
    FILE *f = fopen(path, "wb");
    if (!f)
        return 1;
    for (size_t k = 0; k < ISA_NCASES; k++) {
        const struct isa_case *ic = &isa_cases[k];
        for (size_t t = 0; t < 3; t++) {
            enum ms_dtype dt = ic->mixed ? MS_DT_F32 : dts[t];
            struct ms_stage_job job;
            th_stage_job(&job, ic->method, isa_shape, 2, dt, ic->ninputs);
            job.base = ic->base;
            const float *ins[6];
            for (uint32_t i = 0; i < ic->ninputs; i++) {
                enum ms_dtype di = ic->mixed ? (i % 2 ? MS_DT_F16 : MS_DT_BF16) : dt;
                job.in_dt[i] = di;
                isa_case_inputs(k, i, di, in[i]);
                ins[i] = in[i];
            }
            const char *ps[2] = { ic->p1, ic->p2 };
            const double vs[2] = { ic->v1, ic->v2 };
            for (int q = 0; q < 2; q++) {
                if (!ps[q])
                    continue;
                int pi = ms_method_param(job.method, ps[q]);
                if (pi >= 0 && job.method->params[pi].per_model)
                    for (uint32_t i = 0; i < ic->ninputs; i++)
                        job.pv[i][pi] = vs[q] + 0.25 * i;
                else if (pi >= 0)
                    job.gv[pi] = vs[q];
            }
            for (size_t cs = 0; cs < sizeof isa_chunks / sizeof isa_chunks[0]; cs++) {
                if (ms_stage_run_mem(&job, ins, out, isa_chunks[cs]) != 0 ||
                    fwrite(out, sizeof(float), ISA_NUMEL, f) != ISA_NUMEL)
                    return 2;
            }
        }
    }
    return fclose(f) ? 3 : 0;
}

/* Runs run(arg) in a child process whose kernels are version isa (the choice is
 * made once per process: a fresh one per version); returns the child's exit
 * status, 9 when the version could not be forced. */
static int run_as_version(enum ms_isa isa, int (*run)(const char *), const char *arg)
{
    fflush(NULL);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        setenv("MERGESTREAM_ISA", ms_isa_name(isa), 1);
        _exit(ms_isa_active() == isa ? run(arg) : 9);
    }
    int st = 0;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st), "%s: child status %d", ms_isa_name(isa), st);
    return WEXITSTATUS(st);
}

/* run(NULL) returns 0 in every available version (10 + k: case k differs). */
static void each_version_passes(int (*run)(const char *))
{
    int versions = 0;
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        if (!ms_isa_available((enum ms_isa)isa))
            continue;
        int rc = run_as_version((enum ms_isa)isa, run, NULL);
        cr_assert_eq(rc, 0, "%s: child status %d (10 + k: case k differs)",
                     ms_isa_name((enum ms_isa)isa), rc);
        versions++;
    }
    cr_assert_gt(versions, 0);
}

Test(isa, stage_methods_give_the_scalar_bytes_in_every_version, .timeout = 600)
{
    char *dir = th_tmpdir();
    cr_assert(dir);
    size_t nruns = ISA_NCASES * 3 * (sizeof isa_chunks / sizeof isa_chunks[0]);
    char *want = NULL;
    int versions = 0;
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        if (!ms_isa_available((enum ms_isa)isa)) {
            cr_log_info("%s: not available here", ms_isa_name((enum ms_isa)isa));
            continue;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.bin", dir, ms_isa_name((enum ms_isa)isa));
        int rc = run_as_version((enum ms_isa)isa, isa_cases_run, path);
        cr_assert_eq(rc, 0, "%s: child status %d", ms_isa_name((enum ms_isa)isa), rc);
        size_t len = 0;
        char *got = th_read(path, &len);
        cr_assert(got && len == nruns * ISA_NUMEL * sizeof(float), "%s: %zu bytes",
                  ms_isa_name((enum ms_isa)isa), len);
        if (!want) {
            want = got; /* the scalar reference */
            continue;
        }
        for (size_t r = 0; r < nruns; r++) {
            size_t off = r * ISA_NUMEL * sizeof(float);
            if (memcmp(want + off, got + off, ISA_NUMEL * sizeof(float))) {
                size_t j = 0;
                while (!memcmp(want + off + 4 * j, got + off + 4 * j, 4))
                    j++;
                cr_assert_fail("%s: %s (case %zu, dtype %zu, chunks %zu) differs from scalar "
                               "at element %zu", ms_isa_name((enum ms_isa)isa),
                               isa_cases[r / 9].method, r / 9, r / 3 % 3, r % 3, j);
            }
        }
        free(got);
        versions++;
    }
    free(want);
    th_rmtree(dir);
    free(dir);
    cr_log_info("%d versions compared with scalar", versions);
}

/*
 * linear's stored-bytes path (ms_stage_ops.apply_stored, bf16): for each linear
 * case above (NaN, infinities, subnormals among the values), in chunks of the
 * whole tensor, 2100 and 1 elements, each version's bytes equal the bf16
 * encoding of that version's float path (which the test above ties to scalar).
 * Run in a child process per version, as above.
 */
static int stored_cases_run(const char *unused)
{
    static float in[6][ISA_NUMEL], out[ISA_NUMEL];
    static uint16_t raw[6][ISA_NUMEL], got[ISA_NUMEL], want[ISA_NUMEL];
    for (size_t k = 0; k < ISA_NCASES; k++) {
        const struct isa_case *ic = &isa_cases[k];
        if (strcmp(ic->method, "linear"))
            continue;
        struct ms_stage_job job;
        th_stage_job(&job, ic->method, isa_shape, 2, MS_DT_BF16, ic->ninputs);
        const float *ins[6];
        const uint16_t *rins[6];
        for (uint32_t i = 0; i < ic->ninputs; i++) {
            isa_case_inputs(k, i, MS_DT_BF16, in[i]);
            for (size_t j = 0; j < ISA_NUMEL; j++)
                raw[i][j] = (uint16_t)(ms_f32_bits(in[i][j]) >> 16);
            ins[i] = in[i];
            rins[i] = raw[i];
        }
        int pw = ms_method_param(job.method, ic->p1), pn = ms_method_param(job.method, ic->p2);
        for (uint32_t i = 0; i < ic->ninputs; i++)
            job.pv[i][pw] = ic->v1 + 0.25 * i;
        job.gv[pn] = ic->v2;
        if (ms_stage_run_mem(&job, ins, out, 0) != 0)
            return 2;
        ms_f32_to_bf16_ref(out, want, ISA_NUMEL);
        const struct ms_stage_ops *ops = job.method->ops;
        _Alignas(64) unsigned char state[4096] = { 0 };
        if (!ops->apply_stored || ops->state_size(&job) > sizeof state ||
            ops->begin(state, &job) != MS_STAGE_APPLY)
            return 3;
        for (size_t cs = 0; cs < sizeof isa_chunks / sizeof isa_chunks[0]; cs++) {
            uint64_t ch = isa_chunks[cs] ? isa_chunks[cs] : ISA_NUMEL;
            memset(got, 0x5a, sizeof got);
            for (uint64_t first = 0; first < ISA_NUMEL; first += ch) {
                struct ms_chunk_stored c = { .first = first };
                c.count = MS_MIN(ch, ISA_NUMEL - first);
                for (uint32_t i = 0; i < ic->ninputs; i++)
                    c.in[i] = rins[i] + first;
                c.out = got + first;
                if (!ops->apply_stored(state, &job, &c))
                    return 4;
            }
            if (memcmp(got, want, sizeof got))
                return 10 + (int)k;
        }
    }
    return 0;
}

Test(isa, linear_stored_path_gives_the_float_paths_bytes_in_every_version)
{
    each_version_passes(stored_cases_run);
}

/*
 * The GTA family's stored-bytes path (gta.c's apply_stored, bf16): on random
 * task_arithmetic, dare_linear and dare_ties (no rescale) cases with NaN and
 * infinities among the inputs, in chunks of the whole tensor, 300 and 1
 * elements, each version's bytes equal the bf16 encoding of that version's
 * float path (which the tests above tie to scalar). A child process per version.
 */
static int gta_stored_cases_run(const char *unused)
{
    enum { SN = 1500 };
    static const char *const methods[] = { "task_arithmetic", "dare_linear", "dare_ties" };
    static const uint32_t special[] = { 0x7fc00000u, 0xffc10000u, 0x7f800000u, 0xff800000u,
                                        0x00010000u, 0x80000000u };
    static float store[MS_MAX_INPUTS * SN], out[SN];
    static uint16_t raw[MS_MAX_INPUTS][SN], got[SN], want[SN];
    for (size_t k = 0; k < 3 * 12; k++) {
        uint64_t rs = 777 + k;
        struct th_gta g = { .method = methods[k % 3], .dt = MS_DT_BF16 };
        th_gta_random(&g, store, SN, &rs);
        g.rescale = false;
        g.seed = k;
        const uint16_t *rin[MS_MAX_INPUTS];
        for (uint32_t i = 0; i < g.ninputs; i++) {
            float *x = (float *)g.in[i];
            for (uint64_t j = 0; j < g.numel; j++) {
                if ((j * 7 + i * 131 + k) % 41 == 0)
                    x[j] = ms_f32_from_bits(special[(j / 41 + i) % 6]);
                raw[i][j] = (uint16_t)(ms_f32_bits(x[j]) >> 16);
            }
            rin[i] = raw[i];
        }
        if (th_gta_run(&g, 0, out) != 0)
            return 2;
        ms_f32_to_bf16_ref(out, want, g.numel);
        struct ms_stage_job job;
        int64_t shape[2];
        th_gta_job(&g, &job, shape);
        const struct ms_stage_ops *ops = job.method->ops;
        void *state = calloc(1, ops->state_size(&job));
        if (!state || !ops->apply_stored || ops->begin(state, &job) != MS_STAGE_APPLY)
            return 3;
        static const uint64_t chunks[] = { 0, 300, 1 };
        for (size_t cs = 0; cs < 3; cs++) {
            uint64_t ch = chunks[cs] ? chunks[cs] : g.numel;
            memset(got, 0x5a, sizeof got);
            for (uint64_t first = 0; first < g.numel; first += ch) {
                struct ms_chunk_stored c = { .first = first };
                c.count = MS_MIN(ch, g.numel - first);
                for (uint32_t i = 0; i < g.ninputs; i++)
                    c.in[i] = rin[i] + first;
                c.out = got + first;
                if (!ops->apply_stored(state, &job, &c))
                    return 4;
            }
            if (memcmp(got, want, g.numel * sizeof(uint16_t)))
                return 10 + (int)k;
        }
        free(state);
    }
    return 0;
}

Test(isa, gta_stored_path_gives_the_float_paths_bytes_in_every_version)
{
    each_version_passes(gta_stored_cases_run);
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

/*
 * The GTA family and sce on rows long enough for their row kernels (della's
 * bf16/f16 rows of 512 and more are ranked by counting), in each compute
 * dtype (the base's), with many zero and equal deltas (fine-tunes close to
 * the base): every version writes the scalar version's bytes.
 */
Test(isa, gta_and_sce_long_rows_merge_to_the_same_bytes_in_every_version, .timeout = 900)
{
    static const char *const methods[] = { "task_arithmetic", "ties", "dare_linear", "dare_ties",
                                           "breadcrumbs", "breadcrumbs_ties", "della",
                                           "della_linear", "sce" };
    int nisa = 0;
    for (int isa = 1; isa < MS_ISA_COUNT; isa++)
        nisa += ms_isa_available((enum ms_isa)isa);
    if (!nisa)
        cr_skip_test("only the scalar version runs on this CPU or build");
    char *dir = th_tmpdir();
    cr_assert(dir);
    static const char *const dts[] = { "bf16", "f16", "f32" };
    for (size_t d = 0; d < 3; d++) {
        TH_RUN_OK(dir,
                  "rm -rf m && mkdir m && ms-mkmodel --layers 1 --hidden 512 --intermediate 640 --vocab 520 "
                  "--dtype %s --seed 3 m/base >/dev/null && "
                  "ms-mkmodel --base m/base --noise 0.003 --seed 4 m/ft1 >/dev/null && "
                  "ms-mkmodel --base m/base --noise 0.02 --seed 5 m/ft2 >/dev/null",
                  dts[d]);
        for (size_t m = 0; m < sizeof methods / sizeof methods[0]; m++) {
            TH_RUN_OK(dir,
                      "printf 'merge_method: %s\nbase_model: m/base\nmodels:\n"
                      "  - model: m/ft1\n    parameters: {weight: 0.6, density: 0.4}\n"
                      "  - model: m/ft2\n    parameters: {weight: -0.3, density: 0.7}\n"
                      "parameters: {epsilon: 0.1, gamma: 0.02, select_topk: 0.5, "
                      "rescale: true}\n' > r.yml",
                      methods[m]);
            for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
                if (!ms_isa_available((enum ms_isa)isa))
                    continue;
                TH_RUN_OK(dir,
                          "rm -rf o%d && MERGESTREAM_ISA=%s mergestream merge r.yml o%d -q -j2 && "
                          "{ test %d = 0 || cmp o0/model.safetensors o%d/model.safetensors >&2; }",
                          isa, ms_isa_name((enum ms_isa)isa), isa, isa, isa);
            }
        }
    }
    th_rmtree(dir);
    free(dir);
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

/*
 * geo: model_stock's and nuslerp's stored-bytes paths (stored_passes,
 * reduce_stored, apply_stored; model_stock's kept avg): for each of their
 * cases above with one dtype, in bfloat16 and float16, NaN, infinities and
 * subnormals among the values too, chunks of the whole tensor, 2100 and 1
 * elements, with and without a keep area, each version's bytes equal the
 * encoding of that version's float path (which the test above ties to scalar).
 * Run in a child process per version, as above.
 */
static int geo_stored_cases_run(const char *unused)
{
    static const enum ms_dtype dts[2] = { MS_DT_BF16, MS_DT_F16 };
    static float in[6][ISA_NUMEL], out[ISA_NUMEL];
    static uint16_t raw[6][ISA_NUMEL], got[ISA_NUMEL], want[ISA_NUMEL];
    static const uint32_t special[] = { 0x7fc00000u, 0xffc12345u, 0x7f800000u, 0x00000001u };
    int ran = 0;
    for (size_t k = 0; k < ISA_NCASES; k++) {
        const struct isa_case *ic = &isa_cases[k];
        if ((strcmp(ic->method, "model_stock") && strcmp(ic->method, "nuslerp")) || ic->mixed)
            continue;
        for (int d = 0; d < 2; d++)
            for (int sp = 0; sp < 2; sp++) {
                enum ms_dtype dt = dts[d];
                struct ms_stage_job job;
                th_stage_job(&job, ic->method, isa_shape, 2, dt, ic->ninputs);
                job.base = ic->base;
                const char *ps[2] = { ic->p1, ic->p2 };
                const double vs[2] = { ic->v1, ic->v2 };
                for (int q = 0; q < 2; q++) {
                    int pi = ps[q] ? ms_method_param(job.method, ps[q]) : -1;
                    if (pi >= 0 && job.method->params[pi].per_model)
                        for (uint32_t i = 0; i < ic->ninputs; i++)
                            job.pv[i][pi] = vs[q] + 0.25 * i;
                    else if (pi >= 0)
                        job.gv[pi] = vs[q];
                }
                const float *ins[6];
                const void *rins[6];
                for (uint32_t i = 0; i < ic->ninputs; i++) {
                    isa_case_inputs(k, i, dt, in[i]);
                    for (size_t j = 0; sp && j < ISA_NUMEL; j += 331) {
                        float v;
                        uint32_t u = special[(j / 331 + i) % 4];
                        memcpy(&v, &u, 4);
                        in[i][j] = th_stage_round(dt, v);
                    }
                    (dt == MS_DT_BF16 ? ms_f32_to_bf16_ref : ms_f32_to_f16_ref)(in[i], raw[i],
                                                                              ISA_NUMEL);
                    /* the float path's inputs: what the bytes decode to (NaN payloads) */
                    (dt == MS_DT_BF16 ? ms_bf16_to_f32_ref : ms_f16_to_f32_ref)(raw[i], in[i],
                                                                              ISA_NUMEL);
                    ins[i] = in[i];
                    rins[i] = raw[i];
                }
                if (ms_stage_run_mem(&job, ins, out, 0) != 0)
                    return 2;
                (dt == MS_DT_BF16 ? ms_f32_to_bf16_ref : ms_f32_to_f16_ref)(out, want, ISA_NUMEL);
                for (size_t cs = 0; cs < sizeof isa_chunks / sizeof isa_chunks[0]; cs++)
                    for (int kp = 0; kp < 2; kp++) {
                        memset(got, 0x5a, sizeof got);
                        int rc = ms_stage_run_stored_keep(&job, dt, rins, got, isa_chunks[cs], kp);
                        if (rc == MS_EUNSUPPORTED) /* nuslerp's columns mode */
                            continue;
                        if (rc != 0)
                            return 3;
                        if (memcmp(got, want, sizeof got))
                            return 10 + (int)k;
                        ran++;
                    }
            }
    }
    return ran == 5 * 2 * 2 * 3 * 2 ? 0 : 4; /* 2 model_stock and 3 nuslerp cases */
}

Test(isa, geo_stored_paths_give_the_float_paths_bytes_in_every_version)
{
    each_version_passes(geo_stored_cases_run);
}
