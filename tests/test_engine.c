/*
 * test_engine.c - the streaming engine end to end through `mergestream merge`:
 * the linear formula element by element, byte identity across threads, budgets,
 * chunk sizes, the in-memory / re-read paths and larger-than-memory I/O, the
 * output directory, and the peak RSS of a child process under a budget smaller
 * than one tensor.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_safetensors.h"
#include "th.h"

static char *g_dir;

static void run_ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void run_ok(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char *out = NULL, *err = NULL;
    int rc = th_run(cmd, &out, &err);
    cr_assert_eq(rc, 0, "command failed (%d): %s\nstdout: %s\nstderr: %s", rc, cmd, out, err);
    free(out);
    free(err);
}

/* Three small bf16 models: a base and two noisy fine-tunes; 2 shards each. */
static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    run_ok("cd %s && ms-mkmodel --layers 3 --hidden 64 --intermediate 96 --vocab 160 "
           "--dtype bf16 --shard-size 60K --seed 11 base && "
           "ms-mkmodel --base base --noise 0.01 --seed 12 ft1 && "
           "ms-mkmodel --base base --noise 0.01 --seed 13 ft2", g_dir);
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

static void write_recipe(const char *name, const char *text)
{
    char *p = th_path(g_dir, name);
    cr_assert_eq(th_write(p, text, strlen(text)), 0);
    free(p);
}

/* The linear recipe's head and models, the third model named `third`. */
#define LINEAR_HEAD                                                                                \
    "merge_method: linear\n"                                                                       \
    "dtype: bfloat16\n"
#define LINEAR_MODELS(third)                                                                       \
    "models:\n"                                                                                    \
    "  - model: base\n"                                                                            \
    "    parameters: {weight: 1.0}\n"                                                              \
    "  - model: ft1\n"                                                                             \
    "    parameters: {weight: 0.3}\n"                                                              \
    "  - model: " third "\n"                                                                       \
    "    parameters: {weight: 0.5}\n"

static const char linear_recipe[] = LINEAR_HEAD LINEAR_MODELS("ft2");

/* Reads tensor `name` of the model at dir as floats (malloc'd). */
static float *read_tensor(const struct ms_model *m, const char *name, uint64_t *numel,
                          enum ms_dtype *dt)
{
    uint32_t shard;
    const struct ms_st_tensor *t = ms_model_find(m, name, &shard);
    cr_assert(t, "tensor %s missing", name);
    const struct ms_st_file *f = m->shards[shard];
    size_t bytes = t->end - t->begin;
    float *buf = malloc(MS_MAX(t->numel * 4, bytes) + 64);
    FILE *fp = fopen(f->path, "rb");
    cr_assert(fp);
    cr_assert_eq(fseek(fp, (long)(f->data_start + t->begin), SEEK_SET), 0);
    cr_assert_eq(fread(buf, 1, bytes, fp), bytes);
    fclose(fp);
    ms_dtype_decode(t->dtype, buf, buf, t->numel);
    *numel = t->numel;
    *dt = t->dtype;
    return buf;
}

static struct ms_model *open_model(const char *sub)
{
    char *p = th_path(g_dir, sub);
    struct ms_model *m = NULL;
    int rc = ms_model_open(p, &m);
    cr_assert_eq(rc, 0, "open %s: %s", p, ms_errmsg());
    free(p);
    return m;
}

TestSuite(engine, .init = setup, .fini = teardown, .timeout = 120);

/*
 * mergekit-spec.md 2.2 in bf16, written out independently of stages/linear.c:
 * W_i = bf16(float(w_i)); S = bf16(sum_i bf16(W_i * x_i)) with float accumulation;
 * out = bf16(S / bf16(sum_i W_i)).
 */
/* recipe: the recipe's text, models base, ft1 and ft2 (or the one it names
 * `ft2` here) with linear_recipe's weights, dtype: bfloat16 (inputs stored in
 * other dtypes are rounded to it as mergekit loads them); out: the output
 * dtype it asks for. */
static void check_linear_formula_of(const char *recipe, const char *ft2, enum ms_dtype outdt,
                                    const char *env, const char *opts);

/* env: variables for the merge ("" for none); opts: more merge options. */
static void check_linear_formula(const char *env, const char *opts)
{
    check_linear_formula_of(linear_recipe, "ft2", MS_DT_BF16, env, opts);
}

