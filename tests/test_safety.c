/*
 * test_safety.c - output safety through the CLI (issue 12, items 1-6 and 8):
 * planted symlinks are never written through, donor files and index shards
 * must resolve inside their model folder, control characters are escaped on
 * the terminal, OUT may not be or hold an input, OUT is locked while a run
 * writes it, and a reused OUT ends with exactly the new output.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "th.h"

static char *g_dir;

#define run(out, err, ...) th_run_in(g_dir, out, err, __VA_ARGS__)

#define RUN_OK(...) TH_RUN_OK(g_dir, __VA_ARGS__)

/* A command that must fail cleanly: exit 1, one line on stderr holding `want`. */
#define RUN_FAILS(want, ...) TH_RUN_FAILS(g_dir, 1, want, __VA_ARGS__)

static const char recipe[] =
    "merge_method: linear\n"
    "dtype: bfloat16\n"
    "models:\n"
    "  - model: base\n"
    "    parameters: {weight: 0.6}\n"
    "  - model: ft1\n"
    "    parameters: {weight: 0.4}\n";

/* Two small models (each three shards with an index) and the reference merge in ref/m. */
static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    char *p = th_path(g_dir, "r.yml");
    cr_assert_eq(th_write(p, recipe, strlen(recipe)), 0);
    free(p);
    RUN_OK("ms-mkmodel --layers 2 --hidden 64 --intermediate 96 --vocab 128 --dtype bf16 "
           "--seed 3 --shard-size 60K base >/dev/null && "
           "ms-mkmodel --base base --noise 0.01 --seed 4 ft1 >/dev/null && "
           "mergestream merge r.yml ref/m -q");
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(safety, .init = setup, .fini = teardown, .timeout = 120);

static bool file_is(const char *rel, const char *want)
{
    char *p = th_path(g_dir, rel);
    size_t len = 0;
    char *d = th_read(p, &len);
    bool ok = d && len == strlen(want) && !memcmp(d, want, len);
    free(d);
    free(p);
    return ok;
}

/* ---------------------------------------------------------------- 1: temporaries */

Test(safety, planted_temporary_symlinks_are_not_followed)
{
    /* Every temporary a merge creates, planted as a symlink to a victim file:
     * raw shard, zstd shard (through ms_out), and the small files. */
    RUN_OK("printf keep > victim && mkdir -p o z && "
           "for t in model.safetensors.partial config.json.tmp tokenizer.json.tmp "
           "README.md.tmp mergekit_config.yml.tmp; do ln -s ../victim o/$t; done && "
           "ln -s ../victim z/model.safetensors.zst.partial && "
           "mergestream merge r.yml o -q --force && "
           "mergestream merge r.yml z -q --force --compress zstd");
    cr_assert(file_is("victim", "keep"), "a merge wrote through a planted symlink");
    /* The outputs are regular files with the reference's bytes, no temporary is left. */
    RUN_OK("for f in model.safetensors config.json tokenizer.json README.md; do "
           "test -f o/$f && test ! -L o/$f && test ! -e o/$f.tmp || exit 1; done && "
           "test ! -e o/model.safetensors.partial && test ! -L o/model.safetensors.partial && "
           "cmp o/model.safetensors ref/m/model.safetensors && "
           "test -f z/model.safetensors.zst && test ! -L z/model.safetensors.zst.partial");
}

/* ---------------------------------------------------------------- 2: copied files */

Test(safety, donor_file_linking_outside_is_refused_before_writing)
{
    RUN_OK("printf secret > secret && rm base/tokenizer.json && "
           "ln -s \"$PWD/secret\" base/tokenizer.json");
    RUN_FAILS("outside the model folder", "mergestream merge r.yml o -q");
    RUN_OK("test ! -e o"); /* refused before anything was written */
    RUN_FAILS("outside the model folder", "mergestream merge r.yml - -q > out.tar");
    RUN_OK("! grep -q secret out.tar");
}

Test(safety, copied_files_never_widen_permissions)
{
    RUN_OK("chmod 600 base/tokenizer.json && chmod 640 base/tokenizer_config.json && "
           "umask 022 && mergestream merge r.yml o -q && mergestream merge r.yml - -q > o.tar");
    RUN_OK("test \"$(stat -c %%a o/tokenizer.json)\" = 600 && "
           "test \"$(stat -c %%a o/tokenizer_config.json)\" = 640 && "
           "test \"$(stat -c %%a o/special_tokens_map.json)\" = 644");
    RUN_OK("tar tvf o.tar | grep -q -- '^-rw------- .* tokenizer.json$' && "
           "tar tvf o.tar | grep -q -- '^-rw-r----- .* tokenizer_config.json$'");
}

/* A Hugging Face cache holding base as org/base: its snapshot's files are
 * symlinks into the repository's blobs/, which must be accepted. */
