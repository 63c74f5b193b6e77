/*
 * test_out.c - sequential output sinks and the compressed reader (ms_out.h).
 *
 * Oracles are outside the code under test: GNU tar extracts the archives, the
 * zstd CLI decompresses what we compress and compresses what we read, `cat`
 * and `rclone rcat` receive the piped files, and the tar size field for a 9e9
 * byte file is compared against bytes worked out by hand. Data comes from a
 * seeded generator (the seed is printed).
 */
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <zstd.h>

#include "ms_common.h"
#include "ms_out.h"
#include "ms_zsrc.h"
#include "th.h"


/* ------------------------------------------------------------------ helpers */

static char *tmp;
static uint64_t rng_state;

static void setup(void)
{
    tmp = th_tmpdir();
    cr_assert(tmp);
    rng_state = 0x5eed0007ull;
    cr_log_info("seed 0x%llx", (unsigned long long)rng_state);
}

static void teardown(void)
{
    if (tmp)
        th_rmtree(tmp);
    free(tmp);
    tmp = NULL;
}

TestSuite(out, .init = setup, .fini = teardown, .timeout = 120);

static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* n bytes, alternating runs of random bytes and of a repeated short pattern
 * (so that zstd has something to compress and something it cannot). */
static unsigned char *make_data(size_t n)
{
    unsigned char *p = malloc(n ? n : 1);
    cr_assert(p);
    size_t i = 0;
    while (i < n) {
        size_t run = 1 + rng_next() % 70000;
        bool random = rng_next() & 1;
        unsigned char pat = (unsigned char)rng_next();
        for (size_t k = 0; k < run && i < n; k++, i++)
            p[i] = random ? (unsigned char)rng_next() : (unsigned char)(pat + (k % 7));
    }
    return p;
}

struct file {
    const char *name;
    size_t size;
    unsigned char *data;
};

static void make_files(struct file *f, size_t n)
{
    for (size_t i = 0; i < n; i++)
        f[i].data = make_data(f[i].size);
}

static void free_files(struct file *f, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(f[i].data);
}

/* Writes every file through o in chunks of varying size (1 byte up to ~300 KiB). */
static void write_files(struct ms_out *o, const struct file *f, size_t n, const char **finals)
{
    for (size_t i = 0; i < n; i++) {
        const char *fin = NULL;
        int rc = ms_out_file_begin(o, f[i].name, f[i].size, &fin);
        cr_assert_eq(rc, 0, "begin %s: %s", f[i].name, ms_errmsg());
        if (finals)
            finals[i] = strdup(fin);
        size_t at = 0;
        while (at < f[i].size) {
            size_t k = 1 + rng_next() % 300000;
            if (rng_next() % 8 == 0)
                k = 1 + rng_next() % 16;
            k = MS_MIN(k, f[i].size - at);
            rc = ms_out_file_write(o, f[i].data + at, k);
            cr_assert_eq(rc, 0, "write %s: %s", f[i].name, ms_errmsg());
            at += k;
        }
        rc = ms_out_file_end(o);
        cr_assert_eq(rc, 0, "end %s: %s", f[i].name, ms_errmsg());
    }
}

static void assert_file_is(const char *path, const void *data, size_t size)
{
    size_t len = 0;
    char *got = th_read(path, &len);
    cr_assert(got, "%s missing", path);
    cr_assert_eq(len, size, "%s: %zu bytes, want %zu", path, len, size);
    cr_assert(memcmp(got, data, size) == 0, "%s: content differs", path);
    free(got);
}

static int count_partials(const char *dir)
{
    DIR *d = opendir(dir);
    cr_assert(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name);
        if (l > 8 && !strcmp(e->d_name + l - 8, ".partial"))
            n++;
    }
    closedir(d);
    return n;
}

static char *sub(const char *name)
{
    char *p = th_path(tmp, name);
    cr_assert(p);
    return p;
}

static void run_ok(const char *cmd)
{
    char *err = NULL;
    int st = th_run(cmd, NULL, &err);
    cr_assert_eq(st, 0, "`%s` failed (%d): %s", cmd, st, err ? err : "");
    free(err);
}

static const char *LONG_NAME =
    "a-very-long-file-name-that-goes-past-the-hundred-byte-ustar-name-field-"
    "so-it-needs-a-pax-path-record-ok.safetensors";

/* ------------------------------------------------------------------ DIR */

