/*
 * test_lora.c - LoRA references (`model+lora`, base_model too): a merge that
 * reads a model through its adapter gives the bytes of the same merge over a
 * model into which the test folded the adapter by hand.
 *
 * The hand fold below is written independently of pipeline/lora.c and
 * stages/lora_fold.c, from PEFT's merge_and_unload arithmetic as mergekit runs it
 * (mergekit-spec.md 1.2; peft LoraLayer.get_delta_weight / merge): the model is
 * loaded in dtype D, delta = float32(B @ A) * float32(scale) (transposed for
 * fan_in_fan_out and embeddings), W = D(float32(W_D) + delta), stored in D. The
 * k-sum is taken in double in k order; a second check bounds every folded value
 * against the exact W + scale * B @ A (float64) to one rounding of D.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_safetensors.h"
#include "th.h"

static char *g_dir;

static void setup(void)
{
    g_dir = th_tmpdir();
    TH_RUN_OK(g_dir, "ms-mkmodel --layers 2 --hidden 64 --intermediate 96 --vocab 128 --dtype bf16 "
                     "--seed 3 base >/dev/null && ms-mkmodel --base base --noise 0.01 --seed 4 ft1 "
                     ">/dev/null && ms-mkmodel --base base --noise 0.01 --seed 5 ft2 >/dev/null");
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(lora, .init = setup, .fini = teardown, .timeout = 240);

/* ------------------------------------------------------------------ hand fold */

struct adapter {
    unsigned r;
    double alpha;
    bool rslora, fifo;
};

static float *read_tensor(const struct ms_st_file *f, const struct ms_st_tensor *t)
{
    FILE *fp = fopen(f->path, "rb");
    cr_assert_not_null(fp);
    size_t nb = (size_t)(t->end - t->begin);
    void *raw = malloc(nb + 8);
    float *x = malloc(t->numel * sizeof *x + 4);
    cr_assert(raw && x);
    cr_assert_eq(fseek(fp, (long)(f->data_start + t->begin), SEEK_SET), 0);
    cr_assert_eq(fread(raw, 1, nb, fp), nb);
    fclose(fp);
    ms_dtype_decode(t->dtype, raw, x, t->numel);
    free(raw);
    return x;
}

static float to_dtype(enum ms_dtype d, float v)
{
    return d == MS_DT_BF16 ? ms_round_bf16_1(v) : d == MS_DT_F16 ? ms_round_f16_1(v) : v;
}

/* Half an ulp of v in dtype d (the largest error of one rounding to d). */
static double half_ulp(enum ms_dtype d, double v)
{
    int bits = d == MS_DT_BF16 ? 8 : d == MS_DT_F16 ? 11 : 24;
    int e;
    frexp(fabs(v), &e);
    return ldexp(1.0, e - bits - 1) + 1e-30;
}

/*
 * Writes out_dir/model.safetensors: every tensor of model_dir folded with the
 * adapter in lora_dir, in dtype D (MS_DT_NONE: each tensor's own), and copies
 * config.json. Returns the number of folded tensors.
 */
