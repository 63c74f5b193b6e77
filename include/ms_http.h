/*
 * ms_http.h - HTTP(S) reads of remote model files (io/http.c): libcurl's
 * multi-socket interface driven by a libuv loop (uv_poll per socket, one
 * uv_timer for curl's timeouts), HTTP/1.1 keep-alive, HTTP/2 where the server
 * offers it over TLS, at most MS_HTTP_MAX_CONNECTIONS connections per host.
 *
 * Two uses:
 *   - asynchronous range reads on the engine's loop (ms_http_read_start; io/src.c);
 *   - synchronous reads at plan time (ms_http_get_range, ms_http_get_file) on a
 *     private loop of their own, serialised by a mutex, any thread.
 *
 * Memory: a range read writes straight into the caller's buffer; nothing grows
 * with the size of a file. A whole-file read (small files: index, config) is
 * limited to MS_SMALL_FILE_MAX bytes.
 *
 * Faults: a transfer that fails at the transport level (connection refused,
 * reset or closed early, stalled for MS_HTTP_STALL_SECONDS) or is answered 5xx
 * or 429 is retried after 100 ms, 200 ms, ... for the bytes still missing; it
 * fails after MS_HTTP_ATTEMPTS tries in a row that delivered no byte. Not retried, one-line errors
 * naming the URL: 404 (MS_EMODEL), 401/403 (MS_EMODEL, says how to send a token),
 * other 4xx, a 200 answer to a range request (MS_EUNSUPPORTED: the server ignores
 * Range), a Content-Range other than the bytes asked for, a total size other
 * than the expected one, and more body bytes than asked for (MS_EIO).
 *
 * Authentication: a URL under the Hugging Face endpoint (ms_http_hf_endpoint)
 * carries the hub token (HF_TOKEN, else the file $HF_TOKEN_PATH, $HF_HOME/token
 * or ~/.cache/huggingface/token) as a bearer token; curl drops it on a redirect
 * to another host.
 */
#ifndef MS_HTTP_H
#define MS_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#define MS_HTTP_MAX_CONNECTIONS 8 /* per host, per loop */
#define MS_HTTP_ATTEMPTS 6        /* tries of one read before it fails */
#define MS_HTTP_STALL_SECONDS 30  /* under 1 byte/s this long: the try failed */

/* True for "http://..." and "https://..." (case-insensitive scheme). */
bool ms_http_is_url(const char *s);
/* The hub endpoint: $HF_ENDPOINT without trailing slashes, else "https://huggingface.co".
 * Owned by the caller (ms_free); NULL on MS_ENOMEM. */
char *ms_http_hf_endpoint(void);

/*
 * Synchronous: reads bytes [off, off + len) of url into buf. *total (may be NULL)
 * gets the file's size from Content-Range. A file shorter than off + len gives
 * MS_EIO naming the URL ("... is only T bytes"), unless allow_short: then the
 * bytes there are (*got, may be NULL) and 0. Returns 0 or a negative code with a
 * diagnostic naming the URL.
 */
int ms_http_get_range(const char *url, void *buf, uint64_t off, uint64_t len, bool allow_short,
                      uint64_t *got, uint64_t *total);
/*
 * Synchronous: reads a whole small file. Returns 1 with *data (NUL-terminated,
 * ms_free) and *len; 0 when the server answers 404 (nothing allocated); or a
 * negative code with a diagnostic naming the URL (over MS_SMALL_FILE_MAX: MS_EIO).
 */
int ms_http_get_file(const char *url, char **data, size_t *len);

/* A range read in flight on a loop. Caller-owned, like ms_src_read. */
struct ms_http_read;
typedef void (*ms_http_read_cb)(struct ms_http_read *req, int status);
struct ms_http_read {
    void *data; /* the caller's */
    /* private */
    const char *url; /* borrowed until the callback */
    unsigned char *buf;
    uint64_t len, done, off, expect_total;
    ms_http_read_cb cb;
    void *client, *easy;
    int attempts;              /* tries in a row that delivered no byte, this one included */
    uint64_t done_at_try;      /* done when the current try started */
    long code;                 /* HTTP status of the current try */
    int err;                   /* a non-retryable error found by a callback */
    bool checked;              /* this try's status line and Content-Range are checked */
    uint64_t retry_at;         /* uv_now() when a waiting retry is due */
    struct ms_http_read *next; /* the client's retry list */
    bool whole, allow_short;   /* synchronous reads: a whole file; a short file accepted */
    char *wdata;               /* whole file: the growing buffer */
    size_t wcap;
    bool have_cr;                         /* this try's Content-Range, parsed */
    uint64_t cr_first, cr_last, cr_total; /* cr_total UINT64_MAX: "*" */
};

/*
 * Starts reading len > 0 bytes at off of url into buf (valid until the
 * callback); expect_total (0: any) is the file size the Content-Range must
 * report. Loop thread. The first read on a loop creates that loop's client
 * (its handles are unreferenced while no read is in flight); ms_http_loop_done
 * closes it. Returns 0 when cb will be called exactly once, on the loop thread,
 * never from inside this call; else a negative code and a diagnostic.
 * cb's status: 0 (all len bytes in buf) or a negative code with the diagnostic
 * recorded for the loop thread (ms_errmsg()).
 */
int ms_http_read_start(uv_loop_t *loop, struct ms_http_read *req, const char *url, void *buf,
                       uint64_t len, uint64_t off, uint64_t expect_total, ms_http_read_cb cb);
/*
 * Stops retrying on this loop: reads waiting for a retry fail with MS_ECANCELED
 * (their callbacks run from the loop, not from inside this call), and so does every
 * later try that would be retried. Transfers in flight run to their end. Loop
 * thread; nothing happens when the loop has no client.
 */
void ms_http_loop_cancel(uv_loop_t *loop);
/*
 * Closes the client of this loop, if there is one (no read may be in flight):
 * its handles are closed, and freed by the loop's next uv_run. Loop thread.
 */
void ms_http_loop_done(uv_loop_t *loop);

#endif
