/*
 * karcher.c - the `karcher` method (mergekit-spec.md 2.9): the Riemannian
 * (Karcher) mean of the inputs' directions on the unit sphere, scaled by their
 * mean norm. Every input counts, the base included when it is one, each with
 * alpha = 1/N; there are no per-model weights.
 *
 * mergekit iterates on whole vectors: u_i = x_i/n_i (n_i the float32 norm),
 * u = normalised sum a*u_i, then up to max_iter times
 *   d_i = clamp(u.u_i, -1, 1), th_i = acos d_i, T = sum_{th_i >= tol} a*(th_i/sin th_i)*(u_i - d_i*u),
 *   stop if ||T|| < tol, else u = cos(||T||)*u + sin(||T||)*T/||T||, renormalised,
 * and returns (sum_i alpha_i*n_i) * u.
 *
 * Streaming form: every iterate u and every T is a linear combination
 * sum_j c_j u_j of the unit inputs, so the iteration runs on the N coefficients
 * c instead of the vector. One reduce pass sums the Gram matrix x_i.x_j exactly
 * (ms_xacc); then, in double on the loop thread (end_pass),
 *   G_ij = (x_i.x_j) / (n_i*n_j),  u.u_i = (G c)_i,  ||u||^2 = c'Gc,  ||T||^2 likewise,
 * with mergekit's steps, validity rule (n_i > tol), initial guess, fallback to
 * the first valid unit vector, stopping rule and final scale. apply computes
 *   u   = rnd(float32(sum_j (c_j/n_j) * x_j))     (sum in double, inputs in order)
 *   out = rnd(float32(s) * u),   s = sum_i alpha_i*n_i (Python double, zero norms included)
 * which are mergekit's last two roundings.
 *
 * This is mergekit's float32 iteration in exact arithmetic; it is used when the
 * compute dtype is float32, where it agrees with mergekit within an ulp (spec 7.20).
 *
 * bfloat16 / float16 (the "step" form): mergekit's iteration rounds every
 * intermediate tensor to D, which the coefficient form cannot reproduce (on its
 * own demo models bf16 differs by up to ~135 ulps). There the stage follows
 * mergekit's loop op by op, each torch op's result rounded to D as torch's CPU
 * kernels compute it (docs/NUMERICS.md, "karcher"):
 *   u_i  = r(x_i / n_i)                          n_i float32 norm (tensor / 0-dim f32)
 *   u    = r(u + r(float(a) * u_i)) over valid i, then u = r(u / float32 ||u||)
 *   per iteration:  d_i = r(float32(u.u_i)), th_i = r(acosf(d_i)), skip th_i < tol,
 *                   f_i = r(float(a) * r(th_i / r(sinf(th_i))))
 *                   T = r(T + r(f_i * r(u_i - r(d_i * u))))
 *                   |T| float32; stop if < tol
 *                   u = r(r(r(cosf|T|) * u) + r(r(sinf|T|) * r(T / |T|)))
 *                   u = r(u / float32 ||u||) when ||u|| > tol
 *   out  = r(float(s) * u)
 * Each whole-tensor figure is a reduce pass (exact sums, ms_xacc, rounded once
 * to float32 as torch's float32 accumulation approximates): the norms, ||u_0||,
 * then per iteration the dots, |T| and ||u'||: at most 2 + 3*max_iter passes.
 * T_k depends on u_k and on the scalars d_i, f_i, skip_i of iteration k only,
 * and rounded to D those usually repeat from one iteration to the next while u
 * still moves: so the dots pass of iteration k >= 1 also sums ||T||^2 of u_k
 * with the scalars of iteration k-1 (a guess), and when iteration k's scalars
 * come out bit for bit equal to k-1's that sum is |T_k|^2 and the |T| pass is
 * skipped: 2 passes per such iteration. The guess is made at k = 1 and then
 * while it keeps holding (the scalars of k-1 equal those of k-2). Likewise
 * ||u'|| often repeats with period 2 (or 1) while u still moves: once ||u'_{k-1}||
 * equals ||u'_{k-3}|| (or ||u'_{k-2}||), the ||u'|| pass of iteration k also sums
 * the dots pass k+1's sums for u_{k+1} = r(u'_k / g), g = ||u'_{k-2}|| (or
 * ||u'_{k-1}||), and when ||u'_k|| comes out bit for bit equal to g those are the
 * dots pass's sums (which writes nothing else) and it is skipped: 1 pass per
 * such iteration.
 * The elementwise ops depend only on the element and the scalars of the passes
 * before, so an element's iterate is all that has to last between passes: the
 * ||u'|| pass of iteration k stores u'_k (u before renormalisation) in the
 * chunk's keep area (ms_stage.h; its D bits, 2 bytes), and the passes of
 * iteration k+1 continue from it (u_{k+1} = r(u'_k / ||u'_k||)), O(N) per
 * element and pass: per iteration the dots pass computes one T (the guess) and
 * the ||u'|| pass one T and u'. Without a keep area (the engine could not hold
 * one) every pass replays the element's iterates from u_0 instead, O(k * N) per
 * element in pass k, with the same bytes. Rounded to D the iterates usually end
 * in a cycle rather than converge (|T| stays above tol): the ||u'|| pass also
 * counts the elements where u'_k differs from u'_{k-1} and from a saved u'_bp
 * (Brent's cycle search: bp moves to k when k - bp reaches a power of two;
 * u'_bp takes the keep area's other 2 bytes). When u'_k equals u'_{k-L} in
 * every element, so do their norms and u_{k+1} equals u_{k+1-L}; each iterate
 * being a function of the one before, the sequence repeats with period L from
 * there and the stage jumps to the iterate max_iter lands on (the same bytes as
 * running on), which apply reaches from u_{k+1} in fewer than L steps. The
 * scalars of every iteration are kept in the state (max_iter * (3N + 4) floats,
 * counted by state_size).
 *
 * Inputs: a lone tensor is returned unchanged; no valid input (all norms <= tol)
 * gives zeros.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

#define KARCHER_NG (MS_MAX_INPUTS * (MS_MAX_INPUTS + 1) / 2) /* Gram entries i <= j */

