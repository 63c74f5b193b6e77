/*
 * pipeline_impl.h - private to pipeline/: the output directory around the shards.
 */
#ifndef MS_PIPELINE_IMPL_H
#define MS_PIPELINE_IMPL_H

#include <stdatomic.h>

#include "ms_engine.h"

/* What the run holds of its output directory between prepare and release. */
struct ms_outdir {
    int lock_fd;                  /* OUT/.mergestream.lock, flock'ed; -1 when not a directory */
    bool was_ours;                /* OUT held an earlier run's files (its lock file or card) */
    bool copied[16];              /* which tokenizer files this run copied (outdir.c's list) */
};

/*
 * Before anything is written, for every output kind: the donor's tokenizer
 * files to copy resolve to regular files inside its folder. Directory output
 * only: OUT is not, is not inside, and does not contain an input model's folder
 * (resolved, so also through symlinks); OUT is created if needed and must be a
 * writable directory, empty or holding an earlier mergestream run's output
 * (unless opts->resume or opts->force); then OUT/.mergestream.lock is created,
 * flock'ed (a second run fails at once naming the holder's pid) and holds our
 * pid. *od is filled (release it with ms_outdir_release, also after a failure).
 */
int ms_outdir_prepare(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                      struct ms_outdir *od);
/*
 * Ends the run's hold on OUT. ok (the whole output is complete): removes the
 * files an earlier run of ours left that this output does not have (not with
 * --resume or --part), then the lock file. Failed runs keep the lock file (a
 * sign for the next run that OUT is ours). Closes the lock. 0 or an error.
 */
int ms_outdir_release(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                      struct ms_outdir *od, bool ok);
/*
 * After every shard is complete: the index (more than one shard), config.json,
 * README.md and mergekit_config.yml (write_card), the donor's tokenizer files
 * (copy_tokenizer), each written atomically, then the directory is synced.
 * The order follows mergekit-spec.md 4.5. With `out` (tar or pipe output) the
 * files go through it instead of into a directory, and ms_out_finish ends it.
 */
int ms_outdir_finish(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                     struct ms_out *out, struct ms_outdir *od);
/* ------------------------------------------------------------------ run file (runfile.c) */

/* OUT's run file: "<out>/.mergestream-run.json", or with --part I/N
 * "<out>/.mergestream-part-I-of-N-run.json" (ms_free). NULL without memory. */
char *ms_run_path(const char *out, unsigned part_index, unsigned part_count);
/*
 * The run's fingerprint: XXH64 over the recipe text, the options that change
 * output bytes (seed, zstd level; the shard size through the layout), every
 * input file's path, size and modification time, and every output shard's name
 * and header. 0, or an error naming an input that cannot be stat'ed.
 */
int ms_run_fingerprint(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                       uint64_t *fp);
/* The ms_poshash checksum (ms_poshash.h) of the file at path (not followed if a
 * symlink), read cap bytes at a time through buf; the engine computes the same
 * figure from the chunks as it writes them; stops with MS_ECANCELED once *stop is set. Any thread. */
int ms_run_hash_file(const char *path, void *buf, size_t cap, const atomic_int *stop,
                     uint64_t *sum);
/* A run file read back: its fingerprint and the checksums it lists. */
struct ms_run {
    uint64_t fingerprint;
    void *shards;                 /* private: the "shards" JSON object */
};
/* Reads the run file at path; an error (naming it) if absent or not ours. ms_run_fini after 0. */
int ms_run_load(const char *path, struct ms_run *run);
/* The checksum run lists for shard file `name` (bare name): 0, or -1 when none. */
int ms_run_checksum(const struct ms_run *run, const char *name, uint64_t *sum);
void ms_run_fini(struct ms_run *run);
/* Writes the run file atomically: fingerprint fp and, for every k < n with
 * have[k], the checksum sums[k] of shard file names[k] (bare names of ours). */
int ms_run_save(const char *path, uint64_t fp, const char *const *names, const uint64_t *sums,
                const bool *have, size_t n);

/* The model card text (README.md) for plan written to a directory named title. */
char *ms_outdir_card(const struct ms_plan *plan, const char *title);

#endif
