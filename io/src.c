/*
 * src.c - input sources (ms_src.h): positional reads of a plain file with
 * uv_fs_read, or of a .safetensors.zst through ms_zsrc on the thread pool.
 *
 * Threads: everything runs on the loop thread except zsrc_work_cb, which
 * touches only the source's decoder, its zrc/zerr and the request's buffer;
 * the source serves one compressed read at a time, so nothing else does.
 */
#define _GNU_SOURCE /* preadv2, RWF_NOWAIT */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <uv.h>

#include "ms_common.h"
#include "ms_zsrc.h"
#include "ms_src.h"

#define MAX_CALL (1u << 30) /* bytes per uv_fs_read call */
#define DROP_RUN (32u << 20)  /* consumed bytes handed to the kernel at once (ms_src_consumed) */

struct ms_src {
    char *path;                   /* owned copy, for diagnostics */
    uv_file fd;                   /* plain file, else -1 */
    struct ms_zsrc *z;            /* compressed, else NULL */
    bool remote;                  /* path is an http(s) URL */
    uint64_t size;                /* remote: the size Content-Range must report (0: any) */
    bool canceled;
    uv_loop_t *loop;              /* remote: the loop of the reads started, for ms_src_cancel */
    /* Compressed: reads wait here, oldest first, while one is served. */
    struct ms_src_read *qhead, *qtail;
    bool busy;                    /* a read is on the thread pool */
    int zrc;                      /* its result, written by the worker */
    char zerr[512];               /* its diagnostic (the worker's is thread-local) */
    uint64_t drop_lo, drop_hi;    /* plain file: consumed bytes not yet dropped (one run) */
};

/* ------------------------------------------------------------------ plain files */

static void on_fs_read(uv_fs_t *fs);

/* Issues one uv_fs_read for the rest of req (at most MAX_CALL bytes). */
static int fs_issue(struct ms_src_read *req)
{
    struct ms_src *src = req->src;
    uv_buf_t b = uv_buf_init((char *)req->buf + req->done,
                             (unsigned)MS_MIN(req->len - req->done, MAX_CALL));
    req->u.fs.data = req;
    int rc = ms__io_should_fail() ? UV_EIO /* test hook */
             : uv_fs_read(req->loop, &req->u.fs, src->fd, &b, 1, (int64_t)(req->off + req->done),
                          on_fs_read);
    if (rc < 0)
        return ms_error(rc, "%s: read failed: %s", src->path, ms_strerror(rc));
    return 0;
}

static void on_fs_read(uv_fs_t *fs)
{
    struct ms_src_read *req = fs->data;
    struct ms_src *src = req->src;
    ssize_t r = fs->result;
    uv_fs_req_cleanup(fs);
    if (r < 0) {
        req->cb(req, ms_error((int)r, "%s: read of tensor '%s' failed: %s", src->path,
                              req->tensor, ms_strerror((int)r)));
        return;
    }
    if (r == 0) {
        req->cb(req, ms_error(MS_EIO, "%s: unexpected end of file reading tensor '%s' (file "
                              "truncated after the plan was made?)", src->path, req->tensor));
        return;
    }
    req->done += (uint64_t)r;
    if (req->done == req->len) {
        req->cb(req, 0);
        return;
    }
    int rc = src->canceled ? ms_error(MS_ECANCELED, "%s: read canceled", src->path)
                           : fs_issue(req);
    if (rc < 0)
        req->cb(req, rc);
}

/* ------------------------------------------------------------------ compressed files */

static void zsrc_pump(struct ms_src *src);

/* Worker thread: serves the one read in progress. */
static void zsrc_work_cb(uv_work_t *w)
{
    struct ms_src_read *req = w->data;
    struct ms_src *src = req->src;
    ms_error_clear();
    src->zrc = ms_zsrc_pread(src->z, req->buf, (size_t)req->len, req->off);
    if (src->zrc)
        snprintf(src->zerr, sizeof src->zerr, "%s", ms_errmsg());
}

static void zsrc_after_cb(uv_work_t *w, int status)
{
    struct ms_src_read *req = w->data;
    struct ms_src *src = req->src;
    src->busy = false;
    if (status < 0) {
        req->cb(req, ms_error(status, "%s: read canceled", src->path));
    } else if (src->zrc) {
        req->cb(req, ms_error(src->zrc, "%s", src->zerr));
    } else {
        req->done = req->len;
        req->cb(req, 0);
    }
    zsrc_pump(src);
}

/* Puts req on the thread pool; the source is idle. */
static int zsrc_serve(struct ms_src_read *req)
{
    struct ms_src *src = req->src;
    assert(!src->busy);
    src->busy = true;
    req->u.work.data = req;
    int rc = uv_queue_work(req->loop, &req->u.work, zsrc_work_cb, zsrc_after_cb);
    if (rc < 0) {
        src->busy = false;
        return ms_error(rc, "%s: cannot queue read: %s", src->path, ms_strerror(rc));
    }
    return 0;
}

/* Serves queued reads while the source is idle; drops them once canceled. */
static void zsrc_pump(struct ms_src *src)
{
    while (!src->busy && src->qhead) {
        struct ms_src_read *req = src->qhead;
        src->qhead = req->next;
        if (!src->qhead)
            src->qtail = NULL;
        req->next = NULL;
        int rc = src->canceled ? ms_error(MS_ECANCELED, "%s: read canceled", src->path)
                               : zsrc_serve(req);
        if (rc < 0)
            req->cb(req, rc);
    }
}

/* ------------------------------------------------------------------ remote files */

