/*
 * test_shard.c - positional shard files (ms_out.h, ms_shard_file_*): create
 * with the size reserved and the header written, writes at offsets in any
 * order, write-behind, finish (sync, rename), abort (no temporary left), the
 * --resume check of a kept file, and the fault hook on header and chunk writes.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <uv.h>
#include <zstd.h>

#include "ms_common.h"
#include "ms_out.h"
#include "th.h"

static char *g_dir;

static void setup(void) { g_dir = th_tmpdir(); }
static void teardown(void)
{
    ms_io_fail_after(0);
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(shard, .init = setup, .fini = teardown);

#define NAME "model-00001-of-00002.safetensors"
#define HDR 48

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

struct rec {
    struct ms_shard_write req;
    int calls;
    int status;
    char msg[1024];
};

static void on_write(struct ms_shard_write *req, int status)
{
    struct rec *r = req->data;
    r->calls++;
    r->status = status;
    snprintf(r->msg, sizeof r->msg, "%s", status ? ms_errmsg() : "");
}

static bool exists(const char *dir, const char *name)
{
    char *p = th_path(dir, name);
    bool ok = access(p, F_OK) == 0;
    free(p);
    return ok;
}

static void run(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(loop), 0, "requests left on the loop");
}

/* Writes the shard file (HDR header bytes, then the data) with three writes out of order. */
static void write_shard(struct ms_shard_file *f, const unsigned char *file, size_t n)
{
    cr_assert_eq(ms_shard_file_open(f, n, file, HDR), 0, "%s", ms_errmsg());
    cr_assert_geq(f->fd, 0);
    uv_loop_t loop;
    uv_loop_init(&loop);
    size_t cut1 = HDR + 1001, cut2 = HDR + (n - HDR) / 2 + 3;
    static struct rec r[3];
    memset(r, 0, sizeof r);
    const size_t from[3] = { cut2, HDR, cut1 }, to[3] = { n, cut1, cut2 };
    for (int i = 0; i < 3; i++) {
        r[i].req.data = &r[i];
        cr_assert_eq(ms_shard_write_start(&loop, f, &r[i].req, file + from[i], to[i] - from[i],
                                          from[i], on_write),
                     0, "%s", ms_errmsg());
    }
    run(&loop);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(r[i].calls, 1);
        cr_assert_eq(r[i].status, 0, "%s", r[i].msg);
    }
}

Test(shard, writes_out_of_order_then_finish)
{
    size_t n = HDR + 250000;
    unsigned char *file = pattern(n, 1);
    struct ms_shard_file f;
    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ""), 0);
    cr_assert_eq(f.fd, -1);
    cr_assert(!ms_shard_file_exists(&f));
    cr_assert_eq(ms_shard_file_open(&f, n, file, HDR), 0, "%s", ms_errmsg());
    struct stat st;
    char *tmp = th_path(g_dir, NAME ".partial"), *fin = th_path(g_dir, NAME);
    cr_assert_eq(stat(tmp, &st), 0);
    cr_assert_eq((size_t)st.st_size, n, "the whole size is reserved at open");
    ms_shard_file_abort(&f); /* start again through the helper */
    cr_assert(!exists(g_dir, NAME ".partial"));
    write_shard(&f, file, n);
    cr_assert(!f.finished);
    cr_assert_eq(ms_shard_file_finish(&f), 0, "%s", ms_errmsg());
    cr_assert(f.finished);
    cr_assert_eq(f.fd, -1);
    cr_assert(!exists(g_dir, NAME ".partial"));
    size_t got = 0;
    char *back = th_read(fin, &got);
    cr_assert_not_null(back);
    cr_assert_eq(got, n);
    cr_assert(!memcmp(back, file, n), "the file holds other bytes");
    ms_shard_file_fini(&f);
    cr_assert(exists(g_dir, NAME), "fini keeps a finished file");
    free(back);
    free(tmp);
    free(fin);
    free(file);
}

/*
 * Write-behind (ms_shard_file_behind) with a 4 KiB window: 60 writes one after
 * another, scattered (more separate ranges than the list holds) and adjacent,
 * give the same file; after finish the page cache holds (almost) none of it,
 * checked with mincore where the file system can drop pages (not tmpfs).
 */
