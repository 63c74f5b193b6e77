/*
 * test_mkmodel.c - the synthetic model generator (tools/ms-mkmodel.c), run as
 * a program: names, shapes, dtypes, sharding and the index, config files,
 * determinism, and --base fine-tunes.
 */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_safetensors.h"
#include "th.h"

/* ------------------------------------------------------------------ helpers */

static char *g_dir;

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(mkmodel, .init = setup, .fini = teardown, .timeout = 120);

/* Runs "cd g_dir && <fmt>"; returns the exit status, stderr in *err (free). */
__attribute__((format(printf, 2, 3))) static int run(char **err, const char *fmt, ...)
{
    char cmd[4096], full[4600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "cd '%s' && %s", g_dir, cmd);
    char *e = NULL;
    int rc = th_run(full, NULL, &e);
    if (err)
        *err = e;
    else
        free(e);
    return rc;
}

#define RUN_OK(...)                                                                \
    do {                                                                           \
        char *err_;                                                                \
        int rc_ = run(&err_, __VA_ARGS__);                                         \
        cr_assert_eq(rc_, 0, "ms-mkmodel failed (%d): %s", rc_, err_ ? err_ : ""); \
        free(err_);                                                                \
    } while (0)

static char *sub(const char *name) { return th_path(g_dir, name); }

static struct ms_model *open_model(const char *name)
{
    char *p = sub(name);
    struct ms_model *m = NULL;
    int rc = ms_model_open(p, &m);
    cr_assert_eq(rc, 0, "open %s: %s", p, ms_errmsg());
    free(p);
    return m;
}

static bool file_exists(const char *dir, const char *name)
{
    char *d = sub(dir), *p = th_path(d, name);
    FILE *f = fopen(p, "rb");
    if (f)
        fclose(f);
    free(p);
    free(d);
    return f != NULL;
}

static int cmp_in(const char *a, const char *b, const char *name)
{
    char *da = sub(a), *db = sub(b), *pa = th_path(da, name), *pb = th_path(db, name);
    int rc = th_cmp_files(pa, pb);
    free(pa);
    free(pb);
    free(da);
    free(db);
    return rc;
}

/* Reads one tensor of a float dtype as floats (malloc'd, numel entries). */
static float *read_tensor(const struct ms_model *m, const char *name, uint64_t *numel)
{
    uint32_t shard;
    const struct ms_st_tensor *t = ms_model_find(m, name, &shard);
    cr_assert(t, "tensor %s missing", name);
    cr_assert(ms_dtype_is_float(t->dtype));
    const struct ms_st_file *f = m->shards[shard];
    size_t bytes = (size_t)(t->end - t->begin);
    void *raw = ms_aligned_alloc(bytes);
    float *out = malloc((size_t)t->numel * sizeof(float) + 1);
    cr_assert(raw && out);
    FILE *fp = fopen(f->path, "rb");
    cr_assert(fp, "%s", f->path);
    cr_assert_eq(fseek(fp, (long)(f->data_start + t->begin), SEEK_SET), 0);
    cr_assert_eq(fread(raw, 1, bytes, fp), bytes);
    fclose(fp);
    ms_dtype_decode(t->dtype, raw, out, (size_t)t->numel);
    ms_aligned_free(raw);
    *numel = t->numel;
    return out;
}

static json_t *load_json(const char *dir, const char *name)
{
    char *d = sub(dir), *p = th_path(d, name);
    json_error_t e;
    json_t *j = json_load_file(p, 0, &e);
    cr_assert(j, "%s: %s (line %d)", p, e.text, e.line);
    free(p);
    free(d);
    return j;
}

static json_int_t json_int_at(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    cr_assert(json_is_integer(v), "config: %s is not an integer", key);
    return json_integer_value(v);
}

static void check_shape(const struct ms_model *m, const char *name, enum ms_dtype dt,
                        uint32_t ndim, int64_t d0, int64_t d1)
{
    const struct ms_st_tensor *t = ms_model_find(m, name, NULL);
    cr_assert(t, "tensor %s missing", name);
    cr_assert_eq(t->dtype, dt, "%s: dtype %s", name, ms_dtype_name(t->dtype));
    cr_assert_eq(t->ndim, ndim, "%s: ndim %u", name, t->ndim);
    cr_assert_eq(t->shape[0], d0, "%s: shape[0] %" PRId64, name, t->shape[0]);
    if (ndim > 1)
        cr_assert_eq(t->shape[1], d1, "%s: shape[1] %" PRId64, name, t->shape[1]);
}

