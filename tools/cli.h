/*
 * cli.h - the mergestream subcommands (private to tools/). Each takes the
 * arguments after the subcommand name (argv[0] is the subcommand) and returns
 * the process exit status: 0 success, 1 failure, 2 usage error.
 */
#ifndef MS_CLI_H
#define MS_CLI_H

#include <stdio.h>

int ms_cli_inspect(int argc, char **argv);
int ms_cli_verify(int argc, char **argv);
int ms_cli_plan(int argc, char **argv);
int ms_cli_merge(int argc, char **argv);
int ms_cli_methods(int argc, char **argv);

/* The method registry as `merge --help` ends: every method with its summary,
 * parameters and defaults after a heading line; with only, that method alone and
 * no heading (nothing if no method has that name). */
void ms_cli_print_methods(FILE *f, const char *only);

/* Prints "mergestream: <ms_errmsg() or fallback>" to stderr. */
void ms_cli_report(int rc, const char *fallback);

#endif
