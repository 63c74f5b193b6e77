/*
 * test_plan.c - recipe + model headers -> plan (ms_plan.h): parameter
 * precedence, filters and gradients (mergekit-spec.md 1.5-1.6), slice
 * renumbering (1.4), tied weights (3.2), save order and shards (6.2, 4.1),
 * dtypes (2.1.4), one test per validation error, every problem reported, the
 * Hugging Face cache, and `mergestream plan` over recipes/examples.
 *
 * Models are written by the test itself (headers matter, data is zeros) so
 * that each can lack a tensor or have a wrong shape; the examples use
 * build/ms-mkmodel through tools/demo-models.sh.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_plan.h"
#include "ms_recipe.h"
#include "ms_safetensors.h"
#include "th.h"

static char *g_dir;
static struct ms_recipe *g_recipe;
static struct ms_plan *g_plan;

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    cr_assert_eq(chdir(g_dir), 0);
}

static void teardown(void)
{
    ms_plan_free(g_plan);
    ms_recipe_free(g_recipe);
    g_plan = NULL;
    g_recipe = NULL;
    if (chdir("/") == 0)
        th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(plan, .init = setup, .fini = teardown);

/* ------------------------------------------------------------------ synthetic models */

struct mspec {
    const char *dir;
    const char *arch;             /* default LlamaForCausalLM */
    int layers, hidden, inter, vocab; /* defaults 4, 8, 16, 32 */
    enum ms_dtype dtype;          /* default BF16 (0 is BOOL, so use has_dtype) */
    bool has_dtype;
    bool tied;                    /* no lm_head.weight */
    const char *drop;             /* a tensor to leave out */
    const char *extra;            /* an extra 1-D tensor (e.g. rotary inv_freq) */
    const char *wide;             /* a tensor whose last dim is doubled */
};

/* Writes a Llama-like model (config.json + model.safetensors, zero data). */
static void mk(struct mspec s)
{
    int L = s.layers ? s.layers : 4, H = s.hidden ? s.hidden : 8, I = s.inter ? s.inter : 16,
        V = s.vocab ? s.vocab : 32;
    enum ms_dtype dt = s.has_dtype ? s.dtype : MS_DT_BF16;
    static const char *const lw[] = {
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
        "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
        "mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight",
    };
    size_t cap = 4 + (size_t)L * 9, n = 0;
    struct ms_out_tensor *t = calloc(cap, sizeof *t);
    char **names = calloc(cap, sizeof *names);
    const void **data = calloc(cap, sizeof *data);
    void *zeros = calloc(1, (size_t)(V + I) * (H + I) * 2 * 8);
    cr_assert(t && names && data && zeros);

#define ADD(nm, d0, d1)                                                                      \
    do {                                                                                     \
        char *nm_ = (nm);                                                                    \
        if (s.drop && !strcmp(nm_, s.drop)) {                                                \
            free(nm_);                                                                       \
            break;                                                                           \
        }                                                                                    \
        struct ms_out_tensor *x = &t[n];                                                     \
        x->name = names[n] = nm_;                                                            \
        x->dtype = dt;                                                                       \
        x->ndim = (d1) ? 2 : 1;                                                              \
        x->shape[0] = (d0);                                                                  \
        x->shape[1] = (d1);                                                                  \
        if (s.wide && !strcmp(nm_, s.wide))                                                  \
            x->shape[x->ndim - 1] *= 2;                                                      \
        x->nbytes = (uint64_t)x->shape[0] * (x->ndim == 2 ? x->shape[1] : 1) *               \
                    ms_dtype_bits(dt) / 8;                                                   \
        data[n] = zeros;                                                                     \
        n++;                                                                                 \
    } while (0)

    ADD(strdup("model.embed_tokens.weight"), V, H);
    for (int l = 0; l < L; l++) {
        for (int w = 0; w < 9; w++) {
            char buf[128];
            snprintf(buf, sizeof buf, "model.layers.%d.%s", l, lw[w]);
            int d0 = H, d1 = H;
            if (w == 0 || w == 5)
                d1 = 0;
            if (w == 6 || w == 7)
                d0 = I;
            if (w == 8)
                d1 = I;
            ADD(strdup(buf), d0, d1);
        }
    }
    ADD(strdup("model.norm.weight"), H, 0);
    if (!s.tied)
        ADD(strdup("lm_head.weight"), V, H);
    if (s.extra) {
        cr_assert(n < cap);
        ADD(strdup(s.extra), H / 2, 0);
    }
#undef ADD
    mkdir(s.dir, 0777);
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", s.dir);
    cr_assert_eq(ms_st_write_file(path, t, data, n), 0, "%s", ms_errmsg());
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "{\n  \"architectures\": [\"%s\"],\n  \"hidden_size\": %d,\n"
             "  \"num_hidden_layers\": %d,\n  \"rms_norm_eps\": 1e-05,\n"
             "  \"rope_theta\": 10000.0,\n  \"tie_word_embeddings\": %s,\n"
             "  \"torch_dtype\": \"bfloat16\",\n  \"vocab_size\": %d\n}\n",
             s.arch ? s.arch : "LlamaForCausalLM", H, L, s.tied ? "true" : "false", V);
    snprintf(path, sizeof path, "%s/config.json", s.dir);
    cr_assert_eq(th_write(path, cfg, strlen(cfg)), 0);
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    free(t);
    free(data);
    free(zeros);
}

/* Writes a model with the given tensors (2-D when d1 > 0) and config.json text. */
struct tspec {
    const char *name;
    int d0, d1;
};

static void mk_raw(const char *dir, const char *config, const struct tspec *ts, size_t n)
{
    struct ms_out_tensor *t = calloc(n, sizeof *t);
    const void **data = calloc(n, sizeof *data);
    static char zeros[1 << 16];
    cr_assert(t && data);
    for (size_t i = 0; i < n; i++) {
        t[i].name = ts[i].name;
        t[i].dtype = MS_DT_BF16;
        t[i].ndim = ts[i].d1 ? 2 : 1;
        t[i].shape[0] = ts[i].d0;
        t[i].shape[1] = ts[i].d1;
        t[i].nbytes = (uint64_t)ts[i].d0 * (ts[i].d1 ? ts[i].d1 : 1) * 2;
        cr_assert_leq(t[i].nbytes, sizeof zeros);
        data[i] = zeros;
    }
    mkdir(dir, 0777);
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    cr_assert_eq(ms_st_write_file(path, t, data, n), 0, "%s", ms_errmsg());
    snprintf(path, sizeof path, "%s/config.json", dir);
    cr_assert_eq(th_write(path, config, strlen(config)), 0);
    free(t);
    free(data);
}

/* ------------------------------------------------------------------ helpers */

/* Frees the previous plan and recipe, so that a test may plan more than once. */
static void plan_reset(void)
{
    ms_plan_free(g_plan);
    ms_recipe_free(g_recipe);
    g_plan = NULL;
    g_recipe = NULL;
}

/* Writes r.yml and builds its plan into g_plan; returns the build's code. */
static int plan(const char *yaml)
{
    plan_reset();
    cr_assert_eq(th_write("r.yml", yaml, strlen(yaml)), 0);
    int rc = ms_recipe_load("r.yml", &g_recipe);
    cr_assert_eq(rc, 0, "recipe: %s", ms_errmsg());
    struct ms_plan_opts o = { .out_shard_size = 5000000000ull };
    return ms_plan_build(g_recipe, &o, &g_plan);
}

static int plan_opts(const char *yaml, const struct ms_plan_opts *o)
{
    plan_reset();
    cr_assert_eq(th_write("r.yml", yaml, strlen(yaml)), 0);
    cr_assert_eq(ms_recipe_load("r.yml", &g_recipe), 0, "recipe: %s", ms_errmsg());
    return ms_plan_build(g_recipe, o, &g_plan);
}