/* Reduce passes of the step form (bf16/f16). */
enum { KS_NORM, KS_INIT, KS_DOT, KS_NT, KS_NU };
/* Sums beyond the n dots: the dots pass's guessed |T_k|^2 at [m]; the ||u'||
 * pass's counts of elements where u'_k != u'_{k-1}, != u'_bp at [1], [2], and
 * when it speculates, the dots pass k+1's sums at [KS_SPEC], [KS_SPEC + m]. */
#define KS_NCNT 4
#define KS_SPEC 3

struct karcher_state {
    uint32_t n;                   /* inputs */
    bool copy;                    /* one input: out = x_0 */
    bool zero;                    /* no valid input: out = 0 */
    float scale;                  /* float32(s) */
    double k[MS_MAX_INPUTS];      /* end_pass: u = sum_j k_j x_j, k_j = c_j/n_j */
    /* scalars kept for tests and diagnostics */
    uint32_t iters;               /* iterations run */
    float norm[MS_MAX_INPUTS];    /* float32 norms n_i */
    struct ms_xacc g[KARCHER_NG]; /* folded Gram sums, entry (i <= j) at karcher_gi(n, i, j) */
    /* step form (compute bf16/f16) */
    bool step;
    int phase;                    /* KS_*: the reduce pass running */
    uint32_t m, v[MS_MAX_INPUTS]; /* valid inputs, in order */
    float af;                     /* float32(a): every valid input's normalised alpha */
    double tol;
    long max_iter;
    bool fallback; /* ||u_0|| < tol: u starts as the first valid unit vector */
    float nu0;     /* ||u_0|| */
    uint32_t done;       /* iterations whose scalars are complete */
    uint32_t bp, bpow;   /* Brent's cycle search: u'_bp saved, compared up to bp + bpow */
    bool kept;           /* chunks with a keep area hold u'_{kat-1} there (kat >= 1) */
    uint32_t kat;
    bool guess;          /* the dots pass also sums |T_k|^2 with iteration k-1's scalars */
    bool spec;           /* the ||u'|| pass also sums the next dots pass's sums, guessing */
    float nug;           /* ||u'_k|| = nug */
    uint32_t target;     /* apply: the result is s * u_target */
    uint32_t per;        /* 0, or the iterates' period (target < done) */
    struct ms_xacc acc[MS_MAX_INPUTS + KS_NCNT]; /* the pass's folded sums */
    float sc[]; /* per iteration k: KS_W(n) floats at sc + k*KS_W(n) */
};

/* Scalars of one iteration: d_i, f_i, skip_i (1: th_i < tol) by valid input, then
 * |T|, r(cos|T|), r(sin|T|), ||u'||. */
#define KS_W(n) (3 * (size_t)(n) + 4)
#define KS_D(s, k) ((s)->sc + (size_t)(k)*KS_W((s)->n))
#define KS_F(s, k) (KS_D(s, k) + (s)->n)
#define KS_SKIP(s, k) (KS_D(s, k) + 2 * (size_t)(s)->n)
#define KS_NT_(s, k) (KS_D(s, k) + 3 * (size_t)(s)->n)

/* Index of Gram entry (i, j), i <= j, row-major over the upper triangle. */
static inline size_t karcher_gi(uint32_t n, uint32_t i, uint32_t j)
{
    return (size_t)i * n - (size_t)i * (i - 1) / 2 + (j - i);
}

static bool karcher_is_step(const struct ms_stage_job *job)
{
    return job->compute == MS_DT_BF16 || job->compute == MS_DT_F16;
}

static long karcher_max_iter(const struct ms_stage_job *job)
{
    int pi = ms_method_param(job->method, "max_iter");
    assert(pi >= 0);
    double v = job->gv[pi];
    return v > 0 ? (long)v : 0;
}

static size_t karcher_state_size(const struct ms_stage_job *job)
{
    size_t sz = sizeof(struct karcher_state);
    if (karcher_is_step(job))
        sz += (size_t)karcher_max_iter(job) * KS_W(job->ninputs) * sizeof(float);
    return sz;
}

static size_t karcher_partial_size(const struct ms_stage_job *job)
{
    size_t n = MS_MIN(job->ninputs, MS_MAX_INPUTS);
    if (karcher_is_step(job))
        return (n + KS_NCNT) * sizeof(struct ms_xacc);
    return n * (n + 1) / 2 * sizeof(struct ms_xacc);
}

static int karcher_begin(void *state, const struct ms_stage_job *job)
{
    struct karcher_state *s = state;
    assert(job->ninputs <= MS_MAX_INPUTS);
    if (job->ninputs == 0)
        return ms_error(MS_EPLAN, "%s: karcher merge with no input", job->name);
    s->n = job->ninputs;
    if (s->n == 1) {
        s->copy = true;
        return MS_STAGE_APPLY;
    }
    if (karcher_is_step(job)) {
        int pt = ms_method_param(job->method, "tol");
        assert(pt >= 0);
        s->step = true;
        s->phase = KS_NORM;
        s->tol = job->gv[pt];
        s->max_iter = karcher_max_iter(job);
        for (uint32_t i = 0; i < s->n + KS_NCNT; i++)
            ms_xacc_init(&s->acc[i]);
        return MS_STAGE_REDUCE;
    }
    for (size_t k = 0; k < (size_t)s->n * (s->n + 1) / 2; k++)
        ms_xacc_init(&s->g[k]);
    return MS_STAGE_REDUCE;
}

