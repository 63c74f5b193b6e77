/*
 * base.c - diagnostics, logging, allocation hooks and small parsers shared by
 * every folder (declared in ms_common.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <uv.h>

#include "ms_common.h"

/* ------------------------------------------------------------------ errors */

#define MS_ERRMSG_MAX 1024
static _Thread_local char tl_errmsg[MS_ERRMSG_MAX];

int ms_error(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tl_errmsg, sizeof tl_errmsg, fmt, ap);
    va_end(ap);
    return code;
}

int ms_error_prefix(int code, const char *fmt, ...)
{
    char prefix[512], old[MS_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, tl_errmsg, sizeof old);
    if (old[0])
        snprintf(tl_errmsg, sizeof tl_errmsg, "%s: %s", prefix, old);
    else
        snprintf(tl_errmsg, sizeof tl_errmsg, "%s: %s", prefix, ms_strerror(code));
    return code;
}

const char *ms_errmsg(void) { return tl_errmsg; }
void ms_error_clear(void) { tl_errmsg[0] = 0; }

const char *ms_strerror(int code)
{
    switch (code) {
    case MS_OK: return "ok";
    case MS_ENOMEM: return "out of memory";
    case MS_EIO: return "i/o error";
    case MS_EINVAL: return "invalid argument";
    case MS_EUNSUPPORTED: return "not supported";
    case MS_ERECIPE: return "invalid recipe";
    case MS_EPLAN: return "invalid merge plan";
    case MS_EMODEL: return "invalid model";
    case MS_ECANCELED: return "canceled";
    case MS_ECHILD: return "pipe command failed";
    case MS_EDATA: return "invalid tensor data";
    case MS_EST_TOOSMALL: return "safetensors: header too small";
    case MS_EST_TOOLARGE: return "safetensors: header too large";
    case MS_EST_HDRLEN: return "safetensors: invalid header length";
    case MS_EST_UTF8: return "safetensors: header is not utf-8";
    case MS_EST_JSON: return "safetensors: header is not valid json";
    case MS_EST_SCHEMA: return "safetensors: malformed tensor entry";
    case MS_EST_DTYPE: return "safetensors: unknown dtype";
    case MS_EST_OFFSET: return "safetensors: invalid offsets";
    case MS_EST_OVERFLOW: return "safetensors: size overflow";
    case MS_EST_MISALIGNED: return "safetensors: misaligned slice";
    case MS_EST_INFO: return "safetensors: byte length does not match shape";
    case MS_EST_INCOMPLETE: return "safetensors: file length does not match header";
    case MS_EST_METADATA: return "safetensors: invalid __metadata__";
    case MS_EST_DUPLICATE: return "safetensors: duplicate tensor name";
    case MS_EST_INDEX: return "safetensors: index does not match shards";
    default:
        if (code < 0 && code > -4096)
            return uv_strerror(code);
        return "unknown error";
    }
}

/* ------------------------------------------------------------------ logging */

static atomic_bool g_quiet;

void ms_log_set_quiet(bool quiet) { atomic_store(&g_quiet, quiet); }

static void log_line(const char *kind, const char *fmt, va_list ap)
{
    char buf[2048];
    int n = snprintf(buf, sizeof buf, "mergestream: %s", kind);
    if (n < 0)
        return;
    vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    fprintf(stderr, "%s\n", buf); /* one call: lines from threads do not interleave */
}

void ms_log_info(const char *fmt, ...)
{
    if (atomic_load(&g_quiet))
        return;
    va_list ap;
    va_start(ap, fmt);
    log_line("", fmt, ap);
    va_end(ap);
}

void ms_log_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_line("warning: ", fmt, ap);
    va_end(ap);
}

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

/* jansson allocates through ours, so allocation fault injection covers JSON too. */
__attribute__((constructor)) static void route_json_allocations(void)
{
    json_set_alloc_funcs(ms_malloc, ms_free);
}

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

void *ms_aligned_alloc(size_t n)
{
    if (alloc_should_fail())
        return NULL;
    void *p = NULL;
    if (posix_memalign(&p, MS_ALIGN, n ? (n + MS_ALIGN - 1) / MS_ALIGN * MS_ALIGN : MS_ALIGN))
        return NULL;
    return p;
}

void ms_aligned_free(void *p) { free(p); }

/* ------------------------------------------------------------------ parsing */

int ms_parse_size(const char *s, bool binary, uint64_t *out)
{
    const char *p = s;
    uint64_t v = 0;
    if (!s || *p < '0' || *p > '9')
        return ms_error(MS_EINVAL, "invalid size '%s'", s ? s : "");
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > (UINT64_MAX - 9) / 10)
            return ms_error(MS_EINVAL, "size '%s' is too large", s);
        v = v * 10 + (uint64_t)(*p - '0');
    }
    uint64_t mul = 1;
    char c = *p;
    if (c) {
        bool ibi = (p[1] == 'i' || p[1] == 'I') && (p[2] == 'b' || p[2] == 'B') && !p[3];
        bool one = !p[1];
        if (!ibi && !one)
            return ms_error(MS_EINVAL, "invalid size suffix in '%s'", s);
        uint64_t k = (binary || ibi) ? 1024 : 1000;
        switch (c) {
        case 'k': case 'K': mul = k; break;
        case 'm': case 'M': mul = k * k; break;
        case 'g': case 'G': mul = k * k * k; break;
        case 'b': case 'B':
            if (ibi)
                return ms_error(MS_EINVAL, "invalid size suffix in '%s'", s);
            mul = binary ? 1024ull * 1024 * 1024 : 1000000000ull; /* mergekit: B = billion */
            break;
        case 't': case 'T': mul = k * k * k * k; break;
        default:
            return ms_error(MS_EINVAL, "invalid size suffix in '%s'", s);
        }
    }
    if (mul > 1 && v > UINT64_MAX / mul)
        return ms_error(MS_EINVAL, "size '%s' is too large", s);
    *out = v * mul;
    return 0;
}

bool ms_shape_numel(const int64_t *shape, uint32_t ndim, uint64_t *out)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return false;
        uint64_t d = (uint64_t)shape[i];
        if (d && n > UINT64_MAX / d)
            return false;
        n *= d;
    }
    *out = n;
    return true;
}
