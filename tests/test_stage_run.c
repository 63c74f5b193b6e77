/*
 * test_stage_run.c - the in-memory reference driver (ms_stage_run_mem): chunk
 * geometry, fold order, pass numbering, aligned inputs, error propagation.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"

/* A toy two-pass stage: pass 0 sums the input, pass 1 sums squared deviations;
 * apply writes (x - mean) / ss. The state records what the driver did. */
struct toy_state {
    double sum, ss;
    uint32_t next_fold;           /* chunk index fold expects next */
    uint32_t passes;
    uint64_t folded;              /* elements folded in this pass */
    int bad;                      /* protocol violations seen */
    int fail_end;                 /* end_pass returns an error */
};
struct toy_partial {
    double v;
    uint64_t count;
    uint32_t index;
};

static size_t toy_state_size(const struct ms_stage_job *job) { return sizeof(struct toy_state); }
static size_t toy_partial_size(const struct ms_stage_job *job) { return sizeof(struct toy_partial); }
static int toy_begin(void *state, const struct ms_stage_job *job)
{
    struct toy_state *s = state;
    s->fail_end = job->gv[0] != 0;
    return MS_STAGE_REDUCE;
}
static void toy_reduce(const void *state, const struct ms_stage_job *job,
                       const struct ms_chunk *c, void *partial)
{
    const struct toy_state *s = state;
    struct toy_partial *p = partial;
    double mean = s->passes ? s->sum / (double)job->numel : 0;
    p->v = 0;
    for (uint64_t i = 0; i < c->count; i++) {
        double d = c->in[0][i] - mean;
        p->v += c->pass ? d * d : c->in[0][i];
    }
    p->count = c->count;
    p->index = c->index;
    /* inputs are aligned */
    if ((uintptr_t)c->in[0] % MS_ALIGN)
        p->count = UINT64_MAX;
}
static void toy_fold(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                     const void *partial)
{
    struct toy_state *s = state;
    const struct toy_partial *p = partial;
    if (c->index != s->next_fold || p->index != c->index || p->count != c->count ||
        c->pass != s->passes)
        s->bad++;
    s->next_fold++;
    s->folded += c->count;
    if (s->passes == 0)
        s->sum += p->v;
    else
        s->ss += p->v;
}
static int toy_end_pass(void *state, const struct ms_stage_job *job)
{
    struct toy_state *s = state;
    if (s->folded != job->numel)
        s->bad++;
    s->next_fold = 0;
    s->folded = 0;
    s->passes++;
    if (s->fail_end && s->passes == 2)
        return ms_error(MS_EDATA, "toy failure");
    return s->passes < 2 ? MS_STAGE_REDUCE : MS_STAGE_APPLY;
}
static void toy_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    const struct toy_state *s = state;
    double mean = s->sum / (double)job->numel;
    for (uint64_t i = 0; i < c->count; i++)
        c->out[i] = s->bad || c->pass != 2 ? NAN : (float)((c->in[0][i] - mean) / s->ss);
}

static struct ms_stage_ops toy_ops = {
    .state_size = toy_state_size, .partial_size = toy_partial_size, .begin = toy_begin,
    .reduce = toy_reduce, .fold = toy_fold, .end_pass = toy_end_pass, .apply = toy_apply,
};
static struct ms_method toy_method = { .name = "toy", .nparams = 0, .ops = &toy_ops };

static void toy_job(struct ms_stage_job *job, const int64_t *shape, uint32_t ndim)
{
    memset(job, 0, sizeof(*job));
    job->name = "t";
    job->ndim = ndim;
    job->shape = shape;
    ms_shape_numel(shape, ndim, &job->numel);
    job->row_len = ndim ? (uint64_t)shape[ndim - 1] : 1;
    job->compute = MS_DT_F32;
    job->ninputs = 1;
    job->base = -1;
    job->method = &toy_method;
}

