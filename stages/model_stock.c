/*
 * model_stock.c - the `model_stock` method (mergekit-spec.md 2.8): move from
 * the base w0 toward the average of the others by a ratio t that grows with
 * how aligned their task vectors are.
 *
 * With w_1..w_N the other models in input order, rnd() rounding to the compute
 * dtype D, and sums over a vector ("filter_wise: false": the whole flattened
 * tensor; "true": each row, i.e. each vector along the last dim; a 1-D tensor
 * is one row):
 *   o_i   = rnd(w_i - w0)
 *   n_i   = rnd(sqrtf(float32(sum o_i^2)))           torch.norm in D
 *   dot   = rnd(float32(sum rnd(o_i*o_j)))           (o_i*o_j).sum(): products in D first
 *   cos   = clamp(rnd(dot / max(rnd(n_i*n_j), rnd(1e-6))), -1, 1)   for each pair i < j
 *   c     = rnd((0 + cos_12 + cos_13 + ...) / float32(K))   mean of the K pairs, float32 sum
 *   t     = rnd(rnd(N*c) / rnd(1 + rnd((N-1)*c)))
 *   avg   = rnd(rnd(...rnd(rnd(0 + w_1) + w_2)...) / N)
 *   out   = rnd(rnd(t*avg) + rnd(rnd(1 - t)*w0))
 * The elementwise steps follow torch exactly. The vector sums are exact sums
 * (ms_xacc) rounded once to float32, where torch adds in float32 in a blocked
 * order; the two agree except in rare ties of the final rounding (about 1 ulp
 * of a scalar, spec 7.20). The mean of the cosines adds them in pair order.
 *
 * filter_wise false: one reduce pass sums every o_i^2 and rounded o_i*o_j over
 * the tensor; end_pass computes t; apply is elementwise. filter_wise true: the
 * stage is ROWWISE and apply computes each row's t from the row alone (no
 * reduce). Both are independent of chunking.
 *
 * Mixed input dtypes (no dtype:, e.g. a bf16 base and a float16 model): torch
 * promotes op by op, so every step above rounds to the promotion of its own
 * operands' dtypes (struct mstock_dt): o_i to P(dt_i, dt_0); a pair's products,
 * dot, norm product and cosine to P of the two offsets' dtypes; the stacked
 * cosines, their mean and t to P of all pairs'; the running sum 0 + w_1 + ...
 * to P of the models added so far, and avg to its last; t*avg, (1-t)*w0 and
 * their sum to the promotions of their operands. The plan computes in float32
 * then (every value is exact there) and the stage rounds as above.
 *
 * Inputs: the base alone is returned unchanged. Otherwise the base and at least
 * two others are needed: fewer is an error here (mergekit omits an optional
 * weight in that case; that is the plan's decision), as is a missing base.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

#define MS_NMAX (MS_MAX_INPUTS - 1)            /* other models */
#define MS_PMAX (MS_NMAX * (MS_NMAX - 1) / 2)  /* pairs */

/* Sums over one vector: norms of the N offsets, then the K pair dots (i < j, row-major). */
struct mstock_sums {
    struct ms_xacc a[MS_NMAX + MS_PMAX];
};

/* Mixed input dtypes: the dtype of each step (file comment). */
struct mstock_dt {
    enum ms_dtype od[MS_NMAX];    /* o_i */
    enum ms_dtype pd[MS_PMAX];    /* pair (i < j, row-major): product, dot, norms' product, cos */
    enum ms_dtype cd;             /* stacked cosines, their mean, t, 1 - t */
    enum ms_dtype sd[MS_NMAX];    /* running sum after adding w_i */
    enum ms_dtype m1, m2, outd;   /* t*avg, (1-t)*w0, their sum */
};

struct mstock_state {
    uint32_t ib;                  /* input index of the base */
    bool mixed;                   /* inputs of different dtypes: dt applies */
    struct mstock_dt dt;
    uint32_t n;                   /* other models N */
    uint32_t it[MS_NMAX];         /* their input indices, in input order */
    bool copy;                    /* the base alone */
    bool filter_wise;
    float t, omt;                 /* filter_wise false, end_pass: t and rnd(1 - t) */
    struct mstock_sums sums;      /* filter_wise false: folded sums */
};

static size_t mstock_state_size(const struct ms_stage_job *job) { return sizeof(struct mstock_state); }

static size_t mstock_nsums(uint32_t n) { return n + (size_t)n * (n - 1) / 2; }

