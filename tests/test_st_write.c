/*
 * test_st_write.c - output layout (mergekit's greedy sharding, file names, the
 * official writer's tensor order and header bytes), the index JSON, and atomic
 * safetensors writes read back through ms_st_open.
 */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

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

TestSuite(st_write, .init = setup, .fini = teardown);

/* A 1-D U8 tensor of n bytes. */
static struct ms_out_tensor u8(const char *name, int64_t n)
{
    struct ms_out_tensor t = {.name = name, .dtype = MS_DT_U8, .ndim = 1, .nbytes = (uint64_t)n};
    t.shape[0] = n;
    return t;
}

static struct ms_out_tensor ten(const char *name, enum ms_dtype dt, uint32_t ndim, int64_t d0,
                                int64_t d1)
{
    struct ms_out_tensor t = {.name = name, .dtype = dt, .ndim = ndim};
    t.shape[0] = d0;
    t.shape[1] = d1;
    uint64_t numel = 1;
    for (uint32_t i = 0; i < ndim; i++)
        numel *= (uint64_t)t.shape[i];
    t.nbytes = numel * ms_dtype_bits(dt) / 8;
    return t;
}

static struct ms_layout *build(const struct ms_out_tensor *t, size_t n, uint64_t max)
{
    struct ms_layout *l = NULL;
    int rc = ms_layout_build(t, n, max, &l);
    cr_assert_eq(rc, 0, "%s", ms_errmsg());
    cr_assert_not_null(l);
    return l;
}

/* True if the bytes hay[0..n) contain the string needle. */
static bool contains(const unsigned char *hay, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (!memcmp(hay + i, needle, k))
            return true;
    return false;
}

/* ------------------------------------------------------------------ sharding */

Test(st_write, shard_exact_fit)
{
    struct ms_out_tensor t[] = {u8("a", 4), u8("b", 4), u8("c", 4), u8("d", 4), u8("e", 1)};
    struct ms_layout *l = build(t, 5, 8);
    cr_assert_eq(l->nshards, 3);
    cr_assert_eq(l->tensors[0].shard, 0);
    cr_assert_eq(l->tensors[1].shard, 0); /* 4 + 4 == 8 fits */
    cr_assert_eq(l->tensors[2].shard, 1);
    cr_assert_eq(l->tensors[3].shard, 1);
    cr_assert_eq(l->tensors[4].shard, 2);
    cr_assert_str_eq(l->shards[0].file_name, "model-00001-of-00003.safetensors");
    cr_assert_str_eq(l->shards[2].file_name, "model-00003-of-00003.safetensors");
    cr_assert_eq(l->shards[0].data_bytes, 8);
    cr_assert_eq(l->shards[2].data_bytes, 1);
    cr_assert_eq(l->total_bytes, 17);
    ms_layout_free(l);
}

Test(st_write, shard_oversized_tensor)
{
    struct ms_out_tensor t[] = {u8("a", 2), u8("big", 20), u8("c", 2), u8("d", 2)};
    struct ms_layout *l = build(t, 4, 8);
    cr_assert_eq(l->nshards, 3);
    cr_assert_eq(l->tensors[0].shard, 0);
    cr_assert_eq(l->tensors[1].shard, 1); /* alone */
    cr_assert_eq(l->tensors[2].shard, 2);
    cr_assert_eq(l->tensors[3].shard, 2);
    ms_layout_free(l);

    /* the first tensor over the limit still starts shard 1, and is alone */
    struct ms_out_tensor t2[] = {u8("big", 20), u8("c", 2)};
    l = build(t2, 2, 8);
    cr_assert_eq(l->nshards, 2);
    cr_assert_eq(l->tensors[1].shard, 1);
    cr_assert_str_eq(l->shards[1].file_name, "model-00002-of-00002.safetensors");
    ms_layout_free(l);
}

