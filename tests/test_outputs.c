/*
 * test_outputs.c - streaming outputs end to end through `mergestream merge`:
 * every mode gives the bytes of the plain directory output (zstd shards, the tar
 * stream extracted by GNU tar, --pipe commands, a real rclone WebDAV server),
 * compressed inputs, --resume after lost or damaged shards, and --part.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "th.h"

static char *g_dir;

#define run(out, err, ...) th_run_in(g_dir, out, err, __VA_ARGS__)

#define RUN_OK(...) TH_RUN_OK(g_dir, __VA_ARGS__)

static const char recipe[] =
    "merge_method: linear\n"
    "dtype: bfloat16\n"
    "models:\n"
    "  - model: base\n"
    "    parameters: {weight: 0.6}\n"
    "  - model: ft1\n"
    "    parameters: {weight: 0.4}\n";

/* Two small models and a reference merge in ref/m (3 shards). */
static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    char *p = th_path(g_dir, "r.yml");
    cr_assert_eq(th_write(p, recipe, strlen(recipe)), 0);
    free(p);
    RUN_OK("ms-mkmodel --layers 2 --hidden 64 --intermediate 96 --vocab 128 --dtype bf16 "
           "--seed 3 base >/dev/null && ms-mkmodel --base base --noise 0.01 --seed 4 ft1 >/dev/null"
           " && mergestream merge r.yml ref/m -q --out-shard-size 70K");
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(outputs, .init = setup, .fini = teardown, .timeout = 120);

/* The shards of the reference, by name. */
static const char *const shards[] = { "model-00001-of-00003.safetensors",
                                      "model-00002-of-00003.safetensors",
                                      "model-00003-of-00003.safetensors" };

Test(outputs, reference_has_three_shards)
{
    for (size_t i = 0; i < 3; i++)
        RUN_OK("test -s ref/m/%s", shards[i]);
    RUN_OK("mergestream verify ref/m >/dev/null");
}

Test(outputs, zstd_shards_decompress_to_the_raw_bytes)
{
    RUN_OK("mergestream merge r.yml z/m -q --out-shard-size 70K --compress zstd:3");
    for (size_t i = 0; i < 3; i++) {
        RUN_OK("test ! -e z/m/%s", shards[i]);
        RUN_OK("zstd -d -q -c z/m/%s.zst | cmp - ref/m/%s", shards[i], shards[i]);
    }
    /* The index names the files as written; everything else is identical. */
    RUN_OK("grep -q '\"model-00001-of-00003.safetensors.zst\"' z/m/model.safetensors.index.json");
    RUN_OK("sed 's/\\.safetensors\\.zst\"/.safetensors\"/' z/m/model.safetensors.index.json | "
           "cmp - ref/m/model.safetensors.index.json");
    RUN_OK("for f in config.json README.md mergekit_config.yml tokenizer.json; do "
           "cmp z/m/$f ref/m/$f || exit 1; done");
    RUN_OK("ls -a z/m | grep -v -q partial");
}

/* A tar stream has no directory name, so its card says "Untitled Model (1)". */
static void assert_same_as_ref_except_title(const char *dir)
{
    RUN_OK("cd %s && for f in *; do [ \"$f\" = README.md ] || cmp \"$f\" ../ref/m/\"$f\" || exit 1; "
           "done && test \"$(ls | wc -l)\" = \"$(ls ../ref/m | wc -l)\"", dir);
    RUN_OK("sed 's/^# Untitled Model (1)$/# m/' %s/README.md | cmp - ref/m/README.md", dir);
}

Test(outputs, tar_stream_extracts_with_gnu_tar)
{
    RUN_OK("mergestream merge r.yml - -q --out-shard-size 70K > out.tar");
    RUN_OK("mkdir t && tar -x -f out.tar -C t");
    assert_same_as_ref_except_title("t");
}

Test(outputs, zstd_tar_stream_extracts_with_gnu_tar)
{
    RUN_OK("mergestream merge r.yml - -q --out-shard-size 70K --compress zstd > out.tar.zst");
    RUN_OK("mkdir tz && tar --zstd -x -f out.tar.zst -C tz");
    assert_same_as_ref_except_title("tz");
    RUN_OK("mkdir tz2 && zstd -d -q -c out.tar.zst | tar -x -C tz2");
    assert_same_as_ref_except_title("tz2");
}

Test(outputs, pipe_each_file_into_a_command)
{
    RUN_OK("mkdir -p p/m && mergestream merge r.yml m -q --out-shard-size 70K "
           "--pipe 'cat > p/m/{}' && diff -r p/m ref/m");
    /* $MERGESTREAM_FILE carries the name too. */
    RUN_OK("mkdir -p q/m && mergestream merge r.yml m -q --out-shard-size 70K "
           "--pipe 'cat > \"q/m/$MERGESTREAM_FILE\"' && diff -r q/m ref/m");
}

