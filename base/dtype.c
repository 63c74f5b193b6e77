/*
 * dtype.c - safetensors dtype names and sizes, and the float conversion
 * kernels declared in ms_dtype.h.
 */
#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ms_common.h"
#include "ms_dtype.h"

/* ------------------------------------------------------------------ names */

/* Indexed by enum ms_dtype; spellings are the safetensors library's. */
static const struct {
    const char *name;
    unsigned bits;
} dtype_info[MS_DT_COUNT] = {
    [MS_DT_BOOL] = { "BOOL", 8 },
    [MS_DT_F4] = { "F4", 4 },
    [MS_DT_F6_E2M3] = { "F6_E2M3", 6 },
    [MS_DT_F6_E3M2] = { "F6_E3M2", 6 },
    [MS_DT_U8] = { "U8", 8 },
    [MS_DT_I8] = { "I8", 8 },
    [MS_DT_F8_E5M2] = { "F8_E5M2", 8 },
    [MS_DT_F8_E4M3] = { "F8_E4M3", 8 },
    [MS_DT_F8_E8M0] = { "F8_E8M0", 8 },
    [MS_DT_F8_E4M3FNUZ] = { "F8_E4M3FNUZ", 8 },
    [MS_DT_F8_E5M2FNUZ] = { "F8_E5M2FNUZ", 8 },
    [MS_DT_I16] = { "I16", 16 },
    [MS_DT_U16] = { "U16", 16 },
    [MS_DT_F16] = { "F16", 16 },
    [MS_DT_BF16] = { "BF16", 16 },
    [MS_DT_I32] = { "I32", 32 },
    [MS_DT_U32] = { "U32", 32 },
    [MS_DT_F32] = { "F32", 32 },
    [MS_DT_C64] = { "C64", 64 },
    [MS_DT_F64] = { "F64", 64 },
    [MS_DT_I64] = { "I64", 64 },
    [MS_DT_U64] = { "U64", 64 },
};

const char *ms_dtype_name(enum ms_dtype dt)
{
    if ((int)dt < 0 || (int)dt >= MS_DT_COUNT)
        return NULL;
    return dtype_info[dt].name;
}

enum ms_dtype ms_dtype_from_name(const char *name, size_t len)
{
    if (!name)
        return MS_DT_NONE;
    for (int i = 0; i < MS_DT_COUNT; i++) {
        const char *s = dtype_info[i].name;
        if (strlen(s) == len && !memcmp(s, name, len))
            return (enum ms_dtype)i;
    }
    return MS_DT_NONE;
}

/* mergekit's dtype_from_name: exact spellings, optional "torch." prefix. */
enum ms_dtype ms_dtype_from_recipe(const char *name)
{
    if (!name)
        return MS_DT_NONE;
    if (!strncmp(name, "torch.", 6))
        name += 6;
    if (!strcmp(name, "bfloat16"))
        return MS_DT_BF16;
    if (!strcmp(name, "float16"))
        return MS_DT_F16;
    if (!strcmp(name, "float32"))
        return MS_DT_F32;
    if (!strcmp(name, "int64"))
        return MS_DT_I64;
    return MS_DT_NONE;
}

unsigned ms_dtype_bits(enum ms_dtype dt)
{
    assert((int)dt >= 0 && (int)dt < MS_DT_COUNT);
    return dtype_info[dt].bits;
}

bool ms_dtype_is_compute(enum ms_dtype dt)
{
    return dt == MS_DT_F16 || dt == MS_DT_BF16 || dt == MS_DT_F32;
}

bool ms_dtype_is_float(enum ms_dtype dt) { return ms_dtype_is_compute(dt) || dt == MS_DT_F64; }

/* ------------------------------------------------------------ scalar f16 */

/*
 * IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Rebiasing an
 * exponent from 15 to 127 adds 112 << 23 to the shifted bits.
 */
#define F16_REBIAS 0x38000000u   /* (127 - 15) << 23 */
#define F32_INF 0x7f800000u
#define F32_ABS 0x7fffffffu
#define F32_MIN_F16_NORMAL 0x38800000u /* 2^-14 */
#define F32_F16_OVERFLOW 0x477ff000u   /* 65520: the tie between 65504 and 2^16 */

