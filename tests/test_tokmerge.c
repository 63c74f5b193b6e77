/*
 * test_tokmerge.c - tokenizer merging end to end (tokenizer_source, tokenizer:).
 *
 * Three small models with different vocabularies (tests/th_tok.c writes their
 * tokenizers; one has padded embedding rows, one a token past its vocab_size).
 * The expected output vocabulary is written out by hand below from mergekit's
 * build_union_tokenizer (base tokens, then the others' missing plain tokens in
 * model then id order, then added tokens), and every expected embedding row is
 * computed here from the input tensors by mergekit's embed.py rules, written
 * independently of pipeline/tokenizer.c. Each model's permuted matrix is read
 * out exactly through a float32 linear merge with a one-hot weight.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_safetensors.h"
#include "th.h"
#include "th_tok.h"

#define H 16 /* hidden size */

static char *g_dir;

/* The models' tokenizers: plain tokens, and added special ones (in model.vocab or not). */
#define P TH_TOK_PLAIN
static const struct th_tok tok_a[] = {
    { "<s>", 0, true, true, true },
    { "</s>", 1, true, true, true },
    P("a", 2),
    P("b", 3),
    P("c", 4),
    P("d", 5),
    P("ab", 6),
    P("cd", 7),
}; /* 10 embedding rows: 8..9 are padding */
static const struct th_tok tok_b[] = {
    { "<s>", 0, true, true, true },
    { "</s>", 1, true, true, true },
    P("a", 2),
    P("b", 3),
    P("e", 4),
    P("f", 5),
    P("ef", 6),
    { "<|im_start|>", 7, true, true, false },
}; /* 9 rows */
static const struct th_tok tok_c[] = {
    { "<s>", 0, true, true, true },
    { "</s>", 1, true, true, true },
    P("b", 2),
    P("a", 3),
    P("g", 4),
    P("e", 5),
    P("c", 6),
    { "<extra>", 7, true, false, false },
}; /* 7 rows: <extra> (id 7) is past vocab_size and never used */

struct tmodel {
    const char *name;
    const struct th_tok *tok;
    size_t ntok;
    long vocab_size;
};
static const struct tmodel g_models[3] = {
    { "A", tok_a, MS_ARRAY_LEN(tok_a), 10 },
    { "B", tok_b, MS_ARRAY_LEN(tok_b), 9 },
    { "C", tok_c, MS_ARRAY_LEN(tok_c), 7 },
};

/* The models' tokens below their vocab_size, for the reference (th_ref_rows). */
static const char *g_text[3][8];
static long g_id[3][8];
static struct th_refmodel g_ref[3];

static void ref_models(void)
{
    for (int k = 0; k < 3; k++) {
        const struct tmodel *m = &g_models[k];
        size_t n = 0;
        for (size_t i = 0; i < m->ntok; i++)
            if (m->tok[i].id < m->vocab_size) {
                g_text[k][n] = m->tok[i].text;
                g_id[k][n++] = m->tok[i].id;
            }
        g_ref[k] = (struct th_refmodel){ m->name, n, g_text[k], g_id[k] };
    }
}

/* Commands cd to g_dir themselves (g_dir is absolute). */
#define run_ok(...) TH_RUN_OK(g_dir, __VA_ARGS__)

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    for (int k = 0; k < 3; k++) {
        const struct tmodel *m = &g_models[k];
        run_ok("cd %s && ms-mkmodel --layers 1 --hidden %d --intermediate 32 --heads 1 "
               "--vocab %ld --seed %d %s",
               g_dir, H, m->vocab_size, k + 1, m->name);
        char *d = th_path(g_dir, m->name);
        cr_assert_eq(th_tok_write(d, m->tok, m->ntok, NULL), 0);
        free(d);
    }
    ref_models();
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(tokmerge, .init = setup, .fini = teardown, .timeout = 120);

static void write_file(const char *name, const char *text)
{
    char *p = th_path(g_dir, name);
    cr_assert_eq(th_write(p, text, strlen(text)), 0);
    free(p);
}

static float *read_rows_h(const char *sub, const char *name, long hidden, long *rows)
{
    return th_read_rows(g_dir, sub, name, hidden, rows);
}

