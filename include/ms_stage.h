/*
 * ms_stage.h - merge methods as chunk-local compute stages (stages/).
 *
 * A method is described by a const struct ms_method: its name, the parameters
 * it declares (per-model or global, defaults, ranges), its input rules, its
 * plan-time rules (ms_plan_ops), its model-card wording and its stage
 * operations. Stages are pure compute: they never see files, libuv or the
 * memory pool. The engine (pipeline/) hands them chunks: the same element range
 * [first, first+count) of every input of one output tensor, decoded to float
 * holding values exactly representable in the compute dtype.
 *
 * Protocol for one output tensor (a "job"):
 *
 *   begin(state, job)                  loop thread; returns MS_STAGE_REDUCE or MS_STAGE_APPLY
 *   while it says MS_STAGE_REDUCE:     a reduce pass over every chunk, in any order
 *       reduce(state, job, chunk, partial)       worker thread; state is read-only
 *       fold(state, job, chunk_index, partial)   loop thread, strictly in chunk order
 *       end_pass(state, job)           loop thread; returns MS_STAGE_REDUCE or MS_STAGE_APPLY
 *   apply(state, job, chunk)           worker thread, any order, chunks in parallel
 *
 * The engine cuts a job into the same chunks in every pass of one run.
 *
 * Keep area (jobs for which ops->keeps says true): per-element scratch that persists
 * across the passes of one job, so that a pass can continue from what the
 * pass before left instead of recomputing it. ms_chunk.keep is either NULL in
 * every chunk of every pass of the job (the engine could not hold it: the stage
 * must then compute without it, with the same bytes), or count * MS_KEEP_BYTES
 * bytes (aligned to 4 only), that are the same memory for the same chunk index
 * in every pass of the job. Its content is undefined until the stage writes it.
 * reduce (worker thread) may read and write its own chunk's keep, and nothing
 * else of it; apply may read it, and its keep may be the same memory as its
 * out: element j's keep bytes [j * MS_KEEP_BYTES, (j+1) * MS_KEEP_BYTES) are
 * out[j]'s, so apply must read an element's keep before it writes out there.
 *
 * Determinism: a stage's result must not depend on how the tensor is cut into
 * chunks. Floating-point sums over a whole tensor use ms_xacc (exact, order-free);
 * per-element work depends only on the element index; random masks come from
 * ms_rng_u32 keyed by (seed, tensor, model, element).
 *
 * Numerics follow mergekit-spec.md section 0: every operation is computed in
 * float32 and rounded to the compute dtype (ms_stage_job.compute) after each op.
 */
#ifndef MS_STAGE_H
#define MS_STAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ms_dtype.h"

/* Models feeding one output tensor: the stages keep per-input values in arrays of
 * this size; the planner refuses more with a one-line error. */
#define MS_MAX_INPUTS 32
#define MS_MAX_PARAMS 8           /* parameters one method declares */

/* ------------------------------------------------------------------------ */
/* What a stage sees of one output tensor. Immutable while the job runs.     */

struct ms_stage_job {
    const char *name;             /* output tensor name */
    uint32_t ndim;
    const int64_t *shape;         /* ndim entries */
    uint64_t numel;               /* elements */
    uint64_t row_len;             /* elements per row: shape[ndim-1], or numel for ndim <= 1 */
    enum ms_dtype compute;        /* F32, F16 or BF16: rounding after each op */
    /* Input i's own dtype as mergekit holds it: the recipe's dtype:, else the stored
     * dtype. Under the default dtype rule (ms_plan_ops.dtypes NULL) compute is the
     * promotion of every in_dt and input i's values are exact in in_dt[i]; they
     * differ only for inputs of mixed dtypes without dtype: (compute is then F32).
     * A stage that reproduces torch's per-op promotion for mixed inputs reads it
     * with ms_stage_in_dt; others ignore it. Unset (0, as in a job a test builds)
     * means compute. */
    enum ms_dtype in_dt[MS_MAX_INPUTS];
    uint32_t ninputs;             /* inputs present for this tensor, in recipe order */
    int base;                     /* index of the base model among inputs, or -1 */
    const struct ms_method *method;
    /* Resolved parameters, indexed like method->params. Per-model ones in
     * pv[input][param]; global ones in gv[param]. NAN means "not set" for an
     * optional parameter without default (e.g. passthrough's scale). */
    double pv[MS_MAX_INPUTS][MS_MAX_PARAMS];
    double gv[MS_MAX_PARAMS];
    uint64_t seed;                /* --random-seed */
    uint64_t key;                 /* hash of the output tensor name, for the RNG */
};