static void check_linear_formula_of(const char *recipe, const char *ft2, enum ms_dtype outdt,
                                    const char *env, const char *opts)
{
    write_recipe("linear.yml", recipe);
    run_ok("cd %s && rm -rf out && %s mergestream merge linear.yml out -q %s", g_dir, env, opts);
    struct ms_model *in[3] = { open_model("base"), open_model("ft1"), open_model(ft2) };
    struct ms_model *out = open_model("out");
    const double w[3] = { 1.0, 0.3, 0.5 };
    float W[3], wsum = 0;
    for (int i = 0; i < 3; i++) {
        W[i] = ms_round_bf16_1((float)w[i]);
        wsum += W[i];
    }
    float den = ms_round_bf16_1(wsum);
    cr_assert_eq(out->ntensors, in[0]->ntensors);
    uint64_t checked = 0;
    for (size_t k = 0; k < out->ntensors; k++) {
        uint32_t sh;
        const struct ms_st_tensor *t = ms_model_tensor_at(out, k, &sh);
        uint64_t n, n2;
        enum ms_dtype dt, dt2;
        float *o = read_tensor(out, t->name, &n, &dt);
        cr_assert_eq(dt, outdt, "%s: output dtype", t->name);
        float *x[3];
        for (int i = 0; i < 3; i++) {
            x[i] = read_tensor(in[i], t->name, &n2, &dt2);
            cr_assert_eq(n2, n);
        }
        for (uint64_t e = 0; e < n; e++) {
            float s = 0;
            for (int i = 0; i < 3; i++)
                s += ms_round_bf16_1(W[i] * ms_round_bf16_1(x[i][e]));
            float want = ms_round_bf16_1(ms_round_bf16_1(s) / den);
            cr_assert(ms_f32_bits(o[e]) == ms_f32_bits(want),
                      "%s[%llu]: got %a want %a", t->name, (unsigned long long)e, o[e], want);
        }
        checked += n;
        for (int i = 0; i < 3; i++)
            free(x[i]);
        free(o);
    }
    cr_assert_gt(checked, 100000);
    for (int i = 0; i < 3; i++)
        ms_model_free(in[i]);
    ms_model_free(out);
}

Test(engine, linear_matches_hand_formula_every_element)
{
    check_linear_formula("", "");
}

/* The same formula when every chunk is computed in sub-blocks (pipeline/engine.c
 * apply_subblock): 48 elements per sub-block in chunks of 1000 (a partial last
 * sub-block, sub-block decodes and the rest decoded at the top of the buffer),
 * and 16 per sub-block in the default chunks. */
Test(engine, linear_formula_holds_in_subblocks)
{
    check_linear_formula("MERGESTREAM_SUBBLOCK=48", "--threads 3 --chunk-elems 1000");
    check_linear_formula("MERGESTREAM_SUBBLOCK=16", "");
}

/*
 * The engine computes bf16 inputs straight from their stored bytes when
 * nothing else is rounded on the way (ms_stage_ops.apply_stored: linear in
 * bf16). Not when an input is stored as float16 (it is rounded to bf16 as it
 * is loaded), nor when the output is float32: there the formula holds through
 * the float path, and the bf16-only inputs and outputs still take the stored
 * path in sub-blocks and in whole chunks.
 */
Test(engine, linear_formula_holds_on_and_off_the_stored_path)
{
    run_ok("cd %s && ms-mkmodel --base base --noise 0.01 --seed 13 --dtype f16 ft2h", g_dir);
    static const char mixed[] = LINEAR_HEAD LINEAR_MODELS("ft2h");
    static const char out32[] = LINEAR_HEAD "out_dtype: float32\n" LINEAR_MODELS("ft2");
    check_linear_formula_of(mixed, "ft2h", MS_DT_BF16, "", "");
    check_linear_formula_of(out32, "ft2", MS_DT_F32, "", "");
    check_linear_formula_of(out32, "ft2", MS_DT_F32, "MERGESTREAM_SUBBLOCK=48", "--chunk-elems 1000");
    check_linear_formula("MERGESTREAM_SUBBLOCK=0", "--threads 3 --chunk-elems 777");
}

/* Every output file of a and b (in g_dir) byte-identical. */
static void assert_same_output(const char *a, const char *b)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cd %s && diff -r %s %s", g_dir, a, b);
    char *out = NULL;
    int rc = th_run(cmd, &out, NULL);
    cr_assert_eq(rc, 0, "%s and %s differ:\n%s", a, b, out);
    free(out);
}

Test(engine, bytes_identical_across_threads_budgets_and_chunks)
{
    write_recipe("linear.yml", linear_recipe);
    /* Same basename everywhere: the model card's title is the output directory's name. */
    run_ok("cd %s && mergestream merge linear.yml ref/out -q --threads 1 --out-shard-size 50K",
           g_dir);
    const char *variants[] = {
        "--threads 2", "--threads 4", "--max-memory 64K", "--max-memory 1M",
        "--max-memory 64M", "--chunk-elems 1", "--chunk-elems 7 --threads 3",
        "--chunk-elems 4096 --max-memory 256K",
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(variants); i++) {
        run_ok("cd %s && rm -rf v && mergestream merge linear.yml v/out -q --out-shard-size 50K %s",
               g_dir, variants[i]);
        assert_same_output("ref/out", "v/out");
    }
}

/*
 * Multi-pass methods (slerp: one reduce pass; ties: histogram and tie passes;
 * ties with rescale: one more) give the same bytes whether their inputs stay in
 * memory across passes or are read again in every pass, for any chunking.
 */
static void check_multipass(const char *name, const char *text)
{
    write_recipe(name, text);
    run_ok("cd %s && rm -rf a b && mergestream merge %s a/out -q", g_dir, name);
    const char *variants[] = {
        "--reread", "--reread --chunk-elems 1000", "--chunk-elems 1000", "--max-memory 4M",
        "--reread --max-memory 4M --threads 3", "--chunk-elems 64 --threads 1",
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(variants); i++) {
        run_ok("cd %s && rm -rf b && mergestream merge %s b/out -q %s", g_dir, name, variants[i]);
        assert_same_output("a/out", "b/out");
    }
}