static size_t mstock_partial_size(const struct ms_stage_job *job)
{
    int pf = ms_method_param(job->method, "filter_wise");
    if (pf >= 0 && job->gv[pf] != 0)
        return 0; /* no reduce pass */
    uint32_t n = job->ninputs ? MS_MIN(job->ninputs - 1, MS_NMAX) : 0;
    return mstock_nsums(n) * sizeof(struct ms_xacc);
}

static int mstock_begin(void *state, const struct ms_stage_job *job)
{
    struct mstock_state *s = state;
    int pf = ms_method_param(job->method, "filter_wise");
    assert(pf >= 0 && job->ninputs <= MS_MAX_INPUTS);
    if (job->ninputs == 1 && job->base == 0) {
        s->copy = true;
        return MS_STAGE_APPLY;
    }
    if (job->ninputs < 3)
        return ms_error(MS_EPLAN, "%s: model_stock needs at least 3 tensors (the base plus two "
                        "others), got %u", job->name, job->ninputs);
    if (job->base < 0 || (uint32_t)job->base >= job->ninputs)
        return ms_error(MS_EPLAN, "%s: model_stock needs the base model's tensor", job->name);
    s->ib = (uint32_t)job->base;
    for (uint32_t i = 0; i < job->ninputs; i++)
        if (i != s->ib)
            s->it[s->n++] = i;
    s->filter_wise = job->gv[pf] != 0;
    enum ms_dtype d0 = ms_stage_in_dt(job, s->ib);
    for (uint32_t i = 0; i < s->n; i++)
        s->mixed |= ms_stage_in_dt(job, s->it[i]) != d0;
    if (s->mixed) {
        struct mstock_dt *t = &s->dt;
        size_t k = 0;
        for (uint32_t i = 0; i < s->n; i++) {
            enum ms_dtype di = ms_stage_in_dt(job, s->it[i]);
            t->od[i] = ms_dt_promote(di, d0);
            t->sd[i] = i ? ms_dt_promote(t->sd[i - 1], di) : di;
        }
        for (uint32_t i = 0; i < s->n; i++)
            for (uint32_t l = i + 1; l < s->n; l++, k++) {
                t->pd[k] = ms_dt_promote(t->od[i], t->od[l]);
                t->cd = k ? ms_dt_promote(t->cd, t->pd[k]) : t->pd[k];
            }
        t->m1 = ms_dt_promote(t->cd, t->sd[s->n - 1]);
        t->m2 = ms_dt_promote(t->cd, d0);
        t->outd = ms_dt_promote(t->m1, t->m2);
    }
    if (s->filter_wise)
        return MS_STAGE_APPLY;
    for (size_t k = 0; k < mstock_nsums(s->n); k++)
        ms_xacc_init(&s->sums.a[k]);
    return MS_STAGE_REDUCE;
}

/* mstock_t for mixed input dtypes. */
static float mstock_t_mx(const struct mstock_dt *t, uint32_t n, const struct ms_xacc *a)
{
    float nrm[MS_NMAX];
    for (uint32_t i = 0; i < n; i++)
        nrm[i] = ms_rnd(t->od[i], sqrtf((float)ms_xacc_value(&a[i])));
    float acc = 0.0f;
    size_t k = n, p = 0;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t l = i + 1; l < n; l++, p++) {
            enum ms_dtype d = t->pd[p];
            const float lo = ms_rnd_param(d, 1e-6);
            float np = ms_rnd(d, nrm[i] * nrm[l]);
            np = np < lo ? lo : np;
            float cs = ms_rnd(d, ms_rnd(d, (float)ms_xacc_value(&a[k++])) / np);
            cs = cs < -1.0f ? -1.0f : cs;
            cs = cs > 1.0f ? 1.0f : cs;
            acc += cs;
        }
    enum ms_dtype d = t->cd;
    float c = ms_rnd(d, acc / (float)p);
    float fn = (float)n;
    return ms_rnd(d, ms_rnd(d, fn * c) / ms_rnd(d, 1.0f + ms_rnd(d, (fn - 1.0f) * c)));
}

