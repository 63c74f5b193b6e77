/*
 * th_tok.c - tokenizer files for tests (th_tok.h), written with jansson.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "th.h"
#include "th_tok.h"

static int dump(const char *dir, const char *name, json_t *v)
{
    char *p = th_path(dir, name);
    int rc = json_dump_file(v, p, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    free(p);
    json_decref(v);
    return rc ? -1 : 0;
}

int th_tok_write(const char *dir, const struct th_tok *t, size_t n, const char *type)
{
    bool unigram = type && !strcmp(type, "Unigram");
    json_t *added = json_array(), *vocab = unigram ? json_array() : json_object();
    json_t *merges = json_array(), *dec = json_object();
    for (size_t i = 0; i < n; i++) {
        if (t[i].added) {
            json_array_append_new(
                added, json_pack("{s:I,s:s,s:b,s:b,s:b,s:b,s:b}", "id", (json_int_t)t[i].id,
                                 "content", t[i].text, "single_word", 0, "lstrip", 0, "rstrip", 0,
                                 "normalized", !t[i].special, "special", t[i].special));
            char id[32];
            snprintf(id, sizeof id, "%ld", t[i].id);
            json_object_set_new(dec, id,
                                json_pack("{s:s,s:b,s:b,s:b,s:b,s:b}", "content", t[i].text,
                                          "lstrip", 0, "normalized", !t[i].special, "rstrip", 0,
                                          "single_word", 0, "special", t[i].special));
        }
        if (t[i].added && !t[i].in_vocab)
            continue;
        if (unigram)
            json_array_append_new(vocab, json_pack("[s,f]", t[i].text, -1.0 - (double)i));
        else
            json_object_set_new(vocab, t[i].text, json_integer(t[i].id));
        if (!t[i].added && strlen(t[i].text) == 2) {
            char a[2] = { t[i].text[0], 0 }, b[2] = { t[i].text[1], 0 };
            bool ha = false, hb = false;
            for (size_t j = 0; j < n; j++) {
                ha |= !strcmp(t[j].text, a);
                hb |= !strcmp(t[j].text, b);
            }
            if (ha && hb)
                json_array_append_new(merges, json_pack("s++", a, " ", b));
        }
    }
    json_t *model = unigram ? json_pack("{s:s,s:o}", "type", "Unigram", "vocab", vocab)
                            : json_pack("{s:s,s:n,s:n,s:b,s:b,s:o,s:o}", "type",
                                        type ? type : "BPE", "dropout", "unk_token", "fuse_unk", 0,
                                        "byte_fallback", 0, "vocab", vocab, "merges", merges);
    if (unigram)
        json_decref(merges);
    json_t *tj =
        json_pack("{s:s,s:n,s:n,s:o,s:n,s:{s:s,s:b},s:n,s:n,s:o}", "version", "1.0", "truncation",
                  "padding", "added_tokens", added, "normalizer", "pre_tokenizer", "type",
                  "ByteLevel", "add_prefix_space", 0, "post_processor", "decoder", "model", model);
    json_t *tc = json_pack("{s:b,s:o,s:s,s:s,s:I,s:s}", "add_bos_token", 1, "added_tokens_decoder",
                           dec, "bos_token", "<s>", "eos_token", "</s>", "model_max_length",
                           (json_int_t)2048, "tokenizer_class", "PreTrainedTokenizerFast");
    json_t *stm = json_pack("{s:s,s:s}", "bos_token", "<s>", "eos_token", "</s>");
    if (!tj || !tc || !stm)
        return -1;
    if (dump(dir, "tokenizer.json", tj) || dump(dir, "tokenizer_config.json", tc) ||
        dump(dir, "special_tokens_map.json", stm))
        return -1;
    return 0;
}