static void plan_ok(const char *yaml)
{
    int rc = plan(yaml);
    cr_assert_eq(rc, 0, "plan failed (%d): %s", rc, ms_errmsg());
}

/* The build fails with `code` and a first message containing every given part. */
static void plan_fails(const char *yaml, int code, ...)
{
    int rc = plan(yaml);
    cr_assert_eq(rc, code, "expected %d, got %d: %s", code, rc, ms_errmsg());
    cr_assert_null(g_plan);
    va_list ap;
    va_start(ap, code);
    for (const char *s; (s = va_arg(ap, const char *));)
        cr_assert(strstr(ms_errmsg(), s), "message lacks '%s': %s", s, ms_errmsg());
    va_end(ap);
}

static const struct ms_job *job(const char *name)
{
    for (size_t i = 0; i < g_plan->njobs; i++)
        if (!strcmp(g_plan->jobs[i].name, name))
            return &g_plan->jobs[i];
    return NULL;
}

static const struct ms_job *job_ok(const char *name)
{
    const struct ms_job *j = job(name);
    cr_assert(j, "no job for %s", name);
    return j;
}

/* Input index of model `ref` in job j, or -1. */
static int input_of(const struct ms_job *j, const char *ref)
{
    for (uint32_t i = 0; i < j->s.ninputs; i++)
        if (!strcmp(g_plan->models[j->in[i].model].ref, ref))
            return (int)i;
    return -1;
}

static double pv(const char *tensor, const char *ref, const char *param)
{
    const struct ms_job *j = job_ok(tensor);
    int i = input_of(j, ref), k = ms_method_param(g_plan->method, param);
    cr_assert(i >= 0 && k >= 0, "%s: no input %s or param %s", tensor, ref, param);
    return j->s.pv[i][k];
}

static double gv(const char *tensor, const char *param)
{
    const struct ms_job *j = job_ok(tensor);
    int k = ms_method_param(g_plan->method, param);
    cr_assert(k >= 0);
    return j->s.gv[k];
}

/* mergekit's gradient evaluation (1.5), written out independently. */
static double grad(const double *g, size_t n, double t)
{
    double s = t * (double)(n - 1);
    size_t i0 = (size_t)s, i1 = i0 + 1 < n ? i0 + 1 : n - 1;
    double f = s - (double)i0;
    return (1 - f) * g[i0] + f * g[i1];
}

#define LAYER(l, w) "model.layers." #l "." w

/* ------------------------------------------------------------------ parameters */

Test(plan, precedence_filters_gradients_across_slices)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_ok("merge_method: linear\n"
            "slices:\n"
            "  - sources:\n"
            "      - model: a\n"
            "        layer_range: [0, 3]\n"
            "        parameters:\n"
            "          weight:\n"
            "            - filter: layers.1.\n"
            "              value: 7\n"
            "            - value: [1, 2]\n"
            "      - model: b\n"
            "        layer_range: [1, 4]\n"
            "        parameters:\n"
            "          weight:\n"
            "            - filter: layers.2.\n"
            "              value: 9\n"
            "    parameters:\n"
            "      weight: 0.5\n"
            "  - sources:\n"
            "      - model: a\n"
            "        layer_range: [3, 4]\n"
            "      - model: b\n"
            "        layer_range: [0, 1]\n"
            "parameters:\n"
            "  weight: [0, 1]\n"
            "  normalize:\n"
            "    - filter: mlp\n"
            "      value: false\n"
            "    - value: true\n");
    /* slice 0: t = 0, 0.5, 1. a's filter sees a's input name (layers 0..2). */
    cr_assert_float_eq(pv(LAYER(0, "mlp.up_proj.weight"), "a", "weight"), 1.0, 0);
    cr_assert_float_eq(pv(LAYER(1, "mlp.up_proj.weight"), "a", "weight"), 7.0, 0);
    cr_assert_float_eq(pv(LAYER(2, "mlp.up_proj.weight"), "a", "weight"), 2.0, 0);
    /* b's input layers are 1..3: its filter "layers.2." hits output layer 1 only;
     * elsewhere the slice level (0.5) wins over the global gradient. */
    cr_assert_float_eq(pv(LAYER(0, "self_attn.q_proj.weight"), "b", "weight"), 0.5, 0);
    cr_assert_float_eq(pv(LAYER(1, "self_attn.q_proj.weight"), "b", "weight"), 9.0, 0);
    cr_assert_float_eq(pv(LAYER(2, "self_attn.q_proj.weight"), "b", "weight"), 0.5, 0);
    /* slice 1 has one layer: t = 1; no source or slice level: the global gradient. */
    cr_assert_float_eq(pv(LAYER(3, "mlp.down_proj.weight"), "a", "weight"), 1.0, 0);
    cr_assert_float_eq(pv(LAYER(3, "mlp.down_proj.weight"), "b", "weight"), 1.0, 0);
    /* pre-weights: slice 0's sources at t = 0; post-weights: slice 1's at t = 0 */
    cr_assert_float_eq(pv("model.embed_tokens.weight", "a", "weight"), 1.0, 0);
    cr_assert_float_eq(pv("model.embed_tokens.weight", "b", "weight"), 0.5, 0);
    cr_assert_float_eq(pv("model.norm.weight", "a", "weight"), 0.0, 0);
    cr_assert_float_eq(pv("lm_head.weight", "b", "weight"), 0.0, 0);
    /* a global parameter's filter sees the output name */
    cr_assert_float_eq(gv(LAYER(1, "mlp.gate_proj.weight"), "normalize"), 0.0, 0);
    cr_assert_float_eq(gv(LAYER(1, "self_attn.o_proj.weight"), "normalize"), 1.0, 0);
    cr_assert_float_eq(gv("model.norm.weight", "normalize"), 1.0, 0);
}

Test(plan, gradient_over_twelve_layers_models_form)
{
    mk((struct mspec){ .dir = "base", .layers = 12 });
    mk((struct mspec){ .dir = "ft", .layers = 12 });
    plan_ok("merge_method: slerp\n"
            "base_model: base\n"
            "models:\n"
            "  - model: base\n"
            "  - model: ft\n"
            "parameters:\n"
            "  t:\n"
            "    - filter: self_attn\n"
            "      value: [0, 0.5, 0.3, 0.7, 1]\n"
            "    - filter: mlp\n"
            "      value: [1, 0.5, 0.7, 0.3, 0]\n"
            "    - value: 0.5\n");
    static const double sa[] = { 0, 0.5, 0.3, 0.7, 1 }, ml[] = { 1, 0.5, 0.7, 0.3, 0 };
    char name[128];
    for (int l = 0; l < 12; l++) {
        double t = l / 11.0;
        snprintf(name, sizeof name, "model.layers.%d.self_attn.k_proj.weight", l);
        cr_assert_float_eq(gv(name, "t"), grad(sa, 5, t), 1e-15, "layer %d", l);
        snprintf(name, sizeof name, "model.layers.%d.mlp.down_proj.weight", l);
        cr_assert_float_eq(gv(name, "t"), grad(ml, 5, t), 1e-15, "layer %d", l);
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        cr_assert_float_eq(gv(name, "t"), 0.5, 0);
    }
    /* by hand: layer 10, t = 10/11, s = 3.6364, i0 = 3, f = 0.6364 -> 0.8909 */
    cr_assert_float_eq(gv(LAYER(10, "self_attn.q_proj.weight"), "t"), 0.7 * (1 - 40.0 / 11 + 3) +
                       1.0 * (40.0 / 11 - 3), 1e-12);
    cr_assert_float_eq(gv("model.embed_tokens.weight", "t"), 0.5, 0);
    /* slerp: two inputs with the base marked; compute f32, output the base's dtype */
    const struct ms_job *j = job_ok(LAYER(3, "mlp.up_proj.weight"));
    cr_assert_eq(j->s.ninputs, 2);
    cr_assert_eq(j->s.base, 0);
    cr_assert_eq(j->s.compute, MS_DT_F32);
    cr_assert_eq(j->out_dtype, MS_DT_BF16);
    cr_assert_not(j->copy);
}

