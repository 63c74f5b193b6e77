/*
 * outdir.c - everything in the output directory besides the tensor shards:
 * the index, config.json, the model card, the saved recipe and the tokenizer
 * files copied from the donor model (mergekit-spec.md 4.2, 4.4-4.7).
 * Runs on the main thread, synchronously, after the loop has finished.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ms_chat_template.h"
#include "ms_common.h"
#include "ms_file.h"
#include "ms_http.h"
#include "ms_str.h"
#include "ms_tokmerge.h"
#include "pipeline_impl.h"
#include "plan_impl.h"

#define LOCK_NAME ".mergestream.lock"
/* What the model card says, and how an earlier run's card is recognised. */
#define CARD_MARK "created with mergestream"

static int mkdir_p(const char *path)
{
    if (!path[0])
        return ms_error(MS_EINVAL, "output directory: empty name");
    char *p = ms_strdup(path);
    if (!p)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = 0;
    for (char *c = p + 1;; c++) {
        if (*c == '/' || *c == 0) {
            char save = *c;
            *c = 0;
            if (mkdir(p, 0755) < 0 && errno != EEXIST) {
                rc = ms_error(-errno, "%s: cannot create directory: %s", p, strerror(errno));
                break;
            }
            *c = save;
            if (!save)
                break;
        }
    }
    ms_free(p);
    return rc;
}

/* ------------------------------------------------------------------ before the run */

/* path resolved as far as it exists, the rest appended as written: where OUT
 * will be once created. NULL without memory (or if nothing resolves). */
static char *resolve_prefix(const char *path)
{
    char *p = ms_strdup(path);
    if (!p)
        return NULL;
    size_t n = strlen(p);
    char *r = NULL;
    for (;;) {
        char *real = realpath(n ? p : ".", NULL);
        if (real) {
            const char *rest = path + n;
            while (*rest == '/')
                rest++;
            size_t rl = strlen(rest);
            while (rl && rest[rl - 1] == '/')
                rl--;
            bool root = !strcmp(real, "/");
            r = rl ? ms_asprintf("%s%s%.*s", root ? "" : real, "/", (int)rl, rest)
                   : ms_strdup(real);
            free(real);
            break;
        }
        if (!n)
            break;
        while (n && p[n - 1] == '/') /* drop the last component */
            n--;
        while (n && p[n - 1] != '/')
            n--;
        p[n] = 0;
    }
    ms_free(p);
    return r;
}

/* 1 when a and b name the same folder or one lies inside the other (both resolved). */
static int nested(const char *a, const char *b, bool *a_in_b)
{
    size_t na = strlen(a), nb = strlen(b);
    size_t n = na < nb ? na : nb;
    if (strncmp(a, b, n))
        return 0;
    const char *longer = na >= nb ? a : b;
    if (longer[n] != 0 && longer[n] != '/' && !(n == 1 && longer[0] == '/'))
        return 0;
    *a_in_b = na >= nb;
    return 1;
}

/* Item: OUT must neither be, lie inside, nor contain an input model's folder. */
static int check_not_input(const struct ms_plan *plan, const char *out)
{
    char *ro = resolve_prefix(out);
    if (!ro)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = 0;
    struct stat so;
    bool have_so = stat(out, &so) == 0;
    for (size_t i = 0; i < plan->nmodels && !rc; i++) {
        const char *mp = plan->models[i].path;
        struct stat sm;
        char *dir = NULL, *root = NULL;
        if (stat(mp, &sm) == 0 && !S_ISDIR(sm.st_mode)) { /* a single-file model: its folder */
            const char *slash = strrchr(mp, '/');
            dir = slash ? ms_strndup(mp, slash == mp ? 1 : (size_t)(slash - mp)) : ms_strdup(".");
        } else {
            dir = ms_strdup(mp);
        }
        if (!dir) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            break;
        }
        struct stat sd;
        bool same = have_so && stat(dir, &sd) == 0 && sd.st_dev == so.st_dev &&
                    sd.st_ino == so.st_ino;
        bool out_in = false;
        if (ms_path_model_root(dir, &root) == 0) {
            if (same || nested(ro, root, &out_in))
                rc = ms_error(MS_EINVAL, "%s: output directory %s input model %s (%s); "
                              "choose another output directory", out,
                              same ? "is" : out_in ? "is inside" : "contains",
                              plan->models[i].ref, root);
        } else {
            ms_error_clear();
        }
        ms_free(root);
        ms_free(dir);
    }
    ms_free(ro);
    return rc;
}