Test(out, dir_raw_files_identical_and_no_partial_left)
{
    struct file f[] = {
        {"model-00001-of-00002.safetensors", 1300001, NULL},
        {"empty.bin", 0, NULL},
        {"model-00002-of-00002.safetensors", 7, NULL},
    };
    make_files(f, 3);
    struct ms_out_opts opts = {.kind = MS_OUT_DIR, .dir = tmp};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0, "%s", ms_errmsg());
    const char *fin[3];
    write_files(o, f, 3, fin);
    cr_assert_eq(ms_out_finish(o), 0, "%s", ms_errmsg());
    ms_out_free(o);
    for (int i = 0; i < 3; i++) {
        cr_assert_str_eq(fin[i], f[i].name);
        char *p = sub(f[i].name);
        assert_file_is(p, f[i].data, f[i].size);
        free(p);
        free((void *)fin[i]);
    }
    cr_assert_eq(count_partials(tmp), 0);
    free_files(f, 3);
}

static void dir_zstd(unsigned workers)
{
    struct file f[] = {
        {"model-00001-of-00003.safetensors", 20u << 20, NULL}, /* several MT jobs */
        {"model-00002-of-00003.safetensors", 0, NULL},
        {"model-00003-of-00003.safetensors", 333333, NULL},
    };
    make_files(f, 3);
    struct ms_out_opts opts = {.kind = MS_OUT_DIR, .dir = tmp, .zstd_level = 3,
                               .zstd_workers = workers};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0, "%s", ms_errmsg());
    const char *fin[3];
    write_files(o, f, 3, fin);
    cr_assert_eq(ms_out_finish(o), 0, "%s", ms_errmsg());
    ms_out_free(o);
    cr_assert_eq(count_partials(tmp), 0);
    for (int i = 0; i < 3; i++) {
        char want[256];
        snprintf(want, sizeof want, "%s.zst", f[i].name);
        cr_assert_str_eq(fin[i], want);
        char *zp = sub(fin[i]);
        char *rp = sub(f[i].name);
        char cmd[8192];
        snprintf(cmd, sizeof cmd, "zstd -q -d -c '%s' > '%s'", zp, rp);
        run_ok(cmd);
        assert_file_is(rp, f[i].data, f[i].size);

        /* The frame header declares the content size (pledged). */
        size_t zl;
        char *z = th_read(zp, &zl);
        cr_assert(z);
        cr_assert_eq(ZSTD_getFrameContentSize(z, zl), (unsigned long long)f[i].size);
        free(z);
        free(zp);
        free(rp);
        free((void *)fin[i]);
    }
    free_files(f, 3);
}

Test(out, dir_zstd_single_thread_decompresses_to_same_bytes) { dir_zstd(0); }
Test(out, dir_zstd_two_workers_decompresses_to_same_bytes) { dir_zstd(2); }

Test(out, dir_abort_removes_partial)
{
    struct ms_out_opts opts = {.kind = MS_OUT_DIR, .dir = tmp, .zstd_level = 1};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    unsigned char buf[1000] = {0};
    cr_assert_eq(ms_out_file_begin(o, "x.safetensors", 5000, NULL), 0);
    cr_assert_eq(ms_out_file_write(o, buf, sizeof buf), 0);
    cr_assert_eq(count_partials(tmp), 1);
    ms_out_abort(o);
    ms_out_abort(o); /* idempotent */
    cr_assert_eq(count_partials(tmp), 0);
    cr_assert_neq(ms_out_file_write(o, buf, 1), 0);
    ms_out_free(o);
    char *p = sub("x.safetensors.zst");
    cr_assert_neq(access(p, F_OK), 0);
    free(p);
}

