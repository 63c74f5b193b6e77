/*
 * chat_template.c - the recipe's chat_template (ms_chat_template.h): the
 * built-in templates, `auto`, literal templates, and patching them into a
 * tokenizer_config.json object.
 *
 * The built-in templates are written here from each format's public description
 * (not copied from mergekit): ChatML (OpenAI / Qwen), Llama 3 (Meta's model card),
 * Alpaca (Stanford Alpaca's prompt), Mistral's [INST] format and EXAONE's
 * [|role|] format. They use only what transformers' Jinja environment provides
 * (messages, add_generation_prompt, bos_token, eos_token, raise_exception).
 */
#include <assert.h>
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "ms_chat_template.h"
#include "ms_common.h"
#include "ms_safetensors.h"
#include "ms_str.h"

/* mergekit's minimum for a literal template (merge.py, _set_chat_template). */
#define LITERAL_MIN_LEN 20

static const char tmpl_alpaca[] =
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{{- message['content'] | trim + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{{- '### Instruction:\\n' + message['content'] | trim + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'user_context' -%}\n"
    "{{- '### Input:\\n' + message['content'] | trim + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- '### Response:\\n' + message['content'] | trim + '\\n\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}\n"
    "{{- '### Response:\\n' -}}\n"
    "{%- endif -%}\n";

static const char tmpl_chatml[] =
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n";

static const char tmpl_exaone[] = "{%- for message in messages -%}\n"
                                  "{%- if loop.first and message['role'] != 'system' -%}\n"
                                  "{{- '[|system|][|endofturn|]\\n' -}}\n"
                                  "{%- endif -%}\n"
                                  "{{- '[|' + message['role'] + '|]' + message['content'] -}}\n"
                                  "{%- if message['role'] == 'user' -%}\n"
                                  "{{- '\\n' -}}\n"
                                  "{%- else -%}\n"
                                  "{{- '[|endofturn|]\\n' -}}\n"
                                  "{%- endif -%}\n"
                                  "{%- endfor -%}\n"
                                  "{%- if add_generation_prompt -%}\n"
                                  "{{- '[|assistant|]' -}}\n"
                                  "{%- endif -%}\n";

static const char tmpl_llama3[] =
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "{%- endif -%}\n";

static const char tmpl_mistral[] =
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "{%- set turns = messages[1:] -%}\n"
    "{%- else -%}\n"
    "{%- set system_prefix = '' -%}\n"
    "{%- set turns = messages -%}\n"
    "{%- endif -%}\n"
    "{{- bos_token -}}\n"
    "{%- for message in turns -%}\n"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "{{- raise_exception('roles must alternate user/assistant after an optional system "
    "message') -}}\n"
    "{%- endif -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{{- '[INST] ' + (system_prefix if loop.first else '') + message['content'] + ' [/INST]' "
    "-}}\n"
    "{%- else -%}\n"
    "{{- ' ' + message['content'] + eos_token -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n";

const char *const ms_chat_template_names[] = { "alpaca", "chatml",  "exaone",
                                               "llama3", "mistral", NULL };
static const char *const builtin_text[] = { tmpl_alpaca, tmpl_chatml, tmpl_exaone, tmpl_llama3,
                                            tmpl_mistral };

const char *ms_chat_template_builtin(const char *name)
{
    assert(name);
    for (size_t i = 0; ms_chat_template_names[i]; i++)
        if (!strcmp(name, ms_chat_template_names[i]))
            return builtin_text[i];
    return NULL;
}

int ms_chat_template_check(const char *spec)
{
    assert(spec);
    if (!strcmp(spec, "auto") || ms_chat_template_builtin(spec))
        return 0;
    if (strlen(spec) < LITERAL_MIN_LEN || !strchr(spec, '{'))
        return ms_error(MS_ERECIPE,
                        "invalid chat_template '%.40s%s': not auto, not a built-in "
                        "name (alpaca, chatml, exaone, llama3, mistral), and too short or "
                        "without '{' for a Jinja template",
                        spec, strlen(spec) > 40 ? "..." : "");
    return 0;
}

/* Python's str.strip(): a copy without leading and trailing whitespace. */
static char *strip_dup(const char *s, size_t n)
{
    while (n && isspace((unsigned char)*s)) {
        s++;
        n--;
    }
    while (n && isspace((unsigned char)s[n - 1]))
        n--;
    return ms_strndup(s, n);
}

/*
 * The template a model folder carries, as transformers loads it: 1 with *out,
 * 0 when it has none (or its files cannot be read: warned), MS_ENOMEM.
 */
static int model_template(const char *dir, char **out)
{
    *out = NULL;
    char *path = ms_asprintf("%s/chat_template.jinja", dir);
    char *data = NULL;
    size_t len = 0;
    json_t *root = NULL;
    int rc = 0;
    if (!path)
        return ms_error(MS_ENOMEM, "out of memory");
    if (ms_read_file(path, &data, &len) == 0) {
        *out = strip_dup(data, len);
        rc = *out ? 1 : ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    ms_free(path);
    path = ms_asprintf("%s/tokenizer_config.json", dir);
    if (!path)
        return ms_error(MS_ENOMEM, "out of memory");
    if (ms_read_file(path, &data, &len) != 0)
        goto out;
    json_error_t jerr;
    root = json_loadb(data, len, JSON_DECODE_INT_AS_REAL, &jerr);
    if (!root) {
        ms_log_warn("%s:%d: %s; its chat template is not counted", path, jerr.line, jerr.text);
        goto out;
    }
    json_t *t = json_object_get(root, "chat_template");
    if (json_is_array(t)) {
        json_t *e, *pick = NULL;
        size_t i;
        json_array_foreach(t, i, e)
        {
            const char *n = json_string_value(json_object_get(e, "name"));
            if (n && !strcmp(n, "default"))
                pick = json_object_get(e, "template");
        }
        t = pick;
    }
    const char *s = json_string_value(t);
    if (s && *s) {
        *out = strip_dup(s, strlen(s));
        rc = *out ? 1 : ms_error(MS_ENOMEM, "out of memory");
        if (rc == 1 && !**out) {
            ms_free(*out);
            *out = NULL;
            rc = 0;
        }
    }
out:
    json_decref(root);
    ms_free(data);
    ms_free(path);
    return rc;
}

int ms_chat_template_resolve(const char *spec, const char *const *dirs, size_t ndirs, char **out)
{
    assert(spec && out);
    *out = NULL;
    int rc = ms_chat_template_check(spec);
    if (rc)
        return rc;
    if (strcmp(spec, "auto")) {
        const char *b = ms_chat_template_builtin(spec);
        *out = ms_strdup(b ? b : spec);
        return *out ? 0 : ms_error(MS_ENOMEM, "out of memory");
    }
    char **found = ms_calloc(ndirs ? ndirs : 1, sizeof *found);
    if (!found)
        return ms_error(MS_ENOMEM, "out of memory");
    size_t nfound = 0;
    for (size_t i = 0; i < ndirs && !rc; i++) {
        char *t = NULL;
        rc = model_template(dirs[i], &t);
        if (rc == 1) {
            found[nfound++] = t;
            rc = 0;
        } else if (rc == 0) {
            ms_log_warn("%s: no chat template; not counted for chat_template: auto", dirs[i]);
        }
    }
    /* Counter.most_common(1): the highest count, the first met on a tie. */
    size_t best = SIZE_MAX, best_n = 0;
    for (size_t i = 0; i < nfound && !rc; i++) {
        size_t n = 0;
        for (size_t j = 0; j < nfound; j++)
            n += !strcmp(found[i], found[j]);
        if (n > best_n) {
            best_n = n;
            best = i;
        }
    }
    if (!rc && best != SIZE_MAX) {
        *out = found[best];
        found[best] = NULL;
    }
    for (size_t i = 0; i < nfound; i++)
        ms_free(found[i]);
    ms_free(found);
    return rc;
}

int ms_chat_template_patch(struct json_t *tokcfg, const char *tmpl)
{
    assert(json_is_object(tokcfg) && tmpl);
    json_t *s = json_string(tmpl);
    if (!s || json_object_set_new(tokcfg, "chat_template", s))
        return ms_error(MS_ENOMEM, "out of memory");
    return 0;
}

int ms_chat_template_apply(const char *name, const char *text, size_t len, const char *tmpl,
                           char **out, size_t *out_len)
{
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    char *dump = NULL;
    int rc = 0;
    *out = NULL;
    *out_len = 0;
    if (!root && strstr(jerr.text, "too big"))
        /* Python reads any integer; keep such numbers as reals rather than fail. */
        root = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_INT_AS_REAL, &jerr);
    if (!root) {
        rc = ms_error(MS_EMODEL, "%s:%d:%d: %s", name, jerr.line, jerr.column, jerr.text);
        goto out;
    }
    if (!json_is_object(root)) {
        rc = ms_error(MS_EMODEL, "%s: not a JSON object; cannot set its chat_template", name);
        goto out;
    }
    if ((rc = ms_chat_template_patch(root, tmpl)) < 0)
        goto out;
    dump = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (!dump) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    size_t n = strlen(dump);
    *out = ms_malloc(n + 2);
    if (!*out) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    memcpy(*out, dump, n);
    (*out)[n] = '\n';
    (*out)[n + 1] = 0;
    *out_len = n + 1;
out:
    ms_free(dump);
    json_decref(root);
    return rc;
}
