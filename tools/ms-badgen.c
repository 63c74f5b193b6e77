/*
 * ms-badgen.c - generates a corpus of bad (and valid but odd) inputs for the
 * reliability tests (tests/test_badinput.c). No blobs are committed: every
 * case is made here from ms-mkmodel output, then corrupted.
 *
 *   ms-badgen [--mkmodel PATH] OUTDIR
 *
 * Each case is a directory OUTDIR/<name> holding the model(s), a recipe when
 * the case needs one, and case.txt:
 *
 *   # one line of description
 *   run: verify model              arguments of `mergestream` run in the case dir
 *   exit: 1                        expected exit status (0 for the valid cases)
 *   expect: <substring>            the one-line error (stderr) must contain it
 *   stdout: <substring>            (optional) stdout must contain it
 *   output: out                    (merge) the output dir: no final file may exist
 *   also: merge clean.yml ref      (optional) a second command the test runs
 *
 * Substrings name the file and the tensor or key at fault. ms-mkmodel is found
 * beside this program (or with --mkmodel, or in PATH) and run with posix_spawn.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_safetensors.h"

#define PROG "ms-badgen"
#define T_MLP "model.layers.1.mlp.up_proj.weight"
#define T_NORM "model.layers.0.input_layernorm.weight"
#define T_DOWN "model.layers.0.mlp.down_proj.weight"
#define NAN_AT 5  /* element of T_DOWN made NaN */
#define INF_AT 9  /* element of T_DOWN made +Inf (linear case) */

extern char **environ;

static const char usage[] =
    "usage: ms-badgen [--mkmodel PATH] OUTDIR\n"
    "\n"
    "Writes one directory per bad-input case into OUTDIR (created if needed), each\n"
    "with the models, a recipe when relevant, and case.txt (command to run, expected\n"
    "exit status and a substring of the expected one-line error).\n";

static const char *g_out;     /* OUTDIR */
static char *g_mkmodel;       /* ms-mkmodel to run */
static int g_ncases;

/* ------------------------------------------------------------------ helpers */

static char *path2(const char *a, const char *b)
{
    char *p = ms_asprintf("%s/%s", a, b);
    if (!p) {
        fprintf(stderr, PROG ": out of memory\n");
        exit(1);
    }
    return p;
}

static int write_text(const char *path, const char *text)
{
    int rc = ms_write_file_atomic(path, text, strlen(text));
    if (rc)
        fprintf(stderr, PROG ": %s\n", ms_errmsg());
    return rc;
}

/* Runs argv (argv[0] a path or a name in PATH) with the case dir as cwd. */
static int spawn_in(const char *dir, const char *const argv[])
{
    int rc = 0;
    char *cwd = getcwd(NULL, 0);
    if (!cwd || chdir(dir) < 0) {
        fprintf(stderr, PROG ": %s: %s\n", dir, strerror(errno));
        free(cwd);
        return -1;
    }
    pid_t pid;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    int e = posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (e) {
        fprintf(stderr, PROG ": cannot run %s: %s\n", argv[0], strerror(e));
        rc = -1;
    } else {
        int st = 0;
        if (waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, PROG ": %s failed (in %s)\n", argv[0], dir);
            rc = -1;
        }
    }
    if (chdir(cwd) < 0)
        rc = -1;
    free(cwd);
    return rc;
}

/* ms-mkmodel in dir: a fresh tiny model (seed) or, with base, a fine-tune of it. */
static int mkmodel(const char *dir, const char *name, const char *base, int seed,
                   const char *shard_size)
{
    char s[32];
    snprintf(s, sizeof s, "%d", seed);
    const char *argv[24];
    int n = 0;
    argv[n++] = g_mkmodel;
    if (base) {
        argv[n++] = "--base";
        argv[n++] = base;
        argv[n++] = "--noise";
        argv[n++] = "0.01";
    } else {
        argv[n++] = "--layers";
        argv[n++] = "2";
        argv[n++] = "--hidden";
        argv[n++] = "32";
        argv[n++] = "--intermediate";
        argv[n++] = "64";
        argv[n++] = "--vocab";
        argv[n++] = "64";
        argv[n++] = "--dtype";
        argv[n++] = "bf16";
        if (shard_size) {
            argv[n++] = "--shard-size";
            argv[n++] = shard_size;
        }
    }
    argv[n++] = "--seed";
    argv[n++] = s;
    argv[n++] = name;
    argv[n] = NULL;
    return spawn_in(dir, argv);
}

/* A new case directory; returns its path (ms_free). */
static char *case_dir(const char *name)
{
    char *d = path2(g_out, name);
    if (mkdir(d, 0755) < 0 && errno != EEXIST) {
        fprintf(stderr, PROG ": %s: %s\n", d, strerror(errno));
        exit(1);
    }
    g_ncases++;
    return d;
}

