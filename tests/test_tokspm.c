/*
 * test_tokspm.c - tokenizer merging with SentencePiece-only models (tokenizer.model, no
 * tokenizer.json), read through io/spm.cc.
 *
 * The SentencePiece models are trained here with spm_train on generated text (two
 * models with different vocabularies: a BPE one with byte fallback, a unigram one; both
 * with control and user-defined symbols). Every expected piece -> id map comes from
 * spm_export_vocab's output (the piece on line i has id i), and which pieces are
 * control or user-defined from the options the test gave spm_train, not from the code
 * under test. The expected output vocabulary is mergekit's build_union_tokenizer written
 * out below; the expected rows are mergekit's embed.py rules (th_ref_rows); the
 * vocabulary of a converted SentencePiece tokenizer is transformers' (every piece under
 * its id, control and user-defined pieces and <unk> as added tokens, not normalized).
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_spm.h"
#include "th.h"
#include "th_tok.h"

#define H 16     /* hidden size */
#define MAXV 512 /* tokens of a model at most */

static char *g_dir;
static bool g_have_spm;

#define run_ok(...) TH_RUN_OK(g_dir, __VA_ARGS__)

/* One token of a model as the reference sees it. */
struct vtok {
    const char *text;
    long id;
    bool added, special, normalized;
};

struct rmodel {
    const char *name;
    struct vtok tok[MAXV];
    size_t n;
    long vs; /* config.json's vocab_size */
};

/* ------------------------------------------------------------------ SentencePiece models */

struct spm_spec {
    const char *prefix, *opts;
    const char *const *control, *const *user; /* what opts asks for (NULL-terminated) */
};
static const char *const s1_control[] = { "<ctl>", NULL };
static const char *const s1_user[] = { "<tool>", "<x>", NULL };
static const char *const s2_control[] = { "<sep>", NULL };
static const char *const s2_user[] = { "<tool>", "<y>", NULL };
static const struct spm_spec g_spec[2] = {
    { "s1",
      "--model_type=bpe --vocab_size=300 --byte_fallback=true --character_coverage=1.0 "
      "'--control_symbols=<ctl>' '--user_defined_symbols=<tool>,<x>'",
      s1_control, s1_user },
    { "s2",
      "--model_type=unigram --vocab_size=80 --character_coverage=1.0 "
      "'--control_symbols=<sep>' '--user_defined_symbols=<tool>,<y>'",
      s2_control, s2_user },
};
static char *g_piece[2][MAXV]; /* from spm_export_vocab */
static long g_npieces[2];

static bool in_list(const char *const *l, const char *s)
{
    for (; *l; l++)
        if (!strcmp(*l, s))
            return true;
    return false;
}

/* Generated text: words from a list, lines of 3..12 words (a fixed LCG). */
static void write_corpus(const char *name, const char *const *words, size_t nw, unsigned seed)
{
    char *p = th_path(g_dir, name);
    FILE *f = fopen(p, "w");
    cr_assert(f);
    unsigned x = seed;
    for (int line = 0; line < 1500; line++) {
        x = x * 1103515245u + 12345u;
        int n = 3 + (int)((x >> 16) % 10);
        for (int w = 0; w < n; w++) {
            x = x * 1103515245u + 12345u;
            fprintf(f, "%s%s", w ? " " : "", words[(x >> 16) % nw]);
        }
        fputc('\n', f);
    }
    fclose(f);
    free(p);
}

/* The pieces of g_dir/PREFIX.model as spm_export_vocab lists them, one a line. */
static void export_vocab(int s)
{
    run_ok("spm_export_vocab --model=%s.model --output=%s.vocab", g_spec[s].prefix,
           g_spec[s].prefix);
    char name[64];
    snprintf(name, sizeof name, "%s.vocab", g_spec[s].prefix);
    char *p = th_path(g_dir, name), *text = th_read(p, NULL);
    cr_assert(text, "%s", p);
    long n = 0;
    for (char *line = text, *nl; *line; line = nl + 1) {
        nl = strchr(line, '\n');
        cr_assert(nl && n < MAXV);
        char *tab = strchr(line, '\t');
        cr_assert(tab && tab < nl, "%s: line %ld has no tab", p, n);
        g_piece[s][n++] = strndup(line, (size_t)(tab - line));
    }
    g_npieces[s] = n;
    free(text);
    free(p);
}