static float *read_rows(const char *sub, const char *name, long *rows)
{
    return th_read_rows(g_dir, sub, name, H, rows);
}

static bool g_bf16; /* the merges run in bfloat16: the mean rounds after every step */

/* A linear merge in float32 with weight 1 on model k and 0 on the others: its
 * output is model k's permuted matrix exactly. tok is the recipe's tokenizer part. */
static void merge_onehot(const char *out, int k, const char *tok)
{
    char text[4096];
    snprintf(text, sizeof text,
             "merge_method: linear\ndtype: %s\nbase_model: A\n%s\nmodels:\n"
             "  - model: A\n    parameters: {weight: %d}\n"
             "  - model: B\n    parameters: {weight: %d}\n"
             "  - model: C\n    parameters: {weight: %d}\n",
             g_bf16 ? "bfloat16" : "float32", tok, k == 0, k == 1, k == 2);
    write_file("r.yml", text);
    run_ok("cd %s && rm -rf %s && mergestream merge r.yml %s -q", g_dir, out, out);
}

/* Every row of embed_tokens and lm_head of out against the reference for model k. */
static void check_rows(const char *out, const char *const *vocab, long nvocab, long rows, int k,
                       const struct th_ovr *ov, size_t nov)
{
    static const char *const names[] = { "model.embed_tokens.weight", "lm_head.weight" };
    for (size_t t = 0; t < 2; t++) {
        float *x[3];
        long n;
        for (int m = 0; m < 3; m++)
            x[m] = read_rows(g_models[m].name, names[t], &n);
        long got_rows;
        float *o = read_rows(out, names[t], &got_rows);
        cr_assert_eq(got_rows, rows, "%s: %ld rows, want %ld", names[t], got_rows, rows);
        float *e = th_ref_rows(g_ref, 3, k, 0, vocab, nvocab, rows, H, x, ov, nov, g_bf16);
        for (long r = 0; r < rows; r++)
            for (int c = 0; c < H; c++)
                cr_assert(ms_f32_bits(o[r * H + c]) == ms_f32_bits(e[r * H + c]),
                          "%s model %s row %ld ('%s') col %d: got %a want %a", names[t],
                          g_models[k].name, r, r < nvocab ? vocab[r] : "<pad>", c, o[r * H + c],
                          e[r * H + c]);
        for (int m = 0; m < 3; m++)
            free(x[m]);
        free(o);
        free(e);
    }
}

static json_t *load_json(const char *dir, const char *name)
{
    return th_load_json(g_dir, dir, name);
}

/*
 * What a loader needs: the ids of tokenizer.json (model.vocab and added_tokens)
 * are exactly 0..n-1, each id one text, equal to `vocab`; added_tokens and
 * tokenizer_config.json's added_tokens_decoder list the same ids and contents;
 * config.json's vocab_size is `rows`.
 */
static void check_loader(const char *out, const char *const *vocab, long nvocab, long rows)
{
    json_t *tj = load_json(out, "tokenizer.json"), *tc = load_json(out, "tokenizer_config.json");
    json_t *cfg = load_json(out, "config.json");
    const char **seen = calloc((size_t)nvocab, sizeof *seen);
    const char *key;
    json_t *v;
    json_object_foreach(json_object_get(json_object_get(tj, "model"), "vocab"), key, v)
    {
        long id = (long)json_integer_value(v);
        cr_assert(id >= 0 && id < nvocab, "vocab id %ld of '%s' out of range", id, key);
        cr_assert(!seen[id], "id %ld twice", id);
        seen[id] = key;
    }
    json_t *added = json_object_get(tj, "added_tokens"), *dec;
    dec = json_object_get(tc, "added_tokens_decoder");
    cr_assert_eq(json_array_size(added), json_object_size(dec));
    size_t i;
    json_array_foreach(added, i, v)
    {
        long id = (long)json_integer_value(json_object_get(v, "id"));
        const char *c = json_string_value(json_object_get(v, "content"));
        cr_assert(id >= 0 && id < nvocab && c);
        cr_assert(!seen[id] || !strcmp(seen[id], c), "id %ld: '%s' and '%s'", id, seen[id], c);
        seen[id] = c;
        char ids[32];
        snprintf(ids, sizeof ids, "%ld", id);
        json_t *d = json_object_get(dec, ids);
        cr_assert(d, "added_tokens_decoder lacks %s", ids);
        cr_assert_str_eq(json_string_value(json_object_get(d, "content")), c);
        cr_assert(json_equal(json_object_get(d, "special"), json_object_get(v, "special")));
    }
    for (long r = 0; r < nvocab; r++) {
        cr_assert(seen[r], "id %ld has no token", r);
        cr_assert_str_eq(seen[r], vocab[r], "id %ld", r);
    }
    cr_assert_eq(json_integer_value(json_object_get(cfg, "vocab_size")), rows);
    free(seen);
    json_decref(tj);
    json_decref(tc);
    json_decref(cfg);
}

