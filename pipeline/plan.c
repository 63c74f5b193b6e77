/*
 * plan.c - recipe + model headers -> the merge plan (ms_plan.h).
 *
 * The build runs in phases, each over the whole recipe so that every problem
 * is reported, not just the first:
 *   1. recipe checks that need no model (method, forms, tokenizer keys, dtypes);
 *   2. normalisation of the models/slices forms into slices of sources
 *      (mergekit-spec.md 1.3), and the list of distinct models;
 *   3. models: resolve, open headers, read config.json, agree on the architecture,
 *      count layers;
 *   4. slice layer ranges;
 *   5. one job per output tensor (1.4-1.6, 2.1): inputs, shapes, parameters, dtypes;
 *   6. save order by label (6.2), output layout (4.1), processing order, config.json.
 * A phase runs only when the ones it depends on found no problem.
 */
#include <assert.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "ms_chat_template.h"
#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_plan.h"
#include "ms_str.h"
#include "ms_tokmerge.h"
#include "plan_impl.h"
#include "lora_impl.h"

#define DEFAULT_SHARD_SIZE 5000000000ull

/* ------------------------------------------------------------------ builder state */

struct perr {
    int code;
    char *key;                    /* problems with the same key are reported once, counted */
    char *msg;
    size_t more;                  /* further tensors with the same problem */
    struct ms_pos pos;            /* recipe position, for ordering recipe problems */
};

/* A source of an output slice (after normalisation). */
struct psrc {
    size_t model;                 /* index into plan->models */
    int64_t start, end;           /* layer range, half-open */
    bool has_range;
    const struct ms_params *params; /* NULL for an appended base model */
    struct ms_pos pos;
};

struct pslice {
    size_t nsrc;
    struct psrc *src;             /* one entry per model (mergekit's model set) */
    size_t ndup;
    struct psrc *dup;             /* later entries of a model already in src, in recipe order:
                                     not inputs, but param_eval reads their parameters after
                                     the first entry's, as mergekit's parameter lookup does */
    size_t base;                  /* model index of the slice's base model, or SIZE_MAX */
    const struct ms_params *params; /* NULL in the models form */
    struct ms_pos pos;
};

struct pb {
    const struct ms_recipe *r;
    const struct ms_plan_opts *opts;
    struct ms_plan *p;
    const struct ms_method *m;    /* NULL when unknown or not supported */
    size_t tally;                 /* model tensors the method's check tallied (ms_plan_ctx) */
    char tally_first[256];        /* the first such tensor, for the method's warning */
    char mwhere[600];             /* "recipe.yml:L:C" of merge_method, for ms_plan_ctx.where */
    struct ms__arch *arch;
    const struct ms_modelref **refs; /* per plan model: its first reference in the recipe */
    size_t cap_models;
    size_t nsl;
    struct pslice *sl;
    const char *layers_key;       /* the donor config's layer-count key, or NULL */
    size_t cap_jobs;
    size_t nerr, cap_err;
    struct perr *err;
    bool oom;
};

/* ------------------------------------------------------------------ problems */

/*
 * Records one problem. A problem whose key matches an earlier one only counts
 * (the message says "and N more tensors"), so a model missing one weight in every
 * layer gives one line. key NULL: always a new line.
 */
/* Records one problem (see pb_err); pos tags it for ordering. */
static int pb_verr(struct pb *pb, int code, const char *key, struct ms_pos pos, const char *msg)
{
    if (key) {
        for (size_t i = 0; i < pb->nerr; i++) {
            if (pb->err[i].key && !strcmp(pb->err[i].key, key)) {
                pb->err[i].more++;
                return code;
            }
        }
    }
    if (pb->nerr == pb->cap_err) {
        size_t nc = MS_MAX(8, pb->cap_err * 2);
        struct perr *e = ms_realloc(pb->err, nc * sizeof *e);
        if (!e) {
            pb->oom = true;
            return code;
        }
        pb->err = e;
        pb->cap_err = nc;
    }
    struct perr *e = &pb->err[pb->nerr];
    e->code = code;
    e->more = 0;
    e->pos = pos;
    e->msg = ms_strdup(msg);
    e->key = key ? ms_strdup(key) : NULL;
    if (!e->msg || (key && !e->key)) {
        ms_free(e->msg);
        ms_free(e->key);
        pb->oom = true;
        return code;
    }
    pb->nerr++;
    return code;
}

/*
 * Records one problem. A problem whose key matches an earlier one only counts
 * (the message says "and N more tensors"), so a model missing one weight in every
 * layer gives one line. key NULL: always a new line.
 */
