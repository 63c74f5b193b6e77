/*
 * ms-benchxacc.c - CPU time per term of the exact-sum kernels (ms_xacc_dot,
 * _sumsq, _sum, _sumabs) in every instruction-set version this CPU runs:
 *
 *   ms-benchxacc [TERMS_MILLIONS [CALL_LEN]]
 *
 * Prints one line per data set, kernel and version:
 *   "benchxacc: data=delta kernel=sumabs isa=avx512 call=4096 ns_per_term=0.412"
 * Time is the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), so a loaded machine
 * changes it less than wall time. Each version's limbs are compared with the
 * scalar version's on every data set; a mismatch is an error (exit 1).
 *
 * Data sets (64 Ki floats, reused; CALL_LEN elements per call, 4096 as gta's
 * rescale pass, 256 as sce and multislerp):
 *   delta  bf16-rounded task-vector deltas: Gaussian-like values of scale 1e-3,
 *          a third of them zero (as after a DARE mask)
 *   weights bf16-rounded weights: Gaussian-like values of scale 2e-2, no zeros
 *          (slerp's and model_stock's sums of squares and dot products)
 *   wide   random finite float bit patterns of every exponent (most blocks
 *          span too many limbs for the vector path: the worst case)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ms_dtype.h"
#include "ms_isa.h"
#include "ms_stage.h"

#define NDATA (64u << 10)

static uint64_t g_state = 0x9e3779b97f4a7c15u;
static uint64_t next_u64(void)
{
    g_state ^= g_state >> 12;
    g_state ^= g_state << 25;
    g_state ^= g_state >> 27;
    return g_state * UINT64_C(2685821657736338717);
}

static double unit(void) { return (double)(next_u64() >> 11) * 0x1p-53; }

static void fill_delta(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        /* sum of four uniforms: a bell of mean 0 */
        double g = unit() + unit() + unit() + unit() - 2.0;
        float v = next_u64() % 3 == 0 ? 0.0f : (float)(g * 1.7e-3);
        x[i] = ms_round_bf16_1(v);
    }
}

static void fill_weights(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        double g = unit() + unit() + unit() + unit() - 2.0;
        x[i] = ms_round_bf16_1((float)(g * 3.5e-2));
    }
}

static void fill_wide(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        do
            u = (uint32_t)next_u64();
        while ((u & 0x7f800000u) == 0x7f800000u);
        memcpy(&x[i], &u, 4);
    }
}

static double cpu_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static const char *const kernel_names[4] = { "dot", "sumsq", "sum", "sumabs" };

/* One pass of calls of len elements over x (and y) with kernel k. */
static void run(const struct ms_xacc_kernels *kv, int k, struct ms_xacc *a, const float *x,
                const float *y, size_t len)
{
    for (size_t i = 0; i < NDATA; i += len) {
        size_t n = NDATA - i < len ? NDATA - i : len;
        switch (k) {
        case 0: kv->dot(a, x + i, y + i, n); break;
        case 1: kv->sumsq(a, x + i, n); break;
        case 2: kv->sum(a, x + i, n); break;
        default: kv->sumabs(a, x + i, n); break;
        }
    }
}

int main(int argc, char **argv)
{
    double millions = argc > 1 ? atof(argv[1]) : 50.0;
    long call = argc > 2 ? atol(argv[2]) : 4096;
    if (millions <= 0 || call <= 0 || argc > 3) {
        fprintf(stderr, "usage: ms-benchxacc [TERMS_MILLIONS [CALL_LEN]]\n");
        return 2;
    }
    static float x[NDATA], y[NDATA];
    const char *data_names[3] = { "delta", "weights", "wide" };
    size_t reps = (size_t)(millions * 1e6 / NDATA) + 1;
    int bad = 0;
    for (int d = 0; d < 3; d++) {
        if (d == 0) {
            fill_delta(x, NDATA);
            fill_delta(y, NDATA);
        } else if (d == 1) {
            fill_weights(x, NDATA);
            fill_weights(y, NDATA);
        } else {
            fill_wide(x, NDATA);
            fill_wide(y, NDATA);
        }
        for (int k = 0; k < 4; k++) {
            struct ms_xacc ref;
            for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
                const struct ms_xacc_kernels *kv = ms_xacc_kernels((enum ms_isa)isa);
                if (!kv)
                    continue;
                struct ms_xacc a;
                ms_xacc_init(&a);
                run(kv, k, &a, x, y, (size_t)call); /* warm up, and the limbs to compare */
                if (isa == MS_ISA_SCALAR)
                    ref = a;
                else if (memcmp(a.limb, ref.limb, sizeof(a.limb)) || a.nonfinite != ref.nonfinite) {
                    fprintf(stderr, "ms-benchxacc: %s %s %s: limbs differ from scalar\n",
                            data_names[d], kernel_names[k], ms_isa_name((enum ms_isa)isa));
                    bad = 1;
                }
                double t0 = cpu_s();
                for (size_t r = 0; r < reps; r++)
                    run(kv, k, &a, x, y, (size_t)call);
                double t = cpu_s() - t0;
                printf("benchxacc: data=%s kernel=%s isa=%s call=%ld ns_per_term=%.3f\n",
                       data_names[d], kernel_names[k], ms_isa_name((enum ms_isa)isa), call,
                       t * 1e9 / ((double)reps * NDATA));
                fflush(stdout);
            }
        }
    }
    return bad;
}
