/*
 * test_base.c - the base/ helpers: error names, the string buffer (growth and
 * allocation failure), UTF-8 decoding, byte counts, size parsing, shape
 * element counts and the atomic file commit. Expected values are worked out
 * by hand.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>
#include <zstd.h>

#include "ms_common.h"
#include "ms_file.h"
#include "ms_str.h"
#include "th.h"

static char *g_dir;

static void setup(void) { g_dir = th_tmpdir(); }
static void teardown(void)
{
    ms_alloc_fail_after(0);
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(base, .init = setup, .fini = teardown);

/* ------------------------------------------------------------------ errors */

Test(base, strerror_names_our_codes_and_libuvs_as_libuv_does)
{
    cr_assert_str_eq(ms_strerror(MS_OK), "ok");
    cr_assert_str_eq(ms_strerror(MS_ENOMEM), "out of memory");
    cr_assert_str_eq(ms_strerror(MS_EST_INDEX), "safetensors: index does not match shards");
    cr_assert_str_eq(ms_strerror(-ENOENT), "no such file or directory");
    cr_assert_str_eq(ms_strerror(UV_EOF), "end of file");
    cr_assert_str_eq(ms_strerror(-4000), "Unknown system error -4000");
    cr_assert_str_eq(ms_strerror(1), "unknown error");
    cr_assert_str_eq(ms_strerror(-4096), "unknown error");
    cr_assert_str_eq(ms_strerror(-5999), "unknown error");
    /* Every code ms_strerror hands to its libuv table reads as libuv words it. */
    char uv[128];
    for (int code = -4095; code <= -1; code++) {
        uv_strerror_r(code, uv, sizeof uv);
        cr_assert_str_eq(ms_strerror(code), uv, "code %d", code);
    }
}

Test(base, error_prefix_adds_context)
{
    ms_error(MS_EIO, "short read");
    cr_assert_eq(ms_error_prefix(MS_EIO, "%s", "a.safetensors"), MS_EIO);
    cr_assert_str_eq(ms_errmsg(), "a.safetensors: short read");
    ms_error_clear();
    ms_error_prefix(-ENOENT, "b");
    cr_assert_str_eq(ms_errmsg(), "b: no such file or directory");
}

/* ------------------------------------------------------------------ string buffer */

Test(base, strbuf_grows_by_doubling_and_keeps_a_nul)
{
    struct ms_strbuf b = { 0 };
    cr_assert_null(b.p);
    for (int i = 0; i < 100; i++)
        ms_strbuf_addstr(&b, "abc");
    cr_assert(!b.oom);
    cr_assert_eq(b.len, 300);
    cr_assert_eq(b.cap, 512); /* 256, then doubled once */
    cr_assert_eq(strlen(b.p), 300);
    cr_assert_eq(memcmp(b.p + 297, "abc", 4), 0);

    ms_strbuf_add(&b, "x\0y", 3); /* bytes, NUL included */
    cr_assert_eq(b.len, 303);
    cr_assert_eq(memcmp(b.p + 300, "x\0y", 4), 0);

    ms_strbuf_addf(&b, "[%d:%s]", 42, "z");
    cr_assert_eq(b.len, 309);
    cr_assert_str_eq(b.p + 303, "[42:z]");

    /* Longer than the free room: formatted again after growing. */
    ms_strbuf_addf(&b, "%0*d", 1000, 7);
    cr_assert_eq(b.len, 1309);
    cr_assert_eq(b.cap, 2048);
    cr_assert_eq(b.p[308 + 1000], '7');
    cr_assert_eq(b.p[1309], 0);

    ms_strbuf_reset(&b);
    cr_assert_eq(b.len, 0);
    cr_assert_str_eq(b.p, "");
    cr_assert_eq(b.cap, 2048);
    ms_strbuf_fini(&b);
    cr_assert_null(b.p);
    cr_assert_eq(b.len + b.cap, 0);
}