Test(engine, slerp_in_memory_and_reread_paths_agree)
{
    check_multipass("slerp.yml", "merge_method: slerp\nbase_model: base\nmodels:\n"
                                 "  - model: base\n  - model: ft1\nparameters:\n  t: 0.3\n");
}

Test(engine, ties_in_memory_and_reread_paths_agree)
{
    check_multipass("ties.yml", "merge_method: ties\ndtype: bfloat16\nbase_model: base\n"
                                "models:\n  - model: ft1\n    parameters: {weight: 0.6, density: 0.4}\n"
                                "  - model: ft2\n    parameters: {weight: 0.5, density: 0.7}\n"
                                "parameters:\n  rescale: true\n");
}

/* karcher in bf16 runs up to 2 + 3*max_iter reduce passes and keeps each element's
 * iterate between them (stages/karcher.c): the same bytes resident (kept in the
 * output buffers), re-read (kept in the keep pool: --reread; --max-memory 512K
 * for the embeddings only), and with a budget too small for the pool (450K: the
 * two method states take 371 KiB, the embeddings' keep, 40 KiB, is over half of
 * the rest, so their passes replay the iterates while the MLP matrices, 24 KiB,
 * take the pool). */
Test(engine, karcher_bf16_in_memory_and_reread_paths_agree)
{
    const char *text = "merge_method: karcher\ndtype: bfloat16\nmodels:\n"
                       "  - model: base\n  - model: ft1\n  - model: ft2\n"
                       "parameters:\n  max_iter: 6\n";
    check_multipass("karcher.yml", text);
    const char *variants[] = {
        "--max-memory 512K", "--max-memory 512K --reread --threads 3", "--max-memory 450K",
        "--max-memory 450K --reread --chunk-elems 100",
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(variants); i++) {
        run_ok("cd %s && rm -rf b && mergestream merge karcher.yml b/out -q %s", g_dir,
               variants[i]);
        assert_same_output("a/out", "b/out");
    }
}

/*
 * karcher in bf16 and f16 on the stored bytes (stages/karcher.c: every reduce
 * pass and apply through reduce_stored / apply_stored) gives the bytes of the
 * float path (MERGESTREAM_STORED=0): resident (keeping after its packed output),
 * re-read with the keep pool (--reread; 512K: the embeddings only), without a
 * keep area (450K: the embeddings replay their iterates), several chunkings and
 * thread counts.
 */
Test(engine, karcher_stored_passes_give_the_bytes_of_the_float_path, .timeout = 300)
{
    run_ok("cd %s && ms-mkmodel --base base --noise 0.01 --seed 31 --dtype f16 k0 >/dev/null && "
           "ms-mkmodel --base base --noise 0.01 --seed 32 --dtype f16 k1 >/dev/null && "
           "ms-mkmodel --base base --noise 0.01 --seed 33 --dtype f16 k2 >/dev/null", g_dir);
    static const char *const recipes[][2] = {
        { "karcher.yml", "merge_method: karcher\ndtype: bfloat16\nmodels:\n"
                         "  - model: base\n  - model: ft1\n  - model: ft2\n"
                         "parameters:\n  max_iter: 6\n" },
        { "karcherh.yml", "merge_method: karcher\nmodels:\n"
                          "  - model: k0\n  - model: k1\n  - model: k2\n"
                          "parameters:\n  max_iter: 6\n  tol: 1.0e-30\n" },
    };
    const char *variants[] = {
        "", "--reread", "--chunk-elems 1000 --threads 3", "--max-memory 512K",
        "--max-memory 512K --reread --threads 1", "--max-memory 450K",
        "--max-memory 450K --reread --chunk-elems 100",
    };
    for (size_t r = 0; r < MS_ARRAY_LEN(recipes); r++) {
        write_recipe(recipes[r][0], recipes[r][1]);
        run_ok("cd %s && rm -rf a && MERGESTREAM_STORED=0 mergestream merge %s a/out -q", g_dir,
               recipes[r][0]);
        for (size_t i = 0; i < MS_ARRAY_LEN(variants); i++) {
            run_ok("cd %s && rm -rf b && mergestream merge %s b/out -q %s", g_dir, recipes[r][0],
                   variants[i]);
            assert_same_output("a/out", "b/out");
        }
    }
}

/*
 * Larger-than-memory I/O (MERGESTREAM_IO_BEHIND=1: inputs dropped from the page
 * cache behind the last read, output written behind with writeback and drops)
 * gives the same bytes as the default, for a one-pass method and for a
 * multi-pass one both resident and re-read.
 */
