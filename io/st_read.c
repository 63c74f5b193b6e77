/*
 * st_read.c - reads and validates safetensors headers (ms_safetensors.h).
 *
 * The checks follow the official reader (peers-and-formats.md 5.2) in its order:
 * header length, UTF-8, JSON and schema, then per tensor in offset order: offsets,
 * overflow, sub-byte alignment, byte length; finally the file length. Every rule
 * has its own MS_EST_* code so that tests and the verify command can tell them
 * apart. Only the header bytes are read from disk.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_http.h"
#include "io_impl.h"
#include "ms_zsrc.h"
#include "ms_safetensors.h"
#include "ms_str.h"

#define PREFIX_BYTES 8u

/* ------------------------------------------------------------------ helpers */

/* ms_st_set_memory's limit; the default is that of 512 MiB (MS_DEFAULT_MAX_MEMORY). */
static uint64_t g_header_limit = (512ull << 20) / MS_ST_HEADER_COST;

void ms_st_set_memory(uint64_t max_memory)
{
    uint64_t l = MS_MAX(MS_ST_HEADER_FLOOR, max_memory / MS_ST_HEADER_COST);
    g_header_limit = MS_MIN(l, MS_ST_MAX_HEADER);
}

uint64_t ms_st_header_limit(void) { return g_header_limit; }

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/*
 * jansson reports a duplicate key with the position just past the key's closing
 * quote. Finds that key's raw JSON string in hdr, decodes it into *name (ms_free)
 * and tells whether it is a top-level key (a tensor name or __metadata__).
 * Returns false if the key cannot be recovered.
 */
static bool duplicate_key_at(const char *hdr, size_t len, size_t pos, char **name, bool *top)
{
    if (pos == 0 || pos > len || hdr[pos - 1] != '"')
        return false;
    size_t q = pos - 1; /* closing quote; search back for the unescaped opening one */
    size_t open = SIZE_MAX;
    for (size_t i = q; i-- > 0;) {
        if (hdr[i] != '"')
            continue;
        size_t bs = 0;
        while (bs < i && hdr[i - 1 - bs] == '\\')
            bs++;
        if (bs % 2 == 0) {
            open = i;
            break;
        }
    }
    if (open == SIZE_MAX)
        return false;
    /* Nesting depth at the key, skipping over strings. */
    int depth = 0;
    for (size_t i = 0; i < open; i++) {
        char c = hdr[i];
        if (c == '"') {
            for (i++; i < open && hdr[i] != '"'; i++)
                if (hdr[i] == '\\')
                    i++;
        } else if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            depth--;
        }
    }
    json_t *s = json_loadb(hdr + open, q + 1 - open, JSON_DECODE_ANY, NULL);
    if (!json_is_string(s)) {
        json_decref(s);
        return false;
    }
    *name = ms_strdup(json_string_value(s));
    json_decref(s);
    *top = depth == 1;
    return *name != NULL;
}

/* Reads exactly len bytes at off; a short read means the file shrank under us. */
static int pread_full(int fd, const char *path, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return ms_error(-errno, "%s: read failed: %s", path, strerror(errno));
        }
        if (r == 0)
            return ms_error(MS_EIO, "%s: unexpected end of file while reading the header", path);
        done += (size_t)r;
    }
    return 0;
}

/* Orders by begin, then end (empty tensors before the tensor that starts where
 * they sit), then name, which is the official reader's order made total. */
static int tensor_cmp(const void *a, const void *b)
{
    const struct ms_st_tensor *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Formats a shape as "[2, 3]" into buf (truncated if it does not fit). */
static const char *shape_str(char *buf, size_t cap, const int64_t *shape, uint32_t ndim)
{
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (uint32_t i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%" PRId64, i ? ", " : "", shape[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, "]");
    return buf;
}

/* A non-negative JSON integer. */
static bool get_uint(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (uint64_t)json_integer_value(v);
    return true;
}

/* ------------------------------------------------------------------ parsing */

/* Checks __metadata__ (an object of strings) and keeps its "format". */
static int parse_metadata(const char *path, const json_t *md, struct ms_st_file *f)
{
    if (!json_is_object(md))
        return ms_error(MS_EST_METADATA, "%s: __metadata__ is not an object", path);
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)md, key, v) {
        if (!json_is_string(v))
            return ms_error(MS_EST_METADATA, "%s: __metadata__ value of '%s' is not a string",
                            path, key);
        if (!strcmp(key, "format")) {
            f->format = ms_strdup(json_string_value(v));
            if (!f->format)
                return ms_error(MS_ENOMEM, "%s: out of memory", path);
        }
    }
    return 0;
}