Test(st_write, shard_unlimited_and_single)
{
    struct ms_out_tensor t[] = {u8("a", 4000), u8("b", 4000), u8("c", 4000)};
    struct ms_layout *l = build(t, 3, 0);
    cr_assert_eq(l->nshards, 1);
    cr_assert_str_eq(l->shards[0].file_name, "model.safetensors");
    cr_assert_eq(l->shards[0].ntensors, 3);
    ms_layout_free(l);

    l = build(t, 3, 1u << 20); /* fits in one shard: no -of- name */
    cr_assert_eq(l->nshards, 1);
    cr_assert_str_eq(l->shards[0].file_name, "model.safetensors");
    ms_layout_free(l);

    l = build(NULL, 0, 8);
    cr_assert_eq(l->nshards, 1);
    cr_assert_eq(l->shards[0].ntensors, 0);
    cr_assert_eq(l->shards[0].header_bytes, 40); /* 8 + 32 JSON bytes, no padding needed */
    ms_layout_free(l);
}

/* ------------------------------------------------------------------ order and header */

Test(st_write, file_order_dtype_desc_then_name)
{
    struct ms_out_tensor t[] = {
        ten("b", MS_DT_F32, 1, 3, 0),  ten("a", MS_DT_BF16, 1, 3, 0), ten("c", MS_DT_F32, 1, 1, 0),
        ten("a2", MS_DT_U8, 1, 5, 0),  ten("z", MS_DT_I64, 0, 0, 0),  ten("B", MS_DT_F32, 1, 2, 0),
        ten("e", MS_DT_F16, 2, 0, 4),
    };
    struct ms_layout *l = build(t, 7, 0);
    const struct ms_out_shard *sh = &l->shards[0];
    static const char *const want[] = {"z", "B", "b", "c", "a", "e", "a2"};
    cr_assert_eq(sh->ntensors, 7);
    uint64_t off = 0;
    for (size_t i = 0; i < 7; i++) {
        const struct ms_out_tensor *x = &l->tensors[sh->order[i]];
        cr_assert_str_eq(x->name, want[i], "position %zu", i);
        cr_assert_eq(x->begin, off);
        cr_assert_eq(x->file_offset, sh->header_bytes + off);
        off += x->nbytes;
    }
    cr_assert_eq(sh->data_bytes, off);
    cr_assert_eq(sh->file_bytes, sh->header_bytes + off);
    /* tensors[] keeps save order */
    cr_assert_str_eq(l->tensors[0].name, "b");
    ms_layout_free(l);
}

Test(st_write, header_bytes_exact)
{
    struct ms_out_tensor t[] = {ten("b", MS_DT_BF16, 2, 2, 3), ten("w", MS_DT_F32, 1, 2, 0)};
    struct ms_layout *l = build(t, 2, 0);
    static const char want[] =
        "\x90\0\0\0\0\0\0\0"
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
        "\"b\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[8,20]}}  ";
    const struct ms_out_shard *sh = &l->shards[0];
    cr_assert_eq(sh->header_bytes, sizeof want - 1);
    cr_assert_eq(memcmp(sh->header, want, sizeof want - 1), 0, "%.*s", (int)sh->header_bytes - 8,
                 (const char *)sh->header + 8);
    cr_assert_eq(l->tensors[0].file_offset, 152 + 8);
    cr_assert_eq(l->tensors[1].file_offset, 152);
    ms_layout_free(l);
}

