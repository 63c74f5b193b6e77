/*
 * ms_recipe.h - mergekit YAML recipes (mergekit-spec.md section 1), parsed with
 * libyaml into a typed tree that keeps every node's line and column.
 *
 * The recipe owns every string and array in it; ms_recipe_free releases all.
 * Nothing here looks at models or tensors: the plan (ms_plan.h) resolves
 * references, counts layers and evaluates parameters with ms_setting_eval.
 */
#ifndef MS_RECIPE_H
#define MS_RECIPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ms_pos {
    int line, col;                /* 1-based position in the YAML file; 0 if unknown */
};

enum ms_setting_kind {
    MS_SET_NONE = 0,              /* not written */
    MS_SET_SCALAR,                /* a number (true/false -> 1/0, numeric strings accepted) */
    MS_SET_GRADIENT,              /* a list of numbers */
    MS_SET_COND,                  /* a list of {filter?, value} */
};

struct ms_cond;

/* One parameter value as written in the recipe. */
struct ms_setting {
    enum ms_setting_kind kind;
    double scalar;                /* MS_SET_SCALAR */
    double *grad;                 /* MS_SET_GRADIENT: ngrad >= 1 values */
    size_t ngrad;
    struct ms_cond *cond;         /* MS_SET_COND: ncond entries */
    size_t ncond;
    struct ms_pos pos;
};

struct ms_cond {
    char *filter;                 /* NULL when absent; "*" matches everything */
    struct ms_setting value;      /* scalar or gradient */
};

struct ms_param {
    char *name;
    struct ms_setting value;
    struct ms_pos pos;            /* of the name (the key) */
};

struct ms_params {
    size_t n;
    struct ms_param *v;
};

/*
 * "path", "path@revision", "path+lora" or {model, lora, override_architecture},
 * split as mergekit does: a string is cut at its '+' (more than one '+' is an
 * error), then each part at its '@' (more than one '@' in a part is an error).
 * In the mapping form `model` and `lora` are a "path@revision" string or a
 * {path, revision} mapping, and '+' is not special.
 */
struct ms_modelref {
    char *path;                   /* NULL when not set */
    char *revision;               /* after '@', or NULL */
    char *lora;                   /* after '+', or NULL (LoRA merging is not supported) */
    char *lora_revision;          /* after the lora's '@', or NULL */
    char *override_architecture;  /* or NULL */
    struct ms_pos pos;            /* of the reference's value node */
};

/* A `tokenizer.tokens` entry (mergekit's TokenEmbeddingConfig). */
enum ms_tokemb_kind {
    MS_TOKEMB_NONE,        /* no source: only `force` given */
    MS_TOKEMB_MODEL,       /* source: a model: that model's row for the token */
    MS_TOKEMB_MODEL_TOKEN, /* {kind: model_token, model, token | token_id} */
    MS_TOKEMB_ZERO,        /* {kind: zero} */
};
struct ms_tokemb {
    char *token; /* the key: the token's text */
    enum ms_tokemb_kind kind;
    struct ms_modelref model; /* MODEL and MODEL_TOKEN */
    char *src_token;          /* MODEL_TOKEN by text, or NULL */
    int64_t src_token_id;     /* MODEL_TOKEN by id, or -1 */
    bool force;               /* replace the row even in models that have the token */
    struct ms_pos pos;        /* of the key */
};
/* The `tokenizer:` mapping (mergekit's TokenizerConfig). */
struct ms_tokcfg {
    char *source;                  /* "union" (the default), "base", or the model's path */
    struct ms_modelref source_ref; /* path set when source names a model */
    struct ms_pos source_pos;
    size_t ntokens;
    struct ms_tokemb *tokens;   /* in recipe order */
    int64_t pad_to_multiple_of; /* 0 when not set */
    struct ms_pos pad_pos;
};

