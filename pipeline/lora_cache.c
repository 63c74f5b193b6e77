/*
 * lora_cache.c - --lora-merge-cache DIR: the folded model of a `model+lora`
 * reference written as a normal model directory, reused by later runs.
 *
 * Folder name as mergekit's (common.py ModelReference.merged):
 * "<basename(model)>_<crc32(model[@rev])>_<basename(lora)>_<crc32(lora[@rev])>".
 * Contents: the model's tensors, folded (ms_lora.h) and stored in the dtype the
 * fold gives them (shards and index laid out as a merge output at 5B per shard),
 * config.json (its dtype set to --lora-merge-dtype when given) and the model's
 * other small files (tokenizer, generation config), each written under a
 * temporary name and renamed. The marker file MARKER, written last, holds the
 * --lora-merge-dtype it was made with: a folder without it, or made with another
 * dtype, is written again. Memory: one chunk of CHUNK elements plus one tensor's
 * A and B, which the merge's budget already holds twice.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_file.h"
#include "ms_plan.h"
#include "lora_impl.h"

#define MARKER ".mergestream-lora-complete"
#define CHUNK ((size_t)1 << 18) /* elements per read */
#define SHARD_BYTES 5000000000ull

static uint32_t crc32_ieee(const char *s)
{
    uint32_t c = 0xffffffffu;
    for (; *s; s++) {
        c ^= (unsigned char)*s;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static const char *base_name(const char *p)
{
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        n--;
    const char *s = p + n;
    while (s > p && s[-1] != '/')
        s--;
    return s;
}

char *ms__lora_cache_path(const char *cache, const struct ms_modelref *ref)
{
    char *m = ref->revision ? ms_asprintf("%s@%s", ref->path, ref->revision) : ms_strdup(ref->path);
    char *l = ref->lora_revision ? ms_asprintf("%s@%s", ref->lora, ref->lora_revision)
                                 : ms_strdup(ref->lora);
    char *out = NULL;
    if (m && l) {
        const char *mb = base_name(ref->path), *lb = base_name(ref->lora);
        /* os.path.basename keeps nothing after a trailing '/'; trimmed here instead */
        out = ms_asprintf("%s/%.*s_%u_%.*s_%u", cache, (int)strcspn(mb, "/"), mb, crc32_ieee(m),
                          (int)strcspn(lb, "/"), lb, crc32_ieee(l));
    }
    ms_free(m);
    ms_free(l);
    return out;
}

static const char *dtype_tag(enum ms_dtype d)
{
    return ms_dtype_is_compute(d) ? ms_dtype_name(d) : "model";
}

bool ms__lora_cache_ready(const char *path, enum ms_dtype d)
{
    char *mk = ms_asprintf("%s/" MARKER, path), *text = NULL;
    size_t len;
    bool ok = false;
    if (mk && ms_read_file(mk, &text, &len) == 0) {
        char want[64];
        snprintf(want, sizeof want, "dtype %s\n", dtype_tag(d));
        ok = !strcmp(text, want);
    }
    ms_free(mk);
    ms_free(text);
    return ok;
}

static int write_all(int fd, const void *p, size_t n, const char *path)
{
    const char *c = p;
    while (n) {
        ssize_t k = write(fd, c, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return ms_error(-errno, "%s: write failed: %s", path, strerror(errno));
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

static int read_at(int fd, void *p, size_t n, uint64_t off, const char *path, const char *name)
{
    char *c = p;
    while (n) {
        ssize_t k = pread(fd, c, n, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return ms_error(k ? -errno : MS_EIO, "%s: cannot read tensor '%s': %s", path, name,
                            k ? strerror(errno) : "file cut short");
        c += k;
        off += (uint64_t)k;
        n -= (size_t)k;
    }
    return 0;
}

struct wctx {
    const struct ms_plan_model *pm;
    unsigned char *raw; /* CHUNK * 8 bytes */
    float *x;           /* CHUNK floats */
};

/* Streams tensor t (shard sh of the model) into fd, folded. */
static int copy_tensor(struct wctx *w, const struct ms_st_tensor *t, uint32_t sh, int fd,
                       const char *out)
{
    const struct ms_st_file *f = w->pm->model->shards[sh];
    const struct ms_lora_fold *fo = ms__lora_find(w->pm->lora, t);
    float *at = NULL;
    int rc = 0, in = open(f->path, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return ms_error(-errno, "%s: cannot open: %s", f->path, strerror(errno));
    unsigned ib = ms_dtype_bits(t->dtype) / 8;
    if (fo && fo->r) {
        at = ms_malloc((size_t)ms_lora_floats(fo) * sizeof *at);
        if (!at) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            goto out;
        }
        if ((rc = ms_lora_read(fo, at, at + (fo->transpose ? fo->rows : fo->cols) * fo->r)) < 0)
            goto out;
    }
    if (!fo) { /* bytes as stored */
        uint64_t nb = t->end - t->begin;
        for (uint64_t o = 0; o < nb && !rc; o += CHUNK * 4) {
            size_t n = (size_t)MS_MIN((uint64_t)CHUNK * 4, nb - o);
            rc = read_at(in, w->raw, n, f->data_start + t->begin + o, f->path, t->name);
            if (!rc)
                rc = write_all(fd, w->raw, n, out);
        }
        goto out;
    }
    unsigned ob = ms_dtype_bits(fo->dtype) / 8;
    for (uint64_t e = 0; e < t->numel && !rc; e += CHUNK) {
        size_t n = (size_t)MS_MIN((uint64_t)CHUNK, t->numel - e);
        rc = read_at(in, w->raw, n * ib, f->data_start + t->begin + e * ib, f->path, t->name);
        if (rc)
            break;
        ms_dtype_decode(t->dtype, w->raw, w->x, n);
        ms_lora_fold_chunk(fo, at, at ? at + (fo->transpose ? fo->rows : fo->cols) * fo->r : NULL,
                           e, w->x, n);
        ms_dtype_encode(fo->dtype, w->x, w->raw, n);
        rc = write_all(fd, w->raw, n * ob, out);
    }
out:
    ms_free(at);
    close(in);
    return rc;
}

/* config.json with its dtype keys set to d's name (when d is a compute dtype). */
static int write_config(const struct ms_plan_model *pm, const char *dir, enum ms_dtype d)
{
    if (!pm->config_json)
        return 0;
    char *path = ms_asprintf("%s/config.json", dir), *text = NULL;
    json_t *root = json_loads(pm->config_json, 0, NULL);
    int rc = 0;
    if (!path || !root) {
        rc = ms_error(MS_ENOMEM, "%s: cannot write config.json", dir);
        goto out;
    }
    if (ms_dtype_is_compute(d)) {
        const char *nm = d == MS_DT_BF16 ? "bfloat16" : d == MS_DT_F16 ? "float16" : "float32";
        json_object_set_new(root, "torch_dtype", json_string(nm));
        if (json_object_get(root, "dtype"))
            json_object_set_new(root, "dtype", json_string(nm));
    }
    text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (!text)
        rc = ms_error(MS_ENOMEM, "out of memory");
    else
        rc = ms_write_file_atomic(path, text, strlen(text));
out:
    free(text);
    json_decref(root);
    ms_free(path);
    return rc;
}

/* The model folder's other small files (tokenizer, generation config...). */
static int copy_small_files(const struct ms_plan_model *pm, const char *dir)
{
    DIR *d = opendir(pm->model->dir);
    if (!d)
        return ms_error(-errno, "%s: cannot list: %s", pm->model->dir, strerror(errno));
    struct dirent *de;
    int rc = 0;
    while (!rc && (de = readdir(d))) {
        const char *n = de->d_name;
        size_t len = strlen(n);
        if (n[0] == '.' || !strcmp(n, "config.json") || strstr(n, ".safetensors") ||
            (len > 4 && !strcmp(n + len - 4, ".bin")) || (len > 3 && !strcmp(n + len - 3, ".pt")))
            continue;
        char *src = ms_asprintf("%s/%s", pm->model->dir, n), *dst = ms_asprintf("%s/%s", dir, n);
        char *data = NULL;
        size_t sz;
        struct stat st;
        if (!src || !dst)
            rc = ms_error(MS_ENOMEM, "out of memory");
        else if (stat(src, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= MS_SMALL_FILE_MAX &&
                 (rc = ms_read_file(src, &data, &sz)) == 0)
            rc = ms_write_file_atomic(dst, data, sz);
        ms_free(data);
        ms_free(src);
        ms_free(dst);
    }
    closedir(d);
    return rc;
}

static int cache_write(const struct ms_plan_model *pm, const char *dir, enum ms_dtype d)
{
    const struct ms_model *m = pm->model;
    struct ms_out_tensor *ot = ms_calloc(m->ntensors + 1, sizeof *ot);
    uint32_t *shard_of = ms_calloc(m->ntensors + 1, sizeof *shard_of);
    const struct ms_st_tensor **src = ms_calloc(m->ntensors + 1, sizeof *src);
    struct ms_layout *lay = NULL;
    struct wctx w = { .pm = pm };
    char *idx = NULL, *fname = NULL, *tmp = NULL;
    int rc = 0, fd = -1;
    w.raw = ms_malloc(CHUNK * 8);
    w.x = ms_malloc(CHUNK * sizeof(float));
    if (!ot || !shard_of || !src || !w.raw || !w.x) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < m->ntensors; i++) {
        const struct ms_st_tensor *t = ms_model_tensor_at(m, i, &shard_of[i]);
        if (m->shards[shard_of[i]]->compressed) {
            rc = ms_error(MS_EUNSUPPORTED,
                          "--lora-merge-cache: %s is zstd-compressed (not "
                          "supported for a cache copy)",
                          m->shards[shard_of[i]]->path);
            goto out;
        }
        const struct ms_lora_fold *fo = ms__lora_find(pm->lora, t);
        src[i] = t;
        ot[i].name = t->name;
        ot[i].dtype = fo ? fo->dtype : t->dtype;
        ot[i].ndim = t->ndim;
        memcpy(ot[i].shape, t->shape, sizeof t->shape);
        ot[i].nbytes = fo ? t->numel * (ms_dtype_bits(fo->dtype) / 8) : t->end - t->begin;
    }
    const char *slash = strrchr(dir, '/'); /* the cache folder itself, as os.makedirs */
    if (slash && slash > dir) {
        char parent[4096];
        snprintf(parent, sizeof parent, "%.*s", (int)(slash - dir), dir);
        if (mkdir(parent, 0755) < 0 && errno != EEXIST) {
            rc = ms_error(-errno, "--lora-merge-cache: cannot create %s: %s", parent,
                          strerror(errno));
            goto out;
        }
    }
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
        rc = ms_error(-errno, "--lora-merge-cache: cannot create %s: %s", dir, strerror(errno));
        goto out;
    }
    if ((rc = ms_layout_build(ot, m->ntensors, SHARD_BYTES, &lay)) < 0)
        goto out;
    for (size_t k = 0; k < lay->nshards && !rc; k++) {
        const struct ms_out_shard *s = &lay->shards[k];
        ms_free(fname);
        ms_free(tmp);
        fname = ms_asprintf("%s/%s", dir, s->file_name);
        tmp = ms_asprintf("%s/%s.partial", dir, s->file_name);
        if (!fname || !tmp) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            break;
        }
        fd = ms_file_create(tmp, 0644);
        if (fd < 0) {
            rc = ms_error(fd, "%s: cannot create: %s", tmp, strerror(-fd));
            break;
        }
        rc = write_all(fd, s->header, s->header_bytes, tmp);
        for (size_t q = 0; q < s->ntensors && !rc; q++) {
            size_t i = s->order[q];
            rc = copy_tensor(&w, src[i], shard_of[i], fd, tmp);
        }
        if (rc) {
            close(fd);
            unlink(tmp);
        } else {
            rc = ms_file_commit(fd, tmp, fname, dir, NULL);
        }
        fd = -1;
    }
    if (!rc && lay->nshards > 1) {
        size_t len;
        ms_free(fname);
        fname = ms_asprintf("%s/model.safetensors.index.json", dir);
        rc = fname ? ms_layout_index_json(lay, &idx, &len) : ms_error(MS_ENOMEM, "out of memory");
        if (!rc)
            rc = ms_write_file_atomic(fname, idx, len);
    }
    if (!rc)
        rc = write_config(pm, dir, d);
    if (!rc)
        rc = copy_small_files(pm, dir);
    if (!rc) {
        char mk[64];
        snprintf(mk, sizeof mk, "dtype %s\n", dtype_tag(d));
        ms_free(fname);
        fname = ms_asprintf("%s/" MARKER, dir);
        rc = fname ? ms_write_file_atomic(fname, mk, strlen(mk))
                   : ms_error(MS_ENOMEM, "out of memory");
    }
out:
    ms_free(ot);
    ms_free(shard_of);
    ms_free(src);
    ms_free(w.raw);
    ms_free(w.x);
    ms_free(idx);
    ms_free(fname);
    ms_free(tmp);
    ms_layout_free(lay);
    return rc;
}

int ms_plan_lora_cache_fill(const struct ms_plan *p, enum ms_dtype lora_dtype)
{
    for (size_t i = 0; i < p->nmodels; i++) {
        const struct ms_plan_model *pm = &p->models[i];
        if (!pm->lora_cache || !pm->lora)
            continue;
        ms_log_info("writing the folded model '%s' into %s", pm->ref, pm->lora_cache);
        int rc = cache_write(pm, pm->lora_cache, lora_dtype);
        if (rc < 0)
            return rc;
    }
    return 0;
}