Test(st_write, header_padding_and_escapes)
{
    /* every JSON length mod 8 pads to a multiple of 8 with spaces */
    for (int k = 1; k <= 16; k++) {
        char name[32];
        memset(name, 'x', (size_t)k);
        name[k] = 0;
        struct ms_out_tensor t = u8(name, 1);
        struct ms_layout *l = build(&t, 1, 0);
        const struct ms_out_shard *sh = &l->shards[0];
        cr_assert_eq((sh->header_bytes - 8) % 8, 0);
        uint64_t n = 0;
        for (int b = 7; b >= 0; b--)
            n = (n << 8) | sh->header[b];
        cr_assert_eq(n, sh->header_bytes - 8);
        cr_assert_eq(sh->header[8], '{');
        size_t last = (size_t)sh->header_bytes - 1;
        while (sh->header[last] == ' ')
            last--;
        cr_assert_eq(sh->header[last], '}');
        cr_assert_lt(sh->header_bytes - 1 - last, 8);
        ms_layout_free(l);
    }
    /* serde_json escaping: quote, backslash, control characters; UTF-8 raw */
    struct ms_out_tensor t = u8("q\"\\\n\x01\x7f\xc3\xa9", 1);
    struct ms_layout *l = build(&t, 1, 0);
    const char *want = "\"q\\\"\\\\\\n\\u0001\x7f\xc3\xa9\":{";
    cr_assert(contains(l->shards[0].header, (size_t)l->shards[0].header_bytes, want),
              "%.*s", (int)l->shards[0].header_bytes - 8, (const char *)l->shards[0].header + 8);
    ms_layout_free(l);
}

Test(st_write, bad_input)
{
    struct ms_out_tensor t[] = {u8("a", 2), u8("a", 2)};
    struct ms_layout *l = NULL;
    cr_assert_eq(ms_layout_build(t, 2, 0, &l), MS_EINVAL);
    cr_assert(strstr(ms_errmsg(), "'a'"));
    cr_assert_null(l);
    t[1] = u8("b", 2);
    t[1].nbytes = 3;
    cr_assert_eq(ms_layout_build(t, 2, 0, &l), MS_EINVAL);
    cr_assert(strstr(ms_errmsg(), "'b'"));
    t[1] = u8("__metadata__", 2);
    cr_assert_eq(ms_layout_build(t, 2, 0, &l), MS_EINVAL);
    t[1] = u8("\xff", 2);
    cr_assert_eq(ms_layout_build(t, 2, 0, &l), MS_EINVAL);
}

/* ------------------------------------------------------------------ index */

Test(st_write, index_json_exact)
{
    struct ms_out_tensor t[] = {u8("b\xc3\xa9", 10), u8("q\"\\\n\x01\x7f", 10),
                                u8("\xf0\x9f\x98\x80", 10)};
    struct ms_layout *l = build(t, 3, 20);
    cr_assert_eq(l->nshards, 2);
    char *js = NULL;
    size_t len = 0;
    cr_assert_eq(ms_layout_index_json(l, &js, &len), 0);
    /* what Python's json.dump(obj, f, indent=2) writes for the same object */
    const char *want = "{\n"
                       "  \"metadata\": {\n"
                       "    \"total_size\": 30,\n"
                       "    \"mergekit_version\": \"0.1.4\"\n"
                       "  },\n"
                       "  \"weight_map\": {\n"
                       "    \"b\\u00e9\": \"model-00001-of-00002.safetensors\",\n"
                       "    \"q\\\"\\\\\\n\\u0001\\u007f\": \"model-00001-of-00002.safetensors\",\n"
                       "    \"\\ud83d\\ude00\": \"model-00002-of-00002.safetensors\"\n"
                       "  }\n"
                       "}";
    cr_assert_str_eq(js, want);
    cr_assert_eq(len, strlen(want));
    ms_free(js);
    ms_layout_free(l);
}

Test(st_write, index_json_order_is_save_order)
{
    struct ms_out_tensor t[] = {u8("z", 4), u8("a", 4), u8("m", 4)};
    struct ms_layout *l = build(t, 3, 4);
    char *js = NULL;
    cr_assert_eq(ms_layout_index_json(l, &js, NULL), 0);
    cr_assert_lt(strstr(js, "\"z\""), strstr(js, "\"a\""));
    cr_assert_lt(strstr(js, "\"a\""), strstr(js, "\"m\""));
    cr_assert(strstr(js, "\"m\": \"model-00003-of-00003.safetensors\"\n  }\n}"));
    ms_free(js);
    ms_layout_free(l);
}

/* ------------------------------------------------------------------ files */

