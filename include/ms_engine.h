/*
 * ms_engine.h - executes a plan: the libuv pipeline of readers, method stages
 * and writers under a fixed memory budget (DESIGN.md section 3), and the output
 * directory around the shards (config.json, tokenizer, card, recipe).
 *
 * The engine owns the only uv_loop of the process while it runs. It must be
 * called from the main thread. Memory: every buffer is allocated once, at start,
 * from opts->max_memory; nothing grows with model or tensor size.
 */
#ifndef MS_ENGINE_H
#define MS_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "ms_out.h"
#include "ms_plan.h"

#define MS_DEFAULT_MAX_MEMORY (512ull << 20)

struct ms_engine_opts {
    const char *out;              /* output directory ("-" is reserved for the tar stream) */
    uint64_t max_memory;          /* bytes for all buffers together; 0 = default */
    unsigned threads;             /* compute threads; 0 = number of cores */
    uint64_t chunk_elems;         /* testing knob: cap on elements per chunk (0 = from budget) */
    bool in_memory;               /* allow the read-once path for multi-pass stages (default on) */
    bool quiet;                   /* no progress line */
    bool progress;                /* draw the progress line (a terminal and not quiet) */
    bool copy_tokenizer;          /* copy the donor's tokenizer files (default on) */
    bool write_card;              /* README.md and mergekit_config.yml (default on) */
    bool resume;                  /* keep finished shards already in out (directory output) */
    bool force;                   /* write into a non-empty directory mergestream did not write */
    uint64_t seed;                /* --random-seed as given to the plan (in the run fingerprint) */
    enum ms_out_kind kind;        /* MS_OUT_DIR (default), MS_OUT_TAR (to stdout), MS_OUT_PIPE */
    const char *pipe_cmd;         /* MS_OUT_PIPE: command per output file */
    int out_fd;                   /* MS_OUT_TAR: stream destination (default 1) */
    int zstd_level;               /* 0 = raw; else shards (DIR, PIPE) or the whole stream (TAR) */
    unsigned part_index, part_count; /* --part I/N: write only shard k with k % N == I - 1 */
    unsigned stall_seconds;       /* --stall-timeout: fail when a tar reader or --pipe command
                                     takes no bytes for this long (0 = wait for ever) */
};

/* Fills opts with defaults. */
void ms_engine_opts_init(struct ms_engine_opts *opts);

/*
 * Runs the whole merge into opts->out. Returns 0, or a negative code with
 * ms_errmsg() naming the file or tensor. On failure (or a signal) no file is
 * left under a final name that is not complete; temporaries are removed.
 */
int ms_engine_run(const struct ms_plan *plan, const struct ms_engine_opts *opts);

/* Memory figures for `plan`: the bytes the pool reserves at max_memory, the bytes of
 * it the plan's chunks touch at most (every slot holding the largest chunk, plus the
 * method states), and the element count of the largest chunk. Any output may be NULL.
 * Returns MS_EINVAL if the budget is too small (the message says the minimum). */
int ms_engine_estimate(const struct ms_plan *plan, uint64_t max_memory, unsigned threads,
                       uint64_t *pool_bytes, uint64_t *used_bytes, uint64_t *chunk_elems);

/*
 * Asks ms_engine_run to stop: async-signal-safe, usable directly as a SIGINT /
 * SIGTERM / SIGHUP handler. A request made before ms_engine_run starts stays pending and
 * stops it at once (so a signal during planning still ends in a clean stop);
 * ms_engine_cancel(0) clears it. While its loop runs the engine catches SIGINT,
 * SIGTERM and SIGHUP itself, and afterwards leaves this function installed for all three.
 */
void ms_engine_cancel(int signo);
/*
 * `verify --deep`: recomputes the XXH64 of every shard that dir's run files
 * (".mergestream-run.json", and ".mergestream-part-I-of-N-run.json" of --part
 * runs) list, as written when each shard was finished, and compares. A run file
 * exists while a merge runs and after it was stopped (--resume reads it); a
 * completed merge removes it. Returns 0 with *nchecked shards matching, or the
 * first mismatch (MS_EDATA naming the file), missing file, or the absence of
 * any run file (MS_EINVAL). Main thread; blocks while it reads.
 */
int ms_engine_verify_checksums(const char *dir, size_t *nchecked);

/* The signal that stopped the last ms_engine_run (SIGINT, SIGTERM, SIGHUP), or 0. */
int ms_engine_signal(void);

#endif
