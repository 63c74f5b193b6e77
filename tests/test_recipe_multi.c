/*
 * test_recipe_multi.c - recipe files of several documents (mergekit-multi), the
 * modules form, and other tools' files:
 * a two-stage file gives the bytes of its two stages run one by one with the CLI,
 * and a complete intermediate is skipped on the next run (--no-lazy rebuilds it);
 * cycles, duplicate names, two unnamed documents, a missing --intermediate-dir and
 * a name no document has are one-line errors; `modules: {default: ...}` gives the
 * bytes of the equivalent slices recipe (module parameters between slice and
 * global ones, written out by hand as one conditional list); a mergekit-moe or
 * mergekit-evolve config says what it is.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_recipe.h"
#include "th.h"

static char *g_dir;

#define RUN_OK(...) TH_RUN_OK(g_dir, __VA_ARGS__)

static void put(const char *name, const char *text)
{
    char *p = th_path(g_dir, name);
    cr_assert_eq(th_write(p, text, strlen(text)), 0);
    free(p);
}

/* Runs the command in g_dir, expects exit status `want` and `needle` in stderr. */
static void run_fails(int want, const char *needle, const char *cmd)
{
    char *err = NULL;
    int rc = th_run_in(g_dir, NULL, &err, "%s", cmd);
    cr_assert_eq(rc, want, "%s: exit %d\n%s", cmd, rc, err);
    cr_assert(err && strstr(err, needle), "%s: stderr lacks '%s':\n%s", cmd, needle, err);
    free(err);
}

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    RUN_OK("ms-mkmodel --layers 3 --hidden 32 --intermediate 48 --vocab 32 --seed 1 base >/dev/null"
           " && ms-mkmodel --base base --noise 0.01 --seed 2 ft1 >/dev/null"
           " && ms-mkmodel --base base --noise 0.01 --seed 3 ft2 >/dev/null");
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(multi, .init = setup, .fini = teardown, .timeout = 120);

#define STAGE1_BODY                                                                                \
    "merge_method: ties\n"                                                                         \
    "base_model: base\n"                                                                           \
    "models:\n"                                                                                    \
    "  - model: ft1\n"                                                                             \
    "    parameters: {weight: 0.7, density: 0.5}\n"                                                \
    "  - model: ft2\n"                                                                             \
    "    parameters: {weight: 0.4, density: 0.6}\n"
#define STAGE2_BODY(ref)                                                                           \
    "merge_method: slerp\n"                                                                        \
    "base_model: base\n"                                                                           \
    "models:\n"                                                                                    \
    "  - model: base\n"                                                                            \
    "  - model: " ref "\n"                                                                         \
    "parameters:\n"                                                                                \
    "  t: [0.1, 0.8]\n"

static const char two_stage[] = "name: mix\n" STAGE1_BODY "---\n" STAGE2_BODY("mix");

/* The files of a merge that do not quote the recipe. */
static const char *const model_files[] = { "model.safetensors", "config.json", "tokenizer.json",
                                           "tokenizer_config.json", "special_tokens_map.json" };

Test(multi, two_stages_equal_the_stages_run_one_by_one)
{
    put("two.yml", two_stage);
    put("s1.yml", STAGE1_BODY);
    put("s2.yml", STAGE2_BODY("one/mix"));
    RUN_OK("mergestream merge two.yml out --intermediate-dir inter -q");
    RUN_OK("mergestream merge s1.yml one/mix -q && mergestream merge s2.yml one/out -q");
    for (size_t i = 0; i < sizeof model_files / sizeof *model_files; i++) {
        RUN_OK("cmp inter/mix/%s one/mix/%s", model_files[i], model_files[i]);
        RUN_OK("cmp out/%s one/out/%s", model_files[i], model_files[i]);
    }
    /* Each stage saves its own document as its recipe. */
    put("want1.yml", "name: mix\n" STAGE1_BODY);
    put("want2.yml", STAGE2_BODY("mix"));
    RUN_OK("cmp want1.yml inter/mix/mergekit_config.yml");
    RUN_OK("cmp want2.yml out/mergekit_config.yml");
    RUN_OK("mergestream verify out >/dev/null && mergestream verify inter/mix >/dev/null");
    /* The stage changed the model: the final output is not the base's slerp with ft1. */
    char *a = th_path(g_dir, "out/model.safetensors"),
         *b = th_path(g_dir, "base/model.safetensors");
    cr_assert_neq(th_cmp_files(a, b), 0);
    free(a);
    free(b);
}

