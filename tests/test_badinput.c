/*
 * test_badinput.c - bad inputs through the command line: ms-badgen writes a
 * corpus of corrupted safetensors files, indexes and recipes (and a few valid
 * but odd models), and every case must end with its own exit status, exactly
 * one line on stderr naming the file, tensor or key, no crash, and for merges
 * nothing under the output's final names. NaN and Inf weights are propagated
 * as mergekit propagates them (docs/RELIABILITY.md).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_safetensors.h"
#include "th.h"

#define T_DOWN "model.layers.0.mlp.down_proj.weight"
#define NAN_AT 5
#define INF_AT 9

static char *g_dir;   /* temp dir */
static char *g_cases; /* g_dir/cases */

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    g_cases = th_path(g_dir, "cases");
    char cmd[4096], *err = NULL;
    snprintf(cmd, sizeof cmd, "ms-badgen '%s'", g_cases);
    int rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 0, "ms-badgen failed (%d): %s", rc, err);
    free(err);
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_cases);
    free(g_dir);
}

TestSuite(badinput, .init = setup, .fini = teardown, .timeout = 300);

/* ------------------------------------------------------------------ case.txt */

struct bcase {
    char run[512], expect[512], output[256], also[512], out_has[256];
    int exit_code;
};

static void chomp(char *s)
{
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = 0;
}

static bool field(const char *line, const char *key, char *dst, size_t cap)
{
    size_t k = strlen(key);
    if (strncmp(line, key, k) || line[k] != ':')
        return false;
    const char *v = line + k + 1;
    while (*v == ' ')
        v++;
    snprintf(dst, cap, "%s", v);
    chomp(dst);
    return true;
}

static void read_case(const char *dir, struct bcase *c)
{
    memset(c, 0, sizeof *c);
    c->exit_code = -1;
    char *p = th_path(dir, "case.txt");
    FILE *f = fopen(p, "r");
    cr_assert(f, "%s missing", p);
    char line[1024], num[32];
    while (fgets(line, sizeof line, f)) {
        if (field(line, "exit", num, sizeof num))
            c->exit_code = atoi(num);
        else if (!field(line, "run", c->run, sizeof c->run) &&
                 !field(line, "stdout", c->out_has, sizeof c->out_has) &&
                 !field(line, "expect", c->expect, sizeof c->expect) &&
                 !field(line, "output", c->output, sizeof c->output))
            field(line, "also", c->also, sizeof c->also);
    }
    fclose(f);
    free(p);
    cr_assert(c->run[0] && c->exit_code >= 0, "%s: incomplete case.txt", dir);
}

/* The stderr lines that are not "mergestream: warning:"; returns their count
 * and copies the first into first (cap bytes). */
static int error_lines(const char *err, char *first, size_t cap)
{
    int n = 0;
    first[0] = 0;
    for (const char *l = err; l && *l;) {
        const char *e = strchr(l, '\n');
        size_t len = e ? (size_t)(e - l) : strlen(l);
        if (len && strncmp(l, "mergestream: warning:", 21)) {
            if (!n++)
                snprintf(first, cap, "%.*s", (int)len, l);
        }
        l = e ? e + 1 : l + len;
    }
    return n;
}

/* Entries left in dir (none if it does not exist), as one string (free). */
static char *dir_entries(const char *dir)
{
    DIR *d = opendir(dir);
    char *s = calloc(1, 4096);
    if (!d)
        return s;
    struct dirent *e;
    size_t n = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        n += (size_t)snprintf(s + n, n < 4096 ? 4096 - n : 0, "%s ", e->d_name);
        if (n >= 4096)
            break;
    }
    closedir(d);
    return s;
}