static int hand_fold(const char *model_dir, const char *lora_dir, const struct adapter *ad,
                     enum ms_dtype D, const char *out_dir)
{
    char path[1024];
    struct ms_st_file *mf = NULL, *af = NULL;
    snprintf(path, sizeof path, "%s/%s/model.safetensors", g_dir, model_dir);
    cr_assert_eq(ms_st_open(path, &mf), 0, "%s", ms_errmsg());
    snprintf(path, sizeof path, "%s/%s/adapter_model.safetensors", g_dir, lora_dir);
    cr_assert_eq(ms_st_open(path, &af), 0, "%s", ms_errmsg());
    size_t n = mf->ntensors;
    struct ms_out_tensor *ot = calloc(n, sizeof *ot);
    void **data = calloc(n, sizeof *data);
    int folded = 0;
    for (size_t i = 0; i < n; i++) {
        const struct ms_st_tensor *t = &mf->tensors[i];
        enum ms_dtype d = D == MS_DT_NONE ? t->dtype : D;
        float *w = read_tensor(mf, t);
        char an[512], bn[512], module[512];
        size_t len = strlen(t->name);
        snprintf(module, sizeof module, "%.*s", (int)(len - 7), t->name);
        bool embed = strstr(module, "embed_tokens") != NULL;
        snprintf(an, sizeof an,
                 embed ? "base_model.model.%s.lora_embedding_A"
                       : "base_model.model.%s.lora_A.weight",
                 module);
        snprintf(bn, sizeof bn,
                 embed ? "base_model.model.%s.lora_embedding_B"
                       : "base_model.model.%s.lora_B.weight",
                 module);
        const struct ms_st_tensor *ta = ms_st_find(af, an), *tb = ms_st_find(af, bn);
        for (uint64_t e = 0; e < t->numel; e++)
            w[e] = to_dtype(d, w[e]);
        if (ta && tb) {
            folded++;
            float *A = read_tensor(af, ta), *B = read_tensor(af, tb);
            uint64_t rows = (uint64_t)t->shape[0], cols = (uint64_t)t->shape[1];
            bool tr = embed || ad->fifo;
            double scale = ad->rslora ? ad->alpha / sqrt((double)ad->r) : ad->alpha / ad->r;
            for (uint64_t i0 = 0; i0 < rows; i0++) {
                for (uint64_t j0 = 0; j0 < cols; j0++) {
                    /* B @ A is [out, in]; for transposed layers W[i][j] = (B @ A)[j][i]. */
                    uint64_t p = tr ? j0 : i0, q = tr ? i0 : j0;
                    uint64_t na = (uint64_t)ta->shape[1];
                    double dot = 0;
                    for (unsigned k = 0; k < ad->r; k++)
                        dot += (double)B[p * ad->r + k] * (double)A[k * na + q];
                    float delta = (float)dot * (float)scale;
                    float *x = &w[i0 * cols + j0];
                    double exact = (double)*x + scale * dot;
                    /* one rounding to d, plus float32's on delta and on the sum */
                    double wd = (double)*x;
                    *x = to_dtype(d, *x + delta);
                    cr_assert_leq(fabs((double)*x - exact),
                                  half_ulp(d, exact) + ldexp(fabs(wd) + fabs(scale * dot), -22),
                                  "%s[%lu][%lu]: %g vs exact %g", t->name, (unsigned long)i0,
                                  (unsigned long)j0, (double)*x, exact);
                }
            }
            free(A);
            free(B);
        }
        ot[i].name = t->name;
        ot[i].dtype = d;
        ot[i].ndim = t->ndim;
        memcpy(ot[i].shape, t->shape, sizeof t->shape);
        ot[i].nbytes = t->numel * (ms_dtype_bits(d) / 8);
        data[i] = malloc(ot[i].nbytes + 4);
        if (d == MS_DT_BF16)
            ms_f32_to_bf16(w, data[i], t->numel);
        else if (d == MS_DT_F16)
            ms_f32_to_f16(w, data[i], t->numel);
        else
            memcpy(data[i], w, t->numel * 4);
        free(w);
    }
    snprintf(path, sizeof path, "%s/%s", g_dir, out_dir);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/model.safetensors", g_dir, out_dir);
    cr_assert_eq(ms_st_write_file(path, ot, (const void *const *)data, n), 0, "%s", ms_errmsg());
    TH_RUN_OK(g_dir, "cp %s/config.json %s/", model_dir, out_dir);
    for (size_t i = 0; i < n; i++)
        free(data[i]);
    free(data);
    free(ot);
    ms_st_free(mf);
    ms_st_free(af);
    return folded;
}

static void write_recipe(const char *name, const char *text)
{
    char *p = th_path(g_dir, name);
    cr_assert_eq(th_write(p, text, strlen(text)), 0);
    free(p);
}

