/*
 * test_limits.c - limits and odd inputs through the command line (issue 12,
 * items 9-15): many inputs to one tensor, empty and odd output paths, corrupt
 * and odd compressed inputs, huge layer indices, numeric option overflow, a
 * config.json that is no object, "{}" inside quotes in --pipe, weights that
 * sum to zero. Every refusal is one line on stderr and a non-zero exit, no
 * crash (the ASan+UBSan build runs the same commands).
 */
#include <criterion/criterion.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ms_stage.h"
#include "th.h"

static char *g_dir;

#define run(out, err, ...) th_run_in(g_dir, out, err, __VA_ARGS__)

#define RUN_OK(...) TH_RUN_OK(g_dir, __VA_ARGS__)

/* Runs cmd (from g_dir) and asserts a clean refusal (th_fail_problem). */
#define expect_fail(want, has, cmd) TH_RUN_FAILS(g_dir, want, has, "%s", cmd)

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    RUN_OK("ms-mkmodel --layers 1 --hidden 64 --intermediate 96 --vocab 16 base >/dev/null");
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(limits, .init = setup, .fini = teardown, .timeout = 300);

/* A linear recipe over `n` models named prefix1, prefix2, ..., weights 1. */
static void write_linear(const char *file, int n, const char *prefix, const char *extra)
{
    size_t cap = 64 + (size_t)n * 96 + strlen(extra);
    char *s = malloc(cap), *p = s;
    p += sprintf(p, "merge_method: linear\n%smodels:\n", extra);
    for (int i = 1; i <= n; i++) {
        p += sprintf(p, "  - model: %s%d\n    parameters: {weight: 1}\n", prefix, i);
    }
    char *path = th_path(g_dir, file);
    cr_assert_eq(th_write(path, s, strlen(s)), 0);
    free(path);
    free(s);
}

/* Item 9: up to MS_MAX_INPUTS models feed one tensor; one more is a clean
 * one-line refusal, in plan and in merge. The mean of identical copies is the
 * model itself in float32 compute (a bf16 value has 8 significant bits, so the
 * float32 sum of up to 32 equal ones is exact, and dividing it by the count
 * gives the value back), so the merge of 17 or 32 copies equals that of one. */
Test(limits, many_inputs)
{
    cr_assert_eq(MS_MAX_INPUTS, 32);
    RUN_OK("for i in $(seq 1 33); do cp -r base c$i; done");
    write_linear("one.yml", 1, "c", "dtype: float32\n");
    write_linear("r17.yml", 17, "c", "dtype: float32\n");
    write_linear("r32.yml", 32, "c", "dtype: float32\n");
    write_linear("r33.yml", 33, "c", "dtype: float32\n");
    RUN_OK("mergestream plan r32.yml >/dev/null");
    RUN_OK("mergestream merge -q one.yml o1 && mergestream merge -q r17.yml o17 && "
           "mergestream merge -q r32.yml o32 -j 2");
    RUN_OK("cmp o1/model.safetensors o17/model.safetensors && "
           "cmp o1/model.safetensors o32/model.safetensors");
    expect_fail(1, "33 models in one slice; at most 32 are supported",
                "mergestream plan r33.yml >/dev/null");
    expect_fail(1, "33 models in one slice; at most 32 are supported",
                "mergestream merge r33.yml o33");
    struct stat st;
    char *o33 = th_path(g_dir, "o33");
    cr_assert(stat(o33, &st) < 0, "o33 was created");
    free(o33);
}

/* Item 10: an empty OUT is refused (it overflowed a buffer in mkdir_p); a
 * corrupt .zst input fails with one line (and, in the ASan build, no leak). */