/* build_union_tokenizer by hand: A's tokens, then B's missing plain ones (e f ef),
 * then C's (g), then the added tokens not yet present (<|im_start|>; C's <extra>
 * is past its vocab_size). */
static const char *const union_vocab[] = { "<s>", "</s>", "a", "b",  "c", "d",           "ab",
                                           "cd",  "e",    "f", "ef", "g", "<|im_start|>" };

Test(tokmerge, union_of_three_every_row_follows_its_rule)
{
    for (int k = 0; k < 3; k++) {
        merge_onehot("out", k, "tokenizer_source: union");
        check_rows("out", union_vocab, 13, 13, k, NULL, 0);
    }
    check_loader("out", union_vocab, 13, 13);
    /* <|im_start|> kept B's settings: special, not normalized */
    json_t *tj = load_json("out", "tokenizer.json");
    json_t *added = json_object_get(tj, "added_tokens");
    /* <s> </s>, then e f ef g as plain added tokens (add_tokens(str)), then <|im_start|> */
    cr_assert_eq(json_array_size(added), 7);
    json_t *e = json_array_get(added, 2), *last = json_array_get(added, 6);
    cr_assert_str_eq(json_string_value(json_object_get(e, "content")), "e");
    cr_assert(json_is_false(json_object_get(e, "special")));
    cr_assert(json_is_true(json_object_get(e, "normalized")));
    cr_assert_str_eq(json_string_value(json_object_get(last, "content")), "<|im_start|>");
    cr_assert(json_is_true(json_object_get(last, "special")));
    cr_assert(json_is_false(json_object_get(last, "normalized")));
    json_decref(tj);
}

/* In bfloat16 the mean of e (B's and C's rows, for A) rounds after each addition and after
 * the division, as torch does in the tensors' dtype; a one-hot linear merge in bf16 still
 * returns the model's rows exactly. */
Test(tokmerge, union_in_bfloat16_rounds_the_mean_as_torch)
{
    g_bf16 = true;
    merge_onehot("out", 0, "tokenizer: {source: union, pad_to_multiple_of: 8}");
    check_rows("out", union_vocab, 13, 16, 0, NULL, 0);
}

Test(tokmerge, pad_to_multiple_of_rows_hold_the_mean)
{
    const char *tok = "tokenizer:\n  source: union\n  pad_to_multiple_of: 8";
    for (int k = 0; k < 3; k += 2) {
        merge_onehot("out", k, tok);
        check_rows("out", union_vocab, 13, 16, k, NULL, 0);
    }
    check_loader("out", union_vocab, 13, 16);
    char *out = NULL, cmd[4096];
    snprintf(cmd, sizeof cmd, "cd %s && mergestream plan r.yml", g_dir);
    cr_assert_eq(th_run(cmd, &out, NULL), 0);
    cr_assert(strstr(out, "tokenizer:    union, 13 tokens, 16 rows; 2 tensors gathered"), "%s",
              out);
    free(out);
}

