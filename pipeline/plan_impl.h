/*
 * plan_impl.h - private to pipeline/: architecture knowledge used by the plan
 * (pipeline/arch.c; mergekit-spec.md section 3).
 *
 * An architecture describes a decoder-only model whose layer tensors carry a
 * layer index as one dotted component ("model.layers.7.mlp.up_proj.weight"):
 * the weights before the layers (pre), the per-layer templates, and the weights
 * after them (post). Tensors of a checkpoint that the architecture does not
 * list are dropped, as mergekit drops them.
 */
#ifndef MS_PLAN_IMPL_H
#define MS_PLAN_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "ms_safetensors.h"

#define MS__MAX_ALIASES 2

enum ms__wkind { MS__W_PRE, MS__W_LAYER, MS__W_POST };

/* One weight entry. For a layer template, `name` is the part after
 * "<layer_prefix>.<index>." (e.g. "mlp.up_proj.weight"); otherwise the full name. */
struct ms__weight {
    char *name;
    bool is_embed;                /* vocabulary rows: rows may differ between models */
    bool optional;                /* absent in a model drops that model; in all: no output */
    size_t naliases;
    char *aliases[MS__MAX_ALIASES];
    char *tied;                   /* name loaded when this one is absent, or NULL */
};

struct ms__wslot;

struct ms__arch {
    char *name;                   /* config.json architectures[0] (or "generic ...") */
    bool generic;                 /* inferred from tensor names (mergekit-spec.md 3.3) */
    char *layer_prefix;           /* "model.layers" */
    size_t nw[3];                 /* weights per kind (indexed by enum ms__wkind) */
    struct ms__weight *w[3];
    size_t capw[3];               /* allocated entries of w[k] */
    /* Hash index of every weight's name and aliases, (kind, name) -> first entry,
     * so that classifying a model's tensors is linear in them (arch.c). */
    struct ms__wslot *index;
    size_t index_mask, index_used;
    /* config.json keys that may hold the layer count, in order of preference;
     * dotted paths ("text_config.num_hidden_layers") descend into objects. */
    const char *const *layer_keys;
};

/*
 * Reads `architectures` from config.json text (NULL: no config). Sets *name to
 * a copy of its single entry (ms_free), or NULL when the config has none.
 * Errors (MS_EMODEL, naming `ref`): unparsable JSON, not exactly one entry.
 */
int ms__arch_name(const char *config_json, const char *ref, char **name);

/*
 * Builds the architecture for `name` (may be NULL): a built-in definition for
 * Llama, Mistral, Qwen2, Qwen3 and Gemma, else one inferred from the tensor
 * names of all `models` (mergekit-spec.md 3.3: the first ".<digits>." component
 * splits a layer name; non-layer names are pre-weights except the final norm
 * and lm_head, which are post-weights). refs[i] names models[i] in messages.
 */
int ms__arch_build(const char *name, struct ms_model *const *models, const char *const *refs,
                   size_t nmodels, struct ms__arch **out);
void ms__arch_free(struct ms__arch *a);

/*
 * The layer count of model m: config.json's count under the first of
 * a->layer_keys present, cross-checked against the largest layer index in the
 * tensor names (they must agree); without a config key, the tensors' count.
 * *key is set to the key used (static storage) or NULL. MS_EMODEL on mismatch.
 */
int ms__arch_layers(const struct ms__arch *a, const char *config_json, const struct ms_model *m,
                    const char *ref, uint64_t *nlayers, const char **key);

/* The tensor name of weight `w` of kind k (layer weights: at layer `layer`).
 * Returns ms_malloc'd storage or NULL (out of memory). */
char *ms__arch_tensor_name(const struct ms__arch *a, enum ms__wkind k, size_t w, uint64_t layer);

/*
 * Classifies a checkpoint tensor name: true with *kind, *w (and *layer for layer
 * weights) when the architecture lists it (by primary name or alias); false when
 * it is dropped.
 */
bool ms__arch_classify(const struct ms__arch *a, const char *name, enum ms__wkind *kind,
                       size_t *w, uint64_t *layer);

/* Splits a layer tensor name at its first ".<digits>." component: true with
 * the prefix length, the index and the offset of the part after it. */
bool ms__layer_split(const char *name, size_t *prefix_len, uint64_t *layer, size_t *rest);

/*
 * Renders a JSON value as Python's json.dumps(indent=2) does (the way mergekit
 * and transformers write JSON): two-space indentation, ", " never at line ends,
 * non-ASCII escaped as \uXXXX, reals in Python's shortest repr ("1e-05",
 * "10000.0"). Object keys keep their order. A trailing newline is added when
 * `newline`. *out is NUL-terminated and owned by the caller (ms_free).
 */
int ms__json_render(const json_t *v, bool newline, char **out, size_t *len);

#endif