Test(multi, a_complete_intermediate_is_skipped)
{
    put("two.yml", two_stage);
    RUN_OK("mergestream merge two.yml out --intermediate-dir inter -q");
    /* Put another model in the intermediate's place: a skipped stage leaves it there, and
     * the final merge then reads it. */
    RUN_OK("cp ft2/model.safetensors inter/mix/model.safetensors");
    char *err = NULL;
    int rc =
        th_run_in(g_dir, NULL, &err, "mergestream merge two.yml out2 --intermediate-dir inter");
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(err, "stage 'mix': inter/mix holds a complete model; skipped"), "%s", err);
    free(err);
    RUN_OK("cmp ft2/model.safetensors inter/mix/model.safetensors");
    put("s2.yml", STAGE2_BODY("ft2"));
    RUN_OK("mergestream merge s2.yml want -q && cmp want/model.safetensors out2/model.safetensors");
    /* --no-lazy rebuilds it; a stopped stage (run file left) is rebuilt too. */
    RUN_OK("mergestream merge two.yml out3 --intermediate-dir inter -q --no-lazy");
    RUN_OK("cmp out/model.safetensors out3/model.safetensors");
    RUN_OK("cp ft2/model.safetensors inter/mix/model.safetensors && "
           "echo '{}' > inter/mix/.mergestream-run.json");
    RUN_OK("mergestream merge two.yml out4 --intermediate-dir inter -q --force");
    RUN_OK("cmp out/model.safetensors out4/model.safetensors");
}

Test(multi, plan_checks_what_it_can)
{
    put("two.yml", two_stage);
    char *out = NULL;
    int rc = th_run_in(g_dir, &out, NULL, "mergestream plan two.yml --intermediate-dir inter");
    cr_assert_eq(rc, 0);
    cr_assert(strstr(out, "stage 1 of 2: mix -> inter/mix"), "%s", out);
    cr_assert(strstr(out, "reads 'mix' (inter/mix), not built yet"), "%s", out);
    free(out);
    /* A bad method in the pending stage is still found before anything runs. */
    put("bad.yml", "name: mix\n" STAGE1_BODY "---\nmerge_method: slerpp\nmodels:\n"
                   "  - model: mix\n");
    run_fails(1, "bad.yml:10:15: merge method 'slerpp' is unknown",
              "mergestream merge bad.yml out --intermediate-dir inter -q");
    RUN_OK("test ! -e inter/mix/model.safetensors && test ! -e out");
    /* Once the stage exists, the next one is planned in full. */
    RUN_OK("mergestream merge two.yml out --intermediate-dir inter -q");
    rc = th_run_in(g_dir, &out, NULL, "mergestream plan two.yml --intermediate-dir inter");
    cr_assert_eq(rc, 0);
    cr_assert(strstr(out, "inter/mix -> inter/mix"), "%s", out);
    free(out);
}

