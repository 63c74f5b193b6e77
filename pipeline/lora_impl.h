/*
 * lora_impl.h - private to pipeline/: a PEFT LoRA adapter opened for the plan
 * (pipeline/lora.c; the fold itself is ms_lora.h).
 */
#ifndef MS_LORA_IMPL_H
#define MS_LORA_IMPL_H

#include <stddef.h>

#include "ms_lora.h"
#include "ms_safetensors.h"

struct ms_lora_adapter;

/*
 * Opens the adapter directory `dir` (adapter_config.json and
 * adapter_model.safetensors) for model m and builds a fold for every module it
 * holds, checking each against m's weight: names, ranks and shapes. `ref` names
 * the reference in messages. D is `dtype` (--lora-merge-dtype) when not
 * MS_DT_NONE, else config.json's dtype/torch_dtype (config_json may be NULL), else
 * each tensor's own dtype. Returns 0, or MS_EMODEL / MS_EUNSUPPORTED / an I/O
 * code with a one-line diagnostic naming the file and tensor. Main thread.
 */
int ms__lora_open(const char *dir, const char *ref, const struct ms_model *m,
                  const char *config_json, enum ms_dtype dtype, struct ms_lora_adapter **out);
void ms__lora_free(struct ms_lora_adapter *l);

/* The fold for model tensor w (a module's weight, or only the change to D), or
 * NULL when w is read unchanged. Owned by l. */
const struct ms_lora_fold *ms__lora_find(const struct ms_lora_adapter *l,
                                         const struct ms_st_tensor *w);

/* --lora-merge-cache (pipeline/lora_cache.c): the folder of ref's folded model under
 * cache, named as mergekit names it (ms_free; NULL when out of memory), and whether
 * it is complete and was made with --lora-merge-dtype d (MS_DT_NONE: none given). */
struct ms_modelref;
char *ms__lora_cache_path(const char *cache, const struct ms_modelref *ref);
bool ms__lora_cache_ready(const char *path, enum ms_dtype d);

/* Adds to h what makes the adapter's folds (for the --resume fingerprint): its two files'
 * paths, sizes and modification times, and D. Returns 0 or -errno naming the file. */
struct ms_xxh64;
int ms__lora_fingerprint(const struct ms_lora_adapter *l, struct ms_xxh64 *h);

/* One line for `plan`: "adapter DIR: N modules, r R, alpha A, scale S[, rsLoRA][, dtype D]". */
int ms__lora_describe(const struct ms_lora_adapter *l, char *buf, size_t len);

#endif
