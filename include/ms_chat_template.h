/*
 * ms_chat_template.h - the recipe's `chat_template` (mergekit-spec.md 1.8, 4.6):
 * `auto`, a built-in name, or a literal Jinja template, and writing it into a
 * tokenizer_config.json object the way the Hugging Face loaders read it.
 *
 * mergekit's rule for telling them apart, in this order: "auto"; a name of a
 * built-in template (ms_chat_template_builtin); anything else is a literal
 * template, which must be at least 20 characters long and contain '{'.
 * Main thread (or any thread: no shared state besides the diagnostic).
 */
#ifndef MS_CHAT_TEMPLATE_H
#define MS_CHAT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

struct json_t;

/* The built-in template called `name` (alpaca, chatml, exaone, llama3, mistral), a
 * static string, or NULL. */
const char *ms_chat_template_builtin(const char *name);
/* The built-in names, NULL-terminated, for messages and --help. */
extern const char *const ms_chat_template_names[];

/* 0 when `spec` is a valid chat_template value, else MS_ERECIPE with
 * "invalid chat_template ..." (the caller adds the recipe position). */
int ms_chat_template_check(const char *spec);

/*
 * The template text that `spec` stands for. For "auto": the template found most
 * often among the models in dirs[0..ndirs) (the order the recipe names them in),
 * read as transformers reads it: the folder's chat_template.jinja, else
 * tokenizer_config.json's "chat_template" (a string, or the "default" entry of a
 * list of {name, template}), surrounding whitespace stripped; on a tie the one
 * met first wins (Python's Counter.most_common). A model without a template or
 * with an unreadable file is skipped with a warning, as mergekit does; when no
 * model has one *out is NULL and 0 is returned. Otherwise *out is the built-in
 * text or `spec` itself. *out is owned by the caller (ms_free). Errors:
 * MS_ERECIPE (invalid literal), MS_ENOMEM.
 */
int ms_chat_template_resolve(const char *spec, const char *const *dirs, size_t ndirs, char **out);

/* Sets tokcfg's "chat_template" to tmpl (replacing any value in place, keeping the
 * key order; appended when absent). tokcfg must be a JSON object. 0 or MS_ENOMEM. */
int ms_chat_template_patch(struct json_t *tokcfg, const char *tmpl);

/*
 * Parses tokenizer_config.json text (`name` for messages), patches it with tmpl and
 * serialises it as transformers does (two-space indent, key order kept, non-ASCII
 * kept, a final newline). Integers too large for 64 bits (model_max_length
 * 1000000000000000019884624838656 is common) are kept as numbers (written as
 * reals). *out (ms_free) and *out_len. Errors: MS_EMODEL (not a JSON object,
 * naming the file), MS_ENOMEM.
 */
int ms_chat_template_apply(const char *name, const char *text, size_t len, const char *tmpl,
                           char **out, size_t *out_len);

#endif
