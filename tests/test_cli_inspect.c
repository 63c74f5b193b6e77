/*
 * test_cli_inspect.c - `mergestream verify` and `mergestream inspect` run as
 * commands on files the tests write: exit codes, the ok line, one distinct
 * diagnostic line per malformed kind, the table and the JSON output.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <stdarg.h>
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

TestSuite(cli_inspect, .init = setup, .fini = teardown);

static const unsigned char zeros[4096];

/* Writes a model to dir: one file, or shards and an index when max > 0 splits it. */
static void write_model(const char *dir, const struct ms_out_tensor *t, size_t n, uint64_t max)
{
    struct ms_layout *l = NULL;
    cr_assert_eq(ms_layout_build(t, n, max, &l), 0, "%s", ms_errmsg());
    for (size_t s = 0; s < l->nshards; s++) {
        const struct ms_out_shard *sh = &l->shards[s];
        unsigned char *buf = calloc(1, (size_t)sh->file_bytes);
        memcpy(buf, sh->header, (size_t)sh->header_bytes);
        char *p = th_path(dir, sh->file_name);
        cr_assert_eq(th_write(p, buf, (size_t)sh->file_bytes), 0);
        free(p);
        free(buf);
    }
    if (l->nshards > 1) {
        char *js = NULL;
        size_t len;
        cr_assert_eq(ms_layout_index_json(l, &js, &len), 0);
        char *p = th_path(dir, "model.safetensors.index.json");
        cr_assert_eq(th_write(p, js, len), 0);
        free(p);
        ms_free(js);
    }
    ms_layout_free(l);
}

static const struct ms_out_tensor model_tensors[] = {
    {.name = "embed", .dtype = MS_DT_BF16, .ndim = 2, .shape = {8, 4}, .nbytes = 64},
    {.name = "layers.0.w", .dtype = MS_DT_BF16, .ndim = 2, .shape = {4, 4}, .nbytes = 32},
    {.name = "layers.0.norm", .dtype = MS_DT_F32, .ndim = 1, .shape = {4}, .nbytes = 16},
    {.name = "lm_head", .dtype = MS_DT_BF16, .ndim = 2, .shape = {8, 4}, .nbytes = 64},
};