/* ------------------------------------------------------------------------ */
/* Step form: mergekit's loop from the scalars, over blocks of KS_B elements  */
/* (leaf loops over arrays, so that -O3 vectorises them).                     */

#define KS_B 256
#define KS_NB 2048 /* the stored norms pass: elements decoded per block (8 KiB of floats) */
#define KS_INLINE static inline __attribute__((always_inline))

/* ms_rnd(d, x) bit for bit, written so that the vectoriser keeps bf16 in 32-bit
 * lanes: the rounded bits masked in place (ms_round_bf16_1 goes through 16 bits,
 * which GCC turns into word packing and unpacking); a NaN (x != x) gets its
 * quiet bit and keeps its top payload bits, as there. */
KS_INLINE float ks_rnd(enum ms_dtype d, float x)
{
    if (d != MS_DT_BF16)
        return ms_rnd(d, x);
    uint32_t u = ms_f32_bits(x);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    uint32_t q = (u | 0x00400000u) & 0xffff0000u;
    return ms_f32_from_bits(x != x ? q : r);
}

/* Unit inputs of elements [j0, j0+nb): ui[p][j] = r(x_{v_p} / n_{v_p}), p < m.
 * x is c's floats, or with sc (the stored path) sc's bytes decoded into ui first:
 * the same floats (ms_dtype_decode). */
KS_INLINE void ks_units(enum ms_dtype d, const struct karcher_state *s, const struct ms_chunk *c,
                        const struct ms_chunk_stored *sc, size_t j0, size_t nb,
                        float (*restrict ui)[KS_B])
{
    for (uint32_t p = 0; p < s->m; p++) {
        const float nrm = s->norm[s->v[p]];
        if (sc) {
            ms_dtype_decode(sc->dt, (const uint16_t *)sc->in[s->v[p]] + j0, ui[p], nb);
            for (size_t j = 0; j < nb; j++)
                ui[p][j] = ks_rnd(d, ui[p][j] / nrm);
            continue;
        }
        const float *restrict x = c->in[s->v[p]] + j0;
        for (size_t j = 0; j < nb; j++)
            ui[p][j] = ks_rnd(d, x[j] / nrm);
    }
}

/* The initial guess before normalisation: u = r(u + r(a*u_i)) over valid i, from
 * u = +0. The first sum needs no rounding: r(a*u_i) is in D, and adding +0 to it
 * changes only -0 (to +0), exactly as r(+0 + r(a*u_i)) does. */
KS_INLINE void ks_u0(enum ms_dtype d, const struct karcher_state *s, size_t nb,
                     const float (*restrict ui)[KS_B], float *restrict u)
{
    const float af = s->af;
    for (size_t j = 0; j < nb; j++)
        u[j] = 0.0f + ks_rnd(d, af * ui[0][j]);
    for (uint32_t p = 1; p < s->m; p++)
        for (size_t j = 0; j < nb; j++)
            u[j] = ks_rnd(d, u[j] + ks_rnd(d, af * ui[p][j]));
}

KS_INLINE void ks_start(enum ms_dtype d, const struct karcher_state *s, size_t nb,
                        const float (*restrict ui)[KS_B], float *restrict u)
{
    if (s->fallback) {
        memcpy(u, ui[0], nb * sizeof(float));
        return;
    }
    ks_u0(d, s, nb, ui, u);
    const float nu = s->nu0;
    for (size_t j = 0; j < nb; j++)
        u[j] = ks_rnd(d, u[j] / nu);
}

/* T from u with the scalars of iteration k: T = r(T + r(f_i * w_i)) over the
 * inputs not skipped, from T = +0 (the first sum unrounded, as in ks_u0). */
KS_INLINE void ks_T(enum ms_dtype d, const struct karcher_state *s, uint32_t k, size_t nb,
                    const float (*restrict ui)[KS_B], const float *restrict u, float *restrict T)
{
    const float *dd = KS_D(s, k), *f = KS_F(s, k), *skip = KS_SKIP(s, k);
    bool first = true;
    for (uint32_t p = 0; p < s->m; p++) {
        if (skip[p] != 0.0f)
            continue;
        const float dp = dd[p], fp = f[p];
        if (first) {
            for (size_t j = 0; j < nb; j++) {
                float w = ks_rnd(d, ui[p][j] - ks_rnd(d, dp * u[j]));
                T[j] = 0.0f + ks_rnd(d, fp * w);
            }
            first = false;
            continue;
        }
        for (size_t j = 0; j < nb; j++) {
            float w = ks_rnd(d, ui[p][j] - ks_rnd(d, dp * u[j]));
            T[j] = ks_rnd(d, T[j] + ks_rnd(d, fp * w));
        }
    }
    if (first)
        for (size_t j = 0; j < nb; j++)
            T[j] = 0.0f;
}

/* u' of iteration k (before renormalisation), in place of u. */
KS_INLINE void ks_next(enum ms_dtype d, const struct karcher_state *s, uint32_t k, size_t nb,
                       float *restrict u, const float *restrict T)
{
    const float *q = KS_NT_(s, k); /* |T|, r(cos), r(sin), ||u'|| */
    const float nt = q[0], cs = q[1], sn = q[2];
    for (size_t j = 0; j < nb; j++)
        u[j] = ks_rnd(d, ks_rnd(d, cs * u[j]) + ks_rnd(d, sn * ks_rnd(d, T[j] / nt)));
}

KS_INLINE void ks_renorm(enum ms_dtype d, const struct karcher_state *s, uint32_t k, size_t nb,
                         float *restrict u)
{
    const float nu = KS_NT_(s, k)[3];
    if ((double)nu > s->tol)
        for (size_t j = 0; j < nb; j++)
            u[j] = ks_rnd(d, u[j] / nu);
}

