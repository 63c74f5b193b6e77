/*
 * xacc.c - ms_xacc, the exact order-independent accumulator (ms_stage.h).
 *
 * Every finite double that is a float or the product of two floats is m * 2^e
 * with |m| < 2^53 and e in [-350, 203] (-350: the product of two least float
 * subnormals, 2^-298 = 2^52 * 2^-350; 203: the largest float squared is below
 * 2^256 = 2^53 * 2^203). Shifting e by XACC_BIAS = 352 (a multiple of 32) makes it
 * non-negative; the term is added as the integer m << (e' mod 32) (< 2^84) into
 * limb[e' / 32] (index <= 17). A limb thus takes 2^43 terms before it could
 * overflow, and the value of the accumulator is sum limb[k] * 2^(32k - 352)
 * exactly. Integer addition is associative, so any order or split of the
 * terms gives the same limbs.
 *
 * Inf and NaN are not representable in the limbs: they set bits in nonfinite,
 * and ms_xacc_value returns what IEEE addition of all terms would give (NaN if a
 * NaN or both infinities were added, else the infinity).
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"

#define XACC_BIAS 352
#define XACC_NLIMB ((int)MS_ARRAY_LEN(((struct ms_xacc *)0)->limb))
#define XACC_TOP 17                /* highest limb a term reaches */

enum { XACC_POSINF = 1u, XACC_NEGINF = 2u, XACC_NAN = 4u };

/* Adds one term to limb (nf collects non-finite kinds). Branch-free apart from
 * what the compiler turns into conditional moves; the caller guarantees v is a
 * float or a product of two floats (or Inf/NaN). */
static inline void xacc_term(__int128 *restrict limb, uint32_t *restrict nf, double v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof(u));
    uint64_t bexp = (u >> 52) & 0x7ffu;
    uint64_t frac = u & ((UINT64_C(1) << 52) - 1);
    uint64_t special = bexp == 0x7ffu;
    uint64_t neg = u >> 63;
    *nf |= (uint32_t)(special << (frac ? 2 : neg));
    /* Zero and specials add 0 at limb 0; normals add (2^52 | frac) at their exponent. */
    uint64_t normal = (bexp != 0) & !special;
    uint64_t m = (frac | (UINT64_C(1) << 52)) & -normal;
    uint64_t e = normal ? bexp - 1075 + XACC_BIAS : 0;
    int64_t sm = (int64_t)(m ^ -neg) + (int64_t)neg; /* conditional negate */
    /* Shift as unsigned: a left shift of a negative signed value is undefined. */
    limb[e >> 5] += (__int128)((unsigned __int128)(__int128)sm << (e & 31));
}

void ms_xacc_init(struct ms_xacc *a) { memset(a, 0, sizeof(*a)); }

void ms_xacc_add(struct ms_xacc *a, double v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof(u));
    uint64_t bexp = (u >> 52) & 0x7ffu;
    /* Outside the contract (e.g. 1e300, a double subnormal): a bug in the caller.
     * Poison the sum rather than write outside the limbs. */
    bool in_range = bexp == 0x7ffu || (bexp == 0 && (u << 1) == 0) ||
                    (bexp >= 1075 - XACC_BIAS && bexp - 1075 + XACC_BIAS < (XACC_TOP + 1) * 32);
    assert(in_range);
    if (!in_range) {
        a->nonfinite |= XACC_NAN;
        return;
    }
    xacc_term(a->limb, &a->nonfinite, v);
}

void ms_xacc_merge(struct ms_xacc *a, const struct ms_xacc *b)
{
    for (int k = 0; k < XACC_NLIMB; k++)
        a->limb[k] += b->limb[k];
    a->nonfinite |= b->nonfinite;
}

/* Carry-normalises d so that d[0..n-2] are in [0, 2^32) and d[n-1] holds the rest
 * (signed); the represented integer is unchanged. */