/* Runs a command line (printf-style) and returns its exit status. */
static int run(char **out, char **err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int run(char **out, char **err, const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    return th_run(cmd, out, err);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

/* ------------------------------------------------------------------ verify */

Test(cli_inspect, verify_single_ok)
{
    char *d = th_path(g_dir, "single");
    cr_assert_eq(mkdir(d, 0755), 0);
    write_model(d, model_tensors, 4, 0);
    char *out, *err, want[4200];
    int rc = run(&out, &err, "mergestream verify '%s'", d);
    cr_assert_eq(rc, 0, "stderr: %s", err);
    snprintf(want, sizeof want, "ok: %s (4 tensors, 176 bytes)\n", d);
    cr_assert_str_eq(out, want);
    cr_assert_str_empty(err);
    free(out);
    free(err);

    char *f = th_path(d, "model.safetensors");
    rc = run(&out, &err, "mergestream verify '%s'", f);
    cr_assert_eq(rc, 0, "stderr: %s", err);
    snprintf(want, sizeof want, "ok: %s (4 tensors, 176 bytes)\n", f);
    cr_assert_str_eq(out, want);
    free(out);
    free(err);
    free(f);
    free(d);
}

Test(cli_inspect, verify_sharded_ok)
{
    write_model(g_dir, model_tensors, 4, 100);
    char *out, *err, want[4200];
    int rc = run(&out, &err, "mergestream verify '%s'", g_dir);
    cr_assert_eq(rc, 0, "stderr: %s", err);
    snprintf(want, sizeof want, "ok: %s (4 tensors, 176 bytes)\n", g_dir);
    cr_assert_str_eq(out, want);
    free(out);
    free(err);
}

struct bad_case {
    const char *hdr; /* NULL: write `raw` as the whole file */
    const char *raw;
    size_t rawlen;
    size_t dlen;
    const char *needle;
};

#define OK_A "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"

static const struct bad_case bad_cases[] = {
    {NULL, "\x01\x02\x03", 3, 0, "too small"},
    {NULL, "\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10, 0, "over the limit"},
    {NULL, "\x40\0\0\0\0\0\0\0{}", 10, 0, "runs past the end"},
    {"{\"\xfe\":1}", NULL, 0, 0, "utf-8"},
    {"{\"a\":", NULL, 0, 0, "not valid json"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", NULL, 0, 8, "data_offsets"},
    {"{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", NULL, 0, 8, "unknown dtype"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", NULL, 0, 16, "begin at 0"},
    {"{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", NULL,
     0, 0, "overflows"},
    {"{\"a\":{\"dtype\":\"F4\",\"shape\":[1],\"data_offsets\":[0,1]}}", NULL, 0, 1, "whole number"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,6]}}", NULL, 0, 6, "do not match"},
    {"{" OK_A "}", NULL, 0, 9, "trailing"},
    {"{" OK_A "}", NULL, 0, 7, "truncated"},
    {"{\"__metadata__\":{\"format\":1}}", NULL, 0, 0, "__metadata__"},
    {"{" OK_A "," OK_A "}", NULL, 0, 8, "appears twice"},
};

Test(cli_inspect, verify_each_malformed_kind)
{
    size_t n = MS_ARRAY_LEN(bad_cases);
    char **msgs = calloc(n, sizeof *msgs);
    for (size_t i = 0; i < n; i++) {
        const struct bad_case *c = &bad_cases[i];
        char name[64];
        snprintf(name, sizeof name, "bad%02zu.safetensors", i);
        char *p = th_path(g_dir, name);
        if (c->hdr) {
            size_t hl = strlen(c->hdr);
            unsigned char *b = calloc(1, 8 + hl + c->dlen);
            b[0] = (unsigned char)hl;
            memcpy(b + 8, c->hdr, hl);
            cr_assert_eq(th_write(p, b, 8 + hl + c->dlen), 0);
            free(b);
        } else {
            cr_assert_eq(th_write(p, c->raw, c->rawlen), 0);
        }
        char *out, *err;
        int rc = run(&out, &err, "mergestream verify '%s'", p);
        cr_assert_eq(rc, 1, "case %zu: exit %d, stdout %s", i, rc, out);
        cr_assert_str_empty(out, "case %zu", i);
        cr_assert_eq(count_lines(err), 1, "case %zu: %s", i, err);
        cr_assert(!strncmp(err, "mergestream: ", 13), "case %zu: %s", i, err);
        cr_assert(strstr(err, p), "case %zu does not name the file: %s", i, err);
        cr_assert(strstr(err, c->needle), "case %zu lacks '%s': %s", i, c->needle, err);
        /* distinct once the file name is taken out */
        msgs[i] = strdup(err + 13 + strlen(p));
        for (size_t j = 0; j < i; j++)
            cr_assert_str_neq(msgs[i], msgs[j], "cases %zu and %zu", j, i);
        free(out);
        free(err);
        free(p);
    }
    for (size_t i = 0; i < n; i++)
        free(msgs[i]);
    free(msgs);
}

Test(cli_inspect, verify_index_mismatch)
{
    write_model(g_dir, model_tensors, 4, 100);
    char *p = th_path(g_dir, "model.safetensors.index.json");
    const char *idx = "{\"metadata\":{},\"weight_map\":{"
                      "\"embed\":\"model-00001-of-00002.safetensors\","
                      "\"layers.0.w\":\"model-00001-of-00002.safetensors\","
                      "\"layers.0.norm\":\"model-00002-of-00002.safetensors\"}}";
    cr_assert_eq(th_write(p, idx, strlen(idx)), 0);
    char *out, *err;
    int rc = run(&out, &err, "mergestream verify '%s'", g_dir);
    cr_assert_eq(rc, 1);
    cr_assert_eq(count_lines(err), 1, "%s", err);
    cr_assert(strstr(err, "'lm_head'"), "%s", err);
    cr_assert(strstr(err, "not in the weight_map"), "%s", err);
    free(out);
    free(err);
    free(p);
}

Test(cli_inspect, verify_several_paths)
{
    char *good = th_path(g_dir, "good.safetensors"), *bad = th_path(g_dir, "bad.safetensors");
    const void *data[4] = {zeros, zeros, zeros, zeros};
    cr_assert_eq(ms_st_write_file(good, model_tensors, data, 4), 0, "%s", ms_errmsg());
    cr_assert_eq(th_write(bad, "abc", 3), 0);
    char *out, *err, want[4200];
    int rc = run(&out, &err, "mergestream verify '%s' '%s'", bad, good);
    cr_assert_eq(rc, 1);
    snprintf(want, sizeof want, "ok: %s (4 tensors, 176 bytes)\n", good);
    cr_assert_str_eq(out, want);
    cr_assert_eq(count_lines(err), 1, "%s", err);
    cr_assert(strstr(err, bad));
    free(out);
    free(err);
    free(good);
    free(bad);
}

Test(cli_inspect, verify_no_model)
{
    char *out, *err;
    int rc = run(&out, &err, "mergestream verify '%s'", g_dir);
    cr_assert_eq(rc, 1);
    cr_assert(strstr(err, g_dir), "%s", err);
    free(out);
    free(err);
    char *p = th_path(g_dir, "pytorch_model.bin");
    cr_assert_eq(th_write(p, "PK", 2), 0);
    rc = run(&out, &err, "mergestream verify '%s'", g_dir);
    cr_assert_eq(rc, 1);
    cr_assert(strstr(err, "convert to safetensors"), "%s", err);
    free(out);
    free(err);
    rc = run(&out, &err, "mergestream verify '%s/absent'", g_dir);
    cr_assert_eq(rc, 1);
    cr_assert(strstr(err, "absent"), "%s", err);
    free(out);
    free(err);
    free(p);
}

Test(cli_inspect, usage)
{
    char *out, *err;
    static const char *const cmds[] = {"verify", "inspect"};
    for (int i = 0; i < 2; i++) {
        int rc = run(&out, &err, "mergestream %s --help", cmds[i]);
        cr_assert_eq(rc, 0);
        cr_assert(strstr(out, "usage: mergestream"), "%s", out);
        cr_assert_str_empty(err);
        free(out);
        free(err);
        rc = run(&out, &err, "mergestream %s --bogus x", cmds[i]);
        cr_assert_eq(rc, 2);
        cr_assert(strstr(err, "'--bogus'"), "%s", err);
        cr_assert(strstr(err, "usage: mergestream"), "%s", err);
        free(out);
        free(err);
        rc = run(&out, &err, "mergestream %s", cmds[i]);
        cr_assert_eq(rc, 2);
        cr_assert(strstr(err, "usage: mergestream"), "%s", err);
        free(out);
        free(err);
    }
    int rc = run(&out, &err, "mergestream inspect a b");
    cr_assert_eq(rc, 2);
    free(out);
    free(err);
}

/* ------------------------------------------------------------------ inspect */

Test(cli_inspect, inspect_table)
{
    write_model(g_dir, model_tensors, 4, 100);
    char *out, *err;
    int rc = run(&out, &err, "mergestream inspect '%s'", g_dir);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_eq(count_lines(out), 6, "%s", out);
    cr_assert(strstr(out, "NAME"), "%s", out);
    /* shard 1 holds embed, layers.0.w (96 bytes, then norm would pass 100) */
    cr_assert(strstr(out, "embed"), "%s", out);
    cr_assert(strstr(out, "[8, 4]"), "%s", out);
    cr_assert(strstr(out, "model-00002-of-00002.safetensors"), "%s", out);
    cr_assert(strstr(out, "total: 4 tensors, 176 bytes, 2 files\n"), "%s", out);
    const char *line = strstr(out, "layers.0.norm");
    cr_assert(line);
    cr_assert(strstr(line, "F32"));
    free(out);
    free(err);
}

Test(cli_inspect, inspect_json)
{
    write_model(g_dir, model_tensors, 4, 100);
    char *out, *err;
    int rc = run(&out, &err, "mergestream inspect --json '%s'", g_dir);
    cr_assert_eq(rc, 0, "%s", err);
    json_error_t je;
    json_t *j = json_loads(out, 0, &je);
    cr_assert_not_null(j, "%s: %s", je.text, out);
    cr_assert_eq(json_integer_value(json_object_get(j, "total_tensors")), 4);
    cr_assert_eq(json_integer_value(json_object_get(j, "total_bytes")), 176);
    cr_assert(json_is_true(json_object_get(j, "indexed")));
    json_t *ts = json_object_get(j, "tensors");
    cr_assert_eq(json_array_size(ts), 4);
    json_t *t0 = json_array_get(ts, 0);
    cr_assert_str_eq(json_string_value(json_object_get(t0, "name")), "embed");
    cr_assert_str_eq(json_string_value(json_object_get(t0, "dtype")), "BF16");
    cr_assert_eq(json_integer_value(json_array_get(json_object_get(t0, "shape"), 0)), 8);
    cr_assert_eq(json_integer_value(json_object_get(t0, "bytes")), 64);
    cr_assert_str_eq(json_string_value(json_object_get(t0, "file")),
                     "model-00001-of-00002.safetensors");
    cr_assert_eq(json_array_size(json_object_get(j, "files")), 2);
    json_decref(j);
    free(out);
    free(err);
}

Test(cli_inspect, inspect_bad_file)
{
    char *p = th_path(g_dir, "x.safetensors");
    cr_assert_eq(th_write(p, "\x02\0\0\0\0\0\0\0{}\0", 11), 0);
    char *out, *err;
    int rc = run(&out, &err, "mergestream inspect '%s'", p);
    cr_assert_eq(rc, 1);
    cr_assert_eq(count_lines(err), 1, "%s", err);
    cr_assert(strstr(err, "trailing"), "%s", err);
    free(out);
    free(err);
    free(p);
}