Test(base, strbuf_first_add_allocates_even_when_empty)
{
    struct ms_strbuf b = { 0 };
    ms_strbuf_add(&b, "", 0);
    cr_assert_not_null(b.p);
    cr_assert_str_eq(b.p, "");
    cr_assert_eq(b.cap, 256);
    ms_strbuf_fini(&b);

    ms_strbuf_addf(&b, "%s", ""); /* also from NULL, through addf */
    cr_assert_not_null(b.p);
    cr_assert_eq(b.len, 0);
    ms_strbuf_fini(&b);
}

Test(base, strbuf_allocation_failure_sticks)
{
    struct ms_strbuf b = { 0 };
    ms_alloc_fail_after(1);
    ms_strbuf_addstr(&b, "abc");
    ms_alloc_fail_after(0);
    cr_assert(b.oom);
    cr_assert_null(b.p);
    ms_strbuf_addstr(&b, "def"); /* allocation works again; the buffer stays failed */
    cr_assert(b.oom);
    cr_assert_null(b.p);
    ms_strbuf_fini(&b);
    cr_assert(!b.oom);

    /* Failing to grow keeps what was there, terminated. */
    char fill[201];
    memset(fill, 'a', 200);
    fill[200] = 0;
    ms_strbuf_addstr(&b, fill);
    ms_alloc_fail_after(1);
    ms_strbuf_addf(&b, "%s", fill); /* writes 55 bytes into the room, then cannot grow */
    ms_alloc_fail_after(0);
    cr_assert(b.oom);
    cr_assert_eq(b.len, 200);
    cr_assert_eq(b.cap, 256);
    cr_assert_eq(strlen(b.p), 200);
    ms_strbuf_add(&b, "b", 1);
    cr_assert_eq(b.len, 200);
    ms_strbuf_fini(&b);
}

/* ------------------------------------------------------------------ UTF-8 */

struct utf8_case {
    const char *bytes;
    size_t len;
    size_t want_len; /* 0: invalid */
    uint32_t want_cp;
};

Test(base, utf8_decode_valid_sequences)
{
    static const struct utf8_case cases[] = {
        { "A", 1, 1, 0x41 },
        { "\x7f", 1, 1, 0x7f },
        { "\xc2\x80", 2, 2, 0x80 }, /* smallest two-byte */
        { "\xc3\xa9", 2, 2, 0xe9 }, /* e acute */
        { "\xdf\xbf", 2, 2, 0x7ff },
        { "\xe0\xa0\x80", 3, 3, 0x800 },  /* smallest three-byte */
        { "\xe2\x82\xac", 3, 3, 0x20ac }, /* euro sign */
        { "\xed\x9f\xbf", 3, 3, 0xd7ff }, /* just below the surrogates */
        { "\xee\x80\x80", 3, 3, 0xe000 }, /* just above them */
        { "\xef\xbf\xbf", 3, 3, 0xffff },
        { "\xf0\x90\x80\x80", 4, 4, 0x10000 },  /* smallest four-byte */
        { "\xf0\x9f\x98\x80", 4, 4, 0x1f600 },  /* grinning face */
        { "\xf4\x8f\xbf\xbf", 4, 4, 0x10ffff }, /* largest code point */
        { "\xc3\xa9zz", 4, 2, 0xe9 },           /* stops after one sequence */
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(cases); i++) {
        uint32_t cp = 0xdeadbeef;
        size_t n = ms_utf8_decode((const unsigned char *)cases[i].bytes, cases[i].len, &cp);
        cr_assert_eq(n, cases[i].want_len, "case %zu", i);
        cr_assert_eq(cp, cases[i].want_cp, "case %zu: U+%04X", i, (unsigned)cp);
    }
}