/* Whether the file at dir/name starts with our model card. */
static bool card_is_ours(int dfd, const char *name)
{
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return false;
    char buf[4096];
    ssize_t r = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (r <= 0)
        return false;
    buf[r] = 0;
    return strstr(buf, CARD_MARK) != NULL;
}

static bool our_name(const char *name);

/* What an existing OUT holds: anything at all, and signs of an earlier run of
 * ours (our lock file, or our model card); *only_our_names: every entry has a
 * name mergestream writes. */
static int scan_out(const char *out, bool *nonempty, bool *ours, bool *only_our_names)
{
    *only_our_names = true;
    *nonempty = *ours = false;
    DIR *d = opendir(out);
    if (!d)
        return ms_error(-errno, "%s: cannot read directory: %s", out, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        *nonempty = true;
        if (!our_name(e->d_name) && strncmp(e->d_name, ".mergestream", 12))
            *only_our_names = false;
        if (!strncmp(e->d_name, ".mergestream", 12) ||
            (!strcmp(e->d_name, "README.md") && card_is_ours(dirfd(d), e->d_name)))
            *ours = true;
    }
    closedir(d);
    return 0;
}

/* OUT/.mergestream.lock; parts of one merge, which may run at once into one
 * (shared) directory, each take their own: .mergestream-part-I-of-N.lock. */
static char *lock_path(const struct ms_engine_opts *opts)
{
    if (opts->part_count > 1)
        return ms_asprintf("%s/.mergestream-part-%u-of-%u.lock", opts->out, opts->part_index,
                           opts->part_count);
    return ms_asprintf("%s/" LOCK_NAME, opts->out);
}

/* Takes OUT's lock file: created if missing, flock'ed without waiting, our pid
 * written into it. A file unlinked by its holder between our open and flock is
 * not the lock any more: opened again. */
static int take_lock(const char *out, const struct ms_engine_opts *opts, int *lock_fd)
{
    char *path = lock_path(opts);
    if (!path)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = 0, fd = -1;
    for (int tries = 0; tries < 100; tries++) {
        fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0) {
            rc = ms_error(-errno, "%s: cannot create lock file: %s", path, strerror(errno));
            goto out;
        }
        if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
            if (errno != EWOULDBLOCK) {
                rc = ms_error(-errno, "%s: cannot lock: %s", path, strerror(errno));
                goto out;
            }
            char buf[32] = "";
            ssize_t r = pread(fd, buf, sizeof buf - 1, 0);
            buf[r > 0 ? r : 0] = 0;
            buf[strcspn(buf, "\n")] = 0;
            rc = ms_error(MS_EINVAL, "%s: another mergestream run (pid %s) is writing into this "
                          "directory", out, buf[0] ? buf : "unknown");
            goto out;
        }
        struct stat a, b;
        if (fstat(fd, &a) == 0 && lstat(path, &b) == 0 && a.st_dev == b.st_dev &&
            a.st_ino == b.st_ino && S_ISREG(a.st_mode))
            break;
        close(fd);
        fd = -1;
    }
    if (fd < 0) {
        rc = ms_error(MS_EINVAL, "%s: cannot take the lock file", path);
        goto out;
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) < 0 || pwrite(fd, pid, (size_t)n, 0) != n) {
        rc = ms_error(-errno, "%s: cannot write lock file: %s", path, strerror(errno));
        goto out;
    }
    *lock_fd = fd;
    fd = -1;
out:
    if (fd >= 0)
        close(fd);
    ms_free(path);
    return rc;
}

static int check_tokenizer(const struct ms_plan *plan);

int ms_outdir_prepare(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                      struct ms_outdir *od)
{
    od->lock_fd = -1;
    od->was_ours = false;
    bool small_files = opts->part_count <= 1 || opts->part_index == 1;
    if (opts->copy_tokenizer && small_files && !plan->tok) {
        int rc = check_tokenizer(plan);
        if (rc)
            return rc;
    }
    if (opts->kind != MS_OUT_DIR)
        return 0;
    const char *out = opts->out;
    if (!out[0])
        return ms_error(MS_EINVAL, "output directory: empty name");
    int rc = check_not_input(plan, out);
    if (rc)
        return rc;
    rc = mkdir_p(out);
    if (rc)
        return rc;
    struct stat st;
    if (stat(out, &st) < 0 && lstat(out, &st) == 0 && S_ISLNK(st.st_mode))
        return ms_error(MS_EINVAL, "%s: output path is a symbolic link to a missing target", out);
    if (stat(out, &st) < 0 || !S_ISDIR(st.st_mode))
        return ms_error(MS_EINVAL, "%s: output path exists and is not a directory", out);
    if (access(out, W_OK) < 0)
        return ms_error(-errno, "%s: output directory is not writable: %s", out,
                        strerror(errno));
    bool nonempty, ours, only_ours;
    rc = scan_out(out, &nonempty, &ours, &only_ours);
    if (rc)
        return rc;
    /* Parts of one merge share OUT: another part's shards (no card) are ours. */
    if (opts->part_count > 1 && only_ours)
        ours = true;
    if (nonempty && !ours && !opts->resume && !opts->force)
        return ms_error(MS_EINVAL, "%s: directory is not empty and holds no earlier mergestream "
                        "output; choose an empty one, or use --force to write into it", out);
    od->was_ours = ours;
    return take_lock(out, opts, &od->lock_fd);
}

