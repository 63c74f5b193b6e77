/*
 * test_src.c - input sources (ms_src.h): positional reads of a plain file
 * (several at once, a short read continued, end of file, a system error, the
 * fault hook) and of a zstd-compressed file (reads served in start order,
 * forward and backward, cancel). Every callback must come exactly once.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>
#include <zstd.h>

#include "ms_common.h"
#include "ms_src.h"
#include "th.h"

static char *g_dir;

static void setup(void) { g_dir = th_tmpdir(); }
static void teardown(void)
{
    ms_io_fail_after(0);
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(src, .init = setup, .fini = teardown);

/* ------------------------------------------------------------------ helpers */

/* n bytes of a seeded pattern. */
static unsigned char *pattern(size_t n, uint32_t seed)
{
    unsigned char *p = malloc(n);
    cr_assert_not_null(p);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (unsigned char)x;
    }
    return p;
}

/* What one read's callback saw. */
struct rec {
    struct ms_src_read req;
    unsigned char *buf;
    int calls;
    int status;
    int order;                    /* 1 for the first callback of the test, 2 for the next... */
    char msg[1024];
};

static int g_order;

static void on_read(struct ms_src_read *req, int status)
{
    struct rec *r = req->data;
    r->calls++;
    r->status = status;
    r->order = ++g_order;
    snprintf(r->msg, sizeof r->msg, "%s", status ? ms_errmsg() : "");
}

static int start(uv_loop_t *loop, struct ms_src *src, struct rec *r, size_t len, uint64_t off)
{
    r->buf = malloc(len);
    cr_assert_not_null(r->buf);
    r->req.data = r;
    return ms_src_read_start(loop, src, &r->req, r->buf, len, off, "w", on_read);
}

static struct ms_src *open_src(const char *path, bool compressed)
{
    struct ms_src *src = NULL;
    int rc = ms_src_open(path, compressed, &src);
    cr_assert_eq(rc, 0, "%s", ms_errmsg());
    cr_assert_not_null(src);
    return src;
}

static void run(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(loop), 0, "requests left on the loop");
}

/* Writes data[0..n) as one zstd frame per `frame` bytes (the frames declare their size). */
static void write_zst(const char *path, const unsigned char *data, size_t n, size_t frame)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    for (size_t off = 0; off < n; off += frame) {
        size_t len = n - off < frame ? n - off : frame;
        size_t cap = ZSTD_compressBound(len);
        void *z = malloc(cap);
        size_t zn = ZSTD_compress(z, cap, data + off, len, 3);
        cr_assert(!ZSTD_isError(zn));
        cr_assert_eq(fwrite(z, 1, zn, f), zn);
        free(z);
    }
    cr_assert_eq(fclose(f), 0);
}

/* ------------------------------------------------------------------ plain files */

Test(src, reads_at_offsets_in_any_order)
{
    size_t n = 300000;
    unsigned char *data = pattern(n, 1);
    char *path = th_path(g_dir, "a.safetensors");
    cr_assert_eq(th_write(path, data, n), 0);
    struct ms_src *src = open_src(path, false);
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct rec r[3] = { 0 };
    static const uint64_t off[3] = { 200000, 7, 123457 };
    static const size_t len[3] = { 100000, 65536, 1 };
    for (int i = 0; i < 3; i++)
        cr_assert_eq(start(&loop, src, &r[i], len[i], off[i]), 0, "%s", ms_errmsg());
    run(&loop);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(r[i].calls, 1);
        cr_assert_eq(r[i].status, 0, "%s", r[i].msg);
        cr_assert(!memcmp(r[i].buf, data + off[i], len[i]), "read %d differs", i);
        free(r[i].buf);
    }
    ms_src_free(src);
    free(path);
    free(data);
}

/* Thread pool work that appends the rest of the file after the first read ran short. */
struct grow {
    uv_work_t work;
    const char *path;
    const unsigned char *data;
    size_t from, to;
};

static void grow_cb(uv_work_t *w)
{
    struct grow *g = w->data;
    int fd = open(g->path, O_WRONLY);
    if (fd >= 0) {
        if (pwrite(fd, g->data + g->from, g->to - g->from, (off_t)g->from) < 0)
            perror("pwrite");
        close(fd);
    }
}

static void grow_done(uv_work_t *w, int status) { (void)w, (void)status; }