/* Fills t from one header entry; the name is already set. */
static int parse_entry(const char *path, const json_t *e, struct ms_st_tensor *t)
{
    const char *name = t->name;
    if (!json_is_object(e))
        return ms_error(MS_EST_SCHEMA, "%s: tensor '%s': entry is not an object", path, name);

    const json_t *dt = json_object_get(e, "dtype");
    if (!dt)
        return ms_error(MS_EST_SCHEMA, "%s: tensor '%s': missing dtype", path, name);
    if (!json_is_string(dt))
        return ms_error(MS_EST_SCHEMA, "%s: tensor '%s': dtype is not a string", path, name);
    t->dtype = ms_dtype_from_name(json_string_value(dt), json_string_length(dt));
    if (t->dtype == MS_DT_NONE)
        return ms_error(MS_EST_DTYPE, "%s: tensor '%s': unknown dtype '%s'", path, name,
                        json_string_value(dt));

    const json_t *sh = json_object_get(e, "shape");
    if (!sh)
        return ms_error(MS_EST_SCHEMA, "%s: tensor '%s': missing shape", path, name);
    if (!json_is_array(sh))
        return ms_error(MS_EST_SCHEMA, "%s: tensor '%s': shape is not an array", path, name);
    size_t nd = json_array_size(sh);
    if (nd > MS_MAX_DIMS)
        return ms_error(MS_EST_SCHEMA, "%s: tensor '%s': shape has %zu dimensions (limit %d)",
                        path, name, nd, MS_MAX_DIMS);
    t->ndim = (uint32_t)nd;
    for (size_t i = 0; i < nd; i++) {
        uint64_t d;
        if (!get_uint(json_array_get(sh, i), &d))
            return ms_error(MS_EST_SCHEMA,
                            "%s: tensor '%s': shape[%zu] is not a non-negative integer", path,
                            name, i);
        t->shape[i] = (int64_t)d;
    }

    const json_t *off = json_object_get(e, "data_offsets");
    if (!off)
        return ms_error(MS_EST_SCHEMA, "%s: tensor '%s': missing data_offsets", path, name);
    if (!json_is_array(off) || json_array_size(off) != 2 ||
        !get_uint(json_array_get(off, 0), &t->begin) ||
        !get_uint(json_array_get(off, 1), &t->end))
        return ms_error(MS_EST_SCHEMA,
                        "%s: tensor '%s': data_offsets is not two non-negative integers", path,
                        name);
    return 0;
}

/* The per-tensor rules of Metadata::validate, in offset order; sets *data_len. */
static int validate_tensors(const char *path, struct ms_st_file *f, uint64_t *data_len)
{
    uint64_t start = 0;
    char sb[160];
    for (size_t i = 0; i < f->ntensors; i++) {
        struct ms_st_tensor *t = &f->tensors[i];
        if (t->end < t->begin)
            return ms_error(MS_EST_OFFSET,
                            "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                            "] end before begin",
                            path, t->name, t->begin, t->end);
        if (t->begin != start) {
            if (i == 0)
                return ms_error(MS_EST_OFFSET,
                                "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                                "]: the first tensor must begin at 0",
                                path, t->name, t->begin, t->end);
            return ms_error(MS_EST_OFFSET,
                            "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                            "] %s the previous tensor, which ends at %" PRIu64,
                            path, t->name, t->begin, t->end,
                            t->begin > start ? "leave a gap after" : "overlap", start);
        }
        start = t->end;

        uint64_t numel;
        if (!ms_shape_numel(t->shape, t->ndim, &numel))
            return ms_error(MS_EST_OVERFLOW, "%s: tensor '%s': element count of shape %s overflows",
                            path, t->name, shape_str(sb, sizeof sb, t->shape, t->ndim));
        t->numel = numel;
        unsigned bits = ms_dtype_bits(t->dtype);
        if (numel > UINT64_MAX / bits)
            return ms_error(MS_EST_OVERFLOW, "%s: tensor '%s': bit size of shape %s x %s overflows",
                            path, t->name, shape_str(sb, sizeof sb, t->shape, t->ndim),
                            ms_dtype_name(t->dtype));
        uint64_t nbits = numel * bits;
        if (nbits % 8)
            return ms_error(MS_EST_MISALIGNED,
                            "%s: tensor '%s': %" PRIu64 " elements of %s are %" PRIu64
                            " bits, not a whole number of bytes",
                            path, t->name, numel, ms_dtype_name(t->dtype), nbits);
        if (t->end - t->begin != nbits / 8)
            return ms_error(MS_EST_INFO,
                            "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                            "] do not match shape %s x %s (%" PRIu64 " bytes)",
                            path, t->name, t->begin, t->end,
                            shape_str(sb, sizeof sb, t->shape, t->ndim), ms_dtype_name(t->dtype),
                            nbits / 8);
    }
    *data_len = start;
    return 0;
}