/* Where finish() sends small files: a directory, or an ms_out stream. */
struct emit {
    const char *dir;
    struct ms_out *out;
};

static int write_in(const struct emit *em, const char *name, const void *data, size_t len,
                    unsigned mode)
{
    if (em->out) {
        ms_out_file_mode(em->out, mode);
        int rc = ms_out_file_begin(em->out, name, len, NULL);
        if (!rc)
            rc = ms_out_file_write(em->out, data, len);
        if (!rc)
            rc = ms_out_file_end(em->out);
        return rc;
    }
    char *path = ms_asprintf("%s/%s", em->dir, name);
    if (!path)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = ms_write_file_atomic_mode(path, data, len, mode);
    ms_free(path);
    return rc;
}

static bool file_exists(const char *dir, const char *name)
{
    char *path = ms_asprintf("%s/%s", dir, name);
    bool ok = path && access(path, R_OK) == 0;
    ms_free(path);
    return ok;
}

/* Tokenizer files mergekit copies verbatim from the donor (4.6). */
static const char *const tokenizer_files[] = {
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "video_preprocessor_config.json",
};
_Static_assert(MS_ARRAY_LEN(tokenizer_files) <= MS_ARRAY_LEN(((struct ms_outdir *)0)->copied),
               "struct ms_outdir's copied[] holds one flag per tokenizer file");

/*
 * Whether a donor file is left out. With chat_template in the recipe, mergekit
 * re-serialises the tokenizer (transformers' save_pretrained) instead of copying
 * it, which writes neither generation_config.json nor video_preprocessor_config.json;
 * and when a template is written (tmpl), the donor's chat_template.jinja/.json,
 * which the loaders would prefer to it, are not copied either.
 */
static bool tokenizer_file_dropped(const struct ms_plan *plan, const char *name, bool tmpl)
{
    if (tmpl && (!strcmp(name, "chat_template.jinja") || !strcmp(name, "chat_template.json")))
        return true;
    return plan->recipe && plan->recipe->chat_template &&
           (!strcmp(name, "generation_config.json") ||
            !strcmp(name, "video_preprocessor_config.json"));
}

/*
 * Donor file `name` for copying: it must resolve (symlinks followed) to a
 * regular file inside the donor's folder (for a Hugging Face cache snapshot, the
 * repository folder, whose blobs/ its symlinks point into). Returns 1 with
 * *real (ms_free) and *mode (the file's bits, narrowed to 0644) when it may be
 * copied, 0 when it is absent, or a negative error naming it.
 */
static int tokenizer_source(const char *dir, const char *root, const char *name, char **real,
                            unsigned *mode)
{
    *real = NULL;
    char *src = ms_asprintf("%s/%s", dir, name);
    if (!src)
        return ms_error(MS_ENOMEM, "out of memory");
    struct stat st;
    int rc = 0;
    if (lstat(src, &st) < 0) {
        rc = errno == ENOENT ? 0 : ms_error(-errno, "%s: %s", src, strerror(errno));
        goto out;
    }
    rc = ms_path_inside(root, src, real);
    if (rc == -ENOENT) {
        rc = ms_error(MS_EMODEL, "%s: a dangling symbolic link; not copied", src);
        goto out;
    }
    if (rc < 0) {
        rc = ms_error(rc, "%s: cannot resolve: %s", src, strerror(-rc));
        goto out;
    }
    if (rc == 0) {
        rc = ms_error(MS_EMODEL, "%s: resolves to %s, outside the model folder %s; "
                      "not copied", src, *real, root);
        goto out;
    }
    if (stat(*real, &st) < 0 || !S_ISREG(st.st_mode)) {
        rc = ms_error(MS_EMODEL, "%s: not a regular file; not copied", src);
        goto out;
    }
    *mode = (unsigned)st.st_mode & 0644;
    rc = 1;
out:
    if (rc <= 0) {
        ms_free(*real);
        *real = NULL;
    }
    ms_free(src);
    return rc;
}

/*
 * The chat template the recipe asks for, resolved against the input models
 * (ms_chat_template.h), or NULL (none asked for, or `auto` found none).
 */