Test(engine, io_behind_gives_the_same_bytes)
{
    write_recipe("linear.yml", linear_recipe);
    write_recipe("ties.yml", "merge_method: ties\ndtype: bfloat16\nbase_model: base\n"
                             "models:\n  - model: ft1\n    parameters: {weight: 0.6, density: 0.4}\n"
                             "  - model: ft2\n    parameters: {weight: 0.5, density: 0.7}\n");
    const char *runs[][2] = {
        { "linear.yml", "" },           { "linear.yml", "--threads 1 --chunk-elems 1000" },
        { "ties.yml", "" },             { "ties.yml", "--reread --chunk-elems 1000" },
        { "ties.yml", "--max-memory 4M" },
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(runs); i++) {
        run_ok("cd %s && rm -rf a b && MERGESTREAM_IO_BEHIND=0 mergestream merge %s a/out -q "
               "--out-shard-size 50K && MERGESTREAM_IO_BEHIND=1 mergestream merge %s b/out -q "
               "--out-shard-size 50K %s",
               g_dir, runs[i][0], runs[i][0], runs[i][1]);
        assert_same_output("a/out", "b/out");
    }
}

Test(engine, output_directory_layout)
{
    write_recipe("linear.yml", linear_recipe);
    run_ok("cd %s && mergestream merge linear.yml out -q --out-shard-size 50K", g_dir);
    run_ok("cd %s && mergestream verify out", g_dir);
    const char *files[] = { "config.json", "README.md", "mergekit_config.yml",
                            "tokenizer_config.json", "tokenizer.json",
                            "model.safetensors.index.json" };
    for (size_t i = 0; i < MS_ARRAY_LEN(files); i++) {
        char *p = th_path(g_dir, "out");
        char *q = th_path(p, files[i]);
        cr_assert_eq(access(q, R_OK), 0, "missing %s", files[i]);
        free(p);
        free(q);
    }
    /* mergekit_config.yml is the verbatim recipe */
    char *p = th_path(g_dir, "out/mergekit_config.yml");
    size_t len;
    char *txt = th_read(p, &len);
    cr_assert(txt && len == strlen(linear_recipe) && !memcmp(txt, linear_recipe, len));
    free(txt);
    free(p);
    /* no temporaries left */
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "cd %s/out && ls -a | grep -c -E 'partial|tmp' || true", g_dir);
    th_run(cmd, &out, NULL);
    cr_assert_eq(atoi(out), 0, "temporary files left: %s", out);
    free(out);
}

Test(engine, failure_leaves_no_final_files)
{
    write_recipe("linear.yml", linear_recipe);
    /* A budget too small for one row fails before anything is written. */
    char cmd[4096], *err = NULL;
    snprintf(cmd, sizeof cmd, "cd %s && mergestream merge linear.yml small -q --max-memory 1K",
             g_dir);
    int rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 1);
    cr_assert(strstr(err, "--max-memory"), "message: %s", err);
    cr_assert_eq(strchr(err, '\n'), err + strlen(err) - 1, "one line: %s", err);
    free(err);
    snprintf(cmd, sizeof cmd, "cd %s && ls small 2>/dev/null | wc -l", g_dir);
    char *out = NULL;
    th_run(cmd, &out, NULL);
    cr_assert_eq(atoi(out), 0, "files left: %s", out);
    free(out);
}

/*
 * Peak RSS of the merging process, measured by the parent (ms-timeit uses
 * wait4's ru_maxrss), with a 4 MiB budget on a model whose largest tensor is
 * 16 MiB: memory must stay under budget + 32 MiB. Sanitizer builds inflate RSS,
 * so the bound is only checked in plain builds.
 */
Test(engine, peak_rss_under_budget_with_tensor_larger_than_budget, .timeout = 300)
{
    run_ok("cd %s && ms-mkmodel --layers 1 --hidden 1024 --intermediate 64 --vocab 8192 "
           "--dtype bf16 --seed 5 big && ms-mkmodel --base big --noise 0.01 --seed 6 big2",
           g_dir);
    write_recipe("big.yml", "merge_method: linear\nmodels:\n  - model: big\n"
                            "    parameters: {weight: 0.5}\n  - model: big2\n"
                            "    parameters: {weight: 0.5}\n");
    char cmd[4096], *err = NULL;
    snprintf(cmd, sizeof cmd,
             "cd %s && ms-timeit mergestream merge big.yml bigout -q --max-memory 4M", g_dir);
    int rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 0, "%s", err);
    const char *p = strstr(err, "maxrss_kib=");
    cr_assert(p, "%s", err);
    long kib = atol(p + 11);
    cr_log_info("peak RSS %ld KiB at --max-memory 4M (16 MiB tensors)", kib);
#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("RSS bound not checked under AddressSanitizer (measured %ld KiB)", kib);
#else
    cr_assert_lt(kib, 4 * 1024 + 32 * 1024, "peak RSS %ld KiB over budget + 32 MiB", kib);
#endif
    free(err);
}

/*
 * mergekit's slerp returns `slerp(...).to(base.dtype)` and the writer then casts
 * to out_dtype (merge_methods/slerp.py): a bf16 merge written as float32 or
 * float16 holds the bf16 result widened or rounded again, never slerp's float32
 * values. The bf16 run (no out_dtype) is the reference for the rule.
 */