Test(shard, write_behind_same_file_and_pages_dropped)
{
    enum { PIECES = 60, PIECE = 5000 };
    size_t n = HDR + (size_t)PIECES * PIECE;
    unsigned char *file = pattern(n, 4);
    struct ms_shard_file f;
    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ""), 0);
    cr_assert_eq(ms_shard_file_open(&f, n, file, HDR), 0, "%s", ms_errmsg());
    cr_assert_eq(ms_shard_file_behind(&f, 4096), 0, "%s", ms_errmsg());
    uv_loop_t loop;
    uv_loop_init(&loop);
    for (int i = 0; i < PIECES; i++) {
        /* pieces 0..39 scattered (17 is prime to 40), then 40..59 in order */
        int k = i < 40 ? (i * 17) % 40 : i;
        struct rec r = { 0 };
        r.req.data = &r;
        size_t off = HDR + (size_t)k * PIECE;
        cr_assert_eq(ms_shard_write_start(&loop, &f, &r.req, file + off, PIECE, off, on_write), 0,
                     "%s", ms_errmsg());
        uv_run(&loop, UV_RUN_DEFAULT);
        cr_assert_eq(r.calls, 1);
        cr_assert_eq(r.status, 0, "%s", r.msg);
    }
    cr_assert_eq(uv_loop_close(&loop), 0);
    cr_assert_eq(ms_shard_file_finish(&f), 0, "%s", ms_errmsg());
    char *fin = th_path(g_dir, NAME);
    size_t got = 0;
    int fd = open(fin, O_RDONLY);
    cr_assert_geq(fd, 0);
    struct statfs sf;
    cr_assert_eq(fstatfs(fd, &sf), 0);
    void *m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0);
    cr_assert_neq(m, MAP_FAILED);
    long pg = sysconf(_SC_PAGESIZE);
    size_t np = (n + (size_t)pg - 1) / (size_t)pg, resident = 0;
    unsigned char *vec = malloc(np);
    cr_assert_eq(mincore(m, n, vec), 0);
    for (size_t i = 0; i < np; i++)
        resident += vec[i] & 1;
    if (sf.f_type == TMPFS_MAGIC)
        cr_log_info("skipped: the page-cache check (tmpfs keeps its pages)");
    else
        cr_assert_leq(resident, 2, "%zu of %zu pages still cached after write-behind", resident,
                      np);
    munmap(m, n);
    close(fd);
    free(vec);
    char *back = th_read(fin, &got);
    cr_assert_eq(got, n);
    cr_assert(!memcmp(back, file, n), "the file holds other bytes");
    ms_shard_file_fini(&f);
    free(back);
    free(fin);
    free(file);
}

Test(shard, abort_leaves_no_temporary)
{
    size_t n = HDR + 5000;
    unsigned char *file = pattern(n, 2);
    struct ms_shard_file f;
    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ""), 0);
    write_shard(&f, file, n);
    cr_assert(exists(g_dir, NAME ".partial"));
    ms_shard_file_abort(&f);
    ms_shard_file_abort(&f); /* idempotent */
    cr_assert_eq(f.fd, -1);
    cr_assert(!exists(g_dir, NAME ".partial"));
    cr_assert(!exists(g_dir, NAME));
    ms_shard_file_fini(&f);

    /* fini alone aborts too; a file that names nothing is a no-op */
    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ""), 0);
    cr_assert_eq(ms_shard_file_open(&f, n, file, HDR), 0, "%s", ms_errmsg());
    ms_shard_file_fini(&f);
    cr_assert(!exists(g_dir, NAME ".partial"));
    cr_assert_eq(ms_shard_file_init(&f, NULL, NAME, ""), 0);
    cr_assert(!ms_shard_file_exists(&f));
    ms_shard_file_fini(&f);
    free(file);
}

