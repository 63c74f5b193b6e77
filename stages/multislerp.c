/*
 * multislerp.c - the `multislerp` method (mergekit-spec.md 2.5): barycentric
 * interpolation of several models on the hypersphere, through the tangent
 * space at their normalised weighted mean, optionally around a base model.
 *
 * With X_i the non-base models in input order (spec 2.1.2: config order), B
 * the base if it is present, rnd() rounding to the compute dtype D, every
 * vector the whole flattened tensor, and e = float32(eps):
 *   X_i  = rnd(X_i - B)                                  (with a base)
 *   W_i  = rnd(float32(weight_i)); normalize_weights: S = rnd(0 + W_0 + W_1 ...),
 *          w_i = rnd(W_i / S) (no zero guard, spec 7.7); else w_i = W_i
 *   n_i  = rnd(sqrtf(float32(sum X_i^2)))               NORMS
 *   U_i  = rnd(X_i / rnd(n_i + e))
 *   M    = rnd(0 + rnd(U_0*w_0) + rnd(U_1*w_1) ...)      float32 sum over models, in order
 *   mn   = rnd(sqrtf(float32(sum M^2)))                 CHAIN
 *   mn < rnd(eps): two models give rnd(rnd(X_0*w_0) + rnd(X_1*w_1)) (+ B), more are an error
 *   m    = rnd(M / mn)
 *   dt_i = rnd(float32(sum rnd(U_i*m)))                 CHAIN
 *   T_i  = rnd(U_i - rnd(dt_i*m)); tau = rnd(0 + rnd(T_0*w_0) + ...)
 *   tn   = rnd(rnd(sqrtf(float32(sum tau^2))) + e)      CHAIN
 *   r    = rnd(rnd(m*rnd(cosf(tn))) + rnd(tau*rnd(rnd(sinf(tn))/tn)))
 *   out  = rnd(r * rnd(0 + rnd(n_0*w_0) + ...))  (+ B: rnd(out + B))
 * Elementwise steps are torch's per-op roundings. The four whole-tensor sums
 * are exact (ms_xacc) and rounded once to float32 where torch adds in float32
 * in a blocked order: about 1 ulp of a scalar apart in rare cases (spec 7.20).
 * The result does not depend on chunking.
 *
 * Passes. Each sum is over values rounded elementwise after dividing by the
 * previous one (U_i by n_i, m by mn, T_i with dt_i), so in general none can be
 * derived from an earlier pass's sums, and a pass per sum gives four reduce
 * passes. But mn and dt_i are rounded to D, and in exact arithmetic they follow
 * from the Gram matrix G of the X_i: with p_i = w_i / rnd(n_i + e),
 * ||M||^2 = p'Gp and <U_i, m> = (Gp)_i / (rnd(n_i + e) mn); only tau is
 * rounding noise (0 in exact arithmetic, ~1 ulp that reaches the output). So:
 *   NORMS  sum X_i^2 (exact) and G's other entries (plain double sums: a guess
 *          only, any error in them costs a pass, never a byte); then n_i, and
 *          guesses of mn and dt_i from G;
 *   CHAIN  the whole chain with the guessed mn and dt_i: sums M^2, the dots with
 *          m = rnd(M / guessed mn), and tau^2 with the guessed dt_i. When the
 *          exact mn and dt_i come out bit for bit equal to the guesses, every
 *          value the pass computed is the one the four passes would have, and
 *          tau^2 is the true one: apply. Otherwise the pass is run again with
 *          the exact value it found (mn, then the dots re-guessed from G with it;
 *          or the dots), summing only what is still unknown: at most three
 *          CHAIN passes, the four passes' number, with the same bytes.
 * Each pass recomputes the elementwise steps it needs from the inputs (or, in
 * bfloat16, apply reads m and tau from the keep area, ms__k_bf16_pair_put).
 *
 * Inputs: one non-base model is returned unchanged (the base is then ignored);
 * none is an error.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

enum { MSL_NORMS = 0, MSL_CHAIN = 1, MSL_APPLY = 2 }; /* what a run over a chunk does */

struct mslerp_state {
    int ib;                       /* input index of the base, or -1 */
    uint32_t n;                   /* non-base models N */
    uint32_t it[MS_MAX_INPUTS];   /* their input indices, in input order */
    bool copy;                    /* N == 1: out = X_0 as loaded */
    bool lerp;                    /* mn < eps with N == 2: the linear fallback */
    uint32_t pass;                /* MSL_NORMS or MSL_CHAIN: the reduce pass under way */
    bool mn_known, dt_known;      /* CHAIN: mn, dot[] are exact (else guesses the pass checks) */
    float w[MS_MAX_INPUTS];       /* w_i */
    float e;                      /* float32(eps) */
    float den[MS_MAX_INPUTS];     /* rnd(n_i + e) */
    float norm[MS_MAX_INPUTS];    /* n_i */
    float mn;                     /* ||M||, exact or guessed */
    float dot[MS_MAX_INPUTS];     /* dt_i, exact or guessed */
    float cs, q, avg;             /* rnd(cos tn), rnd(sin tn / tn), rnd(sum n_i w_i) */
    double gram[MS_MAX_INPUTS][MS_MAX_INPUTS]; /* G: the diagonal exact, the rest a plain sum */
    struct ms_xacc acc[MS_MAX_INPUTS + 2];     /* the pass's folded sums (mslerp_part) */
    uint32_t ns;                  /* elements in samp (MSL_SAMPLE / N at most) */
    float samp[];                 /* X_i of sampled elements: samp[k * N + i] (mslerp_sample) */
};