/* The reference tokens of a SentencePiece model s with vocab_size vs. */
static void spm_model_ref(int s, const char *name, long vs, struct rmodel *m)
{
    m->name = name;
    m->n = 0;
    m->vs = vs;
    for (long i = 0; i < g_npieces[s]; i++) {
        const char *t = g_piece[s][i];
        bool user = in_list(g_spec[s].user, t);
        bool added = user || in_list(g_spec[s].control, t) || !strcmp(t, "<unk>") ||
                     !strcmp(t, "<s>") || !strcmp(t, "</s>");
        m->tok[m->n++] = (struct vtok){ t, i, added, added && !user, false };
    }
}

/* A model folder whose tokenizer is only tokenizer.model (spm s), rows rows. */
static void make_spm_model(const char *name, int s, long rows, int seed)
{
    run_ok("ms-mkmodel --layers 1 --hidden %d --intermediate 32 --heads 1 --vocab %ld "
           "--seed %d %s >/dev/null && cd %s && rm tokenizer.json tokenizer_config.json "
           "special_tokens_map.json && cp ../%s.model tokenizer.model",
           H, rows, seed, name, name, g_spec[s].prefix);
}

/* ------------------------------------------------------------------ the BPE model */

#define P TH_TOK_PLAIN
/* Shares a, e, <s>, </s> and likely "▁the" with the SentencePiece models; "<0x0A>" is a
 * plain token here and a byte piece of s1; <tool> is special here, user-defined there. */
static const struct th_tok tok_a[] = {
    { "<s>", 0, true, true, true },
    { "</s>", 1, true, true, true },
    P("a", 2),
    P("e", 3),
    P("\xe2\x96\x81the", 4),
    P("zz", 5),
    P("<0x0A>", 6),
    { "<tool>", 7, true, true, false },
    { "<im>", 8, true, true, false },
};

static void bpe_model_ref(struct rmodel *m)
{
    m->name = "A";
    m->n = 0;
    m->vs = (long)MS_ARRAY_LEN(tok_a);
    for (size_t i = 0; i < MS_ARRAY_LEN(tok_a); i++) {
        const struct th_tok *t = &tok_a[i];
        m->tok[m->n++] = (struct vtok){ t->text, t->id, t->added, t->special, !t->special };
    }
}

static struct rmodel g_a, g_s1, g_s2;

static const char *const words1[] = { "the",   "cat",  "sat",   "on",     "mat",   "dog",
                                      "ran",   "far",  "away",  "hello",  "world", "merge",
                                      "alpha", "beta", "gamma", "<tool>", "<x>" };
static const char *const words2[] = { "the",   "sun", "rose", "over", "hills",  "quiet",
                                      "river", "a",   "sea",  "eel",  "<tool>", "<y>" };

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    char *out = NULL;
    g_have_spm = th_run("command -v spm_train && command -v spm_export_vocab", &out, NULL) == 0;
    free(out);
    if (!g_have_spm)
        return;
    write_corpus("c1.txt", words1, MS_ARRAY_LEN(words1), 7);
    write_corpus("c2.txt", words2, MS_ARRAY_LEN(words2), 11);
    for (int s = 0; s < 2; s++) {
        run_ok("spm_train --input=c%d.txt --model_prefix=%s %s --hard_vocab_limit=false "
               "--num_threads=1 >%s.log 2>&1 || { tail -3 %s.log; exit 1; }",
               s + 1, g_spec[s].prefix, g_spec[s].opts, g_spec[s].prefix, g_spec[s].prefix);
        export_vocab(s);
    }
    run_ok("ms-mkmodel --layers 1 --hidden %d --intermediate 32 --heads 1 --vocab %zu "
           "--seed 1 A >/dev/null",
           H, MS_ARRAY_LEN(tok_a));
    char *d = th_path(g_dir, "A");
    cr_assert_eq(th_tok_write(d, tok_a, MS_ARRAY_LEN(tok_a), NULL), 0);
    free(d);
    make_spm_model("S1", 0, g_npieces[0], 2);
    make_spm_model("S2", 1, g_npieces[1], 3);
    bpe_model_ref(&g_a);
    spm_model_ref(0, "S1", g_npieces[0], &g_s1);
    spm_model_ref(1, "S2", g_npieces[1], &g_s2);
}

