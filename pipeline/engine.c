/*
 * engine.c - executes a plan on a libuv loop under a fixed memory budget.
 *
 * Shape of the pipeline (DESIGN.md section 3):
 *
 *   slot FREE -> READING (one ms_src read per input, same element range)
 *             -> COMPUTE (uv_queue_work: decode, round to the compute dtype,
 *                         stage reduce or apply, encode to the output dtype; one-pass
 *                         jobs in L2-sized sub-blocks, apply_subblock)
 *             -> WRITING (ms_shard_write at the tensor's known offset, or in
 *                         order through ms_out) -> FREE
 *
 * One-pass jobs from plain files into positional shard files whose inputs are in
 * the page cache run "fused" instead (fused_work): one pool thread reads,
 * computes and writes a chunk block by block, so the bytes stay in its cache.
 *
 * Memory: nslots slots of slot_bytes each plus nstates job states are
 * allocated once at start from --max-memory; a chunk is carved out of one slot
 * (partial, one buffer per input, output), so nothing grows with model size.
 *
 * Jobs (output tensors) run in plan order. A job whose stage asks for reduce
 * passes runs them first; a later job may start taking slots only once every
 * job before it will take no more: it has issued all the chunks of its apply
 * pass, or it is resident (below) and has issued its first pass. That keeps the
 * schedule deadlock-free (a job never waits on slots held by a later job that
 * waits on it) and keeps writes close to file order.
 *
 * Multi-pass jobs whose chunks all fit in the pool at once are "resident":
 * their inputs are read and decoded once, and every pass runs from the slots.
 * Otherwise each pass reads the inputs again. The chunking is the same either
 * way, so both paths give the same bytes. A multi-pass job whose stage takes
 * its stored bytes (ms_stage_ops.stored_passes; stored_job) is never decoded:
 * its slots hold the raw bytes packed, which every pass hands to the stage.
 *
 * Keep areas (ms_stage.h; stages whose ops->keeps says so): a resident job's
 * chunk keeps in its own output buffer, which no pass before apply uses (a
 * stored job's after its packed output, in the room its half-size data leaves). For
 * jobs that cannot be resident the budget reserves one keep pool, the largest
 * such job's numel * MS_KEEP_BYTES among those at most half of what the method
 * states leave; a job holds the pool from its start to its end (the next one
 * waits for it). A job that gets neither runs with keep NULL, which the stage
 * handles.
 *
 * Threads: everything here runs on the loop thread except work_cb, which only
 * touches its own slot (and reads the job's stage state, const during a pass).
 * The bytes are io/'s: reads through ms_src (ms_src.h), positional shard files
 * and sequential output through ms_shard_file and ms_out (ms_out.h); the
 * engine only schedules them.
 */
#include <assert.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>

#include <uv.h>

#include "ms_common.h"
#include "ms_engine.h"
#include "ms_lora.h"
#include "ms_poshash.h"
#include "ms_src.h"
#include "ms_str.h"
#include "ms_tokmerge.h"
#include "pipeline_impl.h"

#define MAX_ACTIVE 64  /* jobs in flight at once */
#define MIN_SLOTS 4
#define MAX_SLOTS 64
#define SLOT_TARGET (8u << 20) /* bytes per slot when the budget allows more slots */

enum slot_state { SLOT_FREE, SLOT_READING, SLOT_QUEUED, SLOT_COMPUTING, SLOT_REDUCED,
                  SLOT_WRITING, SLOT_WREADY, SLOT_RESIDENT };

struct eng;
struct jrun;

struct slot {
    struct eng *e;
    struct jrun *jr;
    enum slot_state state;
    unsigned char *mem;           /* slot_bytes, MS_ALIGN-aligned */
    struct ms_chunk ck;           /* stage view; in[] / out point into mem */
    void *partial;
    unsigned char *raw[MS_MAX_INPUTS]; /* read targets (same memory as ck.in[]) */
    uint64_t raw_len[MS_MAX_INPUTS];   /* bytes to read per input */
    uint64_t raw_off[MS_MAX_INPUTS];   /* absolute file offset of the first byte */
    struct ms_src_read rd[MS_MAX_INPUTS];
    uint32_t reads_left;
    uint64_t gnext[MS_MAX_INPUTS]; /* row-gathered inputs: next chunk row to read */
    bool decoded;                 /* inputs already decoded (resident passes) */
    uv_work_t work;
    struct ms_shard_write wr;     /* positional output */
    const unsigned char *wbuf;
    uint64_t wlen, woff;          /* bytes, and the offset in the output shard */
    uint64_t hpart;               /* hash_writes: ms_poshash_range of those bytes */
    struct slot *next_queued;     /* compute queue link, then the shard's write queue link */
    bool fused;                   /* the chunk runs fused (fused_job) */
    /* Fused chunks (fused_work): read, compute and write on one pool thread. */
    int frc;                      /* its result: 0, FUSED_UNCACHED, or a code with ferr */
    char ferr[512];               /* its diagnostic (the worker's is thread-local) */
};

struct jrun {
    bool used;
    const struct ms_job *job;
    const struct ms_stage_ops *ops;
    void *state;
    int state_idx;                /* index into e->states, or -1 */
    int lora_idx;                 /* index into e->loras (the job folds a LoRA), or -1 */
    const float *lora_at[MS_MAX_INPUTS], *lora_b[MS_MAX_INPUTS]; /* input i's A^T and B */
    bool copy;                    /* raw byte copy: units are bytes, not elements */
    uint64_t total;               /* elements (or bytes for copy jobs) */
    uint64_t chunk;               /* elements (or bytes) per chunk */
    uint32_t nchunks;
    int phase;                    /* MS_STAGE_REDUCE or MS_STAGE_APPLY */
    uint32_t pass;                /* reduce passes completed */
    bool resident;
    bool keeps;                   /* the stage wants a keep area (ops->keeps) */
    bool keep_pool;               /* holds e->keep_pool */
    bool fused;                   /* chunks run fused (fused_job) */
    bool stored;                  /* every pass on the stored bytes (stored_job) */
    enum ms_dtype sdt;            /* stored: the inputs' and the output's dtype */
    bool skeep;                   /* stored and resident: each chunk keeps after its output */
    size_t partial_bytes;
    uint32_t issued, folded, done; /* chunks of the current pass */
    struct slot **ring;           /* chunk c of the current pass at ring[c % nslots] */
};

struct out_shard {
    struct ms_shard_file file;    /* positional mode's file; names only otherwise (--resume) */
    size_t jobs_left;
    bool skip;                    /* not written by this run (--resume kept it, or --part) */
    uint64_t hacc;                /* hash_writes: ms_poshash parts of the bytes written so far */
    /* Positional writes: one in flight per file (two writers of one file only contend
     * for its lock); finished chunks wait here in arrival order, linked by next_queued. */
    bool wbusy;
    struct slot *wq_head, *wq_tail;
};

/*
 * Sequential output (zstd, tar, pipe): chunks are handed to ms_out strictly in
 * file order, one blocking call at a time on the thread pool. The cursor
 * (wjob, wchunk) names the next chunk due; finished chunks wait in their slots
 * (SLOT_WREADY) until it reaches them.
 */
struct seq_writer {
    struct ms_out *out;
    bool busy;
    size_t wjob;                  /* plan job index due next */
    uint32_t wchunk;              /* chunk of that job due next */
    long cur_shard;               /* shard whose file is open in out, or -1 */
    long begin_shard;             /* work item: shard to begin first, or -1 */
    struct slot *ws;              /* work item: the chunk being written */
    uv_work_t work;
    int rc;                       /* work item result */
    char err[512];
};

struct eng {
    uv_loop_t loop;
    const struct ms_plan *plan;
    const struct ms_engine_opts *opts;

    struct ms_src **src;          /* per (model, shard): src[src_base[model] + shard], or NULL */
    size_t *src_base;
    size_t nsrc;

    struct out_shard *osh;
    size_t nsh;

    uint32_t nslots;
    size_t slot_bytes;
    struct slot *slots;
    struct slot **free_slots;
    uint32_t nfree;
    struct slot **ring_mem;       /* MAX_ACTIVE * nslots ring entries */

    uint32_t nstates;
    size_t state_bytes;
    void **states;
    bool *state_used;

    unsigned char *keep_pool;     /* keep_bytes (0: none), for one non-resident job */
    size_t keep_bytes;
    bool keep_used;

    /* LoRA folds (ms_lora.h): A and B of every input of one job, loaded when it starts. */
    uint32_t nloras;
    size_t lora_bytes;
    float **loras;
    bool *lora_used;

    struct jrun jr[MAX_ACTIVE];
    uint32_t order[MAX_ACTIVE];   /* active jobs, oldest first (indices into jr) */
    uint32_t nactive;
    size_t next_job;
    size_t jobs_done;

    struct slot *cq_head, *cq_tail; /* chunks ready to compute */
    uint32_t compute_inflight, compute_max;
    uint32_t nresident;           /* slots holding a resident chunk between passes */
    uint32_t depth;               /* most slots in flight (not free, not resident) */

    uv_signal_t sigint, sigterm, sighup;
    uv_timer_t timer;
    bool have_signals, have_timer;
    uint64_t t_start;
    uint64_t bytes_in, bytes_out;

    bool seq;                     /* output goes through ms_out (not positional files) */
    bool behind;                  /* larger than memory: drop consumed inputs and written
                                     output from the page cache (ms_src_consumed,
                                     ms_shard_file_behind) */
    struct seq_writer sw;

    /* The run file (directory output): fingerprint, and each finished shard's
     * checksum, computed from the file on a pool thread one shard at a time. */
    char *run_path;               /* NULL: no run file (tar, pipe) */
    bool hash_writes;             /* positional files: checksums from the chunks as written */
    uint64_t subblock;            /* elements per compute sub-block of an apply (apply_subblock);
                                     0: whole chunks */
    uint64_t fuse;                /* elements per block of a fused chunk (fused_job); 0: none */
    bool no_stored;               /* MERGESTREAM_STORED=0: no stored-bytes paths (tests) */
    atomic_int stop;              /* set by eng_fail: fused chunks stop between blocks */
    uint64_t fp;
    uint64_t *sums;               /* per shard */
    bool *have;                   /* sums[k] is known */
    const char **names;           /* per shard: the final file's bare name (borrowed) */
    uint32_t *hq;                 /* shards waiting for their checksum */
    size_t hq_head, hq_tail;
    bool hbusy;
    uv_work_t hwork;
    uint32_t hcur;
    void *hbuf;                   /* HASH_BUF bytes */
    atomic_int hstop;
    int hrc;
    uint64_t hsum;
    char herr[512];

    int err;
    char errmsg[1024];
    int signo;
};

/* Atomic: set by the signal handler and the loop, read by the output writer
 * on a pool thread (a lock-free atomic int is async-signal-safe). */
static atomic_int g_cancel_signo;

void ms_engine_cancel(int signo) { g_cancel_signo = signo; }

/* ms_out_opts.stop: a signal asked the merge to stop. */
static int out_stop(void) { return g_cancel_signo != 0; }

void ms_engine_opts_init(struct ms_engine_opts *o)
{
    memset(o, 0, sizeof *o);
    o->max_memory = MS_DEFAULT_MAX_MEMORY;
    o->in_memory = true;
    o->copy_tokenizer = true;
    o->write_card = true;
}

/* ------------------------------------------------------------------ errors */

/*
 * Records the first failure; later ones are dropped. The first also tells the
 * inputs and the shard files to stop continuing reads and writes in progress.
 * Returns code.
 */
