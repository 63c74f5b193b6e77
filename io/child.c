/*
 * child.c - the --pipe commands die with us, even when we are SIGKILLed.
 *
 * libuv's uv_spawn offers no parent-death signal, and a command that outlives
 * us sees end of input and may take a cut-off stream for a whole file. So the
 * command is started through our own executable (/proc/self/exe) with a
 * hidden first argument. A constructor sees that argument before main() (or
 * Criterion's main) runs and turns the process into a small supervisor that
 * never returns:
 *
 *   1. it blocks the signals it waits for, becomes a child subreaper (what
 *      the command starts and leaves behind becomes its child, not init's) and
 *      asks for SIGUSR1 when its parent dies (PR_SET_PDEATHSIG); if the parent
 *      is already gone (getppid() is not the pid it was given: the race
 *      between fork and prctl) it starts nothing;
 *   2. it forks and execs "/bin/sh -c CMD" with the signal mask it was given;
 *   3. it waits: SIGTERM, SIGINT, SIGHUP, SIGQUIT are passed to the shell;
 *      SIGUSR1 with the parent gone kills every descendant (SIGKILL, found in
 *      /proc) and exits; when the shell ends, the supervisor ends the same way
 *      (its exit status, or the same signal), so our messages do not change.
 *
 * Linux with glibc only (prctl, and glibc passes argc/argv to constructors);
 * elsewhere ms__child_args says so and the shell is started directly.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__) && defined(__GLIBC__)
#include <sys/prctl.h>
#define HAVE_SUPERVISOR 1
#else
#define HAVE_SUPERVISOR 0
#endif

#include "child_impl.h"
#include "ms_common.h"

#define CHILD_ARG "--ms-internal-pipe-supervisor"
#define PDEATH_SIG SIGUSR1
#define REAP_PASSES 200 /* kill_tree: at most this many looks, REAP_PAUSE_NS apart */
#define REAP_PAUSE_NS 10000000L

size_t ms__child_descendants(int pid, int *out, size_t cap)
{
    size_t n = 0, cap_all = 0, nall = 0;
    int(*all)[2] = NULL; /* (pid, ppid) */
    DIR *d = opendir("/proc");
    struct dirent *de;
    while (d && (de = readdir(d)) != NULL) {
        int p = atoi(de->d_name), pp = 0;
        if (p <= 0)
            continue;
        char path[64], buf[512];
        snprintf(path, sizeof path, "/proc/%d/stat", p);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t r = read(fd, buf, sizeof buf - 1);
        close(fd);
        buf[r > 0 ? r : 0] = 0;
        const char *rp = strrchr(buf, ')'); /* "pid (comm) state ppid ..." */
        if (!rp || sscanf(rp + 1, " %*c %d", &pp) != 1)
            continue;
        if (nall == cap_all) {
            size_t nc = cap_all ? 2 * cap_all : 256;
            void *na = ms_realloc(all, nc * sizeof *all);
            if (!na)
                break;
            all = na;
            cap_all = nc;
        }
        all[nall][0] = p;
        all[nall][1] = pp;
        nall++;
    }
    if (d)
        closedir(d);
    /* Breadth first: out[] doubles as the queue. */
    for (size_t head = 0, parent = (size_t)-1;; head++) {
        int want = parent == (size_t)-1 ? pid : out[parent];
        for (size_t i = 0; i < nall && n < cap; i++)
            if (all[i][1] == want)
                out[n++] = all[i][0];
        parent = head;
        if (head >= n)
            break;
    }
    ms_free(all);
    return n;
}

#if HAVE_SUPERVISOR

bool ms__child_args(const char *line, char **args, char *pidbuf)
{
    static char arg0[] = "mergestream", arg1[] = CHILD_ARG, sh[] = "/bin/sh", c[] = "-c";
    snprintf(pidbuf, MS__CHILD_PIDBUF, "%ld", (long)getpid());
    args[0] = arg0;
    args[1] = arg1;
    args[2] = pidbuf;
    args[3] = sh;
    args[4] = c;
    args[5] = (char *)line;
    args[6] = NULL;
    return true;
}

/* Our parent is gone: SIGKILL to every descendant (those the shell left behind
 * are our children too, as we are their subreaper) until none is left. */
static void kill_tree(void)
{
    int kids[1024];
    for (int pass = 0; pass < REAP_PASSES; pass++) {
        size_t n = ms__child_descendants(getpid(), kids, MS_ARRAY_LEN(kids));
        for (size_t i = 0; i < n; i++)
            kill(kids[i], SIGKILL);
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        if (!n)
            return;
        struct timespec ts = { 0, REAP_PAUSE_NS };
        nanosleep(&ts, NULL);
    }
}

/* Ends this process as the shell ended (status from waitpid). */
static void __attribute__((noreturn)) end_like(int status)
{
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        struct rlimit no_core = { 0, 0 };
        setrlimit(RLIMIT_CORE, &no_core); /* the shell's core, if any, is its own */
        signal(sig, SIG_DFL);
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, sig);
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        raise(sig);
        _exit(128 + sig);
    }
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 127);
}

/* argv: exe CHILD_ARG ppid program args... (ms__child_args). Never returns. */
static void __attribute__((noreturn)) supervise(char **argv)
{
    pid_t ppid = (pid_t)atol(argv[2]);
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGQUIT);
    sigaddset(&set, PDEATH_SIG);
    sigprocmask(SIG_BLOCK, &set, &old);
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0 || prctl(PR_SET_PDEATHSIG, PDEATH_SIG) < 0) {
        dprintf(2, "mergestream: --pipe: prctl: %s\n", strerror(errno));
        _exit(127);
    }
    if (getppid() != ppid)
        _exit(128 + SIGKILL); /* the parent died before prctl: start nothing */
    pid_t child = fork();
    if (child < 0) {
        dprintf(2, "mergestream: --pipe: fork: %s\n", strerror(errno));
        _exit(127);
    }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        execv(argv[3], argv + 3);
        dprintf(2, "mergestream: --pipe: cannot run %s: %s\n", argv[3], strerror(errno));
        _exit(127);
    }
    /* Our copy of the command's stdin must not hide its closing (EPIPE) from
     * the writer, nor our stdout the end of a pipe that stdout is. */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        if (null > 1)
            close(null);
    }
    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&set, &si);
        if (sig < 0)
            continue; /* EINTR */
        if (sig == PDEATH_SIG) {
            if (getppid() != ppid) {
                kill_tree();
                _exit(128 + SIGKILL);
            }
            continue; /* someone else's SIGUSR1 */
        }
        if (sig != SIGCHLD) {
            kill(child, sig);
            continue;
        }
        int status;
        pid_t p;
        while ((p = waitpid(-1, &status, WNOHANG)) > 0)
            if (p == child)
                end_like(status);
    }
}

/* Runs before main() in every program that links this object (out.c uses
 * ms__child_args, which pulls it in); glibc passes the arguments. */
__attribute__((constructor)) static void child_hook(int argc, char **argv, char **envp)
{
    (void)envp;
    if (argc >= 6 && argv && argv[1] && strcmp(argv[1], CHILD_ARG) == 0)
        supervise(argv);
}

#else

bool ms__child_args(const char *line, char **args, char *pidbuf)
{
    (void)line, (void)args, (void)pidbuf;
    return false;
}

#endif