/* Checks a fresh model made with --layers L --hidden 64 --intermediate 96
 * --vocab 160 --heads 4 --kv-heads 2 (head_dim 16, kv dim 32). */
static void check_fresh(const char *dir, enum ms_dtype dt, bool tied, bool sharded)
{
    const uint32_t L = 3;
    struct ms_model *m = open_model(dir);
    cr_assert_eq(m->ntensors, 9 * L + 2 + (tied ? 0 : 1), "%s: %zu tensors", dir, m->ntensors);
    cr_assert_eq(m->indexed, sharded, "%s: indexed", dir);
    cr_assert_eq(m->nshards > 1, sharded, "%s: %zu shards", dir, m->nshards);
    cr_assert_eq(file_exists(dir, "model.safetensors.index.json"), sharded);
    cr_assert_eq(file_exists(dir, "model.safetensors"), !sharded);

    check_shape(m, "model.embed_tokens.weight", dt, 2, 160, 64);
    check_shape(m, "model.norm.weight", dt, 1, 64, 0);
    if (tied)
        cr_assert_null(ms_model_find(m, "lm_head.weight", NULL));
    else
        check_shape(m, "lm_head.weight", dt, 2, 160, 64);
    for (uint32_t i = 0; i < L; i++) {
        char n[128];
#define LAYER(suffix, nd, a, b)                                                  \
        snprintf(n, sizeof n, "model.layers.%u." suffix, i);                     \
        check_shape(m, n, dt, nd, a, b)
        LAYER("input_layernorm.weight", 1, 64, 0);
        LAYER("post_attention_layernorm.weight", 1, 64, 0);
        LAYER("self_attn.q_proj.weight", 2, 64, 64);
        LAYER("self_attn.k_proj.weight", 2, 32, 64);
        LAYER("self_attn.v_proj.weight", 2, 32, 64);
        LAYER("self_attn.o_proj.weight", 2, 64, 64);
        LAYER("mlp.gate_proj.weight", 2, 96, 64);
        LAYER("mlp.up_proj.weight", 2, 96, 64);
        LAYER("mlp.down_proj.weight", 2, 64, 96);
#undef LAYER
    }

    /* Weights look like N(0, 0.02); norm weights sit around 1. */
    uint64_t n;
    float *w = read_tensor(m, "model.layers.1.mlp.up_proj.weight", &n);
    double sum = 0, sq = 0;
    for (uint64_t k = 0; k < n; k++) {
        cr_assert(isfinite(w[k]));
        sum += w[k];
        sq += (double)w[k] * w[k];
    }
    double mean = sum / (double)n, sd = sqrt(sq / (double)n - mean * mean);
    cr_assert(fabs(mean) < 0.002 && sd > 0.018 && sd < 0.022, "%s: mean %g sd %g", dir, mean, sd);
    free(w);
    w = read_tensor(m, "model.layers.0.input_layernorm.weight", &n);
    for (uint64_t k = 0; k < n; k++)
        cr_assert(w[k] > 0.85f && w[k] < 1.15f, "%s: norm weight %g", dir, (double)w[k]);
    free(w);
    ms_model_free(m);

    json_t *c = load_json(dir, "config.json");
    cr_assert_str_eq(json_string_value(json_object_get(c, "model_type")), "llama");
    cr_assert_str_eq(json_string_value(json_array_get(json_object_get(c, "architectures"), 0)),
                     "LlamaForCausalLM");
    cr_assert_eq(json_int_at(c, "hidden_size"), 64);
    cr_assert_eq(json_int_at(c, "intermediate_size"), 96);
    cr_assert_eq(json_int_at(c, "num_hidden_layers"), L);
    cr_assert_eq(json_int_at(c, "num_attention_heads"), 4);
    cr_assert_eq(json_int_at(c, "num_key_value_heads"), 2);
    cr_assert_eq(json_int_at(c, "vocab_size"), 160);
    cr_assert_eq(json_is_true(json_object_get(c, "tie_word_embeddings")), tied);
    const char *want = dt == MS_DT_BF16 ? "bfloat16" : dt == MS_DT_F16 ? "float16" : "float32";
    cr_assert_str_eq(json_string_value(json_object_get(c, "torch_dtype")), want);
    json_decref(c);
    static const char *const side[] = { "tokenizer.json", "tokenizer_config.json",
                                        "special_tokens_map.json", "generation_config.json" };
    for (size_t i = 0; i < MS_ARRAY_LEN(side); i++)
        json_decref(load_json(dir, side[i]));
}