static int eng_fail(struct eng *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int eng_fail(struct eng *e, int code, const char *fmt, ...)
{
    if (e->err)
        return code;
    e->err = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->errmsg, sizeof e->errmsg, fmt, ap);
    va_end(ap);
    for (size_t i = 0; e->src && i < e->nsrc; i++)
        if (e->src[i])
            ms_src_cancel(e->src[i]);
    atomic_store(&e->hstop, 1);
    atomic_store(&e->stop, 1);
    for (size_t k = 0; e->osh && k < e->nsh; k++)
        ms_shard_file_cancel(&e->osh[k].file);
    return code;
}

static bool eng_stopping(const struct eng *e) { return e->err != 0; }

/* ------------------------------------------------------------------ sizing */

static unsigned default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

static size_t align_up(size_t n) { return (n + MS_ALIGN - 1) / MS_ALIGN * MS_ALIGN; }

static uint32_t elem_bytes(enum ms_dtype dt)
{
    unsigned b = ms_dtype_bits(dt);
    return b >= 8 ? b / 8 : 1;
}

/* Bytes one buffer element takes in a slot: the raw input is read into the same
 * memory it is decoded to, so it must hold the larger of the two. */
static uint32_t input_elem_bytes(const struct ms_job *j)
{
    uint32_t eb = 4;
    for (uint32_t i = 0; i < j->s.ninputs; i++)
        eb = MS_MAX(eb, elem_bytes(j->in[i].dtype));
    return eb;
}

static size_t job_state_size(const struct ms_job *j)
{
    const struct ms_stage_ops *ops = j->s.method ? j->s.method->ops : NULL;
    return (!j->copy && ops && ops->state_size) ? ops->state_size(&j->s) : 0;
}

static size_t job_partial_size(const struct ms_job *j)
{
    const struct ms_stage_ops *ops = j->s.method ? j->s.method->ops : NULL;
    return (!j->copy && ops && ops->partial_size) ? ops->partial_size(&j->s) : 0;
}

static bool job_keeps(const struct ms_job *j)
{
    const struct ms_stage_ops *ops = j->s.method ? j->s.method->ops : NULL;
    return !j->copy && j->s.numel && ops && ops->keeps && ops->keeps(&j->s);
}

/*
 * Elements per chunk of job j in a slot of slot_bytes (bytes for copy jobs).
 * Returns 0 when not even the minimum (one row, or 16 elements) fits.
 */
static uint64_t job_chunk(const struct ms_job *j, size_t slot_bytes, uint64_t cap)
{
    if (j->copy) {
        uint64_t c = slot_bytes / MS_ALIGN * MS_ALIGN;
        return MS_MIN(c, MS_MAX(j->out_bytes, 1));
    }
    size_t fixed = align_up(job_partial_size(j)) + (size_t)MS_ALIGN * (j->s.ninputs + 2);
    if (slot_bytes <= fixed)
        return 0;
    uint64_t per = (uint64_t)j->s.ninputs * input_elem_bytes(j) + 4;
    uint64_t c = (slot_bytes - fixed) / per;
    if (cap && c > cap)
        c = cap;
    uint64_t numel = MS_MAX(j->s.numel, 1);
    const struct ms_stage_ops *ops = j->s.method->ops;
    if ((ops->flags & MS_STAGE_ROWWISE) || j->tok) { /* gathered rows: whole rows */
        uint64_t row = MS_MAX(j->s.row_len, 1);
        if (c < row)
            return cap ? row : 0; /* a test cap never splits rows */
        c -= c % row;
    } else if (c >= 64 && c < numel) {
        c -= c % 16;
    }
    return MS_MIN(c, numel);
}

struct sizing {
    uint32_t nslots, nstates, nloras;
    size_t slot_bytes, state_bytes, lora_bytes, keep_bytes;
};

/* Bytes one job's LoRA matrices take (0: it folds none). */
static size_t job_lora_bytes(const struct ms_job *j)
{
    size_t b = 0;
    for (uint32_t i = 0; !j->copy && i < j->s.ninputs; i++)
        if (j->in[i].lora)
            b += align_up((size_t)ms_lora_floats(j->in[i].lora) * sizeof(float));
    return b;
}

/* Bytes of a slot that chunk c (elements; bytes for a copy) of job j touches. */
static uint64_t job_slot_use(const struct ms_job *j, uint64_t c)
{
    if (j->copy)
        return c;
    uint64_t per = (uint64_t)j->s.ninputs * input_elem_bytes(j) + 4;
    return align_up(job_partial_size(j)) + (uint64_t)MS_ALIGN * (j->s.ninputs + 2) + c * per;
}

/* Slots of about SLOT_TARGET bytes (within [MIN_SLOTS or 2 * threads + 2, MAX_SLOTS])
 * from what the budget leaves beside `fixed` bytes. */
static void size_slots(struct sizing *sz, uint64_t max_memory, uint64_t fixed, unsigned threads)
{
    uint64_t by_size = max_memory > fixed ? (max_memory - fixed) / SLOT_TARGET : 0;
    sz->nslots = (uint32_t)MS_MIN(MS_MAX(by_size, (uint64_t)MS_MAX(2 * threads + 2, MIN_SLOTS)),
                                  (uint64_t)MAX_SLOTS);
    sz->slot_bytes =
        max_memory > fixed ? (size_t)((max_memory - fixed) / sz->nslots / MS_ALIGN * MS_ALIGN) : 0;
}

/* The keep pool (see the top): the largest keep area of a job that would not
 * be resident in slots sized without it, among those that take at most half of
 * `room` (the budget left beside the states); 0 when none does. */
static size_t keep_pool_bytes(const struct ms_plan *p, const struct sizing *sz, uint64_t room,
                              uint64_t cap, bool in_memory)
{
    uint64_t need = 0;
    for (size_t i = 0; i < p->njobs; i++) {
        const struct ms_job *j = &p->jobs[i];
        if (!job_keeps(j))
            continue;
        uint64_t c = job_chunk(j, sz->slot_bytes, cap);
        uint64_t b = j->s.numel * MS_KEEP_BYTES;
        if (c && (!in_memory || (j->s.numel + c - 1) / c > sz->nslots) && b <= room / 2)
            need = MS_MAX(need, b);
    }
    return (size_t)align_up((size_t)need);
}

static int compute_sizing(const struct ms_plan *p, uint64_t max_memory, unsigned threads,
                          uint64_t cap, bool in_memory, struct sizing *sz, uint64_t *max_chunk,
                          uint64_t *max_use)
{
    if (!max_memory)
        max_memory = MS_DEFAULT_MAX_MEMORY;
    if (!threads)
        threads = default_threads();
    size_t state_max = 0;
    bool stateful = false;
    for (size_t i = 0; i < p->njobs; i++) {
        size_t s = job_state_size(&p->jobs[i]);
        state_max = MS_MAX(state_max, s);
        stateful |= s > 0;
    }
    sz->nstates = stateful ? 2 : 0;
    sz->state_bytes = align_up(state_max);
    /* LoRA matrices count against the budget like method states: two jobs' worth. */
    size_t lora_max = 0;
    for (size_t i = 0; i < p->njobs; i++)
        lora_max = MS_MAX(lora_max, job_lora_bytes(&p->jobs[i]));
    sz->nloras = lora_max ? 2 : 0;
    sz->lora_bytes = lora_max;
    uint64_t for_states =
        (uint64_t)sz->nstates * sz->state_bytes + (uint64_t)sz->nloras * sz->lora_bytes;
    /* Enough slots to overlap reads, compute and writes; beyond that, more slots
     * of about SLOT_TARGET bytes rather than fewer huge ones, so that multi-pass
     * tensors can stay resident and a small working set stays warm in cache. */
    size_slots(sz, max_memory, for_states, threads);
    uint64_t room = max_memory > for_states ? max_memory - for_states : 0;
    sz->keep_bytes = room ? keep_pool_bytes(p, sz, room, cap, in_memory) : 0;
    if (sz->keep_bytes && room > sz->keep_bytes) {
        size_slots(sz, max_memory, for_states + sz->keep_bytes, threads);
        for (size_t i = 0; i < p->njobs && sz->keep_bytes; i++) {
            const struct ms_job *j = &p->jobs[i];
            if ((j->copy || j->s.numel) && !job_chunk(j, sz->slot_bytes, cap))
                sz->keep_bytes = 0; /* the pool would leave a tensor no chunk */
        }
    } else {
        sz->keep_bytes = 0;
    }
    if (sz->keep_bytes)
        for_states += sz->keep_bytes;
    else
        size_slots(sz, max_memory, for_states, threads);
    if (max_memory <= for_states)
        return ms_error(MS_EINVAL,
                        "--max-memory %" PRIu64 " is too small: the method's per-tensor "
                        "state%s %" PRIu64 " bytes",
                        max_memory,
                        sz->nloras ? " and the LoRA matrices alone need" : " alone needs",
                        for_states);
    uint64_t mc = 0, mu = 0;
    for (size_t i = 0; i < p->njobs; i++) {
        const struct ms_job *j = &p->jobs[i];
        if (!j->copy && j->s.numel == 0)
            continue;
        uint64_t c = job_chunk(j, sz->slot_bytes, cap);
        mu = MS_MAX(mu, MS_MIN(job_slot_use(j, c), (uint64_t)sz->slot_bytes));
        if (!c) {
            uint64_t need = align_up(job_partial_size(j)) + (uint64_t)MS_ALIGN * (j->s.ninputs + 2) +
                            (uint64_t)MS_MAX(j->s.row_len, 16) *
                                ((uint64_t)j->s.ninputs * input_elem_bytes(j) + 4);
            return ms_error(MS_EINVAL, "--max-memory %" PRIu64 " is too small for tensor '%s': "
                            "one chunk needs %" PRIu64 " bytes per slot (%u slots); use at least "
                            "%" PRIu64, max_memory, j->name, need, sz->nslots,
                            need * sz->nslots + for_states);
        }
        if (!j->copy)
            mc = MS_MAX(mc, c);
    }
    if (max_chunk)
        *max_chunk = mc;
    if (max_use)
        *max_use = mu;
    return 0;
}

int ms_engine_estimate(const struct ms_plan *plan, uint64_t max_memory, unsigned threads,
                       uint64_t *pool_bytes, uint64_t *used_bytes, uint64_t *chunk_elems)
{
    struct sizing sz;
    uint64_t mc = 0, mu = 0;
    int rc = compute_sizing(plan, max_memory, threads, 0, true, &sz, &mc, &mu);
    if (rc)
        return rc;
    if (pool_bytes)
        *pool_bytes = (uint64_t)sz.nslots * sz.slot_bytes + (uint64_t)sz.nstates * sz.state_bytes +
                      (uint64_t)sz.nloras * sz.lora_bytes + sz.keep_bytes;
    if (used_bytes)
        *used_bytes = (uint64_t)sz.nslots * mu + (uint64_t)sz.nstates * sz.state_bytes +
                      (uint64_t)sz.nloras * sz.lora_bytes + sz.keep_bytes;
    if (chunk_elems)
        *chunk_elems = mc;
    return 0;
}

/* ------------------------------------------------------------------ forward */

static void pump(struct eng *e);
static void on_read(struct ms_src_read *req, int status);
static void reads_done(struct eng *e, struct slot *s);
static void on_write(struct ms_shard_write *req, int status);
static void work_cb(uv_work_t *w);
static void after_work_cb(uv_work_t *w, int status);

/* ------------------------------------------------------------------ slots */

static struct slot *slot_get(struct eng *e)
{
    if (!e->nfree)
        return NULL;
    struct slot *s = e->free_slots[--e->nfree];
    assert(s->state == SLOT_FREE);
    s->state = SLOT_READING;
    s->decoded = false;
    s->fused = false;
    return s;
}

