/*
 * cli_inspect.c - `mergestream inspect` (list a model's tensors) and
 * `mergestream verify` (check safetensors files against the format rules).
 * Both only read headers.
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_plan.h"
#include "ms_engine.h"
#include "ms_str.h"
#include "ms_safetensors.h"

#include "cli.h"

static const char inspect_usage[] = "usage: mergestream inspect MODEL|FILE [--json]\n";
static const char inspect_help[] =
    "\n"
    "Lists the tensors of a model directory (model.safetensors.index.json or\n"
    "model.safetensors) or of one .safetensors file: name, dtype, shape, bytes and\n"
    "the file that holds it, then a totals line. Only headers are read. MODEL may be\n"
    "a hub id (org/name) in the Hugging Face cache, as in a recipe.\n"
    "\n"
    "options:\n"
    "  --json / --no-json  print a JSON object instead of the table\n"
    "  -h, --help          show this help\n";

static const char verify_usage[] = "usage: mergestream verify [--deep] MODEL|FILE...\n";
static const char verify_help[] =
    "\n"
    "Checks each safetensors file against the rules the official reader enforces\n"
    "(header length, UTF-8, JSON schema, dtypes, contiguous offsets, sizes, no\n"
    "trailing or missing bytes). For a directory, checks every *.safetensors file\n"
    "in it and cross-checks model.safetensors.index.json against the shards. MODEL\n"
    "may be a hub id (org/name) in the Hugging Face cache, as in a recipe.\n"
    "Prints \"ok: PATH (N tensors, B bytes)\" per valid path (B: tensor data bytes);\n"
    "otherwise one diagnostic line per invalid path and exit status 1.\n"
    "\n"
    "options:\n"
    "  --deep       also check data: for a directory a merge is writing or was\n"
    "               stopped in, recompute each finished shard's checksum and compare\n"
    "               it with the one its run file (.mergestream-run.json) recorded\n"
    "               (a completed merge removes that file: nothing to compare)\n"
    "  -h, --help   show this help\n";

/* Prints "mergestream: <cmd>: <what>" and the usage line; returns exit status 2. */
static int usage_error(const char *usage, const char *cmd, const char *what, const char *arg)
{
    fprintf(stderr, "mergestream: %s: %s%s%s%s\n", cmd, what, arg ? " '" : "", arg ? arg : "",
            arg ? "'" : "");
    fputs(usage, stderr);
    return 2;
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static void shape_str(char *buf, size_t cap, const struct ms_st_tensor *t)
{
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (uint32_t i = 0; i < t->ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%" PRId64, i ? ", " : "", t->shape[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, "]");
}

/*
 * The path to open for MODEL|FILE: a hub id "org/name" that is not a local path
 * but is in the Hugging Face cache gives its snapshot directory (ms_model_resolve,
 * as a recipe's model); anything else is opened as given, so that a missing path is
 * reported as before. Returns a copy to ms_free, or NULL when out of memory.
 */
static char *local_path(const char *ref)
{
    struct stat st;
    char *dir = NULL;
    if (stat(ref, &st) < 0 && errno == ENOENT && ms_model_resolve(ref, NULL, &dir) == 0)
        return dir;
    ms_error_clear();
    return ms_strdup(ref);
}

/* s with control characters escaped (ms_str_escape), in b (reset first); "?" without memory. */
static const char *esc(struct ms_strbuf *b, const char *s)
{
    ms_strbuf_reset(b);
    ms_str_escape(b, s);
    ms_strbuf_addstr(b, "");
    return b->oom ? "?" : b->p;
}

/* ------------------------------------------------------------------ inspect */

static uint64_t model_data_bytes(const struct ms_model *m)
{
    uint64_t b = 0;
    for (size_t s = 0; s < m->nshards; s++)
        for (size_t i = 0; i < m->shards[s]->ntensors; i++)
            b += m->shards[s]->tensors[i].end - m->shards[s]->tensors[i].begin;
    return b;
}

static int inspect_table(const struct ms_model *m)
{
    char sb[256];
    struct ms_strbuf en = { 0 }, ef = { 0 };
    int wn = 4, wd = 5, ws = 5, wb = 5;
    for (size_t i = 0; i < m->ntensors; i++) {
        const struct ms_st_tensor *t = ms_model_tensor_at(m, i, NULL);
        char nb[32];
        shape_str(sb, sizeof sb, t);
        snprintf(nb, sizeof nb, "%" PRIu64, t->end - t->begin);
        wn = MS_MAX(wn, (int)strlen(esc(&en, t->name)));
        wd = MS_MAX(wd, (int)strlen(ms_dtype_name(t->dtype)));
        ws = MS_MAX(ws, (int)strlen(sb));
        wb = MS_MAX(wb, (int)strlen(nb));
    }
    printf("%-*s  %-*s  %-*s  %*s  %s\n", wn, "NAME", wd, "DTYPE", ws, "SHAPE", wb, "BYTES", "FILE");
    for (size_t i = 0; i < m->ntensors; i++) {
        uint32_t s;
        const struct ms_st_tensor *t = ms_model_tensor_at(m, i, &s);
        shape_str(sb, sizeof sb, t);
        printf("%-*s  %-*s  %-*s  %*" PRIu64 "  %s\n", wn, esc(&en, t->name), wd,
               ms_dtype_name(t->dtype), ws, sb, wb, t->end - t->begin,
               esc(&ef, base_name(m->shards[s]->path)));
    }
    ms_strbuf_fini(&en);
    ms_strbuf_fini(&ef);
    printf("total: %zu tensors, %" PRIu64 " bytes, %zu file%s\n", m->ntensors,
           model_data_bytes(m), m->nshards, m->nshards == 1 ? "" : "s");
    return 0;
}

/* The same data as the table, as one JSON object on stdout. */
static int inspect_json(const struct ms_model *m)
{
    json_t *root = json_object(), *files = json_array(), *tensors = json_array();
    int rc = 1;
    if (!root || !files || !tensors)
        goto out;
    json_object_set_new(root, "path", json_string(m->path));
    json_object_set_new(root, "indexed", json_boolean(m->indexed));
    for (size_t s = 0; s < m->nshards; s++) {
        const struct ms_st_file *f = m->shards[s];
        json_array_append_new(files, json_pack("{s:s, s:I, s:I, s:I}", "file", base_name(f->path),
                                               "header_bytes", (json_int_t)f->data_start,
                                               "file_bytes", (json_int_t)f->file_size,
                                               "tensors", (json_int_t)f->ntensors));
    }
    for (size_t i = 0; i < m->ntensors; i++) {
        uint32_t s;
        const struct ms_st_tensor *t = ms_model_tensor_at(m, i, &s);
        json_t *shape = json_array();
        for (uint32_t d = 0; d < t->ndim; d++)
            json_array_append_new(shape, json_integer(t->shape[d]));
        json_array_append_new(
            tensors, json_pack("{s:s, s:s, s:o, s:I, s:s, s:[I, I]}", "name", t->name, "dtype",
                               ms_dtype_name(t->dtype), "shape", shape, "bytes",
                               (json_int_t)(t->end - t->begin), "file",
                               base_name(m->shards[s]->path), "data_offsets",
                               (json_int_t)t->begin, (json_int_t)t->end));
    }
    json_object_set(root, "files", files);
    json_object_set(root, "tensors", tensors);
    json_object_set_new(root, "total_tensors", json_integer((json_int_t)m->ntensors));
    json_object_set_new(root, "total_bytes", json_integer((json_int_t)model_data_bytes(m)));
    if (json_array_size(tensors) != m->ntensors || json_array_size(files) != m->nshards)
        goto out; /* an allocation inside jansson failed */
    if (json_dumpf(root, stdout, JSON_INDENT(2)) == 0 && fputc('\n', stdout) != EOF)
        rc = 0;

out:
    if (rc)
        fprintf(stderr, "mergestream: inspect: out of memory\n");
    json_decref(files);
    json_decref(tensors);
    json_decref(root);
    return rc;
}

int ms_cli_inspect(int argc, char **argv)
{
    const char *path = NULL;
    bool as_json = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("%s%s", inspect_usage, inspect_help);
            return 0;
        }
        if (!strcmp(a, "--json"))
            as_json = true;
        else if (!strcmp(a, "--no-json"))
            as_json = false;
        else if (a[0] == '-' && a[1])
            return usage_error(inspect_usage, "inspect", "unknown option", a);
        else if (path)
            return usage_error(inspect_usage, "inspect", "unexpected argument", a);
        else
            path = a;
    }
    if (!path)
        return usage_error(inspect_usage, "inspect", "missing MODEL or FILE", NULL);

    struct ms_model *m = NULL;
    ms_error_clear();
    char *dir = local_path(path);
    int rc = dir ? ms_model_open(dir, &m) : ms_error(MS_ENOMEM, "out of memory");
    ms_free(dir);
    if (rc) {
        ms_cli_report(rc, NULL);
        return 1;
    }
    int st = as_json ? inspect_json(m) : inspect_table(m);
    ms_model_free(m);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "mergestream: inspect: cannot write output: %s\n", strerror(errno));
        return 1;
    }
    return st;
}

