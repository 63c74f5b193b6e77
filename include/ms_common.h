/*
 * ms_common.h - error codes, diagnostics, allocation hooks and logging shared by
 * every folder of mergestream (implemented in base/, which uses only libc).
 *
 * Error convention (libuv style): functions return int, 0 on success, a negative
 * code on failure. Our own codes live in the band -5000..-5999 so that libuv's
 * UV_E* codes (negated errno values) pass through unchanged; ms_strerror()
 * names both. The human-readable diagnostic ("where and what") is recorded by
 * the failing function with ms_error() in a thread-local buffer and read back
 * with ms_errmsg(). A caller that adds context uses ms_error_prefix().
 * Worker-thread code that fails copies ms_errmsg() into its request before it
 * returns to the loop thread, because the buffer is per thread.
 */
#ifndef MS_COMMON_H
#define MS_COMMON_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MS_VERSION "0.1.0"

enum ms_err {
    MS_OK = 0,
    MS_ENOMEM = -5001,       /* allocation failed */
    MS_EIO = -5002,          /* read/write/open failure not covered by an errno code */
    MS_EINVAL = -5003,       /* bad argument or option (usage) */
    MS_EUNSUPPORTED = -5004, /* valid input that this version does not handle */
    MS_ERECIPE = -5005,      /* malformed or invalid recipe YAML */
    MS_EPLAN = -5006,        /* recipe and models do not fit together */
    MS_EMODEL = -5007,       /* model directory problems (missing files, bad config) */
    MS_ECANCELED = -5008,    /* stopped by a signal */
    MS_ECHILD = -5009,       /* a --pipe command failed */
    MS_EDATA = -5010,        /* tensor data problem found while merging */

    /* safetensors validation, one per rule of peers-and-formats.md section 5.2 */
    MS_EST_TOOSMALL = -5100,   /* file shorter than 8 bytes */
    MS_EST_TOOLARGE = -5101,   /* header length over 100,000,000 */
    MS_EST_HDRLEN = -5102,     /* 8 + N past the end of the file (or overflows) */
    MS_EST_UTF8 = -5103,       /* header is not valid UTF-8 */
    MS_EST_JSON = -5104,       /* header is not valid JSON, or not an object */
    MS_EST_SCHEMA = -5105,     /* an entry has wrong or missing fields */
    MS_EST_DTYPE = -5106,      /* unknown dtype name */
    MS_EST_OFFSET = -5107,     /* gap, overlap, end < begin, or first begin != 0 */
    MS_EST_OVERFLOW = -5108,   /* shape product or byte size overflows */
    MS_EST_MISALIGNED = -5109, /* sub-byte dtype with numel*bits not a multiple of 8 */
    MS_EST_INFO = -5110,       /* end - begin != numel * element size */
    MS_EST_INCOMPLETE = -5111, /* 8 + N + last end != file length */
    MS_EST_METADATA = -5112,   /* __metadata__ is not an object of strings */
    MS_EST_DUPLICATE = -5113,  /* a tensor name appears twice */
    MS_EST_INDEX = -5114,      /* model.safetensors.index.json disagrees or is malformed */
};

/* Records a diagnostic for the calling thread and returns code, so that a
 * failure site reads `return ms_error(MS_EIO, "%s: short read", path);`.
 * Messages follow git's style: lower case, no full stop, where first. */
int ms_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prepends "prefix: " to the calling thread's diagnostic; returns code. */
int ms_error_prefix(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The calling thread's last diagnostic ("" if none). Valid until the next ms_error*. */
const char *ms_errmsg(void);
/* Clears the calling thread's diagnostic. */
void ms_error_clear(void);
/* Name of an error code: ours, or a UV_E* / -errno code in libuv's wording. A static
 * string, except for a system code libuv does not name ("Unknown system error N"):
 * that text is per thread and valid until the calling thread's next call. */
const char *ms_strerror(int code);

/* Logging to stderr, prefixed "mergestream: " (and "warning: "). ms_log_quiet()
 * silences info messages (not warnings or errors). Thread-safe for whole lines. */
void ms_log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void ms_log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void ms_log_set_quiet(bool quiet);
/* Prints "mergestream: <msg>\n" to stderr (whatever ms_log_set_quiet says), with
 * control characters in msg escaped as ms_str_escape does: the one way an error
 * message, which may hold names and paths from files, reaches the terminal. */
void ms_log_error(const char *msg);

/*
 * Allocation. Every allocation in the project goes through these so that tests
 * can inject failures (ms_alloc_fail_after). They never abort; callers handle
 * NULL (ms_error(MS_ENOMEM, ...)). ms_free(NULL) is a no-op.
 * ms_aligned_alloc returns MS_ALIGN-aligned memory released with ms_aligned_free.
 */
#define MS_ALIGN 64
void *ms_malloc(size_t n);
void *ms_calloc(size_t count, size_t size);
void *ms_realloc(void *p, size_t n);
char *ms_strdup(const char *s);
char *ms_strndup(const char *s, size_t n);
char *ms_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void ms_free(void *p);
void *ms_aligned_alloc(size_t n);
void ms_aligned_free(void *p);

/* Fault injection for tests: the n-th allocation from now (1-based) and every
 * later one fail until reset with n = 0. Counts allocations of all threads. */
void ms_alloc_fail_after(long n);
/* Number of allocations made since the process started (for fault-injection loops). */
long ms_alloc_count(void);
/* Number of allocations that failed on the calling thread so far. Libraries that
 * allocate through our hooks (jansson) report a failed allocation as a parse
 * error; a caller compares this before and after to report MS_ENOMEM instead. */
long ms_alloc_failures(void);

/* I/O fault injection for tests: the n-th read or write the engine issues from
 * now (1-based), and every later one, fail with EIO until reset with n = 0.
 * ms__io_should_fail() is consulted where io/ issues the engine's reads and
 * writes (io/src.c, io/shard.c); it counts every call, from any thread. */
void ms_io_fail_after(long n);
bool ms__io_should_fail(void);

/* Parses a size with mergekit's suffixes (K/M/B = 1e3/1e6/1e9, any case) and our
 * binary ones (KiB/MiB/GiB, and k/m/g with --max-memory style "64M" meaning
 * mebibytes when binary is true). Integers only. Returns 0 or MS_EINVAL. */
int ms_parse_size(const char *s, bool binary, uint64_t *out);

/* Element count of a shape; returns false on overflow of uint64_t. */
bool ms_shape_numel(const int64_t *shape, uint32_t ndim, uint64_t *out);

#define MS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
/* Each argument is evaluated twice: pass no call whose result can change between
 * the two evaluations (a pipe's free room, a clock). */
#define MS_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MS_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
