/*
 * nuslerp.c - the `nuslerp` method (mergekit-spec.md 2.4): spherical
 * interpolation of two models, or of their task vectors around a base, over
 * the whole tensor, each row, or each column.
 *
 * Inputs: one tensor is returned unchanged. With a base (job->base >= 0) there
 * must be exactly 3 (the base and two others), else exactly 2. x0, x1 are the
 * non-base inputs in input order, w0, w1 their weights; in Python doubles
 *   t = w1/(w0 + w1), or 0.5 when |w0 + w1| < 1e-6.
 * With rnd() rounding to the compute dtype D:
 *   v_k = rnd(x_k - base) with a base, else x_k
 *   per vector (see "modes"):
 *     n_k = max(rnd(sqrtf(float32(sum v_k^2))), rnd(1e-7))   torch.norm, clamp bound in D
 *     u_k = rnd(v_k / n_k)
 *     c   = clamp(rnd(float32(sum rnd(u_0*u_1))), -1, 1)
 *     th  = rnd(acosf(c)), s = rnd(sinf(th))
 *     a   = rnd(sinf(rnd(float32(1-t)*th))), b = rnd(sinf(rnd(float32(t)*th)))
 *     r   = rnd(rnd(rnd(a*v_0) + rnd(b*v_1)) / s)
 *     |s| < rnd(1e-8) ("colinear"): r = rnd(rnd(float32(1-t)*v_0) + rnd(float32(t)*v_1))
 *   out = rnd(base + r) with a base, else r
 * (torch casts the bound of a clamp or comparison with a Python scalar to D;
 * a Python scalar times a D tensor is a float32 product rounded to D.)
 *
 * Mixed input dtypes (no dtype:; compute is then F32): torch promotes op by op
 * (struct nus_dt). v_k, its norm, the clamp bound and u_k are in d_k = P(x_k,
 * base) (x_k's own dtype without a base); u_0*u_1, the cosine, th, the sines
 * and the mix in P(d_0, d_1), except the colinear (1-t)*v_0 and t*v_1, in d_0
 * and d_1; base + r in the promotion of all three.
 *
 * Modes ("vectors"), all independent of chunking:
 * - nuslerp_flatten (default): the whole tensor is one vector. Two reduce
 *   passes: the sums of squares, then the sum of rounded u_0*u_1 (it needs
 *   the norms: u is rounded to D before the product, as in torch). Sums are
 *   exact (ms_xacc) and rounded once to float32 where torch adds in float32 in
 *   a blocked order: about 1 ulp of a scalar apart in rare cases (spec 7.20).
 * - flatten false, row_wise false: each row (last dim) is a vector. The stage
 *   is ROWWISE and apply does a row at a time with exact sums, no reduce.
 * - flatten false, row_wise true: the vectors run along dim 0 (mergekit
 *   transposes (0, -1)): for a [R, C] matrix, the C columns; in general the
 *   columns of the [shape[0], numel/shape[0]] view. Every column needs sums over
 *   all rows, and exact accumulators (340 bytes each) per column per chunk would
 *   make partials larger than the chunks. Instead, three reduce passes with
 *   small per-column partials:
 *     pass 0: the largest |v_k| of each column (as a bit pattern: order-free);
 *     pass 1: sum v_k^2 per column in 128-bit fixed point, each term scaled by
 *             2^(125 - 2e - L) where the column's largest |v_k| < 2^e and the
 *             column has at most 2^L rows: no overflow, terms keep >= 120 - L
 *             bits below the largest one, and the truncation of each term is
 *             fixed, so the sum does not depend on the order;
 *     pass 2: sum rnd(u_0*u_1) per column the same way with scale 2^(124 - L)
 *             (|u| <= 1 + 2^-20).
 *   This is exact up to terms more than ~2^100 times smaller than the column's
 *   largest, far below float32 resolution. The state holds per-column results
 *   (NUS_COL_BYTES per column) up to NUS_STATE_CAP: a tensor with more columns
 *   is an error from begin naming it. NaN or Inf in a column make its norm NaN
 *   or Inf, as torch's would be.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

#define NUS_STATE_CAP ((size_t)64 << 20) /* bytes of per-column state, row_wise mode */

enum nus_mode { NUS_COPY, NUS_FLAT, NUS_ROWS, NUS_COLS };

/* The per-vector scalars apply uses. */
struct nus_coef {
    float a, b, s;                /* sin((1-t)th), sin(t th), sin th, all in D */
    bool colinear;
};

/* One column's results (row_wise mode), in the state. */
struct nus_col {
    __int128 s0, s1, sc;          /* folded fixed-point sums: v_0^2, v_1^2, u_0*u_1 */
    uint32_t key0, key1;          /* pass 0: largest |v_k| bit pattern (NaN > Inf > finite) */
    uint32_t nf;                  /* pass 2: a non-finite product was met */
    int32_t k0, k1;               /* pass 1 scale exponents */
    float n0, n1;                 /* clamped norms (end of pass 1) */
    struct nus_coef cf;           /* end of pass 2 */
};
#define NUS_COL_BYTES sizeof(struct nus_col)

