/*
 * tokenizer.c - tokenizer merging (ms_tokmerge.h): the merged vocabulary, the
 * per-model row maps, the default rows, and the output tokenizer files.
 *
 * mergekit's rules (mergekit/tokenizer/build.py, embed.py), with its hash-order
 * choices replaced by a fixed order (mergekit-spec.md section 7): models in
 * recipe order, each model's tokens in id order.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_plan.h"
#include "ms_spm.h"
#include "ms_str.h"
#include "ms_tokmerge.h"
#include "ms_zsrc.h"
#include "plan_impl.h"

/*
 * A vocabulary: text -> id, open addressing, texts in an arena. A jansson object
 * costs about 160 bytes a token; this about 40, which keeps a tokenizer merge of
 * 150k-token vocabularies within the --max-memory allowance.
 */
struct vent {
    const char *text; /* in the arena; NULL: empty slot */
    int64_t id;       /* -1: removed */
};
struct vchunk {
    struct vchunk *next;
    size_t used, cap;
    char mem[];
};
struct vocab {
    struct vent *slot;
    size_t cap, n; /* slots (a power of two), entries */
    struct vchunk *arena;
};

static uint64_t vhash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static struct vent *vocab_slot(const struct vocab *v, const char *text)
{
    if (!v->cap)
        return NULL;
    for (size_t i = (size_t)vhash(text) & (v->cap - 1);; i = (i + 1) & (v->cap - 1))
        if (!v->slot[i].text || !strcmp(v->slot[i].text, text))
            return &v->slot[i];
}

/* The id of text, or -1. */
static int64_t vocab_get(const struct vocab *v, const char *text)
{
    const struct vent *e = vocab_slot(v, text);
    return e && e->text ? e->id : -1;
}

static char *arena_dup(struct vocab *v, const char *text)
{
    size_t len = strlen(text) + 1;
    if (!v->arena || v->arena->cap - v->arena->used < len) {
        size_t cap = MS_MAX(len, (size_t)64 << 10);
        struct vchunk *c = ms_malloc(sizeof *c + cap);
        if (!c)
            return NULL;
        c->next = v->arena;
        c->used = 0;
        c->cap = cap;
        v->arena = c;
    }
    char *d = v->arena->mem + v->arena->used;
    memcpy(d, text, len);
    v->arena->used += len;
    return d;
}

/* Sets text's id (a copy of text is kept); *stored, when given, is that copy. */
static int vocab_put(struct vocab *v, const char *text, int64_t id, const char **stored)
{
    if (2 * (v->n + 1) > v->cap) {
        size_t cap = v->cap ? 2 * v->cap : 64;
        struct vent *old = v->slot, *ns = ms_calloc(cap, sizeof *ns);
        if (!ns)
            return ms_error(MS_ENOMEM, "out of memory");
        size_t ocap = v->cap;
        v->slot = ns;
        v->cap = cap;
        for (size_t i = 0; i < ocap; i++)
            if (old[i].text)
                *vocab_slot(v, old[i].text) = old[i];
        ms_free(old);
    }
    struct vent *e = vocab_slot(v, text);
    if (!e->text) {
        if (!(e->text = arena_dup(v, text)))
            return ms_error(MS_ENOMEM, "out of memory");
        v->n++;
    }
    e->id = id;
    if (stored)
        *stored = e->text;
    return 0;
}

static void vocab_fini(struct vocab *v)
{
    ms_free(v->slot);
    for (struct vchunk *c = v->arena, *n; c; c = n) {
        n = c->next;
        ms_free(c);
    }
    memset(v, 0, sizeof *v);
}

_Static_assert(MS_ARRAY_LEN(((struct ms_tokrows *)0)->pad) == MS_MAX_INPUTS,
               "struct ms_tokrows holds one padding row per possible input");

/* One model's tokenizer as loaded (mergekit's get_vocab and added_tokens_decoder). */
struct tokmodel {
    json_t *tj;         /* tokenizer.json root, or NULL once not needed (owned) */
    json_t *tc;         /* tokenizer_config.json root, or NULL (owned) */
    json_t *stm;        /* special_tokens_map.json root, or NULL (owned) */
    json_t *added;      /* tokenizer.json's added_tokens list (own reference) */
    struct vocab vocab; /* get_vocab(): model.vocab plus added tokens; id -1 removed */
    int64_t vs;         /* config vocab_size, else the number of tokens */
    bool spm;           /* read from tokenizer.model (no tokenizer.json) */
};

/* One output token. */
struct outtok {
    const char *text; /* owned by ms_tokmerge.out_ids; NULL: a hole in the ids */
    json_t *added;    /* an added token's settings (own reference; content is
                                     text), or NULL for a plain vocabulary token */
};

struct ms_tokmerge {
    const struct ms_recipe *r;
    size_t nmodels;
    struct tokmodel *tm; /* per plan model; the base's is stripped */
    size_t base;         /* plan model serving as mergekit's base tokenizer */
    bool has_src;        /* tokenizer source is a named model: src is loaded */
    struct tokmodel src; /* that model's tokenizer, as is */
    uint64_t nvocab, nrows;
    struct outtok *tok;   /* nvocab entries, by id (text NULL: a hole in the ids) */
    struct vocab out_ids; /* text -> id of the output vocabulary (owns tok[].text) */
    json_t *normal;       /* the settings of a token added by add_tokens(str) */
    char *odir, *oref;    /* the output files' origin: its folder and reference */
    bool ospm;            /* the origin has only tokenizer.model, copied as is */
    int64_t ovs;          /* its vocab_size, when ostrip */
    bool ostrip;          /* its tokenizer.json is stripped (the base's) */
    int64_t **rowmap;     /* per plan model: nrows entries */
    int64_t *maxrow;
    const struct ms_tokcfg *cfg; /* the recipe's tokenizer block, or NULL */
    int32_t *ov;                 /* per output row: index into cfg->tokens, or -1 */
    size_t *ov_model;            /* per cfg token: plan model of its source, or SIZE_MAX */
    int64_t *ov_row;             /* per cfg token: model_token's source row, or -1 */
    size_t njobs;
    struct ms_tokrows *jobs[4]; /* the vocabulary-sized jobs' states */
};

/* ------------------------------------------------------------------ loading */

static const char *model_ref(const struct ms_plan *p, size_t m) { return p->models[m].ref; }

