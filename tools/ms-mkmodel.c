/*
 * ms-mkmodel.c - deterministic synthetic model generator for tests, the demo
 * and the benchmarks (no binary fixtures are committed; they are made here).
 *
 *   ms-mkmodel [--layers N --hidden H ...] OUT_DIR       a fresh Llama-like model
 *   ms-mkmodel --base DIR --noise SIGMA --seed S OUT_DIR  base + N(0, SIGMA) noise
 *
 * Output is a Hugging Face style directory: config.json, tokenizer files,
 * generation_config.json, and model.safetensors or shards plus
 * model.safetensors.index.json, laid out by ms_layout_build exactly as the
 * merge output is.
 *
 * Values come from a counter-based generator: element e of tensor `name` is a
 * function of (seed, hash(name), e) only, computed with IEEE-754 basic
 * operations and sqrt (no libm transcendental functions, whose last bits vary
 * between libraries), so the bytes are identical for the same arguments on
 * every machine, and whatever the chunking.
 *
 * Memory is bounded: each tensor is generated (or read from the base) and
 * written in chunks of CHUNK_ELEMS elements. Files are written under
 * "<name>.tmp" and renamed when complete.
 */
#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_file.h"
#include "ms_safetensors.h"
#include "ms_str.h"

#define PROG "ms-mkmodel"
#define CHUNK_ELEMS ((size_t)1 << 20) /* elements generated per step */
#define INDEX_NAME "model.safetensors.index.json"

static const char usage[] =
    "usage: ms-mkmodel [options] OUT_DIR\n"
    "       ms-mkmodel --base DIR [--noise SIGMA] [--seed S] [options] OUT_DIR\n"
    "\n"
    "Writes a deterministic synthetic Llama-style model (config, tokenizer files and\n"
    "safetensors weights) into OUT_DIR. The same arguments give the same bytes on any\n"
    "machine. Model files already in OUT_DIR are replaced.\n"
    "\n"
    "fresh model:\n"
    "  --layers N          decoder layers (default 2)\n"
    "  --hidden H          hidden size (default 64)\n"
    "  --intermediate I    MLP size (default 176)\n"
    "  --vocab V           vocabulary size, at least 3 (default 256)\n"
    "  --heads A           attention heads (default hidden/64, or 1)\n"
    "  --kv-heads K        key/value heads, divides --heads (default --heads)\n"
    "  --max-position P    max_position_embeddings (default 2048)\n"
    "  --tied              tie lm_head to the embeddings (no lm_head.weight)\n"
    "  --std X             standard deviation of the weights (default 0.02);\n"
    "                      norm weights are 1 + N(0, X)\n"
    "  --size BYTES        pick --layers so the weights total about BYTES; the shape\n"
    "                      options not given then default to a 1B-class model\n"
    "                      (hidden 2048, intermediate 5632, vocab 32000, heads 32,\n"
    "                      kv-heads 4); --size 0 is ignored\n"
    "\n"
    "fine-tune of an existing model:\n"
    "  --base DIR          read DIR (any safetensors model) and write base + noise,\n"
    "                      keeping names, shapes, dtypes, sharding and other files\n"
    "  --noise SIGMA       standard deviation of the noise (default 0.01); tensors\n"
    "                      that are not floating point are copied unchanged\n"
    "\n"
    "both:\n"
    "  --dtype T           bf16 (default), f16 or f32; with --base, converts the\n"
    "                      floating-point tensors\n"
    "  --shard-size BYTES  split into shards of at most BYTES (suffixes K/M/B = 1e3/1e6/1e9,\n"
    "                      KiB/MiB/GiB); 0 writes one file\n"
    "  --seed S            generator seed (default 0)\n"
    "  -h, --help          this text\n";

/* ------------------------------------------------------------------ options */

struct opts {
    uint64_t layers, hidden, inter, vocab, heads, kv_heads, max_pos;
    bool layers_set, hidden_set, inter_set, vocab_set, heads_set, kv_heads_set;
    enum ms_dtype dtype;
    bool dtype_set;
    uint64_t shard_size;
    bool shard_set;
    bool tied;
    uint64_t seed;
    double std;
    const char *base;
    double noise;
    bool noise_set, std_set, arch_set;
    uint64_t size;
    const char *out;
};

static int parse_u64(const char *opt, const char *s, uint64_t *v)
{
    char *end;
    if (!s || *s < '0' || *s > '9')
        return ms_error(MS_EINVAL, "%s: expected a non-negative integer, got '%s'", opt,
                        s ? s : "");
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno || *end)
        return ms_error(MS_EINVAL, "%s: invalid integer '%s'", opt, s);
    *v = x;
    return 0;
}

static int parse_sigma(const char *opt, const char *s, double *v)
{
    char *end;
    if (!s || !*s)
        return ms_error(MS_EINVAL, "%s: expected a number", opt);
    errno = 0;
    double x = strtod(s, &end);
    if (errno || *end || !isfinite(x) || x < 0)
        return ms_error(MS_EINVAL, "%s: expected a finite number >= 0, got '%s'", opt, s);
    *v = x;
    return 0;
}

static int parse_dtype(const char *s, enum ms_dtype *dt)
{
    if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16"))
        *dt = MS_DT_BF16;
    else if (!strcmp(s, "f16") || !strcmp(s, "fp16") || !strcmp(s, "float16"))
        *dt = MS_DT_F16;
    else if (!strcmp(s, "f32") || !strcmp(s, "fp32") || !strcmp(s, "float32"))
        *dt = MS_DT_F32;
    else
        return ms_error(MS_EINVAL, "--dtype: expected bf16, f16 or f32, got '%s'", s);
    return 0;
}