/* One whole iteration with the scalars of iteration k: u_{t+1} from u_t; T is scratch. */
KS_INLINE void ks_step(enum ms_dtype d, const struct karcher_state *s, uint32_t k, size_t nb,
                       const float (*restrict ui)[KS_B], float *restrict u, float *restrict T)
{
    ks_T(d, s, k, nb, ui, u, T);
    ks_next(d, s, k, nb, u, T);
    ks_renorm(d, s, k, nb, u);
}

/* Keep: element j's uint32 holds u'_{kat-1} in its low half and Brent's saved
 * u'_bp in its high half, each as its D bits (exact). */
KS_INLINE uint32_t ks_bits(enum ms_dtype d, float x)
{
    return d == MS_DT_BF16 ? ms_f32_bits(x) >> 16 : ms_f32_to_f16_1(x);
}

KS_INLINE float ks_val(enum ms_dtype d, uint32_t h)
{
    return d == MS_DT_BF16 ? ms_f32_from_bits(h << 16) : ms_f16_to_f32_1((uint16_t)h);
}

/* u = u_k of elements [j0, j0+nb); with prev (k >= 1) also prev = u'_{k-1}, with
 * sv (s->bp < k) sv = u'_bp. u_0 from the inputs; u_k, k >= 1, from the keep
 * area (k == s->kat: it holds u'_{k-1} and u'_bp) or replayed from u_0 with the
 * scalars found so far. T is scratch. */
KS_INLINE void ks_at(enum ms_dtype d, const struct karcher_state *s, const struct ms_chunk *c,
                     size_t j0, size_t nb, const float (*restrict ui)[KS_B], uint32_t k,
                     float *restrict u, float *restrict T, float *restrict prev,
                     float *restrict sv)
{
    if (k == 0) {
        ks_start(d, s, nb, ui, u);
        return;
    }
    if (c->keep) {
        assert(s->kept && s->kat == k);
        uint32_t w[KS_B];
        memcpy(w, (const uint32_t *)c->keep + j0, nb * sizeof(uint32_t));
        for (size_t j = 0; j < nb; j++)
            u[j] = ks_val(d, w[j] & 0xffffu);
        if (prev)
            memcpy(prev, u, nb * sizeof(float));
        if (sv)
            for (size_t j = 0; j < nb; j++)
                sv[j] = ks_val(d, w[j] >> 16);
        ks_renorm(d, s, k - 1, nb, u);
        return;
    }
    ks_start(d, s, nb, ui, u);
    for (uint32_t t = 0; t < k; t++) {
        ks_T(d, s, t, nb, ui, u, T);
        ks_next(d, s, t, nb, u, T);
        if (sv && t == s->bp)
            memcpy(sv, u, nb * sizeof(float));
        if (prev && t + 1 == k)
            memcpy(prev, u, nb * sizeof(float));
        ks_renorm(d, s, t, nb, u);
    }
}

/* Adds n (< 2^48) to an exact counter: both terms are floats. */
static void ks_count(struct ms_xacc *a, uint64_t n)
{
    ms_xacc_add(a, (double)(float)(n & 0xffffffu));
    ms_xacc_add(a, (double)(float)(n >> 24) * 16777216.0);
}

static uint64_t ks_miss(const float *restrict a, const float *restrict b, size_t nb)
{
    uint64_t mm = 0;
    for (size_t j = 0; j < nb; j++)
        mm += ms_f32_bits(a[j]) != ms_f32_bits(b[j]);
    return mm;
}

/* Brent's cycle search saves u'_k in the ||u'|| pass of iteration k when this holds. */
static bool ks_save(const struct karcher_state *s, uint32_t k)
{
    return k == 0 || k - s->bp == s->bpow;
}

/* A reduce pass over chunk c (c->in and c->keep; with sc, the stored path,
 * sc->in instead of c->in) into acc. */