static bool is_file(const char *dir, const char *name)
{
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Loads dir/name as JSON; NULL and no error when absent and optional. */
static int json_file(const char *ref, const char *dir, const char *name, bool need, json_t **out)
{
    *out = NULL;
    if (!is_file(dir, name)) {
        if (!need)
            return 0;
        return ms_error(MS_EMODEL, "model '%s': %s/%s is missing (tokenizer merging needs it)", ref,
                        dir, name);
    }
    char *path = ms_asprintf("%s/%s", dir, name), *text = NULL;
    size_t len = 0;
    if (!path)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = ms_read_file(path, &text, &len);
    if (!rc) {
        json_error_t je;
        *out = json_loadb(text, len, 0, &je);
        if (!*out)
            rc = ms_error(MS_EMODEL, "%s:%d: malformed JSON: %s", path, je.line, je.text);
        else if (!json_is_object(*out))
            rc = ms_error(MS_EMODEL, "%s: not a JSON object", path);
    }
    ms_free(text);
    ms_free(path);
    return rc;
}

/* config.json's vocab_size (mergekit's get_vocab_size), or -1. */
static int64_t config_vocab(const char *config_json)
{
    int64_t v = -1;
    json_t *c = config_json ? json_loads(config_json, 0, NULL) : NULL;
    json_t *n = json_object_get(c, "vocab_size");
    if (!n)
        n = json_object_get(json_object_get(c, "text_config"), "vocab_size");
    if (json_is_integer(n) && json_integer_value(n) > 0)
        v = json_integer_value(n);
    json_decref(c);
    return v;
}

/* mergekit's get_stripped_tokenizer on a tokenizer.json tree: drops the tokens with
 * id >= vs from model.vocab, added_tokens and the BPE merges. */
static int tree_strip(const char *ref, json_t *tj, int64_t vs)
{
    json_t *model = json_object_get(tj, "model"), *mv = json_object_get(model, "vocab");
    json_t *added = json_object_get(tj, "added_tokens");
    json_t *unused = json_object();
    const char *k;
    json_t *v;
    void *tmp;
    size_t i;
    if (!unused)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = 0;
    json_object_foreach(mv, k, v) {
        if (json_integer_value(v) >= vs && json_object_set_new(unused, k, json_true()))
            rc = ms_error(MS_ENOMEM, "out of memory");
    }
    json_array_foreach(added, i, v) {
        const char *c = json_string_value(json_object_get(v, "content"));
        if (json_integer_value(json_object_get(v, "id")) >= vs && c &&
            json_object_set_new(unused, c, json_true()))
            rc = ms_error(MS_ENOMEM, "out of memory");
    }
    if (rc || !json_object_size(unused))
        goto out;
    json_object_foreach_safe(unused, tmp, k, v) {
        json_object_del(mv, k);
    }
    for (i = json_array_size(added); i-- > 0;)
        if (json_integer_value(json_object_get(json_array_get(added, i), "id")) >= vs)
            json_array_remove(added, i);
    json_t *merges = json_object_get(model, "merges");
    for (i = json_array_size(merges); i-- > 0;) {
        json_t *m = json_array_get(merges, i);
        bool drop = false;
        if (json_is_string(m)) {
            const char *s = json_string_value(m), *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                rc = ms_error(MS_EMODEL, "model '%s': tokenizer.json: unexpected merge '%s'", ref,
                              s);
                goto out;
            }
            char *a = ms_strndup(s, (size_t)(sp - s));
            if (!a) {
                rc = ms_error(MS_ENOMEM, "out of memory");
                goto out;
            }
            drop = json_object_get(unused, a) || json_object_get(unused, sp + 1);
            ms_free(a);
        } else if (json_is_array(m)) {
            size_t j;
            json_t *e;
            json_array_foreach(m, j, e) {
                drop |= json_is_string(e) && json_object_get(unused, json_string_value(e));
            }
        } else {
            rc = ms_error(MS_EMODEL, "model '%s': tokenizer.json: unexpected merge format", ref);
            goto out;
        }
        if (drop)
            json_array_remove(merges, i);
    }
out:
    json_decref(unused);
    return rc;
}

/* ------------------------------------------------------------------ SentencePiece */

/* An added token's settings as tokenizer.json lists them, for one with these flags. */
static json_t *added_entry(int64_t id, const char *text, bool normalized, bool special)
{
    return json_pack("{s:I,s:s,s:b,s:b,s:b,s:b,s:b}", "id", (json_int_t)id, "content", text,
                     "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", normalized,
                     "special", special);
}

/* A special token's text in tokenizer_config.json: a string or an AddedToken object. */
static const char *special_text(json_t *v)
{
    return json_is_string(v) ? json_string_value(v)
                             : json_string_value(json_object_get(v, "content"));
}

/* An added_tokens_decoder entry of tokenizer_config.json, ordered by id. */
struct decent {
    int64_t id;
    json_t *e;
};

static int decent_cmp(const void *a, const void *b)
{
    const struct decent *x = a, *y = b;
    return x->id < y->id ? -1 : x->id > y->id;
}

/*
 * A model with only tokenizer.model: get_vocab() and added_tokens_decoder of the tokenizer
 * transformers converts from it (mergekit loads every tokenizer with AutoTokenizer; in
 * transformers 5, SentencePieceExtractor): every piece under its own id (unknown, control
 * and byte pieces too, as the model spells them); the control and user-defined pieces as
 * added tokens (not normalized; control ones special); the unknown piece and the special
 * tokens tokenizer_config.json names as special added tokens; and its added_tokens_decoder
 * entries with their settings, those past the pieces at the next ids. What we could only
 * guess at (a token placed where transformers would move it, a special token that is no
 * piece and not in added_tokens_decoder) is refused naming the file. strip: the base's
 * (mergekit's get_stripped_tokenizer): added tokens past vocab_size are dropped, pieces
 * past it are refused (the stripped tokenizer would exist only as a converted
 * tokenizer.json, which we do not write).
 */
