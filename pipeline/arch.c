/*
 * arch.c - architecture knowledge for decoder-only models (mergekit-spec.md 3):
 * which tensors a model has before, inside and after its layers, which are
 * embeddings, which are optional or tied, and where config.json keeps the
 * layer count. Built-in definitions cover the Llama family; other names with a
 * layer index are inferred from the checkpoints' tensor names.
 */
#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>

#include <jansson.h>

#include "ms_common.h"
#include "plan_impl.h"

/* ------------------------------------------------------------------ built-in definitions */

#define EMBED "model.embed_tokens.weight"
#define LM_HEAD "lm_head.weight"

static const char *const llama_layer[] = {
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight", NULL,
};

static const char *const qwen2_layer[] = {
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
    "self_attn.v_proj.bias", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight", NULL,
};

static const char *const qwen3_layer[] = {
    "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "post_attention_layernorm.weight", "self_attn.k_norm.weight",
    "self_attn.k_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
    "self_attn.q_proj.weight", "self_attn.v_proj.weight", NULL,
};

static const char *const known_keys[] = { "num_hidden_layers", NULL };
static const char *const generic_keys[] = {
    "num_hidden_layers", "n_layer", "num_layers", "n_layers",
    "text_config.num_hidden_layers", NULL,
};

struct builtin {
    const char *arch;             /* config.json architectures[0] */
    const char *const *layer;     /* layer template suffixes under model.layers.N. */
    bool lm_head;                 /* has an optional lm_head tied to the embedding */
};

static const struct builtin builtins[] = {
    { "LlamaForCausalLM", llama_layer, true },
    { "LLaMaForCausalLM", llama_layer, true },
    { "MistralForCausalLM", llama_layer, true },
    { "Qwen2ForCausalLM", qwen2_layer, true },
    { "Qwen3ForCausalLM", qwen3_layer, true },
    { "GemmaForCausalLM", llama_layer, false },
};

/* ------------------------------------------------------------------ helpers */

bool ms__layer_split(const char *name, size_t *prefix_len, uint64_t *layer, size_t *rest)
{
    for (const char *p = strchr(name, '.'); p; p = strchr(p + 1, '.')) {
        const char *d = p + 1;
        if (!isdigit((unsigned char)*d))
            continue;
        const char *e = d;
        uint64_t v = 0;
        bool overflow = false;
        while (isdigit((unsigned char)*e)) {
            if (v > (UINT64_MAX - 9) / 10)
                overflow = true;
            v = v * 10 + (uint64_t)(*e - '0');
            e++;
        }
        if (*e != '.' || overflow || p == name)
            continue;
        *prefix_len = (size_t)(p - name);
        *layer = v;
        *rest = (size_t)(e + 1 - name);
        return true;
    }
    return false;
}

/* ------------------------------------------------------------------ name index */

/* One slot of the (kind, name) index; name is borrowed from a weight. */
struct ms__wslot {
    const char *name; /* NULL: empty */
    size_t len;
    uint32_t kind;
    size_t w;
};

static size_t slot_hash(uint32_t kind, const char *name, size_t len)
{
    uint64_t h = 1469598103934665603ull ^ kind; /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)name[i]) * 1099511628211ull;
    return (size_t)(h ^ (h >> 29));
}

/* The slot of (kind, name), or the empty one where it would go. The index is
 * never full (index_put keeps it at most half used). */
static struct ms__wslot *slot_find(const struct ms__arch *a, uint32_t kind, const char *name,
                                   size_t len)
{
    size_t i = slot_hash(kind, name, len) & a->index_mask;
    for (;; i = (i + 1) & a->index_mask) {
        struct ms__wslot *sl = &a->index[i];
        if (!sl->name || (sl->kind == kind && sl->len == len && !memcmp(sl->name, name, len)))
            return sl;
    }
}

/* Indexes name as weight w of kind k unless an earlier weight has it (the first
 * one wins, as in a scan in order). false: out of memory. */
