/*
 * th_stage.c - see th_stage.h.
 */
#include <criterion/criterion.h>
#include <fenv.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "th_stage.h"

float th_stage_round(enum ms_dtype dt, float x)
{
    if (dt == MS_DT_F32 || !isfinite(x) || x == 0)
        return x;
    int mant = dt == MS_DT_BF16 ? 8 : 11;     /* significant bits */
    int emin = dt == MS_DT_BF16 ? -126 : -14; /* least normal exponent */
    double fmax = dt == MS_DT_BF16 ? ldexp(2.0 - ldexp(1, -7), 127) : 65504.0;
    int e;
    frexp(x, &e);                             /* |x| in [2^(e-1), 2^e) */
    e = e - 1 < emin ? emin : e - 1;
    double ulp = ldexp(1.0, e - (mant - 1));
    double r = nearbyint((double)x / ulp) * ulp; /* default mode: ties to even */
    if (fabs(r) > fmax)
        return x < 0 ? -INFINITY : INFINITY;
    return (float)r;
}

void th_stage_job(struct ms_stage_job *job, const char *method, const int64_t *shape,
                  uint32_t ndim, enum ms_dtype dt, uint32_t ninputs)
{
    memset(job, 0, sizeof(*job));
    job->name = "t";
    job->ndim = ndim;
    job->shape = shape;
    cr_assert(ms_shape_numel(shape, ndim, &job->numel));
    job->row_len = ndim >= 2 ? (uint64_t)shape[ndim - 1] : job->numel;
    job->compute = dt;
    job->ninputs = ninputs;
    job->base = -1;
    job->method = ms_method_find(method);
    cr_assert(job->method && job->method->ops, "method %s not supported", method);
    for (uint32_t p = 0; p < job->method->nparams; p++) {
        const struct ms_param_decl *d = &job->method->params[p];
        if (d->per_model)
            for (uint32_t i = 0; i < MS_MAX_INPUTS; i++)
                job->pv[i][p] = d->def;
        else
            job->gv[p] = d->def;
    }
    job->seed = 0;
    job->key = ms_hash_str(job->name);
}

void th_stage_set(struct ms_stage_job *job, int input, const char *param, double v)
{
    int p = ms_method_param(job->method, param);
    cr_assert(p >= 0, "no parameter %s", param);
    if (input >= 0)
        job->pv[input][p] = v;
    else
        job->gv[p] = v;
}

static uint64_t xs(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * UINT64_C(2685821657736338717);
}

float th_stage_value(enum ms_dtype dt, uint64_t *s, float scale)
{
    /* sum of 4 uniforms: bell-shaped, plus an occasional exact small value */
    double u = 0;
    for (int k = 0; k < 4; k++)
        u += (double)(xs(s) >> 11) * 0x1p-53 - 0.5;
    if ((xs(s) & 31) == 0)
        u = (double)((int)(xs(s) % 9) - 4) / 8.0;
    return th_stage_round(dt, (float)(u * 1.7 * scale));
}

uint32_t th_stage_ulps(float a, float b)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b) ? 0 : UINT32_MAX;
    if (a == b)
        return 0;
    int32_t ia, ib;
    memcpy(&ia, &a, 4);
    memcpy(&ib, &b, 4);
    /* map to a monotonic integer line */
    int64_t la = ia < 0 ? -(int64_t)(ia & 0x7fffffff) : ia;
    int64_t lb = ib < 0 ? -(int64_t)(ib & 0x7fffffff) : ib;
    int64_t d = la > lb ? la - lb : lb - la;
    return d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
}

void th_stage_run_sweep(const struct ms_stage_job *job, const float *const *in, float *out,
                        const uint64_t *sizes, int nsizes)
{
    size_t bytes = (size_t)job->numel * sizeof(float);
    float *tmp = malloc(bytes ? bytes : 1);
    cr_assert(tmp);
    for (int k = 0; k < nsizes; k++) {
        float *dst = k == 0 ? out : tmp;
        int rc = ms_stage_run_mem(job, in, dst, sizes[k]);
        cr_assert_eq(rc, 0, "chunk %llu: %s", (unsigned long long)sizes[k], ms_errmsg());
        if (k)
            cr_assert(!memcmp(out, tmp, bytes), "chunk size %llu changes the bytes",
                      (unsigned long long)sizes[k]);
    }
    free(tmp);
}
