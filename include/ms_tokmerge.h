/*
 * ms_tokmerge.h - tokenizer merging (pipeline/tokenizer.c): mergekit's
 * `tokenizer_source: base | union | <model>` and `tokenizer: {source, tokens,
 * pad_to_multiple_of}` (mergekit-spec.md 1.8, 3.4; mergekit's tokenizer/build.py, embed.py).
 *
 * At plan time (headers and tokenizer files only, no tensor data) the output
 * vocabulary is built from the models' tokenizer.json files, and for every
 * plan model a row map: output token id -> the model's row, or -1 when the
 * model lacks the token. Every vocabulary-sized tensor (embed_tokens, lm_head)
 * then reads, per output row, each model's row through that map (the engine
 * coalesces runs of consecutive rows into one read), and rows a model lacks
 * are filled by ms_tokmerge_fill from the other models' rows of the same
 * output row (chunk-local). Padding rows (pad_to_multiple_of) hold the mean
 * of the model's real rows, and `{kind: model_token}` rows are single rows read
 * once: both are read by ms_tokmerge_prepare before the merge starts.
 *
 * Supported tokenizers: tokenizer.json with a BPE or WordLevel model (a
 * `model.vocab` object), and, for a model without tokenizer.json, tokenizer.model
 * (SentencePiece, read with libsentencepiece through ms_spm.h) with the vocabulary
 * transformers converts from it: every piece under its id, control and
 * user-defined pieces as added tokens, plus tokenizer_config.json's
 * added_tokens_decoder. Another tokenizer.json model type (Unigram), a base
 * tokenizer.model with pieces past config.json's vocab_size (stripping it would
 * need a converted tokenizer.json), added tokens whose ids transformers would
 * move and special tokens that are neither pieces nor added tokens are refused
 * (MS_EUNSUPPORTED naming the file).
 *
 * Ownership: the plan owns its ms_tokmerge (plan->tok), which owns the row maps
 * (ms_plan_input.rowmap) and the per-job states (ms_job.tok). Memory outside
 * --max-memory: 8 bytes per row per model and about 40 bytes per token; one
 * parsed tokenizer.json at a time while building and while writing the files.
 */
#ifndef MS_TOKMERGE_H
#define MS_TOKMERGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "ms_recipe.h"

struct ms_plan;
struct ms_job;
struct ms_tokmerge;

/* What the engine needs for one vocabulary-sized job (owned by the plan's ms_tokmerge). */
struct ms_tokrows {
    const struct ms_tokmerge *tm;
    uint64_t nvocab;  /* output tokens (rows 0..nvocab-1) */
    uint64_t nrows;   /* rows of the output tensor: nvocab padded up */
    uint64_t row_len; /* elements per row */
    float *pad[32];   /* per job input (MS_MAX_INPUTS): its padding row (row_len floats),
                         set by ms_tokmerge_prepare; NULL when nrows == nvocab */
    float *fixed;     /* per `tokens:` entry k: its model_token row at fixed + k*row_len,
                         set by ms_tokmerge_prepare (loop thread, before the pool) */
};

/*
 * Builds the merged vocabulary and the row maps for the plan's models
 * (plan->models[*].model opened, config_json read; refs[i] is model i's first
 * reference in the recipe, for matching the recipe's token sources). Returns 0
 * and *out (NULL when the recipe asks for no tokenizer merge), or a negative
 * code with a one-line diagnostic naming the model and file or the recipe key:
 * MS_EMODEL (missing or malformed tokenizer.json, a file libsentencepiece rejects),
 * MS_EUNSUPPORTED (the cases above), MS_EPLAN (a token source naming
 * a model not in the merge, or a token the model lacks). Plan thread.
 */
int ms_tokmerge_build(const struct ms_plan *plan, const struct ms_modelref *const *refs,
                      struct ms_tokmerge **out);
void ms_tokmerge_free(struct ms_tokmerge *tm);

/* Rows of every vocabulary-sized tensor (the vocabulary padded up), and tokens in it. */
uint64_t ms_tokmerge_rows(const struct ms_tokmerge *tm);
uint64_t ms_tokmerge_vocab(const struct ms_tokmerge *tm);
/* For plan model m: per output row, the model's row or -1 (ms_tokmerge_rows entries). */
const int64_t *ms_tokmerge_rowmap(const struct ms_tokmerge *tm, size_t m);
/* The largest row model m's map refers to, or -1 when none. */
int64_t ms_tokmerge_max_row(const struct ms_tokmerge *tm, size_t m);

/*
 * Plan time, for a vocabulary-sized job whose inputs are set (shape [nrows,
 * row_len]): checks that every token source the recipe names is one of the
 * job's inputs and that model has the token, and returns the job's row state
 * (owned by tm). NULL with a diagnostic (MS_EPLAN, MS_ENOMEM) on failure.
 */
struct ms_tokrows *ms_tokmerge_job(struct ms_tokmerge *tm, const struct ms_job *job);

/*
 * Before the merge: reads every `model_token` row and, when the vocabulary is
 * padded, computes each input's mean row over the real rows (a reduce pass in
 * blocks of rows of at most about mem_bytes/2 bytes, summed in row order in
 * double precision: the same bytes for any budget). Synchronous; loop thread
 * before the engine's pool exists. 0 or an error naming the file.
 */
int ms_tokmerge_prepare(const struct ms_plan *plan, uint64_t mem_bytes);

/*
 * Fills the rows of chunk rows [row0, row0 + nrows) of job j that the row maps
 * leave to defaults, in every input buffer in[i] (row k at in[i] + k*row_len,
 * decoded to float and rounded to the input's load dtype; rows a map gives are
 * already there): mergekit's rules in order: the `tokens:` entry (model row,
 * model_token row, zero; `force` replaces existing rows too); the one model
 * having the token; the base model's row; the mean of the models having it
 * (summed one by one in the load dtype, then divided); zero when none has it.
 * Padding rows get the input's pad row. Pure; any thread.
 */
void ms_tokmerge_fill(const struct ms_job *j, uint64_t row0, uint64_t nrows, float *const *in);

/*
 * Output files, as transformers' save_pretrained writes them: tokenizer.json
 * (the origin tokenizer's JSON with model.vocab stripped and added_tokens the
 * merged list), tokenizer_config.json (the origin's with added_tokens_decoder
 * rebuilt) and special_tokens_map.json (the origin's, or NULL when it has
 * none). tokenizer.json comes as text (ms_free; what ms__json_render writes of
 * the whole tree, without a final newline), built without a tree of the added
 * tokens: 0 or an error naming the file; not called when ms_tokmerge_spm_dir
 * names a tokenizer.model to copy instead. The others are each a new reference
 * (json_decref) or NULL without memory. The config object is built whole and
 * returned before it is written, so a later step (chat_template) can patch it.
 */
int ms_tokmerge_tokenizer_json_text(const struct ms_tokmerge *tm, char **text, size_t *len);
/*
 * When the origin has only tokenizer.model: its folder, whose tokenizer.model the output
 * gets verbatim in place of a tokenizer.json (transformers' save_pretrained of the
 * converted tokenizer would write a tokenizer.json we cannot reproduce faithfully; the
 * loaders convert tokenizer.model again and add tokenizer_config.json's
 * added_tokens_decoder, which gives the same vocabulary). NULL otherwise.
 */
const char *ms_tokmerge_spm_dir(const struct ms_tokmerge *tm);
json_t *ms_tokmerge_tokenizer_config(const struct ms_tokmerge *tm);
json_t *ms_tokmerge_special_map(const struct ms_tokmerge *tm);

#endif
