/*
 * child_impl.h - private to io/: starting the --pipe commands so that they die
 * with us (io/child.c).
 */
#ifndef MS_IO_CHILD_IMPL_H
#define MS_IO_CHILD_IMPL_H

#include <stdbool.h>
#include <stddef.h>

/*
 * The program and arguments that run `sh -c line` under the supervisor
 * (io/child.c): our own executable (/proc/self/exe) with a hidden first
 * argument, the pid of this process and then "/bin/sh" "-c" line. The
 * supervisor kills the command and everything it started when this process
 * dies, even by SIGKILL, and otherwise passes the shell's exit status or
 * signal through unchanged. The signals SIGTERM, SIGINT, SIGHUP and SIGQUIT
 * sent to the supervisor are passed to the shell.
 *
 * args must have room for MS__CHILD_ARGS pointers; pidbuf for MS__CHILD_PIDBUF
 * bytes (it holds the pid; args points into it and at line). Returns false
 * where there is no supervisor (not Linux with glibc): the caller runs
 * /bin/sh directly. Any thread; no allocation.
 *
 * Linux sends the parent-death signal when the *thread* that started the
 * child ends: start commands only from threads that live as long as the
 * commands (the main thread, libuv's pool threads).
 */
#define MS__CHILD_ARGS 7
#define MS__CHILD_PIDBUF 24
bool ms__child_args(const char *line, char **args, char *pidbuf);
#define MS__CHILD_EXE "/proc/self/exe"

/* The descendants of pid (children of children...), read from /proc: at most
 * cap of them into out, parents before children. Returns how many. Linux;
 * elsewhere none are found. Allocates a temporary table (ms_malloc). */
size_t ms__child_descendants(int pid, int *out, size_t cap);

#endif
