/*
 * stage_run.c - ms_stage_run_mem: the in-memory reference driver of the stage
 * protocol (ms_stage.h). Tests run every method through it, and the engine in
 * pipeline/ must produce the same bytes for any chunk size and thread count.
 *
 * The driver deliberately exercises the freedoms the protocol gives the engine,
 * so that a stage that depends on them fails its tests here rather than in
 * production:
 *   - reduce runs over a window of chunks from the last to the first, while
 *     fold still sees the window's partials strictly in chunk order;
 *   - partials are filled with garbage before reduce (it must write them fully);
 *   - apply writes into a scratch buffer pre-filled with NaN (it must write
 *     every element) and runs over chunks in reverse order;
 *   - every chunk's inputs are copied to MS_ALIGN-aligned scratch, as the
 *     engine's buffers are;
 *   - a keep area (ms_stage_ops.keeps; one for the tensor, chunk i's part at
 *     its first element, as the engine's pool) starts as garbage (NaN bytes).
 * ms_stage_run_stored runs the stored-bytes hooks (apply_stored, and for jobs
 * with reduce passes stored_passes and reduce_stored) the same way; its keep
 * area is the same poisoned memory, which there overlaps no output.
 */
#include <assert.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"

/* Chunks reduced back to back before their partials are folded: bounds the
 * partial storage when chunks are tiny, while still reversing the order. */
#define RUN_WINDOW 64u
/* A stage asking for more reduce passes than this is assumed to loop forever. */
#define RUN_MAX_PASSES (1u << 20)

struct run {
    const struct ms_stage_job *job;
    const struct ms_stage_ops *ops;
    enum ms_dtype dt;             /* the stored path's dtype; MS_DT_NONE: the float path */
    size_t eb;                    /* bytes per element of in and out: 4, or dt's */
    const unsigned char *const *in;
    unsigned char *out;
    uint64_t chunk;               /* elements per chunk (the last may be shorter) */
    uint64_t nchunks;
    unsigned char *scratch_in;    /* ninputs aligned runs of chunk elements */
    unsigned char *scratch_out;   /* chunk elements */
    size_t in_stride;             /* bytes between inputs in scratch_in (multiple of MS_ALIGN) */
    unsigned char *keep;          /* numel * MS_KEEP_BYTES, or NULL: no keep area */
};

/* Fills c (the float path) and sc (the stored path) for chunk i: element range,
 * and inputs copied into aligned scratch. */
static void run_chunk(struct run *r, uint64_t i, uint32_t pass, struct ms_chunk *c,
                      struct ms_chunk_stored *sc)
{
    const struct ms_stage_job *job = r->job;
    memset(c, 0, sizeof(*c));
    memset(sc, 0, sizeof(*sc));
    c->first = sc->first = i * r->chunk;
    c->count = sc->count = MS_MIN(r->chunk, job->numel - c->first);
    c->index = sc->index = (uint32_t)i;
    c->pass = sc->pass = pass;
    sc->dt = r->dt;
    for (uint32_t k = 0; k < job->ninputs; k++) {
        unsigned char *dst = r->scratch_in + (size_t)k * r->in_stride;
        memcpy(dst, r->in[k] + (size_t)c->first * r->eb, (size_t)c->count * r->eb);
        c->in[k] = (const float *)(const void *)dst;
        sc->in[k] = dst;
    }
    c->out = (float *)(void *)r->scratch_out;
    sc->out = r->scratch_out;
    c->keep = r->keep ? r->keep + (size_t)c->first * MS_KEEP_BYTES : NULL;
    sc->keep = c->keep;
}

