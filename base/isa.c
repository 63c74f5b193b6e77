/*
 * isa.c - the choice of kernel versions (ms_isa.h): from MERGESTREAM_ISA, else
 * the best the CPU supports. Decided on the first call and kept.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "ms_common.h"
#include "ms_isa.h"

static const char *const isa_names[MS_ISA_COUNT] = { "scalar", "avx2", "avx512" };

const char *ms_isa_name(enum ms_isa isa)
{
    return (unsigned)isa < MS_ISA_COUNT ? isa_names[isa] : "?";
}

#if defined(__x86_64__) && defined(__GNUC__)
/* F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports has no "f16c". */
static bool has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}
#endif

bool ms_isa_available(enum ms_isa isa)
{
    switch (isa) {
    case MS_ISA_SCALAR: return true;
#if defined(__x86_64__) && defined(__GNUC__)
    case MS_ISA_AVX2: return __builtin_cpu_supports("avx2") && has_f16c();
    case MS_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx2") && has_f16c();
#endif
    default: return false;
    }
}

static int isa_parse(const char *v)
{
    for (int i = 0; i < MS_ISA_COUNT; i++)
        if (!strcmp(v, isa_names[i]))
            return i;
    return -1;
}

int ms_isa_check_env(void)
{
    const char *v = getenv("MERGESTREAM_ISA");
    if (!v || !*v)
        return 0;
    int i = isa_parse(v);
    if (i < 0)
        return ms_error(MS_EINVAL, "MERGESTREAM_ISA: '%s' is not one of scalar, avx2, avx512", v);
    if (!ms_isa_available((enum ms_isa)i))
        return ms_error(MS_EINVAL, "MERGESTREAM_ISA: %s is not available on this CPU or build", v);
    return 0;
}

static atomic_int g_isa = -1;

static int isa_best(void)
{
    for (int k = MS_ISA_COUNT - 1; k > 0; k--)
        if (ms_isa_available((enum ms_isa)k))
            return k;
    return MS_ISA_SCALAR;
}

int ms_isa_select(const char *name)
{
    int i = strcmp(name, "auto") ? isa_parse(name) : isa_best();
    if (i < 0)
        return ms_error(MS_EINVAL, "--isa: '%s' is not one of scalar, avx2, avx512, auto", name);
    if (!ms_isa_available((enum ms_isa)i))
        return ms_error(MS_EINVAL, "--isa: %s is not available on this CPU or build", name);
    atomic_store_explicit(&g_isa, i, memory_order_relaxed);
    return 0;
}

enum ms_isa ms_isa_active(void)
{
    int i = atomic_load_explicit(&g_isa, memory_order_relaxed);
    if (i >= 0)
        return (enum ms_isa)i;
    const char *v = getenv("MERGESTREAM_ISA");
    i = v ? isa_parse(v) : -1;
    if (i < 0 || !ms_isa_available((enum ms_isa)i))
        i = isa_best();
    atomic_store_explicit(&g_isa, i, memory_order_relaxed); /* every thread computes the same */
    return (enum ms_isa)i;
}