/* Returns 0, 1 for --help, or a negative code (usage error, diagnostic set). */
static int opts_parse(int argc, char **argv, struct opts *o)
{
    *o = (struct opts){ .layers = 2, .hidden = 64, .inter = 176, .vocab = 256,
                        .max_pos = 2048, .dtype = MS_DT_BF16, .std = 0.02, .noise = 0.01 };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            return 1;
        if (a[0] != '-' || !a[1]) {
            if (o->out)
                return ms_error(MS_EINVAL, "unexpected argument '%s' (OUT_DIR is '%s')", a,
                                o->out);
            o->out = a;
            continue;
        }
        if (!strncmp(a, "--tied=", 7))
            return ms_error(MS_EINVAL, "--tied takes no value");
        if (!strcmp(a, "--tied")) {
            o->tied = true;
            o->arch_set = true;
            continue;
        }
        /* Every other option takes a value: "--opt VALUE" or "--opt=VALUE". */
        static const char *const with_value[] = {
            "--layers", "--hidden", "--intermediate", "--vocab", "--heads", "--kv-heads",
            "--max-position", "--dtype", "--shard-size", "--size", "--seed", "--std",
            "--noise", "--base",
        };
        char name[64];
        const char *val;
        const char *eq = strchr(a, '=');
        snprintf(name, sizeof name, "%.*s", eq ? (int)(eq - a) : (int)strlen(a), a);
        bool known = false;
        for (size_t k = 0; k < MS_ARRAY_LEN(with_value) && !known; k++)
            known = !strcmp(name, with_value[k]);
        if (!known)
            return ms_error(MS_EINVAL, "unknown option '%s'", name);
        if (eq) {
            val = eq + 1;
        } else {
            if (i + 1 >= argc)
                return ms_error(MS_EINVAL, "%s: missing value", a);
            val = argv[++i];
        }
        int rc;
        if (!strcmp(name, "--layers")) {
            rc = parse_u64(name, val, &o->layers);
            o->layers_set = o->arch_set = true;
        } else if (!strcmp(name, "--hidden")) {
            rc = parse_u64(name, val, &o->hidden);
            o->hidden_set = o->arch_set = true;
        } else if (!strcmp(name, "--intermediate")) {
            rc = parse_u64(name, val, &o->inter);
            o->inter_set = o->arch_set = true;
        } else if (!strcmp(name, "--vocab")) {
            rc = parse_u64(name, val, &o->vocab);
            o->vocab_set = o->arch_set = true;
        } else if (!strcmp(name, "--heads")) {
            rc = parse_u64(name, val, &o->heads);
            o->heads_set = o->arch_set = true;
        } else if (!strcmp(name, "--kv-heads")) {
            rc = parse_u64(name, val, &o->kv_heads);
            o->kv_heads_set = o->arch_set = true;
        } else if (!strcmp(name, "--max-position")) {
            rc = parse_u64(name, val, &o->max_pos);
            o->arch_set = true;
        } else if (!strcmp(name, "--dtype")) {
            rc = parse_dtype(val, &o->dtype);
            o->dtype_set = true;
        } else if (!strcmp(name, "--shard-size")) {
            rc = ms_parse_size(val, false, &o->shard_size);
            if (rc)
                ms_error_prefix(rc, "--shard-size");
            o->shard_set = true;
        } else if (!strcmp(name, "--size")) {
            rc = ms_parse_size(val, false, &o->size);
            if (rc)
                ms_error_prefix(rc, "--size");
        } else if (!strcmp(name, "--seed")) {
            rc = parse_u64(name, val, &o->seed);
        } else if (!strcmp(name, "--std")) {
            rc = parse_sigma(name, val, &o->std);
            o->std_set = true;
        } else if (!strcmp(name, "--noise")) {
            rc = parse_sigma(name, val, &o->noise);
            o->noise_set = true;
        } else {
            assert(!strcmp(name, "--base"));
            o->base = val;
            rc = 0;
        }
        if (rc)
            return rc;
    }
    if (!o->out)
        return ms_error(MS_EINVAL, "missing OUT_DIR");
    if (o->base) {
        if (o->arch_set || o->std_set || o->size)
            return ms_error(MS_EINVAL, "--base takes its shapes from the base model; "
                                       "--layers/--hidden/--intermediate/--vocab/--heads/"
                                       "--kv-heads/--max-position/--tied/--std/--size "
                                       "do not apply");
        return 0;
    }
    if (o->noise_set)
        return ms_error(MS_EINVAL, "--noise needs --base");
    if (o->size && o->layers_set)
        return ms_error(MS_EINVAL, "give --size or --layers, not both");
    if (o->size) {
        /* Benchmark-sized models get realistic tensor shapes (TinyLlama's). */
        if (!o->hidden_set)
            o->hidden = 2048;
        if (!o->inter_set)
            o->inter = 5632;
        if (!o->vocab_set)
            o->vocab = 32000;
        if (!o->heads_set && !o->hidden_set) {
            o->heads = 32;
            o->heads_set = true;
            if (!o->kv_heads_set) {
                o->kv_heads = 4;
                o->kv_heads_set = true;
            }
        }
    }
    if (!o->hidden || !o->inter)
        return ms_error(MS_EINVAL, "--hidden and --intermediate must be at least 1");
    if (o->vocab < 3)
        return ms_error(MS_EINVAL, "--vocab must be at least 3 (the special tokens)");
    if (!o->heads_set)
        o->heads = o->hidden % 64 == 0 ? o->hidden / 64 : 1;
    if (!o->heads || o->hidden % o->heads)
        return ms_error(MS_EINVAL, "--heads %" PRIu64 " does not divide --hidden %" PRIu64,
                        o->heads, o->hidden);
    if (!o->kv_heads_set)
        o->kv_heads = o->heads;
    if (!o->kv_heads || o->heads % o->kv_heads)
        return ms_error(MS_EINVAL, "--kv-heads %" PRIu64 " does not divide --heads %" PRIu64,
                        o->kv_heads, o->heads);
    if (!o->size && !o->layers)
        return ms_error(MS_EINVAL, "--layers must be at least 1");
    return 0;
}