Test(engine, slerp_rounds_to_the_base_dtype_before_out_dtype)
{
    static const char body[] = "merge_method: slerp\nbase_model: base\nmodels:\n"
                               "  - model: base\n  - model: ft1\nparameters:\n  t: 0.3\n";
    const char *outs[] = { "float32", "float16" };
    write_recipe("s.yml", body);
    run_ok("cd %s && rm -rf s && mergestream merge s.yml s -q", g_dir);
    for (size_t v = 0; v < MS_ARRAY_LEN(outs); v++) {
        char text[512];
        snprintf(text, sizeof text, "out_dtype: %s\n%s", outs[v], body);
        write_recipe("s2.yml", text);
        run_ok("cd %s && rm -rf s2 && mergestream merge s2.yml s2 -q", g_dir);
        struct ms_model *ref = open_model("s"), *got = open_model("s2");
        uint64_t checked = 0;
        for (size_t k = 0; k < ref->ntensors; k++) {
            uint32_t sh;
            const struct ms_st_tensor *t = ms_model_tensor_at(ref, k, &sh);
            uint64_t n, n2;
            enum ms_dtype dt, dt2;
            float *r = read_tensor(ref, t->name, &n, &dt);
            float *o = read_tensor(got, t->name, &n2, &dt2);
            cr_assert_eq(dt, MS_DT_BF16);
            cr_assert_eq(dt2, v == 0 ? MS_DT_F32 : MS_DT_F16, "%s: out_dtype", t->name);
            cr_assert_eq(n, n2);
            for (uint64_t e = 0; e < n; e++) {
                float want = v == 0 ? r[e] : ms_round_f16_1(r[e]);
                cr_assert(ms_f32_bits(o[e]) == ms_f32_bits(want), "%s %s[%llu]: got %a want %a",
                          outs[v], t->name, (unsigned long long)e, o[e], want);
            }
            checked += n;
            free(r);
            free(o);
        }
        cr_assert_gt(checked, 100000);
        ms_model_free(ref);
        ms_model_free(got);
    }
}

/*
 * Recipes whose bytes may not depend on how a chunk is split: one-pass methods,
 * masks keyed by element index (dare_linear: a piece's `first` must move with its
 * pointers), a row-wise stage (nuslerp per row, rows of 64 and of 40 floats),
 * other output widths (out_dtype float16: 2-byte encodes packed into earlier
 * pieces; float32: in place), and methods with reduce passes (ties, slerp: their
 * apply keeps whole chunks, and they never run fused).
 */
static const char *const split_recipes[][2] = {
    { "linear.yml", linear_recipe },
    { "lin16.yml", "merge_method: linear\nout_dtype: float16\nmodels:\n"
                   "  - model: base\n    parameters: {weight: 1.0}\n"
                   "  - model: ft1\n    parameters: {weight: 0.3}\n" },
    { "lin32.yml", "merge_method: linear\nout_dtype: float32\nmodels:\n"
                   "  - model: base\n    parameters: {weight: 1.0}\n"
                   "  - model: ft1\n    parameters: {weight: 0.3}\n" },
    { "dare.yml", "merge_method: dare_linear\nbase_model: base\nmodels:\n"
                  "  - model: ft1\n    parameters: {weight: 0.6, density: 0.4}\n"
                  "  - model: ft2\n    parameters: {weight: 0.5, density: 0.7}\n"
                  "parameters:\n  rescale: false\n" }, /* no reduce pass */
    { "ties.yml", "merge_method: ties\ndtype: bfloat16\nbase_model: base\nmodels:\n"
                  "  - model: ft1\n    parameters: {weight: 0.6, density: 0.4}\n"
                  "  - model: ft2\n    parameters: {weight: 0.5, density: 0.7}\n" },
    { "slerp.yml", "merge_method: slerp\nbase_model: base\nmodels:\n"
                   "  - model: base\n  - model: ft1\nparameters:\n  t: 0.3\n" },
    /* GTA members with a rescale pass (dare: random masks; breadcrumbs: two
     * selections each: one model trimmed, so that the state fits --max-memory 4M) */
    { "dties.yml", "merge_method: dare_ties\nbase_model: base\nmodels:\n"
                   "  - model: ft1\n    parameters: {weight: 0.6, density: 0.4}\n"
                   "  - model: ft2\n    parameters: {weight: 0.5, density: 0.7}\n" },
    { "crumbs.yml", "merge_method: breadcrumbs_ties\nbase_model: base\nmodels:\n"
                    "  - model: ft1\n    parameters: {weight: 0.6, density: 0.5, gamma: 0.02}\n"
                    "  - model: ft2\n    parameters: {weight: 0.5}\n"
                    "parameters:\n  rescale: true\n" },
    { "nuslerp.yml", "merge_method: nuslerp\nmodels:\n"
                     "  - model: ft1\n    parameters: {weight: 0.4}\n"
                     "  - model: ft2\n    parameters: {weight: 0.6}\n"
                     "parameters:\n  nuslerp_flatten: false\n" },
    /* rows of 40 floats: a sub-block of whole rows is a multiple of 80 elements */
    { "nus40.yml", "merge_method: nuslerp\nmodels:\n"
                   "  - model: r40a\n    parameters: {weight: 0.4}\n"
                   "  - model: r40b\n    parameters: {weight: 0.6}\n"
                   "parameters:\n  nuslerp_flatten: false\n" },
    /* geo: model_stock (a keep area from its reduce pass; filter_wise: rows, one
     * pass; float32 compute of bfloat16 bytes) and nuslerp with a base (two
     * reduce passes) */
    { "mstock.yml", "merge_method: model_stock\nbase_model: base\nmodels:\n"
                    "  - model: ft1\n  - model: ft2\n" },
    { "mstockfw.yml", "merge_method: model_stock\nbase_model: base\nmodels:\n"
                      "  - model: ft1\n  - model: ft2\nparameters:\n  filter_wise: true\n" },
    { "mstock32.yml", "merge_method: model_stock\ndtype: float32\nout_dtype: bfloat16\n"
                      "base_model: base\nmodels:\n  - model: ft1\n  - model: ft2\n" },
    { "nusbase.yml", "merge_method: nuslerp\nbase_model: base\nmodels:\n"
                     "  - model: ft1\n    parameters: {weight: 0.4}\n"
                     "  - model: ft2\n    parameters: {weight: 0.6}\n" },
    /* multislerp: two reduce passes (three or four on a wrong guess), a keep area */
    { "mslerp.yml", "merge_method: multislerp\ndtype: bfloat16\nbase_model: base\nmodels:\n"
                    "  - model: base\n  - model: ft1\n    parameters: {weight: 0.6}\n"
                    "  - model: ft2\n    parameters: {weight: 0.4}\n" },
};

