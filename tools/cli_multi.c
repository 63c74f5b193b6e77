/*
 * cli_multi.c - recipe files of several YAML documents (mergekit-multi,
 * mergekit/scripts/multimerge.py) for `merge` and `plan`: every named document
 * is merged into INTERMEDIATE_DIR/NAME, later documents read it by that name,
 * the unnamed one is merged into OUT. Stages run in dependency order in this
 * process; a named stage whose folder already holds a complete model is skipped
 * (mergekit-multi's --lazy, the default).
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "ms_chat_template.h"
#include "ms_common.h"
#include "ms_engine.h"
#include "ms_plan.h"
#include "ms_recipe.h"
#include "ms_stage.h"

#include "cli.h"

static bool exists(const char *dir, const char *name)
{
    char *p = ms_asprintf("%s/%s", dir, name);
    struct stat st;
    bool ok = p && stat(p, &st) == 0;
    ms_free(p);
    return ok;
}

/* mergekit-multi's test for a finished merge (config.json and a model file), and no
 * run file of ours (a merge that was stopped leaves one; a complete one removes it). */
static bool stage_complete(const char *dir)
{
    return dir && exists(dir, "config.json") &&
           (exists(dir, "model.safetensors") || exists(dir, "model.safetensors.index.json")) &&
           !exists(dir, ".mergestream-run.json");
}

static const char *stage_name(const struct ms_recipe_file *f, size_t i)
{
    return f->docs[i]->name ? f->docs[i]->name : "(unnamed, final)";
}

/* The first document i uses whose output is not there yet, or SIZE_MAX. */
static size_t missing_input(const struct ms_recipe_file *f, size_t i, const bool *built)
{
    for (size_t j = 0; j < f->n; j++)
        if (f->uses[i * f->n + j] && !built[j] && !stage_complete(f->out[j]))
            return j;
    return SIZE_MAX;
}

/* What can be checked of a stage whose inputs are not built yet: the method and
 * the chat template. 0 or 1 (problems printed). */
static int check_pending(const struct ms_recipe *r)
{
    int bad = 0;
    const struct ms_method *m = ms_method_find(r->merge_method);
    if (!m || !m->ops) {
        fprintf(stderr, "mergestream: %s:%d:%d: merge method '%s' is %s\n", r->path,
                r->merge_method_pos.line, r->merge_method_pos.col, r->merge_method,
                m ? "not supported" : "unknown");
        bad = 1;
    }
    if (r->chat_template && ms_chat_template_check(r->chat_template) < 0) {
        fprintf(stderr, "mergestream: %s:%d:%d: %s\n", r->path, r->chat_template_pos.line,
                r->chat_template_pos.col, ms_errmsg());
        bad = 1;
    }
    return bad;
}

int ms_cli_multi_link(struct ms_recipe_file *f, const char *intermediate_dir)
{
    if (f->n > 1 && !intermediate_dir) {
        fprintf(stderr,
                "mergestream: %s has %zu yaml documents (a mergekit-multi file): "
                "--intermediate-dir DIR is needed for the named merges\n",
                f->docs[0]->path, f->n);
        return 2;
    }
    if (ms_recipe_file_link(f, intermediate_dir) < 0) {
        ms_cli_report(-1, NULL);
        return 1;
    }
    return 0;
}

