/*
 * poshash.c - the position-keyed checksum of ms_poshash.h: a polynomial hash
 * over the field of integers mod the Mersenne prime 2^61 - 1, evaluated by
 * Horner's rule over blocks of words (see words()).
 */
#include <string.h>

#include "ms_isa.h"
#include "ms_poshash.h"
#include "ms_str.h"

#define P ((uint64_t)0x1fffffffffffffff) /* 2^61 - 1 */
#define A ((uint64_t)0x0b5ad4eceda1ce2b) /* any constant in [2, P) */

/* a * b folded once: a, b < 2^62 gives a value < 2^62 congruent to a * b. */
static inline uint64_t mul_lazy(uint64_t a, uint64_t b)
{
    unsigned __int128 r = (unsigned __int128)a * b;
    uint64_t lo = (uint64_t)r & P, hi = (uint64_t)(r >> 61);
    uint64_t s = lo + hi; /* < 2^61 + 2^63 */
    return (s & P) + (s >> 61);
}

static inline uint64_t reduce(uint64_t s)
{
    s = (s & P) + (s >> 61);
    return s >= P ? s - P : s;
}

static uint64_t mulmod(uint64_t a, uint64_t b) { return reduce(mul_lazy(a, b)); }

static uint64_t powmod(uint64_t b, uint64_t e)
{
    uint64_t r = 1;
    for (; e; e >>= 1, b = mulmod(b, b))
        if (e & 1)
            r = mulmod(r, b);
    return r;
}

static inline uint64_t load32(const unsigned char *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24;
}

#define BLOCK 16 /* words per block */

/* x mod P up to a small multiple: x < 2^125 gives a value < 2^62 congruent to x. */
static inline uint64_t fold128(unsigned __int128 x)
{
    return ((uint64_t)x & P) + (uint64_t)(x >> 61);
}

/*
 * sum over i < n of v[i] * A^i, for n whole words at p: Horner's rule over
 * blocks of BLOCK words, last block first (H = H * A^BLOCK + block), where a
 * block is sum over j of v[j] * A^j from a table of A^j, in two 128-bit sums
 * (even and odd words; each product < 2^93, so BLOCK of them cannot overflow).
 * One multiply per block on the dependency chain instead of one per word.
 */
static uint64_t words(const unsigned char *p, size_t n)
{
    uint64_t pw[BLOCK];
    pw[0] = 1;
    for (int j = 1; j < BLOCK; j++)
        pw[j] = mulmod(pw[j - 1], A);
    const uint64_t ak = mulmod(pw[BLOCK - 1], A);
    size_t g = n / BLOCK;
    uint64_t h = 0;
    for (size_t k = g; k-- > 0;) {
        const unsigned char *q = p + 4 * BLOCK * k;
        unsigned __int128 b = 0, c = 0;
        for (int j = 0; j < BLOCK; j += 2) {
            b += (unsigned __int128)load32(q + 4 * j) * pw[j];
            c += (unsigned __int128)load32(q + 4 * j + 4) * pw[j + 1];
        }
        h = mul_lazy(h, ak) + reduce(fold128(b + c)); /* < 2^61 + 8 + 2^61 */
    }
    uint64_t s = reduce(h);
    uint64_t x = powmod(A, BLOCK * g);
    for (size_t i = BLOCK * g; i < n; i++, x = mulmod(x, A))
        s = reduce(s + mulmod(load32(p + 4 * i), x));
    return s;
}

/*
 * Vector versions of words() (ms_isa.h), the same value: blocks of VB words,
 * last first, H = H * A^VB + block, where a block's sum over j of v[j] * A^j
 * runs in 64-bit lanes. With A^j = lo + hi * 2^32 (lo < 2^32, hi < 2^29),
 * v * A^j = v * lo + v * hi * 2^32, both from 32x32-bit multiplies; a lane
 * sums the low and high halves of v * lo (aL, aM) and v * hi (aH) exactly, then
 * folds (aM + aH) * 2^32 with 2^61 = 1 (mod P). Bounds are noted per step.
 */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define VB 64 /* words per vector block */

