/*
 * shard.c - positional shard files (ms_out.h, ms_shard_file_*): the raw
 * safetensors shards of a directory output, written at known offsets in any
 * order with uv_fs_write, then synced and renamed.
 *
 * Threads: the loop thread only (libuv runs the writes on its pool), except
 * write-behind's behind_work_cb, which runs one request's write on the pool and
 * touches the file's range list only under its wb_lock.
 */
#define _GNU_SOURCE /* sync_file_range */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "ms_common.h"
#include "ms_file.h"
#include "ms_out.h"
#include "ms_zsrc.h"

#define MAX_CALL (1u << 30) /* bytes per uv_fs_write call */

int ms_shard_file_init(struct ms_shard_file *f, const char *dir, const char *name,
                       const char *suffix)
{
    memset(f, 0, sizeof *f);
    f->fd = -1;
    if (!dir)
        return 0;
    f->final_path = ms_asprintf("%s/%s%s", dir, name, suffix);
    f->tmp_path = ms_asprintf("%s/%s.partial", dir, name);
    if (!f->final_path || !f->tmp_path)
        return ms_error(MS_ENOMEM, "out of memory");
    return 0;
}

bool ms_shard_file_exists(const struct ms_shard_file *f)
{
    return f->final_path && access(f->final_path, F_OK) == 0;
}