Test(plan, models_form_appends_unlisted_base_and_defaults)
{
    mk((struct mspec){ .dir = "base" });
    mk((struct mspec){ .dir = "x" });
    mk((struct mspec){ .dir = "y" });
    plan_ok("merge_method: ties\n"
            "base_model: base\n"
            "models:\n"
            "  - model: x\n"
            "    parameters: {weight: 0.7, density: 0.4}\n"
            "  - model: y\n"
            "    parameters: {weight: 0.3}\n");
    const struct ms_job *j = job_ok(LAYER(2, "self_attn.v_proj.weight"));
    cr_assert_eq(j->s.ninputs, 3);
    cr_assert_eq(input_of(j, "base"), 2, "the base is appended last");
    cr_assert_eq(j->s.base, 2);
    cr_assert_float_eq(pv(LAYER(2, "self_attn.v_proj.weight"), "x", "density"), 0.4, 0);
    cr_assert_float_eq(pv(LAYER(2, "self_attn.v_proj.weight"), "y", "density"), 1.0, 0);
    cr_assert(isnan(pv(LAYER(2, "self_attn.v_proj.weight"), "base", "weight")));
    cr_assert_float_eq(gv(LAYER(2, "self_attn.v_proj.weight"), "normalize"), 1.0, 0);
    cr_assert_float_eq(gv(LAYER(2, "self_attn.v_proj.weight"), "lambda"), 1.0, 0);
    cr_assert_eq(j->s.compute, MS_DT_BF16);
    cr_assert_eq(g_plan->base, 2);
    cr_assert_eq(g_plan->donor, 2);
    cr_assert_eq(g_plan->out_layers, 4);
    cr_assert_eq(j->s.numel, 64);
    cr_assert_eq(j->s.row_len, 8);
    cr_assert_eq(j->s.shape, j->shape);
    cr_assert_str_eq(j->s.name, j->name);
    cr_assert_eq(j->s.key, ms_hash_str(j->name));
}

/* ------------------------------------------------------------------ slices, ties, order */

Test(plan, slice_renumbering_frankenmerge)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_ok("merge_method: passthrough\n"
            "dtype: bfloat16\n"
            "slices:\n"
            "  - sources:\n"
            "      - model: a\n"
            "        layer_range: [0, 3]\n"
            "  - sources:\n"
            "      - model: b\n"
            "        layer_range: [1, 4]\n");
    cr_assert_eq(g_plan->out_layers, 6);
    cr_assert_eq(g_plan->njobs, 1 + 6 * 9 + 2);
    static const struct {
        int out;
        const char *model;
        int in;
    } map[] = { { 0, "a", 0 }, { 1, "a", 1 }, { 2, "a", 2 }, { 3, "b", 1 }, { 4, "b", 2 },
                { 5, "b", 3 } };
    for (size_t i = 0; i < MS_ARRAY_LEN(map); i++) {
        char on[128], in[128];
        snprintf(on, sizeof on, "model.layers.%d.mlp.up_proj.weight", map[i].out);
        snprintf(in, sizeof in, "model.layers.%d.mlp.up_proj.weight", map[i].in);
        const struct ms_job *j = job_ok(on);
        cr_assert_eq(j->s.ninputs, 1);
        cr_assert_str_eq(g_plan->models[j->in[0].model].ref, map[i].model);
        cr_assert_str_eq(j->in[0].name, in);
        cr_assert_str_eq(j->label, in);
        cr_assert(j->copy, "passthrough of a bf16 tensor is a byte copy");
    }
    cr_assert_str_eq(g_plan->models[job_ok("model.embed_tokens.weight")->in[0].model].ref, "a");
    cr_assert_str_eq(g_plan->models[job_ok("model.norm.weight")->in[0].model].ref, "b");
    cr_assert_str_eq(g_plan->models[job_ok("lm_head.weight")->in[0].model].ref, "b");
    /* labels tie between output layers 1 and 3 (both read layer 1): plan order decides */
    const struct ms_layout *l = g_plan->layout;
    size_t i1 = SIZE_MAX, i3 = SIZE_MAX;
    for (size_t i = 0; i < l->ntensors; i++) {
        if (!strcmp(l->tensors[i].name, LAYER(1, "mlp.up_proj.weight")))
            i1 = i;
        if (!strcmp(l->tensors[i].name, LAYER(3, "mlp.up_proj.weight")))
            i3 = i;
    }
    cr_assert_eq(i3, i1 + 1);
    /* the output config has the new layer count and the recipe's dtype */
    cr_assert(g_plan->out_config_json);
    cr_assert(strstr(g_plan->out_config_json, "\"num_hidden_layers\": 6,"),
              "%s", g_plan->out_config_json);
    cr_assert(strstr(g_plan->out_config_json, "\"rms_norm_eps\": 1e-05,"));
    cr_assert(strstr(g_plan->out_config_json, "\"rope_theta\": 10000.0,"));
    cr_assert(strstr(g_plan->out_config_json, "\"torch_dtype\": \"bfloat16\""));
}

Test(plan, post_weights_zip_truncation)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    mk((struct mspec){ .dir = "c" });
    plan_ok("merge_method: linear\n"
            "parameters: {weight: 1}\n"
            "slices:\n"
            "  - sources:\n"
            "      - model: a\n"
            "        layer_range: [0, 2]\n"
            "  - sources:\n"
            "      - model: b\n"
            "        layer_range: [2, 4]\n"
            "      - model: c\n"
            "        layer_range: [2, 4]\n");
    /* the first slice has one source, so only b feeds the post-weights */
    const struct ms_job *j = job_ok("model.norm.weight");
    cr_assert_eq(j->s.ninputs, 1);
    cr_assert_str_eq(g_plan->models[j->in[0].model].ref, "b");
    cr_assert_eq(job_ok(LAYER(3, "mlp.up_proj.weight"))->s.ninputs, 2);
}

Test(plan, lm_head_from_tied_embeddings)
{
    mk((struct mspec){ .dir = "a", .tied = true });
    mk((struct mspec){ .dir = "b" });
    plan_ok("merge_method: linear\n"
            "models:\n"
            "  - model: a\n"
            "    parameters: {weight: 1}\n"
            "  - model: b\n"
            "    parameters: {weight: 1}\n");
    const struct ms_job *j = job_ok("lm_head.weight");
    cr_assert_eq(j->s.ninputs, 2);
    cr_assert_str_eq(j->in[0].name, "model.embed_tokens.weight");
    cr_assert_str_eq(j->in[1].name, "lm_head.weight");
    cr_assert_str_eq(j->label, "model.embed_tokens.weight");
}

Test(plan, no_lm_head_when_every_model_ties)
{
    mk((struct mspec){ .dir = "a", .tied = true });
    mk((struct mspec){ .dir = "b", .tied = true, .extra = "model.layers.0.self_attn.rotary_emb.inv_freq" });
    plan_ok("merge_method: linear\n"
            "models:\n"
            "  - model: a\n"
            "    parameters: {weight: 1}\n"
            "  - model: b\n"
            "    parameters: {weight: 1}\n");
    cr_assert_null(job("lm_head.weight"));
    cr_assert_null(job("model.layers.0.self_attn.rotary_emb.inv_freq"));
    cr_assert_eq(g_plan->njobs, 1 + 4 * 9 + 1);
    cr_assert_eq(g_plan->ndropped, 1);
}