/* One column's share of a chunk (row_wise mode partial), by pass. */
union nus_pcol {
    struct { uint32_t key0, key1; } mx;
    struct { __int128 s0, s1; } sq;
    struct { __int128 sc; uint32_t nf; } cs;
};

struct nus_sums {
    struct ms_xacc s0, s1, sc;
};

/* The dtype of each step (file comment, "mixed input dtypes"); all D when the
 * inputs share one dtype. */
struct nus_dt {
    enum ms_dtype v[2];           /* v_k, its norm and u_k; the colinear (1-t)*v_0, t*v_1 */
    enum ms_dtype p;              /* u_0*u_1 and everything after it */
    enum ms_dtype out;            /* base + r */
};

struct nus_state {
    enum nus_mode mode;
    bool mixed;                   /* inputs of different dtypes: dt applies */
    struct nus_dt dt;
    uint32_t i0, i1;              /* input index of x0, x1 (NUS_COPY: i0) */
    int ib;                       /* input index of the base, or -1 */
    float c0, c1;                 /* float32(1 - t), float32(t) */
    float lo7[2], lo8;            /* rnd(1e-7) in each v_k's dtype, rnd(1e-8) in dt.p */
    uint32_t pass;                /* reduce pass under way */
    /* NUS_FLAT */
    struct nus_sums sums;
    float n0, n1;
    struct nus_coef cf;
    /* NUS_COLS */
    uint64_t cols;                /* columns: numel / shape[0] */
    uint32_t lbits;               /* L: rows <= 2^L */
    struct nus_col col[];         /* cols entries */
};

static uint64_t nus_cols(const struct ms_stage_job *job)
{
    return job->ndim >= 1 && job->shape[0] > 0 ? job->numel / (uint64_t)job->shape[0] : 1;
}

static bool nus_is_cols(const struct ms_stage_job *job)
{
    int pf = ms_method_param(job->method, "nuslerp_flatten");
    int pr = ms_method_param(job->method, "nuslerp_row_wise");
    return pf >= 0 && pr >= 0 && job->gv[pf] == 0 && job->gv[pr] != 0;
}

static size_t nus_state_size(const struct ms_stage_job *job)
{
    size_t size = sizeof(struct nus_state);
    uint64_t cols = nus_cols(job);
    if (nus_is_cols(job) && cols <= NUS_STATE_CAP / NUS_COL_BYTES)
        size += (size_t)cols * NUS_COL_BYTES;
    return size;
}

static size_t nus_partial_size(const struct ms_stage_job *job)
{
    if (!nus_is_cols(job))
        return sizeof(struct nus_sums);
    uint64_t cols = nus_cols(job);
    return cols <= NUS_STATE_CAP / NUS_COL_BYTES ? (size_t)cols * sizeof(union nus_pcol) : 0;
}

static int nus_begin(void *state, const struct ms_stage_job *job)
{
    struct nus_state *s = state;
    int pw = ms_method_param(job->method, "weight");
    int pf = ms_method_param(job->method, "nuslerp_flatten");
    assert(pw >= 0 && pf >= 0);
    if (job->ninputs == 1) {
        s->mode = NUS_COPY;
        s->i0 = 0;
        return MS_STAGE_APPLY;
    }
    s->ib = job->base >= 0 && (uint32_t)job->base < job->ninputs ? job->base : -1;
    if (s->ib >= 0 && job->ninputs != 3)
        return ms_error(MS_EPLAN, "%s: nuslerp with a base model merges the base and two other "
                        "models, got %u tensors", job->name, job->ninputs);
    if (s->ib < 0 && job->ninputs != 2)
        return ms_error(MS_EPLAN, "%s: nuslerp merges exactly two models (plus an optional "
                        "base), got %u tensors", job->name, job->ninputs);
    uint32_t k = 0, idx[2];
    for (uint32_t i = 0; i < job->ninputs; i++)
        if ((int)i != s->ib)
            idx[k++] = i;
    s->i0 = idx[0];
    s->i1 = idx[1];
    double w0 = job->pv[s->i0][pw], w1 = job->pv[s->i1][pw], sum = w0 + w1;
    double t = fabs(sum) < 1e-6 ? 0.5 : w1 / sum;
    s->c0 = (float)(1.0 - t);
    s->c1 = (float)t;
    /* Mixed input dtypes: torch promotes op by op (file comment). */
    enum ms_dtype d0 = ms_stage_in_dt(job, s->i0), d1 = ms_stage_in_dt(job, s->i1);
    if (s->ib >= 0) {
        enum ms_dtype db = ms_stage_in_dt(job, (uint32_t)s->ib);
        d0 = ms_dt_promote(d0, db);
        d1 = ms_dt_promote(d1, db);
        s->dt.out = ms_dt_promote(ms_dt_promote(d0, d1), db);
    } else {
        s->dt.out = ms_dt_promote(d0, d1);
    }
    s->dt.v[0] = d0;
    s->dt.v[1] = d1;
    s->dt.p = ms_dt_promote(d0, d1);
    s->mixed = d0 != job->compute || d1 != job->compute || s->dt.out != job->compute;
    if (!s->mixed)
        s->dt = (struct nus_dt){ { job->compute, job->compute }, job->compute, job->compute };
    s->lo7[0] = ms_rnd_param(s->dt.v[0], 1e-7);
    s->lo7[1] = ms_rnd_param(s->dt.v[1], 1e-7);
    s->lo8 = ms_rnd_param(s->dt.p, 1e-8);
    s->pass = 0;
    if (job->gv[pf] != 0 || job->ndim == 0) {
        s->mode = NUS_FLAT;
        ms_xacc_init(&s->sums.s0);
        ms_xacc_init(&s->sums.s1);
        return MS_STAGE_REDUCE;
    }
    if (!nus_is_cols(job)) {
        s->mode = NUS_ROWS;
        return MS_STAGE_APPLY;
    }
    s->mode = NUS_COLS;
    s->cols = nus_cols(job);
    if (s->cols > NUS_STATE_CAP / NUS_COL_BYTES)
        return ms_error(MS_EUNSUPPORTED, "%s: nuslerp_row_wise over %llu columns needs more than "
                        "%zu MiB of state (at most %zu columns)", job->name,
                        (unsigned long long)s->cols, NUS_STATE_CAP >> 20,
                        NUS_STATE_CAP / NUS_COL_BYTES);
    uint64_t rows = job->numel / s->cols;
    s->lbits = rows <= 1 ? 0 : 64u - (uint32_t)__builtin_clzll(rows - 1);
    return MS_STAGE_REDUCE;
}