static void xacc_carry(__int128 *d, int n)
{
    for (int k = 0; k < n - 1; k++) {
        __int128 lo = d[k] & 0xffffffff;  /* two's complement: lo in [0, 2^32) */
        __int128 carry = (d[k] - lo) / ((__int128)1 << 32); /* exact division */
        d[k] = lo;
        d[k + 1] += carry;
    }
}

double ms_xacc_value(const struct ms_xacc *a)
{
    if (a->nonfinite) {
        if ((a->nonfinite & XACC_NAN) || a->nonfinite == (XACC_POSINF | XACC_NEGINF))
            return NAN;
        return a->nonfinite == XACC_POSINF ? INFINITY : -INFINITY;
    }
    __int128 d[XACC_NLIMB];
    memcpy(d, a->limb, sizeof(d));
    xacc_carry(d, XACC_NLIMB);
    bool neg = d[XACC_NLIMB - 1] < 0;
    if (neg) {
        for (int k = 0; k < XACC_NLIMB; k++)
            d[k] = -d[k];
        xacc_carry(d, XACC_NLIMB);
    }
    assert(d[XACC_NLIMB - 1] >= 0 && d[XACC_NLIMB - 1] < ((__int128)1 << 64));
    int top = XACC_NLIMB - 1;
    while (top >= 0 && d[top] == 0)
        top--;
    if (top < 0)
        return 0.0;
    /* The three highest digits (top digit < 2^64, so hi < 2^128) and a sticky bit
     * for everything below them. */
    unsigned __int128 hi = (unsigned __int128)d[top] << 64;
    if (top >= 1)
        hi |= (unsigned __int128)d[top - 1] << 32;
    if (top >= 2)
        hi |= (unsigned __int128)d[top - 2];
    bool sticky = false;
    for (int k = top - 3; k >= 0; k--)
        sticky |= d[k] != 0;
    int nbits = 128;
    while (!(hi >> (nbits - 1)))
        nbits--;
    /* hi has at least 65 bits (d[top] >= 1), so s >= 12. */
    int s = nbits - 53;
    assert(s >= 1);
    unsigned __int128 one = 1;
    uint64_t mant = (uint64_t)(hi >> s);
    unsigned __int128 rem = hi & ((one << s) - 1), half = one << (s - 1);
    if (rem > half || (rem == half && (sticky || (mant & 1))))
        mant++;               /* 2^53 after a carry is still exact in double */
    double r = ldexp((double)mant, s + 32 * (top - 2) - XACC_BIAS);
    return neg ? -r : r;
}

/* ------------------------------------------------------------------------ */
/* Kernels. A term is first added, as its signed mantissa shifted right by 5,  */
/* into an int64 bin per biased double exponent (one add, no shifts). Every    */
/* term of a kernel is a float or the product of two floats: its integer       */
/* mantissa has at most 48 significant bits, so the 53-bit double mantissa     */
/* ends in at least 5 zero bits and the shift is exact; a bin takes 2^14 terms */
/* (2^14 * 2^48 = 2^62) before it is flushed into the limbs as v << 5 at the   */
/* term's position. Bin k holds terms of biased exponent k + 723, i.e. shifted */
/* exponent e' = k: exactly the limb position of xacc_term, so the limbs get   */
/* the same integers. Two bin tables (even and odd elements) break the         */
/* load-add-store chain when neighbours share an exponent. The tables are per  */
/* thread and left zero after each call; a flush visits only the bins between */
/* the lowest and highest exponent met, so a call costs O(n + that range).     */

#define XB_LO 723                 /* biased exponent of bin 0 (= 1075 - XACC_BIAS) */
#define XB_N 560                  /* bins: biased exponents 723..1282 */
#define XB_BLOCK 16384            /* terms per bin table between flushes */

struct xacc_bins {
    int64_t b[2][XB_N];
    uint32_t nf;
    uint32_t lo, hi;              /* bins met since the last flush: [lo, hi] */
};

static _Thread_local struct xacc_bins xacc_tls = { .lo = XB_N, .hi = 0 };