/* t from one vector's sums, all in D as the file comment says. */
static float mstock_t(enum ms_dtype d, uint32_t n, const struct ms_xacc *a)
{
    float nrm[MS_NMAX];
    for (uint32_t i = 0; i < n; i++)
        nrm[i] = ms_rnd(d, sqrtf((float)ms_xacc_value(&a[i])));
    const float lo = ms_rnd_param(d, 1e-6);
    float acc = 0.0f;
    size_t k = n;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t l = i + 1; l < n; l++) {
            float np = ms_rnd(d, nrm[i] * nrm[l]);
            np = np < lo ? lo : np;
            float cs = ms_rnd(d, ms_rnd(d, (float)ms_xacc_value(&a[k++])) / np);
            cs = cs < -1.0f ? -1.0f : cs;
            cs = cs > 1.0f ? 1.0f : cs;
            acc += cs;
        }
    float c = ms_rnd(d, acc / (float)(k - n));
    float fn = (float)n;
    return ms_rnd(d, ms_rnd(d, fn * c) / ms_rnd(d, 1.0f + ms_rnd(d, (fn - 1.0f) * c)));
}

/*
 * The element loops run over blocks of MSTOCK_B elements, one step at a time
 * over the block, every value rounded exactly as the file comment's formulas
 * say: each element sees the same operations in the same order, and the xacc
 * kernels give the limbs of adding their terms one by one, so the block size
 * changes no byte. `mx` (a constant in each caller) selects the per-step dtypes
 * of mixed inputs (struct mstock_dt); otherwise every step rounds to d.
 */
#define MSTOCK_B 1024
#define MSTOCK_DT(mx, d, field) ((mx) ? s->dt.field : (d))

/* sum = rnd(...rnd(rnd(0 + w_1) + w_2)...) over elements [j0, j0 + nb): the running sum. */
MS__AI void mstock_sum(enum ms_dtype d, bool mx, const struct mstock_state *s,
                       const struct ms_chunk *c, float *restrict sum, size_t j0, size_t nb)
{
    for (size_t k = 0; k < nb; k++)
        sum[k] = 0.0f;
    for (uint32_t i = 0; i < s->n; i++)
        ms__k_acc(MSTOCK_DT(mx, d, sd[i]), sum, c->in[s->it[i]] + j0, nb);
}

/*
 * Keep area (bfloat16 compute, filter_wise false; ms_stage.h): the reduce pass,
 * which reads every input anyway, also stores each element's avg = rnd(sum / N)
 * and w0, both bfloat16 values, exact, in the element's 4 bytes (avg in the low
 * half); apply then reads those 4 bytes instead of the N + 1 inputs (12 bytes
 * for the bench's three), which for a resident tensor are its output buffer:
 * apply was bound by reading the inputs back from memory. Without a keep area
 * apply recomputes avg from the inputs: the same operations, the same bytes
 * (ms__k_bf16_pair_put / _get).
 */

/* avg = rnd(sum / fn), in place. */
MS__AI void mstock_k_avg(enum ms_dtype da, float *restrict sum, float fn, size_t n)
{
    for (size_t k = 0; k < n; k++)
        sum[k] = ms_rnd(da, sum[k] / fn);
}

/* Adds elements [j0, j0 + nb) of the chunk to the vector sums a[]: sum o_i^2
 * for each model, then sum rnd(o_i*o_l) for each pair i < l; with a keep area
 * (kp, bfloat16 only) also stores avg and w0 there. */
MS__AI void mstock_sums_block(enum ms_dtype d, bool mx, const struct mstock_state *s,
                              const struct ms_chunk *c, struct ms_xacc *a, uint32_t *kp,
                              size_t j0, size_t nb)
{
    float o[MS_NMAX][MSTOCK_B], p[MSTOCK_B];
    const float *w0 = c->in[s->ib] + j0;
    for (uint32_t i = 0; i < s->n; i++) {
        ms__k_sub(MSTOCK_DT(mx, d, od[i]), o[i], c->in[s->it[i]] + j0, w0, nb);
        ms_xacc_sumsq(&a[i], o[i], nb);
    }
    size_t q = s->n, pair = 0;
    for (uint32_t i = 0; i < s->n; i++)
        for (uint32_t l = i + 1; l < s->n; l++) {
            ms__k_mul(MSTOCK_DT(mx, d, pd[pair++]), p, o[i], o[l], nb);
            ms_xacc_sum(&a[q++], p, nb);
        }
    if (kp) {
        mstock_sum(d, mx, s, c, p, j0, nb);
        mstock_k_avg(MSTOCK_DT(mx, d, sd[s->n - 1]), p, (float)s->n, nb);
        ms__k_bf16_pair_put(kp + j0, p, w0, nb);
    }
}

