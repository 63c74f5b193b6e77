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

struct th_tok {
    const char *text;
    long id;
    bool added;    /* listed in added_tokens (and added_tokens_decoder) */
    bool special;  /* an added token's `special` */
    bool in_vocab; /* also in model.vocab (HF keeps <s> in both); plain tokens
                                     are always in model.vocab */
};

/*
 * Writes dir/tokenizer.json (model type BPE, or `type` when not NULL: "Unigram" writes
 * a list-form vocab), dir/tokenizer_config.json and dir/special_tokens_map.json
 * (bos "<s>", eos "</s>") for the n tokens; merges "x y" for every plain two-character
 * token whose characters are both tokens. Returns 0 or -1.
 */
int th_tok_write(const char *dir, const struct th_tok *t, size_t n, const char *type);

#endif