static int write_case(const char *dir, const char *desc, const char *run, int exit_code,
                      const char *expect, const char *extra)
{
    char *text = ms_asprintf("# %s\nrun: %s\nexit: %d\nexpect: %s\n%s", desc, run, exit_code,
                             expect, extra ? extra : "");
    char *p = path2(dir, "case.txt");
    int rc = text ? write_text(p, text) : -1;
    ms_free(p);
    ms_free(text);
    return rc;
}

/* ------------------------------------------------------------------ safetensors editing */

/* A loaded safetensors file: the header as JSON and the data region. */
struct stf {
    json_t *hdr;
    unsigned char *data;
    size_t data_len;
};

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static int stf_load(const char *path, struct stf *f)
{
    char *buf = NULL;
    size_t len = 0;
    memset(f, 0, sizeof *f);
    if (ms_read_file(path, &buf, &len)) {
        fprintf(stderr, PROG ": %s\n", ms_errmsg());
        return -1;
    }
    uint64_t n = len >= 8 ? le64((unsigned char *)buf) : UINT64_MAX;
    if (n > len - 8) {
        fprintf(stderr, PROG ": %s: not a safetensors file\n", path);
        ms_free(buf);
        return -1;
    }
    json_error_t err;
    f->hdr = json_loadb(buf + 8, (size_t)n, 0, &err);
    f->data_len = len - 8 - (size_t)n;
    f->data = ms_malloc(f->data_len + 64);
    if (!f->hdr || !f->data) {
        fprintf(stderr, PROG ": %s: cannot load header\n", path);
        ms_free(buf);
        return -1;
    }
    memcpy(f->data, buf + 8 + n, f->data_len);
    ms_free(buf);
    return 0;
}

static void stf_free(struct stf *f)
{
    json_decref(f->hdr);
    ms_free(f->data);
    memset(f, 0, sizeof *f);
}

/* How stf_save distorts the file on the way out. */
struct st_mangle {
    const char *dup_key;          /* repeat this entry at the end of the header */
    const char *utf8_key;         /* put a 0xff byte into this key's text */
    const char *json_text;        /* replace the whole header text */
    bool bad_json;                /* drop the header's closing brace */
    uint64_t prefix;              /* write this header length instead (0: the real one) */
    long data_delta;              /* bytes cut (< 0) or added (> 0) at the end of the data */
};

static int stf_save(const char *path, const struct stf *f, const struct st_mangle *m)
{
    static const struct st_mangle none;
    if (!m)
        m = &none;
    /* Render the object entry by entry so that a key can appear twice. */
    size_t cap = 1 << 16, n = 0;
    char *h = ms_malloc(cap);
    if (!h)
        return -1;
#define PUT(...) \
    do { \
        int k_ = snprintf(h + n, cap - n, __VA_ARGS__); \
        if (k_ < 0 || (size_t)k_ >= cap - n) { ms_free(h); return -1; } \
        n += (size_t)k_; \
    } while (0)
    if (m->json_text) {
        PUT("%s", m->json_text);
    } else {
        PUT("{");
        const char *key;
        json_t *val;
        bool first = true;
        json_object_foreach(f->hdr, key, val) {
            char *v = json_dumps(val, JSON_COMPACT | JSON_ENCODE_ANY);
            json_t *ks = json_string(key);
            char *k = json_dumps(ks, JSON_ENCODE_ANY);
            json_decref(ks);
            if (!v || !k) {
                ms_free(h);
                return -1;
            }
            PUT("%s%s:%s", first ? "" : ",", k, v);
            if (m->dup_key && !strcmp(m->dup_key, key))
                PUT(",%s:%s", k, v);
            first = false;
            ms_free(v);
            ms_free(k);
        }
        if (!m->bad_json)
            PUT("}");
    }
    while (n % 8)
        PUT(" ");
#undef PUT
    if (m->utf8_key) {
        char *at = strstr(h, m->utf8_key);
        if (!at) {
            ms_free(h);
            return -1;
        }
        at[1] = (char)0xff;
    }
    unsigned char prefix[8];
    uint64_t hl = m->prefix ? m->prefix : n;
    for (int i = 0; i < 8; i++)
        prefix[i] = (unsigned char)(hl >> (8 * i));
    size_t dl = f->data_len;
    if (m->data_delta < 0)
        dl -= MS_MIN(dl, (size_t)-m->data_delta);
    size_t total = 8 + n + dl + (m->data_delta > 0 ? (size_t)m->data_delta : 0);
    unsigned char *out = ms_calloc(1, total);
    if (!out) {
        ms_free(h);
        return -1;
    }
    memcpy(out, prefix, 8);
    memcpy(out + 8, h, n);
    memcpy(out + 8 + n, f->data, dl);
    ms_free(h);
    int rc = ms_write_file_atomic(path, out, total);
    ms_free(out);
    if (rc)
        fprintf(stderr, PROG ": %s\n", ms_errmsg());
    return rc;
}

static json_t *entry(const struct stf *f, const char *name)
{
    json_t *e = json_object_get(f->hdr, name);
    if (!e) {
        fprintf(stderr, PROG ": tensor %s not in the generated model\n", name);
        exit(1);
    }
    return e;
}

