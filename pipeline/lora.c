/*
 * lora.c - opens a PEFT LoRA adapter for a `model+adapter` reference and fixes
 * every fold the plan needs (lora_impl.h; the arithmetic is ms_lora.h's).
 *
 * What is read, as PEFT reads it (LoraConfig, PeftModel.from_pretrained):
 *   adapter_config.json: r (> 0), lora_alpha (default 8), use_rslora (default
 *     false), fan_in_fan_out (default false), target_modules (a list filters the
 *     modules folded, as PEFT ignores weights of modules it did not wrap),
 *     rank_pattern (each module's rank is then its matrices'). Refused, each by
 *     name: another peft_type, use_dora, alpha_pattern, lora_bias.
 *   adapter_model.safetensors: "base_model.model.<module>.lora_A.weight" (r x in)
 *     and ".lora_B.weight" (out x r) for linear layers, ".lora_embedding_A"
 *     (r x vocab) and ".lora_embedding_B" (dim x r) for embeddings, folded into
 *     the model tensor "<module>.weight". Any other tensor is refused by name.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_str.h"
#include "lora_impl.h"

#define PREFIX "base_model.model."

struct module {
    char *wname; /* the model tensor it folds into ("<module>.weight") */
    const struct ms_st_tensor *a, *b;
    bool embed;
    struct ms_lora_fold fold;
};

struct ms_lora_adapter {
    char *dir;
    struct ms_st_file *st; /* adapter_model.safetensors */
    uint32_t r;
    double alpha;
    bool rslora, fan_in_fan_out, rank_pattern;
    enum ms_dtype dtype; /* D, or MS_DT_NONE: each tensor's own dtype */
    size_t nmod;
    struct module *mod;        /* sorted by wname */
    struct ms_lora_fold plain; /* r = 0: the change to D of every other float tensor */
};

static int mod_cmp(const void *x, const void *y)
{
    return strcmp(((const struct module *)x)->wname, ((const struct module *)y)->wname);
}

void ms__lora_free(struct ms_lora_adapter *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->nmod; i++)
        ms_free(l->mod[i].wname);
    ms_free(l->mod);
    ms_st_free(l->st);
    ms_free(l->dir);
    ms_free(l);
}

static bool is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* A non-empty JSON object or array under key (rank_pattern: {} is the default). */
static bool nonempty(const json_t *cfg, const char *key)
{
    const json_t *v = json_object_get(cfg, key);
    return (json_is_object(v) && json_object_size(v)) || (json_is_array(v) && json_array_size(v));
}

/* Reads adapter_config.json into l; *cfg keeps the parsed object (json_decref). */
static int read_config(struct ms_lora_adapter *l, const char *ref, const char *path, json_t **cfg)
{
    char *text = NULL;
    json_error_t jerr;
    size_t len;
    int rc = 0;
    *cfg = NULL;
    if (!is_file(path))
        return ms_error(MS_EMODEL, "LoRA '%s': %s is missing (not a PEFT adapter directory)", ref,
                        path);
    if ((rc = ms_read_file(path, &text, &len)) < 0)
        return rc;
    json_t *c = *cfg = json_loads(text, 0, &jerr);
    ms_free(text);
    if (!json_is_object(c))
        return ms_error(MS_EMODEL, "%s: not a JSON object%s%s", path, c ? "" : ": ",
                        c ? "" : jerr.text);
    const json_t *pt = json_object_get(c, "peft_type");
    if (pt && (!json_is_string(pt) || strcmp(json_string_value(pt), "LORA")))
        return ms_error(MS_EUNSUPPORTED, "%s: peft_type %s is not supported (LORA adapters only)",
                        path, json_is_string(pt) ? json_string_value(pt) : "(not a string)");
    const json_t *r = json_object_get(c, "r");
    if (!json_is_integer(r) || json_integer_value(r) <= 0 || json_integer_value(r) > (1 << 20))
        return ms_error(MS_EMODEL, "%s: 'r' must be a positive integer", path);
    l->r = (uint32_t)json_integer_value(r);
    const json_t *a = json_object_get(c, "lora_alpha");
    l->alpha = 8.0; /* PEFT's LoraConfig default */
    if (a && !json_is_null(a)) {
        if (!json_is_number(a))
            return ms_error(MS_EMODEL, "%s: 'lora_alpha' must be a number", path);
        l->alpha = json_number_value(a);
    }
    static const char *const keys[] = { "use_rslora", "fan_in_fan_out", "use_dora", "lora_bias" };
    bool v[4] = { false };
    for (int i = 0; i < 4; i++) {
        const json_t *b = json_object_get(c, keys[i]);
        if (b && !json_is_null(b) && !json_is_boolean(b))
            return ms_error(MS_EMODEL, "%s: '%s' must be true or false", path, keys[i]);
        v[i] = json_is_true(b);
    }
    l->rslora = v[0];
    l->fan_in_fan_out = v[1];
    if (v[2] || v[3] || nonempty(c, "alpha_pattern"))
        return ms_error(MS_EUNSUPPORTED, "%s: %s is not supported (plain LoRA only)", path,
                        v[2]   ? "use_dora (DoRA)"
                        : v[3] ? "lora_bias"
                               : "alpha_pattern");
    l->rank_pattern = nonempty(c, "rank_pattern");
    return 0;
}

