/*
 * pipeline_impl.h - private to pipeline/: the output directory around the shards.
 */
#ifndef MS_PIPELINE_IMPL_H
#define MS_PIPELINE_IMPL_H

#include "ms_engine.h"

/* Creates opts->out (and parents) if needed; fails if it is not a writable directory. */
int ms_outdir_prepare(const struct ms_plan *plan, const struct ms_engine_opts *opts);
/*
 * After every shard is complete: the index (more than one shard), config.json,
 * README.md and mergekit_config.yml (write_card), the donor's tokenizer files
 * (copy_tokenizer), each written atomically, then the directory is synced.
 * The order follows mergekit-spec.md 4.5. With `out` (tar or pipe output) the
 * files go through it instead of into a directory, and ms_out_finish ends it.
 */
int ms_outdir_finish(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                     struct ms_out *out);
/* The model card text (README.md) for plan written to a directory named title. */
char *ms_outdir_card(const struct ms_plan *plan, const char *title);

#endif