static int chat_template_text(const struct ms_plan *plan, char **out)
{
    *out = NULL;
    const char *spec = plan->recipe ? plan->recipe->chat_template : NULL;
    if (!spec)
        return 0;
    const char **dirs = ms_calloc(plan->nmodels ? plan->nmodels : 1, sizeof *dirs);
    if (!dirs)
        return ms_error(MS_ENOMEM, "out of memory");
    for (size_t i = 0; i < plan->nmodels; i++)
        dirs[i] = plan->models[i].path;
    int rc = ms_chat_template_resolve(spec, dirs, plan->nmodels, out);
    ms_free(dirs);
    return rc;
}

/* tokenizer_config.json with the chat template set: the donor's (at `real`, or a new
 * object when the donor has none) patched; with out NULL, only checked (before the run:
 * a donor file that is not a JSON object fails the merge before any data is read). */
static int write_tokenizer_config(const struct emit *out, const char *real, const char *tmpl,
                                  unsigned mode)
{
    char *data = NULL, *patched = NULL;
    size_t len = 0, plen = 0;
    int rc = real ? ms_read_file(real, &data, &len) : 0;
    if (!rc)
        rc = ms_chat_template_apply(real ? real : "tokenizer_config.json", real ? data : "{}",
                                    real ? len : 2, tmpl, &patched, &plen);
    if (!rc && out)
        rc = write_in(out, "tokenizer_config.json", patched, plen, mode);
    ms_free(patched);
    ms_free(data);
    return rc;
}

/*
 * A remote donor's tokenizer files, fetched whole one at a time (ms_model_read_file)
 * and copied when tokenizer_config.json and tokenizer.json or tokenizer.model are
 * there. Nothing to check beforehand (out NULL): the server is asked when copying.
 */
static int remote_tokenizer(const struct ms_plan *plan, const struct emit *out, bool *copied)
{
    const struct ms_model *m = plan->models[plan->donor].model;
    if (!out || !m)
        return 0;
    char *data[MS_ARRAY_LEN(tokenizer_files)] = { 0 };
    size_t len[MS_ARRAY_LEN(tokenizer_files)] = { 0 };
    int rc = 0;
    char *tmpl = NULL;
    for (size_t i = 0; !rc && i < MS_ARRAY_LEN(tokenizer_files); i++) {
        rc = ms_model_read_file(m, tokenizer_files[i], &data[i], &len[i]);
        rc = rc > 0 ? 0 : rc;
    }
    if (!rc)
        rc = chat_template_text(plan, &tmpl);
    if (!rc && tmpl && data[0]) { /* tokenizer_config.json patched, as for a local donor */
        char *patched = NULL;
        size_t plen = 0;
        rc = ms_chat_template_apply("tokenizer_config.json", data[0], len[0], tmpl, &patched,
                                    &plen);
        if (!rc) {
            ms_free(data[0]);
            data[0] = patched;
            len[0] = plen;
        }
    }
    for (size_t i = 0; i < MS_ARRAY_LEN(tokenizer_files); i++)
        if (tokenizer_file_dropped(plan, tokenizer_files[i], tmpl != NULL)) {
            ms_free(data[i]);
            data[i] = NULL;
        }
    ms_free(tmpl);
    if (!rc && (!data[0] || !(data[2] || data[3]))) /* tokenizer_config, tokenizer.json/.model */
        ms_log_warn("%s: no tokenizer_config.json with tokenizer.json or tokenizer.model; "
                    "tokenizer not copied",
                    m->dir);
    else
        for (size_t i = 0; !rc && i < MS_ARRAY_LEN(tokenizer_files); i++)
            if (data[i] && !(rc = write_in(out, tokenizer_files[i], data[i], len[i], 0644)) &&
                copied)
                copied[i] = true;
    for (size_t i = 0; i < MS_ARRAY_LEN(tokenizer_files); i++)
        ms_free(data[i]);
    return rc;
}

/* Calls fn for every donor tokenizer file that will be copied; 0 or an error.
 * With a chat template, tokenizer_config.json is written patched (created when the
 * donor has tokenizer.json or tokenizer.model but no tokenizer_config.json, as
 * transformers' save_pretrained would); tokenizer_file_dropped says which donor
 * files are left out. */