static uint64_t off_at(json_t *e, size_t i)
{
    return (uint64_t)json_integer_value(json_array_get(json_object_get(e, "data_offsets"), i));
}

static void set_offs(json_t *e, uint64_t b, uint64_t end)
{
    json_object_set_new(e, "data_offsets", json_pack("[I, I]", (json_int_t)b, (json_int_t)end));
}

/* The tensor whose data ends last. */
static const char *last_tensor(const struct stf *f)
{
    const char *key, *best = NULL;
    json_t *val;
    uint64_t end = 0;
    json_object_foreach(f->hdr, key, val) {
        if (!strcmp(key, "__metadata__"))
            continue;
        if (!best || off_at(val, 1) >= end) {
            best = key;
            end = off_at(val, 1);
        }
    }
    return best;
}

/* Loads dir/file, lets edit() change it, saves it with mangle m. */
static int st_edit(const char *dir, const char *file, void (*edit)(struct stf *, const void *),
                   const void *arg, const struct st_mangle *m)
{
    struct stf f;
    char *p = path2(dir, file);
    int rc = stf_load(p, &f);
    if (!rc) {
        if (edit)
            edit(&f, arg);
        rc = stf_save(p, &f, m);
    }
    stf_free(&f);
    ms_free(p);
    return rc;
}

/* ------------------------------------------------------------------ edits */

static void ed_dtype(struct stf *f, const void *arg)
{
    json_object_set_new(entry(f, T_MLP), "dtype", json_string(arg));
}

/* Shift T_MLP's offsets by +/- 2 bytes (a gap or an overlap with its neighbour). */
static void ed_shift(struct stf *f, const void *arg)
{
    long d = *(const long *)arg;
    json_t *e = entry(f, T_MLP);
    set_offs(e, off_at(e, 0) + (uint64_t)d, off_at(e, 1) + (uint64_t)d);
}

static void ed_reverse(struct stf *f, const void *arg)
{
    (void)arg;
    json_t *e = entry(f, T_MLP);
    set_offs(e, off_at(e, 1), off_at(e, 0));
}

/* The last tensor grows (shape and offsets agree) past the end of the file. */
static void ed_past_eof(struct stf *f, const void *arg)
{
    (void)arg;
    json_t *e = entry(f, last_tensor(f));
    json_t *sh = json_object_get(e, "shape");
    json_int_t d0 = json_integer_value(json_array_get(sh, 0));
    uint64_t b = off_at(e, 0), len = off_at(e, 1) - b;
    json_array_set_new(sh, 0, json_integer(d0 * 1000));
    set_offs(e, b, b + len * 1000);
}

static void ed_shape(struct stf *f, const void *arg)
{
    json_t *sh = json_object_get(entry(f, T_MLP), "shape");
    json_array_set_new(sh, 1, json_integer(*(const json_int_t *)arg));
}

static void ed_transpose(struct stf *f, const void *arg)
{
    (void)arg;
    json_t *sh = json_object_get(entry(f, T_MLP), "shape");
    json_t *a = json_incref(json_array_get(sh, 0)), *b = json_incref(json_array_get(sh, 1));
    json_array_set_new(sh, 0, b);
    json_array_set_new(sh, 1, a);
}

static void ed_shape_overflow(struct stf *f, const void *arg)
{
    (void)arg;
    json_object_set_new(entry(f, T_MLP), "shape",
                        json_pack("[I, I, I]", (json_int_t)1 << 40, (json_int_t)1 << 40,
                                  (json_int_t)1 << 40));
}

static void ed_drop_field(struct stf *f, const void *arg)
{
    json_object_del(entry(f, T_MLP), arg);
}

static void ed_metadata(struct stf *f, const void *arg)
{
    (void)arg;
    json_object_set_new(f->hdr, "__metadata__", json_pack("{s:i}", "format", 1));
}

/* Two extra tensors: model.layers.0.odd_empty [0, 32] and .odd_scalar [] (bf16 1.5). */
static void ed_odd(struct stf *f, const void *arg)
{
    (void)arg;
    uint64_t end = f->data_len;
    json_object_set_new(f->hdr, "model.layers.0.odd_empty",
                        json_pack("{s:s, s:[i, i], s:[I, I]}", "dtype", "BF16", "shape", 0, 32,
                                  "data_offsets", (json_int_t)end, (json_int_t)end));
    json_object_set_new(f->hdr, "model.layers.0.odd_scalar",
                        json_pack("{s:s, s:[], s:[I, I]}", "dtype", "BF16", "shape", "data_offsets",
                                  (json_int_t)end, (json_int_t)end + 2));
    f->data[f->data_len++] = 0xc0; /* bf16 1.5 = 0x3fc0, little-endian */
    f->data[f->data_len++] = 0x3f;
}

struct poke {
    const char *tensor;
    size_t elem;
    uint16_t bits;                /* bf16 pattern */
};

static void ed_poke(struct stf *f, const void *arg)
{
    const struct poke *p = arg;
    json_t *e = entry(f, p->tensor);
    uint64_t at = off_at(e, 0) + 2 * p->elem;
    f->data[at] = (unsigned char)p->bits;
    f->data[at + 1] = (unsigned char)(p->bits >> 8);
}