Test(limits, empty_out_and_corrupt_zst)
{
    expect_fail(1, "empty", "printf 'merge_method: linear\\nmodels:\\n  - model: base\\n"
                            "    parameters: {weight: 1}\\n' >r.yml && mergestream merge r.yml ''");
    /* Two frames with their sizes: the plan decodes only the first (the header),
     * the merge meets the damaged second one. */
    RUN_OK("mkdir z && cp base/*.json z/ && ms-mkmodel --base base --dtype f32 zf >/dev/null && "
           "head -c 60000 zf/model.safetensors >z/a && tail -c +60001 zf/model.safetensors >z/b "
           "&& zstd -q z/a z/b && cat z/a.zst z/b.zst >z/model.safetensors.zst && "
           "rm z/a z/b z/a.zst z/b.zst && "
           "n=$(stat -c %%s z/model.safetensors.zst) && "
           "printf 'XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX' | "
           "dd of=z/model.safetensors.zst bs=1 seek=$((n - 100)) conv=notrunc 2>/dev/null");
    RUN_OK("mergestream plan r.yml >/dev/null");
    RUN_OK("sed 's/model: base/model: z/' r.yml >rz.yml");
    expect_fail(1, "model.safetensors.zst", "mergestream merge rz.yml oz");
    RUN_OK("test ! -e oz/model.safetensors");
}

/* Item 13: a layer index past the model's tensor count is an error naming the
 * tensor, at once (it made the plan loop ~1.8e19 times). The model has no
 * num_hidden_layers in its config, so the count would come from the names. */
Test(limits, huge_layer_index)
{
    RUN_OK("mkdir h && cp base/*.json h/ && "
           "sed -i 's/\"num_hidden_layers\": *[0-9]*,//' h/config.json && "
           "! grep -q num_hidden_layers h/config.json");
    /* The header with one tensor renamed: the JSON text edited, padded with
     * spaces to a multiple of 8 bytes; the data section is unchanged. */
    static const char from[] = "\"model.layers.0.input_layernorm.weight\"",
                      to[] = "\"model.layers.18446744073709551609.input_layernorm.weight\"";
    char *src = th_path(g_dir, "base/model.safetensors"), *dst = th_path(g_dir, "h/model.safetensors");
    size_t len;
    unsigned char *b = (unsigned char *)th_read(src, &len);
    cr_assert(b && len > 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | b[i];
    char *hdr = strndup((const char *)b + 8, (size_t)n);
    char *at = strstr(hdr, from);
    cr_assert(at, "no %s in the header", from);
    size_t nh = n - strlen(from) + strlen(to), pad = (8 - nh % 8) % 8;
    unsigned char *o = calloc(1, 8 + nh + pad + (len - 8 - n));
    size_t k = (size_t)(at - hdr);
    memcpy(o + 8, hdr, k);
    memcpy(o + 8 + k, to, strlen(to));
    memcpy(o + 8 + k + strlen(to), at + strlen(from), n - k - strlen(from));
    memset(o + 8 + nh, ' ', pad);
    memcpy(o + 8 + nh + pad, b + 8 + n, len - 8 - n);
    for (int i = 0; i < 8; i++)
        o[i] = (unsigned char)((nh + pad) >> (8 * i));
    cr_assert_eq(th_write(dst, o, 8 + nh + pad + (len - 8 - n)), 0);
    free(o);
    free(hdr);
    free(b);
    free(src);
    free(dst);
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: h\\n    parameters: {weight: 1}\\n'"
           " >rh.yml");
    expect_fail(1, "tensor 'model.layers.18446744073709551609.input_layernorm.weight' has layer "
                   "index 18446744073709551609 but the model has only",
                "timeout 60 mergestream plan rh.yml >/dev/null");
}

/* Item 15: option values that do not fit are refused, not wrapped or saturated. */
Test(limits, numeric_options)
{
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: base\\n"
           "    parameters: {weight: 1}\\n' >r.yml");
    expect_fail(2, "--part", "mergestream merge r.yml o --part 1/-1");
    expect_fail(2, "--part", "mergestream merge r.yml o --part 1/4294967296");
    expect_fail(2, "--part", "mergestream merge r.yml o --part +1/2");
    expect_fail(2, "--random-seed", "mergestream merge r.yml o --random-seed 18446744073709551616");
    expect_fail(2, "--random-seed", "mergestream plan r.yml --random-seed 99999999999999999999999");
    expect_fail(2, "--random-seed", "mergestream plan r.yml --random-seed ' 1'");
    RUN_OK("mergestream plan r.yml --random-seed 18446744073709551615 >/dev/null");
}

