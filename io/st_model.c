/*
 * st_model.c - opens a model: one safetensors file, or the shards listed by
 * model.safetensors.index.json, cross-checked against the shard headers both
 * ways (peers-and-formats.md 5.3). Names are looked up through an
 * open-addressing hash table built once at open.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_file.h"
#include "ms_http.h"
#include "ms_safetensors.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"

/* ------------------------------------------------------------------ name table */

struct slot {
    const char *name; /* borrowed from the shard's tensor; NULL when empty */
    uint32_t shard;
    uint32_t tensor;
};

struct table {
    size_t mask; /* capacity - 1; capacity is a power of two at least twice the count */
    struct slot *slots;
    size_t *first; /* nshards + 1 entries: model-wide index of each shard's first tensor */
};

/* FNV-1a, 64-bit. */
static uint64_t hash_name(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

static struct table *table_new(size_t count)
{
    size_t cap = 16;
    while (cap < 2 * count)
        cap *= 2;
    struct table *t = ms_calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->slots = ms_calloc(cap, sizeof *t->slots);
    if (!t->slots) {
        ms_free(t);
        return NULL;
    }
    t->mask = cap - 1;
    return t;
}

static void table_free(struct table *t)
{
    if (!t)
        return;
    ms_free(t->slots);
    ms_free(t->first);
    ms_free(t);
}

/* The slot holding name, or the empty slot where it would go. */
static struct slot *table_slot(const struct table *t, const char *name)
{
    size_t i = (size_t)hash_name(name) & t->mask;
    while (t->slots[i].name && strcmp(t->slots[i].name, name))
        i = (i + 1) & t->mask;
    return &t->slots[i];
}

/* ------------------------------------------------------------------ helpers */

static char *join(const char *dir, const char *name) { return ms_asprintf("%s/%s", dir, name); }

/* 1 if path exists (as anything), 0 if not, negative on another stat error. */
static int exists(const char *path)
{
    struct stat st;
    if (stat(path, &st) == 0)
        return 1;
    if (errno == ENOENT || errno == ENOTDIR)
        return 0;
    return ms_error(-errno, "%s: %s", path, strerror(errno));
}

/* A shard name from the index must stay inside the model directory. */
static bool shard_name_ok(const char *s)
{
    if (!*s || s[0] == '/')
        return false;
    for (const char *p = s; *p;) {
        const char *e = strchr(p, '/');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n == 2 && p[0] == '.' && p[1] == '.')
            return false;
        p += n + (e ? 1 : 0);
    }
    return true;
}

/* A shard name a URL can carry as it is (no escaping): [A-Za-z0-9._-/]. */
static bool url_name_ok(const char *s)
{
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              strchr("._-/", *s)))
            return false;
    return true;
}

/* A small file, local or remote (a remote one that is not there is MS_EMODEL). */
static int read_small(const char *path, char **text, size_t *len)
{
    if (!ms_http_is_url(path))
        return ms_read_file(path, text, len);
    int rc = ms_http_get_file(path, text, len);
    if (rc == 0)
        return ms_error(MS_EMODEL, "%s: not found (HTTP 404)", path);
    return rc < 0 ? rc : 0;
}

/* Adds every tensor of every shard to the table; a name in two shards is an error. */
static int model_index_tensors(struct ms_model *m, const char *where)
{
    size_t total = 0;
    for (size_t s = 0; s < m->nshards; s++)
        total += m->shards[s]->ntensors;
    struct table *t = table_new(total);
    if (!t)
        return ms_error(MS_ENOMEM, "%s: out of memory", m->path);
    m->lookup = t;
    m->ntensors = total;
    t->first = ms_malloc((m->nshards + 1) * sizeof *t->first);
    if (!t->first)
        return ms_error(MS_ENOMEM, "%s: out of memory", m->path);
    t->first[0] = 0;
    for (size_t s = 0; s < m->nshards; s++)
        t->first[s + 1] = t->first[s] + m->shards[s]->ntensors;
    for (size_t s = 0; s < m->nshards; s++) {
        const struct ms_st_file *f = m->shards[s];
        for (size_t i = 0; i < f->ntensors; i++) {
            struct slot *sl = table_slot(t, f->tensors[i].name);
            if (sl->name)
                return ms_error(MS_EST_INDEX, "%s: tensor '%s' is in both %s and %s", where,
                                sl->name, m->shards[sl->shard]->path, f->path);
            sl->name = f->tensors[i].name;
            sl->shard = (uint32_t)s;
            sl->tensor = (uint32_t)i;
        }
    }
    return 0;
}