Test(plan, save_order_and_shards)
{
    mk((struct mspec){ .dir = "m", .layers = 12 });
    /* every layer's 9 tensors are 4 * 64 + 2 * 8 + 3 * 128 = 656 bf16 elements */
    struct ms_plan_opts o = { .out_shard_size = 5000 };
    int rc = plan_opts("merge_method: passthrough\n"
                       "models:\n"
                       "  - model: m\n", &o);
    cr_assert_eq(rc, 0, "%s", ms_errmsg());
    const struct ms_layout *l = g_plan->layout;
    cr_assert_eq(l->ntensors, 1 + 12 * 9 + 2);
    cr_assert_str_eq(l->tensors[0].name, "lm_head.weight");
    cr_assert_str_eq(l->tensors[1].name, "model.embed_tokens.weight");
    cr_assert_str_eq(l->tensors[2].name, LAYER(0, "input_layernorm.weight"));
    cr_assert_str_eq(l->tensors[3].name, LAYER(0, "mlp.down_proj.weight"));
    cr_assert_str_eq(l->tensors[10].name, LAYER(0, "self_attn.v_proj.weight"));
    cr_assert_str_eq(l->tensors[11].name, LAYER(1, "input_layernorm.weight"));
    cr_assert_str_eq(l->tensors[20].name, LAYER(10, "input_layernorm.weight"));
    cr_assert_str_eq(l->tensors[29].name, LAYER(11, "input_layernorm.weight"));
    cr_assert_str_eq(l->tensors[38].name, LAYER(2, "input_layernorm.weight"));
    cr_assert_str_eq(l->tensors[l->ntensors - 1].name, "model.norm.weight");
    /* mergekit's greedy split over the save order */
    uint64_t cur = 0;
    uint32_t shard = 0;
    for (size_t i = 0; i < l->ntensors; i++) {
        if (cur && cur + l->tensors[i].nbytes > 5000) {
            shard++;
            cur = 0;
        }
        cur += l->tensors[i].nbytes;
        cr_assert_eq(l->tensors[i].shard, shard, "tensor %zu %s", i, l->tensors[i].name);
    }
    cr_assert_eq(l->nshards, shard + 1);
    cr_assert_gt(l->nshards, 2);
    /* jobs run shard by shard in file order, with their layout positions */
    uint64_t written = 0;
    for (size_t i = 0; i < g_plan->njobs; i++) {
        const struct ms_job *j = &g_plan->jobs[i];
        if (i) {
            const struct ms_job *q = &g_plan->jobs[i - 1];
            cr_assert(j->shard > q->shard ||
                      (j->shard == q->shard && j->out_offset == q->out_offset + q->out_bytes));
        }
        written += j->out_bytes;
    }
    uint64_t files = 0;
    for (size_t s = 0; s < l->nshards; s++)
        files += l->shards[s].file_bytes;
    cr_assert_eq(g_plan->bytes_written, files);
    cr_assert_eq(g_plan->bytes_read, written);
    /* models form: the layer count in config.json is left alone */
    cr_assert(strstr(g_plan->out_config_json, "\"num_hidden_layers\": 12,"));
}

Test(plan, embedding_rows_may_differ)
{
    mk((struct mspec){ .dir = "base", .vocab = 40 });
    mk((struct mspec){ .dir = "big", .vocab = 48 });
    plan_ok("merge_method: linear\n"
            "models:\n"
            "  - model: base\n"
            "    parameters: {weight: 1}\n"
            "  - model: big\n"
            "    parameters: {weight: 1}\n");
    const struct ms_job *j = job_ok("model.embed_tokens.weight");
    cr_assert_eq(j->shape[0], 40, "linear takes the smallest vocabulary");
    cr_assert_eq(j->s.numel, 40 * 8);
    cr_assert_eq(j->in[1].numel, 48 * 8);
    ms_plan_free(g_plan);
    ms_recipe_free(g_recipe);
    g_plan = NULL;
    g_recipe = NULL;
    plan_ok("merge_method: task_arithmetic\n"
            "base_model: base\n"
            "models:\n"
            "  - model: big\n"
            "    parameters: {weight: 1}\n");
    cr_assert_eq(job_ok("lm_head.weight")->shape[0], 40, "the GTA family takes the base's rows");
}

Test(plan, dtype_rules)
{
    mk((struct mspec){ .dir = "h", .dtype = MS_DT_F16, .has_dtype = true });
    mk((struct mspec){ .dir = "b" });
    plan_ok("merge_method: linear\n"
            "models:\n"
            "  - model: h\n"
            "    parameters: {weight: 1}\n"
            "  - model: b\n"
            "    parameters: {weight: 1}\n");
    const struct ms_job *j = job_ok(LAYER(0, "mlp.up_proj.weight"));
    cr_assert_eq(j->s.compute, MS_DT_F32, "bf16 with f16 promotes to f32");
    cr_assert_eq(j->out_dtype, MS_DT_F32);
    cr_assert_eq(j->s.in_dt[input_of(j, "h")], MS_DT_F16, "each input keeps its own dtype");
    cr_assert_eq(j->s.in_dt[input_of(j, "b")], MS_DT_BF16);
    ms_plan_free(g_plan);
    ms_recipe_free(g_recipe);
    g_plan = NULL;
    g_recipe = NULL;
    plan_ok("merge_method: ties\n"
            "base_model: h\n"
            "out_dtype: bfloat16\n"
            "models:\n"
            "  - model: b\n"
            "    parameters: {weight: 1}\n");
    j = job_ok(LAYER(0, "mlp.up_proj.weight"));
    cr_assert_eq(j->s.compute, MS_DT_F16, "GTA computes in the base's dtype");
    cr_assert_eq(j->out_dtype, MS_DT_BF16);
    cr_assert(strstr(g_plan->out_config_json, "\"torch_dtype\": \"bfloat16\""));
}

/* ------------------------------------------------------------------ validation errors */

Test(plan, err_unknown_method)
{
    mk((struct mspec){ .dir = "a" });
    plan_fails("merge_method: lineer\nmodels:\n  - model: a\n", MS_EPLAN, "r.yml:1:15",
               "unknown merge method 'lineer'", "linear, slerp", NULL);
}

/* mergekit: a per-model parameter is required only of models that are not the
 * base (nuslerp's base carries no weight), except that linear weights the base. */
Test(plan, base_needs_no_required_per_model_parameter)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    mk((struct mspec){ .dir = "c" });
    plan_ok("merge_method: nuslerp\nbase_model: a\nmodels:\n  - model: b\n"
            "    parameters: {weight: 1}\n  - model: c\n    parameters: {weight: 2}\n");
    const struct ms_job *j = job_ok("model.norm.weight");
    cr_assert_eq(j->s.ninputs, 3);
    cr_assert_eq(pv("model.norm.weight", "c", "weight"), 2.0);
    ms_plan_free(g_plan);
    g_plan = NULL;
    plan_fails("merge_method: linear\nbase_model: a\nmodels:\n  - model: b\n"
               "    parameters: {weight: 1}\n", MS_EPLAN,
               "missing required parameter 'weight' for model 'a'", NULL);
}

/* 2.14 and 7.10: ramplus_tl's result is float32 unless out_dtype says otherwise. */
Test(plan, ramplus_tl_result_is_float32)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_ok("merge_method: ramplus_tl\nbase_model: a\nmodels:\n  - model: b\n");
    cr_assert_eq(job_ok("model.norm.weight")->out_dtype, MS_DT_F32);
    cr_assert_eq(job_ok("model.norm.weight")->s.compute, MS_DT_BF16);
    ms_plan_free(g_plan);
    g_plan = NULL;
    plan_ok("merge_method: ramplus_tl\nbase_model: a\nout_dtype: bfloat16\nmodels:\n"
            "  - model: b\n");
    cr_assert_eq(job_ok("model.norm.weight")->out_dtype, MS_DT_BF16);
}