Test(out, misuse_is_an_error_not_a_crash)
{
    struct ms_out_opts opts = {.kind = MS_OUT_DIR, .dir = tmp};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    cr_assert_eq(ms_out_file_begin(o, "a/b", 1, NULL), MS_EINVAL);
    cr_assert_eq(ms_out_file_begin(o, "..", 1, NULL), MS_EINVAL);
    cr_assert_eq(ms_out_file_write(o, "x", 1), MS_EINVAL);
    cr_assert_eq(ms_out_file_begin(o, "f", 2, NULL), 0);
    cr_assert_eq(ms_out_file_write(o, "xyz", 3), MS_EINVAL);
    cr_assert(strstr(ms_errmsg(), "'f'"), "%s", ms_errmsg());
    /* sticky */
    cr_assert_eq(ms_out_file_end(o), MS_EINVAL);
    ms_out_free(o);
    cr_assert_eq(count_partials(tmp), 0);

    cr_assert_eq(ms_out_open(&opts, &o), 0);
    cr_assert_eq(ms_out_file_begin(o, "g", 2, NULL), 0);
    cr_assert_eq(ms_out_file_write(o, "x", 1), 0);
    cr_assert_eq(ms_out_file_end(o), MS_EINVAL);
    cr_assert(strstr(ms_errmsg(), "1 of its 2 bytes"), "%s", ms_errmsg());
    ms_out_free(o);

    struct ms_out_opts bad = {.kind = MS_OUT_DIR, .dir = tmp, .zstd_level = 99};
    cr_assert_eq(ms_out_open(&bad, &o), MS_EINVAL);
    cr_assert_null(o);
}

Test(out, dir_allocation_failures_fail_cleanly)
{
    unsigned char buf[4096];
    memset(buf, 7, sizeof buf);
    for (long n = 1; n < 40; n++) {
        struct ms_out_opts opts = {.kind = MS_OUT_DIR, .dir = tmp, .zstd_level = 1};
        struct ms_out *o = NULL;
        ms_alloc_fail_after(n);
        int rc = ms_out_open(&opts, &o);
        if (rc == 0)
            rc = ms_out_file_begin(o, "f.bin", sizeof buf, NULL);
        if (rc == 0)
            rc = ms_out_file_write(o, buf, sizeof buf);
        if (rc == 0)
            rc = ms_out_file_end(o);
        if (rc == 0)
            rc = ms_out_finish(o);
        ms_alloc_fail_after(0);
        cr_assert(rc == 0 || rc == MS_ENOMEM, "n=%ld rc=%d %s", n, rc, ms_errmsg());
        ms_out_free(o);
        cr_assert_eq(count_partials(tmp), 0, "n=%ld", n);
    }
}

/* ------------------------------------------------------------------ TAR */

enum extract { X_TAR, X_TAR_ZSTD, X_ZSTD_PIPE };

static void tar_roundtrip(int level, enum extract how)
{
    struct file f[] = {
        {"config.json", 513, NULL},
        {"model-00001-of-00002.safetensors", 2000000, NULL},
        {"empty.txt", 0, NULL},
        {NULL, 1024, NULL}, /* LONG_NAME */
        {"model-00002-of-00002.safetensors", 512, NULL},
    };
    f[3].name = LONG_NAME;
    size_t n = MS_ARRAY_LEN(f);
    make_files(f, n);
    char *arc = sub("out.tar");
    int fd = open(arc, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    cr_assert(fd >= 0);
    struct ms_out_opts opts = {.kind = MS_OUT_TAR, .fd = fd, .zstd_level = level,
                               .zstd_workers = level ? 2 : 0, .mtime = 1700000000};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0, "%s", ms_errmsg());
    const char *fin[MS_ARRAY_LEN(f)];
    write_files(o, f, n, fin);
    cr_assert_eq(ms_out_finish(o), 0, "%s", ms_errmsg());
    ms_out_free(o);
    close(fd);

    char *x = sub("x");
    cr_assert_eq(mkdir(x, 0755), 0);
    char cmd[8192];
    if (how == X_TAR)
        snprintf(cmd, sizeof cmd, "tar -x -f '%s' -C '%s'", arc, x);
    else if (how == X_TAR_ZSTD)
        snprintf(cmd, sizeof cmd, "tar --zstd -x -f '%s' -C '%s'", arc, x);
    else
        snprintf(cmd, sizeof cmd, "zstd -q -d -c '%s' | tar -x -C '%s'", arc, x);
    run_ok(cmd);
    for (size_t i = 0; i < n; i++) {
        cr_assert_str_eq(fin[i], f[i].name); /* names are not changed in a tar */
        char *p = th_path(x, f[i].name);
        assert_file_is(p, f[i].data, f[i].size);
        free(p);
        free((void *)fin[i]);
    }

    /* Exactly these entries, with the fixed mtime and mode. */
    char *out = NULL;
    snprintf(cmd, sizeof cmd, "TZ=UTC %s -tv --full-time -f '%s'", level ? "tar --zstd" : "tar", arc);
    cr_assert_eq(th_run(cmd, &out, NULL), 0);
    int lines = 0;
    for (char *s = out; (s = strchr(s, '\n')) != NULL; s++)
        lines++;
    cr_assert_eq(lines, (int)n, "%s", out);
    cr_assert(strstr(out, "-rw-r--r-- root/root"), "%s", out);
    cr_assert(strstr(out, "2023-11-14 22:13:20"), "%s", out);
    cr_assert(strstr(out, LONG_NAME), "%s", out);
    free(out);
    free(x);
    free(arc);
    free_files(f, n);
}