static int each_tokenizer(const struct ms_plan *plan, const struct emit *out, bool warn,
                          bool *copied)
{
    if (plan->donor >= plan->nmodels)
        return 0;
    const char *dir = plan->models[plan->donor].path;
    if (ms_http_is_url(dir))
        return remote_tokenizer(plan, out, copied);
    bool want_tmpl = plan->recipe && plan->recipe->chat_template;
    bool has_cfg = file_exists(dir, "tokenizer_config.json");
    if (!(file_exists(dir, "tokenizer.json") || file_exists(dir, "tokenizer.model")) ||
        (!has_cfg && !want_tmpl)) {
        if (warn)
            ms_log_warn("%s: no tokenizer_config.json with tokenizer.json or tokenizer.model; "
                        "tokenizer not copied%s",
                        dir, want_tmpl ? " and chat_template not written" : "");
        return 0;
    }
    char *root = NULL, *tmpl = NULL;
    int rc = ms_path_model_root(dir, &root);
    if (!rc && out) {
        rc = chat_template_text(plan, &tmpl);
    } else if (!rc && want_tmpl && strcmp(plan->recipe->chat_template, "auto")) {
        /* The check before the run: the template's text does not matter here. */
        tmpl = ms_strdup("");
        rc = tmpl ? 0 : ms_error(MS_ENOMEM, "out of memory");
    }
    if (!rc && tmpl && !has_cfg && out) {
        rc = write_tokenizer_config(out, NULL, tmpl, 0644);
        if (!rc && copied)
            copied[0] = true;
    }
    for (size_t i = 0; !rc && i < MS_ARRAY_LEN(tokenizer_files); i++) {
        if (tokenizer_file_dropped(plan, tokenizer_files[i], tmpl != NULL))
            continue;
        char *real = NULL;
        unsigned mode = 0644;
        rc = tokenizer_source(dir, root, tokenizer_files[i], &real, &mode);
        if (rc <= 0)
            continue;
        rc = 0;
        if (tmpl && !strcmp(tokenizer_files[i], "tokenizer_config.json")) {
            rc = write_tokenizer_config(out, real, tmpl, mode);
            if (!rc && copied)
                copied[i] = true;
        } else if (out) {
            char *data = NULL;
            size_t len = 0;
            rc = ms_read_file(real, &data, &len);
            if (!rc)
                rc = write_in(out, tokenizer_files[i], data, len, mode);
            ms_free(data);
            if (!rc && copied)
                copied[i] = true;
        }
        ms_free(real);
    }
    ms_free(tmpl);
    ms_free(root);
    return rc;
}

/* The origin's tokenizer.model of a tokenizer merge (ms_tokmerge_spm_dir), copied as a
 * donor's file is: inside its model folder, mode kept. */
static int copy_spm_model(const char *dir, const struct emit *out, bool *copied)
{
    char *root = NULL, *real = NULL, *data = NULL;
    unsigned mode = 0644;
    size_t len = 0;
    int rc = ms_path_model_root(dir, &root);
    if (!rc && (rc = tokenizer_source(dir, root, "tokenizer.model", &real, &mode)) == 0)
        rc = ms_error(MS_EIO, "cannot write tokenizer.model: %s/tokenizer.model is gone", dir);
    if (rc == 1 && !(rc = ms_read_file(real, &data, &len)))
        rc = write_in(out, "tokenizer.model", data, len, mode);
    for (size_t i = 0; !rc && i < MS_ARRAY_LEN(tokenizer_files); i++)
        if (!strcmp(tokenizer_files[i], "tokenizer.model"))
            copied[i] = true;
    ms_free(data);
    ms_free(real);
    ms_free(root);
    return rc;
}

/* A tokenizer merge's files (ms_tokmerge.h), written whatever --copy-tokenizer says, as
 * mergekit saves a tokenizer it built; tokenizer.model in place of tokenizer.json when
 * the origin tokenizer is SentencePiece only. */
static int write_tokenizer(const struct ms_plan *plan, const struct emit *out, bool *copied)
{
    static const char *const names[] = { "tokenizer.json", "tokenizer_config.json",
                                         "special_tokens_map.json" };
    const char *spm = ms_tokmerge_spm_dir(plan->tok);
    char *tmpl = NULL, *text = NULL;
    size_t len = 0;
    ms_error_clear();
    int rc = chat_template_text(plan, &tmpl);
    if (!rc && spm) {
        rc = copy_spm_model(spm, out, copied);
    } else if (!rc) {
        /* the origin's tokenizer.json is read again: it may have gone */
        if ((rc = ms_tokmerge_tokenizer_json_text(plan->tok, &text, &len)))
            rc = ms_error_prefix(rc, "cannot write %s", names[0]);
        if (!rc)
            rc = write_in(out, names[0], text, len, 0644);
        for (size_t i = 0; !rc && i < MS_ARRAY_LEN(tokenizer_files); i++)
            if (!strcmp(tokenizer_files[i], names[0]))
                copied[i] = true;
        ms_free(text);
        text = NULL;
    }
    for (size_t k = 1; k < MS_ARRAY_LEN(names) && !rc; k++) {
        json_t *v =
            k == 1 ? ms_tokmerge_tokenizer_config(plan->tok) : ms_tokmerge_special_map(plan->tok);
        if (!v && k == 1)
            rc = ms_error(MS_ENOMEM, "cannot write %s: out of memory", names[k]);
        if (v && k == 1 && tmpl)
            rc = ms_chat_template_patch(v, tmpl);
        if (!rc && v && !(rc = ms__json_render(v, true, &text, &len)))
            rc = write_in(out, names[k], text, len, 0644);
        for (size_t i = 0; !rc && v && i < MS_ARRAY_LEN(tokenizer_files); i++)
            if (!strcmp(tokenizer_files[i], names[k]))
                copied[i] = true;
        ms_free(text);
        text = NULL;
        json_decref(v);
    }
    ms_free(tmpl);
    return rc;
}