int ms_st_parse(const char *path, const void *buf, size_t buf_len, uint64_t file_size,
                struct ms_st_file **out)
{
    const unsigned char *b = buf;
    struct ms_st_file *f = NULL;
    json_t *root = NULL;
    int rc = 0;

    assert(path && out);
    *out = NULL;
    if (file_size < PREFIX_BYTES)
        return ms_error(MS_EST_TOOSMALL,
                        "%s: file is %" PRIu64 " bytes, too small for the 8-byte header length",
                        path, file_size);
    if (buf_len < PREFIX_BYTES)
        return ms_error(MS_EINVAL, "%s: only %zu header bytes given", path, buf_len);
    uint64_t n = le64(b);
    if (n > MS_ST_MAX_HEADER)
        return ms_error(MS_EST_TOOLARGE,
                        "%s: header length %" PRIu64 " is over the limit of %llu bytes", path, n,
                        MS_ST_MAX_HEADER);
    if (n > g_header_limit)
        return ms_error(MS_EST_TOOLARGE,
                        "%s: header length %" PRIu64 " is over the limit of %" PRIu64
                        " bytes (1/%u of --max-memory, at least %llu MiB: parsing takes up to "
                        "%u times the header)",
                        path, n, g_header_limit, MS_ST_HEADER_COST, MS_ST_HEADER_FLOOR >> 20,
                        MS_ST_HEADER_COST);
    /* n <= 1e8, so PREFIX_BYTES + n cannot overflow. */
    if (PREFIX_BYTES + n > file_size)
        return ms_error(MS_EST_HDRLEN,
                        "%s: header length %" PRIu64 " runs past the end of the file (%" PRIu64
                        " bytes)",
                        path, n, file_size);
    if (buf_len < PREFIX_BYTES + n)
        return ms_error(MS_EINVAL, "%s: only %zu of %" PRIu64 " header bytes given", path,
                        buf_len, PREFIX_BYTES + n);

    const char *hdr = (const char *)b + PREFIX_BYTES;
    size_t bad = ms_utf8_invalid_at(hdr, (size_t)n);
    if (bad < n)
        return ms_error(MS_EST_UTF8, "%s: header is not valid utf-8 (byte %zu of the file)", path,
                        bad + PREFIX_BYTES);

    json_error_t jerr;
    long fails0 = ms_alloc_failures();
    root = json_loadb(hdr, (size_t)n, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!root && (json_error_code(&jerr) == json_error_out_of_memory || !jerr.text[0] ||
                  ms_alloc_failures() != fails0)) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory parsing json", path);
        goto out;
    }
    if (!root) {
        if (json_error_code(&jerr) == json_error_duplicate_key) {
            char *key = NULL;
            bool top = false;
            if (duplicate_key_at(hdr, (size_t)n, (size_t)jerr.position, &key, &top)) {
                if (top)
                    rc = ms_error(MS_EST_DUPLICATE, "%s: tensor '%s': name appears twice", path,
                                  key);
                else
                    rc = ms_error(MS_EST_DUPLICATE, "%s: key '%s' appears twice in one entry",
                                  path, key);
                ms_free(key);
                return rc;
            }
            return ms_error(MS_EST_DUPLICATE, "%s: %s", path, jerr.text);
        }
        if (json_error_code(&jerr) == json_error_numeric_overflow)
            return ms_error(MS_EST_OVERFLOW, "%s: header integer out of range at byte %d: %s",
                            path, jerr.position + (int)PREFIX_BYTES, jerr.text);
        if (json_error_code(&jerr) == json_error_out_of_memory)
            return ms_error(MS_ENOMEM, "%s: out of memory parsing the header", path);
        return ms_error(MS_EST_JSON, "%s: header is not valid json at byte %d: %s", path,
                        jerr.position + (int)PREFIX_BYTES, jerr.text);
    }
    if (!json_is_object(root)) {
        rc = ms_error(MS_EST_JSON, "%s: header is not a json object", path);
        goto out;
    }

    f = ms_calloc(1, sizeof *f);
    if (!f) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    f->path = ms_strdup(path);
    size_t cap = json_object_size(root);
    f->tensors = ms_calloc(cap, sizeof *f->tensors);
    if (!f->path || !f->tensors) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    f->file_size = file_size;
    f->header_len = n;
    f->data_start = PREFIX_BYTES + n;

    /* Entries in JSON order, so the first malformed entry is the one reported. */
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__")) {
            rc = parse_metadata(path, val, f);
            if (rc)
                goto out;
            continue;
        }
        struct ms_st_tensor *t = &f->tensors[f->ntensors];
        t->name = ms_strdup(key);
        if (!t->name) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
            goto out;
        }
        f->ntensors++;
        rc = parse_entry(path, val, t);
        if (rc)
            goto out;
    }

    qsort(f->tensors, f->ntensors, sizeof *f->tensors, tensor_cmp);
    uint64_t data_len = 0;
    rc = validate_tensors(path, f, &data_len);
    if (rc)
        goto out;

    /* data_start <= file_size here, so the subtraction is safe and no sum overflows. */
    uint64_t have = file_size - f->data_start;
    if (data_len > have)
        rc = ms_error(MS_EST_INCOMPLETE,
                      "%s: file is truncated: the header describes %" PRIu64
                      " data bytes but only %" PRIu64 " follow it",
                      path, data_len, have);
    else if (data_len < have)
        rc = ms_error(MS_EST_INCOMPLETE,
                      "%s: %" PRIu64 " trailing byte%s after the %" PRIu64
                      " data bytes the header describes",
                      path, have - data_len, have - data_len == 1 ? "" : "s", data_len);