static void assert_same(const char *a, const char *b)
{
    char pa[1024], pb[1024];
    snprintf(pa, sizeof pa, "%s/%s/model.safetensors", g_dir, a);
    snprintf(pb, sizeof pb, "%s/%s/model.safetensors", g_dir, b);
    cr_assert_eq(th_cmp_files(pa, pb), 0, "%s and %s differ", pa, pb);
}

static const char *const linear_fold = "merge_method: linear\n"
                                       "models:\n"
                                       "  - model: base+lora\n"
                                       "    parameters: {weight: 0.6}\n"
                                       "  - model: ft1\n"
                                       "    parameters: {weight: 0.4}\n";
static const char *const linear_hand = "merge_method: linear\n"
                                       "models:\n"
                                       "  - model: folded\n"
                                       "    parameters: {weight: 0.6}\n"
                                       "  - model: ft1\n"
                                       "    parameters: {weight: 0.4}\n";
static const char *const linear_plain = "merge_method: linear\n"
                                        "models:\n"
                                        "  - model: base\n"
                                        "    parameters: {weight: 0.6}\n"
                                        "  - model: ft1\n"
                                        "    parameters: {weight: 0.4}\n";

/* ------------------------------------------------------------------ tests */

Test(lora, merge_equals_merge_of_hand_folded_model)
{
    TH_RUN_OK(g_dir, "ms-mklora --model base --r 4 --alpha 16 --seed 7 "
                     "--targets q_proj,v_proj,down_proj,embed_tokens,lm_head lora");
    struct adapter ad = { .r = 4, .alpha = 16 };
    /* config.json says bfloat16: transformers' dtype="auto" loads and saves in it */
    cr_assert_eq(hand_fold("base", "lora", &ad, MS_DT_BF16, "folded"), 8);
    write_recipe("fold.yml", linear_fold);
    write_recipe("hand.yml", linear_hand);
    write_recipe("plain.yml", linear_plain);
    TH_RUN_OK(g_dir, "mergestream merge fold.yml out_fold -q && mergestream merge hand.yml "
                     "out_hand -q && mergestream merge plain.yml out_plain -q");
    assert_same("out_fold", "out_hand");
    char pa[1024], pb[1024];
    snprintf(pa, sizeof pa, "%s/out_fold/model.safetensors", g_dir);
    snprintf(pb, sizeof pb, "%s/out_plain/model.safetensors", g_dir);
    cr_assert_neq(th_cmp_files(pa, pb), 0, "the adapter changed nothing");
    /* plan shows the adapter */
    char *out = NULL;
    cr_assert_eq(th_run_in(g_dir, &out, NULL, "mergestream plan fold.yml"), 0);
    cr_assert(strstr(out, "LoRA folded in as read: adapter lora: 8 modules, r 4, alpha 16"), "%s",
              out);
    free(out);
}

Test(lora, rslora_and_fan_in_fan_out)
{
    /* fan_in_fan_out: weights stored (in, out), so B is cols x r and A is r x rows. */
    TH_RUN_OK(g_dir, "ms-mklora --model base --r 3 --alpha 5 --rslora --fan-in-fan-out --seed 9 "
                     "--targets down_proj,up_proj,q_proj lora");
    struct adapter ad = { .r = 3, .alpha = 5, .rslora = true, .fifo = true };
    cr_assert_eq(hand_fold("base", "lora", &ad, MS_DT_BF16, "folded"), 6);
    write_recipe("fold.yml", linear_fold);
    write_recipe("hand.yml", linear_hand);
    TH_RUN_OK(g_dir, "mergestream merge fold.yml out_fold -q && mergestream merge hand.yml "
                     "out_hand -q");
    assert_same("out_fold", "out_hand");
}

