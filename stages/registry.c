/*
 * registry.c - every merge method mergekit registers (mergekit-spec.md 2.0), as
 * listed in methods.def; each method's descriptor lives in its own file.
 */
#include <string.h>

#include "ms_stage.h"
#include "stage_impl.h"

static const struct ms_method *const methods[] = {
#define MS_METHOD(name) &ms_method_##name,
#include "methods.def"
#undef MS_METHOD
};

const struct ms_method *ms_method_find(const char *name)
{
    for (size_t i = 0; i < MS_ARRAY_LEN(methods); i++)
        if (!strcmp(methods[i]->name, name))
            return methods[i];
    return NULL;
}

const struct ms_method *ms_method_at(size_t i)
{
    return i < MS_ARRAY_LEN(methods) ? methods[i] : NULL;
}

int ms_method_param(const struct ms_method *m, const char *name)
{
    for (uint32_t i = 0; i < m->nparams; i++)
        if (!strcmp(m->params[i].name, name))
            return (int)i;
    return -1;
}