static void make_hf_cache(void)
{
    RUN_OK("H=0123456789abcdef0123456789abcdef01234567 && R=cache/models--org--base && "
           "mkdir -p $R/blobs $R/refs $R/snapshots/$H && printf '%%s\\n' $H > $R/refs/main && "
           "for f in base/*; do n=$(basename $f); cp $f $R/blobs/b-$n; "
           "ln -s ../../blobs/b-$n $R/snapshots/$H/$n; done && "
           "sed 's/model: base/model: org\\/base/' r.yml > hf.yml");
}

Test(safety, hf_cache_symlinks_into_blobs_are_fine)
{
    make_hf_cache();
    RUN_OK("HF_HUB_CACHE=$PWD/cache mergestream merge hf.yml o -q && "
           "for f in ref/m/*.safetensors ref/m/tokenizer.json ref/m/config.json; do "
           "cmp $f o/$(basename $f) || exit 1; done");
}

/* ---------------------------------------------------------------- 3: index, refs */

Test(safety, index_shard_through_a_symlinked_folder_is_refused)
{
    /* "d/<shard>" passes as text; d is a symlink to a folder outside base. */
    RUN_OK("mkdir outside && mv base/model-00002-of-00003.safetensors outside/ && "
           "ln -s ../outside base/d && "
           "sed -i 's#\"model-00002-of-00003.safetensors\"#\"d/model-00002-of-00003.safetensors\"#' "
           "base/model.safetensors.index.json && grep -q d/model base/model.safetensors.index.json");
    RUN_FAILS("resolves outside the model folder", "mergestream inspect base");
    RUN_FAILS("resolves outside the model folder", "mergestream plan r.yml");
}

Test(safety, hf_refs_must_hold_a_commit_hash)
{
    make_hf_cache();
    RUN_OK("printf '../../../../../tmp\\n' > cache/models--org--base/refs/main");
    RUN_FAILS("does not hold a commit hash", "HF_HUB_CACHE=$PWD/cache mergestream plan hf.yml");
}

/* ---------------------------------------------------------------- 4: escaping */

/* A one-tensor F32 safetensors file whose tensor name holds ESC and a newline. */
static void make_evil_file(const char *rel)
{
    static const char hdr[] = "{\"x\\u001b[31m\\nmergestream: forged\":"
                              "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    size_t n = strlen(hdr);
    unsigned char buf[256];
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, hdr, n);
    memset(buf + 8 + n, 0, 4);
    char *p = th_path(g_dir, rel);
    cr_assert_eq(th_write(p, buf, 8 + n + 4), 0);
    free(p);
}

Test(safety, control_characters_are_escaped_on_the_terminal)
{
    make_evil_file("evil.safetensors");
    char *o = NULL, *e = NULL;
    cr_assert_eq(run(&o, &e, "mergestream inspect evil.safetensors"), 0, "%s", e);
    cr_assert(!strchr(o, 0x1b), "raw ESC in: %s", o);
    cr_assert(strstr(o, "x\\x1B[31m\\nmergestream: forged"), "%s", o);
    cr_assert(!strstr(o, "\nmergestream: forged"), "a forged line: %s", o);
    free(o);
    free(e);
    /* An error naming a path with a newline and ESC: still one line, escaped. */
    cr_assert_eq(run(&o, &e, "mergestream inspect \"$(printf 'no\\nmergestream: forged\\033')\""),
                 1);
    cr_assert(!strchr(e, 0x1b), "raw ESC in: %s", e);
    cr_assert(strstr(e, "no\\nmergestream: forged\\x1B"), "%s", e);
    cr_assert_eq(strchr(e, '\n'), e + strlen(e) - 1, "more than one line: %s", e);
    free(o);
    free(e);
}

/* ---------------------------------------------------------------- 5: OUT vs inputs */

Test(safety, out_may_not_be_inside_or_hold_an_input)
{
    RUN_OK("sha256sum base/* > before && ln -s base alias && mkdir top && mv ft1 top/ && "
           "sed 's#model: ft1#model: top/ft1#' r.yml > r2.yml");
    RUN_FAILS("is input model", "mergestream merge r2.yml base -q");
    RUN_FAILS("is input model", "mergestream merge r2.yml alias -q");
    RUN_FAILS("is inside input model", "mergestream merge r2.yml base/sub/out -q");
    RUN_FAILS("is inside input model", "mergestream merge r2.yml alias/sub -q");
    RUN_FAILS("contains input model", "mergestream merge r2.yml top -q --force");
    RUN_FAILS("contains input model", "mergestream merge r2.yml . -q --force");
    RUN_OK("sha256sum -c --quiet before && test ! -e base/sub");
}

/* ---------------------------------------------------------------- 6: lock */