/* y = rnd(rnd(t*avg) + rnd(omt*w0)), each op in its dtype (d1, d2, dout). NaN
 * rule (any version, any path): a NaN first operand's NaN, quieted, in torch's
 * operand order (t, 1 - t, then the t term); two NaN meet only where the tensor
 * (or row) holds a NaN, and the compiler may put either operand of an
 * instruction first (x86 returns the first one's NaN), so the choice is made
 * explicit: the float path, the stored path and every version give the same
 * bytes. */
MS__AI void mstock_k_mix(enum ms_dtype d1, enum ms_dtype d2, enum ms_dtype dout,
                         float *restrict y, const float *restrict avg, const float *restrict w0,
                         float tv, float omt, size_t n)
{
    for (size_t k = 0; k < n; k++)
        y[k] = ms_rnd(dout, ms__add_first(ms_rnd(d1, ms__mul_first(tv, avg[k])),
                                          ms_rnd(d2, ms__mul_first(omt, w0[k]))));
}

/* out = rnd(rnd(t*avg) + rnd(omt*w0)) for elements [j0, j0 + nb) of the chunk, avg
 * and w0 from the keep area when kp (read before out: maybe the same memory). */
MS__AI void mstock_mix_block(enum ms_dtype d, bool mx, const struct mstock_state *s,
                             const struct ms_chunk *c, const uint32_t *kp, float tv, float omt,
                             size_t j0, size_t nb)
{
    float avg[MSTOCK_B], w0k[MSTOCK_B];
    const float *w0 = c->in[s->ib] + j0;
    if (kp) {
        ms__k_bf16_pair_get(avg, w0k, kp + j0, nb);
        w0 = w0k;
    } else {
        mstock_sum(d, mx, s, c, avg, j0, nb);
        mstock_k_avg(MSTOCK_DT(mx, d, sd[s->n - 1]), avg, (float)s->n, nb);
    }
    mstock_k_mix(MSTOCK_DT(mx, d, m1), MSTOCK_DT(mx, d, m2), MSTOCK_DT(mx, d, outd), c->out + j0,
                 avg, w0, tv, omt, nb);
}

/* Adds elements [j0, j1) to a[] (a != NULL), or writes their output with t, omt;
 * kp: the chunk's keep area or NULL (bfloat16, filter_wise false). */
MS__AI void mstock_range(enum ms_dtype d, bool mx, const struct mstock_state *s,
                         const struct ms_chunk *c, struct ms_xacc *a, uint32_t *kp, float tv,
                         float omt, size_t j0, size_t j1)
{
    for (size_t j = j0; j < j1; j += MSTOCK_B) {
        size_t nb = MS_MIN((size_t)MSTOCK_B, j1 - j);
        if (a)
            MS__BLOCK_CALL(mstock_sums_block, nb, MSTOCK_B, d, mx, s, c, a, kp, j);
        else
            MS__BLOCK_CALL(mstock_mix_block, nb, MSTOCK_B, d, mx, s, c, kp, tv, omt, j);
    }
}

/* t from the sums a (the tensor's, or with filter_wise a row's), and *omt = 1 - t
 * rounded to the compute dtype; mx: mixed input dtypes (mstock_t_mx). */
MS__AI float mstock_row_t(enum ms_dtype d, bool mx, const struct mstock_state *s,
                          const struct ms_xacc *a, float *omt)
{
    float t = mx ? mstock_t_mx(&s->dt, s->n, a) : mstock_t(d, s->n, a);
    *omt = ms_rnd(mx ? s->dt.cd : d, 1.0f - t);
    return t;
}

/* Reduce (partial != NULL: the chunk's sums into it) or apply, in dtype d. */
MS__AI void mstock_chunk(enum ms_dtype d, bool mx, const struct mstock_state *s,
                         const struct ms_stage_job *job, const struct ms_chunk *c,
                         struct ms_xacc *partial)
{
    size_t n = (size_t)c->count;
    uint32_t *kp = d == MS_DT_BF16 && !mx && !s->filter_wise ? c->keep : NULL;
    if (partial) {
        for (size_t k = 0; k < mstock_nsums(s->n); k++)
            ms_xacc_init(&partial[k]);
        mstock_range(d, mx, s, c, partial, kp, 0.0f, 0.0f, 0, n);
        return;
    }
    if (!s->filter_wise) {
        mstock_range(d, mx, s, c, NULL, kp, s->t, s->omt, 0, n);
        return;
    }
    /* One t per row; ROWWISE chunks hold whole rows. */
    size_t row = (size_t)MS_MAX(job->row_len, 1);
    assert(n % row == 0);
    struct mstock_sums a;
    for (size_t r0 = 0; r0 < n; r0 += row) {
        for (size_t k = 0; k < mstock_nsums(s->n); k++)
            ms_xacc_init(&a.a[k]);
        mstock_range(d, mx, s, c, a.a, NULL, 0.0f, 0.0f, r0, r0 + row);
        float omt, t = mstock_row_t(d, mx, s, a.a, &omt);
        mstock_range(d, mx, s, c, NULL, NULL, t, omt, r0, r0 + row);
    }
}