KS_INLINE void ks_reduce(enum ms_dtype d, const struct karcher_state *s, const struct ms_chunk *c,
                         const struct ms_chunk_stored *sc, struct ms_xacc *acc)
{
    const size_t cnt = (size_t)c->count;
    const uint32_t k = s->done;
    if (s->phase == KS_NORM) {
        if (!sc) {
            for (uint32_t i = 0; i < s->n; i++)
                ms_xacc_sumsq(&acc[i], c->in[i], cnt);
            return;
        }
        /* the same exact sums over the decoded floats, block by block */
        float x[KS_NB];
        for (uint32_t i = 0; i < s->n; i++)
            for (size_t j0 = 0; j0 < cnt; j0 += KS_NB) {
                const size_t nb = MS_MIN((size_t)KS_NB, cnt - j0);
                ms_dtype_decode(sc->dt, (const uint16_t *)sc->in[i] + j0, x, nb);
                ms_xacc_sumsq(&acc[i], x, nb);
            }
        return;
    }
    float ui[MS_MAX_INPUTS][KS_B], u[KS_B], T[KS_B], prev[KS_B], sv[KS_B];
    uint64_t miss1 = 0, missb = 0;
    const bool save = ks_save(s, k), brent = k >= 1 && s->bp < k - 1;
    for (size_t j0 = 0; j0 < cnt; j0 += KS_B) {
        const size_t nb = MS_MIN((size_t)KS_B, cnt - j0);
        ks_units(d, s, c, sc, j0, nb, ui);
        switch (s->phase) {
        case KS_INIT:
            ks_u0(d, s, nb, ui, u);
            ms_xacc_sumsq(&acc[0], u, nb);
            break;
        case KS_DOT:
            /* the dots of u_k with every u_i, and the guessed |T_k|^2 */
            ks_at(d, s, c, j0, nb, ui, k, u, T, NULL, NULL);
            for (uint32_t p = 0; p < s->m; p++)
                ms_xacc_dot(&acc[p], u, ui[p], nb);
            if (s->guess) {
                ks_T(d, s, k - 1, nb, ui, u, T);
                ms_xacc_sumsq(&acc[s->m], T, nb);
            }
            break;
        case KS_NT:
            ks_at(d, s, c, j0, nb, ui, k, u, T, NULL, NULL);
            ks_T(d, s, k, nb, ui, u, T);
            ms_xacc_sumsq(&acc[0], T, nb);
            break;
        default:
            /* ||u'_k||; counts the elements where u'_k differs from u'_{k-1} and
             * from Brent's saved u'_bp; keeps u'_k (and saves it) */
            assert(s->phase == KS_NU);
            ks_at(d, s, c, j0, nb, ui, k, u, T, k >= 1 ? prev : NULL, brent ? sv : NULL);
            ks_T(d, s, k, nb, ui, u, T);
            ks_next(d, s, k, nb, u, T);
            ms_xacc_sumsq(&acc[0], u, nb);
            if (k >= 1)
                miss1 += ks_miss(u, prev, nb);
            if (brent)
                missb += ks_miss(u, sv, nb);
            if (c->keep) {
                uint32_t w[KS_B], *kp = (uint32_t *)c->keep + j0;
                if (save) {
                    for (size_t j = 0; j < nb; j++)
                        w[j] = ks_bits(d, u[j]) * 0x10001u;
                } else {
                    memcpy(w, kp, nb * sizeof(uint32_t));
                    for (size_t j = 0; j < nb; j++)
                        w[j] = (w[j] & 0xffff0000u) | ks_bits(d, u[j]);
                }
                memcpy(kp, w, nb * sizeof(uint32_t));
            }
            if (s->spec) {
                /* the dots pass k+1's sums with u_{k+1} = r(u'_k / nug) (prev is free) */
                const float g = s->nug;
                if ((double)g > s->tol)
                    for (size_t j = 0; j < nb; j++)
                        prev[j] = ks_rnd(d, u[j] / g);
                else
                    memcpy(prev, u, nb * sizeof(float));
                for (uint32_t p = 0; p < s->m; p++)
                    ms_xacc_dot(&acc[KS_SPEC + p], prev, ui[p], nb);
                if (s->guess) {
                    ks_T(d, s, k, nb, ui, prev, T);
                    ms_xacc_sumsq(&acc[KS_SPEC + s->m], T, nb);
                }
            }
            break;
        }
    }
    if (s->phase == KS_NU) {
        ks_count(&acc[1], miss1);
        ks_count(&acc[2], missb);
    }
}

/* Torch's float32 norm of a tensor whose exact sum of squares is in a. */
static float ks_norm(const struct ms_xacc *a) { return sqrtf((float)ms_xacc_value(a)); }

/* True when iterations k and k2 have the same d_i, f_i, skip_i, bit for bit. */
static bool ks_same_scalars(const struct karcher_state *s, uint32_t k, uint32_t k2)
{
    const size_t sz = s->m * sizeof(float);
    return !memcmp(KS_D(s, k), KS_D(s, k2), sz) && !memcmp(KS_F(s, k), KS_F(s, k2), sz) &&
           !memcmp(KS_SKIP(s, k), KS_SKIP(s, k2), sz);
}

/* |T_k| is the float32 norm of the exact sum in a: stop, or the |T| scalars and
 * the ||u'|| pass next. */
static int ks_have_nt(struct karcher_state *s, enum ms_dtype d, uint32_t k, const struct ms_xacc *a)
{
    float *q = KS_NT_(s, k);
    q[0] = ks_norm(a);
    s->iters = k + 1;
    if ((double)q[0] < s->tol) {
        s->target = k; /* u stays u_k */
        return MS_STAGE_APPLY;
    }
    q[1] = ms_rnd(d, cosf(q[0]));
    q[2] = ms_rnd(d, sinf(q[0]));
    s->phase = KS_NU;
    /* Speculation: where the iterates keep moving without a cycle, ||u'|| often
     * repeats with period 2 (or 1) before the iterates do; then the ||u'|| pass
     * guesses ||u'_k|| from the norms before and also sums the dots pass k+1's
     * sums on that guess, which are that pass's when the guess comes out bit
     * for bit (a wrong guess costs those sums only). Not for the last iteration. */
    s->spec = false;
    if (k + 1 < (uint32_t)s->max_iter && k >= 2) {
        const float n1 = KS_NT_(s, k - 1)[3], n2 = KS_NT_(s, k - 2)[3];
        if (k >= 3 && !memcmp(&n1, &KS_NT_(s, k - 3)[3], sizeof(float))) {
            s->spec = true;
            s->nug = n2;
        } else if (!memcmp(&n1, &n2, sizeof(float))) {
            s->spec = true;
            s->nug = n1;
        }
    }
    return MS_STAGE_REDUCE;
}

/* The dots of u_k with every u_i are the exact sums dots[0..m), and guess (when
 * s->guess) is |T_k|^2 with iteration k-1's scalars: iteration k's scalars, then
 * stop, or the ||u'|| pass (the guess held), or the |T| pass next. */