/*
 * Loads the index at ipath: opens each distinct shard of weight_map once (in
 * order of first appearance) and cross-checks names both ways. text (len bytes,
 * taken over: freed here) is the index when the caller has read it already,
 * else NULL.
 */
static int model_load_index(struct ms_model *m, const char *ipath, char *text, size_t len)
{
    char *spath = NULL, *mroot = NULL;
    json_t *root = NULL, *seen = json_object(); /* shard paths opened so far */
    json_error_t jerr;
    int rc = 0;

    if (!seen) {
        ms_free(text);
        return ms_error(MS_ENOMEM, "%s: out of memory", ipath);
    }
    if (!text && (rc = read_small(ipath, &text, &len)))
        goto out;
    bool remote = ms_http_is_url(ipath);
    long fails0 = ms_alloc_failures();
    root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root && (json_error_code(&jerr) == json_error_out_of_memory || !jerr.text[0] ||
                  ms_alloc_failures() != fails0)) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory parsing json", ipath);
        goto out;
    }
    if (!root) {
        rc = ms_error(MS_EST_INDEX, "%s: not valid json at line %d: %s", ipath, jerr.line,
                      jerr.text);
        goto out;
    }
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        rc = ms_error(MS_EST_INDEX, "%s: missing or invalid weight_map", ipath);
        goto out;
    }
    size_t nw = json_object_size(wm);
    m->shards = ms_calloc(nw ? nw : 1, sizeof *m->shards);
    if (!m->shards) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", ipath);
        goto out;
    }

    const char *key;
    json_t *val;
    json_object_foreach(wm, key, val) {
        if (!json_is_string(val) || !shard_name_ok(json_string_value(val))) {
            rc = ms_error(MS_EST_INDEX, "%s: tensor '%s': weight_map value is not a shard file name",
                          ipath, key);
            goto out;
        }
        ms_free(spath);
        spath = join(m->dir, json_string_value(val));
        if (!spath) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", ipath);
            goto out;
        }
        if (json_object_get(seen, spath)) /* a hash lookup: 40,000 shards stay linear */
            continue;
        if (json_object_set_new(seen, spath, json_true())) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", ipath);
            goto out;
        }
        if (remote && !url_name_ok(json_string_value(val))) {
            rc = ms_error(MS_EST_INDEX,
                          "%s: tensor '%s': shard name '%s' would need escaping "
                          "in a URL; not supported for remote models",
                          ipath, key, json_string_value(val));
            goto out;
        }
        rc = remote ? 1 : exists(spath);
        if (rc == 0) {
            rc = ms_error(MS_EST_INDEX, "%s: tensor '%s': shard %s does not exist", ipath, key,
                          spath);
            goto out;
        }
        if (rc < 0)
            goto out;
        /* The name passed shard_name_ok as text; resolved, it must stay inside too
         * (a HF cache snapshot's symlinks into its repository's blobs/ do). */
        if (!remote && !mroot && (rc = ms_path_model_root(m->dir, &mroot)) < 0)
            goto out;
        rc = remote ? 1 : ms_path_inside(mroot, spath, NULL);
        if (rc <= 0) {
            rc = rc < 0 ? ms_error(rc, "%s: tensor '%s': shard %s: %s", ipath, key, spath,
                                   strerror(-rc))
                        : ms_error(MS_EST_INDEX, "%s: tensor '%s': shard %s resolves outside the "
                                   "model folder %s", ipath, key, spath, mroot);
            goto out;
        }
        rc = ms_st_open(spath, &m->shards[m->nshards]);
        if (rc)
            goto out;
        m->nshards++;
    }

    rc = model_index_tensors(m, ipath);
    if (rc)
        goto out;

    /* weight_map -> shards: every listed name is in the shard it names. */
    json_object_foreach(wm, key, val) {
        const char *file = json_string_value(val);
        struct slot *sl = table_slot(m->lookup, key);
        ms_free(spath);
        spath = join(m->dir, file);
        if (!spath) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", ipath);
            goto out;
        }
        if (!sl->name) {
            rc = ms_error(MS_EST_INDEX, "%s: tensor '%s' is listed for %s, which does not contain it",
                          ipath, key, spath);
            goto out;
        }
        if (strcmp(m->shards[sl->shard]->path, spath)) {
            rc = ms_error(MS_EST_INDEX, "%s: tensor '%s' is listed for %s but is in %s", ipath, key,
                          spath, m->shards[sl->shard]->path);
            goto out;
        }
    }
    /* shards -> weight_map: names are unique on both sides, so equal counts suffice;
     * otherwise find a shard tensor the index does not list. */
    if (m->ntensors != nw) {
        for (size_t s = 0; s < m->nshards; s++) {
            const struct ms_st_file *f = m->shards[s];
            for (size_t i = 0; i < f->ntensors; i++)
                if (!json_object_get(wm, f->tensors[i].name)) {
                    rc = ms_error(MS_EST_INDEX, "%s: tensor '%s' in %s is not in the weight_map",
                                  ipath, f->tensors[i].name, f->path);
                    goto out;
                }
        }
        assert(!"tensor counts differ but every name matched");
    }

