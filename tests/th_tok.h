/*
 * th_tok.h - small Hugging Face tokenizer files for the tokenizer-merge tests
 * (tests/th_tok.c): a BPE tokenizer.json, tokenizer_config.json and
 * special_tokens_map.json written from a token list, as the tokenizers and
 * transformers libraries save them.
 */
#ifndef MS_TH_TOK_H
#define MS_TH_TOK_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

struct th_tok {
    const char *text;
    long id;
    bool added;    /* listed in added_tokens (and added_tokens_decoder) */
    bool special;  /* an added token's `special` */
    bool in_vocab; /* also in model.vocab (HF keeps <s> in both); plain tokens
                                     are always in model.vocab */
};

/* A plain token (in model.vocab only). */
#define TH_TOK_PLAIN(t, i)                                                                         \
    {                                                                                              \
        t, i, false, false, false                                                                  \
    }

/*
 * Writes dir/tokenizer.json (model type BPE, or `type` when not NULL: "Unigram" writes
 * a list-form vocab), dir/tokenizer_config.json and dir/special_tokens_map.json
 * (bos "<s>", eos "</s>") for the n tokens; merges "x y" for every plain two-character
 * token whose characters are both tokens. Returns 0 or -1.
 */
int th_tok_write(const char *dir, const struct th_tok *t, size_t n, const char *type);

/* ---- the reference for merged embedding rows (mergekit's embed.py), and file reads */

/* One model of a merge: its folder and its tokens below its vocab_size (text -> row). */
struct th_refmodel {
    const char *name;
    size_t n;
    const char *const *text;
    const long *id;
};

/* A `tokens:` entry. */
struct th_ovr {
    const char *token;
    int kind; /* 0 a model's row of the token, 1 model_token (src_id), 2 zero */
    int model;
    long src_id;
    bool force;
};

/* Model m's row of text, or -1. */
long th_ref_id(const struct th_refmodel *m, const char *text);

/*
 * mergekit embed.py's permuted matrix for model k of the nm models (rows of `vocab`,
 * padded to `rows` with the mean of the real rows): its own row where it has the token
 * (unless a forced entry), else the entry's source, else the one model having it, else
 * the base's row, else the mean of the models having it (rounded to bfloat16 after each
 * step when bf16), else zero. x[m] is model m's [*, hidden] matrix. calloc'd.
 */
float *th_ref_rows(const struct th_refmodel *models, int nm, int k, int base,
                   const char *const *vocab, long nvocab, long rows, long hidden, float *const *x,
                   const struct th_ovr *ov, size_t nov, bool bf16);

/* Tensor `name` ([rows, hidden]) of the model in dir/sub as floats (malloc'd); rows in
 * *rows. Asserts on failure. */
float *th_read_rows(const char *dir, const char *sub, const char *name, long hidden, long *rows);

/* dir/sub/name parsed (asserts that it is JSON). */
json_t *th_load_json(const char *dir, const char *sub, const char *name);

/* Writes `recipe` to dir/bad.yml and runs `mergestream merge bad.yml badout -q` in dir:
 * asserts a non-zero exit, one line on stderr containing want, and no badout. */
void th_expect_merge_error(const char *dir, const char *recipe, const char *want);

#endif