/* Item 15: config.json of [] (with override_architecture, so nothing reads it
 * before the output config is made) is "not a JSON object", not "out of memory". */
Test(limits, config_not_object)
{
    RUN_OK("cp -r base a && echo '[]' >a/config.json && "
           "printf 'merge_method: linear\\nmodels:\\n  - model:\\n      model: a\\n"
           "      override_architecture: LlamaForCausalLM\\n"
           "    parameters: {weight: 1}\\ndtype: float32\\n' >r.yml");
    expect_fail(1, "model 'a': config.json is not a JSON object", "mergestream plan r.yml >/dev/null");
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: a\\n"
           "    parameters: {weight: 1}\\n' >r2.yml");
    expect_fail(1, "model 'a': config.json is not a JSON object", "mergestream plan r2.yml >/dev/null");
}

/* Item 15: a dangling symlink as OUT and a FIFO named like a compressed shard. */
Test(limits, odd_paths)
{
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: base\\n"
           "    parameters: {weight: 1}\\n' >r.yml && ln -s nowhere/at/all dang");
    expect_fail(1, "dang: output path is a symbolic link to a missing target",
                "mergestream merge r.yml dang");
    RUN_OK("mkdir f && cp base/*.json f/ && mkfifo f/model.safetensors.zst && "
           "sed 's/model: base/model: f/' r.yml >rf.yml");
    expect_fail(1, "model.safetensors.zst: not a regular file",
                "timeout 60 mergestream plan rf.yml >/dev/null");
}

/* Item 15: "{}" inside double or single quotes in --pipe names the file without
 * literal quotes; outside quotes it still works. */
Test(limits, pipe_braces_in_quotes)
{
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: base\\n"
           "    parameters: {weight: 1}\\n' >r.yml && mkdir d s p && "
           "mergestream merge -q r.yml ref");
    RUN_OK("mergestream merge -q r.yml x --pipe 'cat >\"d/{}\"'");
    RUN_OK("mergestream merge -q r.yml x --pipe \"cat >'s/{}'\"");
    RUN_OK("mergestream merge -q r.yml x --pipe 'cat >p/{}'");
    RUN_OK("for f in ref/*; do n=$(basename $f); cmp $f d/$n && cmp $f s/$n && cmp $f p/$n; "
           "done && ls d | grep -vq \"'\" && ls s | grep -vq '\"'");
}

/* Item 15: linear weights summing to zero with normalize: true give NaN/Inf as in
 * mergekit (0/0): exit 0, with one warning naming the recipe. */
Test(limits, zero_weight_sum_warns)
{
    RUN_OK("cp -r base b2 && printf 'merge_method: linear\\nmodels:\\n  - model: base\\n"
           "    parameters: {weight: 1}\\n  - model: b2\\n    parameters: {weight: -1}\\n' >r.yml");
    char *err = NULL;
    int rc = run(NULL, &err, "mergestream merge r.yml o");
    cr_assert_eq(rc, 0, "exit %d: %s", rc, err);
    cr_assert(err && strstr(err, "r.yml: the weights sum to zero for"), "stderr: %s", err);
    cr_assert(strstr(err, "normalize: true"), "stderr: %s", err);
    free(err);
    err = NULL;
    RUN_OK("sed 's/weight: -1/weight: -0.5/' r.yml >r2.yml");
    rc = run(NULL, &err, "mergestream merge r2.yml o2");
    cr_assert_eq(rc, 0, "exit %d: %s", rc, err);
    cr_assert(!err || !strstr(err, "sum to zero"), "stderr: %s", err);
    free(err);
}

