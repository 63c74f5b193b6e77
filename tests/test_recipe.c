/*
 * test_recipe.c - mergekit YAML recipes (ms_recipe.h): the documented examples,
 * every setting form, ms_setting_eval against hand-computed values, model
 * reference forms, one test per parse error with its exact position, unknown-key
 * warnings, YAML 1.1 scalars, and allocation fault injection.
 */
#include <criterion/criterion.h>
#include <criterion/redirect.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_recipe.h"
#include "th.h"

/* Under ASan, fail the fault-injection tests on a leak (LeakSanitizer's report at
 * exit alone would not fail a Criterion test). */
#if defined(__SANITIZE_ADDRESS__)
#define TH_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TH_LSAN 1
#endif
#endif
#ifdef TH_LSAN
#include <sanitizer/lsan_interface.h>
#define CHECK_NO_LEAKS() \
    cr_assert_eq(__lsan_do_recoverable_leak_check(), 0, "leaks: see LeakSanitizer's report")
#else
#define CHECK_NO_LEAKS() ((void)0)
#endif

/* ------------------------------------------------------------------ helpers */

static struct ms_recipe *parse_ok(const char *yaml)
{
    struct ms_recipe *r = NULL;
    int rc = ms_recipe_parse("r.yml", yaml, strlen(yaml), &r);
    cr_assert_eq(rc, 0, "parse failed (%d): %s", rc, ms_errmsg());
    cr_assert_not_null(r);
    return r;
}

static void expect_error(const char *yaml, const char *msg)
{
    struct ms_recipe *r = (struct ms_recipe *)1;
    int rc = ms_recipe_parse("r.yml", yaml, strlen(yaml), &r);
    cr_assert_eq(rc, MS_ERECIPE, "rc %d, message: %s", rc, ms_errmsg());
    cr_assert_null(r);
    cr_assert_str_eq(ms_errmsg(), msg);
}

static double eval(const struct ms_setting *s, const char *tensor, double t)
{
    double v = -12345;
    cr_assert(ms_setting_eval(s, tensor, t, &v), "no value for %s at t=%g", tensor, t);
    return v;
}

static const struct ms_setting *param(const struct ms_params *p, const char *name)
{
    const struct ms_setting *s = ms_params_get(p, name);
    cr_assert_not_null(s, "no parameter %s", name);
    return s;
}

/* ------------------------------------------------------------------ mergekit examples */

/* mergekit README, linear. */
static const char linear_yaml[] = "models:\n"
                                  "  - model: psmathur/orca_mini_v3_13b\n"
                                  "    parameters:\n"
                                  "      weight: 1.0\n"
                                  "  - model: WizardLM/WizardLM-13B-V1.2\n"
                                  "    parameters:\n"
                                  "      weight: 0.3\n"
                                  "  - model: garage-bAInd/Platypus2-13B\n"
                                  "    parameters:\n"
                                  "      weight: 0.5\n"
                                  "merge_method: linear\n"
                                  "dtype: float16\n";

Test(recipe_examples, linear)
{
    struct ms_recipe *r = parse_ok(linear_yaml);
    cr_assert_str_eq(r->merge_method, "linear");
    cr_assert_eq(r->merge_method_pos.line, 11);
    cr_assert_eq(r->merge_method_pos.col, 15);
    cr_assert_str_eq(r->dtype, "float16");
    cr_assert_null(r->out_dtype);
    cr_assert_eq(r->nslices, 0);
    cr_assert_not(r->has_modules);
    cr_assert_null(r->base_model.path);
    cr_assert_eq(r->nmodels, 3);
    const char *names[] = {"psmathur/orca_mini_v3_13b", "WizardLM/WizardLM-13B-V1.2",
                           "garage-bAInd/Platypus2-13B"};
    const double w[] = {1.0, 0.3, 0.5};
    for (int i = 0; i < 3; i++) {
        struct ms_source *m = &r->models[i];
        cr_assert_str_eq(m->model.path, names[i]);
        cr_assert_null(m->model.revision);
        cr_assert_null(m->model.lora);
        cr_assert_not(m->has_range);
        cr_assert_eq(m->pos.line, 2 + 3 * i);
        cr_assert_eq(m->pos.col, 5);
        cr_assert_eq(m->params.n, 1);
        const struct ms_setting *s = param(&m->params, "weight");
        cr_assert_eq(s->kind, MS_SET_SCALAR);
        cr_assert_eq(s->scalar, w[i]);
        cr_assert_eq(s->pos.line, 4 + 3 * i);
        cr_assert_eq(s->pos.col, 15);
        cr_assert_eq(m->params.v[0].pos.col, 7);
    }
    cr_assert_eq(ms_params_get(&r->models[0].params, "density"), NULL);
    cr_assert_eq(r->text_len, strlen(linear_yaml));
    cr_assert_str_eq(r->text, linear_yaml);
    cr_assert_str_eq(r->path, "r.yml");
    ms_recipe_free(r);
}

/* mergekit README, slerp over slices (layer_range [0, 32]). */
static const char slerp_yaml[] = "slices:\n"
                                 "  - sources:\n"
                                 "      - model: psmathur/orca_mini_v3_13b\n"
                                 "        layer_range: [0, 32]\n"
                                 "      - model: garage-bAInd/Platypus2-13B\n"
                                 "        layer_range: [0, 32]\n"
                                 "merge_method: slerp\n"
                                 "base_model: psmathur/orca_mini_v3_13b\n"
                                 "parameters:\n"
                                 "  t:\n"
                                 "    - filter: self_attn\n"
                                 "      value: [0, 0.5, 0.3, 0.7, 1]\n"
                                 "    - filter: mlp\n"
                                 "      value: [1, 0.5, 0.7, 0.3, 0]\n"
                                 "    - value: 0.5 # fallback for rest of tensors\n"
                                 "dtype: float16\n";