out:
    json_decref(root);
    if (rc) {
        ms_st_free(f);
        return rc;
    }
    *out = f;
    return 0;
}

/* Where a header is read from: a plain file or a zstd-compressed one. */
struct hsrc {
    int fd;
    struct ms_zsrc *z;
};

static int hsrc_read(struct hsrc *h, const char *path, void *buf, size_t len, uint64_t off)
{
    if (h->z)
        return ms_zsrc_pread(h->z, buf, len, off);
    return pread_full(h->fd, path, buf, len, off);
}

static bool has_suffix(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

int ms_st_open(const char *path, struct ms_st_file **out)
{
    unsigned char *buf = NULL;
    int rc = 0;
    struct stat st;
    struct hsrc h = { .fd = -1 };
    uint64_t size;

    assert(path && out);
    *out = NULL;
    if (ms_http_is_url(path))
        return ms__st_open_url(path, out);
    if (has_suffix(path, ".zst")) {
        rc = ms_zsrc_open(path, &h.z);
        if (rc)
            return rc;
        size = ms_zsrc_size(h.z);
    } else {
        /* O_NONBLOCK: a FIFO in place of a shard must not block the open (it is
         * then refused as not a regular file); regular files ignore the flag. */
        h.fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        if (h.fd < 0)
            return ms_error(-errno, "%s: %s", path, strerror(errno));
        if (fstat(h.fd, &st) < 0) {
            rc = ms_error(-errno, "%s: %s", path, strerror(errno));
            goto out;
        }
        if (!S_ISREG(st.st_mode)) {
            rc = ms_error(MS_EIO, "%s: not a regular file", path);
            goto out;
        }
        size = (uint64_t)st.st_size;
    }
    unsigned char prefix[PREFIX_BYTES];
    size_t have = (size_t)MS_MIN(size, (uint64_t)PREFIX_BYTES);
    rc = hsrc_read(&h, path, prefix, have, 0);
    if (rc)
        goto out;
    if (have < PREFIX_BYTES) {
        rc = ms_st_parse(path, prefix, have, size, out);
        goto out;
    }
    uint64_t n = le64(prefix);
    if (n > MS_ST_MAX_HEADER || n > g_header_limit || PREFIX_BYTES + n > size) {
        /* Invalid length: the parser reports it from the prefix alone. */
        rc = ms_st_parse(path, prefix, have, size, out);
        goto out;
    }
    size_t total = (size_t)(PREFIX_BYTES + n);
    buf = ms_malloc(total);
    if (!buf) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory for a %zu-byte header", path, total);
        goto out;
    }
    memcpy(buf, prefix, PREFIX_BYTES);
    rc = hsrc_read(&h, path, buf + PREFIX_BYTES, (size_t)n, PREFIX_BYTES);
    if (rc)
        goto out;
    rc = ms_st_parse(path, buf, total, size, out);
    if (!rc)
        (*out)->compressed = h.z != NULL;

out:
    ms_free(buf);
    if (h.fd >= 0)
        close(h.fd);
    ms_zsrc_free(h.z);
    return rc;
}

void ms_st_free(struct ms_st_file *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->ntensors; i++)
        ms_free(f->tensors[i].name);
    ms_free(f->tensors);
    ms_free(f->format);
    ms_free(f->path);
    ms_free(f);
}

const struct ms_st_tensor *ms_st_find(const struct ms_st_file *f, const char *name)
{
    /* Linear: tensors are in offset order. Models use their hash table instead. */
    for (size_t i = 0; i < f->ntensors; i++)
        if (!strcmp(f->tensors[i].name, name))
            return &f->tensors[i];
    return NULL;
}