Test(multi, link_errors)
{
    put("cycle.yml", "name: a\nmerge_method: linear\nmodels:\n  - model: b\n"
                     "    parameters: {weight: 1}\n---\n"
                     "name: b\nmerge_method: linear\nmodels:\n  - model: a\n"
                     "    parameters: {weight: 1}\n");
    run_fails(1, "cycle.yml:1:7: circular dependency between documents: a -> b -> a",
              "mergestream plan cycle.yml --intermediate-dir i");
    put("dup.yml",
        "name: a\nmerge_method: linear\nmodels: [{model: base, parameters: {weight: 1}}]\n"
        "---\nname: a\nmerge_method: linear\nmodels: [{model: ft1, parameters: "
        "{weight: 1}}]\n");
    run_fails(1, "dup.yml:5:7: duplicate merge name 'a' (first at 1:7)",
              "mergestream merge dup.yml out --intermediate-dir i");
    put("two_unnamed.yml",
        "merge_method: linear\nmodels: [{model: base, parameters: {weight: 1}}]\n"
        "---\nmerge_method: linear\nmodels: [{model: ft1, parameters: "
        "{weight: 1}}]\n");
    run_fails(1, "two_unnamed.yml:4:1: a second document without a name (the first is at 1:1)",
              "mergestream merge two_unnamed.yml out --intermediate-dir i");
    put("self.yml", "name: a\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
                    "---\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n");
    run_fails(1, "self.yml:3:18: document 'a' uses its own output as a model",
              "mergestream plan self.yml --intermediate-dir i");
    put("slash.yml", "name: ../x\nmerge_method: linear\nmodels: [{model: base, parameters: "
                     "{weight: 1}}]\n---\nmerge_method: linear\nmodels: [{model: ft1, "
                     "parameters: {weight: 1}}]\n");
    run_fails(1, "slash.yml:1:7: name '../x' cannot be a folder name",
              "mergestream plan slash.yml --intermediate-dir i");
    put("two.yml", two_stage);
    run_fails(2, "--intermediate-dir DIR is needed", "mergestream merge two.yml out -q");
    /* A name no document has is a model path, reported missing before anything runs. */
    put("unknown.yml", "name: mix\n" STAGE1_BODY "---\n" STAGE2_BODY("mixx"));
    run_fails(1, "mixx", "mergestream merge unknown.yml out --intermediate-dir inter -q");
    RUN_OK("test ! -e inter/mix/model.safetensors");
}

Test(multi, example_two_stage_recipe_runs)
{
    RUN_OK("mkdir demo && ln -s ../base demo/base && ln -s ../ft1 demo/ft1 && "
           "ln -s ../ft2 demo/ft2");
    RUN_OK("mergestream merge '%s/recipes/multi/two-stage.yml' out --intermediate-dir st -q && "
           "mergestream verify out >/dev/null && test -s st/ft-mix/model.safetensors",
           MS_SOURCE_DIR);
}

/* ------------------------------------------------------------------ modules */

#define SLICES                                                                                     \
    "    slices:\n"                                                                                \
    "      - sources:\n"                                                                           \
    "          - {model: base, layer_range: [0, 2]}\n"                                             \
    "          - {model: ft1, layer_range: [1, 3]}\n"

Test(multi, modules_equal_the_slices_recipe)
{
    /* Module parameters sit between the slice's and the global ones (mergekit's
     * ConfigReader): a conditional module weight that matches nothing falls through
     * to the global weight. */
    put("mod.yml", "merge_method: linear\n"
                   "parameters: {weight: 0.7, normalize: false}\n"
                   "modules:\n"
                   "  default:\n"
                   "    parameters:\n"
                   "      weight:\n"
                   "        - filter: mlp\n"
                   "          value: 0.2\n" SLICES);
    put("sl.yml", "merge_method: linear\n"
                  "parameters:\n"
                  "  normalize: false\n"
                  "  weight:\n"
                  "    - {filter: mlp, value: 0.2}\n"
                  "    - {value: 0.7}\n"
                  "slices:\n"
                  "  - sources:\n"
                  "      - {model: base, layer_range: [0, 2]}\n"
                  "      - {model: ft1, layer_range: [1, 3]}\n");
    put("flat.yml", "merge_method: linear\n"
                    "parameters: {weight: 0.7, normalize: false}\n"
                    "slices:\n"
                    "  - sources:\n"
                    "      - {model: base, layer_range: [0, 2]}\n"
                    "      - {model: ft1, layer_range: [1, 3]}\n");
    RUN_OK("mergestream merge mod.yml m -q && mergestream merge sl.yml s -q && "
           "mergestream merge flat.yml f -q");
    RUN_OK("cmp m/model.safetensors s/model.safetensors && cmp m/config.json s/config.json");
    char *a = th_path(g_dir, "m/model.safetensors"), *b = th_path(g_dir, "f/model.safetensors");
    cr_assert_neq(th_cmp_files(a, b), 0, "the module's weight had no effect");
    free(a);
    free(b);
    /* A scalar module value wins over the global one. */
    put("mod2.yml", "merge_method: linear\nparameters: {weight: 0.3, normalize: false}\n"
                    "modules:\n  default:\n    parameters: {weight: 0.7}\n" SLICES);
    RUN_OK("mergestream merge mod2.yml m2 -q && cmp m2/model.safetensors f/model.safetensors");
    /* The models form inside a module. */
    put("modm.yml", "merge_method: linear\nmodules:\n  default:\n    models:\n"
                    "      - {model: base, parameters: {weight: 0.6}}\n"
                    "      - {model: ft1, parameters: {weight: 0.4}}\n");
    put("m.yml", "merge_method: linear\nmodels:\n"
                 "  - {model: base, parameters: {weight: 0.6}}\n"
                 "  - {model: ft1, parameters: {weight: 0.4}}\n");
    RUN_OK("mergestream merge modm.yml mm -q && mergestream merge m.yml mmm -q && "
           "cmp mm/model.safetensors mmm/model.safetensors");
}

