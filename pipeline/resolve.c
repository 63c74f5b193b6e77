/*
 * resolve.c - model references (DESIGN.md section 1): an http(s) URL (kept as it
 * is), hf://org/name[@revision] (the hub's resolve/REVISION URL, read remotely),
 * a path that exists, else a hub id found in the local Hugging Face cache.
 * Nothing is downloaded here.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ms_common.h"
#include "ms_file.h"
#include "ms_http.h"
#include "ms_plan.h"
#include "ms_safetensors.h"

static bool path_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

static bool is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* "org/name": two non-empty parts of [A-Za-z0-9._-], neither "." nor "..". */
static bool is_hub_id(const char *ref)
{
    const char *slash = strchr(ref, '/');
    if (!slash || slash == ref || !slash[1] || strchr(slash + 1, '/'))
        return false;
    for (const char *p = ref; *p; p++)
        if (p != slash && !isalnum((unsigned char)*p) && !strchr("._-", *p))
            return false;
    size_t n1 = (size_t)(slash - ref);
    if ((n1 == 1 && ref[0] == '.') || (n1 == 2 && !strncmp(ref, "..", 2)))
        return false;
    return strcmp(slash + 1, ".") && strcmp(slash + 1, "..");
}

/* A revision names a file under refs/: no empty, "." or ".." component, not absolute. */
static bool rev_name_ok(const char *rev)
{
    if (!*rev || rev[0] == '/')
        return false;
    for (const char *p = rev;;) {
        const char *e = strchr(p, '/');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
            return false;
        if (!e)
            return true;
        p = e + 1;
    }
}

static bool is_commit_hash(const char *s)
{
    size_t n = strlen(s);
    if (n != 40)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i]))
            return false;
    return true;
}

/* The hub cache root: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub. */
static char *cache_root(void)
{
    const char *v = getenv("HF_HUB_CACHE");
    if (v && *v)
        return ms_strdup(v);
    v = getenv("HF_HOME");
    if (v && *v)
        return ms_asprintf("%s/hub", v);
    v = getenv("HOME");
    return ms_asprintf("%s/.cache/huggingface/hub", v && *v ? v : ".");
}

/* "%XX" for every byte a URL path segment cannot hold as it is. */
static char *url_escape(const char *s)
{
    char *o = ms_malloc(3 * strlen(s) + 1), *q = o;
    if (!o)
        return NULL;
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (isalnum(ch) || strchr("._-~", ch))
            *q++ = (char)ch;
        else
            q += sprintf(q, "%%%02X", ch);
    }
    *q = 0;
    return o;
}

/*
 * "hf://org/name" at revision rev (NULL: main) -> the hub's file URL prefix
 * "ENDPOINT/org/name/resolve/REV" (the revision escaped, as huggingface_hub does).
 */
static int resolve_hf(const char *ref, const char *revision, char **out)
{
    const char *id = ref + 5;
    const char *rev = revision ? revision : "main";
    if (!is_hub_id(id))
        return ms_error(MS_EMODEL, "model '%s': expected hf://org/name[@revision]", ref);
    if (!rev_name_ok(rev))
        return ms_error(MS_EMODEL,
                        "model '%s': revision '%s' is not a branch, tag or commit "
                        "name",
                        ref, rev);
    char *ep = ms_http_hf_endpoint(), *erev = url_escape(rev);
    *out = ep && erev ? ms_asprintf("%s/%s/resolve/%s", ep, id, erev) : NULL;
    ms_free(ep);
    ms_free(erev);
    return *out ? 0 : ms_error(MS_ENOMEM, "out of memory");
}

int ms_model_resolve(const char *ref, const char *revision, char **out)
{
    *out = NULL;
    int rc = 0;
    char *root = NULL, *repo = NULL, *refs = NULL, *hash = NULL, *snap = NULL;

    if (!strncmp(ref, "hf://", 5))
        return resolve_hf(ref, revision, out);
    if (ms_http_is_url(ref)) {
        if (revision)
            return ms_error(MS_EMODEL,
                            "model '%s': a revision (@%s) applies to hf:// and hub "
                            "ids, not to an http(s) URL",
                            ref, revision);
        *out = ms_strdup(ref);
        return *out ? 0 : ms_error(MS_ENOMEM, "out of memory");
    }

    if (path_exists(ref) || !is_hub_id(ref)) {
        if (!path_exists(ref))
            return ms_error(MS_EMODEL, "model '%s' not found (no such file or directory)", ref);
        *out = ms_strdup(ref);
        return *out ? 0 : ms_error(MS_ENOMEM, "out of memory");
    }
    const char *slash = strchr(ref, '/');
    root = cache_root();
    if (!root) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    repo = ms_asprintf("%s/models--%.*s--%s", root, (int)(slash - ref), ref, slash + 1);
    if (!repo) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    if (!is_dir(repo)) {
        rc = ms_error(MS_EMODEL, "model '%s' not found locally or in the Hugging Face cache "
                      "(%s); download it first", ref, repo);
        goto out;
    }
    const char *rev = revision ? revision : "main";
    if (!rev_name_ok(rev)) {
        rc = ms_error(MS_EMODEL, "model '%s': revision '%s' is not a branch, tag or commit name",
                      ref, rev);
        goto out;
    }
    if (is_commit_hash(rev)) {
        hash = ms_strdup(rev);
    } else {
        refs = ms_asprintf("%s/refs/%s", repo, rev);
        size_t len;
        if (!refs) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            goto out;
        }
        if (ms_read_file(refs, &hash, &len) < 0) {
            hash = NULL;
            rc = ms_error(MS_EMODEL, "model '%s': revision '%s' not found in the Hugging Face "
                          "cache (%s); download it first", ref, rev, refs);
            goto out;
        }
        /* The ref file holds the commit hash, possibly followed by a newline. */
        size_t n = strlen(hash);
        while (n && isspace((unsigned char)hash[n - 1]))
            hash[--n] = 0;
        /* Used as a path component below: only a commit hash will do. */
        if (!is_commit_hash(hash)) {
            rc = ms_error(MS_EMODEL, "model '%s': %s does not hold a commit hash", ref, refs);
            goto out;
        }
    }
    if (!hash) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    snap = ms_asprintf("%s/snapshots/%s", repo, hash);
    if (!snap) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    if (!is_dir(snap)) {
        rc = ms_error(MS_EMODEL, "model '%s': snapshot %s of revision '%s' is missing from the "
                      "Hugging Face cache (%s); download it first", ref, hash, rev, snap);
        goto out;
    }
    /* The snapshot (a folder, possibly a symlink) must resolve inside the repository's. */
    char *rrepo = realpath(repo, NULL);
    int in = rrepo ? ms_path_inside(rrepo, snap, NULL) : -errno;
    free(rrepo);
    if (in <= 0) {
        rc = ms_error(MS_EMODEL, "model '%s': snapshot %s resolves outside the repository "
                      "folder %s", ref, snap, repo);
        goto out;
    }
    *out = snap;
    snap = NULL;
out:
    ms_free(root);
    ms_free(repo);
    ms_free(refs);
    ms_free(hash);
    ms_free(snap);
    return rc;
}