Test(recipe_examples, slerp)
{
    struct ms_recipe *r = parse_ok(slerp_yaml);
    cr_assert_str_eq(r->merge_method, "slerp");
    cr_assert_eq(r->nmodels, 0);
    cr_assert_eq(r->nslices, 1);
    struct ms_slice *sl = &r->slices[0];
    cr_assert_eq(sl->pos.line, 2);
    cr_assert_eq(sl->pos.col, 5);
    cr_assert_null(sl->base_model.path);
    cr_assert_eq(sl->params.n, 0);
    cr_assert_eq(sl->nsources, 2);
    cr_assert_str_eq(sl->sources[0].model.path, "psmathur/orca_mini_v3_13b");
    cr_assert_str_eq(sl->sources[1].model.path, "garage-bAInd/Platypus2-13B");
    for (int i = 0; i < 2; i++) {
        cr_assert(sl->sources[i].has_range);
        cr_assert_eq(sl->sources[i].layer_range[0], 0);
        cr_assert_eq(sl->sources[i].layer_range[1], 32);
        cr_assert_eq(sl->sources[i].model.pos.line, 3 + 2 * i);
        cr_assert_eq(sl->sources[i].model.pos.col, 16);
    }
    cr_assert_str_eq(r->base_model.path, "psmathur/orca_mini_v3_13b");
    cr_assert_eq(r->base_model.pos.line, 8);
    cr_assert_eq(r->base_model.pos.col, 13);

    const struct ms_setting *t = param(&r->params, "t");
    cr_assert_eq(t->kind, MS_SET_COND);
    cr_assert_eq(t->ncond, 3);
    cr_assert_str_eq(t->cond[0].filter, "self_attn");
    cr_assert_eq(t->cond[0].value.kind, MS_SET_GRADIENT);
    cr_assert_eq(t->cond[0].value.ngrad, 5);
    cr_assert_eq(t->cond[0].value.pos.line, 12);
    cr_assert_eq(t->cond[0].value.pos.col, 14);
    cr_assert_str_eq(t->cond[1].filter, "mlp");
    cr_assert_null(t->cond[2].filter);
    cr_assert_eq(t->cond[2].value.kind, MS_SET_SCALAR);
    cr_assert_eq(t->cond[2].value.scalar, 0.5);

    /* 32 layers in one slice: t = i / 31. At i = 0 and 31 the gradient ends. */
    cr_assert_eq(eval(t, "model.layers.0.self_attn.q_proj.weight", 0.0), 0.0);
    cr_assert_eq(eval(t, "model.layers.31.self_attn.q_proj.weight", 1.0), 1.0);
    cr_assert_eq(eval(t, "model.layers.0.mlp.up_proj.weight", 0.0), 1.0);
    cr_assert_eq(eval(t, "model.layers.31.mlp.up_proj.weight", 1.0), 0.0);
    /* t = 0.5: s = 2, i0 = 2, f = 0 -> g[2] exactly (0.3 and 0.7). */
    cr_assert_eq(eval(t, "model.layers.7.self_attn.o_proj.weight", 0.5), 0.3);
    cr_assert_eq(eval(t, "model.layers.7.mlp.down_proj.weight", 0.5), 0.7);
    /* Neither filter matches: the fallback entry with no filter. */
    cr_assert_eq(eval(t, "model.layers.7.input_layernorm.weight", 0.5), 0.5);
    cr_assert_eq(eval(t, "lm_head.weight", 0.0), 0.5);
    ms_recipe_free(r);
}

/* A task_arithmetic recipe in the shape of mergekit's docs: base model listed
 * without parameters, weights per model, a global normalize flag. */
Test(recipe_examples, task_arithmetic)
{
    struct ms_recipe *r = parse_ok("models:\n"
                                   "  - model: meta-llama/Llama-2-7b-hf\n"
                                   "  - model: lmsys/vicuna-7b-v1.5\n"
                                   "    parameters:\n"
                                   "      weight: 0.7\n"
                                   "  - model: WizardLM/WizardMath-7B-V1.0\n"
                                   "    parameters:\n"
                                   "      weight: 0.3\n"
                                   "merge_method: task_arithmetic\n"
                                   "base_model: meta-llama/Llama-2-7b-hf\n"
                                   "parameters:\n"
                                   "  normalize: true\n"
                                   "dtype: bfloat16\n");
    cr_assert_str_eq(r->merge_method, "task_arithmetic");
    cr_assert_eq(r->nmodels, 3);
    cr_assert_eq(r->models[0].params.n, 0);
    cr_assert_eq(param(&r->models[1].params, "weight")->scalar, 0.7);
    cr_assert_eq(param(&r->models[2].params, "weight")->scalar, 0.3);
    cr_assert(ms_modelref_eq(&r->base_model, &r->models[0].model));
    cr_assert_not(ms_modelref_eq(&r->base_model, &r->models[1].model));
    const struct ms_setting *n = param(&r->params, "normalize");
    cr_assert_eq(n->kind, MS_SET_SCALAR);
    cr_assert_eq(n->scalar, 1.0); /* YAML true -> 1.0 */
    cr_assert_str_eq(r->dtype, "bfloat16");
    ms_recipe_free(r);
}

/* mergekit README, ties with density/weight gradients and an mlp filter. */
Test(recipe_examples, ties)
{
    struct ms_recipe *r = parse_ok("models:\n"
                                   "  - model: psmathur/orca_mini_v3_13b\n"
                                   "    parameters:\n"
                                   "      density: [1, 0.7, 0.1] # density gradient\n"
                                   "      weight: 1.0\n"
                                   "  - model: garage-bAInd/Platypus2-13B\n"
                                   "    parameters:\n"
                                   "      density: 0.5\n"
                                   "      weight: [0, 0.3, 0.7, 1] # weight gradient\n"
                                   "  - model: WizardLM/WizardMath-13B-V1.0\n"
                                   "    parameters:\n"
                                   "      density: 0.33\n"
                                   "      weight:\n"
                                   "        - filter: mlp\n"
                                   "          value: 0.5\n"
                                   "        - value: 0\n"
                                   "merge_method: ties\n"
                                   "base_model: TheBloke/Llama-2-13B-fp16\n"
                                   "parameters:\n"
                                   "  normalize: true\n"
                                   "  int8_mask: true\n"
                                   "dtype: float16\n");
    cr_assert_str_eq(r->merge_method, "ties");
    cr_assert_eq(r->nmodels, 3);
    const struct ms_setting *d0 = param(&r->models[0].params, "density");
    cr_assert_eq(d0->kind, MS_SET_GRADIENT);
    cr_assert_eq(d0->ngrad, 3);
    cr_assert_eq(d0->grad[0], 1.0);
    cr_assert_eq(d0->grad[1], 0.7);
    cr_assert_eq(d0->grad[2], 0.1);
    /* t = 0.25: s = 0.5, i0 = 0, f = 0.5: 0.5*1 + 0.5*0.7 = 0.85 */
    cr_assert_eq(eval(d0, "x", 0.25), 0.85);
    /* t = 0.75: s = 1.5, i0 = 1, f = 0.5: 0.5*0.7 + 0.5*0.1 = 0.39999999999999997 in
     * double (0.35 + 0.05 rounds below 0.4). */
    cr_assert_eq(eval(d0, "x", 0.75), 0.5 * 0.7 + 0.5 * 0.1);
    cr_assert_eq(eval(d0, "x", 0.75), 0.39999999999999997);

    const struct ms_setting *w1 = param(&r->models[1].params, "weight");
    cr_assert_eq(w1->kind, MS_SET_GRADIENT);
    cr_assert_eq(w1->ngrad, 4);
    /* t = 0.5: s = 1.5, i0 = 1, f = 0.5: 0.5*0.3 + 0.5*0.7 = 0.5 */
    cr_assert_eq(eval(w1, "x", 0.5), 0.5);
    cr_assert_eq(param(&r->models[1].params, "density")->scalar, 0.5);

    const struct ms_setting *w2 = param(&r->models[2].params, "weight");
    cr_assert_eq(w2->kind, MS_SET_COND);
    cr_assert_eq(w2->ncond, 2);
    cr_assert_eq(eval(w2, "model.layers.3.mlp.gate_proj.weight", 0.3), 0.5);
    cr_assert_eq(eval(w2, "model.layers.3.self_attn.k_proj.weight", 0.3), 0.0);
    cr_assert_eq(param(&r->models[2].params, "density")->scalar, 0.33);

    cr_assert_eq(param(&r->params, "normalize")->scalar, 1.0);
    cr_assert_eq(param(&r->params, "int8_mask")->scalar, 1.0);
    cr_assert_str_eq(r->base_model.path, "TheBloke/Llama-2-13B-fp16");
    ms_recipe_free(r);
}

