/*
 * ms-timeit.c - runs a command and prints its wall time and peak RSS:
 *
 *   ms-timeit CMD [ARGS...]   ->  stderr: "timeit: wall_s=1.234 maxrss_kib=5678 status=0"
 *
 * Peak RSS is the child's ru_maxrss from wait4(), so only that process tree's
 * own memory counts. Exit status is the command's. Used by tools/bench.sh and
 * the RSS test, so no GNU time package is needed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: ms-timeit CMD [ARGS...]\n");
        return 2;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t pid = fork();
    if (pid < 0) {
        perror("ms-timeit: fork");
        return 1;
    }
    if (pid == 0) {
        execvp(argv[1], argv + 1);
        fprintf(stderr, "ms-timeit: cannot run %s\n", argv[1]);
        _exit(127);
    }
    int st = 0;
    struct rusage ru;
    if (wait4(pid, &st, 0, &ru) < 0) {
        perror("ms-timeit: wait4");
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double wall = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    fprintf(stderr, "timeit: wall_s=%.3f maxrss_kib=%ld status=%d\n", wall, ru.ru_maxrss, code);
    return code;
}