struct ms_source {
    struct ms_modelref model;
    bool has_range;
    int64_t layer_range[2];       /* half-open [start, end) */
    struct ms_params params;
    struct ms_pos pos;            /* of the entry's mapping */
};

struct ms_slice {
    size_t nsources;
    struct ms_source *sources;
    struct ms_modelref base_model; /* path NULL when not set */
    struct ms_params params;
    struct ms_pos pos;            /* of the slice's mapping */
};

struct ms_recipe {
    char *path;                   /* file name used in messages */
    char *text;                   /* the verbatim YAML (saved as mergekit_config.yml) */
    size_t text_len;
    char *merge_method;
    struct ms_pos merge_method_pos;
    size_t nmodels;               /* models form: nmodels > 0 */
    struct ms_source *models;
    size_t nslices;               /* slices form: nslices > 0 */
    struct ms_slice *slices;
    bool has_modules;             /* modules form with one module, folded: its models or
                                     slices are in models/slices above, and its parameters
                                     are folded into params below so that one lookup gives
                                     mergekit's module-then-global answer */
    struct ms_pos modules_pos;    /* of the `modules` key */
    char *module_name;            /* the module's name (mergekit's single-module
                                     architectures call it 'default'), or NULL */
    struct ms_pos module_pos;     /* of the module's name */
    struct ms_modelref base_model;
    struct ms_params params;
    char *dtype;                  /* as written, or NULL */
    struct ms_pos dtype_pos;
    char *out_dtype;
    struct ms_pos out_dtype_pos;
    char *tokenizer_source;       /* legacy key as written ("union", "base", a model), or NULL;
                                     for the mapping form, the model's path */
    struct ms_pos tokenizer_source_pos;
    struct ms_modelref tokenizer_source_ref; /* path set when tokenizer_source names a model */
    bool has_tokenizer;                      /* the `tokenizer:` mapping form */
    struct ms_pos tokenizer_pos;  /* of the `tokenizer` key */
    struct ms_tokcfg tok;         /* the `tokenizer:` mapping's contents (has_tokenizer) */
    char *chat_template;
    struct ms_pos chat_template_pos;
    struct ms_pos doc_pos; /* of the document's top-level mapping */
    char *name;            /* mergekit-multi's `name:` of this document, or NULL */
    struct ms_pos name_pos;
};

/*
 * A recipe file: one YAML document, or several (mergekit-multi: documents with a
 * `name:`, later ones using earlier ones' outputs by that name as a model, at most
 * one without a name whose output is OUT).
 */
struct ms_recipe_file {
    size_t n;                /* documents, n >= 1 */
    struct ms_recipe **docs; /* in file order; each one's `text` is its own part of
                                     the file (the whole file when n == 1) */
    /* Filled by ms_recipe_file_link: */
    size_t *order; /* n indices into docs, every document after those it uses */
    bool *uses;    /* uses[i * n + j]: docs[i] reads docs[j]'s output */
    char **out;    /* per document: INTERMEDIATE_DIR/name, NULL for the unnamed */
    size_t final;  /* index of the unnamed document, or SIZE_MAX */
};

/*
 * Parses YAML text (copied: the recipe keeps its own `text`). `name` is used in
 * messages ("r.yml:3:5: ..."). Scalars are read as yaml.safe_load reads them
 * (YAML 1.1: yes/no/on/off are booleans, "1e-5" is a string that a number
 * field accepts as pydantic does). Errors (MS_ERECIPE) name file:line:column
 * (1-based, of the offending node) and the key: YAML syntax, more than one
 * document (see ms_recipe_file_parse for several), duplicate keys, '<<' merge keys, wrong value types, a missing
 * merge_method / model / layer_range / sources, not exactly one non-empty
 * models/slices/modules, tokenizer_source together with tokenizer, a bare
 * {filter, value} mapping not in a list, an empty gradient, layer_range not two
 * integers with 0 <= start <= end, a model string with two '+' or two '@', nesting
 * deeper than 64 levels (refused before the file is loaded; libyaml slows down
 * quadratically with depth). Duplicate keys are found with a hash past 16 keys, so
 * a mapping of any size is checked in linear time.
 * MS_ENOMEM when an allocation fails. Unknown keys are reported with
 * ms_log_warn ("r.yml:3:1: unknown key 'paramters'") and ignored, as mergekit
 * ignores them. Not checked here (the plan does it): method names, parameter
 * names, dtype names, models existing. On error *out is NULL and nothing leaks.
 * Any thread; no shared state besides the calling thread's diagnostic.
 */