/* Item 12: small files are read only when regular and at most MS_SMALL_FILE_MAX
 * bytes: a tokenizer.json or an index that is /dev/zero, and a 300 MB (sparse)
 * tokenizer.json, are one-line errors, at once (they grew memory without end). */
Test(limits, small_files_bounded)
{
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: t\\n"
           "    parameters: {weight: 1}\\n' >r.yml && cp -r base t && "
           "ln -sf /dev/zero t/tokenizer.json");
    /* Refused by the containment rule (docs/RELIABILITY.md) before any read. */
    expect_fail(1, "t/tokenizer.json: resolves to /dev/zero, outside the model folder",
                "timeout 60 mergestream merge r.yml o");
    RUN_OK("test ! -e o/tokenizer.json && rm t/tokenizer.json && truncate -s 300M t/tokenizer.json");
    expect_fail(1, "t/tokenizer.json: 314572800 bytes, over the 256 MiB limit",
                "timeout 60 mergestream merge r.yml o2");
    RUN_OK("test ! -e o2/tokenizer.json && cp base/tokenizer.json t/ && "
           "ln -s /dev/zero t/model.safetensors.index.json");
    expect_fail(1, "model.safetensors.index.json: not a regular file",
                "timeout 60 mergestream plan r.yml >/dev/null");
}

/* Item 11: a merge whose reader stopped reading still stops on SIGINT/SIGTERM
 * (within the 200 ms poll, here under 20 s even in the sanitized build), kills the
 * --pipe command and what it started, and --stall-timeout fails with a message. */
Test(limits, stoppable_when_the_reader_stalls)
{
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: base\\n"
           "    parameters: {weight: 1}\\n' >r.yml");
    /* The shell runs "sleep 41.25" as its child: the child must go too. */
    char *out = NULL;
    int rc = run(&out, NULL,
                 "(timeout 60 mergestream merge -q r.yml x --pipe 'sleep 41.25; true' & p=$!; "
                 "sleep 2; kill -INT $p; wait $p; echo \"rc=$?\"); sleep 0.5; "
                 "if pgrep -f '^sleep 41[.]25$' >/dev/null; then echo orphan; fi");
    cr_assert_eq(rc, 0);
    cr_assert(out && strstr(out, "rc=130"), "%s", out);
    cr_assert(!strstr(out, "orphan"), "the pipe command's child survived: %s", out);
    free(out);
    out = NULL;
    /* tar on a FIFO whose reader never reads (the model is over the 64 KiB pipe buffer) */
    rc = run(&out, NULL,
             "mkfifo fifo && (sleep 30 <fifo &) && "
             "(timeout 60 mergestream merge -q r.yml - >fifo & p=$!; sleep 2; kill -TERM $p; "
             "wait $p; echo \"rc=$?\")");
    cr_assert_eq(rc, 0);
    cr_assert(out && strstr(out, "rc=143"), "%s", out);
    free(out);
    char *err = NULL;
    rc = run(NULL, &err, "timeout 60 mergestream merge -q r.yml x --pipe 'sleep 42.25' "
                         "--stall-timeout 1");
    cr_assert_eq(rc, 1, "exit %d: %s", rc, err);
    cr_assert(err && strstr(err, "sleep 42.25: the reader took no bytes for 1 s while "
                                 "'model.safetensors' was written (--stall-timeout)"), "%s", err);
    /* One line of ours; the killed command's shell may add its own ("Terminated"). */
    cr_assert(!strstr(strstr(err, "mergestream:") + 1, "mergestream:"), "%s", err);
    free(err);
    /* The same report for a tar reader that stopped reading (a FIFO nobody reads). */
    err = NULL;
    rc = run(NULL, &err, "mkfifo fifo2 && (sleep 30 <fifo2 &) && "
                         "timeout 60 mergestream merge -q r.yml - --stall-timeout 1 >fifo2");
    cr_assert_eq(rc, 1, "exit %d: %s", rc, err);
    cr_assert(err && strstr(err, "tar output: the reader took no bytes for 1 s while "
                                 "'model.safetensors' was written (--stall-timeout)"), "%s", err);
    free(err);
    expect_fail(2, "--stall-timeout", "mergestream merge r.yml x --stall-timeout -1");
}

