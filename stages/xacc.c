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
#include "ms_isa.h"
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
/* Scalar kernels (the reference). A term is first added, as its signed      */
/* mantissa shifted right by 5, into an int64 bin per biased double exponent */
/* (one add, no shifts). Every term of a kernel is a float or the product of */
/* two floats: its integer mantissa has at most 48 significant bits, so the  */
/* 53-bit double mantissa ends in at least 5 zero bits and the shift is      */
/* exact; a bin takes 2^14 terms (2^14 * 2^48 = 2^62) before it is flushed   */
/* into the limbs as v << 5 at the term's position. Bin k holds terms of     */
/* biased exponent k + 723, i.e. shifted exponent e' = k: exactly the limb   */
/* position of xacc_term, so the limbs get the same integers. Two bin tables */
/* (even and odd elements) break the load-add-store chain when neighbours    */
/* share an exponent. The tables are per thread and left zero after each    */
/* call; a flush visits only the bins between the lowest and highest         */
/* exponent met, so a call costs O(n + that range).                          */

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

/* The four kernels differ only in their term. */
enum xacc_kind { XK_DOT, XK_SUMSQ, XK_SUM, XK_SUMABS };

/* The exact double of element i (y is read by XK_DOT only). */
static inline double xk_term(enum xacc_kind kind, const float *x, const float *y, size_t i)
{
    switch (kind) {
    case XK_DOT: return (double)x[i] * (double)y[i];
    case XK_SUMSQ: return (double)x[i] * (double)x[i];
    case XK_SUM: return (double)x[i];
    default: return fabs((double)x[i]);
    }
}

/* Adds the terms of x[0..n) (and y) to w's bins, even elements to the first
 * table, odd ones to the second; the caller flushes before a table has taken
 * more than XB_BLOCK terms since the last flush. */
static inline void xb_add(struct xacc_bins *w, enum xacc_kind kind, const float *restrict x,
                          const float *restrict y, size_t n)
{
    int64_t *restrict b0 = w->b[0], *restrict b1 = w->b[1];
    uint32_t nf = 0, lo = w->lo, hi = w->hi;
    size_t i = 0;
    for (; i + 2 <= n; i += 2) {
        xb_term(b0, &nf, &lo, &hi, xk_term(kind, x, y, i));
        xb_term(b1, &nf, &lo, &hi, xk_term(kind, x, y, i + 1));
    }
    if (i < n)
        xb_term(b0, &nf, &lo, &hi, xk_term(kind, x, y, i));
    w->nf |= nf;
    w->lo = lo;
    w->hi = hi;
}

/* The scalar kernels, kept as they were written before the vector versions
 * (the macro gives the compiler the term as an expression; through xb_add it
 * laid the loop out worse): TERM(i) is the exact double of element i. */
#define XACC_KERNEL(TERM)                                                                          \
    struct xacc_bins *w = &xacc_tls;                                                               \
    for (size_t i0 = 0; i0 < n; i0 += 2 * XB_BLOCK) {                                              \
        size_t i1 = MS_MIN(n, i0 + 2 * XB_BLOCK), i = i0;                                          \
        int64_t *restrict b0 = w->b[0], *restrict b1 = w->b[1];                                    \
        uint32_t nf = 0, lo = w->lo, hi = w->hi;                                                   \
        for (; i + 2 <= i1; i += 2) {                                                              \
            xb_term(b0, &nf, &lo, &hi, TERM(i));                                                   \
            xb_term(b1, &nf, &lo, &hi, TERM(i + 1));                                               \
        }                                                                                          \
        if (i < i1)                                                                                \
            xb_term(b0, &nf, &lo, &hi, TERM(i));                                                   \
        w->nf |= nf;                                                                               \
        w->lo = lo;                                                                                \
        w->hi = hi;                                                                                \
        xb_flush(a, w);                                                                            \
    }

/* The scalar reference of each kernel is ms_xacc_add of its terms one by one
 * (tests/test_xacc.c checks that the limbs are identical). */
static void xacc_dot_c(struct ms_xacc *a, const float *restrict x, const float *restrict y,
                       size_t n)
{
#define DOT_TERM(i) ((double)x[i] * (double)y[i])
    XACC_KERNEL(DOT_TERM)
#undef DOT_TERM
}

static void xacc_sumsq_c(struct ms_xacc *a, const float *restrict x, size_t n)
{
#define SQ_TERM(i) ((double)x[i] * (double)x[i])
    XACC_KERNEL(SQ_TERM)
#undef SQ_TERM
}

static void xacc_sum_c(struct ms_xacc *a, const float *restrict x, size_t n)
{
#define SUM_TERM(i) ((double)x[i])
    XACC_KERNEL(SUM_TERM)
#undef SUM_TERM
}

static void xacc_sumabs_c(struct ms_xacc *a, const float *restrict x, size_t n)
{
#define ABS_TERM(i) fabs((double)x[i])
    XACC_KERNEL(ABS_TERM)
#undef ABS_TERM
}