static void teardown(void)
{
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < MAXV; i++) {
            free(g_piece[s][i]);
            g_piece[s][i] = NULL;
        }
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(tokspm, .init = setup, .fini = teardown, .timeout = 240);

#define NEED_SPM()                                                                                 \
    do {                                                                                           \
        if (!g_have_spm)                                                                           \
            cr_skip_test("skipped: spm_train and spm_export_vocab are not installed (make "        \
                         "test-deps installs sentencepiece)");                                     \
    } while (0)

static void write_file(const char *name, const char *text)
{
    char *p = th_path(g_dir, name);
    cr_assert_eq(th_write(p, text, strlen(text)), 0);
    free(p);
}

/* ------------------------------------------------------------------ the reference union */

/* An output token: its text, and its settings when it is an added token. */
struct otok {
    const char *text;
    bool added, special, normalized;
};
struct ovocab {
    struct otok t[2 * MAXV];
    long n;
};

static long ov_find(const struct ovocab *v, const char *text)
{
    for (long i = 0; i < v->n; i++)
        if (!strcmp(v->t[i].text, text))
            return i;
    return -1;
}

static long rm_find(const struct rmodel *m, const char *text)
{
    for (size_t i = 0; i < m->n; i++)
        if (!strcmp(m->tok[i].text, text) && m->tok[i].id < m->vs)
            return m->tok[i].id;
    return -1;
}

/* transformers' add_tokens: a present token keeps its id (a plain one becomes added
 * with these settings), a new one gets the next id. */
static void ov_add(struct ovocab *v, struct otok t)
{
    long i = ov_find(v, t.text);
    if (i < 0)
        v->t[v->n++] = t;
    else if (!v->t[i].added)
        v->t[i] = t;
}

/* build_union_tokenizer: m[0] is the base. The base's tokens by id; then every model's
 * tokens below its vocab_size in model then id order, skipping those that are added
 * tokens somewhere and those the base has, each added as add_tokens(str) does; then the
 * added tokens in first-seen order, first settings winning. */
static void ref_union(const struct rmodel *const *m, int nm, struct ovocab *v)
{
    static struct otok added[2 * MAXV];
    static const char *order[4 * MAXV];
    long nadded = 0, norder = 0;
    v->n = 0;
    for (size_t i = 0; i < m[0]->n; i++) {
        const struct vtok *t = &m[0]->tok[i];
        if (t->id >= m[0]->vs)
            continue;
        cr_assert_eq(t->id, v->n, "the base's ids are dense in this test");
        v->t[v->n++] = (struct otok){ t->text, t->added, t->special, t->normalized };
    }
    for (int k = 0; k < nm; k++) {
        for (size_t i = 0; i < m[k]->n; i++) { /* m[k]->tok is in id order */
            const struct vtok *t = &m[k]->tok[i];
            if (t->id >= m[k]->vs)
                continue;
            bool seen = false;
            for (long j = 0; j < norder && !seen; j++)
                seen = !strcmp(order[j], t->text);
            if (!seen)
                order[norder++] = t->text;
            if (!t->added)
                continue;
            seen = false;
            for (long j = 0; j < nadded && !seen; j++)
                seen = !strcmp(added[j].text, t->text);
            if (!seen)
                added[nadded++] = (struct otok){ t->text, true, t->special, t->normalized };
        }
    }
    for (long j = 0; j < norder; j++) {
        bool is_added = false;
        for (long q = 0; q < nadded && !is_added; q++)
            is_added = !strcmp(added[q].text, order[j]);
        if (!is_added && rm_find(m[0], order[j]) < 0)
            ov_add(v, (struct otok){ order[j], true, false, true });
    }
    for (long q = 0; q < nadded; q++)
        ov_add(v, added[q]);
}