Test(out, tar_extracts_with_gnu_tar) { tar_roundtrip(0, X_TAR); }
Test(out, tar_zstd_extracts_with_tar_zstd) { tar_roundtrip(3, X_TAR_ZSTD); }
Test(out, tar_zstd_extracts_with_zstd_pipe_tar) { tar_roundtrip(5, X_ZSTD_PIPE); }

/* Writes just the header(s) of one file of `size` bytes and returns the
 * stream bytes (the file is left unfinished). */
static unsigned char *tar_headers_for(uint64_t size, size_t *len, char **arc_out)
{
    char *arc = sub("hdr.tar");
    int fd = open(arc, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    cr_assert(fd >= 0);
    struct ms_out_opts opts = {.kind = MS_OUT_TAR, .fd = fd, .mtime = 0};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    cr_assert_eq(ms_out_file_begin(o, "big.safetensors", size, NULL), 0, "%s", ms_errmsg());
    cr_assert_eq(ms_out_file_write(o, "0123456789", 10), 0);
    ms_out_abort(o);
    ms_out_free(o);
    close(fd);
    unsigned char *b = (unsigned char *)th_read(arc, len);
    cr_assert(b);
    *arc_out = arc;
    return b;
}

Test(out, tar_size_field_over_8gib_is_base256_plus_pax)
{
    /* 9e9 = 0x2_1871_1A00: base-256 marker 0x80, then the value big-endian in
     * the remaining 11 bytes. */
    static const unsigned char want[12] = {0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x18, 0x71, 0x1a, 0x00};
    size_t len;
    char *arc;
    unsigned char *b = tar_headers_for(9000000000ull, &len, &arc);
    cr_assert_eq(len, 3 * 512 + 10);
    cr_assert_eq(b[156], 'x');                          /* pax extended header first */
    cr_assert(!memcmp(b + 512, "19 size=9000000000\n", 19)); /* 2 digits + 17 bytes = 19 */
    cr_assert_eq(b[1024 + 156], '0');
    cr_assert(!memcmp(b + 1024, "big.safetensors", 16));
    cr_assert(!memcmp(b + 1024 + 124, want, 12));
    cr_assert(!memcmp(b + 1024 + 257, "ustar\0" "00", 8));

    /* GNU tar reads the size (the archive itself is cut short on purpose). */
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "tar -tv -f '%s' 2>/dev/null; true", arc);
    th_run(cmd, &out, NULL);
    cr_assert(strstr(out, " 9000000000 ") && strstr(out, "big.safetensors"), "%s", out);
    free(out);
    free(b);
    free(arc);
}

Test(out, tar_size_field_at_8gib_minus_1_is_octal)
{
    size_t len;
    char *arc;
    unsigned char *b = tar_headers_for(8589934591ull, &len, &arc);
    cr_assert_eq(len, 512 + 10);
    cr_assert_eq(b[156], '0');
    cr_assert(!memcmp(b + 124, "77777777777", 12)); /* with its NUL */
    /* checksum: six octal digits, NUL, space; equal to the byte sum with the
     * field counted as spaces */
    unsigned sum = 0;
    for (int i = 0; i < 512; i++)
        sum += (i >= 148 && i < 156) ? ' ' : b[i];
    char ck[8];
    snprintf(ck, sizeof ck, "%06o", sum);
    cr_assert(!memcmp(b + 148, ck, 7) && b[155] == ' ');
    free(b);
    free(arc);

    b = tar_headers_for(8589934592ull, &len, &arc);
    cr_assert_eq(b[156], 'x');
    cr_assert(!memcmp(b + 512, "19 size=8589934592\n", 19));
    cr_assert_eq(b[1024 + 124], 0x80);
    free(b);
    free(arc);
}

