/*
 * st_write.c - output layout (shards, offsets, headers), the index file, and
 * atomic file writes (ms_safetensors.h).
 *
 * The bytes written match the official safetensors writer and mergekit:
 * compact serde_json header with __metadata__ first, tensors ordered by dtype
 * descending then name, header padded with spaces to a multiple of 8, and an
 * index rendered as Python's json.dump(indent=2) renders it
 * (mergekit-spec.md 4.1-4.3).
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_file.h"
#include "ms_safetensors.h"
#include "ms_str.h"

#define MERGEKIT_VERSION "0.1.4"

/* ------------------------------------------------------------------ JSON strings */

/* The two-character JSON escape of c, if it has one (both serializers use them). */
static const char *json_short_escape(uint32_t c)
{
    switch (c) {
    case '"': return "\\\"";
    case '\\': return "\\\\";
    case '\b': return "\\b";
    case '\f': return "\\f";
    case '\n': return "\\n";
    case '\r': return "\\r";
    case '\t': return "\\t";
    default: return NULL;
    }
}

/* A JSON string as serde_json writes it: escapes '"', '\\' and control
 * characters (short forms where JSON has them, else \u00xx); UTF-8 raw. */
static void sb_json_serde(struct ms_strbuf *sb, const char *s)
{
    ms_strbuf_addstr(sb, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned c = *p;
        const char *e = json_short_escape(c);
        if (e)
            ms_strbuf_addstr(sb, e);
        else if (c < 0x20)
            ms_strbuf_addf(sb, "\\u%04x", c);
        else
            ms_strbuf_add(sb, p, 1);
    }
    ms_strbuf_addstr(sb, "\"");
}

/* A JSON string as Python's json.dump writes it with ensure_ascii: everything
 * outside printable ASCII as \uxxxx, with surrogate pairs above the BMP.
 * s must be valid UTF-8 (ms_layout_build checks). */
static void sb_json_python(struct ms_strbuf *sb, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t len = strlen(s);
    ms_strbuf_addstr(sb, "\"");
    for (size_t i = 0; i < len;) {
        uint32_t c;
        size_t k = ms_utf8_decode(p + i, len - i, &c);
        assert(k > 0);
        i += k;
        const char *e = json_short_escape(c);
        if (e) {
            ms_strbuf_addstr(sb, e);
        } else if (c >= 0x20 && c < 0x7f) {
            char ch = (char)c;
            ms_strbuf_add(sb, &ch, 1);
        } else if (c < 0x10000) {
            ms_strbuf_addf(sb, "\\u%04x", (unsigned)c);
        } else {
            uint32_t v = c - 0x10000;
            ms_strbuf_addf(sb, "\\u%04x\\u%04x", (unsigned)(0xd800 | (v >> 10)),
                           (unsigned)(0xdc00 | (v & 0x3ff)));
        }
    }
    ms_strbuf_addstr(sb, "\"");
}

/* ------------------------------------------------------------------ layout */

static int name_ptr_cmp(const void *a, const void *b)
{
    const struct ms_out_tensor *x = *(const struct ms_out_tensor *const *)a;
    const struct ms_out_tensor *y = *(const struct ms_out_tensor *const *)b;
    return strcmp(x->name, y->name);
}