Test(base, utf8_decode_rejects_what_rust_rejects)
{
    static const struct utf8_case cases[] = {
        { "\x80", 1, 0, 0 }, /* continuation byte first */
        { "\xbf", 1, 0, 0 },
        { "\xc0\x80", 2, 0, 0 },         /* overlong NUL */
        { "\xc1\xbf", 2, 0, 0 },         /* overlong U+007F */
        { "\xe0\x80\x80", 3, 0, 0 },     /* overlong three-byte */
        { "\xe0\x9f\xbf", 3, 0, 0 },     /* overlong U+07FF */
        { "\xed\xa0\x80", 3, 0, 0 },     /* U+D800, a surrogate */
        { "\xed\xbf\xbf", 3, 0, 0 },     /* U+DFFF */
        { "\xf0\x80\x80\x80", 4, 0, 0 }, /* overlong four-byte */
        { "\xf0\x8f\xbf\xbf", 4, 0, 0 }, /* overlong U+FFFF */
        { "\xf4\x90\x80\x80", 4, 0, 0 }, /* U+110000 */
        { "\xf5\x80\x80\x80", 4, 0, 0 }, /* lead bytes F5..FF never occur */
        { "\xff", 1, 0, 0 },
        { "\xc3", 1, 0, 0 }, /* cut short */
        { "\xe2\x82", 2, 0, 0 },
        { "\xf0\x9f\x98", 3, 0, 0 },
        { "\xc3\x28", 2, 0, 0 }, /* second byte not a continuation */
        { "\xe2\x28\xac", 3, 0, 0 },
        { "\xe2\x82\x28", 3, 0, 0 }, /* third byte not a continuation */
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(cases); i++) {
        uint32_t cp = 0xdeadbeef;
        size_t n = ms_utf8_decode((const unsigned char *)cases[i].bytes, cases[i].len, &cp);
        cr_assert_eq(n, 0, "case %zu: accepted as %zu bytes", i, n);
        cr_assert_eq(cp, 0xdeadbeef, "case %zu: *cp written", i);
    }
}

Test(base, utf8_invalid_at_and_prefix)
{
    cr_assert_eq(ms_utf8_invalid_at("", 0), 0);
    cr_assert_eq(ms_utf8_invalid_at("ab\xc3\xa9", 4), 4);
    cr_assert_eq(ms_utf8_invalid_at("ab\xc3\xa9\377cd", 7), 4); /* \377: 0xff */
    cr_assert_eq(ms_utf8_invalid_at("ab\xe2\x82", 4), 2);       /* cut short at the end */

    /* 'a', e acute (2 bytes), euro (3 bytes): 6 bytes */
    const char *s = "a\xc3\xa9\xe2\x82\xac";
    cr_assert_eq(ms_utf8_prefix(s, 100), 6);
    cr_assert_eq(ms_utf8_prefix(s, 6), 6);
    cr_assert_eq(ms_utf8_prefix(s, 5), 3); /* would cut the euro sign */
    cr_assert_eq(ms_utf8_prefix(s, 4), 3);
    cr_assert_eq(ms_utf8_prefix(s, 3), 3);
    cr_assert_eq(ms_utf8_prefix(s, 2), 1); /* would cut e acute */
    cr_assert_eq(ms_utf8_prefix(s, 0), 0);
}

/* ------------------------------------------------------------------ byte counts */

Test(base, fmt_bytes_styles)
{
    static const struct {
        double bytes;
        enum ms_bytes_style style;
        const char *want;
    } cases[] = {
        { 0, MS_BYTES_SI, "0 B" },
        { 999, MS_BYTES_SI, "999 B" },
        { 1000, MS_BYTES_SI, "1.00 kB" },
        { 1234567, MS_BYTES_SI, "1.23 MB" }, /* 1.234567 */
        { 20e9, MS_BYTES_SI, "20.00 GB" },
        { 3e18, MS_BYTES_SI, "3000.00 PB" }, /* no unit above PB */
        { 1023, MS_BYTES_IEC, "1023 B" },
        { 1024, MS_BYTES_IEC, "1.0 KiB" },
        { 1536, MS_BYTES_IEC, "1.5 KiB" },
        { 536870912, MS_BYTES_IEC, "512.0 MiB" },  /* 2^29 */
        { 8589934592.0, MS_BYTES_IEC, "8.0 GiB" }, /* 2^33 */
        { 999.4, MS_BYTES_PROGRESS, "999 B" },     /* a rate: rounded */
        { 999.6, MS_BYTES_PROGRESS, "1000 B" },    /* below 1000, so still bytes */
        { 1500, MS_BYTES_PROGRESS, "1.50 KB" },
        { 2.5e12, MS_BYTES_PROGRESS, "2.50 TB" },
        { 5e15, MS_BYTES_PROGRESS, "5000.00 TB" }, /* no unit above TB */
    };
    char buf[32];
    for (size_t i = 0; i < MS_ARRAY_LEN(cases); i++) {
        const char *got = ms_fmt_bytes(buf, sizeof buf, cases[i].bytes, cases[i].style);
        cr_assert_eq(got, buf);
        cr_assert_str_eq(buf, cases[i].want, "case %zu", i);
    }
    char small[4];
    cr_assert_str_eq(ms_fmt_bytes(small, sizeof small, 1234567, MS_BYTES_SI), "1.2");
}