static void tar_broken_pipe(int level)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    close(p[0]);
    struct ms_out_opts opts = {.kind = MS_OUT_TAR, .fd = p[1], .zstd_level = level};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    unsigned char *data = make_data(1 << 20);
    int rc = ms_out_file_begin(o, "model.safetensors", 1 << 20, NULL);
    if (rc == 0)
        rc = ms_out_file_write(o, data, 1 << 20);
    if (rc == 0)
        rc = ms_out_file_end(o);
    if (rc == 0)
        rc = ms_out_finish(o);
    cr_assert_eq(rc, -EPIPE, "rc %d %s", rc, ms_errmsg());
    cr_assert(strstr(ms_errmsg(), "output stream closed (broken pipe)"), "%s", ms_errmsg());
    cr_assert(strstr(ms_errmsg(), "model.safetensors"), "%s", ms_errmsg());
    ms_out_free(o);
    close(p[1]);
    free(data);
}

/* SIGPIPE left at its default action: the process must survive all the same. */
Test(out, tar_broken_pipe_is_an_error_even_with_default_sigpipe)
{
    signal(SIGPIPE, SIG_DFL);
    tar_broken_pipe(0);
    tar_broken_pipe(3);
}

/* ------------------------------------------------------------------ PIPE */

Test(out, pipe_cat_gets_each_file)
{
    signal(SIGPIPE, SIG_IGN);
    struct file f[] = {
        {"model-00001-of-00002.safetensors", 3000000, NULL},
        {"it's a file.json", 100, NULL}, /* quote and space survive the shell */
        {"empty", 0, NULL},
    };
    make_files(f, 3);
    char *cmd = ms_asprintf("printf %%s \"$MERGESTREAM_FILE\" > '%s'/{}.env && cat > '%s'/{}",
                            tmp, tmp);
    struct ms_out_opts opts = {.kind = MS_OUT_PIPE, .pipe_cmd = cmd};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0, "%s", ms_errmsg());
    const char *fin[3];
    write_files(o, f, 3, fin);
    cr_assert_eq(ms_out_finish(o), 0);
    ms_out_free(o);
    for (int i = 0; i < 3; i++) {
        cr_assert_str_eq(fin[i], f[i].name);
        char *p = sub(f[i].name);
        assert_file_is(p, f[i].data, f[i].size);
        free(p);
        char envname[300];
        snprintf(envname, sizeof envname, "%s.env", f[i].name);
        p = sub(envname);
        assert_file_is(p, f[i].name, strlen(f[i].name));
        free(p);
        free((void *)fin[i]);
    }
    ms_free(cmd);
    free_files(f, 3);
}

Test(out, pipe_zstd_each_file_compressed)
{
    signal(SIGPIPE, SIG_IGN);
    struct file f[] = {
        {"model-00001-of-00002.safetensors", 5000000, NULL},
        {"model-00002-of-00002.safetensors", 4097, NULL},
    };
    make_files(f, 2);
    char *cmd = ms_asprintf("cat > %s/{}", tmp);
    struct ms_out_opts opts = {.kind = MS_OUT_PIPE, .pipe_cmd = cmd, .zstd_level = 3,
                               .zstd_workers = 2};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    const char *fin[2];
    write_files(o, f, 2, fin);
    cr_assert_eq(ms_out_finish(o), 0);
    ms_out_free(o);
    for (int i = 0; i < 2; i++) {
        char *zp = sub(fin[i]), *rp = sub(f[i].name);
        cr_assert(strstr(fin[i], ".zst"));
        char line[8192];
        snprintf(line, sizeof line, "zstd -q -d -c '%s' > '%s'", zp, rp);
        run_ok(line);
        assert_file_is(rp, f[i].data, f[i].size);
        free(zp);
        free(rp);
        free((void *)fin[i]);
    }
    ms_free(cmd);
    free_files(f, 2);
}

/* Runs one file of n bytes through `cmd`; returns the first error. */
static int pipe_one(const char *cmd, size_t n)
{
    struct ms_out_opts opts = {.kind = MS_OUT_PIPE, .pipe_cmd = cmd};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    unsigned char *data = make_data(n);
    int rc = ms_out_file_begin(o, "model-00001-of-00002.safetensors", n, NULL);
    for (size_t at = 0; rc == 0 && at < n; at += 65536)
        rc = ms_out_file_write(o, data + at, MS_MIN((size_t)65536, n - at));
    if (rc == 0)
        rc = ms_out_file_end(o);
    if (rc == 0)
        rc = ms_out_finish(o);
    ms_out_free(o);
    free(data);
    return rc;
}