/* A^j mod P for j < VB (tests/test_poshash.c checks the sums against the definition). */
static const uint64_t pw_vb[VB] __attribute__((aligned(64))) = {
    0x0000000000000001u, 0x0b5ad4eceda1ce2bu, 0x08a3c97eb7014df6u,
    0x0f1486b9e1f371c2u, 0x1e2112b072d4bd6eu, 0x0e39e887d98c85ebu,
    0x1dcaa35510407e11u, 0x0469539a508f47bbu, 0x1d643df9b081a359u,
    0x19a58793f240563bu, 0x1ac7ca47011c12b2u, 0x1e74228387327423u,
    0x14f5c886e7a24787u, 0x14a9de72508dd8f6u, 0x1e411b962a432addu,
    0x088c04cc403a7707u, 0x004199bac86e2475u, 0x02b2eb969ccf2f99u,
    0x18aef10c552d67ceu, 0x0ff7814cc51d46b5u, 0x1a3a0a09afd9faddu,
    0x1e6a8d6590762834u, 0x1c95ce7178a8203du, 0x0fa062770af0f33cu,
    0x0d5cafbc58b66fa8u, 0x12039d0070680770u, 0x0e1cb514fd53ebeau,
    0x1544822a4364c304u, 0x058f8cddb3ed0c04u, 0x1d533112d19ab7eau,
    0x02f39b15c28ae508u, 0x0f12600d49aed84bu, 0x07f7a2d99311bbc9u,
    0x01f9a6a88a57cd7eu, 0x193a1cd2ffe0d459u, 0x0de5bd9536e1a1fbu,
    0x051cec4372279affu, 0x0667ee3fbe333d7au, 0x11a7fb31beeb8f9fu,
    0x18a44df354cf84a1u, 0x035b5fb38a842175u, 0x0758a8c6081abbb2u,
    0x0f0350b536c33028u, 0x015fcaadfbce9ea4u, 0x09b79513cbcfa873u,
    0x18bd9b1e0034d1dcu, 0x015547bb17452176u, 0x13a5e5c3baff9f9fu,
    0x0dadf8c5bbbdd0d9u, 0x15a690e401d14c11u, 0x013ea1d0fc0dbbdeu,
    0x0c3cad3429b2e633u, 0x14cdf4929a3db2b7u, 0x03fc52731d4fce5bu,
    0x1520708fc5395fa6u, 0x08fc83057700c307u, 0x004fd92f89c470c8u,
    0x14882a7ac7a4846eu, 0x00630feed671ced2u, 0x1559cffb2612697au,
    0x1d6dc3acdbee25c4u, 0x106125399dd285a4u, 0x0ed4aafd27093510u,
    0x1efadf2fcf13fb5bu,
};
#define A_VB ((uint64_t)0x1811f141bc582024u) /* A^VB mod P */

/* The tail of a vector words(): the n - VB * g words after g whole blocks whose sum is h. */
static uint64_t words_tail(uint64_t h, const unsigned char *p, size_t n, size_t g)
{
    uint64_t s = reduce(h);
    size_t r = n - VB * g;
    if (r)
        s = reduce(s + mulmod(words(p + 4 * VB * g, r), powmod(A, VB * g)));
    return s;
}

__attribute__((target("avx2"))) static uint64_t words_avx2(const unsigned char *p, size_t n)
{
    const __m256i m32 = _mm256_set1_epi64x(0xffffffff), m29 = _mm256_set1_epi64x(0x1fffffff);
    const __m256i mp = _mm256_set1_epi64x((long long)P);
    size_t g = n / VB;
    uint64_t h = 0;
    for (size_t k = g; k-- > 0;) {
        const unsigned char *q = p + 4 * VB * k;
        __m256i aL = _mm256_setzero_si256(), aM = aL, aH0 = aL, aH1 = aL;
        for (int t = 0; t < VB / 4; t += 2) { /* aH0, aH1: 8 terms < 2^61 each */
            __m256i w0 = _mm256_load_si256((const __m256i *)(pw_vb + 4 * t));
            __m256i w1 = _mm256_load_si256((const __m256i *)(pw_vb + 4 * t + 4));
            __m256i v0 = _mm256_cvtepu32_epi64(_mm_loadu_si128((const __m128i *)(q + 16 * t)));
            __m256i v1 = _mm256_cvtepu32_epi64(_mm_loadu_si128((const __m128i *)(q + 16 * t + 16)));
            __m256i l0 = _mm256_mul_epu32(v0, w0), l1 = _mm256_mul_epu32(v1, w1);
            aL = _mm256_add_epi64(aL, _mm256_add_epi64(_mm256_and_si256(l0, m32),
                                                       _mm256_and_si256(l1, m32)));
            aM = _mm256_add_epi64(aM, _mm256_add_epi64(_mm256_srli_epi64(l0, 32),
                                                       _mm256_srli_epi64(l1, 32)));
            aH0 = _mm256_add_epi64(aH0, _mm256_mul_epu32(v0, _mm256_srli_epi64(w0, 32)));
            aH1 = _mm256_add_epi64(aH1, _mm256_mul_epu32(v1, _mm256_srli_epi64(w1, 32)));
        }
        /* aL, aM < 2^36; each aH folded < 2^61 + 8 */
        aH0 = _mm256_add_epi64(_mm256_and_si256(aH0, mp), _mm256_srli_epi64(aH0, 61));
        aH1 = _mm256_add_epi64(_mm256_and_si256(aH1, mp), _mm256_srli_epi64(aH1, 61));
        __m256i x = _mm256_add_epi64(aM, _mm256_add_epi64(aH0, aH1)); /* < 2^62 + 2^37 */
        __m256i l = _mm256_add_epi64(aL, _mm256_add_epi64(_mm256_srli_epi64(x, 29),
                                     _mm256_slli_epi64(_mm256_and_si256(x, m29), 32)));
        l = _mm256_add_epi64(_mm256_and_si256(l, mp), _mm256_srli_epi64(l, 61)); /* < 2^61 + 2 */
        __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1));
        uint64_t b = (uint64_t)_mm_cvtsi128_si64(s2) + (uint64_t)_mm_extract_epi64(s2, 1);
        h = mul_lazy(h, A_VB) + reduce(b); /* < 2^61 + 4 + 2^61 */
    }
    return words_tail(h, p, n, g);
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq"))) static uint64_t
words_avx512(const unsigned char *p, size_t n)
{
    const __m512i m32 = _mm512_set1_epi64(0xffffffff), m29 = _mm512_set1_epi64(0x1fffffff);
    const __m512i mp = _mm512_set1_epi64((long long)P);
    __m512i lo[VB / 8], hi[VB / 8];
    for (int t = 0; t < VB / 8; t++) {
        lo[t] = _mm512_load_si512((const void *)(pw_vb + 8 * t));
        hi[t] = _mm512_srli_epi64(lo[t], 32);
    }
    size_t g = n / VB;
    uint64_t h = 0;
    for (size_t k = g; k-- > 0;) {
        const unsigned char *q = p + 4 * VB * k;
        __m512i aL = _mm512_setzero_si512(), aM = aL, aH = aL;
        for (int t = 0; t < VB / 8; t++) { /* aH: 8 terms < 2^61 each */
            __m512i v = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i *)(q + 32 * t)));
            __m512i l = _mm512_mul_epu32(v, lo[t]);
            aL = _mm512_add_epi64(aL, _mm512_and_si512(l, m32));
            aM = _mm512_add_epi64(aM, _mm512_srli_epi64(l, 32));
            aH = _mm512_add_epi64(aH, _mm512_mul_epu32(v, hi[t]));
        }
        aH = _mm512_add_epi64(_mm512_and_si512(aH, mp), _mm512_srli_epi64(aH, 61)); /* < 2^61 + 8 */
        __m512i x = _mm512_add_epi64(aM, aH); /* < 2^61 + 2^36 */
        __m512i l = _mm512_add_epi64(aL, _mm512_add_epi64(_mm512_srli_epi64(x, 29),
                                     _mm512_slli_epi64(_mm512_and_si512(x, m29), 32)));
        l = _mm512_add_epi64(_mm512_and_si512(l, mp), _mm512_srli_epi64(l, 61)); /* < 2^61 + 2 */
        /* < 2^64; unsigned lanes (_mm512_reduce_add_epi64 adds them as signed) */
        __m256i s4 = _mm256_add_epi64(_mm512_castsi512_si256(l), _mm512_extracti64x4_epi64(l, 1));
        __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
        uint64_t b = (uint64_t)_mm_cvtsi128_si64(s2) + (uint64_t)_mm_extract_epi64(s2, 1);
        h = mul_lazy(h, A_VB) + reduce(b); /* < 2^61 + 4 + 2^61 */
    }
    return words_tail(h, p, n, g);
}
#define HAVE_X86_WORDS 1
#endif