static int spm_load(const char *ref, const char *dir, const char *config_json, bool strip,
                    struct tokmodel *t)
{
    static const char *const named[] = { "bos_token", "eos_token", "unk_token", "sep_token",
                                         "pad_token", "cls_token", "mask_token" };
    char *path = ms_asprintf("%s/tokenizer.model", dir);
    char *cpath = ms_asprintf("%s/tokenizer_config.json", dir);
    struct ms_spm_vocab *sv = NULL;
    struct decent *de = NULL;
    json_t **by_id = NULL;
    size_t nde = 0, total = 0;
    int rc = path && cpath ? 0 : ms_error(MS_ENOMEM, "out of memory");
    if (!rc)
        rc = json_file(ref, dir, "tokenizer_config.json", false, &t->tc);
    if (!rc)
        rc = json_file(ref, dir, "special_tokens_map.json", false, &t->stm);
    if (!rc)
        rc = ms_spm_load(path, &sv);
    if (rc)
        goto out;
    t->spm = true;
    for (size_t i = 0; i < sv->n && !rc; i++)
        rc = vocab_put(&t->vocab, sv->piece[i], (int64_t)i, NULL);
    json_t *dec = json_object_get(t->tc, "added_tokens_decoder");
    if (!rc && dec && !json_is_object(dec))
        rc = ms_error(MS_EMODEL, "%s: added_tokens_decoder is not an object", cpath);
    if (!rc && !(de = ms_calloc(json_object_size(dec) + 1, sizeof *de)))
        rc = ms_error(MS_ENOMEM, "out of memory");
    const char *key;
    json_t *v;
    json_object_foreach(dec, key, v) {
        char *end;
        long long id = strtoll(key, &end, 10);
        if (rc)
            break;
        if (!*key || *end || id < 0 || !json_is_string(json_object_get(v, "content")))
            rc = ms_error(MS_EMODEL, "%s: added_tokens_decoder entry '%s' is not an id with a "
                          "content", cpath, key);
        de[nde++] = (struct decent){ id, v };
    }
    if (!rc)
        qsort(de, nde, sizeof *de, decent_cmp);
    total = sv->n;
    for (size_t k = 0; k < nde && !rc; k++) {
        const char *c = json_string_value(json_object_get(de[k].e, "content"));
        int64_t have = vocab_get(&t->vocab, c);
        if (k && de[k].id == de[k - 1].id)
            rc = ms_error(MS_EMODEL, "%s: added_tokens_decoder lists id %" PRId64 " twice", cpath,
                          de[k].id);
        else if ((uint64_t)de[k].id < sv->n && have != de[k].id)
            rc = ms_error(MS_EUNSUPPORTED,
                          "%s: added_tokens_decoder puts '%s' at id %" PRId64 ", where "
                          "tokenizer.model has '%s'",
                          cpath, c, de[k].id, sv->piece[de[k].id]);
        else if ((uint64_t)de[k].id >= sv->n && (have >= 0 || (uint64_t)de[k].id != total))
            rc = ms_error(MS_EUNSUPPORTED,
                          "%s: added_tokens_decoder puts '%s' at id %" PRId64 ", but "
                          "transformers would give it id %" PRId64 " after the %zu pieces of "
                          "tokenizer.model",
                          cpath, c, de[k].id, have >= 0 ? have : (int64_t)total, sv->n);
        else if ((uint64_t)de[k].id >= sv->n && !(rc = vocab_put(&t->vocab, c, de[k].id, NULL)))
            total++;
    }
    if (!rc && !(by_id = ms_calloc(total, sizeof *by_id)))
        rc = ms_error(MS_ENOMEM, "out of memory");
    for (size_t k = 0; k < nde && !rc; k++) {
        json_t *e = json_deep_copy(de[k].e);
        if (!e || json_object_set_new(e, "id", json_integer((json_int_t)de[k].id)))
            rc = ms_error(MS_ENOMEM, "out of memory");
        by_id[de[k].id] = e;
    }
    for (size_t i = 0; i < sv->n && !rc; i++) {
        unsigned char kd = sv->kind[i];
        if (by_id[i] || (kd != MS_SPM_CONTROL && kd != MS_SPM_USER && kd != MS_SPM_UNKNOWN))
            continue;
        if (!(by_id[i] = added_entry((int64_t)i, sv->piece[i], false, kd != MS_SPM_USER)))
            rc = ms_error(MS_ENOMEM, "out of memory");
    }
    json_t *extra = json_object_get(t->tc, "additional_special_tokens");
    size_t nextra = json_array_size(extra);
    for (size_t k = 0; k < MS_ARRAY_LEN(named) + nextra && !rc; k++) {
        json_t *sv_k = k < MS_ARRAY_LEN(named) ? json_object_get(t->tc, named[k])
                                               : json_array_get(extra, k - MS_ARRAY_LEN(named));
        const char *c = special_text(sv_k);
        if (!c)
            continue; /* unset (null) */
        int64_t id = vocab_get(&t->vocab, c);
        if (id < 0)
            rc = ms_error(MS_EUNSUPPORTED,
                          "%s: special token '%s' is neither a piece of tokenizer.model nor in "
                          "added_tokens_decoder (its id would depend on the transformers version)",
                          cpath, c);
        else if (!by_id[id] && !(by_id[id] = added_entry(id, c, false, true)))
            rc = ms_error(MS_ENOMEM, "out of memory");
    }
    t->vs = config_vocab(config_json);
    if (!rc && strip && t->vs >= 0 && sv->n > (uint64_t)t->vs)
        rc = ms_error(MS_EUNSUPPORTED,
                      "model '%s': %s has %zu pieces but config.json's vocab_size is %" PRId64
                      ": stripping pieces from a SentencePiece model is not supported",
                      ref, path, sv->n, t->vs);
    if (!rc && !(t->added = json_array()))
        rc = ms_error(MS_ENOMEM, "out of memory");
    for (size_t i = 0; i < total && !rc; i++) {
        if (!by_id[i])
            continue;
        if (strip && t->vs >= 0 && (int64_t)i >= t->vs) /* an added token past vocab_size */
            rc = vocab_put(&t->vocab, json_string_value(json_object_get(by_id[i], "content")), -1,
                           NULL);
        else if (json_array_append(t->added, by_id[i]))
            rc = ms_error(MS_ENOMEM, "out of memory");
    }
    if (!rc && t->vs < 0)
        t->vs = (int64_t)t->vocab.n;
out:
    for (size_t i = 0; by_id && i < total; i++)
        json_decref(by_id[i]);
    ms_free(by_id);
    ms_free(de);
    ms_spm_free(sv);
    ms_free(path);
    ms_free(cpath);
    return rc;
}

/* Loads the model's tokenizer; strip: mergekit's stripped tokenizer (the base's). The
 * tokenizer.json tree is dropped once read (it can be tens of MB): the output's origin
 * is read again when the files are written (origin_tree). */
static int tokmodel_load(const char *ref, const char *dir, const char *config_json, bool strip,
                         struct tokmodel *t)
{
    if (!is_file(dir, "tokenizer.json") && is_file(dir, "tokenizer.model"))
        return spm_load(ref, dir, config_json, strip, t);
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    int rc = json_file(ref, dir, "tokenizer.json", true, &t->tj);
    if (!rc)
        rc = json_file(ref, dir, "tokenizer_config.json", false, &t->tc);
    if (!rc)
        rc = json_file(ref, dir, "special_tokens_map.json", false, &t->stm);
    if (rc)
        return rc;
    t->vs = config_vocab(config_json);
    if (strip && t->vs >= 0 && (rc = tree_strip(ref, t->tj, t->vs)))
        return rc;
    json_t *model = json_object_get(t->tj, "model");
    const char *type = json_string_value(json_object_get(model, "type"));
    json_t *vocab = json_object_get(model, "vocab");
    if (type && strcmp(type, "BPE") && strcmp(type, "WordLevel"))
        return ms_error(MS_EUNSUPPORTED,
                        "%s: tokenizer model type '%s' is not supported for "
                        "tokenizer merging (BPE and WordLevel are)",
                        path, type);
    if (!json_is_object(vocab))
        return ms_error(MS_EMODEL, "%s: model.vocab is missing or not an object", path);
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0)
            return ms_error(MS_EMODEL, "%s: model.vocab entry '%s' is not a token id", path, k);
        if ((rc = vocab_put(&t->vocab, k, json_integer_value(v), NULL)))
            return rc;
    }
    json_t *added = json_object_get(t->tj, "added_tokens");
    if (added && !json_is_array(added))
        return ms_error(MS_EMODEL, "%s: added_tokens is not a list", path);
    t->added = added ? json_incref(added) : json_array();
    size_t i;
    json_array_foreach(added, i, v) {
        json_t *id = json_object_get(v, "id");
        const char *content = json_string_value(json_object_get(v, "content"));
        if (!json_is_integer(id) || json_integer_value(id) < 0 || !content)
            return ms_error(MS_EMODEL, "%s: added_tokens[%zu] lacks an id or content", path, i);
        if ((rc = vocab_put(&t->vocab, content, json_integer_value(id), NULL)))
            return rc;
    }
    if (t->vs < 0)
        t->vs = (int64_t)t->vocab.n;
    json_decref(t->tj);
    t->tj = NULL;
    return 0;
}