/*
 * The sample the guesses correct G's exact-arithmetic figures with: the
 * rounding of U_i, M, m and the products moves mn and dt_i by up to a few
 * tenths of their bf16 ulp, and not at random (m = rnd(M / (1 - 2^-8)) rounds
 * nearly every element up), so the guesses add the difference between the
 * rounded chain and exact arithmetic over the sample, scaled to the tensor.
 * At most MSL_SAMPLE values per tensor (16 Ki elements of three models; all
 * of a smaller tensor: its guesses are then the exact figures), in the
 * state, and MSL_SAMPLE_CHUNK per chunk, in the partial (24 KiB, 0.3 % of an
 * 8 MiB slot), spread over the chunks in proportion to their size.
 */
#define MSL_SAMPLE 49152u
#define MSL_SAMPLE_CHUNK 6144u

/*
 * A chunk's partial: NORMS: sum X_i^2 in xacc[i] and G's entries above the
 * diagonal, row by row, in g; CHAIN: sum rnd(U_i*m) in xacc[i], sum M^2 in
 * xacc[N] and sum tau^2 in xacc[N+1].
 */
struct mslerp_part {
    struct ms_xacc *xacc;         /* N + 2 */
    double *g;                    /* N (N - 1) / 2 */
    uint32_t *ns;                 /* NORMS: elements sampled */
    float *samp;                  /* NORMS: their X_i, samp[k * N + i], MSL_SAMPLE_CHUNK at most */
};

static size_t mslerp_npairs(uint32_t n) { return (size_t)n * (n - 1) / 2; }

static struct mslerp_part mslerp_part(const struct mslerp_state *s, void *partial)
{
    struct ms_xacc *x = partial;
    double *g = (double *)(x + s->n + 2);
    uint32_t *ns = (uint32_t *)(g + mslerp_npairs(s->n));
    return (struct mslerp_part){ x, g, ns, (float *)(ns + 1) };
}

static size_t mslerp_state_size(const struct ms_stage_job *job)
{
    return sizeof(struct mslerp_state) + (size_t)MSL_SAMPLE * sizeof(float);
}

static size_t mslerp_partial_size(const struct ms_stage_job *job)
{
    uint32_t n = MS_MIN(job->ninputs, MS_MAX_INPUTS);
    return (n + 2) * sizeof(struct ms_xacc) + mslerp_npairs(n) * sizeof(double) +
           sizeof(uint32_t) + (size_t)MSL_SAMPLE_CHUNK * sizeof(float);
}

static int mslerp_begin(void *state, const struct ms_stage_job *job)
{
    struct mslerp_state *s = state;
    int pw = ms_method_param(job->method, "weight");
    int pn = ms_method_param(job->method, "normalize_weights");
    int pe = ms_method_param(job->method, "eps");
    assert(pw >= 0 && pn >= 0 && pe >= 0 && job->ninputs <= MS_MAX_INPUTS);
    const enum ms_dtype d = job->compute;
    s->ib = job->base >= 0 && (uint32_t)job->base < job->ninputs ? job->base : -1;
    for (uint32_t i = 0; i < job->ninputs; i++)
        if ((int)i != s->ib)
            s->it[s->n++] = i;
    if (s->n == 0)
        return ms_error(MS_EPLAN, "%s: multislerp needs at least one model besides the base",
                        job->name);
    if (s->n == 1) {
        s->copy = true;
        return MS_STAGE_APPLY;
    }
    float sum = 0.0f;
    for (uint32_t i = 0; i < s->n; i++) {
        s->w[i] = ms_rnd_param(d, job->pv[s->it[i]][pw]);
        sum += s->w[i];
    }
    if (job->gv[pn] != 0) {
        sum = ms_rnd(d, sum);
        for (uint32_t i = 0; i < s->n; i++)
            s->w[i] = ms_rnd(d, s->w[i] / sum);
    }
    s->e = (float)job->gv[pe];
    s->pass = MSL_NORMS;
    for (uint32_t i = 0; i < s->n; i++)
        ms_xacc_init(&s->acc[i]);
    return MS_STAGE_REDUCE;
}

/*
 * The elementwise chain runs over blocks of MSL_B elements, one step at a
 * time over the block through leaf kernels (restrict parameters, a constant
 * trip count for full blocks: loops the compiler vectorises), with every value
 * rounded exactly as the per-element formulas above say: each element sees
 * the same operations in the same order, so the block size changes no byte.
 */