static int ks_have_dots(struct karcher_state *s, enum ms_dtype d, uint32_t k,
                        const struct ms_xacc *dots, const struct ms_xacc *guess)
{
    float *dd = KS_D(s, k), *f = KS_F(s, k), *skip = KS_SKIP(s, k);
    bool all = true;
    for (uint32_t p = 0; p < s->m; p++) {
        float dot = ms_rnd(d, (float)ms_xacc_value(&dots[p]));
        dot = dot < -1.0f ? -1.0f : dot > 1.0f ? 1.0f : dot;
        float th = ms_rnd(d, acosf(dot));
        dd[p] = dot;
        skip[p] = (double)th < s->tol;
        all = all && skip[p] != 0.0f;
        f[p] = ms_rnd(d, s->af * ms_rnd(d, th / ms_rnd(d, sinf(th))));
    }
    /* the guess held: the pass summed |T_k|^2 with these scalars */
    const bool same = k >= 1 && ks_same_scalars(s, k, k - 1), hit = s->guess && same;
    s->guess = k == 0 || same;
    if (all) {
        /* every input skipped: T_k is +0 in every element (ks_T), so the |T|
         * pass would sum exactly 0 (converged iterates end here) */
        struct ms_xacc zero;
        ms_xacc_init(&zero);
        return ks_have_nt(s, d, k, &zero);
    }
    if (hit)
        return ks_have_nt(s, d, k, guess);
    s->phase = KS_NT;
    return MS_STAGE_REDUCE;
}

/* Loop thread: turns the pass's sums into the next scalars; chooses the next pass. */
static int ks_end_pass(struct karcher_state *s, const struct ms_stage_job *job)
{
    enum ms_dtype d = job->compute;
    uint32_t k = s->done;
    switch (s->phase) {
    case KS_NORM: {
        const double alpha = 1.0 / s->n;
        double scale = 0.0, asum = 0.0;
        for (uint32_t i = 0; i < s->n; i++) {
            s->norm[i] = ks_norm(&s->acc[i]);
            scale += alpha * s->norm[i];
            if (s->norm[i] > s->tol) {
                s->v[s->m++] = i;
                asum += alpha;
            }
        }
        s->scale = (float)scale;
        if (s->m == 0) {
            s->zero = true;
            return MS_STAGE_APPLY;
        }
        s->af = (float)(alpha / asum);
        s->phase = KS_INIT;
        break;
    }
    case KS_INIT:
        s->nu0 = ks_norm(&s->acc[0]);
        s->fallback = (double)s->nu0 < s->tol;
        if (s->max_iter == 0)
            return MS_STAGE_APPLY; /* target 0: u_0 */
        s->phase = KS_DOT;
        break;
    case KS_DOT:
        if (ks_have_dots(s, d, k, &s->acc[0], &s->acc[s->m]) == MS_STAGE_APPLY)
            return MS_STAGE_APPLY;
        break;
    case KS_NT:
        if (ks_have_nt(s, d, k, &s->acc[0]) == MS_STAGE_APPLY)
            return MS_STAGE_APPLY;
        break;
    default: {
        assert(s->phase == KS_NU);
        KS_NT_(s, k)[3] = ks_norm(&s->acc[0]);
        s->done = k + 1;
        s->kept = true;
        s->kat = k + 1; /* the keep holds u'_k */
        if (s->done >= (uint32_t)s->max_iter) {
            s->target = s->done;
            return MS_STAGE_APPLY;
        }
        uint32_t l = 0;
        if (k >= 1 && ms_xacc_value(&s->acc[1]) == 0)
            l = 1;
        else if (k >= 1 && s->bp < k - 1 && ms_xacc_value(&s->acc[2]) == 0)
            l = k - s->bp;
        if (l) {
            /* u'_k == u'_{k-l} everywhere, hence ||u'_k|| == ||u'_{k-l}|| and
             * u_{k+1} == u_{k+1-l}: the iterates repeat with period l from
             * u_{k+1-l} on (each depends only on the one before, and none of
             * those iterations stopped), so iteration max_iter ends on
             * u_{k0 + (max_iter - k0) mod l}, k0 = k+1-l, which apply computes */
            uint32_t k0 = k + 1 - l;
            s->target = k0 + (uint32_t)(((unsigned long)s->max_iter - k0) % l);
            s->per = l;
            return MS_STAGE_APPLY;
        }
        if (ks_save(s, k)) {
            s->bpow = k == 0 ? 1 : 2 * s->bpow;
            s->bp = k;
        }
        if (s->spec && !memcmp(&KS_NT_(s, k)[3], &s->nug, sizeof(float))) {
            /* the guess held: this pass summed the dots pass k+1's sums */
            if (ks_have_dots(s, d, k + 1, &s->acc[KS_SPEC], &s->acc[KS_SPEC + s->m]) ==
                MS_STAGE_APPLY)
                return MS_STAGE_APPLY;
            break;
        }
        s->phase = KS_DOT;
        break;
    }
    }
    for (uint32_t i = 0; i < s->n + KS_NCNT; i++)
        ms_xacc_init(&s->acc[i]);
    return MS_STAGE_REDUCE;
}

/* y[j] = r(float32(s) * u_target[j]). From u_kat (the keep area), the iterations
 * after kat run on; past the scalars found (a cycle), iteration t uses those of t - per.
 * y is c->out, or with sc (the stored path) sc->out, y encoded to sc->dt. */
KS_INLINE void ks_apply(enum ms_dtype d, const struct karcher_state *s, const struct ms_chunk *c,
                        const struct ms_chunk_stored *sc)
{
    float ui[MS_MAX_INPUTS][KS_B], u[KS_B], T[KS_B], y[KS_B];
    const size_t cnt = (size_t)c->count;
    const float scale = s->scale;
    const bool kept = c->keep && s->kept;
    const uint32_t from = kept ? s->kat : 0;
    uint32_t to = s->target;
    if (to < from) {
        assert(s->per && to + s->per >= from);
        to += s->per;
    }
    /* from the keep area with no iteration left, the units are not needed */
    const bool units = !kept || from < to;
    for (size_t j0 = 0; j0 < cnt; j0 += KS_B) {
        const size_t nb = MS_MIN((size_t)KS_B, cnt - j0);
        if (units)
            ks_units(d, s, c, sc, j0, nb, ui);
        ks_at(d, s, c, j0, nb, ui, from, u, T, NULL, NULL);
        for (uint32_t t = from; t < to; t++)
            ks_step(d, s, t < s->done ? t : t - s->per, nb, ui, u, T);
        if (sc) {
            for (size_t j = 0; j < nb; j++)
                y[j] = ks_rnd(d, scale * u[j]);
            ms_dtype_encode(sc->dt, y, (uint16_t *)sc->out + j0, nb);
            continue;
        }
        for (size_t j = 0; j < nb; j++)
            c->out[j0 + j] = ks_rnd(d, scale * u[j]);
    }
}