Test(lora, rank_pattern_and_target_modules)
{
    /* rank_pattern set: each module's rank is its matrices' (4 here, config r says 8), and
     * the scale alpha / 4. A target_modules list without v_proj: its tensors are ignored,
     * as PEFT ignores weights of modules it did not wrap. The values depend on the tensor
     * name and seed only, so lora_q holds exactly lora's q_proj matrices. */
    TH_RUN_OK(g_dir, "ms-mklora --model base --r 4 --alpha 12 --seed 29 --targets q_proj,v_proj "
                     "lora && ms-mklora --model base --r 4 --alpha 12 --seed 29 --targets q_proj "
                     "lora_q && sed -i 's/\"r\": 4/\"r\": 8/; "
                     "s/\"rank_pattern\": {}/\"rank_pattern\": {\"q_proj\": 4, \"v_proj\": 4}/; "
                     "s/\"target_modules\": .*/\"target_modules\": [\"q_proj\"]/' "
                     "lora/adapter_config.json");
    struct adapter ad = { .r = 4, .alpha = 12 };
    cr_assert_eq(hand_fold("base", "lora_q", &ad, MS_DT_BF16, "folded"), 2);
    write_recipe("fold.yml", linear_fold);
    write_recipe("hand.yml", linear_hand);
    char *err = NULL;
    TH_RUN_OK(g_dir, "mergestream merge hand.yml out_hand -q");
    cr_assert_eq(th_run_in(g_dir, NULL, &err, "mergestream merge fold.yml out_fold"), 0, "%s",
                 err);
    cr_assert(strstr(err, "4 adapter tensors (e.g. "
                          "'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight') are "
                          "for modules not in target_modules"), "%s", err);
    free(err);
    assert_same("out_fold", "out_hand");
    /* without rank_pattern, r must match the matrices */
    TH_RUN_OK(g_dir, "sed -i 's/\"rank_pattern\": {.*}/\"rank_pattern\": {}/' "
                     "lora/adapter_config.json");
    cr_assert_neq(th_run_in(g_dir, NULL, &err, "mergestream merge fold.yml out2 -q"), 0);
    cr_assert(strstr(err, "q_proj.lora_A.weight' has rank 4 but adapter_config.json says r = 8"),
              "%s", err);
    free(err);
}

Test(lora, base_model_with_lora)
{
    TH_RUN_OK(g_dir, "ms-mklora --model base --r 2 --alpha 4 --dtype BF16 --seed 11 "
                     "--targets q_proj,k_proj,o_proj,gate_proj lora");
    struct adapter ad = { .r = 2, .alpha = 4 };
    cr_assert_eq(hand_fold("base", "lora", &ad, MS_DT_BF16, "folded"), 8);
    write_recipe("fold.yml", "merge_method: task_arithmetic\n"
                             "base_model: base+lora\n"
                             "models:\n"
                             "  - model: ft1\n"
                             "    parameters: {weight: 0.7}\n"
                             "  - model: ft2\n"
                             "    parameters: {weight: 0.5}\n");
    write_recipe("hand.yml", "merge_method: task_arithmetic\n"
                             "base_model: folded\n"
                             "models:\n"
                             "  - model: ft1\n"
                             "    parameters: {weight: 0.7}\n"
                             "  - model: ft2\n"
                             "    parameters: {weight: 0.5}\n");
    TH_RUN_OK(g_dir, "mergestream merge fold.yml out_fold -q && mergestream merge hand.yml "
                     "out_hand -q");
    assert_same("out_fold", "out_hand");
}

Test(lora, lora_merge_dtype_float32)
{
    /* --lora-merge-dtype float32: the folded model is float32 (every tensor), so the
     * linear merge of it and a bf16 model computes and writes float32. */
    TH_RUN_OK(g_dir, "ms-mklora --model base --r 4 --alpha 8 --seed 13 --targets v_proj,up_proj "
                     "lora");
    struct adapter ad = { .r = 4, .alpha = 8 };
    cr_assert_eq(hand_fold("base", "lora", &ad, MS_DT_F32, "folded"), 4);
    write_recipe("fold.yml", linear_fold);
    write_recipe("hand.yml", linear_hand);
    TH_RUN_OK(g_dir, "mergestream merge fold.yml out_fold -q --lora-merge-dtype float32 && "
                     "mergestream merge hand.yml out_hand -q");
    assert_same("out_fold", "out_hand");
}