Test(multi, modules_errors)
{
    put("vl.yml", "merge_method: linear\nmodules:\n  vision_tower:\n    models: [{model: base, "
                  "parameters: {weight: 1}}]\n");
    run_fails(1,
              "vl.yml:3:3: module 'vision_tower': the architectures mergestream supports "
              "have one module, 'default'",
              "mergestream plan vl.yml");
    put("two.yml", "merge_method: linear\nmodules:\n  default:\n    models: [{model: base}]\n"
                   "  vision_tower:\n    models: [{model: base}]\n");
    run_fails(1, "two.yml:5:3: modules: more than one module ('default', 'vision_tower')",
              "mergestream plan two.yml");
    put("both.yml",
        "merge_method: linear\nmodules:\n  default:\n    models: [{model: base}]\n" SLICES);
    run_fails(1, "both.yml:4:5: module 'default' must have either 'models' or 'slices'",
              "mergestream plan both.yml");
}

/* ------------------------------------------------------------------ other tools */

static void parse_fails(const char *text, const char *needle)
{
    struct ms_recipe *r = NULL;
    int rc = ms_recipe_parse("r.yml", text, strlen(text), &r);
    cr_assert_eq(rc, MS_ERECIPE);
    cr_assert_null(r);
    cr_assert(strstr(ms_errmsg(), needle), "'%s' lacks '%s'", ms_errmsg(), needle);
}

Test(multi, other_tools_files_are_named)
{
    parse_fails("base_model: mistralai/Mistral-7B-v0.1\ngate_mode: hidden\ndtype: bfloat16\n"
                "experts:\n  - source_model: a\n    positive_prompts: [\"code\"]\n",
                "r.yml:1:1: this is a mergekit-moe config (it has 'experts'): mergestream does "
                "not build mixture-of-experts models; use mergekit-moe");
    parse_fails("genome:\n  models: [a, b]\n  merge_method: ties\ntasks:\n  - name: arc\n",
                "this is a mergekit-evolve config");
    parse_fails("{\"peft_type\": \"LORA\", \"r\": 8}", "this is a PEFT adapter config");
    parse_fails("{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 8}",
                "this is a model's config.json, not a merge recipe");
    /* With merge_method, mergekit reads it as a recipe and so do we. */
    struct ms_recipe *r = NULL;
    const char *ok = "merge_method: linear\nexperts: 3\nmodels: [{model: a}]\n";
    cr_assert_eq(ms_recipe_parse("r.yml", ok, strlen(ok), &r), 0);
    ms_recipe_free(r);
}