/* ------------------------------------------------------------------ checks */

/* A linear merge in float32 with weight 1 on model k of m (m[0] the base): its output
 * is model k's permuted matrix exactly. */
static void merge_onehot(const struct rmodel *const *m, int nm, int k, const char *tok)
{
    char text[4096];
    int len = snprintf(text, sizeof text,
                       "merge_method: linear\ndtype: float32\n"
                       "base_model: %s\n%s\nmodels:\n",
                       m[0]->name, tok);
    for (int i = 0; i < nm; i++)
        len += snprintf(text + len, sizeof text - (size_t)len,
                        "  - model: %s\n    parameters: {weight: %d}\n", m[i]->name, i == k);
    write_file("r.yml", text);
    run_ok("rm -rf out && mergestream merge r.yml out -q");
}

/* Every row of embed_tokens and lm_head of out against the reference for model k. */
static void check_rows(const struct rmodel *const *m, int nm, int k, const struct ovocab *v,
                       const struct th_ovr *ov, size_t nov)
{
    static const char *const names[] = { "model.embed_tokens.weight", "lm_head.weight" };
    const char *vocab[2 * MAXV];
    static const char *text[4][MAXV];
    static long id[4][MAXV];
    struct th_refmodel ref[4];
    for (long r = 0; r < v->n; r++)
        vocab[r] = v->t[r].text;
    for (int i = 0; i < nm; i++) {
        size_t n = 0;
        for (size_t q = 0; q < m[i]->n; q++)
            if (m[i]->tok[q].id < m[i]->vs) {
                text[i][n] = m[i]->tok[q].text;
                id[i][n++] = m[i]->tok[q].id;
            }
        ref[i] = (struct th_refmodel){ m[i]->name, n, text[i], id[i] };
    }
    for (size_t t = 0; t < 2; t++) {
        float *x[4];
        long n;
        for (int i = 0; i < nm; i++)
            x[i] = th_read_rows(g_dir, m[i]->name, names[t], H, &n);
        long got;
        float *o = th_read_rows(g_dir, "out", names[t], H, &got);
        cr_assert_eq(got, v->n, "%s: %ld rows, want %ld", names[t], got, v->n);
        float *e = th_ref_rows(ref, nm, k, 0, vocab, v->n, v->n, H, x, ov, nov, false);
        for (long r = 0; r < v->n; r++)
            for (int c = 0; c < H; c++)
                cr_assert(ms_f32_bits(o[r * H + c]) == ms_f32_bits(e[r * H + c]),
                          "%s model %s row %ld ('%s') col %d: got %a want %a", names[t], m[k]->name,
                          r, vocab[r], c, o[r * H + c], e[r * H + c]);
        for (int i = 0; i < nm; i++)
            free(x[i]);
        free(o);
        free(e);
    }
}

/* An added token's entry (tokenizer.json's added_tokens or added_tokens_decoder) against
 * the reference. */
static void check_added(json_t *e, const struct otok *t, long id)
{
    cr_assert(e, "no added token entry for id %ld ('%s')", id, t->text);
    cr_assert_str_eq(json_string_value(json_object_get(e, "content")), t->text, "id %ld", id);
    cr_assert(json_equal(json_object_get(e, "special"), json_boolean(t->special)),
              "id %ld ('%s'): special", id, t->text);
    cr_assert(json_equal(json_object_get(e, "normalized"), json_boolean(t->normalized)),
              "id %ld ('%s'): normalized", id, t->text);
}