static void tokmodel_fini(struct tokmodel *t)
{
    json_decref(t->tj);
    json_decref(t->tc);
    json_decref(t->stm);
    json_decref(t->added);
    vocab_fini(&t->vocab);
    memset(t, 0, sizeof *t);
}

struct idtext {
    int64_t id;
    const char *text;
};

static int idtext_cmp(const void *a, const void *b)
{
    const struct idtext *x = a, *y = b;
    return x->id < y->id ? -1 : x->id > y->id ? 1 : strcmp(x->text, y->text);
}

/* The model's tokens sorted by id (then text); *n entries; ms_free the array. */
static struct idtext *sorted_vocab(const struct vocab *v, size_t *n)
{
    size_t i = 0;
    struct idtext *a = ms_calloc(v->n ? v->n : 1, sizeof *a);
    if (!a)
        return NULL;
    for (size_t k = 0; k < v->cap; k++)
        if (v->slot[k].text && v->slot[k].id >= 0)
            a[i++] = (struct idtext){ v->slot[k].id, v->slot[k].text };
    qsort(a, i, sizeof *a, idtext_cmp);
    *n = i;
    return a;
}

/* ------------------------------------------------------------------ output vocabulary */

static int out_set(struct ms_tokmerge *tm, uint64_t id, const char *text, json_t *added)
{
    if (id >= tm->nvocab) {
        struct outtok *t = ms_realloc(tm->tok, (size_t)(id + 1) * sizeof *t);
        if (!t)
            return ms_error(MS_ENOMEM, "out of memory");
        memset(t + tm->nvocab, 0, (size_t)(id + 1 - tm->nvocab) * sizeof *t);
        tm->tok = t;
        tm->nvocab = id + 1;
    }
    struct outtok *o = &tm->tok[id];
    int rc;
    if (!o->text && (rc = vocab_put(&tm->out_ids, text, (int64_t)id, &o->text)))
        return rc;
    if (added) {
        json_decref(o->added);
        o->added = json_incref(added);
    }
    return 0;
}

/* transformers' add_tokens(str): a normal added token (tokenizers' AddedToken::from(s,
 * false)); one shared settings object. */
static json_t *normal_settings(void)
{
    return json_pack("{s:b,s:b,s:b,s:b,s:b}", "single_word", 0, "lstrip", 0, "rstrip", 0,
                     "normalized", 1, "special", 0);
}

/* tokenizers' add_tokens: a token already present keeps its id (and becomes an added
 * token with these settings when it was a plain one); a new one gets the next id. */
static int out_add(struct ms_tokmerge *tm, const char *text, json_t *added)
{
    int64_t id = vocab_get(&tm->out_ids, text);
    if (id >= 0)
        return tm->tok[id].added ? 0 : out_set(tm, (uint64_t)id, text, added);
    return out_set(tm, tm->nvocab, text, added);
}

/* build_union_tokenizer: the base's tokens, then every other model's tokens that the base
 * lacks (plain ones first, in model then id order), then added tokens (first settings win). */
static int build_union(struct ms_tokmerge *tm, const struct ms_plan *p, size_t base)
{
    const struct tokmodel *orig = &tm->tm[base];
    json_t *out_added = json_object(), *added_order = json_array();
    struct vocab plain = { 0 }; /* text -> position in order[] */
    const char **order = NULL;
    size_t norder = 0, cap = 0;
    int rc = 0;
    if (!out_added || !added_order) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t s = 0; s < p->nmodels && !rc; s++) {
        size_t m = s == 0 ? base : s <= base ? s - 1 : s; /* the base first, then recipe order */
        const struct tokmodel *t = &tm->tm[m];
        size_t n;
        struct idtext *a = sorted_vocab(&t->vocab, &n);
        if (!a) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            break;
        }
        for (size_t i = 0; i < n && !rc; i++) {
            if (a[i].id >= t->vs || vocab_get(&plain, a[i].text) >= 0)
                continue;
            if (norder == cap) {
                const char **no = ms_realloc(order, (cap = cap ? 2 * cap : 1024) * sizeof *no);
                if (!no) {
                    rc = ms_error(MS_ENOMEM, "out of memory");
                    break;
                }
                order = no;
            }
            rc = vocab_put(&plain, a[i].text, (int64_t)norder, &order[norder]);
            norder++;
        }
        json_t *v;
        size_t i;
        json_array_foreach(t->added, i, v) {
            const char *c = json_string_value(json_object_get(v, "content"));
            if (rc || json_integer_value(json_object_get(v, "id")) >= t->vs ||
                json_object_get(out_added, c))
                continue;
            json_t *info = json_deep_copy(v);
            json_object_del(info, "id");
            json_object_del(info, "content");
            if (json_object_set_new(out_added, c, info) ||
                json_array_append_new(added_order, json_string(c)))
                rc = ms_error(MS_ENOMEM, "out of memory");
        }
        ms_free(a);
    }
    for (size_t i = 0; i < norder && !rc; i++) {
        const char *c = order[i];
        if (json_object_get(out_added, c) || vocab_get(&orig->vocab, c) >= 0)
            continue;
        rc = out_add(tm, c, tm->normal);
    }
    json_t *v;
    size_t i;
    json_array_foreach(added_order, i, v) {
        if (rc)
            break;
        const char *c = json_string_value(v);
        rc = out_add(tm, c, json_object_get(out_added, c));
    }
out:
    json_decref(out_added);
    json_decref(added_order);
    vocab_fini(&plain);
    ms_free(order);
    return rc;
}

/* The origin's own tokens (vocab plus added tokens) as the output vocabulary. */
static int out_from_origin(struct ms_tokmerge *tm, const struct tokmodel *o)
{
    size_t n;
    struct idtext *a = sorted_vocab(&o->vocab, &n);
    int rc = a ? 0 : ms_error(MS_ENOMEM, "out of memory");
    for (size_t i = 0; i < n && !rc; i++)
        rc = out_set(tm, (uint64_t)a[i].id, a[i].text, NULL);
    ms_free(a);
    json_t *v;
    size_t i;
    json_array_foreach(o->added, i, v) {
        if (rc)
            break;
        json_t *info = json_deep_copy(v);
        json_object_del(info, "id");
        json_object_del(info, "content");
        rc = out_set(tm, (uint64_t)json_integer_value(json_object_get(v, "id")),
                     json_string_value(json_object_get(v, "content")), info);
        json_decref(info);
    }
    return rc;
}

/* ------------------------------------------------------------------ build */

static size_t find_model(const struct ms_plan *p, const struct ms_modelref *const *refs,
                         const struct ms_modelref *r)
{
    for (size_t i = 0; i < p->nmodels; i++)
        if (ms_modelref_eq(refs[i], r))
            return i;
    return SIZE_MAX;
}