static void slot_put(struct eng *e, struct slot *s)
{
    s->state = SLOT_FREE;
    s->jr = NULL;
    e->free_slots[e->nfree++] = s;
}

/* Carves elements (bytes for a copy) [first, first + count) of s->jr's tensor out
 * of slot s from its start: partial, inputs, output, and the reads that fill them.
 * Loop thread, or the pool thread running s's fused chunk (which carves each
 * block of it in turn). */
static void slot_carve(const struct eng *e, struct slot *s, uint64_t first, uint64_t count)
{
    const struct jrun *jr = s->jr;
    const struct ms_job *j = jr->job;
    unsigned char *p = s->mem;
    s->ck.first = first;
    s->ck.count = count;
    s->reads_left = 0;
    if (jr->copy) {
        s->partial = NULL;
        s->raw[0] = p;
        s->raw_len[0] = count;
        s->raw_off[0] = j->in[0].file_offset + first;
        s->reads_left = 1;
        return;
    }
    s->partial = jr->partial_bytes ? p : NULL;
    p += align_up(jr->partial_bytes);
    if (jr->stored) { /* the stored bytes only, packed: a chunk touches half as much */
        uint32_t sb = elem_bytes(jr->sdt);
        for (uint32_t i = 0; i < j->s.ninputs; i++) {
            s->raw[i] = p;
            s->ck.in[i] = NULL;
            s->raw_len[i] = count * sb;
            s->raw_off[i] = j->in[i].file_offset + first * sb;
            s->gnext[i] = 0;
            p += align_up(count * sb);
        }
        s->ck.out = (float *)(void *)p;
        p += align_up(count * sb);
        /* the keep area: the pool's, or a resident chunk's own after its output */
        if (jr->keep_pool) {
            s->ck.keep = e->keep_pool + first * MS_KEEP_BYTES;
        } else if (jr->skeep) {
            s->ck.keep = p;
            p += align_up(count * MS_KEEP_BYTES);
        }
        assert((size_t)(p - s->mem) <= e->slot_bytes);
        s->reads_left = j->s.ninputs;
        return;
    }
    uint32_t eb = input_elem_bytes(j);
    for (uint32_t i = 0; i < j->s.ninputs; i++) {
        uint32_t ib = elem_bytes(j->in[i].dtype);
        /* Narrow types are read into the top of the float buffer and decoded
         * forward (ms_dtype_decode_up); wider ones (F64) at its start. */
        s->raw[i] = ib < 4 ? p + count * (4 - ib) : p;
        s->ck.in[i] = (const float *)(void *)p;
        s->raw_len[i] = count * ib;
        s->raw_off[i] = j->in[i].file_offset + first * ib;
        s->gnext[i] = 0;
        p += align_up(count * eb);
    }
    s->ck.out = (float *)(void *)p;
    p += align_up(count * 4);
    assert((size_t)(p - s->mem) <= e->slot_bytes);
    /* a resident chunk keeps in its output buffer (MS_KEEP_BYTES == 4) */
    if (jr->keep_pool)
        s->ck.keep = e->keep_pool + first * MS_KEEP_BYTES;
    else if (jr->keeps && jr->resident)
        s->ck.keep = s->ck.out;
    s->reads_left = j->s.ninputs;
}

/* Carves chunk c of jr out of slot s (slot_carve). Loop thread. */
static void slot_setup(struct eng *e, struct jrun *jr, struct slot *s, uint32_t c)
{
    uint64_t first = (uint64_t)c * jr->chunk;
    memset(&s->ck, 0, sizeof s->ck);
    s->jr = jr;
    s->ck.index = c;
    slot_carve(e, s, first, MS_MIN(jr->chunk, jr->total - first));
}

/* ------------------------------------------------------------------ reads */

static struct ms_src *input_src(struct eng *e, const struct ms_plan_input *in)
{
    return e->src[e->src_base[in->model] + in->shard];
}

/* ---- tokenizer merge: row gather (ms_tokmerge.h). An input with a row map is read
 * run by run (consecutive source rows are one read) into its rows' places in the
 * chunk; rows it lacks are left for ms_tokmerge_fill in work_cb. */

/* Starts the next run of input i of slot s: 1 when a read was started, 0 when the
 * chunk's rows are all read, negative (diagnostic recorded) when the start failed. */
static int gather_next(struct eng *e, struct slot *s, uint32_t i)
{
    const struct ms_job *j = s->jr->job;
    const struct ms_plan_input *in = &j->in[i];
    uint64_t L = j->s.row_len, row0 = s->ck.first / L, nr = s->ck.count / L;
    uint64_t ib = elem_bytes(in->dtype), k = s->gnext[i];
    while (k < nr && in->rowmap[row0 + k] < 0)
        k++;
    if (k == nr || eng_stopping(e)) {
        s->gnext[i] = nr;
        return 0;
    }
    int64_t src = in->rowmap[row0 + k];
    uint64_t run = 1;
    while (k + run < nr && in->rowmap[row0 + k + run] == src + (int64_t)run)
        run++;
    s->gnext[i] = k + run;
    s->raw_len[i] = run * L * ib;
    int rc = ms_src_read_start(&e->loop, input_src(e, in), &s->rd[i], s->raw[i] + k * L * ib,
                               (size_t)(run * L * ib), in->file_offset + (uint64_t)src * L * ib,
                               in->name, on_read);
    return rc < 0 ? rc : 1;
}

static void read_issue(struct eng *e, struct slot *s, uint32_t i)
{
    const struct ms_plan_input *in = &s->jr->job->in[i];
    s->rd[i].data = s;
    if (in->rowmap) {
        int grc = gather_next(e, s, i);
        if (grc < 0)
            eng_fail(e, grc, "%s", ms_errmsg());
        if (grc <= 0 && --s->reads_left == 0 && grc == 0)
            reads_done(e, s);
        return;
    }
    int rc = ms_src_read_start(&e->loop, input_src(e, in), &s->rd[i], s->raw[i],
                               (size_t)s->raw_len[i], s->raw_off[i], in->name, on_read);
    if (rc < 0) {
        eng_fail(e, rc, "%s", ms_errmsg());
        s->reads_left--;
    }
}

static void write_issue(struct eng *e, struct slot *s);
static void seq_pump(struct eng *e);

/* Appends s to the FIFO *head..*tail linked through next_queued (the compute
 * queue, a shard's write queue). Loop thread. */
static void slot_fifo_push(struct slot **head, struct slot **tail, struct slot *s)
{
    s->next_queued = NULL;
    if (*tail)
        (*tail)->next_queued = s;
    else
        *head = s;
    *tail = s;
}

/* Removes and returns the first slot of a non-empty FIFO. Loop thread. */
static struct slot *slot_fifo_pop(struct slot **head, struct slot **tail)
{
    struct slot *s = *head;
    *head = s->next_queued;
    if (!*head)
        *tail = NULL;
    return s;
}

static void chunk_ready(struct eng *e, struct slot *s)
{
    s->state = SLOT_QUEUED;
    slot_fifo_push(&e->cq_head, &e->cq_tail, s);
}

/* Hands a finished chunk (s->wbuf, wlen, woff set) to the output. */
static void output_chunk(struct eng *e, struct slot *s)
{
    if (e->seq) {
        s->state = SLOT_WREADY;
        seq_pump(e);
    } else {
        write_issue(e, s);
    }
}

static void reads_done(struct eng *e, struct slot *s)
{
    if (eng_stopping(e)) {
        slot_put(e, s);
        return;
    }
    if (s->jr->copy) {
        s->wbuf = s->raw[0];
        s->wlen = s->ck.count;
        s->woff = s->jr->job->out_offset + s->ck.first;
        if (e->hash_writes) /* loop thread: the copy has no compute step */
            s->hpart = ms_poshash_range(s->woff, s->wbuf, s->wlen);
        output_chunk(e, s);
    } else {
        chunk_ready(e, s);
    }
}

/* Input i of slot s is in (status 0), or failed. */
static void on_read(struct ms_src_read *req, int status)
{
    struct slot *s = req->data;
    struct eng *e = s->e;
    uint32_t i = (uint32_t)(req - s->rd);
    if (status < 0)
        eng_fail(e, status, "%s", ms_errmsg()); /* io/ names the file and the tensor */
    else
        e->bytes_in += s->raw_len[i];
    /* The last read of these bytes: a resident job's only one, or the apply pass. */
    const struct ms_plan_input *in = &s->jr->job->in[i];
    if (status >= 0 && e->behind && !in->rowmap &&
        (s->jr->resident || s->jr->phase == MS_STAGE_APPLY))
        ms_src_consumed(input_src(e, in), s->raw_off[i], s->raw_len[i]);
    if (status >= 0 && in->rowmap) { /* row gather: the input's next run */
        int grc = gather_next(e, s, i);
        if (grc < 0)
            eng_fail(e, grc, "%s", ms_errmsg());
        if (grc == 1) {
            pump(e);
            return;
        }
    }
    if (--s->reads_left == 0)
        reads_done(e, s);
    pump(e);
}

/* ------------------------------------------------------------------ compute */

/* Decodes elements [off, off + n) of every input of s's chunk in place, then folds
 * a LoRA and rounds to the load and compute dtypes; the tokenizer merge's defaults
 * need whole chunks (off == 0, n == count). Compute thread, s's memory only. */
static void chunk_decode(struct slot *s, uint64_t off, uint64_t n)
{
    struct jrun *jr = s->jr;
    const struct ms_job *j = jr->job;
    for (uint32_t i = 0; i < j->s.ninputs; i++) {
        float *x = (float *)(void *)s->ck.in[i] + off;
        enum ms_dtype dt = j->in[i].dtype;
        uint64_t eb = elem_bytes(dt);
        if (eb < 4 && off + n == s->ck.count) /* the rest: raw sits at the top of x[0..n) */
            ms_dtype_decode_up(dt, s->raw[i] + off * eb, x, n);
        else /* narrow: sub_decode_len kept raw and x apart; else in place (F64: off == 0) */
            ms_dtype_decode(dt, s->raw[i] + off * eb, x, n);
        enum ms_dtype have = dt; /* every decoded value is exact in `have` */
        if (j->in[i].lora) {     /* model+lora: the folded model, as mergekit stores it */
            ms_lora_fold_chunk(j->in[i].lora, jr->lora_at[i], jr->lora_b[i], s->ck.first + off, x,
                               n);
            have = j->in[i].lora->dtype;
        }
        /* mergekit converts to the recipe dtype when it loads, then computes
         * (slerp computes in float32 whatever that dtype is). */
        if (ms_dtype_is_compute(j->in[i].load) && j->in[i].load != have &&
            j->in[i].load != j->s.compute) {
            ms_dtype_round(j->in[i].load, x, n);
            have = j->in[i].load;
        }
        if (have != j->s.compute && j->s.compute != MS_DT_F32 && !j->tok)
            ms_dtype_round(j->s.compute, x, n);
    }
    if (j->tok) { /* tokenizer merge: default rows from the chunk's other rows */
        assert(off == 0 && n == s->ck.count);
        uint64_t L = j->s.row_len;
        ms_tokmerge_fill(j, s->ck.first / L, n / L, (float *const *)s->ck.in);
        for (uint32_t i = 0; i < j->s.ninputs && j->s.compute != MS_DT_F32; i++)
            ms_dtype_round(j->s.compute, (float *)(void *)s->ck.in[i], n);
    }
}

/* Elements of the sub-block at off that chunk_decode can decode on their own:
 * narrow inputs sit at the top of their float buffers (slot_setup), so the
 * floats of [off, off + m) must end before the raw bytes of element off start;
 * when they would not, the sub-block takes the rest of the chunk, which is
 * ms_dtype_decode_up's layout. */
