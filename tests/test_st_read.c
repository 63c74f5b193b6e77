/*
 * test_st_read.c - safetensors header validation (every rule of
 * peers-and-formats.md 5.2 with its own code) and model opening (5.3).
 * Every file is built as bytes here; no blobs are committed.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ms_common.h"
#include "ms_safetensors.h"
#include "th.h"

static char *g_dir;

static void setup(void) { g_dir = th_tmpdir(); }
static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(st_read, .init = setup, .fini = teardown);
TestSuite(st_model, .init = setup, .fini = teardown);

/* Writes an 8-byte LE length n, then `hlen` header bytes, then `dlen` data bytes
 * (value i & 0xff) to dir/name; returns the path (free). */
static char *put_raw(const char *dir, const char *name, uint64_t n, const char *hdr, size_t hlen,
                     size_t dlen)
{
    char *path = th_path(dir, name);
    size_t total = 8 + hlen + dlen;
    unsigned char *b = malloc(total);
    cr_assert(b);
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(n >> (8 * i));
    memcpy(b + 8, hdr, hlen);
    for (size_t i = 0; i < dlen; i++)
        b[8 + hlen + i] = (unsigned char)i;
    cr_assert_eq(th_write(path, b, total), 0);
    free(b);
    return path;
}

/* A well-formed prefix for the JSON header hdr, followed by dlen data bytes. */
static char *put_st(const char *dir, const char *name, const char *hdr, size_t dlen)
{
    return put_raw(dir, name, strlen(hdr), hdr, strlen(hdr), dlen);
}

/* Opens path and expects code, with the file name and every needle (may be NULL)
 * in the message. */
static void expect_fail(const char *path, int code, const char *needle1, const char *needle2)
{
    struct ms_st_file *f = (void *)1;
    ms_error_clear();
    int rc = ms_st_open(path, &f);
    const char *msg = ms_errmsg();
    cr_assert_eq(rc, code, "%s: expected %d (%s), got %d (%s): %s", path, code, ms_strerror(code),
                 rc, ms_strerror(rc), msg);
    cr_assert_null(f);
    cr_assert(strstr(msg, path), "message does not name the file: %s", msg);
    if (needle1)
        cr_assert(strstr(msg, needle1), "message lacks '%s': %s", needle1, msg);
    if (needle2)
        cr_assert(strstr(msg, needle2), "message lacks '%s': %s", needle2, msg);
    cr_assert(!strchr(msg, '\n'), "message is not one line: %s", msg);
}

/* Writes the header and expects the code. */
static void hdr_fail(const char *hdr, size_t dlen, int code, const char *n1, const char *n2)
{
    char *p = put_st(g_dir, "m.safetensors", hdr, dlen);
    expect_fail(p, code, n1, n2);
    free(p);
}

#define F32_A "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}"

/* ------------------------------------------------------------------ length rules */

Test(st_read, too_small)
{
    char *p = th_path(g_dir, "m.safetensors");
    cr_assert_eq(th_write(p, "\x02\0\0\0\0", 5), 0);
    expect_fail(p, MS_EST_TOOSMALL, "5 bytes", NULL);
    cr_assert_eq(th_write(p, "", 0), 0);
    expect_fail(p, MS_EST_TOOSMALL, NULL, NULL);
    free(p);
}

Test(st_read, too_large)
{
    char *p = put_raw(g_dir, "m.safetensors", 100000001ull, "{}", 2, 0);
    expect_fail(p, MS_EST_TOOLARGE, "100000001", NULL);
    free(p);
    p = put_raw(g_dir, "m.safetensors", UINT64_MAX, "{}", 2, 0);
    expect_fail(p, MS_EST_TOOLARGE, NULL, NULL);
    free(p);
}

Test(st_read, header_past_eof)
{
    char *p = put_raw(g_dir, "m.safetensors", 100, "{}", 2, 0);
    expect_fail(p, MS_EST_HDRLEN, "100", NULL);
    free(p);
}

/* ------------------------------------------------------------------ text rules */

Test(st_read, not_utf8)
{
    hdr_fail("{\"a\xff\":{}}", 0, MS_EST_UTF8, "utf-8", NULL);
    hdr_fail("{\"\xc0\xaf\":{}}", 0, MS_EST_UTF8, NULL, NULL);     /* overlong */
    hdr_fail("{\"\xed\xa0\x80\":{}}", 0, MS_EST_UTF8, NULL, NULL); /* surrogate */
}