static int build_rowmaps(struct ms_tokmerge *tm, const struct ms_plan *p, size_t base)
{
    tm->rowmap = ms_calloc(p->nmodels, sizeof *tm->rowmap);
    tm->maxrow = ms_calloc(p->nmodels, sizeof *tm->maxrow);
    if (!tm->rowmap || !tm->maxrow)
        return ms_error(MS_ENOMEM, "out of memory");
    for (size_t m = 0; m < p->nmodels; m++) {
        const struct tokmodel *t = &tm->tm[m];
        int64_t *map = ms_calloc((size_t)tm->nrows, sizeof *map);
        if (!map)
            return ms_error(MS_ENOMEM, "out of memory");
        tm->rowmap[m] = map;
        tm->maxrow[m] = -1;
        for (uint64_t r = 0; r < tm->nrows; r++) {
            int64_t id =
                r < tm->nvocab && tm->tok[r].text ? vocab_get(&t->vocab, tm->tok[r].text) : -1;
            /* mergekit leaves a hole for an id >= vocab_size (a KeyError later): absent here */
            map[r] = id < t->vs ? id : -1;
            if (map[r] > tm->maxrow[m])
                tm->maxrow[m] = map[r];
        }
    }
    return 0;
}

/* The recipe's tokens: entries: sources resolved to plan models, rows to the entries. */
static int build_overrides(struct ms_tokmerge *tm, const struct ms_plan *p,
                           const struct ms_modelref *const *refs)
{
    const struct ms_tokcfg *c = tm->cfg;
    const char *rp = p->recipe->path ? p->recipe->path : "recipe";
    tm->ov = ms_calloc((size_t)tm->nrows, sizeof *tm->ov);
    tm->ov_model = ms_calloc(c ? c->ntokens + 1 : 1, sizeof *tm->ov_model);
    tm->ov_row = ms_calloc(c ? c->ntokens + 1 : 1, sizeof *tm->ov_row);
    if (!tm->ov || !tm->ov_model || !tm->ov_row)
        return ms_error(MS_ENOMEM, "out of memory");
    for (uint64_t r = 0; r < tm->nrows; r++)
        tm->ov[r] = -1;
    for (size_t k = 0; c && k < c->ntokens; k++) {
        const struct ms_tokemb *e = &c->tokens[k];
        int64_t id = vocab_get(&tm->out_ids, e->token);
        assert(id >= 0); /* every key was added to the output vocabulary */
        tm->ov[id] = (int32_t)k;
        tm->ov_model[k] = SIZE_MAX;
        tm->ov_row[k] = -1;
        if (e->kind == MS_TOKEMB_NONE)
            return ms_error(MS_EPLAN,
                            "%s:%d:%d: token '%s' has no source (mergekit cannot "
                            "build its row either)",
                            rp, e->pos.line, e->pos.col, e->token);
        if (e->kind == MS_TOKEMB_ZERO)
            continue;
        size_t m = find_model(p, refs, &e->model);
        if (m == SIZE_MAX)
            return ms_error(MS_EPLAN,
                            "%s:%d:%d: token '%s': source model '%s' is not part of "
                            "the merge",
                            rp, e->pos.line, e->pos.col, e->token, e->model.path);
        tm->ov_model[k] = m;
        if (e->kind == MS_TOKEMB_MODEL) {
            if (tm->rowmap[m][id] < 0)
                return ms_error(MS_EPLAN, "%s:%d:%d: token '%s' not found in model '%s'", rp,
                                e->pos.line, e->pos.col, e->token, model_ref(p, m));
            continue;
        }
        const struct tokmodel *t = &tm->tm[m];
        int64_t src = e->src_token ? vocab_get(&t->vocab, e->src_token) : e->src_token_id;
        if (e->src_token && src < 0)
            return ms_error(MS_EPLAN,
                            "%s:%d:%d: token '%s': source token '%s' not found in "
                            "model '%s'",
                            rp, e->pos.line, e->pos.col, e->token, e->src_token, model_ref(p, m));
        tm->ov_row[k] = src; /* checked against the tensor's rows by ms_tokmerge_job */
    }
    return 0;
}

int ms_tokmerge_build(const struct ms_plan *p, const struct ms_modelref *const *refs,
                      struct ms_tokmerge **out)
{
    const struct ms_recipe *r = p->recipe;
    *out = NULL;
    const char *source = r->has_tokenizer ? r->tok.source : r->tokenizer_source;
    const struct ms_modelref *sref =
        r->has_tokenizer ? &r->tok.source_ref : &r->tokenizer_source_ref;
    if (!source)
        return 0;
    struct ms_tokmerge *tm = ms_calloc(1, sizeof *tm);
    if (!tm)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = 0;
    char *spath = NULL;
    tm->r = r;
    tm->cfg = r->has_tokenizer ? &r->tok : NULL;
    tm->nmodels = p->nmodels;
    tm->tm = ms_calloc(p->nmodels, sizeof *tm->tm);
    tm->normal = normal_settings();
    if (!tm->tm || !tm->normal) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    size_t base = p->base != SIZE_MAX ? p->base : 0;
    for (size_t m = 0; m < p->nmodels && !rc; m++) {
        const struct ms_plan_model *pm = &p->models[m];
        rc = tokmodel_load(pm->ref, pm->model->dir, pm->config_json, m == base, &tm->tm[m]);
        if (!rc && (m != base || (strcmp(source, "union") && strcmp(source, "base")))) {
            /* only the output files' origin keeps its small JSON files */
            json_decref(tm->tm[m].tc);
            json_decref(tm->tm[m].stm);
            tm->tm[m].tc = tm->tm[m].stm = NULL;
        }
    }
    tm->base = base;
    if (!rc) { /* where origin_tree reads tokenizer.json again */
        tm->odir = ms_strdup(p->models[base].model->dir);
        tm->oref = ms_strdup(model_ref(p, base));
        tm->ovs = tm->tm[base].vs;
        tm->ostrip = true;
        tm->ospm = tm->tm[base].spm;
        if (!tm->odir || !tm->oref)
            rc = ms_error(MS_ENOMEM, "out of memory");
    }
    bool is_union = !strcmp(source, "union"), is_base = !strcmp(source, "base");
    if (!rc && !is_union && !is_base) {
        /* a named model's own tokenizer, not stripped (mergekit loads it as is) */
        rc = ms_model_resolve(sref->path, sref->revision, &spath);
        if (!rc) {
            char *cfg = NULL, *cpath = ms_asprintf("%s/config.json", spath);
            size_t len;
            if (cpath && is_file(spath, "config.json") && ms_read_file(cpath, &cfg, &len))
                cfg = NULL;
            tm->has_src = true;
            rc = tokmodel_load(sref->path, spath, cfg, false, &tm->src);
            ms_free(tm->odir);
            ms_free(tm->oref);
            tm->odir = ms_strdup(spath);
            tm->oref = ms_strdup(sref->path);
            tm->ostrip = false;
            tm->ospm = tm->src.spm;
            if (!rc && (!tm->odir || !tm->oref))
                rc = ms_error(MS_ENOMEM, "out of memory");
            ms_free(cfg);
            ms_free(cpath);
        }
        if (!rc)
            rc = out_from_origin(tm, &tm->src);
    } else if (!rc) {
        rc = out_from_origin(tm, &tm->tm[base]);
        if (!rc && is_union)
            rc = build_union(tm, p, base);
    }
    /* tokenizer_out.add_tokens(tok) for each tokens: key: a new token gets the next id, a
     * plain one becomes an added token (tokenizers compares added tokens by content) */
    for (size_t k = 0; !rc && tm->cfg && k < tm->cfg->ntokens; k++)
        rc = out_add(tm, tm->cfg->tokens[k].token, tm->normal);
    if (rc)
        goto out;
    tm->nrows = tm->nvocab;
    int64_t pad = tm->cfg ? tm->cfg->pad_to_multiple_of : 0;
    if (pad > 1 && tm->nrows % (uint64_t)pad)
        tm->nrows = (tm->nrows / (uint64_t)pad + 1) * (uint64_t)pad;
    if (!tm->nvocab) {
        rc = ms_error(MS_EMODEL, "model '%s': the tokenizer has no tokens", model_ref(p, base));
        goto out;
    }
    rc = build_rowmaps(tm, p, base);
    if (!rc)
        rc = build_overrides(tm, p, refs);
out:
    ms_free(spath);
    if (rc) {
        ms_tokmerge_free(tm);
        return rc;
    }
    *out = tm;
    return 0;
}