/* The official writer's order: dtype descending, then name in byte order. */
static int file_order_cmp(const void *a, const void *b)
{
    const struct ms_out_tensor *x = *(const struct ms_out_tensor *const *)a;
    const struct ms_out_tensor *y = *(const struct ms_out_tensor *const *)b;
    if (x->dtype != y->dtype)
        return x->dtype > y->dtype ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Checks one output tensor description; the caller (the plan) should never get
 * these wrong, but a wrong size would corrupt the file, so they are errors. */
static int check_tensor(const struct ms_out_tensor *t)
{
    if (!t->name)
        return ms_error(MS_EINVAL, "output tensor without a name");
    size_t name_len = strlen(t->name);
    if (!strcmp(t->name, "__metadata__") || ms_utf8_invalid_at(t->name, name_len) != name_len)
        return ms_error(MS_EINVAL, "output tensor '%s': invalid name", t->name);
    if ((int)t->dtype < 0 || t->dtype >= MS_DT_COUNT)
        return ms_error(MS_EINVAL, "output tensor '%s': invalid dtype %d", t->name, (int)t->dtype);
    if (t->ndim > MS_MAX_DIMS)
        return ms_error(MS_EINVAL, "output tensor '%s': %u dimensions (limit %d)", t->name,
                        t->ndim, MS_MAX_DIMS);
    uint64_t numel;
    unsigned bits = ms_dtype_bits(t->dtype);
    if (!ms_shape_numel(t->shape, t->ndim, &numel) || numel > UINT64_MAX / bits ||
        numel * bits % 8 || numel * bits / 8 != t->nbytes)
        return ms_error(MS_EINVAL, "output tensor '%s': %" PRIu64 " bytes do not match its shape",
                        t->name, t->nbytes);
    return 0;
}

/* Orders shard s's tensors, assigns offsets and renders its header. */
static int shard_build(struct ms_layout *l, uint32_t s, const struct ms_out_tensor **tmp)
{
    struct ms_out_shard *sh = &l->shards[s];
    struct ms_strbuf sb = {0};
    int rc = 0;

    size_t k = 0;
    for (size_t i = 0; i < l->ntensors; i++)
        if (l->tensors[i].shard == s)
            tmp[k++] = &l->tensors[i];
    assert(k == sh->ntensors);
    qsort(tmp, k, sizeof *tmp, file_order_cmp);
    sh->order = ms_calloc(k, sizeof *sh->order);
    if (!sh->order) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", sh->file_name);
        goto out;
    }

    /* 8 placeholder bytes for the length, then the JSON. */
    ms_strbuf_add(&sb, "\0\0\0\0\0\0\0\0", 8);
    ms_strbuf_addstr(&sb, "{\"__metadata__\":{\"format\":\"pt\"}");
    uint64_t off = 0;
    for (size_t i = 0; i < k; i++) {
        struct ms_out_tensor *t = (struct ms_out_tensor *)tmp[i];
        sh->order[i] = (size_t)(t - l->tensors);
        t->begin = off;
        off += t->nbytes;
        ms_strbuf_addstr(&sb, ",");
        sb_json_serde(&sb, t->name);
        ms_strbuf_addstr(&sb, ":{\"dtype\":\"");
        ms_strbuf_addstr(&sb, ms_dtype_name(t->dtype));
        ms_strbuf_addstr(&sb, "\",\"shape\":[");
        for (uint32_t d = 0; d < t->ndim; d++)
            ms_strbuf_addf(&sb, "%s%" PRId64, d ? "," : "", t->shape[d]);
        ms_strbuf_addf(&sb, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", t->begin, off);
    }
    ms_strbuf_addstr(&sb, "}");
    while (!sb.oom && (sb.len - 8) % 8)
        ms_strbuf_addstr(&sb, " ");
    if (sb.oom) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", sh->file_name);
        goto out;
    }
    uint64_t n = sb.len - 8;
    if (n > MS_ST_MAX_HEADER) {
        rc = ms_error(MS_EUNSUPPORTED, "%s: header of %" PRIu64 " bytes is over the %llu-byte limit",
                      sh->file_name, n, MS_ST_MAX_HEADER);
        goto out;
    }
    for (int b = 0; b < 8; b++)
        sb.p[b] = (char)(unsigned char)(n >> (8 * b));
    sh->header = (unsigned char *)sb.p;
    sb.p = NULL;
    sh->header_bytes = 8 + n;
    sh->data_bytes = off;
    sh->file_bytes = sh->header_bytes + off;
    for (size_t i = 0; i < k; i++) {
        struct ms_out_tensor *t = (struct ms_out_tensor *)tmp[i];
        t->file_offset = sh->header_bytes + t->begin;
    }

out:
    ms_free(sb.p);
    return rc;
}

int ms_layout_build(const struct ms_out_tensor *t, size_t n, uint64_t max_shard_bytes,
                    struct ms_layout **out)
{
    struct ms_layout *l = NULL;
    const struct ms_out_tensor **tmp = NULL;
    int rc = 0;

    assert(out && (t || n == 0));
    *out = NULL;
    for (size_t i = 0; i < n; i++) {
        rc = check_tensor(&t[i]);
        if (rc)
            return rc;
    }

    l = ms_calloc(1, sizeof *l);
    tmp = ms_calloc(n, sizeof *tmp);
    if (!l || !tmp) {
        rc = ms_error(MS_ENOMEM, "out of memory building the output layout");
        goto out;
    }
    l->tensors = ms_calloc(n, sizeof *l->tensors);
    if (!l->tensors) {
        rc = ms_error(MS_ENOMEM, "out of memory building the output layout");
        goto out;
    }
    if (n)
        memcpy(l->tensors, t, n * sizeof *t);
    l->ntensors = n;