/* The merge of recipe with every stored path off (MERGESTREAM_STORED=0) gives the
 * bytes of its merge with each variant (environment, options). */
static void check_stored_vs_float(const char *recipe, const char *const (*variants)[2],
                                  size_t nvariants)
{
    run_ok("cd %s && rm -rf a && MERGESTREAM_STORED=0 mergestream merge %s a/out -q", g_dir,
           recipe);
    for (size_t v = 0; v < nvariants; v++) {
        run_ok("cd %s && rm -rf b && %s mergestream merge %s b/out -q %s", g_dir, variants[v][0],
               recipe, variants[v][1]);
        assert_same_output("a/out", "b/out");
    }
}

/* Every split_recipes merge with each variant (environment, options) gives the
 * bytes of the merge with ref (environment, options). */
static void check_split_recipes(const char *const ref[2], const char *const (*variants)[2],
                                size_t nvariants)
{
    run_ok("cd %s && ms-mkmodel --layers 1 --hidden 40 --intermediate 80 --vocab 2000 --seed 5 "
           "r40a >/dev/null && ms-mkmodel --base r40a --noise 0.01 --seed 6 r40b >/dev/null", g_dir);
    for (size_t r = 0; r < MS_ARRAY_LEN(split_recipes); r++) {
        write_recipe(split_recipes[r][0], split_recipes[r][1]);
        run_ok("cd %s && rm -rf a && %s mergestream merge %s a/out -q %s", g_dir, ref[0],
               split_recipes[r][0], ref[1]);
        for (size_t v = 0; v < nvariants; v++) {
            run_ok("cd %s && rm -rf b && %s mergestream merge %s b/out -q %s", g_dir,
                   variants[v][0], split_recipes[r][0], variants[v][1]);
            assert_same_output("a/out", "b/out");
        }
    }
}

/* Sub-blocks (pipeline/engine.c apply_subblock) give the bytes of whole chunks
 * (MERGESTREAM_SUBBLOCK=0). */
Test(engine, subblocks_give_the_bytes_of_whole_chunks, .timeout = 300)
{
    static const char *const ref[2] = { "MERGESTREAM_SUBBLOCK=0", "" };
    static const char *const variants[][2] = {
        { "", "" }, /* the default sub-block */
        { "MERGESTREAM_SUBBLOCK=16", "" },
        { "MERGESTREAM_SUBBLOCK=17", "--threads 3 --chunk-elems 1000" },
        { "MERGESTREAM_SUBBLOCK=48", "--chunk-elems 1000 --reread" },
        { "MERGESTREAM_SUBBLOCK=4096", "--threads 1 --max-memory 4M" },
    };
    check_split_recipes(ref, variants, MS_ARRAY_LEN(variants));
}

/*
 * Stored-bytes passes (ms_stage_ops.stored_passes: slerp's reduce and apply on
 * the bfloat16 bytes, resident or read again each pass; apply_stored of the
 * one-pass recipes) give the bytes of the float path (MERGESTREAM_STORED=0), for
 * several chunk sizes, budgets and thread counts, and sequential (zstd) output.
 */