Test(safety, a_second_run_fails_at_once_naming_the_holder)
{
    char *dir = th_path(g_dir, "o");
    cr_assert_eq(mkdir(dir, 0755), 0);
    char *lock = th_path(dir, ".mergestream.lock");
    int fd = open(lock, O_RDWR | O_CREAT, 0644);
    cr_assert(fd >= 0);
    cr_assert_eq(flock(fd, LOCK_EX | LOCK_NB), 0);
    cr_assert_eq(write(fd, "4242\n", 5), 5);
    RUN_FAILS("another mergestream run (pid 4242)", "mergestream merge r.yml o -q");
    RUN_OK("ls -A o | grep -vxq .mergestream.lock; test $? = 1"); /* nothing else written */
    close(fd); /* the holder ends (without removing its file): the next run proceeds */
    RUN_OK("mergestream merge r.yml o -q && test ! -e o/.mergestream.lock && diff -r -x README.md ref/m o");
    free(lock);
    free(dir);
}

/* ---------------------------------------------------------------- 8: reused OUT */

Test(safety, reused_out_ends_with_exactly_the_new_output)
{
    /* An earlier run with three shards and an index, a tokenizer, and a stray
     * temporary; the new run writes one file and no tokenizer. */
    RUN_OK("mergestream merge r.yml o -q --out-shard-size 40K && test -e o/model.safetensors.index.json"
           " && : > o/model-00002-of-00003.safetensors.partial");
    RUN_OK("mergestream merge r.yml o -q --no-copy-tokenizer && "
           "mergestream merge r.yml fresh -q --no-copy-tokenizer && "
           "test \"$(ls -A o)\" = \"$(ls -A fresh)\" && diff -r -x README.md fresh o");
}

Test(safety, foreign_non_empty_out_needs_force)
{
    RUN_OK("mkdir o && printf mine > o/notes.txt && printf mine > o/config.json");
    RUN_FAILS("not empty", "mergestream merge r.yml o -q");
    cr_assert(file_is("o/config.json", "mine"));
    /* --force writes the output beside the user's other files and removes none. */
    RUN_OK("mergestream merge r.yml o -q --force && test \"$(cat o/notes.txt)\" = mine && "
           "cmp o/config.json ref/m/config.json && cmp o/model.safetensors ref/m/model.safetensors");
}

/* ---------------------------------------------------------------- 7: resume fingerprints */

/*
 * Larger models (34 output shards of 2 MB, about 3.5 s with -j1 and small chunks)
 * and a merge into k/ killed (SIGKILL) once its run file lists two finished
 * shards; kref/ is the uninterrupted merge of `recipe_file`. The kill polls
 * the run file; a merge that ends first is started again (th.h).
 */
#define SLOW "-q --out-shard-size 2M -j1 --chunk-elems 1024"
static void killed_run(const char *recipe_file)
{
    RUN_OK("ms-mkmodel --layers 8 --hidden 512 --intermediate 1024 --vocab 1024 --seed 3 B "
           ">/dev/null && ms-mkmodel --base B --noise 0.01 --seed 4 F >/dev/null && "
           "sed 's/model: base/model: B/; s/model: ft1/model: F/' r.yml > big.yml && "
           "sed 's/weight: 0.6/weight: 0.7/' big.yml > big2.yml && "
           "mergestream merge %s kref " SLOW, recipe_file);
    RUN_OK(TH_MERGE_KILLED_AFTER_TWO_SHARDS("big.yml " SLOW));
}

Test(safety, resume_keeps_only_shards_whose_checksum_verifies, .timeout = 300)
{
    killed_run("big.yml");
    RUN_OK("mergestream verify --deep k | grep -q 'checksums match'");
    /* Same size, same header, one data byte changed: only the checksum can tell. */
    RUN_OK("f=k/model-00002-of-00034.safetensors && n=$(stat -c %%s $f) && "
           "printf '\\377' | dd of=$f bs=1 seek=$((n - 3)) conv=notrunc status=none && "
           "! cmp -s $f kref/model-00002-of-00034.safetensors");
    RUN_FAILS("model-00002-of-00034.safetensors: checksum", "mergestream verify --deep k");
    char *o = NULL, *e = NULL;
    cr_assert_eq(run(&o, &e, "mergestream merge big.yml k " SLOW " --resume"), 0, "%s", e);
    cr_assert(strstr(e, "model-00002-of-00034.safetensors does not match this merge"), "%s", e);
    cr_assert(!strstr(e, "model-00001-of-00034.safetensors does not match"), "%s", e);
    free(o);
    free(e);
    RUN_OK("diff -r -x README.md kref k && test ! -e k/.mergestream-run.json && "
           "test ! -e k/.mergestream.lock");
}

Test(safety, resume_with_another_recipe_keeps_nothing, .timeout = 300)
{
    /* big2.yml changes one weight: same tensors, shapes and headers. */
    killed_run("big2.yml");
    char *o = NULL, *e = NULL;
    cr_assert_eq(run(&o, &e, "mergestream merge big2.yml k " SLOW " --resume"), 0, "%s", e);
    cr_assert(strstr(e, "is from a different recipe, options or inputs"), "%s", e);
    free(o);
    free(e);
    RUN_OK("diff -r -x README.md kref k");
}

Test(safety, verify_deep_needs_a_run_file)
{
    RUN_FAILS("no run file", "mergestream verify --deep ref/m");
}
