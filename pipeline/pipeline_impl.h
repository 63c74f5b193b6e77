/*
 * pipeline_impl.h - private to pipeline/: the output directory around the shards.
 */
#ifndef MS_PIPELINE_IMPL_H
#define MS_PIPELINE_IMPL_H

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
/* The model card text (README.md) for plan written to a directory named title. */
char *ms_outdir_card(const struct ms_plan *plan, const char *title);

#endif