Test(st_read, not_json)
{
    hdr_fail("{\"a\":", 0, MS_EST_JSON, "json", NULL);
    hdr_fail("{} x", 0, MS_EST_JSON, NULL, NULL);
    hdr_fail("[]", 0, MS_EST_JSON, "not a json object", NULL);
    hdr_fail("  ", 0, MS_EST_JSON, NULL, NULL);
}

/* ------------------------------------------------------------------ schema */

Test(st_read, schema)
{
    hdr_fail("{\"a\":1}", 0, MS_EST_SCHEMA, "'a'", "not an object");
    hdr_fail("{\"a\":{\"shape\":[],\"data_offsets\":[0,4]}}", 4, MS_EST_SCHEMA, "'a'", "dtype");
    hdr_fail("{\"a\":{\"dtype\":7,\"shape\":[],\"data_offsets\":[0,4]}}", 4, MS_EST_SCHEMA, "'a'",
             "dtype");
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, MS_EST_SCHEMA, "'a'", "shape");
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,4]}}", 4, MS_EST_SCHEMA,
             "'a'", "shape");
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, MS_EST_SCHEMA,
             "'a'", "shape[0]");
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 4,
             MS_EST_SCHEMA, "'a'", "shape[0]");
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
             MS_EST_SCHEMA, "'a'", "9 dimensions");
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, MS_EST_SCHEMA, "'a'", "data_offsets");
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 4,
             MS_EST_SCHEMA, "'a'", "data_offsets");
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4,
             MS_EST_SCHEMA, "'a'", "data_offsets");
}

Test(st_read, unknown_dtype)
{
    hdr_fail("{\"a\":{\"dtype\":\"F17\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, MS_EST_DTYPE,
             "'a'", "'F17'");
    hdr_fail("{\"a\":{\"dtype\":\"bf16\",\"shape\":[1],\"data_offsets\":[0,2]}}", 2, MS_EST_DTYPE,
             "'a'", "'bf16'");
}

/* ------------------------------------------------------------------ offsets and sizes */

Test(st_read, offsets)
{
    /* the first tensor does not start at 0 */
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, MS_EST_OFFSET,
             "'a'", "begin at 0");
    /* gap */
    hdr_fail("{" F32_A ",\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[20,24]}}", 24,
             MS_EST_OFFSET, "'b'", "gap");
    /* overlap */
    hdr_fail("{" F32_A ",\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", 16,
             MS_EST_OFFSET, "'b'", "overlap");
    /* end before begin */
    hdr_fail("{" F32_A ",\"b\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,12]}}", 16,
             MS_EST_OFFSET, "'b'", "end before begin");
}

Test(st_read, overflow)
{
    /* shape product overflows u64 */
    hdr_fail("{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}",
             0, MS_EST_OVERFLOW, "'a'", "overflows");
    /* numel fits, bits do not */
    hdr_fail("{\"a\":{\"dtype\":\"F64\",\"shape\":[2305843009213693952],\"data_offsets\":[0,0]}}",
             0, MS_EST_OVERFLOW, "'a'", "F64");
}

Test(st_read, misaligned)
{
    hdr_fail("{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,1]}}", 1,
             MS_EST_MISALIGNED, "'a'", "12 bits");
    hdr_fail("{\"a\":{\"dtype\":\"F6_E2M3\",\"shape\":[2],\"data_offsets\":[0,1]}}", 1,
             MS_EST_MISALIGNED, "'a'", NULL);
}

Test(st_read, info)
{
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,6]}}", 6, MS_EST_INFO,
             "tensor 'a': data_offsets [0, 6] do not match shape [2, 2] x F32 (16 bytes)", NULL);
}

Test(st_read, incomplete)
{
    hdr_fail("{" F32_A "}", 17, MS_EST_INCOMPLETE, "1 trailing byte", NULL);
    hdr_fail("{" F32_A "}", 15, MS_EST_INCOMPLETE, "truncated", NULL);
    hdr_fail("{}", 3, MS_EST_INCOMPLETE, "3 trailing", NULL);
}

Test(st_read, metadata)
{
    hdr_fail("{\"__metadata__\":[]}", 0, MS_EST_METADATA, "__metadata__", NULL);
    hdr_fail("{\"__metadata__\":{\"format\":\"pt\",\"n\":1}}", 0, MS_EST_METADATA, "'n'", NULL);
    hdr_fail("{\"__metadata__\":{\"x\":null}," F32_A "}", 16, MS_EST_METADATA, "'x'", NULL);
}