/* What a stage sees of one chunk. */
struct ms_chunk {
    uint64_t first, count;        /* element range of the output tensor */
    uint32_t index;               /* chunk number in the tensor, 0-based */
    uint32_t pass;                /* reduce pass number (0-based); apply: number of reduce passes run */
    const float *in[MS_MAX_INPUTS]; /* ninputs pointers, count floats each, MS_ALIGN-aligned */
    float *out;                   /* apply writes count floats here */
    void *keep;                   /* ops->keeps: count * MS_KEEP_BYTES bytes, or NULL (above) */
};

/* What apply_stored and reduce_stored see of one chunk: its elements as the files
 * store them, in dtype dt. */
struct ms_chunk_stored {
    uint64_t first, count;        /* element range of the output tensor */
    const void *in[MS_MAX_INPUTS]; /* ninputs pointers, count elements of dt each,
                                     little-endian, aligned to the element size */
    void *out;                    /* apply_stored: count elements of dt; overlaps no input.
                                     reduce_stored: NULL */
    uint32_t index;               /* as ms_chunk (stored_passes jobs; 0 otherwise) */
    uint32_t pass;                /* as ms_chunk (stored_passes jobs; 0 otherwise) */
    enum ms_dtype dt;             /* job->compute, or the dtype stored_passes accepted */
    /* stored_passes jobs whose ops->keeps says true: the keep area as ms_chunk.keep
     * (NULL in every chunk of every pass, or count * MS_KEEP_BYTES bytes aligned to
     * 4, the same memory for the same chunk index in every pass), except that it
     * never overlaps in or out. NULL otherwise. */
    void *keep;
};

enum { MS_STAGE_APPLY = 0, MS_STAGE_REDUCE = 1 };

/* Stage flags */
#define MS_STAGE_ROWWISE 0x1u     /* chunks hold whole rows (first and count multiples of row_len) */

#define MS_KEEP_BYTES 4u          /* keep bytes per element: the size of an out element */

struct ms_stage_ops {
    uint32_t flags;
    /* Bytes of per-job state (optional: NULL means 0). Called at plan time;
     * the engine allocates the largest once. The state is zeroed before begin. */
    size_t (*state_size)(const struct ms_stage_job *job);
    /* Bytes of one chunk's reduce partial (optional: NULL means 0). */
    size_t (*partial_size)(const struct ms_stage_job *job);
    /* True when the job's chunks want a keep area (optional: NULL means never).
     * Called at plan time; the stage must compute the same bytes without one. */
    bool (*keeps)(const struct ms_stage_job *job);
    /* Optional: NULL means MS_STAGE_APPLY at once. Returns < 0 on error (ms_error). */
    int (*begin)(void *state, const struct ms_stage_job *job);
    /* Optional when begin never asks for a reduce pass. Must fully write *partial. */
    void (*reduce)(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                   void *partial);
    void (*fold)(void *state, const struct ms_stage_job *job, const struct ms_chunk *c,
                 const void *partial);
    int (*end_pass)(void *state, const struct ms_stage_job *job);
    /* Required. */
    void (*apply)(const void *state, const struct ms_stage_job *job, const struct ms_chunk *c);
    /*
     * Optional: apply on stored bytes. For a job that runs no reduce pass, whose
     * inputs are stored in the compute dtype and loaded unchanged (no conversion,
     * LoRA fold or row gather) and whose output is stored in the compute dtype
     * with nothing rounded in between, the engine may call this, after begin,
     * instead of decoding, apply and encoding a chunk. Returns false, having
     * written nothing, when it does not handle the job's compute dtype (the
     * engine then takes the float path); otherwise out holds the bytes that
     * apply's floats encode to (ms_dtype_encode), for any split into chunks.
     * Worker thread, state read-only.
     */
    bool (*apply_stored)(const void *state, const struct ms_stage_job *job,
                         const struct ms_chunk_stored *c);
    /*
     * Optional (with reduce_stored and apply_stored): every pass on stored bytes.
     * For a job whose begin asked for a reduce pass, whose inputs are all stored in dt (BF16 or F16) and loaded unchanged (as
     * for apply_stored), whose compute dtype is dt or F32 (the float path's
     * inputs are then dt's values, exactly) and whose output is stored in dt
     * with at most a rounding to dt before it, the engine asks, after begin,
     * whether the stage takes the job this way. True commits both sides: every
     * chunk of every reduce pass then goes to reduce_stored instead of reduce,
     * and every chunk of the apply pass to apply_stored (c->dt == dt), which
     * must not decline it; the chunks are those the float path would see, and
     * the partials and the bytes written must be the float path's (apply's
     * floats rounded to dt). False: the job takes the float path. Loop thread,
     * state read-only.
     */
    bool (*stored_passes)(const void *state, const struct ms_stage_job *job, enum ms_dtype dt);
    /* reduce on stored bytes (c->out NULL), for stored_passes jobs: must fully write
     * *partial, the partial reduce writes for the same chunk. Worker thread. */
    void (*reduce_stored)(const void *state, const struct ms_stage_job *job,
                          const struct ms_chunk_stored *c, void *partial);
};