#define MSL_B 1024

/* u = rnd(rnd(x - b) / den), or rnd(x / den) without a base (b NULL): U_i */
MS__AI void mslerp_k_unit(enum ms_dtype d, float *restrict u, const float *restrict x,
                          const float *restrict b, float den, size_t n)
{
    if (b)
        for (size_t k = 0; k < n; k++)
            u[k] = ms_rnd(d, ms_rnd(d, x[k] - b[k]) / den);
    else
        for (size_t k = 0; k < n; k++)
            u[k] = ms_rnd(d, x[k] / den);
}

/* v += rnd(u * w) */
MS__AI void mslerp_k_axpy(enum ms_dtype d, float *restrict v, const float *restrict u, float w,
                          size_t n)
{
    for (size_t k = 0; k < n; k++)
        v[k] += ms_rnd(d, u[k] * w);
}

/* u = rnd(u - rnd(dot * m)): T_i in place */
MS__AI void mslerp_k_tan(enum ms_dtype d, float *restrict u, const float *restrict m, float dot,
                         size_t n)
{
    for (size_t k = 0; k < n; k++)
        u[k] = ms_rnd(d, u[k] - ms_rnd(d, dot * m[k]));
}

/* y = rnd(rnd(rnd(m*cs) + rnd(v*q)) * avg), then rnd(y + b) with a base (b non-NULL) */
MS__AI void mslerp_k_out(enum ms_dtype d, float *restrict y, const float *restrict m,
                         const float *restrict v, const float *restrict b, float cs, float q,
                         float avg, size_t n)
{
    if (b)
        for (size_t k = 0; k < n; k++) {
            float r = ms_rnd(d, ms_rnd(d, m[k] * cs) + ms_rnd(d, v[k] * q));
            y[k] = ms_rnd(d, ms_rnd(d, r * avg) + b[k]);
        }
    else
        for (size_t k = 0; k < n; k++) {
            float r = ms_rnd(d, ms_rnd(d, m[k] * cs) + ms_rnd(d, v[k] * q));
            y[k] = ms_rnd(d, r * avg);
        }
}

/* v[k] = rnd(0 + rnd(u_0[k]*w_0) + rnd(u_1[k]*w_1) ...): the weighted sum over the models. */
MS__AI void mslerp_wsum(const enum ms_dtype d, const struct mslerp_state *s, float u[][MSL_B],
                        float *restrict v, size_t nb)
{
    for (size_t k = 0; k < nb; k++)
        v[k] = 0.0f;
    for (uint32_t i = 0; i < s->n; i++)
        mslerp_k_axpy(d, v, u[i], s->w[i], nb);
    for (size_t k = 0; k < nb; k++)
        v[k] = ms_rnd(d, v[k]);
}

/*
 * G's entry sum x*y for the guesses: a plain sum (products exact in double,
 * 16 double lanes, then the lanes in a fixed order), not exact and not needed
 * to be: a guess it makes wrong costs a pass, never a byte.
 */
MS__AI double mslerp_k_gdot(const float *restrict x, const float *restrict y, size_t n)
{
    double l[16] = { 0 };
    size_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (size_t q = 0; q < 16; q++)
            l[q] += (double)x[k + q] * (double)y[k + q];
    for (; k < n; k++)
        l[0] += (double)x[k] * (double)y[k];
    for (size_t q = 8; q > 0; q /= 2)
        for (size_t r = 0; r < q; r++)
            l[r] += l[r + q];
    return l[0];
}

/*
 * What the chain runs over: one chunk's inputs and output, as floats (the
 * float path) or as the stored bytes of sdt (bfloat16 or float16: the stored
 * path, ms_stage_ops.stored_passes), which a block decodes into float scratch
 * (L1) before the same kernels run on it; apply's floats are then encoded to
 * sdt, the float path's floats rounded to sdt. Borrowed from the chunk.
 */
struct mslerp_view {
    const void *in[MS_MAX_INPUTS]; /* by input index: count floats, or count sdt elements */
    void *out;                    /* apply: count floats or sdt elements; reduce: NULL */
    uint32_t *keep;               /* the keep area (bfloat16 compute) or NULL */
    uint64_t count;
    uint32_t nin;                 /* inputs */
    enum ms_dtype sdt;            /* MS_DT_NONE: floats; MS_DT_BF16 or MS_DT_F16: stored */
};

static struct mslerp_view mslerp_view_float(const struct ms_chunk *c, uint32_t ninputs)
{
    struct mslerp_view v = { .out = c->out, .keep = c->keep, .count = c->count,
                             .nin = ninputs, .sdt = MS_DT_NONE };
    for (uint32_t i = 0; i < ninputs; i++)
        v.in[i] = c->in[i];
    return v;
}