/* ------------------------------------------------------------------------ */
/* Per-vector scalars and per-element kernels.                               */

/*
 * NaN rule of the output's operations (any version, any path): an operation
 * that meets a NaN first operand gives that NaN, quieted, in torch's operand
 * order (x - base, coefficient * v, the first term + the second, numerator /
 * sin th, base + r); otherwise IEEE's. Two NaN meet only where the tensor (or
 * the row or column) holds a NaN, and then the compiler may put either operand
 * of an instruction first, and x86 returns the first one's NaN: the choice is
 * made explicit so that the float path, the stored path and every version give
 * the same bytes (ms__mul_first, ms__add_first).
 */
MS__AI float nus_sub_first(float x, float y)
{
    return x != x ? ms_f32_from_bits(ms_f32_bits(x) | 0x00400000u) : x - y;
}

MS__AI float nus_div_first(float x, float y)
{
    return x != x ? ms_f32_from_bits(ms_f32_bits(x) | 0x00400000u) : x / y;
}

static inline float nus_v(struct nus_dt d, const struct nus_state *s, const struct ms_chunk *c,
                          uint32_t k, size_t j)
{
    float x = c->in[k ? s->i1 : s->i0][j];
    return s->ib >= 0 ? ms_rnd(d.v[k], nus_sub_first(x, c->in[s->ib][j])) : x;
}

/* The clamped norm from a sum of squares. */
static inline float nus_norm(struct nus_dt d, const struct nus_state *s, uint32_t k, double ss)
{
    float n = ms_rnd(d.v[k], sqrtf((float)ss));
    return n < s->lo7[k] ? s->lo7[k] : n; /* NaN stays NaN */
}

/* The scalars from the sum of rounded u_0*u_1. */
static struct nus_coef nus_coef_of(struct nus_dt dt, const struct nus_state *s, double sum)
{
    const enum ms_dtype d = dt.p;
    struct nus_coef cf;
    float c = ms_rnd(d, (float)sum);
    c = c < -1.0f ? -1.0f : c > 1.0f ? 1.0f : c;
    float th = ms_rnd(d, acosf(c));
    cf.s = ms_rnd(d, sinf(th));
    cf.colinear = fabsf(cf.s) < s->lo8;
    cf.a = ms_rnd(d, sinf(ms_rnd(d, s->c0 * th)));
    cf.b = ms_rnd(d, sinf(ms_rnd(d, s->c1 * th)));
    return cf;
}

static inline float nus_mix(struct nus_dt dt, const struct nus_state *s, const struct nus_coef *cf,
                            float v0, float v1)
{
    const enum ms_dtype d = dt.p;
    if (cf->colinear)
        return ms_rnd(d, ms__add_first(ms_rnd(dt.v[0], ms__mul_first(s->c0, v0)),
                                       ms_rnd(dt.v[1], ms__mul_first(s->c1, v1))));
    float num = ms_rnd(d, ms__add_first(ms_rnd(d, ms__mul_first(cf->a, v0)),
                                        ms_rnd(d, ms__mul_first(cf->b, v1))));
    return ms_rnd(d, nus_div_first(num, cf->s));
}