/* mstock_chunk specialised for each compute dtype (a constant in each call). */
static void mstock_run(const struct mstock_state *s, const struct ms_stage_job *job,
                       const struct ms_chunk *c, struct ms_xacc *partial)
{
    if (s->mixed) {
        mstock_chunk(MS_DT_F32, true, s, job, c, partial);
        return;
    }
    switch (job->compute) {
    case MS_DT_BF16: mstock_chunk(MS_DT_BF16, false, s, job, c, partial); break;
    case MS_DT_F16: mstock_chunk(MS_DT_F16, false, s, job, c, partial); break;
    default:
        assert(job->compute == MS_DT_F32);
        mstock_chunk(MS_DT_F32, false, s, job, c, partial);
        break;
    }
}

MS__ISA_VERSIONS(mstock_run_isa, mstock_run,
                 (const struct mstock_state *s, const struct ms_stage_job *job,
                  const struct ms_chunk *c, struct ms_xacc *partial),
                 (s, job, c, partial))

static void mstock_reduce(const void *state, const struct ms_stage_job *job,
                          const struct ms_chunk *c, void *partial)
{
    mstock_run_isa(state, job, c, partial);
}
static void mstock_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                        const void *partial)
{
    struct mstock_state *s = state;
    const struct ms_xacc *a = partial;
    for (size_t k = 0; k < mstock_nsums(s->n); k++)
        ms_xacc_merge(&s->sums.a[k], &a[k]);
}

static int mstock_end_pass(void *state, const struct ms_stage_job *job)
{
    struct mstock_state *s = state;
    s->t = mstock_row_t(job->compute, s->mixed, s, s->sums.a, &s->omt);
    return MS_STAGE_APPLY;
}

static void mstock_apply(const void *state, const struct ms_stage_job *job,
                         const struct ms_chunk *c)
{
    const struct mstock_state *s = state;
    if (s->copy) {
        memcpy(c->out, c->in[s->ib], (size_t)c->count * sizeof(float));
        return;
    }
    mstock_run_isa(s, job, c, NULL);
}

/*
 * The stored-bytes path (bfloat16 or float16 inputs and output): filter_wise
 * false through ms_stage_ops.stored_passes (reduce_stored, then apply_stored),
 * filter_wise true and the base alone through apply_stored (one pass, inputs in
 * the compute dtype). Each block of MSTOCK_B elements of the inputs a step needs
 * is decoded into float scratch that stays in L1 and the float path's block
 * functions run on it, so the terms summed, the keep words and the floats mixed
 * are the float path's; apply's floats are encoded to the stored dtype, which is
 * what rounding them to the result dtype and encoding gives. With a keep area
 * (never overlapping in or out here; below) apply decodes the base and the
 * kept avg only. filter_wise decodes each row twice: for its sums, then for its
 * mix.
 */

/*
 * The stored path's keep area (bfloat16, filter_wise false) holds avg alone, as
 * bfloat16 bits packed in the area's first count * 2 bytes: w0 is the base's
 * stored bytes, which apply has anyway, so the area's other half is never
 * touched (on this path every byte of a slot first touched costs: a resident
 * job's chunk is then 10 bytes an element instead of 12 for the float path's
 * word pairs, or 8 without keeping).
 */

/* avg = rnd(sum / N) of elements [0, nb) of the block fc, into k16 as bfloat16
 * bits (exact: avg is a bfloat16 value). */