/* ------------------------------------------------------------------------ */
/* Methods and their parameters.                                             */

struct ms_param_decl {
    const char *name;             /* YAML name: "weight", "density", "t", ... */
    bool per_model;               /* read per source model (mergekit-spec.md 1.5) */
    bool required;                /* no default: missing is a plan error */
    bool is_bool;                 /* printed and validated as true/false */
    double def;                   /* default (NAN: none / "None") */
    double lo, hi;                /* valid closed range; lo_open/hi_open make it open */
    bool lo_open, hi_open;
};

/* Method flags */
#define MS_M_BASE_REQUIRED 0x1u   /* base_model must be set (GTA family, slerp, ...) */
#define MS_M_BASE_INPUT 0x2u      /* the base is an input of the method (vs ignored) */
#define MS_M_BASE_PARAMS 0x4u     /* the base's per-model parameters are used (linear weights it);
                                     otherwise a base needs none of its required ones */
#define MS_M_BASE_SHAPE 0x8u      /* the output has the base's shape (GTA family): every input
                                     must match it, except embedding rows, which are cut to the
                                     base's count (an input with fewer rows is an error); without
                                     this flag the shape is the first input's and embedding rows
                                     are cut to the smallest count */

/* The model card's wording for a method (pipeline/outdir.c). */
struct ms_method_card {
    const char *pretty;           /* "Task Arithmetic"; NULL: the card uses the method's name */
    const char *url;              /* (optional) link on the pretty name: paper or article */
    bool hide_base;               /* the card lists the base among the merged models instead of
                                     naming it as the base (slerp, as mergekit's card does) */
};

/*
 * What the planner (pipeline/plan.c) hands a method's plan-time hooks about the
 * output tensor being planned. Filled by the planner; valid only during the call.
 * Planning thread only. Problems are collected and printed when the plan is
 * done, in the order they were recorded, one line each.
 */
struct ms_plan_ctx {
    const char *where;            /* "recipe.yml:L:C" of merge_method (the file name when its
                                     position is unknown), for messages about the method */
    const char *slice_base;       /* reference of this slice's base model, or NULL when none */
    bool optional;                /* the architecture marks the tensor optional: mergekit leaves
                                     it out rather than failing */
    /* Records a problem; returns code (negative). key NULL: always a line of its own;
     * otherwise a later problem with an equal key only counts toward "(and N more
     * tensors)" on the first one's line. The message is cut at 1023 bytes. */
    int (*problem)(const struct ms_plan_ctx *ctx, int code, const char *key, const char *fmt,
                   ...) __attribute__((format(printf, 4, 5)));
    /* Input i's model: its reference as written in the recipe (borrowed from the plan),
     * and its index among the plan's models (the same model gives the same id in every
     * tensor: a dedup key names a model by it). */
    const char *(*model_ref)(const struct ms_plan_ctx *ctx, uint32_t input);
    uint32_t (*model_id)(const struct ms_plan_ctx *ctx, uint32_t input);
    /* Counts one model tensor toward the method's end-of-plan warning (see
     * ms_plan_ops.tally_warn); the first tensor counted is the warning's example. */
    void (*tally)(const struct ms_plan_ctx *ctx, const char *tensor);
};