Test(tokmerge, base_source_with_token_overrides)
{
    static const char *const vocab[] = { "<s>", "</s>", "a",  "b",     "c",
                                         "d",   "ab",   "cd", "<new>", "<id>" };
    static const struct th_ovr ov[] = {
        { "a", 0, 1, -1, true },     /* B's row of a, even where a model has a */
        { "c", 2, 0, -1, true },     /* zero everywhere */
        { "<new>", 1, 1, 6, false }, /* B's row of "ef" (id 6) */
        { "<id>", 1, 2, 4, false },  /* C's row 4 */
    };
    const char *tok = "tokenizer:\n  source: base\n  tokens:\n"
                      "    a: {source: B, force: true}\n"
                      "    c: {source: {kind: zero}, force: true}\n"
                      "    \"<new>\": {source: {kind: model_token, model: B, token: ef}}\n"
                      "    \"<id>\": {source: {kind: model_token, model: C, token_id: 4}}";
    for (int k = 0; k < 3; k++) {
        merge_onehot("out", k, tok);
        check_rows("out", vocab, 10, 10, k, ov, MS_ARRAY_LEN(ov));
    }
    check_loader("out", vocab, 10, 10);
    /* add_tokens(str) on the tokens: keys: a and c (plain in A) become normal added
     * tokens with their ids; <new> and <id> are new */
    json_t *tj = load_json("out", "tokenizer.json");
    json_t *added = json_object_get(tj, "added_tokens");
    cr_assert_eq(json_array_size(added), 6);
    static const char *const want[] = { "<s>", "</s>", "a", "c", "<new>", "<id>" };
    static const int want_id[] = { 0, 1, 2, 4, 8, 9 };
    for (size_t i = 0; i < 6; i++) {
        json_t *e = json_array_get(added, i);
        cr_assert_str_eq(json_string_value(json_object_get(e, "content")), want[i]);
        cr_assert_eq(json_integer_value(json_object_get(e, "id")), want_id[i]);
        cr_assert(json_equal(json_object_get(e, "special"), json_boolean(i < 2)));
    }
    json_decref(tj);
}

Test(tokmerge, named_model_source)
{
    static const char *const vocab[] = { "<s>", "</s>", "a", "b", "e", "f", "ef", "<|im_start|>" };
    for (int k = 0; k < 3; k++) {
        merge_onehot("out", k, "tokenizer_source: B");
        check_rows("out", vocab, 8, 8, k, NULL, 0);
    }
    check_loader("out", vocab, 8, 8);
}

/* C as the base: its tokenizer is stripped of <extra> (id 7 >= vocab_size 7). */
Test(tokmerge, base_tokenizer_is_stripped)
{
    static const char *const vocab[] = { "<s>", "</s>", "b", "a", "g", "e", "c" };
    write_file("r.yml", "merge_method: linear\ndtype: float32\nbase_model: C\n"
                        "tokenizer_source: base\nmodels:\n"
                        "  - model: C\n    parameters: {weight: 1}\n"
                        "  - model: A\n    parameters: {weight: 0}\n");
    run_ok("cd %s && mergestream merge r.yml out -q", g_dir);
    check_loader("out", vocab, 7, 7);
    char *o = th_path(g_dir, "out/tokenizer.json");
    char *text = th_read(o, NULL);
    cr_assert(text && !strstr(text, "<extra>"));
    free(text);
    free(o);
}

/* One line on stderr containing want, a non-zero exit, and no output directory. */
static void expect_error(const char *recipe, const char *want)
{
    th_expect_merge_error(g_dir, recipe, want);
}

static const char bad_head[] = "merge_method: linear\nbase_model: A\nmodels:\n"
                               "  - model: A\n    parameters: {weight: 1}\n"
                               "  - model: D\n    parameters: {weight: 1}\n";