Test(stage_run, toy_two_pass_any_chunking)
{
    static const int64_t shape[2] = { 37, 11 };
    struct ms_stage_job job;
    toy_job(&job, shape, 2);
    float x[37 * 11], ref[37 * 11], got[37 * 11];
    for (int i = 0; i < 37 * 11; i++)
        x[i] = (float)((i * 7919) % 101) / 8.0f; /* dyadic: sums exact in double */
    const float *in[1] = { x };
    cr_assert_eq(ms_stage_run_mem(&job, in, ref, 0), 0, "%s", ms_errmsg());
    for (int i = 0; i < 37 * 11; i++)
        cr_assert(!isnan(ref[i]), "element %d unwritten or protocol violated", i);
    static const uint64_t sizes[] = { 1, 2, 7, 64, 100, 407, 1000 };
    for (size_t k = 0; k < MS_ARRAY_LEN(sizes); k++) {
        cr_assert_eq(ms_stage_run_mem(&job, in, got, sizes[k]), 0);
        cr_assert(!memcmp(ref, got, sizeof(ref)), "chunk %llu differs",
                  (unsigned long long)sizes[k]);
    }
    /* ROWWISE: the same results; chunk sizes round to whole rows. */
    toy_ops.flags = MS_STAGE_ROWWISE;
    for (size_t k = 0; k < MS_ARRAY_LEN(sizes); k++) {
        cr_assert_eq(ms_stage_run_mem(&job, in, got, sizes[k]), 0);
        cr_assert(!memcmp(ref, got, sizeof(ref)));
    }
    toy_ops.flags = 0;
}

static size_t seen_count;
static void rw_apply(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c)
{
    if (c->first % job->row_len || (c->count % job->row_len))
        seen_count = SIZE_MAX;
    else if (seen_count != SIZE_MAX)
        seen_count = MS_MAX(seen_count, c->count);
    memcpy(c->out, c->in[0], c->count * sizeof(float));
}

Test(stage_run, rowwise_chunks_hold_whole_rows)
{
    static const struct ms_stage_ops ops = { .flags = MS_STAGE_ROWWISE, .apply = rw_apply };
    static const struct ms_method m = { .name = "rw", .ops = &ops };
    static const int64_t shape[2] = { 9, 13 };
    struct ms_stage_job job;
    toy_job(&job, shape, 2);
    job.method = &m;
    float x[9 * 13], y[9 * 13];
    for (int i = 0; i < 9 * 13; i++)
        x[i] = (float)i;
    const float *in[1] = { x };
    static const struct { uint64_t chunk, expect; } cases[] = {
        { 1, 13 }, { 12, 13 }, { 13, 13 }, { 27, 26 }, { 1000, 117 },
    };
    for (size_t k = 0; k < MS_ARRAY_LEN(cases); k++) {
        seen_count = 0;
        cr_assert_eq(ms_stage_run_mem(&job, in, y, cases[k].chunk), 0);
        cr_assert_eq(seen_count, cases[k].expect, "chunk %llu: got %zu",
                     (unsigned long long)cases[k].chunk, seen_count);
        cr_assert(!memcmp(x, y, sizeof(x)));
    }
}

Test(stage_run, end_pass_error_propagates)
{
    static const int64_t shape[1] = { 10 };
    struct ms_stage_job job;
    toy_job(&job, shape, 1);
    job.gv[0] = 1;
    float x[10] = { 0 }, y[10];
    const float *in[1] = { x };
    cr_assert_eq(ms_stage_run_mem(&job, in, y, 3), MS_EDATA);
    cr_assert_str_eq(ms_errmsg(), "toy failure");
}

Test(stage_run, unsupported_method_and_empty_tensor)
{
    static const struct ms_method none = { .name = "none" };
    static const int64_t shape[1] = { 0 };
    struct ms_stage_job job;
    toy_job(&job, shape, 1);
    float x[1] = { 0 };
    const float *in[1] = { x };
    job.method = &none;
    cr_assert_eq(ms_stage_run_mem(&job, in, x, 4), MS_EUNSUPPORTED);
    job.method = &toy_method;
    /* numel 0: no chunks; end_pass still sees every (zero) element folded. */
    cr_assert_eq(ms_stage_run_mem(&job, in, x, 4), 0);
}

Test(stage_run, allocation_failure)
{
    static const int64_t shape[1] = { 10 };
    struct ms_stage_job job;
    toy_job(&job, shape, 1);
    float x[10] = { 0 }, y[10];
    const float *in[1] = { x };
    ms_alloc_fail_after(2);
    int rc = ms_stage_run_mem(&job, in, y, 3);
    ms_alloc_fail_after(0);
    cr_assert_eq(rc, MS_ENOMEM);
}