Test(st_write, round_trip)
{
    struct ms_out_tensor t[] = {
        ten("model.layers.0.w", MS_DT_BF16, 2, 2, 3), ten("norm", MS_DT_F32, 1, 4, 0),
        ten("emb", MS_DT_F16, 2, 3, 1),               ten("empty", MS_DT_F32, 2, 0, 5),
        ten("scalar", MS_DT_I64, 0, 0, 0),            ten("mask", MS_DT_BOOL, 1, 3, 0),
        ten("fp4", MS_DT_F4, 1, 6, 0),
    };
    size_t n = MS_ARRAY_LEN(t);
    unsigned char bufs[7][64];
    const void *data[7];
    for (size_t i = 0; i < n; i++) {
        for (size_t b = 0; b < sizeof bufs[i]; b++)
            bufs[i][b] = (unsigned char)(i * 16 + b);
        data[i] = bufs[i];
    }
    char *path = th_path(g_dir, "out.safetensors");
    cr_assert_eq(ms_st_write_file(path, t, data, n), 0, "%s", ms_errmsg());
    char *tmp = th_path(g_dir, "out.safetensors.tmp");
    cr_assert_neq(access(tmp, F_OK), 0, "temporary file left behind");

    struct ms_st_file *f = NULL;
    cr_assert_eq(ms_st_open(path, &f), 0, "%s", ms_errmsg());
    cr_assert_eq(f->ntensors, n);
    cr_assert_str_eq(f->format, "pt");
    cr_assert_eq(f->header_len % 8, 0);
    size_t flen = 0;
    unsigned char *bytes = (unsigned char *)th_read(path, &flen);
    cr_assert_eq(flen, f->file_size);
    for (size_t i = 0; i < n; i++) {
        const struct ms_st_tensor *r = ms_st_find(f, t[i].name);
        cr_assert_not_null(r, "%s", t[i].name);
        cr_assert_eq(r->dtype, t[i].dtype);
        cr_assert_eq(r->ndim, t[i].ndim);
        for (uint32_t d = 0; d < r->ndim; d++)
            cr_assert_eq(r->shape[d], t[i].shape[d]);
        cr_assert_eq(r->end - r->begin, t[i].nbytes);
        cr_assert_eq(memcmp(bytes + f->data_start + r->begin, bufs[i], t[i].nbytes), 0, "%s",
                     t[i].name);
        /* the writer's order keeps offsets aligned to the element size */
        unsigned bytes_per = ms_dtype_bits(r->dtype) / 8;
        if (bytes_per)
            cr_assert_eq((f->data_start + r->begin) % bytes_per, 0, "%s", r->name);
    }
    free(bytes);
    ms_st_free(f);
    free(tmp);
    free(path);
}

Test(st_write, failure_leaves_nothing)
{
    struct ms_out_tensor t = u8("a", 4);
    const void *data[] = {"abcd"};
    char *path = th_path(g_dir, "missing/out.safetensors");
    int rc = ms_st_write_file(path, &t, data, 1);
    cr_assert(rc < 0);
    cr_assert(strstr(ms_errmsg(), path), "%s", ms_errmsg());
    cr_assert_neq(access(path, F_OK), 0);
    free(path);

    /* rename onto a non-empty directory fails after the data is written */
    path = th_path(g_dir, "dir.safetensors");
    cr_assert_eq(mkdir(path, 0755), 0);
    char *inner = th_path(path, "x");
    cr_assert_eq(th_write(inner, "x", 1), 0);
    rc = ms_st_write_file(path, &t, data, 1);
    cr_assert(rc < 0);
    cr_assert(strstr(ms_errmsg(), path), "%s", ms_errmsg());
    char *tmp = th_path(g_dir, "dir.safetensors.tmp");
    cr_assert_neq(access(tmp, F_OK), 0, "temporary file left behind");
    free(tmp);
    free(inner);
    free(path);
}

