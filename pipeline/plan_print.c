/*
 * plan_print.c - `mergestream plan` output: a readable summary of a plan, or
 * the whole plan as JSON (ms_plan_print in ms_plan.h).
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "lora_impl.h"
#include "ms_common.h"
#include "ms_engine.h"
#include "ms_plan.h"
#include "ms_tokmerge.h"
#include "ms_str.h"
#include "plan_impl.h"

/*
 * Counts the merged (not copied) jobs by how the method runs them: asks each
 * stage's begin() whether it wants a reduce pass (state zeroed, as the engine
 * hands it over).
 */
static int count_passes(const struct ms_plan *p, size_t *single, size_t *multi)
{
    const struct ms_stage_ops *ops = p->method->ops;
    *single = *multi = 0;
    for (size_t k = 0; k < p->njobs; k++) {
        const struct ms_job *j = &p->jobs[k];
        if (j->copy)
            continue;
        if (!ops || !ops->begin) {
            (*single)++;
            continue;
        }
        size_t sz = ops->state_size ? ops->state_size(&j->s) : 0;
        void *state = ms_aligned_alloc(sz ? sz : MS_ALIGN);
        if (!state)
            return ms_error(MS_ENOMEM, "out of memory");
        memset(state, 0, sz ? sz : MS_ALIGN);
        int r = ops->begin(state, &j->s);
        ms_aligned_free(state);
        if (r == MS_STAGE_REDUCE)
            (*multi)++;
        else
            (*single)++;
    }
    return 0;
}

static const char *dtname(enum ms_dtype d) { return d == MS_DT_NONE ? "-" : ms_dtype_name(d); }

/* The stored dtype of a model: its tensors' common one, or "mixed". */
static const char *model_dtype(const struct ms_model *m)
{
    const char *name = NULL;
    for (size_t i = 0; i < m->ntensors; i++) {
        const char *d = ms_dtype_name(ms_model_tensor_at(m, i, NULL)->dtype);
        if (name && strcmp(name, d))
            return "mixed";
        name = d;
    }
    return name ? name : "-";
}

static void value_str(const struct ms_param_decl *d, double v, char *buf, size_t n)
{
    if (isnan(v))
        snprintf(buf, n, "none");
    else if (d->is_bool)
        snprintf(buf, n, "%s", v != 0 ? "true" : "false");
    else
        snprintf(buf, n, "%.6g", v);
}

/* Range of one resolved parameter over all jobs: per model (model < nmodels) or global. */
static void param_range(const struct ms_plan *p, uint32_t j, size_t model, double *lo,
                        double *hi, bool *any, bool *unset)
{
    *lo = INFINITY;
    *hi = -INFINITY;
    *any = *unset = false;
    bool per_model = p->method->params[j].per_model;
    for (size_t k = 0; k < p->njobs; k++) {
        const struct ms_job *job = &p->jobs[k];
        if (job->copy && !per_model)
            continue;
        for (uint32_t i = 0; i < (per_model ? job->s.ninputs : 1); i++) {
            if (per_model && job->in[i].model != model)
                continue;
            double v = per_model ? job->s.pv[i][j] : job->s.gv[j];
            if (isnan(v)) {
                *unset = true;
                continue;
            }
            *any = true;
            *lo = MS_MIN(*lo, v);
            *hi = MS_MAX(*hi, v);
        }
    }
}

static void print_params(const struct ms_plan *p, FILE *f)
{
    const struct ms_method *m = p->method;
    char a[64], b[64];
    if (!m->nparams)
        return;
    /* The model column is as wide as the longest reference (28 at least). */
    int w = 28;
    for (size_t mi = 0; mi < p->nmodels; mi++)
        w = MS_MAX(w, (int)MS_MIN(strlen(p->models[mi].ref), 200));
    fprintf(f, "parameters (resolved over all tensors):\n");
    for (uint32_t j = 0; j < m->nparams; j++) {
        const struct ms_param_decl *d = &m->params[j];
        double lo, hi;
        bool any, unset;
        if (!d->per_model) {
            param_range(p, j, 0, &lo, &hi, &any, &unset);
            value_str(d, lo, a, sizeof a);
            value_str(d, hi, b, sizeof b);
            if (!any)
                fprintf(f, "  %-12s none\n", d->name);
            else if (lo == hi)
                fprintf(f, "  %-12s %s\n", d->name, a);
            else
                fprintf(f, "  %-12s %s .. %s\n", d->name, a, b);
            continue;
        }
        for (size_t mi = 0; mi < p->nmodels; mi++) {
            /* The base model of a base-required method takes no per-model values. */
            if (mi == p->base && (m->flags & MS_M_BASE_REQUIRED))
                continue;
            param_range(p, j, mi, &lo, &hi, &any, &unset);
            if (!any && !unset)
                continue; /* the model feeds no tensor */
            value_str(d, lo, a, sizeof a);
            value_str(d, hi, b, sizeof b);
            if (!any)
                fprintf(f, "  %-12s %-*s none\n", d->name, w, p->models[mi].ref);
            else if (lo == hi)
                fprintf(f, "  %-12s %-*s %s%s\n", d->name, w, p->models[mi].ref, a,
                        unset ? " (some tensors none)" : "");
            else
                fprintf(f, "  %-12s %-*s %s .. %s%s\n", d->name, w, p->models[mi].ref, a, b,
                        unset ? " (some tensors none)" : "");
        }
    }
}