Test(st_read, duplicate)
{
    hdr_fail("{" F32_A "," F32_A "}", 16, MS_EST_DUPLICATE, "tensor 'a'", NULL);
    /* the name as written is decoded for the message */
    hdr_fail("{\"x\\\"y\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
             "\"x\\u0022y\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
             0, MS_EST_DUPLICATE, "tensor 'x\"y'", NULL);
    hdr_fail("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
             16, MS_EST_DUPLICATE, "'dtype'", NULL);
}

Test(st_read, io_errors)
{
    char *p = th_path(g_dir, "absent.safetensors");
    struct ms_st_file *f = NULL;
    int rc = ms_st_open(p, &f);
    cr_assert(rc < 0 && rc > -4096, "expected an errno code, got %d", rc);
    cr_assert(strstr(ms_errmsg(), p));
    rc = ms_st_open(g_dir, &f); /* a directory */
    cr_assert(rc < 0);
    cr_assert(strstr(ms_errmsg(), g_dir));
    free(p);
}

/* ------------------------------------------------------------------ valid files */

static struct ms_st_file *open_ok(const char *path)
{
    struct ms_st_file *f = NULL;
    int rc = ms_st_open(path, &f);
    cr_assert_eq(rc, 0, "%s: %s", path, ms_errmsg());
    cr_assert_not_null(f);
    return f;
}

Test(st_read, valid_basic)
{
    char *p = put_st(g_dir, "m.safetensors",
                     "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"x\"},"
                     "\"b\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[16,28]}," F32_A
                     "}",
                     28);
    struct ms_st_file *f = open_ok(p);
    cr_assert_str_eq(f->path, p);
    cr_assert_eq(f->ntensors, 2);
    cr_assert_str_eq(f->format, "pt");
    cr_assert_eq(f->file_size, f->data_start + 28);
    cr_assert_eq(f->data_start, 8 + f->header_len);
    /* sorted by begin */
    cr_assert_str_eq(f->tensors[0].name, "a");
    cr_assert_eq(f->tensors[0].dtype, MS_DT_F32);
    cr_assert_eq(f->tensors[0].numel, 4);
    cr_assert_str_eq(f->tensors[1].name, "b");
    cr_assert_eq(f->tensors[1].dtype, MS_DT_BF16);
    cr_assert_eq(f->tensors[1].ndim, 2);
    cr_assert_eq(f->tensors[1].shape[0], 2);
    cr_assert_eq(f->tensors[1].shape[1], 3);
    cr_assert_eq(f->tensors[1].begin, 16);
    cr_assert_eq(f->tensors[1].end, 28);
    cr_assert_eq(ms_st_find(f, "b"), &f->tensors[1]);
    cr_assert_null(ms_st_find(f, "c"));
    ms_st_free(f);
    free(p);
}

Test(st_read, valid_empty_scalar_whitespace)
{
    /* Empty tensors share offsets, one sits where a real tensor starts; a scalar;
     * leading and trailing JSON whitespace; no metadata. */
    const char *h = "\t\n {\"z\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
                    "\"e1\":{\"dtype\":\"F16\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
                    "\"e0\":{\"dtype\":\"I8\",\"shape\":[5,0],\"data_offsets\":[4,4]},"
                    "\"s\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]}}\r\n  ";
    char *p = put_st(g_dir, "m.safetensors", h, 6);
    struct ms_st_file *f = open_ok(p);
    cr_assert_eq(f->ntensors, 4);
    cr_assert_null(f->format);
    cr_assert_str_eq(f->tensors[0].name, "z");
    cr_assert_eq(f->tensors[0].ndim, 0);
    cr_assert_eq(f->tensors[0].numel, 1);
    cr_assert_str_eq(f->tensors[1].name, "e0");
    cr_assert_eq(f->tensors[1].numel, 0);
    cr_assert_str_eq(f->tensors[2].name, "e1");
    cr_assert_str_eq(f->tensors[3].name, "s");
    ms_st_free(f);
    free(p);

    /* an empty header object, no data */
    p = put_st(g_dir, "e.safetensors", "{}", 0);
    f = open_ok(p);
    cr_assert_eq(f->ntensors, 0);
    ms_st_free(f);
    free(p);
}

