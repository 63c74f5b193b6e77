/*
 * recipe_link.c - mergekit-multi's linking of a multi-document recipe file
 * (ms_recipe_file_link in ms_recipe.h; mergekit/scripts/multimerge.py): names to
 * intermediate folders, dependencies, and an order with every document after
 * the ones it uses. No I/O.
 */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ms_common.h"
#include "ms_recipe.h"

static int at(const struct ms_recipe *r, struct ms_pos p, const char *msg, const char *a,
              const char *b)
{
    return ms_error(MS_ERECIPE, "%s:%d:%d: %s%s%s", r->path, p.line, p.col, msg, a ? a : "",
                    b ? b : "");
}

/* Calls fn on every model reference of r (in recipe order); stops at an error. */
static int each_ref(struct ms_recipe *r, int (*fn)(struct ms_modelref *, void *), void *arg)
{
    int rc = 0;
    if (r->base_model.path && (rc = fn(&r->base_model, arg)) < 0)
        return rc;
    for (size_t i = 0; i < r->nmodels; i++)
        if ((rc = fn(&r->models[i].model, arg)) < 0)
            return rc;
    for (size_t k = 0; k < r->nslices; k++) {
        struct ms_slice *s = &r->slices[k];
        if (s->base_model.path && (rc = fn(&s->base_model, arg)) < 0)
            return rc;
        for (size_t i = 0; i < s->nsources; i++)
            if ((rc = fn(&s->sources[i].model, arg)) < 0)
                return rc;
    }
    if (r->tokenizer_source_ref.path && (rc = fn(&r->tokenizer_source_ref, arg)) < 0)
        return rc;
    return 0;
}

struct link {
    struct ms_recipe_file *f;
    size_t self;
    const char *dir;
};

static int patch_ref(struct ms_modelref *m, void *arg)
{
    struct link *l = arg;
    struct ms_recipe_file *f = l->f;
    for (size_t j = 0; j < f->n; j++) {
        const char *name = f->docs[j]->name;
        if (!name || strcmp(m->path, name))
            continue;
        if (j == l->self)
            return at(f->docs[j], m->pos, "document '", name, "' uses its own output as a model");
        char *p = ms_asprintf("%s/%s", l->dir, name);
        if (!p)
            return ms_error(MS_ENOMEM, "out of memory");
        ms_free(m->path);
        m->path = p;
        f->uses[l->self * f->n + j] = true;
        return 0;
    }
    return 0;
}

/* Depth-first: appends i after everything it uses. state: 0 new, 1 on the path, 2 done. */
static int visit(struct ms_recipe_file *f, size_t i, unsigned char *state, size_t *stack,
                 size_t depth, size_t *norder)
{
    if (state[i] == 2)
        return 0;
    stack[depth] = i;
    if (state[i] == 1) {
        /* The cycle is stack[k..depth] where stack[k] == i. */
        size_t k = 0;
        while (stack[k] != i)
            k++;
        char msg[512];
        size_t o = 0;
        for (size_t q = k; q <= depth && o < sizeof msg; q++)
            o += (size_t)snprintf(msg + o, sizeof msg - o, "%s%s", q > k ? " -> " : "",
                                  f->docs[stack[q]]->name);
        const struct ms_recipe *r = f->docs[i];
        return at(r, r->name_pos, "circular dependency between documents: ", msg, NULL);
    }
    state[i] = 1;
    for (size_t j = 0; j < f->n; j++) {
        if (!f->uses[i * f->n + j])
            continue;
        int rc = visit(f, j, state, stack, depth + 1, norder);
        if (rc < 0)
            return rc;
    }
    state[i] = 2;
    f->order[(*norder)++] = i;
    return 0;
}

int ms_recipe_file_link(struct ms_recipe_file *f, const char *intermediate_dir)
{
    assert(f && f->n >= 1 && !f->order);
    assert(intermediate_dir || f->n == 1);
    size_t n = f->n;
    unsigned char *state = NULL;
    size_t *stack = NULL;
    int rc = 0;

    f->final = SIZE_MAX;
    f->order = ms_calloc(n, sizeof *f->order);
    f->uses = ms_calloc(n * n, sizeof *f->uses);
    f->out = ms_calloc(n, sizeof *f->out);
    state = ms_calloc(n, 1);
    stack = ms_calloc(n + 1, sizeof *stack);
    if (!f->order || !f->uses || !f->out || !state || !stack) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    if (n == 1) {
        f->final = 0;
        f->order[0] = 0;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        const struct ms_recipe *r = f->docs[i];
        const char *name = r->name;
        if (!name) {
            if (f->final != SIZE_MAX) {
                char first[64];
                snprintf(first, sizeof first, "%d:%d)", f->docs[f->final]->doc_pos.line,
                         f->docs[f->final]->doc_pos.col);
                rc = at(r, r->doc_pos, "a second document without a name (the first is at ", first,
                        "); only the final merge may be unnamed");
                goto out;
            }
            f->final = i;
            continue;
        }
        if (!*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, "..")) {
            rc = at(r, r->name_pos, "name '", name,
                    "' cannot be a folder name under --intermediate-dir");
            goto out;
        }
        for (size_t j = 0; j < i; j++) {
            if (f->docs[j]->name && !strcmp(f->docs[j]->name, name)) {
                char first[64];
                snprintf(first, sizeof first, "' (first at %d:%d)", f->docs[j]->name_pos.line,
                         f->docs[j]->name_pos.col);
                rc = at(r, r->name_pos, "duplicate merge name '", name, first);
                goto out;
            }
        }
        f->out[i] = ms_asprintf("%s/%s", intermediate_dir, name);
        if (!f->out[i]) {
            rc = ms_error(MS_ENOMEM, "out of memory");
            goto out;
        }
    }
    for (size_t i = 0; i < n; i++) {
        struct link l = { f, i, intermediate_dir };
        if ((rc = each_ref(f->docs[i], patch_ref, &l)) < 0)
            goto out;
    }
    size_t norder = 0;
    for (size_t i = 0; i < n; i++)
        if ((rc = visit(f, i, state, stack, 0, &norder)) < 0)
            goto out;
    assert(norder == n);
out:
    ms_free(state);
    ms_free(stack);
    return rc;
}