/* ms_plan_ops.inputs: plan the tensor; leave it out without a problem. Errors are < 0. */
enum { MS_PLAN_KEEP = 0, MS_PLAN_SKIP = 1 };

/*
 * A method's plan-time rules beyond its flags, input counts and parameter ranges.
 * Every member is optional (NULL: no such rule, or the default named). All run on
 * the planning thread, for one output tensor at a time, in this order, and never
 * see tensor data. `job` is the tensor's stage job as far as it is known at that
 * point (below); hooks read it and never keep it.
 */
struct ms_plan_ops {
    /*
     * Input rules, once the inputs are known and the generic count, base and shape
     * checks passed: job->name, method, ninputs, base, ndim and shape are set;
     * parameters, numel and compute are not yet. Returns MS_PLAN_KEEP, MS_PLAN_SKIP
     * (the tensor is not produced; nothing is reported), or a negative code after
     * ctx->problem (the tensor is not produced).
     */
    int (*inputs)(const struct ms_plan_ctx *ctx, const struct ms_stage_job *job);
    /*
     * True when the result is input 0 unchanged, bit for bit (passthrough without
     * scale): the plan may then copy the stored bytes, and a non-float tensor is
     * accepted. Parameters are resolved; compute is not set yet. NULL: never.
     */
    bool (*copies_input)(const struct ms_stage_job *job);
    /*
     * The compute dtype and the result's dtype, from load[i], the dtype input i is
     * loaded as (job->ninputs entries), and job->base. On entry both hold the
     * default: the promotion of every load dtype (equal: that one; bfloat16 with
     * float16, or either with float32: float32; with float64: float64). *out is
     * mergekit's result dtype: a recipe's out_dtype overrides the stored dtype, and
     * the engine then rounds the result to *out before out_dtype, as mergekit's
     * writer casts the method's tensor. NULL: the default.
     */
    void (*dtypes)(const struct ms_stage_job *job, const enum ms_dtype *load,
                   enum ms_dtype *compute, enum ms_dtype *out);
    /*
     * Checks that need the resolved parameters and the tensor's size, made before
     * any data is read: every field of job is set except key and seed. Returns 0, or
     * a negative code after one or more ctx->problem (the tensor is not produced).
     * May call ctx->tally.
     */
    int (*check)(const struct ms_plan_ctx *ctx, const struct ms_stage_job *job);
    /*
     * Once, after every tensor was planned, when check tallied `count` > 0 model
     * tensors (`first`: the first one's name): warns about them (ms_log_warn).
     * `recipe` is the recipe's path. Required when check calls ctx->tally.
     */
    void (*tally_warn)(const char *recipe, size_t count, const char *first);
};

/*
 * A merge method: one const descriptor per method, defined in its own file
 * (stages/<method>.c; the GTA family's share gta.c) and listed in
 * stages/methods.def. Nothing outside that file tells methods apart by name:
 * the planner, the card writer and the engine read only these fields.
 */
struct ms_method {
    const char *name;             /* mergekit's merge_method value */
    const char *summary;          /* one line for --help */
    uint32_t flags;               /* MS_M_* */
    uint32_t min_inputs, max_inputs; /* counted with the base when it is an input; 0 = any.
                                        min == max == 1 reads "takes exactly one input" */
    uint32_t nparams;
    struct ms_param_decl params[MS_MAX_PARAMS];
    struct ms_method_card card;
    const struct ms_plan_ops *plan; /* (optional) NULL: no rules beyond the fields above */
    const struct ms_stage_ops *ops; /* NULL when not supported */
    const void *impl;             /* (optional) private to the method's file: what its ops and
                                     hooks read to tell members of one family apart */
};

