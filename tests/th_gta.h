/*
 * th_gta.h - a plain reference of the generalized task arithmetic family for
 * the stage tests (tests/th_gta.c), written straight from mergekit-spec.md 2.6
 * and 2.7: whole arrays, a sort-based top-k, and per-op rounding done with
 * ms_round_bf16_1, _Float16 or float. It shares no code with stages/gta.c.
 */
#ifndef MS_TH_GTA_H
#define MS_TH_GTA_H

#include <stdbool.h>
#include <stdint.h>

#include "ms_stage.h"

struct th_gta {
    const char *method;              /* "ties" or "task_arithmetic" */
    enum ms_dtype dt;                /* compute dtype */
    uint64_t numel;
    uint32_t ninputs;                /* with the base */
    int base;                        /* index of the base among the inputs */
    const float *in[MS_MAX_INPUTS];  /* numel values each, representable in dt */
    double weight[MS_MAX_INPUTS];    /* per input; the base's is ignored */
    double density[MS_MAX_INPUTS];   /* per input; 1 = no trimming */
    bool normalize, rescale;
    double lambda;
};

/* Rounds x to dt (BF16 by ms_round_bf16_1, F16 by _Float16, F32 as is). */
float th_gta_rnd(enum ms_dtype dt, float x);
/* A job for g (1-D tensor "t"): shape must outlive the job. */
void th_gta_job(const struct th_gta *g, struct ms_stage_job *job, int64_t *shape);
/* The expected output (numel floats). Returns 0, or -1 when mergekit would
 * assert (int(density*numel) == 0). */
int th_gta_ref(const struct th_gta *g, float *out);
/*
 * A random case for g->method and g->dt (both set by the caller): 1-5 inputs
 * with the base at a random index, numel in [1, maxn], inputs in store
 * (MS_MAX_INPUTS * maxn floats) with many equal and zero deltas, random
 * weights (sometimes summing to zero), densities per model (only values that
 * keep at least one element), normalize, rescale and lambda.
 */
void th_gta_random(struct th_gta *g, float *store, uint64_t maxn, uint64_t *rs);
/* Runs the stage through ms_stage_run_mem with the given chunk size. */
int th_gta_run(const struct th_gta *g, uint64_t chunk, float *out);
/* Index of the first element whose bits differ, or -1. */
long th_gta_first_diff(const float *a, const float *b, uint64_t n);
/* xorshift64* */
uint64_t th_gta_rand(uint64_t *s);

#endif
