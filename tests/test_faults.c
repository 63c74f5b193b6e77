/*
 * test_faults.c - failures outside the inputs: a full disk (a 2 MiB tmpfs),
 * RLIMIT_FSIZE, inputs that cannot be read, a --pipe consumer that quits,
 * SIGINT/SIGTERM/SIGHUP and SIGKILL during a merge (then --resume), and injected
 * allocation and I/O failures in-process (ms_alloc_fail_after,
 * ms_io_fail_after). Every failure must give a non-zero status, one line on
 * stderr naming the file, no crash, no temporaries, and nothing incomplete
 * under a final name.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_engine.h"
#include "ms_plan.h"
#include "ms_recipe.h"
#include "ms_safetensors.h"
#include "th.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define HAVE_LSAN 1
#else
#define HAVE_LSAN 0
#endif

static char *g_dir;
static char *g_mnt; /* tmpfs mounted by a test, unmounted in teardown */

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
}

static void teardown(void)
{
    if (g_mnt) {
        char cmd[4200];
        snprintf(cmd, sizeof cmd, "umount '%s'", g_mnt);
        if (system(cmd) != 0)
            fprintf(stderr, "test_faults: could not unmount %s\n", g_mnt);
        free(g_mnt);
        g_mnt = NULL;
    }
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(faults, .init = setup, .fini = teardown, .timeout = 600);

/* ------------------------------------------------------------------ helpers */

static int run_cmd(char **err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int run_cmd(char **err, const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[8400];
    snprintf(full, sizeof full, "cd '%s' && %s", g_dir, cmd);
    return th_run(full, NULL, err);
}

static void run_ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void run_ok(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char *err = NULL;
    int rc = run_cmd(&err, "%s", cmd);
    cr_assert_eq(rc, 0, "command failed (%d): %s\nstderr: %s", rc, cmd, err);
    free(err);
}

static void write_file(const char *name, const char *text)
{
    char *p = th_path(g_dir, name);
    cr_assert_eq(th_write(p, text, strlen(text)), 0);
    free(p);
}

static const char linear_yml[] =
    "merge_method: linear\n"
    "dtype: bfloat16\n"
    "models:\n"
    "  - model: base\n"
    "    parameters: {weight: 0.6}\n"
    "  - model: ft1\n"
    "    parameters: {weight: 0.4}\n";

/* base + ft1 of about `mb` MB each (bf16), and linear.yml. */
static void make_models(int layers, int hidden, int inter, int vocab)
{
    run_ok("ms-mkmodel --layers %d --hidden %d --intermediate %d --vocab %d --dtype bf16 "
           "--seed 1 base >/dev/null && ms-mkmodel --base base --noise 0.01 --seed 2 ft1 "
           ">/dev/null", layers, hidden, inter, vocab);
    write_file("linear.yml", linear_yml);
}

#define SMALL_MODELS() make_models(4, 256, 512, 1024)   /* ~6 MB each */
#define TINY_MODELS() make_models(2, 32, 64, 64)        /* ~50 KB each */

/* The stderr lines that are not warnings; returns their count, first in buf. */
static int error_lines(const char *err, char *first, size_t cap)
{
    int n = 0;
    first[0] = 0;
    for (const char *l = err; l && *l;) {
        const char *e = strchr(l, '\n');
        size_t len = e ? (size_t)(e - l) : strlen(l);
        if (len && strncmp(l, "mergestream: warning:", 21) && strncmp(l, "mergestream: resume:", 20)) {
            if (!n++)
                snprintf(first, cap, "%.*s", (int)len, l);
        }
        l = e ? e + 1 : l + len;
    }
    return n;
}

/* Case-insensitive strstr (strcasestr is a GNU extension). */
static bool ci_contains(const char *s, const char *sub)
{
    size_t n = strlen(sub);
    for (; *s; s++)
        if (!strncasecmp(s, sub, n))
            return true;
    return !n;
}

/* Asserts a failed command's status and its one-line error. */
static void assert_one_error(const char *what, int rc, const char *err, const char *want1,
                             const char *want2)
{
    char first[2048];
    int n = error_lines(err, first, sizeof first);
    cr_assert(rc > 0 && rc < 128, "%s: status %d (want a failure, not a crash)\n%s", what, rc, err);
    cr_assert_eq(n, 1, "%s: %d error lines, want one:\n%s", what, n, err);
    cr_assert(ci_contains(first, want1), "%s: '%s' not in: %s", what, want1, first);
    if (want2)
        cr_assert(strstr(first, want2), "%s: '%s' not in: %s", what, want2, first);
    cr_log_info("%s: status %d: %s", what, rc, first);
}

/* Names in dir (g_dir-relative), space-separated (free); "" if absent or empty. */
static char *entries(const char *sub)
{
    char *p = th_path(g_dir, sub);
    DIR *d = opendir(p);
    free(p);
    char *s = calloc(1, 8192);
    if (!d)
        return s;
    size_t n = 0;
    struct dirent *e;
    /* Run-state files (.mergestream.lock, .mergestream-run.json) are not output:
     * a failed or killed run may leave them beside finished shards for the next run. */
    while ((e = readdir(d)) && n < 8000)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") &&
            strncmp(e->d_name, ".mergestream", 12))
            n += (size_t)snprintf(s + n, 8192 - n, "%s ", e->d_name);
    closedir(d);
    return s;
}

static void assert_empty(const char *what, const char *sub)
{
    char *left = entries(sub);
    cr_assert(!left[0], "%s: left in %s: %s", what, sub, left);
    free(left);
}

/* Every file in sub: no temporaries; shards pass verify; small files equal ref's. */
static void assert_complete_or_absent(const char *what, const char *sub, const char *ref)
{
    char *left = entries(sub);
    char *save = NULL;
    for (char *name = strtok_r(left, " ", &save); name; name = strtok_r(NULL, " ", &save)) {
        cr_assert(!strstr(name, ".partial") && !strstr(name, ".tmp"), "%s: temporary %s/%s left",
                  what, sub, name);
        size_t len = strlen(name);
        if (len > 12 && !strcmp(name + len - 12, ".safetensors")) {
            char *err = NULL;
            int rc = run_cmd(&err, "mergestream verify '%s/%s'", sub, name);
            cr_assert_eq(rc, 0, "%s: %s/%s is incomplete: %s", what, sub, name, err);
            free(err);
        } else if (ref) {
            char *a = th_path(g_dir, sub), *b = th_path(g_dir, ref);
            char *pa = th_path(a, name), *pb = th_path(b, name);
            cr_assert_eq(th_cmp_files(pa, pb), 0, "%s: %s differs from the complete run's", what,
                         pa);
            free(a);
            free(b);
            free(pa);
            free(pb);
        }
    }
    free(left);
}

/* Starts `sh -c "exec CMD"` in g_dir with stderr to err_path; returns the pid. */
static pid_t spawn_bg(const char *cmd, const char *err_path)
{
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        char path[8192];
        snprintf(path, sizeof path, "%s:%s", MS_BUILD_DIR, getenv("PATH") ? getenv("PATH") : "");
        setenv("PATH", path, 1);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        int dn = open("/dev/null", O_RDWR);
        int fe = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (chdir(g_dir) < 0 || dn < 0 || fe < 0)
            _exit(126);
        dup2(dn, 0);
        dup2(dn, 1);
        dup2(fe, 2);
        char full[8400];
        snprintf(full, sizeof full, "exec %s", cmd);
        execl("/bin/sh", "sh", "-c", full, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static int wait_status(pid_t pid)
{
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------ disk full, file size */

Test(faults, full_disk_gives_one_line_and_leaves_nothing)
{
    SMALL_MODELS();
    g_mnt = th_path(g_dir, "mnt");
    cr_assert_eq(mkdir(g_mnt, 0755), 0);
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "mount -t tmpfs -o size=2m tmpfs '%s' 2>&1", g_mnt);
    char *out = NULL;
    if (th_run(cmd, &out, NULL) != 0) {
        free(g_mnt);
        g_mnt = NULL;
        cr_skip_test("cannot mount a tmpfs (%s); needs root or CAP_SYS_ADMIN", out ? out : "");
    }
    free(out);
    /* One 6 MB shard: its space is reserved up front, so it fails before any work. */
    char *err = NULL;
    int rc = run_cmd(&err, "mergestream merge linear.yml mnt/out -q");
    assert_one_error("full disk (one shard)", rc, err, "no space left", "mnt/out/model.safetensors");
    free(err);
    assert_empty("full disk", "mnt/out");
    /* 1 MB shards: the first ones fit, then the disk fills. Finished shards may stay
     * (--resume keeps them); they must be complete; nothing else may remain. */
    rc = run_cmd(&err, "mergestream merge linear.yml mnt/out2 -q --out-shard-size 1M");
    assert_one_error("full disk (1 MB shards)", rc, err, "no space left", "mnt/out2/model-");
    free(err);
    assert_complete_or_absent("full disk (1 MB shards)", "mnt/out2", NULL);
    char *left = entries("mnt/out2");
    cr_assert(!strstr(left, "config.json") && !strstr(left, "README.md") &&
              !strstr(left, "index.json"), "full disk: small files written: %s", left);
    free(left);
}

Test(faults, file_size_limit_gives_one_line_and_leaves_nothing)
{
    SMALL_MODELS();
    char *err = NULL;
    /* ulimit -f counts 512-byte blocks in dash and 1024-byte ones in bash: 1-2 MB. */
    int rc = run_cmd(&err, "sh -c 'ulimit -f 2048 && exec mergestream merge linear.yml out -q'");
    assert_one_error("RLIMIT_FSIZE", rc, err, "file too large", "out/model.safetensors");
    free(err);
    assert_empty("RLIMIT_FSIZE", "out");
}

/* ------------------------------------------------------------------ unreadable inputs */

Test(faults, unreadable_inputs_are_named)
{
    TINY_MODELS();
    char *err = NULL;
    run_ok("cp -r ft1 ft1.orig && rm ft1/model.safetensors && mkfifo ft1/model.safetensors");
    int rc = run_cmd(&err, "timeout 60 mergestream merge linear.yml out -q");
    cr_assert_neq(rc, 124, "a FIFO in place of a shard hangs the merge");
    assert_one_error("FIFO shard", rc, err, "ft1/model.safetensors: not a regular file", NULL);
    free(err);
    assert_empty("FIFO shard", "out");

    run_ok("rm ft1/model.safetensors && mkdir ft1/model.safetensors");
    rc = run_cmd(&err, "mergestream merge linear.yml out -q");
    assert_one_error("directory shard", rc, err, "ft1/model.safetensors: not a regular file",
                     NULL);
    free(err);
    assert_empty("directory shard", "out");

    run_ok("rmdir ft1/model.safetensors && cp ft1.orig/model.safetensors ft1/ && "
           "chmod 000 ft1/model.safetensors");
    rc = run_cmd(&err, "mergestream merge linear.yml out -q");
    if (rc == 0) {
        cr_log_info("chmod 000 shard: readable (running as root); no error to check");
        run_ok("rm -rf out");
    } else {
        assert_one_error("chmod 000 shard", rc, err, "permission denied", "ft1/model.safetensors");
        assert_empty("chmod 000 shard", "out");
    }
    free(err);
    run_ok("chmod 644 ft1/model.safetensors");
}

/* The shard shrinks while the merge reads it: a read error naming file and tensor. */
Test(faults, shard_truncated_during_merge_is_named)
{
    SMALL_MODELS();
    char *ep = th_path(g_dir, "merge.err");
    for (int attempt = 0; attempt < 3; attempt++) {
        run_ok("rm -rf out && cp ft1/model.safetensors ft1.keep");
        pid_t pid = spawn_bg("mergestream merge linear.yml out -q --threads 1 --chunk-elems 64", ep);
        sleep_ms(300);
        run_ok("truncate -s 8192 ft1/model.safetensors");
        int rc = wait_status(pid);
        run_ok("mv ft1.keep ft1/model.safetensors");
        char *err = th_read(ep, NULL);
        if (rc == 0) {
            free(err);
            continue; /* finished before the cut */
        }
        assert_one_error("shard truncated during the merge", rc, err, "ft1/model.safetensors",
                         "unexpected end of file reading tensor '");
        free(err);
        assert_complete_or_absent("shard truncated", "out", NULL);
        free(ep);
        return;
    }
    cr_assert_fail("the merge finished before the shard could be truncated, 3 times");
}

/* ------------------------------------------------------------------ --pipe */

Test(faults, pipe_consumer_that_quits_early_is_an_error)
{
    SMALL_MODELS();
    const char *cmds[] = { "head -c 100 >/dev/null", "exit 3", "cat >/dev/null; exit 1" };
    for (size_t i = 0; i < MS_ARRAY_LEN(cmds); i++) {
        char *err = NULL;
        int rc = run_cmd(&err, "mergestream merge linear.yml out -q --pipe '%s'", cmds[i]);
        char what[128];
        snprintf(what, sizeof what, "--pipe '%s'", cmds[i]);
        assert_one_error(what, rc, err, "pipe command for 'model.safetensors'", NULL);
        free(err);
        assert_empty(what, "out");
    }
}

/* ------------------------------------------------------------------ signals */

/* A ~65 MB base and fine-tune (times `scale` in layers). */
static void big_models(int scale)
{
    run_ok("rm -rf base ft1");
    make_models(8 * scale, 512, 1408, 8000);
}

static void interrupt_once(int sig, int want)
{
    char *ep = th_path(g_dir, "merge.err");
    for (int scale = 1; scale <= 4; scale *= 2) {
        big_models(scale);
        run_ok("rm -rf out");
        pid_t pid = spawn_bg("mergestream merge linear.yml out -q --threads 1 --chunk-elems 64 "
                             "--out-shard-size 16M", ep);
        sleep_ms(300);
        kill(pid, sig);
        int rc = wait_status(pid);
        char *err = th_read(ep, NULL);
        if (rc == 0) {
            cr_log_info("merge finished within 0.3 s; retrying with %d times the layers", 2 * scale);
            free(err);
            continue;
        }
        char what[64];
        snprintf(what, sizeof what, "%s during a merge",
                 sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "SIGHUP");
        cr_assert_eq(rc, want, "%s: status %d, want %d: %s", what, rc, want, err);
        char first[2048];
        cr_assert_eq(error_lines(err, first, sizeof first), 1, "%s: %s", what, err);
        cr_assert(strstr(first, "interrupted"), "%s: %s", what, first);
        cr_log_info("%s: status %d: %s", what, rc, first);
        free(err);
        assert_complete_or_absent(what, "out", NULL);
        char *left = entries("out");
        cr_assert(!strstr(left, "config.json") && !strstr(left, "README.md"),
                  "%s: finishing files written: %s", what, left);
        free(left);
        free(ep);
        return;
    }
    cr_assert_fail("the merge always finished before the signal");
}

Test(faults, sigint_during_merge)
{
    interrupt_once(SIGINT, 130);
}

Test(faults, sigterm_during_merge)
{
    interrupt_once(SIGTERM, 143);
}

/* Closing the terminal: as clean a stop as SIGINT's, exit 128 + SIGHUP. */
Test(faults, sighup_during_merge)
{
    interrupt_once(SIGHUP, 129);
}

/*
 * SIGKILL at seeded random moments: whatever is under a final name is complete,
 * and --resume then gives exactly the bytes of an uninterrupted merge (compared
 * under the same output basename, since the card's title is the directory name).
 */
Test(faults, sigkill_then_resume_is_byte_identical)
{
    big_models(1);
    const char *opts = "-q --threads 1 --chunk-elems 16384 --out-shard-size 16M";
    double t0 = now_s();
    run_ok("mergestream merge linear.yml ref/out %s", opts);
    double took = now_s() - t0;
    const char *env = getenv("MS_TEST_SEED");
    unsigned seed = env ? (unsigned)strtoul(env, NULL, 10) : (unsigned)time(NULL);
    cr_log_info("sigkill: seed %u (MS_TEST_SEED=%u reproduces), uninterrupted merge %.2f s", seed,
                seed, took);
    srand(seed);
    char *ep = th_path(g_dir, "merge.err");
    int killed = 0;
    for (int round = 0; round < 6; round++) {
        run_ok("rm -rf k");
        char cmd[512];
        snprintf(cmd, sizeof cmd, "mergestream merge linear.yml k/out %s", opts);
        long delay = (long)((double)rand() / RAND_MAX * took * 900.0);
        pid_t pid = spawn_bg(cmd, ep);
        sleep_ms(delay);
        kill(pid, SIGKILL);
        int rc = wait_status(pid);
        killed += rc == 128 + SIGKILL;
        char *left = entries("k/out");
        cr_log_info("sigkill round %d: after %ld ms, status %d, left: %s", round, delay, rc, left);
        free(left);
        /* Temporaries may remain after SIGKILL; final names must be complete. */
        char *names = entries("k/out");
        char *save = NULL;
        for (char *n = strtok_r(names, " ", &save); n; n = strtok_r(NULL, " ", &save)) {
            if (strstr(n, ".partial") || strstr(n, ".tmp"))
                continue;
            size_t len = strlen(n);
            char *err = NULL;
            if (len > 12 && !strcmp(n + len - 12, ".safetensors")) {
                int vr = run_cmd(&err, "mergestream verify 'k/out/%s'", n);
                cr_assert_eq(vr, 0, "round %d: k/out/%s incomplete: %s", round, n, err);
            } else {
                int cr = run_cmd(&err, "cmp 'k/out/%s' 'ref/out/%s'", n, n);
                cr_assert_eq(cr, 0, "round %d: k/out/%s differs from the complete run's", round, n);
            }
            free(err);
        }
        free(names);
        run_ok("mergestream merge linear.yml k/out %s --resume", opts);
        char *err = NULL;
        int d = run_cmd(&err, "diff -r ref/out k/out");
        cr_assert_eq(d, 0, "round %d (seed %u): resumed output differs: %s", round, seed, err);
        free(err);
    }
    cr_log_info("sigkill: %d of 6 rounds killed mid-merge", killed);
    free(ep);
}

/* ------------------------------------------------------------------ injected faults */

struct merge_result {
    int rc;
    char msg[1024];
};

/* The whole merge in-process: recipe -> plan -> engine, into out_dir. */
static void merge_inproc(const char *recipe, const char *out_dir, uint64_t shard_size,
                         struct merge_result *res)
{
    struct ms_recipe *r = NULL;
    struct ms_plan *p = NULL;
    struct ms_plan_opts po = { .out_shard_size = shard_size };
    struct ms_engine_opts eo;
    ms_engine_opts_init(&eo);
    eo.out = out_dir;
    eo.quiet = true;
    eo.threads = 2;
    eo.max_memory = 1 << 20;
    eo.chunk_elems = 512;
    ms_error_clear();
    int rc = ms_recipe_load(recipe, &r);
    if (!rc)
        rc = ms_plan_build(r, &po, &p);
    if (!rc)
        rc = ms_engine_run(p, &eo);
    res->rc = rc;
    snprintf(res->msg, sizeof res->msg, "%s", ms_errmsg());
    ms_plan_free(p);
    ms_recipe_free(r);
}

static int leak_check(void)
{
#if HAVE_LSAN
    return __lsan_do_recoverable_leak_check();
#else
    return 0;
#endif
}

/* Runs the tiny merge with fault n armed by arm(); checks a failure; returns rc. */
static int faulted_run(void (*arm)(long), long n, const char *kind, uint64_t shard_size,
                       int *nread, int *nwrite)
{
    char out[64];
    snprintf(out, sizeof out, "f%ld/out", n);
    char *rp = th_path(g_dir, "linear.yml"), *op = th_path(g_dir, out);
    struct merge_result res;
    arm(n);
    merge_inproc(rp, op, shard_size, &res);
    arm(0);
    if (res.rc) {
        cr_assert_lt(res.rc, 0, "%s fault %ld: rc %d", kind, n, res.rc);
        cr_assert(res.msg[0], "%s fault %ld: no message (rc %d)", kind, n, res.rc);
        cr_assert(!strchr(res.msg, '\n'), "%s fault %ld: multi-line message", kind, n);
        if (nread)
            cr_assert(strstr(res.msg, ".safetensors"), "i/o fault %ld: file not named: %s", n,
                      res.msg);
        if (nread && strstr(res.msg, "read"))
            (*nread)++;
        if (nwrite && (strstr(res.msg, "write") || strstr(res.msg, "header")))
            (*nwrite)++;
        assert_complete_or_absent(kind, out, "ref/out");
    }
    int leaks = leak_check();
    cr_assert_eq(leaks, 0, "%s fault %ld (%s): memory leaked", kind, n, res.msg);
    free(rp);
    free(op);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf f%ld", n);
    run_ok("%s", cmd);
    return res.rc;
}

static void reference_run(uint64_t shard_size)
{
    char *rp = th_path(g_dir, "linear.yml"), *op = th_path(g_dir, "ref/out");
    struct merge_result res;
    merge_inproc(rp, op, shard_size, &res);
    cr_assert_eq(res.rc, 0, "reference merge failed: %s", res.msg);
    free(rp);
    free(op);
}

/* Silences stderr (plan problems, warnings) around a loop; returns the saved fd. */
static int quiet_stderr(void)
{
    fflush(stderr);
    int saved = dup(2);
    int dn = open("/dev/null", O_WRONLY);
    dup2(dn, 2);
    close(dn);
    return saved;
}

static void restore_stderr(int saved)
{
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
}

Test(faults, every_allocation_failure_is_clean)
{
    TINY_MODELS();
    cr_assert_eq(chdir(g_dir), 0); /* the recipe names models relative to it */
    ms_log_set_quiet(true);
    reference_run(20000);
    cr_assert_eq(leak_check(), 0, "the reference merge leaks");
    long n;
    int saved = quiet_stderr();
    for (n = 1; n < 200000; n++)
        if (faulted_run(ms_alloc_fail_after, n, "allocation", 20000, NULL, NULL) == 0)
            break;
    restore_stderr(saved);
    cr_assert_lt(n, 200000);
    cr_log_info("allocation faults: runs 1..%ld failed cleanly, run %ld succeeded (leak check %s)",
                n - 1, n, HAVE_LSAN ? "on" : "off: build with SANITIZE=address");
    run_ok("mergestream verify ref/out >/dev/null");
}

Test(faults, every_io_failure_is_clean)
{
    TINY_MODELS();
    cr_assert_eq(chdir(g_dir), 0); /* the recipe names models relative to it */
    ms_log_set_quiet(true);
    reference_run(20000);
    long n;
    int nread = 0, nwrite = 0;
    int saved = quiet_stderr();
    for (n = 1; n < 100000; n++)
        if (faulted_run(ms_io_fail_after, n, "i/o", 20000, &nread, &nwrite) == 0)
            break;
    restore_stderr(saved);
    cr_assert_lt(n, 100000);
    cr_assert_gt(nread, 0, "no injected read failure seen");
    cr_assert_gt(nwrite, 0, "no injected write failure seen");
    cr_log_info("i/o faults: runs 1..%ld failed cleanly (%d on reads, %d on writes), run %ld "
                "succeeded", n - 1, nread, nwrite, n);
}