#define ARCH "--layers 3 --hidden 64 --intermediate 96 --vocab 160 --heads 4 --kv-heads 2"

/* ------------------------------------------------------------------ tests */

Test(mkmodel, every_dtype_single_and_sharded)
{
    static const struct {
        const char *opt;
        enum ms_dtype dt;
    } types[] = { { "bf16", MS_DT_BF16 }, { "f16", MS_DT_F16 }, { "f32", MS_DT_F32 } };
    for (size_t i = 0; i < MS_ARRAY_LEN(types); i++) {
        char one[32], many[32];
        snprintf(one, sizeof one, "one-%s", types[i].opt);
        snprintf(many, sizeof many, "many-%s", types[i].opt);
        RUN_OK("ms-mkmodel " ARCH " --dtype %s --seed 7 %s", types[i].opt, one);
        RUN_OK("ms-mkmodel " ARCH " --dtype %s --seed 7 --shard-size 40K %s", types[i].opt, many);
        check_fresh(one, types[i].dt, false, false);
        check_fresh(many, types[i].dt, false, true);
    }
}

Test(mkmodel, tied_has_no_lm_head)
{
    RUN_OK("ms-mkmodel " ARCH " --tied --seed 3 t1");
    RUN_OK("ms-mkmodel " ARCH " --tied --seed 3 --shard-size 30K t2");
    check_fresh("t1", MS_DT_BF16, true, false);
    check_fresh("t2", MS_DT_BF16, true, true);
}

Test(mkmodel, index_lists_every_tensor_with_its_shard)
{
    RUN_OK("ms-mkmodel " ARCH " --shard-size 40K s");
    struct ms_model *m = open_model("s");
    json_t *idx = load_json("s", "model.safetensors.index.json");
    json_t *wm = json_object_get(idx, "weight_map");
    cr_assert_eq(json_object_size(wm), m->ntensors);
    uint64_t total = 0;
    for (size_t i = 0; i < m->ntensors; i++) {
        uint32_t shard;
        const struct ms_st_tensor *t = ms_model_tensor_at(m, i, &shard);
        const char *file = json_string_value(json_object_get(wm, t->name));
        cr_assert(file, "%s not in the index", t->name);
        const char *slash = strrchr(m->shards[shard]->path, '/');
        cr_assert_str_eq(file, slash ? slash + 1 : m->shards[shard]->path);
        total += t->end - t->begin;
        /* Every shard but a single-tensor one respects the limit. */
        cr_assert(m->shards[shard]->ntensors == 1 ||
                  m->shards[shard]->file_size - m->shards[shard]->data_start <= 40000);
    }
    cr_assert_eq((uint64_t)json_integer_value(
                     json_object_get(json_object_get(idx, "metadata"), "total_size")),
                 total);
    json_decref(idx);
    ms_model_free(m);
}

Test(mkmodel, same_seed_same_bytes_other_seed_differs)
{
    RUN_OK("ms-mkmodel " ARCH " --seed 5 --shard-size 40K a");
    RUN_OK("ms-mkmodel " ARCH " --seed 5 --shard-size 40K b");
    RUN_OK("ms-mkmodel " ARCH " --seed 6 --shard-size 40K c");
    struct ms_model *m = open_model("a");
    for (size_t s = 0; s < m->nshards; s++) {
        const char *slash = strrchr(m->shards[s]->path, '/');
        const char *f = slash ? slash + 1 : m->shards[s]->path;
        cr_assert_eq(cmp_in("a", "b", f), 0, "%s differs for the same seed", f);
        cr_assert_neq(cmp_in("a", "c", f), 0, "%s is the same for another seed", f);
    }
    ms_model_free(m);
    static const char *const side[] = { "model.safetensors.index.json", "config.json",
                                        "tokenizer.json", "tokenizer_config.json",
                                        "special_tokens_map.json", "generation_config.json" };
    for (size_t i = 0; i < MS_ARRAY_LEN(side); i++)
        cr_assert_eq(cmp_in("a", "b", side[i]), 0, "%s differs", side[i]);
}