/* PEFT's module match for a target_modules list: the name or its last dotted parts.
 * A string (a regular expression, or "all-linear") keeps every module the file has. */
static bool targeted(const json_t *tm, const char *module)
{
    if (!json_is_array(tm))
        return true;
    size_t i, n = strlen(module);
    const json_t *k;
    json_array_foreach(tm, i, k)
    {
        const char *key = json_string_value(k);
        size_t kl = key ? strlen(key) : 0;
        if (key && (!strcmp(module, key) ||
                    (n > kl && module[n - kl - 1] == '.' && !strcmp(module + n - kl, key))))
            return true;
    }
    return false;
}

static const struct {
    const char *suffix;
    bool b, embed;
} kinds[] = {
    { ".lora_A.weight", false, false },
    { ".lora_B.weight", true, false },
    { ".lora_embedding_A", false, true },
    { ".lora_embedding_B", true, true },
};

/* The module an adapter tensor belongs to: sets *kind, returns its name length, or 0. */
static size_t parse_key(const char *name, int *kind)
{
    size_t n = strlen(name), pl = strlen(PREFIX);
    if (strncmp(name, PREFIX, pl))
        return 0;
    for (int k = 0; k < 4; k++) {
        size_t sl = strlen(kinds[k].suffix);
        if (n > pl + sl && !strcmp(name + n - sl, kinds[k].suffix)) {
            *kind = k;
            return n - sl - pl;
        }
    }
    return 0;
}

static struct module *module_get(struct ms_lora_adapter *l, const char *mname, size_t len)
{
    for (size_t i = 0; i < l->nmod; i++)
        if (!strncmp(l->mod[i].wname, mname, len) && !strcmp(l->mod[i].wname + len, ".weight"))
            return &l->mod[i];
    struct module *m = &l->mod[l->nmod];
    memset(m, 0, sizeof *m);
    m->wname = ms_asprintf("%.*s.weight", (int)len, mname);
    if (!m->wname)
        return NULL;
    l->nmod++;
    return m;
}

static bool adapter_dtype_ok(enum ms_dtype dt)
{
    return dt == MS_DT_F32 || dt == MS_DT_BF16 || dt == MS_DT_F16;
}