/* Registry: every method of stages/methods.def, in that order (the order of --help);
 * ms_method_find returns NULL for an unknown name. Any thread. */
const struct ms_method *ms_method_find(const char *name);
const struct ms_method *ms_method_at(size_t i); /* NULL past the end */
/* Index of a declared parameter, or -1. */
int ms_method_param(const struct ms_method *m, const char *name);

/*
 * Runs a whole job in memory with the given chunk size (elements; 0 = the whole
 * tensor; rounded down to whole rows for ROWWISE stages, at least one row): the
 * reference driver for tests, and the meaning the engine must reproduce. in[i]
 * has job->numel floats already in the compute dtype; out gets numel floats.
 * Allocates its own state and scratch (stages/stage_run.c). To catch stages that
 * depend on what the protocol leaves free, it reduces windows of chunks from
 * last to first (folding them in chunk order), poisons partials before reduce
 * and outputs (NaN) before apply, and hands every chunk MS_ALIGN-aligned copies.
 * Returns 0, the stage's error, MS_EUNSUPPORTED (no ops), MS_EINVAL or MS_ENOMEM.
 * Any thread; single-threaded inside.
 */
int ms_stage_run_mem(const struct ms_stage_job *job, const float *const *in, float *out,
                     uint64_t chunk_elems);
/* The same; keep false hands a stage that keeps no keep area (NULL), as the
 * engine does when it cannot hold one, so that tests can compare both ways.
 * ms_stage_run_mem gives every such stage a keep area, poisoned before its
 * first pass. */
int ms_stage_run_mem_keep(const struct ms_stage_job *job, const float *const *in, float *out,
                          uint64_t chunk_elems, bool keep);
/*
 * The stored-bytes path of the same job, as the engine runs it: in[i] has
 * job->numel elements of dt, out gets numel elements of dt. A job that runs a
 * reduce pass goes through stored_passes, reduce_stored and apply_stored; one
 * that does not through apply_stored (dt must then be job->compute). Same
 * freedoms exercised as ms_stage_run_mem (reversed windows, poisoned partials
 * and outputs, aligned copies). Returns 0, the stage's error, MS_EUNSUPPORTED
 * when the stage does not take the job on this path, MS_EINVAL or MS_ENOMEM.
 * Tests compare its bytes with ms_stage_run_mem's floats encoded to dt.
 */
int ms_stage_run_stored(const struct ms_stage_job *job, enum ms_dtype dt, const void *const *in,
                        void *out, uint64_t chunk_elems);
/* The same; keep false hands a stage that keeps no keep area (NULL), as
 * ms_stage_run_mem_keep. ms_stage_run_stored gives every such stage a keep
 * area of its own (overlapping no input or output), poisoned before its first
 * pass. */
int ms_stage_run_stored_keep(const struct ms_stage_job *job, enum ms_dtype dt,
                             const void *const *in, void *out, uint64_t chunk_elems, bool keep);

/* ------------------------------------------------------------------------ */
/* Shared numeric helpers for stages.                                        */

/*
 * Exact, order-independent accumulator for sums of float products (x*y with x, y
 * float is exact in double). Adding is integer addition into fixed limbs, so the
 * total is the same whatever the order or chunking; ms_xacc_value rounds once,
 * correctly (to nearest, ties to even). Capacity: at least 2^40 terms.
 * Layout (stages/xacc.c): a term m*2^e (|m| < 2^53) is added as m << ((e+352) mod 32)
 * into limb[(e+352)/32]; the limbs are not carry-normalised until ms_xacc_value.
 * Plain data: copy it with memcpy, zero it with ms_xacc_init. Any thread, no locks.
 */