/*
 * A fine-tune keeps names, shapes, dtypes and sharding, and differs from the
 * base by N(0, sigma) noise: each delta within 6 sigma plus the rounding to
 * bf16 (half an ulp of values up to ~1.1: 2^-8), mean near 0, spread near sigma.
 * The embedding (17,000 x 64 = 1.09M elements) spans two generator chunks.
 */
Test(mkmodel, base_fine_tune_adds_small_noise)
{
    const double sigma = 0.01;
    RUN_OK("ms-mkmodel --layers 2 --hidden 64 --intermediate 96 --vocab 17000 --seed 1 "
           "--shard-size 1M base");
    RUN_OK("ms-mkmodel --base base --noise %g --seed 2 ft", sigma);
    RUN_OK("ms-mkmodel --base base --noise %g --seed 2 ft2", sigma);
    RUN_OK("ms-mkmodel --base base --noise %g --seed 3 ft3", sigma);

    struct ms_model *b = open_model("base"), *f = open_model("ft");
    cr_assert_eq(f->ntensors, b->ntensors);
    cr_assert_eq(f->nshards, b->nshards);
    cr_assert(b->nshards > 1);
    cr_assert_eq(cmp_in("base", "ft", "model.safetensors.index.json"), 0);
    cr_assert_eq(cmp_in("base", "ft", "config.json"), 0);
    cr_assert_eq(cmp_in("base", "ft", "tokenizer.json"), 0);

    double sum = 0, sq = 0;
    uint64_t count = 0, zero = 0;
    for (size_t i = 0; i < b->ntensors; i++) {
        uint32_t bs, fs;
        const struct ms_st_tensor *bt = ms_model_tensor_at(b, i, &bs);
        const struct ms_st_tensor *ft = ms_model_find(f, bt->name, &fs);
        cr_assert(ft, "%s missing in the fine-tune", bt->name);
        cr_assert_eq(fs, bs, "%s: shard", bt->name);
        cr_assert_eq(ft->dtype, bt->dtype);
        cr_assert_eq(ft->ndim, bt->ndim);
        cr_assert_eq(ft->begin, bt->begin, "%s: offset", bt->name);
        cr_assert_eq(memcmp(ft->shape, bt->shape, sizeof bt->shape), 0);
        uint64_t n1, n2;
        float *x = read_tensor(b, bt->name, &n1), *y = read_tensor(f, bt->name, &n2);
        cr_assert_eq(n1, n2);
        for (uint64_t k = 0; k < n1; k++) {
            double d = (double)y[k] - x[k];
            cr_assert(fabs(d) <= 6 * sigma + 0x1p-8, "%s[%" PRIu64 "]: %g -> %g", bt->name, k,
                      (double)x[k], (double)y[k]);
            sum += d;
            sq += d * d;
            zero += d == 0;
        }
        count += n1;
        free(x);
        free(y);
    }
    double mean = sum / (double)count, sd = sqrt(sq / (double)count);
    cr_assert(fabs(mean) < sigma / 100, "mean delta %g", mean);
    cr_assert(sd > 0.9 * sigma && sd < 1.1 * sigma, "delta sd %g", sd);
    cr_assert_lt(zero, count / 10, "%" PRIu64 " of %" PRIu64 " unchanged", zero, count);
    ms_model_free(b);
    ms_model_free(f);

    /* Deterministic: same seed same bytes, other seed differs. */
    struct ms_model *m = open_model("ft");
    for (size_t s = 0; s < m->nshards; s++) {
        const char *f1 = strrchr(m->shards[s]->path, '/') + 1;
        cr_assert_eq(cmp_in("ft", "ft2", f1), 0, "%s", f1);
        cr_assert_neq(cmp_in("ft", "ft3", f1), 0, "%s", f1);
    }
    ms_model_free(m);
}