static uint64_t sub_decode_len(const struct slot *s, uint64_t off, uint64_t m)
{
    const struct ms_job *j = s->jr->job;
    uint64_t count = s->ck.count;
    for (uint32_t i = 0; i < j->s.ninputs && off + m < count; i++) {
        uint64_t eb = elem_bytes(j->in[i].dtype);
        if (eb < 4 && 4 * (off + m) > count * (4 - eb) + off * eb)
            m = count - off;
    }
    return m;
}

/*
 * Elements per compute sub-block of s's apply (0: the whole chunk at once).
 * Sub-blocks keep a chunk's decoded inputs, output and encoded bytes in L2
 * between decode, apply and encode. Only where the bytes cannot change: a job
 * that ran no reduce pass is one apply per chunk, and a stage's bytes do not
 * depend on the chunking (ms_stage.h), so a sub-chunk (first, count, pointers
 * and keep moved together) is a smaller chunk; rows stay whole for row-wise
 * stages, and every sub-chunk pointer stays MS_ALIGN-aligned. After reduce
 * passes apply must see the chunks the passes saw (the TIES-style selections
 * place their cut by chunk), so those jobs run whole chunks. Not for the
 * tokenizer merge (its defaults read whole chunks), inputs or outputs wider
 * than float (F64 decodes and encodes in place from the end).
 */
static uint64_t apply_subblock(const struct eng *e, const struct slot *s)
{
    const struct jrun *jr = s->jr;
    const struct ms_job *j = jr->job;
    uint64_t sb = e->subblock;
    if (!sb || jr->pass || j->tok || elem_bytes(j->out_dtype) > 4 || input_elem_bytes(j) > 4)
        return 0;
    uint64_t unit = MS_ALIGN / sizeof(float); /* sub-chunk pointers stay MS_ALIGN-aligned */
    if (jr->ops->flags & MS_STAGE_ROWWISE) { /* and whole rows: a multiple of lcm(row, unit) */
        uint64_t row = MS_MAX(j->s.row_len, 1), a = row, b = unit;
        while (b) {
            uint64_t t = a % b;
            a = b;
            b = t;
        }
        unit = row / a * unit;
        sb = MS_MAX(sb, unit);
    }
    sb -= sb % unit;
    return sb && sb < s->ck.count ? sb : 0;
}

/*
 * True when s's chunk may take its stage's stored-bytes path (ms_stage_ops.
 * apply_stored): the apply of a job that ran no reduce pass, every input stored
 * in the compute dtype and loaded as it is (chunk_decode would only decode it),
 * the output stored in the compute dtype with no rounding to a result dtype
 * before it (work_cb would only encode apply's floats).
 */
/*
 * True when j's bytes as stored are what its chunks would see and write: every
 * input stored in dt and loaded as it is (no LoRA fold, row gather or tokenizer
 * merge; a load dtype, if any, of dt or also_load), the output stored in dt
 * with at most a rounding to dt or F32 before it.
 */
static bool job_as_stored(const struct ms_job *j, enum ms_dtype dt, enum ms_dtype also_load)
{
    if (j->tok || j->out_dtype != dt ||
        (j->result != dt && j->result != MS_DT_F32 && ms_dtype_is_compute(j->result)))
        return false;
    for (uint32_t i = 0; i < j->s.ninputs; i++) {
        const struct ms_plan_input *in = &j->in[i];
        if (in->dtype != dt || in->lora || in->rowmap ||
            (ms_dtype_is_compute(in->load) && in->load != dt && in->load != also_load))
            return false;
    }
    return true;
}

static bool stored_path(const struct slot *s)
{
    const struct jrun *jr = s->jr;
    if (s->e->no_stored || !jr->ops->apply_stored || jr->phase != MS_STAGE_APPLY || jr->pass ||
        s->decoded)
        return false;
    return job_as_stored(jr->job, jr->job->s.compute, jr->job->s.compute);
}

/*
 * The stored dtype in which jr may run every pass (ms_stage_ops.stored_passes),
 * or MS_DT_NONE: after begin asked for a reduce pass, every input stored in one dtype dt (BF16 or F16) and loaded as it is
 * (chunk_decode would only decode it: no LoRA fold, row gather or tokenizer
 * merge, no rounding to another load or compute dtype), computed in dt or F32,
 * and stored in dt with at most a rounding to dt before (work_cb would only
 * round and encode apply's floats to dt). Loop thread.
 */
static enum ms_dtype stored_job(const struct eng *e, const struct jrun *jr)
{
    const struct ms_job *j = jr->job;
    if (e->no_stored || jr->copy || jr->phase != MS_STAGE_REDUCE || !j->s.ninputs || !jr->ops->stored_passes || !jr->ops->reduce_stored ||
        !jr->ops->apply_stored)
        return MS_DT_NONE;
    enum ms_dtype dt = j->in[0].dtype;
    if ((dt != MS_DT_BF16 && dt != MS_DT_F16) || (j->s.compute != dt && j->s.compute != MS_DT_F32) ||
        !job_as_stored(j, dt, MS_DT_F32))
        return MS_DT_NONE;
    return jr->ops->stored_passes(jr->state, &j->s, dt) ? dt : MS_DT_NONE;
}

/* Applies s's chunk through apply_stored, sub-block by sub-block (the checksum of
 * each while it is in cache), into the chunk's output packed as work_cb packs it;
 * false, with nothing written, when the stage declined. A stored job's chunks
 * (jr->stored): its reduce passes through reduce_stored, its apply whole, as
 * the passes saw it (apply_subblock). Compute thread. */
static bool work_stored(struct slot *s)
{
    struct jrun *jr = s->jr;
    const struct ms_job *j = jr->job;
    uint64_t n = s->ck.count, sb = s->e->subblock && !jr->stored ? s->e->subblock : n;
    enum ms_dtype dt = jr->stored ? jr->sdt : j->s.compute;
    uint32_t eb = elem_bytes(dt);
    struct ms_chunk_stored sc = { .dt = dt };
    if (jr->stored) {
        sc.index = s->ck.index;
        sc.pass = jr->pass;
        sc.keep = s->ck.keep;
    }
    if (jr->phase == MS_STAGE_REDUCE) {
        sc.first = s->ck.first;
        sc.count = n;
        for (uint32_t i = 0; i < j->s.ninputs; i++)
            sc.in[i] = s->raw[i];
        jr->ops->reduce_stored(jr->state, &j->s, &sc, s->partial);
        return true;
    }
    uint64_t hpart = 0;
    for (uint64_t off = 0, m; off < n; off += m) {
        m = MS_MIN(sb, n - off);
        sc.first = s->ck.first + off;
        sc.count = m;
        for (uint32_t i = 0; i < j->s.ninputs; i++)
            sc.in[i] = s->raw[i] + off * eb;
        sc.out = (unsigned char *)s->ck.out + off * eb;
        if (!jr->ops->apply_stored(jr->state, &j->s, &sc)) {
            assert(off == 0 && !jr->stored);
            return false;
        }
        if (s->e->hash_writes)
            hpart = ms_poshash_add(hpart, ms_poshash_range(j->out_offset + sc.first * eb, sc.out,
                                                           m * eb));
    }
    s->hpart = hpart;
    return true;
}

/* Computes s's chunk (its inputs read): a reduce pass's partial, or apply's
 * bytes packed at the start of ck.out with their checksum in hpart. Compute
 * thread, s's memory only. */
static void chunk_compute(struct slot *s)
{
    struct jrun *jr = s->jr;
    const struct ms_job *j = jr->job;
    uint64_t n = s->ck.count;
    s->ck.pass = jr->pass;
    if ((jr->stored || stored_path(s)) && work_stored(s))
        return;
    uint32_t ob = elem_bytes(j->out_dtype);
    uint64_t sb = jr->phase == MS_STAGE_APPLY ? apply_subblock(s->e, s) : 0;
    bool applied = false;
    if (!sb) { /* the whole chunk at once: reduce passes, and what apply_subblock refuses */
        if (!s->decoded)
            chunk_decode(s, 0, n);
        s->decoded = true;
        if (jr->phase == MS_STAGE_REDUCE) {
            jr->ops->reduce(jr->state, &j->s, &s->ck, s->partial);
            return;
        }
        jr->ops->apply(jr->state, &j->s, &s->ck);
        applied = true;
        /* rounding, encoding and checksum still go by sub-blocks: all but the first
         * encode straight into place (ms_dtype_encode stages an in-place one) */
        sb = s->e->subblock && ob <= 4 ? s->e->subblock : n;
    }
    uint64_t hpart = 0;
    struct ms_chunk sub = s->ck;
    uint64_t dec = s->decoded ? n : 0; /* elements decoded so far */
    for (uint64_t off = 0, m; off < n; off += m) {
        m = MS_MIN(sb, n - off);
        if (dec < off + m) {
            uint64_t dm = sub_decode_len(s, dec, off + m - dec);
            chunk_decode(s, dec, dm);
            dec += dm;
        }
        sub.first = s->ck.first + off;
        sub.count = m;
        for (uint32_t i = 0; i < j->s.ninputs; i++)
            sub.in[i] = s->ck.in[i] + off;
        sub.out = s->ck.out + off;
        sub.keep = s->ck.keep ? (unsigned char *)s->ck.keep + off * MS_KEEP_BYTES : NULL;
        if (!applied)
            jr->ops->apply(jr->state, &j->s, &sub);
        /* mergekit casts the method's result to its own dtype, then to out_dtype
         * (slerp: float32 math, the base's dtype, then out_dtype). */
        if (j->result != j->out_dtype && j->result != MS_DT_F32 && ms_dtype_is_compute(j->result))
            ms_dtype_round(j->result, sub.out, m);
        /* Encoded bytes are packed from the chunk's start: with m <= off and ob <= 4
         * a sub-block's bytes land on floats of the sub-blocks before it, already
         * encoded, and on its own floats only in place (off == 0). */
        unsigned char *enc = (unsigned char *)s->ck.out + off * ob;
        ms_dtype_encode(j->out_dtype, sub.out, enc, m);
        if (s->e->hash_writes)
            hpart = ms_poshash_add(hpart, ms_poshash_range(j->out_offset + sub.first * ob, enc,
                                                           m * ob));
    }
    s->decoded = true;
    s->hpart = hpart;
}

/* ---- fused chunks: a chunk of a one-pass job whose inputs are plain files and
 * whose output is a positional shard file runs on one pool thread, block by
 * block: read the block's inputs (blocking preads, most often from the page
 * cache), compute it, write it. Each block is carved from the start of the
 * slot (slot_carve), so the bytes read are computed and written while they
 * are still in this core's cache, a chunk touches only the first block's
 * worth of its slot, and the loop hears once per chunk instead of once per
 * read, compute and write. A block is a smaller chunk of a job that runs no
 * reduce pass, so the bytes are the same (as for apply_subblock). */

#define FUSE_DEFAULT 65536u /* elements per block of a fused chunk (MERGESTREAM_FUSE) */
#define FUSED_UNCACHED 1    /* slot.frc: the first block is not all in the page cache */

/* Elements per block of jr's fused chunks: e->fuse, whole rows for row-wise stages. */
static uint64_t fuse_block(const struct eng *e, const struct jrun *jr)
{
    uint64_t fb = e->fuse;
    if (jr->ops->flags & MS_STAGE_ROWWISE) {
        uint64_t row = MS_MAX(jr->job->s.row_len, 1);
        fb = fb < row ? row : fb - fb % row;
    }
    return fb;
}

/* True when jr's chunks may run fused (above): after begin, a job that runs only
 * its apply pass, plain file inputs read as they are (no LoRA, no row gather, no
 * tokenizer merge), no keep area, floats no wider than float, positional output
 * that fits in memory (the write-behind and sequential outputs keep their path). */