float ms_f16_to_f32_1(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;

    if (exp == 0x1f) {
        /* Inf, or NaN made quiet with the payload kept in the top bits. */
        u = F32_INF | (mant << 13) | (mant ? 0x00400000u : 0);
    } else if (exp != 0) {
        u = ((exp << 10 | mant) << 13) + F16_REBIAS;
    } else if (mant == 0) {
        u = 0;
    } else {
        /* Subnormal mant * 2^-24: shift the leading one up to the implicit bit. */
        uint32_t e = 113; /* biased f32 exponent of 2^-14 */
        while (!(mant & 0x400u)) {
            mant <<= 1;
            e--;
        }
        u = e << 23 | (mant & 0x3ffu) << 13;
    }
    return ms_f32_from_bits(sign | u);
}

uint16_t ms_f32_to_f16_1(float f)
{
    uint32_t u = ms_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & F32_ABS;

    if (a > F32_INF) /* NaN: keep sign and top payload, force quiet */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= F32_F16_OVERFLOW) /* rounds to infinity (or is infinity) */
        return (uint16_t)(sign | 0x7c00u);
    if (a >= F32_MIN_F16_NORMAL) {
        uint32_t r = a - F16_REBIAS;
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    /* Subnormal or zero: the result is round(a / 2^-24) as an integer mantissa
     * (which may carry into the smallest normal, 0x0400, correctly). */
    uint32_t e = a >> 23;
    if (e < 102) /* below 2^-25, the tie between 0 and 2^-24, or zero */
        return sign;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e; /* 14..24 */
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return (uint16_t)(sign | q);
}


/* ------------------------------------------------------- scalar references */

void ms_bf16_to_f32_ref(const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = ms_bf16_to_f32_1(src[i]);
}

void ms_f32_to_bf16_ref(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = ms_f32_to_bf16_1(src[i]);
}

void ms_f16_to_f32_ref(const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = ms_f16_to_f32_1(src[i]);
}

void ms_f32_to_f16_ref(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = ms_f32_to_f16_1(src[i]);
}

/* ------------------------------------------------------------ fast kernels */

/*
 * The element functions below are branch-free (every path is computed and one
 * is selected) so that gcc -O2/-O3 turns the loops into SIMD code; each gives
 * bit-for-bit the result of the scalar conversion (ms_f32_to_f16_1 etc.).
 */

/* All ones when c holds, else zero: selects that gcc keeps branch-free. */
static inline uint32_t mask_if(bool c) { return -(uint32_t)c; }

static inline uint32_t f16_to_f32_bits_fast(uint32_t h)
{
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
    uint32_t is_normal = mask_if(em >= 0x0400u);
    uint32_t is_special = mask_if(em >= 0x7c00u);
    uint32_t normal = (em << 13) + F16_REBIAS;
    uint32_t special = (em << 13) | F32_INF | (mask_if(em > 0x7c00u) & 0x00400000u);
    /* Subnormals and zero: em * 2^-24 is exact in float. */
    uint32_t sub = ms_f32_bits((float)(int32_t)em * 0x1p-24f);
    uint32_t r = (sub & ~is_normal) | (normal & is_normal & ~is_special) | (special & is_special);
    return sign | r;
}

static inline uint16_t f32_to_f16_fast(uint32_t u)
{
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & F32_ABS;
    uint32_t is_nan = mask_if(a > F32_INF);
    uint32_t is_big = mask_if(a >= F32_F16_OVERFLOW);
    uint32_t is_normal = mask_if(a >= F32_MIN_F16_NORMAL);
    uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
    uint32_t r = a - F16_REBIAS;
    uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    /* Subnormal: adding 0.5 puts the value's units of 2^-24 in the low mantissa
     * bits of a float in [0.5, 1), rounded to nearest even by the FPU (the
     * default rounding mode; FTZ/DAZ do not change the result). */
    uint32_t sub = ms_f32_bits(ms_f32_from_bits(a & ~is_normal) + 0.5f) - 0x3f000000u;
    uint32_t v = (nan & is_nan) | (0x7c00u & is_big & ~is_nan)
               | (normal & is_normal & ~is_big) | (sub & ~is_normal);
    return (uint16_t)(sign | v);
}

static inline uint16_t f32_to_bf16_fast(uint32_t u)
{
    uint32_t q = (u >> 16) | 0x40u;
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & F32_ABS) > F32_INF ? q : r);
}

/*
 * The loops run in blocks of a fixed count so that gcc vectorises them at -O2
 * too (its "very cheap" cost model there only takes loops whose trip count is
 * a known multiple of the vector length); the tail runs scalar.
 */