/* ------------------------------------------------------------------ ms_setting_eval */

static struct ms_setting gradient(double *g, size_t n)
{
    return (struct ms_setting){.kind = MS_SET_GRADIENT, .grad = g, .ngrad = n};
}

/* mergekit-spec.md 1.6: 40 layers, [0, 0.5, 0.3, 0.7, 1], layer 10:
 * t = 10/39 = 0.25641025641025639, s = 4t = 1.0256410256410255, i0 = 1,
 * f = 0.025641025641025550, value = (1-f)*0.5 + f*0.3 = 0.49487179487179489
 * (Python prints 0.4948717948717949). */
Test(recipe_eval, worked_example)
{
    double g[] = {0, 0.5, 0.3, 0.7, 1};
    struct ms_setting s = gradient(g, 5);
    double t = 10.0 / 39.0;
    cr_assert_eq(eval(&s, "model.layers.10.mlp.up_proj.weight", t), 0.4948717948717949);
    cr_assert_eq(eval(&s, "x", t), 0x1.fabfabfabfac0p-2);
}

Test(recipe_eval, gradient_points)
{
    double g[] = {0, 0.5, 0.3, 0.7, 1};
    struct ms_setting s = gradient(g, 5);
    /* ends: t = 0 -> g[0]; t = 1: s = 4, i0 = 4, i1 = min(4, 5) = 4 -> g[4] */
    cr_assert_eq(eval(&s, "x", 0.0), 0.0);
    cr_assert_eq(eval(&s, "x", 1.0), 1.0);
    /* t = 1/3: s = 4/3, i0 = 1, f = 1/3: (2/3)*0.5 + (1/3)*0.3 = 0.43333333333333335 */
    cr_assert_eq(eval(&s, "x", 1.0 / 3.0), 0.43333333333333335);
    /* t = 0.3: s = 1.2, i0 = 1, f = 0.2 (0.19999999999999996): 0.46 */
    cr_assert_eq(eval(&s, "x", 0.3), 0.46);
    /* t = 38/39 (layer 38 of 40): s = 3.8974..., i0 = 3, f = 0.8974...:
     * 0.7*(1-f) + 1*f = 0.9692307692307692 */
    cr_assert_eq(eval(&s, "x", 38.0 / 39.0), 0.9692307692307692);
}

Test(recipe_eval, one_element_gradient)
{
    double g[] = {0.42};
    struct ms_setting s = gradient(g, 1);
    /* s = t*0 = 0, i0 = i1 = 0, f = 0: g[0] whatever t is */
    cr_assert_eq(eval(&s, "x", 0.0), 0.42);
    cr_assert_eq(eval(&s, "x", 0.7), 0.42);
    cr_assert_eq(eval(&s, "x", 1.0), 0.42);
}

Test(recipe_eval, conditionals)
{
    double g[] = {1, 0};
    struct ms_cond c[] = {
        {.filter = (char *)"layers.1.", .value = {.kind = MS_SET_SCALAR, .scalar = 7}},
        {.filter = (char *)"attn", .value = {.kind = MS_SET_GRADIENT, .grad = g, .ngrad = 2}},
        {.filter = (char *)"*", .value = {.kind = MS_SET_SCALAR, .scalar = 9}},
    };
    struct ms_setting s = {.kind = MS_SET_COND, .cond = c, .ncond = 3};
    /* a plain substring, not a glob: "layers.1." is in layers.1.x but not layers.10.x */
    cr_assert_eq(eval(&s, "model.layers.1.self_attn.q_proj.weight", 0.5), 7.0);
    /* the first match wins, and its gradient uses t: 0.5*1 + 0.5*0 = 0.5 */
    cr_assert_eq(eval(&s, "model.layers.10.self_attn.q_proj.weight", 0.5), 0.5);
    cr_assert_eq(eval(&s, "model.layers.10.mlp.up_proj.weight", 0.5), 9.0);

    /* no entry matches: false, *out untouched */
    struct ms_setting only_mlp = {.kind = MS_SET_COND, .cond = c, .ncond = 2};
    double v = -1;
    cr_assert_not(ms_setting_eval(&only_mlp, "model.layers.10.mlp.up_proj.weight", 0.5, &v));
    cr_assert_eq(v, -1);
    /* "*" and a missing filter match even without a tensor name */
    cr_assert_eq(eval(&s, NULL, 0), 9.0);

    /* Python's `tensor_name and filter in tensor_name`: an empty filter matches
     * every non-empty name, and nothing matches an empty name. */
    struct ms_cond e[] = {{.filter = (char *)"", .value = {.kind = MS_SET_SCALAR, .scalar = 3}}};
    struct ms_setting empty = {.kind = MS_SET_COND, .cond = e, .ncond = 1};
    cr_assert_eq(eval(&empty, "lm_head.weight", 0), 3.0);
    cr_assert_not(ms_setting_eval(&empty, "", 0, &v));
    cr_assert_not(ms_setting_eval(&empty, NULL, 0, &v));

    struct ms_setting none = {.kind = MS_SET_NONE};
    cr_assert_not(ms_setting_eval(&none, "x", 0, &v));
}