static void on_http_read(struct ms_http_read *h, int status)
{
    struct ms_src_read *req = h->data;
    if (status == 0)
        req->done = req->len;
    req->cb(req, status);
}

/* ------------------------------------------------------------------ interface */

int ms_src_read_start(uv_loop_t *loop, struct ms_src *src, struct ms_src_read *req, void *buf,
                      size_t len, uint64_t off, const char *tensor, ms_src_read_cb cb)
{
    assert(loop && src && req && buf && len > 0 && tensor && cb);
    if (src->canceled)
        return ms_error(MS_ECANCELED, "%s: read canceled", src->path);
    req->loop = loop;
    req->src = src;
    req->buf = buf;
    req->len = len;
    req->done = 0;
    req->off = off;
    req->tensor = tensor;
    req->cb = cb;
    req->next = NULL;
    if (src->remote) {
        src->loop = loop;
        req->u.http.data = req;
        return ms_http_read_start(loop, &req->u.http, src->path, buf, len, off, src->size,
                                  on_http_read);
    }
    if (!src->z)
        return fs_issue(req);
    /* Reads queued before this one go first (a callback may start a read while they wait:
     * zsrc_after_cb serves the queue once its callback returns). */
    if (!src->busy && !src->qhead)
        return zsrc_serve(req);
    if (src->qtail)
        src->qtail->next = req;
    else
        src->qhead = req;
    src->qtail = req;
    return 0;
}

bool ms_src_is_plain(const struct ms_src *src) { return src->fd >= 0; }

int ms_src_pread(struct ms_src *src, void *buf, size_t len, uint64_t off, const char *tensor,
                 bool nowait)
{
    assert(src->fd >= 0 && buf && len > 0 && tensor);
    unsigned char *b = buf;
    if (ms__io_should_fail()) /* test hook */
        return ms_error(UV_EIO, "%s: read failed: %s", src->path, ms_strerror(UV_EIO));
    if (nowait) {
#ifdef RWF_NOWAIT
        size_t done = 0;
        while (done < len) {
            struct iovec v = { b + done, MS_MIN(len - done, MAX_CALL) };
            ssize_t r = preadv2(src->fd, &v, 1, (off_t)(off + done), RWF_NOWAIT);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return 1; /* not cached (EAGAIN), unsupported, or an error the plain read reports */
            done += (size_t)r;
        }
        return 0;
#else
        return 1;
#endif
    }
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(src->fd, b + done, MS_MIN(len - done, MAX_CALL), (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return ms_error(-errno, "%s: read of tensor '%s' failed: %s", src->path, tensor,
                            ms_strerror(-errno));
        if (r == 0)
            return ms_error(MS_EIO, "%s: unexpected end of file reading tensor '%s' (file "
                            "truncated after the plan was made?)", src->path, tensor);
        done += (size_t)r;
    }
    return 0;
}

/* The page cache may let go of the consumed run (pages wholly inside it). */
static void drop_flush(struct ms_src *src)
{
    if (src->drop_hi > src->drop_lo)
        (void)posix_fadvise(src->fd, (off_t)src->drop_lo, (off_t)(src->drop_hi - src->drop_lo),
                            POSIX_FADV_DONTNEED); /* advice: a failure changes nothing */
    src->drop_lo = src->drop_hi = 0;
}

void ms_src_consumed(struct ms_src *src, uint64_t off, uint64_t len)
{
    if (src->fd < 0 || !len)
        return;
    if (src->drop_hi > src->drop_lo && off == src->drop_hi)
        src->drop_hi += len;
    else if (src->drop_hi > src->drop_lo && off + len == src->drop_lo)
        src->drop_lo = off;
    else {
        drop_flush(src);
        src->drop_lo = off;
        src->drop_hi = off + len;
    }
    if (src->drop_hi - src->drop_lo >= DROP_RUN)
        drop_flush(src);
}

void ms_src_cancel(struct ms_src *src)
{
    src->canceled = true;
    if (src->remote && src->loop)
        ms_http_loop_cancel(src->loop); /* reads waiting to retry fail now */
}

void ms_src_set_size(struct ms_src *src, uint64_t size) { src->size = size; }

void ms_src_loop_done(uv_loop_t *loop) { ms_http_loop_done(loop); }

int ms_src_open(const char *path, bool compressed, struct ms_src **out)
{
    *out = NULL;
    int rc = 0;
    struct ms_src *src = ms_calloc(1, sizeof *src);
    if (!src)
        return ms_error(MS_ENOMEM, "out of memory");
    src->fd = -1;
    src->path = ms_strdup(path);
    if (!src->path) {
        rc = ms_error(MS_ENOMEM, "out of memory");
        goto out;
    }
    if (ms_http_is_url(path)) {
        src->remote = true;
        goto out;
    }
    if (compressed) {
        rc = ms_zsrc_open(path, &src->z);
        goto out;
    }
    src->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (src->fd < 0)
        rc = ms_error(-errno, "%s: cannot open: %s", path, strerror(errno));
    else /* a merge reads each tensor front to back: a larger readahead window */
        (void)posix_fadvise(src->fd, 0, 0, POSIX_FADV_SEQUENTIAL);

out:
    if (rc)
        ms_src_free(src);
    else
        *out = src;
    return rc;
}

void ms_src_free(struct ms_src *src)
{
    if (!src)
        return;
    assert(!src->busy && !src->qhead);
    if (src->fd >= 0) {
        drop_flush(src);
        close(src->fd);
    }
    ms_zsrc_free(src->z);
    ms_free(src->path);
    ms_free(src);
}
