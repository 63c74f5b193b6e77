/*
 * test_chat_template.c - the recipe's chat_template end to end: `auto` (most
 * common among the inputs, first met on a tie), the built-in names (rendered with
 * Python's jinja2, as transformers renders them, and compared with each format's
 * published layout written out by hand below), a literal template, an invalid
 * one, a donor without tokenizer_config.json, and no chat_template at all (the
 * donor's file byte for byte).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "th.h"

static char *g_dir;

#define RUN_OK(...) TH_RUN_OK(g_dir, __VA_ARGS__)

/* Writes tokenizer_config.json for model dir with chat_template tmpl (NULL: none). */
static void set_template(const char *dir, const char *tmpl)
{
    json_t *o = json_pack("{s:b, s:s, s:s, s:s}", "add_bos_token", 1, "bos_token", "<s>",
                          "eos_token", "</s>", "tokenizer_class", "PreTrainedTokenizerFast");
    cr_assert(o);
    if (tmpl)
        json_object_set_new(o, "chat_template", json_string(tmpl));
    char *p = th_path(g_dir, dir);
    char *f = th_path(p, "tokenizer_config.json");
    cr_assert_eq(json_dump_file(o, f, JSON_INDENT(2)), 0);
    json_decref(o);
    free(f);
    free(p);
}

static void write_recipe(const char *name, const char *text)
{
    char *p = th_path(g_dir, name);
    cr_assert_eq(th_write(p, text, strlen(text)), 0);
    free(p);
}

/* r.yml = head followed by the three-model recipe. */
static void recipe_with(const char *head);

/* The "chat_template" string of OUT/tokenizer_config.json (malloc'd), or NULL. */
static char *out_template(const char *out)
{
    char *d = th_path(g_dir, out);
    char *f = th_path(d, "tokenizer_config.json");
    json_error_t e;
    json_t *o = json_load_file(f, 0, &e);
    cr_assert(o, "%s: %s", f, e.text);
    const char *s = json_string_value(json_object_get(o, "chat_template"));
    char *r = s ? strdup(s) : NULL;
    json_decref(o);
    free(f);
    free(d);
    return r;
}

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    RUN_OK("ms-mkmodel --layers 1 --hidden 16 --intermediate 16 --vocab 16 --seed 1 a >/dev/null"
           " && ms-mkmodel --base a --noise 0.01 --seed 2 b >/dev/null"
           " && ms-mkmodel --base a --noise 0.01 --seed 3 c >/dev/null");
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(chat_template, .init = setup, .fini = teardown, .timeout = 120);

static const char three[] = "merge_method: linear\n"
                            "models:\n"
                            "  - model: a\n"
                            "    parameters: {weight: 1}\n"
                            "  - model: b\n"
                            "    parameters: {weight: 1}\n"
                            "  - model: c\n"
                            "    parameters: {weight: 1}\n";

static void recipe_with(const char *head)
{
    char buf[1024];
    snprintf(buf, sizeof buf, "%s%s", head, three);
    write_recipe("r.yml", buf);
}

#define T1 "{% for m in messages %}ONE {{ m['content'] }}{% endfor %}"
#define T2 "{% for m in messages %}TWO {{ m['content'] }}{% endfor %}"

Test(chat_template, auto_takes_the_most_common)
{
    set_template("a", T1);
    set_template("b", "  " T2 "\n"); /* compared after strip(), as mergekit does */
    write_recipe("c/chat_template.jinja", T2);
    recipe_with("chat_template: auto\n");
    RUN_OK("mergestream merge r.yml out -q");
    char *t = out_template("out");
    cr_assert_str_eq(t, T2);
    free(t);
}

Test(chat_template, auto_tie_takes_the_first_met)
{
    set_template("a", T1);
    set_template("b", T2);
    set_template("c", NULL);
    recipe_with("chat_template: auto\n");
    RUN_OK("mergestream merge r.yml out -q");
    char *t = out_template("out");
    cr_assert_str_eq(t, T1);
    free(t);
}

Test(chat_template, auto_with_no_template_copies_verbatim)
{
    recipe_with("chat_template: auto\n");
    RUN_OK("mergestream merge r.yml out -q 2>/dev/null");
    RUN_OK("cmp a/tokenizer_config.json out/tokenizer_config.json");
}

Test(chat_template, literal_is_written_as_given)
{
    recipe_with("chat_template: \"{% for m in messages %}<<{{ m.content }}>>"
                "{% endfor %}\\n\"\n");
    RUN_OK("printf 'x' > a/chat_template.jinja"); /* the loaders would prefer it: not copied */
    RUN_OK("mergestream merge r.yml out -q");
    char *t = out_template("out");
    cr_assert_str_eq(t, "{% for m in messages %}<<{{ m.content }}>>{% endfor %}\n");
    free(t);
    RUN_OK("test ! -e out/chat_template.jinja");
    /* Everything else of the donor's file stays. */
    RUN_OK("grep -q '\"tokenizer_class\": \"PreTrainedTokenizerFast\"' out/tokenizer_config.json");
}

Test(chat_template, invalid_literal_is_a_recipe_error)
{
    recipe_with("chat_template: '{ short }'\n");
    char *err = NULL;
    int rc = th_run_in(g_dir, NULL, &err, "mergestream merge r.yml out -q");
    cr_assert_eq(rc, 1);
    cr_assert(strstr(err, "r.yml:1:16: invalid chat_template '{ short }'"), "%s", err);
    free(err);
    RUN_OK("test ! -e out/model.safetensors");
    recipe_with("chat_template: chatml_typo_not_a_template\n");
    rc = th_run_in(g_dir, NULL, &err, "mergestream plan r.yml");
    cr_assert_eq(rc, 1);
    cr_assert(strstr(err, "invalid chat_template 'chatml_typo_not_a_template'"), "%s", err);
    free(err);
}