int ms_cli_multi_plan(struct ms_recipe_file *f, const struct ms_plan_opts *po, uint64_t max_memory,
                      bool json, bool quiet)
{
    bool *built = ms_calloc(f->n, sizeof *built);
    int status = 0;
    if (!built) {
        ms_cli_report(MS_ENOMEM, "out of memory");
        return 1;
    }
    if (json && !quiet)
        fputs("[\n", stdout);
    for (size_t k = 0; k < f->n; k++) {
        size_t i = f->order[k];
        const char *dest = f->out[i] ? f->out[i] : "OUT";
        size_t miss = missing_input(f, i, built);
        if (!quiet && !json)
            printf("%sstage %zu of %zu: %s -> %s\n", k ? "\n" : "", k + 1, f->n, stage_name(f, i),
                   dest);
        if (miss != SIZE_MAX) {
            if (check_pending(f->docs[i]))
                status = 1;
            if (!quiet && json)
                printf("%s{\"stage\": \"%s\", \"pending\": \"%s\"}", k ? ",\n" : "",
                       stage_name(f, i), f->docs[miss]->name);
            else if (!quiet)
                printf("reads '%s' (%s), not built yet: checked the recipe, method and chat "
                       "template only; its models and tensors are checked when it runs\n",
                       f->docs[miss]->name, f->out[miss]);
            continue;
        }
        struct ms_plan *p = NULL;
        if (ms_plan_build(f->docs[i], po, &p)) {
            status = 1; /* ms_plan_build has printed every problem */
            continue;
        }
        if (!quiet) {
            if (json && k)
                fputs(",\n", stdout);
            int rc = ms_plan_print(p, max_memory, json, stdout);
            if (rc) {
                ms_cli_report(rc, NULL);
                status = 1;
            }
        }
        ms_plan_free(p);
    }
    if (json && !quiet)
        fputs("\n]\n", stdout);
    ms_free(built);
    return status;
}

int ms_cli_multi_merge(struct ms_recipe_file *f, const struct ms_plan_opts *po,
                       const struct ms_engine_opts *eo, bool lazy, int *rc_out)
{
    bool *built = ms_calloc(f->n, sizeof *built);
    struct ms_plan **plans = ms_calloc(f->n, sizeof *plans);
    int rc = 0, status = 0;
    *rc_out = 0;
    if (!built || !plans) {
        ms_free(built);
        ms_free(plans);
        ms_cli_report(MS_ENOMEM, "out of memory");
        return 1;
    }
    /* Before any data is read: every stage whose inputs exist builds its plan. */
    for (size_t k = 0; k < f->n; k++) {
        size_t i = f->order[k];
        if (missing_input(f, i, built) != SIZE_MAX)
            status |= check_pending(f->docs[i]);
        else if (ms_plan_build(f->docs[i], po, &plans[i]))
            status = 1;
    }
    if (f->final == SIZE_MAX)
        ms_log_info("note: %s has no unnamed document; every merge goes to its intermediate "
                    "folder and %s is not written",
                    f->docs[0]->path, eo->out);
    for (size_t k = 0; k < f->n && !status; k++) {
        size_t i = f->order[k];
        struct ms_engine_opts o = *eo;
        if (f->out[i]) {
            if (lazy && stage_complete(f->out[i])) {
                ms_log_info("stage '%s': %s holds a complete model; skipped", f->docs[i]->name,
                            f->out[i]);
                built[i] = true;
                continue;
            }
            /* Intermediates are plain model folders that the next stage reads. */
            o.out = f->out[i];
            o.kind = MS_OUT_DIR;
            o.pipe_cmd = NULL;
            o.zstd_level = 0;
            o.part_index = o.part_count = 0;
            o.resume = false;
        }
        ms_log_info("stage %zu of %zu: %s -> %s", k + 1, f->n, stage_name(f, i), o.out);
        struct ms_plan *p = plans[i];
        plans[i] = NULL;
        if (!p && ms_plan_build(f->docs[i], po, &p)) {
            status = 1;
            break;
        }
        if (po->lora_cache && (rc = ms_plan_lora_cache_fill(p, po->lora_dtype)) < 0) {
            ms_cli_report(rc, NULL);
            ms_plan_free(p);
            status = 1;
            break;
        }
        rc = ms_engine_run(p, &o);
        if (rc) {
            ms_cli_report(rc, NULL);
            status = 1;
        } else {
            ms_log_info("merged %zu tensors into %s", p->njobs, o.out);
            built[i] = true;
        }
        ms_plan_free(p);
    }
    for (size_t i = 0; i < f->n; i++)
        ms_plan_free(plans[i]);
    ms_free(plans);
    ms_free(built);
    *rc_out = rc;
    return status;
}