/* Copies element elem of tensor from dir/src's model.safetensors into dir/dst's. */
static int copy_elem(const char *dir, const char *src, const char *dst, const char *tensor,
                     size_t elem)
{
    struct stf a;
    char *p = ms_asprintf("%s/%s/model.safetensors", dir, src);
    int rc = p ? stf_load(p, &a) : -1;
    ms_free(p);
    if (rc)
        return rc;
    uint64_t at = off_at(entry(&a, tensor), 0) + 2 * elem;
    struct poke pk = { tensor, elem, (uint16_t)(a.data[at] | a.data[at + 1] << 8) };
    stf_free(&a);
    p = ms_asprintf("%s/model.safetensors", dst);
    rc = p ? st_edit(dir, p, ed_poke, &pk, NULL) : -1;
    ms_free(p);
    return rc;
}

/* ------------------------------------------------------------------ index editing */

static int index_edit(const char *dir, void (*edit)(json_t *wm, const void *), const void *arg,
                      const char *text)
{
    char *p = path2(dir, "model/model.safetensors.index.json");
    int rc = 0;
    if (text) {
        rc = write_text(p, text);
    } else {
        json_error_t err;
        json_t *root = json_load_file(p, 0, &err);
        json_t *wm = json_object_get(root, "weight_map");
        if (!json_is_object(wm)) {
            fprintf(stderr, PROG ": %s: no weight_map\n", p);
            rc = -1;
        } else {
            edit(wm, arg);
            char *s = json_dumps(root, JSON_INDENT(2));
            rc = s ? write_text(p, s) : -1;
            ms_free(s);
        }
        json_decref(root);
    }
    ms_free(p);
    return rc;
}

static void ix_add(json_t *wm, const void *arg)
{
    json_object_set_new(wm, arg, json_string("model-00001-of-00003.safetensors"));
}

static void ix_move(json_t *wm, const void *arg)
{
    const char *now = json_string_value(json_object_get(wm, arg));
    const char *other = !strcmp(now, "model-00001-of-00003.safetensors")
                            ? "model-00002-of-00003.safetensors"
                            : "model-00001-of-00003.safetensors";
    json_object_set_new(wm, arg, json_string(other));
}

static void ix_del(json_t *wm, const void *arg) { json_object_del(wm, arg); }

/* ------------------------------------------------------------------ cases */

typedef int (*case_fn)(const char *dir);

#define CHECK(x) do { if ((x) != 0) return -1; } while (0)

static int single_model(const char *dir) { return mkmodel(dir, "model", NULL, 1, NULL); }
static int sharded_model(const char *dir) { return mkmodel(dir, "model", NULL, 1, "20K"); }

#define ST "model/model.safetensors"

static int c_truncated(const char *d)
{
    struct st_mangle m = { .data_delta = -100 };
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, NULL, NULL, &m));
    return write_case(d, "shard cut short by 100 bytes", "verify model", 1,
                      ST ": file is truncated", NULL);
}

static int c_trailing(const char *d)
{
    struct st_mangle m = { .data_delta = 3 };
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, NULL, NULL, &m));
    return write_case(d, "3 bytes after the data", "verify model", 1,
                      ST ": 3 trailing bytes", NULL);
}

static int c_too_small(const char *d)
{
    CHECK(single_model(d));
    char *p = path2(d, ST);
    int rc = ms_write_file_atomic(p, "\x05\0\0\0\0", 5);
    ms_free(p);
    CHECK(rc);
    return write_case(d, "5-byte file", "verify model", 1, ST ": file is 5 bytes, too small",
                      NULL);
}

static int c_hdrlen_eof(const char *d)
{
    struct st_mangle m = { .prefix = 1u << 20 };
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, NULL, NULL, &m));
    return write_case(d, "header length 1 MiB, past the end of the file", "verify model", 1,
                      ST ": header length 1048576 runs past the end of the file", NULL);
}

static int c_hdrlen_huge(const char *d)
{
    struct st_mangle m = { .prefix = 200000000 };
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, NULL, NULL, &m));
    return write_case(d, "header length 200 MB (> 100 MB limit)", "verify model", 1,
                      ST ": header length 200000000 is over the limit", NULL);
}

static int c_utf8(const char *d)
{
    struct st_mangle m = { .utf8_key = T_NORM };
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, NULL, NULL, &m));
    return write_case(d, "0xff byte inside a tensor name", "verify model", 1,
                      ST ": header is not valid utf-8 (byte", NULL);
}

static int c_json(const char *d)
{
    struct st_mangle m = { .bad_json = true };
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, NULL, NULL, &m));
    return write_case(d, "header without its closing brace", "verify model", 1,
                      ST ": header is not valid json at byte", NULL);
}

static int c_not_object(const char *d)
{
    struct st_mangle m = { .json_text = "[1, 2]" };
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, NULL, NULL, &m));
    return write_case(d, "header is a JSON array", "verify model", 1,
                      ST ": header is not a json object", NULL);
}