static bool index_put(struct ms__arch *a, enum ms__wkind k, const char *name, size_t w)
{
    if (2 * (a->index_used + 1) > a->index_mask + 1 || !a->index) {
        size_t cap = a->index ? 2 * (a->index_mask + 1) : 64;
        struct ms__wslot *old = a->index;
        size_t old_cap = old ? a->index_mask + 1 : 0;
        a->index = ms_calloc(cap, sizeof *a->index);
        if (!a->index) {
            a->index = old;
            return false;
        }
        a->index_mask = cap - 1;
        for (size_t i = 0; i < old_cap; i++)
            if (old[i].name)
                *slot_find(a, old[i].kind, old[i].name, old[i].len) = old[i];
        ms_free(old);
    }
    size_t len = strlen(name);
    struct ms__wslot *sl = slot_find(a, (uint32_t)k, name, len);
    if (!sl->name) {
        *sl = (struct ms__wslot){ name, len, (uint32_t)k, w };
        a->index_used++;
    }
    return true;
}

/* Appends a weight of kind k; copies the strings. Returns the new entry or NULL. */
static struct ms__weight *weight_add(struct ms__arch *a, enum ms__wkind k, const char *name,
                                     size_t name_len)
{
    if (a->nw[k] == a->capw[k]) {
        size_t nc = MS_MAX(16, 2 * a->capw[k]);
        struct ms__weight *w = ms_realloc(a->w[k], nc * sizeof *w);
        if (!w)
            return NULL;
        a->w[k] = w;
        a->capw[k] = nc;
    }
    struct ms__weight *e = &a->w[k][a->nw[k]];
    memset(e, 0, sizeof *e);
    e->name = ms_strndup(name, name_len);
    if (!e->name || !index_put(a, k, e->name, a->nw[k])) {
        ms_free(e->name);
        return NULL;
    }
    a->nw[k]++;
    return e;
}

static ssize_t weight_find(const struct ms__arch *a, enum ms__wkind k, const char *name,
                           size_t len)
{
    if (!a->index)
        return -1;
    const struct ms__wslot *sl = slot_find(a, (uint32_t)k, name, len);
    return sl->name ? (ssize_t)sl->w : -1;
}

void ms__arch_free(struct ms__arch *a)
{
    if (!a)
        return;
    for (int k = 0; k < 3; k++) {
        for (size_t i = 0; i < a->nw[k]; i++) {
            struct ms__weight *w = &a->w[k][i];
            ms_free(w->name);
            for (size_t j = 0; j < w->naliases; j++)
                ms_free(w->aliases[j]);
            ms_free(w->tied);
        }
        ms_free(a->w[k]);
    }
    ms_free(a->index);
    ms_free(a->name);
    ms_free(a->layer_prefix);
    ms_free(a);
}

/* ------------------------------------------------------------------ config.json */

int ms__arch_name(const char *config_json, const char *ref, char **name)
{
    *name = NULL;
    if (!config_json)
        return 0;
    json_error_t jerr;
    json_t *root = json_loads(config_json, 0, &jerr);
    int rc = 0;
    if (!root || !json_is_object(root)) {
        if (root)
            rc = ms_error(MS_EMODEL, "model '%s': config.json is not a JSON object", ref);
        else
            rc = ms_error(MS_EMODEL, "model '%s': config.json is not a JSON object (line %d: %s)",
                          ref, jerr.line, jerr.text);
        goto out;
    }
    json_t *arr = json_object_get(root, "architectures");
    if (!arr || json_is_null(arr))
        goto out;
    if (!json_is_array(arr) || json_array_size(arr) != 1 ||
        !json_is_string(json_array_get(arr, 0))) {
        rc = ms_error(MS_EMODEL, "model '%s': config.json 'architectures' must list exactly one "
                      "class name", ref);
        goto out;
    }
    *name = ms_strdup(json_string_value(json_array_get(arr, 0)));
    if (!*name)
        rc = ms_error(MS_ENOMEM, "out of memory");
out:
    json_decref(root);
    return rc;
}