/* tokenizer_config.json's added_tokens_decoder lists exactly the reference's added tokens;
 * config.json's vocab_size is the token count. */
static void check_config(const struct ovocab *v)
{
    json_t *tc = th_load_json(g_dir, "out", "tokenizer_config.json");
    json_t *dec = json_object_get(tc, "added_tokens_decoder");
    long nadded = 0;
    for (long r = 0; r < v->n; r++) {
        if (!v->t[r].added)
            continue;
        char key[32];
        snprintf(key, sizeof key, "%ld", r);
        check_added(json_object_get(dec, key), &v->t[r], r);
        nadded++;
    }
    cr_assert_eq((long)json_object_size(dec), nadded);
    json_t *cfg = th_load_json(g_dir, "out", "config.json");
    cr_assert_eq(json_integer_value(json_object_get(cfg, "vocab_size")), v->n);
    json_decref(cfg);
    json_decref(tc);
}

/* A SentencePiece output: the origin's tokenizer.model byte for byte, no tokenizer.json. */
static void check_spm_files(const char *origin, const struct ovocab *v)
{
    char *a = th_path(g_dir, "out/tokenizer.model"), *b = th_path(g_dir, origin);
    char *bm = th_path(b, "tokenizer.model"), *tj = th_path(g_dir, "out/tokenizer.json");
    cr_assert_eq(th_cmp_files(a, bm), 0, "out/tokenizer.model differs from %s's", origin);
    cr_assert(access(tj, F_OK) != 0, "out/tokenizer.json written for a SentencePiece origin");
    free(a);
    free(b);
    free(bm);
    free(tj);
    check_config(v);
}

/* ------------------------------------------------------------------ tests */

/* The shim against spm_export_vocab: the same pieces in the same order, and the kinds
 * the training options asked for. */
Test(tokspm, shim_reads_every_piece_and_its_kind)
{
    NEED_SPM();
    for (int s = 0; s < 2; s++) {
        char name[64];
        snprintf(name, sizeof name, "%s.model", g_spec[s].prefix);
        char *p = th_path(g_dir, name);
        struct ms_spm_vocab *v = NULL;
        cr_assert_eq(ms_spm_load(p, &v), 0, "%s", ms_errmsg());
        cr_assert_eq((long)v->n, g_npieces[s]);
        long nbyte = 0;
        for (size_t i = 0; i < v->n; i++) {
            const char *t = g_piece[s][i];
            cr_assert_str_eq(v->piece[i], t, "%s piece %zu", name, i);
            int want = !strcmp(t, "<unk>")                                 ? MS_SPM_UNKNOWN
                       : !strcmp(t, "<s>") || !strcmp(t, "</s>")           ? MS_SPM_CONTROL
                       : in_list(g_spec[s].control, t)                     ? MS_SPM_CONTROL
                       : in_list(g_spec[s].user, t)                        ? MS_SPM_USER
                       : s == 0 && strlen(t) == 6 && !strncmp(t, "<0x", 3) ? MS_SPM_BYTE
                                                                           : MS_SPM_NORMAL;
            cr_assert_eq(v->kind[i], want, "%s piece %zu '%s': kind %d, want %d", name, i, t,
                         v->kind[i], want);
            nbyte += want == MS_SPM_BYTE;
        }
        cr_assert_eq(nbyte, s == 0 ? 256 : 0);
        cr_assert_eq(v->unk_id, 0);
        cr_assert_eq(v->bos_id, 1);
        cr_assert_eq(v->eos_id, 2);
        ms_spm_free(v);
        free(p);
    }
}

/* A BPE base and two SentencePiece-only models with different vocabularies: every row
 * of every model's permuted matrix follows its rule; the output is a tokenizer.json. */