/* A reduce pass over chunk c into acc, or apply when acc is NULL; D a constant
 * in each branch. sc: the stored path (c then holds only the geometry and keep). */
static void ks_run(enum ms_dtype d, const struct karcher_state *s, const struct ms_chunk *c,
                   const struct ms_chunk_stored *sc, struct ms_xacc *acc)
{
    if (d == MS_DT_BF16) {
        if (acc)
            ks_reduce(MS_DT_BF16, s, c, sc, acc);
        else
            ks_apply(MS_DT_BF16, s, c, sc);
    } else {
        assert(d == MS_DT_F16);
        if (acc)
            ks_reduce(MS_DT_F16, s, c, sc, acc);
        else
            ks_apply(MS_DT_F16, s, c, sc);
    }
}

/* The versions of ms_isa.h: ks_run inlined whole (flatten) and compiled for each
 * target. Every step is elementwise in a fixed order (no FMA: -ffp-contract=off)
 * and the compiler does not reassociate float arithmetic, so a wider vector
 * changes no value; the sums are ms_xacc's, exact in any order. */
MS__ISA_VERSIONS(ks_run_isa, ks_run,
                 (enum ms_dtype d, const struct karcher_state *s, const struct ms_chunk *c,
                  const struct ms_chunk_stored *sc, struct ms_xacc *acc),
                 (d, s, c, sc, acc))

/* ------------------------------------------------------------------------ */
/* Coefficient form (float32).                                               */

static void karcher_reduce(const void *state, const struct ms_stage_job *job,
                           const struct ms_chunk *c, void *partial)
{
    const struct karcher_state *s = state;
    struct ms_xacc *g = partial;
    size_t cnt = (size_t)c->count;
    if (s->step) {
        for (uint32_t i = 0; i < s->n + KS_NCNT; i++)
            ms_xacc_init(&g[i]);
        ks_run_isa(job->compute, s, c, NULL, g);
        return;
    }
    for (uint32_t i = 0; i < s->n; i++)
        for (uint32_t j = i; j < s->n; j++) {
            struct ms_xacc *a = &g[karcher_gi(s->n, i, j)];
            ms_xacc_init(a);
            if (i == j)
                ms_xacc_sumsq(a, c->in[i], cnt);
            else
                ms_xacc_dot(a, c->in[i], c->in[j], cnt);
        }
}

static void karcher_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                         const void *partial)
{
    struct karcher_state *s = state;
    const struct ms_xacc *g = partial;
    if (s->step) {
        for (uint32_t i = 0; i < s->n + KS_NCNT; i++)
            ms_xacc_merge(&s->acc[i], &g[i]);
        return;
    }
    for (size_t k = 0; k < (size_t)s->n * (s->n + 1) / 2; k++)
        ms_xacc_merge(&s->g[k], &g[k]);
}

/* x'Gy over the m valid inputs (G is m x m, row-major). */
static double karcher_form(const double *G, const double *x, const double *y, uint32_t m)
{
    double acc = 0;
    for (uint32_t i = 0; i < m; i++) {
        double r = 0;
        for (uint32_t j = 0; j < m; j++)
            r += G[i * m + j] * y[j];
        acc += x[i] * r;
    }
    return acc;
}

static double karcher_len(const double *G, const double *x, uint32_t m)
{
    double q = karcher_form(G, x, x, m);
    return sqrt(q > 0 ? q : 0);
}

static int karcher_end_pass(void *state, const struct ms_stage_job *job)
{
    struct karcher_state *s = state;
    if (s->step)
        return ks_end_pass(s, job);
    int pi = ms_method_param(job->method, "max_iter"), pt = ms_method_param(job->method, "tol");
    assert(pi >= 0 && pt >= 0);
    const double tol = job->gv[pt];
    const long max_iter = (long)job->gv[pi];
    const uint32_t n = s->n;

    /* Norms (float32, as torch.linalg.norm of float32(t)), the global scale
     * over all inputs and the valid ones. */
    const double alpha = 1.0 / n;
    double scale = 0.0, asum = 0.0;
    uint32_t v[MS_MAX_INPUTS], m = 0;
    for (uint32_t i = 0; i < n; i++) {
        s->norm[i] = sqrtf((float)ms_xacc_value(&s->g[karcher_gi(n, i, i)]));
        scale += alpha * s->norm[i];
        if (s->norm[i] > tol) {
            v[m++] = i;
            asum += alpha;
        }
    }
    s->scale = (float)scale;
    if (m == 0) {
        s->zero = true;
        return MS_STAGE_APPLY;
    }
    const double a = alpha / asum;

    /* Gram matrix of the valid unit vectors. */
    double G[MS_MAX_INPUTS * MS_MAX_INPUTS];
    for (uint32_t i = 0; i < m; i++)
        for (uint32_t j = 0; j < m; j++) {
            uint32_t p = MS_MIN(v[i], v[j]), q = MS_MAX(v[i], v[j]);
            G[i * m + j] = ms_xacc_value(&s->g[karcher_gi(n, p, q)]) /
                           ((double)s->norm[p] * (double)s->norm[q]);
        }

    /* Initial guess: the normalised mean, or the first valid unit vector. */
    double c[MS_MAX_INPUTS], T[MS_MAX_INPUTS];
    for (uint32_t i = 0; i < m; i++)
        c[i] = a;
    double nu = karcher_len(G, c, m);
    for (uint32_t i = 0; i < m; i++)
        c[i] = nu < tol ? (i == 0) : c[i] / nu;

    s->iters = 0;
    for (long it = 0; it < max_iter; it++) {
        s->iters++;
        for (uint32_t i = 0; i < m; i++)
            T[i] = 0;
        for (uint32_t i = 0; i < m; i++) {
            double d = 0; /* u.u_i = (G c)_i */
            for (uint32_t j = 0; j < m; j++)
                d += G[i * m + j] * c[j];
            d = d < -1 ? -1 : d > 1 ? 1 : d;
            double th = acos(d);
            if (th < tol)
                continue;
            double f = a * (th / sin(th));
            T[i] += f; /* f*(u_i - d*u) */
            for (uint32_t j = 0; j < m; j++)
                T[j] -= f * d * c[j];
        }
        double nt = karcher_len(G, T, m);
        if (nt < tol)
            break;
        double cn = cos(nt), sn = sin(nt) / nt;
        for (uint32_t i = 0; i < m; i++)
            c[i] = cn * c[i] + sn * T[i];
        double un = karcher_len(G, c, m);
        if (un > tol)
            for (uint32_t i = 0; i < m; i++)
                c[i] /= un;
    }
    for (uint32_t i = 0; i < m; i++)
        s->k[v[i]] = c[i] / s->norm[v[i]];
    return MS_STAGE_APPLY;
}