/* out[j] for element j with the scalars of its vector. */
static inline float nus_out(struct nus_dt d, const struct nus_state *s, const struct ms_chunk *c,
                            const struct nus_coef *cf, size_t j)
{
    float r = nus_mix(d, s, cf, nus_v(d, s, c, 0, j), nus_v(d, s, c, 1, j));
    return s->ib >= 0 ? ms_rnd(d.out, ms__add_first(c->in[s->ib][j], r)) : r;
}

/*
 * Whole-vector and per-row modes: the element loops run over blocks of NUS_B
 * elements, one step at a time over the block, every value rounded as the file
 * comment says; the xacc kernels give the limbs of adding the terms one by one,
 * so the block size changes no byte.
 */
#define NUS_B 1024

/* y = rnd(x - b), x's NaN first */
MS__AI void nus_k_sub(enum ms_dtype d, float *restrict y, const float *restrict x,
                      const float *restrict b, size_t n)
{
    for (size_t k = 0; k < n; k++)
        y[k] = ms_rnd(d, nus_sub_first(x[k], b[k]));
}

/* v_k of elements [j0, j0 + nb): rnd(x_k - base) into buf, or x_k itself (the
 * input) without a base. */
MS__AI const float *nus_vblock(struct nus_dt d, const struct nus_state *s,
                               const struct ms_chunk *c, uint32_t k, float *buf, size_t j0,
                               size_t nb)
{
    const float *x = c->in[k ? s->i1 : s->i0] + j0;
    if (s->ib < 0)
        return x;
    nus_k_sub(d.v[k], buf, x, c->in[s->ib] + j0, nb);
    return buf;
}

/* p = rnd(rnd(v0/n0) * rnd(v1/n1)): the terms of the cosine */
MS__AI void nus_k_cos(struct nus_dt d, float *restrict p, const float *restrict v0,
                      const float *restrict v1, float n0, float n1, size_t n)
{
    for (size_t k = 0; k < n; k++)
        p[k] = ms_rnd(d.p, ms_rnd(d.v[0], v0[k] / n0) * ms_rnd(d.v[1], v1[k] / n1));
}

/* r = nus_mix of v0, v1 (cf's colinear case is the same for the whole block) */
MS__AI void nus_k_mix(struct nus_dt d, const struct nus_state *s, const struct nus_coef *cf,
                      float *restrict r, const float *restrict v0, const float *restrict v1,
                      size_t n)
{
    const enum ms_dtype dp = d.p;
    if (cf->colinear) {
        const float c0 = s->c0, c1 = s->c1;
        for (size_t k = 0; k < n; k++)
            r[k] = ms_rnd(dp, ms__add_first(ms_rnd(d.v[0], ms__mul_first(c0, v0[k])),
                                            ms_rnd(d.v[1], ms__mul_first(c1, v1[k]))));
        return;
    }
    const float a = cf->a, b = cf->b, sn = cf->s;
    for (size_t k = 0; k < n; k++) {
        float num = ms_rnd(dp, ms__add_first(ms_rnd(dp, ms__mul_first(a, v0[k])),
                                             ms_rnd(dp, ms__mul_first(b, v1[k]))));
        r[k] = ms_rnd(dp, nus_div_first(num, sn));
    }
}

/* y = rnd(b + r) */
MS__AI void nus_k_addb(enum ms_dtype d, float *restrict y, const float *restrict b,
                       const float *restrict r, size_t n)
{
    for (size_t k = 0; k < n; k++)
        y[k] = ms_rnd(d, ms__add_first(b[k], r[k]));
}

enum { NUS_DO_SQ, NUS_DO_COS, NUS_DO_OUT };

/* One block [j0, j0 + nb): NUS_DO_SQ adds v_k^2 to a[0], a[1]; NUS_DO_COS adds
 * the cosine's terms with norms n0, n1 to a[0]; NUS_DO_OUT writes the output
 * with the scalars cf. */
MS__AI void nus_block(struct nus_dt d, const struct nus_state *s, const struct ms_chunk *c,
                      int what, struct ms_xacc *a, float n0, float n1, const struct nus_coef *cf,
                      size_t j0, size_t nb)
{
    float b0[NUS_B], b1[NUS_B], r[NUS_B];
    const float *v0 = nus_vblock(d, s, c, 0, b0, j0, nb);
    const float *v1 = nus_vblock(d, s, c, 1, b1, j0, nb);
    switch (what) {
    case NUS_DO_SQ:
        ms_xacc_sumsq(&a[0], v0, nb);
        ms_xacc_sumsq(&a[1], v1, nb);
        break;
    case NUS_DO_COS:
        nus_k_cos(d, r, v0, v1, n0, n1, nb);
        ms_xacc_sum(&a[0], r, nb);
        break;
    default:
        if (s->ib < 0) {
            nus_k_mix(d, s, cf, c->out + j0, v0, v1, nb);
        } else {
            nus_k_mix(d, s, cf, r, v0, v1, nb);
            nus_k_addb(d.out, c->out + j0, c->in[s->ib] + j0, r, nb);
        }
        break;
    }
}