static bool fused_job(struct eng *e, const struct jrun *jr)
{
    const struct ms_job *j = jr->job;
    if (!e->fuse || e->seq || e->behind || jr->copy || !jr->total || jr->phase != MS_STAGE_APPLY ||
        jr->keeps || jr->keep_pool || j->tok || elem_bytes(j->out_dtype) > 4 ||
        input_elem_bytes(j) > 4)
        return false;
    for (uint32_t i = 0; i < j->s.ninputs; i++) {
        const struct ms_plan_input *in = &j->in[i];
        if (in->lora || in->rowmap || !ms_src_is_plain(input_src(e, in)))
            return false;
    }
    return true;
}

/* Runs s's fused chunk; s->frc gets 0, FUSED_UNCACHED (nothing written: the
 * chunk takes the asynchronous path), or an error with its diagnostic in
 * s->ferr. The chunk's checksum is in s->hpart. Pool thread. */
static void fused_work(struct slot *s)
{
    struct eng *e = s->e;
    struct jrun *jr = s->jr;
    const struct ms_job *j = jr->job;
    const struct ms_shard_file *f = &e->osh[j->shard].file;
    uint64_t first = s->ck.first, count = s->ck.count, fb = fuse_block(e, jr), hpart = 0;
    uint32_t ob = elem_bytes(j->out_dtype);
    int rc = 0;
    ms_error_clear();
    for (uint64_t off = 0, m; off < count && !rc; off += m) {
        m = MS_MIN(fb, count - off);
        if (atomic_load(&e->stop) || g_cancel_signo) {
            rc = ms_error(MS_ECANCELED, "canceled");
            break;
        }
        slot_carve(e, s, first + off, m);
        for (uint32_t i = 0; i < j->s.ninputs && !rc; i++)
            rc = ms_src_pread(input_src(e, &j->in[i]), s->raw[i], (size_t)s->raw_len[i],
                              s->raw_off[i], j->in[i].name, off == 0);
        if (rc)
            break;
        s->decoded = false;
        chunk_compute(s);
        hpart = ms_poshash_add(hpart, s->hpart);
        rc = ms_shard_file_pwrite(f, s->ck.out, (size_t)(m * ob), j->out_offset + s->ck.first * ob);
    }
    s->frc = rc;
    if (rc < 0)
        snprintf(s->ferr, sizeof s->ferr, "%s", ms_errmsg());
    s->ck.first = first;
    s->ck.count = count;
    s->hpart = hpart;
}

static void work_cb(uv_work_t *w)
{
    struct slot *s = w->data;
    if (s->fused)
        fused_work(s);
    else
        chunk_compute(s);
}

static void start_compute(struct eng *e)
{
    /* A fused chunk may be one beyond the compute threads (job_issue keeps at most
     * that many): a thread that finishes one has the next at hand, without waiting
     * for the loop to hear of it (under load, the loop waits for a core). */
    while (e->cq_head && e->compute_inflight < e->compute_max + (e->cq_head->fused ? 1 : 0) &&
           !eng_stopping(e)) {
        struct slot *s = slot_fifo_pop(&e->cq_head, &e->cq_tail);
        s->state = SLOT_COMPUTING;
        s->work.data = s;
        e->compute_inflight++;
        int rc = uv_queue_work(&e->loop, &s->work, work_cb, after_work_cb);
        if (rc < 0) {
            e->compute_inflight--;
            eng_fail(e, rc, "cannot queue work: %s", ms_strerror(rc));
            slot_put(e, s);
        }
    }
    if (eng_stopping(e)) { /* drop queued chunks */
        while (e->cq_head) {
            struct slot *s = e->cq_head;
            e->cq_head = s->next_queued;
            slot_put(e, s);
        }
        e->cq_tail = NULL;
    }
}

static void job_finish(struct eng *e, struct jrun *jr);
static void shard_job_done(struct eng *e, uint32_t shard);

/* Folds, in chunk order, every reduced chunk that is next in line. */
static void fold_ready(struct eng *e, struct jrun *jr)
{
    while (jr->folded < jr->issued) {
        struct slot *s = jr->ring[jr->folded % e->nslots];
        if (!s || s->state != SLOT_REDUCED)
            return;
        jr->ops->fold(jr->state, &jr->job->s, &s->ck, s->partial);
        jr->ring[jr->folded % e->nslots] = jr->resident ? s : NULL;
        if (jr->resident) {
            s->state = SLOT_RESIDENT;
            e->nresident++;
        } else {
            slot_put(e, s);
        }
        jr->folded++;
    }
    if (jr->folded < jr->nchunks)
        return;
    int rc = jr->ops->end_pass(jr->state, &jr->job->s);
    if (rc < 0) {
        eng_fail(e, rc, "%s", ms_errmsg()); /* stages name the tensor */
        return;
    }
    jr->pass++;
    jr->phase = rc;
    jr->issued = jr->folded = jr->done = 0;
}

static void chunk_written(struct eng *e, struct slot *s);
static void slot_read(struct eng *e, struct slot *s);

/* A fused chunk is back from the pool (not stopping). */
static void fused_done(struct eng *e, struct slot *s)
{
    struct jrun *jr = s->jr;
    const struct ms_job *j = jr->job;
    if (s->frc == FUSED_UNCACHED) { /* from the disk: this chunk and the job's next ones read
                                       asynchronously, many at once */
        jr->fused = false;
        s->state = SLOT_READING;
        slot_setup(e, jr, s, s->ck.index);
        slot_read(e, s);
        return;
    }
    if (s->frc < 0) {
        if (!g_cancel_signo) /* a signal: the pump that follows reports it */
            eng_fail(e, s->frc, "%s", s->ferr); /* io/ names the file and the tensor */
        slot_put(e, s);
        return;
    }
    for (uint32_t i = 0; i < j->s.ninputs; i++)
        e->bytes_in += s->ck.count * elem_bytes(j->in[i].dtype);
    e->bytes_out += s->ck.count * elem_bytes(j->out_dtype);
    if (e->hash_writes) {
        struct out_shard *sh = &e->osh[j->shard];
        sh->hacc = ms_poshash_add(sh->hacc, s->hpart);
    }
    chunk_written(e, s);
}

static void after_work_cb(uv_work_t *w, int status)
{
    struct slot *s = w->data;
    struct eng *e = s->e;
    struct jrun *jr = s->jr;
    e->compute_inflight--;
    if (status < 0 || eng_stopping(e)) {
        if (status < 0)
            eng_fail(e, status, "compute canceled: %s", ms_strerror(status));
        slot_put(e, s);
        pump(e);
        return;
    }
    if (s->fused) {
        fused_done(e, s);
    } else if (jr->phase == MS_STAGE_REDUCE) {
        s->state = SLOT_REDUCED;
        fold_ready(e, jr);
    } else {
        const struct ms_job *j = jr->job;
        uint32_t ob = elem_bytes(j->out_dtype);
        s->wbuf = (const unsigned char *)s->ck.out;
        s->wlen = s->ck.count * ob;
        s->woff = j->out_offset + s->ck.first * ob;
        output_chunk(e, s);
    }
    pump(e);
}

/* ------------------------------------------------------------------ writes */

/* Starts the next queued write of shard sh if none is in flight; on a stop, frees the queue. */
static void shard_write_next(struct eng *e, struct out_shard *sh)
{
    while (sh->wq_head && (!sh->wbusy || eng_stopping(e))) {
        struct slot *s = slot_fifo_pop(&sh->wq_head, &sh->wq_tail);
        if (eng_stopping(e)) {
            slot_put(e, s);
            continue;
        }
        s->wr.data = s;
        int rc = ms_shard_write_start(&e->loop, &sh->file, &s->wr, s->wbuf, (size_t)s->wlen,
                                      s->woff, on_write);
        if (rc < 0) {
            eng_fail(e, rc, "%s", ms_errmsg());
            slot_put(e, s);
        } else {
            sh->wbusy = true;
        }
    }
}

static void write_issue(struct eng *e, struct slot *s)
{
    struct out_shard *sh = &e->osh[s->jr->job->shard];
    s->state = SLOT_WRITING;
    slot_fifo_push(&sh->wq_head, &sh->wq_tail, s);
    shard_write_next(e, sh);
}

static void chunk_written(struct eng *e, struct slot *s)
{
    struct jrun *jr = s->jr;
    if (jr->resident)
        jr->ring[s->ck.index % e->nslots] = NULL;
    slot_put(e, s);
    if (++jr->done == jr->nchunks)
        job_finish(e, jr);
}

static void on_write(struct ms_shard_write *req, int status)
{
    struct slot *s = req->data;
    struct eng *e = s->e;
    struct out_shard *sh = &e->osh[s->jr->job->shard];
    sh->wbusy = false;
    if (status < 0) {
        eng_fail(e, status, "%s", ms_errmsg()); /* io/ names the file */
        slot_put(e, s);
    } else {
        e->bytes_out += s->wlen;
        if (e->hash_writes)
            sh->hacc = ms_poshash_add(sh->hacc, s->hpart);
        if (eng_stopping(e))
            slot_put(e, s);
        else
            chunk_written(e, s);
    }
    shard_write_next(e, sh);
    pump(e);
}

/* ------------------------------------------------------------------ sequential output */

static void shard_final(struct eng *e, uint32_t k);

static struct jrun *active_run_of(struct eng *e, size_t job_index)
{
    const struct ms_job *j = &e->plan->jobs[job_index];
    for (uint32_t k = 0; k < e->nactive; k++)
        if (e->jr[e->order[k]].job == j)
            return &e->jr[e->order[k]];
    return NULL;
}

/* Worker thread: begins a new shard file if due, then writes one chunk. */
static void seq_work_cb(uv_work_t *w)
{
    struct eng *e = w->data;
    struct seq_writer *sw = &e->sw;
    int rc = 0;
    ms_error_clear();
    if (sw->begin_shard >= 0) {
        if (sw->cur_shard >= 0)
            rc = ms_out_file_end(sw->out);
        const struct ms_out_shard *ls = &e->plan->layout->shards[sw->begin_shard];
        if (!rc)
            rc = ms_out_file_begin(sw->out, ls->file_name, ls->file_bytes, NULL);
        if (!rc)
            rc = ms_out_file_write(sw->out, ls->header, ls->header_bytes);
    }
    if (!rc)
        rc = ms_out_file_write(sw->out, sw->ws->wbuf, sw->ws->wlen);
    sw->rc = rc;
    if (rc)
        snprintf(sw->err, sizeof sw->err, "%s", ms_errmsg());
}

static void seq_after_cb(uv_work_t *w, int status)
{
    struct eng *e = w->data;
    struct seq_writer *sw = &e->sw;
    struct slot *s = sw->ws;
    sw->busy = false;
    sw->ws = NULL;
    if (status < 0 || sw->rc) {
        if (status < 0)
            eng_fail(e, status, "output write canceled: %s", ms_strerror(status));
        else
            eng_fail(e, sw->rc, "%s", sw->err);
        slot_put(e, s);
        pump(e);
        return;
    }
    if (sw->begin_shard >= 0) {
        e->bytes_out += e->plan->layout->shards[sw->begin_shard].header_bytes;
        if (sw->cur_shard >= 0) /* seq_work_cb ended it */
            shard_final(e, (uint32_t)sw->cur_shard);
        sw->cur_shard = sw->begin_shard;
    }
    e->bytes_out += s->wlen;
    struct jrun *jr = s->jr;
    if (++sw->wchunk == jr->nchunks) {
        sw->wjob++;
        sw->wchunk = 0;
    }
    chunk_written(e, s);
    pump(e);
}