Test(tokmerge, bad_inputs_get_one_line_errors)
{
    char r[1024];
    snprintf(r, sizeof r, "%stokenizer_source: union\n", bad_head);
    run_ok("cd %s && cp -r C D && rm D/tokenizer.json", g_dir);
    expect_error(r, "D/tokenizer.json is missing");
    run_ok("cd %s && printf '{\"model\": ' > D/tokenizer.json", g_dir);
    expect_error(r, "D/tokenizer.json:1: malformed JSON");
    run_ok("cd %s && rm D/tokenizer.json && touch D/tokenizer.model", g_dir);
    expect_error(r, "D/tokenizer.model: not a SentencePiece model");
    run_ok("cd %s && rm D/tokenizer.model", g_dir);
    char *d = th_path(g_dir, "D");
    cr_assert_eq(th_tok_write(d, tok_c, MS_ARRAY_LEN(tok_c), "Unigram"), 0);
    free(d);
    expect_error(r, "tokenizer model type 'Unigram' is not supported");
    snprintf(r, sizeof r, "%stokenizer:\n  tokens:\n    d: {source: Z}\n", bad_head);
    cr_assert_eq(th_tok_write(d = th_path(g_dir, "D"), tok_c, MS_ARRAY_LEN(tok_c), NULL), 0);
    free(d);
    expect_error(r, "token 'd': source model 'Z' is not part of the merge");
    snprintf(r, sizeof r, "%stokenizer:\n  tokens:\n    g: {source: A}\n", bad_head);
    expect_error(r, "token 'g' not found in model 'A'");
    snprintf(r, sizeof r,
             "%stokenizer:\n  tokens:\n    q: {source: {kind: model_token, "
             "model: A, token: zz}}\n",
             bad_head);
    expect_error(r, "source token 'zz' not found in model 'A'");
    snprintf(r, sizeof r,
             "%stokenizer:\n  tokens:\n    q: {source: {kind: model_token, "
             "model: A, token_id: 99}}\n",
             bad_head);
    expect_error(r, "token id 99 out of range");
    snprintf(r, sizeof r, "%stokenizer:\n  pad_to_multiple_of: 0\n", bad_head);
    expect_error(r, "pad_to_multiple_of must be an integer");
}

Test(tokmerge, same_bytes_for_threads_and_budgets)
{
    write_file("r.yml", "merge_method: linear\nbase_model: A\n"
                        "tokenizer: {source: union, pad_to_multiple_of: 8}\nmodels:\n"
                        "  - model: A\n    parameters: {weight: 1}\n"
                        "  - model: B\n    parameters: {weight: 0.5}\n"
                        "  - model: C\n    parameters: {weight: 0.25}\n");
    run_ok("cd %s && mkdir d1 d2 d3 && mergestream merge r.yml d1/out -q -j1 && "
           "mergestream merge r.yml d2/out -q -j2 --max-memory 64K && "
           "mergestream merge r.yml d3/out -q -j2 --max-memory 1M && "
           "diff -r d1/out d2/out && diff -r d1/out d3/out",
           g_dir);
}

/*
 * A union merge whose embeddings (3 x 30000 x 512 bf16, 29 MiB each) are larger
 * than --max-memory 16M: peak RSS stays under 16 MiB + 32 MiB.
 */
Test(tokmerge, peak_rss_under_budget_on_large_union, .timeout = 300)
{
#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("RSS bound not checked under AddressSanitizer (its shadow memory counts)");
#endif
    const long V = 30000;
    struct th_tok *t = calloc((size_t)V, sizeof *t);
    char **names = calloc((size_t)V, sizeof *names);
    cr_assert(t && names);
    for (int k = 0; k < 3; k++) {
        char dir[64];
        snprintf(dir, sizeof dir, "L%d", k);
        run_ok("cd %s && ms-mkmodel --layers 1 --hidden 512 --intermediate 64 --heads 1 "
               "--vocab %ld --seed %d --tied %s",
               g_dir, V, 20 + k, dir);
        for (long i = 0; i < V; i++) {
            /* each model shares two thirds of its tokens with the one before it */
            free(names[i]);
            names[i] = malloc(32);
            snprintf(names[i], 32, "t%ld", i + (long)k * V / 3);
            t[i] = (struct th_tok){ names[i], i, false, false, false };
        }
        char *d = th_path(g_dir, dir);
        cr_assert_eq(th_tok_write(d, t, (size_t)V, NULL), 0);
        free(d);
    }
    write_file("big.yml", "merge_method: linear\nbase_model: L0\ntokenizer_source: union\n"
                          "models:\n  - model: L0\n    parameters: {weight: 1}\n"
                          "  - model: L1\n    parameters: {weight: 1}\n"
                          "  - model: L2\n    parameters: {weight: 1}\n");
    char *out = NULL, *err = NULL;
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "cd %s && /usr/bin/time -f 'maxrss %%M' mergestream merge big.yml "
             "bigout -q --max-memory 16M",
             g_dir);
    if (access("/usr/bin/time", X_OK) != 0)
        cr_skip_test("/usr/bin/time is not installed");
    int rc = th_run(cmd, &out, &err);
    cr_assert_eq(rc, 0, "%s", err);
    const char *m = err ? strstr(err, "maxrss ") : NULL;
    cr_assert(m, "%s", err);
    long kib = atol(m + 7);
    cr_log_info("peak RSS %ld KiB at --max-memory 16M", kib);
    cr_assert_lt(kib, (16 + 32) * 1024, "peak RSS %ld KiB", kib);
    long rows;
    float *o = read_rows_h("bigout", "model.embed_tokens.weight", 512, &rows);
    cr_assert_eq(rows, V + 2 * V / 3);
    free(o);
    for (long i = 0; i < V; i++)
        free(names[i]);
    free(names);
    free(t);
    free(out);
    free(err);
}