/* ------------------------------------------------------------------------ */
/* Vector kernels (AVX2, AVX-512). Same limbs as the scalar ones, computed   */
/* per block of XV_B elements in two passes over the block (in L1):          */
/*                                                                           */
/* 1. The largest and the smallest nonzero |term|. All zero: nothing to add. */
/*    An Inf/NaN, or nonzero terms spread over more than XV_J limbs: the     */
/*    block goes through the bins above (same limbs, scalar speed).          */
/* 2. A nonzero term t = m * 2^e lands in limb L = (e + 352) / 32 as the     */
/*    integer m << ((e + 352) mod 32) = t * 2^(352 - 32L) (xacc_term). Its   */
/*    mantissa ends in S zero bits (S = 5 for a float product, 29 for a      */
/*    float: 48 and 24 significant bits of 53), so w = t * 2^(352 - 32L - S) */
/*    is an integer, |w| < 2^(84 - S); the product is exact (a power of two, */
/*    no overflow or underflow for these exponents). L comes from the        */
/*    exponent bits; a zero term gets L = 0 and w = 0. w is converted to     */
/*    int64 exactly: whole (AVX-512 DQ vcvtpd2qq, float terms: |w| < 2^55),  */
/*    or split w = h * 2^P + r with h = round(w / 2^P) and the exact         */
/*    remainder r, both below 2^51, each converted by the 2^52 + 2^51        */
/*    magic-number addition (AVX2) or vcvtpd2qq (AVX-512 products).          */
/*    The int64 lanes sum the parts per limb: one unmasked sum of all terms, */
/*    and a masked sum per limb but the lowest (which is the difference).    */
/*    A lane takes XV_B / lanes terms per block (128 or 256): whole w are    */
/*    below 2^55 with 8 lanes (128 * 2^55 = 2^62), parts below 2^39, so no   */
/*    lane overflows.                                                        */
/*    At the end of the block each limb gets                                 */
/*    (sum h) * 2^(P + S) + (sum r) * 2^S: the sum of m << s of its terms,   */
/*    the integer the scalar kernels add.                                    */
/*                                                                           */
/* The double path. Pass 1 also bounds the significant bits b of the terms */
/* (from the OR of their bit patterns, or of the inputs' for sums of x, |x| */
/* and x * x, whose range pass 1 then takes from the inputs too: 16 floats  */
/* per AVX-512 vector). A limb's terms have exponents in [eL, eH], the      */
/* limb's 32 exponents clipped to the block's [emin, emax]: each term is a  */
/* multiple of 2^(eL - b + 1) and any partial sum of m of them is below     */
/* m * 2^(eH + 1). If b + (eH - eL) + ceil(log2 m) <= 53 for every limb of  */
/* the block (xv_exact; b is at most 16 for products of bf16 values, 8 for  */
/* bf16 values), every such partial sum is a double and a plain double sum  */
/* of the limb's terms in any order is exact. Pass 2 then adds each term in */
/* double to its limb's sum (masked adds; the limb told by comparing |term| */
/* with the limbs' lower edges); at the block's end each sum, an integer    */
/* number of its limb's units, is converted (xv_limb_int): the same integer */
/* per limb as the int64 path. Other blocks take the int64 path.            */
/*                                                                           */
/* Elements after the last whole vector go through xacc_term. All integer    */
/* additions: any order or split gives the same limbs.                       */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define XV_B 1024                 /* elements per block (a multiple of 8) */
#define XV_J 3                    /* limbs a block may span in the vector path */
#define XV_MAGIC 0x1.8p52         /* 2^52 + 2^51: x + it has x's integer in its low bits */
#define XV_MAGIC_BITS INT64_C(0x4338000000000000)

/* Mantissa zero bits S of a kind's terms, and the split point P of two-part w. */
#define XV_S(kind) ((kind) == XK_DOT || (kind) == XK_SUMSQ ? 5 : 29)
#define XV_P(kind) ((kind) == XK_DOT || (kind) == XK_SUMSQ ? 40 : 28)
/* Bits of 2^(352 - S) (the scale of limb 0); limb L's scale is this minus L << 57. */
#define XV_SCALE0(kind) ((int64_t)(1023 + 352 - XV_S(kind)) << 52)

/* The limbs a block's terms reach, from the bit patterns of its largest |term|
 * (hi) and smallest nonzero |term| (lo): the number of limbs J with *top the
 * highest; 0 when every term is zero, -1 for the bins (Inf/NaN, or more than
 * XV_J limbs). The sign bit is ignored: a square or |x| is nonnegative but a
 * NaN keeps its sign, which makes it the largest pattern all the same. */