static struct mslerp_view mslerp_view_stored(const struct ms_chunk_stored *c, uint32_t ninputs)
{
    struct mslerp_view v = { .out = c->out, .keep = c->keep, .count = c->count, .nin = ninputs,
                             .sdt = c->dt };
    for (uint32_t i = 0; i < ninputs; i++)
        v.in[i] = c->in[i];
    return v;
}

/* y = the bfloat16 values at h as floats (exact) */
MS__AI void mslerp_k_bf16(float *restrict y, const uint16_t *restrict h, size_t n)
{
    for (size_t k = 0; k < n; k++)
        y[k] = ms_f32_from_bits((uint32_t)h[k] << 16);
}

/* Input i's elements [j0, j0 + nb): the floats themselves, or decoded into scr. */
MS__AI const float *mslerp_load(const struct mslerp_view *v, uint32_t i, size_t j0, size_t nb,
                                float *restrict scr)
{
    if (v->sdt == MS_DT_NONE)
        return (const float *)v->in[i] + j0;
    const uint16_t *h = (const uint16_t *)v->in[i] + j0;
    if (v->sdt == MS_DT_BF16)
        mslerp_k_bf16(scr, h, nb);
    else
        ms_dtype_decode(v->sdt, h, scr, nb);
    return scr;
}

/* Where apply writes elements [j0, j0 + nb): the float output, or scr (then mslerp_store). */
MS__AI float *mslerp_dest(const struct mslerp_view *v, size_t j0, float *restrict scr)
{
    return v->sdt == MS_DT_NONE ? (float *)v->out + j0 : scr;
}

MS__AI void mslerp_store(const struct mslerp_view *v, size_t j0, const float *y, size_t nb)
{
    if (v->sdt != MS_DT_NONE)
        ms_dtype_encode(v->sdt, y, (uint16_t *)v->out + j0, nb);
}

/* Input i's element j as a float (the sample). */
static inline float mslerp_elt(const struct mslerp_view *v, uint32_t i, size_t j)
{
    if (v->sdt == MS_DT_NONE)
        return ((const float *)v->in[i])[j];
    uint16_t h = ((const uint16_t *)v->in[i])[j];
    return v->sdt == MS_DT_BF16 ? ms_bf16_to_f32_1(h) : ms_f16_to_f32_1(h);
}

/*
 * Keep area (bfloat16 compute only, ms_stage.h): one uint32 per element holding
 * two bfloat16 values of the chain, exact (every value is rounded to bf16): m
 * in the low half, tau in the high half, written by every CHAIN pass; the last
 * one ran with the exact mn and dt_i, so apply reads m and tau instead of
 * replaying the chain. Without a keep area (or in another compute dtype)
 * apply replays the chain from the inputs: the same operations on the same
 * values, the same bytes (ms__k_bf16_pair_put / _get).
 *
 * Elements [j0, j0 + nb) of the chunk: NORMS adds sum X_i^2 and G's upper
 * entries to p; CHAIN runs the chain with s's mn and dt_i and adds the sums
 * still unknown (and sum tau^2) to p; APPLY writes the output to v->out.
 */
MS__AI void mslerp_block(const enum ms_dtype d, const struct mslerp_state *s,
                         const struct mslerp_view *c, uint32_t what, struct mslerp_part p,
                         size_t j0, size_t nb)
{
    float u[MS_MAX_INPUTS][MSL_B], v[MSL_B], m[MSL_B];
    _Alignas(MS_ALIGN) float xs[MSL_B], bs[MSL_B]; /* decoded input, decoded base (stored) */
    const float *b = s->ib >= 0 ? mslerp_load(c, (uint32_t)s->ib, j0, nb, bs) : NULL;
    uint32_t *kp = d == MS_DT_BF16 && c->keep ? c->keep + j0 : NULL;
    if (what == MSL_NORMS) {
        const float *x[MS_MAX_INPUTS];
        for (uint32_t i = 0; i < s->n; i++) {
            x[i] = mslerp_load(c, s->it[i], j0, nb, b ? xs : u[i]);
            if (b) {
                ms__k_sub(d, u[i], x[i], b, nb);
                x[i] = u[i];
            }
            ms_xacc_sumsq(&p.xacc[i], x[i], nb);
        }
        double *g = p.g;
        for (uint32_t i = 0; i < s->n; i++)
            for (uint32_t k = i + 1; k < s->n; k++)
                *g++ += mslerp_k_gdot(x[i], x[k], nb);
        return;
    }
    if (kp && what == MSL_APPLY) { /* m and tau kept (read before out, maybe the same memory) */
        ms__k_bf16_pair_get(m, v, kp, nb);
        float *y = mslerp_dest(c, j0, xs);
        mslerp_k_out(d, y, m, v, b, s->cs, s->q, s->avg, nb);
        mslerp_store(c, j0, y, nb);
        return;
    }
    for (uint32_t i = 0; i < s->n; i++) /* U_i */
        mslerp_k_unit(d, u[i], mslerp_load(c, s->it[i], j0, nb, xs), b, s->den[i], nb);
    mslerp_wsum(d, s, u, v, nb); /* M */
    if (what == MSL_CHAIN && !s->mn_known)
        ms_xacc_sumsq(&p.xacc[s->n], v, nb);
    ms__k_div(d, m, v, s->mn, nb);
    if (what == MSL_CHAIN && !s->dt_known)
        for (uint32_t i = 0; i < s->n; i++) {
            ms__k_mul(d, v, u[i], m, nb);
            ms_xacc_sum(&p.xacc[i], v, nb);
        }
    for (uint32_t i = 0; i < s->n; i++) /* T_i, in place */
        mslerp_k_tan(d, u[i], m, s->dot[i], nb);
    mslerp_wsum(d, s, u, v, nb); /* tau */
    if (what == MSL_CHAIN) {
        if (kp)
            ms__k_bf16_pair_put(kp, m, v, nb);
        ms_xacc_sumsq(&p.xacc[s->n + 1], v, nb);
        return;
    }
    float *y = mslerp_dest(c, j0, xs);
    mslerp_k_out(d, y, m, v, b, s->cs, s->q, s->avg, nb);
    mslerp_store(c, j0, y, nb);
}