/* ------------------------------------------------------------------ setting values */

Test(recipe_values, numbers_strings_booleans)
{
    /* Each value as yaml.safe_load and pydantic give it (checked with PyYAML 6). */
    struct ms_recipe *r = parse_ok("models:\n"
                                   "  - model: a\n"
                                   "merge_method: linear\n"
                                   "parameters:\n"
                                   "  e1: 1e-5\n"         /* YAML 1.1 string -> float */
                                   "  e2: 1.0e-5\n"       /* float */
                                   "  e3: 1.0e5\n"        /* string (exponent needs a sign) */
                                   "  q1: \"0.5\"\n"      /* quoted numeric string */
                                   "  q2: ' 2 '\n"        /* whitespace is stripped */
                                   "  i1: 3\n"
                                   "  i2: -0x1F\n"        /* hex int */
                                   "  i3: 017\n"          /* YAML 1.1 octal = 15 */
                                   "  i4: 0b101\n"        /* binary = 5 */
                                   "  i5: 1_000\n"
                                   "  i6: 190:20:30\n"    /* sexagesimal = 685230 */
                                   "  f1: .5\n"
                                   "  f2: -.5\n"          /* a string to YAML, -0.5 to pydantic */
                                   "  f3: 1:30.5\n"       /* sexagesimal float = 90.5 */
                                   "  f4: 12.\n"
                                   "  f5: +.inf\n"
                                   "  f6: .NaN\n"
                                   "  b1: true\n"
                                   "  b2: false\n"
                                   "  b3: yes\n"
                                   "  b4: No\n"
                                   "  b5: on\n"
                                   "  b6: OFF\n"
                                   "  g: [yes, '0.25', 1e-1]\n");
    struct {
        const char *name;
        double v;
    } want[] = {
        {"e1", 1e-5}, {"e2", 1e-5}, {"e3", 1e5},  {"q1", 0.5},     {"q2", 2},    {"i1", 3},
        {"i2", -31},  {"i3", 15},   {"i4", 5},    {"i5", 1000},    {"i6", 685230}, {"f1", 0.5},
        {"f2", -0.5}, {"f3", 90.5}, {"f4", 12.0}, {"f5", INFINITY}, {"b1", 1},    {"b2", 0},
        {"b3", 1},    {"b4", 0},    {"b5", 1},    {"b6", 0},
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(want); i++) {
        const struct ms_setting *s = param(&r->params, want[i].name);
        cr_assert_eq(s->kind, MS_SET_SCALAR, "%s", want[i].name);
        cr_assert_eq(s->scalar, want[i].v, "%s: %.17g", want[i].name, s->scalar);
    }
    cr_assert(isnan(param(&r->params, "f6")->scalar));
    const struct ms_setting *g = param(&r->params, "g");
    cr_assert_eq(g->kind, MS_SET_GRADIENT);
    cr_assert_eq(g->ngrad, 3);
    cr_assert_eq(g->grad[0], 1.0);
    cr_assert_eq(g->grad[1], 0.25);
    cr_assert_eq(g->grad[2], 0.1);
    ms_recipe_free(r);
}

Test(recipe_values, string_fields)
{
    /* "1.0e5" is a YAML 1.1 string, so it is a valid (odd) dtype; an anchor and
     * alias are followed; quoted scalars stay strings. */
    struct ms_recipe *r = parse_ok("models:\n"
                                   "  - model: &m org/name\n"
                                   "  - model: *m\n"
                                   "merge_method: 'linear'\n"
                                   "dtype: 1.0e5\n"
                                   "out_dtype: \"bfloat16\"\n"
                                   "chat_template: chatml\n"
                                   "tokenizer_source: union\n");
    cr_assert_str_eq(r->models[1].model.path, "org/name");
    cr_assert_str_eq(r->merge_method, "linear");
    cr_assert_str_eq(r->dtype, "1.0e5");
    cr_assert_str_eq(r->out_dtype, "bfloat16");
    cr_assert_eq(r->out_dtype_pos.line, 6);
    cr_assert_eq(r->out_dtype_pos.col, 12);
    cr_assert_str_eq(r->chat_template, "chatml");
    cr_assert_str_eq(r->tokenizer_source, "union");
    cr_assert_null(r->tokenizer_source_ref.path);
    cr_assert_not(r->has_tokenizer);
    ms_recipe_free(r);
}

Test(recipe_values, optional_nulls_and_other_forms)
{
    /* Null optional fields are absent; an empty `models` beside `slices` is
     * ignored (pydantic truthiness); residual_weight is parsed and dropped. */
    struct ms_recipe *r = parse_ok("merge_method: passthrough\n"
                                   "models: []\n"
                                   "base_model: ~\n"
                                   "parameters:\n"
                                   "dtype: null\n"
                                   "slices:\n"
                                   "  - sources:\n"
                                   "      - model: a\n"
                                   "        layer_range: [0, 24]\n"
                                   "    residual_weight: 0.5\n"
                                   "    base_model: a@v2\n"
                                   "    parameters: {scale: 2}\n"
                                   "  - sources: [{model: b, layer_range: ['20', 40.0]}]\n"
                                   "tokenizer:\n"
                                   "  source: union\n");
    cr_assert_eq(r->nmodels, 0);
    cr_assert_null(r->base_model.path);
    cr_assert_eq(r->params.n, 0);
    cr_assert_null(r->dtype);
    cr_assert_eq(r->nslices, 2);
    cr_assert_str_eq(r->slices[0].base_model.path, "a");
    cr_assert_str_eq(r->slices[0].base_model.revision, "v2");
    cr_assert_eq(param(&r->slices[0].params, "scale")->scalar, 2.0);
    cr_assert_eq(r->slices[1].sources[0].layer_range[0], 20);
    cr_assert_eq(r->slices[1].sources[0].layer_range[1], 40);
    cr_assert(r->has_tokenizer);
    cr_assert_eq(r->tokenizer_pos.line, 14);
    cr_assert_eq(r->tokenizer_pos.col, 1);
    ms_recipe_free(r);

    r = parse_ok("merge_method: linear\n"
                 "modules:\n"
                 "  text_decoder:\n"
                 "    models: [{model: a}]\n");
    cr_assert(r->has_modules);
    cr_assert_eq(r->modules_pos.line, 2);
    cr_assert_eq(r->modules_pos.col, 1);
    /* The one module is folded in: its models are the recipe's. */
    cr_assert_str_eq(r->module_name, "text_decoder");
    cr_assert_eq(r->module_pos.line, 3);
    cr_assert_eq(r->nmodels, 1);
    cr_assert_eq(r->nslices, 0);
    cr_assert_str_eq(r->models[0].model.path, "a");
    ms_recipe_free(r);
}