/* ------------------------------------------------------------------ numbers */

Test(base, parse_size_suffixes)
{
    static const struct {
        const char *s;
        bool binary;
        uint64_t want;
    } ok[] = {
        { "0", false, 0 },
        { "123", true, 123 },
        { "64M", false, 64000000 },
        { "64M", true, 64ull << 20 },
        { "2KiB", false, 2048 }, /* an explicit binary suffix wins */
        { "2kib", false, 2048 },
        { "3g", true, 3ull << 30 },
        { "7B", false, 7000000000ull }, /* mergekit: B is a billion */
        { "7B", true, 7ull << 30 },
        { "1T", false, 1000000000000ull },
        { "10000000000000000000", false, 10000000000000000000ull },
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(ok); i++) {
        uint64_t v = 0;
        cr_assert_eq(ms_parse_size(ok[i].s, ok[i].binary, &v), 0, "%s: %s", ok[i].s, ms_errmsg());
        cr_assert_eq(v, ok[i].want, "%s", ok[i].s);
    }
    static const char *const bad[] = {
        "", "M", "-1", "1x", "1MB", "1BiB", "1 M", "18446744073709551616", "16777216TiB",
    };
    for (size_t i = 0; i < MS_ARRAY_LEN(bad); i++) {
        uint64_t v = 99;
        cr_assert_eq(ms_parse_size(bad[i], false, &v), MS_EINVAL, "'%s'", bad[i]);
        cr_assert_eq(v, 99);
        cr_assert_neq(strstr(ms_errmsg(), bad[i]), NULL, "%s", ms_errmsg());
    }
}

Test(base, shape_numel_counts_and_overflows)
{
    uint64_t n = 0;
    const int64_t s234[] = { 2, 3, 4 };
    cr_assert(ms_shape_numel(s234, 3, &n));
    cr_assert_eq(n, 24);
    cr_assert(ms_shape_numel(NULL, 0, &n)); /* a scalar */
    cr_assert_eq(n, 1);
    const int64_t zero[] = { 0, INT64_MAX, INT64_MAX };
    cr_assert(ms_shape_numel(zero, 3, &n));
    cr_assert_eq(n, 0);
    const int64_t big[] = { 1ll << 32, 1ll << 32 }; /* 2^64 */
    cr_assert(!ms_shape_numel(big, 2, &n));
    const int64_t neg[] = { 2, -1 };
    cr_assert(!ms_shape_numel(neg, 2, &n));
}

/* ------------------------------------------------------------------ file commit */

/* Creates path holding text; returns the open descriptor. */
static int write_tmp(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    cr_assert_geq(fd, 0, "%s: %s", path, strerror(errno));
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    return fd;
}

Test(base, file_commit_puts_the_file_in_place)
{
    char *tmp = th_path(g_dir, "f.tmp");
    char *final = th_path(g_dir, "f");
    int fd = write_tmp(tmp, "hello");
    enum ms_file_step step = 0;
    cr_assert_eq(ms_file_commit(fd, tmp, final, g_dir, &step), 0, "%s", ms_errmsg());
    cr_assert_eq(step, 0); /* untouched on success */
    cr_assert_neq(access(tmp, F_OK), 0);
    size_t len;
    char *got = th_read(final, &len);
    cr_assert_not_null(got);
    cr_assert_eq(len, 5);
    cr_assert_str_eq(got, "hello");
    free(got);

    /* Without a directory sync, over an existing file. */
    fd = write_tmp(tmp, "again");
    cr_assert_eq(ms_file_commit(fd, tmp, final, NULL, NULL), 0, "%s", ms_errmsg());
    got = th_read(final, &len);
    cr_assert_str_eq(got, "again");
    free(got);
    free(final);
    free(tmp);
}