/*
 * Compressed inputs: the gathered rows of a .safetensors.zst model come through the
 * same reads (out of file order, from inside read callbacks) and give the same bytes.
 */
Test(tokmerge, compressed_inputs_same_bytes)
{
    write_file("p.yml", "merge_method: passthrough\nmodels:\n  - model: C\n");
    write_file("u.yml", "merge_method: linear\nbase_model: A\n"
                        "tokenizer: {source: union, pad_to_multiple_of: 8}\nmodels:\n"
                        "  - model: A\n    parameters: {weight: 1}\n"
                        "  - model: B\n    parameters: {weight: 0.5}\n"
                        "  - model: C\n    parameters: {weight: 0.25}\n");
    run_ok("cd %s && mergestream merge p.yml Cz -q --compress zstd && ls Cz/*.zst && "
           "sed 's/model: C$/model: Cz/' u.yml > uz.yml && grep -q Cz uz.yml && "
           "mkdir d1 d2 && mergestream merge u.yml d1/out -q && "
           "mergestream merge uz.yml d2/out -q -j2 --max-memory 64K && "
           "cmp d1/out/model.safetensors d2/out/model.safetensors", g_dir);
}

/* chat_template with a merged tokenizer: the built tokenizer_config.json carries it (the
 * template text is chatml's public layout, checked by a fragment). */
Test(tokmerge, chat_template_lands_in_the_merged_tokenizer_config)
{
    merge_onehot("out", 0, "tokenizer_source: union\nchat_template: chatml");
    json_t *cfg = load_json("out", "tokenizer_config.json");
    const char *t = json_string_value(json_object_get(cfg, "chat_template"));
    cr_assert(t && strstr(t, "<|im_start|>") && strstr(t, "<|im_end|>"), "%s", t ? t : "(none)");
    cr_assert(json_object_get(cfg, "added_tokens_decoder"));
    json_decref(cfg);
}

/* A LoRA that changes embed_tokens under a tokenizer merge is refused by name (the row
 * gather, defaults and padding means read the stored rows); one on other modules merges. */
Test(tokmerge, lora_on_embeddings_is_refused_under_a_tokenizer_merge)
{
    run_ok("cd %s && ms-mklora --model A --targets embed_tokens lemb >/dev/null && "
           "ms-mklora --model A --targets q_proj lq >/dev/null", g_dir);
    expect_error("merge_method: linear\nbase_model: A+lemb\ntokenizer_source: union\n"
                 "models:\n  - model: A+lemb\n    parameters: {weight: 1}\n"
                 "  - model: B\n    parameters: {weight: 0}\n",
                 "tokenizer merging with a LoRA");
    write_file("q.yml", "merge_method: linear\nbase_model: A+lq\ntokenizer_source: union\n"
                        "models:\n  - model: A+lq\n    parameters: {weight: 1}\n"
                        "  - model: B\n    parameters: {weight: 0}\n");
    run_ok("cd %s && rm -rf outq && mergestream merge q.yml outq -q", g_dir);
}