/* ------------------------------------------------------------------ model references */

Test(recipe_models, reference_forms)
{
    struct ms_recipe *r = parse_ok(
        "models:\n"
        "  - model: org/name\n"
        "  - model: org/name@main\n"
        "  - model: org/name+org/lora\n"
        "  - model: org/name@v1+org/lora@v2\n"
        "  - model: /data/models/a.b-c\n"
        "  - model:\n"
        "      model: org/name@r1\n"
        "      lora: {path: org/lora, revision: r2}\n"
        "      override_architecture: MistralForCausalLM\n"
        "  - model: {model: 'dir+with+plus'}\n" /* no '+' split in the mapping form */
        "  - model: {model: {path: x@y}}\n"     /* nor an '@' split in {path} */
        "merge_method: linear\n"
        "tokenizer_source: {model: org/tok}\n");
    cr_assert_eq(r->nmodels, 8);
    struct ms_modelref *m = &r->models[0].model;
    cr_assert_str_eq(m->path, "org/name");
    cr_assert_null(m->revision);
    cr_assert_null(m->lora);
    m = &r->models[1].model;
    cr_assert_str_eq(m->path, "org/name");
    cr_assert_str_eq(m->revision, "main");
    m = &r->models[2].model;
    cr_assert_str_eq(m->path, "org/name");
    cr_assert_null(m->revision);
    cr_assert_str_eq(m->lora, "org/lora");
    cr_assert_null(m->lora_revision);
    m = &r->models[3].model;
    cr_assert_str_eq(m->path, "org/name");
    cr_assert_str_eq(m->revision, "v1");
    cr_assert_str_eq(m->lora, "org/lora");
    cr_assert_str_eq(m->lora_revision, "v2");
    cr_assert_str_eq(r->models[4].model.path, "/data/models/a.b-c");
    m = &r->models[5].model;
    cr_assert_str_eq(m->path, "org/name");
    cr_assert_str_eq(m->revision, "r1");
    cr_assert_str_eq(m->lora, "org/lora");
    cr_assert_str_eq(m->lora_revision, "r2");
    cr_assert_str_eq(m->override_architecture, "MistralForCausalLM");
    cr_assert_eq(m->pos.line, 8);
    cr_assert_eq(m->pos.col, 7);
    cr_assert_str_eq(r->models[6].model.path, "dir+with+plus");
    cr_assert_null(r->models[6].model.lora);
    cr_assert_str_eq(r->models[7].model.path, "x@y");
    cr_assert_null(r->models[7].model.revision);

    cr_assert_str_eq(r->tokenizer_source, "org/tok");
    cr_assert_str_eq(r->tokenizer_source_ref.path, "org/tok");

    /* equality compares every part */
    cr_assert_not(ms_modelref_eq(&r->models[0].model, &r->models[1].model));
    cr_assert_not(ms_modelref_eq(&r->models[0].model, &r->models[2].model));
    cr_assert(ms_modelref_eq(&r->models[0].model, &r->models[0].model));
    struct ms_modelref a = {.path = (char *)"org/name"};
    cr_assert(ms_modelref_eq(&a, &r->models[0].model));
    a.override_architecture = (char *)"X";
    cr_assert_not(ms_modelref_eq(&a, &r->models[0].model));
    ms_recipe_free(r);

    r = parse_ok("models: [{model: a}]\nmerge_method: linear\ntokenizer_source: org/tok@rev\n");
    cr_assert_str_eq(r->tokenizer_source, "org/tok@rev");
    cr_assert_str_eq(r->tokenizer_source_ref.path, "org/tok");
    cr_assert_str_eq(r->tokenizer_source_ref.revision, "rev");
    ms_recipe_free(r);
}

/* ------------------------------------------------------------------ parse errors */

#define ERROR_TEST(tname, yaml, msg) \
    Test(recipe_errors, tname) { expect_error(yaml, msg); }

ERROR_TEST(layer_range_length,
           "slices:\n"
           "  - sources:\n"
           "      - model: a\n"
           "        layer_range: [0]\n"
           "merge_method: passthrough\n",
           "r.yml:4:22: layer_range must be a list of two integers")
ERROR_TEST(layer_range_item,
           "slices:\n"
           "  - sources:\n"
           "      - model: a\n"
           "        layer_range: [0, x]\n"
           "merge_method: passthrough\n",
           "r.yml:4:26: layer_range must be a list of two integers")
ERROR_TEST(layer_range_fraction,
           "slices:\n"
           "  - sources:\n"
           "      - {model: a, layer_range: [0, 31.5]}\n"
           "merge_method: passthrough\n",
           "r.yml:3:37: layer_range must be a list of two integers")
ERROR_TEST(layer_range_scalar,
           "slices:\n"
           "  - sources:\n"
           "      - model: a\n"
           "        layer_range: 32\n"
           "merge_method: passthrough\n",
           "r.yml:4:22: layer_range must be a list of two integers")
ERROR_TEST(layer_range_reversed,
           "slices:\n"
           "  - sources:\n"
           "      - model: a\n"
           "        layer_range: [10, 5]\n"
           "merge_method: passthrough\n",
           "r.yml:4:22: layer_range [10, 5] is not a range [start, end) with 0 <= start <= end")
ERROR_TEST(layer_range_missing,
           "slices:\n"
           "  - sources:\n"
           "      - model: a\n"
           "merge_method: passthrough\n",
           "r.yml:3:9: a source needs a 'layer_range'")
ERROR_TEST(sources_missing,
           "slices:\n"
           "  - parameters: {t: 1}\n"
           "merge_method: passthrough\n",
           "r.yml:2:5: a slice needs 'sources'")
ERROR_TEST(sources_empty,
           "slices:\n"
           "  - sources: []\n"
           "merge_method: passthrough\n",
           "r.yml:2:14: sources must not be empty")
ERROR_TEST(model_missing,
           "models:\n"
           "  - parameters:\n"
           "      weight: 1\n"
           "merge_method: linear\n",
           "r.yml:2:5: an entry of models needs a 'model'")
ERROR_TEST(models_entry_string,
           "models:\n"
           "  - org/a\n"
           "merge_method: linear\n",
           "r.yml:2:5: an entry of models must be a mapping, not a scalar")