/*
 * A read that comes back short is continued at the rest. One pool thread runs
 * the first uv_fs_read, then the work that appends the rest of the file, then
 * (queued by the first read's completion) the continuation: so the first read
 * is short for sure. fail_at 2 fails the continuation through the fault hook.
 */
static void short_read(long fail_at)
{
    setenv("UV_THREADPOOL_SIZE", "1", 1); /* before this process first uses the pool */
    size_t n = 50000, have = 12345;
    unsigned char *data = pattern(n, 2);
    char *path = th_path(g_dir, "short.safetensors");
    cr_assert_eq(th_write(path, data, have), 0);
    struct ms_src *src = open_src(path, false);
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct rec r = { 0 };
    ms_io_fail_after(fail_at);
    cr_assert_eq(start(&loop, src, &r, n, 0), 0, "%s", ms_errmsg());
    struct grow g = { .path = path, .data = data, .from = have, .to = n };
    g.work.data = &g;
    cr_assert_eq(uv_queue_work(&loop, &g.work, grow_cb, grow_done), 0);
    run(&loop);
    ms_io_fail_after(0);
    cr_assert_eq(r.calls, 1);
    if (fail_at) {
        char want[4200];
        snprintf(want, sizeof want, "%s: read failed: i/o error", path);
        cr_assert_eq(r.status, UV_EIO);
        cr_assert_str_eq(r.msg, want);
    } else {
        cr_assert_eq(r.status, 0, "%s", r.msg);
        cr_assert(!memcmp(r.buf, data, n));
    }
    free(r.buf);
    ms_src_free(src);
    free(path);
    free(data);
}

Test(src, short_read_is_continued) { short_read(0); }
Test(src, fault_hook_fails_a_continuation) { short_read(2); }

Test(src, end_of_file_is_an_error)
{
    size_t n = 40000;
    unsigned char *data = pattern(n, 3);
    char *path = th_path(g_dir, "cut.safetensors");
    cr_assert_eq(th_write(path, data, n), 0);
    struct ms_src *src = open_src(path, false);
    cr_assert_eq(truncate(path, 30000), 0); /* after open, as if the plan were stale */
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct rec across = { 0 }, past = { 0 }, within = { 0 };
    cr_assert_eq(start(&loop, src, &across, 20000, 20000), 0);
    cr_assert_eq(start(&loop, src, &past, 100, 35000), 0);
    cr_assert_eq(start(&loop, src, &within, 30000, 0), 0);
    run(&loop);
    char want[4200];
    snprintf(want, sizeof want, "%s: unexpected end of file reading tensor 'w' (file truncated "
             "after the plan was made?)", path);
    cr_assert_eq(across.calls, 1);
    cr_assert_eq(across.status, MS_EIO);
    cr_assert_str_eq(across.msg, want);
    cr_assert_eq(past.calls, 1);
    cr_assert_eq(past.status, MS_EIO);
    cr_assert_str_eq(past.msg, want);
    cr_assert_eq(within.calls, 1);
    cr_assert_eq(within.status, 0, "%s", within.msg);
    cr_assert(!memcmp(within.buf, data, 30000));
    free(across.buf);
    free(past.buf);
    free(within.buf);
    ms_src_free(src);
    free(path);
    free(data);
}

Test(src, system_error_names_file_and_tensor)
{
    char *path = th_path(g_dir, "dir.safetensors");
    cr_assert_eq(mkdir(path, 0755), 0);
    struct ms_src *src = open_src(path, false); /* opens; reading a directory fails */
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct rec r = { 0 };
    cr_assert_eq(start(&loop, src, &r, 16, 0), 0);
    run(&loop);
    char want[4200];
    snprintf(want, sizeof want, "%s: read of tensor 'w' failed: %s", path, uv_strerror(UV_EISDIR));
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.status, UV_EISDIR);
    cr_assert_str_eq(r.msg, want);
    free(r.buf);
    ms_src_free(src);
    free(path);
}