/* Before anything is written: every donor file to copy is one we may copy. */
static int check_tokenizer(const struct ms_plan *plan)
{
    return each_tokenizer(plan, NULL, false, NULL);
}

static int copy_tokenizer(const struct ms_plan *plan, const struct emit *out, bool *copied)
{
    return each_tokenizer(plan, out, true, copied);
}

/* A reference counts as a hub repo id when it is not an absolute or home path,
 * has at most one '/', and is not a local path (we never ask the network). */
static bool looks_like_hub_id(const char *ref)
{
    if (!ref || ref[0] == '/' || ref[0] == '~' || ref[0] == '.')
        return false;
    const char *slash = strchr(ref, '/');
    if (slash && strchr(slash + 1, '/'))
        return false;
    return access(ref, F_OK) != 0;
}

/* A model as mergekit's card names it: a hub id links to its Hub page. */
static void add_model_md(struct ms_strbuf *b, const char *ref)
{
    if (looks_like_hub_id(ref))
        ms_strbuf_addf(b, "[%s](https://huggingface.co/%s)", ref, ref);
    else
        ms_strbuf_addf(b, "%s", ref);
}

char *ms_outdir_card(const struct ms_plan *plan, const char *title)
{
    struct ms_strbuf b = { 0 };
    const char *mname = plan->method ? plan->method->name : "";
    const struct ms_method_card *mc =
        plan->method && plan->method->card.pretty ? &plan->method->card : NULL;
    ms_strbuf_addf(&b, "---\n");
    bool any = false;
    for (size_t i = 0; i < plan->nmodels; i++) {
        if (!looks_like_hub_id(plan->models[i].ref))
            continue;
        if (!any)
            ms_strbuf_addf(&b, "base_model:\n");
        any = true;
        ms_strbuf_addf(&b, "- %s\n", plan->models[i].ref);
    }
    ms_strbuf_addf(&b, "library_name: transformers\ntags:\n- mergekit\n- merge\n\n---\n");
    ms_strbuf_addf(&b, "# %s\n\n", title && *title ? title : "Untitled Model (1)");
    ms_strbuf_addf(&b, "This is a merge of pre-trained language models created with mergestream, "
                       "from a [mergekit](https://github.com/arcee-ai/mergekit) recipe.\n\n");
    ms_strbuf_addf(&b, "## Merge Details\n### Merge Method\n\n");
    const char *pretty = mc ? mc->pretty : mname;
    if (mc && mc->url)
        ms_strbuf_addf(&b, "This model was merged using the [%s](%s) merge method", pretty,
                       mc->url);
    else
        ms_strbuf_addf(&b, "This model was merged using the %s merge method", pretty);
    bool show_base = plan->base < plan->nmodels &&
                     !(plan->method && plan->method->card.hide_base);
    if (show_base) {
        ms_strbuf_addf(&b, " using ");
        add_model_md(&b, plan->models[plan->base].ref);
        ms_strbuf_addf(&b, " as a base");
    }
    ms_strbuf_addf(&b, ".\n\n### Models Merged\n\nThe following models were included in the "
                       "merge:\n");
    for (size_t i = 0; i < plan->nmodels; i++) {
        if (show_base && i == plan->base)
            continue;
        ms_strbuf_addf(&b, "* ");
        add_model_md(&b, plan->models[i].ref);
        ms_strbuf_addf(&b, "\n");
    }
    ms_strbuf_addf(&b, "\n### Configuration\n\nThe following YAML configuration was used to "
                       "produce this model:\n\n```yaml\n");
    const struct ms_recipe *r = plan->recipe;
    if (r && r->text) {
        ms_strbuf_addf(&b, "%.*s", (int)r->text_len, r->text);
        if (r->text_len && r->text[r->text_len - 1] != '\n')
            ms_strbuf_addf(&b, "\n");
    }
    ms_strbuf_addf(&b, "```\n");
    if (b.oom) {
        ms_strbuf_fini(&b);
        return NULL;
    }
    return b.p;
}