ERROR_TEST(models_not_list,
           "models: org/a\n"
           "merge_method: linear\n",
           "r.yml:1:9: models must be a list, not a scalar")
ERROR_TEST(merge_method_missing,
           "models:\n"
           "  - model: a\n",
           "r.yml:1:1: missing 'merge_method'")
ERROR_TEST(merge_method_number,
           "models: [{model: a}]\n"
           "merge_method: 1\n",
           "r.yml:2:15: merge_method must be a string, not '1'")
ERROR_TEST(merge_method_list,
           "models: [{model: a}]\n"
           "merge_method: [linear]\n",
           "r.yml:2:15: merge_method must be a string, not a list")
ERROR_TEST(two_forms,
           "merge_method: linear\n"
           "models: [{model: a}]\n"
           "slices:\n"
           "  - sources: [{model: a, layer_range: [0, 2]}]\n",
           "r.yml:3:1: only one of 'models', 'slices' or 'modules' may be given")
ERROR_TEST(no_form,
           "merge_method: linear\n"
           "dtype: float16\n",
           "r.yml:1:1: one of 'models', 'slices' or 'modules' must be given and not empty")
ERROR_TEST(empty_models,
           "merge_method: linear\n"
           "models: []\n",
           "r.yml:2:1: one of 'models', 'slices' or 'modules' must be given and not empty")
ERROR_TEST(tokenizer_both,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "tokenizer_source: union\n"
           "tokenizer:\n"
           "  source: base\n",
           "r.yml:4:1: tokenizer_source and tokenizer cannot both be given")
ERROR_TEST(tokenizer_not_mapping,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "tokenizer: union\n",
           "r.yml:3:12: tokenizer must be a mapping, not a scalar")
ERROR_TEST(yaml_syntax,
           "models:\n"
           "  - model: a\n"
           " merge_method: linear\n",
           "r.yml:3:2: did not find expected key (while parsing a block mapping at 1:1)")
ERROR_TEST(yaml_unclosed_flow,
           "models: [{model: a}\n"
           "merge_method: linear\n",
           "r.yml:2:1: did not find expected ',' or ']' (while parsing a flow sequence at 1:9)")
ERROR_TEST(yaml_undefined_alias,
           "models: [{model: *nope}]\n"
           "merge_method: linear\n",
           "r.yml:1:18: found undefined alias")
ERROR_TEST(yaml_control_character,
           "models: [{model: a}]\n"
           "merge_method: li\x01near\n",
           "r.yml:2:17: control characters are not allowed")
ERROR_TEST(two_documents,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "---\n"
           "dtype: float16\n",
           "r.yml:3:1: expected a single yaml document")
ERROR_TEST(empty_recipe, "# nothing here\n", "r.yml:1:1: recipe is empty")
ERROR_TEST(root_list, "- model: a\n", "r.yml:1:1: the recipe must be a mapping, not a list")
ERROR_TEST(duplicate_key,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "dtype: float16\n"
           "dtype: bfloat16\n",
           "r.yml:4:1: duplicate key 'dtype' (first at 3:1)")
ERROR_TEST(duplicate_parameter,
           "models:\n"
           "  - model: a\n"
           "    parameters:\n"
           "      weight: 1\n"
           "      weight: 2\n"
           "merge_method: linear\n",
           "r.yml:5:7: duplicate key 'weight' (first at 4:7)")
ERROR_TEST(merge_key,
           "base: &b {weight: 1}\n"
           "models:\n"
           "  - model: a\n"
           "    parameters:\n"
           "      <<: *b\n"
           "merge_method: linear\n",
           "r.yml:5:7: yaml merge keys ('<<') are not supported")
ERROR_TEST(bare_conditional,
           "models:\n"
           "  - model: a\n"
           "    parameters:\n"
           "      weight:\n"
           "        filter: mlp\n"
           "        value: 0.5\n"
           "merge_method: linear\n",
           "r.yml:5:9: parameter 'weight': a {filter, value} mapping must be inside a list "
           "(write '- filter: ...' / '  value: ...')")
ERROR_TEST(non_numeric_string,
           "models:\n"
           "  - model: a\n"
           "    parameters:\n"
           "      weight: sum\n"
           "merge_method: linear\n",
           "r.yml:4:15: parameter 'weight' must be a number, not 'sum'")
ERROR_TEST(quoted_non_numeric,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "parameters: {lambda: '0x10'}\n",
           "r.yml:3:22: parameter 'lambda' must be a number, not '0x10'")
ERROR_TEST(empty_gradient,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "parameters:\n"
           "  t: []\n",
           "r.yml:4:6: parameter 't': empty list")
ERROR_TEST(gradient_entry,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "parameters:\n"
           "  t: [0, 0.5, high]\n",
           "r.yml:4:15: parameter 't': gradient entry must be a number, not 'high'")
ERROR_TEST(gradient_nested_list,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "parameters:\n"
           "  t: [0, [1]]\n",
           "r.yml:4:10: parameter 't': gradient entry must be a number, not a list")
ERROR_TEST(null_parameter,
           "models:\n"
           "  - model: a\n"
           "    parameters:\n"
           "      weight:\n"
           "merge_method: linear\n",
           "r.yml:4:14: parameter 'weight' has no value")
ERROR_TEST(conditional_without_value,
           "models: [{model: a}]\n"
           "merge_method: slerp\n"
           "parameters:\n"
           "  t:\n"
           "    - filter: mlp\n"
           "      valeu: 0.5\n",
           "r.yml:5:7: parameter 't': conditional entry has no 'value'")
ERROR_TEST(conditional_mixed,
           "models: [{model: a}]\n"
           "merge_method: slerp\n"
           "parameters:\n"
           "  t:\n"
           "    - filter: mlp\n"
           "      value: 0.5\n"
           "    - 0.3\n",
           "r.yml:7:7: parameter 't': entries of a conditional list must be {filter, value} "
           "mappings")
ERROR_TEST(conditional_value_mapping,
           "models: [{model: a}]\n"
           "merge_method: slerp\n"
           "parameters:\n"
           "  t:\n"
           "    - value: {filter: mlp, value: 1}\n",
           "r.yml:5:14: parameter 't': value must be a number or a list of numbers, not a mapping")
ERROR_TEST(conditional_empty_gradient,
           "models: [{model: a}]\n"
           "merge_method: slerp\n"
           "parameters:\n"
           "  t:\n"
           "    - value: []\n",
           "r.yml:5:14: parameter 't': empty list")