/* The linear fallback (mn < eps, two models): y = rnd(rnd(X_0*w_0) + rnd(X_1*w_1)),
 * then rnd(y + b) with a base (b non-NULL; X_i = rnd(x_i - b)). */
MS__AI void mslerp_k_lerp(enum ms_dtype d, float *restrict y, const float *restrict x0,
                          const float *restrict x1, const float *restrict b, float w0, float w1,
                          size_t n)
{
    if (b)
        for (size_t k = 0; k < n; k++) {
            float r = ms_rnd(d, ms_rnd(d, ms_rnd(d, x0[k] - b[k]) * w0) +
                                    ms_rnd(d, ms_rnd(d, x1[k] - b[k]) * w1));
            y[k] = ms_rnd(d, r + b[k]);
        }
    else
        for (size_t k = 0; k < n; k++)
            y[k] = ms_rnd(d, ms_rnd(d, x0[k] * w0) + ms_rnd(d, x1[k] * w1));
}

MS__AI void mslerp_lerp_block(const enum ms_dtype d, const struct mslerp_state *s,
                              const struct mslerp_view *c, size_t j0, size_t nb)
{
    _Alignas(MS_ALIGN) float x0[MSL_B], x1[MSL_B], bs[MSL_B], ys[MSL_B];
    const float *b = s->ib >= 0 ? mslerp_load(c, (uint32_t)s->ib, j0, nb, bs) : NULL;
    const float *a0 = mslerp_load(c, s->it[0], j0, nb, x0);
    const float *a1 = mslerp_load(c, s->it[1], j0, nb, x1);
    float *y = mslerp_dest(c, j0, ys);
    mslerp_k_lerp(d, y, a0, a1, b, s->w[0], s->w[1], nb);
    mslerp_store(c, j0, y, nb);
}

/* One input unchanged (N == 1): the stored path decodes and encodes (a NaN
 * quieted, as the float path's encode does). */
MS__AI void mslerp_copy_block(const struct mslerp_state *s, const struct mslerp_view *c,
                              size_t j0, size_t nb)
{
    _Alignas(MS_ALIGN) float xs[MSL_B];
    const float *x = mslerp_load(c, s->it[0], j0, nb, xs);
    float *y = mslerp_dest(c, j0, xs);
    if (y != x)
        memcpy(y, x, nb * sizeof(float));
    mslerp_store(c, j0, y, nb);
}

enum { MSL_LERP = 3, MSL_COPY = 4 }; /* apply's other runs (mslerp_blocks) */

/*
 * Asks for the next block's inputs (and keep words) while this one computes:
 * a block's compute is long enough for the hardware streams to stop short of
 * it, and its first loads then waited on memory (a sixth of mslerp_run's
 * samples on the bench). Hints only: no byte depends on them.
 */
MS__AI void mslerp_prefetch(const struct mslerp_state *s, const struct mslerp_view *c, size_t j0,
                            size_t nb)
{
    size_t eb = c->sdt == MS_DT_NONE ? sizeof(float) : sizeof(uint16_t);
    for (uint32_t i = 0; i < c->nin; i++) {
        const char *p = (const char *)c->in[i] + j0 * eb;
        for (size_t o = 0; o < nb * eb; o += 64)
            __builtin_prefetch(p + o, 0, 3);
    }
    if (c->keep)
        for (size_t o = 0; o < nb * MS_KEEP_BYTES; o += 64)
            __builtin_prefetch((const char *)(c->keep + j0) + o, 1, 3);
}

