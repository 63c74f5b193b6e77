/*
 * rng.c - the counter-based random numbers of the stages (ms_stage.h) and the
 * FNV-1a hash that keys them by tensor name.
 *
 * ms_rng_u32 is a pure function of (seed, key, model, element): no state, so a
 * random mask does not depend on chunking, threads or pass, and a second pass
 * regenerates it. Construction: the stream id (seed, key, model) is absorbed
 * through three rounds of the splitmix64 finaliser (Stafford's "mix13"), then
 * the element index is used as a splitmix64 counter in that stream and the
 * result goes through the finaliser once more; the high 32 bits are returned.
 * The finaliser is a bijection of 64-bit words with full avalanche, so distinct
 * elements of one stream give distinct 64-bit outputs.
 *
 * The stream word depends only on (seed, key, model): ms_rng_stream computes it
 * once per tensor and model, and ms_rng_fill draws a run of consecutive
 * elements from it with one finaliser each (the same values as ms_rng_u32).
 *
 * The exact values are part of the output format of random methods (DARE, DELLA):
 * changing this function changes merged bytes. tests/test_xacc.c pins them.
 */
#include "ms_stage.h"

#define RNG_GOLDEN UINT64_C(0x9e3779b97f4a7c15)

static inline uint64_t rng_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

uint64_t ms_rng_stream(uint64_t seed, uint64_t key, uint32_t model)
{
    uint64_t s = rng_mix(seed + RNG_GOLDEN);
    s = rng_mix(s ^ key);
    return rng_mix(s ^ (((uint64_t)model + 1) * UINT64_C(0xd1b54a32d192ed03)));
}

uint32_t ms_rng_u32(uint64_t seed, uint64_t key, uint32_t model, uint64_t element)
{
    return (uint32_t)(rng_mix(ms_rng_stream(seed, key, model) + (element + 1) * RNG_GOLDEN) >> 32);
}

/* The leaf kernel of the masks: one finaliser per element, no loop-carried
 * state (the counter is the element index), so the compiler can vectorise it
 * where 64-bit multiplies are available. The versions of ms_isa.h are this one
 * loop compiled for each target (integer arithmetic: the same values). */
#define RNG_FILL_BODY                                                                              \
    uint64_t z = stream + (first + 1) * RNG_GOLDEN;                                                \
    for (size_t i = 0; i < n; i++)                                                                 \
        out[i] = (uint32_t)(rng_mix(z + (uint64_t)i * RNG_GOLDEN) >> 32);

static void rng_fill_c(uint64_t stream, uint64_t first, uint32_t *restrict out, size_t n)
{
    RNG_FILL_BODY
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void rng_fill_avx2(uint64_t stream, uint64_t first,
                                                          uint32_t *restrict out, size_t n)
{
    RNG_FILL_BODY
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"))) static void rng_fill_avx512(
    uint64_t stream, uint64_t first, uint32_t *restrict out, size_t n)
{
    RNG_FILL_BODY
}
#define HAVE_X86_KERNELS 1
#endif

static const struct ms_stage_kernels stage_kernels[MS_ISA_COUNT] = {
    [MS_ISA_SCALAR] = { rng_fill_c },
#ifdef HAVE_X86_KERNELS
    [MS_ISA_AVX2] = { rng_fill_avx2 },
    [MS_ISA_AVX512] = { rng_fill_avx512 },
#endif
};

const struct ms_stage_kernels *ms_stage_kernels(enum ms_isa isa)
{
    if ((unsigned)isa >= MS_ISA_COUNT || !stage_kernels[isa].rng_fill || !ms_isa_available(isa))
        return NULL;
    return &stage_kernels[isa];
}

void ms_rng_fill(uint64_t stream, uint64_t first, uint32_t *restrict out, size_t n)
{
    stage_kernels[ms_isa_active()].rng_fill(stream, first, out, n);
}

uint64_t ms_hash_str(const char *s)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        h ^= *p;
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}