ERROR_TEST(filter_not_string,
           "models: [{model: a}]\n"
           "merge_method: slerp\n"
           "parameters:\n"
           "  t: [{filter: 3, value: 1}]\n",
           "r.yml:4:16: filter must be a string, not '3'")
ERROR_TEST(parameters_not_mapping,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "parameters: 0.5\n",
           "r.yml:3:13: parameters must be a mapping, not a scalar")
ERROR_TEST(residual_weight_string,
           "slices:\n"
           "  - sources: [{model: a, layer_range: [0, 2]}]\n"
           "    residual_weight: heavy\n"
           "merge_method: passthrough\n",
           "r.yml:3:22: residual_weight must be a number, not 'heavy'")
ERROR_TEST(model_two_plus,
           "models:\n"
           "  - model: a+b+c\n"
           "merge_method: linear\n",
           "r.yml:2:12: cannot parse model reference 'a+b+c': more than one '+' (write "
           "{model: ..., lora: ...} instead)")
ERROR_TEST(model_two_at,
           "models:\n"
           "  - model: org/a@b@c\n"
           "merge_method: linear\n",
           "r.yml:2:12: model path 'org/a@b@c' has more than one '@'")
ERROR_TEST(model_empty_path,
           "models:\n"
           "  - model: '@main'\n"
           "merge_method: linear\n",
           "r.yml:2:12: model path '@main' is empty")
ERROR_TEST(model_number,
           "models:\n"
           "  - model: 7\n"
           "merge_method: linear\n",
           "r.yml:2:12: model must be a string, not '7'")
ERROR_TEST(model_list,
           "models:\n"
           "  - model: [a, b]\n"
           "merge_method: linear\n",
           "r.yml:2:12: model must be a string or a mapping, not a list")
ERROR_TEST(model_mapping_without_model,
           "models:\n"
           "  - model: {lora: x}\n"
           "merge_method: linear\n",
           "r.yml:2:12: model: missing 'model'")
ERROR_TEST(base_model_bool,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "base_model: yes\n",
           "r.yml:3:13: base_model must be a string, not 'yes'")
ERROR_TEST(unsupported_tag,
           "models: [{model: !custom a}]\n"
           "merge_method: linear\n",
           "r.yml:1:18: unsupported yaml tag '!custom'")
ERROR_TEST(bad_int_tag,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "parameters: {w: !!int abc}\n",
           "r.yml:3:17: 'abc' is not a valid tag:yaml.org,2002:int")
ERROR_TEST(non_scalar_key,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "parameters: {[a]: 1}\n",
           "r.yml:3:14: keys of parameters must be strings")
ERROR_TEST(nul_in_string,
           "models: [{model: a}]\n"
           "merge_method: \"l\\0inear\"\n",
           "r.yml:2:15: NUL characters are not supported in values")
/* An alias to an enclosing node must end in an error, not loop. */
ERROR_TEST(recursive_alias,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "base_model: &m {model: {path: *m}}\n",
           "r.yml:3:13: path must be a string, not a mapping" /* the aliased node */)
ERROR_TEST(modules_not_mapping,
           "merge_method: linear\n"
           "modules: [a]\n",
           "r.yml:2:10: modules must be a mapping, not a list")

/* ------------------------------------------------------------------ warnings */

Test(recipe_warnings, unknown_keys, .init = cr_redirect_stderr)
{
    struct ms_recipe *r = parse_ok("models:\n"
                                   "  - model: a\n"
                                   "    paramters:\n"
                                   "      weight: 1\n"
                                   "    parameters:\n"
                                   "      weight: 0.5\n"
                                   "      t: [{filter: mlp, value: 1, note: x}]\n"
                                   "merge_method: linear\n"
                                   "merge_methd: ties\n"
                                   "parameters: {lambda: 1}\n");
    cr_assert_eq(param(&r->models[0].params, "weight")->scalar, 0.5);
    ms_recipe_free(r);
    fflush(stderr);
    cr_assert_stderr_eq_str("mergestream: warning: r.yml:9:1: unknown key 'merge_methd' "
                            "(did you mean 'merge_method'?)\n"
                            "mergestream: warning: r.yml:3:5: unknown key 'paramters' "
                            "(did you mean 'parameters'?)\n"
                            "mergestream: warning: r.yml:7:35: unknown key 'note'\n");
}

/* MS_RECIPE_STRICT (--strict): the first unknown key is an error naming it. */
Test(recipe_warnings, strict_makes_unknown_keys_errors)
{
    static const char y[] = "merge_method: linear\nmodels:\n  - model: a\n    paramters: {}\n";
    struct ms_recipe *r = NULL;
    cr_assert_eq(ms_recipe_parse_opts("r.yml", y, strlen(y), MS_RECIPE_STRICT, &r), MS_ERECIPE);
    cr_assert_null(r);
    cr_assert_str_eq(ms_errmsg(), "r.yml:4:5: unknown key 'paramters' (did you mean "
                                  "'parameters'?)");
    cr_assert_eq(ms_recipe_parse_opts("r.yml", y, strlen(y), 0, &r), 0);
    ms_recipe_free(r);
}

/* ------------------------------------------------------------------ loading */

Test(recipe_load, file_and_missing_file)
{
    char *dir = th_tmpdir();
    char *path = th_path(dir, "recipe.yml");
    cr_assert_eq(th_write(path, linear_yaml, strlen(linear_yaml)), 0);
    struct ms_recipe *r = NULL;
    cr_assert_eq(ms_recipe_load(path, &r), 0, "%s", ms_errmsg());
    cr_assert_str_eq(r->path, path);
    cr_assert_eq(r->text_len, strlen(linear_yaml));
    cr_assert_eq(memcmp(r->text, linear_yaml, r->text_len), 0);
    cr_assert_eq(r->nmodels, 3);
    ms_recipe_free(r);

    char *bad = th_path(dir, "bad.yml");
    cr_assert_eq(th_write(bad, "models: [{model: a}]\n", 21), 0);
    r = (struct ms_recipe *)1;
    cr_assert_eq(ms_recipe_load(bad, &r), MS_ERECIPE);
    cr_assert_null(r);
    char want[512];
    snprintf(want, sizeof want, "%s:1:1: missing 'merge_method'", bad);
    cr_assert_str_eq(ms_errmsg(), want);

    char *missing = th_path(dir, "missing.yml");
    cr_assert_eq(ms_recipe_load(missing, &r), -ENOENT);
    cr_assert_null(r);
    cr_assert(strstr(ms_errmsg(), "missing.yml"));
    free(missing);
    free(bad);
    free(path);
    th_rmtree(dir);
    free(dir);
    CHECK_NO_LEAKS();
}