Test(outputs, failing_pipe_command_is_reported)
{
    char *err = NULL;
    int rc = run(NULL, &err, "mergestream merge r.yml m -q --out-shard-size 70K --pipe 'exit 3'");
    cr_assert_eq(rc, 1, "exit %d: %s", rc, err);
    cr_assert(strstr(err, "model-00001-of-00003.safetensors") && strstr(err, "exit status 3"),
              "message: %s", err);
    cr_assert_eq(strchr(err, '\n'), err + strlen(err) - 1, "one line: %s", err);
    free(err);
    /* A command that stops reading midway. */
    rc = run(NULL, &err, "mergestream merge r.yml m -q --out-shard-size 70K "
                         "--pipe 'head -c 1000 > /dev/null'");
    cr_assert_eq(rc, 1, "exit %d: %s", rc, err);
    cr_assert(strstr(err, "model-00001-of-00003.safetensors"), "message: %s", err);
    free(err);
}

Test(outputs, closed_stdout_is_an_error)
{
    char *err = NULL;
    int rc = run(NULL, &err, "sh -c 'mergestream merge r.yml - -q --out-shard-size 70K; "
                         "echo $? > st' | head -c 100 > /dev/null; cat st");
    cr_assert(rc == 0);
    free(err);
    char *st = th_path(g_dir, "st");
    char *txt = th_read(st, NULL);
    cr_assert(txt && atoi(txt) == 1, "exit status %s", txt ? txt : "(none)");
    free(txt);
    free(st);
}

static int free_port(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof a;
    cr_assert(s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0);
    cr_assert(getsockname(s, (struct sockaddr *)&a, &len) == 0);
    int port = ntohs(a.sin_port);
    close(s);
    return port;
}

static bool port_open(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    bool ok = connect(s, (struct sockaddr *)&a, sizeof a) == 0;
    close(s);
    return ok;
}

/*
 * A real remote store: rclone's WebDAV server on a loopback port over a temp
 * directory; the merge streams every file into `rclone rcat` against it.
 */
Test(outputs, pipe_into_rclone_webdav_server, .timeout = 180)
{
    char *store = th_path(g_dir, "store");
    RUN_OK("mkdir -p store");
    int port = free_port();
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        char addr[64];
        snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
        int fd = open("/dev/null", 1);
        dup2(fd, 1);
        dup2(fd, 2);
        execlp("rclone", "rclone", "serve", "webdav", store, "--addr", addr, (char *)NULL);
        _exit(127);
    }
    bool up = false;
    for (int i = 0; i < 200 && !up; i++) {
        struct timespec ts = { 0, 50 * 1000 * 1000 };
        nanosleep(&ts, NULL);
        up = port_open(port);
    }
    char *out = NULL, *err = NULL;
    int rc = -1;
    if (up)
        rc = run(&out, &err,
                 "RCLONE_CONFIG_DAV_TYPE=webdav RCLONE_CONFIG_DAV_URL=http://127.0.0.1:%d "
                 "mergestream merge r.yml m -q --out-shard-size 70K "
                 "--pipe 'rclone rcat --quiet dav:m/{}' && diff -r store/m ref/m",
                 port);
    kill(pid, SIGTERM);
    int st;
    waitpid(pid, &st, 0);
    cr_assert(up, "rclone serve webdav did not start on port %d", port);
    cr_assert_eq(rc, 0, "exit %d\nstdout: %s\nstderr: %s", rc, out, err);
    free(out);
    free(err);
    free(store);
}

Test(outputs, compressed_inputs_single_and_sharded)
{
    /* single model.safetensors.zst made by the zstd tool */
    RUN_OK("mkdir -p zb zf && cp base/*.json zb/ && cp ft1/*.json zf/ && "
           "zstd -q base/model.safetensors -o zb/model.safetensors.zst && "
           "zstd -q ft1/model.safetensors -o zf/model.safetensors.zst");
    RUN_OK("sed -e 's/model: base/model: zb/' -e 's/model: ft1/model: zf/' r.yml > rz.yml && "
           "mergestream merge rz.yml c1/m -q --out-shard-size 70K && cd c1/m && for f in *; do "
           "[ \"$f\" = mergekit_config.yml ] || [ \"$f\" = README.md ] || cmp \"$f\" ../../ref/m/\"$f\" "
           "|| exit 1; done");
    /* sharded inputs whose index names .safetensors.zst files: our own zstd output */
    RUN_OK("mergestream merge r.yml zs/m -q --out-shard-size 70K --compress zstd && "
           "printf 'merge_method: passthrough\\nmodels:\\n  - model: zs/m\\n' > pz.yml && "
           "mergestream merge pz.yml c2/m -q --out-shard-size 70K && "
           "for f in model-00001-of-00003.safetensors model-00002-of-00003.safetensors "
           "model-00003-of-00003.safetensors; do cmp c2/m/$f ref/m/$f || exit 1; done");
}