Test(tokspm, union_of_bpe_base_and_two_sentencepiece_models)
{
    NEED_SPM();
    const struct rmodel *m[3] = { &g_a, &g_s1, &g_s2 };
    static struct ovocab v;
    ref_union(m, 3, &v);
    cr_assert_gt(v.n, 300, "the union holds most of S1's and S2's pieces (%ld)", v.n);
    cr_log_info("union: %ld tokens (S1 %ld pieces, S2 %ld)", v.n, g_npieces[0], g_npieces[1]);
    for (int k = 0; k < 3; k++) {
        merge_onehot(m, 3, k, "tokenizer_source: union");
        check_rows(m, 3, k, &v, NULL, 0);
    }
    check_config(&v);
    /* tokenizer.json: model.vocab and added_tokens give every id its reference text */
    json_t *tj = th_load_json(g_dir, "out", "tokenizer.json");
    static bool covered[2 * MAXV];
    memset(covered, 0, sizeof covered);
    const char *key;
    json_t *e;
    json_object_foreach(json_object_get(json_object_get(tj, "model"), "vocab"), key, e)
    {
        long id = (long)json_integer_value(e);
        cr_assert(id >= 0 && id < v.n && !strcmp(v.t[id].text, key), "vocab '%s' id %ld", key, id);
        covered[id] = true;
    }
    size_t i;
    long nadded = 0;
    json_array_foreach(json_object_get(tj, "added_tokens"), i, e)
    {
        long id = (long)json_integer_value(json_object_get(e, "id"));
        cr_assert(id >= 0 && id < v.n && v.t[id].added, "added id %ld", id);
        check_added(e, &v.t[id], id);
        covered[id] = true;
    }
    for (long r = 0; r < v.n; r++) {
        cr_assert(covered[r], "id %ld ('%s') is in neither model.vocab nor added_tokens", r,
                  v.t[r].text);
        nadded += v.t[r].added;
    }
    cr_assert_eq((long)json_array_size(json_object_get(tj, "added_tokens")), nadded);
    /* the added tokens are spliced into the rendered file: the bytes are still what
     * Python's json.dumps(indent=2) writes of the whole tree (as transformers does) */
    char *out = NULL;
    if (th_run("command -v python3", &out, NULL) == 0)
        run_ok("python3 -c 'import json,sys; t=open(\"out/tokenizer.json\").read(); "
               "sys.exit(json.dumps(json.loads(t), indent=2) != t)'");
    else
        cr_log_warn("skipped: the byte check of tokenizer.json (python3 is not installed)");
    free(out);
    json_decref(tj);
}

/* S1 with a <pad> added past its pieces (tokenizer_config.json as transformers saves it)
 * and one more embedding row. */
static void make_padded_s1(const char *name, const char *pad_id)
{
    make_spm_model(name, 0, g_npieces[0] + 1, 4);
    char cfg[2048];
    snprintf(cfg, sizeof cfg,
             "{\n  \"add_bos_token\": true,\n  \"added_tokens_decoder\": {\n"
             "    \"0\": {\"content\": \"<unk>\", \"lstrip\": false, \"normalized\": false, "
             "\"rstrip\": false, \"single_word\": false, \"special\": true},\n"
             "    \"1\": {\"content\": \"<s>\", \"lstrip\": false, \"normalized\": false, "
             "\"rstrip\": false, \"single_word\": false, \"special\": true},\n"
             "    \"%s\": {\"content\": \"<pad>\", \"lstrip\": false, \"normalized\": false, "
             "\"rstrip\": false, \"single_word\": false, \"special\": true}\n  },\n"
             "  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\",\n  \"pad_token\": \"<pad>\",\n"
             "  \"unk_token\": \"<unk>\",\n  \"legacy\": false,\n"
             "  \"tokenizer_class\": \"LlamaTokenizer\"\n}\n",
             pad_id);
    char path[256];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", name);
    write_file(path, cfg);
    snprintf(path, sizeof path, "%s/special_tokens_map.json", name);
    write_file(path, "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"pad_token\": \"<pad>\", "
                     "\"unk_token\": \"<unk>\"}\n");
}