/* nus_block over elements [j0, j1). */
MS__AI void nus_range(struct nus_dt d, const struct nus_state *s, const struct ms_chunk *c,
                      int what, struct ms_xacc *a, float n0, float n1, const struct nus_coef *cf,
                      size_t j0, size_t j1)
{
    for (size_t j = j0; j < j1; j += NUS_B) {
        size_t nb = MS_MIN((size_t)NUS_B, j1 - j);
        MS__BLOCK_CALL(nus_block, nb, NUS_B, d, s, c, what, a, n0, n1, cf, j);
    }
}

/* ------------------------------------------------------------------------ */
/* Row_wise (columns) mode: fixed-point column sums.                         */

/* Order-preserving key of |x|: NaN above Inf above every finite value. */
static inline uint32_t nus_key(float x)
{
    uint32_t u = ms_f32_bits(x) & 0x7fffffffu;
    return u > 0x7f800000u ? 0x7fffffffu : u;
}

/* Scale exponent for a column whose largest |v| has key `key` (finite, nonzero). */
static int32_t nus_scale(const struct nus_state *s, uint32_t key)
{
    int e;
    frexpf(ms_f32_from_bits(key), &e); /* |v| < 2^e */
    return 125 - 2 * e - (int32_t)s->lbits;
}

/* A finite double term scaled by 2^k, truncated to an integer (|result| < 2^126). */
static inline __int128 nus_fix(double v, int32_t k) { return (__int128)ldexp(v, k); }

static void nus_cols_reduce(struct nus_dt d, const struct nus_state *s, const struct ms_chunk *c,
                            union nus_pcol *p)
{
    size_t n = (size_t)c->count;
    uint64_t col = c->first % s->cols;
    memset(p, 0, (size_t)s->cols * sizeof(*p));
    for (size_t j = 0; j < n; j++, col = col + 1 == s->cols ? 0 : col + 1) {
        const struct nus_col *sc = &s->col[col];
        union nus_pcol *pc = &p[col];
        float v0 = nus_v(d, s, c, 0, j), v1 = nus_v(d, s, c, 1, j);
        switch (s->pass) {
        case 0:
            pc->mx.key0 = MS_MAX(pc->mx.key0, nus_key(v0));
            pc->mx.key1 = MS_MAX(pc->mx.key1, nus_key(v1));
            break;
        case 1: /* non-finite columns are settled by their keys */
            if (sc->key0 < 0x7f800000u)
                pc->sq.s0 += nus_fix((double)v0 * v0, sc->k0);
            if (sc->key1 < 0x7f800000u)
                pc->sq.s1 += nus_fix((double)v1 * v1, sc->k1);
            break;
        default: {
            float u0 = ms_rnd(d.v[0], v0 / sc->n0), u1 = ms_rnd(d.v[1], v1 / sc->n1);
            float pr = ms_rnd(d.p, u0 * u1);
            if (isfinite(pr))
                pc->cs.sc += nus_fix(pr, 124 - (int32_t)s->lbits);
            else
                pc->cs.nf |= isnan(pr) ? 4u : pr > 0 ? 1u : 2u;
            break;
        }
        }
    }
}

static void nus_cols_fold(struct nus_state *s, const union nus_pcol *p)
{
    for (uint64_t k = 0; k < s->cols; k++) {
        struct nus_col *sc = &s->col[k];
        const union nus_pcol *pc = &p[k];
        switch (s->pass) {
        case 0:
            sc->key0 = MS_MAX(sc->key0, pc->mx.key0);
            sc->key1 = MS_MAX(sc->key1, pc->mx.key1);
            break;
        case 1:
            sc->s0 += pc->sq.s0;
            sc->s1 += pc->sq.s1;
            break;
        default:
            sc->sc += pc->cs.sc;
            sc->nf |= pc->cs.nf;
            break;
        }
    }
}

/* The sum of squares of a column from its key, fixed-point sum and scale. */
static double nus_cols_ss(uint32_t key, __int128 sum, int32_t k)
{
    if (key == 0)
        return 0.0;
    if (key >= 0x7f800000u)
        return key == 0x7f800000u ? INFINITY : NAN;
    return ldexp((double)sum, -k);
}

