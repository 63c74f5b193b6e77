/*
 * poshash.c - the position-keyed checksum of ms_poshash.h: a polynomial hash
 * over the field of integers mod the Mersenne prime 2^61 - 1, evaluated by
 * Horner's rule over blocks of words (see words()).
 */
#include <string.h>

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
        s = reduce(s + mulmod(words(d, nw), powmod(A, off / 4)));
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