void ms_tokmerge_free(struct ms_tokmerge *tm)
{
    if (!tm)
        return;
    for (size_t m = 0; tm->tm && m < tm->nmodels; m++)
        tokmodel_fini(&tm->tm[m]);
    ms_free(tm->tm);
    tokmodel_fini(&tm->src);
    for (uint64_t i = 0; i < tm->nvocab; i++) {
        json_decref(tm->tok[i].added);
    }
    ms_free(tm->tok);
    vocab_fini(&tm->out_ids);
    json_decref(tm->normal);
    ms_free(tm->odir);
    ms_free(tm->oref);
    for (size_t m = 0; tm->rowmap && m < tm->nmodels; m++)
        ms_free(tm->rowmap[m]);
    ms_free(tm->rowmap);
    ms_free(tm->maxrow);
    ms_free(tm->ov);
    ms_free(tm->ov_model);
    ms_free(tm->ov_row);
    for (size_t j = 0; j < tm->njobs; j++) {
        for (size_t i = 0; i < MS_ARRAY_LEN(tm->jobs[j]->pad); i++)
            ms_free(tm->jobs[j]->pad[i]);
        ms_free(tm->jobs[j]->fixed);
        ms_free(tm->jobs[j]);
    }
    ms_free(tm);
}

uint64_t ms_tokmerge_rows(const struct ms_tokmerge *tm) { return tm->nrows; }
uint64_t ms_tokmerge_vocab(const struct ms_tokmerge *tm) { return tm->nvocab; }
const int64_t *ms_tokmerge_rowmap(const struct ms_tokmerge *tm, size_t m) { return tm->rowmap[m]; }
int64_t ms_tokmerge_max_row(const struct ms_tokmerge *tm, size_t m) { return tm->maxrow[m]; }

struct ms_tokrows *ms_tokmerge_job(struct ms_tokmerge *tm, const struct ms_job *job)
{
    if (tm->njobs == MS_ARRAY_LEN(tm->jobs)) {
        ms_error(MS_EUNSUPPORTED, "tensor '%s': more than %zu vocabulary-sized tensors", job->name,
                 MS_ARRAY_LEN(tm->jobs));
        return NULL;
    }
    for (size_t k = 0; tm->cfg && k < tm->cfg->ntokens; k++) {
        size_t m = tm->ov_model[k];
        if (m == SIZE_MAX)
            continue;
        uint32_t i = 0;
        while (i < job->s.ninputs && job->in[i].model != m)
            i++;
        const struct ms_tokemb *e = &tm->cfg->tokens[k];
        if (i == job->s.ninputs) {
            ms_error(MS_EPLAN, "token '%s': source model '%s' is not an input of tensor '%s'",
                     e->token, e->model.path, job->name);
            return NULL;
        }
        if (tm->ov_row[k] >= 0 &&
            (uint64_t)tm->ov_row[k] * (uint64_t)job->shape[1] >= job->in[i].numel) {
            ms_error(MS_EPLAN,
                     "token '%s': token id %" PRId64 " out of range for tensor '%s' of "
                     "model '%s'",
                     e->token, tm->ov_row[k], job->name, e->model.path);
            return NULL;
        }
    }
    struct ms_tokrows *t = ms_calloc(1, sizeof *t);
    if (!t) {
        ms_error(MS_ENOMEM, "out of memory");
        return NULL;
    }
    t->tm = tm;
    t->nvocab = tm->nvocab;
    t->nrows = tm->nrows;
    t->row_len = (uint64_t)job->shape[1];
    tm->jobs[tm->njobs++] = t;
    return t;
}

/* ------------------------------------------------------------------ rows */

static void row_copy(float *restrict dst, const float *restrict src, uint64_t n)
{
    if (dst != src)
        memcpy(dst, src, n * sizeof *dst);
}

/* d += x, element by element (the mean's additions; the caller rounds). */
static void row_add(float *restrict d, const float *restrict x, uint64_t n)
{
    for (uint64_t c = 0; c < n; c++)
        d[c] += x[c];
}

static void row_div(float *restrict d, float q, uint64_t n)
{
    for (uint64_t c = 0; c < n; c++)
        d[c] /= q;
}

/* The input whose model is m, or -1. */
static int input_of(const struct ms_job *j, size_t m)
{
    for (uint32_t i = 0; i < j->s.ninputs; i++)
        if (j->in[i].model == m)
            return (int)i;
    return -1;
}

static enum ms_dtype round_dt(const struct ms_plan_input *in)
{
    return ms_dtype_is_compute(in->load) ? in->load : MS_DT_F32;
}