static int nus_cols_end(struct nus_dt d, struct nus_state *s)
{
    for (uint64_t k = 0; k < s->cols; k++) {
        struct nus_col *sc = &s->col[k];
        switch (s->pass) {
        case 0:
            sc->k0 = sc->key0 && sc->key0 < 0x7f800000u ? nus_scale(s, sc->key0) : 0;
            sc->k1 = sc->key1 && sc->key1 < 0x7f800000u ? nus_scale(s, sc->key1) : 0;
            break;
        case 1:
            sc->n0 = nus_norm(d, s, 0, nus_cols_ss(sc->key0, sc->s0, sc->k0));
            sc->n1 = nus_norm(d, s, 1, nus_cols_ss(sc->key1, sc->s1, sc->k1));
            break;
        default: {
            double sum = ldexp((double)sc->sc, -(124 - (int32_t)s->lbits));
            if (sc->nf)
                sum = (sc->nf & 4u) || (sc->nf & 3u) == 3u ? NAN : sc->nf & 1u ? INFINITY : -INFINITY;
            sc->cf = nus_coef_of(d, s, sum);
            break;
        }
        }
    }
    return ++s->pass < 3 ? MS_STAGE_REDUCE : MS_STAGE_APPLY;
}

/* ------------------------------------------------------------------------ */
/* Stage operations.                                                         */

static void nus_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                     const void *partial)
{
    struct nus_state *s = state;
    if (s->mode == NUS_COLS) {
        nus_cols_fold(s, partial);
        return;
    }
    const struct nus_sums *p = partial;
    if (s->pass == 0) {
        ms_xacc_merge(&s->sums.s0, &p->s0);
        ms_xacc_merge(&s->sums.s1, &p->s1);
    } else {
        ms_xacc_merge(&s->sums.sc, &p->sc);
    }
}

static int nus_end_pass(void *state, const struct ms_stage_job *job)
{
    struct nus_state *s = state;
    const struct nus_dt d = s->dt;
    if (s->mode == NUS_COLS)
        return nus_cols_end(d, s);
    if (s->pass == 0) {
        s->n0 = nus_norm(d, s, 0, ms_xacc_value(&s->sums.s0));
        s->n1 = nus_norm(d, s, 1, ms_xacc_value(&s->sums.s1));
        ms_xacc_init(&s->sums.sc);
        s->pass = 1;
        return MS_STAGE_REDUCE;
    }
    s->cf = nus_coef_of(d, s, ms_xacc_value(&s->sums.sc));
    return MS_STAGE_APPLY;
}

/* Reduce (partial != NULL; whole-vector mode) or apply, in dtypes d. */
MS__AI void nus_chunk(struct nus_dt d, const struct nus_state *s, const struct ms_stage_job *job,
                      const struct ms_chunk *c, struct nus_sums *partial)
{
    size_t n = (size_t)c->count;
    if (partial) {
        assert(s->mode == NUS_FLAT);
        if (s->pass == 0) {
            struct ms_xacc a[2];
            ms_xacc_init(&a[0]);
            ms_xacc_init(&a[1]);
            nus_range(d, s, c, NUS_DO_SQ, a, 0.0f, 0.0f, NULL, 0, n);
            partial->s0 = a[0];
            partial->s1 = a[1];
        } else {
            ms_xacc_init(&partial->sc);
            nus_range(d, s, c, NUS_DO_COS, &partial->sc, s->n0, s->n1, NULL, 0, n);
        }
        return;
    }
    switch (s->mode) {
    case NUS_FLAT:
        nus_range(d, s, c, NUS_DO_OUT, NULL, 0.0f, 0.0f, &s->cf, 0, n);
        break;
    case NUS_ROWS: {
        size_t row = (size_t)MS_MAX(job->row_len, 1);
        assert(n % row == 0);
        for (size_t r0 = 0; r0 < n; r0 += row) {
            struct ms_xacc a[2], ac;
            ms_xacc_init(&a[0]);
            ms_xacc_init(&a[1]);
            ms_xacc_init(&ac);
            nus_range(d, s, c, NUS_DO_SQ, a, 0.0f, 0.0f, NULL, r0, r0 + row);
            float n0 = nus_norm(d, s, 0, ms_xacc_value(&a[0]));
            float n1 = nus_norm(d, s, 1, ms_xacc_value(&a[1]));
            nus_range(d, s, c, NUS_DO_COS, &ac, n0, n1, NULL, r0, r0 + row);
            struct nus_coef cf = nus_coef_of(d, s, ms_xacc_value(&ac));
            nus_range(d, s, c, NUS_DO_OUT, NULL, 0.0f, 0.0f, &cf, r0, r0 + row);
        }
        break;
    }
    default: {
        assert(s->mode == NUS_COLS);
        uint64_t col = c->first % s->cols;
        for (size_t j = 0; j < n; j++, col = col + 1 == s->cols ? 0 : col + 1)
            c->out[j] = nus_out(d, s, c, &s->col[col].cf, j);
        break;
    }
    }
}

/* nus_chunk specialised for the compute dtype (a constant in each call). */
static void nus_run(const struct nus_state *s, const struct ms_stage_job *job,
                    const struct ms_chunk *c, struct nus_sums *partial)
{
#define NUS_DT(x) ((struct nus_dt){ { (x), (x) }, (x), (x) })
    if (s->mixed) {
        nus_chunk(s->dt, s, job, c, partial);
        return;
    }
    switch (job->compute) {
    case MS_DT_BF16: nus_chunk(NUS_DT(MS_DT_BF16), s, job, c, partial); break;
    case MS_DT_F16: nus_chunk(NUS_DT(MS_DT_F16), s, job, c, partial); break;
    default:
        assert(job->compute == MS_DT_F32);
        nus_chunk(NUS_DT(MS_DT_F32), s, job, c, partial);
        break;
    }
#undef NUS_DT
}