/* Item 11: a SIGKILLed merge takes its --pipe command with it, and what the
 * command started (io/child.c): the shell's child "sleep 44.25" is gone within
 * 10 s of the kill (polled; it would otherwise live 44 s), and no stray
 * process is left when the command itself is the sleep. */
Test(limits, pipe_command_dies_with_a_killed_merge)
{
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: base\\n"
           "    parameters: {weight: 1}\\n' >r.yml");
    for (int i = 0; i < 2; i++) {
        const char *cmd = i == 0 ? "sleep 44.25; cat >/dev/null" : "exec sleep 44.5";
        const char *pat = i == 0 ? "^sleep 44[.]25$" : "^sleep 44[.]5$";
        char *out = NULL;
        int rc = run(&out, NULL,
                     "mergestream merge -q r.yml x --pipe '%s' & p=$!; "
                     "i=0; until pgrep -f '%s' >/dev/null; do "
                     "  i=$((i+1)); [ $i -lt 300 ] || { echo never-started; break; }; sleep 0.1; "
                     "done; kill -KILL $p; wait $p; echo \"rc=$?\"; "
                     "i=0; while pgrep -f '%s' >/dev/null; do "
                     "  i=$((i+1)); [ $i -lt 100 ] || { echo orphan; break; }; "
                     "  sleep 0.1; "
                     "done",
                     cmd, pat, pat);
        cr_assert_eq(rc, 0);
        cr_assert(out && strstr(out, "rc=137") && !strstr(out, "never-started"), "%s", out);
        cr_assert(!strstr(out, "orphan"), "the --pipe command outlived the merge: %s", out);
        free(out);
    }
}

/* Item 14: a 40,000-shard index (one 4-byte tensor per shard) is opened in time
 * linear in the shards: the shard de-duplication and the model-wide tensor
 * index (ms_model_tensor_at) are hash and binary-search lookups now (it was
 * 7.6 s and more, quadratic). The test checks the result; the suite's timeout
 * bounds the time. */
Test(limits, many_shards)
{
    enum { N = 40000 };
    char *dir = th_path(g_dir, "shards");
    cr_assert_eq(mkdir(dir, 0755), 0);
    size_t cap = (size_t)N * 64 + 64, n = 0;
    char *idx = malloc(cap);
    n += (size_t)snprintf(idx + n, cap - n, "{\"weight_map\": {");
    for (int i = 0; i < N; i++) {
        char name[64], hdr[128], path[4096];
        snprintf(name, sizeof name, "s%05d.safetensors", i);
        int hl = snprintf(hdr, sizeof hdr,
                          "{\"t%05d\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", i);
        while (hl % 8)
            hdr[hl++] = ' ';
        unsigned char buf[8 + 128 + 4] = { 0 };
        for (int b = 0; b < 8; b++)
            buf[b] = (unsigned char)((uint64_t)hl >> (8 * b));
        memcpy(buf + 8, hdr, (size_t)hl);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        cr_assert_eq(th_write(path, buf, 8 + (size_t)hl + 4), 0);
        n += (size_t)snprintf(idx + n, cap - n, "%s\"t%05d\": \"%s\"", i ? ", " : "", i, name);
    }
    n += (size_t)snprintf(idx + n, cap - n, "}}\n");
    char *ip = th_path(dir, "model.safetensors.index.json");
    cr_assert_eq(th_write(ip, idx, n), 0);
    char *out = NULL;
    char *err = NULL;
    int rc = run(&out, &err, "mergestream inspect shards | tail -1");
    cr_assert_eq(rc, 0);
    cr_assert(out && strstr(out, "total: 40000 tensors, 160000 bytes, 40000 files"), "%s %s", out,
              err);
    free(err);
    free(out);
    out = NULL;
    rc = run(&out, NULL, "mergestream inspect shards | grep -c '^t[0-9]'");
    cr_assert(out && atoi(out) == N, "%s", out);
    free(out);
    free(ip);
    free(idx);
    free(dir);
}