/* A SentencePiece base with an added token: union with the BPE model and the other
 * SentencePiece model. The output keeps the base's tokenizer.model byte for byte, and
 * tokenizer_config.json (its other keys kept) lists the pieces' added tokens, <pad>, and
 * the tokens the union added after them. */
Test(tokspm, sentencepiece_base_with_added_tokens)
{
    NEED_SPM();
    char id[32];
    snprintf(id, sizeof id, "%ld", g_npieces[0]);
    make_padded_s1("P", id);
    static struct rmodel p;
    spm_model_ref(0, "P", g_npieces[0] + 1, &p);
    p.tok[p.n++] = (struct vtok){ "<pad>", g_npieces[0], true, true, false };
    const struct rmodel *m[3] = { &p, &g_a, &g_s2 };
    static struct ovocab v;
    ref_union(m, 3, &v);
    cr_assert_gt(v.n, g_npieces[0] + 1);
    for (int k = 0; k < 3; k++) {
        merge_onehot(m, 3, k, "tokenizer_source: union");
        check_rows(m, 3, k, &v, NULL, 0);
    }
    check_spm_files("P", &v);
    json_t *tc = th_load_json(g_dir, "out", "tokenizer_config.json");
    cr_assert_str_eq(json_string_value(json_object_get(tc, "tokenizer_class")), "LlamaTokenizer");
    cr_assert_str_eq(json_string_value(json_object_get(tc, "pad_token")), "<pad>");
    cr_assert(json_is_false(json_object_get(tc, "legacy")));
    json_decref(tc);
    json_t *sa = th_load_json(g_dir, "out", "special_tokens_map.json");
    json_t *sb = th_load_json(g_dir, "P", "special_tokens_map.json");
    cr_assert(json_equal(sa, sb), "special_tokens_map.json is P's");
    json_decref(sa);
    json_decref(sb);
    /* tokenizer_source: base: the base's own tokens only */
    static struct ovocab vb;
    vb.n = 0;
    for (size_t i = 0; i < p.n; i++)
        vb.t[vb.n++] =
            (struct otok){ p.tok[i].text, p.tok[i].added, p.tok[i].special, p.tok[i].normalized };
    merge_onehot(m, 3, 1, "tokenizer_source: base");
    check_rows(m, 3, 1, &vb, NULL, 0);
    check_spm_files("P", &vb);
}

/* A named SentencePiece model as the source, with `tokens:` drawing rows from the other
 * one by piece text: a byte piece and a forced user-defined piece. The output tokenizer
 * is S2's; S2 has no tokenizer_config.json, so none names a class. */
Test(tokspm, named_sentencepiece_source_with_tokens)
{
    NEED_SPM();
    long nl = -1; /* S1's id of the byte piece <0x0A> */
    for (long i = 0; i < g_npieces[0]; i++)
        if (!strcmp(g_piece[0][i], "<0x0A>"))
            nl = i;
    cr_assert_geq(nl, 0);
    const struct rmodel *m[3] = { &g_a, &g_s1, &g_s2 };
    static struct ovocab v;
    v.n = 0;
    for (size_t i = 0; i < g_s2.n; i++)
        v.t[v.n++] = (struct otok){ g_s2.tok[i].text, g_s2.tok[i].added, g_s2.tok[i].special,
                                    g_s2.tok[i].normalized };
    ov_add(&v, (struct otok){ "<nl>", true, false, true });
    ov_add(&v, (struct otok){ "<tool>", true, false, true }); /* already added in S2 */
    const struct th_ovr ov[] = {
        { "<nl>", 1, 1, nl, false },
        { "<tool>", 0, 1, -1, true },
    };
    const char *tok = "tokenizer:\n  source: S2\n  tokens:\n"
                      "    \"<nl>\": {source: {kind: model_token, model: S1, token: \"<0x0A>\"}}\n"
                      "    \"<tool>\": {source: S1, force: true}";
    for (int k = 0; k < 3; k++) {
        merge_onehot(m, 3, k, tok);
        check_rows(m, 3, k, &v, ov, MS_ARRAY_LEN(ov));
    }
    check_spm_files("S2", &v);
    json_t *tc = th_load_json(g_dir, "out", "tokenizer_config.json");
    cr_assert_null(json_object_get(tc, "tokenizer_class"));
    json_decref(tc);
    char *sm = th_path(g_dir, "out/special_tokens_map.json");
    cr_assert(access(sm, F_OK) != 0, "S2 has no special_tokens_map.json to copy");
    free(sm);
}