/* ------------------------------------------------------------------ values */

/* splitmix64's output function: a bijective 64-bit mixer. */
static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

#define GOLDEN 0x9e3779b97f4a7c15ull
#define NOISE_DOMAIN 0x6e6f697365ull /* keeps --base noise apart from fresh values */

/* 64-bit FNV-1a of a tensor name. */
static uint64_t name_hash(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

/* The stream of one tensor: a splitmix64 state; draw(stream, c) is the c-th output. */
static uint64_t stream_of(uint64_t seed, uint64_t key) { return mix64(seed * GOLDEN + mix64(key)); }
static uint64_t draw(uint64_t stream, uint64_t c) { return mix64(stream + (c + 1) * GOLDEN); }

/*
 * ln(x) for x > 0 finite, from + - * / only: x = m * 2^e with m in
 * [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s) with s = (m - 1) / (m + 1) summed as
 * its odd series (|s| < 0.172; the terms kept bring the error near 1 ulp).
 */
static double det_log(double x)
{
    int e;
    double m = frexp(x, &e); /* exact */
    if (m < 0x1.6a09e667f3bcdp-1) {
        m *= 2;
        e--;
    }
    static const double c[12] = { 1.0,       1.0 / 3,  1.0 / 5,  1.0 / 7,
                                  1.0 / 9,   1.0 / 11, 1.0 / 13, 1.0 / 15,
                                  1.0 / 17,  1.0 / 19, 1.0 / 21, 1.0 / 23 };
    double s = (m - 1) / (m + 1), s2 = s * s;
    double p = c[11];
    for (int k = 10; k >= 0; k--)
        p = p * s2 + c[k];
    return 2 * s * p + e * 0x1.62e42fefa39efp-1;
}

/* Taylor coefficients (-1)^k / n!: sine odd n = 3..23, cosine even n = 2..22.
 * The divisions are folded at compile time (correctly rounded, so the same
 * everywhere). */
#define F(n) (1.0 / (n))
static const double sin_c[11] = {
    -F(6.0), F(120.0), -F(5040.0), F(362880.0), -F(39916800.0), F(6227020800.0),
    -F(1307674368000.0), F(355687428096000.0), -F(121645100408832000.0),
    F(51090942171709440000.0), -F(25852016738884976640000.0),
};
static const double cos_c[11] = {
    -F(2.0), F(24.0), -F(720.0), F(40320.0), -F(3628800.0), F(479001600.0),
    -F(87178291200.0), F(20922789888000.0), -F(6402373705728000.0),
    F(2432902008176640000.0), -F(1124000727777607680000.0),
};
#undef F

/* cos and sin of 2*pi*u for u in [0, 1): quadrant from 4u (exact), then the
 * Taylor series (Horner) on the remaining angle in [0, pi/2). */
static void det_sincos_turn(double u, double *c, double *s)
{
    double t = u * 4;
    int q = (int)t;
    double a = (t - q) * 0x1.921fb54442d18p0, a2 = a * a;
    double sp = sin_c[10], cp = cos_c[10];
    for (int k = 9; k >= 0; k--) {
        sp = sp * a2 + sin_c[k];
        cp = cp * a2 + cos_c[k];
    }
    double sn = a + a * a2 * sp, cs = 1 + a2 * cp;
    switch (q & 3) {
    case 0: *c = cs; *s = sn; break;
    case 1: *c = -sn; *s = cs; break;
    case 2: *c = -cs; *s = -sn; break;
    default: *c = sn; *s = -cs; break;
    }
}

/* Box-Muller: the standard normal pair number `pair` of a stream. */
static void normal_pair(uint64_t stream, uint64_t pair, double *z0, double *z1)
{
    double u1 = (double)((draw(stream, 2 * pair) >> 11) + 1) * 0x1p-53; /* (0, 1] */
    double u2 = (double)(draw(stream, 2 * pair + 1) >> 11) * 0x1p-53;   /* [0, 1) */
    double r = sqrt(-2 * det_log(u1));
    double c, s;
    det_sincos_turn(u2, &c, &s);
    *z0 = r * c;
    *z1 = r * s;
}

/*
 * out[i] = (float)(center_i + sigma * z(first + i)) for i < n, where center_i
 * is base[i] when base is non-NULL and `mean` otherwise, and z(e) is element
 * e's standard normal (pair e/2, first or second member).
 */
static void gaussian_chunk(uint64_t stream, uint64_t first, size_t n, double mean, double sigma,
                           const float *base, float *out)
{
    size_t i = 0;
    while (i < n) {
        uint64_t e = first + i;
        double z[2];
        normal_pair(stream, e >> 1, &z[0], &z[1]);
        for (unsigned k = (unsigned)(e & 1); k < 2 && i < n; k++, i++) {
            double c = base ? (double)base[i] : mean;
            out[i] = (float)(c + sigma * z[k]);
        }
    }
}

/*
 * gaussian_chunk split over up to nthreads threads (fork-join per call). Each
 * element depends only on its index, so the result is the same for any split.
 */
#define MAX_THREADS 16
#define MIN_PER_THREAD 65536 /* smaller ranges are not worth a thread */

struct gauss_part {
    uint64_t stream, first;
    size_t n;
    double mean, sigma;
    const float *base;
    float *out;
};

static void *gauss_part_run(void *arg)
{
    const struct gauss_part *p = arg;
    gaussian_chunk(p->stream, p->first, p->n, p->mean, p->sigma, p->base, p->out);
    return NULL;
}

static void gaussian_chunk_par(unsigned nthreads, uint64_t stream, uint64_t first, size_t n,
                               double mean, double sigma, const float *base, float *out)
{
    struct gauss_part part[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    bool started[MAX_THREADS] = { false };
    size_t nparts = MS_MIN((size_t)nthreads, n / MIN_PER_THREAD);
    nparts = MS_MAX(nparts, 1);
    size_t per = (n + nparts - 1) / nparts;
    per += per & 1; /* keep parts on pair boundaries: no normal pair computed twice */
    for (size_t k = 0; k < nparts; k++) {
        size_t lo = MS_MIN(k * per, n), hi = MS_MIN(lo + per, n);
        part[k] = (struct gauss_part){ stream, first + lo, hi - lo, mean, sigma,
                                       base ? base + lo : NULL, out + lo };
        /* Part 0 runs on this thread; a failed thread start runs inline too. */
        if (k > 0 && pthread_create(&tid[k], NULL, gauss_part_run, &part[k]) == 0)
            started[k] = true;
    }
    for (size_t k = 0; k < nparts; k++)
        if (!started[k])
            gauss_part_run(&part[k]);
    for (size_t k = 1; k < nparts; k++)
        if (started[k])
            pthread_join(tid[k], NULL);
}

/* ------------------------------------------------------------------ files */

static char *path_join(const char *dir, const char *name)
{
    return ms_asprintf("%s/%s", dir, name);
}

static int write_all(int fd, const void *buf, size_t len, const char *path)
{
    const char *p = buf;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return ms_error(-errno, "%s: write failed: %s", path, strerror(errno));
        if (w == 0)
            return ms_error(MS_EIO, "%s: write made no progress", path);
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

static int read_at(int fd, void *buf, size_t len, uint64_t off, const char *path)
{
    char *p = buf;
    while (len) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return ms_error(-errno, "%s: read failed: %s", path, strerror(errno));
        if (r == 0)
            return ms_error(MS_EIO, "%s: unexpected end of file at byte %" PRIu64, path, off);
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* Writes a NUL-terminated text file atomically. */
static int write_text(const char *dir, const char *name, const char *text)
{
    char *p = path_join(dir, name);
    if (!p)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = ms_write_file_atomic(p, text, strlen(text));
    ms_free(p);
    return rc;
}

/* True for the files a model of ours consists of (and their temporaries). */
static bool is_model_file(const char *n)
{
    size_t len = strlen(n);
    const char *t = len > 4 && !strcmp(n + len - 4, ".tmp") ? n + len - 4 : n + len;
    size_t base_len = (size_t)(t - n);
    if (!strncmp(n, INDEX_NAME, base_len) && base_len == strlen(INDEX_NAME))
        return true;
    static const char ext[] = ".safetensors";
    return base_len > sizeof ext - 1 && !strncmp(n, "model", 5) &&
           !strncmp(t - (sizeof ext - 1), ext, sizeof ext - 1);
}

/* Creates dir if needed and removes model files of an earlier run from it, so
 * that a stale index or shard cannot be mistaken for part of the new model. */
static int outdir_prepare(const char *dir)
{
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        return ms_error(-errno, "%s: cannot create directory: %s", dir, strerror(errno));
    DIR *d = opendir(dir);
    if (!d)
        return ms_error(-errno, "%s: %s", dir, strerror(errno));
    int rc = 0;
    struct dirent *de;
    while (!rc && (de = readdir(d))) {
        if (!is_model_file(de->d_name))
            continue;
        char *p = path_join(dir, de->d_name);
        if (!p)
            rc = ms_error(MS_ENOMEM, "out of memory");
        else if (unlink(p) < 0 && errno != ENOENT)
            rc = ms_error(-errno, "%s: cannot remove: %s", p, strerror(errno));
        ms_free(p);
    }
    closedir(d);
    return rc;
}

/* ------------------------------------------------------------------ tensors */

enum src_kind {
    SRC_NORMAL,     /* fresh: N(0, std) */
    SRC_NORM,       /* fresh: 1 + N(0, std), for norm weights */
    SRC_BASE_NOISE, /* base float tensor + N(0, noise) */
    SRC_BASE_COPY,  /* base tensor copied byte for byte */
};

/* Where one output tensor's values come from; parallel to the layout's tensors. */
struct src {
    enum src_kind kind;
    uint64_t stream;
    const struct ms_st_tensor *bt; /* base tensor (SRC_BASE_*), borrowed from the model */
    uint32_t bshard;
};

struct gen {
    const struct opts *o;
    struct ms_model *base;
    int *base_fds;            /* one per base shard, -1 when closed */
    size_t n;                 /* tensors */
    struct ms_out_tensor *t;  /* save order */
    struct src *src;
    char **names;             /* owned names of a fresh model */
    struct ms_layout *layout;
    float *fbuf;              /* CHUNK_ELEMS floats */
    unsigned char *raw;       /* CHUNK_ELEMS * 8 bytes */
    unsigned nthreads;        /* generator threads, 1..MAX_THREADS */
};

static int cmp_name(const void *a, const void *b)
{
    const struct ms_out_tensor *x = a, *y = b;
    return strcmp(x->name, y->name);
}

static int add_tensor(struct gen *g, size_t cap, char *name, uint32_t ndim, uint64_t d0,
                      uint64_t d1)
{
    assert(g->n < cap);
    if (!name)
        return ms_error(MS_ENOMEM, "out of memory");
    g->names[g->n] = name;
    struct ms_out_tensor *t = &g->t[g->n];
    uint64_t numel;
    memset(t, 0, sizeof *t);
    t->name = name;
    t->dtype = g->o->dtype;
    t->ndim = ndim;
    t->shape[0] = (int64_t)d0;
    t->shape[1] = (int64_t)d1;
    if (d0 > INT64_MAX || d1 > INT64_MAX || !ms_shape_numel(t->shape, ndim, &numel) ||
        numel > UINT64_MAX / 8) {
        int rc = ms_error(MS_EINVAL, "%s: shape too large", name);
        ms_free(name);
        g->names[g->n] = NULL;
        return rc;
    }
    t->nbytes = numel * (ms_dtype_bits(t->dtype) / 8);
    g->n++;
    return 0;
}

/* Bytes of the weights of a fresh model with the given layer count (saturating). */
static uint64_t fresh_bytes(const struct opts *o, uint64_t layers)
{
    long double esz = ms_dtype_bits(o->dtype) / 8;
    long double h = o->hidden, in = o->inter, v = o->vocab;
    long double kv = (long double)o->kv_heads * (o->hidden / o->heads);
    long double fixed = v * h * (o->tied ? 1 : 2) + h;
    long double layer = 2 * h + 2 * h * h + 2 * kv * h + 3 * h * in;
    long double total = (fixed + layer * layers) * esz;
    return total >= 0x1p63L ? UINT64_MAX : (uint64_t)total;
}

/* Lists a fresh model's tensors in save order (byte order of names, as
 * mergekit saves a Llama). */
static int plan_fresh(struct gen *g)
{
    const struct opts *o = g->o;
    uint64_t h = o->hidden, kv = o->kv_heads * (o->hidden / o->heads);
    size_t cap = 9 * (size_t)o->layers + 3;
    int rc = 0;

    if (o->layers > (SIZE_MAX / sizeof(struct ms_out_tensor) - 3) / 9)
        return ms_error(MS_EINVAL, "--layers %" PRIu64 " is too large", o->layers);
    g->t = ms_calloc(cap, sizeof *g->t);
    g->src = ms_calloc(cap, sizeof *g->src);
    g->names = ms_calloc(cap, sizeof *g->names);
    if (!g->t || !g->src || !g->names)
        return ms_error(MS_ENOMEM, "out of memory");

    rc = add_tensor(g, cap, ms_strdup("model.embed_tokens.weight"), 2, o->vocab, h);
    for (uint64_t i = 0; !rc && i < o->layers; i++) {
        static const struct {
            const char *suffix;
            int rows, cols; /* 0 hidden, 1 kv dim, 2 intermediate, -1 none (1-D) */
        } w[] = {
            { "input_layernorm.weight", 0, -1 },     { "post_attention_layernorm.weight", 0, -1 },
            { "self_attn.q_proj.weight", 0, 0 },     { "self_attn.k_proj.weight", 1, 0 },
            { "self_attn.v_proj.weight", 1, 0 },     { "self_attn.o_proj.weight", 0, 0 },
            { "mlp.gate_proj.weight", 2, 0 },        { "mlp.up_proj.weight", 2, 0 },
            { "mlp.down_proj.weight", 0, 2 },
        };
        for (size_t k = 0; !rc && k < MS_ARRAY_LEN(w); k++) {
            uint64_t dims[3] = { h, kv, o->inter };
            char *name = ms_asprintf("model.layers.%" PRIu64 ".%s", i, w[k].suffix);
            if (w[k].cols < 0)
                rc = add_tensor(g, cap, name, 1, dims[w[k].rows], 0);
            else
                rc = add_tensor(g, cap, name, 2, dims[w[k].rows], dims[w[k].cols]);
        }
    }
    if (!rc)
        rc = add_tensor(g, cap, ms_strdup("model.norm.weight"), 1, h, 0);
    if (!rc && !o->tied)
        rc = add_tensor(g, cap, ms_strdup("lm_head.weight"), 2, o->vocab, h);
    if (rc)
        return rc;

    /* Sorting moves the descriptors; names stay owned through g->names. */
    qsort(g->t, g->n, sizeof *g->t, cmp_name);
    for (size_t i = 0; i < g->n; i++) {
        size_t len = strlen(g->t[i].name);
        bool norm = len >= 11 && !strcmp(g->t[i].name + len - 11, "norm.weight");
        g->src[i].kind = norm ? SRC_NORM : SRC_NORMAL;
        g->src[i].stream = stream_of(o->seed, name_hash(g->t[i].name));
    }
    return 0;
}

/*
 * The greedy size limit that splits the output exactly where the base's shards
 * split (the base's tensors in shard order): at least every multi-tensor shard's
 * bytes, and less than any shard plus the first tensor of the next. Returns 0
 * for a single-file base. If no limit reproduces the base (it was not split
 * greedily), the lower bound is used and a note printed.
 */
static uint64_t base_shard_limit(const struct gen *g)
{
    const struct ms_model *m = g->base;
    if (m->nshards < 2)
        return 0;
    uint64_t lo = 1, hi = UINT64_MAX, cur = 0, count = 0;
    uint32_t shard = 0;
    for (size_t i = 0; i < g->n; i++) {
        if (g->src[i].bshard != shard) {
            if (count > 1)
                lo = MS_MAX(lo, cur);
            hi = MS_MIN(hi, cur + g->t[i].nbytes - 1);
            shard = g->src[i].bshard;
            cur = 0;
            count = 0;
        }
        cur += g->t[i].nbytes;
        count++;
    }
    if (count > 1)
        lo = MS_MAX(lo, cur);
    if (lo > hi)
        fprintf(stderr, PROG ": note: the base's sharding is not a greedy split by size; "
                        "using --shard-size %" PRIu64 "\n", lo);
    return lo;
}

/* Lists the base model's tensors in its shard and file order. */
static int plan_base(struct gen *g)
{
    const struct opts *o = g->o;
    struct ms_model *m = g->base;
    size_t n = m->ntensors;

    g->t = ms_calloc(n ? n : 1, sizeof *g->t);
    g->src = ms_calloc(n ? n : 1, sizeof *g->src);
    g->base_fds = ms_malloc(m->nshards * sizeof *g->base_fds);
    if (!g->t || !g->src || !g->base_fds)
        return ms_error(MS_ENOMEM, "out of memory");
    for (size_t s = 0; s < m->nshards; s++)
        g->base_fds[s] = -1;
    for (size_t i = 0; i < n; i++) {
        uint32_t shard;
        const struct ms_st_tensor *bt = ms_model_tensor_at(m, i, &shard);
        assert(bt);
        struct ms_out_tensor *t = &g->t[i];
        struct src *s = &g->src[i];
        t->name = bt->name;
        t->dtype = bt->dtype;
        t->ndim = bt->ndim;
        memcpy(t->shape, bt->shape, sizeof t->shape);
        s->bt = bt;
        s->bshard = shard;
        if (ms_dtype_is_float(bt->dtype)) {
            s->kind = SRC_BASE_NOISE;
            s->stream = stream_of(o->seed, name_hash(bt->name) ^ NOISE_DOMAIN);
            if (o->dtype_set)
                t->dtype = o->dtype;
            t->nbytes = bt->numel * (ms_dtype_bits(t->dtype) / 8);
        } else {
            s->kind = SRC_BASE_COPY;
            t->nbytes = bt->end - bt->begin;
        }
    }
    g->n = n;
    for (size_t s = 0; s < m->nshards; s++) {
        const char *p = m->shards[s]->path;
        g->base_fds[s] = open(p, O_RDONLY | O_CLOEXEC);
        if (g->base_fds[s] < 0)
            return ms_error(-errno, "%s: %s", p, strerror(errno));
    }
    return 0;
}

/* Streams one tensor's data to fd in chunks. */
static int write_tensor(struct gen *g, size_t i, int fd, const char *path)
{
    const struct ms_out_tensor *t = &g->t[i];
    const struct src *s = &g->src[i];
    int rc = 0;

    if (s->kind == SRC_BASE_COPY) {
        int bfd = g->base_fds[s->bshard];
        const struct ms_st_file *f = g->base->shards[s->bshard];
        uint64_t off = f->data_start + s->bt->begin, left = t->nbytes;
        while (!rc && left) {
            size_t len = (size_t)MS_MIN(left, CHUNK_ELEMS * 8);
            rc = read_at(bfd, g->raw, len, off, f->path);
            if (!rc)
                rc = write_all(fd, g->raw, len, path);
            off += len;
            left -= len;
        }
        return rc;
    }

    size_t out_esz = ms_dtype_bits(t->dtype) / 8;
    uint64_t numel = t->nbytes / out_esz;
    for (uint64_t first = 0; !rc && first < numel; first += CHUNK_ELEMS) {
        size_t cnt = (size_t)MS_MIN(numel - first, CHUNK_ELEMS);
        switch (s->kind) {
        case SRC_NORMAL:
            gaussian_chunk_par(g->nthreads, s->stream, first, cnt, 0.0, g->o->std, NULL, g->fbuf);
            break;
        case SRC_NORM:
            gaussian_chunk_par(g->nthreads, s->stream, first, cnt, 1.0, g->o->std, NULL, g->fbuf);
            break;
        case SRC_BASE_NOISE: {
            const struct ms_st_file *f = g->base->shards[s->bshard];
            size_t in_esz = ms_dtype_bits(s->bt->dtype) / 8;
            rc = read_at(g->base_fds[s->bshard], g->raw, cnt * in_esz,
                         f->data_start + s->bt->begin + first * in_esz, f->path);
            if (rc)
                break;
            ms_dtype_decode(s->bt->dtype, g->raw, g->fbuf, cnt);
            gaussian_chunk_par(g->nthreads, s->stream, first, cnt, 0.0, g->o->noise, g->fbuf,
                               g->fbuf);
            break;
        }
        default:
            assert(!"unreachable");
        }
        if (rc)
            break;
        ms_dtype_encode(t->dtype, g->fbuf, g->raw, cnt);
        rc = write_all(fd, g->raw, cnt * out_esz, path);
    }
    return rc;
}

/* Writes shard s as "<file>.tmp", then syncs and renames it into place. */
static int write_shard(struct gen *g, size_t s)
{
    const struct ms_out_shard *sh = &g->layout->shards[s];
    char *path = path_join(g->o->out, sh->file_name);
    char *tmp = ms_asprintf("%s/%s.tmp", g->o->out, sh->file_name);
    int fd = -1, rc = 0;

    if (!path || !tmp) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    fd = ms_file_create(tmp, 0644);
    if (fd < 0) {
        rc = ms_error(fd, "%s: cannot create: %s", tmp, strerror(-fd));
        goto out;
    }
    rc = write_all(fd, sh->header, (size_t)sh->header_bytes, path);
    for (size_t k = 0; !rc && k < sh->ntensors; k++) {
        rc = write_tensor(g, sh->order[k], fd, path);
        if (rc)
            ms_error_prefix(rc, "%s", g->t[sh->order[k]].name);
    }
    if (rc)
        close(fd);
    else
        rc = ms_file_commit(fd, tmp, path, NULL, NULL);

out:
    if (rc && tmp)
        unlink(tmp);
    ms_free(path);
    ms_free(tmp);
    return rc;
}

/* ------------------------------------------------------------------ side files */

static const char *torch_dtype_name(enum ms_dtype dt)
{
    switch (dt) {
    case MS_DT_BF16: return "bfloat16";
    case MS_DT_F16: return "float16";
    default: return "float32";
    }
}

/* config.json, generation_config.json and a small but valid tokenizer (a
 * WordLevel model with one token per embedding row). */
static int write_side_files_fresh(const struct opts *o)
{
    struct ms_strbuf b = { 0 };
    char std_text[32];
    int rc = 0;

    /* The shortest decimal that reads back as --std, as Python prints floats. */
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(std_text, sizeof std_text, "%.*g", prec, o->std);
        if (strtod(std_text, NULL) == o->std)
            break;
    }

    ms_strbuf_addf(&b,
                   "{\n"
                   "  \"architectures\": [\n    \"LlamaForCausalLM\"\n  ],\n"
                   "  \"attention_bias\": false,\n"
                   "  \"attention_dropout\": 0.0,\n"
                   "  \"bos_token_id\": 1,\n"
                   "  \"eos_token_id\": 2,\n"
                   "  \"head_dim\": %" PRIu64 ",\n"
                   "  \"hidden_act\": \"silu\",\n"
                   "  \"hidden_size\": %" PRIu64 ",\n"
                   "  \"initializer_range\": %s,\n"
                   "  \"intermediate_size\": %" PRIu64 ",\n"
                   "  \"max_position_embeddings\": %" PRIu64 ",\n"
                   "  \"mlp_bias\": false,\n"
                   "  \"model_type\": \"llama\",\n"
                   "  \"num_attention_heads\": %" PRIu64 ",\n"
                   "  \"num_hidden_layers\": %" PRIu64 ",\n"
                   "  \"num_key_value_heads\": %" PRIu64 ",\n"
                   "  \"pretraining_tp\": 1,\n"
                   "  \"rms_norm_eps\": 1e-05,\n"
                   "  \"rope_scaling\": null,\n"
                   "  \"rope_theta\": 10000.0,\n"
                   "  \"tie_word_embeddings\": %s,\n"
                   "  \"torch_dtype\": \"%s\",\n"
                   "  \"use_cache\": true,\n"
                   "  \"vocab_size\": %" PRIu64 "\n"
                   "}\n",
                   o->hidden / o->heads, o->hidden, std_text, o->inter, o->max_pos, o->heads,
                   o->layers, o->kv_heads, o->tied ? "true" : "false", torch_dtype_name(o->dtype),
                   o->vocab);
    if (b.oom) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    rc = write_text(o->out, "config.json", b.p);
    if (rc)
        goto out;

    rc = write_text(o->out, "generation_config.json",
                    "{\n  \"_from_model_config\": true,\n  \"bos_token_id\": 1,\n"
                    "  \"eos_token_id\": 2\n}\n");
    if (!rc)
        rc = write_text(o->out, "special_tokens_map.json",
                        "{\n  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\",\n"
                        "  \"unk_token\": \"<unk>\"\n}\n");
    if (rc)
        goto out;
    ms_strbuf_reset(&b);
    ms_strbuf_addf(&b,
                   "{\n"
                   "  \"add_bos_token\": true,\n"
                   "  \"add_eos_token\": false,\n"
                   "  \"bos_token\": \"<s>\",\n"
                   "  \"clean_up_tokenization_spaces\": false,\n"
                   "  \"eos_token\": \"</s>\",\n"
                   "  \"model_max_length\": %" PRIu64 ",\n"
                   "  \"pad_token\": null,\n"
                   "  \"tokenizer_class\": \"PreTrainedTokenizerFast\",\n"
                   "  \"unk_token\": \"<unk>\"\n"
                   "}\n",
                   o->max_pos);
    if (b.oom) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    rc = write_text(o->out, "tokenizer_config.json", b.p);
    if (rc)
        goto out;

    static const char *const special[3] = { "<unk>", "<s>", "</s>" };
    ms_strbuf_reset(&b);
    ms_strbuf_addf(&b, "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n"
                       "  \"added_tokens\": [");
    for (int i = 0; i < 3; i++)
        ms_strbuf_addf(&b,
                       "%s\n    {\n      \"id\": %d,\n      \"content\": \"%s\",\n"
                       "      \"single_word\": false,\n      \"lstrip\": false,\n"
                       "      \"rstrip\": false,\n      \"normalized\": false,\n"
                       "      \"special\": true\n    }",
                       i ? "," : "", i, special[i]);
    ms_strbuf_addf(&b, "\n  ],\n  \"normalizer\": null,\n"
                       "  \"pre_tokenizer\": {\n    \"type\": \"Whitespace\"\n  },\n"
                       "  \"post_processor\": null,\n  \"decoder\": null,\n"
                       "  \"model\": {\n    \"type\": \"WordLevel\",\n    \"vocab\": {");
    for (uint64_t i = 0; i < o->vocab; i++) {
        if (i < 3)
            ms_strbuf_addf(&b, "%s\n      \"%s\": %" PRIu64, i ? "," : "", special[i], i);
        else
            ms_strbuf_addf(&b, ",\n      \"tok%" PRIu64 "\": %" PRIu64, i, i);
    }
    ms_strbuf_addf(&b, "\n    },\n    \"unk_token\": \"<unk>\"\n  }\n}\n");
    if (b.oom) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    rc = write_text(o->out, "tokenizer.json", b.p);

out:
    ms_strbuf_fini(&b);
    return rc;
}

/* Copies one file of the base model to OUT_DIR if it exists; with --dtype, the
 * config's torch_dtype (and "dtype", as transformers v5 writes it) follow. */
static int copy_side_file(const struct opts *o, const char *name)
{
    char *src = path_join(o->base, name);
    char *dst = path_join(o->out, name);
    char *data = NULL, *patched = NULL; /* patched: jansson's allocator (free) */
    json_t *root = NULL;
    size_t len = 0;
    int rc = 0;

    if (!src || !dst) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    if (access(src, F_OK) < 0)
        goto out;
    rc = ms_read_file(src, &data, &len);
    if (rc)
        goto out;
    if (!o->dtype_set || strcmp(name, "config.json")) {
        rc = ms_write_file_atomic(dst, data, len);
        goto out;
    }
    json_error_t err;
    root = json_loadb(data, len, 0, &err);
    if (!json_is_object(root)) {
        rc = ms_error(MS_EMODEL, "%s:%d:%d: %s", src, err.line, err.column,
                      root ? "not a JSON object" : err.text);
        goto out;
    }
    const char *dn = torch_dtype_name(o->dtype);
    if (json_object_get(root, "dtype"))
        json_object_set_new(root, "dtype", json_string(dn));
    if (json_object_get(root, "torch_dtype") || !json_object_get(root, "dtype"))
        json_object_set_new(root, "torch_dtype", json_string(dn));
    patched = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (!patched) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    rc = ms_write_file_atomic(dst, patched, strlen(patched));

out:
    json_decref(root);
    free(patched);
    ms_free(data);
    ms_free(src);
    ms_free(dst);
    return rc;
}

/* Copies the base's config and tokenizer files that exist. */
static int write_side_files_base(const struct opts *o)
{
    static const char *const files[] = {
        "config.json", "generation_config.json", "tokenizer_config.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "added_tokens.json",
        "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    };
    int rc = 0;
    for (size_t i = 0; !rc && i < MS_ARRAY_LEN(files); i++)
        rc = copy_side_file(o, files[i]);
    return rc;
}

/* ------------------------------------------------------------------ main */

static int same_dir(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) < 0 || stat(b, &sb) < 0)
        return 0;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static int run(const struct opts *cli)
{
    struct opts o = *cli;
    struct gen g = { .o = &o };
    int rc = 0;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    g.nthreads = (unsigned)MS_MAX(1, MS_MIN(cpus, MAX_THREADS));

    if (o.base) {
        rc = ms_model_open(o.base, &g.base);
        if (rc)
            goto out;
        if (same_dir(o.base, o.out) || !strcmp(o.base, o.out)) {
            rc = ms_error(MS_EINVAL, "%s: OUT_DIR must differ from --base", o.out);
            goto out;
        }
        rc = plan_base(&g);
        if (rc)
            goto out;
        if (!o.shard_set)
            o.shard_size = base_shard_limit(&g);
    } else {
        if (o.size) {
            /* The layer count whose total is nearest the target, at least 1. */
            uint64_t l0 = fresh_bytes(&o, 0), l1 = fresh_bytes(&o, 1) - l0;
            if (!l1 || l0 == UINT64_MAX) {
                rc = ms_error(MS_EINVAL, "--size: the fixed tensors are too large");
                goto out;
            }
            o.layers = o.size > l0 ? (o.size - l0 + l1 / 2) / l1 : 0;
            o.layers = MS_MAX(o.layers, 1);
        }
        rc = plan_fresh(&g);
        if (rc)
            goto out;
    }

    rc = ms_layout_build(g.t, g.n, o.shard_size, &g.layout);
    if (rc)
        goto out;
    g.fbuf = ms_aligned_alloc(CHUNK_ELEMS * sizeof(float));
    g.raw = ms_aligned_alloc(CHUNK_ELEMS * 8);
    if (!g.fbuf || !g.raw) {
        rc = ms_error(MS_ENOMEM, "out of memory for the chunk buffers");
        goto out;
    }
    rc = outdir_prepare(o.out);
    for (size_t s = 0; !rc && s < g.layout->nshards; s++)
        rc = write_shard(&g, s);
    if (!rc && g.layout->nshards > 1) {
        char *json = NULL, *p = path_join(o.out, INDEX_NAME);
        size_t len = 0;
        rc = p ? ms_layout_index_json(g.layout, &json, &len) : ms_error(MS_ENOMEM, "out of memory");
        if (!rc)
            rc = ms_write_file_atomic(p, json, len);
        ms_free(json);
        ms_free(p);
    }
    if (!rc)
        rc = o.base ? write_side_files_base(&o) : write_side_files_fresh(&o);
    if (!rc)
        printf("%s: %zu tensors, %" PRIu64 " bytes, %zu file%s\n", o.out, g.n,
               g.layout->total_bytes, g.layout->nshards, g.layout->nshards > 1 ? "s" : "");

out:
    if (g.base_fds)
        for (size_t s = 0; s < g.base->nshards; s++)
            if (g.base_fds[s] >= 0)
                close(g.base_fds[s]);
    if (g.names)
        for (size_t i = 0; i < g.n; i++)
            ms_free(g.names[i]);
    ms_free(g.names);
    ms_free(g.base_fds);
    ms_free(g.t);
    ms_free(g.src);
    ms_layout_free(g.layout);
    ms_aligned_free(g.fbuf);
    ms_aligned_free(g.raw);
    ms_model_free(g.base);
    return rc;
}

int main(int argc, char **argv)
{
    struct opts o;
    int rc = opts_parse(argc, argv, &o);
    if (rc == 1) {
        fputs(usage, stdout);
        return 0;
    }
    if (rc < 0) {
        fprintf(stderr, PROG ": %s (see --help)\n", ms_errmsg());
        return 2;
    }
    rc = run(&o);
    if (rc < 0) {
        const char *m = ms_errmsg();
        fprintf(stderr, PROG ": %s\n", m[0] ? m : ms_strerror(rc));
        return 1;
    }
    return 0;
}