Test(engine, stored_passes_give_the_bytes_of_the_float_path, .timeout = 300)
{
    static const char *const ref[2] = { "MERGESTREAM_STORED=0", "" };
    static const char *const variants[][2] = {
        { "", "" },
        { "", "--threads 3 --chunk-elems 1000" },
        { "", "--chunk-elems 1000 --reread" },
        { "MERGESTREAM_SUBBLOCK=16", "--threads 1 --max-memory 4M" },
        { "", "--chunk-elems 4000 --max-memory 3M" },
    };
    check_split_recipes(ref, variants, MS_ARRAY_LEN(variants));
    write_recipe("slerp.yml", "merge_method: slerp\nbase_model: base\nmodels:\n"
                              "  - model: base\n  - model: ft1\nparameters:\n  t: 0.3\n");
    run_ok("cd %s && rm -rf a b && MERGESTREAM_STORED=0 mergestream merge slerp.yml a/out -q "
           "--compress zstd && mergestream merge slerp.yml b/out -q --compress zstd "
           "--chunk-elems 3000",
           g_dir);
    assert_same_output("a/out", "b/out");
    /* float16 models: the stored path in float16 */
    run_ok("cd %s && ms-mkmodel --base base --noise 0.01 --seed 21 --dtype f16 h0 >/dev/null && "
           "ms-mkmodel --base base --noise 0.01 --seed 22 --dtype f16 h1 >/dev/null", g_dir);
    write_recipe("slerph.yml", "merge_method: slerp\nbase_model: h0\nmodels:\n"
                               "  - model: h0\n  - model: h1\nparameters:\n  t: 0.6\n");
    write_recipe("tiesh.yml", "merge_method: ties\nbase_model: h0\nmodels:\n"
                              "  - model: h1\n    parameters: {weight: 0.7, density: 0.4}\n");
    write_recipe("dareh.yml", "merge_method: dare_linear\nbase_model: h0\nmodels:\n"
                              "  - model: h1\n    parameters: {weight: 0.7, density: 0.4}\n");
    static const char *const h16[] = { "slerph.yml", "tiesh.yml", "dareh.yml" };
    for (size_t r = 0; r < MS_ARRAY_LEN(h16); r++) {
        check_stored_vs_float(h16[r], variants, MS_ARRAY_LEN(variants));
    }
    /* geo: model_stock and nuslerp (flattened, then per row) in float16 */
    run_ok("cd %s && ms-mkmodel --base base --noise 0.01 --seed 23 --dtype f16 h2 >/dev/null",
           g_dir);
    static const char *const f16_recipes[][2] = {
        { "mstockh.yml", "merge_method: model_stock\nbase_model: h0\nmodels:\n"
                         "  - model: h1\n  - model: h2\n" },
        { "nush.yml", "merge_method: nuslerp\nbase_model: h0\nmodels:\n"
                      "  - model: h1\n    parameters: {weight: 0.7}\n"
                      "  - model: h2\n    parameters: {weight: 0.2}\n" },
        { "nushr.yml", "merge_method: nuslerp\nmodels:\n"
                       "  - model: h1\n    parameters: {weight: 0.7}\n"
                       "  - model: h2\n    parameters: {weight: 0.2}\n"
                       "parameters:\n  nuslerp_flatten: false\n" },
    };
    for (size_t r = 0; r < MS_ARRAY_LEN(f16_recipes); r++) {
        write_recipe(f16_recipes[r][0], f16_recipes[r][1]);
        check_stored_vs_float(f16_recipes[r][0], variants, MS_ARRAY_LEN(variants));
    }
    /* multislerp in float16, and in float32 on bfloat16 bytes written as bfloat16 */
    write_recipe("mslerph.yml", "merge_method: multislerp\nmodels:\n"
                                "  - model: h0\n    parameters: {weight: 0.7}\n"
                                "  - model: h1\n    parameters: {weight: 0.3}\n");
    write_recipe("mslerp32.yml", "merge_method: multislerp\ndtype: float32\nout_dtype: bfloat16\n"
                                 "models:\n  - model: base\n    parameters: {weight: 0.5}\n"
                                 "  - model: ft1\n    parameters: {weight: 0.3}\n"
                                 "  - model: ft2\n    parameters: {weight: 0.2}\n");
    static const char *const more[2] = { "mslerph.yml", "mslerp32.yml" };
    for (size_t r = 0; r < 2; r++) {
        check_stored_vs_float(more[r], variants, MS_ARRAY_LEN(variants));
    }
}

/*
 * sce on the stored bytes (stages/sce.c: every pass on the bfloat16 or float16
 * bytes, the variances in the keep area: a resident chunk's own, the keep pool
 * with --reread, none when the budget holds neither) gives the bytes of the
 * float path (MERGESTREAM_STORED=0), select_topk keeping some and all.
 */
Test(engine, sce_stored_passes_give_the_bytes_of_the_float_path, .timeout = 300)
{
    static const char *const variants[][2] = {
        { "", "" },
        { "", "--threads 3 --chunk-elems 1000" },
        { "", "--chunk-elems 1000 --reread" },
        { "MERGESTREAM_SUBBLOCK=16", "--threads 1 --max-memory 4M" },
        { "", "--chunk-elems 4000 --max-memory 3M" },
    };
    run_ok("cd %s && ms-mkmodel --base base --noise 0.01 --seed 31 --dtype f16 g0 >/dev/null && "
           "ms-mkmodel --base base --noise 0.01 --seed 32 --dtype f16 g1 >/dev/null && "
           "ms-mkmodel --base base --noise 0.02 --seed 33 --dtype f16 g2 >/dev/null", g_dir);
    static const char *const recipes[][2] = {
        { "sce.yml", "merge_method: sce\nbase_model: base\nmodels:\n  - model: base\n"
                     "  - model: ft1\n  - model: ft2\nparameters: {select_topk: 0.3}\n" },
        { "sce1.yml", "merge_method: sce\nbase_model: ft1\nmodels:\n  - model: base\n"
                      "  - model: ft1\n  - model: ft2\n" },
        { "sceh.yml", "merge_method: sce\nbase_model: g1\nmodels:\n  - model: g0\n"
                      "  - model: g1\n  - model: g2\nparameters: {select_topk: 0.6}\n" },
    };
    for (size_t r = 0; r < MS_ARRAY_LEN(recipes); r++) {
        write_recipe(recipes[r][0], recipes[r][1]);
        check_stored_vs_float(recipes[r][0], variants, MS_ARRAY_LEN(variants));
    }
}