Test(outputs, resume_keeps_finished_shards_and_matches)
{
    /* A run that fails after its shards are finished (a directory stands where
     * config.json's temporary goes) leaves them with its run file; then one shard
     * is lost and one damaged. */
    RUN_OK("mkdir -p rs/m/config.json.tmp && "
           "! mergestream merge r.yml rs/m -q --out-shard-size 70K --force 2>/dev/null && "
           "test -e rs/m/.mergestream-run.json && rmdir rs/m/config.json.tmp && "
           "rm rs/m/%s && echo damaged > rs/m/%s", shards[1], shards[2]);
    char *out = NULL, *err = NULL;
    int rc = run(&out, &err, "mergestream merge r.yml rs/m --out-shard-size 70K --resume");
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(err, "keeping rs/m/model-00001-of-00003.safetensors"), "%s", err);
    cr_assert(strstr(err, "does not match"), "%s", err);
    free(out);
    free(err);
    RUN_OK("diff -r rs/m ref/m");
}

Test(outputs, parts_together_make_the_whole)
{
    RUN_OK("mergestream merge r.yml pt/m -q --out-shard-size 70K --part 2/2 && "
           "test ! -e pt/m/config.json && test ! -e pt/m/%s", shards[0]);
    RUN_OK("mergestream merge r.yml pt/m -q --out-shard-size 70K --part 1/2 && diff -r pt/m ref/m");
}

/* docs/DISTRIBUTED.md's recipe: one merge as N parts started by a scheduler, each part
 * taking its index from the scheduler's variables (--part auto) and streaming its files to
 * one shared destination through --pipe, all parts at once; then `verify` on the
 * destination. The parts together must equal the one-process merge. */
#define PART_CMD "mergestream merge r.yml m -q --out-shard-size 70K --pipe 'cat > %s/{}' "

Test(outputs, slurm_array_parts_make_the_whole)
{
    /* sbatch --array=0-4:2: tasks 0, 2, 4. */
    RUN_OK("mkdir -p sl && for id in 0 2 4; do SLURM_ARRAY_TASK_ID=$id SLURM_ARRAY_TASK_MIN=0 "
           "SLURM_ARRAY_TASK_MAX=4 SLURM_ARRAY_TASK_STEP=2 SLURM_ARRAY_TASK_COUNT=3 " PART_CMD
           "--part auto & done; wait", "sl");
    RUN_OK("diff -r sl ref/m && mergestream verify sl >/dev/null");
}

Test(outputs, kubernetes_indexed_job_parts_make_the_whole)
{
    RUN_OK("mkdir -p k8 && for i in 0 1 2; do JOB_COMPLETION_INDEX=$i " PART_CMD
           "--part auto/3 & done; wait", "k8");
    RUN_OK("diff -r k8 ref/m && mergestream verify k8 >/dev/null");
    /* A part that never ran leaves a destination that verify refuses. */
    RUN_OK("mkdir -p k2 && for i in 0 2; do JOB_COMPLETION_INDEX=$i " PART_CMD
           "--part auto/3 & done; wait", "k2");
    RUN_OK("! mergestream verify k2 2>err && grep -q 'model-00002-of-00003.safetensors does not "
           "exist' err");
}

Test(outputs, part_auto_refuses_what_it_cannot_map)
{
    static const struct { const char *env, *arg, *msg; } cases[] = {
        { "", "auto", "neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set" },
        { "SLURM_ARRAY_TASK_ID=1 JOB_COMPLETION_INDEX=0", "auto", "both" },
        { "JOB_COMPLETION_INDEX=1", "auto", "write --part auto/N" },
        { "JOB_COMPLETION_INDEX=3", "auto/3", "JOB_COMPLETION_INDEX 3 is not below 3" },
        { "JOB_COMPLETION_INDEX=-1", "auto/3", "is '-1', not a number" },
        /* sbatch --array=1,3,7 is not a range */
        { "SLURM_ARRAY_TASK_ID=3 SLURM_ARRAY_TASK_MIN=1 SLURM_ARRAY_TASK_MAX=7 "
          "SLURM_ARRAY_TASK_COUNT=3", "auto", "not an evenly spaced range" },
        { "SLURM_ARRAY_TASK_ID=2 SLURM_ARRAY_TASK_MIN=1 SLURM_ARRAY_TASK_MAX=3 "
          "SLURM_ARRAY_TASK_COUNT=3", "auto/4", "the Slurm array has 3 tasks, not 4" },
        { "SLURM_ARRAY_TASK_ID=2", "auto", "not SLURM_ARRAY_TASK_MIN, _MAX and _COUNT" },
        { "", "auto3", "takes I/N or auto[/N]" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *err = NULL;
        int rc = run(NULL, &err,
                     "env -u SLURM_ARRAY_TASK_ID -u JOB_COMPLETION_INDEX %s mergestream merge "
                     "r.yml m -q --part %s --pipe 'cat >/dev/null'", cases[i].env, cases[i].arg);
        cr_expect_eq(rc, 2, "%s --part %s: exit %d: %s", cases[i].env, cases[i].arg, rc, err);
        cr_expect(err && strstr(err, cases[i].msg), "%s --part %s: %s", cases[i].env,
                  cases[i].arg, err);
        free(err);
    }
}