Test(mkmodel, base_with_dtype_and_shard_override)
{
    RUN_OK("ms-mkmodel " ARCH " --tied --seed 1 --shard-size 40K base");
    RUN_OK("ms-mkmodel --base base --dtype f32 --shard-size 0 --noise 0 ft");
    struct ms_model *b = open_model("base"), *f = open_model("ft");
    cr_assert_eq(f->nshards, 1);
    cr_assert_eq(f->ntensors, b->ntensors);
    cr_assert_null(ms_model_find(f, "lm_head.weight", NULL));
    for (size_t i = 0; i < b->ntensors; i++) {
        const struct ms_st_tensor *bt = ms_model_tensor_at(b, i, NULL);
        const struct ms_st_tensor *ft = ms_model_find(f, bt->name, NULL);
        cr_assert(ft);
        cr_assert_eq(ft->dtype, MS_DT_F32, "%s", bt->name);
        /* Zero noise: bf16 values widen exactly. */
        uint64_t n1, n2;
        float *x = read_tensor(b, bt->name, &n1), *y = read_tensor(f, bt->name, &n2);
        cr_assert_eq(memcmp(x, y, n1 * sizeof(float)), 0, "%s", bt->name);
        free(x);
        free(y);
    }
    ms_model_free(b);
    ms_model_free(f);
    json_t *c = load_json("ft", "config.json");
    cr_assert_str_eq(json_string_value(json_object_get(c, "torch_dtype")), "float32");
    cr_assert(json_is_true(json_object_get(c, "tie_word_embeddings")));
    json_decref(c);
}

/* A base that is not ours: mixed dtypes, integer tensors copied unchanged,
 * F64 noised and kept F64, no config files. */
Test(mkmodel, base_with_mixed_dtypes)
{
    char *dir = sub("foreign");
    cr_assert_eq(run(NULL, "mkdir foreign"), 0);
    static uint16_t bf[300];
    static float f32[7];
    static double f64[5];
    static int64_t i64[3] = { -1, 0, 1234567890123 };
    static uint8_t u8[9] = { 1, 2, 3, 4, 5, 6, 7, 8, 9 };
    for (int i = 0; i < 300; i++)
        bf[i] = ms_f32_to_bf16_1((float)i / 300);
    for (int i = 0; i < 7; i++)
        f32[i] = (float)i;
    for (int i = 0; i < 5; i++)
        f64[i] = 1.0 / (i + 1);
    struct ms_out_tensor t[5] = {
        { .name = "a.bf16", .dtype = MS_DT_BF16, .ndim = 2, .shape = { 20, 15 }, .nbytes = 600 },
        { .name = "b.f32", .dtype = MS_DT_F32, .ndim = 1, .shape = { 7 }, .nbytes = 28 },
        { .name = "c.f64", .dtype = MS_DT_F64, .ndim = 1, .shape = { 5 }, .nbytes = 40 },
        { .name = "d.i64", .dtype = MS_DT_I64, .ndim = 1, .shape = { 3 }, .nbytes = 24 },
        { .name = "e.u8", .dtype = MS_DT_U8, .ndim = 2, .shape = { 3, 3 }, .nbytes = 9 },
    };
    const void *data[5] = { bf, f32, f64, i64, u8 };
    char *file = th_path(dir, "model.safetensors");
    cr_assert_eq(ms_st_write_file(file, t, data, 5), 0, "%s", ms_errmsg());
    RUN_OK("ms-mkmodel --base foreign --noise 0.001 --seed 9 ft");
    struct ms_model *f = open_model("ft");
    cr_assert_eq(f->ntensors, 5);
    for (int i = 0; i < 5; i++) {
        const struct ms_st_tensor *x = ms_model_find(f, t[i].name, NULL);
        cr_assert(x, "%s", t[i].name);
        cr_assert_eq(x->dtype, t[i].dtype, "%s", t[i].name);
        cr_assert_eq(x->end - x->begin, t[i].nbytes, "%s", t[i].name);
    }
    uint64_t n;
    float *v = read_tensor(f, "c.f64", &n);
    for (uint64_t k = 0; k < n; k++)
        cr_assert(v[k] != (float)f64[k] && fabs(v[k] - f64[k]) < 0.006, "c.f64[%" PRIu64 "]", k);
    free(v);
    /* The integer tensors are byte-identical. */
    FILE *fp = fopen(f->shards[0]->path, "rb");
    cr_assert(fp);
    for (int i = 3; i < 5; i++) {
        const struct ms_st_tensor *x = ms_model_find(f, t[i].name, NULL);
        unsigned char buf[64];
        cr_assert_eq(fseek(fp, (long)(f->shards[0]->data_start + x->begin), SEEK_SET), 0);
        cr_assert_eq(fread(buf, 1, t[i].nbytes, fp), t[i].nbytes);
        cr_assert_eq(memcmp(buf, data[i], t[i].nbytes), 0, "%s changed", t[i].name);
    }
    fclose(fp);
    ms_model_free(f);
    cr_assert(!file_exists("ft", "config.json"));
    free(file);
    free(dir);
}