static int c_dtype(const char *d)
{
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_dtype, "BF17", NULL));
    return write_case(d, "unknown dtype name", "verify model", 1,
                      ST ": tensor '" T_MLP "': unknown dtype 'BF17'", NULL);
}

static int c_overlap(const char *d)
{
    static const long minus2 = -2;
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_shift, &minus2, NULL));
    return write_case(d, "a tensor starts 2 bytes before the previous one ends", "verify model",
                      1, ST ": tensor '" T_MLP "': data_offsets [37054, 41150] overlap the previous "
                      "tensor", NULL);
}

static int c_gap(const char *d)
{
    static const long plus2 = 2;
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_shift, &plus2, NULL));
    return write_case(d, "a tensor starts 2 bytes after the previous one ends", "verify model",
                      1, ST ": tensor '" T_MLP "': data_offsets [37058, 41154] leave a gap", NULL);
}

static int c_reversed(const char *d)
{
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_reverse, NULL, NULL));
    return write_case(d, "data_offsets [end, begin]", "verify model", 1,
                      ST ": tensor '" T_MLP "': data_offsets [41152, 37056] end before begin",
                      NULL);
}

static int c_past_eof(const char *d)
{
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_past_eof, NULL, NULL));
    return write_case(d, "the last tensor's offsets run past the end of the file",
                      "verify model", 1, ST ": file is truncated: the header describes", NULL);
}

static int c_size(const char *d)
{
    static const json_int_t wide = 33;
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_shape, &wide, NULL));
    return write_case(d, "shape x dtype size differs from the byte length", "verify model", 1,
                      ST ": tensor '" T_MLP "': data_offsets [37056, 41152] do not match shape "
                      "[64, 33] x BF16", NULL);
}

static int c_overflow(const char *d)
{
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_shape_overflow, NULL, NULL));
    return write_case(d, "shape whose element count overflows", "verify model", 1,
                      ST ": tensor '" T_MLP "': element count of shape", NULL);
}

static int c_missing_field(const char *d)
{
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_drop_field, "data_offsets", NULL));
    return write_case(d, "entry without data_offsets", "verify model", 1,
                      ST ": tensor '" T_MLP "': missing data_offsets", NULL);
}

static int c_metadata(const char *d)
{
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, ed_metadata, NULL, NULL));
    return write_case(d, "__metadata__ with a number", "verify model", 1,
                      ST ": __metadata__ value of 'format' is not a string", NULL);
}

static int c_duplicate(const char *d)
{
    struct st_mangle m = { .dup_key = T_NORM };
    CHECK(single_model(d));
    CHECK(st_edit(d, ST, NULL, NULL, &m));
    return write_case(d, "a tensor name twice in the header", "verify model", 1,
                      ST ": tensor '" T_NORM "': name appears twice", NULL);
}

/* --- index */

#define IDX "model/model.safetensors.index.json"
#define SH2 "model-00002-of-00003.safetensors"

static int c_idx_missing_shard(const char *d)
{
    CHECK(sharded_model(d));
    char *p = path2(d, "model/" SH2);
    int rc = unlink(p);
    ms_free(p);
    CHECK(rc);
    return write_case(d, "the index names a shard that is missing", "verify model", 1,
                      IDX ": tensor 'model.layers.0.mlp.up_proj.weight': shard model/" SH2
                      " does not exist", NULL);
}

static int c_idx_missing_tensor(const char *d)
{
    CHECK(sharded_model(d));
    CHECK(index_edit(d, ix_add, "model.layers.1.mlp.extra.weight", NULL));
    return write_case(d, "the index names a tensor no shard has", "verify model", 1,
                      IDX ": tensor 'model.layers.1.mlp.extra.weight' is listed for", NULL);
}

static int c_idx_disagree(const char *d)
{
    CHECK(sharded_model(d));
    CHECK(index_edit(d, ix_move, "model.embed_tokens.weight", NULL));
    return write_case(d, "the index puts a tensor in the wrong shard", "verify model", 1,
                      IDX ": tensor 'model.embed_tokens.weight' is listed for model/" SH2 " but is in "
                      "model/model-00001-of-00003.safetensors", NULL);
}

static int c_idx_unlisted(const char *d)
{
    CHECK(sharded_model(d));
    CHECK(index_edit(d, ix_del, "model.norm.weight", NULL));
    return write_case(d, "a shard holds a tensor the index does not list", "verify model", 1,
                      IDX ": tensor 'model.norm.weight' in model/model-00003-of-00003.safetensors is "
                      "not in the weight_map", NULL);
}

static int c_idx_json(const char *d)
{
    CHECK(sharded_model(d));
    CHECK(index_edit(d, NULL, NULL, "{\"weight_map\": {\"a\": \"b\",}\n"));
    return write_case(d, "index file that is not JSON", "verify model", 1,
                      IDX ": not valid json", NULL);
}

/* --- merges and plans over bad models and recipes */