static inline int xv_plan(uint64_t hi, uint64_t lo, uint32_t *top)
{
    uint32_t emax = (uint32_t)(hi >> 52) & 0x7ffu, emin = (uint32_t)(lo >> 52) & 0x7ffu;
    if (emax == 0)
        return 0;
    if (emax == 0x7ffu)
        return -1;
    assert(emin >= XB_LO && emax < XB_LO + XB_N); /* a float or a product of two */
    uint32_t lmax = (emax - XB_LO) >> 5, lmin = (emin - XB_LO) >> 5;
    *top = lmax;
    return lmax - lmin < XV_J ? (int)(lmax - lmin) + 1 : -1;
}

/* v * 2^sh as a limb increment (sh < 64; v signed). */
static inline __int128 xv_shl(__int128 v, int sh)
{
    return (__int128)((unsigned __int128)v << sh);
}

/* Significant bits at most of a term whose bit patterns OR to bits. */
static inline int xv_sigbits(uint64_t bits)
{
    return 53 - __builtin_ctzll((bits & ((UINT64_C(1) << 52) - 1)) | (UINT64_C(1) << 52));
}

/* hi, lo and the significant bits of the terms of a kind other than XK_DOT
 * from the bit patterns of the inputs' largest |x| (mx) and smallest nonzero
 * |x| (mn, 0 if none) and their OR (bits): a term is x, |x| or x * x. A float
 * (also a subnormal) with trailing zero bits z in its 23-bit fraction field
 * has at most 24 - z significant bits; a square at most twice as many. */
static inline void xv_from_inputs(enum xacc_kind kind, uint32_t mx, uint32_t mn, uint32_t bits,
                                  uint64_t *hi, uint64_t *lo, int *sig)
{
    float fx, fn;
    memcpy(&fx, &mx, 4);
    memcpy(&fn, &mn, 4);
    double dx = fx, dn = fn;
    if (kind == XK_SUMSQ) {
        dx *= dx;
        dn *= dn;
    }
    memcpy(hi, &dx, 8);
    memcpy(lo, &dn, 8);
    int bx = 24 - __builtin_ctz((bits & 0x7fffffu) | 0x800000u);
    *sig = kind == XK_SUMSQ ? 2 * bx : bx;
}

/* Whether a double sum of the terms of each limb of a block of m terms is
 * exact in any order (the double path above): hi, lo, top and nlimb (>= 1) as
 * for xv_plan, b the terms' significant bits at most. A limb's terms lie in
 * its 32 exponents and in [emin, emax]. */
static inline bool xv_exact(uint64_t hi, uint64_t lo, int b, size_t m, uint32_t top, int nlimb)
{
    int emax = (int)((hi >> 52) & 0x7ffu), emin = (int)((lo >> 52) & 0x7ffu);
    int lg = m > 1 ? 64 - __builtin_clzll((uint64_t)(m - 1)) : 0; /* ceil(log2 m) */
    for (int j = 0; j < nlimb; j++) {
        int e0 = XB_LO + 32 * ((int)top - j), e1 = e0 + 31; /* the limb's exponents */
        int s = MS_MIN(e1, emax) - MS_MAX(e0, emin);
        if (b + s + lg > 53)
            return false;
    }
    return true;
}

/* The limb increment of d, an exact sum of terms of limb L (an integer number
 * of the limb's units 2^(32L - 352), below 2^94 of them). */
static inline __int128 xv_limb_int(double d, uint32_t L)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    uint64_t bexp = (u >> 52) & 0x7ffu;
    if (bexp == 0)
        return 0; /* +-0: a nonzero d is at least one unit, a normal double */
    unsigned __int128 m = (u & ((UINT64_C(1) << 52) - 1)) | (UINT64_C(1) << 52);
    int e = (int)bexp - 1075 + XACC_BIAS - 32 * (int)L; /* d = m * 2^e units */
    __int128 v = (__int128)(e >= 0 ? m << e : m >> -e); /* exact: d is whole units */
    return u >> 63 ? -v : v;
}

/* Bits of the double 2^(32L - 352 + 52): the lower edge of limb L's terms. */
static inline int64_t xv_edge_bits(uint32_t L) { return (int64_t)(XB_LO + 32 * L) << 52; }

/* The driver and the four entry points of one ISA (PFX: x2, x5; ISA: avx2,
 * avx512; ATTR, INLINE: its target attributes) from its PFX_range and
 * PFX_accum: blocks, plan, the vector pass (the number of limbs a constant in
 * each copy of the loop) or the bins (flushed once per call, or every
 * 2 * XB_BLOCK binned terms), the tail. */