Test(src, fault_hook_fails_the_nth_read)
{
    size_t n = 4096;
    unsigned char *data = pattern(n, 4);
    char *path = th_path(g_dir, "f.safetensors");
    cr_assert_eq(th_write(path, data, n), 0);
    struct ms_src *src = open_src(path, false);
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct rec r[3] = { 0 };
    ms_io_fail_after(2);
    cr_assert_eq(start(&loop, src, &r[0], 100, 0), 0, "%s", ms_errmsg());
    char want[4200];
    snprintf(want, sizeof want, "%s: read failed: i/o error", path);
    for (int i = 1; i < 3; i++) { /* the 2nd and every later one */
        cr_assert_eq(start(&loop, src, &r[i], 100, 100), UV_EIO);
        cr_assert_str_eq(ms_errmsg(), want);
    }
    ms_io_fail_after(0);
    run(&loop);
    cr_assert_eq(r[0].calls, 1);
    cr_assert_eq(r[0].status, 0, "%s", r[0].msg);
    cr_assert(!memcmp(r[0].buf, data, 100));
    cr_assert_eq(r[1].calls + r[2].calls, 0, "a failed start has no callback");
    for (int i = 0; i < 3; i++)
        free(r[i].buf);
    ms_src_free(src);
    free(path);
    free(data);
}

Test(src, open_errors)
{
    char *path = th_path(g_dir, "missing.safetensors");
    struct ms_src *src = (struct ms_src *)1;
    cr_assert_eq(ms_src_open(path, false, &src), UV_ENOENT);
    cr_assert_null(src);
    char want[4200];
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", path);
    cr_assert_str_eq(ms_errmsg(), want);
    cr_assert_lt(ms_src_open(path, true, &src), 0);
    cr_assert_null(src);
    cr_assert(strstr(ms_errmsg(), path), "%s", ms_errmsg());
    ms_src_free(NULL);
    free(path);
}

/* ------------------------------------------------------------------ compressed files */

Test(src, compressed_reads_in_start_order_forward_and_back)
{
    size_t n = 1 << 20;
    unsigned char *data = pattern(n, 5);
    char *path = th_path(g_dir, "c.safetensors.zst");
    write_zst(path, data, n, 300000); /* four frames */
    struct ms_src *src = open_src(path, true);
    uv_loop_t loop;
    uv_loop_init(&loop);
    static const uint64_t off[5] = { 1000, 500000, 10, 900000, 899999 };
    static const size_t len[5] = { 5000, 300001, 100, 148576, 1 };
    struct rec r[5] = { 0 };
    ms_io_fail_after(1); /* compressed reads do not consult the fault hook */
    for (int i = 0; i < 5; i++)
        cr_assert_eq(start(&loop, src, &r[i], len[i], off[i]), 0, "%s", ms_errmsg());
    run(&loop);
    ms_io_fail_after(0);
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(r[i].calls, 1);
        cr_assert_eq(r[i].status, 0, "read %d: %s", i, r[i].msg);
        cr_assert_eq(r[i].order, i + 1, "read %d served out of start order", i);
        cr_assert(!memcmp(r[i].buf, data + off[i], len[i]), "read %d differs", i);
        free(r[i].buf);
    }
    ms_src_free(src);
    free(path);
    free(data);
}

Test(src, compressed_read_past_the_end_fails)
{
    size_t n = 10000;
    unsigned char *data = pattern(n, 6);
    char *path = th_path(g_dir, "e.safetensors.zst");
    write_zst(path, data, n, n);
    struct ms_src *src = open_src(path, true);
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct rec r = { 0 };
    cr_assert_eq(start(&loop, src, &r, 2, n - 1), 0);
    run(&loop);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.status, MS_EIO);
    cr_assert(strstr(r.msg, path), "%s", r.msg);
    free(r.buf);
    ms_src_free(src);
    free(path);
    free(data);
}

Test(src, cancel_ends_queued_compressed_reads)
{
    size_t n = 200000;
    unsigned char *data = pattern(n, 7);
    char *path = th_path(g_dir, "q.safetensors.zst");
    write_zst(path, data, n, n);
    struct ms_src *src = open_src(path, true);
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct rec r[4] = { 0 };
    for (int i = 0; i < 3; i++)
        cr_assert_eq(start(&loop, src, &r[i], 1000, (uint64_t)i * 1000), 0);
    ms_src_cancel(src);
    cr_assert_eq(start(&loop, src, &r[3], 1000, 0), MS_ECANCELED);
    run(&loop);
    cr_assert_eq(r[0].calls, 1);
    cr_assert_eq(r[0].status, 0, "the read in flight completes: %s", r[0].msg);
    cr_assert(!memcmp(r[0].buf, data, 1000));
    for (int i = 1; i < 3; i++) {
        cr_assert_eq(r[i].calls, 1);
        cr_assert_eq(r[i].status, MS_ECANCELED);
    }
    cr_assert_eq(r[3].calls, 0);
    for (int i = 0; i < 4; i++)
        free(r[i].buf);
    ms_src_free(src);
    free(path);
    free(data);
}