/* ------------------------------------------------------------------ building */

static int build_builtin(const struct builtin *b, struct ms__arch *a)
{
    a->layer_prefix = ms_strdup("model.layers");
    a->layer_keys = known_keys;
    struct ms__weight *w = weight_add(a, MS__W_PRE, EMBED, strlen(EMBED));
    if (!a->layer_prefix || !w)
        return ms_error(MS_ENOMEM, "out of memory");
    w->is_embed = true;
    for (size_t i = 0; b->layer[i]; i++)
        if (!weight_add(a, MS__W_LAYER, b->layer[i], strlen(b->layer[i])))
            return ms_error(MS_ENOMEM, "out of memory");
    if (!weight_add(a, MS__W_POST, "model.norm.weight", strlen("model.norm.weight")))
        return ms_error(MS_ENOMEM, "out of memory");
    if (b->lm_head) {
        w = weight_add(a, MS__W_POST, LM_HEAD, strlen(LM_HEAD));
        if (!w || !(w->tied = ms_strdup(EMBED)))
            return ms_error(MS_ENOMEM, "out of memory");
        w->is_embed = true;
        w->optional = true;
    }
    return 0;
}

/* Final norm and output head of an inferred architecture go after the layers. */
static bool generic_is_post(const char *name)
{
    if (!strncmp(name, "lm_head.", 8) || !strncmp(name, "embed_out.", 10))
        return true;
    return strstr(name, "norm") != NULL || strstr(name, "ln_f") != NULL;
}

static bool generic_is_embed(const char *name)
{
    return strstr(name, "embed") != NULL || strstr(name, "wte") != NULL ||
           !strncmp(name, "lm_head.", 8);
}

/*
 * Infers the architecture from every model's tensor names. A layer template is
 * optional unless every model has it in every one of its layers; a non-layer
 * weight is optional unless every model has it (mergekit-spec.md 3.3).
 */
static int build_generic(struct ms_model *const *models, const char *const *refs, size_t nmodels,
                         struct ms__arch *a)
{
    int rc = 0;
    size_t *count[3] = { NULL, NULL, NULL }; /* occurrences per weight */
    size_t cap[3] = { 0, 0, 0 };
    uint64_t layer_slots = 0;              /* sum over models of their layer counts */
    a->layer_keys = generic_keys;