/* Starts the next in-order write if its chunk is ready and the writer is idle. */
static void seq_pump(struct eng *e)
{
    struct seq_writer *sw = &e->sw;
    if (sw->busy || eng_stopping(e))
        return;
    while (sw->wjob < e->plan->njobs) {
        const struct ms_job *j = &e->plan->jobs[sw->wjob];
        if (e->osh[j->shard].skip) {
            sw->wjob++;
            continue;
        }
        struct jrun *jr = active_run_of(e, sw->wjob);
        if (!jr) {
            if (sw->wjob < e->next_job) { /* finished with no chunks: an empty tensor */
                sw->wjob++;
                sw->wchunk = 0;
                continue;
            }
            return;
        }
        struct slot *s = NULL;
        for (uint32_t i = 0; i < e->nslots; i++) {
            struct slot *c = &e->slots[i];
            if (c->state == SLOT_WREADY && c->jr == jr && c->ck.index == sw->wchunk) {
                s = c;
                break;
            }
        }
        if (!s)
            return;
        sw->begin_shard = (long)j->shard != sw->cur_shard ? (long)j->shard : -1;
        sw->ws = s;
        sw->busy = true;
        s->state = SLOT_WRITING;
        sw->work.data = e;
        int rc = uv_queue_work(&e->loop, &sw->work, seq_work_cb, seq_after_cb);
        if (rc < 0) {
            sw->busy = false;
            eng_fail(e, rc, "cannot queue output write: %s", ms_strerror(rc));
            slot_put(e, s);
        }
        return;
    }
}

/* ------------------------------------------------------------------ checksums */

#define HASH_BUF (1u << 20)

static void hash_pump(struct eng *e);

static void hash_work_cb(uv_work_t *w)
{
    struct eng *e = w->data;
    ms_error_clear();
    e->hrc = ms_run_hash_file(e->osh[e->hcur].file.final_path, e->hbuf, HASH_BUF, &e->hstop,
                              &e->hsum);
    if (e->hrc)
        snprintf(e->herr, sizeof e->herr, "%s", ms_errmsg());
}

/* Records the checksum in the run file, then starts the next. */
static void hash_after_cb(uv_work_t *w, int status)
{
    struct eng *e = w->data;
    e->hbusy = false;
    if (e->err)
        return;
    if (status < 0 || e->hrc) {
        if (status < 0)
            eng_fail(e, status, "checksum canceled: %s", uv_strerror(status));
        else
            eng_fail(e, e->hrc, "%s", e->herr);
        return;
    }
    e->sums[e->hcur] = e->hsum;
    e->have[e->hcur] = true;
    int rc = ms_run_save(e->run_path, e->fp, e->names, e->sums, e->have, e->nsh);
    if (rc) {
        eng_fail(e, rc, "%s", ms_errmsg());
        return;
    }
    hash_pump(e);
}

static void hash_pump(struct eng *e)
{
    if (e->hbusy || e->err || e->hq_head == e->hq_tail)
        return;
    e->hcur = e->hq[e->hq_head++];
    e->hbusy = true;
    e->hwork.data = e;
    int rc = uv_queue_work(&e->loop, &e->hwork, hash_work_cb, hash_after_cb);
    if (rc < 0) {
        e->hbusy = false;
        eng_fail(e, rc, "cannot queue a checksum: %s", uv_strerror(rc));
    }
}

/* Shard k is complete under its final name: its checksum goes into the run file. */
static void shard_final(struct eng *e, uint32_t k)
{
    if (!e->run_path)
        return;
    if (e->hash_writes) { /* every byte of the file went through on_write or shard_open */
        e->sums[k] = ms_poshash_digest(e->osh[k].hacc, e->plan->layout->shards[k].file_bytes);
        e->have[k] = true;
        int rc = ms_run_save(e->run_path, e->fp, e->names, e->sums, e->have, e->nsh);
        if (rc)
            eng_fail(e, rc, "%s", ms_errmsg());
        return;
    }
    /* zstd: the file holds compressed bytes, hashed by reading it back */
    e->hq[e->hq_tail++] = k;
    hash_pump(e);
}

/* ------------------------------------------------------------------ shards */

static int shard_open(struct eng *e, uint32_t k)
{
    const struct ms_out_shard *ls = &e->plan->layout->shards[k];
    int rc = ms_shard_file_open(&e->osh[k].file, ls->file_bytes, ls->header, ls->header_bytes);
    if (!rc && e->behind)
        rc = ms_shard_file_behind(&e->osh[k].file, MS_SHARD_BEHIND_BYTES);
    if (rc)
        return eng_fail(e, rc, "%s", ms_errmsg());
    e->bytes_out += ls->header_bytes;
    e->osh[k].hacc = ms_poshash_range(0, ls->header, ls->header_bytes);
    return 0;
}

/* Ends a shard whose last job is done: synced, closed and renamed (blocking, once per shard). */
static void shard_job_done(struct eng *e, uint32_t k)
{
    struct out_shard *sh = &e->osh[k];
    assert(sh->jobs_left > 0);
    if (--sh->jobs_left || e->seq)
        return; /* sequential output ends files in seq_work_cb */
    int rc = ms_shard_file_finish(&sh->file);
    if (rc)
        eng_fail(e, rc, "%s", ms_errmsg());
    else
        shard_final(e, k);
}

/* ------------------------------------------------------------------ jobs */

static void job_finish(struct eng *e, struct jrun *jr)
{
    const struct ms_job *j = jr->job;
    if (jr->state_idx >= 0)
        e->state_used[jr->state_idx] = false;
    if (jr->lora_idx >= 0)
        e->lora_used[jr->lora_idx] = false;
    if (jr->keep_pool)
        e->keep_used = false;
    uint32_t idx = (uint32_t)(jr - e->jr);
    for (uint32_t i = 0; i < e->nactive; i++) {
        if (e->order[i] == idx) {
            memmove(&e->order[i], &e->order[i + 1], (e->nactive - i - 1) * sizeof e->order[0]);
            e->nactive--;
            break;
        }
    }
    jr->used = false;
    e->jobs_done++;
    shard_job_done(e, j->shard);
}

/* True when jr has issued every chunk it will ever issue (its apply pass). */
static bool job_fully_issued(const struct jrun *jr)
{
    return jr->phase == MS_STAGE_APPLY && jr->issued == jr->nchunks;
}

/*
 * True when jr will take no more slots: every chunk of its apply pass is issued,
 * or it is resident and its first pass is (every later pass, apply included,
 * runs from the slots it holds). A later job may then take free slots: jr never
 * waits for them, so the schedule stays deadlock-free, and the next tensor's
 * reads and first pass overlap a resident tensor's later passes.
 */
static bool job_takes_no_slots(const struct jrun *jr)
{
    return job_fully_issued(jr) || (jr->resident && (jr->pass > 0 || jr->issued == jr->nchunks));
}

/* Takes a LoRA buffer for jr and reads its inputs' A and B into it (blocking, small).
 * Returns 1 to wait for a buffer (jr's state buffer is given back), 0, or an error. */
static int job_lora_load(struct eng *e, struct jrun *jr)
{
    const struct ms_job *j = jr->job;
    uint32_t k = 0;
    while (k < e->nloras && e->lora_used[k])
        k++;
    if (k == e->nloras) {
        if (jr->state_idx >= 0)
            e->state_used[jr->state_idx] = false;
        return 1;
    }
    jr->lora_idx = (int)k;
    e->lora_used[k] = true;
    unsigned char *p = (unsigned char *)e->loras[k];
    for (uint32_t i = 0; i < j->s.ninputs; i++) {
        const struct ms_lora_fold *f = j->in[i].lora;
        if (!f || !f->r)
            continue;
        uint64_t na = f->transpose ? f->rows : f->cols;
        float *at = (float *)(void *)p, *b = at + na * f->r;
        p += align_up((size_t)ms_lora_floats(f) * sizeof(float));
        int rc = ms_lora_read(f, at, b);
        if (rc < 0)
            return eng_fail(e, rc, "%s", ms_errmsg()); /* names the file and tensor */
        jr->lora_at[i] = at;
        jr->lora_b[i] = b;
    }
    return 0;
}

static int job_activate(struct eng *e)
{
    const struct ms_job *j = &e->plan->jobs[e->next_job];
    if (e->osh[j->shard].skip) {
        e->next_job++;
        e->jobs_done++;
        return 0;
    }
    uint32_t idx = 0;
    while (e->jr[idx].used)
        idx++;
    struct jrun *jr = &e->jr[idx];
    memset(jr, 0, sizeof *jr);
    jr->ring = e->ring_mem + (size_t)idx * e->nslots;
    memset(jr->ring, 0, e->nslots * sizeof jr->ring[0]);
    jr->job = j;
    jr->state_idx = -1;
    jr->lora_idx = -1;
    jr->copy = j->copy;
    jr->phase = MS_STAGE_APPLY;
    jr->keeps = job_keeps(j);
    if (jr->keeps && e->keep_pool && j->s.numel * MS_KEEP_BYTES <= e->keep_bytes) {
        /* the same test as jr->resident below, but before begin (the pool's
         * wait must come before anything is taken) */
        uint64_t c = job_chunk(j, e->slot_bytes, e->opts->chunk_elems);
        if (!e->opts->in_memory || (j->s.numel + c - 1) / c > e->nslots) {
            if (e->keep_used)
                return 1; /* wait for the keep pool */
            jr->keep_pool = true;
        }
    }
    size_t ssz = job_state_size(j);
    if (ssz) {
        uint32_t k = 0;
        while (k < e->nstates && e->state_used[k])
            k++;
        if (k == e->nstates)
            return 1; /* wait for a state buffer */
        jr->state_idx = (int)k;
        e->state_used[k] = true;
        jr->state = e->states[k];
        memset(jr->state, 0, ssz);
    }
    if (job_lora_bytes(j)) {
        int rc = job_lora_load(e, jr);
        if (rc)
            return rc;
    }
    if (jr->keep_pool)
        e->keep_used = true;
    struct out_shard *sh = &e->osh[j->shard];
    if (!e->seq && sh->file.fd < 0 && !sh->file.finished) {
        int rc = shard_open(e, j->shard);
        if (rc)
            return rc;
    }
    jr->used = true;
    e->order[e->nactive++] = idx;
    e->next_job++;
    if (j->copy) {
        jr->total = j->out_bytes;
        jr->chunk = job_chunk(j, e->slot_bytes, 0);
    } else {
        jr->ops = j->s.method->ops;
        jr->total = j->s.numel;
        jr->chunk = job_chunk(j, e->slot_bytes, e->opts->chunk_elems);
        jr->partial_bytes = job_partial_size(j);
    }
    jr->nchunks = jr->total ? (uint32_t)((jr->total + jr->chunk - 1) / jr->chunk) : 0;
    if (!jr->copy && jr->ops->begin && jr->total) {
        int rc = jr->ops->begin(jr->state, &j->s);
        if (rc < 0)
            return eng_fail(e, rc, "%s", ms_errmsg()); /* stages name the tensor */
        jr->phase = rc;
    }
    jr->resident = jr->phase == MS_STAGE_REDUCE && e->opts->in_memory && jr->nchunks <= e->nslots;
    jr->sdt = jr->total ? stored_job(e, jr) : MS_DT_NONE;
    jr->stored = jr->sdt != MS_DT_NONE;
    if (jr->stored && jr->keeps && jr->resident && !jr->keep_pool) {
        /* the packed chunk leaves room for a keep area in a slot sized for floats,
         * but for one input; a job without room keeps nothing (keep NULL) */
        uint64_t c = jr->chunk, sb = elem_bytes(jr->sdt);
        jr->skeep = align_up(jr->partial_bytes) + (j->s.ninputs + 1) * align_up(c * sb) +
                        align_up(c * MS_KEEP_BYTES) <= e->slot_bytes;
    }
    jr->fused = fused_job(e, jr);
    if (jr->nchunks == 0)
        job_finish(e, jr);
    return 0;
}