Test(st_write, short_write_reports_file)
{
    /* A file size limit below the file's size fails the write with EFBIG (the
     * temporary is created afresh, so a planted symlink cannot stand in for a
     * failing device any more: see planted_symlink_is_not_followed). */
    char *path = th_path(g_dir, "full.safetensors");
    char *tmp = th_path(g_dir, "full.safetensors.tmp");
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit rl = { .rlim_cur = 16, .rlim_max = RLIM_INFINITY };
    struct rlimit old;
    cr_assert_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    rl.rlim_max = old.rlim_max;
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
    struct ms_out_tensor t = u8("a", 4);
    const void *data[] = {"abcd"};
    int rc = ms_st_write_file(path, &t, data, 1);
    setrlimit(RLIMIT_FSIZE, &old);
    cr_assert(rc < 0);
    cr_assert(strstr(ms_errmsg(), path), "%s", ms_errmsg());
    cr_assert(strstr(ms_errmsg(), "write failed"), "%s", ms_errmsg());
    cr_assert_neq(access(path, F_OK), 0);
    struct stat st;
    cr_assert_neq(lstat(tmp, &st), 0, "temporary name left behind");
    free(tmp);
    free(path);
}

Test(st_write, planted_symlink_is_not_followed)
{
    /* A symlink planted under the temporary's name points at a victim file: the
     * write must go into a new file of ours, the victim stay as it was. */
    char *path = th_path(g_dir, "config.json");
    char *tmp = th_path(g_dir, "config.json.tmp");
    char *victim = th_path(g_dir, "victim");
    cr_assert_eq(th_write(victim, "keep", 4), 0);
    cr_assert_eq(symlink(victim, tmp), 0);
    cr_assert_eq(ms_write_file_atomic(path, "{\"a\":1}", 7), 0, "%s", ms_errmsg());
    size_t len = 0;
    char *v = th_read(victim, &len);
    cr_assert(v && len == 4 && !memcmp(v, "keep", 4), "the victim was written through the symlink");
    struct stat st;
    cr_assert_eq(lstat(path, &st), 0);
    cr_assert(S_ISREG(st.st_mode), "the final name is not a regular file");
    cr_assert_neq(lstat(tmp, &st), 0, "temporary name left behind");
    free(v);
    free(victim);
    free(tmp);
    free(path);
}

Test(st_write, small_files)
{
    char *path = th_path(g_dir, "config.json");
    cr_assert_eq(ms_write_file_atomic(path, "{\"a\":1}", 7), 0, "%s", ms_errmsg());
    char *data = NULL;
    size_t len = 0;
    cr_assert_eq(ms_read_file(path, &data, &len), 0);
    cr_assert_eq(len, 7);
    cr_assert_str_eq(data, "{\"a\":1}");
    ms_free(data);
    cr_assert_eq(ms_write_file_atomic(path, "", 0), 0);
    cr_assert_eq(ms_read_file(path, &data, &len), 0);
    cr_assert_eq(len, 0);
    cr_assert_str_eq(data, "");
    ms_free(data);
    free(path);
    path = th_path(g_dir, "absent.json");
    cr_assert(ms_read_file(path, &data, &len) < 0);
    cr_assert(strstr(ms_errmsg(), path));
    free(path);
}

Test(st_write, out_of_memory)
{
    struct ms_out_tensor t[] = {u8("a", 4), u8("b", 4), u8("c", 4)};
    int rc = MS_ENOMEM;
    for (long k = 1; rc == MS_ENOMEM && k < 100; k++) {
        struct ms_layout *l = NULL;
        char *js = NULL;
        ms_alloc_fail_after(k);
        rc = ms_layout_build(t, 3, 4, &l);
        if (!rc) {
            rc = ms_layout_index_json(l, &js, NULL);
            ms_free(js);
        }
        ms_alloc_fail_after(0);
        cr_assert(rc == 0 || rc == MS_ENOMEM, "k=%ld: %d", k, rc);
        ms_layout_free(l);
    }
    cr_assert_eq(rc, 0);
}