#define XV_DEFINE(PFX, ISA, LANES, ATTR, INLINE)                                                   \
    INLINE void PFX##_accum_n(enum xacc_kind kind, int nlimb, uint32_t top, const float *x,        \
                              const float *y, size_t n, __int128 *add)                             \
    {                                                                                              \
        switch (nlimb) {                                                                           \
        case 1: PFX##_accum(kind, 1, top, x, y, n, add); break;                                    \
        case 2: PFX##_accum(kind, 2, top, x, y, n, add); break;                                    \
        default: PFX##_accum(kind, 3, top, x, y, n, add); break;                                   \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    INLINE void PFX##_fsum_n(enum xacc_kind kind, int nlimb, uint32_t top, const float *x,         \
                             const float *y, size_t n, __int128 *add)                              \
    {                                                                                              \
        switch (nlimb) {                                                                           \
        case 1: PFX##_fsum(kind, 1, top, x, y, n, add); break;                                     \
        case 2: PFX##_fsum(kind, 2, top, x, y, n, add); break;                                     \
        default: PFX##_fsum(kind, 3, top, x, y, n, add); break;                                    \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    INLINE void PFX##_run(struct ms_xacc *a, enum xacc_kind kind, const float *restrict x,         \
                          const float *restrict y, size_t n)                                       \
    {                                                                                              \
        size_t nv = n - n % (LANES), binned = 0;                                                   \
        for (size_t i0 = 0; i0 < nv; i0 += XV_B) {                                                 \
            size_t m = MS_MIN((size_t)XV_B, nv - i0);                                              \
            const float *xb = x + i0, *yb = kind == XK_DOT ? y + i0 : NULL;                        \
            uint64_t hi, lo;                                                                       \
            uint32_t top = 0;                                                                      \
            int b;                                                                                 \
            PFX##_range(kind, xb, yb, m, &hi, &lo, &b);                                            \
            int nlimb = xv_plan(hi, lo, &top);                                                     \
            if (nlimb < 0) {                                                                       \
                if (binned + m > 2 * XB_BLOCK) {                                                   \
                    xb_flush(a, &xacc_tls);                                                        \
                    binned = 0;                                                                    \
                }                                                                                  \
                xb_add(&xacc_tls, kind, xb, yb, m); /* m even: half in each table */               \
                binned += m;                                                                       \
            } else if (nlimb > 0) {                                                                \
                __int128 add[XV_J];                                                                \
                if (xv_exact(hi, lo, b, m, top, nlimb))                                            \
                    PFX##_fsum_n(kind, nlimb, top, xb, yb, m, add);                                \
                else                                                                               \
                    PFX##_accum_n(kind, nlimb, top, xb, yb, m, add);                               \
                for (int j = 0; j < nlimb; j++)                                                    \
                    a->limb[top - (uint32_t)j] += add[j];                                          \
            }                                                                                      \
        }                                                                                          \
        if (binned)                                                                                \
            xb_flush(a, &xacc_tls);                                                                \
        for (size_t i = nv; i < n; i++)                                                            \
            xacc_term(a->limb, &a->nonfinite, xk_term(kind, x, y, i));                             \
    }                                                                                              \
                                                                                                   \
    ATTR static void xacc_dot_##ISA(struct ms_xacc *a, const float *restrict x,                    \
                                    const float *restrict y, size_t n)                             \
    {                                                                                              \
        PFX##_run(a, XK_DOT, x, y, n);                                                             \
    }                                                                                              \
    ATTR static void xacc_sumsq_##ISA(struct ms_xacc *a, const float *restrict x, size_t n)        \
    {                                                                                              \
        PFX##_run(a, XK_SUMSQ, x, NULL, n);                                                        \
    }                                                                                              \
    ATTR static void xacc_sum_##ISA(struct ms_xacc *a, const float *restrict x, size_t n)          \
    {                                                                                              \
        PFX##_run(a, XK_SUM, x, NULL, n);                                                          \
    }                                                                                              \
    ATTR static void xacc_sumabs_##ISA(struct ms_xacc *a, const float *restrict x, size_t n)       \
    {                                                                                              \
        PFX##_run(a, XK_SUMABS, x, NULL, n);                                                       \
    }

/* ---- AVX2: 4 lanes, two-part w through the magic number ---------------- */

#define X2_ATTR __attribute__((target("avx2")))
#define X2_INLINE X2_ATTR __attribute__((always_inline)) static inline

X2_INLINE __m256d x2_term(enum xacc_kind kind, const float *x, const float *y, size_t i)
{
    __m256d dx = _mm256_cvtps_pd(_mm_loadu_ps(x + i));
    switch (kind) {
    case XK_DOT: return _mm256_mul_pd(dx, _mm256_cvtps_pd(_mm_loadu_ps(y + i)));
    case XK_SUMSQ: return _mm256_mul_pd(dx, dx);
    case XK_SUM: return dx;
    default: return _mm256_andnot_pd(_mm256_set1_pd(-0.0), dx);
    }
}

/* Bit patterns of the largest |term| and smallest nonzero |term| of x[0..n),
 * and the terms' significant bits at most (*sig, for xv_exact). XK_DOT: only
 * the high 32 bits (sign, exponent, top of the mantissa) are kept, which is
 * enough for the exponents: unsigned 32-bit max and min over the high halves;
 * zero becomes the largest by the -1 (undone at the end). The other kinds:
 * from the inputs (xv_from_inputs). */
X2_INLINE void x2_range(enum xacc_kind kind, const float *x, const float *y, size_t n,
                        uint64_t *hi, uint64_t *lo, int *sig)
{
    const __m256i abs = _mm256_set1_epi64x(INT64_MAX), one = _mm256_set1_epi32(1);
    __m256i vmax = _mm256_setzero_si256(), vmin = _mm256_set1_epi32(-1), vor = vmax;
    if (kind != XK_DOT) { /* from the inputs, 8 at a time (n is a multiple of 4) */
        const __m256i abs32 = _mm256_set1_epi32(INT32_MAX);
        for (size_t i = 0; i < n; i += 8) {
            const __m128i *q = (const __m128i *)(x + i);
            __m256i v = i + 8 <= n ? _mm256_loadu_si256((const __m256i *)q)
                                   : _mm256_zextsi128_si256(_mm_loadu_si128(q));
            v = _mm256_and_si256(v, abs32);
            vor = _mm256_or_si256(vor, v);
            vmax = _mm256_max_epu32(vmax, v);
            vmin = _mm256_min_epu32(vmin, _mm256_sub_epi32(v, one));
        }
        uint32_t mx[8], mn[8], o[8], h = 0, l = UINT32_MAX, bits = 0;
        _mm256_storeu_si256((__m256i *)mx, vmax);
        _mm256_storeu_si256((__m256i *)mn, vmin);
        _mm256_storeu_si256((__m256i *)o, vor);
        for (int k = 0; k < 8; k++) {
            h = mx[k] > h ? mx[k] : h;
            l = mn[k] < l ? mn[k] : l;
            bits |= o[k];
        }
        xv_from_inputs(kind, h, l + 1, bits, hi, lo, sig);
        return;
    }
    for (size_t i = 0; i < n; i += 4) {
        __m256i b = _mm256_castpd_si256(x2_term(kind, x, y, i));
        vor = _mm256_or_si256(vor, b);
        if (kind == XK_DOT || kind == XK_SUM)
            b = _mm256_and_si256(b, abs);
        vmax = _mm256_max_epu32(vmax, b);
        vmin = _mm256_min_epu32(vmin, _mm256_sub_epi32(b, one));
    }
    uint32_t mx[8], mn[8];
    _mm256_storeu_si256((__m256i *)mx, vmax);
    _mm256_storeu_si256((__m256i *)mn, vmin);
    uint32_t h = 0, l = UINT32_MAX;
    for (int k = 1; k < 8; k += 2) {
        h = mx[k] > h ? mx[k] : h;
        l = mn[k] < l ? mn[k] : l;
    }
    *hi = (uint64_t)h << 32;
    *lo = (uint64_t)(uint32_t)(l + 1) << 32;
    uint64_t o[4];
    _mm256_storeu_si256((__m256i *)o, vor);
    *sig = xv_sigbits(o[0] | o[1] | o[2] | o[3]);
}

/* The lanes of v, less count * XV_MAGIC_BITS each, summed (exactly, as 128-bit). */
X2_INLINE __int128 x2_hsum(__m256i v, __m256i count)
{
    int64_t s[4], c[4];
    _mm256_storeu_si256((__m256i *)s, v);
    _mm256_storeu_si256((__m256i *)c, count);
    __int128 t = 0;
    for (int k = 0; k < 4; k++)
        t += (int64_t)((uint64_t)s[k] - (uint64_t)c[k] * (uint64_t)XV_MAGIC_BITS);
    return t;
}

/* add[j] = the increment of limb top - j from the terms of x[0..n), j < nlimb.
 * The lanes sum the magic-biased bit patterns (h + magic bits, r + magic bits,
 * modulo 2^64); x2_hsum removes the bias with the count of terms summed. */
X2_INLINE void x2_accum(enum xacc_kind kind, int nlimb, uint32_t top, const float *x,
                        const float *y, size_t n, __int128 *add)
{
    const int S = XV_S(kind), P = XV_P(kind);
    const __m256i c723 = _mm256_set1_epi64x(XB_LO), cs = _mm256_set1_epi64x(XV_SCALE0(kind));
    const __m256i e11 = _mm256_set1_epi64x(0x7ff);
    const __m256d magic = _mm256_set1_pd(XV_MAGIC), down = _mm256_set1_pd(ldexp(1.0, -P)),
                  up = _mm256_set1_pd(ldexp(1.0, P));
    __m256i th = _mm256_setzero_si256(), tr = th, mh[XV_J - 1], mr[XV_J - 1], mc[XV_J - 1],
            lj[XV_J - 1];
    for (int j = 0; j < nlimb - 1; j++) {
        mh[j] = mr[j] = mc[j] = th;
        lj[j] = _mm256_set1_epi64x((int64_t)top - j);
    }
    for (size_t i = 0; i < n; i += 4) {
        __m256d t = x2_term(kind, x, y, i);
        __m256i e = _mm256_srli_epi64(_mm256_castpd_si256(t), 52);
        if (kind == XK_DOT || kind == XK_SUM)
            e = _mm256_and_si256(e, e11);
        /* saturating: a zero term gets k = 0, hence L = 0 and a finite scale */
        __m256i limb = _mm256_srli_epi64(_mm256_subs_epu16(e, c723), 5);
        __m256d w = _mm256_mul_pd(
            t, _mm256_castsi256_pd(_mm256_sub_epi64(cs, _mm256_slli_epi64(limb, 57))));
        __m256d yh = _mm256_add_pd(_mm256_mul_pd(w, down), magic);
        __m256d r = _mm256_sub_pd(w, _mm256_mul_pd(_mm256_sub_pd(yh, magic), up));
        __m256i h = _mm256_castpd_si256(yh), rb = _mm256_castpd_si256(_mm256_add_pd(r, magic));
        th = _mm256_add_epi64(th, h);
        tr = _mm256_add_epi64(tr, rb);
        for (int j = 0; j < nlimb - 1; j++) {
            __m256i sel = _mm256_cmpeq_epi64(limb, lj[j]);
            mh[j] = _mm256_add_epi64(mh[j], _mm256_and_si256(sel, h));
            mr[j] = _mm256_add_epi64(mr[j], _mm256_and_si256(sel, rb));
            mc[j] = _mm256_sub_epi64(mc[j], sel);
        }
    }
    /* every lane summed n / 4 terms into th and tr */
    __m256i tc = _mm256_set1_epi64x((int64_t)(n / 4));
    __int128 last = xv_shl(x2_hsum(th, tc), P + S) + xv_shl(x2_hsum(tr, tc), S);
    for (int j = 0; j < nlimb - 1; j++) {
        add[j] = xv_shl(x2_hsum(mh[j], mc[j]), P + S) + xv_shl(x2_hsum(mr[j], mc[j]), S);
        last -= add[j];
    }
    add[nlimb - 1] = last;
}

/* As x2_accum by the double path (the caller checked xv_exact): a double
 * sum per limb, the limb told by comparing |term| with the lower edges of the
 * limbs above the lowest; four accumulators of each hide the latency of the
 * additions. */
X2_INLINE void x2_fsum(enum xacc_kind kind, int nlimb, uint32_t top, const float *x,
                       const float *y, size_t n, __int128 *add)
{
    const bool sign = kind == XK_DOT || kind == XK_SUM;
    const __m256d abs = _mm256_castsi256_pd(_mm256_set1_epi64x(INT64_MAX));
    __m256d acc[XV_J][4], edge[XV_J - 1];
    for (int j = 0; j < nlimb; j++)
        for (int u = 0; u < 4; u++)
            acc[j][u] = _mm256_setzero_pd();
    for (int j = 0; j < nlimb - 1; j++)
        edge[j] = _mm256_castsi256_pd(_mm256_set1_epi64x(xv_edge_bits(top - (uint32_t)j)));
    size_t i = 0;
#define X2_FSUM_STEP(u, i)                                                                         \
    do {                                                                                           \
        __m256d v = x2_term(kind, x, y, (i)), av = sign ? _mm256_and_pd(v, abs) : v, prev = v;     \
        for (int j = 0; j < nlimb - 1; j++) { /* k: at or above limb top - j */                    \
            __m256d k = _mm256_cmp_pd(av, edge[j], _CMP_GE_OQ);                                    \
            acc[j][u] = _mm256_add_pd(acc[j][u], _mm256_and_pd(k, j ? prev : v));                  \
            prev = _mm256_andnot_pd(k, v);                                                         \
        }                                                                                          \
        acc[nlimb - 1][u] = _mm256_add_pd(acc[nlimb - 1][u], prev);                                \
    } while (0)
    for (; i + 16 <= n; i += 16) {
        X2_FSUM_STEP(0, i);
        X2_FSUM_STEP(1, i + 4);
        X2_FSUM_STEP(2, i + 8);
        X2_FSUM_STEP(3, i + 12);
    }
    for (; i < n; i += 4)
        X2_FSUM_STEP(0, i);
#undef X2_FSUM_STEP
    for (int j = 0; j < nlimb; j++) {
        __m256d *v = acc[j];
        double l[4];
        _mm256_storeu_pd(l, _mm256_add_pd(_mm256_add_pd(v[0], v[1]), _mm256_add_pd(v[2], v[3])));
        add[j] = xv_limb_int((l[0] + l[1]) + (l[2] + l[3]), top - (uint32_t)j);
    }
}

XV_DEFINE(x2, avx2, 4, X2_ATTR, X2_INLINE)

/* ---- AVX-512: 8 lanes, vcvtpd2qq, mask registers ------------------------ */

#define X5_ATTR __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq")))
#define X5_INLINE X5_ATTR __attribute__((always_inline)) static inline

X5_INLINE __m512d x5_term(enum xacc_kind kind, const float *x, const float *y, size_t i)
{
    __m512d dx = _mm512_cvtps_pd(_mm256_loadu_ps(x + i));
    switch (kind) {
    case XK_DOT: return _mm512_mul_pd(dx, _mm512_cvtps_pd(_mm256_loadu_ps(y + i)));
    case XK_SUMSQ: return _mm512_mul_pd(dx, dx);
    case XK_SUM: return dx;
    default: return _mm512_abs_pd(dx);
    }
}

/* As x2_range, with whole 64-bit patterns (zero becomes the largest by the -1). */
X5_INLINE void x5_range(enum xacc_kind kind, const float *x, const float *y, size_t n,
                        uint64_t *hi, uint64_t *lo, int *sig)
{
    const __m512i abs = _mm512_set1_epi64(INT64_MAX), one = _mm512_set1_epi64(1);
    __m512i vmax = _mm512_setzero_si512(), vmin = _mm512_set1_epi64(-1), vor = vmax;
    if (kind != XK_DOT) { /* from the inputs, 16 at a time (n is a multiple of 8) */
        const __m512i abs32 = _mm512_set1_epi32(INT32_MAX), one32 = _mm512_set1_epi32(1);
        for (size_t i = 0; i < n; i += 16) {
            __mmask16 k = i + 16 <= n ? 0xffff : 0x00ff;
            __m512i v = _mm512_and_si512(_mm512_maskz_loadu_epi32(k, x + i), abs32);
            vor = _mm512_or_si512(vor, v);
            vmax = _mm512_max_epu32(vmax, v);
            vmin = _mm512_min_epu32(vmin, _mm512_sub_epi32(v, one32));
        }
        xv_from_inputs(kind, _mm512_reduce_max_epu32(vmax), _mm512_reduce_min_epu32(vmin) + 1,
                       (uint32_t)_mm512_reduce_or_epi32(vor), hi, lo, sig);
        return;
    }
    for (size_t i = 0; i < n; i += 8) {
        __m512i b = _mm512_castpd_si512(x5_term(kind, x, y, i));
        vor = _mm512_or_si512(vor, b);
        if (kind == XK_DOT || kind == XK_SUM)
            b = _mm512_and_si512(b, abs);
        vmax = _mm512_max_epu64(vmax, b);
        vmin = _mm512_min_epu64(vmin, _mm512_sub_epi64(b, one));
    }
    *hi = _mm512_reduce_max_epu64(vmax);
    *lo = _mm512_reduce_min_epu64(vmin) + 1;
    *sig = xv_sigbits((uint64_t)_mm512_reduce_or_epi64(vor));
}

/* The lanes of v summed exactly (as 128-bit). */
X5_INLINE __int128 x5_hsum(__m512i v)
{
    int64_t s[8];
    _mm512_storeu_si512(s, v);
    __int128 t = 0;
    for (int k = 0; k < 8; k++)
        t += s[k];
    return t;
}

/* As x2_accum. Float terms (|w| < 2^55) convert whole; products in two parts. */
X5_INLINE void x5_accum(enum xacc_kind kind, int nlimb, uint32_t top, const float *x,
                        const float *y, size_t n, __int128 *add)
{
    const bool whole = kind == XK_SUM || kind == XK_SUMABS;
    const int S = XV_S(kind), P = XV_P(kind);
    const __m512i c723 = _mm512_set1_epi64(XB_LO), cs = _mm512_set1_epi64(XV_SCALE0(kind));
    const __m512i e11 = _mm512_set1_epi64(0x7ff);
    const __m512d down = _mm512_set1_pd(ldexp(1.0, -P)), up = _mm512_set1_pd(ldexp(1.0, P));
    __m512i th = _mm512_setzero_si512(), tr = th, mh[XV_J - 1], mr[XV_J - 1], lj[XV_J - 1];
    for (int j = 0; j < nlimb - 1; j++) {
        mh[j] = mr[j] = th;
        lj[j] = _mm512_set1_epi64((int64_t)top - j);
    }
    for (size_t i = 0; i < n; i += 8) {
        __m512d t = x5_term(kind, x, y, i);
        __m512i e = _mm512_srli_epi64(_mm512_castpd_si512(t), 52);
        if (kind == XK_DOT || kind == XK_SUM)
            e = _mm512_and_si512(e, e11);
        __m512i limb = _mm512_srli_epi64(_mm512_subs_epu16(e, c723), 5);
        __m512d w = _mm512_mul_pd(
            t, _mm512_castsi512_pd(_mm512_sub_epi64(cs, _mm512_slli_epi64(limb, 57))));
        __m512i h, r = _mm512_setzero_si512();
        if (whole) {
            h = _mm512_cvtpd_epi64(w); /* w is an integer: exact in any rounding mode */
        } else {
            __m512d hd = _mm512_roundscale_pd(_mm512_mul_pd(w, down),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            h = _mm512_cvtpd_epi64(hd);
            r = _mm512_cvtpd_epi64(_mm512_sub_pd(w, _mm512_mul_pd(hd, up)));
            tr = _mm512_add_epi64(tr, r);
        }
        th = _mm512_add_epi64(th, h);
        for (int j = 0; j < nlimb - 1; j++) {
            __mmask8 sel = _mm512_cmpeq_epi64_mask(limb, lj[j]);
            mh[j] = _mm512_mask_add_epi64(mh[j], sel, mh[j], h);
            if (!whole)
                mr[j] = _mm512_mask_add_epi64(mr[j], sel, mr[j], r);
        }
    }
    const int hs = whole ? S : P + S;
    __int128 last = xv_shl(x5_hsum(th), hs) + (whole ? 0 : xv_shl(x5_hsum(tr), S));
    for (int j = 0; j < nlimb - 1; j++) {
        add[j] = xv_shl(x5_hsum(mh[j]), hs) + (whole ? 0 : xv_shl(x5_hsum(mr[j]), S));
        last -= add[j];
    }
    add[nlimb - 1] = last;
}

/* As x2_fsum, with mask registers. */
X5_INLINE void x5_fsum(enum xacc_kind kind, int nlimb, uint32_t top, const float *x,
                       const float *y, size_t n, __int128 *add)
{
    const bool sign = kind == XK_DOT || kind == XK_SUM;
    __m512d acc[XV_J][4], edge[XV_J - 1];
    for (int j = 0; j < nlimb; j++)
        for (int u = 0; u < 4; u++)
            acc[j][u] = _mm512_setzero_pd();
    for (int j = 0; j < nlimb - 1; j++)
        edge[j] = _mm512_castsi512_pd(_mm512_set1_epi64(xv_edge_bits(top - (uint32_t)j)));
    size_t i = 0;
#define X5_FSUM_STEP(u, i)                                                                         \
    do {                                                                                           \
        __m512d v = x5_term(kind, x, y, (i)), av = sign ? _mm512_abs_pd(v) : v;                    \
        __mmask8 rest = 0xff; /* lanes below the limbs handled so far */                           \
        for (int j = 0; j < nlimb - 1; j++) {                                                      \
            __mmask8 k = _mm512_cmp_pd_mask(av, edge[j], _CMP_GE_OQ);                              \
            acc[j][u] = _mm512_mask_add_pd(acc[j][u], k & rest, acc[j][u], v);                     \
            rest = (__mmask8)~k;                                                                   \
        }                                                                                          \
        acc[nlimb - 1][u] = _mm512_mask_add_pd(acc[nlimb - 1][u], rest, acc[nlimb - 1][u], v);     \
    } while (0)
    for (; i + 32 <= n; i += 32) {
        X5_FSUM_STEP(0, i);
        X5_FSUM_STEP(1, i + 8);
        X5_FSUM_STEP(2, i + 16);
        X5_FSUM_STEP(3, i + 24);
    }
    for (; i < n; i += 8)
        X5_FSUM_STEP(0, i);
#undef X5_FSUM_STEP
    for (int j = 0; j < nlimb; j++) {
        __m512d *v = acc[j];
        add[j] = xv_limb_int(_mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(v[0], v[1]),
                                                                _mm512_add_pd(v[2], v[3]))),
                             top - (uint32_t)j);
    }
}

