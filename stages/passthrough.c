/*
 * passthrough.c - the `passthrough` method (mergekit-spec.md 2.12): the one input
 * unchanged, or scaled when that model's `scale` is set:
 *   out = x                 scale unset (NAN in the job)
 *   out = rnd(x * scale)    scale as float32, not first rounded to D (rule 0.3)
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"
#include "stage_impl.h"

static int passthrough_begin(void *state, const struct ms_stage_job *job)
{
    if (job->ninputs != 1)
        return ms_error(MS_EPLAN, "%s: passthrough merge expects exactly one tensor, got %u",
                        job->name, job->ninputs);
    return MS_STAGE_APPLY;
}

/* y[j] = rnd(x[j] * s); d is a constant in each caller. */
static inline void passthrough_scale(enum ms_dtype d, float *restrict y, const float *restrict x,
                                     float s, size_t n)
{
    for (size_t j = 0; j < n; j++)
        y[j] = ms_rnd(d, x[j] * s);
}

static void passthrough_apply(const void *state, const struct ms_stage_job *job,
                              const struct ms_chunk *c)
{
    int ps = ms_method_param(job->method, "scale");
    assert(ps >= 0 && job->ninputs == 1);
    double scale = job->pv[0][ps];
    size_t n = (size_t)c->count;
    if (isnan(scale)) {
        memcpy(c->out, c->in[0], n * sizeof(float));
        return;
    }
    float s = (float)scale;
    switch (job->compute) {
    case MS_DT_BF16:
        passthrough_scale(MS_DT_BF16, c->out, c->in[0], s, n);
        break;
    case MS_DT_F16:
        passthrough_scale(MS_DT_F16, c->out, c->in[0], s, n);
        break;
    default:
        assert(job->compute == MS_DT_F32);
        passthrough_scale(MS_DT_F32, c->out, c->in[0], s, n);
        break;
    }
}

static const struct ms_stage_ops passthrough_ops = {
    .begin = passthrough_begin,
    .apply = passthrough_apply,
};

/* Without scale the one input is the result: its bytes can be copied. */
static bool passthrough_copies_input(const struct ms_stage_job *job)
{
    int ps = ms_method_param(job->method, "scale");
    return job->ninputs == 1 && (ps < 0 || isnan(job->pv[0][ps]));
}

static const struct ms_plan_ops passthrough_plan = {
    .copies_input = passthrough_copies_input,
};

const struct ms_method ms_method_passthrough = {
    .name = "passthrough",
    .summary = "copy the one input tensor (optionally scaled)",
    .flags = MS_M_BASE_INPUT,
    .min_inputs = 1,
    .max_inputs = 1,
    .nparams = 1,
    .params = { MS__PM("scale", NAN, -MS__INF, MS__INF, false) },
    .card = { "Passthrough", NULL },
    .plan = &passthrough_plan,
    .ops = &passthrough_ops,
};