Test(shard, fault_hook_fails_header_then_chunk_writes)
{
    size_t n = HDR + 3000;
    unsigned char *file = pattern(n, 3);
    char *tmp = th_path(g_dir, NAME ".partial");
    char want[4200];

    /* 1st operation: the header write */
    struct ms_shard_file f;
    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ""), 0);
    ms_io_fail_after(1);
    int rc = ms_shard_file_open(&f, n, file, HDR);
    ms_io_fail_after(0);
    cr_assert_eq(rc, -EIO);
    snprintf(want, sizeof want, "%s: cannot write header: %s", tmp, strerror(EIO));
    cr_assert_str_eq(ms_errmsg(), want);
    ms_shard_file_fini(&f);
    cr_assert(!exists(g_dir, NAME ".partial"));

    /* 2nd: the first chunk write (the header took one call), then every later one */
    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ""), 0);
    ms_io_fail_after(2);
    cr_assert_eq(ms_shard_file_open(&f, n, file, HDR), 0, "%s", ms_errmsg());
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct rec r[2] = { 0 };
    snprintf(want, sizeof want, "%s: write failed: i/o error", tmp);
    for (int i = 0; i < 2; i++) {
        r[i].req.data = &r[i];
        cr_assert_eq(ms_shard_write_start(&loop, &f, &r[i].req, file + HDR, 100, HDR, on_write),
                     UV_EIO);
        cr_assert_str_eq(ms_errmsg(), want);
    }
    ms_io_fail_after(0);
    run(&loop);
    cr_assert_eq(r[0].calls + r[1].calls, 0, "a failed start has no callback");
    ms_shard_file_fini(&f);
    cr_assert(!exists(g_dir, NAME ".partial"));
    free(tmp);
    free(file);
}

Test(shard, create_error_names_the_temporary)
{
    char *dir = th_path(g_dir, "missing");
    struct ms_shard_file f;
    cr_assert_eq(ms_shard_file_init(&f, dir, NAME, ""), 0);
    unsigned char hdr[HDR] = { 0 };
    cr_assert_eq(ms_shard_file_open(&f, HDR, hdr, HDR), UV_ENOENT);
    char want[4200];
    snprintf(want, sizeof want, "%s/" NAME ".partial: cannot create: no such file or directory",
             dir);
    cr_assert_str_eq(ms_errmsg(), want);
    cr_assert_eq(f.fd, -1);
    ms_shard_file_fini(&f);
    free(dir);
}

/* Writes data[0..n) as one zstd frame. */
static void write_zst(const char *path, const unsigned char *data, size_t n)
{
    size_t cap = ZSTD_compressBound(n);
    void *z = malloc(cap);
    size_t zn = ZSTD_compress(z, cap, data, n, 3);
    cr_assert(!ZSTD_isError(zn));
    cr_assert_eq(th_write(path, z, zn), 0);
    free(z);
}

Test(shard, keep_checks_size_and_header)
{
    size_t n = HDR + 7000;
    unsigned char *file = pattern(n, 4);
    struct ms_shard_file f;
    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ""), 0);
    write_shard(&f, file, n);
    cr_assert_eq(ms_shard_file_finish(&f), 0, "%s", ms_errmsg());
    ms_shard_file_fini(&f);

    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ""), 0);
    cr_assert(ms_shard_file_exists(&f));
    unsigned char other[HDR];
    memcpy(other, file, HDR);
    other[HDR - 1] ^= 1;
    cr_assert(!ms_shard_file_keep(&f, n, other, HDR, false), "another header");
    cr_assert(!ms_shard_file_keep(&f, n + 1, file, HDR, false), "another size");
    cr_assert(!ms_shard_file_keep(&f, n, file, HDR, true), "not a zstd file");
    cr_assert(!f.finished);
    cr_assert_str_eq(ms_errmsg(), "", "the check leaves no diagnostic");
    cr_assert(ms_shard_file_keep(&f, n, file, HDR, false));
    cr_assert(f.finished);
    ms_shard_file_fini(&f);
    cr_assert(exists(g_dir, NAME), "fini keeps a kept file");

    /* compressed: the final name has the suffix and holds a zstd stream */
    cr_assert_eq(ms_shard_file_init(&f, g_dir, NAME, ".zst"), 0);
    cr_assert(!ms_shard_file_exists(&f));
    char *zp = th_path(g_dir, NAME ".zst");
    write_zst(zp, file, n);
    cr_assert(ms_shard_file_exists(&f));
    cr_assert(!ms_shard_file_keep(&f, n - 1, file, HDR, true));
    cr_assert(ms_shard_file_keep(&f, n, file, HDR, true));
    ms_shard_file_fini(&f);
    free(zp);
    free(file);
}