#define BLOCK 32
#define BLOCKED_LOOP(n, stmt)                              \
    do {                                                   \
        size_t i_ = 0;                                     \
        for (; i_ + BLOCK <= (n); i_ += BLOCK) {           \
            for (size_t j_ = 0; j_ < BLOCK; j_++) {        \
                size_t k = i_ + j_;                        \
                stmt;                                      \
            }                                              \
        }                                                  \
        for (size_t k = i_; k < (n); k++) {                \
            stmt;                                          \
        }                                                  \
    } while (0)

/* The portable versions (MS_ISA_SCALAR): plain C, vectorised by the compiler for
 * the baseline target only. */
static void bf16_to_f32_c(const uint16_t *restrict src, float *restrict dst, size_t n)
{
    BLOCKED_LOOP(n, dst[k] = ms_f32_from_bits((uint32_t)src[k] << 16));
}

static void f32_to_bf16_c(const float *restrict src, uint16_t *restrict dst, size_t n)
{
    BLOCKED_LOOP(n, dst[k] = f32_to_bf16_fast(ms_f32_bits(src[k])));
}

static void f16_to_f32_c(const uint16_t *restrict src, float *restrict dst, size_t n)
{
    BLOCKED_LOOP(n, dst[k] = ms_f32_from_bits(f16_to_f32_bits_fast(src[k])));
}

static void f32_to_f16_c(const float *restrict src, uint16_t *restrict dst, size_t n)
{
    BLOCKED_LOOP(n, dst[k] = f32_to_f16_fast(ms_f32_bits(src[k])));
}

/*
 * x86-64 versions with intrinsics under per-function target attributes (the
 * rest of the build keeps the baseline target). bf16 is integer work (the same
 * rounding as f32_to_bf16_fast, lane by lane); f16 uses the F16C conversions,
 * which round to nearest even, keep subnormals (MXCSR's DAZ/FTZ do not apply to
 * them) and make NaNs quiet keeping the top payload bits: exactly
 * ms_f32_to_f16_1 and ms_f16_to_f32_1. The tails go through the portable code.
 */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define X86_AVX2 __attribute__((target("avx2,f16c")))
#define X86_AVX512 __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl")))

X86_AVX2 static void bf16_to_f32_avx2(const uint16_t *restrict src, float *restrict dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(h, 16));
    }
    bf16_to_f32_c(src + i, dst + i, n - i);
}

X86_AVX2 static void f32_to_bf16_avx2(const float *restrict src, uint16_t *restrict dst, size_t n)
{
    const __m256i inf = _mm256_set1_epi32((int)F32_INF), abs = _mm256_set1_epi32((int)F32_ABS);
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    const __m256i quiet = _mm256_set1_epi32(0x40);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i r[2];
        for (int h = 0; h < 2; h++) {
            __m256i u = _mm256_loadu_si256((const __m256i *)(src + i + 8 * h));
            __m256i hi = _mm256_srli_epi32(u, 16);
            __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
            __m256i rn = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(hi, one)));
            rn = _mm256_srli_epi32(rn, 16);
            r[h] = _mm256_blendv_epi8(rn, _mm256_or_si256(hi, quiet), nan);
        }
        /* packus works within 128-bit lanes: put the halves back in order */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8);
        _mm256_storeu_si256((__m256i *)(dst + i), p);
    }
    f32_to_bf16_c(src + i, dst + i, n - i);
}

X86_AVX2 static void f16_to_f32_avx2(const uint16_t *restrict src, float *restrict dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    f16_to_f32_c(src + i, dst + i, n - i);
}

X86_AVX2 static void f32_to_f16_avx2(const float *restrict src, uint16_t *restrict dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    f32_to_f16_c(src + i, dst + i, n - i);
}

X86_AVX512 static void bf16_to_f32_avx512(const uint16_t *restrict src, float *restrict dst,
                                          size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i)));
        _mm512_storeu_si512((void *)(dst + i), _mm512_slli_epi32(h, 16));
    }
    bf16_to_f32_c(src + i, dst + i, n - i);
}

X86_AVX512 static void f32_to_bf16_avx512(const float *restrict src, uint16_t *restrict dst,
                                          size_t n)
{
    const __m512i inf = _mm512_set1_epi32((int)F32_INF), abs = _mm512_set1_epi32((int)F32_ABS);
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i quiet = _mm512_set1_epi32(0x40);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_loadu_si512((const void *)(src + i));
        __m512i hi = _mm512_srli_epi32(u, 16);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
        __m512i rn = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(hi, one)));
        rn = _mm512_srli_epi32(rn, 16);
        rn = _mm512_mask_blend_epi32(nan, rn, _mm512_or_si512(hi, quiet));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(rn));
    }
    f32_to_bf16_c(src + i, dst + i, n - i);
}

