/*
 * outdir.c - everything in the output directory besides the tensor shards:
 * the index, config.json, the model card, the saved recipe and the tokenizer
 * files copied from the donor model (mergekit-spec.md 4.2, 4.4-4.7).
 * Runs on the main thread, synchronously, after the loop has finished.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_str.h"
#include "pipeline_impl.h"

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

int ms_outdir_prepare(const struct ms_plan *plan, const struct ms_engine_opts *opts)
{
    (void)plan;
    int rc = mkdir_p(opts->out);
    if (rc)
        return rc;
    struct stat st;
    if (stat(opts->out, &st) < 0 && lstat(opts->out, &st) == 0 && S_ISLNK(st.st_mode))
        return ms_error(MS_EINVAL, "%s: output path is a symbolic link to a missing target",
                        opts->out);
    if (stat(opts->out, &st) < 0 || !S_ISDIR(st.st_mode))
        return ms_error(MS_EINVAL, "%s: output path exists and is not a directory", opts->out);
    if (access(opts->out, W_OK) < 0)
        return ms_error(-errno, "%s: output directory is not writable: %s", opts->out,
                        strerror(errno));
    return 0;
}

/* Where finish() sends small files: a directory, or an ms_out stream. */
struct emit {
    const char *dir;
    struct ms_out *out;
};

static int write_in(const struct emit *em, const char *name, const void *data, size_t len)
{
    if (em->out) {
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
    int rc = ms_write_file_atomic(path, data, len);
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

static int copy_tokenizer(const struct ms_plan *plan, const struct emit *out)
{
    if (plan->donor >= plan->nmodels)
        return 0;
    const char *dir = plan->models[plan->donor].path;
    if (!file_exists(dir, "tokenizer_config.json") ||
        !(file_exists(dir, "tokenizer.json") || file_exists(dir, "tokenizer.model"))) {
        ms_log_warn("%s: no tokenizer_config.json with tokenizer.json or tokenizer.model; "
                    "tokenizer not copied", dir);
        return 0;
    }
    for (size_t i = 0; i < MS_ARRAY_LEN(tokenizer_files); i++) {
        if (!file_exists(dir, tokenizer_files[i]))
            continue;
        char *src = ms_asprintf("%s/%s", dir, tokenizer_files[i]);
        if (!src)
            return ms_error(MS_ENOMEM, "out of memory");
        char *data = NULL;
        size_t len = 0;
        int rc = ms_read_file(src, &data, &len);
        ms_free(src);
        if (!rc)
            rc = write_in(out, tokenizer_files[i], data, len);
        ms_free(data);
        if (rc)
            return rc;
    }
    return 0;
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
                     struct ms_out *stream)
{
    const char *out = opts->out;
    struct emit em = { .dir = out, .out = opts->kind == MS_OUT_DIR ? NULL : stream };
    int rc = 0;
    char *text = NULL;
    size_t len = 0;
    if (plan->layout->nshards > 1) {
        rc = index_json(plan, opts->zstd_level && opts->kind != MS_OUT_TAR, &text, &len);
        if (!rc)
            rc = write_in(&em, "model.safetensors.index.json", text, len);
        ms_free(text);
        text = NULL;
        if (rc)
            return rc;
    }
    if (plan->out_config_json) {
        rc = write_in(&em, "config.json", plan->out_config_json, strlen(plan->out_config_json));
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
        rc = write_in(&em, "README.md", text, strlen(text));
        ms_free(text);
        if (!rc && plan->recipe && plan->recipe->text)
            rc = write_in(&em, "mergekit_config.yml", plan->recipe->text, plan->recipe->text_len);
        if (rc)
            return rc;
    }
    if (opts->copy_tokenizer) {
        rc = copy_tokenizer(plan, &em);
        if (rc)
            return rc;
    }
    if (stream)
        return ms_out_finish(stream);
    return sync_dir(out);
}