/* ------------------------------------------------------------------ fault injection */

static const char complex_yaml[] = "slices:\n"
                                   "  - sources:\n"
                                   "      - model: org/a@main+org/lora@v2\n"
                                   "        layer_range: [0, 16]\n"
                                   "        parameters:\n"
                                   "          weight: [0, 0.5, 1]\n"
                                   "          density: [{filter: mlp, value: [0.1, 0.2]}, {value: 0.3}]\n"
                                   "      - model:\n"
                                   "          model: {path: org/b, revision: r}\n"
                                   "          override_architecture: LlamaForCausalLM\n"
                                   "        layer_range: [0, 16]\n"
                                   "    base_model: org/b\n"
                                   "    parameters: {t: 0.5}\n"
                                   "  - sources:\n"
                                   "      - {model: org/a, layer_range: [16, 32]}\n"
                                   "merge_method: slerp\n"
                                   "base_model: org/a\n"
                                   "parameters:\n"
                                   "  t:\n"
                                   "    - filter: self_attn\n"
                                   "      value: [0, 0.5, 0.3, 0.7, 1]\n"
                                   "    - value: 0.5\n"
                                   "  normalize: yes\n"
                                   "dtype: bfloat16\n"
                                   "out_dtype: float16\n"
                                   "tokenizer_source: org/a+x\n"
                                   "chat_template: auto\n";

Test(recipe_fault, every_allocation_fails_cleanly)
{
    /* Under ASan, LeakSanitizer reports anything a failure path leaks. */
    int failures = 0;
    for (long n = 1;; n++) {
        cr_assert_lt(n, 10000, "never succeeded");
        struct ms_recipe *r = (struct ms_recipe *)1;
        ms_alloc_fail_after(n);
        int rc = ms_recipe_parse("r.yml", complex_yaml, strlen(complex_yaml), &r);
        ms_alloc_fail_after(0);
        if (rc == 0) {
            cr_assert_not_null(r);
            cr_assert_eq(r->nslices, 2);
            cr_assert_str_eq(r->slices[0].sources[0].model.lora_revision, "v2");
            ms_recipe_free(r);
            break;
        }
        cr_assert_eq(rc, MS_ENOMEM, "n=%ld: rc %d: %s", n, rc, ms_errmsg());
        cr_assert_null(r);
        failures++;
    }
    cr_assert_gt(failures, 30);
    CHECK_NO_LEAKS();
}

Test(recipe_fault, load_fails_cleanly)
{
    char *dir = th_tmpdir();
    char *path = th_path(dir, "r.yml");
    cr_assert_eq(th_write(path, complex_yaml, strlen(complex_yaml)), 0);
    for (long n = 1;; n++) {
        cr_assert_lt(n, 10000, "never succeeded");
        struct ms_recipe *r = NULL;
        ms_alloc_fail_after(n);
        int rc = ms_recipe_load(path, &r);
        ms_alloc_fail_after(0);
        if (rc == 0) {
            ms_recipe_free(r);
            break;
        }
        cr_assert_eq(rc, MS_ENOMEM, "n=%ld: %s", n, ms_errmsg());
        cr_assert_null(r);
    }
    free(path);
    th_rmtree(dir);
    free(dir);
    CHECK_NO_LEAKS();
}

/* The tokenizer: block (mergekit's TokenizerConfig / TokenEmbeddingConfig). */
Test(recipe, tokenizer_block_fields)
{
    struct ms_recipe *r = parse_ok("models: [{model: a}, {model: b}]\n"
                                   "merge_method: linear\n"
                                   "tokenizer:\n"
                                   "  pad_to_multiple_of: 64\n"
                                   "  tokens:\n"
                                   "    \"<|im_start|>\": {source: b, force: true}\n"
                                   "    z: {source: {kind: zero}}\n"
                                   "    m: {source: {kind: model_token, model: a, token: x}}\n"
                                   "    n: {source: {kind: model_token, model: b, token_id: 7}}\n"
                                   "    f: {force: true}\n");
    cr_assert(r->has_tokenizer);
    cr_assert_str_eq(r->tok.source, "union"); /* the default */
    cr_assert_null(r->tok.source_ref.path);
    cr_assert_eq(r->tok.pad_to_multiple_of, 64);
    cr_assert_eq(r->tok.ntokens, 5);
    const struct ms_tokemb *t = r->tok.tokens;
    cr_assert_str_eq(t[0].token, "<|im_start|>");
    cr_assert_eq(t[0].kind, MS_TOKEMB_MODEL);
    cr_assert_str_eq(t[0].model.path, "b");
    cr_assert(t[0].force);
    cr_assert_eq(t[0].pos.line, 6);
    cr_assert_eq(t[1].kind, MS_TOKEMB_ZERO);
    cr_assert_not(t[1].force);
    cr_assert_eq(t[2].kind, MS_TOKEMB_MODEL_TOKEN);
    cr_assert_str_eq(t[2].model.path, "a");
    cr_assert_str_eq(t[2].src_token, "x");
    cr_assert_eq(t[2].src_token_id, -1);
    cr_assert_eq(t[3].src_token_id, 7);
    cr_assert_null(t[3].src_token);
    cr_assert_eq(t[4].kind, MS_TOKEMB_NONE);
    cr_assert(t[4].force);
    ms_recipe_free(r);
    r = parse_ok("models: [{model: a}]\nmerge_method: linear\ntokenizer: {source: org/tok@r1}\n");
    cr_assert_str_eq(r->tok.source, "org/tok@r1");
    cr_assert_str_eq(r->tok.source_ref.path, "org/tok");
    cr_assert_str_eq(r->tok.source_ref.revision, "r1");
    ms_recipe_free(r);
}
ERROR_TEST(tokenizer_token_kind,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "tokenizer:\n"
           "  tokens:\n"
           "    x: {source: {kind: mean}}\n",
           "r.yml:5:24: token source kind must be 'model_token' or 'zero'")
ERROR_TEST(tokenizer_model_token_both,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "tokenizer:\n"
           "  tokens:\n"
           "    x: {source: {kind: model_token, model: a, token: y, token_id: 3}}\n",
           "r.yml:5:17: token source of kind model_token: give exactly one of token and token_id")
ERROR_TEST(tokenizer_pad,
           "models: [{model: a}]\n"
           "merge_method: linear\n"
           "tokenizer: {pad_to_multiple_of: -8}\n",
           "r.yml:3:33: pad_to_multiple_of must be an integer from 1 to 1048576")