X86_AVX512 static void f16_to_f32_avx512(const uint16_t *restrict src, float *restrict dst,
                                         size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    f16_to_f32_c(src + i, dst + i, n - i);
}

X86_AVX512 static void f32_to_f16_avx512(const float *restrict src, uint16_t *restrict dst,
                                         size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    f32_to_f16_c(src + i, dst + i, n - i);
}
#define HAVE_X86_KERNELS 1
#endif

static const struct ms_dtype_kernels dtype_kernels[MS_ISA_COUNT] = {
    [MS_ISA_SCALAR] = { bf16_to_f32_c, f32_to_bf16_c, f16_to_f32_c, f32_to_f16_c },
#ifdef HAVE_X86_KERNELS
    [MS_ISA_AVX2] = { bf16_to_f32_avx2, f32_to_bf16_avx2, f16_to_f32_avx2, f32_to_f16_avx2 },
    [MS_ISA_AVX512] = { bf16_to_f32_avx512, f32_to_bf16_avx512, f16_to_f32_avx512,
                        f32_to_f16_avx512 },
#endif
};

const struct ms_dtype_kernels *ms_dtype_kernels(enum ms_isa isa)
{
    if ((unsigned)isa >= MS_ISA_COUNT || !dtype_kernels[isa].bf16_to_f32 || !ms_isa_available(isa))
        return NULL;
    return &dtype_kernels[isa];
}

void ms_bf16_to_f32(const uint16_t *restrict src, float *restrict dst, size_t n)
{
    dtype_kernels[ms_isa_active()].bf16_to_f32(src, dst, n);
}

void ms_f32_to_bf16(const float *restrict src, uint16_t *restrict dst, size_t n)
{
    dtype_kernels[ms_isa_active()].f32_to_bf16(src, dst, n);
}

void ms_f16_to_f32(const uint16_t *restrict src, float *restrict dst, size_t n)
{
    dtype_kernels[ms_isa_active()].f16_to_f32(src, dst, n);
}

void ms_f32_to_f16(const float *restrict src, uint16_t *restrict dst, size_t n)
{
    dtype_kernels[ms_isa_active()].f32_to_f16(src, dst, n);
}

static void f64_to_f32(const double *restrict src, float *restrict dst, size_t n)
{
    BLOCKED_LOOP(n, dst[k] = (float)src[k]);
}

static void f32_to_f64(const float *restrict src, double *restrict dst, size_t n)
{
    BLOCKED_LOOP(n, dst[k] = (double)src[k]);
}

/* ------------------------------------------------------ decode and encode */

/* Elements staged through the stack when the source and destination overlap
 * or the raw side is not aligned to its element size. */
#define STAGE_ELEMS 1024

union stage_buf {
    uint16_t h[STAGE_ELEMS];
    float f[STAGE_ELEMS];
    double d[STAGE_ELEMS];
};

/* Decodes n elements from an aligned raw buffer that does not overlap dst. */
static void decode_run(enum ms_dtype dt, const void *raw, float *dst, size_t n)
{
    switch (dt) {
    case MS_DT_BF16: ms_bf16_to_f32(raw, dst, n); break;
    case MS_DT_F16: ms_f16_to_f32(raw, dst, n); break;
    case MS_DT_F32: memcpy(dst, raw, n * sizeof(float)); break;
    case MS_DT_F64: f64_to_f32(raw, dst, n); break;
    default: assert(!"decode: not a float dtype");
    }
}

/* Encodes n floats into an aligned raw buffer that does not overlap src. */
static void encode_run(enum ms_dtype dt, const float *src, void *raw, size_t n)
{
    switch (dt) {
    case MS_DT_BF16: ms_f32_to_bf16(src, raw, n); break;
    case MS_DT_F16: ms_f32_to_f16(src, raw, n); break;
    case MS_DT_F32: memcpy(raw, src, n * sizeof(float)); break;
    case MS_DT_F64: f32_to_f64(src, raw, n); break;
    default: assert(!"encode: not a float dtype");
    }
}

static bool bytes_overlap(const void *a, size_t alen, const void *b, size_t blen)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + blen && y < x + alen;
}

/*
 * Staged decode: each block's source is copied to the stack before its
 * destination is written. Expanding types (2 bytes -> 4) run from the end, so
 * a block's writes land only on source bytes of elements already copied;
 * narrowing F64 runs from the start for the same reason.
 */