/* Checks module m against the model's weight and fills its fold. */
static int module_fold(struct ms_lora_adapter *l, struct module *m, const struct ms_model *model,
                       const char *ref, const char *file)
{
    const char *an = m->a ? m->a->name : NULL, *bn = m->b ? m->b->name : NULL;
    if (!m->a || !m->b)
        return ms_error(MS_EMODEL, "%s: adapter tensor '%s' has no matching %s", file, an ? an : bn,
                        an ? "lora_B" : "lora_A");
    const struct ms_st_tensor *w = ms_model_find(model, m->wname, NULL);
    if (!w)
        return ms_error(MS_EMODEL,
                        "%s: adapter tensor '%s' is for '%s', which model '%s' does "
                        "not have",
                        file, an, m->wname, ref);
    if (!adapter_dtype_ok(m->a->dtype) || !adapter_dtype_ok(m->b->dtype))
        return ms_error(MS_EUNSUPPORTED,
                        "%s: adapter tensor '%s' has dtype %s (F32, BF16 or F16 "
                        "expected)",
                        file, adapter_dtype_ok(m->a->dtype) ? bn : an,
                        ms_dtype_name(adapter_dtype_ok(m->a->dtype) ? m->b->dtype : m->a->dtype));
    if (w->ndim != 2 || !ms_dtype_is_compute(w->dtype))
        return ms_error(MS_EUNSUPPORTED,
                        "%s: adapter tensor '%s': model '%s' tensor '%s' is not "
                        "a 2-D float matrix (%u dims, %s)",
                        file, an, ref, m->wname, w->ndim, ms_dtype_name(w->dtype));
    if (m->a->ndim != 2 || m->b->ndim != 2)
        return ms_error(MS_EMODEL, "%s: adapter tensor '%s' is not a matrix", file,
                        m->a->ndim != 2 ? an : bn);
    uint64_t rows = (uint64_t)w->shape[0], cols = (uint64_t)w->shape[1];
    uint64_t rank = (uint64_t)m->a->shape[0];
    bool tr = m->embed || l->fan_in_fan_out;
    uint64_t na = tr ? rows : cols, nb = tr ? cols : rows;
    if (rank == 0 || (uint64_t)m->b->shape[1] != rank)
        return ms_error(MS_EMODEL,
                        "%s: adapter tensors '%s' [%lld, %lld] and '%s' [%lld, %lld] "
                        "do not share a nonzero rank",
                        file, an, (long long)m->a->shape[0], (long long)m->a->shape[1], bn,
                        (long long)m->b->shape[0], (long long)m->b->shape[1]);
    if (!l->rank_pattern && rank != l->r)
        return ms_error(MS_EMODEL,
                        "%s: adapter tensor '%s' has rank %llu but adapter_config.json "
                        "says r = %u",
                        file, an, (unsigned long long)rank, l->r);
    if ((uint64_t)m->a->shape[1] != na || (uint64_t)m->b->shape[0] != nb)
        return ms_error(MS_EMODEL,
                        "%s: adapter tensors '%s' [%lld, %lld] and '%s' [%lld, %lld] do "
                        "not fit model '%s' tensor '%s' [%llu, %llu]%s",
                        file, an, (long long)m->a->shape[0], (long long)m->a->shape[1], bn,
                        (long long)m->b->shape[0], (long long)m->b->shape[1], ref, m->wname,
                        (unsigned long long)rows, (unsigned long long)cols,
                        tr ? " (transposed: fan_in_fan_out or an embedding)" : "");
    struct ms_lora_fold *f = &m->fold;
    f->dtype = l->dtype != MS_DT_NONE ? l->dtype : w->dtype;
    f->r = (uint32_t)rank;
    f->rows = rows;
    f->cols = cols;
    f->transpose = tr;
    f->scale = (float)(l->rslora ? l->alpha / sqrt((double)rank) : l->alpha / (double)rank);
    f->file = l->st->path;
    f->a_name = an;
    f->b_name = bn;
    f->a_dtype = m->a->dtype;
    f->b_dtype = m->b->dtype;
    f->a_offset = l->st->data_start + m->a->begin;
    f->b_offset = l->st->data_start + m->b->begin;
    return 0;
}

/* transformers' dtype="auto": config.json "dtype" (v5) or "torch_dtype". */
static enum ms_dtype config_dtype(const char *config_json)
{
    enum ms_dtype dt = MS_DT_NONE;
    json_t *root = config_json ? json_loads(config_json, 0, NULL) : NULL;
    const json_t *v = json_object_get(root, "dtype");
    if (!json_is_string(v))
        v = json_object_get(root, "torch_dtype");
    if (json_is_string(v)) {
        dt = ms_dtype_from_recipe(json_string_value(v));
        if (!ms_dtype_is_compute(dt))
            dt = MS_DT_NONE;
    }
    json_decref(root);
    return dt;
}