static int three_models(const char *d)
{
    CHECK(mkmodel(d, "base", NULL, 1, NULL));
    CHECK(mkmodel(d, "ft1", "base", 2, NULL));
    return mkmodel(d, "ft2", "base", 3, NULL);
}

static int recipe(const char *d, const char *name, const char *text)
{
    char *p = path2(d, name);
    int rc = write_text(p, text);
    ms_free(p);
    return rc;
}

static const char linear_yml[] =
    "merge_method: linear\n"
    "dtype: bfloat16\n"
    "models:\n"
    "  - model: base\n"
    "    parameters: {weight: 0.5}\n"
    "  - model: ft1\n"
    "    parameters: {weight: 0.5}\n";

#define MERGE_OUT "output: out\n"

static int c_merge_truncated(const char *d)
{
    struct st_mangle m = { .data_delta = -10 };
    CHECK(three_models(d));
    CHECK(st_edit(d, "ft1/model.safetensors", NULL, NULL, &m));
    CHECK(recipe(d, "recipe.yml", linear_yml));
    return write_case(d, "merge with a truncated input shard", "merge recipe.yml out", 1,
                      "ft1/model.safetensors: file is truncated", MERGE_OUT);
}

static int c_merge_dtype(const char *d)
{
    CHECK(three_models(d));
    CHECK(st_edit(d, "ft1/model.safetensors", ed_dtype, "Q4_K", NULL));
    CHECK(recipe(d, "recipe.yml", linear_yml));
    return write_case(d, "merge with an unknown dtype in one input", "merge recipe.yml out", 1,
                      "ft1/model.safetensors: tensor '" T_MLP "': unknown dtype 'Q4_K'",
                      MERGE_OUT);
}

static int c_merge_missing_shard(const char *d)
{
    CHECK(mkmodel(d, "base", NULL, 1, "20K"));
    CHECK(mkmodel(d, "ft1", "base", 2, NULL));
    char *p = path2(d, "ft1/" SH2);
    int rc = unlink(p);
    ms_free(p);
    CHECK(rc);
    CHECK(recipe(d, "recipe.yml", linear_yml));
    return write_case(d, "merge where an index names a missing shard", "merge recipe.yml out", 1,
                      "ft1/model.safetensors.index.json: tensor 'model.layers.0.mlp.up_proj.weight': "
                      "shard ft1/" SH2 " does not exist", MERGE_OUT);
}

static int c_merge_shape(const char *d)
{
    CHECK(mkmodel(d, "base", NULL, 1, NULL));
    CHECK(mkmodel(d, "ft1", "base", 2, NULL));
    /* up_proj [64, 32] -> [32, 64]: same bytes, a valid file, another shape */
    CHECK(st_edit(d, "ft1/model.safetensors", ed_transpose, NULL, NULL));
    CHECK(recipe(d, "recipe.yml", linear_yml));
    return write_case(d, "models whose tensor shapes differ", "merge recipe.yml out", 1,
                      "shape mismatch for tensor '" T_MLP "': model 'base' has [64, 32] but "
                      "model 'ft1' has [32, 64]", MERGE_OUT);
}

struct recipe_case {
    const char *name, *desc, *cmd, *text, *expect;
};

static const struct recipe_case recipe_cases[] = {
    { "recipe_yaml_syntax", "YAML that does not parse", "merge recipe.yml out",
      "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: [1,\n",
      "recipe.yml:5:1: did not find expected node content" },
    { "recipe_wrong_type", "a weight that is a word", "merge recipe.yml out",
      "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: heavy}\n"
      "  - model: ft1\n    parameters: {weight: 0.5}\n",
      "recipe.yml:4:26: parameter 'weight' must be a number, not 'heavy'" },
    { "recipe_models_not_list", "models: a number", "plan recipe.yml",
      "merge_method: linear\nmodels: 3\n", "recipe.yml:2:9: models must be a list" },
    { "recipe_unknown_method", "merge_method that does not exist", "merge recipe.yml out",
      "merge_method: frobnicate\nmodels:\n  - model: base\n  - model: ft1\n", "recipe.yml:1:15: unknown merge method 'frobnicate'" },
    { "recipe_ties_no_base", "ties without base_model", "merge recipe.yml out",
      "merge_method: ties\nmodels:\n  - model: ft1\n    parameters: {weight: 1, density: 0.5}\n"
      "  - model: ft2\n    parameters: {weight: 1, density: 0.5}\n",
      "recipe.yml:1:15: merge method 'ties' requires base_model" },
    { "recipe_slice_mismatch", "a slice whose sources have different layer counts",
      "merge recipe.yml out",
      "merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\nslices:\n  - sources:\n"
      "      - model: base\n        layer_range: [0, 2]\n      - model: ft1\n"
      "        layer_range: [0, 1]\n",
      "recipe.yml:5:5: all sources of a slice must have the same number of layers ('base' "
      "has 2, 'ft1' has 1)" },
    { "recipe_layer_range", "layer_range past the model's layers", "plan recipe.yml",
      "merge_method: passthrough\nslices:\n  - sources:\n      - model: base\n"
      "        layer_range: [0, 9]\n",
      "recipe.yml:4:9: layer_range [0, 9] is out of bounds for model 'base' (2 layers)" },
    { "recipe_layer_range_reversed", "layer_range [2, 1]", "plan recipe.yml",
      "merge_method: passthrough\nslices:\n  - sources:\n      - model: base\n"
      "        layer_range: [2, 1]\n",
      "recipe.yml:5:22: layer_range [2, 1] is not a range" },
    { "recipe_missing_model", "a model directory that does not exist", "merge recipe.yml out",
      "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 1}\n"
      "  - model: ./no-such-model\n    parameters: {weight: 1}\n",
      "model './no-such-model' not found" },
    { "recipe_bad_dtype", "dtype that does not exist", "merge recipe.yml out",
      "merge_method: linear\ndtype: float12\nmodels:\n  - model: base\n"
      "    parameters: {weight: 1}\n  - model: ft1\n    parameters: {weight: 1}\n",
      "recipe.yml:2:8: unknown dtype 'float12'" },
    { "recipe_empty", "an empty recipe file", "merge recipe.yml out", "", "recipe.yml:1:1: recipe is empty" },
    { "recipe_two_docs", "two YAML documents (mergekit-multi), the second one invalid",
      "plan recipe.yml",
      "merge_method: linear\nmodels:\n  - model: base\n---\nmerge_method: linear\n",
      "recipe.yml:5:1: one of 'models', 'slices' or 'modules' must be given" },
    { "recipe_duplicate_key", "merge_method twice", "plan recipe.yml",
      "merge_method: linear\nmerge_method: ties\nmodels:\n  - model: base\n",
      "recipe.yml:2:1: duplicate key 'merge_method'" },
    { "recipe_missing_file", "recipe file that does not exist", "merge nothere.yml out", NULL,
      "nothere.yml: No such file or directory" },
};

