/*
 * th_stage.h - helpers for the linear, passthrough and slerp stage tests
 * (tests/th_stage.c). The rounding here is written independently of
 * ms_rnd (include/ms_stage.h, base/dtype.c): it scales by the ulp of the
 * target type and rounds with nearbyint (ties to even) in double.
 */
#ifndef MS_TH_STAGE_H
#define MS_TH_STAGE_H

#include <stdint.h>

#include "ms_stage.h"

/* x rounded to nearest-even in dt (F32: unchanged; BF16; F16), overflow to Inf. */
float th_stage_round(enum ms_dtype dt, float x);
/* Fills job for method `method` over a tensor of the given shape (shape must
 * outlive the job), ninputs inputs, compute dtype dt, base -1, parameters at
 * their declared defaults. */
void th_stage_job(struct ms_stage_job *job, const char *method, const int64_t *shape,
                  uint32_t ndim, enum ms_dtype dt, uint32_t ninputs);
/* Sets a per-model (input >= 0) or global (input < 0) parameter by name. */
void th_stage_set(struct ms_stage_job *job, int input, const char *param, double v);
/* A random value representable in dt, roughly N(0, scale^2)-sized, never NaN;
 * *s is the xorshift state. */
float th_stage_value(enum ms_dtype dt, uint64_t *s, float scale);
/* Distance in float32 ulps between two floats (0 for equal values, +-0 equal;
 * UINT32_MAX when exactly one is NaN). */
uint32_t th_stage_ulps(float a, float b);
/* Runs the job over in[] with each chunk size in sizes[] and asserts that
 * every run gives the bytes of the first; the first run's output goes to out. */
void th_stage_run_sweep(const struct ms_stage_job *job, const float *const *in, float *out,
                        const uint64_t *sizes, int nsizes);

#endif