    /* Names must be unique across the whole output (the index is a JSON object). */
    for (size_t i = 0; i < n; i++)
        tmp[i] = &l->tensors[i];
    qsort(tmp, n, sizeof *tmp, name_ptr_cmp);
    for (size_t i = 1; i < n; i++)
        if (!strcmp(tmp[i - 1]->name, tmp[i]->name)) {
            rc = ms_error(MS_EINVAL, "output tensor '%s' appears twice", tmp[i]->name);
            goto out;
        }

    /* mergekit's greedy split in save order: a tensor that would push a
     * non-empty shard over the limit starts the next shard. */
    uint64_t cur = 0, count = 0;
    uint32_t shard = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t sz = l->tensors[i].nbytes;
        if (max_shard_bytes && count && (cur + sz < cur || cur + sz > max_shard_bytes)) {
            shard++;
            cur = 0;
            count = 0;
        }
        l->tensors[i].shard = shard;
        cur += sz;
        count++;
        l->total_bytes += sz;
    }
    l->shards = ms_calloc((size_t)shard + 1, sizeof *l->shards);
    if (!l->shards) {
        rc = ms_error(MS_ENOMEM, "out of memory building the output layout");
        goto out;
    }
    l->nshards = (size_t)shard + 1;
    for (size_t i = 0; i < n; i++)
        l->shards[l->tensors[i].shard].ntensors++;
    for (size_t s = 0; s < l->nshards; s++) {
        if (l->nshards == 1)
            l->shards[s].file_name = ms_strdup("model.safetensors");
        else
            l->shards[s].file_name =
                ms_asprintf("model-%05zu-of-%05zu.safetensors", s + 1, l->nshards);
        if (!l->shards[s].file_name) {
            rc = ms_error(MS_ENOMEM, "out of memory building the output layout");
            goto out;
        }
        rc = shard_build(l, (uint32_t)s, tmp);
        if (rc)
            goto out;
    }

out:
    ms_free(tmp);
    if (rc) {
        ms_layout_free(l);
        return rc;
    }
    *out = l;
    return 0;
}

void ms_layout_free(struct ms_layout *l)
{
    if (!l)
        return;
    for (size_t s = 0; s < l->nshards; s++) {
        ms_free(l->shards[s].file_name);
        ms_free(l->shards[s].order);
        ms_free(l->shards[s].header);
    }
    ms_free(l->shards);
    ms_free(l->tensors);
    ms_free(l);
}

int ms_layout_index_json(const struct ms_layout *l, char **json, size_t *len)
{
    struct ms_strbuf sb = {0};

    assert(l && json);
    *json = NULL;
    ms_strbuf_addstr(&sb, "{\n  \"metadata\": {\n");
    ms_strbuf_addf(&sb, "    \"total_size\": %" PRIu64 ",\n", l->total_bytes);
    ms_strbuf_addstr(&sb, "    \"mergekit_version\": \"" MERGEKIT_VERSION "\"\n  },\n"
                          "  \"weight_map\": {");
    for (size_t i = 0; i < l->ntensors; i++) {
        const struct ms_out_tensor *t = &l->tensors[i];
        ms_strbuf_addstr(&sb, i ? ",\n    " : "\n    ");
        sb_json_python(&sb, t->name);
        ms_strbuf_addstr(&sb, ": ");
        sb_json_python(&sb, l->shards[t->shard].file_name);
    }
    ms_strbuf_addstr(&sb, l->ntensors ? "\n  }\n}" : "}\n}");
    if (sb.oom) {
        ms_free(sb.p);
        return ms_error(MS_ENOMEM, "out of memory rendering the index");
    }
    *json = sb.p;
    if (len)
        *len = sb.len;
    return 0;
}

/* ------------------------------------------------------------------ atomic files */

/* A file being written as "<path>.tmp" and renamed into place on commit. */
struct atomic_file {
    const char *path;
    char *tmp;
    int fd;
};

static int atomic_begin(struct atomic_file *a, const char *path, unsigned mode)
{
    a->path = path;
    a->fd = -1;
    a->tmp = ms_asprintf("%s.tmp", path);
    if (!a->tmp)
        return ms_error(MS_ENOMEM, "%s: out of memory", path);
    a->fd = ms_file_create(a->tmp, mode);
    if (a->fd < 0) {
        int e = -a->fd;
        a->fd = -1;
        ms_free(a->tmp);
        a->tmp = NULL;
        return ms_error(-e, "%s: cannot create: %s", path, strerror(e));
    }
    return 0;
}