/* --- valid but odd */

static int c_ok_odd(const char *d)
{
    CHECK(mkmodel(d, "model", NULL, 1, NULL));
    CHECK(st_edit(d, ST, ed_odd, NULL, NULL));
    return write_case(d, "empty [0, 32] and scalar [] tensors: valid", "verify model", 0, "",
                      "stdout: ok: model\n");
}

static int c_ok_odd_merge(const char *d)
{
    CHECK(three_models(d));
    CHECK(st_edit(d, "base/model.safetensors", ed_odd, NULL, NULL));
    CHECK(st_edit(d, "ft1/model.safetensors", ed_odd, NULL, NULL));
    CHECK(recipe(d, "recipe.yml", linear_yml));
    return write_case(d, "merge of models with empty and scalar tensors: valid",
                      "merge recipe.yml out", 0, "", NULL);
}

static int c_nan_linear(const char *d)
{
    CHECK(three_models(d));
    struct poke nan = { T_DOWN, NAN_AT, 0x7fc0 }, inf = { T_DOWN, INF_AT, 0x7f80 };
    CHECK(st_edit(d, "ft1/model.safetensors", ed_poke, &nan, NULL));
    CHECK(st_edit(d, "ft1/model.safetensors", ed_poke, &inf, NULL));
    CHECK(recipe(d, "recipe.yml", linear_yml));
    return write_case(d, "linear merge with NaN (element 5) and +Inf (element 9) in "
                      T_DOWN " of ft1: propagated", "merge recipe.yml out", 0, "", NULL);
}

/*
 * ties with density 0.5 over base + one model: `ft1` equals base at element
 * NAN_AT of T_DOWN (a zero delta, never kept), `ft1nan` is ft1 with NaN
 * there. If |NaN| ranks above every finite magnitude, the NaN run keeps one
 * finite delta fewer than the clean run.
 */
static int c_nan_ties(const char *d)
{
    CHECK(mkmodel(d, "base", NULL, 1, NULL));
    CHECK(mkmodel(d, "ft1", "base", 2, NULL));
    CHECK(copy_elem(d, "base", "ft1", T_DOWN, NAN_AT));
    CHECK(mkmodel(d, "ft1nan", "ft1", 2, NULL));
    /* ft1nan must equal ft1 except at NAN_AT: copy ft1's file over it first. */
    char *a = path2(d, "ft1/model.safetensors"), *b = path2(d, "ft1nan/model.safetensors");
    char *data = NULL;
    size_t len = 0;
    int rc = ms_read_file(a, &data, &len);
    if (!rc)
        rc = ms_write_file_atomic(b, data, len);
    ms_free(data);
    ms_free(a);
    ms_free(b);
    CHECK(rc);
    struct poke nan = { T_DOWN, NAN_AT, 0x7fc0 };
    CHECK(st_edit(d, "ft1nan/model.safetensors", ed_poke, &nan, NULL));
    static const char fmt[] =
        "merge_method: ties\nbase_model: base\ndtype: bfloat16\nmodels:\n  - model: %s\n"
        "    parameters: {weight: 1.0, density: 0.5}\n";
    char y[256];
    snprintf(y, sizeof y, fmt, "ft1nan");
    CHECK(recipe(d, "recipe.yml", y));
    snprintf(y, sizeof y, fmt, "ft1");
    CHECK(recipe(d, "clean.yml", y));
    return write_case(d, "ties with NaN in one delta: |NaN| ranks as the largest magnitude",
                      "merge recipe.yml out", 0, "", "also: merge clean.yml ref/out\n");
}