int ms__lora_open(const char *dir, const char *ref, const struct ms_model *model,
                  const char *config_json, enum ms_dtype dtype, struct ms_lora_adapter **out)
{
    *out = NULL;
    json_t *cfg = NULL;
    char *cpath = NULL, *spath = NULL;
    size_t nskip = 0;
    const char *skipped = NULL;
    int rc = 0;
    struct ms_lora_adapter *l = ms_calloc(1, sizeof *l);
    if (!l || !(l->dir = ms_strdup(dir)) || !(cpath = ms_asprintf("%s/adapter_config.json", dir)) ||
        !(spath = ms_asprintf("%s/adapter_model.safetensors", dir))) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = read_config(l, ref, cpath, &cfg)) < 0)
        goto out;
    if (!is_file(spath)) {
        rc = ms_error(MS_EMODEL,
                      "LoRA '%s': %s is missing (a PyTorch adapter_model.bin is "
                      "not supported)",
                      ref, spath);
        goto out;
    }
    if ((rc = ms_st_open(spath, &l->st)) < 0)
        goto out;
    l->dtype = dtype != MS_DT_NONE ? dtype : config_dtype(config_json);
    l->mod = ms_calloc(l->st->ntensors ? l->st->ntensors : 1, sizeof *l->mod);
    if (!l->mod) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    const json_t *tm = json_object_get(cfg, "target_modules");
    for (size_t i = 0; i < l->st->ntensors; i++) {
        const struct ms_st_tensor *t = &l->st->tensors[i];
        int kind = 0;
        size_t len = parse_key(t->name, &kind);
        if (!len) {
            rc = ms_error(MS_EUNSUPPORTED,
                          "%s: adapter tensor '%s' is not a LoRA matrix "
                          "(base_model.model.<module>.lora_A/lora_B.weight or lora_embedding_A/B); "
                          "DoRA, LoRA biases and modules_to_save are not supported",
                          spath, t->name);
            goto out;
        }
        char mname[1024];
        snprintf(mname, sizeof mname, "%.*s", (int)len, t->name + strlen(PREFIX));
        if (!targeted(tm, mname)) {
            nskip++;
            skipped = t->name;
            continue;
        }
        struct module *m = module_get(l, t->name + strlen(PREFIX), len);
        if (!m) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            goto out;
        }
        if ((kinds[kind].b ? m->b : m->a) || ((m->a || m->b) && m->embed != kinds[kind].embed)) {
            rc = ms_error(MS_EMODEL, "%s: adapter tensor '%s': module '%s' has it twice", spath,
                          t->name, mname);
            goto out;
        }
        m->embed = kinds[kind].embed;
        *(kinds[kind].b ? &m->b : &m->a) = t;
    }
    if (nskip)
        ms_log_warn("%s: %zu adapter tensors (e.g. '%s') are for modules not in target_modules: "
                    "ignored, as PEFT ignores them",
                    spath, nskip, skipped);
    for (size_t i = 0; i < l->nmod; i++)
        if ((rc = module_fold(l, &l->mod[i], model, ref, spath)) < 0)
            goto out;
    qsort(l->mod, l->nmod, sizeof *l->mod, mod_cmp);
    l->plain.dtype = l->dtype;
    *out = l;
    l = NULL;
out:
    json_decref(cfg);
    ms_free(cpath);
    ms_free(spath);
    ms__lora_free(l);
    return rc;
}

const struct ms_lora_fold *ms__lora_find(const struct ms_lora_adapter *l,
                                         const struct ms_st_tensor *w)
{
    struct module key = { .wname = w->name };
    const struct module *m = bsearch(&key, l->mod, l->nmod, sizeof *l->mod, mod_cmp);
    if (m)
        return &m->fold;
    if (l->dtype == MS_DT_NONE || !ms_dtype_is_float(w->dtype) || w->dtype == l->dtype)
        return NULL;
    return &l->plain;
}

int ms__lora_describe(const struct ms_lora_adapter *l, char *buf, size_t len)
{
    return snprintf(buf, len, "%s: %zu modules, r %u, alpha %g%s%s%s%s", l->dir, l->nmod, l->r,
                    l->alpha, l->rslora ? ", rsLoRA" : "",
                    l->fan_in_fan_out ? ", fan_in_fan_out" : "",
                    l->dtype != MS_DT_NONE ? ", folded in " : "",
                    l->dtype != MS_DT_NONE ? ms_dtype_name(l->dtype) : "");
}

int ms__lora_fingerprint(const struct ms_lora_adapter *l, struct ms_xxh64 *h)
{
    static const char *const files[] = { "adapter_config.json", "adapter_model.safetensors" };
    for (int i = 0; i < 2; i++) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", l->dir, files[i]);
        if (stat(path, &st) < 0)
            return ms_error(-errno, "%s: %s", path, strerror(errno));
        uint64_t v[3] = { (uint64_t)st.st_size, (uint64_t)st.st_mtim.tv_sec,
                          (uint64_t)st.st_mtim.tv_nsec };
        ms_xxh64_update(h, path, strlen(path) + 1);
        ms_xxh64_update(h, v, sizeof v);
    }
    int32_t d = (int32_t)l->dtype;
    ms_xxh64_update(h, &d, sizeof d);
    return 0;
}
