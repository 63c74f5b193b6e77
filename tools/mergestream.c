/*
 * mergestream.c - command-line entry point: dispatches to the subcommands.
 */
#include <stdio.h>
#include <string.h>

#include "ms_common.h"
#include "ms_isa.h"

#include "cli.h"

static const char usage[] =
    "usage: mergestream <command> [options]\n"
    "\n"
    "Merges large language models out of core with mergekit's YAML recipes.\n"
    "\n"
    "commands:\n"
    "  merge RECIPE.yml OUT   run the merge into directory OUT (as mergekit-yaml does)\n"
    "  plan RECIPE.yml        validate the recipe and models; print the plan (reads no tensor data)\n"
    "  inspect MODEL|FILE     list tensors: name, dtype, shape, bytes, shard\n"
    "  verify MODEL|FILE      check safetensors files against the format rules\n"
    "  methods [NAME]         the merge methods, their parameters and defaults\n"
    "\n"
    "  mergestream <command> --help   options of one command\n"
    "  mergestream --version\n";

void ms_cli_report(int rc, const char *fallback)
{
    const char *m = ms_errmsg();
    if (!m[0])
        m = fallback ? fallback : ms_strerror(rc);
    ms_log_error(m);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(usage, stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        fputs(usage, stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V")) {
        printf("mergestream %s\n", MS_VERSION);
        return 0;
    }
    if (ms_isa_check_env()) { /* kernels: MERGESTREAM_ISA names one that cannot run here */
        ms_cli_report(MS_EINVAL, NULL);
        return 2;
    }
    if (!strcmp(cmd, "merge"))
        return ms_cli_merge(argc - 1, argv + 1);
    if (!strcmp(cmd, "plan"))
        return ms_cli_plan(argc - 1, argv + 1);
    if (!strcmp(cmd, "inspect"))
        return ms_cli_inspect(argc - 1, argv + 1);
    if (!strcmp(cmd, "verify"))
        return ms_cli_verify(argc - 1, argv + 1);
    if (!strcmp(cmd, "methods"))
        return ms_cli_methods(argc - 1, argv + 1);
    fprintf(stderr, "mergestream: unknown command '%s'\n\n%s", cmd, usage);
    return 2;
}