/* y[j] = rnd(scale * rnd(float32(sum_i k_i x_i[j]))); d is a constant in each caller. */
static inline void karcher_kern(enum ms_dtype d, const struct karcher_state *s,
                                const struct ms_chunk *c, size_t cnt)
{
    for (size_t j = 0; j < cnt; j++) {
        double u = 0;
        for (uint32_t i = 0; i < s->n; i++)
            u += s->k[i] * c->in[i][j];
        c->out[j] = ms_rnd(d, s->scale * ms_rnd(d, (float)u));
    }
}

static void karcher_apply(const void *state, const struct ms_stage_job *job,
                          const struct ms_chunk *c)
{
    const struct karcher_state *s = state;
    size_t cnt = (size_t)c->count;
    if (s->copy) {
        memcpy(c->out, c->in[0], cnt * sizeof(float));
        return;
    }
    if (s->zero) {
        for (size_t j = 0; j < cnt; j++)
            c->out[j] = 0.0f;
        return;
    }
    if (s->step) {
        ks_run_isa(job->compute, s, c, NULL, NULL);
        return;
    }
    assert(job->compute == MS_DT_F32);
    karcher_kern(MS_DT_F32, s, c, cnt);
}

/*
 * The stored-bytes path (ms_stage_ops.stored_passes): the step form with its
 * inputs and output stored in the compute dtype D (bf16 or f16). Each block's
 * inputs are decoded into the units' scratch (L1) instead of the engine's
 * float buffers, every later step is the float path's, and apply's floats are
 * encoded to D (exact: they are D values), so the partials, the keep area's
 * words and the bytes are the float path's. The coefficient form (float32) and
 * a lone input take the float path.
 */
static bool karcher_stored_passes(const void *state, const struct ms_stage_job *job,
                                  enum ms_dtype dt)
{
    const struct karcher_state *s = state;
    return s->step && dt == job->compute && (dt == MS_DT_BF16 || dt == MS_DT_F16);
}

/* The geometry and keep area of sc as the step form's loops read them. */
static void karcher_stored_chunk(const struct ms_chunk_stored *sc, struct ms_chunk *c)
{
    memset(c, 0, sizeof(*c));
    c->first = sc->first;
    c->count = sc->count;
    c->index = sc->index;
    c->pass = sc->pass;
    c->keep = sc->keep;
}

static void karcher_reduce_stored(const void *state, const struct ms_stage_job *job,
                                  const struct ms_chunk_stored *sc, void *partial)
{
    const struct karcher_state *s = state;
    struct ms_xacc *g = partial;
    struct ms_chunk c;
    assert(s->step && sc->dt == job->compute);
    karcher_stored_chunk(sc, &c);
    for (uint32_t i = 0; i < s->n + KS_NCNT; i++)
        ms_xacc_init(&g[i]);
    ks_run_isa(job->compute, s, &c, sc, g);
}

static bool karcher_apply_stored(const void *state, const struct ms_stage_job *job,
                                 const struct ms_chunk_stored *sc)
{
    const struct karcher_state *s = state;
    if (s->copy || !s->step || sc->dt != job->compute)
        return false;
    if (s->zero) {
        memset(sc->out, 0, (size_t)sc->count * sizeof(uint16_t)); /* +0 in bf16 and f16 */
        return true;
    }
    struct ms_chunk c;
    karcher_stored_chunk(sc, &c);
    ks_run_isa(job->compute, s, &c, sc, NULL);
    return true;
}

static const struct ms_stage_ops karcher_ops = {
    .state_size = karcher_state_size,
    .partial_size = karcher_partial_size,
    .keeps = karcher_is_step,
    .begin = karcher_begin,
    .reduce = karcher_reduce,
    .fold = karcher_fold,
    .end_pass = karcher_end_pass,
    .apply = karcher_apply,
    .apply_stored = karcher_apply_stored,
    .stored_passes = karcher_stored_passes,
    .reduce_stored = karcher_reduce_stored,
};

const struct ms_method ms_method_karcher = {
    .name = "karcher",
    .summary = "Riemannian (Karcher) mean of the models",
    .flags = MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 2,
    .params = { MS__G("max_iter", 10, 0, 100000), MS__G("tol", 1e-5, 0, MS__INF) },
    .card = { "Karcher Mean", "https://en.wikipedia.org/wiki/Karcher_mean" },
    .ops = &karcher_ops,
};
