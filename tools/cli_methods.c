/*
 * cli_methods.c - `mergestream methods [NAME...]`: the merge methods of the
 * registry with their parameters (the list that ends `merge --help`).
 */
#include <stdio.h>
#include <string.h>

#include "ms_common.h"
#include "ms_stage.h"

#include "cli.h"

static const char methods_usage[] =
    "usage: mergestream methods [--names] [NAME...]\n"
    "\n"
    "Lists the merge methods a recipe's merge_method can name, each with its\n"
    "parameters (per-model or global) and their defaults; with NAMEs, only those.\n"
    "\n"
    "options:\n"
    "  --names      print only the method names, one per line\n"
    "  -h, --help   this text\n";

int ms_cli_methods(int argc, char **argv)
{
    bool names = false, opts = true;
    int n = 0;
    /* Options anywhere (until "--"); the NAMEs are moved to the front of argv + 1. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (opts && (!strcmp(a, "-h") || !strcmp(a, "--help"))) {
            fputs(methods_usage, stdout);
            return 0;
        }
        if (opts && !strcmp(a, "--names")) {
            names = true;
        } else if (opts && !strcmp(a, "--")) {
            opts = false;
        } else if (opts && a[0] == '-' && a[1]) {
            fprintf(stderr, "mergestream: methods: unknown option '%s'\n"
                            "usage: mergestream methods [--names] [NAME...]\n", a);
            return 2;
        } else {
            argv[1 + n++] = argv[i];
        }
    }
    const struct ms_method *m;
    if (!n && !names)
        ms_cli_print_methods(stdout, NULL);
    for (size_t i = 0; !n && names && (m = ms_method_at(i)); i++)
        printf("%s\n", m->name);
    int status = 0;
    for (int i = 1; i <= n; i++) {
        if (!ms_method_find(argv[i])) {
            fprintf(stderr, "mergestream: methods: unknown merge method '%s' "
                            "(mergestream methods --names lists them)\n", argv[i]);
            status = 1;
        } else if (names) {
            printf("%s\n", argv[i]);
        } else {
            ms_cli_print_methods(stdout, argv[i]);
        }
    }
    if (fflush(stdout) != 0) {
        fprintf(stderr, "mergestream: methods: cannot write output\n");
        return 1;
    }
    return status;
}