void ms_tokmerge_fill(const struct ms_job *j, uint64_t row0, uint64_t nrows, float *const *in)
{
    const struct ms_tokrows *t = j->tok;
    const struct ms_tokmerge *tm = t->tm;
    uint64_t L = t->row_len;
    uint32_t n = j->s.ninputs;
    for (uint64_t k = 0; k < nrows; k++) {
        uint64_t r = row0 + k;
        if (r >= t->nvocab) {
            for (uint32_t i = 0; i < n; i++)
                if (t->pad[i])
                    row_copy(in[i] + k * L, t->pad[i], L);
            continue;
        }
        int32_t ov = tm->ov[r];
        bool force = ov >= 0 && tm->cfg->tokens[ov].force;
        int lack = -1, present = 0, only = -1;
        for (uint32_t i = 0; i < n; i++) {
            bool has = j->in[i].rowmap[r] >= 0;
            if (!has || force)
                lack = lack < 0 ? (int)i : lack;
            if (has) {
                present++;
                only = (int)i;
            }
        }
        if (lack < 0)
            continue; /* every input has its own row */
        float *d = in[lack] + k * L;
        const float *src = NULL; /* the default row, or NULL for zero */
        bool mean = false;
        if (ov >= 0) {
            const struct ms_tokemb *e = &tm->cfg->tokens[ov];
            if (e->kind == MS_TOKEMB_MODEL)
                src = in[input_of(j, tm->ov_model[ov])] + k * L;
            else if (e->kind == MS_TOKEMB_MODEL_TOKEN)
                src = t->fixed + (size_t)ov * L;
        } else if (present == 1) {
            src = in[only] + k * L;
        } else if (present > 1 && j->s.base >= 0 && j->in[j->s.base].rowmap[r] >= 0) {
            src = in[j->s.base] + k * L;
        } else if (present > 1) {
            mean = true;
        }
        if (mean) {
            /* torch: zeros in the dtype, += each row (rounded), then /= count (rounded) */
            enum ms_dtype dt = round_dt(&j->in[lack]);
            memset(d, 0, L * sizeof *d);
            for (uint32_t i = 0; i < n; i++) {
                if (j->in[i].rowmap[r] < 0)
                    continue;
                row_add(d, in[i] + k * L, L);
                ms_dtype_round(dt, d, (size_t)L);
            }
            row_div(d, (float)present, L);
            ms_dtype_round(dt, d, (size_t)L);
            src = d;
        } else if (src) {
            row_copy(d, src, L);
        } else {
            memset(d, 0, L * sizeof *d);
        }
        for (uint32_t i = (uint32_t)lack + 1; i < n; i++)
            if (j->in[i].rowmap[r] < 0 || force)
                row_copy(in[i] + k * L, d, L);
    }
}

/* ------------------------------------------------------------------ prepare (reads) */

/* A synchronous reader of one input's file. */
struct rd {
    int fd;
    struct ms_zsrc *z;
    const char *path;
};

static int rd_open(const struct ms_plan *p, const struct ms_plan_input *in, struct rd *r)
{
    const struct ms_st_file *f = p->models[in->model].model->shards[in->shard];
    r->path = in->file;
    r->fd = -1;
    r->z = NULL;
    if (f->compressed)
        return ms_zsrc_open(in->file, &r->z);
    r->fd = open(in->file, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0)
        return ms_error(-errno, "%s: cannot open: %s", in->file, strerror(errno));
    return 0;
}

static void rd_close(struct rd *r)
{
    if (r->fd >= 0)
        close(r->fd);
    ms_zsrc_free(r->z);
}

static int rd_read(struct rd *r, void *buf, size_t len, uint64_t off)
{
    if (r->z)
        return ms_zsrc_pread(r->z, buf, len, off);
    for (size_t done = 0; done < len;) {
        ssize_t n = pread(r->fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return ms_error(-errno, "%s: read failed: %s", r->path, strerror(errno));
        if (n == 0)
            return ms_error(MS_EIO, "%s: unexpected end of file", r->path);
        done += (size_t)n;
    }
    return 0;
}

/* Reads rows [row0, row0+nr) of input in through its row map into x (floats, rounded
 * to the load dtype); raw is scratch of nr*L*8 bytes. Runs of rows are one read. */
static int gather_rows(struct rd *r, const struct ms_plan_input *in, uint64_t L, uint64_t row0,
                       uint64_t nr, void *raw, float *x)
{
    uint32_t eb = ms_dtype_bits(in->dtype) / 8;
    for (uint64_t k = 0; k < nr;) {
        int64_t s = in->rowmap[row0 + k];
        if (s < 0) {
            k++;
            continue;
        }
        uint64_t run = 1;
        while (k + run < nr && in->rowmap[row0 + k + run] == s + (int64_t)run)
            run++;
        unsigned char *b = (unsigned char *)raw + k * L * eb;
        int rc = rd_read(r, b, (size_t)(run * L * eb), in->file_offset + (uint64_t)s * L * eb);
        if (rc)
            return rc;
        ms_dtype_decode(in->dtype, b, x + k * L, (size_t)(run * L));
        if (ms_dtype_is_compute(in->load) && in->load != in->dtype)
            ms_dtype_round(in->load, x + k * L, (size_t)(run * L));
        k += run;
    }
    return 0;
}

static int prepare_job(const struct ms_plan *p, const struct ms_job *j, uint64_t mem)
{
    struct ms_tokrows *t = j->tok;
    const struct ms_tokmerge *tm = t->tm;
    uint64_t L = t->row_len;
    uint32_t n = j->s.ninputs;
    struct rd rd[MS_MAX_INPUTS];
    float *x[MS_MAX_INPUTS] = { 0 };
    double *sum = NULL;
    void *raw = NULL;
    uint32_t opened = 0;
    int rc = 0;
    size_t nov = tm->cfg ? tm->cfg->ntokens : 0;
    for (; opened < n && !rc; opened++)
        rc = rd_open(p, &j->in[opened], &rd[opened]);
    if (rc) {
        opened--;
        goto out;
    }
    if (nov && !t->fixed && !(t->fixed = ms_calloc(nov * L, sizeof *t->fixed))) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    raw = ms_malloc((size_t)L * 8);
    if (!raw) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t k = 0; k < nov && !rc; k++) {
        if (tm->cfg->tokens[k].kind != MS_TOKEMB_MODEL_TOKEN)
            continue;
        int i = input_of(j, tm->ov_model[k]);
        const struct ms_plan_input *in = &j->in[i];
        uint32_t eb = ms_dtype_bits(in->dtype) / 8;
        rc = rd_read(&rd[i], raw, (size_t)(L * eb),
                     in->file_offset + (uint64_t)tm->ov_row[k] * L * eb);
        if (!rc) {
            ms_dtype_decode(in->dtype, raw, t->fixed + k * L, (size_t)L);
            if (ms_dtype_is_compute(in->load) && in->load != in->dtype)
                ms_dtype_round(in->load, t->fixed + k * L, (size_t)L);
        }
    }
    if (rc || t->nrows == t->nvocab)
        goto out;
    /* The padding rows: each input's mean over its real rows (after defaults). */
    uint64_t block = mem / 2 / ((uint64_t)n * L * 4 + L * 8);
    block = MS_MAX(MS_MIN(block, t->nvocab), 1);
    ms_free(raw);
    raw = ms_malloc((size_t)(block * L * 8));
    sum = ms_calloc((size_t)(n * L), sizeof *sum);
    for (uint32_t i = 0; i < n; i++) {
        x[i] = ms_malloc((size_t)(block * L) * sizeof **x);
        t->pad[i] = t->pad[i] ? t->pad[i] : ms_malloc((size_t)L * sizeof **x);
        if (!x[i] || !t->pad[i])
            raw = NULL; /* reported below */
    }
    if (!raw || !sum) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    for (uint64_t r0 = 0; r0 < t->nvocab && !rc; r0 += block) {
        uint64_t nr = MS_MIN(block, t->nvocab - r0);
        for (uint32_t i = 0; i < n && !rc; i++)
            rc = gather_rows(&rd[i], &j->in[i], L, r0, nr, raw, x[i]);
        if (rc)
            break;
        ms_tokmerge_fill(j, r0, nr, x);
        for (uint32_t i = 0; i < n; i++)
            for (uint64_t k = 0; k < nr; k++)
                for (uint64_t c = 0; c < L; c++)
                    sum[i * L + c] += x[i][k * L + c];
    }
    for (uint32_t i = 0; i < n && !rc; i++) {
        for (uint64_t c = 0; c < L; c++)
            t->pad[i][c] = (float)(sum[i * L + c] / (double)t->nvocab);
        ms_dtype_round(round_dt(&j->in[i]), t->pad[i], (size_t)L);
    }
out:
    for (uint32_t i = 0; i < opened; i++)
        rd_close(&rd[i]);
    for (uint32_t i = 0; i < n; i++)
        ms_free(x[i]);
    ms_free(sum);
    ms_free(raw);
    return rc;
}