Test(base, file_commit_rename_into_a_missing_directory_leaves_nothing)
{
    char *tmp = th_path(g_dir, "f.tmp");
    char *final = th_path(g_dir, "missing/f");
    int fd = write_tmp(tmp, "hello");
    enum ms_file_step step = 0;
    int rc = ms_file_commit(fd, tmp, final, NULL, &step);
    cr_assert_eq(rc, -ENOENT);
    cr_assert_eq(step, MS_FILE_STEP_RENAME);
    cr_assert_neq(access(tmp, F_OK), 0, "temporary left behind");
    cr_assert_neq(access(final, F_OK), 0);
    char want[1024];
    snprintf(want, sizeof want, "%s: rename failed: %s", final, strerror(ENOENT));
    cr_assert_str_eq(ms_errmsg(), want);
    free(final);
    free(tmp);
}

Test(base, file_commit_failed_directory_sync_removes_the_file)
{
    char *tmp = th_path(g_dir, "f.tmp");
    char *final = th_path(g_dir, "f");
    char *nodir = th_path(g_dir, "nodir");
    int fd = write_tmp(tmp, "hello");
    enum ms_file_step step = 0;
    int rc = ms_file_commit(fd, tmp, final, nodir, &step);
    cr_assert_eq(rc, -ENOENT);
    cr_assert_eq(step, MS_FILE_STEP_SYNC_DIR);
    cr_assert_neq(access(final, F_OK), 0, "final file left behind");
    cr_assert_neq(access(tmp, F_OK), 0);
    char want[1024];
    snprintf(want, sizeof want, "%s: cannot sync directory %s: %s", final, nodir, strerror(ENOENT));
    cr_assert_str_eq(ms_errmsg(), want);
    free(nodir);
    free(final);
    free(tmp);
}

Test(base, file_commit_fsync_failure_closes_and_removes)
{
    char *tmp = th_path(g_dir, "f.tmp");
    char *final = th_path(g_dir, "f");
    close(write_tmp(tmp, "hello"));
    int p[2];
    cr_assert_eq(pipe(p), 0);
    enum ms_file_step step = 0;
    int rc = ms_file_commit(p[1], tmp, final, NULL, &step); /* a pipe cannot be fsynced */
    cr_assert_eq(rc, -EINVAL);
    cr_assert_eq(step, MS_FILE_STEP_FSYNC);
    cr_assert_neq(access(tmp, F_OK), 0);
    cr_assert_neq(access(final, F_OK), 0);
    cr_assert_lt(fcntl(p[1], F_GETFD), 0, "descriptor still open");
    close(p[0]);
    free(final);
    free(tmp);
}

/* Edit distances counted by hand: normalise -> normalize (1 substitution),
 * nomalize (1 insertion), densty (1 insertion), desnity (1 swap), wieght (1 swap). */
Test(base, str_closest_names_the_nearest_candidate)
{
    static const char *const c[] = { "weight", "density", "normalize", "rescale", "t" };
    cr_assert_str_eq(ms_str_closest("normalise", c, 5), "normalize");
    cr_assert_str_eq(ms_str_closest("nomalize", c, 5), "normalize");
    cr_assert_str_eq(ms_str_closest("densty", c, 5), "density");
    cr_assert_str_eq(ms_str_closest("desnity", c, 5), "density");
    cr_assert_str_eq(ms_str_closest("wieght", c, 5), "weight");
    cr_assert_str_eq(ms_str_closest("T", c, 5), "t");
    cr_assert_null(ms_str_closest("bogus", c, 5), "5 letters: at most 2 edits");
    cr_assert_null(ms_str_closest("xy", c, 5), "2 letters: at most 1 edit (t needs 2)");
    cr_assert_null(ms_str_closest("density", c, 0));
}