/* Runs one case; returns false (after logging why) if it does not hold. */
static bool run_case(const char *name)
{
    char *dir = th_path(g_cases, name);
    struct bcase c;
    read_case(dir, &c);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cd '%s' && rm -rf out ref && mergestream %s", dir, c.run);
    char *out = NULL, *err = NULL, first[1024];
    int rc = th_run(cmd, &out, &err);
    int nerr = error_lines(err, first, sizeof first);
    bool ok = true;
    if (rc >= 128) {
        cr_log_error("%s: crashed (status %d): %s", name, rc, err);
        ok = false;
    } else if (rc != c.exit_code) {
        cr_log_error("%s: exit %d, expected %d\nstderr: %s", name, rc, c.exit_code, err);
        ok = false;
    } else if (c.exit_code != 0) {
        if (nerr != 1) {
            cr_log_error("%s: %d lines on stderr, expected one:\n%s", name, nerr, err);
            ok = false;
        } else if (!strstr(first, c.expect)) {
            cr_log_error("%s: message does not contain '%s':\n%s", name, c.expect, first);
            ok = false;
        }
    }
    if (ok && c.exit_code == 0 && c.out_has[0] && !strstr(out, c.out_has)) {
        cr_log_error("%s: stdout does not contain '%s': %s", name, c.out_has, out);
        ok = false;
    }
    if (ok && c.exit_code == 0 && !strncmp(c.run, "merge ", 6)) {
        char *vout = NULL;
        snprintf(cmd, sizeof cmd, "cd '%s' && mergestream verify out", dir);
        if (th_run(cmd, NULL, &vout) != 0) {
            cr_log_error("%s: the merged output does not verify: %s", name, vout);
            ok = false;
        }
        free(vout);
    }
    if (c.output[0] && c.exit_code != 0) {
        char *o = th_path(dir, c.output);
        char *left = dir_entries(o);
        if (left[0]) {
            cr_log_error("%s: files left in %s after the failed merge: %s", name, c.output, left);
            ok = false;
        }
        free(left);
        free(o);
    }
    if (ok)
        cr_log_info("%-28s exit %d  %s", name, rc, c.exit_code ? first : "(accepted)");
    free(out);
    free(err);
    free(dir);
    return ok;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

Test(badinput, every_case_fails_cleanly_with_one_line)
{
    DIR *d = opendir(g_cases);
    cr_assert(d);
    char *names[256];
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < MS_ARRAY_LEN(names))
        if (e->d_name[0] != '.')
            names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, n, sizeof *names, name_cmp);
    cr_assert_geq(n, 40, "only %zu cases generated", n);
    size_t failed = 0;
    for (size_t i = 0; i < n; i++) {
        if (!run_case(names[i]))
            failed++;
        free(names[i]);
    }
    cr_assert_eq(failed, 0, "%zu of %zu bad-input cases failed (see the log above)", failed, n);
}

/* ------------------------------------------------------------------ NaN and Inf */

/* Tensor `name` of the model at case/sub, decoded to floats (free). */
static float *read_tensor(const char *cas, const char *sub, const char *name, uint64_t *numel)
{
    char *p = th_path(g_cases, cas), *q = th_path(p, sub);
    struct ms_model *m = NULL;
    int rc = ms_model_open(q, &m);
    cr_assert_eq(rc, 0, "open %s: %s", q, ms_errmsg());
    uint32_t shard;
    const struct ms_st_tensor *t = ms_model_find(m, name, &shard);
    cr_assert(t, "%s: no tensor %s", q, name);
    const struct ms_st_file *f = m->shards[shard];
    size_t bytes = t->end - t->begin;
    float *buf = malloc(MS_MAX(t->numel * 4, bytes) + 64);
    FILE *fp = fopen(f->path, "rb");
    cr_assert(fp);
    cr_assert_eq(fseek(fp, (long)(f->data_start + t->begin), SEEK_SET), 0);
    cr_assert_eq(fread(buf, 1, bytes, fp), bytes);
    fclose(fp);
    ms_dtype_decode(t->dtype, buf, buf, t->numel);
    *numel = t->numel;
    ms_model_free(m);
    free(q);
    free(p);
    return buf;
}

static void run_in_case(const char *cas, const char *args)
{
    char cmd[4096], *err = NULL;
    snprintf(cmd, sizeof cmd, "cd '%s/%s' && mergestream %s -q", g_cases, cas,
             args);
    int rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 0, "%s: %s failed (%d): %s", cas, args, rc, err);
    free(err);
}

