/*
 * ms_isa.h - which instruction-set version of the leaf kernels runs
 * (base/isa.c).
 *
 * Every hot loop that has SIMD versions (bf16/f16 conversion in base/dtype.c,
 * the stages' element loops and exact sums in stages/) has a scalar reference and, on x86-64
 * with a compiler that knows the targets, AVX2 and AVX-512 versions. All
 * versions give the same bytes (tests/test_isa.c); the choice only changes
 * speed. It is made once, on first use: MERGESTREAM_ISA=scalar|avx2|avx512 if
 * set (a value this build or CPU cannot run falls back to the best available;
 * the CLI refuses it first, through ms_isa_check_env), else the best the CPU
 * supports (__builtin_cpu_supports); `merge --isa` sets it (ms_isa_select).
 *
 * Any thread; the choice is an atomic read after the first call.
 */
#ifndef MS_ISA_H
#define MS_ISA_H

#include <stdbool.h>

enum ms_isa {
    MS_ISA_SCALAR = 0, /* plain C, the reference */
    MS_ISA_AVX2 = 1,   /* AVX2 (+ F16C for float16) */
    MS_ISA_AVX512 = 2, /* AVX-512 F, BW, VL (+ F16C) */
    MS_ISA_COUNT
};

/* The version in use. */
enum ms_isa ms_isa_active(void);
/* True when this build has isa's kernels and the CPU can run them. */
bool ms_isa_available(enum ms_isa isa);
/* "scalar", "avx2", "avx512". */
const char *ms_isa_name(enum ms_isa isa);
/* 0, or MS_EINVAL with a diagnostic naming MERGESTREAM_ISA when it is set to a
 * value that is not an ISA name or that this build or CPU cannot run. */
int ms_isa_check_env(void);
/* Fixes the version from a name: "scalar", "avx2", "avx512", or "auto" (the
 * best the CPU supports, ignoring MERGESTREAM_ISA); overrides the environment.
 * 0, or MS_EINVAL with a diagnostic naming --isa when the name is unknown or
 * the build or CPU cannot run it (the choice is then unchanged). Call before
 * any kernel runs (the CLI does it while parsing options). */
int ms_isa_select(const char *name);

#endif