MS__AI void mslerp_blocks(const enum ms_dtype d, const struct mslerp_state *s,
                          const struct mslerp_view *c, uint32_t what, struct mslerp_part p)
{
    size_t n = (size_t)c->count;
    for (size_t j0 = 0; j0 < n; j0 += MSL_B) {
        size_t nb = MS_MIN((size_t)MSL_B, n - j0);
        if (j0 + MSL_B < n)
            mslerp_prefetch(s, c, j0 + MSL_B, MS_MIN((size_t)MSL_B, n - j0 - MSL_B));
        if (what == MSL_LERP)
            MS__BLOCK_CALL(mslerp_lerp_block, nb, MSL_B, d, s, c, j0);
        else if (what == MSL_COPY)
            mslerp_copy_block(s, c, j0, nb);
        else
            MS__BLOCK_CALL(mslerp_block, nb, MSL_B, d, s, c, what, p, j0);
    }
}

/* The chain specialised for the compute dtype (D is a constant in each). */
static void mslerp_run(enum ms_dtype d, const struct mslerp_state *s, const struct mslerp_view *c,
                       uint32_t what, struct mslerp_part p)
{
    switch (d) {
    case MS_DT_BF16: mslerp_blocks(MS_DT_BF16, s, c, what, p); break;
    case MS_DT_F16: mslerp_blocks(MS_DT_F16, s, c, what, p); break;
    default:
        assert(d == MS_DT_F32);
        mslerp_blocks(MS_DT_F32, s, c, what, p);
        break;
    }
}

MS__ISA_VERSIONS(mslerp_run_isa, mslerp_run,
                 (enum ms_dtype d, const struct mslerp_state *s, const struct mslerp_view *c,
                  uint32_t what, struct mslerp_part p),
                 (d, s, c, what, p))

/*
 * NORMS: X_i of up to MSL_SAMPLE_CHUNK / N elements of the chunk, one at a
 * jittered place in each of as many equal strata (not a fixed stride, which
 * could meet the same columns row after row).
 */
static void mslerp_sample(const struct ms_stage_job *job, const struct mslerp_state *s,
                          const struct mslerp_view *c, struct mslerp_part p)
{
    const enum ms_dtype d = job->compute;
    uint64_t k = ((uint64_t)c->count * (MSL_SAMPLE / s->n) + job->numel - 1) / job->numel;
    k = MS_MIN(k, MS_MIN((uint64_t)(MSL_SAMPLE_CHUNK / s->n), (uint64_t)c->count));
    double h = (double)c->count / (double)k;
    for (uint64_t t = 0; t < k; t++) {
        double jit = (double)(t + 1) * 0.6180339887498949;
        uint64_t j = (uint64_t)(((double)t + (jit - floor(jit))) * h);
        j = MS_MIN(j, c->count - 1);
        for (uint32_t i = 0; i < s->n; i++) {
            float x = mslerp_elt(c, s->it[i], j);
            p.samp[t * s->n + i] =
                s->ib >= 0 ? ms_rnd(d, x - mslerp_elt(c, (uint32_t)s->ib, j)) : x;
        }
    }
    *p.ns = (uint32_t)k;
}

static void mslerp_reduce_view(const struct mslerp_state *s, const struct ms_stage_job *job,
                               const struct mslerp_view *c, void *partial)
{
    struct mslerp_part p = mslerp_part(s, partial);
    for (uint32_t i = 0; i < s->n + 2; i++)
        ms_xacc_init(&p.xacc[i]);
    for (size_t k = 0; k < mslerp_npairs(s->n); k++)
        p.g[k] = 0.0;
    mslerp_run_isa(job->compute, s, c, s->pass, p);
    if (s->pass == MSL_NORMS)
        mslerp_sample(job, s, c, p);
}

static void mslerp_reduce(const void *state, const struct ms_stage_job *job,
                          const struct ms_chunk *c, void *partial)
{
    struct mslerp_view v = mslerp_view_float(c, job->ninputs);
    mslerp_reduce_view(state, job, &v, partial);
}

static void mslerp_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                        const void *partial)
{
    struct mslerp_state *s = state;
    const struct ms_xacc *x = partial;
    for (uint32_t i = 0; i < s->n + 2; i++)
        ms_xacc_merge(&s->acc[i], &x[i]);
    if (s->pass == MSL_NORMS) {
        struct mslerp_part p = mslerp_part(s, (void *)partial);
        const double *g = p.g;
        for (uint32_t i = 0; i < s->n; i++)
            for (uint32_t k = i + 1; k < s->n; k++)
                s->gram[i][k] += *g++;
        uint32_t take = MS_MIN(*p.ns, MSL_SAMPLE / s->n - s->ns);
        memcpy(s->samp + (size_t)s->ns * s->n, p.samp, (size_t)take * s->n * sizeof(float));
        s->ns += take;
    }
}

/* rnd(sqrtf(float32(sum))): torch.norm in D from an exact sum of squares. */
static float mslerp_norm(enum ms_dtype d, const struct ms_xacc *a)
{
    return ms_rnd(d, sqrtf((float)ms_xacc_value(a)));
}