/* Writes DIR/model.safetensors (DIR under g_dir) with n one-element F32 tensors
 * t000000, t000001, ... and no config.json; returns the header length. */
static uint64_t write_wide(const char *name, int n_tensors)
{
    size_t cap = (size_t)n_tensors * 72 + 64, n = 8;
    char *buf = malloc(cap);
    cr_assert(buf);
    n += (size_t)snprintf(buf + n, cap - n, "{");
    for (int i = 0; i < n_tensors; i++)
        n += (size_t)snprintf(buf + n, cap - n,
                              "%s\"t%06d\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[%d,%d]}",
                              i ? "," : "", i, 4 * i, 4 * i + 4);
    n += (size_t)snprintf(buf + n, cap - n, "}");
    while ((n - 8) % 8)
        buf[n++] = ' ';
    uint64_t hl = n - 8;
    for (int b = 0; b < 8; b++)
        buf[b] = (char)(unsigned char)(hl >> (8 * b));
    char *dir = th_path(g_dir, name);
    cr_assert_eq(mkdir(dir, 0755), 0);
    char *path = th_path(dir, "model.safetensors");
    cr_assert_eq(th_write(path, buf, n), 0);
    RUN_OK("truncate -s +%d %s/model.safetensors && printf 'merge_method: linear\\nmodels:\\n"
           "  - model: %s\\n    parameters: {weight: 1}\\n' >%s.yml",
           4 * n_tensors, name, name, name);
    free(path);
    free(dir);
    free(buf);
    return hl;
}

/* Item 14: a model of 120,000 tensors (one F32 each, no config.json, so the
 * architecture is inferred from the names) plans in time near-linear in the
 * tensors: the architecture's names are a hash index (pipeline/arch.c). It took
 * 24 s of CPU at 80,000 tensors before (every tensor compared with every name),
 * ~1.5 s now; 120,000 would take ~54 s quadratic, so the 60 s limit on the plan
 * (generous for a loaded or sanitized build) fails the quadratic code. */
Test(limits, many_tensors_plan)
{
    write_wide("wide", 120000);
    char *out = NULL, *err = NULL;
    int rc = run(&out, &err, "timeout 60 mergestream plan wide.yml");
    cr_assert_eq(rc, 0, "exit %d (124: over 60 s): %s", rc, err);
    cr_assert(out && strstr(out, "output:       120000 tensors"), "%s", out);
    free(out);
    free(err);
}

/* Item 14: a header is parsed whole (about 12.5 times its size at peak), so it
 * may be at most 1/16 of --max-memory, and never less than 2 MiB: a header of
 * ~2.9 MB is refused under --max-memory 40M (limit 40 MiB / 16 = 2621440 bytes)
 * with one line naming the file, before it is read, and planned under 64M. */
Test(limits, header_counts_against_max_memory)
{
    uint64_t hl = write_wide("hdr", 40000);
    cr_assert(hl > 2621440 && hl < 4194304, "header %llu", (unsigned long long)hl);
    char msg[256];
    snprintf(msg, sizeof msg, "hdr/model.safetensors: header length %llu is over the limit of "
             "2621440 bytes (1/16 of --max-memory, at least 2 MiB", (unsigned long long)hl);
    expect_fail(1, msg, "mergestream plan hdr.yml --max-memory 40M");
    expect_fail(1, msg, "mergestream merge hdr.yml o --max-memory 40M");
    RUN_OK("test ! -e o && mergestream plan hdr.yml --max-memory 64M >/dev/null");
    /* 2 MiB always pass, whatever the budget. */
    write_wide("small", 20000);
    RUN_OK("mergestream merge -q small.yml o2 --max-memory 1M");
}