static int atomic_write(struct atomic_file *a, const void *data, size_t len)
{
    const char *p = data;
    while (len) {
        ssize_t w = write(a->fd, p, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return ms_error(-errno, "%s: write failed: %s", a->path, strerror(errno));
        }
        if (w == 0)
            return ms_error(MS_EIO, "%s: write made no progress", a->path);
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Unlinks the temporary file; safe after a failed begin. */
static void atomic_abort(struct atomic_file *a)
{
    if (a->fd >= 0)
        close(a->fd);
    a->fd = -1;
    if (a->tmp)
        unlink(a->tmp);
    ms_free(a->tmp);
    a->tmp = NULL;
}

/* fsync, close, rename into place, fsync the directory. On failure the file is
 * gone under both names. */
static int atomic_commit(struct atomic_file *a)
{
    const char *slash = strrchr(a->path, '/');
    char *dir = slash ? ms_strndup(a->path, slash == a->path ? 1 : (size_t)(slash - a->path))
                      : ms_strdup(".");
    int rc;
    if (!dir) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", a->path);
        atomic_abort(a);
        return rc;
    }
    rc = ms_file_commit(a->fd, a->tmp, a->path, dir, NULL);
    a->fd = -1;
    ms_free(dir);
    ms_free(a->tmp);
    a->tmp = NULL;
    return rc;
}

int ms_st_write_file(const char *path, const struct ms_out_tensor *t, const void *const *data,
                     size_t n)
{
    struct ms_layout *l = NULL;
    struct atomic_file a = {.fd = -1};
    int rc;

    assert(path && (data || n == 0));
    rc = ms_layout_build(t, n, 0, &l);
    if (rc) {
        ms_error_prefix(rc, "%s", path);
        return rc;
    }
    assert(l->nshards == 1);
    const struct ms_out_shard *sh = &l->shards[0];
    rc = atomic_begin(&a, path, 0644);
    if (rc)
        goto out;
    rc = atomic_write(&a, sh->header, (size_t)sh->header_bytes);
    for (size_t i = 0; !rc && i < sh->ntensors; i++) {
        size_t k = sh->order[i];
        if (l->tensors[k].nbytes)
            rc = atomic_write(&a, data[k], (size_t)l->tensors[k].nbytes);
    }
    if (rc) {
        atomic_abort(&a);
        goto out;
    }
    rc = atomic_commit(&a);

out:
    ms_layout_free(l);
    return rc;
}

int ms_write_file_atomic(const char *path, const void *data, size_t len)
{
    return ms_write_file_atomic_mode(path, data, len, 0644);
}

int ms_write_file_atomic_mode(const char *path, const void *data, size_t len, unsigned mode)
{
    struct atomic_file a = {.fd = -1};
    int rc = atomic_begin(&a, path, mode);
    if (rc)
        return rc;
    rc = atomic_write(&a, data, len);
    if (rc) {
        atomic_abort(&a);
        return rc;
    }
    return atomic_commit(&a);
}

int ms_read_file(const char *path, char **data, size_t *len)
{
    struct ms_strbuf sb = {0};
    char chunk[16384];
    int rc = 0;

    assert(path && data);
    *data = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block */
    if (fd < 0)
        return ms_error(-errno, "%s: %s", path, strerror(errno));
    /* Regular files only, and bounded: a symlink to /dev/zero or a FIFO would
     * grow the buffer without end. */
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = ms_error(-errno, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = ms_error(MS_EIO, "%s: not a regular file", path);
        goto out;
    }
    if ((uint64_t)st.st_size > MS_SMALL_FILE_MAX) {
        rc = ms_error(MS_EIO, "%s: %" PRIu64 " bytes, over the %u MiB limit for the small files "
                      "mergestream reads (config, index, tokenizer)", path, (uint64_t)st.st_size,
                      MS_SMALL_FILE_MAX >> 20);
        goto out;
    }
    ms_strbuf_add(&sb, "", 0); /* an empty file still gets a buffer */
    for (;;) {
        if (sb.len > MS_SMALL_FILE_MAX) { /* grew while read */
            rc = ms_error(MS_EIO, "%s: over the %u MiB limit for the small files mergestream "
                          "reads (config, index, tokenizer)", path, MS_SMALL_FILE_MAX >> 20);
            goto out;
        }
        ssize_t r = read(fd, chunk, sizeof chunk);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            rc = ms_error(-errno, "%s: read failed: %s", path, strerror(errno));
            goto out;
        }
        if (r == 0)
            break;
        ms_strbuf_add(&sb, chunk, (size_t)r);
    }
    if (sb.oom)
        rc = ms_error(MS_ENOMEM, "%s: out of memory", path);

out:
    close(fd);
    if (rc) {
        ms_free(sb.p);
        return rc;
    }
    *data = sb.p;
    if (len)
        *len = sb.len;
    return 0;
}