    for (size_t m = 0; m < nmodels; m++) {
        uint64_t maxl = 0;
        bool any = false;
        for (size_t i = 0; i < models[m]->ntensors; i++) {
            const struct ms_st_tensor *t = ms_model_tensor_at(models[m], i, NULL);
            size_t plen, rest;
            uint64_t layer;
            enum ms__wkind k;
            const char *key = t->name;
            size_t klen = strlen(t->name);
            if (ms__layer_split(t->name, &plen, &layer, &rest)) {
                if (!a->layer_prefix) {
                    a->layer_prefix = ms_strndup(t->name, plen);
                    if (!a->layer_prefix) {
                        rc = ms_error(MS_ENOMEM, "out of memory");
                        goto out;
                    }
                } else if (strlen(a->layer_prefix) != plen ||
                           memcmp(a->layer_prefix, t->name, plen)) {
                    rc = ms_error(MS_EUNSUPPORTED, "model '%s': tensors under both '%s' and "
                                  "'%.*s' carry layer indices; models with several layer "
                                  "stacks are not supported yet", refs[m], a->layer_prefix,
                                  (int)plen, t->name);
                    goto out;
                }
                k = MS__W_LAYER;
                key = t->name + rest;
                klen = strlen(key);
                any = true;
                maxl = MS_MAX(maxl, layer);
            } else {
                k = generic_is_post(t->name) ? MS__W_POST : MS__W_PRE;
            }
            ssize_t idx = weight_find(a, k, key, klen);
            if (idx < 0) {
                struct ms__weight *w = weight_add(a, k, key, klen);
                if (!w) {
                    rc = ms_error(MS_ENOMEM, "out of memory");
                    goto out;
                }
                w->is_embed = k != MS__W_LAYER && generic_is_embed(key);
                idx = (ssize_t)a->nw[k] - 1;
            }
            if ((size_t)idx >= cap[k]) {
                size_t nc = MS_MAX(16, cap[k] * 2);
                size_t *c = ms_realloc(count[k], nc * sizeof *c);
                if (!c) {
                    rc = ms_error(MS_ENOMEM, "out of memory");
                    goto out;
                }
                memset(c + cap[k], 0, (nc - cap[k]) * sizeof *c);
                count[k] = c;
                cap[k] = nc;
            }
            count[k][idx]++;
        }
        if (any)
            layer_slots += maxl + 1;
    }
    for (size_t i = 0; i < a->nw[MS__W_LAYER]; i++)
        a->w[MS__W_LAYER][i].optional = count[MS__W_LAYER][i] != layer_slots;
    for (int k = MS__W_PRE; k <= MS__W_POST; k += 2)
        for (size_t i = 0; i < a->nw[k]; i++)
            a->w[k][i].optional = count[k][i] != nmodels;
    /* lm_head falls back to the first embedding before the layers (tied weights). */
    ssize_t head = weight_find(a, MS__W_POST, LM_HEAD, strlen(LM_HEAD));
    if (head >= 0) {
        struct ms__weight *h = &a->w[MS__W_POST][head];
        h->optional = true;
        for (size_t i = 0; i < a->nw[MS__W_PRE]; i++) {
            if (a->w[MS__W_PRE][i].is_embed) {
                h->tied = ms_strdup(a->w[MS__W_PRE][i].name);
                if (!h->tied)
                    rc = ms_error(MS_ENOMEM, "out of memory");
                break;
            }
        }
    }
    if (!a->layer_prefix && !rc && !(a->layer_prefix = ms_strdup("model.layers")))
        rc = ms_error(MS_ENOMEM, "out of memory");
out:
    for (int k = 0; k < 3; k++)
        ms_free(count[k]);
    return rc;
}

int ms__arch_build(const char *name, struct ms_model *const *models, const char *const *refs,
                   size_t nmodels, struct ms__arch **out)
{
    *out = NULL;
    struct ms__arch *a = ms_calloc(1, sizeof *a);
    if (!a)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc;
    const struct builtin *b = NULL;
    for (size_t i = 0; name && i < MS_ARRAY_LEN(builtins); i++)
        if (!strcmp(builtins[i].arch, name))
            b = &builtins[i];
    if (b) {
        a->name = ms_strdup(name);
        rc = a->name ? build_builtin(b, a) : ms_error(MS_ENOMEM, "out of memory");
    } else {
        a->generic = true;
        a->name = ms_asprintf("%s (inferred from tensor names)", name ? name : "unknown");
        rc = a->name ? build_generic(models, refs, nmodels, a)
                     : ms_error(MS_ENOMEM, "out of memory");
    }
    /* Aliases go in after every primary name: a name wins over an alias. */
    for (int k = 0; k < 3 && !rc; k++)
        for (size_t i = 0; i < a->nw[k] && !rc; i++)
            for (size_t j = 0; j < a->w[k][i].naliases && !rc; j++)
                if (!index_put(a, (enum ms__wkind)k, a->w[k][i].aliases[j], i))
                    rc = ms_error(MS_ENOMEM, "out of memory");
    if (rc) {
        ms__arch_free(a);
        return rc;
    }
    *out = a;
    return 0;
}

/* ------------------------------------------------------------------ queries */