Test(lora, same_bytes_for_any_threads_chunks_and_budget)
{
    TH_RUN_OK(g_dir, "ms-mklora --model base --r 5 --alpha 10 --seed 17 "
                     "--targets q_proj,down_proj,embed_tokens lora");
    struct adapter ad = { .r = 5, .alpha = 10 };
    hand_fold("base", "lora", &ad, MS_DT_BF16, "folded");
    write_recipe("fold.yml", linear_fold);
    write_recipe("hand.yml", linear_hand);
    TH_RUN_OK(g_dir, "mergestream merge hand.yml out_hand -q -j1");
    /* 100 and 37 elements: chunks that start and end inside rows of 64 and 96 */
    static const char *const opts[] = { "-j1", "-j2", "-j2 --chunk-elems 100",
                                        "-j1 --chunk-elems 37", "-j2 --max-memory 1M" };
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++) {
        char o[32];
        snprintf(o, sizeof o, "out%zu", i);
        TH_RUN_OK(g_dir, "mergestream merge fold.yml %s -q %s", o, opts[i]);
        assert_same(o, "out_hand");
    }
}

Test(lora, hub_cache_adapter)
{
    TH_RUN_OK(g_dir,
              "ms-mklora --model base --r 2 --alpha 2 --seed 19 --targets q_proj lora && "
              "mkdir -p hub/models--org--ad/refs hub/models--org--ad/snapshots && "
              "h=0123456789abcdef0123456789abcdef01234567 && echo $h > "
              "hub/models--org--ad/refs/main && cp -r lora hub/models--org--ad/snapshots/$h");
    struct adapter ad = { .r = 2, .alpha = 2 };
    hand_fold("base", "lora", &ad, MS_DT_BF16, "folded");
    write_recipe("fold.yml", "merge_method: linear\n"
                             "models:\n"
                             "  - model: base+org/ad\n"
                             "    parameters: {weight: 0.6}\n"
                             "  - model: ft1\n"
                             "    parameters: {weight: 0.4}\n");
    write_recipe("hand.yml", linear_hand);
    TH_RUN_OK(g_dir, "HF_HUB_CACHE=$PWD/hub mergestream merge fold.yml out_fold -q && "
                     "mergestream merge hand.yml out_hand -q");
    assert_same("out_fold", "out_hand");
}

Test(lora, merge_cache_creates_and_reuses)
{
    TH_RUN_OK(g_dir, "ms-mklora --model base --r 4 --alpha 16 --seed 23 "
                     "--targets q_proj,v_proj,embed_tokens lora");
    struct adapter ad = { .r = 4, .alpha = 16 };
    hand_fold("base", "lora", &ad, MS_DT_BF16, "folded");
    write_recipe("fold.yml", linear_fold);
    write_recipe("hand.yml", linear_hand);
    TH_RUN_OK(g_dir, "mergestream merge hand.yml out_hand -q && "
                     "mergestream merge fold.yml out1 -q --lora-merge-cache lmc");
    assert_same("out1", "out_hand");
    /* mergekit's folder name: basename_crc32(path) for model and adapter (crc32 values
     * from Python's binascii.crc32(b"base") and (b"lora")) */
    const char *cdir = "lmc/base_3233087073_lora_881021184";
    assert_same(cdir, "folded"); /* the cached copy is the hand-folded model, byte for byte */
    TH_RUN_OK(g_dir, "test -f %s/.mergestream-lora-complete && test -f %s/config.json && "
                     "test -f %s/tokenizer.json", cdir, cdir, cdir);
    /* reused: the adapter is not needed any more */
    TH_RUN_OK(g_dir, "mv lora lora.away && mergestream merge fold.yml out2 -q "
                     "--lora-merge-cache lmc");
    assert_same("out2", "out_hand");
    char *err = NULL;
    cr_assert_neq(th_run_in(g_dir, NULL, &err, "mergestream merge fold.yml out3 -q"), 0,
                  "without the cache the adapter is needed");
    free(err);
    /* made with another --lora-merge-dtype: not reused */
    cr_assert_neq(th_run_in(g_dir, NULL, &err, "mergestream merge fold.yml out4 -q "
                                             "--lora-merge-cache lmc --lora-merge-dtype float32"),
                  0);
    free(err);
    /* incomplete (no marker, a cut shard): written again */
    TH_RUN_OK(g_dir, "mv lora.away lora && rm %s/.mergestream-lora-complete && "
                     "truncate -s 100 %s/model.safetensors && mergestream merge fold.yml out5 -q "
                     "--lora-merge-cache lmc", cdir, cdir);
    assert_same("out5", "out_hand");
    assert_same(cdir, "folded");
    TH_RUN_OK(g_dir, "test -f %s/.mergestream-lora-complete && ! ls %s | grep -q partial", cdir,
              cdir);
}