/* ------------------------------------------------------------------ verify */

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

/* Checks one file; adds its tensors and data bytes to the totals. */
static int verify_file(const char *path, size_t *ntensors, uint64_t *bytes)
{
    struct ms_st_file *f = NULL;
    int rc = ms_st_open(path, &f);
    if (rc)
        return rc;
    *ntensors += f->ntensors;
    *bytes += f->file_size - f->data_start;
    ms_st_free(f);
    return 0;
}

/*
 * Checks every *.safetensors file of a directory in name order, then the
 * model as a whole (index cross-check, or the right error for a directory
 * without safetensors files).
 */
static int verify_dir(const char *dir, size_t *ntensors, uint64_t *bytes)
{
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct ms_model *m = NULL;
    int rc = 0;

    DIR *d = opendir(dir);
    if (!d)
        return ms_error(-errno, "%s: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!ends_with(e->d_name, ".safetensors"))
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            char **nn = ms_realloc(names, cap * sizeof *names);
            if (!nn) {
                rc = ms_error(MS_ENOMEM, "%s: out of memory", dir);
                goto out;
            }
            names = nn;
        }
        names[n] = ms_asprintf("%s/%s", dir, e->d_name);
        if (!names[n]) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", dir);
            goto out;
        }
        n++;
    }
    if (n)
        qsort(names, n, sizeof *names, name_cmp);
    for (size_t i = 0; i < n; i++) {
        struct stat st;
        if (stat(names[i], &st) == 0 && S_ISDIR(st.st_mode))
            continue;
        rc = verify_file(names[i], ntensors, bytes);
        if (rc)
            goto out;
    }
    /* The model view: the index cross-check, or why there is no model here. */
    rc = ms_model_open(dir, &m);
    if (rc == MS_EMODEL && n > 0)
        rc = 0; /* loose .safetensors files with no model layout are still files */
    if (rc)
        goto out;
    if (n == 0 && m) {
        /* an index whose shard names lack the .safetensors suffix */
        *ntensors += m->ntensors;
        *bytes += model_data_bytes(m);
    }

