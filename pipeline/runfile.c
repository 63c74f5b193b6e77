/*
 * runfile.c - the run file beside a directory output (pipeline_impl.h,
 * ms_run_*): the fingerprint of the run and the checksum of every shard it
 * finished, so that --resume keeps a shard only when both match, and
 * `verify --deep` can check data, not only structure.
 *
 * Main thread, except ms_run_hash_file (any thread).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "ms_common.h"
#include "ms_poshash.h"
#include "ms_http.h"
#include "ms_str.h"
#include "pipeline_impl.h"
#include "lora_impl.h"

#define RUN_FORMAT "mergestream-run 2"

char *ms_run_path(const char *out, unsigned part_index, unsigned part_count)
{
    if (part_count > 1)
        return ms_asprintf("%s/.mergestream-part-%u-of-%u-run.json", out, part_index, part_count);
    return ms_asprintf("%s/.mergestream-run.json", out);
}

static void add_u64(struct ms_xxh64 *h, uint64_t v)
{
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    ms_xxh64_update(h, b, 8);
}

/* A string with its length, so that no two sequences of fields hash alike. */
static void add_str(struct ms_xxh64 *h, const char *s, size_t n)
{
    add_u64(h, n);
    ms_xxh64_update(h, s, n);
}

int ms_run_fingerprint(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                       uint64_t *fp)
{
    struct ms_xxh64 h;
    ms_xxh64_init(&h);
    add_str(&h, RUN_FORMAT, strlen(RUN_FORMAT));
    const struct ms_recipe *r = plan->recipe;
    add_str(&h, r && r->text ? r->text : "", r && r->text ? r->text_len : 0);
    /* The options that change bytes; the shard size shows in the layout below. */
    add_u64(&h, opts->seed);
    add_u64(&h, (uint64_t)opts->zstd_level);
    /* Every input file: path, size, modification time. */
    for (size_t i = 0; i < plan->nmodels; i++) {
        const struct ms_model *m = plan->models[i].model;
        add_str(&h, plan->models[i].path, strlen(plan->models[i].path));
        for (size_t s = 0; m && s < m->nshards; s++) {
            struct stat st;
            const char *p = m->shards[s]->path;
            if (ms_http_is_url(p)) { /* no mtime: its size and header length stand in */
                add_str(&h, p, strlen(p));
                add_u64(&h, m->shards[s]->file_size);
                add_u64(&h, m->shards[s]->header_len);
                continue;
            }
            if (stat(p, &st) < 0)
                return ms_error(-errno, "%s: %s", p, strerror(errno));
            add_str(&h, p, strlen(p));
            add_u64(&h, (uint64_t)st.st_size);
            add_u64(&h, (uint64_t)st.st_mtim.tv_sec);
            add_u64(&h, (uint64_t)st.st_mtim.tv_nsec);
        }
        /* model+lora: the adapter's files and fold dtype (nothing for other models) */
        int rc = plan->models[i].lora ? ms__lora_fingerprint(plan->models[i].lora, &h) : 0;
        if (rc < 0)
            return rc;
    }
    /* The output layout: every shard's name and header (names, dtypes, shapes, offsets). */
    const struct ms_layout *l = plan->layout;
    for (size_t k = 0; k < l->nshards; k++) {
        add_str(&h, l->shards[k].file_name, strlen(l->shards[k].file_name));
        add_str(&h, (const char *)l->shards[k].header, (size_t)l->shards[k].header_bytes);
    }
    *fp = ms_xxh64_digest(&h);
    return 0;
}

int ms_run_hash_file(const char *path, void *buf, size_t cap, const atomic_int *stop,
                     uint64_t *sum)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return ms_error(-errno, "%s: %s", path, strerror(errno));
    uint64_t acc = 0, off = 0;
    int rc = 0;
    for (;;) {
        if (stop && atomic_load(stop)) {
            rc = ms_error(MS_ECANCELED, "%s: checksum canceled", path);
            break;
        }
        ssize_t n = read(fd, buf, cap);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = ms_error(-errno, "%s: read failed: %s", path, strerror(errno));
            break;
        }
        if (n == 0)
            break;
        acc = ms_poshash_add(acc, ms_poshash_range(off, buf, (size_t)n));
        off += (uint64_t)n;
    }
    close(fd);
    if (!rc)
        *sum = ms_poshash_digest(acc, off);
    return rc;
}