/* A merge stopped (SIGKILL) after two shards and resumed with another adapter in the same
 * folder keeps nothing: the adapter's files and the fold dtype are in the run fingerprint. */
Test(lora, resume_with_another_adapter_keeps_nothing, .timeout = 300)
{
#define SLOW "-q --out-shard-size 2M -j1 --chunk-elems 1024"
    TH_RUN_OK(g_dir, "ms-mkmodel --layers 8 --hidden 512 --intermediate 1024 --vocab 1024 --seed 3 "
                     "B >/dev/null && ms-mkmodel --base B --noise 0.01 --seed 4 F >/dev/null && "
                     "ms-mklora --model B --r 4 --seed 1 --targets q_proj,up_proj L && "
                     "ms-mklora --model B --r 4 --seed 2 --targets q_proj,up_proj L2");
    write_recipe("big.yml", "merge_method: linear\n"
                            "models:\n"
                            "  - model: B+L\n"
                            "    parameters: {weight: 0.6}\n"
                            "  - model: F\n"
                            "    parameters: {weight: 0.4}\n");
    TH_RUN_OK(g_dir, TH_MERGE_KILLED_AFTER_TWO_SHARDS("big.yml " SLOW));
    TH_RUN_OK(g_dir, "rm -rf L && mv L2 L && mergestream merge big.yml kref " SLOW);
    char *err = NULL;
    cr_assert_eq(th_run_in(g_dir, NULL, &err, "mergestream merge big.yml k " SLOW " --resume"), 0,
                 "%s", err);
    cr_assert(strstr(err, "is from a different recipe, options or inputs"), "%s", err);
    free(err);
    TH_RUN_OK(g_dir, "diff -r -x README.md kref k");
#undef SLOW
}

/* Runs the merge of fold.yml, expecting failure with every needle on one line of stderr
 * and no output directory. */
static void expect_error(const char *setup_cmd, const char *n1, const char *n2)
{
    TH_RUN_OK(g_dir, "rm -rf lora out && %s", setup_cmd);
    write_recipe("fold.yml", linear_fold);
    char *err = NULL;
    int rc = th_run_in(g_dir, NULL, &err, "mergestream merge fold.yml out -q");
    cr_assert_neq(rc, 0);
    cr_assert_lt(rc, 128, "crashed: %d\n%s", rc, err);
    const char *hit = strstr(err, n1);
    cr_assert_not_null(hit, "no '%s' in: %s", n1, err);
    const char *eol = strchr(hit, '\n'), *bol = hit;
    while (bol > err && bol[-1] != '\n')
        bol--;
    char line[2048];
    snprintf(line, sizeof line, "%.*s", (int)((eol ? eol : hit + strlen(hit)) - bol), bol);
    cr_assert(strstr(line, n2), "no '%s' on the line: %s", n2, line);
    struct stat st;
    char *o = th_path(g_dir, "out");
    cr_assert_neq(stat(o, &st), 0, "an output directory was left");
    free(o);
    free(err);
}