/* 2.7: int(density*numel) == 0 makes mergekit's magnitude assert; we say so before reading. */
Test(plan, err_ties_density_keeps_nothing)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    /* hidden 8: the norm weights have 8 elements; 0.1 * 8 < 1 */
    plan_fails("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n"
               "    parameters: {weight: 1, density: 0.1}\n", MS_EPLAN,
               "density 0.1 keeps no element of tensor", "(8 elements) of model 'b'", NULL);
}

/* 2.7: della needs density - epsilon > 0 and density + epsilon < 1. */
Test(plan, err_della_density_epsilon)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_fails("merge_method: della\nbase_model: a\nmodels:\n  - model: b\n"
               "    parameters: {weight: 1, density: 0.1}\n", MS_EPLAN,
               "della: density 0.1 +- epsilon 0.15 must lie inside (0, 1) for model 'b'", NULL);
    ms_recipe_free(g_recipe);
    g_recipe = NULL;
    plan_ok("merge_method: della\nbase_model: a\nmodels:\n  - model: b\n"
            "    parameters: {weight: 1, density: 0.1, epsilon: 0.05}\n");
}

/* 7.3: breadcrumbs zeroes a delta whose int(gamma*numel) is 0; the plan warns once. */
Test(plan, breadcrumbs_zeroed_deltas_are_warned)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    const char *y = "merge_method: breadcrumbs\nbase_model: a\nmodels:\n  - model: b\n"
                    "    parameters: {weight: 1, density: 0.5, gamma: 0.01}\n";
    char *p = th_path(g_dir, "bc.yml");
    cr_assert_eq(th_write(p, y, strlen(y)), 0);
    char cmd[4200], *err = NULL;
    snprintf(cmd, sizeof cmd, "cd '%s' && mergestream plan bc.yml", g_dir);
    int rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(err, "warning: bc.yml: int(gamma*numel) == 0 for") &&
                  strstr(err, "breadcrumbs zeroes their whole delta"), "stderr: %s", err);
    free(err);
    free(p);
}

/* 2.8: model_stock needs the base and two other models for a required tensor. */
Test(plan, err_model_stock_with_one_other_model)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_fails("merge_method: model_stock\nbase_model: a\nmodels:\n  - model: b\n", MS_EPLAN,
               "merge method 'model_stock' needs the base and at least two other models", NULL);
}

Test(plan, err_ties_without_base)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_fails("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
               "  - model: b\n    parameters: {weight: 1}\n",
               MS_EPLAN, "r.yml:1:", "'ties' requires base_model", NULL);
}

Test(plan, err_slerp_three_models)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    mk((struct mspec){ .dir = "c" });
    plan_fails("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\n"
               "models:\n  - model: b\n  - model: c\n",
               MS_EPLAN, "'slerp' takes the base model and one other model, got 3 inputs",
               "model.embed_tokens.weight", "more tensors", NULL);
}

Test(plan, err_passthrough_two_models)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_fails("merge_method: passthrough\nmodels:\n  - model: a\n  - model: b\n", MS_EPLAN,
               "'passthrough' takes exactly one input, got 2", NULL);
}

Test(plan, err_missing_required_weight)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_fails("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
               "  - model: b\n",
               MS_EPLAN, "missing required parameter 'weight' for model 'b' tensor "
               "'model.embed_tokens.weight'", NULL);
}

Test(plan, err_density_out_of_range)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_fails("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n"
               "    parameters: {weight: 1, density: -0.5}\n",
               MS_EPLAN, "r.yml:5:", "density -0.5 is out of range [0,", "model 'b'", NULL);
}

/* density 0 is a value for mergekit's sparsifiers except magnitude (ties), which
 * asserts k > 0 (sparsify.py); the stage tests check what each one keeps. */
Test(plan, density_zero_follows_mergekit_per_method)
{
    static const char *const ok[] = { "task_arithmetic", "dare_ties", "dare_linear",
                                      "breadcrumbs", "breadcrumbs_ties", "della",
                                      "della_linear" };
    char y[512];
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    for (size_t i = 0; i < MS_ARRAY_LEN(ok); i++) {
        snprintf(y, sizeof y, "merge_method: %s\nbase_model: a\nmodels:\n  - model: b\n"
                 "    parameters: {weight: 1, density: 0}\n", ok[i]);
        plan_ok(y);
        cr_assert_eq(pv("model.norm.weight", "b", "density"), 0.0, "%s", ok[i]);
        ms_plan_free(g_plan);
        ms_recipe_free(g_recipe);
        g_plan = NULL;
        g_recipe = NULL;
    }
    plan_fails("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n"
               "    parameters: {weight: 1, density: 0}\n", MS_EPLAN,
               "density 0 keeps no element of tensor", NULL);
}

Test(plan, density_above_one_follows_the_registry)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    const struct ms_method *m = ms_method_find("ties");
    const struct ms_param_decl *d = &m->params[ms_method_param(m, "density")];
    int rc = plan("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n"
                  "    parameters:\n      weight: 1\n      density: [1, 1.5]\n");
    if (d->hi < 1.5) {
        cr_assert_eq(rc, MS_EPLAN);
        cr_assert(strstr(ms_errmsg(), "r.yml:7:16: density 1.5 is out of range"), "%s",
                  ms_errmsg());
    } else {
        cr_assert_eq(rc, 0, "%s", ms_errmsg());
    }
}

Test(plan, err_missing_tensor)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b", .drop = LAYER(1, "mlp.up_proj.weight") });
    plan_fails("merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: a\n"
               "  - model: b\n",
               MS_EPLAN, "tensor 'model.layers.1.mlp.up_proj.weight' required but not present "
               "in model 'b'", NULL);
}

Test(plan, err_shape_mismatch)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b", .wide = LAYER(2, "self_attn.o_proj.weight") });
    plan_fails("merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: a\n"
               "  - model: b\n",
               MS_EPLAN, "shape mismatch for tensor 'model.layers.2.self_attn.o_proj.weight': "
               "model 'a' has [8, 8] but model 'b' has [8, 16]", NULL);
}

Test(plan, err_embedding_smaller_than_base)
{
    mk((struct mspec){ .dir = "base", .vocab = 40 });
    mk((struct mspec){ .dir = "small", .vocab = 36 });
    plan_fails("merge_method: ties\nbase_model: base\nmodels:\n  - model: small\n"
               "    parameters: {weight: 1}\n",
               MS_EPLAN, "'small' has 36 rows, fewer than the base model 'base' (40)", NULL);
}

Test(plan, err_slice_layer_counts_differ)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_fails("merge_method: linear\nparameters: {weight: 1}\nslices:\n"
               "  - sources:\n"
               "      - model: a\n        layer_range: [0, 2]\n"
               "      - model: b\n        layer_range: [0, 3]\n",
               MS_EPLAN, "r.yml:4:", "same number of layers ('a' has 2, 'b' has 3)", NULL);
}

Test(plan, err_models_form_layer_counts_differ)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b", .layers = 5 });
    plan_fails("merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: a\n"
               "  - model: b\n", MS_EPLAN, "same number of layers", NULL);
}

Test(plan, err_layer_range_out_of_bounds)
{
    mk((struct mspec){ .dir = "a" });
    plan_fails("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n"
               "        layer_range: [2, 9]\n",
               MS_EPLAN, "r.yml:4:", "layer_range [2, 9] is out of bounds for model 'a' (4 layers)",
               NULL);
}