Test(multi, single_document_api_refuses_several)
{
    struct ms_recipe *r = NULL;
    cr_assert_eq(ms_recipe_parse("r.yml", two_stage, strlen(two_stage), &r), MS_ERECIPE);
    cr_assert(strstr(ms_errmsg(), "r.yml:9:1: expected a single yaml document"), "%s", ms_errmsg());
    struct ms_recipe_file *f = NULL;
    cr_assert_eq(ms_recipe_file_parse("r.yml", two_stage, strlen(two_stage), 0, &f), 0);
    cr_assert_eq(f->n, 2);
    cr_assert_str_eq(f->docs[0]->name, "mix");
    cr_assert_null(f->docs[1]->name);
    cr_assert_eq(ms_recipe_file_link(f, "d"), 0);
    cr_assert_eq(f->order[0], 0);
    cr_assert_eq(f->order[1], 1);
    cr_assert_eq(f->final, 1);
    cr_assert_str_eq(f->out[0], "d/mix");
    cr_assert_str_eq(f->docs[1]->models[1].model.path, "d/mix");
    cr_assert(f->uses[1 * 2 + 0]);
    ms_recipe_file_free(f);
    /* A trailing "---" adds no document. */
    const char *one = "merge_method: linear\nmodels: [{model: a}]\n---\n";
    cr_assert_eq(ms_recipe_file_parse("r.yml", one, strlen(one), 0, &f), 0);
    cr_assert_eq(f->n, 1);
    ms_recipe_file_free(f);
}

/* ------------------------------------------------------------------ large recipes */

Test(multi, large_mappings_find_duplicates)
{
    /* Past the linear-scan size the duplicate check is a hash: every duplicate is still
     * found, pointing at the first occurrence. */
    size_t cap = 64 * 1024;
    char *t = malloc(cap);
    cr_assert(t);
    for (int dup = 0; dup < 3; dup++) {
        size_t o = (size_t)snprintf(t, cap,
                                    "merge_method: linear\nmodels: [{model: a}]\n"
                                    "parameters:\n");
        for (int i = 0; i < 3000; i++)
            o += (size_t)snprintf(t + o, cap - o, "  k%d: %d\n", i, i);
        /* dup 0: none; 1: the 1st key again; 2: the 2000th again */
        if (dup)
            o += (size_t)snprintf(t + o, cap - o, "  k%d: 1\n", dup == 1 ? 0 : 1999);
        struct ms_recipe *r = NULL;
        int rc = ms_recipe_parse("r.yml", t, o, &r);
        if (!dup) {
            cr_assert_eq(rc, 0, "%s", ms_errmsg());
            cr_assert_eq(r->params.n, 3000);
            cr_assert_eq(ms_params_get(&r->params, "k2999")->scalar, 2999);
            ms_recipe_free(r);
        } else {
            char want[96];
            snprintf(want, sizeof want, "r.yml:3004:3: duplicate key 'k%d' (first at %d:3)",
                     dup == 1 ? 0 : 1999, dup == 1 ? 4 : 2003);
            cr_assert_eq(rc, MS_ERECIPE);
            cr_assert(strstr(ms_errmsg(), want), "'%s' lacks '%s'", ms_errmsg(), want);
        }
    }
    free(t);
}

Test(multi, deep_nesting_is_refused_at_once)
{
    size_t depth = 100000;
    char *t = malloc(2 * depth + 128);
    cr_assert(t);
    size_t o = (size_t)sprintf(t, "merge_method: linear\nmodels: [{model: a}]\nx: ");
    memset(t + o, '[', depth);
    memset(t + o + depth, ']', depth);
    o += 2 * depth;
    struct ms_recipe *r = NULL;
    cr_assert_eq(ms_recipe_parse("r.yml", t, o, &r), MS_ERECIPE);
    cr_assert(strstr(ms_errmsg(), "r.yml:3:67: nested deeper than 64 levels"), "%s", ms_errmsg());
    free(t);
    /* 64 levels are fine (an unknown key's value, ignored). */
    o = (size_t)sprintf(t = malloc(512), "merge_method: linear\nmodels: [{model: a}]\nx: ");
    memset(t + o, '[', 62);
    memset(t + o + 62, ']', 62);
    o += 124;
    cr_assert_eq(ms_recipe_parse("r.yml", t, o, &r), 0, "%s", ms_errmsg());
    ms_recipe_free(r);
    free(t);
}