struct ms_xacc {
    __int128 limb[20];
    uint32_t nonfinite;           /* OR of the Inf/NaN kinds added (xacc.c) */
};
void ms_xacc_init(struct ms_xacc *a);
/* Adds the exact double v (must be a float or a product of two floats; finite). */
void ms_xacc_add(struct ms_xacc *a, double v);
void ms_xacc_merge(struct ms_xacc *a, const struct ms_xacc *b);
/* The sum rounded to nearest double. Non-finite inputs are tracked separately:
 * an Inf or NaN added makes the value Inf or NaN as IEEE addition would. */
double ms_xacc_value(const struct ms_xacc *a);
/* Kernels: a += sum x[i]*y[i]; a += sum x[i]^2; a += sum x[i]; a += sum |x[i]|. */
void ms_xacc_dot(struct ms_xacc *a, const float *restrict x, const float *restrict y, size_t n);
void ms_xacc_sumsq(struct ms_xacc *a, const float *restrict x, size_t n);
void ms_xacc_sum(struct ms_xacc *a, const float *restrict x, size_t n);
void ms_xacc_sumabs(struct ms_xacc *a, const float *restrict x, size_t n);
/* Every version of the four kernels (ms_isa.h); NULL when isa is not available
 * here. All give the limbs of ms_xacc_add term by term; the functions above call
 * the ms_isa_active() one. */
struct ms_xacc_kernels {
    void (*dot)(struct ms_xacc *a, const float *restrict x, const float *restrict y, size_t n);
    void (*sumsq)(struct ms_xacc *a, const float *restrict x, size_t n);
    void (*sum)(struct ms_xacc *a, const float *restrict x, size_t n);
    void (*sumabs)(struct ms_xacc *a, const float *restrict x, size_t n);
};
const struct ms_xacc_kernels *ms_xacc_kernels(enum ms_isa isa);

/* Counter-based RNG: a 32-bit value that depends only on its arguments. */
uint32_t ms_rng_u32(uint64_t seed, uint64_t key, uint32_t model, uint64_t element);
/* The stream word of (seed, key, model), and a run of its values: after
 * s = ms_rng_stream(seed, key, model), ms_rng_fill(s, first, out, n) sets
 * out[i] = ms_rng_u32(seed, key, model, first + i) for i < n. Pure, any thread. */
uint64_t ms_rng_stream(uint64_t seed, uint64_t key, uint32_t model);
void ms_rng_fill(uint64_t stream, uint64_t first, uint32_t *restrict out, size_t n);
/* Every version of the stage kernels that have SIMD versions (ms_isa.h); NULL
 * when isa is not available here. ms_rng_fill calls the ms_isa_active() one. */
struct ms_stage_kernels {
    void (*rng_fill)(uint64_t stream, uint64_t first, uint32_t *restrict out, size_t n);
};
const struct ms_stage_kernels *ms_stage_kernels(enum ms_isa isa);
/* 64-bit FNV-1a of a NUL-terminated string (the job key). */
uint64_t ms_hash_str(const char *s);

/* Input i's dtype (ms_stage_job.in_dt), compute when unset. */
static inline enum ms_dtype ms_stage_in_dt(const struct ms_stage_job *job, uint32_t i)
{
    enum ms_dtype d = job->in_dt[i];
    return d == MS_DT_F32 || d == MS_DT_F16 || d == MS_DT_BF16 ? d : job->compute;
}

/* torch's result dtype of an op on two float tensors of dtypes a and b (both
 * dimensioned): equal gives that one; bfloat16 with float16, or either with
 * float32, gives float32; with float64, float64. */
static inline enum ms_dtype ms_dt_promote(enum ms_dtype a, enum ms_dtype b)
{
    if (a == b)
        return a;
    return a == MS_DT_F64 || b == MS_DT_F64 ? MS_DT_F64 : MS_DT_F32;
}

/* Rounds x to the compute dtype (F32, F16, BF16). */
static inline float ms_rnd(enum ms_dtype d, float x)
{
    if (d == MS_DT_BF16)
        return ms_round_bf16_1(x);
    if (d == MS_DT_F16)
        return ms_round_f16_1(x);
    return x;
}
/* Python double -> torch tensor of dtype d: double -> float32 -> d (rule 0.5). */
static inline float ms_rnd_param(enum ms_dtype d, double v) { return ms_rnd(d, (float)v); }

#endif