Test(st_read, all_dtypes)
{
    /* 8 elements of every dtype, in one file, in enum order. */
    char hdr[8192];
    size_t n = 0;
    uint64_t off = 0;
    n += (size_t)snprintf(hdr + n, sizeof hdr - n, "{");
    for (int d = 0; d < MS_DT_COUNT; d++) {
        const char *name = ms_dtype_name((enum ms_dtype)d);
        cr_assert_not_null(name);
        uint64_t bytes = 8 * ms_dtype_bits((enum ms_dtype)d) / 8;
        n += (size_t)snprintf(hdr + n, sizeof hdr - n,
                              "%s\"t%02d\":{\"dtype\":\"%s\",\"shape\":[8],\"data_offsets\":[%llu,%llu]}",
                              d ? "," : "", d, name, (unsigned long long)off,
                              (unsigned long long)(off + bytes));
        off += bytes;
    }
    snprintf(hdr + n, sizeof hdr - n, "}");
    char *p = put_st(g_dir, "m.safetensors", hdr, (size_t)off);
    struct ms_st_file *f = open_ok(p);
    cr_assert_eq(f->ntensors, MS_DT_COUNT);
    for (int d = 0; d < MS_DT_COUNT; d++)
        cr_assert_eq(f->tensors[d].dtype, (enum ms_dtype)d);
    ms_st_free(f);
    free(p);
}

Test(st_read, parse_in_memory)
{
    const char *h = "{" F32_A "}";
    size_t n = strlen(h);
    unsigned char buf[128] = {0};
    buf[0] = (unsigned char)n;
    memcpy(buf + 8, h, n);
    struct ms_st_file *f = NULL;
    cr_assert_eq(ms_st_parse("mem", buf, 8 + n, 8 + n + 16, &f), 0, "%s", ms_errmsg());
    cr_assert_eq(f->ntensors, 1);
    ms_st_free(f);
    cr_assert_eq(ms_st_parse("mem", buf, 8 + n, 8 + n + 20, &f), MS_EST_INCOMPLETE);
    cr_assert_eq(ms_st_parse("mem", buf, 4, 4, &f), MS_EST_TOOSMALL);
    cr_assert_null(f);
}

Test(st_read, out_of_memory)
{
    char *p = put_st(g_dir, "m.safetensors",
                     "{\"__metadata__\":{\"format\":\"pt\"}," F32_A
                     ",\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[16,20]}}",
                     20);
    int rc = MS_ENOMEM;
    for (long k = 1; rc == MS_ENOMEM && k < 100; k++) {
        struct ms_st_file *f = NULL;
        ms_alloc_fail_after(k);
        rc = ms_st_open(p, &f);
        ms_alloc_fail_after(0);
        cr_assert(rc == 0 || rc == MS_ENOMEM, "k=%ld: %d %s", k, rc, ms_errmsg());
        cr_assert(rc == 0 ? f != NULL : f == NULL);
        ms_st_free(f);
    }
    cr_assert_eq(rc, 0);
    free(p);
}

/* ------------------------------------------------------------------ models */

/* A U8 tensor entry of `len` bytes at begin. */
static void ent(char *buf, size_t cap, const char *name, int begin, int len)
{
    size_t n = strlen(buf);
    snprintf(buf + n, cap - n, "%s\"%s\":{\"dtype\":\"U8\",\"shape\":[%d],\"data_offsets\":[%d,%d]}",
             n > 1 ? "," : "", name, len, begin, begin + len);
}

/* dir/name holding U8 tensors names[i] of 2 bytes each. */
static void put_shard(const char *dir, const char *name, const char *const *names, int n)
{
    char hdr[4096] = "{";
    for (int i = 0; i < n; i++)
        ent(hdr, sizeof hdr, names[i], 2 * i, 2);
    strcat(hdr, "}");
    free(put_st(dir, name, hdr, (size_t)(2 * n)));
}

static void put_file(const char *dir, const char *name, const char *text)
{
    char *p = th_path(dir, name);
    cr_assert_eq(th_write(p, text, strlen(text)), 0);
    free(p);
}

#define INDEX_HEAD "{\"metadata\":{\"total_size\":8,\"extra\":[1]},\"format\":\"x\",\"weight_map\":{"

static void put_two_shards(const char *dir)
{
    static const char *const s1[] = {"w.0", "w.1"}, *const s2[] = {"w.2", "w.3"};
    put_shard(dir, "model-00001-of-00002.safetensors", s1, 2);
    put_shard(dir, "model-00002-of-00002.safetensors", s2, 2);
}