Test(plan, err_bad_dtype_name)
{
    mk((struct mspec){ .dir = "a" });
    plan_fails("merge_method: passthrough\ndtype: bf16\nmodels:\n  - model: a\n", MS_ERECIPE,
               "r.yml:2:8: unknown dtype 'bf16'", NULL);
}

Test(plan, err_int64_dtype)
{
    mk((struct mspec){ .dir = "a" });
    plan_fails("merge_method: passthrough\nout_dtype: int64\nmodels:\n  - model: a\n",
               MS_EUNSUPPORTED, "r.yml:2:12: out_dtype 'int64' is not supported", NULL);
}

Test(plan, err_modules_form)
{
    plan_fails("merge_method: linear\nmodules:\n  text_decoder:\n    models:\n"
               "      - model: a\n",
               MS_EUNSUPPORTED,
               "r.yml:3:3: module 'text_decoder': the architectures "
               "mergestream supports have one module, 'default'",
               NULL);
}

/* Tokenizer merging needs every model's tokenizer.json (tests/test_tokmerge.c has the rest). */
Test(plan, err_tokenizer_source_without_tokenizer_json)
{
    mk((struct mspec){ .dir = "a" });
    plan_fails("merge_method: passthrough\ntokenizer_source: union\nmodels:\n  - model: a\n",
               MS_EMODEL, "model 'a': a/tokenizer.json is missing (tokenizer merging needs it)",
               NULL);
}

Test(plan, err_model_not_found)
{
    char *hub = th_path(g_dir, "hub");
    setenv("HF_HUB_CACHE", hub, 1);
    plan_fails("merge_method: passthrough\nmodels:\n  - model: nobody/nothing\n", MS_EMODEL,
               "model 'nobody/nothing' not found locally or in the Hugging Face cache",
               "models--nobody--nothing); download it first", NULL);
    free(hub);
}

Test(plan, err_architectures_disagree)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b", .arch = "MistralForCausalLM" });
    const char *y = "merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: a\n"
                    "  - model: b\n";
    plan_fails(y, MS_EPLAN, "models disagree on the architecture", "--allow-crimes", NULL);
    ms_recipe_free(g_recipe);
    g_recipe = NULL;
    struct ms_plan_opts o = { .allow_crimes = true };
    cr_assert_eq(plan_opts(y, &o), 0, "%s", ms_errmsg());
}

Test(plan, err_config_layer_count_disagrees_with_tensors)
{
    mk((struct mspec){ .dir = "a", .drop = NULL });
    /* rewrite config.json with a wrong count */
    const char *cfg = "{\"architectures\": [\"LlamaForCausalLM\"], \"num_hidden_layers\": 6}";
    cr_assert_eq(th_write("a/config.json", cfg, strlen(cfg)), 0);
    plan_fails("merge_method: passthrough\nmodels:\n  - model: a\n", MS_EMODEL,
               "num_hidden_layers is 6 but its tensors have 4 layers", NULL);
}

/* Runs a failing build with stderr captured; returns the captured text (malloc'd). */
static char *stderr_of_failing_plan(const char *yaml)
{
    fflush(stderr);
    int saved = dup(2);
    int fd = open("stderr.txt", O_CREAT | O_TRUNC | O_WRONLY, 0644);
    cr_assert(saved >= 0 && fd >= 0);
    dup2(fd, 2);
    close(fd);
    int rc = plan(yaml);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    cr_assert_neq(rc, 0);
    return th_read("stderr.txt", NULL);
}

Test(plan, every_problem_is_reported)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    char *err = stderr_of_failing_plan("merge_method: linear\n"
                                       "dtype: half\n"
                                       "tokenizer_source: base\n"
                                       "models:\n"
                                       "  - model: a\n"
                                       "    parameters: {weight: 1}\n"
                                       "  - model: b\n"
                                       "    parameters: {weight: 1, normalize: 0.5}\n");
    cr_assert(err);
    cr_assert(strstr(err, "mergestream: r.yml:2:8: unknown dtype 'half'"), "%s", err);
    cr_assert(strstr(err, "mergestream: model 'a': a/tokenizer.json is missing"), "%s", err);
    /* the first problem is the message */
    cr_assert(strstr(ms_errmsg(), "unknown dtype 'half'"), "%s", ms_errmsg());
    free(err);
    ms_recipe_free(g_recipe);
    g_recipe = NULL;
    /* model problems after recipe ones: each tensor problem once, counted */
    mk((struct mspec){ .dir = "c", .drop = LAYER(0, "mlp.up_proj.weight"),
                       .wide = LAYER(1, "mlp.down_proj.weight") });
    err = stderr_of_failing_plan("merge_method: linear\n"
                                 "models:\n"
                                 "  - model: a\n"
                                 "    parameters: {weight: 1}\n"
                                 "  - model: c\n");
    cr_assert(strstr(err, "tensor 'model.layers.0.mlp.up_proj.weight' required but not present "
                          "in model 'c'"), "%s", err);
    cr_assert(strstr(err, "shape mismatch for tensor 'model.layers.1.mlp.down_proj.weight'"),
              "%s", err);
    cr_assert(strstr(err, "missing required parameter 'weight' for model 'c' tensor "
                          "'model.embed_tokens.weight' (and "), "%s", err);
    free(err);
}

/* ------------------------------------------------------------------ model references */

Test(plan, hub_id_from_the_hf_cache)
{
    char *hub = th_path(g_dir, "hub");
    const char *hash = "0123456789abcdef0123456789abcdef01234567";
    char path[1024];
    snprintf(path, sizeof path, "%s/models--org--tiny/snapshots/%s", hub, hash);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "mkdir -p %s %s/models--org--tiny/refs && printf '%s\\n' > "
             "%s/models--org--tiny/refs/main", path, hub, hash, hub);
    cr_assert_eq(system(cmd), 0);
    mk((struct mspec){ .dir = path });
    setenv("HF_HUB_CACHE", hub, 1);
    char *out = NULL;
    cr_assert_eq(ms_model_resolve("org/tiny", NULL, &out), 0, "%s", ms_errmsg());
    cr_assert_str_eq(out, path);
    ms_free(out);
    cr_assert_eq(ms_model_resolve("org/tiny", "v2", &out), MS_EMODEL);
    cr_assert(strstr(ms_errmsg(), "revision 'v2' not found"), "%s", ms_errmsg());
    cr_assert_eq(ms_model_resolve("org/tiny", hash, &out), 0, "%s", ms_errmsg());
    ms_free(out);
    /* HF_HOME/hub when HF_HUB_CACHE is unset */
    unsetenv("HF_HUB_CACHE");
    setenv("HF_HOME", g_dir, 1);
    cr_assert_eq(ms_model_resolve("org/tiny", NULL, &out), 0, "%s", ms_errmsg());
    ms_free(out);
    plan_ok("merge_method: passthrough\nmodels:\n  - model: org/tiny\n");
    cr_assert_str_eq(g_plan->models[0].ref, "org/tiny");
    cr_assert_str_eq(g_plan->models[0].path, path);
    free(hub);
}


/* ------------------------------------------------------------------ other architectures */

static void mk_gpt(const char *dir, bool tied)
{
    struct tspec ts[16];
    size_t n = 0;
    static char names[3][3][64];
    ts[n++] = (struct tspec){ "transformer.wte.weight", 32, 8 };
    for (int l = 0; l < 3; l++) {
        snprintf(names[l][0], 64, "transformer.h.%d.ln_1.weight", l);
        snprintf(names[l][1], 64, "transformer.h.%d.attn.c_attn.weight", l);
        snprintf(names[l][2], 64, "transformer.h.%d.mlp.c_fc.weight", l);
        ts[n++] = (struct tspec){ names[l][0], 8, 0 };
        ts[n++] = (struct tspec){ names[l][1], 8, 24 };
        ts[n++] = (struct tspec){ names[l][2], 8, 32 };
    }
    ts[n++] = (struct tspec){ "transformer.ln_f.weight", 8, 0 };
    if (!tied)
        ts[n++] = (struct tspec){ "lm_head.weight", 32, 8 };
    mk_raw(dir, "{\"architectures\": [\"GPT2LMHeadModel\"], \"n_layer\": 3, "
                "\"layer_norm_epsilon\": 1e-05}", ts, n);
}