/* (G p)_i with p_k = w_k / den_k: <X_i, M> in exact arithmetic. */
static double mslerp_gp(const struct mslerp_state *s, uint32_t i)
{
    double t = 0.0;
    for (uint32_t k = 0; k < s->n; k++)
        t += (i <= k ? s->gram[i][k] : s->gram[k][i]) * ((double)s->w[k] / s->den[k]);
    return t;
}

/* Sample element k: U_i in u (the chain's roundings), M as the chain rounds it
 * (returned) and in exact arithmetic (*me). */
static float mslerp_sample_m(enum ms_dtype d, const struct mslerp_state *s, uint32_t k,
                             float *u, double *me)
{
    const float *x = s->samp + (size_t)k * s->n;
    float acc = 0.0f;
    double e = 0.0;
    for (uint32_t i = 0; i < s->n; i++) {
        u[i] = ms_rnd(d, x[i] / s->den[i]);
        acc += ms_rnd(d, u[i] * s->w[i]);
        e += (double)s->w[i] / s->den[i] * x[i];
    }
    *me = e;
    return ms_rnd(d, acc);
}

/* The guess of mn: ||M||^2 = p'Gp in exact arithmetic, plus the sample's
 * rounding difference scaled to the tensor. */
static void mslerp_guess_mn(enum ms_dtype d, struct mslerp_state *s, uint64_t numel)
{
    double mm = 0.0, corr = 0.0, me;
    for (uint32_t i = 0; i < s->n; i++)
        mm += mslerp_gp(s, i) * ((double)s->w[i] / s->den[i]);
    float u[MS_MAX_INPUTS];
    for (uint32_t k = 0; k < s->ns; k++) {
        float mk = mslerp_sample_m(d, s, k, u, &me);
        corr += (double)mk * mk - me * me;
    }
    s->mn = ms_rnd(d, sqrtf((float)(mm + corr * ((double)numel / s->ns))));
}

/* The guess of dt_i = rnd(sum rnd(U_i * rnd(M / mn))) with s->mn: (Gp)_i / (den_i mn)
 * in exact arithmetic, plus the sample's rounding difference scaled. */
static void mslerp_guess_dots(enum ms_dtype d, struct mslerp_state *s, uint64_t numel)
{
    double corr[MS_MAX_INPUTS] = { 0 }, me;
    float u[MS_MAX_INPUTS];
    for (uint32_t k = 0; k < s->ns; k++) {
        float m = ms_rnd(d, mslerp_sample_m(d, s, k, u, &me) / s->mn);
        const float *x = s->samp + (size_t)k * s->n;
        for (uint32_t i = 0; i < s->n; i++)
            corr[i] += (double)ms_rnd(d, u[i] * m) - x[i] / (double)s->den[i] * (me / s->mn);
    }
    for (uint32_t i = 0; i < s->n; i++) {
        double g = mslerp_gp(s, i) / s->den[i] / s->mn + corr[i] * ((double)numel / s->ns);
        s->dot[i] = ms_rnd(d, (float)g);
    }
}

/* A new CHAIN pass: zero the sums it folds. */
static int mslerp_chain(struct mslerp_state *s)
{
    s->pass = MSL_CHAIN;
    for (uint32_t i = 0; i < s->n + 2; i++)
        ms_xacc_init(&s->acc[i]);
    return MS_STAGE_REDUCE;
}

static bool mslerp_same(float a, float b) { return ms_f32_bits(a) == ms_f32_bits(b); }

static int mslerp_end_pass(void *state, const struct ms_stage_job *job)
{
    struct mslerp_state *s = state;
    const enum ms_dtype d = job->compute;
    if (s->pass == MSL_NORMS) {
        for (uint32_t i = 0; i < s->n; i++) {
            s->norm[i] = mslerp_norm(d, &s->acc[i]);
            s->den[i] = ms_rnd(d, s->norm[i] + s->e);
            s->gram[i][i] = ms_xacc_value(&s->acc[i]);
        }
        mslerp_guess_mn(d, s, job->numel);
        mslerp_guess_dots(d, s, job->numel);
        return mslerp_chain(s);
    }
    assert(s->pass == MSL_CHAIN);
    if (!s->mn_known) {
        float mn = mslerp_norm(d, &s->acc[s->n]);
        int pe = ms_method_param(job->method, "eps");
        assert(pe >= 0);
        if (mn < ms_rnd_param(d, job->gv[pe])) {
            if (s->n != 2)
                return ms_error(MS_EDATA, "%s: multislerp: the weighted sum of the models' "
                                "directions is zero (antipodal models whose weights cancel); "
                                "change the weights", job->name);
            s->lerp = true;
            return MS_STAGE_APPLY;
        }
        s->mn_known = true;
        if (!mslerp_same(mn, s->mn)) { /* the pass's m was wrong: again with mn */
            s->mn = mn;
            mslerp_guess_dots(d, s, job->numel);
            return mslerp_chain(s);
        }
    }
    if (!s->dt_known) {
        bool held = true;
        for (uint32_t i = 0; i < s->n; i++) {
            float dt = ms_rnd(d, (float)ms_xacc_value(&s->acc[i]));
            held = held && mslerp_same(dt, s->dot[i]);
            s->dot[i] = dt;
        }
        s->dt_known = true;
        if (!held) /* the pass's tau was wrong: again with the dots */
            return mslerp_chain(s);
    }
    float tn = ms_rnd(d, mslerp_norm(d, &s->acc[s->n + 1]) + s->e);
    s->cs = ms_rnd(d, cosf(tn));
    s->q = ms_rnd(d, ms_rnd(d, sinf(tn)) / tn);
    float avg = 0.0f; /* rnd(0 + rnd(n_0*w_0) + ...) */
    for (uint32_t i = 0; i < s->n; i++)
        avg += ms_rnd(d, s->norm[i] * s->w[i]);
    s->avg = ms_rnd(d, avg);
    return MS_STAGE_APPLY;
}