/*
 * Fused chunks (pipeline/engine.c fused_work: a one-pass job's chunk read,
 * computed and written block by block on one pool thread). The hand formula
 * holds in blocks of 48 elements (a partial last block in chunks of 1000),
 * through the stored path and the float path (an f16 input; float32 output).
 */
Test(engine, linear_formula_holds_in_fused_blocks)
{
    run_ok("cd %s && ms-mkmodel --base base --noise 0.01 --seed 13 --dtype f16 ft2h", g_dir);
    static const char mixed[] = LINEAR_HEAD LINEAR_MODELS("ft2h");
    static const char out32[] = LINEAR_HEAD "out_dtype: float32\n" LINEAR_MODELS("ft2");
    check_linear_formula("MERGESTREAM_FUSE=48", "--chunk-elems 1000");
    check_linear_formula("MERGESTREAM_FUSE=48 MERGESTREAM_SUBBLOCK=16", "--threads 3");
    check_linear_formula_of(mixed, "ft2h", MS_DT_BF16, "MERGESTREAM_FUSE=48", "--chunk-elems 1000");
    check_linear_formula_of(out32, "ft2", MS_DT_F32, "MERGESTREAM_FUSE=48", "");
}

/* Fused blocks give the bytes of the asynchronous path (MERGESTREAM_FUSE=0), with
 * sharded output; row-wise blocks of 100 and 48 elements become whole rows. */
Test(engine, fused_blocks_give_the_bytes_of_the_async_path, .timeout = 300)
{
    static const char *const ref[2] = { "MERGESTREAM_FUSE=0", "--out-shard-size 50K" };
    static const char *const variants[][2] = {
        { "MERGESTREAM_FUSE=100", "--out-shard-size 50K" },
        { "MERGESTREAM_FUSE=48", "--threads 3 --chunk-elems 1000 --out-shard-size 50K" },
        { "MERGESTREAM_FUSE=4096", "--threads 1 --max-memory 4M --out-shard-size 50K" },
    };
    check_split_recipes(ref, variants, MS_ARRAY_LEN(variants));
}

/* The run file's shard checksums (--resume) from fused chunks are the files'
 * own: a run that fails after its shards are written (a directory stands where
 * config.json's temporary goes), resumed, keeps every shard. */
Test(engine, fused_chunks_record_the_checksums_resume_checks)
{
    write_recipe("linear.yml", linear_recipe);
    run_ok("cd %s && rm -rf r && mkdir -p r/out/config.json.tmp && "
           "! MERGESTREAM_FUSE=48 mergestream merge linear.yml r/out -q --out-shard-size 50K "
           "--force 2>/dev/null && test -e r/out/.mergestream-run.json && "
           "rmdir r/out/config.json.tmp", g_dir);
    char cmd[4096], *out = NULL, *err = NULL;
    snprintf(cmd, sizeof cmd, "cd %s && mergestream merge linear.yml r/out --out-shard-size 50K "
             "--resume", g_dir);
    int rc = th_run(cmd, &out, &err);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(err, "keeping r/out/model-00001-of-"), "%s", err);
    cr_assert(!strstr(err, "writing it again"), "%s", err);
    free(out);
    free(err);
}

/* A fused chunk whose first block is not in the page cache (the inputs dropped
 * from it: synced, then `dd iflag=nocache`; models larger than the 8 MiB the
 * header reads may read ahead) takes the asynchronous path with the rest of its
 * job: the same bytes. */
Test(engine, uncached_inputs_leave_the_fused_path_with_the_same_bytes)
{
    write_recipe("lin2.yml", "merge_method: linear\ndtype: bfloat16\nmodels:\n"
                             "  - model: big\n    parameters: {weight: 1.0}\n"
                             "  - model: big1\n    parameters: {weight: 0.3}\n");
    run_ok("cd %s && ms-mkmodel --layers 1 --hidden 256 --intermediate 256 --vocab 24000 "
           "--dtype bf16 --seed 21 big >/dev/null && "
           "ms-mkmodel --base big --noise 0.01 --seed 22 big1 >/dev/null && "
           "rm -rf a b && MERGESTREAM_FUSE=0 mergestream merge lin2.yml a/out -q && "
           "sync big/* big1/* && for f in big/*.safetensors big1/*.safetensors; do "
           "dd if=$f iflag=nocache count=0 status=none || exit 1; done && "
           "mergestream merge lin2.yml b/out -q", g_dir);
    assert_same_output("a/out", "b/out");
}