/* linear: out = (0.5 base + 0.5 ft1) / 1; NaN in ft1 gives NaN there, +Inf gives +Inf. */
Test(badinput, nan_and_inf_propagate_through_linear)
{
    run_in_case("nan_linear", "merge recipe.yml out");
    uint64_t n, nb;
    float *o = read_tensor("nan_linear", "out", T_DOWN, &n);
    float *b = read_tensor("nan_linear", "base", T_DOWN, &nb);
    cr_assert_eq(n, nb);
    cr_assert(isnan(o[NAN_AT]), "element %d: %a, expected NaN", NAN_AT, o[NAN_AT]);
    cr_assert(isinf(o[INF_AT]) && o[INF_AT] > 0, "element %d: %a, expected +Inf", INF_AT,
              o[INF_AT]);
    for (uint64_t i = 0; i < n; i++)
        if (i != NAN_AT && i != INF_AT)
            cr_assert(isfinite(o[i]), "element %llu: %a (only the poisoned elements may be "
                      "non-finite)", (unsigned long long)i, o[i]);
    cr_log_info("nan_linear: out[%d] = %f, out[%d] = %f, out[0] = %f (base %f)", NAN_AT,
                (double)o[NAN_AT], INF_AT, (double)o[INF_AT], (double)o[0], (double)b[0]);
    free(o);
    free(b);
}

/*
 * ties, density 0.5, base + one model. `clean` has a zero delta at NAN_AT,
 * the NaN run has NaN there. mergekit ranks |NaN| above every magnitude (a
 * descending argsort puts NaN first), so the NaN takes one of the k kept slots:
 * the NaN run keeps one finite delta fewer, and the one it loses is the
 * smallest the clean run kept. Sign election gives the NaN a mask of 0, but
 * mergekit applies masks by multiplication (NaN * 0 = NaN), so the output
 * there is NaN, as in mergekit; no other element is affected.
 */
Test(badinput, ties_ranks_nan_as_the_largest_magnitude)
{
    run_in_case("nan_ties", "merge recipe.yml out");
    run_in_case("nan_ties", "merge clean.yml ref/out");
    uint64_t n, n2, n3;
    float *x = read_tensor("nan_ties", "out", T_DOWN, &n);
    float *c = read_tensor("nan_ties", "ref/out", T_DOWN, &n2);
    float *b = read_tensor("nan_ties", "base", T_DOWN, &n3);
    float *f = read_tensor("nan_ties", "ft1", T_DOWN, &n2);
    cr_assert(n == n2 && n == n3);
    cr_assert_eq(ms_f32_bits(c[NAN_AT]), ms_f32_bits(b[NAN_AT]), "clean run changed the zero delta");
    cr_assert(isnan(x[NAN_AT]), "NaN element: got %a, expected NaN", x[NAN_AT]);
    uint64_t kept_clean = 0, kept_nan = 0, differ = 0, lost = UINT64_MAX;
    for (uint64_t i = 0; i < n; i++) {
        if (i == NAN_AT)
            continue;
        cr_assert(isfinite(x[i]), "element %llu is not finite", (unsigned long long)i);
        kept_clean += ms_f32_bits(c[i]) != ms_f32_bits(b[i]);
        kept_nan += ms_f32_bits(x[i]) != ms_f32_bits(b[i]);
        if (ms_f32_bits(x[i]) != ms_f32_bits(c[i])) {
            differ++;
            lost = i;
        }
    }
    cr_assert_eq(differ, 1, "the runs differ at %llu elements, expected exactly one",
                 (unsigned long long)differ);
    cr_assert_eq(kept_nan + 1, kept_clean, "kept %llu (NaN run) vs %llu (clean run)",
                 (unsigned long long)kept_nan, (unsigned long long)kept_clean);
    cr_assert_eq(ms_f32_bits(x[lost]), ms_f32_bits(b[lost]));
    /* The delta lost is no larger than any delta the clean run kept. */
    float dl = fabsf(f[lost] - b[lost]);
    for (uint64_t i = 0; i < n; i++)
        if (ms_f32_bits(c[i]) != ms_f32_bits(b[i]))
            cr_assert_leq(dl, fabsf(f[i] - b[i]), "element %llu kept with a smaller delta",
                          (unsigned long long)i);
    cr_log_info("nan_ties: %llu of %llu deltas kept without NaN, %llu with; the NaN displaced "
                "element %llu (|delta| %g)", (unsigned long long)kept_clean,
                (unsigned long long)n, (unsigned long long)kept_nan, (unsigned long long)lost,
                (double)dl);
    free(x);
    free(c);
    free(b);
    free(f);
}