MS__ISA_VERSIONS(nus_run_isa, nus_run,
                 (const struct nus_state *s, const struct ms_stage_job *job,
                  const struct ms_chunk *c, struct nus_sums *partial),
                 (s, job, c, partial))

static void nus_reduce(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                       void *partial)
{
    const struct nus_state *s = state;
    if (s->mode == NUS_COLS) {
        nus_cols_reduce(s->dt, s, c, partial);
        return;
    }
    nus_run_isa(s, job, c, partial);
}

static void nus_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    const struct nus_state *s = state;
    if (s->mode == NUS_COPY) {
        memcpy(c->out, c->in[s->i0], (size_t)c->count * sizeof(float));
        return;
    }
    nus_run_isa(s, job, c, NULL);
}

/* ------------------------------------------------------------------------ */
/* The stored-bytes path.                                                     */

/*
 * bfloat16 or float16 inputs and output: the whole-vector mode through
 * ms_stage_ops.stored_passes (both reduce passes on reduce_stored, then
 * apply_stored), the per-row mode and a copy through apply_stored (one pass,
 * inputs in the compute dtype); the row_wise (columns) mode stays on the float
 * path. Each block of NUS_B elements of the two or three inputs is decoded into
 * float scratch that stays in L1 and nus_block runs on it, so the terms summed
 * and the floats mixed are the float path's; apply's floats are encoded to the
 * stored dtype, which is what rounding them to the result dtype and encoding
 * gives. Every pass decodes its blocks anew (a row: three times), which costs
 * less than holding the decoded floats.
 */

/* nus_range over elements [j0, j1) of the stored chunk sc; NUS_DO_OUT encodes
 * the output to sc->out. */
MS__AI void nus_srange(struct nus_dt d, const struct nus_state *s,
                       const struct ms_chunk_stored *sc, int what, struct ms_xacc *a, float n0,
                       float n1, const struct nus_coef *cf, size_t j0, size_t j1)
{
    _Alignas(MS_ALIGN) float x[3][NUS_B], y[NUS_B];
    struct ms_chunk fc = { .out = y }; /* the block as the float path's chunk sees it */
    uint32_t idx[3] = { s->i0, s->i1, s->ib >= 0 ? (uint32_t)s->ib : 0 };
    uint32_t nin = s->ib >= 0 ? 3 : 2;
    for (uint32_t i = 0; i < nin; i++)
        fc.in[idx[i]] = x[i];
    for (size_t j = j0; j < j1; j += NUS_B) {
        size_t nb = MS_MIN((size_t)NUS_B, j1 - j);
        for (uint32_t i = 0; i < nin; i++)
            ms_dtype_decode(sc->dt, (const uint16_t *)sc->in[idx[i]] + j, x[i], nb);
        MS__BLOCK_CALL(nus_block, nb, NUS_B, d, s, &fc, what, a, n0, n1, cf, 0);
        if (what == NUS_DO_OUT)
            ms_dtype_encode(sc->dt, y, (uint16_t *)sc->out + j, nb);
    }
}

/* nus_chunk on the stored chunk sc (whole-vector and per-row modes). */
MS__AI void nus_schunk(struct nus_dt d, const struct nus_state *s, const struct ms_stage_job *job,
                       const struct ms_chunk_stored *sc, struct nus_sums *partial)
{
    size_t n = (size_t)sc->count;
    if (partial) {
        assert(s->mode == NUS_FLAT);
        if (s->pass == 0) {
            struct ms_xacc a[2];
            ms_xacc_init(&a[0]);
            ms_xacc_init(&a[1]);
            nus_srange(d, s, sc, NUS_DO_SQ, a, 0.0f, 0.0f, NULL, 0, n);
            partial->s0 = a[0];
            partial->s1 = a[1];
        } else {
            ms_xacc_init(&partial->sc);
            nus_srange(d, s, sc, NUS_DO_COS, &partial->sc, s->n0, s->n1, NULL, 0, n);
        }
        return;
    }
    if (s->mode == NUS_FLAT) {
        nus_srange(d, s, sc, NUS_DO_OUT, NULL, 0.0f, 0.0f, &s->cf, 0, n);
        return;
    }
    assert(s->mode == NUS_ROWS);
    size_t row = (size_t)MS_MAX(job->row_len, 1);
    assert(n % row == 0);
    for (size_t r0 = 0; r0 < n; r0 += row) {
        struct ms_xacc a[2], ac;
        ms_xacc_init(&a[0]);
        ms_xacc_init(&a[1]);
        ms_xacc_init(&ac);
        nus_srange(d, s, sc, NUS_DO_SQ, a, 0.0f, 0.0f, NULL, r0, r0 + row);
        float n0 = nus_norm(d, s, 0, ms_xacc_value(&a[0]));
        float n1 = nus_norm(d, s, 1, ms_xacc_value(&a[1]));
        nus_srange(d, s, sc, NUS_DO_COS, &ac, n0, n1, NULL, r0, r0 + row);
        struct nus_coef cf = nus_coef_of(d, s, ms_xacc_value(&ac));
        nus_srange(d, s, sc, NUS_DO_OUT, NULL, 0.0f, 0.0f, &cf, r0, r0 + row);
    }
}