/* Starts the reads of s's chunk (slot_setup). Loop thread. */
static void slot_read(struct eng *e, struct slot *s)
{
    uint32_t n = s->reads_left;
    for (uint32_t i = 0; i < n && !eng_stopping(e); i++)
        read_issue(e, s, i);
}

/* Issues chunks of jr's current pass while slots are free. */
static void job_issue(struct eng *e, struct jrun *jr)
{
    while (jr->issued < jr->nchunks && !eng_stopping(e)) {
        uint32_t c = jr->issued;
        if (jr->resident && jr->pass > 0) {
            struct slot *s = jr->ring[c % e->nslots];
            assert(s && s->state == SLOT_RESIDENT);
            jr->issued++;
            e->nresident--;
            chunk_ready(e, s);
            continue;
        }
        /* A streaming reduce pass keeps at most nslots chunks between fold and issue. */
        if (jr->phase == MS_STAGE_REDUCE && c - jr->folded >= e->nslots)
            return;
        uint32_t inflight = e->nslots - e->nfree - e->nresident;
        if (inflight >= e->depth || (jr->fused && inflight > e->compute_max))
            return; /* fused: threads + 1 chunks at once (start_compute), few slots touched */
        struct slot *s = slot_get(e);
        if (!s)
            return;
        slot_setup(e, jr, s, c);
        if (jr->phase == MS_STAGE_REDUCE)
            jr->ring[c % e->nslots] = s;
        jr->issued++;
        if (jr->fused) {
            s->fused = true;
            chunk_ready(e, s);
        } else {
            slot_read(e, s);
        }
    }
}

static void pump(struct eng *e)
{
    if (g_cancel_signo && !e->err) {
        e->signo = g_cancel_signo;
        eng_fail(e, MS_ECANCELED, "interrupted by signal %d", (int)g_cancel_signo);
    }
    if (!eng_stopping(e)) {
        for (uint32_t k = 0; k < e->nactive && !eng_stopping(e); k++) {
            struct jrun *jr = &e->jr[e->order[k]];
            job_issue(e, jr);
            if (!job_takes_no_slots(jr))
                break;
        }
        while (!eng_stopping(e) && e->next_job < e->plan->njobs && e->nactive < MAX_ACTIVE &&
               e->nfree > 0 &&
               (e->nactive == 0 || job_takes_no_slots(&e->jr[e->order[e->nactive - 1]]))) {
            int rc = job_activate(e);
            if (rc > 0)
                break; /* waiting for a state or LoRA buffer */
            if (rc < 0)
                break;
            if (e->nactive) {
                struct jrun *last = &e->jr[e->order[e->nactive - 1]];
                job_issue(e, last);
            }
        }
    }
    start_compute(e);
    if (e->seq)
        seq_pump(e);
}

/* ------------------------------------------------------------------ progress */

static void progress_draw(struct eng *e, bool final)
{
    double secs = (double)(uv_hrtime() - e->t_start) / 1e9;
    uint64_t total = e->plan->bytes_read + e->plan->bytes_written;
    uint64_t done = e->bytes_in + e->bytes_out;
    double rate = secs > 0 ? (double)done / secs : 0;
    char a[32], b[32], r[32], eta[32] = "--:--";
    ms_fmt_bytes(a, sizeof a, (double)done, MS_BYTES_PROGRESS);
    ms_fmt_bytes(b, sizeof b, (double)total, MS_BYTES_PROGRESS);
    ms_fmt_bytes(r, sizeof r, rate, MS_BYTES_PROGRESS);
    if (rate > 0 && total > done) {
        uint64_t left = (uint64_t)((double)(total - done) / rate);
        snprintf(eta, sizeof eta, "%" PRIu64 ":%02" PRIu64, left / 60, left % 60);
    } else if (total <= done) {
        snprintf(eta, sizeof eta, "0:00");
    }
    fprintf(stderr, "\r\033[K[%zu/%zu tensors] %s / %s read+written  %s/s  ETA %s%s", e->jobs_done,
            e->plan->njobs, a, b, r, eta, final ? "\n" : "");
    fflush(stderr);
}

static void on_timer(uv_timer_t *t)
{
    struct eng *e = t->data;
    progress_draw(e, false);
    pump(e);
}

static void on_signal(uv_signal_t *h, int signo)
{
    struct eng *e = h->data;
    g_cancel_signo = signo;
    pump(e);
}

/* ------------------------------------------------------------------ setup */

/*
 * Whether this merge's I/O is larger than the page cache can usefully keep: more
 * bytes read and written than half the machine's memory. Then the inputs (read
 * once) and the output (written once) would only push other data out of the
 * cache, and a final fsync of gigabytes of dirty output would stall, so both
 * are dropped behind (ms_src_consumed, ms_shard_file_behind). The bytes written
 * are the same either way. MERGESTREAM_IO_BEHIND=1 or 0 forces it (tests).
 */
/* Elements per compute sub-block (apply_subblock): 16 Ki elements of three inputs
 * and the output are 256 KiB of floats, which stay in a 1 MiB L2 between decode,
 * apply and encode. MERGESTREAM_SUBBLOCK=N (elements; 0: whole chunks) overrides
 * it, for tests and measurements. */
#define SUBBLOCK_DEFAULT 16384u

static uint64_t env_elems(const char *name, uint64_t dflt)
{
    const char *v = getenv(name);
    char *end;
    unsigned long long n = v && *v ? strtoull(v, &end, 10) : 0;
    return v && *v && !*end ? (uint64_t)n : dflt;
}

static bool io_behind(const struct ms_plan *p)
{
    const char *v = getenv("MERGESTREAM_IO_BEHIND");
    if (v && (!strcmp(v, "0") || !strcmp(v, "1")))
        return v[0] == '1';
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || psz <= 0)
        return false;
    return p->bytes_read + p->bytes_written > (uint64_t)pages * (uint64_t)psz / 2;
}

static int open_inputs(struct eng *e)
{
    const struct ms_plan *p = e->plan;
    e->src_base = ms_calloc(p->nmodels + 1, sizeof *e->src_base);
    if (!e->src_base)
        return ms_error(MS_ENOMEM, "out of memory");
    size_t n = 0;
    for (size_t m = 0; m < p->nmodels; m++) {
        e->src_base[m] = n;
        n += p->models[m].model->nshards;
    }
    e->nsrc = n;
    e->src = ms_calloc(n ? n : 1, sizeof *e->src);
    if (!e->src)
        return ms_error(MS_ENOMEM, "out of memory");
    /* Open only the shards some job reads. */
    for (size_t k = 0; k < p->njobs; k++) {
        const struct ms_job *j = &p->jobs[k];
        for (uint32_t i = 0; i < j->s.ninputs; i++) {
            size_t slot = e->src_base[j->in[i].model] + j->in[i].shard;
            if (e->src[slot])
                continue;
            const struct ms_st_file *f = p->models[j->in[i].model].model->shards[j->in[i].shard];
            int rc = ms_src_open(j->in[i].file, f->compressed, &e->src[slot]);
            if (rc)
                return rc;
            ms_src_set_size(e->src[slot], f->file_size); /* checked by remote sources */
        }
    }
    return 0;
}

static int alloc_pool(struct eng *e, const struct sizing *sz)
{
    e->nslots = sz->nslots;
    e->slot_bytes = sz->slot_bytes;
    e->slots = ms_calloc(e->nslots, sizeof *e->slots);
    e->free_slots = ms_calloc(e->nslots, sizeof *e->free_slots);
    e->ring_mem = ms_calloc((size_t)MAX_ACTIVE * e->nslots, sizeof *e->ring_mem);
    if (!e->slots || !e->free_slots || !e->ring_mem)
        return ms_error(MS_ENOMEM, "out of memory allocating the buffer pool");
    for (uint32_t i = 0; i < e->nslots; i++) {
        struct slot *s = &e->slots[i];
        s->e = e;
        s->mem = ms_aligned_alloc(e->slot_bytes);
        if (!s->mem)
            return ms_error(MS_ENOMEM, "out of memory allocating %zu-byte buffers (--max-memory)",
                            e->slot_bytes);
        e->free_slots[e->nfree++] = s;
    }
    e->nloras = sz->nloras;
    e->lora_bytes = sz->lora_bytes;
    if (e->nloras) {
        e->loras = ms_calloc(e->nloras, sizeof *e->loras);
        e->lora_used = ms_calloc(e->nloras, sizeof *e->lora_used);
        if (!e->loras || !e->lora_used)
            return ms_error(MS_ENOMEM, "out of memory");
        for (uint32_t i = 0; i < e->nloras; i++) {
            e->loras[i] = ms_aligned_alloc(e->lora_bytes);
            if (!e->loras[i])
                return ms_error(MS_ENOMEM, "out of memory allocating LoRA matrices");
        }
    }
    e->nstates = sz->nstates;
    e->state_bytes = sz->state_bytes;
    if (e->nstates) {
        e->states = ms_calloc(e->nstates, sizeof *e->states);
        e->state_used = ms_calloc(e->nstates, sizeof *e->state_used);
        if (!e->states || !e->state_used)
            return ms_error(MS_ENOMEM, "out of memory");
        for (uint32_t i = 0; i < e->nstates; i++) {
            e->states[i] = ms_aligned_alloc(e->state_bytes);
            if (!e->states[i])
                return ms_error(MS_ENOMEM, "out of memory allocating method state");
        }
    }
    e->keep_bytes = sz->keep_bytes;
    if (e->keep_bytes && !(e->keep_pool = ms_aligned_alloc(e->keep_bytes)))
        return ms_error(MS_ENOMEM, "out of memory allocating the keep pool (%zu bytes)",
                        e->keep_bytes);
    return 0;
}

/* Tar members carry the time of the merge, as tar itself would give them;
 * $SOURCE_DATE_EPOCH (reproducible-builds.org) fixes it for byte-identical streams. */
static uint64_t tar_mtime(void)
{
    const char *v = getenv("SOURCE_DATE_EPOCH");
    char *end;
    if (v && *v) {
        unsigned long long t = strtoull(v, &end, 10);
        if (!*end && *v != '-')
            return t;
    }
    time_t now = time(NULL);
    return now > 0 ? (uint64_t)now : 0;
}