out:
    json_decref(seen);
    json_decref(root);
    ms_free(text);
    ms_free(spath);
    ms_free(mroot);
    return rc;
}

/* ------------------------------------------------------------------ public */

/* A model stored as the one safetensors file at `file`. */
static int model_open_single(struct ms_model *m, const char *file)
{
    m->shards = ms_calloc(1, sizeof *m->shards);
    if (!m->shards)
        return ms_error(MS_ENOMEM, "%s: out of memory", file);
    int rc = ms_st_open(file, &m->shards[0]);
    if (rc)
        return rc;
    m->nshards = 1;
    return model_index_tensors(m, file);
}

/* A model at an http(s) URL: a directory (index, else model.safetensors) or one
 * .safetensors file; headers and index read by range requests (ms_http.h). */
static int model_open_url(struct ms_model *m, const char *url)
{
    size_t dl = strlen(url);
    while (dl > 8 && url[dl - 1] == '/')
        dl--;
    int rc = 0;
    char *p = NULL, *text = NULL;
    size_t len = 0;
    if (dl > 12 && !strncmp(url + dl - 12, ".safetensors", 12)) {
        const char *slash = url + dl;
        while (*slash != '/')
            slash--; /* stops at the scheme's "//" at worst */
        m->dir = ms_strndup(url, (size_t)(slash - url));
        p = ms_strndup(url, dl);
        if (!m->dir || !p) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", url);
            goto out;
        }
        rc = model_open_single(m, p);
        goto out;
    }
    m->dir = ms_strndup(url, dl);
    if (!m->dir || !(p = join(m->dir, INDEX_NAME))) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", url);
        goto out;
    }
    rc = ms_http_get_file(p, &text, &len); /* 0: not there */
    if (rc < 0)
        goto out;
    if (rc == 1) {
        m->indexed = true;
        rc = model_load_index(m, p, text, len);
        text = NULL;
        goto out;
    }
    ms_free(p);
    if (!(p = join(m->dir, SINGLE_NAME))) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", url);
        goto out;
    }
    rc = model_open_single(m, p);
    if (rc == MS_EMODEL)
        rc = ms_error(MS_EMODEL, "%s: no " SINGLE_NAME " or " INDEX_NAME " on the server", m->dir);
out:
    ms_free(text);
    ms_free(p);
    return rc;
}

