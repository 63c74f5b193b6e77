/*
 * cli.h - the mergestream subcommands (private to tools/). Each takes the
 * arguments after the subcommand name (argv[0] is the subcommand) and returns
 * the process exit status: 0 success, 1 failure, 2 usage error.
 */
#ifndef MS_CLI_H
#define MS_CLI_H

int ms_cli_inspect(int argc, char **argv);
int ms_cli_verify(int argc, char **argv);
int ms_cli_plan(int argc, char **argv);
int ms_cli_merge(int argc, char **argv);

/* Prints "mergestream: <ms_errmsg() or fallback>" to stderr. */
void ms_cli_report(int rc, const char *fallback);

#endif