static int print_text(const struct ms_plan *p, uint64_t max_memory, FILE *f)
{
    char h1[32], h2[32];
    const struct ms_method *m = p->method;
    fprintf(f, "recipe:       %s\n", p->recipe->path);
    fprintf(f, "merge method: %s (%s)\n", m->name, m->summary);
    fprintf(f, "architecture: %s, %" PRIu64 " output layers\n", p->arch ? p->arch : "-",
            p->out_layers);
    fprintf(f, "models:\n");
    for (size_t i = 0; i < p->nmodels; i++) {
        const struct ms_plan_model *pm = &p->models[i];
        fprintf(f, "  %s -> %s  (%s, %" PRIu64 " layers, %zu tensors", pm->ref, pm->path,
                model_dtype(pm->model), pm->num_layers, pm->model->ntensors);
        if (i == p->base)
            fprintf(f, ", base");
        if (i == p->donor)
            fprintf(f, ", config donor");
        fprintf(f, ")\n");
        if (pm->lora) {
            char d[1200];
            ms__lora_describe(pm->lora, d, sizeof d);
            fprintf(f, "    LoRA folded in as read: adapter %s\n", d);
        }
        if (pm->lora_cache)
            fprintf(f, "    LoRA: the folded model is written to %s first\n", pm->lora_cache);
        if (pm->lora_cached)
            fprintf(f, "    LoRA: folded model read from --lora-merge-cache\n");
    }
    print_params(p, f);

    /* dtypes actually used */
    bool comp[MS_DT_COUNT] = { false }, outd[MS_DT_COUNT] = { false };
    size_t ncopy = 0;
    for (size_t k = 0; k < p->njobs; k++) {
        const struct ms_job *j = &p->jobs[k];
        if (j->copy)
            ncopy++;
        else
            comp[j->s.compute] = true;
        outd[j->out_dtype] = true;
    }
    fprintf(f, "dtypes:       dtype %s, out_dtype %s; compute", dtname(p->dtype),
            dtname(p->out_dtype));
    bool anyc = false;
    for (int d = 0; d < MS_DT_COUNT; d++)
        if (comp[d]) {
            fprintf(f, " %s", ms_dtype_name((enum ms_dtype)d));
            anyc = true;
        }
    fprintf(f, "%s; output", anyc ? "" : " -");
    for (int d = 0; d < MS_DT_COUNT; d++)
        if (outd[d])
            fprintf(f, " %s", ms_dtype_name((enum ms_dtype)d));
    fprintf(f, "\n");

    const struct ms_layout *l = p->layout;
    if (p->tok) { /* tokenizer merging (ms_tokmerge.h) */
        const struct ms_recipe *r = p->recipe;
        size_t nv = 0;
        for (size_t i = 0; i < p->njobs; i++)
            nv += p->jobs[i].tok != NULL;
        fprintf(f, "tokenizer:    %s, %" PRIu64 " tokens, %" PRIu64 " rows; %zu tensor%s gathered "
                "row by row\n", r->has_tokenizer ? r->tok.source : r->tokenizer_source,
                ms_tokmerge_vocab(p->tok), ms_tokmerge_rows(p->tok), nv, nv == 1 ? "" : "s");
    }
    fprintf(f, "output:       %zu tensors (%zu copied as is), %zu shard%s", p->njobs, ncopy,
            l->nshards, l->nshards == 1 ? "" : "s");
    if (p->ndropped)
        fprintf(f, "; %zu input tensors not in the architecture are dropped", p->ndropped);
    fprintf(f, "\n");
    int sw = 36;
    for (size_t s = 0; s < l->nshards; s++)
        sw = MS_MAX(sw, (int)MS_MIN(strlen(l->shards[s].file_name), 200));
    for (size_t s = 0; s < l->nshards; s++)
        fprintf(f, "  %-*s %10s  %zu tensors\n", sw, l->shards[s].file_name,
                ms_fmt_bytes(h1, sizeof h1, (double)l->shards[s].file_bytes, MS_BYTES_SI),
                l->shards[s].ntensors);
    fprintf(f, "read:         %s (%" PRIu64 " bytes)\n",
            ms_fmt_bytes(h1, sizeof h1, (double)p->bytes_read, MS_BYTES_SI), p->bytes_read);
    fprintf(f, "write:        %s (%" PRIu64 " bytes)\n",
            ms_fmt_bytes(h2, sizeof h2, (double)p->bytes_written, MS_BYTES_SI), p->bytes_written);
    size_t single, multi;
    int rc = count_passes(p, &single, &multi);
    if (rc)
        return rc;
    fprintf(f, "passes:       ");
    if (ncopy)
        fprintf(f, "%zu tensors copied", ncopy);
    if (single)
        fprintf(f, "%s%zu in a single pass", ncopy ? ", " : "", single);
    if (multi)
        fprintf(f, "%s%zu reduce+apply (whole-tensor figures first, then the merge)",
                ncopy || single ? ", " : "", multi);
    fprintf(f, "\n");
    if (!max_memory)
        max_memory = MS_DEFAULT_MAX_MEMORY;
    uint64_t pool, used, chunk;
    char h3[32];
    rc = ms_engine_estimate(p, max_memory, 0, &pool, &used, &chunk);
    if (rc) {
        fprintf(f, "memory:       %s\n", ms_errmsg());
    } else {
        /* Buffers are reserved at the budget; pages a chunk never touches stay unused. */
        fprintf(f, "memory:       at most %s in use (buffers of %s reserved at --max-memory %s)",
                ms_fmt_bytes(h1, sizeof h1, (double)used, MS_BYTES_IEC),
                ms_fmt_bytes(h2, sizeof h2, (double)pool, MS_BYTES_IEC),
                ms_fmt_bytes(h3, sizeof h3, (double)max_memory, MS_BYTES_IEC));
        if (chunk)
            fprintf(f, ", chunks of up to %" PRIu64 " elements", chunk);
        fprintf(f, "\n");
    }
    return ferror(f) ? ms_error(MS_EIO, "cannot write the plan") : 0;
}