MS__AI void mstock_avg_put(enum ms_dtype d, bool mx, const struct mstock_state *s,
                           const struct ms_chunk *fc, float *restrict avg,
                           uint16_t *restrict k16, size_t nb)
{
    mstock_sum(d, mx, s, fc, avg, 0, nb);
    mstock_k_avg(MSTOCK_DT(mx, d, sd[s->n - 1]), avg, (float)s->n, nb);
    for (size_t k = 0; k < nb; k++)
        k16[k] = (uint16_t)(ms_f32_bits(avg[k]) >> 16);
}

/* Reduce (a != NULL: adds to a[], avg to k16 when k16) or apply (writes the
 * stored output; avg from k16 when k16) over elements [j0, j1) of the stored
 * chunk sc, block by block. */
MS__AI void mstock_srange(enum ms_dtype d, bool mx, const struct mstock_state *s,
                          const struct ms_chunk_stored *sc, struct ms_xacc *a, uint16_t *k16,
                          float tv, float omt, size_t j0, size_t j1)
{
    _Alignas(MS_ALIGN) float x[MS_MAX_INPUTS][MSTOCK_B], y[MSTOCK_B];
    struct ms_chunk fc = { .out = y }; /* the block as the float path's chunk sees it */
    fc.in[s->ib] = x[0];
    for (uint32_t i = 0; i < s->n; i++)
        fc.in[s->it[i]] = x[1 + i];
    for (size_t j = j0; j < j1; j += MSTOCK_B) {
        size_t nb = MS_MIN((size_t)MSTOCK_B, j1 - j);
        /* apply with avg kept needs w0 only */
        uint32_t ndec = a || !k16 ? s->n + 1 : 1;
        for (uint32_t i = 0; i < ndec; i++) {
            uint32_t k = i ? s->it[i - 1] : s->ib;
            ms_dtype_decode(sc->dt, (const uint16_t *)sc->in[k] + j, x[i], nb);
        }
        if (a) {
            MS__BLOCK_CALL(mstock_sums_block, nb, MSTOCK_B, d, mx, s, &fc, a, NULL, 0);
            if (k16)
                MS__BLOCK_CALL(mstock_avg_put, nb, MSTOCK_B, d, mx, s, &fc, y, k16 + j);
        } else if (k16) {
            ms_dtype_decode(MS_DT_BF16, k16 + j, x[1], nb);
            MS__BLOCK_CALL(mstock_k_mix, nb, MSTOCK_B, d, d, d, y, x[1], x[0], tv, omt);
        } else {
            MS__BLOCK_CALL(mstock_mix_block, nb, MSTOCK_B, d, mx, s, &fc, NULL, tv, omt, 0);
        }
        if (!a)
            ms_dtype_encode(sc->dt, y, (uint16_t *)sc->out + j, nb);
    }
}

/* mstock_chunk on the stored chunk sc. */
MS__AI void mstock_schunk(enum ms_dtype d, bool mx, const struct mstock_state *s,
                          const struct ms_stage_job *job, const struct ms_chunk_stored *sc,
                          struct ms_xacc *partial)
{
    size_t n = (size_t)sc->count;
    uint16_t *kp = d == MS_DT_BF16 && !mx && !s->filter_wise ? sc->keep : NULL;
    if (partial) {
        for (size_t k = 0; k < mstock_nsums(s->n); k++)
            ms_xacc_init(&partial[k]);
        mstock_srange(d, mx, s, sc, partial, kp, 0.0f, 0.0f, 0, n);
        return;
    }
    if (!s->filter_wise) {
        mstock_srange(d, mx, s, sc, NULL, kp, s->t, s->omt, 0, n);
        return;
    }
    size_t row = (size_t)MS_MAX(job->row_len, 1);
    assert(n % row == 0);
    struct mstock_sums a;
    for (size_t r0 = 0; r0 < n; r0 += row) {
        for (size_t k = 0; k < mstock_nsums(s->n); k++)
            ms_xacc_init(&a.a[k]);
        mstock_srange(d, mx, s, sc, a.a, NULL, 0.0f, 0.0f, r0, r0 + row);
        float omt, t = mstock_row_t(d, mx, s, a.a, &omt);
        mstock_srange(d, mx, s, sc, NULL, NULL, t, omt, r0, r0 + row);
    }
}