Test(mkmodel, size_picks_the_layer_count)
{
    /* bf16, hidden 64 (one head, kv dim 64), inter 96, vocab 160: the fixed
     * tensors are (2*160*64 + 64) * 2 = 41,088 bytes, a layer is
     * (2*64 + 2*64*64 + 2*64*64 + 3*64*96) * 2 = 69,888 bytes. */
    RUN_OK("ms-mkmodel --hidden 64 --intermediate 96 --vocab 160 --size 1M s");
    json_t *c = load_json("s", "config.json");
    cr_assert_eq(json_int_at(c, "num_hidden_layers"), 14); /* (1e6 - 41088) / 69888 = 13.7 */
    json_decref(c);
    RUN_OK("ms-mkmodel --hidden 64 --intermediate 96 --vocab 160 --size 0 --layers 2 z");
    c = load_json("z", "config.json");
    cr_assert_eq(json_int_at(c, "num_hidden_layers"), 2);
    json_decref(c);
}

Test(mkmodel, rerun_replaces_an_earlier_model)
{
    RUN_OK("ms-mkmodel " ARCH " --shard-size 40K m");
    cr_assert(file_exists("m", "model.safetensors.index.json"));
    RUN_OK("ms-mkmodel " ARCH " m");
    cr_assert(!file_exists("m", "model.safetensors.index.json"));
    cr_assert_neq(run(NULL, "ls m | grep -q '^model-'"), 0, "stale shards left");
    check_fresh("m", MS_DT_BF16, false, false);
}

Test(mkmodel, errors_are_one_line)
{
    static const struct {
        const char *args;
        int status;
        const char *says;
    } cases[] = {
        { "--bogus x", 2, "--bogus" },
        { "", 2, "OUT_DIR" },
        { "--heads 3 x", 2, "--heads" },
        { "--hidden 64 --heads 4 --kv-heads 3 x", 2, "--kv-heads" },
        { "--dtype fp8 x", 2, "--dtype" },
        { "--shard-size 1.5B x", 2, "--shard-size" },
        { "--vocab 2 x", 2, "--vocab" },
        { "--layers", 2, "missing value" },
        { "--tied=1 x", 2, "--tied" },
        { "--size 1M --layers 3 x", 2, "--size" },
        { "--noise 0.1 x", 2, "--base" },
        { "--base nowhere --layers 2 x", 2, "--base" },
        { "--base nowhere x", 1, "nowhere" },
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(cases); i++) {
        char *err = NULL;
        int rc = run(&err, "ms-mkmodel %s", cases[i].args);
        cr_assert_eq(rc, cases[i].status, "'%s': status %d, stderr %s", cases[i].args, rc, err);
        cr_assert(err && strstr(err, cases[i].says), "'%s': %s", cases[i].args, err);
        char *nl = strchr(err, '\n');
        cr_assert(nl && !nl[1], "'%s': not one line: %s", cases[i].args, err);
        free(err);
    }
    char *out = NULL;
    cr_assert_eq(th_run("ms-mkmodel --help", &out, NULL), 0);
    cr_assert(strstr(out, "--shard-size"));
    free(out);
}
