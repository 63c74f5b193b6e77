/*
 * registry.c - every merge method mergekit registers (mergekit-spec.md 2.0),
 * with its parameters, defaults and valid ranges. A method whose `ops` is NULL
 * is known but not implemented yet: the plan says so by name.
 */
#include <math.h>
#include <string.h>

#include "ms_stage.h"
#include "stage_impl.h"

#define INF HUGE_VAL
/* Parameter declaration shorthands. */
#define PM_REQ(n) { .name = n, .per_model = true, .required = true, .def = NAN, .lo = -INF, .hi = INF }
#define PM(n, d, l, h, lo_o) { .name = n, .per_model = true, .def = d, .lo = l, .hi = h, .lo_open = lo_o }
#define G_REQ(n) { .name = n, .required = true, .def = NAN, .lo = -INF, .hi = INF }
#define G(n, d, l, h) { .name = n, .def = d, .lo = l, .hi = h }
#define G_BOOL(n, d) { .name = n, .is_bool = true, .def = d, .lo = 0, .hi = 1 }

#define GTA_GLOBALS(norm, resc) \
    G_BOOL("normalize", norm), G_BOOL("rescale", resc), G("lambda", 1.0, -INF, INF), \
    G_BOOL("int8_mask", 0)

static const struct ms_method methods[] = {
    { .name = "linear", .summary = "weighted average of the models",
      .flags = MS_M_BASE_INPUT | MS_M_BASE_PARAMS, .min_inputs = 1,
      .nparams = 2, .params = { PM_REQ("weight"), G_BOOL("normalize", 1) },
      .ops = MS_STAGE_OPS_LINEAR },
    { .name = "slerp", .summary = "spherical interpolation between the base and one model",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1, .max_inputs = 2,
      .nparams = 1, .params = { G_REQ("t") },
      .ops = MS_STAGE_OPS_SLERP },
    { .name = "nuslerp", .summary = "slerp of task vectors or of two models, flattened or per row",
      .flags = MS_M_BASE_INPUT, .min_inputs = 1, .max_inputs = 3,
      .nparams = 3, .params = { PM_REQ("weight"), G_BOOL("nuslerp_flatten", 1),
                                G_BOOL("nuslerp_row_wise", 0) },
      .ops = MS_STAGE_OPS_NUSLERP },
    { .name = "multislerp", .summary = "barycentric slerp of several models",
      .flags = MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 3, .params = { PM_REQ("weight"), G_BOOL("normalize_weights", 1),
                                G("eps", 1e-8, 0, INF) },
      .ops = MS_STAGE_OPS_MULTISLERP },
    { .name = "karcher", .summary = "Riemannian (Karcher) mean of the models",
      .flags = MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 2, .params = { G("max_iter", 10, 0, 100000), G("tol", 1e-5, 0, INF) },
      .ops = MS_STAGE_OPS_KARCHER },
    { .name = "task_arithmetic", .summary = "base + weighted sum of task vectors",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 6, .params = { PM_REQ("weight"), PM("density", 1.0, 0, INF, true),
                                GTA_GLOBALS(0, 0) },
      .ops = MS_STAGE_OPS_TASK_ARITHMETIC },
    { .name = "ties", .summary = "TIES: trim by magnitude, elect signs, disjoint mean",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 6, .params = { PM_REQ("weight"), PM("density", 1.0, 0, INF, true),
                                GTA_GLOBALS(1, 0) },
      .ops = MS_STAGE_OPS_TIES },
    { .name = "dare_ties", .summary = "DARE random drop with TIES sign election",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 6, .params = { PM_REQ("weight"), PM("density", 1.0, 0, INF, true),
                                GTA_GLOBALS(0, 1) },
      .ops = MS_STAGE_OPS_DARE_TIES },
    { .name = "dare_linear", .summary = "DARE random drop, linear combination",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 6, .params = { PM_REQ("weight"), PM("density", 1.0, 0, INF, true),
                                GTA_GLOBALS(0, 1) },
      .ops = MS_STAGE_OPS_DARE_LINEAR },
    { .name = "breadcrumbs", .summary = "drop the largest and smallest deltas",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 7, .params = { PM_REQ("weight"), PM("density", 1.0, 0, INF, true),
                                PM("gamma", 0.01, 0, 1, false), GTA_GLOBALS(0, 0) },
      .ops = MS_STAGE_OPS_BREADCRUMBS },
    { .name = "breadcrumbs_ties", .summary = "breadcrumbs with TIES sign election",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 7, .params = { PM_REQ("weight"), PM("density", 1.0, 0, INF, true),
                                PM("gamma", 0.01, 0, 1, false), GTA_GLOBALS(0, 0) },
      .ops = MS_STAGE_OPS_BREADCRUMBS_TIES },
    { .name = "della", .summary = "DELLA magnitude-ranked drop with sign election",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 7, .params = { PM_REQ("weight"), PM("density", 1.0, 0, INF, true),
                                PM("epsilon", 0.15, 0, 1, false), GTA_GLOBALS(1, 1) },
      .ops = MS_STAGE_OPS_DELLA },
    { .name = "della_linear", .summary = "DELLA magnitude-ranked drop, linear combination",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 7, .params = { PM_REQ("weight"), PM("density", 1.0, 0, INF, true),
                                PM("epsilon", 0.15, 0, 1, false), GTA_GLOBALS(0, 1) },
      .ops = MS_STAGE_OPS_DELLA_LINEAR },
    { .name = "model_stock", .summary = "Model Stock: interpolate toward the base by cosine",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 1, .params = { G_BOOL("filter_wise", 0) },
      .ops = MS_STAGE_OPS_MODEL_STOCK },
    { .name = "sce", .summary = "select by variance, calculate weights, erase minority signs",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 2, .params = { G("select_topk", 1.0, 0, 1), G_BOOL("int8_mask", 0) },
      .ops = MS_STAGE_OPS_SCE },
    { .name = "ram", .summary = "reinforced agent merging",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1,
      .nparams = 1, .params = { G("epsilon", 1e-5, 0, INF) },
      .ops = MS_STAGE_OPS_RAM },
    { .name = "ramplus_tl", .summary = "RAM+ with overlap-scaled unique deltas",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT | MS_M_RESULT_F32, .min_inputs = 1,
      .nparams = 3, .params = { G("r", 0.1, -INF, INF), G("alpha", 0.2, -INF, INF),
                                G("epsilon", 1e-5, 0, INF) },
      .ops = MS_STAGE_OPS_RAMPLUS_TL },
    { .name = "nearswap", .summary = "take the other model where it is near the base",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1, .max_inputs = 2,
      .nparams = 1, .params = { G_REQ("t") },
      .ops = MS_STAGE_OPS_NEARSWAP },
    { .name = "arcee_fusion", .summary = "importance-thresholded fusion of two models",
      .flags = MS_M_BASE_REQUIRED | MS_M_BASE_INPUT, .min_inputs = 1, .max_inputs = 2,
      .nparams = 0, .ops = MS_STAGE_OPS_ARCEE_FUSION },
    { .name = "passthrough", .summary = "copy the one input tensor (optionally scaled)",
      .flags = MS_M_BASE_INPUT, .min_inputs = 1, .max_inputs = 1,
      .nparams = 1, .params = { PM("scale", NAN, -INF, INF, false) },
      .ops = MS_STAGE_OPS_PASSTHROUGH },
};

const struct ms_method *ms_method_find(const char *name)
{
    for (size_t i = 0; i < MS_ARRAY_LEN(methods); i++)
        if (!strcmp(methods[i].name, name))
            return &methods[i];
    return NULL;
}

const struct ms_method *ms_method_at(size_t i)
{
    return i < MS_ARRAY_LEN(methods) ? &methods[i] : NULL;
}

int ms_method_param(const struct ms_method *m, const char *name)
{
    for (uint32_t i = 0; i < m->nparams; i++)
        if (!strcmp(m->params[i].name, name))
            return (int)i;
    return -1;
}