int ms_run_load(const char *path, struct ms_run *run)
{
    memset(run, 0, sizeof *run);
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return ms_error(MS_EINVAL, "%s: cannot read the run file: %s", path, jerr.text);
    int rc = 0;
    const char *fmt = json_string_value(json_object_get(root, "format"));
    const char *fp = json_string_value(json_object_get(root, "fingerprint"));
    json_t *shards = json_object_get(root, "shards");
    if (!fmt || strcmp(fmt, RUN_FORMAT) || !fp || sscanf(fp, "%16" SCNx64, &run->fingerprint) != 1 ||
        !json_is_object(shards)) {
        rc = ms_error(MS_EINVAL, "%s: not a mergestream run file", path);
        goto out;
    }
    run->shards = json_incref(shards);
out:
    json_decref(root);
    return rc;
}

int ms_run_checksum(const struct ms_run *run, const char *name, uint64_t *sum)
{
    const char *v = json_string_value(json_object_get((json_t *)run->shards, name));
    return v && strlen(v) == 16 && sscanf(v, "%16" SCNx64, sum) == 1 ? 0 : -1;
}

void ms_run_fini(struct ms_run *run)
{
    json_decref((json_t *)run->shards);
    run->shards = NULL;
}

int ms_run_save(const char *path, uint64_t fp, const char *const *names, const uint64_t *sums,
                const bool *have, size_t n)
{
    struct ms_strbuf b = { 0 };
    ms_strbuf_addf(
        &b,
        "{\n  \"format\": \"%s\",\n  \"fingerprint\": \"%016" PRIx64 "\",\n"
        "  \"checksum\": \"poshash1 of the file's bytes (docs/RELIABILITY.md)\",\n  \"shards\": {",
        RUN_FORMAT, fp);
    bool first = true;
    for (size_t k = 0; k < n; k++) {
        if (!have[k])
            continue;
        ms_strbuf_addf(&b, "%s\n    \"%s\": \"%016" PRIx64 "\"", first ? "" : ",", names[k],
                       sums[k]);
        first = false;
    }
    ms_strbuf_addstr(&b, first ? "}\n}\n" : "\n  }\n}\n");
    if (b.oom) {
        ms_strbuf_fini(&b);
        return ms_error(MS_ENOMEM, "out of memory");
    }
    int rc = ms_write_file_atomic(path, b.p, b.len);
    ms_strbuf_fini(&b);
    return rc;
}

/* Checks every shard one run file lists; *n counts them. */
static int verify_one(const char *dir, const char *rpath, void *buf, size_t *n)
{
    struct ms_run run;
    int rc = ms_run_load(rpath, &run);
    if (rc)
        return rc;
    const char *name;
    json_t *v;
    json_object_foreach((json_t *)run.shards, name, v) {
        uint64_t want, got;
        char *p = ms_asprintf("%s/%s", dir, name);
        if (!p) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            break;
        }
        if (strchr(name, '/') || ms_run_checksum(&run, name, &want) < 0)
            rc = ms_error(MS_EINVAL, "%s: bad entry for '%s'", rpath, name);
        else
            rc = ms_run_hash_file(p, buf, 1u << 20, NULL, &got);
        if (!rc && got != want)
            rc = ms_error(MS_EDATA, "%s: checksum %016" PRIx64 " differs from the %016" PRIx64
                          " recorded in %s when it was finished", p, got, want, rpath);
        ms_free(p);
        if (rc)
            break;
        (*n)++;
    }
    ms_run_fini(&run);
    return rc;
}

int ms_engine_verify_checksums(const char *dir, size_t *nchecked)
{
    *nchecked = 0;
    DIR *d = opendir(dir);
    if (!d)
        return ms_error(-errno, "%s: %s", dir, strerror(errno));
    void *buf = ms_malloc(1u << 20);
    int rc = buf ? 0 : ms_error(MS_ENOMEM, "out of memory");
    size_t nfiles = 0;
    struct dirent *e;
    while (!rc && (e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, ".mergestream", 12) || len < 8 ||
            strcmp(e->d_name + len - 8, "run.json"))
            continue;
        char *rpath = ms_asprintf("%s/%s", dir, e->d_name);
        rc = rpath ? verify_one(dir, rpath, buf, nchecked) : ms_error(MS_ENOMEM, "out of memory");
        ms_free(rpath);
        nfiles++;
    }
    closedir(d);
    ms_free(buf);
    if (!rc && !nfiles)
        rc = ms_error(MS_EINVAL, "%s: no run file (.mergestream-run.json) to check the shards "
                      "against: one exists while a merge runs and after it was stopped, and is "
                      "removed when it completes", dir);
    return rc;
}