Test(out, pipe_exit_status_3_is_echild_naming_the_file)
{
    signal(SIGPIPE, SIG_IGN);
    int rc = pipe_one("cat > /dev/null; exit 3", 100000);
    cr_assert_eq(rc, MS_ECHILD);
    cr_assert(strstr(ms_errmsg(),
                     "pipe command for 'model-00001-of-00002.safetensors' failed with exit "
                     "status 3"), "%s", ms_errmsg());
    cr_assert(strstr(ms_errmsg(), "exit 3"), "command not named: %s", ms_errmsg());
}

Test(out, pipe_killed_by_signal)
{
    signal(SIGPIPE, SIG_IGN);
    int rc = pipe_one("cat > /dev/null; kill -9 $$", 1000);
    cr_assert_eq(rc, MS_ECHILD);
    cr_assert(strstr(ms_errmsg(), "was killed by signal 9"), "%s", ms_errmsg());
}

Test(out, pipe_command_exiting_early_is_a_clean_error)
{
    signal(SIGPIPE, SIG_IGN);
    int rc = pipe_one("true", 1 << 20);
    cr_log_info("%s", ms_errmsg());
    cr_assert_eq(rc, MS_ECHILD, "%d %s", rc, ms_errmsg());
    cr_assert(strstr(ms_errmsg(), "'model-00001-of-00002.safetensors'"), "%s", ms_errmsg());
    cr_assert(strstr(ms_errmsg(), "before reading all its input"), "%s", ms_errmsg());

    rc = pipe_one("head -c 1000 > /dev/null; exit 4", 1 << 20);
    cr_log_info("%s", ms_errmsg());
    cr_assert_eq(rc, MS_ECHILD);
    cr_assert(strstr(ms_errmsg(), "exit status 4"), "%s", ms_errmsg());
}

Test(out, pipe_command_exiting_early_with_default_sigpipe)
{
    signal(SIGPIPE, SIG_DFL);
    int rc = pipe_one("true", 1 << 20);
    cr_assert_eq(rc, MS_ECHILD, "%d %s", rc, ms_errmsg());
}

/* The command starts with default signal dispositions even though we ignore
 * SIGPIPE (so `yes | head` inside a --pipe command behaves). */
Test(out, pipe_command_does_not_inherit_ignored_sigpipe)
{
    signal(SIGPIPE, SIG_IGN);
    int rc = pipe_one("cat > /dev/null; grep -q '^SigIgn:.*[02468aAcCeE]...$' /proc/$$/status "
                      "|| { grep SigIgn /proc/$$/status >&2; exit 1; }",
                      10);
    cr_assert_eq(rc, 0, "%s", ms_errmsg());
}

Test(out, pipe_abort_kills_the_command)
{
    signal(SIGPIPE, SIG_IGN);
    char *marker = sub("done");
    char *cmd = ms_asprintf("sleep 20; touch '%s'", marker);
    struct ms_out_opts opts = {.kind = MS_OUT_PIPE, .pipe_cmd = cmd};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    cr_assert_eq(ms_out_file_begin(o, "f", 100, NULL), 0);
    cr_assert_eq(ms_out_file_write(o, "hello", 5), 0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ms_out_abort(o);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ms_out_abort(o);
    ms_out_free(o);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    cr_assert_lt(secs, 4.0, "abort took %.1f s", secs);
    cr_assert_neq(access(marker, F_OK), 0);
    ms_free(cmd);
    free(marker);
}

Test(out, pipe_into_rclone_rcat_local_path)
{
    signal(SIGPIPE, SIG_IGN);
    if (th_run("command -v rclone", NULL, NULL) != 0)
        cr_skip_test("rclone not installed (make deps installs it)");
    struct file f[] = {
        {"model-00001-of-00002.safetensors", 2500000, NULL},
        {"model.safetensors.index.json", 3000, NULL},
    };
    make_files(f, 2);
    char *dst = sub("remote");
    cr_assert_eq(mkdir(dst, 0755), 0);
    char *cmd = ms_asprintf("RCLONE_CONFIG=/dev/null rclone rcat -q '%s'/{}", dst);
    struct ms_out_opts opts = {.kind = MS_OUT_PIPE, .pipe_cmd = cmd};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    write_files(o, f, 2, NULL);
    cr_assert_eq(ms_out_finish(o), 0);
    ms_out_free(o);
    for (int i = 0; i < 2; i++) {
        char *p = th_path(dst, f[i].name);
        assert_file_is(p, f[i].data, f[i].size);
        free(p);
    }
    ms_free(cmd);
    free(dst);
    free_files(f, 2);
}

/* The engine's pattern: each call on whichever pool thread is free, one at a
 * time. Here every call runs on a new thread. */
struct call {
    struct ms_out *o;
    int what; /* 0 begin, 1 write, 2 end, 3 finish */
    const unsigned char *buf;
    size_t len;
    int rc;
};

static void *call_main(void *arg)
{
    struct call *c = arg;
    if (c->what == 0)
        c->rc = ms_out_file_begin(c->o, "model.safetensors", c->len, NULL);
    else if (c->what == 1)
        c->rc = ms_out_file_write(c->o, c->buf, c->len);
    else if (c->what == 2)
        c->rc = ms_out_file_end(c->o);
    else
        c->rc = ms_out_finish(c->o);
    return NULL;
}

static int call_on_thread(struct call c)
{
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, call_main, &c), 0);
    pthread_join(t, NULL);
    return c.rc;
}