/* ------------------------------------------------------------------ JSON */

static json_t *jparam(const struct ms_param_decl *d, double v)
{
    if (isnan(v))
        return json_null();
    if (d->is_bool)
        return json_boolean(v != 0);
    return json_real(v);
}

static json_t *jshape(const int64_t *shape, uint32_t ndim)
{
    json_t *a = json_array();
    for (uint32_t i = 0; a && i < ndim; i++)
        json_array_append_new(a, json_integer(shape[i]));
    return a;
}

static json_t *json_job(const struct ms_plan *p, const struct ms_job *j)
{
    const struct ms_method *m = p->method;
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "name", json_string(j->name));
    json_object_set_new(o, "label", json_string(j->label));
    json_object_set_new(o, "shape", jshape(j->shape, j->ndim));
    json_object_set_new(o, "numel", json_integer((json_int_t)j->s.numel));
    json_object_set_new(o, "method", json_string(m->name));
    json_object_set_new(o, "copy", json_boolean(j->copy));
    json_object_set_new(o, "compute", json_string(ms_dtype_name(j->s.compute)));
    json_object_set_new(o, "out_dtype", json_string(ms_dtype_name(j->out_dtype)));
    json_object_set_new(o, "out_bytes", json_integer((json_int_t)j->out_bytes));
    json_object_set_new(o, "shard", json_integer(j->shard));
    json_object_set_new(o, "shard_file", json_string(p->layout->shards[j->shard].file_name));
    json_object_set_new(o, "offset", json_integer((json_int_t)j->out_offset));
    json_t *gp = json_object();
    for (uint32_t k = 0; gp && k < m->nparams; k++)
        if (!m->params[k].per_model)
            json_object_set_new(gp, m->params[k].name, jparam(&m->params[k], j->s.gv[k]));
    json_object_set_new(o, "params", gp);
    json_object_set_new(o, "base_input", j->s.base >= 0 ? json_integer(j->s.base) : json_null());
    json_t *ins = json_array();
    for (uint32_t i = 0; ins && i < j->s.ninputs; i++) {
        const struct ms_plan_input *in = &j->in[i];
        json_t *io = json_object();
        if (!io)
            break;
        json_object_set_new(io, "model", json_string(p->models[in->model].ref));
        json_object_set_new(io, "name", json_string(in->name));
        json_object_set_new(io, "file", json_string(in->file));
        json_object_set_new(io, "offset", json_integer((json_int_t)in->file_offset));
        json_object_set_new(io, "dtype", json_string(ms_dtype_name(in->dtype)));
        json_object_set_new(io, "load_dtype", json_string(ms_dtype_name(in->load)));
        json_object_set_new(io, "numel", json_integer((json_int_t)in->numel));
        json_t *pp = json_object();
        for (uint32_t k = 0; pp && k < m->nparams; k++)
            if (m->params[k].per_model)
                json_object_set_new(pp, m->params[k].name, jparam(&m->params[k], j->s.pv[i][k]));
        json_object_set_new(io, "params", pp);
        json_array_append_new(ins, io);
    }
    json_object_set_new(o, "inputs", ins);
    return o;
}