static int sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return ms_error(-errno, "%s: cannot open directory: %s", dir, strerror(errno));
    int rc = fsync(fd) < 0 && errno != EINVAL ? -errno : 0;
    close(fd);
    return rc ? ms_error(rc, "%s: fsync failed: %s", dir, strerror(-rc)) : 0;
}

/*
 * The index names the shard files as written: "<name>.zst" when each shard is
 * compressed (directory or pipe output with --compress). Inside a compressed
 * tar stream the shards themselves are plain.
 */
static int index_json(const struct ms_plan *plan, bool zst, char **text, size_t *len)
{
    if (!zst)
        return ms_layout_index_json(plan->layout, text, len);
    struct ms_layout l = *plan->layout;
    l.shards = ms_calloc(l.nshards, sizeof *l.shards);
    if (!l.shards)
        return ms_error(MS_ENOMEM, "out of memory");
    int rc = 0;
    for (size_t k = 0; k < l.nshards && !rc; k++) {
        l.shards[k] = plan->layout->shards[k];
        l.shards[k].file_name = ms_asprintf("%s.zst", plan->layout->shards[k].file_name);
        if (!l.shards[k].file_name)
            rc = ms_error(MS_ENOMEM, "out of memory");
    }
    if (!rc)
        rc = ms_layout_index_json(&l, text, len);
    for (size_t k = 0; k < l.nshards; k++)
        ms_free(l.shards[k].file_name);
    ms_free(l.shards);
    return rc;
}

int ms_outdir_finish(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                     struct ms_out *stream, struct ms_outdir *od)
{
    const char *out = opts->out;
    struct emit em = { .dir = out, .out = opts->kind == MS_OUT_DIR ? NULL : stream };
    int rc = 0;
    char *text = NULL;
    size_t len = 0;
    if (plan->layout->nshards > 1) {
        rc = index_json(plan, opts->zstd_level && opts->kind != MS_OUT_TAR, &text, &len);
        if (!rc)
            rc = write_in(&em, "model.safetensors.index.json", text, len, 0644);
        ms_free(text);
        text = NULL;
        if (rc)
            return rc;
    }
    if (plan->out_config_json) {
        rc = write_in(&em, "config.json", plan->out_config_json, strlen(plan->out_config_json),
                      0644);
        if (rc)
            return rc;
    }
    if (opts->write_card) {
        /* The card's title is OUT's base name; a tar stream on stdout has none. */
        const char *title = NULL;
        if (opts->kind != MS_OUT_TAR) {
            title = strrchr(out, '/');
            title = title && title[1] ? title + 1 : out;
        }
        text = ms_outdir_card(plan, title);
        if (!text)
            return ms_error(MS_ENOMEM, "out of memory writing the model card");
        rc = write_in(&em, "README.md", text, strlen(text), 0644);
        ms_free(text);
        if (!rc && plan->recipe && plan->recipe->text)
            rc = write_in(&em, "mergekit_config.yml", plan->recipe->text, plan->recipe->text_len,
                          0644);
        if (rc)
            return rc;
    }
    if (plan->tok || opts->copy_tokenizer) {
        rc = plan->tok ? write_tokenizer(plan, &em, od->copied)
                       : copy_tokenizer(plan, &em, od->copied);
        if (rc)
            return rc;
    } else if (plan->recipe && plan->recipe->chat_template) {
        ms_log_warn("chat_template is set but --no-copy-tokenizer writes no tokenizer; the chat "
                    "template is not saved (as in mergekit)");
    }
    if (stream)
        return ms_out_finish(stream);
    return sync_dir(out);
}

/* ------------------------------------------------------------------ after the run */

/* Whether name is "model-NNNNN-of-NNNNN.safetensors", as mergestream names shards. */
static bool shard_name(const char *name)
{
    unsigned a, b;
    int end = 0;
    if (sscanf(name, "model-%5u-of-%5u.safetensors%n", &a, &b, &end) != 2 || name[end])
        return false;
    return strlen(name) == strlen("model-00001-of-00001.safetensors");
}

/* Whether name (".zst" and ".partial"/".tmp" taken off) is one mergestream writes
 * (run-state files, ".mergestream*", are handled apart). */
