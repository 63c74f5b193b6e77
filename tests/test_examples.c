/*
 * test_examples.c - every recipe in recipes/examples/ merges end to end on the
 * generated demo models and its output passes `mergestream verify`; random-mask
 * methods give the same bytes for a different thread count and budget.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "th.h"

#ifndef MS_SOURCE_DIR
#define MS_SOURCE_DIR "."
#endif

static char *g_dir;

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    char cmd[8192], *err = NULL;
    /* tools/demo-models.sh BUILD writes BUILD/demo/{base,ft1..ft4} with BUILD/ms-mkmodel. */
    snprintf(cmd, sizeof cmd, "cd '%s' && mkdir b && ln -s '%s/ms-mkmodel' b/ms-mkmodel && "
             "sh '%s/tools/demo-models.sh' b >/dev/null", g_dir, MS_BUILD_DIR, MS_SOURCE_DIR);
    int rc = th_run(cmd, NULL, &err);
    cr_assert_eq(rc, 0, "demo models: %s", err);
    free(err);
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(examples, .init = setup, .fini = teardown, .timeout = 600);

Test(examples, every_example_recipe_merges_and_verifies)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/recipes/examples", MS_SOURCE_DIR);
    DIR *d = opendir(path);
    cr_assert(d, "%s", path);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 4, ".yml"))
            continue;
        char cmd[8192], *out = NULL, *err = NULL;
        snprintf(cmd, sizeof cmd, "cd '%s/b' && mergestream merge '%s/%s' out-%s -q && "
                 "mergestream verify out-%s", g_dir, path, de->d_name, de->d_name, de->d_name);
        int rc = th_run(cmd, &out, &err);
        cr_assert_eq(rc, 0, "%s: exit %d\n%s%s", de->d_name, rc, out, err);
        cr_log_info("%s: %s", de->d_name, out);
        free(out);
        free(err);
        n++;
    }
    closedir(d);
    cr_assert_geq(n, 20, "only %d example recipes", n);
}

/* Random masks are keyed by element, not by schedule: other threads and budgets,
 * same bytes; another seed, other bytes. */
Test(examples, random_masks_do_not_depend_on_the_schedule)
{
    const char *methods[] = { "dare_ties", "dare_linear", "della" };
    for (size_t i = 0; i < 3; i++) {
        char cmd[8192], *err = NULL;
        snprintf(cmd, sizeof cmd,
                 "cd '%s/b' && r='%s/recipes/examples/%s.yml' && "
                 "mergestream merge \"$r\" a/m -q --threads 1 --random-seed 7 && "
                 "mergestream merge \"$r\" b/m -q --threads 3 --max-memory 8M --chunk-elems 100 "
                 "--random-seed 7 && diff -r a/m b/m && "
                 "mergestream merge \"$r\" c/m -q --random-seed 8 && "
                 "! cmp -s a/m/model.safetensors c/m/model.safetensors && rm -rf a b c",
                 g_dir, MS_SOURCE_DIR, methods[i]);
        int rc = th_run(cmd, NULL, &err);
        cr_assert_eq(rc, 0, "%s: %s", methods[i], err);
        free(err);
    }
}
