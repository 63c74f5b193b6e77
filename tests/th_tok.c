/*
 * th_tok.c - tokenizer files for tests, written with jansson, and the reference for
 * merged embedding rows (th_tok.h).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_safetensors.h"
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

/* ------------------------------------------------------------------ reference rows */

long th_ref_id(const struct th_refmodel *m, const char *text)
{
    for (size_t i = 0; i < m->n; i++)
        if (!strcmp(m->text[i], text))
            return m->id[i];
    return -1;
}

static float rnd(bool bf16, float v) { return bf16 ? ms_round_bf16_1(v) : v; }

float *th_ref_rows(const struct th_refmodel *models, int nm, int k, int base,
                   const char *const *vocab, long nvocab, long rows, long hidden, float *const *x,
                   const struct th_ovr *ov, size_t nov, bool bf16)
{
    float *e = calloc((size_t)(rows * hidden), sizeof *e);
    long *id = calloc((size_t)nm, sizeof *id);
    cr_assert(e && id);
    for (long r = 0; r < nvocab; r++) {
        const struct th_ovr *o = NULL;
        for (size_t i = 0; i < nov; i++)
            if (!strcmp(ov[i].token, vocab[r]))
                o = &ov[i];
        int present = 0, only = -1;
        for (int m = 0; m < nm; m++) {
            id[m] = th_ref_id(&models[m], vocab[r]);
            if (id[m] >= 0) {
                present++;
                only = m;
            }
        }
        float *d = e + r * hidden;
        size_t row_bytes = (size_t)hidden * sizeof *d;
        if (id[k] >= 0 && !(o && o->force)) {
            memcpy(d, x[k] + id[k] * hidden, row_bytes);
        } else if (o && o->kind == 0) {
            memcpy(d, x[o->model] + id[o->model] * hidden, row_bytes);
        } else if (o && o->kind == 1) {
            memcpy(d, x[o->model] + o->src_id * hidden, row_bytes);
        } else if (o || present == 0) {
            /* zero */
        } else if (present == 1) {
            memcpy(d, x[only] + id[only] * hidden, row_bytes);
        } else if (id[base] >= 0) {
            memcpy(d, x[base] + id[base] * hidden, row_bytes);
        } else {
            for (long c = 0; c < hidden; c++) {
                float s = 0.0f;
                for (int m = 0; m < nm; m++)
                    if (id[m] >= 0)
                        s = rnd(bf16, s + x[m][id[m] * hidden + c]);
                d[c] = rnd(bf16, s / (float)present);
            }
        }
    }
    for (long r = nvocab; r < rows; r++) /* padding: the mean of the real rows */
        for (long c = 0; c < hidden; c++) {
            double s = 0;
            for (long q = 0; q < nvocab; q++)
                s += e[q * hidden + c];
            e[r * hidden + c] = rnd(bf16, (float)(s / (double)nvocab));
        }
    free(id);
    return e;
}

/* ------------------------------------------------------------------ reads */

float *th_read_rows(const char *dir, const char *sub, const char *name, long hidden, long *rows)
{
    char *p = th_path(dir, sub);
    struct ms_model *m = NULL;
    cr_assert_eq(ms_model_open(p, &m), 0, "open %s: %s", p, ms_errmsg());
    free(p);
    uint32_t shard;
    const struct ms_st_tensor *t = ms_model_find(m, name, &shard);
    cr_assert(t, "%s: tensor %s missing", sub, name);
    cr_assert_eq(t->ndim, 2);
    cr_assert_eq(t->shape[1], hidden);
    *rows = (long)t->shape[0];
    size_t bytes = t->end - t->begin;
    unsigned char *raw = malloc(bytes + 1);
    float *x = malloc(t->numel * sizeof *x + 1);
    FILE *f = fopen(m->shards[shard]->path, "rb");
    cr_assert(f && raw && x);
    cr_assert_eq(fseek(f, (long)(m->shards[shard]->data_start + t->begin), SEEK_SET), 0);
    cr_assert_eq(fread(raw, 1, bytes, f), bytes);
    fclose(f);
    ms_dtype_decode(t->dtype, raw, x, t->numel);
    free(raw);
    ms_model_free(m);
    return x;
}

json_t *th_load_json(const char *dir, const char *sub, const char *name)
{
    char *d = th_path(dir, sub), *p = th_path(d, name);
    json_error_t je;
    json_t *v = json_load_file(p, 0, &je);
    cr_assert(v, "%s: %s", p, je.text);
    free(d);
    free(p);
    return v;
}

void th_expect_merge_error(const char *dir, const char *recipe, const char *want)
{
    char *p = th_path(dir, "bad.yml");
    cr_assert_eq(th_write(p, recipe, strlen(recipe)), 0);
    free(p);
    char *out = NULL, *err = NULL;
    int rc = th_run_in(dir, &out, &err, "mergestream merge bad.yml badout -q");
    cr_assert_neq(rc, 0, "should fail: %s", recipe);
    cr_assert(err && strstr(err, want), "stderr lacks '%s': %s", want, err);
    cr_assert(err && strchr(err, '\n') == err + strlen(err) - 1, "not one line: %s", err);
    char *bo = th_path(dir, "badout");
    cr_assert(access(bo, F_OK) != 0, "badout was created");
    free(bo);
    free(out);
    free(err);
}