int ms_recipe_parse(const char *name, const char *text, size_t len, struct ms_recipe **out);
/* Reads the file and parses it; a file that cannot be read gives -errno. */
int ms_recipe_load(const char *path, struct ms_recipe **out);
/*
 * The same with flags: MS_RECIPE_STRICT makes an unknown key an error
 * (MS_ERECIPE, "r.yml:3:1: unknown key 'paramters' (did you mean 'parameters'?)")
 * instead of a warning. The warning and the error name the closest known key
 * when one is near (ms_str_closest).
 */
#define MS_RECIPE_STRICT 0x1u
int ms_recipe_parse_opts(const char *name, const char *text, size_t len, unsigned flags,
                         struct ms_recipe **out);
int ms_recipe_load_opts(const char *path, unsigned flags, struct ms_recipe **out);
/* Releases the recipe and everything in it; NULL is a no-op. */
void ms_recipe_free(struct ms_recipe *r);

/*
 * Parses or loads a file of one or more YAML documents (flags as above); each
 * document is checked as ms_recipe_parse checks one, and may have a `name:`
 * (a string). Empty documents after the first (a trailing "---") are skipped.
 * Errors as ms_recipe_parse's, for the first document that has one. On error *out
 * is NULL. Release with ms_recipe_file_free (NULL is a no-op).
 */
int ms_recipe_file_parse(const char *name, const char *text, size_t len, unsigned flags,
                         struct ms_recipe_file **out);
int ms_recipe_file_load(const char *path, unsigned flags, struct ms_recipe_file **out);
void ms_recipe_file_free(struct ms_recipe_file *f);

/*
 * mergekit-multi's linking (scripts/multimerge.py), for a file of several
 * documents: every model reference (models, slices' sources, base_model,
 * tokenizer_source) whose path is another document's name is rewritten to
 * "intermediate_dir/name" and recorded in f->uses; then f->order, f->out and
 * f->final are filled. Errors (MS_ERECIPE, "r.yml:LINE:COL: ..." at the name or
 * the reference): a duplicate name, more than one unnamed document, a name that
 * is empty or not usable as a folder name ('/', ".", ".."), a document using its
 * own name, and a cycle (naming its documents in order). intermediate_dir may be
 * NULL only when f->n == 1 (then nothing is rewritten). MS_ENOMEM. A reference to
 * a name no document has is left as a model path (the plan reports it missing).
 */
int ms_recipe_file_link(struct ms_recipe_file *f, const char *intermediate_dir);

/* The setting named `name` in params, or NULL. */
const struct ms_setting *ms_params_get(const struct ms_params *p, const char *name);

/* mergekit's ModelReference equality: path, revision, lora, lora_revision and
 * override_architecture all equal (NULL equals only NULL). Positions are ignored. */
bool ms_modelref_eq(const struct ms_modelref *a, const struct ms_modelref *b);

/*
 * Evaluates a setting for tensor `tensor_name` at gradient position t
 * (mergekit-spec.md 1.5-1.6): scalar -> value; gradient -> interpolation in
 * Python double arithmetic; conditional list -> the first entry whose filter is
 * absent, "*" or a substring of tensor_name. Returns true and sets *out when a
 * value results; false means "not set here, fall through" (and for MS_SET_NONE).
 */
bool ms_setting_eval(const struct ms_setting *s, const char *tensor_name, double t, double *out);

#endif