static void expect_model_fail(const char *path, int code, const char *n1, const char *n2)
{
    struct ms_model *m = (void *)1;
    ms_error_clear();
    int rc = ms_model_open(path, &m);
    const char *msg = ms_errmsg();
    cr_assert_eq(rc, code, "expected %d, got %d: %s", code, rc, msg);
    cr_assert_null(m);
    if (n1)
        cr_assert(strstr(msg, n1), "message lacks '%s': %s", n1, msg);
    if (n2)
        cr_assert(strstr(msg, n2), "message lacks '%s': %s", n2, msg);
}

Test(st_model, single_dir_and_file)
{
    static const char *const names[] = {"b", "a"};
    put_shard(g_dir, "model.safetensors", names, 2);
    struct ms_model *m = NULL;
    cr_assert_eq(ms_model_open(g_dir, &m), 0, "%s", ms_errmsg());
    cr_assert(!m->indexed);
    cr_assert_eq(m->nshards, 1);
    cr_assert_eq(m->ntensors, 2);
    cr_assert_str_eq(m->dir, g_dir);
    uint32_t s = 99;
    const struct ms_st_tensor *t = ms_model_find(m, "a", &s);
    cr_assert_not_null(t);
    cr_assert_eq(s, 0);
    cr_assert_eq(t->begin, 2);
    cr_assert_null(ms_model_find(m, "c", NULL));
    cr_assert_str_eq(ms_model_tensor_at(m, 0, NULL)->name, "b");
    cr_assert_null(ms_model_tensor_at(m, 2, NULL));
    ms_model_free(m);

    char *p = th_path(g_dir, "model.safetensors");
    cr_assert_eq(ms_model_open(p, &m), 0, "%s", ms_errmsg());
    cr_assert_eq(m->ntensors, 2);
    cr_assert_str_eq(m->dir, g_dir);
    ms_model_free(m);
    free(p);
}

Test(st_model, sharded)
{
    put_two_shards(g_dir);
    put_file(g_dir, "model.safetensors.index.json",
             INDEX_HEAD "\"w.0\":\"model-00001-of-00002.safetensors\","
                        "\"w.2\":\"model-00002-of-00002.safetensors\","
                        "\"w.1\":\"model-00001-of-00002.safetensors\","
                        "\"w.3\":\"model-00002-of-00002.safetensors\"}}");
    /* a stray single file must not win over the index */
    static const char *const other[] = {"zz"};
    put_shard(g_dir, "model.safetensors", other, 1);
    struct ms_model *m = NULL;
    cr_assert_eq(ms_model_open(g_dir, &m), 0, "%s", ms_errmsg());
    cr_assert(m->indexed);
    cr_assert_eq(m->nshards, 2);
    cr_assert_eq(m->ntensors, 4);
    uint32_t s;
    cr_assert_not_null(ms_model_find(m, "w.3", &s));
    cr_assert_eq(s, 1);
    cr_assert_null(ms_model_find(m, "zz", NULL));
    const struct ms_st_tensor *t = ms_model_tensor_at(m, 2, &s);
    cr_assert_str_eq(t->name, "w.2");
    cr_assert_eq(s, 1);
    ms_model_free(m);
}

Test(st_model, index_missing_shard)
{
    put_two_shards(g_dir);
    put_file(g_dir, "model.safetensors.index.json",
             INDEX_HEAD "\"w.0\":\"model-00001-of-00002.safetensors\","
                        "\"w.1\":\"model-00001-of-00002.safetensors\","
                        "\"w.2\":\"model-00002-of-00003.safetensors\"}}");
    expect_model_fail(g_dir, MS_EST_INDEX, "'w.2'", "model-00002-of-00003.safetensors");
}

Test(st_model, index_tensor_not_in_shard)
{
    put_two_shards(g_dir);
    put_file(g_dir, "model.safetensors.index.json",
             INDEX_HEAD "\"w.0\":\"model-00001-of-00002.safetensors\","
                        "\"w.1\":\"model-00001-of-00002.safetensors\","
                        "\"w.2\":\"model-00002-of-00002.safetensors\","
                        "\"w.3\":\"model-00002-of-00002.safetensors\","
                        "\"w.4\":\"model-00002-of-00002.safetensors\"}}");
    expect_model_fail(g_dir, MS_EST_INDEX, "'w.4'", "model-00002-of-00002.safetensors");
}