static void mslerp_apply(const void *state, const struct ms_stage_job *job,
                         const struct ms_chunk *c)
{
    const struct mslerp_state *s = state;
    if (s->copy) {
        memcpy(c->out, c->in[s->it[0]], (size_t)c->count * sizeof(float));
        return;
    }
    struct mslerp_view v = mslerp_view_float(c, job->ninputs);
    mslerp_run_isa(job->compute, s, &v, s->lerp ? MSL_LERP : MSL_APPLY, (struct mslerp_part){ 0 });
}

/*
 * The stored-bytes path (ms_stage_ops.stored_passes), bfloat16 or float16
 * inputs and output, compute in that dtype or float32: every pass runs the
 * float path's kernels on blocks of MSL_B elements decoded into scratch
 * (mslerp_view), so the sums, the sample and apply's floats are the float
 * path's; apply's floats are encoded to the stored dtype (rounding them to it
 * first would change nothing: encoding rounds to nearest even, a NaN quieted).
 * The keep area, when there is one, is used as on the float path.
 */
static bool mslerp_stored_passes(const void *state, const struct ms_stage_job *job,
                                 enum ms_dtype dt)
{
    return dt == MS_DT_BF16 || dt == MS_DT_F16;
}

static void mslerp_reduce_stored(const void *state, const struct ms_stage_job *job,
                                 const struct ms_chunk_stored *c, void *partial)
{
    assert(c->dt == MS_DT_BF16 || c->dt == MS_DT_F16);
    struct mslerp_view v = mslerp_view_stored(c, job->ninputs);
    mslerp_reduce_view(state, job, &v, partial);
}

static bool mslerp_apply_stored(const void *state, const struct ms_stage_job *job,
                                const struct ms_chunk_stored *c)
{
    const struct mslerp_state *s = state;
    if (c->dt != MS_DT_BF16 && c->dt != MS_DT_F16)
        return false;
    struct mslerp_view v = mslerp_view_stored(c, job->ninputs);
    uint32_t what = s->copy ? MSL_COPY : s->lerp ? MSL_LERP : MSL_APPLY;
    mslerp_run_isa(job->compute, s, &v, what, (struct mslerp_part){ 0 });
    return true;
}

/*
 * The keep area pays in bfloat16 compute with two models or more (see
 * ms__k_bf16_pair_put), and is asked for only up to MSL_KEEP_MAX elements: larger
 * tensors (embeddings) are rarely resident, and for them the engine would
 * reserve a keep pool of numel * 4 bytes out of the budget; at the default 512M
 * that pool (262 MB for a 65.5 M-element embedding) took peak RSS from 465 to
 * 598 MB on the bench, past budget + 32 MiB. Those tensors replay the chain.
 */
#define MSL_KEEP_MAX ((uint64_t)16 << 20)
static bool mslerp_keeps(const struct ms_stage_job *job)
{
    bool base = job->base >= 0 && (uint32_t)job->base < job->ninputs;
    return job->compute == MS_DT_BF16 && job->ninputs - (base ? 1u : 0u) >= 2 &&
           job->numel <= MSL_KEEP_MAX;
}

static const struct ms_stage_ops mslerp_ops = {
    .state_size = mslerp_state_size,
    .keeps = mslerp_keeps,
    .partial_size = mslerp_partial_size,
    .begin = mslerp_begin,
    .reduce = mslerp_reduce,
    .fold = mslerp_fold,
    .end_pass = mslerp_end_pass,
    .apply = mslerp_apply,
    .apply_stored = mslerp_apply_stored,
    .stored_passes = mslerp_stored_passes,
    .reduce_stored = mslerp_reduce_stored,
};

const struct ms_method ms_method_multislerp = {
    .name = "multislerp",
    .summary = "barycentric slerp of several models",
    .flags = MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 3,
    .params = { MS__PM_REQ("weight"), MS__G_BOOL("normalize_weights", 1),
                MS__G("eps", 1e-8, 0, MS__INF) },
    .card = { "Multi-SLERP", NULL },
    .ops = &mslerp_ops,
};