XV_DEFINE(x5, avx512, 8, X5_ATTR, X5_INLINE)

#define HAVE_XV_KERNELS 1
#endif

/* ------------------------------------------------------------------------ */

static const struct ms_xacc_kernels xacc_kernels[MS_ISA_COUNT] = {
    [MS_ISA_SCALAR] = { xacc_dot_c, xacc_sumsq_c, xacc_sum_c, xacc_sumabs_c },
#ifdef HAVE_XV_KERNELS
    [MS_ISA_AVX2] = { xacc_dot_avx2, xacc_sumsq_avx2, xacc_sum_avx2, xacc_sumabs_avx2 },
    [MS_ISA_AVX512] = { xacc_dot_avx512, xacc_sumsq_avx512, xacc_sum_avx512, xacc_sumabs_avx512 },
#endif
};

const struct ms_xacc_kernels *ms_xacc_kernels(enum ms_isa isa)
{
    if ((unsigned)isa >= MS_ISA_COUNT || !xacc_kernels[isa].dot || !ms_isa_available(isa))
        return NULL;
    return &xacc_kernels[isa];
}

void ms_xacc_dot(struct ms_xacc *a, const float *restrict x, const float *restrict y, size_t n)
{
    xacc_kernels[ms_isa_active()].dot(a, x, y, n);
}

void ms_xacc_sumsq(struct ms_xacc *a, const float *restrict x, size_t n)
{
    xacc_kernels[ms_isa_active()].sumsq(a, x, n);
}

void ms_xacc_sum(struct ms_xacc *a, const float *restrict x, size_t n)
{
    xacc_kernels[ms_isa_active()].sum(a, x, n);
}

void ms_xacc_sumabs(struct ms_xacc *a, const float *restrict x, size_t n)
{
    xacc_kernels[ms_isa_active()].sumabs(a, x, n);
}