Test(chat_template, without_chat_template_the_copy_is_byte_identical)
{
    set_template("a", T1);
    RUN_OK("printf 'x' > a/chat_template.jinja");
    write_recipe("r.yml", three);
    RUN_OK("mergestream merge r.yml out -q");
    RUN_OK("cmp a/tokenizer_config.json out/tokenizer_config.json");
    RUN_OK("cmp a/chat_template.jinja out/chat_template.jinja");
}

/* mergekit-spec.md 4.6: generation_config.json is copied only when no chat_template is
 * set (with one, the tokenizer is re-serialised, which does not write it), `auto` that
 * finds no template included. */
Test(chat_template, generation_config_is_copied_only_without_chat_template)
{
    RUN_OK("printf '{\"do_sample\": true}' > a/generation_config.json && "
           "printf '{}' > a/video_preprocessor_config.json");
    write_recipe("r.yml", three);
    RUN_OK("mergestream merge r.yml plain -q");
    RUN_OK("cmp a/generation_config.json plain/generation_config.json && "
           "cmp a/video_preprocessor_config.json plain/video_preprocessor_config.json");
    recipe_with("chat_template: chatml\n");
    RUN_OK("mergestream merge r.yml tmpl -q");
    RUN_OK("test -e tmpl/tokenizer_config.json && test ! -e tmpl/generation_config.json && "
           "test ! -e tmpl/video_preprocessor_config.json");
    recipe_with("chat_template: auto\n");
    RUN_OK("mergestream merge r.yml auto -q 2>/dev/null");
    RUN_OK("test ! -e auto/generation_config.json");
}

Test(chat_template, donor_without_tokenizer_config_gets_one)
{
    RUN_OK("rm a/tokenizer_config.json");
    recipe_with("chat_template: chatml\n");
    RUN_OK("mergestream merge r.yml out -q");
    char *t = out_template("out");
    cr_assert(t && strstr(t, "<|im_start|>"));
    free(t);
    RUN_OK("cmp a/tokenizer.json out/tokenizer.json");
}

/*
 * Each built-in name, rendered by jinja2 with transformers' settings from the
 * written tokenizer_config.json, against the format's layout as published:
 * ChatML (OpenAI/Qwen), Llama 3 (Meta), Alpaca (Stanford), Mistral [INST], EXAONE.
 */
static const struct {
    const char *name, *messages, *expected;
    int gen;
} formats[] = {
    { "chatml", "[('system','S'),('user','U'),('assistant','A')]",
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
      "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n",
      1 },
    { "llama3", "[('system','S'),('user',' U ')]",
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n",
      1 },
    { "alpaca", "[('system','S'),('user','U'),('user_context','I'),('assistant','A'),('user','V')]",
      "S\n\n### Instruction:\nU\n\n### Input:\nI\n\n### Response:\nA\n\n### Instruction:\nV\n\n"
      "### Response:\n",
      1 },
    { "mistral", "[('system','S'),('user','U'),('assistant','A'),('user','V')]",
      "<s>[INST] S\n\nU [/INST] A</s>[INST] V [/INST]", 1 },
    { "exaone", "[('user','U'),('assistant','A')]",
      "[|system|][|endofturn|]\n[|user|]U\n[|assistant|]A[|endofturn|]\n[|assistant|]", 1 },
};

Test(chat_template, builtin_names_render_their_format)
{
    char *o = NULL;
    if (th_run_in(g_dir, &o, NULL, "python3 -c 'import jinja2'") != 0)
        cr_skip_test("python3 with jinja2 is needed to render the templates");
    free(o);
    static const char py[] =
        "import json, sys, jinja2\n"
        "def rx(m):\n"
        "    raise Exception(m)\n"
        "t = json.load(open(sys.argv[1]))['chat_template']\n"
        "env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)\n"
        "env.globals['raise_exception'] = rx\n"
        "msgs = [{'role': r, 'content': c} for r, c in eval(sys.argv[2])]\n"
        "sys.stdout.write(env.from_string(t).render(messages=msgs, "
        "add_generation_prompt=sys.argv[3] == '1', bos_token=sys.argv[4], eos_token='</s>'))\n";
    write_recipe("render.py", py);
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++) {
        char rec[512];
        snprintf(rec, sizeof rec, "chat_template: %s\n%s", formats[i].name, three);
        write_recipe("r.yml", rec);
        RUN_OK("rm -rf out && mergestream merge r.yml out -q");
        char *got = NULL, *err = NULL;
        int rc = th_run_in(g_dir, &got, &err,
                           "python3 render.py out/tokenizer_config.json "
                           "\"%s\" %d '%s'",
                           formats[i].messages, formats[i].gen,
                           !strcmp(formats[i].name, "llama3") ? "<|begin_of_text|>" : "<s>");
        cr_assert_eq(rc, 0, "%s: %s", formats[i].name, err);
        cr_assert_str_eq(got, formats[i].expected, "%s", formats[i].name);
        free(got);
        free(err);
    }
}

Test(chat_template, bad_donor_tokenizer_config_fails_before_the_run)
{
    recipe_with("chat_template: chatml\n");
    RUN_OK("printf '[1, 2]' > a/tokenizer_config.json");
    char *err = NULL;
    int rc = th_run_in(g_dir, NULL, &err, "mergestream merge r.yml out -q");
    cr_assert_eq(rc, 1);
    cr_assert(strstr(err, "a/tokenizer_config.json: not a JSON object"), "%s", err);
    free(err);
    RUN_OK("test ! -e out/model.safetensors");
}