void ms_dtype_decode(enum ms_dtype dt, const void *raw, float *dst, size_t n)
{
    assert(ms_dtype_is_float(dt));
    size_t esz = ms_dtype_bits(dt) / 8;
    if (n == 0 || ((const void *)dst == raw && dt == MS_DT_F32))
        return;
    bool overlap = bytes_overlap(raw, n * esz, dst, n * sizeof(float));
    assert(!overlap || (const void *)dst == raw); /* only exact in-place is supported */
    if (!overlap && (uintptr_t)raw % esz == 0) {
        decode_run(dt, raw, dst, n);
        return;
    }
    union stage_buf tmp;
    const unsigned char *src = raw;
    bool backward = esz < sizeof(float);
    size_t done = 0;
    while (done < n) {
        size_t cnt = MS_MIN(n - done, STAGE_ELEMS);
        size_t first = backward ? n - done - cnt : done;
        memcpy(&tmp, src + first * esz, cnt * esz);
        decode_run(dt, &tmp, dst + first, cnt);
        done += cnt;
    }
}

void ms_dtype_decode_up(enum ms_dtype dt, const void *raw, float *dst, size_t n)
{
    size_t esz = ms_dtype_bits(dt) / 8;
    if (esz >= sizeof(float)) {
        assert((const void *)dst == raw || esz > sizeof(float));
        ms_dtype_decode(dt, raw, dst, n);
        return;
    }
    assert((const unsigned char *)raw == (const unsigned char *)dst + n * (sizeof(float) - esz));
    /* Block [i, i+b) writes bytes [4i, 4i+4b) and reads [top+esz*i, ...) with
     * top = n*(4-esz): disjoint while 4(i+b) <= top + esz*i. */
    const unsigned char *src = raw;
    size_t i = 0, b = STAGE_ELEMS;
    size_t top = n * (sizeof(float) - esz);
    while (i + b <= n && sizeof(float) * (i + b) <= top + esz * i) {
        decode_run(dt, src + i * esz, dst + i, b);
        i += b;
    }
    if (i < n) { /* the rest overlaps its own source: stage it */
        union stage_buf tmp;
        while (i < n) {
            size_t cnt = MS_MIN(n - i, (size_t)STAGE_ELEMS);
            memcpy(&tmp, src + i * esz, cnt * esz);
            decode_run(dt, &tmp, dst + i, cnt);
            i += cnt;
        }
    }
}

/* Staged encode: the mirror image of ms_dtype_decode (narrowing types run from
 * the start, expanding F64 from the end). Encoding into a stack buffer and then
 * copying also keeps a misaligned raw side legal. */
void ms_dtype_encode(enum ms_dtype dt, const float *src, void *raw, size_t n)
{
    assert(ms_dtype_is_float(dt));
    size_t esz = ms_dtype_bits(dt) / 8;
    if (n == 0 || ((const void *)src == raw && dt == MS_DT_F32))
        return;
    bool overlap = bytes_overlap(raw, n * esz, src, n * sizeof(float));
    assert(!overlap || (const void *)src == raw); /* only exact in-place is supported */
    if (!overlap && (uintptr_t)raw % esz == 0) {
        encode_run(dt, src, raw, n);
        return;
    }
    float in[STAGE_ELEMS];
    union stage_buf enc;
    unsigned char *out = raw;
    bool backward = esz > sizeof(float);
    size_t done = 0;
    while (done < n) {
        size_t cnt = MS_MIN(n - done, STAGE_ELEMS);
        size_t first = backward ? n - done - cnt : done;
        memcpy(in, src + first, cnt * sizeof(float));
        encode_run(dt, in, &enc, cnt);
        memcpy(out + first * esz, &enc, cnt * esz);
        done += cnt;
    }
}

static inline float round_bf16_fast(float f)
{
    return ms_f32_from_bits((uint32_t)f32_to_bf16_fast(ms_f32_bits(f)) << 16);
}

static inline float round_f16_fast(float f)
{
    return ms_f32_from_bits(f16_to_f32_bits_fast(f32_to_f16_fast(ms_f32_bits(f))));
}

void ms_dtype_round(enum ms_dtype dt, float *x, size_t n)
{
    assert(ms_dtype_is_compute(dt));
    if (dt == MS_DT_BF16)
        BLOCKED_LOOP(n, x[k] = round_bf16_fast(x[k]));
    else if (dt == MS_DT_F16)
        BLOCKED_LOOP(n, x[k] = round_f16_fast(x[k]));
}