Test(st_model, index_wrong_shard)
{
    put_two_shards(g_dir);
    put_file(g_dir, "model.safetensors.index.json",
             INDEX_HEAD "\"w.0\":\"model-00001-of-00002.safetensors\","
                        "\"w.1\":\"model-00002-of-00002.safetensors\","
                        "\"w.2\":\"model-00002-of-00002.safetensors\","
                        "\"w.3\":\"model-00002-of-00002.safetensors\"}}");
    expect_model_fail(g_dir, MS_EST_INDEX, "'w.1'", "model-00001-of-00002.safetensors");
}

Test(st_model, shard_tensor_not_in_index)
{
    put_two_shards(g_dir);
    put_file(g_dir, "model.safetensors.index.json",
             "{\"weight_map\":{\"w.0\":\"model-00001-of-00002.safetensors\","
             "\"w.1\":\"model-00001-of-00002.safetensors\","
             "\"w.2\":\"model-00002-of-00002.safetensors\"}}");
    expect_model_fail(g_dir, MS_EST_INDEX, "'w.3'", "not in the weight_map");
}

Test(st_model, same_tensor_in_two_shards)
{
    static const char *const s1[] = {"w.0", "w.1"}, *const s2[] = {"w.1", "w.2"};
    put_shard(g_dir, "a.safetensors", s1, 2);
    put_shard(g_dir, "b.safetensors", s2, 2);
    put_file(g_dir, "model.safetensors.index.json",
             "{\"weight_map\":{\"w.0\":\"a.safetensors\",\"w.1\":\"a.safetensors\","
             "\"w.2\":\"b.safetensors\"}}");
    expect_model_fail(g_dir, MS_EST_INDEX, "'w.1'", "b.safetensors");
}

Test(st_model, bad_index)
{
    put_two_shards(g_dir);
    put_file(g_dir, "model.safetensors.index.json", "{\"metadata\":{}}");
    expect_model_fail(g_dir, MS_EST_INDEX, "weight_map", NULL);
    put_file(g_dir, "model.safetensors.index.json", "{\"weight_map\":");
    expect_model_fail(g_dir, MS_EST_INDEX, "model.safetensors.index.json", NULL);
    put_file(g_dir, "model.safetensors.index.json", "{\"weight_map\":{\"w.0\":\"../x\"}}");
    expect_model_fail(g_dir, MS_EST_INDEX, "'w.0'", NULL);
}

Test(st_model, bad_shard_header)
{
    put_two_shards(g_dir);
    char *p = put_st(g_dir, "model-00002-of-00002.safetensors", "{}", 1);
    put_file(g_dir, "model.safetensors.index.json",
             "{\"weight_map\":{\"w.0\":\"model-00001-of-00002.safetensors\","
             "\"w.1\":\"model-00002-of-00002.safetensors\"}}");
    expect_model_fail(g_dir, MS_EST_INCOMPLETE, p, NULL);
    free(p);
}

Test(st_model, bin_only_and_empty)
{
    expect_model_fail(g_dir, MS_EMODEL, g_dir, NULL);
    put_file(g_dir, "pytorch_model.bin", "PK");
    expect_model_fail(g_dir, MS_EUNSUPPORTED, "PyTorch .bin checkpoints are not supported", g_dir);
    char *bin = th_path(g_dir, "pytorch_model.bin");
    expect_model_fail(bin, MS_EUNSUPPORTED, "convert to safetensors", NULL);
    free(bin);
    char *p = th_path(g_dir, "absent");
    struct ms_model *m = NULL;
    cr_assert(ms_model_open(p, &m) < 0);
    cr_assert(strstr(ms_errmsg(), p));
    free(p);
}

Test(st_model, out_of_memory)
{
    put_two_shards(g_dir);
    put_file(g_dir, "model.safetensors.index.json",
             INDEX_HEAD "\"w.0\":\"model-00001-of-00002.safetensors\","
                        "\"w.2\":\"model-00002-of-00002.safetensors\","
                        "\"w.1\":\"model-00001-of-00002.safetensors\","
                        "\"w.3\":\"model-00002-of-00002.safetensors\"}}");
    int rc = MS_ENOMEM;
    for (long k = 1; rc == MS_ENOMEM && k < 200; k++) {
        struct ms_model *m = NULL;
        ms_alloc_fail_after(k);
        rc = ms_model_open(g_dir, &m);
        ms_alloc_fail_after(0);
        cr_assert(rc == 0 || rc == MS_ENOMEM, "k=%ld: %d %s", k, rc, ms_errmsg());
        ms_model_free(m);
    }
    cr_assert_eq(rc, 0);
}