Test(plan, generic_architecture_from_tensor_names)
{
    mk_gpt("g1", false);
    mk_gpt("g2", true);
    plan_ok("merge_method: linear\n"
            "parameters: {weight: 0.5}\n"
            "slices:\n"
            "  - sources:\n"
            "      - model: g1\n"
            "        layer_range: [1, 3]\n"
            "      - model: g2\n"
            "        layer_range: [0, 2]\n");
    cr_assert(strstr(g_plan->arch, "GPT2LMHeadModel"), "%s", g_plan->arch);
    cr_assert_eq(g_plan->out_layers, 2);
    cr_assert_eq(g_plan->njobs, 1 + 2 * 3 + 2);
    const struct ms_job *j = job_ok("transformer.h.0.attn.c_attn.weight");
    cr_assert_str_eq(j->in[0].name, "transformer.h.1.attn.c_attn.weight");
    cr_assert_str_eq(j->in[1].name, "transformer.h.0.attn.c_attn.weight");
    j = job_ok("lm_head.weight");
    cr_assert_eq(j->s.ninputs, 2);
    cr_assert_str_eq(j->in[1].name, "transformer.wte.weight", "tied to the embedding");
    cr_assert(job("transformer.ln_f.weight"));
    cr_assert(strstr(g_plan->out_config_json, "\"n_layer\": 2,"), "%s",
              g_plan->out_config_json);
    cr_assert(strstr(g_plan->out_config_json, "\"layer_norm_epsilon\": 1e-05"));
}

Test(plan, qwen2_biases)
{
    struct tspec ts[64];
    size_t n = 0;
    static char names[2][12][64];
    static const char *const lw[] = {
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
        "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
        "self_attn.v_proj.bias", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
        "mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight",
    };
    ts[n++] = (struct tspec){ "model.embed_tokens.weight", 32, 8 };
    for (int l = 0; l < 2; l++)
        for (int w = 0; w < 12; w++) {
            snprintf(names[l][w], 64, "model.layers.%d.%s", l, lw[w]);
            bool vec = strstr(lw[w], "norm") || strstr(lw[w], "bias");
            ts[n++] = (struct tspec){ names[l][w], 8, vec ? 0 : 8 };
        }
    ts[n++] = (struct tspec){ "model.norm.weight", 8, 0 };
    ts[n++] = (struct tspec){ "model.layers.1.self_attn.rotary_emb.inv_freq", 4, 0 };
    mk_raw("q", "{\"architectures\": [\"Qwen2ForCausalLM\"], \"num_hidden_layers\": 2, "
                "\"tie_word_embeddings\": true}", ts, n);
    plan_ok("merge_method: passthrough\nmodels:\n  - model: q\n");
    cr_assert(job_ok("model.layers.1.self_attn.k_proj.bias")->copy);
    cr_assert_null(job("lm_head.weight"));
    cr_assert_eq(g_plan->njobs, 1 + 2 * 12 + 1);
    cr_assert_eq(g_plan->ndropped, 1);
}

/* ------------------------------------------------------------------ allocation failures */

Test(plan, allocation_failures_are_reported, .timeout = 30)
{
    mk((struct mspec){ .dir = "base" });
    mk((struct mspec){ .dir = "x", .tied = true });
    const char *y = "merge_method: ties\nbase_model: base\nslices:\n"
                    "  - sources:\n      - model: base\n        layer_range: [0, 2]\n"
                    "      - model: x\n        layer_range: [0, 2]\n"
                    "        parameters: {weight: [0, 1], density: 0.5}\n"
                    "  - sources:\n      - model: x\n        layer_range: [3, 4]\n"
                    "      - model: base\n        layer_range: [3, 4]\n"
                    "    parameters: {weight: 0.3}\n";
    cr_assert_eq(th_write("r.yml", y, strlen(y)), 0);
    cr_assert_eq(ms_recipe_load("r.yml", &g_recipe), 0, "%s", ms_errmsg());
    struct ms_plan_opts o = { .out_shard_size = 3000 };
    /* silence the "out of memory" lines */
    fflush(stderr);
    int saved = dup(2), devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 2);
    close(devnull);
    long n;
    for (n = 1; n < 100000; n++) {
        ms_alloc_fail_after(n);
        struct ms_plan *p = NULL;
        int rc = ms_plan_build(g_recipe, &o, &p);
        ms_alloc_fail_after(0);
        if (rc == 0) {
            ms_plan_free(p);
            break;
        }
        cr_assert_null(p);
        if (rc != MS_ENOMEM && !strstr(ms_errmsg(), "out of memory")) {
            dup2(saved, 2);
            cr_assert_fail("allocation %ld: rc %d: %s", n, rc, ms_errmsg());
        }
    }
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    cr_assert_gt(n, 50, "the build allocates");
    cr_assert_lt(n, 100000);
}

/* ------------------------------------------------------------------ CLI and examples */

Test(plan, cli_json_and_usage)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    const char *y = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.3}\n"
                    "  - model: b\n    parameters: {weight: 0.7}\n";
    cr_assert_eq(th_write("r.yml", y, strlen(y)), 0);
    char cmd[1024], *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd, "cd %s && mergestream plan r.yml --json --out-shard-size 2K", g_dir);
    int rc = th_run(cmd, &out, &err);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(out, "\"merge_method\": \"linear\""), "%s", out);
    cr_assert(strstr(out, "\"name\": \"model.layers.3.mlp.up_proj.weight\""));
    cr_assert(strstr(out, "\"weight\": 0.3"));
    cr_assert(strstr(out, "\"file\": \"model-00001-of-"));
    free(out);
    free(err);
    snprintf(cmd, sizeof cmd, "cd %s && mergestream plan r.yml", g_dir);
    rc = th_run(cmd, &out, &err);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(out, "merge method: linear"), "%s", out);
    cr_assert(strstr(out, "model.safetensors"), "%s", out);
    free(out);
    free(err);
    rc = th_run("mergestream plan --bogus r.yml", NULL, &err);
    cr_assert_eq(rc, 2);
    free(err);
    rc = th_run("mergestream plan", NULL, NULL);
    cr_assert_eq(rc, 2);
    snprintf(cmd, sizeof cmd, "cd %s && mergestream plan r.yml --json > /dev/null && "
             "printf 'merge_method: nope\\nmodels:\\n  - model: a\\n' > bad.yml && "
             "mergestream plan bad.yml", g_dir);
    rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 1);
    cr_assert(strstr(err, "mergestream: bad.yml:1:15: unknown merge method 'nope'"), "%s", err);
    free(err);
}