static int pb_err(struct pb *pb, int code, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int pb_err(struct pb *pb, int code, const char *key, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return pb_verr(pb, code, key, (struct ms_pos){ 0, 0 }, msg);
}

/* A problem at a recipe position: "recipe.yml:L:C: <msg>". */
static int pb_at(struct pb *pb, int code, const char *key, struct ms_pos pos, const char *fmt,
                 ...) __attribute__((format(printf, 5, 6)));
static int pb_at(struct pb *pb, int code, const char *key, struct ms_pos pos, const char *fmt,
                 ...)
{
    char body[900], msg[1600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    if (pos.line > 0)
        snprintf(msg, sizeof msg, "%s:%d:%d: %s", pb->r->path, pos.line, pos.col, body);
    else
        snprintf(msg, sizeof msg, "%s: %s", pb->r->path, body);
    return pb_verr(pb, code, key, pos, msg);
}

static void pb_oom(struct pb *pb) { pb->oom = true; }

static bool pb_failed(const struct pb *pb) { return pb->nerr > 0 || pb->oom; }

/* Orders problems [from, nerr) by recipe position (stable; untagged ones last). */
static void pb_sort(struct pb *pb, size_t from)
{
    for (size_t i = from + 1; i < pb->nerr; i++) {
        struct perr e = pb->err[i];
        long ke = e.pos.line > 0 ? (long)e.pos.line * 100000 + e.pos.col : LONG_MAX;
        size_t j = i;
        for (; j > from; j--) {
            const struct perr *q = &pb->err[j - 1];
            long kq = q->pos.line > 0 ? (long)q->pos.line * 100000 + q->pos.col : LONG_MAX;
            if (kq <= ke)
                break;
            pb->err[j] = pb->err[j - 1];
        }
        pb->err[j] = e;
    }
}

/* "recipe.yml:3:5" (or the bare file name when pos is unknown) into buf. */
static const char *where(const struct pb *pb, struct ms_pos pos, char *buf, size_t n)
{
    if (pos.line > 0)
        snprintf(buf, n, "%s:%d:%d", pb->r->path, pos.line, pos.col);
    else
        snprintf(buf, n, "%s", pb->r->path);
    return buf;
}

#define WHERE(pos) where(pb, (pos), wbuf, sizeof wbuf)

static const char *model_ref(const struct pb *pb, size_t m) { return pb->p->models[m].ref; }

/* ------------------------------------------------------------------ phase 1: recipe */

/*
 * Names under `parameters:` that the method does not declare. mergekit ignores
 * them, but a misspelt one (densty, normalise) silently changes the merge: a
 * warning, or a problem with opts->strict, names it and the closest declared name.
 */
static void check_param_names(struct pb *pb, const struct ms_params *ps)
{
    const struct ms_method *m = pb->m;
    const char *names[MS_MAX_PARAMS];
    char wbuf[600], hint[400];
    for (uint32_t j = 0; j < m->nparams; j++)
        names[j] = m->params[j].name;
    for (size_t i = 0; i < ps->n; i++) {
        const struct ms_param *q = &ps->v[i];
        if (ms_method_param(m, q->name) >= 0)
            continue;
        const char *near = ms_str_closest(q->name, names, m->nparams);
        if (near) {
            snprintf(hint, sizeof hint, "did you mean '%s'?", near);
        } else if (!m->nparams) {
            snprintf(hint, sizeof hint, "it takes no parameters");
        } else {
            size_t o = (size_t)snprintf(hint, sizeof hint, "known:");
            for (uint32_t j = 0; j < m->nparams && o < sizeof hint; j++)
                o += (size_t)snprintf(hint + o, sizeof hint - o, "%s %s", j ? "," : "", names[j]);
        }
        if (pb->opts->strict)
            pb_at(pb, MS_ERECIPE, NULL, q->pos, "unknown parameter '%s' for merge method '%s' "
                  "(%s)", q->name, m->name, hint);
        else
            ms_log_warn("%s: unknown parameter '%s' for merge method '%s' (%s); ignored, as "
                        "mergekit does", WHERE(q->pos), q->name, m->name, hint);
    }
}

static void check_recipe(struct pb *pb)
{
    const struct ms_recipe *r = pb->r;

    if (!r->merge_method) {
        pb_at(pb, MS_ERECIPE, NULL, (struct ms_pos){ 0, 0 }, "merge_method is missing");
    } else {
        const struct ms_method *m = ms_method_find(r->merge_method);
        if (!m) {
            char known[512] = "";
            size_t o = 0;
            for (size_t i = 0; ms_method_at(i) && o < sizeof known; i++)
                o += (size_t)snprintf(known + o, sizeof known - o, "%s%s", i ? ", " : "",
                                      ms_method_at(i)->name);
            pb_at(pb, MS_EPLAN, NULL, r->merge_method_pos, "unknown merge method '%s' (known: %s)",
                  r->merge_method, known);
        } else if (!m->ops) {
            pb_at(pb, MS_EUNSUPPORTED, NULL, r->merge_method_pos,
                  "merge method '%s' is not supported yet", m->name);
        } else {
            pb->m = m;
            pb->p->method = m;
        }
    }
    if (r->has_modules && strcmp(r->module_name, "default"))
        pb_at(pb, MS_EUNSUPPORTED, NULL, r->module_pos,
              "module '%s': the architectures mergestream "
              "supports have one module, 'default' (multi-module architectures such as "
              "vision-language models are not supported)",
              r->module_name);
    if (r->chat_template && ms_chat_template_check(r->chat_template) < 0)
        pb_at(pb, MS_ERECIPE, NULL, r->chat_template_pos, "%s", ms_errmsg());

    struct {
        const char *key, *val;
        struct ms_pos pos;
        enum ms_dtype *dst;
    } dt[2] = {
        { "dtype", r->dtype, r->dtype_pos, &pb->p->dtype },
        { "out_dtype", r->out_dtype, r->out_dtype_pos, &pb->p->out_dtype },
    };
    for (int i = 0; i < 2; i++) {
        *dt[i].dst = MS_DT_NONE;
        if (!dt[i].val)
            continue;
        enum ms_dtype d = ms_dtype_from_recipe(dt[i].val);
        if (d == MS_DT_NONE)
            pb_at(pb, MS_ERECIPE, NULL, dt[i].pos, "unknown %s '%s' (use bfloat16, float16 or float32)",
                  dt[i].key, dt[i].val);
        else if (!ms_dtype_is_compute(d))
            pb_at(pb, MS_EUNSUPPORTED, NULL, dt[i].pos, "%s '%s' is not supported (use bfloat16, "
                  "float16 or float32)", dt[i].key, dt[i].val);
        else
            *dt[i].dst = d;
    }
    if (pb->m) {
        check_param_names(pb, &r->params);
        for (size_t i = 0; i < r->nmodels; i++)
            check_param_names(pb, &r->models[i].params);
        for (size_t k = 0; k < r->nslices; k++) {
            check_param_names(pb, &r->slices[k].params);
            for (size_t i = 0; i < r->slices[k].nsources; i++)
                check_param_names(pb, &r->slices[k].sources[i].params);
        }
    }
    /* Report recipe problems in file order. */
    pb_sort(pb, 0);
}

/* ------------------------------------------------------------------ phase 2: forms */

/* Index of the plan model for ref, adding it if new; SIZE_MAX when out of memory. */
static size_t model_add(struct pb *pb, const struct ms_modelref *ref)
{
    struct ms_plan *p = pb->p;
    for (size_t i = 0; i < p->nmodels; i++)
        if (ms_modelref_eq(pb->refs[i], ref))
            return i;
    if (p->nmodels == pb->cap_models) {
        size_t nc = MS_MAX(4, pb->cap_models * 2);
        struct ms_plan_model *mm = ms_realloc(p->models, nc * sizeof *mm);
        if (!mm)
            return pb_oom(pb), SIZE_MAX;
        p->models = mm;
        const struct ms_modelref **rr = ms_realloc(pb->refs, nc * sizeof *rr);
        if (!rr)
            return pb_oom(pb), SIZE_MAX;
        pb->refs = rr;
        pb->cap_models = nc;
    }
    struct ms_plan_model *pm = &p->models[p->nmodels];
    memset(pm, 0, sizeof *pm);
    pm->ref = ms_asprintf("%s%s%s%s%s%s%s", ref->path, ref->revision ? "@" : "",
                          ref->revision ? ref->revision : "", ref->lora ? "+" : "",
                          ref->lora ? ref->lora : "", ref->lora_revision ? "@" : "",
                          ref->lora_revision ? ref->lora_revision : "");
    if (!pm->ref)
        return pb_oom(pb), SIZE_MAX;
    pb->refs[p->nmodels] = ref;
    return p->nmodels++;
}

static const struct psrc *slice_find_model(const struct pslice *s, size_t m)
{
    for (size_t i = 0; i < s->nsrc; i++)
        if (s->src[i].model == m)
            return &s->src[i];
    return NULL;
}

static bool slice_has_model(const struct pslice *s, size_t m) { return slice_find_model(s, m); }

/* mergekit gathers a model's tensor once however often it is listed (a dict keyed
 * by model) and reads each parameter from its first entry that sets it. */
static void dup_warn(struct pb *pb, struct ms_pos pos, size_t m)
{
    char wbuf[600];
    ms_log_warn("%s: model '%s' is listed twice: it is merged as one input, each parameter "
                "from its first entry that sets it (as mergekit does)", WHERE(pos),
                model_ref(pb, m));
}

/* Normalises the models or slices form into pb->sl (mergekit-spec.md 1.3). */
static void normalize(struct pb *pb)
{
    const struct ms_recipe *r = pb->r;
    struct ms_plan *p = pb->p;
    char wbuf[600];
    size_t nsl = r->nmodels ? 1 : r->nslices;
    if (!nsl)
        return;
    pb->sl = ms_calloc(nsl, sizeof *pb->sl);
    if (!pb->sl)
        return pb_oom(pb);
    pb->nsl = nsl;

    if (r->nmodels) {
        struct pslice *s = &pb->sl[0];
        s->src = ms_calloc(r->nmodels + 1, sizeof *s->src);
        s->dup = ms_calloc(r->nmodels, sizeof *s->dup);
        if (!s->src || !s->dup)
            return pb_oom(pb);
        s->pos = r->models[0].pos;
        for (size_t i = 0; i < r->nmodels; i++) {
            size_t m = model_add(pb, &r->models[i].model);
            if (m == SIZE_MAX)
                return;
            struct psrc e = { .model = m, .params = &r->models[i].params,
                              .pos = r->models[i].pos };
            if (slice_has_model(s, m)) {
                dup_warn(pb, e.pos, m);
                s->dup[s->ndup++] = e;
            } else {
                s->src[s->nsrc++] = e;
            }
        }
        p->base = SIZE_MAX;
        if (r->base_model.path) {
            size_t b = model_add(pb, &r->base_model);
            if (b == SIZE_MAX)
                return;
            p->base = b;
            /* An unlisted base model becomes an extra source without parameters. */
            if (!slice_has_model(s, b))
                s->src[s->nsrc++] = (struct psrc){ .model = b, .pos = r->base_model.pos };
        }
        s->base = p->base;
    } else {
        for (size_t k = 0; k < r->nslices; k++) {
            const struct ms_slice *rs = &r->slices[k];
            struct pslice *s = &pb->sl[k];
            s->pos = rs->pos;
            s->params = &rs->params;
            s->src = ms_calloc(rs->nsources ? rs->nsources : 1, sizeof *s->src);
            s->dup = ms_calloc(rs->nsources ? rs->nsources : 1, sizeof *s->dup);
            if (!s->src || !s->dup)
                return pb_oom(pb);
            for (size_t i = 0; i < rs->nsources; i++) {
                const struct ms_source *src = &rs->sources[i];
                size_t m = model_add(pb, &src->model);
                if (m == SIZE_MAX)
                    return;
                struct psrc e = { .model = m, .start = src->layer_range[0],
                                  .end = src->layer_range[1], .has_range = src->has_range,
                                  .params = &src->params, .pos = src->pos };
                const struct psrc *first = slice_find_model(s, m);
                if (first && (first->has_range != e.has_range ||
                              (e.has_range && (first->start != e.start || first->end != e.end)))) {
                    pb_err(pb, MS_EPLAN, NULL, "%s: model '%s' is listed twice in one slice "
                           "with different layer ranges", WHERE(src->pos), model_ref(pb, m));
                } else if (first) {
                    dup_warn(pb, e.pos, m);
                    s->dup[s->ndup++] = e;
                } else {
                    s->src[s->nsrc++] = e;
                }
            }
            if (!rs->nsources)
                pb_err(pb, MS_ERECIPE, NULL, "%s: slice has no sources", WHERE(rs->pos));
        }
        p->base = SIZE_MAX;
        if (r->base_model.path && (p->base = model_add(pb, &r->base_model)) == SIZE_MAX)
            return;
        for (size_t k = 0; k < r->nslices; k++) {
            const struct ms_slice *rs = &r->slices[k];
            pb->sl[k].base = p->base;
            if (rs->base_model.path && (pb->sl[k].base = model_add(pb, &rs->base_model)) ==
                                           SIZE_MAX)
                return;
        }
    }
    for (size_t k = 0; k < pb->nsl; k++) {
        if (pb->sl[k].nsrc > MS_MAX_INPUTS)
            pb_err(pb, MS_EUNSUPPORTED, NULL, "%s: %zu models in one slice; at most %d are "
                   "supported", WHERE(pb->sl[k].pos), pb->sl[k].nsrc, MS_MAX_INPUTS);
        if (pb->m && (pb->m->flags & MS_M_BASE_REQUIRED) && pb->sl[k].base == SIZE_MAX) {
            pb_err(pb, MS_EPLAN, "need-base", "%s: merge method '%s' requires base_model",
                   WHERE(pb->r->nmodels ? pb->r->merge_method_pos : pb->sl[k].pos),
                   pb->m->name);
        }
    }
    p->donor = p->base != SIZE_MAX ? p->base : 0;
}

/* ------------------------------------------------------------------ phase 3: models */

/* `model+lora`: the adapter, checked against the model (pipeline/lora.c). */
static void open_lora(struct pb *pb, struct ms_plan_model *pm, const struct ms_modelref *ref)
{
    enum ms_dtype d = ms_dtype_is_compute(pb->opts->lora_dtype) ? pb->opts->lora_dtype : MS_DT_NONE;
    int rc = ms_model_resolve(ref->lora, ref->lora_revision, &pm->lora_path);
    if (rc) {
        pb_err(pb, rc, NULL, "model '%s': %s", pm->ref, ms_errmsg());
        return;
    }
    rc = ms__lora_open(pm->lora_path, pm->ref, pm->model, pm->config_json, d, &pm->lora);
    if (rc)
        pb_err(pb, rc, NULL, "%s", ms_errmsg()); /* names the reference, file and tensor */
}

static void open_models(struct pb *pb)
{
    struct ms_plan *p = pb->p;
    for (size_t i = 0; i < p->nmodels; i++) {
        struct ms_plan_model *pm = &p->models[i];
        const struct ms_modelref *ref = pb->refs[i];
        int rc = 0;
        if (ref->lora && pb->opts->lora_cache) { /* a complete folded copy replaces the fold */
            char *cp = ms__lora_cache_path(pb->opts->lora_cache, ref);
            if (!cp)
                return pb_oom(pb);
            if (ms__lora_cache_ready(cp, pb->opts->lora_dtype)) {
                pm->path = cp;
                pm->lora_cached = true;
            } else {
                pm->lora_cache = cp;
            }
        }
        if (!pm->path)
            rc = ms_model_resolve(ref->path, ref->revision, &pm->path);
        if (rc) {
            pb_err(pb, rc, NULL, "%s", ms_errmsg());
            continue;
        }
        rc = ms_model_open(pm->path, &pm->model);
        if (rc) {
            pm->model = NULL;
            pb_err(pb, rc, NULL, "model '%s': %s", pm->ref, ms_errmsg());
            continue;
        }
        size_t len;
        rc = ms_model_read_file(pm->model, "config.json", &pm->config_json, &len);
        if (rc < 0) {
            pm->config_json = NULL;
            pb_err(pb, rc, NULL, "model '%s': %s", pm->ref, ms_errmsg());
        }
        if (ref->lora && !pm->lora_cached)
            open_lora(pb, pm, ref);
    }
}

/* All models agree on the architecture (unless --allow-crimes); builds it and
 * counts every model's layers. */
static void check_arch(struct pb *pb)
{
    struct ms_plan *p = pb->p;
    size_t e0 = pb->nerr;
    char **names = ms_calloc(p->nmodels, sizeof *names);
    struct ms_model **models = ms_calloc(p->nmodels, sizeof *models);
    const char **refs = ms_calloc(p->nmodels, sizeof *refs);
    if (!names || !models || !refs) {
        pb_oom(pb);
        goto out;
    }
    for (size_t i = 0; i < p->nmodels; i++) {
        models[i] = p->models[i].model;
        refs[i] = p->models[i].ref;
        const char *ov = pb->refs[i]->override_architecture;
        int rc = ov ? ((names[i] = ms_strdup(ov)) ? 0 : MS_ENOMEM)
                    : ms__arch_name(p->models[i].config_json, refs[i], &names[i]);
        if (rc)
            pb_err(pb, rc, NULL, "%s", rc == MS_ENOMEM ? "out of memory" : ms_errmsg());
    }
    if (pb->oom || pb->nerr > e0)
        goto out;
    for (size_t i = 1; i < p->nmodels && !(pb->opts && pb->opts->allow_crimes); i++) {
        const char *a = names[0] ? names[0] : "(none)", *b = names[i] ? names[i] : "(none)";
        if (strcmp(a, b))
            pb_err(pb, MS_EPLAN, NULL, "models disagree on the architecture: '%s' is %s, '%s' "
                   "is %s (--allow-crimes merges them anyway)", refs[0], a, refs[i], b);
    }
    if (pb->oom || pb->nerr > e0)
        goto out;
    int rc = ms__arch_build(names[0], models, refs, p->nmodels, &pb->arch);
    if (rc) {
        pb_err(pb, rc, NULL, "%s", ms_errmsg());
        goto out;
    }
    p->arch = ms_strdup(pb->arch->name);
    if (!p->arch)
        pb_oom(pb);
    for (size_t i = 0; i < p->nmodels; i++) {
        const char *key;
        rc = ms__arch_layers(pb->arch, p->models[i].config_json, models[i], refs[i],
                             &p->models[i].num_layers, &key);
        if (rc)
            pb_err(pb, rc, NULL, "%s", ms_errmsg());
        if (i == p->donor)
            pb->layers_key = key;
        /* Count the checkpoint tensors that no output uses. */
        for (size_t t = 0; t < models[i]->ntensors; t++) {
            enum ms__wkind k;
            size_t w;
            uint64_t l;
            if (!ms__arch_classify(pb->arch, ms_model_tensor_at(models[i], t, NULL)->name, &k,
                                   &w, &l))
                p->ndropped++;
        }
    }
out:
    if (names)
        for (size_t i = 0; i < p->nmodels; i++)
            ms_free(names[i]);
    ms_free(names);
    ms_free(models);
    ms_free(refs);
}

/* ------------------------------------------------------------------ phase 4: layer ranges */

static void check_ranges(struct pb *pb)
{
    struct ms_plan *p = pb->p;
    char wbuf[600];
    p->out_layers = 0;
    for (size_t k = 0; k < pb->nsl; k++) {
        struct pslice *s = &pb->sl[k];
        bool ok = true;
        for (size_t i = 0; i < s->nsrc; i++) {
            struct psrc *src = &s->src[i];
            uint64_t n = p->models[src->model].num_layers;
            if (pb->r->nmodels) {
                src->start = 0;
                src->end = (int64_t)n;
                continue;
            }
            if (!src->has_range) {
                pb_err(pb, MS_ERECIPE, NULL, "%s: slice source '%s' has no layer_range",
                       WHERE(src->pos), model_ref(pb, src->model));
                ok = false;
            } else if (src->start < 0 || src->end > (int64_t)n || src->start >= src->end) {
                pb_err(pb, MS_EPLAN, NULL, "%s: layer_range [%" PRId64 ", %" PRId64 "] is %s "
                       "for model '%s' (%" PRIu64 " layers)", WHERE(src->pos), src->start,
                       src->end, src->start >= src->end ? "empty" : "out of bounds",
                       model_ref(pb, src->model), n);
                ok = false;
            }
        }
        if (!ok || !s->nsrc)
            continue;
        int64_t n0 = s->src[0].end - s->src[0].start;
        for (size_t i = 1; i < s->nsrc; i++) {
            int64_t ni = s->src[i].end - s->src[i].start;
            if (ni != n0) {
                pb_err(pb, MS_EPLAN, NULL, "%s: all sources of a slice must have the same "
                       "number of layers ('%s' has %" PRId64 ", '%s' has %" PRId64 ")",
                       WHERE(pb->r->nmodels ? s->src[i].pos : s->pos),
                       model_ref(pb, s->src[0].model), n0, model_ref(pb, s->src[i].model), ni);
                break;
            }
        }
        p->out_layers += (uint64_t)n0;
    }
}

/* ------------------------------------------------------------------ phase 5: jobs */

static const struct ms_setting *param_get(const struct ms_params *ps, const char *name)
{
    return ps ? ms_params_get(ps, name) : NULL;
}

/*
 * The value of parameter d for `model` (SIZE_MAX for a global parameter) with
 * mergekit's precedence (1.5): the sources of this slice naming this model, in
 * order (per-model parameters only), then the slice, then the top level. The
 * filter sees `name`. Returns false when no level sets it.
 */
static bool param_eval(const struct pb *pb, const struct pslice *sl,
                       const struct ms_param_decl *d, size_t model, const char *name, double t,
                       double *v, struct ms_pos *pos)
{
    const struct ms_setting *s;
    if (d->per_model) {
        for (size_t i = 0; i < sl->nsrc + sl->ndup; i++) {
            const struct psrc *e = i < sl->nsrc ? &sl->src[i] : &sl->dup[i - sl->nsrc];
            if (e->model != model)
                continue;
            s = param_get(e->params, d->name);
            if (s && ms_setting_eval(s, name, t, v)) {
                *pos = s->pos;
                return true;
            }
        }
    }
    s = param_get(sl->params, d->name);
    if (s && ms_setting_eval(s, name, t, v)) {
        *pos = s->pos;
        return true;
    }
    s = param_get(&pb->r->params, d->name);
    if (s && ms_setting_eval(s, name, t, v)) {
        *pos = s->pos;
        return true;
    }
    return false;
}

/* Range and bool checks of a resolved value; false (and a problem) when invalid. */
static bool param_check(struct pb *pb, const struct ms_param_decl *d, double v,
                        struct ms_pos pos, const char *model, const char *tensor)
{
    char wbuf[600], key[128], forwhom[600];
    if (model)
        snprintf(forwhom, sizeof forwhom, "model '%s' tensor '%s'", model, tensor);
    else
        snprintf(forwhom, sizeof forwhom, "tensor '%s'", tensor);
    if (d->is_bool && v != 0 && v != 1) {
        snprintf(key, sizeof key, "bool:%d:%d:%s", pos.line, pos.col, d->name);
        pb_err(pb, MS_EPLAN, key, "%s: parameter '%s' must be true or false, got %g for %s",
               WHERE(pos), d->name, v, forwhom);
        return false;
    }
    bool low = d->lo_open ? !(v > d->lo) : !(v >= d->lo);
    bool high = d->hi_open ? !(v < d->hi) : !(v <= d->hi);
    if (low || high) {
        snprintf(key, sizeof key, "range:%d:%d:%s", pos.line, pos.col, d->name);
        pb_err(pb, MS_EPLAN, key, "%s: %s %g is out of range %c%g, %g%c for %s", WHERE(pos),
               d->name, v, d->lo_open ? '(' : '[', d->lo, d->hi, d->hi_open ? ')' : ']',
               forwhom);
        return false;
    }
    return true;
}

static enum ms_dtype promote(enum ms_dtype a, enum ms_dtype b)
{
    if (a == b)
        return a;
    if (a == MS_DT_F64 || b == MS_DT_F64)
        return MS_DT_F64;
    return MS_DT_F32; /* bf16 with f16, or either with f32 */
}

static void shape_str(const int64_t *shape, uint32_t ndim, char *buf, size_t n)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (uint32_t i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%" PRId64, i ? ", " : "", shape[i]);
    if (o < n)
        snprintf(buf + o, n - o, "]");
}

static bool job_push(struct pb *pb, const struct ms_job *job)
{
    struct ms_plan *p = pb->p;
    if (p->njobs == pb->cap_jobs) {
        size_t nc = MS_MAX(64, pb->cap_jobs * 2);
        struct ms_job *j = ms_realloc(p->jobs, nc * sizeof *j);
        if (!j)
            return false;
        p->jobs = j;
        pb->cap_jobs = nc;
    }
    p->jobs[p->njobs++] = *job;
    return true;
}

/* What a method's plan-time hooks (ms_plan_ops) see of the job being planned. */
struct hook_ctx {
    struct ms_plan_ctx pub;       /* first member: the hooks' ctx points here */
    struct pb *pb;
    const struct ms_job *job;
};

static int hook_problem(const struct ms_plan_ctx *ctx, int code, const char *key,
                        const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int hook_problem(const struct ms_plan_ctx *ctx, int code, const char *key,
                        const char *fmt, ...)
{
    const struct hook_ctx *hc = (const struct hook_ctx *)ctx;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return pb_verr(hc->pb, code, key, (struct ms_pos){ 0, 0 }, msg);
}

static const char *hook_model_ref(const struct ms_plan_ctx *ctx, uint32_t input)
{
    const struct hook_ctx *hc = (const struct hook_ctx *)ctx;
    assert(input < hc->job->s.ninputs);
    return model_ref(hc->pb, hc->job->in[input].model);
}

static uint32_t hook_model_id(const struct ms_plan_ctx *ctx, uint32_t input)
{
    const struct hook_ctx *hc = (const struct hook_ctx *)ctx;
    assert(input < hc->job->s.ninputs);
    return hc->job->in[input].model;
}

static void hook_tally(const struct ms_plan_ctx *ctx, const char *tensor)
{
    const struct hook_ctx *hc = (const struct hook_ctx *)ctx;
    if (!hc->pb->tally++)
        snprintf(hc->pb->tally_first, sizeof hc->pb->tally_first, "%s", tensor);
}

/* Input-count and base rules of the method for one tensor; false when broken. */
static bool check_inputs(struct pb *pb, const struct pslice *sl, const struct ms_job *job,
                         const char *tname)
{
    const struct ms_method *m = pb->m;
    uint32_t n = job->s.ninputs;
    char wbuf[600];
    if (n < m->min_inputs || (m->max_inputs && n > m->max_inputs)) {
        if (m->min_inputs == 1 && m->max_inputs == 1)
            pb_err(pb, MS_EPLAN, "count", "%s: merge method '%s' takes exactly one input, got "
                   "%u for tensor '%s'", WHERE(pb->r->merge_method_pos), m->name, n, tname);
        else if (m->max_inputs == 2 && (m->flags & MS_M_BASE_REQUIRED))
            pb_err(pb, MS_EPLAN, "count", "%s: merge method '%s' takes the base model and one "
                   "other model, got %u inputs for tensor '%s'",
                   WHERE(pb->r->merge_method_pos), m->name, n, tname);
        else if (m->max_inputs)
            pb_err(pb, MS_EPLAN, "count", "%s: merge method '%s' takes %u to %u inputs, got %u "
                   "for tensor '%s'", WHERE(pb->r->merge_method_pos), m->name, m->min_inputs,
                   m->max_inputs, n, tname);
        else
            pb_err(pb, MS_EPLAN, "count", "%s: merge method '%s' takes at least %u inputs, got "
                   "%u for tensor '%s'", WHERE(pb->r->merge_method_pos), m->name,
                   m->min_inputs, n, tname);
        return false;
    }
    /* A required base must be among the inputs (slerp-like methods pass a lone
     * tensor through, base or not). */
    if ((m->flags & MS_M_BASE_REQUIRED) && job->s.base < 0 && sl->base != SIZE_MAX &&
        (m->max_inputs == 0 || n > 1)) {
        char key[64];
        snprintf(key, sizeof key, "nobase:%p", (const void *)sl);
        if (!slice_has_model(sl, sl->base))
            pb_err(pb, MS_EPLAN, key, "%s: base model '%s' is not a source of this slice "
                   "(merge method '%s' needs it)", WHERE(sl->pos), model_ref(pb, sl->base),
                   m->name);
        else
            pb_err(pb, MS_EPLAN, key, "tensor '%s' is missing from the base model '%s' (merge "
                   "method '%s' needs it)", tname, model_ref(pb, sl->base), m->name);
        return false;
    }
    return true;
}

/* All inputs have one shape, except embedding rows (2.1.3, 2.6); sets the job shape. */
static bool check_shapes(struct pb *pb, struct ms_job *job, const struct ms_st_tensor **tt,
                         const struct ms__weight *wd, const char *tname)
{
    uint32_t n = job->s.ninputs;
    bool to_base = pb->m->flags & MS_M_BASE_SHAPE;
    uint32_t ref = (to_base && job->s.base >= 0) ? (uint32_t)job->s.base : 0;
    const struct ms_st_tensor *R = tt[ref];
    job->ndim = R->ndim;
    memcpy(job->shape, R->shape, sizeof job->shape);
    bool ok = true;
    for (uint32_t i = 0; i < n; i++) {
        const struct ms_st_tensor *T = tt[i];
        if (T->ndim == R->ndim && !memcmp(T->shape, R->shape, R->ndim * sizeof *R->shape))
            continue;
        const char *mr = model_ref(pb, job->in[ref].model), *mi = model_ref(pb, job->in[i].model);
        char key[128], s1[160], s2[160];
        shape_str(R->shape, R->ndim, s1, sizeof s1);
        shape_str(T->shape, T->ndim, s2, sizeof s2);
        if (wd->is_embed && T->ndim == 2 && R->ndim == 2 && T->shape[1] == R->shape[1]) {
            if (!to_base) {
                job->shape[0] = MS_MIN(job->shape[0], T->shape[0]);
                continue;
            }
            if (T->shape[0] >= R->shape[0])
                continue; /* cut to the base's rows */
            snprintf(key, sizeof key, "rows:%u:%u", job->in[ref].model, job->in[i].model);
            pb_err(pb, MS_EPLAN, key, "embedding tensor '%s' of model '%s' has %" PRId64 " rows, "
                   "fewer than the base model '%s' (%" PRId64 "); merge method '%s' needs at "
                   "least the base's", tname, mi, T->shape[0], mr, R->shape[0], pb->m->name);
            ok = false;
            continue;
        }
        snprintf(key, sizeof key, "shape:%u:%u", job->in[ref].model, job->in[i].model);
        pb_err(pb, MS_EPLAN, key, "shape mismatch for tensor '%s': model '%s' has %s but model "
               "'%s' has %s", tname, mr, s1, mi, s2);
        ok = false;
    }
    return ok;
}

/* A vocabulary-sized tensor of a tokenizer merge (3.4): every input is 2-D with the
 * same row length and has the rows its row map names; the job has the merged rows. */
static bool tok_shapes(struct pb *pb, struct ms_job *job, const struct ms_st_tensor **tt)
{
    bool ok = true;
    for (uint32_t i = 0; i < job->s.ninputs; i++) {
        const struct ms_st_tensor *T = tt[i];
        size_t m = job->in[i].model;
        if (T->ndim != 2 || T->shape[1] != tt[0]->shape[1]) {
            pb_err(pb, MS_EPLAN, NULL,
                   "tensor '%s' of model '%s': a vocabulary-sized tensor "
                   "must be 2-D with the same row length in every model",
                   job->name, model_ref(pb, m));
            ok = false;
            continue;
        }
        int64_t top = ms_tokmerge_max_row(pb->p->tok, m);
        if (top >= T->shape[0]) {
            pb_err(pb, MS_EPLAN, NULL,
                   "tensor '%s' of model '%s' has %" PRId64 " rows but its "
                   "tokenizer uses id %" PRId64,
                   job->name, model_ref(pb, m), T->shape[0], top);
            ok = false;
        }
        job->in[i].rowmap = ms_tokmerge_rowmap(pb->p->tok, m);
    }
    job->ndim = 2;
    job->shape[0] = (int64_t)ms_tokmerge_rows(pb->p->tok);
    job->shape[1] = tt[0]->shape[1];
    return ok;
}

/* Resolves every declared parameter for the job (1.5); false when one is invalid. */
static bool resolve_params(struct pb *pb, const struct pslice *sl, struct ms_job *job,
                           char *const *in_name, const size_t *src_of, double t)
{
    const struct ms_method *m = pb->m;
    char key[128];
    bool ok = true;
    for (uint32_t i = 0; i < MS_MAX_INPUTS; i++)
        for (uint32_t j = 0; j < MS_MAX_PARAMS; j++)
            job->s.pv[i][j] = NAN;
    for (uint32_t j = 0; j < MS_MAX_PARAMS; j++)
        job->s.gv[j] = NAN;
    for (uint32_t j = 0; j < m->nparams; j++) {
        const struct ms_param_decl *d = &m->params[j];
        double v;
        struct ms_pos pos;
        if (!d->per_model) {
            if (param_eval(pb, sl, d, SIZE_MAX, job->name, t, &v, &pos)) {
                ok &= param_check(pb, d, v, pos, NULL, job->name);
                job->s.gv[j] = v;
            } else if (d->required) {
                snprintf(key, sizeof key, "req:%s", d->name);
                pb_at(pb, MS_EPLAN, key, pb->r->merge_method_pos, "missing required parameter "
                      "'%s' for tensor '%s'", d->name, job->name);
                ok = false;
            } else {
                job->s.gv[j] = d->def;
            }
            continue;
        }
        for (uint32_t i = 0; i < job->s.ninputs; i++) {
            size_t model = job->in[i].model;
            const char *fname = in_name[src_of[i]];
            if (param_eval(pb, sl, d, model, fname, t, &v, &pos)) {
                ok &= param_check(pb, d, v, pos, model_ref(pb, model), fname);
                job->s.pv[i][j] = v;
            } else if (d->required) {
                /* mergekit: required = p.required and not is_base. (linear still
                 * needs the base's weight: mergekit crashes on None there.) */
                if ((int)i == job->s.base && !(m->flags & MS_M_BASE_PARAMS))
                    continue;
                snprintf(key, sizeof key, "req:%s:%zu", d->name, model);
                pb_at(pb, MS_EPLAN, key, sl->src[src_of[i]].pos, "missing required parameter "
                      "'%s' for model '%s' tensor '%s'", d->name, model_ref(pb, model), fname);
                ok = false;
            } else {
                job->s.pv[i][j] = d->def;
            }
        }
    }
    return ok;
}

/* Compute and output dtypes (0, 1.7, 2.1.4) and the copy decision. */
static bool pick_dtypes(struct pb *pb, struct ms_job *job)
{
    struct ms_plan *p = pb->p;
    const struct ms_plan_ops *po = pb->m->plan;
    uint32_t n = job->s.ninputs;
    bool nonfloat = false;
    enum ms_dtype load[MS_MAX_INPUTS];
    for (uint32_t i = 0; i < n; i++) {
        struct ms_plan_input *in = &job->in[i];
        enum ms_dtype sd = in->lora ? in->lora->dtype : in->dtype; /* as mergekit reads it */
        bool fl = ms_dtype_is_float(sd);
        nonfloat |= !fl;
        in->load = (fl && p->dtype != MS_DT_NONE) ? p->dtype : sd;
        load[i] = in->load;
        job->s.in_dt[i] = in->load;
    }
    bool same = po && po->copies_input && po->copies_input(&job->s); /* result == input 0 */
    if (nonfloat) {
        const struct ms_plan_input *in = &job->in[0];
        if (same && (p->out_dtype == MS_DT_NONE || p->out_dtype == in->dtype)) {
            job->copy = true;
            job->s.compute = MS_DT_F32;
            job->out_dtype = job->result = in->dtype;
            return true;
        }
        for (uint32_t i = 0; i < n; i++)
            if (!ms_dtype_is_float(job->in[i].dtype))
                in = &job->in[i];
        pb_err(pb, MS_EPLAN, NULL, "tensor '%s' has dtype %s in model '%s': only float tensors "
               "can be merged (passthrough without scale copies it)", job->name,
               ms_dtype_name(in->dtype), model_ref(pb, in->model));
        return false;
    }
    enum ms_dtype D = load[0], out;
    for (uint32_t i = 1; i < n; i++)
        D = promote(D, load[i]);
    out = D;
    if (po && po->dtypes)
        po->dtypes(&job->s, load, &D, &out);
    job->result = out;
    if (p->out_dtype != MS_DT_NONE)
        out = p->out_dtype;
    job->out_dtype = out;
    job->copy =
        same && !job->in[0].lora && job->in[0].dtype == job->in[0].load && job->in[0].load == out;
    if (job->copy) {
        job->s.compute = ms_dtype_is_compute(D) ? D : MS_DT_F32;
        return true;
    }
    if (!ms_dtype_is_compute(D) || !ms_dtype_is_compute(out)) {
        pb_err(pb, MS_EUNSUPPORTED, "f64", "tensor '%s': %s arithmetic is not supported (set "
               "dtype: float32)", job->name, ms_dtype_name(ms_dtype_is_compute(D) ? out : D));
        return false;
    }
    job->s.compute = D;
    return true;
}

/*
 * Plans one output tensor: weight w of kind k, from the first nsrc sources of
 * slice sl, at output layer out_layer and offset `off` into the sources' ranges
 * (layer weights), at gradient position t.
 */
static void job_make(struct pb *pb, const struct pslice *sl, size_t nsrc, enum ms__wkind k,
                     size_t w, uint64_t out_layer, uint64_t off, double t)
{
    struct ms_plan *p = pb->p;
    const struct ms__weight *wd = &pb->arch->w[k][w];
    char *in_name[MS_MAX_INPUTS] = { 0 };
    const struct ms_st_tensor *tt[MS_MAX_INPUTS];
    size_t src_of[MS_MAX_INPUTS];
    struct ms_job *job;
    struct hook_ctx hc;
    bool bad = false, direct = false;
    if (nsrc > MS_MAX_INPUTS)
        return; /* normalize() reported it */
    job = ms_calloc(1, sizeof *job);
    if (!job)
        return pb_oom(pb);
    job->in = ms_calloc(MS_MAX(nsrc, 1), sizeof *job->in);
    if (!job->in) {
        pb_oom(pb);
        goto out;
    }
    job->name = ms__arch_tensor_name(pb->arch, k, w, out_layer);
    if (!job->name) {
        pb_oom(pb);
        goto out;
    }

    uint32_t n = 0;
    for (size_t s = 0; s < nsrc; s++) {
        const struct psrc *src = &sl->src[s];
        const struct ms_plan_model *pm = &p->models[src->model];
        in_name[s] = k == MS__W_LAYER
                         ? ms__arch_tensor_name(pb->arch, k, w, (uint64_t)src->start + off)
                         : ms_strdup(job->name);
        if (!in_name[s]) {
            pb_oom(pb);
            goto out;
        }
        uint32_t shard = 0;
        const struct ms_st_tensor *ti = ms_model_find(pm->model, in_name[s], &shard);
        for (size_t a = 0; !ti && k != MS__W_LAYER && a < wd->naliases; a++)
            ti = ms_model_find(pm->model, wd->aliases[a], &shard);
        if (ti)
            direct = true;
        else if (wd->tied)
            ti = ms_model_find(pm->model, wd->tied, &shard);
        if (!ti) {
            if (!wd->optional) {
                char key[128];
                snprintf(key, sizeof key, "missing:%zu:%d:%zu", src->model, (int)k, w);
                pb_err(pb, MS_EPLAN, key, "tensor '%s' required but not present in model '%s'",
                       in_name[s], pm->ref);
                bad = true;
            }
            continue;
        }
        const struct ms_st_file *f = pm->model->shards[shard];
        struct ms_plan_input *in = &job->in[n];
        in->model = (uint32_t)src->model;
        in->name = ti->name;
        in->file = f->path;
        in->shard = shard;
        in->dtype = ti->dtype;
        in->load = ti->dtype;
        in->file_offset = f->data_start + ti->begin;
        in->numel = ti->numel;
        in->lora = pm->lora ? ms__lora_find(pm->lora, ti) : NULL;
        tt[n] = ti;
        src_of[n] = s;
        n++;
    }
    /* An optional weight that no model stores under its own name is not produced
     * (tied names do not count); a missing required one was reported above. */
    if (bad || !direct || !n)
        goto out;

    job->s.ninputs = n;
    job->s.base = -1;
    for (uint32_t i = 0; i < n; i++)
        if (job->in[i].model == sl->base)
            job->s.base = (int)i;
    bool vocab = p->tok && wd->is_embed; /* rows gathered through the tokenizer merge */
    if (!check_inputs(pb, sl, job, job->name) ||
        !(vocab ? tok_shapes(pb, job, tt) : check_shapes(pb, job, tt, wd, job->name)))
        goto out;
    job->s.name = job->name;
    job->s.ndim = job->ndim;
    job->s.shape = job->shape;
    job->s.method = pb->m;
    const struct ms_plan_ops *po = pb->m->plan;
    hc = (struct hook_ctx){
        .pub = { .where = pb->mwhere, .optional = wd->optional, .problem = hook_problem,
                 .model_ref = hook_model_ref, .model_id = hook_model_id, .tally = hook_tally },
        .pb = pb,
        .job = job,
    };
    if (sl->base != SIZE_MAX)
        hc.pub.slice_base = model_ref(pb, sl->base);
    if (po && po->inputs && po->inputs(&hc.pub, &job->s) != MS_PLAN_KEEP)
        goto out;
    if (!ms_shape_numel(job->shape, job->ndim, &job->s.numel)) {
        pb_err(pb, MS_EPLAN, NULL, "tensor '%s': shape overflows", job->name);
        goto out;
    }
    job->s.row_len = job->ndim >= 2 ? (uint64_t)job->shape[job->ndim - 1] : job->s.numel;
    if (!resolve_params(pb, sl, job, in_name, src_of, t) || !pick_dtypes(pb, job) ||
        (po && po->check && po->check(&hc.pub, &job->s) != 0))
        goto out;
    if (vocab) {
        job->copy = false; /* the rows are permuted: never a raw byte copy */
        for (uint32_t i = 0; i < n; i++)
            if (job->in[i].lora) { /* the gathered rows, defaults and pad means read raw rows */
                pb_err(pb, MS_EUNSUPPORTED, NULL,
                       "tensor '%s' of model '%s': tokenizer merging with a LoRA that changes "
                       "a vocabulary-sized tensor is not supported yet (merge a model with "
                       "the adapter folded in)",
                       job->name, model_ref(pb, job->in[i].model));
                goto out;
            }
        if (!(job->tok = ms_tokmerge_job(p->tok, job))) {
            pb_err(pb, MS_EPLAN, "tokjob", "%s", ms_errmsg());
            goto out;
        }
    }
    job->out_bytes = (job->s.numel * ms_dtype_bits(job->out_dtype) + 7) / 8;

    const char *label = job->in[0].name;
    for (uint32_t i = 1; i < n; i++)
        if (strcmp(job->in[i].name, label) > 0)
            label = job->in[i].name;
    job->label = ms_strdup(label);
    job->s.shape = NULL; /* points into this temporary: layout_jobs sets it */
    if (!job->label || !job_push(pb, job)) {
        pb_oom(pb);
    } else {
        job->name = job->label = NULL; /* owned by the plan now */
        job->in = NULL;
    }
out:
    for (size_t s = 0; s < nsrc; s++)
        ms_free(in_name[s]);
    ms_free(job->in);
    ms_free(job->name);
    ms_free(job->label);
    ms_free(job);
}

/* Every output tensor in plan order: pre-weights, layers slice by slice, post-weights. */
static void make_jobs(struct pb *pb)
{
    const struct ms__arch *a = pb->arch;
    const struct pslice *first = &pb->sl[0], *last = &pb->sl[pb->nsl - 1];
    where(pb, pb->r->merge_method_pos, pb->mwhere, sizeof pb->mwhere);
    for (size_t w = 0; w < a->nw[MS__W_PRE] && !pb->oom; w++)
        job_make(pb, first, first->nsrc, MS__W_PRE, w, 0, 0, 0.0);
    uint64_t out_layer = 0;
    for (size_t k = 0; k < pb->nsl && !pb->oom; k++) {
        const struct pslice *s = &pb->sl[k];
        uint64_t n = (uint64_t)(s->src[0].end - s->src[0].start);
        for (uint64_t i = 0; i < n && !pb->oom; i++, out_layer++) {
            double t = n == 1 ? 1.0 : (double)i / (double)(n - 1);
            for (size_t w = 0; w < a->nw[MS__W_LAYER]; w++)
                job_make(pb, s, s->nsrc, MS__W_LAYER, w, out_layer, i, t);
        }
    }
    /* mergekit zips the last slice's sources with a list sized by the first slice. */
    size_t npost = MS_MIN(last->nsrc, first->nsrc);
    for (size_t w = 0; w < a->nw[MS__W_POST] && !pb->oom; w++)
        job_make(pb, last, npost, MS__W_POST, w, 0, 0, 0.0);
    if (pb->tally) {
        assert(pb->m->plan && pb->m->plan->tally_warn);
        pb->m->plan->tally_warn(pb->r->path, pb->tally, pb->tally_first);
    }
}

/* ------------------------------------------------------------------ phase 6: order, layout */

struct order_key {
    const char *label;
    size_t idx;
};

static int order_cmp(const void *a, const void *b)
{
    const struct order_key *x = a, *y = b;
    int c = strcmp(x->label, y->label);
    if (c)
        return c;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* Save order by label then plan order; output layout; jobs in (shard, offset) order. */
static int layout_jobs(struct pb *pb)
{
    struct ms_plan *p = pb->p;
    size_t n = p->njobs;
    int rc = 0;
    struct order_key *ord = ms_malloc(n * sizeof *ord);
    struct ms_out_tensor *ot = ms_calloc(n, sizeof *ot);
    size_t *src = ms_malloc(n * sizeof *src); /* jobs[k] comes from jobs[src[k]] */
    if (!ord || !ot || !src) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        ord[i] = (struct order_key){ p->jobs[i].label, i };
    qsort(ord, n, sizeof *ord, order_cmp);
    for (size_t i = 0; i < n; i++) {
        const struct ms_job *j = &p->jobs[ord[i].idx];
        ot[i].name = j->name;
        ot[i].dtype = j->out_dtype;
        ot[i].ndim = j->ndim;
        memcpy(ot[i].shape, j->shape, sizeof ot[i].shape);
        ot[i].nbytes = j->out_bytes;
    }
    rc = ms_layout_build(ot, n, pb->opts ? pb->opts->out_shard_size : DEFAULT_SHARD_SIZE,
                         &p->layout);
    if (rc) {
        p->layout = NULL;
        goto out;
    }
    size_t k = 0;
    for (size_t s = 0; s < p->layout->nshards; s++) {
        const struct ms_out_shard *sh = &p->layout->shards[s];
        p->bytes_written += sh->file_bytes;
        for (size_t i = 0; i < sh->ntensors; i++) {
            size_t li = sh->order[i];
            const struct ms_out_tensor *t = &p->layout->tensors[li];
            assert(t->shard == s && k < n);
            src[k] = ord[li].idx;
            p->jobs[src[k]].shard = (uint32_t)s;
            p->jobs[src[k]].out_offset = t->file_offset;
            k++;
        }
    }
    assert(k == n);
    /* Permute in place along cycles (a job is ~2.4 KB: no second array of them). */
    for (size_t c = 0; c < n; c++) {
        if (src[c] == SIZE_MAX || src[c] == c)
            continue;
        struct ms_job tmp = p->jobs[c];
        size_t d = c;
        while (src[d] != c) {
            size_t from = src[d];
            p->jobs[d] = p->jobs[from];
            src[d] = SIZE_MAX;
            d = from;
        }
        p->jobs[d] = tmp;
        src[d] = SIZE_MAX;
    }
    for (size_t i = 0; i < n; i++) {
        struct ms_job *j = &p->jobs[i];
        j->s.name = j->name;
        j->s.ndim = j->ndim;
        j->s.shape = j->shape;
        j->s.seed = pb->opts ? pb->opts->seed : 0;
        j->s.key = ms_hash_str(j->name);
        if (j->copy)
            p->bytes_read += j->out_bytes;
        else
            for (uint32_t q = 0; q < j->s.ninputs; q++)
                p->bytes_read += (j->s.numel * ms_dtype_bits(j->in[q].dtype) + 7) / 8;
    }
out:
    ms_free(ord);
    ms_free(ot);
    ms_free(src);
    return rc;
}

/* Sets a dotted key path ("text_config.num_hidden_layers") to an integer. */
static int json_set_path(json_t *root, const char *path, json_t *val)
{
    char buf[128];
    snprintf(buf, sizeof buf, "%s", path);
    json_t *node = root;
    char *save = NULL, *tok = strtok_r(buf, ".", &save);
    for (char *next; tok && (next = strtok_r(NULL, ".", &save)); tok = next) {
        node = json_object_get(node, tok);
        if (!json_is_object(node)) {
            json_decref(val);
            return -1;
        }
    }
    return json_object_set_new(node, tok, val);
}

/* The donor's config.json with the layer count (slices form) and dtype patched (4.4). */
static int make_config(struct pb *pb)
{
    struct ms_plan *p = pb->p;
    const struct ms_plan_model *donor = &p->models[p->donor];
    if (!donor->config_json)
        return 0;
    json_t *root = json_loads(donor->config_json, 0, NULL);
    int rc = 0;
    if (!json_is_object(root)) {
        rc = ms_error(MS_EMODEL, "model '%s': config.json is not a JSON object", donor->ref);
        goto out;
    }
    if (pb->r->nslices && pb->layers_key &&
        json_set_path(root, pb->layers_key, json_integer((json_int_t)p->out_layers))) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    if (p->tok) { /* 4.4: the vocabulary size follows the merged tokenizer */
        json_t *tc = json_object_get(root, "text_config");
        json_t *at =
            !json_object_get(root, "vocab_size") && json_object_get(tc, "vocab_size") ? tc : root;
        if (json_object_set_new(at, "vocab_size",
                                json_integer((json_int_t)ms_tokmerge_rows(p->tok)))) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            goto out;
        }
    }
    enum ms_dtype d = p->out_dtype != MS_DT_NONE ? p->out_dtype : p->dtype;
    if (d != MS_DT_NONE) {
        const char *name = d == MS_DT_BF16 ? "bfloat16" : d == MS_DT_F16 ? "float16" : "float32";
        if (json_object_set_new(root, "torch_dtype", json_string(name)) ||
            (json_object_get(root, "dtype") &&
             json_object_set_new(root, "dtype", json_string(name)))) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            goto out;
        }
    }
    rc = ms__json_render(root, true, &p->out_config_json, NULL);
out:
    json_decref(root);
    return rc;
}

/* ------------------------------------------------------------------ entry points */

void ms_plan_free(struct ms_plan *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->nmodels; i++) {
        ms_free(p->models[i].ref);
        ms_free(p->models[i].path);
        ms_model_free(p->models[i].model);
        ms_free(p->models[i].config_json);
        ms_free(p->models[i].lora_path);
        ms_free(p->models[i].lora_cache);
        ms__lora_free(p->models[i].lora);
    }
    ms_free(p->models);
    for (size_t i = 0; i < p->njobs; i++) {
        ms_free(p->jobs[i].name);
        ms_free(p->jobs[i].label);
        ms_free(p->jobs[i].in);
    }
    ms_free(p->jobs);
    ms_layout_free(p->layout);
    ms_free(p->out_config_json);
    ms_free(p->arch);
    ms_tokmerge_free(p->tok);
    ms_free(p);
}

int ms_plan_build(const struct ms_recipe *r, const struct ms_plan_opts *opts,
                  struct ms_plan **out)
{
    *out = NULL;
    struct pb pb = { .r = r, .opts = opts };
    int rc = 0;
    pb.p = ms_calloc(1, sizeof *pb.p);
    if (!pb.p)
        return ms_error(MS_ENOMEM, "out of memory");
    struct ms_plan *p = pb.p;
    p->recipe = r;
    p->base = SIZE_MAX;
    p->dtype = p->out_dtype = MS_DT_NONE;

    check_recipe(&pb);
    normalize(&pb);
    if (!pb.oom && p->nmodels && pb.nsl) {
        size_t e0 = pb.nerr;
        open_models(&pb);
        if (!pb.oom && pb.nerr == e0)
            check_arch(&pb);
        if (!pb.oom && pb.nerr == e0)
            check_ranges(&pb);
        if (!pb.oom && pb.nerr == e0 && (rc = ms_tokmerge_build(p, pb.refs, &p->tok)))
            pb_err(&pb, rc, NULL, "%s", ms_errmsg());
        if (!pb.oom && pb.nerr == e0 && pb.m && pb.arch)
            make_jobs(&pb);
    }
    if (!pb_failed(&pb) && pb.m) {
        if (!p->njobs) {
            pb_err(&pb, MS_EPLAN, NULL, "%s: the recipe produces no tensors", r->path);
        } else if ((rc = layout_jobs(&pb)) || (rc = make_config(&pb))) {
            pb_err(&pb, rc, NULL, "%s", ms_errmsg());
        }
    }

    if (pb.oom && !pb.nerr)
        rc = ms_error(MS_ENOMEM, "out of memory");
    if (pb.nerr) {
        for (size_t i = 0; i < pb.nerr; i++) {
            const struct perr *e = &pb.err[i];
            char *line = e->more ? ms_asprintf("%s (and %zu more tensors)", e->msg, e->more)
                                 : NULL;
            ms_log_error(line ? line : e->msg);
            ms_free(line);
        }
        const struct perr *e = &pb.err[0];
        rc = e->more ? ms_error(e->code, "%s (and %zu more tensors)", e->msg, e->more)
                     : ms_error(e->code, "%s", e->msg);
    } else if (rc) {
        ms_log_error(ms_errmsg());
    }
    for (size_t i = 0; i < pb.nerr; i++) {
        ms_free(pb.err[i].msg);
        ms_free(pb.err[i].key);
    }
    ms_free(pb.err);
    for (size_t k = 0; k < pb.nsl; k++) {
        ms_free(pb.sl[k].src);
        ms_free(pb.sl[k].dup);
    }
    ms_free(pb.sl);
    ms_free(pb.refs);
    ms__arch_free(pb.arch);
    if (rc) {
        ms_plan_free(p);
        return rc;
    }
    *out = p;
    return 0;
}
