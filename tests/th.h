/*
 * th.h - helpers shared by the Criterion tests (tests/th_util.c).
 */
#ifndef MS_TH_H
#define MS_TH_H

#include <stddef.h>

#ifndef MS_BUILD_DIR
#define MS_BUILD_DIR "build"
#endif

/* A fresh directory under $TMPDIR (or /tmp); the caller frees the returned path. */
char *th_tmpdir(void);
/* Removes a directory tree (rm -rf). */
void th_rmtree(const char *path);
/* Joins a and b with '/': returns malloc'd storage (free). */
char *th_path(const char *a, const char *b);
/* Writes len bytes to path (creates or truncates). Returns 0 or -1. */
int th_write(const char *path, const void *data, size_t len);
/* Reads a whole file; returns malloc'd bytes (NUL-terminated) or NULL. */
char *th_read(const char *path, size_t *len);
/*
 * Runs `sh -c cmd` with the build directory's binaries in PATH (build/mergestream,
 * build/ms-*). Captures stdout and stderr (each NUL-terminated, malloc'd, may be
 * NULL if not wanted). Returns the exit status, or 128+signal.
 */
int th_run(const char *cmd, char **out, char **err);
/* th_run of the printf-formatted command, run from directory dir (cd 'dir' && cmd);
 * the command may be up to 8 KiB long. */
int th_run_in(const char *dir, char **out, char **err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Asserts that the th_run_in command (from dir) exits 0, printing its output if not. */
#define TH_RUN_OK(dir, ...)                                                             \
    do {                                                                                \
        char *o_ = NULL, *e_ = NULL;                                                    \
        int rc_ = th_run_in(dir, &o_, &e_, __VA_ARGS__);                                \
        cr_assert_eq(rc_, 0, "exit %d\nstdout: %s\nstderr: %s", rc_, o_, e_);            \
        free(o_);                                                                       \
        free(e_);                                                                       \
    } while (0)
/*
 * The refusal rules for a command that must fail: exit status `want`, stderr's
 * first line contains `has`, and stderr is that one line (exit 2, a usage
 * error, adds the usage line: two). Returns NULL when rc and err follow them,
 * else which rule is broken (static text).
 */
const char *th_fail_problem(int rc, const char *err, int want, const char *has);
/* Runs the th_run_in command (from dir) and asserts th_fail_problem's rules. */
#define TH_RUN_FAILS(dir, want, has, ...)                                               \
    do {                                                                                \
        char *o_ = NULL, *e_ = NULL;                                                    \
        int rc_ = th_run_in(dir, &o_, &e_, __VA_ARGS__);                                \
        const char *p_ = th_fail_problem(rc_, e_, want, has);                           \
        cr_assert(!p_, "%s (want exit %d and '%s')\nexit %d\nstdout: %s\nstderr: %s", p_, \
                  want, has, rc_, o_, e_);                                              \
        free(o_);                                                                       \
        free(e_);                                                                       \
    } while (0)
/*
 * A shell command (for th_run_in) that runs `mergestream merge ARGS` into k/ and
 * kills it (SIGKILL) once k/.mergestream-run.json lists model-00002; exits 0 only
 * if the merge died of the kill with that shard listed. The run file is polled, so
 * a merge that ends before a poll sees it is started again, up to five times.
 * ARGS is a string literal and must not name the output directory.
 */
#define TH_MERGE_KILLED_AFTER_TWO_SHARDS(args)                                          \
    "for try in 1 2 3 4 5; do rm -rf k; mergestream merge " args " k & pid=$!; "         \
    "while kill -0 $pid 2>/dev/null && "                                                \
    "! grep -q model-00002 k/.mergestream-run.json 2>/dev/null; do sleep 0.01; done; "  \
    "kill -9 $pid 2>/dev/null; wait $pid; rc=$?; [ $rc = 137 ] && break; "              \
    "echo \"try $try: the merge ended ($rc) before the kill\" >&2; done; "              \
    "test $rc = 137 && grep -q model-00002 k/.mergestream-run.json"
/* Byte-compares two files; 0 if equal. */
int th_cmp_files(const char *a, const char *b);

#endif