/* Noticed with item 15: parts of one merge running at once into one directory
 * must not remove each other's temporaries. Part 1 of 2 (shards 1, 3, ...) runs
 * to the end beside a .partial of part 2's shard 2 (as if part 2 were writing
 * it) and one of its own: its own is replaced, part 2's is left as it was. */
Test(limits, part_leaves_other_parts_temporaries)
{
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: base\\n"
           "    parameters: {weight: 1}\\n' >r.yml && "
           "mergestream merge -q r.yml full --out-shard-size 20K && ls full");
    char *out = NULL;
    int rc = run(&out, NULL, "ls full | grep -c '^model-0000.-of-0000.\\.safetensors$'");
    cr_assert_eq(rc, 0);
    int n = atoi(out);
    free(out);
    cr_assert(n >= 3, "%d shards", n);
    RUN_OK("mkdir p && echo other >p/model-00002-of-0000%d.safetensors.partial && "
           "echo mine >p/model-00001-of-0000%d.safetensors.partial && "
           "mergestream merge -q r.yml p --out-shard-size 20K --part 1/2 --force && "
           "test \"$(cat p/model-00002-of-0000%d.safetensors.partial)\" = other && "
           "test ! -e p/model-00001-of-0000%d.safetensors.partial && "
           "cmp p/model-00001-of-0000%d.safetensors full/model-00001-of-0000%d.safetensors",
           n, n, n, n, n, n);
}

/* Noticed with item 4: the output config.json is written as Python's
 * json.dumps (transformers' save_pretrained, ensure_ascii) writes it, which
 * escapes every character outside ' '..'~': DEL (0x7f) as \u007f like the
 * control characters, and non-ASCII as \uXXXX. The donor's config has a raw DEL
 * byte and escaped ones; `plan --json` escapes the same way (a model folder
 * whose name has a DEL). */
Test(limits, config_json_escapes_del_as_python)
{
    RUN_OK("cp -r base d && printf 'merge_method: linear\\nmodels:\\n  - model: d\\n"
           "    parameters: {weight: 1}\\n' >d.yml");
    char *cp = th_path(g_dir, "d/config.json");
    char *old = th_read(cp, NULL);
    cr_assert(old && old[0] == '{');
    /* a, raw DEL, b, \u0001, c, e-acute, \u007f */
    size_t cap = strlen(old) + 64;
    char *cfg = malloc(cap);
    cr_assert(cfg);
    snprintf(cfg, cap, "{\n  \"note\": \"a\x7f" "b\\u0001c\\u00e9\\u007f\",%s", old + 1);
    cr_assert_eq(th_write(cp, cfg, strlen(cfg)), 0);
    free(cfg);
    RUN_OK("mergestream merge -q d.yml o");
    char *path = th_path(g_dir, "o/config.json");
    cfg = th_read(path, NULL);
    cr_assert(cfg);
    cr_assert(strstr(cfg, "\"note\": \"a\\u007fb\\u0001c\\u00e9\\u007f\""), "%s", cfg);
    cr_assert(!strchr(cfg, 0x7f), "raw DEL in %s", cfg);
    free(cfg);
    cfg = NULL;
    /* A model folder named "d<DEL>x" (a YAML escape in the recipe). */
    int rc = run(&cfg, NULL, "cp -r base \"$(printf 'd\\177x')\" && "
                 "printf 'merge_method: linear\\nmodels:\\n  - model: \"d\\\\x7fx\"\\n"
                 "    parameters: {weight: 1}\\n' >dx.yml && mergestream plan --json dx.yml");
    cr_assert_eq(rc, 0, "%s", cfg);
    cr_assert(cfg && strstr(cfg, "\"ref\": \"d\\u007fx\""), "%s", cfg);
    cr_assert(!strchr(cfg, 0x7f), "raw DEL in plan --json: %s", cfg);
    free(cfg);
    free(path);
    free(old);
    free(cp);
}
