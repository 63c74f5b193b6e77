/*
 * ms_src.h - input sources: the bytes of one input shard, read at absolute
 * offsets on a libuv loop (io/src.c). The engine reads every chunk through it.
 *
 * A header of its own, not ms_out.h: that one is the output side of io/, this is the input side.
 *
 * A source is a plain file (positional uv_fs_read calls of at most 1 GiB each,
 * continued after a short read), a remote file at an http(s) URL (one range
 * request per read through ms_http, retried there; ms_http.h), or a
 * zstd-compressed file (.safetensors.zst)
 * read through ms_zsrc (ms_zsrc.h) at uncompressed offsets. A compressed source
 * serves one read at a time on the thread pool, in the order the reads were
 * started, so that the decompressor moves forward within a pass (a read behind
 * its cursor decompresses again from the top of the file).
 *
 * Requests are the caller's (libuv style): a struct ms_src_read lives in the
 * caller's memory from ms_src_read_start until its callback, which runs exactly
 * once, on the loop thread, and never from inside ms_src_read_start. Nothing is
 * allocated per read.
 *
 * Fault injection: every uv_fs_read call on a plain file (the first and each
 * continuation) first consults ms__io_should_fail() (ms_common.h); an injected
 * failure is UV_EIO. Compressed reads do not consult it.
 */
#ifndef MS_SRC_H
#define MS_SRC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "ms_http.h"

struct ms_src;
struct ms_src_read;

/*
 * Completion of a read, on the loop thread. status 0: all len bytes are in buf.
 * Negative: the read failed and the diagnostic has been recorded for the loop
 * thread just before the call (ms_errmsg()), naming the file:
 *   UV_E*        "<path>: read of tensor '<tensor>' failed: <reason>" (from the system),
 *                or "<path>: read failed: <reason>" when a continuation could not be issued
 *                (UV_EIO from the fault hook);
 *   MS_EIO       "<path>: unexpected end of file reading tensor '<tensor>' (file truncated
 *                after the plan was made?)";
 *   ms_zsrc's code and diagnostic for a compressed source;
 *   ms_http's codes and one-line diagnostics naming the URL for a remote source;
 *   MS_ECANCELED after ms_src_cancel.
 * buf's contents are unspecified after an error. The callback may start reads.
 */
typedef void (*ms_src_read_cb)(struct ms_src_read *req, int status);

/* One read in flight. Caller-owned; `data` is the caller's, the rest is private to io/src.c. */
struct ms_src_read {
    void *data;                   /* the caller's; io/ does not touch it */
    /* private */
    union {
        uv_fs_t fs;               /* plain file: the uv_fs_read in flight */
        uv_work_t work;           /* compressed: the ms_zsrc_pread on the thread pool */
        struct ms_http_read http; /* remote: the range request */
    } u;
    uv_loop_t *loop;
    struct ms_src *src;
    unsigned char *buf;
    uint64_t len, done, off;      /* bytes wanted, bytes delivered, file offset of buf[0] */
    const char *tensor;           /* for diagnostics; borrowed until the callback */
    ms_src_read_cb cb;
    struct ms_src_read *next;     /* compressed: the queue of reads not yet served */
};

/*
 * Opens path for reading: a plain file, or a zstd stream when compressed (the
 * caller knows which from the model: ms_st_file.compressed). path is copied.
 * Any thread. Returns 0 and *out, or a negative code with a diagnostic naming
 * the file (-errno "<path>: cannot open: <reason>", ms_zsrc_open's codes,
 * MS_ENOMEM); *out is NULL on error.
 */
int ms_src_open(const char *path, bool compressed, struct ms_src **out);

/* True when src is a plain local file (ms_src_pread serves it). Any thread. */
bool ms_src_is_plain(const struct ms_src *src);

/*
 * Reads exactly len bytes at offset off of a plain source (ms_src_is_plain)
 * into buf, blocking: for a caller already on a pool thread (the engine's fused
 * chunks). Any thread; src is only read. With nowait, the read is only tried
 * from the page cache (preadv2 RWF_NOWAIT): 1 when not every byte is there
 * (buf's contents unspecified), so the caller can take the asynchronous path.
 * Each call consults ms__io_should_fail() once (UV_EIO). Returns 0, 1 (nowait only), or a negative
 * code with the diagnostic (thread-local, ms_errmsg()) of ms_src_read_cb's
 * status for a plain file.
 */
int ms_src_pread(struct ms_src *src, void *buf, size_t len, uint64_t off, const char *tensor,
                 bool nowait);
/*
 * Starts reading exactly len bytes (len > 0) at offset off into buf, which must
 * stay valid until the callback. tensor names what is read, for diagnostics.
 * Loop thread (the loop the source's other reads use). Returns 0 when cb will
 * be called exactly once; else a negative code, a recorded diagnostic and no
 * callback: UV_E* "<path>: read failed: <reason>" (UV_EIO from the fault hook),
 * "<path>: cannot queue read: <reason>" (compressed), MS_ECANCELED after ms_src_cancel.
 */
int ms_src_read_start(uv_loop_t *loop, struct ms_src *src, struct ms_src_read *req, void *buf,
                      size_t len, uint64_t off, const char *tensor, ms_src_read_cb cb);
/*
 * Stops the source (the caller is giving up): a read that needs another call
 * ends with MS_ECANCELED instead, compressed reads not yet served end with
 * MS_ECANCELED, and later starts fail; remote reads waiting to retry end with
 * MS_ECANCELED at once, and so does a failed try that would have been retried
 * (for every remote source on that loop: ms_http_loop_cancel). A call already in
 * flight completes as it would have. Loop thread; idempotent.
 */
void ms_src_cancel(struct ms_src *src);
/*
 * The caller has read [off, off + len) for the last time: the page cache may let
 * those pages go (posix_fadvise DONTNEED, for inputs larger than memory, so they
 * do not push out data that will be read again). Adjacent ranges are gathered
 * and handed to the kernel 32 MiB at a time, the rest when the source is freed;
 * only pages wholly inside a handed range are dropped. Advice only: the bytes
 * read stay the same. Plain files only (a no-op otherwise). Loop thread.
 */
void ms_src_consumed(struct ms_src *src, uint64_t off, uint64_t len);
/*
 * A remote source checks every response's Content-Range total against size (the
 * file size its header was read with; 0: no check). No effect on local files.
 */
void ms_src_set_size(struct ms_src *src, uint64_t size);
/*
 * After the last read on loop: closes what io/ keeps open on it (the HTTP
 * client's connections and handles, ms_http_loop_done); the loop's next uv_run
 * finishes the closing. Loop thread; a no-op when nothing was read remotely.
 */
void ms_src_loop_done(uv_loop_t *loop);
/* Closes the file and frees. No read may be in flight. Any thread; NULL is a no-op. */
void ms_src_free(struct ms_src *src);

#endif