static int print_json(const struct ms_plan *p, uint64_t max_memory, FILE *f)
{
    int rc = 0;
    char *text = NULL;
    size_t len;
    json_t *root = json_object();
    json_t *models = json_array(), *shards = json_array(), *jobs = json_array();
    if (!root || !models || !shards || !jobs) {
        json_decref(models);
        json_decref(shards);
        json_decref(jobs);
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    json_object_set_new(root, "recipe", json_string(p->recipe->path));
    json_object_set_new(root, "merge_method", json_string(p->method->name));
    json_object_set_new(root, "architecture", p->arch ? json_string(p->arch) : json_null());
    json_object_set_new(root, "out_layers", json_integer((json_int_t)p->out_layers));
    json_object_set_new(root, "dtype", p->dtype == MS_DT_NONE ? json_null()
                                                               : json_string(dtname(p->dtype)));
    json_object_set_new(root, "out_dtype", p->out_dtype == MS_DT_NONE
                                               ? json_null() : json_string(dtname(p->out_dtype)));
    for (size_t i = 0; i < p->nmodels; i++) {
        const struct ms_plan_model *pm = &p->models[i];
        json_t *o = json_object();
        if (!o)
            break;
        json_object_set_new(o, "ref", json_string(pm->ref));
        json_object_set_new(o, "path", json_string(pm->path));
        json_object_set_new(o, "num_layers", json_integer((json_int_t)pm->num_layers));
        json_object_set_new(o, "tensors", json_integer((json_int_t)pm->model->ntensors));
        json_object_set_new(o, "base", json_boolean(i == p->base));
        json_object_set_new(o, "donor", json_boolean(i == p->donor));
        if (pm->lora) {
            char d[1200];
            ms__lora_describe(pm->lora, d, sizeof d);
            json_object_set_new(o, "lora", json_string(d));
        }
        json_array_append_new(models, o);
    }
    json_object_set_new(root, "models", models);
    json_object_set_new(root, "dropped_tensors", json_integer((json_int_t)p->ndropped));
    json_object_set_new(root, "bytes_read", json_integer((json_int_t)p->bytes_read));
    json_object_set_new(root, "bytes_written", json_integer((json_int_t)p->bytes_written));
    for (size_t s = 0; s < p->layout->nshards; s++) {
        const struct ms_out_shard *sh = &p->layout->shards[s];
        json_t *o = json_object();
        if (!o)
            break;
        json_object_set_new(o, "file", json_string(sh->file_name));
        json_object_set_new(o, "tensors", json_integer((json_int_t)sh->ntensors));
        json_object_set_new(o, "header_bytes", json_integer((json_int_t)sh->header_bytes));
        json_object_set_new(o, "file_bytes", json_integer((json_int_t)sh->file_bytes));
        json_array_append_new(shards, o);
    }
    json_object_set_new(root, "shards", shards);
    uint64_t mm = max_memory ? max_memory : MS_DEFAULT_MAX_MEMORY, pool, used, chunk;
    if (!ms_engine_estimate(p, mm, 0, &pool, &used, &chunk)) {
        json_t *o = json_object();
        json_object_set_new(o, "max_memory", json_integer((json_int_t)mm));
        json_object_set_new(o, "pool_bytes", json_integer((json_int_t)pool));
        json_object_set_new(o, "used_bytes", json_integer((json_int_t)used));
        json_object_set_new(o, "chunk_elems", json_integer((json_int_t)chunk));
        json_object_set_new(root, "memory", o);
    }
    for (size_t k = 0; k < p->njobs; k++)
        json_array_append_new(jobs, json_job(p, &p->jobs[k]));
    json_object_set_new(root, "jobs", jobs);
    rc = ms__json_render(root, true, &text, &len);
    if (rc)
        goto out;
    if (fwrite(text, 1, len, f) != len || fflush(f))
        rc = ms_error(MS_EIO, "cannot write the plan");
out:
    json_decref(root);
    ms_free(text);
    return rc;
}

int ms_plan_print(const struct ms_plan *p, uint64_t max_memory, bool json, FILE *f)
{
    return json ? print_json(p, max_memory, f) : print_text(p, max_memory, f);
}