/* Looks a dotted key path up in a JSON object: an integer (or integral real) >= 0. */
static bool config_count(json_t *root, const char *path, uint64_t *v)
{
    char buf[128];
    snprintf(buf, sizeof buf, "%s", path);
    json_t *node = root;
    for (char *save = NULL, *tok = strtok_r(buf, ".", &save); tok;
         tok = strtok_r(NULL, ".", &save)) {
        if (!json_is_object(node))
            return false;
        node = json_object_get(node, tok);
        if (!node)
            return false;
    }
    if (json_is_integer(node) && json_integer_value(node) >= 0) {
        *v = (uint64_t)json_integer_value(node);
        return true;
    }
    if (json_is_real(node) && json_real_value(node) >= 0 &&
        json_real_value(node) == (double)(uint64_t)json_real_value(node)) {
        *v = (uint64_t)json_real_value(node);
        return true;
    }
    return false;
}

int ms__arch_layers(const struct ms__arch *a, const char *config_json, const struct ms_model *m,
                    const char *ref, uint64_t *nlayers, const char **key)
{
    *nlayers = 0;
    *key = NULL;
    uint64_t tensors = 0;
    size_t want = strlen(a->layer_prefix);
    for (size_t i = 0; i < m->ntensors; i++) {
        const struct ms_st_tensor *t = ms_model_tensor_at(m, i, NULL);
        size_t plen, rest;
        uint64_t layer;
        if (!ms__layer_split(t->name, &plen, &layer, &rest) || plen != want ||
            memcmp(t->name, a->layer_prefix, plen))
            continue;
        /* Every layer has a tensor: an index past the tensor count is no layer of this
         * model (and would make the plan loop over that many layers). */
        if (layer >= m->ntensors)
            return ms_error(MS_EMODEL, "model '%s': tensor '%s' has layer index %" PRIu64
                            " but the model has only %zu tensors", ref, t->name, layer,
                            m->ntensors);
        if (layer + 1 > tensors)
            tensors = layer + 1;
    }
    *nlayers = tensors;
    if (!config_json)
        return 0;
    json_t *root = json_loads(config_json, 0, NULL);
    if (!root)
        return ms_error(MS_EMODEL, "model '%s': config.json is not valid JSON", ref);
    int rc = 0;
    for (size_t i = 0; a->layer_keys[i]; i++) {
        uint64_t v;
        if (!config_count(root, a->layer_keys[i], &v))
            continue;
        *key = a->layer_keys[i];
        if (v != tensors)
            rc = ms_error(MS_EMODEL, "model '%s': config.json %s is %" PRIu64 " but its tensors "
                          "have %" PRIu64 " layers (%s.N)", ref, *key, v, tensors,
                          a->layer_prefix);
        break;
    }
    json_decref(root);
    return rc;
}

char *ms__arch_tensor_name(const struct ms__arch *a, enum ms__wkind k, size_t w, uint64_t layer)
{
    if (k != MS__W_LAYER)
        return ms_strdup(a->w[k][w].name);
    return ms_asprintf("%s.%" PRIu64 ".%s", a->layer_prefix, layer, a->w[k][w].name);
}

bool ms__arch_classify(const struct ms__arch *a, const char *name, enum ms__wkind *kind,
                       size_t *w, uint64_t *layer)
{
    size_t len = strlen(name);
    for (int k = MS__W_PRE; k <= MS__W_POST; k += 2) {
        ssize_t i = weight_find(a, (enum ms__wkind)k, name, len);
        if (i >= 0) {
            *kind = (enum ms__wkind)k;
            *w = (size_t)i;
            return true;
        }
    }
    size_t plen, rest;
    uint64_t l;
    if (!ms__layer_split(name, &plen, &l, &rest) || plen != strlen(a->layer_prefix) ||
        memcmp(name, a->layer_prefix, plen))
        return false;
    ssize_t i = weight_find(a, MS__W_LAYER, name + rest, len - rest);
    if (i < 0)
        return false;
    *kind = MS__W_LAYER;
    *w = (size_t)i;
    *layer = l;
    return true;
}