static bool our_name(const char *name)
{
    char buf[256];
    size_t n = strlen(name);
    if (n >= sizeof buf)
        return false;
    memcpy(buf, name, n + 1);
    if (n > 8 && !strcmp(buf + n - 8, ".partial"))
        buf[n -= 8] = 0;
    else if (n > 4 && !strcmp(buf + n - 4, ".tmp"))
        buf[n -= 4] = 0;
    if (n > 4 && !strcmp(buf + n - 4, ".zst"))
        buf[n -= 4] = 0;
    static const char *const small[] = {
        "model.safetensors", "model.safetensors.index.json", "config.json", "README.md",
        "mergekit_config.yml",
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(small); i++)
        if (!strcmp(buf, small[i]))
            return true;
    for (size_t i = 0; i < MS_ARRAY_LEN(tokenizer_files); i++)
        if (!strcmp(buf, tokenizer_files[i]))
            return true;
    return shard_name(buf);
}

/* Whether this run's complete output has a file called name. */
static bool in_new_output(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                          const struct ms_outdir *od, const char *name)
{
    const struct ms_layout *l = plan->layout;
    for (size_t k = 0; k < l->nshards; k++) {
        size_t n = strlen(l->shards[k].file_name);
        if (!strncmp(name, l->shards[k].file_name, n) &&
            !strcmp(name + n, opts->zstd_level ? ".zst" : ""))
            return true;
    }
    if (l->nshards > 1 && !strcmp(name, "model.safetensors.index.json"))
        return true;
    if (plan->out_config_json && !strcmp(name, "config.json"))
        return true;
    if (opts->write_card && (!strcmp(name, "README.md") ||
                             (plan->recipe && plan->recipe->text &&
                              !strcmp(name, "mergekit_config.yml"))))
        return true;
    for (size_t i = 0; i < MS_ARRAY_LEN(tokenizer_files); i++)
        if (od->copied[i] && !strcmp(name, tokenizer_files[i]))
            return true;
    return false;
}

/* Removes what an earlier run of ours left in OUT that this output does not
 * have: only names mergestream writes, and only regular files and symlinks. */
static int remove_stale(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                        const struct ms_outdir *od)
{
    DIR *d = opendir(opts->out);
    if (!d)
        return ms_error(-errno, "%s: cannot read directory: %s", opts->out, strerror(errno));
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!our_name(e->d_name) || in_new_output(plan, opts, od, e->d_name))
            continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
            !(S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)))
            continue;
        /* An old README.md that is not our card is the user's: kept. */
        if (!strcmp(e->d_name, "README.md") && !card_is_ours(dirfd(d), e->d_name))
            continue;
        if (unlinkat(dirfd(d), e->d_name, 0) < 0) {
            rc = ms_error(-errno, "%s/%s: cannot remove the earlier run's file: %s", opts->out,
                          e->d_name, strerror(errno));
            break;
        }
        ms_log_info("removed %s/%s (left by an earlier run)", opts->out, e->d_name);
    }
    closedir(d);
    return rc;
}

int ms_outdir_release(const struct ms_plan *plan, const struct ms_engine_opts *opts,
                      struct ms_outdir *od, bool ok)
{
    int rc = 0;
    if (od->lock_fd < 0)
        return 0;
    if (ok && od->was_ours && !opts->resume && opts->part_count <= 1)
        rc = remove_stale(plan, opts, od);
    /* A failed run keeps its lock file beside what it finished (the next run
     * then knows OUT as ours), but leaves an otherwise empty OUT empty. */
    char *path = lock_path(opts);
    char *run = ms_run_path(opts->out, opts->part_index, opts->part_count);
    if (!path || !run) {
        rc = rc ? rc : ms_error(MS_ENOMEM, "out of memory");
    } else if (!ok) {
        DIR *d = opendir(opts->out);
        bool others = false;
        struct dirent *e;
        while (d && (e = readdir(d)))
            others |= strcmp(e->d_name, ".") && strcmp(e->d_name, "..") &&
                      strcmp(e->d_name, strrchr(path, '/') + 1) &&
                      strcmp(e->d_name, strrchr(run, '/') + 1);
        if (d && !others) {
            unlink(run);
            unlink(path);
        }
        if (d)
            closedir(d);
    } else if (!rc) {
        if (unlink(run) < 0 && errno != ENOENT)
            rc = ms_error(-errno, "%s: cannot remove: %s", run, strerror(errno));
        else if (unlink(path) < 0 && errno != ENOENT)
            rc = ms_error(-errno, "%s: cannot remove: %s", path, strerror(errno));
        if (!rc)
            rc = sync_dir(opts->out);
    }
    ms_free(path);
    ms_free(run);
    close(od->lock_fd); /* after the unlink: no other run takes the lock in between */
    od->lock_fd = -1;
    return rc;
}