bool ms_shard_file_keep(struct ms_shard_file *f, uint64_t size, const void *header,
                        size_t header_bytes, bool compressed)
{
    bool ok = false;
    unsigned char *hdr = ms_malloc(header_bytes);
    if (!hdr)
        return false;
    if (compressed) {
        struct ms_zsrc *z = NULL;
        ok = ms_zsrc_open(f->final_path, &z) == 0 && ms_zsrc_size(z) == size &&
             ms_zsrc_pread(z, hdr, header_bytes, 0) == 0 && !memcmp(hdr, header, header_bytes);
        ms_zsrc_free(z);
    } else {
        int fd = open(f->final_path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        ok = fd >= 0 && fstat(fd, &st) == 0 && (uint64_t)st.st_size == size &&
             pread(fd, hdr, header_bytes, 0) == (ssize_t)header_bytes &&
             !memcmp(hdr, header, header_bytes);
        if (fd >= 0)
            close(fd);
    }
    ms_free(hdr);
    ms_error_clear();
    if (ok)
        f->finished = true;
    return ok;
}

int ms_shard_file_open(struct ms_shard_file *f, uint64_t size, const void *header,
                       size_t header_bytes)
{
    assert(f->fd < 0 && !f->finished && f->tmp_path);
    int fd = ms_file_create(f->tmp_path, 0644);
    if (fd < 0)
        return ms_error(fd, "%s: cannot create: %s", f->tmp_path, ms_strerror(fd));
    f->fd = fd;
    f->created = true;
    int frc = posix_fallocate(fd, 0, (off_t)size);
    if (frc == ENOSPC || frc == EFBIG)
        return ms_error(-frc, "%s: cannot reserve %" PRIu64 " bytes: %s", f->tmp_path, size,
                        strerror(frc));
    const unsigned char *h = header;
    size_t done = 0;
    while (done < header_bytes) {
        ssize_t w = ms__io_should_fail() ? (errno = EIO, -1) /* test hook */
                    : pwrite(fd, h + done, header_bytes - done, (off_t)done);
        if (w <= 0)
            return ms_error(w < 0 ? -errno : MS_EIO, "%s: cannot write header: %s", f->tmp_path,
                            w < 0 ? strerror(errno) : "no progress");
        done += (size_t)w;
    }
    return 0;
}

/* ------------------------------------------------------------------ writes */

static void on_fs_write(uv_fs_t *fs);

/* Issues one uv_fs_write for the rest of req (at most MAX_CALL bytes). */
static int fs_issue(struct ms_shard_write *req)
{
    struct ms_shard_file *f = req->file;
    uv_buf_t b = uv_buf_init((char *)req->buf + req->done,
                             (unsigned)MS_MIN(req->len - req->done, MAX_CALL));
    req->u.fs.data = req;
    int rc = uv_fs_write(req->loop, &req->u.fs, f->fd, &b, 1, (int64_t)(req->off + req->done),
                         on_fs_write);
    if (rc < 0)
        return ms_error(rc, "%s: write failed: %s", f->tmp_path, uv_strerror(rc));
    return 0;
}

static void on_fs_write(uv_fs_t *fs)
{
    struct ms_shard_write *req = fs->data;
    struct ms_shard_file *f = req->file;
    ssize_t r = fs->result;
    uv_fs_req_cleanup(fs);
    if (r <= 0) {
        req->cb(req, ms_error(r < 0 ? (int)r : MS_EIO, "%s: write failed: %s", f->tmp_path,
                              r < 0 ? uv_strerror((int)r) : "no progress"));
        return;
    }
    req->done += (uint64_t)r;
    if (req->done == req->len) {
        req->cb(req, 0);
        return;
    }
    int rc = f->canceled ? ms_error(MS_ECANCELED, "%s: write canceled", f->tmp_path)
                         : fs_issue(req);
    if (rc < 0)
        req->cb(req, rc);
}

/* ---- write-behind: the write, its writeback and the drop of older ranges, on the pool */

/* Appends [off, off + len) to the ranges in writeback and takes out (into o, l) those
 * beyond the window, oldest first; returns how many. Under f->wb_lock. */
static unsigned behind_push(struct ms_shard_file *f, uint64_t off, uint64_t len, uint64_t *o,
                            uint64_t *l)
{
    enum { R = MS_SHARD_BEHIND_RANGES };
    unsigned n = 0;
    unsigned last = (f->wb_first + f->wb_n + R - 1) % R;
    if (f->wb_n && f->wb_off[last] + f->wb_len[last] == off) {
        f->wb_len[last] += len;
    } else {
        if (f->wb_n == R) { /* no room: the oldest goes now */
            o[n] = f->wb_off[f->wb_first];
            l[n] = f->wb_len[f->wb_first];
            f->wb_bytes -= l[n++];
            f->wb_first = (f->wb_first + 1) % R;
            f->wb_n--;
        }
        unsigned k = (f->wb_first + f->wb_n) % R;
        f->wb_off[k] = off;
        f->wb_len[k] = len;
        f->wb_n++;
    }
    f->wb_bytes += len;
    while (f->wb_n > 1 && f->wb_bytes > f->wb_window) {
        o[n] = f->wb_off[f->wb_first];
        l[n] = f->wb_len[f->wb_first];
        f->wb_bytes -= l[n++];
        f->wb_first = (f->wb_first + 1) % R;
        f->wb_n--;
    }
    return n;
}

/* Waits for [off, off + len) to be on disk, then lets the page cache drop it. */
static void behind_drop(int fd, uint64_t off, uint64_t len)
{
    /* Advice: a failed writeback shows again in the fsync of finish. */
    (void)sync_file_range(fd, (off_t)off, (off_t)len,
                          SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                              SYNC_FILE_RANGE_WAIT_AFTER);
    (void)posix_fadvise(fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
}

/* Blocking: writes exactly len bytes of b at off (EINTR retried). 0, or a
 * negative errno (MS_EIO when a write makes no progress). */
static int pwrite_full(int fd, const unsigned char *b, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pwrite(fd, b + done, MS_MIN(len - done, MAX_CALL), (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : MS_EIO;
        done += (size_t)r;
    }
    return 0;
}

/* Pool thread: the whole write, then its writeback started and older ranges dropped. */
static void behind_work_cb(uv_work_t *w)
{
    struct ms_shard_write *req = w->data;
    struct ms_shard_file *f = req->file;
    req->wrc = pwrite_full(f->fd, req->buf + req->done, (size_t)(req->len - req->done),
                           req->off + req->done);
    if (req->wrc)
        return;
    req->done = req->len;
    (void)sync_file_range(f->fd, (off_t)req->off, (off_t)req->len, SYNC_FILE_RANGE_WRITE);
    uint64_t o[MS_SHARD_BEHIND_RANGES], l[MS_SHARD_BEHIND_RANGES];
    uv_mutex_lock(&f->wb_lock);
    unsigned n = behind_push(f, req->off, req->len, o, l);
    uv_mutex_unlock(&f->wb_lock);
    for (unsigned i = 0; i < n; i++)
        behind_drop(f->fd, o[i], l[i]);
}

static void behind_after_cb(uv_work_t *w, int status)
{
    struct ms_shard_write *req = w->data;
    struct ms_shard_file *f = req->file;
    int rc = status < 0 ? status : req->wrc;
    if (rc < 0)
        rc = ms_error(rc, "%s: write failed: %s", f->tmp_path,
                      rc == MS_EIO ? "no progress" : ms_strerror(rc));
    req->cb(req, rc);
}

int ms_shard_file_behind(struct ms_shard_file *f, uint64_t window)
{
    assert(f->fd >= 0 && !f->behind);
    int rc = uv_mutex_init(&f->wb_lock);
    if (rc < 0)
        return ms_error(rc, "%s: cannot start write-behind: %s", f->tmp_path, uv_strerror(rc));
    f->behind = true;
    f->wb_first = f->wb_n = 0;
    f->wb_bytes = 0;
    f->wb_window = window;
    return 0;
}

/* Ends write-behind: what is still in the page cache goes once on disk. */
static void behind_end(struct ms_shard_file *f)
{
    if (!f->behind)
        return;
    if (f->fd >= 0 && fdatasync(f->fd) == 0)
        (void)posix_fadvise(f->fd, 0, 0, POSIX_FADV_DONTNEED);
    uv_mutex_destroy(&f->wb_lock);
    f->behind = false;
}

int ms_shard_write_start(uv_loop_t *loop, struct ms_shard_file *f, struct ms_shard_write *req,
                         const void *buf, size_t len, uint64_t off, ms_shard_write_cb cb)
{
    assert(loop && f && req && buf && len > 0 && cb && f->fd >= 0);
    req->loop = loop;
    req->file = f;
    req->buf = buf;
    req->len = len;
    req->done = 0;
    req->off = off;
    req->cb = cb;
    if (ms__io_should_fail()) /* test hook */
        return ms_error(UV_EIO, "%s: write failed: %s", f->tmp_path, uv_strerror(UV_EIO));
    if (!f->behind)
        return fs_issue(req);
    req->u.work.data = req;
    int rc = uv_queue_work(loop, &req->u.work, behind_work_cb, behind_after_cb);
    if (rc < 0)
        return ms_error(rc, "%s: write failed: %s", f->tmp_path, uv_strerror(rc));
    return 0;
}

int ms_shard_file_pwrite(const struct ms_shard_file *f, const void *buf, size_t len,
                         uint64_t off)
{
    assert(f->fd >= 0 && !f->behind && buf && len > 0);
    if (ms__io_should_fail()) /* test hook */
        return ms_error(UV_EIO, "%s: write failed: %s", f->tmp_path, uv_strerror(UV_EIO));
    int rc = pwrite_full(f->fd, buf, len, off);
    if (rc)
        return ms_error(rc, "%s: write failed: %s", f->tmp_path,
                        rc == MS_EIO ? "no progress" : ms_strerror(rc));
    return 0;
}

/* ------------------------------------------------------------------ end */

int ms_shard_file_finish(struct ms_shard_file *f)
{
    enum ms_file_step step;
    behind_end(f);
    int fd = f->fd;
    f->fd = -1; /* ms_file_commit closes it whatever happens */
    int rc = ms_file_commit(fd, f->tmp_path, f->final_path, NULL, &step);
    f->created = false; /* renamed, or removed by ms_file_commit */
    if (rc == 0) {
        f->finished = true;
        return 0;
    }
    if (step == MS_FILE_STEP_RENAME)
        return ms_error(rc, "%s: cannot rename to %s: %s", f->tmp_path, f->final_path,
                        strerror(-rc));
    return ms_error(rc, "%s: %s failed: %s", f->tmp_path,
                    step == MS_FILE_STEP_FSYNC ? "fsync" : "close", strerror(-rc));
}

void ms_shard_file_cancel(struct ms_shard_file *f) { f->canceled = true; }

void ms_shard_file_abort(struct ms_shard_file *f)
{
    if (f->behind) {
        uv_mutex_destroy(&f->wb_lock);
        f->behind = false;
    }
    if (f->fd >= 0)
        close(f->fd);
    f->fd = -1;
    if (!f->finished && f->created && f->tmp_path)
        unlink(f->tmp_path);
    f->created = false;
}

void ms_shard_file_fini(struct ms_shard_file *f)
{
    ms_shard_file_abort(f);
    ms_free(f->tmp_path);
    ms_free(f->final_path);
    f->tmp_path = f->final_path = NULL;
}
