/*
 * ms_plan.h - the merge plan: recipe + model headers -> every output tensor with
 * its inputs, method, resolved parameters, dtypes and place in the output shards.
 *
 * Building a plan reads config.json files and safetensors headers only, never
 * tensor data. Every check that can be made without data is made here, and a
 * failing build reports all problems (one line each), not just the first.
 * The plan is immutable after ms_plan_build and owns everything it points to.
 */
#ifndef MS_PLAN_H
#define MS_PLAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ms_lora.h"
#include "ms_recipe.h"
#include "ms_safetensors.h"
#include "ms_stage.h"

struct ms_plan_model {
    char *ref;                    /* the reference as written in the recipe */
    char *path;                   /* resolved local directory */
    struct ms_model *model;       /* opened headers */
    char *config_json;            /* config.json text, or NULL if absent */
    uint64_t num_layers;          /* from config.json (num_hidden_layers or similar); 0 unknown */
    char *lora_path;              /* `model+lora`: the adapter's resolved directory, else NULL */
    struct ms_lora_adapter *lora; /* its opened adapter (pipeline/lora.c), else NULL */
    char *lora_cache;             /* --lora-merge-cache folder still to write, else NULL */
    bool lora_cached;             /* read from its complete --lora-merge-cache folder (path) */
};

/* One input of an output tensor: where its bytes are. */
struct ms_plan_input {
    uint32_t model;               /* index into plan->models */
    const char *name;             /* input tensor name (borrowed from the model) */
    const char *file;             /* shard path (borrowed from the model) */
    uint32_t shard;
    enum ms_dtype dtype;          /* stored dtype */
    enum ms_dtype load;           /* dtype the decoded value is rounded to first: the recipe's
                                     dtype: for float tensors, else the stored dtype (then the
                                     engine rounds to s.compute); equals dtype for copy jobs */
    uint64_t file_offset;         /* absolute file offset of element 0 */
    uint64_t numel;               /* elements stored (may exceed the job's when rows are cut) */
    /* LoRA reference: folded into the decoded values before anything else (ms_lora.h), or
     * NULL. Owned by the plan. With it, `dtype` above is still the stored one, and the
     * dtype rules (load, copy) see lora->dtype instead. */
    const struct ms_lora_fold *lora;
    const int64_t *rowmap;        /* tokenizer merging (ms_tokmerge.h), vocabulary-sized jobs:
                                     per output row, the row of this input to read, or -1 (a
                                     default row, filled by ms_tokmerge_fill); NULL: plain */
};

struct ms_job {
    struct ms_stage_job s;        /* what the stage sees; s.name == name, s.shape == shape */
    char *name;                   /* output tensor name */
    char *label;                  /* mergekit's scheduling label (6.2): save-order key */
    uint32_t ndim;
    int64_t shape[MS_MAX_DIMS];
    enum ms_dtype out_dtype;      /* stored dtype of the result */
    enum ms_dtype result;         /* dtype of the method's result before out_dtype (mergekit
                                     casts to it, then to out_dtype): when it differs from
                                     out_dtype the engine rounds to it before encoding */
    uint64_t out_bytes;
    uint32_t shard;               /* output shard index */
    uint64_t out_offset;          /* absolute offset in the output shard file */
    bool copy;                    /* raw byte copy of in[0] (passthrough of a non-float, or
                                     a single input whose dtype equals out_dtype and compute) */
    struct ms_plan_input *in;     /* s.ninputs entries, recipe order; owned by the plan */
    struct ms_tokrows *tok;       /* vocabulary-sized job of a tokenizer merge (rows gathered
                                     through in[].rowmap, chunks row-aligned), or NULL; owned
                                     by plan->tok */
};

struct ms_plan_opts {
    uint64_t out_shard_size;      /* bytes; 0 = no splitting; default 5,000,000,000 */
    uint64_t seed;                /* --random-seed */
    bool allow_crimes;
    bool strict;                  /* a parameter name the method does not declare is an error
                                     (otherwise a warning; mergekit ignores it) */
    enum ms_dtype lora_dtype;     /* --lora-merge-dtype when a compute dtype (F32, F16, BF16);
                                     anything else (a zeroed struct) means the model's own */
    const char *lora_cache;       /* --lora-merge-cache DIR, or NULL: a complete folded copy
                                     there is read instead of folding; else the plan model's
                                     lora_cache names the folder to write */
};

struct ms_plan {
    const struct ms_recipe *recipe; /* borrowed; must outlive the plan */
    const struct ms_method *method;
    size_t nmodels;
    struct ms_plan_model *models;
    size_t base;                  /* index into models of base_model, or SIZE_MAX */
    size_t donor;                 /* model whose config.json and tokenizer are copied */
    size_t njobs;
    struct ms_job *jobs;          /* in processing order: shard by shard, file offset order */
    struct ms_layout *layout;     /* output shards; layout->tensors[i] is jobs' save order */
    char *out_config_json;        /* config.json for the output (patched donor text), or NULL */
    uint64_t bytes_read;          /* input bytes one pass reads */
    uint64_t bytes_written;       /* output file bytes (headers included) */
    char *arch;                   /* architecture used (config.json class name) */
    uint64_t out_layers;          /* layers of the output model */
    size_t ndropped;              /* input tensors the architecture does not list (dropped) */
    enum ms_dtype dtype;          /* recipe dtype:, or MS_DT_NONE */
    enum ms_dtype out_dtype;      /* recipe out_dtype:, or MS_DT_NONE */
    struct ms_tokmerge *tok;      /* tokenizer merge (ms_tokmerge.h), or NULL */
};

/*
 * Builds the plan. Returns 0, or MS_EPLAN (or MS_ERECIPE, MS_EUNSUPPORTED, a
 * model error) after printing every problem found to stderr, one line each,
 * with the recipe's file:line:col where one applies; ms_errmsg() holds the first.
 */
int ms_plan_build(const struct ms_recipe *r, const struct ms_plan_opts *opts,
                  struct ms_plan **out);
void ms_plan_free(struct ms_plan *p);

/*
 * Resolves a model reference: an http(s) URL as it is; hf://org/name (revision:
 * main unless given) to "ENDPOINT/org/name/resolve/REVISION" (ms_http_hf_endpoint),
 * read remotely; otherwise to a local directory: an existing path, else a
 * hub id "org/name" found in the Hugging Face cache ($HF_HUB_CACHE, else
 * $HF_HOME/hub, else ~/.cache/huggingface/hub; snapshot of refs/main or of the
 * revision). *out is owned by the caller (ms_free).
 */
int ms_model_resolve(const char *ref, const char *revision, char **out);

/*
 * --lora-merge-cache: writes the folded model of every plan model with a
 * lora_cache folder (pipeline/lora_cache.c), `lora_dtype` being the plan's
 * opts.lora_dtype. Reads each such model once and writes a normal model
 * directory (temporaries renamed when complete; a marker file last). Blocking,
 * main thread. Returns 0 or an error naming the file.
 */
int ms_plan_lora_cache_fill(const struct ms_plan *p, enum ms_dtype lora_dtype);

/* Writes the human-readable summary (`mergestream plan`) or the JSON plan (--json). */
int ms_plan_print(const struct ms_plan *p, uint64_t max_memory, bool json, FILE *f);

#endif