Test(lora, bad_adapters_fail_with_one_line)
{
    expect_error("ms-mklora --model base --targets q_proj lora && rm lora/adapter_config.json",
                 "lora/adapter_config.json is missing", "base+lora");
    expect_error("ms-mklora --model base --targets q_proj lora && "
                 "sed -i 's/\"r\": 4/\"r\": 0/' lora/adapter_config.json",
                 "adapter_config.json: 'r' must be a positive integer", "lora/");
    expect_error("ms-mklora --model base --targets q_proj --bad-rank 3 lora",
                 "lora_A.weight' [4, 64]", "do not share a nonzero rank");
    /* an adapter made for a wider model */
    expect_error("ms-mkmodel --layers 2 --hidden 32 --intermediate 48 --vocab 128 other >/dev/null"
                 " && ms-mklora --model other --targets down_proj lora",
                 "model.layers.0.mlp.down_proj.lora_A.weight' [4, 48]",
                 "do not fit model 'base+lora' "
                 "tensor 'model.layers.0.mlp.down_proj.weight' [64, 96]");
    /* an adapter for a deeper model: layer 2 is not in base */
    expect_error("ms-mkmodel --layers 3 --hidden 64 --intermediate 96 --vocab 128 deep >/dev/null "
                 "&& ms-mklora --model deep --targets v_proj lora",
                 "adapter tensor 'base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight'",
                 "which model 'base+lora' does not have");
    expect_error("ms-mklora --model base --targets q_proj lora && "
                 "sed -i 's/\"use_dora\": false/\"use_dora\": true/' lora/adapter_config.json",
                 "use_dora (DoRA) is not supported", "adapter_config.json");
    expect_error("ms-mklora --model base --targets q_proj lora && "
                 "sed -i 's/\"alpha_pattern\": {}/\"alpha_pattern\": {\"q_proj\": 2}/' "
                 "lora/adapter_config.json",
                 "alpha_pattern is not supported", "lora/adapter_config.json");
    expect_error("ms-mklora --model base --targets q_proj lora && "
                 "rm lora/adapter_model.safetensors",
                 "lora/adapter_model.safetensors is missing", "base+lora");
}

/* Peak RSS of a LoRA merge whose tensors (31 MiB bf16 embeddings; the adapter's A is
 * 8 x 32000) are larger than the 4 MiB budget, of which the two LoRA buffers take 2 MiB. */
Test(lora, peak_rss_under_budget, .timeout = 300)
{
#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("RSS bound not checked under AddressSanitizer (its shadow memory counts)");
#endif
    TH_RUN_OK(g_dir, "ms-mkmodel --layers 1 --hidden 512 --intermediate 1024 --vocab 32000 "
                     "--dtype bf16 --seed 1 big >/dev/null && ms-mkmodel --base big --noise 0.01 "
                     "--seed 2 bigft >/dev/null && ms-mklora --model big --r 8 "
                     "--targets embed_tokens,lm_head,q_proj,up_proj biglora");
    write_recipe("big.yml", "merge_method: linear\n"
                            "models:\n"
                            "  - model: big+biglora\n"
                            "    parameters: {weight: 0.5}\n"
                            "  - model: bigft\n"
                            "    parameters: {weight: 0.5}\n");
    char *err = NULL;
    int rc = th_run_in(g_dir, NULL, &err,
                       "ms-timeit mergestream merge big.yml bigout -q "
                       "--max-memory 4M");
    cr_assert_eq(rc, 0, "%s", err);
    const char *p = strstr(err, "maxrss_kib=");
    cr_assert_not_null(p, "%s", err);
    long kib = strtol(p + 11, NULL, 10);
    cr_log_info("peak RSS %ld KiB at --max-memory 4M (LoRA on 31 MiB tensors)", kib);
    cr_assert_lt(kib, 4 * 1024 + 32 * 1024, "peak RSS %ld KiB over budget + 32 MiB", kib);
    free(err);
}