Test(out, pipe_calls_from_different_threads)
{
    signal(SIGPIPE, SIG_IGN);
    size_t n = 1 << 20;
    unsigned char *data = make_data(n);
    char *cmd = ms_asprintf("cat > %s/{}", tmp);
    struct ms_out_opts opts = {.kind = MS_OUT_PIPE, .pipe_cmd = cmd, .zstd_level = 1,
                               .zstd_workers = 2};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    for (int round = 0; round < 3; round++) {
        cr_assert_eq(call_on_thread((struct call){o, 0, NULL, n, 0}), 0, "%s", ms_errmsg());
        for (size_t at = 0; at < n; at += 100000)
            cr_assert_eq(call_on_thread((struct call){o, 1, data + at, MS_MIN(n - at, 100000), 0}),
                         0);
        cr_assert_eq(call_on_thread((struct call){o, 2, NULL, 0, 0}), 0);
    }
    cr_assert_eq(call_on_thread((struct call){o, 3, NULL, 0, 0}), 0);
    ms_out_free(o);
    char *zp = sub("model.safetensors.zst"), *rp = sub("model.safetensors");
    char line[8192];
    snprintf(line, sizeof line, "zstd -q -d -c '%s' > '%s'", zp, rp);
    run_ok(line);
    assert_file_is(rp, data, n);
    free(zp);
    free(rp);
    ms_free(cmd);
    free(data);
}

/* ------------------------------------------------------------------ zsrc */

/* Random reads (forward, skipping ahead, going back) compared with raw. */
static void check_random_reads(const char *zpath, const unsigned char *raw, size_t n)
{
    struct ms_zsrc *z;
    cr_assert_eq(ms_zsrc_open(zpath, &z), 0, "%s", ms_errmsg());
    cr_assert_eq(ms_zsrc_size(z), (uint64_t)n);
    unsigned char *buf = malloc(400000);
    uint64_t pos = 0;
    for (int i = 0; i < 60; i++) {
        uint64_t r = rng_next() % 10;
        uint64_t off;
        if (r < 5)
            off = pos;                                  /* continue forward */
        else if (r < 8)
            off = pos + rng_next() % 300000;            /* skip ahead */
        else
            off = n ? rng_next() % n : 0;               /* anywhere, often back */
        if (off > n)
            off = n;
        uint64_t want = rng_next() % 400000; /* MS_MIN evaluates twice */
        size_t len = (size_t)MS_MIN(want, n - off);
        int rc = ms_zsrc_pread(z, buf, len, off);
        cr_assert_eq(rc, 0, "read %zu at %llu: %s", len, (unsigned long long)off, ms_errmsg());
        cr_assert(memcmp(buf, raw + off, len) == 0, "differs: %zu at %llu", len,
                  (unsigned long long)off);
        pos = off + len;
    }
    cr_assert_eq(ms_zsrc_pread(z, buf, 2, n - 1), MS_EIO);
    cr_assert(strstr(ms_errmsg(), zpath));
    free(buf);
    ms_zsrc_free(z);
}