/* ms_str_escape: expected strings written out by hand from its contract. */
static void check_escape(const char *in, const char *want)
{
    struct ms_strbuf b = { 0 };
    ms_str_escape(&b, in);
    ms_strbuf_addstr(&b, "");
    cr_assert(!b.oom);
    cr_assert_str_eq(b.p, want);
    cr_assert_eq(ms_str_needs_escape(in), strcmp(in, want) != 0, "%s", want);
    ms_strbuf_fini(&b);
}

Test(base, str_escape_makes_controls_inert)
{
    check_escape("", "");
    check_escape("model.layers.0.weight", "model.layers.0.weight");
    check_escape("a\nmergestream: x", "a\\nmergestream: x");
    check_escape("\r\t", "\\r\\t");
    check_escape("\x1b[31m", "\\x1B[31m");
    check_escape("\x01\x1f\x7f", "\\x01\\x1F\\x7F");
    check_escape("caf\xc3\xa9 \xe2\x82\xac", "caf\xc3\xa9 \xe2\x82\xac"); /* é, €: kept */
    check_escape("\xc2\x9b" "2J", "\\xC2\\x9B2J");                      /* U+009B (CSI) */
    check_escape("\xff" "a\xc3", "\\xFFa\\xC3");                        /* not UTF-8 */
}

/* ms_file_create: a planted symlink is replaced, its target untouched. */
Test(base, file_create_does_not_follow_a_symlink)
{
    char *dir = th_tmpdir();
    char *victim = th_path(dir, "victim"), *tmp = th_path(dir, "x.tmp");
    cr_assert_eq(th_write(victim, "keep", 4), 0);
    cr_assert_eq(symlink(victim, tmp), 0);
    int fd = ms_file_create(tmp, 0644);
    cr_assert(fd >= 0, "%s", strerror(-fd));
    cr_assert_eq(write(fd, "new", 3), 3);
    close(fd);
    size_t len = 0;
    char *v = th_read(victim, &len);
    cr_assert(v && len == 4 && !memcmp(v, "keep", 4));
    free(v);
    v = th_read(tmp, &len);
    cr_assert(v && len == 3 && !memcmp(v, "new", 3));
    free(v);
    th_rmtree(dir);
    free(tmp);
    free(victim);
    free(dir);
}

static uint64_t xxh(const void *p, size_t n)
{
    struct ms_xxh64 h;
    ms_xxh64_init(&h);
    ms_xxh64_update(&h, p, n);
    return ms_xxh64_digest(&h);
}

/* XXH64: the published vectors for "" and "abc" (xxHash's README / test suite),
 * and, for lengths around every path of the algorithm, the low 32 bits zstd
 * stores as a frame's content checksum (its format spec: XXH64, seed 0). */
Test(base, xxh64_matches_published_vectors_and_zstd)
{
    cr_assert_eq(xxh("", 0), 0xEF46DB3751D8E999ull);
    cr_assert_eq(xxh("abc", 3), 0x44BC2CF5AD770999ull);
    static unsigned char data[1000];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (unsigned char)(i * 131 + 7);
    static const size_t lens[] = { 1, 3, 4, 7, 8, 15, 31, 32, 33, 63, 64, 100, 999, 1000 };
    for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
        size_t n = lens[k];
        unsigned char z[2048];
        ZSTD_CCtx *c = ZSTD_createCCtx();
        ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1);
        size_t zn = ZSTD_compress2(c, z, sizeof z, data, n);
        ZSTD_freeCCtx(c);
        cr_assert(!ZSTD_isError(zn) && zn > 4);
        uint32_t want = (uint32_t)z[zn - 4] | (uint32_t)z[zn - 3] << 8 |
                        (uint32_t)z[zn - 2] << 16 | (uint32_t)z[zn - 1] << 24;
        cr_assert_eq((uint32_t)xxh(data, n), want, "length %zu", n);
        /* Split anywhere: the same digest. */
        struct ms_xxh64 h;
        ms_xxh64_init(&h);
        for (size_t i = 0; i < n; i += 5)
            ms_xxh64_update(&h, data + i, MS_MIN(5, n - i));
        cr_assert_eq(ms_xxh64_digest(&h), xxh(data, n), "length %zu split", n);
    }
}
