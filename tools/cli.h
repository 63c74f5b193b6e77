/*
 * cli.h - the mergestream subcommands (private to tools/). Each takes the
 * arguments after the subcommand name (argv[0] is the subcommand) and returns
 * the process exit status: 0 success, 1 failure, 2 usage error.
 */
#ifndef MS_CLI_H
#define MS_CLI_H

#include <stdbool.h>
#include <stdint.h>
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

/*
 * Recipe files of several documents (cli_multi.c, mergekit-multi). ms_cli_multi_link
 * links f (ms_recipe_file_link) with the intermediate folder (required when f has
 * several documents): 0, or the exit status after printing why. ms_cli_multi_plan
 * checks and prints every stage (a stage whose inputs are not built yet: its recipe
 * only, said so). ms_cli_multi_merge checks every stage it can, then runs them in
 * order (a named stage whose folder holds a complete model is skipped when lazy);
 * intermediates are plain folders whatever eo asks for OUT. Both return an exit
 * status; *rc_out is the failing ms_engine_run code (MS_ECANCELED on a signal).
 */
struct ms_recipe_file;
struct ms_plan_opts;
struct ms_engine_opts;
int ms_cli_multi_link(struct ms_recipe_file *f, const char *intermediate_dir);
int ms_cli_multi_plan(struct ms_recipe_file *f, const struct ms_plan_opts *po, uint64_t max_memory,
                      bool json, bool quiet);
int ms_cli_multi_merge(struct ms_recipe_file *f, const struct ms_plan_opts *po,
                       const struct ms_engine_opts *eo, bool lazy, int *rc_out);

/* Prints "mergestream: <ms_errmsg() or fallback>" to stderr. */
void ms_cli_report(int rc, const char *fallback);

#endif
