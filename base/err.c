/*
 * err.c - diagnostics, error names and logging (declared in ms_common.h).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "ms_common.h"
#include "ms_str.h"

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

/*
 * The texts libuv's uv_strerror() gives for its UV_E* codes (libuv 1.44,
 * UV_ERRNO_MAP), so that messages stay as they were when ms_strerror called it.
 * On Linux a UV_E* code is the negated errno value; the codes libuv defines
 * itself have their numbers.
 */
static const struct {
    int code;
    const char *text;
} sys_errors[] = {
    { -E2BIG, "argument list too long" },
    { -EACCES, "permission denied" },
    { -EADDRINUSE, "address already in use" },
    { -EADDRNOTAVAIL, "address not available" },
    { -EAFNOSUPPORT, "address family not supported" },
    { -EAGAIN, "resource temporarily unavailable" },
    { -EALREADY, "connection already in progress" },
    { -EBADF, "bad file descriptor" },
    { -EBUSY, "resource busy or locked" },
    { -ECANCELED, "operation canceled" },
    { -ECONNABORTED, "software caused connection abort" },
    { -ECONNREFUSED, "connection refused" },
    { -ECONNRESET, "connection reset by peer" },
    { -EDESTADDRREQ, "destination address required" },
    { -EEXIST, "file already exists" },
    { -EFAULT, "bad address in system call argument" },
    { -EFBIG, "file too large" },
    { -EHOSTUNREACH, "host is unreachable" },
    { -EINTR, "interrupted system call" },
    { -EINVAL, "invalid argument" },
    { -EIO, "i/o error" },
    { -EISCONN, "socket is already connected" },
    { -EISDIR, "illegal operation on a directory" },
    { -ELOOP, "too many symbolic links encountered" },
    { -EMFILE, "too many open files" },
    { -EMSGSIZE, "message too long" },
    { -ENAMETOOLONG, "name too long" },
    { -ENETDOWN, "network is down" },
    { -ENETUNREACH, "network is unreachable" },
    { -ENFILE, "file table overflow" },
    { -ENOBUFS, "no buffer space available" },
    { -ENODEV, "no such device" },
    { -ENOENT, "no such file or directory" },
    { -ENOMEM, "not enough memory" },
    { -ENONET, "machine is not on the network" },
    { -ENOPROTOOPT, "protocol not available" },
    { -ENOSPC, "no space left on device" },
    { -ENOSYS, "function not implemented" },
    { -ENOTCONN, "socket is not connected" },
    { -ENOTDIR, "not a directory" },
    { -ENOTEMPTY, "directory not empty" },
    { -ENOTSOCK, "socket operation on non-socket" },
    { -ENOTSUP, "operation not supported on socket" },
    { -EOVERFLOW, "value too large for defined data type" },
    { -EPERM, "operation not permitted" },
    { -EPIPE, "broken pipe" },
    { -EPROTO, "protocol error" },
    { -EPROTONOSUPPORT, "protocol not supported" },
    { -EPROTOTYPE, "protocol wrong type for socket" },
    { -ERANGE, "result too large" },
    { -EROFS, "read-only file system" },
    { -ESHUTDOWN, "cannot send after transport endpoint shutdown" },
    { -ESPIPE, "invalid seek" },
    { -ESRCH, "no such process" },
    { -ETIMEDOUT, "connection timed out" },
    { -ETXTBSY, "text file is busy" },
    { -EXDEV, "cross-device link not permitted" },
    { -ENXIO, "no such device or address" },
    { -EMLINK, "too many links" },
    { -EHOSTDOWN, "host is down" },
    { -EREMOTEIO, "remote I/O error" },
    { -ENOTTY, "inappropriate ioctl for device" },
    { -EILSEQ, "illegal byte sequence" },
    { -ESOCKTNOSUPPORT, "socket type not supported" },
    /* libuv's own codes */
    { -3000, "address family not supported" }, /* UV_EAI_ADDRFAMILY */
    { -3001, "temporary failure" }, /* UV_EAI_AGAIN */
    { -3002, "bad ai_flags value" }, /* UV_EAI_BADFLAGS */
    { -3013, "invalid value for hints" }, /* UV_EAI_BADHINTS */
    { -3003, "request canceled" }, /* UV_EAI_CANCELED */
    { -3004, "permanent failure" }, /* UV_EAI_FAIL */
    { -3005, "ai_family not supported" }, /* UV_EAI_FAMILY */
    { -3006, "out of memory" }, /* UV_EAI_MEMORY */
    { -3007, "no address" }, /* UV_EAI_NODATA */
    { -3008, "unknown node or service" }, /* UV_EAI_NONAME */
    { -3009, "argument buffer overflow" }, /* UV_EAI_OVERFLOW */
    { -3014, "resolved protocol is unknown" }, /* UV_EAI_PROTOCOL */
    { -3010, "service not available for socket type" }, /* UV_EAI_SERVICE */
    { -3011, "socket type not supported" }, /* UV_EAI_SOCKTYPE */
    { -4080, "invalid Unicode character" }, /* UV_ECHARSET */
    { -4094, "unknown error" }, /* UV_UNKNOWN */
    { -4095, "end of file" }, /* UV_EOF */
    { -4028, "inappropriate file type or format" }, /* UV_EFTYPE */
};

/* Per thread, for a code neither we nor libuv name (libuv's wording). */
static _Thread_local char tl_unknown[40];

static const char *sys_strerror(int code)
{
    for (size_t i = 0; i < MS_ARRAY_LEN(sys_errors); i++)
        if (sys_errors[i].code == code)
            return sys_errors[i].text;
    snprintf(tl_unknown, sizeof tl_unknown, "Unknown system error %d", code);
    return tl_unknown;
}

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
            return sys_strerror(code);
        return "unknown error";
    }
}

/* ------------------------------------------------------------------ logging */

static atomic_bool g_quiet;

void ms_log_set_quiet(bool quiet) { atomic_store(&g_quiet, quiet); }

/* Prints line and a newline to stderr in one call (lines from threads do not
 * interleave), control characters escaped; without memory, replaced by '?'. */
static void print_escaped(const char *line)
{
    if (!ms_str_needs_escape(line)) {
        fprintf(stderr, "%s\n", line);
        return;
    }
    struct ms_strbuf b = { 0 };
    ms_str_escape(&b, line);
    if (!b.oom) {
        fprintf(stderr, "%s\n", b.p);
    } else {
        flockfile(stderr);
        for (const unsigned char *p = (const unsigned char *)line; *p; p++)
            putc_unlocked(*p < 0x20 || *p >= 0x7f ? '?' : *p, stderr);
        putc_unlocked('\n', stderr);
        funlockfile(stderr);
    }
    ms_strbuf_fini(&b);
}

static void log_line(const char *kind, const char *fmt, va_list ap)
{
    char buf[2048];
    int n = snprintf(buf, sizeof buf, "mergestream: %s", kind);
    if (n < 0)
        return;
    vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    print_escaped(buf);
}

void ms_log_error(const char *msg)
{
    struct ms_strbuf b = { 0 };
    ms_strbuf_addstr(&b, "mergestream: ");
    ms_strbuf_addstr(&b, msg);
    if (b.oom) {
        ms_strbuf_fini(&b);
        print_escaped("mergestream: out of memory");
        return;
    }
    print_escaped(b.p);
    ms_strbuf_fini(&b);
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