/* words() in the given version (ms_isa.h). */
static uint64_t words_isa(enum ms_isa isa, const unsigned char *p, size_t n)
{
#ifdef HAVE_X86_WORDS
    if (isa == MS_ISA_AVX512)
        return words_avx512(p, n);
    if (isa == MS_ISA_AVX2)
        return words_avx2(p, n);
#endif
    (void)isa;
    return words(p, n);
}

/* Bytes d[0..len) inside the word starting at file offset 4w, the first at byte b of it. */
static uint64_t partial(uint64_t w, unsigned b, const unsigned char *d, size_t len)
{
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++)
        v |= (uint64_t)d[i] << (8 * (b + i));
    return mulmod(v, powmod(A, w));
}

uint64_t ms_poshash_range(uint64_t off, const void *data, size_t len)
{
    return ms_poshash_range_isa(ms_isa_active(), off, data, len);
}

uint64_t ms_poshash_range_isa(enum ms_isa isa, uint64_t off, const void *data, size_t len)
{
    const unsigned char *d = data;
    uint64_t s = 0;
    if (off % 4 && len) { /* the head, up to the next word boundary */
        size_t n = 4 - (size_t)(off % 4);
        n = n < len ? n : len;
        s = partial(off / 4, (unsigned)(off % 4), d, n);
        off += n, d += n, len -= n;
    }
    size_t nw = len / 4;
    if (nw)
        s = reduce(s + mulmod(words_isa(isa, d, nw), powmod(A, off / 4)));
    if (len % 4)
        s = reduce(s + partial(off / 4 + nw, 0, d + 4 * nw, len % 4));
    return s;
}

uint64_t ms_poshash_add(uint64_t a, uint64_t b) { return reduce(a + b); }

uint64_t ms_poshash_digest(uint64_t acc, uint64_t size)
{
    unsigned char b[24];
    memcpy(b, "poshash1", 8);
    for (int i = 0; i < 8; i++) {
        b[8 + i] = (unsigned char)(acc >> (8 * i));
        b[16 + i] = (unsigned char)(size >> (8 * i));
    }
    struct ms_xxh64 h;
    ms_xxh64_init(&h);
    ms_xxh64_update(&h, b, sizeof b);
    return ms_xxh64_digest(&h);
}
