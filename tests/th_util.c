/*
 * th_util.c - test helpers (see th.h).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "th.h"

char *th_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    char tmpl[4096];
    snprintf(tmpl, sizeof tmpl, "%s/mstest.XXXXXX", base && *base ? base : "/tmp");
    char *d = mkdtemp(tmpl);
    return d ? strdup(d) : NULL;
}

void th_rmtree(const char *path)
{
    if (!path || !*path || !strcmp(path, "/"))
        return;
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0)
        fprintf(stderr, "th_rmtree: could not remove %s\n", path);
}

char *th_path(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", a, b);
    return p;
}

int th_write(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(data, 1, len, f);
    return (fclose(f) == 0 && w == len) ? 0 : -1;
}

char *th_read(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t r;
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(buf, cap * 2 + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (!buf)
        return NULL;
    buf[n] = 0;
    if (len)
        *len = n;
    return buf;
}

static char *slurp_fd(FILE *f)
{
    size_t cap = 4096, n = 0, r;
    char *buf = malloc(cap + 1);
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(buf, cap * 2 + 1);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
    }
    if (buf)
        buf[n] = 0;
    return buf;
}

int th_run(const char *cmd, char **out, char **err)
{
    char *dir = th_tmpdir();
    if (!dir)
        return -1;
    char *o = th_path(dir, "out"), *e = th_path(dir, "err");
    size_t n = strlen(cmd) + strlen(o) + strlen(e) + 4096;
    char *full = malloc(n);
    snprintf(full, n, "PATH='%s':\"$PATH\"; export PATH; (%s) >'%s' 2>'%s' </dev/null",
             MS_BUILD_DIR, cmd, o, e);
    int st = system(full);
    int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (out) {
        FILE *f = fopen(o, "rb");
        *out = f ? slurp_fd(f) : strdup("");
        if (f)
            fclose(f);
    }
    if (err) {
        FILE *f = fopen(e, "rb");
        *err = f ? slurp_fd(f) : strdup("");
        if (f)
            fclose(f);
    }
    free(full);
    free(o);
    free(e);
    th_rmtree(dir);
    free(dir);
    return rc;
}

int th_cmp_files(const char *a, const char *b)
{
    size_t la, lb;
    char *x = th_read(a, &la), *y = th_read(b, &lb);
    int rc = (!x || !y || la != lb || memcmp(x, y, la)) ? 1 : 0;
    free(x);
    free(y);
    return rc;
}

int th_run_in(const char *dir, char **out, char **err, const char *fmt, ...)
{
    char cmd[8192], full[8400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "cd '%s' && %s", dir, cmd);
    return th_run(full, out, err);
}

const char *th_fail_problem(int rc, const char *err, int want, const char *has)
{
    if (rc != want)
        return "wrong exit status";
    if (!err || !strstr(err, has))
        return "stderr lacks the text";
    const char *nl = strchr(err, '\n');
    if (!nl || strstr(err, has) > nl)
        return "the text is not on stderr's first line";
    size_t lines = 0;
    for (const char *c = err; *c; c++)
        lines += *c == '\n';
    if (lines != (want == 2 ? 2u : 1u))
        return "stderr has more lines than the one error line";
    return NULL;
}