Test(plan, examples_plan_after_demo_models, .timeout = 120)
{
    char cwd[1024];
    cr_assert(getcwd(cwd, sizeof cwd));
    char cmd[4096], *out = NULL, *err = NULL;
    /* tests run from the repository root's build tree: find recipes/ from the binary dir */
    snprintf(cmd, sizeof cmd,
             "root=$(cd %s/.. && pwd); case \"$root\" in */build) root=${root%%/build};; esac; "
             "[ -d \"$root/recipes/examples\" ] || root=$(cd %s/../.. && pwd); "
             "cd %s && mkdir -p b && ln -sf %s/ms-mkmodel b/ms-mkmodel && "
             "sh \"$root/tools/demo-models.sh\" b >/dev/null && cd b && "
             "for r in \"$root\"/recipes/examples/*.yml; do "
             "  mergestream plan \"$r\" >/dev/null || { echo \"FAILED $r\" >&2; exit 1; }; "
             "done; ls \"$root\"/recipes/examples/*.yml | wc -l",
             MS_BUILD_DIR, MS_BUILD_DIR, g_dir, MS_BUILD_DIR);
    int rc = th_run(cmd, &out, &err);
    cr_assert_eq(rc, 0, "%s\n%s", out, err);
    cr_assert_geq(atoi(out), 5, "%s", out);
    free(out);
    free(err);
}

/* mergekit's arcee_fusion blends with a `.float()` mask, so its result is float32
 * whatever the compute dtype (merge_methods/arcee_fusion.py, mergekit issue #604).
 * out_dtype still decides. */
Test(plan, arcee_fusion_result_is_float32)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    plan_ok("merge_method: arcee_fusion\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n");
    const struct ms_job *j = job_ok(LAYER(0, "mlp.up_proj.weight"));
    cr_assert_eq(j->s.compute, MS_DT_BF16);
    cr_assert_eq(j->out_dtype, MS_DT_F32);
    ms_plan_free(g_plan);
    ms_recipe_free(g_recipe);
    g_plan = NULL;
    g_recipe = NULL;
    plan_ok("merge_method: arcee_fusion\nbase_model: a\nout_dtype: bfloat16\nmodels:\n"
            "  - model: a\n  - model: b\n");
    cr_assert_eq(job_ok(LAYER(0, "mlp.up_proj.weight"))->out_dtype, MS_DT_BF16);
}

/*
 * A model listed twice is one input (mergekit gathers dict(zip(models, ...)));
 * config.py's parameter() reads, per parameter, the first entry of that model
 * that sets it, then the slice's and the global parameters.
 */
Test(plan, model_listed_twice_is_one_input)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    mk((struct mspec){ .dir = "c" });
    plan_ok("merge_method: ties\nbase_model: a\nparameters: {density: 0.9}\nmodels:\n"
            "  - model: b\n    parameters: {weight: 1}\n"
            "  - model: c\n    parameters: {weight: 2}\n"
            "  - model: b\n    parameters: {weight: 5, density: 0.5}\n");
    const char *t = LAYER(1, "mlp.up_proj.weight");
    const struct ms_job *j = job_ok(t);
    cr_assert_eq(j->s.ninputs, 3, "b, c and the base a");
    cr_assert_eq(input_of(j, "b"), 0);
    cr_assert_eq(input_of(j, "c"), 1);
    cr_assert_eq(pv(t, "b", "weight"), 1.0, "the first entry's weight");
    cr_assert_eq(pv(t, "b", "density"), 0.5, "density from the second entry, before the global");
    cr_assert_eq(pv(t, "c", "density"), 0.9);
    ms_plan_free(g_plan);
    ms_recipe_free(g_recipe);
    g_plan = NULL;
    g_recipe = NULL;
    plan_ok("merge_method: linear\nslices:\n  - sources:\n"
            "      - model: a\n        layer_range: [0, 2]\n        parameters: {weight: 1}\n"
            "      - model: a\n        layer_range: [0, 2]\n        parameters: {weight: 3}\n"
            "      - model: b\n        layer_range: [0, 2]\n        parameters: {weight: 2}\n");
    j = job_ok(LAYER(1, "mlp.up_proj.weight"));
    cr_assert_eq(j->s.ninputs, 2);
    cr_assert_eq(pv(LAYER(1, "mlp.up_proj.weight"), "a", "weight"), 1.0);
    ms_plan_free(g_plan);
    ms_recipe_free(g_recipe);
    g_plan = NULL;
    g_recipe = NULL;
    plan_fails("merge_method: linear\nslices:\n  - sources:\n"
               "      - model: a\n        layer_range: [0, 2]\n        parameters: {weight: 1}\n"
               "      - model: a\n        layer_range: [2, 4]\n        parameters: {weight: 1}\n",
               MS_EPLAN, "r.yml:7:9", "model 'a' is listed twice in one slice with different "
               "layer ranges", NULL);
}

/*
 * Names under parameters: that the method does not declare are ignored by mergekit
 * (and by us), but a misspelt one changes the merge: a warning with file:line:col
 * and the closest declared name; --strict makes it (and an unknown recipe key) an
 * error.
 */
Test(plan, misspelt_parameter_names_warn_and_strict_refuses)
{
    mk((struct mspec){ .dir = "a" });
    mk((struct mspec){ .dir = "b" });
    const char *y = "merge_method: ties\nbase_model: a\nparameters:\n  normalise: false\n"
                    "models:\n  - model: b\n    parameters: {weight: 1, densty: 0.5}\n"
                    "slices_extra_ok: 1\n";
    cr_assert_eq(th_write("r.yml", y, strlen(y)), 0);
    const char *y2 = "merge_method: linear\nparameters: {nomalize: true, bogus: 1}\n"
                     "models:\n  - model: a\n    parameters: {weight: 1}\n";
    cr_assert_eq(th_write("r2.yml", y2, strlen(y2)), 0);
    char cmd[1024], *err = NULL;
    snprintf(cmd, sizeof cmd, "cd %s && mergestream plan r.yml > /dev/null", g_dir);
    int rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(err, "r.yml:4:3: unknown parameter 'normalise' for merge method 'ties' "
                          "(did you mean 'normalize'?)"), "%s", err);
    cr_assert(strstr(err, "r.yml:7:29: unknown parameter 'densty' for merge method 'ties' "
                          "(did you mean 'density'?)"), "%s", err);
    cr_assert(strstr(err, "r.yml:8:1: unknown key 'slices_extra_ok'"), "%s", err);
    free(err);
    snprintf(cmd, sizeof cmd, "cd %s && mergestream plan r2.yml > /dev/null", g_dir);
    rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(err, "r2.yml:2:14: unknown parameter 'nomalize' for merge method 'linear' "
                          "(did you mean 'normalize'?)"), "%s", err);
    cr_assert(strstr(err, "r2.yml:2:30: unknown parameter 'bogus' for merge method 'linear' "
                          "(known: weight, normalize)"), "%s", err);
    free(err);
    /* --strict: each is an error; an unknown recipe key stops the parse first. */
    snprintf(cmd, sizeof cmd, "cd %s && mergestream plan --strict r2.yml", g_dir);
    rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 1, "%s", err);
    cr_assert(strstr(err, "mergestream: r2.yml:2:14: unknown parameter 'nomalize'"), "%s", err);
    cr_assert(strstr(err, "mergestream: r2.yml:2:30: unknown parameter 'bogus'"), "%s", err);
    free(err);
    snprintf(cmd, sizeof cmd, "cd %s && mergestream merge --strict r.yml out", g_dir);
    rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 1, "%s", err);
    cr_assert(strstr(err, "r.yml:8:1: unknown key 'slices_extra_ok'"), "%s", err);
    free(err);
    cr_assert_neq(access("out", F_OK), 0, "no output after a strict refusal");
    /* Near misses of top-level keys are named too. */
    const char *y3 = "merge_method: linear\nparamters: {weight: 1}\nmodels:\n  - model: a\n"
                     "    parameters: {weight: 1}\n";
    cr_assert_eq(th_write("r3.yml", y3, strlen(y3)), 0);
    snprintf(cmd, sizeof cmd, "cd %s && mergestream plan --strict r3.yml", g_dir);
    rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 1, "%s", err);
    cr_assert(strstr(err, "r3.yml:2:1: unknown key 'paramters' (did you mean 'parameters'?)"),
              "%s", err);
    free(err);
}