static inline void xb_term(int64_t *restrict bin, uint32_t *restrict nf, uint32_t *restrict lo,
                           uint32_t *restrict hi, double v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof(u));
    uint64_t bexp = (u >> 52) & 0x7ffu;
    uint64_t frac = u & ((UINT64_C(1) << 52) - 1);
    uint64_t neg = u >> 63;
    *nf |= (uint32_t)((bexp == 0x7ffu) << (frac ? 2 : neg));
    /* zero, Inf and NaN fall outside the bins: they add 0 to bin 0 */
    uint64_t k = bexp - XB_LO;
    uint64_t valid = k < XB_N;
    k = valid ? k : 0;
    int64_t m = (int64_t)(((frac | (UINT64_C(1) << 52)) >> 5) & -valid);
    bin[k] += (m ^ -(int64_t)neg) + (int64_t)neg;
    uint32_t k32 = (uint32_t)k;
    *lo = valid && k32 < *lo ? k32 : *lo;
    *hi = valid && k32 > *hi ? k32 : *hi;
}

static void xb_flush(struct ms_xacc *a, struct xacc_bins *w)
{
    for (int t = 0; t < 2; t++)
        for (uint32_t k = w->lo; k <= w->hi && k < XB_N; k++) {
            int64_t v = w->b[t][k];
            if (!v)
                continue;
            w->b[t][k] = 0;
            unsigned __int128 wide = (unsigned __int128)(__int128)v << 5;
            a->limb[k >> 5] += (__int128)(wide << (k & 31));
        }
    a->nonfinite |= w->nf;
    w->nf = 0;
    w->lo = XB_N;
    w->hi = 0;
}

/* The kernels share one shape: TERM(i) is the exact double of element i. */
#define XACC_KERNEL(TERM)                                                        \
    struct xacc_bins *w = &xacc_tls;                                             \
    for (size_t i0 = 0; i0 < n; i0 += 2 * XB_BLOCK) {                            \
        size_t i1 = MS_MIN(n, i0 + 2 * XB_BLOCK), i = i0;                        \
        int64_t *restrict b0 = w->b[0], *restrict b1 = w->b[1];                  \
        uint32_t nf = 0, lo = w->lo, hi = w->hi;                                 \
        for (; i + 2 <= i1; i += 2) {                                            \
            xb_term(b0, &nf, &lo, &hi, TERM(i));                                 \
            xb_term(b1, &nf, &lo, &hi, TERM(i + 1));                             \
        }                                                                        \
        if (i < i1)                                                              \
            xb_term(b0, &nf, &lo, &hi, TERM(i));                                 \
        w->nf |= nf;                                                             \
        w->lo = lo;                                                              \
        w->hi = hi;                                                              \
        xb_flush(a, w);                                                          \
    }

/* The scalar reference of each kernel is ms_xacc_add of its terms one by one
 * (tests/test_xacc.c checks that the limbs are identical). */
void ms_xacc_dot(struct ms_xacc *a, const float *restrict x, const float *restrict y, size_t n)
{
#define DOT_TERM(i) ((double)x[i] * (double)y[i])
    XACC_KERNEL(DOT_TERM)
#undef DOT_TERM
}

void ms_xacc_sumsq(struct ms_xacc *a, const float *restrict x, size_t n)
{
#define SQ_TERM(i) ((double)x[i] * (double)x[i])
    XACC_KERNEL(SQ_TERM)
#undef SQ_TERM
}

void ms_xacc_sum(struct ms_xacc *a, const float *restrict x, size_t n)
{
#define SUM_TERM(i) ((double)x[i])
    XACC_KERNEL(SUM_TERM)
#undef SUM_TERM
}

void ms_xacc_sumabs(struct ms_xacc *a, const float *restrict x, size_t n)
{
#define ABS_TERM(i) fabs((double)x[i])
    XACC_KERNEL(ABS_TERM)
#undef ABS_TERM
}