/* nus_schunk specialised for the compute dtype (the stored dtype or F32). */
static void nus_run_stored(const struct nus_state *s, const struct ms_stage_job *job,
                           const struct ms_chunk_stored *sc, struct nus_sums *partial)
{
#define NUS_DT(x) ((struct nus_dt){ { (x), (x) }, (x), (x) })
    if (s->mixed) {
        nus_schunk(s->dt, s, job, sc, partial);
        return;
    }
    switch (job->compute) {
    case MS_DT_BF16: nus_schunk(NUS_DT(MS_DT_BF16), s, job, sc, partial); break;
    case MS_DT_F16: nus_schunk(NUS_DT(MS_DT_F16), s, job, sc, partial); break;
    default:
        assert(job->compute == MS_DT_F32);
        nus_schunk(NUS_DT(MS_DT_F32), s, job, sc, partial);
        break;
    }
#undef NUS_DT
}

MS__ISA_VERSIONS(nus_run_stored_isa, nus_run_stored,
                 (const struct nus_state *s, const struct ms_stage_job *job,
                  const struct ms_chunk_stored *sc, struct nus_sums *partial),
                 (s, job, sc, partial))

static bool nus_stored_passes(const void *state, const struct ms_stage_job *job, enum ms_dtype dt)
{
    const struct nus_state *s = state;
    return (dt == MS_DT_BF16 || dt == MS_DT_F16) && s->mode == NUS_FLAT;
}

static void nus_reduce_stored(const void *state, const struct ms_stage_job *job,
                              const struct ms_chunk_stored *c, void *partial)
{
    assert(c->dt == MS_DT_BF16 || c->dt == MS_DT_F16);
    nus_run_stored_isa(state, job, c, partial);
}

/* Declines (before writing anything) only where no pass committed it: another
 * dtype, the columns mode, or a per-row chunk that is not whole rows (an engine
 * sub-block). */
static bool nus_apply_stored(const void *state, const struct ms_stage_job *job,
                             const struct ms_chunk_stored *c)
{
    const struct nus_state *s = state;
    if ((c->dt != MS_DT_BF16 && c->dt != MS_DT_F16) || s->mode == NUS_COLS)
        return false;
    if (s->mode == NUS_COPY) {
        memcpy(c->out, c->in[s->i0], (size_t)c->count * sizeof(uint16_t));
        return true;
    }
    uint64_t row = MS_MAX(job->row_len, 1);
    if (s->mode == NUS_ROWS && (c->first % row || c->count % row))
        return false;
    nus_run_stored_isa(s, job, c, NULL);
    return true;
}

static const struct ms_stage_ops nus_ops = {
    .flags = MS_STAGE_ROWWISE,
    .state_size = nus_state_size,
    .partial_size = nus_partial_size,
    .begin = nus_begin,
    .reduce = nus_reduce,
    .fold = nus_fold,
    .end_pass = nus_end_pass,
    .apply = nus_apply,
    .apply_stored = nus_apply_stored,
    .stored_passes = nus_stored_passes,
    .reduce_stored = nus_reduce_stored,
};

/* With a base_model, the base's tensor is needed whenever there is anything to merge. */
static int nus_plan_inputs(const struct ms_plan_ctx *ctx, const struct ms_stage_job *job)
{
    if (ctx->slice_base && job->base < 0 && job->ninputs > 1)
        return ctx->problem(ctx, MS_EPLAN, "nuslerpbase", "tensor '%s' is missing from the base "
                            "model '%s' (nuslerp with a base needs it)", job->name,
                            ctx->slice_base);
    return MS_PLAN_KEEP;
}

static const struct ms_plan_ops nus_plan = {
    .inputs = nus_plan_inputs,
};

const struct ms_method ms_method_nuslerp = {
    .name = "nuslerp",
    .summary = "slerp of task vectors or of two models, flattened or per row",
    .flags = MS_M_BASE_INPUT,
    .min_inputs = 1,
    .max_inputs = 3,
    .nparams = 3,
    .params = { MS__PM_REQ("weight"), MS__G_BOOL("nuslerp_flatten", 1),
                MS__G_BOOL("nuslerp_row_wise", 0) },
    .card = { "NuSLERP", NULL },
    .plan = &nus_plan,
    .ops = &nus_ops,
};