static int prepare_outputs(struct eng *e)
{
    const struct ms_engine_opts *o = e->opts;
    const struct ms_layout *l = e->plan->layout;
    e->osh = ms_calloc(l->nshards ? l->nshards : 1, sizeof *e->osh);
    if (!e->osh)
        return ms_error(MS_ENOMEM, "out of memory");
    const char *suffix = o->zstd_level ? ".zst" : "";
    struct ms_run old = { 0 };
    bool old_ok = false;
    if (o->kind == MS_OUT_DIR) {
        e->run_path = ms_run_path(o->out, o->part_index, o->part_count);
        size_t n = l->nshards ? l->nshards : 1;
        e->sums = ms_calloc(n, sizeof *e->sums);
        e->have = ms_calloc(n, sizeof *e->have);
        e->names = ms_calloc(n, sizeof *e->names);
        e->hq = ms_calloc(n, sizeof *e->hq);
        e->hbuf = ms_malloc(HASH_BUF);
        if (!e->run_path || !e->sums || !e->have || !e->names || !e->hq || !e->hbuf)
            return ms_error(MS_ENOMEM, "out of memory");
        int rc = ms_run_fingerprint(e->plan, o, &e->fp);
        if (rc)
            return rc;
        if (o->resume) {
            old_ok = ms_run_load(e->run_path, &old) == 0;
            if (old_ok && old.fingerprint != e->fp) {
                ms_run_fini(&old);
                old_ok = false;
                ms_log_warn("resume: %s is from a different recipe, options or inputs; "
                            "every shard is written again", e->run_path);
            } else if (!old_ok) {
                ms_log_warn("resume: %s; every shard is written again", ms_errmsg());
            }
            ms_error_clear();
        }
    }
    for (size_t k = 0; k < l->nshards; k++) {
        struct out_shard *sh = &e->osh[e->nsh++]; /* released by eng_release even if init fails */
        const struct ms_out_shard *ls = &l->shards[k];
        int rc = ms_shard_file_init(&sh->file, o->kind == MS_OUT_DIR ? o->out : NULL,
                                    ls->file_name, suffix);
        if (rc) {
            if (old_ok)
                ms_run_fini(&old);
            return rc;
        }
        if (e->run_path)
            e->names[k] = strrchr(sh->file.final_path, '/') + 1;
        if (o->part_count > 1 && k % o->part_count != o->part_index - 1)
            sh->skip = true;
        if (!sh->skip && old_ok && ms_shard_file_exists(&sh->file)) {
            /* Kept only when the run matches and the file has its recorded checksum. */
            uint64_t want, got;
            bool recorded = ms_run_checksum(&old, e->names[k], &want) == 0;
            if (recorded &&
                ms_shard_file_keep(&sh->file, ls->file_bytes, ls->header, ls->header_bytes,
                                   o->zstd_level != 0) &&
                ms_run_hash_file(sh->file.final_path, e->hbuf, HASH_BUF, NULL, &got) == 0 &&
                got == want) {
                sh->skip = true;
                e->sums[k] = got;
                e->have[k] = true;
                ms_log_info("resume: keeping %s", sh->file.final_path);
            } else {
                sh->file.finished = false;
                ms_error_clear();
                ms_log_warn(recorded ? "resume: %s does not match this merge; writing it again"
                                     : "resume: %s has no recorded checksum; writing it again",
                            sh->file.final_path);
            }
        }
    }
    if (old_ok)
        ms_run_fini(&old);
    if (e->run_path) { /* before any shard is written: the fingerprint, and what was kept */
        int rc = ms_run_save(e->run_path, e->fp, e->names, e->sums, e->have, l->nshards);
        if (rc)
            return rc;
    }
    for (size_t i = 0; i < e->plan->njobs; i++)
        e->osh[e->plan->jobs[i].shard].jobs_left++;
    e->seq = o->kind != MS_OUT_DIR || o->zstd_level;
    e->hash_writes = e->run_path && !e->seq;
    e->sw.cur_shard = -1;
    if (e->seq) {
        struct ms_out_opts oo = {
            .kind = o->kind, .dir = o->out, .fd = o->out_fd, .pipe_cmd = o->pipe_cmd,
            .zstd_level = o->zstd_level, .zstd_workers = o->threads ? o->threads : default_threads(),
            .mtime = tar_mtime(),
            .stop = out_stop, .stall_seconds = o->stall_seconds,
        };
        int rc = ms_out_open(&oo, &e->sw.out);
        if (rc)
            return rc;
    }
    return 0;
}

/* The buffer pool, once every chunk is written: the small files written after it
 * (a merged tokenizer can be megabytes of JSON) then do not add to the peak. */
static void pool_free(struct eng *e)
{
    for (uint32_t i = 0; e->slots && i < e->nslots; i++) {
        ms_aligned_free(e->slots[i].mem);
        e->slots[i].mem = NULL;
    }
    for (uint32_t i = 0; e->states && i < e->nstates; i++) {
        ms_aligned_free(e->states[i]);
        e->states[i] = NULL;
    }
    ms_aligned_free(e->keep_pool);
    e->keep_pool = NULL;
}

static void eng_release(struct eng *e)
{
    if (e->sw.out) {
        if (e->err)
            ms_out_abort(e->sw.out);
        ms_out_free(e->sw.out);
    }
    if (e->src)
        for (size_t i = 0; i < e->nsrc; i++)
            ms_src_free(e->src[i]);
    ms_free(e->src);
    ms_free(e->src_base);
    if (e->osh)
        for (size_t k = 0; k < e->nsh; k++)
            ms_shard_file_fini(&e->osh[k].file);
    ms_free(e->osh);
    ms_free(e->run_path);
    ms_free(e->sums);
    ms_free(e->have);
    ms_free(e->names);
    ms_free(e->hq);
    ms_free(e->hbuf);
    if (e->slots)
        for (uint32_t i = 0; i < e->nslots; i++)
            ms_aligned_free(e->slots[i].mem);
    ms_free(e->slots);
    ms_free(e->free_slots);
    ms_free(e->ring_mem);
    if (e->states)
        for (uint32_t i = 0; i < e->nstates; i++)
            ms_aligned_free(e->states[i]);
    ms_free(e->states);
    ms_free(e->state_used);
    ms_aligned_free(e->keep_pool);
    if (e->loras)
        for (uint32_t i = 0; i < e->nloras; i++)
            ms_aligned_free(e->loras[i]);
    ms_free(e->loras);
    ms_free(e->lora_used);
}

static void close_cb(uv_handle_t *h) { (void)h; }

static int run_loop(struct eng *e)
{
    int rc = uv_loop_init(&e->loop);
    if (rc)
        return ms_error(rc, "cannot start the event loop: %s", ms_strerror(rc));
    e->loop.data = e;
    if (uv_signal_init(&e->loop, &e->sigint) == 0 && uv_signal_init(&e->loop, &e->sigterm) == 0 &&
        uv_signal_init(&e->loop, &e->sighup) == 0) {
        e->sigint.data = e->sigterm.data = e->sighup.data = e;
        uv_signal_start(&e->sigint, on_signal, SIGINT);
        uv_signal_start(&e->sigterm, on_signal, SIGTERM);
        uv_signal_start(&e->sighup, on_signal, SIGHUP);
        uv_unref((uv_handle_t *)&e->sigint);
        uv_unref((uv_handle_t *)&e->sigterm);
        uv_unref((uv_handle_t *)&e->sighup);
        e->have_signals = true;
    }
    e->t_start = uv_hrtime();
    if (e->opts->progress && !e->opts->quiet && uv_timer_init(&e->loop, &e->timer) == 0) {
        e->timer.data = e;
        uv_timer_start(&e->timer, on_timer, 250, 250);
        uv_unref((uv_handle_t *)&e->timer);
        e->have_timer = true;
    }
    pump(e);
    uv_run(&e->loop, UV_RUN_DEFAULT);
    if (!e->err && e->seq && e->sw.cur_shard >= 0) {
        int erc = ms_out_file_end(e->sw.out);
        if (erc)
            eng_fail(e, erc, "%s", ms_errmsg());
        else
            shard_final(e, (uint32_t)e->sw.cur_shard);
        uv_run(&e->loop, UV_RUN_DEFAULT); /* its checksum */
    }
    if (!e->err && e->jobs_done != e->plan->njobs)
        eng_fail(e, MS_EIO, "internal error: the pipeline stalled after %zu of %zu tensors",
                 e->jobs_done, e->plan->njobs);
    if (e->have_timer) {
        if (!e->err)
            progress_draw(e, true);
        else
            fputs("\n", stderr);
        uv_close((uv_handle_t *)&e->timer, close_cb);
    }
    if (e->have_signals) {
        uv_close((uv_handle_t *)&e->sigint, close_cb);
        uv_close((uv_handle_t *)&e->sigterm, close_cb);
        uv_close((uv_handle_t *)&e->sighup, close_cb);
    }
    ms_src_loop_done(&e->loop); /* HTTP connections of remote inputs */
    uv_run(&e->loop, UV_RUN_DEFAULT);
    uv_loop_close(&e->loop);
    /* Closing the last uv_signal_t put SIGINT/SIGTERM/SIGHUP back to SIG_DFL; keep them
     * caught while the small files are written, so a stop is still clean. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = ms_engine_cancel;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    return e->err;
}

int ms_engine_run(const struct ms_plan *plan, const struct ms_engine_opts *opts)
{
    struct eng *e = ms_calloc(1, sizeof *e);
    if (!e)
        return ms_error(MS_ENOMEM, "out of memory");
    e->plan = plan;
    e->opts = opts;
    unsigned threads = opts->threads ? opts->threads : default_threads();
    e->compute_max = threads;
    e->depth = 2 * threads + 4;
    e->behind = io_behind(plan);
    e->subblock = env_elems("MERGESTREAM_SUBBLOCK", SUBBLOCK_DEFAULT);
    /* MERGESTREAM_FUSE=N: elements per block of a fused chunk (0: no fused chunks), for
     * tests and measurements */
    e->fuse = env_elems("MERGESTREAM_FUSE", FUSE_DEFAULT);
    /* MERGESTREAM_STORED=0: every job on the float path (apply_stored and
     * stored_passes unused), for tests and measurements; the bytes are the same */
    e->no_stored = env_elems("MERGESTREAM_STORED", 1) == 0;
    /* The pool serves file I/O and compute: leave room for reads beside compute (more
     * when they come from a disk and block: then compute must not queue behind them). */
    char tp[16];
    snprintf(tp, sizeof tp, "%u", threads + (e->behind ? 4 : 2));
    setenv("UV_THREADPOOL_SIZE", tp, 1);
    /* A signal caught before the loop (by the caller's ms_engine_cancel handler)
     * stays pending: the first pump stops the run. */

    struct sizing sz;
    struct ms_outdir od = { .lock_fd = -1 };
    int rc = compute_sizing(plan, opts->max_memory, threads, opts->chunk_elems, opts->in_memory, &sz,
                            NULL, NULL);
    if (!rc && plan->tok) /* before the pool exists: its reads stay within the budget */
        rc = ms_tokmerge_prepare(plan, opts->max_memory ? opts->max_memory : MS_DEFAULT_MAX_MEMORY);
    if (!rc)
        rc = ms_outdir_prepare(plan, opts, &od);
    if (!rc)
        rc = open_inputs(e);
    if (!rc)
        rc = prepare_outputs(e);
    if (!rc)
        rc = alloc_pool(e, &sz);
    if (!rc) {
        rc = run_loop(e);
        if (rc)
            ms_error(rc, "%s", e->errmsg);
    }
    if (!rc && g_cancel_signo) { /* between the loop and the small files */
        e->signo = g_cancel_signo;
        rc = ms_error(MS_ECANCELED, "interrupted");
    }
    if (!rc)
        pool_free(e);
    if (!rc && (opts->part_count <= 1 || opts->part_index == 1))
        rc = ms_outdir_finish(plan, opts, e->sw.out, &od);
    else if (!rc && e->sw.out)
        rc = ms_out_finish(e->sw.out);
    if (rc && !e->err)
        e->err = rc;
    eng_release(e);
    if (od.lock_fd >= 0) {
        char *msg = rc ? ms_strdup(ms_errmsg()) : NULL; /* release may not replace the error */
        int lrc = ms_outdir_release(plan, opts, &od, rc == 0);
        if (rc && msg)
            ms_error(rc, "%s", msg);
        ms_free(msg);
        if (!rc)
            rc = lrc;
    }
    if (rc == MS_ECANCELED && e->signo)
        ms_error(rc, "interrupted by %s; temporary files removed",
                 e->signo == SIGINT ? "SIGINT" : e->signo == SIGTERM ? "SIGTERM" : "a signal");
    int signo = e->signo;
    ms_free(e);
    if (rc == MS_ECANCELED)
        g_cancel_signo = signo;
    return rc;
}

int ms_engine_signal(void) { return (int)g_cancel_signo; }