int ms_model_open(const char *path, struct ms_model **out)
{
    struct ms_model *m = NULL;
    char *p = NULL;
    struct stat st;
    int rc = 0;

    assert(path && out);
    *out = NULL;
    if (ms_http_is_url(path)) {
        m = ms_calloc(1, sizeof *m);
        if (!m || !(m->path = ms_strdup(path))) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
            goto out;
        }
        rc = model_open_url(m, path);
        goto out;
    }
    if (stat(path, &st) < 0)
        return ms_error(-errno, "%s: %s", path, strerror(errno));

    m = ms_calloc(1, sizeof *m);
    if (!m || !(m->path = ms_strdup(path))) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
        goto out;
    }

    size_t pl = strlen(path);
    if (!S_ISDIR(st.st_mode) && pl >= 4 && !strcmp(path + pl - 4, ".bin")) {
        rc = ms_error(MS_EUNSUPPORTED,
                      "%s: PyTorch .bin checkpoints are not supported; convert to safetensors", path);
        goto out;
    }
    if (!S_ISDIR(st.st_mode)) {
        /* A single .safetensors file. */
        const char *slash = strrchr(path, '/');
        m->dir = slash ? ms_strndup(path, slash == path ? 1 : (size_t)(slash - path))
                       : ms_strdup(".");
        if (!m->dir) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
            goto out;
        }
        rc = model_open_single(m, path);
        goto out;
    }

    /* A directory: strip trailing slashes so that joined paths read well. */
    size_t dl = strlen(path);
    while (dl > 1 && path[dl - 1] == '/')
        dl--;
    m->dir = ms_strndup(path, dl);
    if (!m->dir) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    p = join(m->dir, INDEX_NAME);
    if (!p) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    rc = exists(p);
    if (rc < 0)
        goto out;
    if (rc == 1) {
        m->indexed = true;
        rc = model_load_index(m, p, NULL, 0);
        goto out;
    }
    ms_free(p);
    p = join(m->dir, SINGLE_NAME);
    if (!p) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    rc = exists(p);
    if (rc == 0) { /* a compressed single file */
        ms_free(p);
        p = join(m->dir, SINGLE_NAME ".zst");
        if (!p) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
            goto out;
        }
        rc = exists(p);
    }
    if (rc < 0)
        goto out;
    if (rc == 1) {
        rc = model_open_single(m, p);
        goto out;
    }
    static const char *const bins[] = {"pytorch_model.bin.index.json", "pytorch_model.bin"};
    for (size_t i = 0; i < MS_ARRAY_LEN(bins); i++) {
        ms_free(p);
        p = join(m->dir, bins[i]);
        if (!p) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
            goto out;
        }
        rc = exists(p);
        if (rc < 0)
            goto out;
        if (rc == 1) {
            rc = ms_error(MS_EUNSUPPORTED,
                          "%s: PyTorch .bin checkpoints are not supported; convert to safetensors",
                          m->dir);
            goto out;
        }
    }
    rc = ms_error(MS_EMODEL, "%s: no " SINGLE_NAME "(.zst) or " INDEX_NAME " in this directory",
                  m->dir);

out:
    ms_free(p);
    if (rc) {
        ms_model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

void ms_model_free(struct ms_model *m)
{
    if (!m)
        return;
    for (size_t s = 0; s < m->nshards; s++)
        ms_st_free(m->shards[s]);
    ms_free(m->shards);
    table_free(m->lookup);
    ms_free(m->dir);
    ms_free(m->path);
    ms_free(m);
}

const struct ms_st_tensor *ms_model_find(const struct ms_model *m, const char *name,
                                         uint32_t *shard)
{
    assert(m && name && m->lookup);
    const struct slot *sl = table_slot(m->lookup, name);
    if (!sl->name)
        return NULL;
    if (shard)
        *shard = sl->shard;
    return &m->shards[sl->shard]->tensors[sl->tensor];
}

const struct ms_st_tensor *ms_model_tensor_at(const struct ms_model *m, size_t i, uint32_t *shard)
{
    assert(m && m->lookup);
    const size_t *first = ((const struct table *)m->lookup)->first;
    if (i >= m->ntensors)
        return NULL;
    size_t lo = 0, hi = m->nshards; /* binary search: first[lo] <= i < first[hi] */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (first[mid] <= i)
            lo = mid;
        else
            hi = mid;
    }
    if (shard)
        *shard = (uint32_t)lo;
    return &m->shards[lo]->tensors[i - first[lo]];
}

int ms_model_read_file(const struct ms_model *m, const char *name, char **data, size_t *len)
{
    assert(m && name && data && len);
    *data = NULL;
    *len = 0;
    char *p = join(m->dir, name);
    if (!p)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc;
    if (ms_http_is_url(p)) {
        rc = ms_http_get_file(p, data, len);
    } else {
        struct stat st;
        rc = stat(p, &st) == 0 && S_ISREG(st.st_mode) ? ms_read_file(p, data, len) : 0;
        if (rc == 0 && *data)
            rc = 1;
    }
    ms_free(p);
    return rc;
}