out:
    ms_model_free(m);
    if (d)
        closedir(d);
    for (size_t i = 0; i < n; i++)
        ms_free(names[i]);
    ms_free(names);
    return rc;
}

int ms_cli_verify(int argc, char **argv)
{
    const char **paths = ms_calloc((size_t)argc, sizeof *paths);
    size_t np = 0;
    bool opts = true, deep = false;
    int status = 0;

    if (!paths) {
        fprintf(stderr, "mergestream: verify: out of memory\n");
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (opts && !strcmp(a, "--")) {
            opts = false;
        } else if (opts && (!strcmp(a, "-h") || !strcmp(a, "--help"))) {
            printf("%s%s", verify_usage, verify_help);
            goto out;
        } else if (opts && !strcmp(a, "--deep")) {
            deep = true;
        } else if (opts && a[0] == '-' && a[1]) {
            status = usage_error(verify_usage, "verify", "unknown option", a);
            goto out;
        } else {
            paths[np++] = a;
        }
    }
    if (!np) {
        status = usage_error(verify_usage, "verify", "missing MODEL or FILE", NULL);
        goto out;
    }

    for (size_t i = 0; i < np; i++) {
        const char *p = paths[i];
        size_t ntensors = 0;
        uint64_t bytes = 0;
        struct stat st;
        int rc;
        ms_error_clear();
        /* A hub id in the cache is checked as its snapshot directory. */
        char *hub = local_path(p);
        p = hub ? hub : p;
        if (!hub)
            rc = ms_error(MS_ENOMEM, "out of memory");
        else if (stat(p, &st) < 0)
            rc = ms_error(-errno, "%s: %s", p, strerror(errno));
        else if (S_ISDIR(st.st_mode))
            rc = verify_dir(p, &ntensors, &bytes);
        else
            rc = verify_file(p, &ntensors, &bytes);
        size_t nsum = 0;
        if (!rc && deep && S_ISDIR(st.st_mode))
            rc = ms_engine_verify_checksums(p, &nsum);
        if (!rc && deep && !S_ISDIR(st.st_mode))
            rc = ms_error(MS_EINVAL, "%s: --deep checks a merge's output directory", p);
        if (rc) {
            ms_cli_report(rc, NULL);
            status = 1;
        } else {
            struct ms_strbuf ep = { 0 };
            printf("ok: %s (%zu tensors, %" PRIu64 " bytes", esc(&ep, paths[i]), ntensors, bytes);
            if (deep)
                printf("; %zu shard checksum%s", nsum, nsum == 1 ? " matches" : "s match");
            printf(")\n");
            ms_strbuf_fini(&ep);
        }
        ms_free(hub);
    }
    if (fflush(stdout) != 0) {
        fprintf(stderr, "mergestream: verify: cannot write output: %s\n", strerror(errno));
        status = 1;
    }

out:
    ms_free(paths);
    return status;
}