struct gen_case {
    const char *name;
    case_fn fn;
};

static const struct gen_case cases[] = {
    { "st_truncated", c_truncated },
    { "st_trailing_bytes", c_trailing },
    { "st_too_small", c_too_small },
    { "st_header_len_past_eof", c_hdrlen_eof },
    { "st_header_len_huge", c_hdrlen_huge },
    { "st_invalid_utf8", c_utf8 },
    { "st_invalid_json", c_json },
    { "st_header_not_object", c_not_object },
    { "st_unknown_dtype", c_dtype },
    { "st_offsets_overlap", c_overlap },
    { "st_offsets_gap", c_gap },
    { "st_offsets_reversed", c_reversed },
    { "st_offsets_past_eof", c_past_eof },
    { "st_size_mismatch", c_size },
    { "st_shape_overflow", c_overflow },
    { "st_missing_offsets", c_missing_field },
    { "st_bad_metadata", c_metadata },
    { "st_duplicate_name", c_duplicate },
    { "idx_missing_shard", c_idx_missing_shard },
    { "idx_missing_tensor", c_idx_missing_tensor },
    { "idx_disagrees", c_idx_disagree },
    { "idx_unlisted_tensor", c_idx_unlisted },
    { "idx_invalid_json", c_idx_json },
    { "merge_truncated_shard", c_merge_truncated },
    { "merge_unknown_dtype", c_merge_dtype },
    { "merge_index_missing_shard", c_merge_missing_shard },
    { "merge_shape_mismatch", c_merge_shape },
    { "ok_empty_and_scalar", c_ok_odd },
    { "ok_empty_and_scalar_merge", c_ok_odd_merge },
    { "nan_linear", c_nan_linear },
    { "nan_ties", c_nan_ties },
};

static int gen_recipe_case(const struct recipe_case *rc)
{
    char *d = case_dir(rc->name);
    int r = mkmodel(d, "base", NULL, 1, NULL);
    if (!r)
        r = mkmodel(d, "ft1", "base", 2, NULL);
    if (!r)
        r = mkmodel(d, "ft2", "base", 3, NULL);
    if (!r && rc->text)
        r = recipe(d, "recipe.yml", rc->text);
    if (!r)
        r = write_case(d, rc->desc, rc->cmd, 1, rc->expect,
                       strncmp(rc->cmd, "merge", 5) ? NULL : MERGE_OUT);
    ms_free(d);
    return r;
}

/* ------------------------------------------------------------------ main */

static char *find_mkmodel(const char *argv0)
{
    const char *slash = strrchr(argv0, '/');
    if (slash) {
        char *p = ms_asprintf("%.*s/ms-mkmodel", (int)(slash - argv0), argv0);
        if (p && access(p, X_OK) == 0) {
            if (p[0] != '/') { /* cases run ms-mkmodel from their own directory */
                char *cwd = getcwd(NULL, 0);
                char *abs = cwd ? ms_asprintf("%s/%s", cwd, p) : NULL;
                free(cwd);
                ms_free(p);
                return abs;
            }
            return p;
        }
        ms_free(p);
    }
    return ms_strdup("ms-mkmodel");
}

int main(int argc, char **argv)
{
    int i = 1;
    g_mkmodel = NULL;
    if (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        fputs(usage, stdout);
        return 0;
    }
    if (argc > 2 && !strcmp(argv[1], "--mkmodel")) {
        g_mkmodel = ms_strdup(argv[2]);
        i = 3;
    }
    if (argc - i != 1) {
        fputs(usage, stderr);
        return 2;
    }
    g_out = argv[i];
    if (!g_mkmodel)
        g_mkmodel = find_mkmodel(argv[0]);
    if (!g_mkmodel || (mkdir(g_out, 0755) < 0 && errno != EEXIST)) {
        fprintf(stderr, PROG ": %s: %s\n", g_out, strerror(errno));
        return 1;
    }
    int failed = 0;
    for (size_t k = 0; k < MS_ARRAY_LEN(cases); k++) {
        char *d = case_dir(cases[k].name);
        if (cases[k].fn(d)) {
            fprintf(stderr, PROG ": could not generate case %s\n", cases[k].name);
            failed = 1;
        }
        ms_free(d);
    }
    for (size_t k = 0; k < MS_ARRAY_LEN(recipe_cases); k++) {
        if (gen_recipe_case(&recipe_cases[k])) {
            fprintf(stderr, PROG ": could not generate case %s\n", recipe_cases[k].name);
            failed = 1;
        }
    }
    ms_free(g_mkmodel);
    if (!failed)
        printf("%s: %d cases in %s\n", PROG, g_ncases, g_out);
    return failed;
}
