/*
 * th_gta.h - a plain reference of the generalized task arithmetic family for
 * the stage tests (tests/th_gta.c), written straight from mergekit-spec.md 2.6
 * and 2.7: whole arrays, sort-based top-k, outliers and ranks, masks drawn
 * element by element from ms_rng_u32 (the one function shared with the stage,
 * by design: it defines the random streams), and per-op rounding done with
 * ms_round_bf16_1, _Float16 or float. It shares no code with stages/gta.c.
 */
#ifndef MS_TH_GTA_H
#define MS_TH_GTA_H

#include <stdbool.h>
#include <stdint.h>

#include "ms_stage.h"

struct th_gta {
    const char *method;              /* any GTA method name */
    enum ms_dtype dt;                /* compute dtype */
    uint64_t numel;
    uint32_t ninputs;                /* with the base */
    int base;                        /* index of the base among the inputs */
    const float *in[MS_MAX_INPUTS];  /* numel values each, representable in dt */
    double weight[MS_MAX_INPUTS];    /* per input; the base's is ignored */
    double density[MS_MAX_INPUTS];   /* per input; 1 = no trimming */
    double gamma[MS_MAX_INPUTS];     /* breadcrumbs*: per input (0 is a value: set it) */
    double epsilon[MS_MAX_INPUTS];   /* della*: per input */
    bool normalize, rescale;
    double lambda;
    uint64_t seed;                   /* random methods: the job seed */
    uint64_t row_len;                /* 0 or numel: 1-D; else a 2-D [numel/row_len, row_len] */
    bool exact_ranks;                /* della: skip rounding ranks to the work dtype (to show
                                      * that a test is sensitive to it); not mergekit */
};

/* Rounds x to dt (BF16 by ms_round_bf16_1, F16 by _Float16, F32 as is). */
float th_gta_rnd(enum ms_dtype dt, float x);
/* A job for g (tensor "t", 1-D or 2-D by row_len): shape[2] must outlive the job. */
void th_gta_job(const struct th_gta *g, struct ms_stage_job *job, int64_t *shape);
/* The expected output (numel floats). Returns 0, -1 when mergekit would
 * assert (ties: int(density*numel) == 0), -2 when it would raise (della:
 * density +- epsilon outside (0, 1)). */
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
/*
 * Runs a job through its ops with its own driver: chunks of `chunk` elements
 * (whole rows for ROWWISE stages), reduce in a random order of chunks (folded
 * in chunk order), apply in another random order; shuffle seeded by rs.
 */
int th_stage_run_shuffled(const struct ms_stage_job *job, const float *const *in, float *out,
                          uint64_t chunk, uint64_t rs);
/* Index of the first element whose bits differ, or -1. */
long th_gta_first_diff(const float *a, const float *b, uint64_t n);
/* xorshift64* */
uint64_t th_gta_rand(uint64_t *s);

/* Largest tensor th_gta_random_cases makes. */
#define TH_GTA_MAXN 400
/* Runs g at chunk sizes 1 (small tensors only), 7, 100 and numel, and with the
 * shuffled driver, and asserts each output equals want bit for bit. */
void th_gta_expect(const struct th_gta *g, const float *want, const char *what);
/* count random cases of method in dt (seeds seed0...) against th_gta_ref. */
void th_gta_random_cases(const char *method, enum ms_dtype dt, uint64_t seed0, int count);

#endif