int ms_tokmerge_prepare(const struct ms_plan *p, uint64_t mem)
{
    int rc = 0;
    for (size_t i = 0; i < p->njobs && !rc; i++)
        if (p->jobs[i].tok)
            rc = prepare_job(p, &p->jobs[i], mem);
    return rc;
}

/* ------------------------------------------------------------------ output files */

/* e (taken) with output token i's settings appended in the order of keys (tokenizer.json
 * and tokenizer_config.json order them differently); NULL without memory. */
static json_t *with_settings(json_t *e, const struct ms_tokmerge *tm, uint64_t i,
                             const char *const *keys)
{
    for (size_t k = 0; e && k < 5; k++) {
        json_t *v = json_object_get(tm->tok[i].added, keys[k]);
        if (v && json_object_set(e, keys[k], v)) {
            json_decref(e);
            e = NULL;
        }
    }
    return e;
}

/* Output token i's entry in tokenizer.json's added_tokens (an added token). */
static json_t *added_entry_json(const struct ms_tokmerge *tm, uint64_t i)
{
    static const char *const keys[] = { "single_word", "lstrip", "rstrip", "normalized",
                                        "special" };
    return with_settings(json_pack("{s:I,s:s}", "id", (json_int_t)i, "content", tm->tok[i].text),
                         tm, i, keys);
}

/* The origin of the output files: the named source model's, else the (stripped) base's. */
static const struct tokmodel *files_origin(const struct ms_tokmerge *tm)
{
    return tm->has_src ? &tm->src : &tm->tm[tm->base];
}

const char *ms_tokmerge_spm_dir(const struct ms_tokmerge *tm) { return tm->ospm ? tm->odir : NULL; }

/* Appends the rendering of v (ms__json_render, at depth 0) indented by `indent` more. */
static int render_indented(struct ms_strbuf *b, const json_t *v, const char *indent)
{
    char *text = NULL;
    int rc = ms__json_render(v, false, &text, NULL);
    for (const char *p = text, *nl; !rc && p; p = nl ? nl + 1 : NULL) {
        nl = strchr(p, '\n'); /* only between tokens: strings hold \n escaped */
        ms_strbuf_add(b, p, nl ? (size_t)(nl - p) : strlen(p));
        if (nl) {
            ms_strbuf_addstr(b, "\n");
            ms_strbuf_addstr(b, indent);
        }
    }
    ms_free(text);
    return rc;
}

int ms_tokmerge_tokenizer_json_text(const struct ms_tokmerge *tm, char **out, size_t *len)
{
    /* The origin's tokenizer.json read again (it was checked at plan time), stripped as at
     * plan time, rendered with an empty added_tokens, which the merged list then replaces
     * entry by entry: a union adds tens of thousands of added tokens, and a jansson tree of
     * them would cost about 1 KB each. The bytes are ms__json_render's of the whole tree. */
    static const char mark[] = "\n  \"added_tokens\": []";
    json_t *tj = NULL, *e = NULL;
    char *text = NULL;
    struct ms_strbuf b = { 0 };
    *out = NULL;
    int rc = json_file(tm->oref, tm->odir, "tokenizer.json", true, &tj);
    if (!rc && tm->ostrip)
        rc = tree_strip(tm->oref, tj, tm->ovs);
    if (!rc && json_object_set_new(tj, "added_tokens", json_array()))
        rc = ms_error(MS_ENOMEM, "out of memory");
    if (!rc)
        rc = ms__json_render(tj, false, &text, NULL);
    json_decref(tj);
    const char *at = text ? strstr(text, mark) : NULL;
    if (!rc && (!at || strstr(at + 1, mark)))
        rc = ms_error(MS_EMODEL, "%s/tokenizer.json: added_tokens not found once at the top level",
                      tm->odir);
    if (rc)
        goto out;
    at += sizeof mark - 3; /* at "[]" */
    ms_strbuf_add(&b, text, (size_t)(at - text));
    ms_strbuf_addstr(&b, "[");
    bool first = true;
    for (uint64_t i = 0; i < tm->nvocab && !rc; i++) {
        if (!tm->tok[i].added)
            continue;
        e = added_entry_json(tm, i);
        if (!e) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            break;
        }
        ms_strbuf_addstr(&b, first ? "\n    " : ",\n    ");
        first = false;
        rc = render_indented(&b, e, "    ");
        json_decref(e);
    }
    ms_strbuf_addstr(&b, first ? "]" : "\n  ]");
    ms_strbuf_addstr(&b, at + 2);
    if (!rc && (b.oom || !b.p))
        rc = ms_error(MS_ENOMEM, "out of memory");
out:
    ms_free(text);
    if (rc) {
        ms_strbuf_fini(&b);
        return rc;
    }
    *out = b.p;
    *len = b.len;
    return 0;
}

json_t *ms_tokmerge_tokenizer_config(const struct ms_tokmerge *tm)
{
    const struct tokmodel *o = files_origin(tm);
    /* Without the origin's file: a tokenizer.json loads as PreTrainedTokenizerFast; a
     * tokenizer.model names no class, and AutoTokenizer takes config.json's model_type,
     * as it did for the origin. */
    json_t *root = o->tc    ? json_deep_copy(o->tc)
                   : o->spm ? json_object()
                            : json_pack("{s:s}", "tokenizer_class", "PreTrainedTokenizerFast");
    json_t *dec = json_object();
    for (uint64_t i = 0; root && dec && i < tm->nvocab; i++) {
        if (!tm->tok[i].added)
            continue;
        char id[32];
        snprintf(id, sizeof id, "%" PRIu64, i);
        static const char *const keys[] = { "lstrip", "normalized", "rstrip", "single_word",
                                            "special" };
        json_t *e = with_settings(json_pack("{s:s}", "content", tm->tok[i].text), tm, i, keys);
        if (!e || json_object_set_new(dec, id, e))
            goto fail;
    }
    if (!root || !dec)
        goto fail;
    if (json_object_set_new(root, "added_tokens_decoder", dec)) {
        dec = NULL; /* taken even on failure */
        goto fail;
    }
    return root;
fail:
    json_decref(dec);
    json_decref(root);
    return NULL;
}

json_t *ms_tokmerge_special_map(const struct ms_tokmerge *tm)
{
    const struct tokmodel *o = files_origin(tm);
    return o->stm ? json_deep_copy(o->stm) : NULL;
}