/* mstock_schunk specialised for each compute dtype (the stored dtype or F32). */
static void mstock_run_stored(const struct mstock_state *s, const struct ms_stage_job *job,
                              const struct ms_chunk_stored *sc, struct ms_xacc *partial)
{
    if (s->mixed) {
        mstock_schunk(MS_DT_F32, true, s, job, sc, partial);
        return;
    }
    switch (job->compute) {
    case MS_DT_BF16: mstock_schunk(MS_DT_BF16, false, s, job, sc, partial); break;
    case MS_DT_F16: mstock_schunk(MS_DT_F16, false, s, job, sc, partial); break;
    default:
        assert(job->compute == MS_DT_F32);
        mstock_schunk(MS_DT_F32, false, s, job, sc, partial);
        break;
    }
}

MS__ISA_VERSIONS(mstock_run_stored_isa, mstock_run_stored,
                 (const struct mstock_state *s, const struct ms_stage_job *job,
                  const struct ms_chunk_stored *sc, struct ms_xacc *partial),
                 (s, job, sc, partial))

static bool mstock_stored_passes(const void *state, const struct ms_stage_job *job,
                                 enum ms_dtype dt)
{
    return dt == MS_DT_BF16 || dt == MS_DT_F16;
}

static void mstock_reduce_stored(const void *state, const struct ms_stage_job *job,
                                 const struct ms_chunk_stored *c, void *partial)
{
    assert(c->dt == MS_DT_BF16 || c->dt == MS_DT_F16);
    mstock_run_stored_isa(state, job, c, partial);
}

/* Declines (before writing anything) only where no pass committed it: another
 * dtype, or a filter_wise chunk that is not whole rows (an engine sub-block). */
static bool mstock_apply_stored(const void *state, const struct ms_stage_job *job,
                                const struct ms_chunk_stored *c)
{
    const struct mstock_state *s = state;
    if (c->dt != MS_DT_BF16 && c->dt != MS_DT_F16)
        return false;
    if (s->copy) {
        memcpy(c->out, c->in[s->ib], (size_t)c->count * sizeof(uint16_t));
        return true;
    }
    uint64_t row = MS_MAX(job->row_len, 1);
    if (s->filter_wise && (c->first % row || c->count % row))
        return false;
    mstock_run_stored_isa(s, job, c, NULL);
    return true;
}

/*
 * The keep area (ms__k_bf16_pair_put) in bfloat16 with filter_wise false, up to
 * MSTOCK_KEEP_MAX elements: a resident tensor keeps in its own output buffer;
 * for a larger one (an embedding, rarely resident) the engine would reserve a
 * keep pool of numel * 4 bytes out of the budget (multislerp.c). Those
 * recompute avg in apply.
 */
#define MSTOCK_KEEP_MAX ((uint64_t)16 << 20)
static bool mstock_keeps(const struct ms_stage_job *job)
{
    int pf = ms_method_param(job->method, "filter_wise");
    return job->compute == MS_DT_BF16 && pf >= 0 && job->gv[pf] == 0 && job->ninputs >= 3 &&
           job->numel <= MSTOCK_KEEP_MAX;
}

static const struct ms_stage_ops mstock_ops = {
    .flags = MS_STAGE_ROWWISE,
    .state_size = mstock_state_size,
    .keeps = mstock_keeps,
    .partial_size = mstock_partial_size,
    .begin = mstock_begin,
    .reduce = mstock_reduce,
    .fold = mstock_fold,
    .end_pass = mstock_end_pass,
    .apply = mstock_apply,
    .apply_stored = mstock_apply_stored,
    .stored_passes = mstock_stored_passes,
    .reduce_stored = mstock_reduce_stored,
};

/* 2.8: the base and one other model: mergekit leaves an optional tensor out and
 * fails on any other. */
static int mstock_plan_inputs(const struct ms_plan_ctx *ctx, const struct ms_stage_job *job)
{
    if (job->ninputs != 2)
        return MS_PLAN_KEEP;
    if (ctx->optional)
        return MS_PLAN_SKIP;
    return ctx->problem(ctx, MS_EPLAN, "stock2", "%s: merge method 'model_stock' needs the base "
                        "and at least two other models; tensor '%s' has only one other",
                        ctx->where, job->name);
}

static const struct ms_plan_ops mstock_plan = {
    .inputs = mstock_plan_inputs,
};

const struct ms_method ms_method_model_stock = {
    .name = "model_stock",
    .summary = "Model Stock: interpolate toward the base by cosine",
    .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT,
    .min_inputs = 1,
    .nparams = 1,
    .params = { MS__G_BOOL("filter_wise", 0) },
    .card = { "Model Stock", "https://arxiv.org/abs/2403.19522" },
    .plan = &mstock_plan,
    .ops = &mstock_ops,
};