Test(out, zsrc_reads_cli_ms_out_stdin_and_concatenated_files)
{
    size_t n = 3000000;
    unsigned char *raw = make_data(n);
    char *rp = sub("raw.bin");
    cr_assert_eq(th_write(rp, raw, n), 0);
    char cmd[8192];

    char *cli = sub("cli.zst"); /* one frame, content size in the header */
    snprintf(cmd, sizeof cmd, "zstd -q -c -3 '%s' > '%s'", rp, cli);
    run_ok(cmd);
    check_random_reads(cli, raw, n);

    char *in = sub("stdin.zst"); /* from a pipe: no content size, decompressed to count */
    snprintf(cmd, sizeof cmd, "cat '%s' | zstd -q -c -1 > '%s'", rp, in);
    run_ok(cmd);
    check_random_reads(in, raw, n);

    char *cat = sub("cat.zst"); /* two frames: first half, second half (and a skippable frame) */
    snprintf(cmd, sizeof cmd,
             "head -c 1000000 '%s' | zstd -q -c > '%s' && "
             "printf '\\120\\052\\115\\030\\003\\000\\000\\000abc' >> '%s' && "
             "tail -c +1000001 '%s' > '%s.2' && zstd -q -c '%s.2' >> '%s'",
             rp, cat, cat, rp, rp, rp, cat);
    run_ok(cmd);
    check_random_reads(cat, raw, n);

    /* one written by ms_out */
    struct ms_out_opts opts = {.kind = MS_OUT_DIR, .dir = tmp, .zstd_level = 2,
                               .zstd_workers = 2};
    struct ms_out *o;
    cr_assert_eq(ms_out_open(&opts, &o), 0);
    struct file f = {"ours.safetensors", n, raw};
    write_files(o, &f, 1, NULL);
    cr_assert_eq(ms_out_finish(o), 0);
    ms_out_free(o);
    char *ours = sub("ours.safetensors.zst");
    check_random_reads(ours, raw, n);

    free(ours);
    free(cat);
    free(in);
    free(cli);
    free(rp);
    free(raw);
}

Test(out, zsrc_truncated_or_garbage_is_eio_naming_the_file)
{
    size_t n = 1000000;
    unsigned char *raw = make_data(n);
    char *rp = sub("raw.bin"), *zp = sub("t.zst"), *cut = sub("cut.zst");
    cr_assert_eq(th_write(rp, raw, n), 0);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "zstd -q -c '%s' > '%s'", rp, zp);
    run_ok(cmd);
    size_t zl;
    char *z = th_read(zp, &zl);
    cr_assert(z);
    /* cut inside the header, inside a block, just before the checksum, and in
     * it; a file without content size too */
    size_t cuts[] = {3, 5, 9, 20, zl / 2, zl - 5, zl - 4, zl - 1};
    for (size_t i = 0; i < MS_ARRAY_LEN(cuts); i++) {
        cr_assert_eq(th_write(cut, z, cuts[i]), 0);
        struct ms_zsrc *s;
        int rc = ms_zsrc_open(cut, &s);
        cr_assert_eq(rc, MS_EIO, "cut at %zu: rc %d", cuts[i], rc);
        cr_assert_null(s);
        cr_assert(strstr(ms_errmsg(), cut), "%s", ms_errmsg());
    }
    snprintf(cmd, sizeof cmd, "cat '%s' | zstd -q -c | head -c 300000 > '%s'", rp, cut);
    run_ok(cmd);
    struct ms_zsrc *s;
    cr_assert_eq(ms_zsrc_open(cut, &s), MS_EIO);
    cr_assert(strstr(ms_errmsg(), cut));

    cr_assert_eq(th_write(cut, "not zstd at all", 15), 0);
    cr_assert_eq(ms_zsrc_open(cut, &s), MS_EIO);
    cr_assert(strstr(ms_errmsg(), "not zstd"), "%s", ms_errmsg());

    /* corrupt payload (header intact): an error from the read, not a crash */
    memset(z + zl / 2, 0x55, 64);
    cr_assert_eq(th_write(cut, z, zl), 0);
    if (ms_zsrc_open(cut, &s) == 0) {
        unsigned char *buf = malloc(n);
        int rc = ms_zsrc_pread(s, buf, n, 0);
        cr_assert(rc == MS_EIO, "rc %d", rc);
        cr_assert(strstr(ms_errmsg(), cut));
        free(buf);
        ms_zsrc_free(s);
    }
    free(z);
    free(rp);
    free(zp);
    free(cut);
    free(raw);
}
