/*
 * alloc.c - allocation hooks with fault injection, and the I/O fault hook
 * (declared in ms_common.h).
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ms_common.h"

/* ------------------------------------------------------------------ memory */

static atomic_long g_alloc_count;
static atomic_long g_fail_at; /* 0: never fail; else fail when count reaches it */

void ms_alloc_fail_after(long n)
{
    atomic_store(&g_fail_at, n > 0 ? atomic_load(&g_alloc_count) + n : 0);
}

long ms_alloc_count(void) { return atomic_load(&g_alloc_count); }

static _Thread_local long tl_alloc_failures;

long ms_alloc_failures(void) { return tl_alloc_failures; }

static bool alloc_should_fail(void)
{
    long c = atomic_fetch_add(&g_alloc_count, 1) + 1;
    long f = atomic_load(&g_fail_at);
    if (f > 0 && c >= f) {
        tl_alloc_failures++;
        return true;
    }
    return false;
}

void *ms_malloc(size_t n)
{
    if (alloc_should_fail())
        return NULL;
    return malloc(n ? n : 1);
}

void *ms_calloc(size_t count, size_t size)
{
    if (alloc_should_fail())
        return NULL;
    return calloc(count ? count : 1, size ? size : 1);
}

void *ms_realloc(void *p, size_t n)
{
    if (alloc_should_fail())
        return NULL;
    return realloc(p, n ? n : 1);
}

void ms_free(void *p) { free(p); }

char *ms_strndup(const char *s, size_t n)
{
    char *d = ms_malloc(n + 1);
    if (!d)
        return NULL;
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

char *ms_strdup(const char *s) { return ms_strndup(s, strlen(s)); }

char *ms_asprintf(const char *fmt, ...)
{
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *s = n < 0 ? NULL : ms_malloc((size_t)n + 1);
    if (s)
        vsnprintf(s, (size_t)n + 1, fmt, ap2);
    va_end(ap2);
    return s;
}

/* Buffers of at least HUGE_BYTES (the engine's slots, states and keep pool) are
 * aligned to it, and their whole huge pages advised MADV_HUGEPAGE: first touches
 * then fault 2 MiB at a time instead of 4 KiB (a merge's slots took 18,000-79,000
 * faults, 15 % of a ties merge's time in a paravirtualised guest). The size is not
 * rounded up, so what can be committed stays what was asked for; the tail past
 * the last whole huge page keeps small pages. Advice only: where the kernel has
 * no transparent huge pages the call fails and nothing changes. */
#define HUGE_BYTES ((size_t)2 << 20)

void *ms_aligned_alloc(size_t n)
{
    if (alloc_should_fail())
        return NULL;
    size_t align = n >= HUGE_BYTES ? HUGE_BYTES : MS_ALIGN;
    void *p = NULL;
    if (posix_memalign(&p, align, n ? (n + MS_ALIGN - 1) / MS_ALIGN * MS_ALIGN : MS_ALIGN))
        return NULL;
#ifdef MADV_HUGEPAGE
    if (align == HUGE_BYTES)
        (void)madvise(p, n / HUGE_BYTES * HUGE_BYTES, MADV_HUGEPAGE);
#endif
    return p;
}

void ms_aligned_free(void *p) { free(p); }

/* ------------------------------------------------------------------ I/O faults */

static atomic_long g_io_count;
static atomic_long g_io_fail_at; /* 0: never fail; else fail when the count reaches it */

void ms_io_fail_after(long n)
{
    atomic_store(&g_io_fail_at, n > 0 ? atomic_load(&g_io_count) + n : 0);
}

bool ms__io_should_fail(void)
{
    long c = atomic_fetch_add(&g_io_count, 1) + 1;
    long f = atomic_load(&g_io_fail_at);
    return f > 0 && c >= f;
}