static void bad_recipe(char *r, size_t n, const char *base, const char *other)
{
    snprintf(r, n,
             "merge_method: linear\nbase_model: %s\ntokenizer_source: union\nmodels:\n"
             "  - model: %s\n    parameters: {weight: 1}\n"
             "  - model: %s\n    parameters: {weight: 1}\n",
             base, base, other);
}

/* What cannot be done faithfully is refused, naming the file, before anything is
 * written. */
Test(tokspm, refusals_name_the_file)
{
    NEED_SPM();
    char r[1024];
    /* a base with pieces past vocab_size: only a converted tokenizer.json could hold the
     * stripped tokenizer */
    run_ok("ms-mkmodel --layers 1 --hidden %d --intermediate 32 --heads 1 --vocab %ld --seed 5 "
           "Q >/dev/null && cd Q && rm tokenizer.json tokenizer_config.json "
           "special_tokens_map.json && cp ../s1.model tokenizer.model",
           H, g_npieces[0] - 10);
    bad_recipe(r, sizeof r, "Q", "A");
    char want[256];
    snprintf(want, sizeof want,
             "Q/tokenizer.model has %ld pieces but config.json's vocab_size is %ld: stripping "
             "pieces from a SentencePiece model is not supported",
             g_npieces[0], g_npieces[0] - 10);
    th_expect_merge_error(g_dir, r, want);
    /* as a member it is fine: tokens past its vocab_size are left out */
    bad_recipe(r, sizeof r, "A", "Q");
    write_file("ok.yml", r);
    run_ok("rm -rf okout && mergestream merge ok.yml okout -q");
    /* a file the library rejects */
    run_ok("cp -r S2 J && printf 'not a model' > J/tokenizer.model");
    bad_recipe(r, sizeof r, "A", "J");
    th_expect_merge_error(g_dir, r, "J/tokenizer.model: not a SentencePiece model");
    /* added_tokens_decoder ids that transformers would not keep */
    char id[32];
    snprintf(id, sizeof id, "%ld", g_npieces[0] + 3);
    make_padded_s1("P2", id);
    bad_recipe(r, sizeof r, "P2", "A");
    snprintf(want, sizeof want,
             "P2/tokenizer_config.json: added_tokens_decoder puts '<pad>' at id %ld, but "
             "transformers would give it id %ld",
             g_npieces[0] + 3, g_npieces[0]);
    th_expect_merge_error(g_dir, r, want);
    make_padded_s1("P3", "3");
    bad_recipe(r, sizeof r, "A", "P3");
    snprintf(want, sizeof want,
             "P3/tokenizer_config.json: added_tokens_decoder puts '<pad>' at id 3, where "
             "tokenizer.model has '%s'",
             g_piece[0][3]);
    th_expect_merge_error(g_dir, r, want);
    /* a special token that is neither a piece nor an added token */
    write_file("J/tokenizer_config.json", "{\"mask_token\": \"<mask>\"}");
    run_ok("cp S2/tokenizer.model J/tokenizer.model");
    bad_recipe(r, sizeof r, "A", "J");
    th_expect_merge_error(g_dir, r,
                          "J/tokenizer_config.json: special token '<mask>' is neither a piece of "
                          "tokenizer.model nor in added_tokens_decoder");
}