/* Both paths: dt MS_DT_NONE runs the float path (in, out: floats), else the stored one. */
static int run_job(const struct ms_stage_job *job, enum ms_dtype dt, const void *const *in,
                   void *out, uint64_t chunk_elems, bool keep)
{
    assert(job && (in || job->ninputs == 0) && (out || job->numel == 0));
    const struct ms_stage_ops *ops = job->method ? job->method->ops : NULL;
    if (!ops || !ops->apply)
        return ms_error(MS_EUNSUPPORTED, "%s: method %s has no stage", job->name ? job->name : "?",
                        job->method ? job->method->name : "(none)");
    if (job->ninputs > MS_MAX_INPUTS)
        return ms_error(MS_EINVAL, "%s: %u inputs, at most %d", job->name ? job->name : "?",
                        job->ninputs, MS_MAX_INPUTS);

    bool stored = dt != MS_DT_NONE;
    if (stored && !ops->apply_stored)
        return MS_EUNSUPPORTED;
    struct run r = { .job = job, .ops = ops, .dt = dt, .eb = stored ? ms_dtype_bits(dt) / 8 : 4,
                     .in = (const unsigned char *const *)in, .out = out };
    /* Chunk size: 0 means the whole tensor; ROWWISE rounds down to whole rows. */
    uint64_t chunk = chunk_elems ? chunk_elems : MS_MAX(job->numel, 1);
    if (ops->flags & MS_STAGE_ROWWISE) {
        uint64_t row = MS_MAX(job->row_len, 1);
        chunk = MS_MAX(chunk / row, 1) * row;
    }
    r.chunk = MS_MIN(chunk, MS_MAX(job->numel, 1));
    r.nchunks = (job->numel + r.chunk - 1) / r.chunk;
    if (r.nchunks > UINT32_MAX)
        return ms_error(MS_EINVAL, "%s: %llu chunks, too many", job->name ? job->name : "?",
                        (unsigned long long)r.nchunks);

    int rc = 0;
    void *state = NULL;
    unsigned char *partials = NULL;
    size_t ssize = ops->state_size ? ops->state_size(job) : 0;
    size_t psize = ops->partial_size ? ops->partial_size(job) : 0;
    size_t pstride = (MS_MAX(psize, 1) + MS_ALIGN - 1) / MS_ALIGN * MS_ALIGN;
    r.in_stride = ((size_t)r.chunk * r.eb + MS_ALIGN - 1) / MS_ALIGN * MS_ALIGN;

    state = ms_aligned_alloc(MS_MAX(ssize, 1));
    partials = ms_aligned_alloc(pstride * RUN_WINDOW);
    r.scratch_in = ms_aligned_alloc(r.in_stride * MS_MAX(job->ninputs, 1));
    r.scratch_out = ms_aligned_alloc((size_t)r.chunk * r.eb);
    bool want_keep = keep && ops->keeps && ops->keeps(job);
    if (want_keep)
        r.keep = ms_aligned_alloc(MS_MAX((size_t)job->numel * MS_KEEP_BYTES, 1));
    if (!state || !partials || !r.scratch_in || !r.scratch_out || (want_keep && !r.keep)) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory for the stage state", job->name ? job->name : "?");
        goto out;
    }
    memset(state, 0, MS_MAX(ssize, 1));
    if (r.keep)
        memset(r.keep, 0xff, (size_t)job->numel * MS_KEEP_BYTES);

    int next = ops->begin ? ops->begin(state, job) : MS_STAGE_APPLY;
    if (stored && next == MS_STAGE_REDUCE &&
        !(ops->stored_passes && ops->reduce_stored && ops->stored_passes(state, job, dt))) {
        rc = MS_EUNSUPPORTED;
        goto out;
    }
    if (stored && next == MS_STAGE_APPLY && dt != job->compute) {
        rc = MS_EUNSUPPORTED; /* one-pass jobs: apply_stored sees the compute dtype only */
        goto out;
    }
    uint32_t pass = 0;
    while (next == MS_STAGE_REDUCE) {
        assert(ops->reduce && ops->fold && ops->end_pass);
        if (pass >= RUN_MAX_PASSES) {
            rc = ms_error(MS_EDATA, "%s: %s did not converge after %u passes", job->name,
                          job->method->name, pass);
            goto out;
        }
        for (uint64_t w0 = 0; w0 < r.nchunks; w0 += RUN_WINDOW) {
            uint64_t w1 = MS_MIN(w0 + RUN_WINDOW, r.nchunks);
            struct ms_chunk c;
            struct ms_chunk_stored sc;
            for (uint64_t i = w1; i-- > w0;) {
                unsigned char *p = partials + (size_t)(i - w0) * pstride;
                memset(p, 0xa5, pstride);
                run_chunk(&r, i, pass, &c, &sc);
                if (stored) {
                    sc.out = NULL;
                    ops->reduce_stored(state, job, &sc, p);
                } else {
                    ops->reduce(state, job, &c, p);
                }
            }
            for (uint64_t i = w0; i < w1; i++) {
                /* fold sees the chunk geometry; its inputs are not needed again. */
                memset(&c, 0, sizeof(c));
                c.first = i * r.chunk;
                c.count = MS_MIN(r.chunk, job->numel - c.first);
                c.index = (uint32_t)i;
                c.pass = pass;
                ops->fold(state, job, &c, partials + (size_t)(i - w0) * pstride);
            }
        }
        next = ops->end_pass(state, job);
        pass++;
    }
    if (next < 0) {
        rc = next;
        goto out;
    }
    assert(next == MS_STAGE_APPLY);

    for (uint64_t i = r.nchunks; i-- > 0;) {
        struct ms_chunk c;
        struct ms_chunk_stored sc;
        run_chunk(&r, i, pass, &c, &sc);
        memset(r.scratch_out, 0xff, (size_t)c.count * r.eb); /* NaN: unwritten shows */
        if (!stored) {
            ops->apply(state, job, &c);
        } else if (!ops->apply_stored(state, job, &sc)) {
            /* declining is allowed only where the stage was not committed (one pass) */
            rc = pass ? ms_error(MS_EINVAL, "%s: %s declined a committed stored chunk",
                                 job->name, job->method->name)
                      : MS_EUNSUPPORTED;
            goto out;
        }
        memcpy(r.out + (size_t)c.first * r.eb, r.scratch_out, (size_t)c.count * r.eb);
    }

out:
    ms_aligned_free(r.keep);
    ms_aligned_free(r.scratch_out);
    ms_aligned_free(r.scratch_in);
    ms_aligned_free(partials);
    ms_aligned_free(state);
    return rc;
}

int ms_stage_run_mem(const struct ms_stage_job *job, const float *const *in, float *out,
                     uint64_t chunk_elems)
{
    return run_job(job, MS_DT_NONE, (const void *const *)in, out, chunk_elems, true);
}

int ms_stage_run_mem_keep(const struct ms_stage_job *job, const float *const *in, float *out,
                          uint64_t chunk_elems, bool keep)
{
    return run_job(job, MS_DT_NONE, (const void *const *)in, out, chunk_elems, keep);
}

int ms_stage_run_stored(const struct ms_stage_job *job, enum ms_dtype dt, const void *const *in,
                        void *out, uint64_t chunk_elems)
{
    return ms_stage_run_stored_keep(job, dt, in, out, chunk_elems, true);
}

int ms_stage_run_stored_keep(const struct ms_stage_job *job, enum ms_dtype dt,
                             const void *const *in, void *out, uint64_t chunk_elems, bool keep)
{
    if (dt != MS_DT_BF16 && dt != MS_DT_F16)
        return ms_error(MS_EINVAL, "%s: stored path in %s", job->name ? job->name : "?",
                        ms_dtype_name(dt));
    return run_job(job, dt, in, out, chunk_elems, keep);
}
