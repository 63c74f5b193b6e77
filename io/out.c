/*
 * out.c - sequential output sinks (ms_out.h): a directory, one tar stream on a
 * file descriptor, or one `sh -c CMD` per file fed through its stdin; each
 * optionally zstd-compressed.
 *
 * Layers, bottom up:
 *   write_all()  puts raw bytes on a descriptor (EINTR, short writes, EAGAIN,
 *                EPIPE without dying of SIGPIPE);
 *   emit()       writes raw bytes to the current destination (the .partial
 *                file, the tar descriptor or the command's stdin) and words
 *                the error for that destination;
 *   put()        the uncompressed byte stream: through the zstd context when
 *                compressing, else straight to emit(). Tar headers and padding
 *                go through put(), so a compressed tar is one zstd stream.
 *
 * Threads: an ms_out is used by one thread at a time; successive calls may
 * come from different threads (the engine's pool). The private uv loop that
 * spawns and reaps the --pipe commands is run only inside our calls, by the
 * calling thread.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>
#include <zstd.h>

#include "child_impl.h"
#include "ms_common.h"
#include "ms_file.h"
#include "ms_out.h"
#include "ms_str.h"

extern char **environ;

#define TAR_BLOCK 512u
#define TAR_RECORD (20u * TAR_BLOCK)         /* GNU tar's default record size */
#define TAR_OCTAL_SIZE_MAX 077777777777ull   /* largest size in 11 octal digits */
#define TAR_NAME_MAX 100u
#define KILL_GRACE_MS 5000                   /* SIGTERM, then SIGKILL after this */
#define EPIPE_REAP_MS 2000                   /* wait for a command that closed its stdin */
#define POLL_MS 200                          /* how often a blocked write or wait looks at stop */

/* How write_all may write to a descriptor without blocking past POLL_MS. */
enum {
    WR_FILE,                      /* regular file: plain writes (they do not wait on a reader) */
    WR_NONBLOCK,                  /* O_NONBLOCK: any size, EAGAIN then poll */
    WR_SMALL,                     /* blocking pipe or socket: after POLLOUT, at most PIPE_BUF
                                     bytes, which Linux takes without blocking */
};

struct ms_out {
    enum ms_out_kind kind;
    char *dir;                    /* DIR: owned copy */
    char *cmd;                    /* PIPE: owned copy of the template */
    int tar_fd;                   /* TAR: the caller's descriptor (not closed) */
    uint64_t mtime;               /* TAR: entry mtime in seconds */

    ZSTD_CCtx *cctx;              /* NULL without compression */
    unsigned char *zbuf;          /* compressed output, zcap bytes (ZSTD_CStreamOutSize) */
    size_t zcap;

    /* The current file; valid between file_begin and file_end. */
    unsigned mode;                /* its permission bits */
    unsigned next_mode;           /* ms_out_file_mode's bits | 0x10000, or 0 (0644) */
    bool in_file;
    char *name;                   /* as given to file_begin */
    char *final_name;             /* name or name.zst */
    char *tmp_path, *final_path;  /* DIR */
    int fd;                       /* DIR: the .partial; PIPE: the command's stdin; else -1 */
    uint64_t size;                /* declared uncompressed size */
    uint64_t done;                /* uncompressed bytes received so far */
    uint64_t tar_bytes;           /* TAR: uncompressed stream length so far */

    /* Stopping (ms_out_opts): writes and waits poll these every POLL_MS. */
    int (*stop)(void);
    unsigned stall_s;
    int tar_mode;                 /* TAR: WR_FILE, WR_NONBLOCK or WR_SMALL (below) */

    /* Sticky state: after an error only abort and free do anything. */
    int err;
    char errmsg[512];
    bool finished, aborted;

    /* PIPE: the private loop and the running command. */
    bool loop_ok;
    uv_loop_t loop;
    uv_timer_t timer;
    uv_process_t proc;
    bool proc_open;               /* proc was spawned and not yet closed */
    bool exited;                  /* its exit callback ran */
    bool timed_out;
    int64_t exit_status;
    int term_signal;
};

/* --------------------------------------------------------------- errors */

/* Records the diagnostic and makes it sticky: every later call but abort and
 * free fails with the same code and message. */
static int fail(struct ms_out *o, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(struct ms_out *o, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->errmsg, sizeof o->errmsg, fmt, ap);
    va_end(ap);
    o->err = code;
    return ms_error(code, "%s", o->errmsg);
}

/* Checks that the sink can take another call; re-raises a sticky error. */
static int check_usable(struct ms_out *o, const char *what)
{
    if (o->err)
        return ms_error(o->err, "%s", o->errmsg);
    if (o->aborted)
        return ms_error(MS_EINVAL, "output: %s after abort", what);
    if (o->finished)
        return ms_error(MS_EINVAL, "output: %s after finish", what);
    return 0;
}

/* ------------------------------------------------------------ raw writes */

/*
 * How much a blocking pipe takes at once without blocking once poll said POLLOUT:
 * PIPE_BUF, or on Linux the pipe's free pages but one (its size from F_GETPIPE_SZ
 * minus the bytes queued, FIONREAD, which may be spread over one more page).
 */
static size_t small_room(int fd)
{
    size_t room = PIPE_BUF;
#if defined(__linux__)
    int size = fcntl(fd, 1032 /* F_GETPIPE_SZ */), queued = 0;
    if (size > 0 && ioctl(fd, FIONREAD, &queued) == 0 && queued >= 0) {
        long pages = (long)size / 4096 - ((long)queued + 4095) / 4096 - 1;
        if (pages * 4096 > (long)room)
            room = (size_t)pages * 4096;
    }
#endif
    return room;
}

/*
 * Writes all len bytes to fd. Returns 0 or -errno (UV_EPIPE when the reader
 * has gone), MS_ECANCELED when o->stop() asks to stop, UV_ETIMEDOUT when the
 * reader took nothing for o->stall_s seconds (0: no limit). SIGPIPE is blocked
 * in the calling thread for the duration, and a SIGPIPE raised by our own write
 * is discarded, so a closed pipe is an error code here even if the process has
 * not ignored SIGPIPE. Unless mode is WR_FILE the descriptor is polled with a
 * POLL_MS timeout, so that a reader that stopped reading never blocks us for
 * longer than that between two looks at stop and the stall clock.
 */
static int write_all(const struct ms_out *o, int fd, int mode, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    sigset_t pipeset, old, pending;
    sigemptyset(&pipeset);
    sigaddset(&pipeset, SIGPIPE);
    sigemptyset(&pending);
    sigpending(&pending);
    bool was_pending = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipeset, &old);

    int rc = 0;
    uint64_t last = uv_hrtime();
    while (len > 0) {
        if (mode != WR_FILE) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            int pr = poll(&pfd, 1, POLL_MS);
            if (pr < 0 && errno != EINTR) {
                rc = -errno;
                break;
            }
            if (o->stop && o->stop()) {
                rc = MS_ECANCELED;
                break;
            }
            if (pr <= 0) {
                if (o->stall_s && uv_hrtime() - last >= (uint64_t)o->stall_s * 1000000000u) {
                    rc = UV_ETIMEDOUT;
                    break;
                }
                continue;
            }
        }
        /* room once: MS_MIN evaluates it twice, and the reader may drain the pipe
         * between the two, which once wrote past the end of buf */
        size_t room = mode == WR_SMALL ? small_room(fd) : len;
        size_t n_try = MS_MIN(len, room);
        ssize_t n = write(fd, p, n_try);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            last = uv_hrtime();
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (mode == WR_FILE)
                mode = WR_NONBLOCK; /* a non-blocking descriptor after all */
            continue;
        }
        rc = n < 0 ? -errno : UV_EIO;
        break;
    }

    if (rc == UV_EPIPE && !was_pending) {
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipeset, NULL, &zero) < 0 && errno == EINTR)
            ;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

/* The write mode for a descriptor we did not open (the tar stream's). */
static int fd_mode(int fd)
{
    struct stat st;
    if (fstat(fd, &st) == 0 && (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode)))
        return WR_FILE; /* no reader to wait on (a terminal is refused by the CLI) */
    int fl = fcntl(fd, F_GETFL);
    return fl >= 0 && (fl & O_NONBLOCK) ? WR_NONBLOCK : WR_SMALL;
}

/* --------------------------------------------------------- pipe commands */

static void on_exit_cb(uv_process_t *proc, int64_t exit_status, int term_signal)
{
    struct ms_out *o = proc->data;
    o->exited = true;
    o->exit_status = exit_status;
    o->term_signal = term_signal;
    uv_timer_stop(&o->timer);
}

static void on_timer(uv_timer_t *t)
{
    struct ms_out *o = t->data;
    o->timed_out = true;
}

/* Runs the loop until the command exits or timeout_ms passes (0 = no limit).
 * Returns true if it exited. Calling thread: the one using the ms_out. */
static bool wait_exit(struct ms_out *o, uint64_t timeout_ms)
{
    o->timed_out = false;
    if (timeout_ms && !o->exited)
        uv_timer_start(&o->timer, on_timer, timeout_ms, 0);
    while (!o->exited && !o->timed_out)
        uv_run(&o->loop, UV_RUN_ONCE);
    uv_timer_stop(&o->timer);
    return o->exited;
}

/* wait_exit with no time limit, but false as soon as o->stop() asks to stop. */
static bool wait_exit_or_stop(struct ms_out *o)
{
    if (!o->stop)
        return wait_exit(o, 0);
    while (!wait_exit(o, POLL_MS))
        if (o->stop())
            return false;
    return true;
}

/* Closes the process handle of a command that has exited (or that we give
 * up on), so that proc can be spawned again. */
static void close_proc(struct ms_out *o)
{
    if (!o->proc_open)
        return;
    uv_close((uv_handle_t *)&o->proc, NULL);
    uv_run(&o->loop, UV_RUN_NOWAIT);
    o->proc_open = false;
}

/* Kills a running command and whatever it started (sh -c runs the command as its
 * child): SIGTERM to all, and SIGKILL after KILL_GRACE_MS to those still there;
 * then reaps the shell. */
static void kill_proc(struct ms_out *o)
{
    if (!o->proc_open)
        return;
    if (!o->exited) {
        /* The shell first: it would report a child killed under it ("Terminated"). */
        int kids[64];
        size_t nk = ms__child_descendants(o->proc.pid, kids, MS_ARRAY_LEN(kids));
        uv_process_kill(&o->proc, SIGTERM);
        for (size_t i = 0; i < nk; i++)
            kill(kids[i], SIGTERM);
        if (!wait_exit(o, KILL_GRACE_MS)) {
            uv_process_kill(&o->proc, SIGKILL);
            wait_exit(o, 0);
        }
        for (size_t i = 0; i < nk; i++)
            kill(kids[i], SIGKILL); /* ESRCH for those that have gone */
    }
    close_proc(o);
}

/* Appends s to dst, which has room, quoted for where it lands in the template:
 * outside quotes as '...' (with ' written as '\''), inside '...' with ' written
 * as '\'', inside "..." with $ ` " \ backslash-escaped. Returns the new end. */
static char *quote_into(char *dst, const char *s, char ctx)
{
    if (!ctx)
        *dst++ = '\'';
    for (; *s; s++) {
        if (ctx != '"' && *s == '\'') {
            memcpy(dst, "'\\''", 4);
            dst += 4;
        } else if (ctx == '"' && strchr("$`\"\\", *s)) {
            *dst++ = '\\';
            *dst++ = *s;
        } else {
            *dst++ = *s;
        }
    }
    if (!ctx)
        *dst++ = '\'';
    return dst;
}

/* The command line for one file: the template with every "{}" replaced by the
 * name, quoted for the shell context the "{}" is in (so that "out/{}" and
 * 'out/{}' work as well as out/{}). Returns ms_malloc'd storage or NULL. */
static char *expand_cmd(const char *tmpl, const char *name)
{
    size_t nq = 2 + 4 * strlen(name), nb = 0;
    for (const char *s = tmpl; (s = strstr(s, "{}")) != NULL; s += 2)
        nb++;
    char *out = ms_malloc(strlen(tmpl) + nb * nq + 1);
    if (!out)
        return NULL;
    char *d = out, ctx = 0; /* 0, '\'' or '"': the quotes the scan is inside */
    for (const char *s = tmpl; *s;) {
        if (s[0] == '{' && s[1] == '}') {
            d = quote_into(d, name, ctx);
            s += 2;
            continue;
        }
        if (*s == '\\' && ctx != '\'' && s[1]) {
            *d++ = *s++; /* the escaped character is copied as it is */
        } else if (*s == '\'' || *s == '"') {
            ctx = !ctx ? *s : ctx == *s ? 0 : ctx;
        }
        *d++ = *s++;
    }
    *d = 0;
    return out;
}

/* The environment for a command: ours without MERGESTREAM_FILE, plus
 * MERGESTREAM_FILE=name in *var. Returns an ms_malloc'd array (the strings
 * are borrowed from environ and *var) or NULL. */
static char **make_env(const char *name, char **var)
{
    size_t n = 0;
    for (char **e = environ; e && *e; e++)
        n++;
    char **env = ms_malloc((n + 2) * sizeof *env);
    *var = ms_asprintf("MERGESTREAM_FILE=%s", name);
    if (!env || !*var) {
        ms_free(env);
        ms_free(*var);
        *var = NULL;
        return NULL;
    }
    size_t k = 0;
    for (char **e = environ; e && *e; e++)
        if (strncmp(*e, "MERGESTREAM_FILE=", 17) != 0)
            env[k++] = *e;
    env[k++] = *var;
    env[k] = NULL;
    return env;
}

/* Starts the command for the current file with its stdin on a new pipe whose
 * write end becomes o->fd. */
static int spawn_cmd(struct ms_out *o)
{
    char *line = expand_cmd(o->cmd, o->final_name);
    char *var = NULL;
    char **env = make_env(o->final_name, &var);
    uv_file fds[2] = {-1, -1};
    int rc;
    if (!line || !env) {
        rc = fail(o, MS_ENOMEM, "pipe command for '%s': out of memory", o->final_name);
        goto out;
    }
    /* Both ends close-on-exec: the child gets the read end as its fd 0 by dup2,
     * and no child (of ours or of another thread) keeps the write end open,
     * which would hide the end of input. */
    rc = uv_pipe(fds, 0, 0);
    if (rc < 0) {
        rc = fail(o, rc, "pipe command for '%s': cannot create a pipe: %s", o->final_name,
                  ms_strerror(rc));
        goto out;
    }

    /* Through the supervisor (io/child.c), which kills the command if we die. */
    char arg0[] = "sh", arg1[] = "-c", pidbuf[MS__CHILD_PIDBUF];
    char *args[MS__CHILD_ARGS] = { arg0, arg1, line, NULL };
    bool supervised = ms__child_args(line, args, pidbuf);
    uv_stdio_container_t stdio[3] = {
        {.flags = UV_INHERIT_FD, .data.fd = fds[0]},
        {.flags = UV_INHERIT_FD, .data.fd = STDOUT_FILENO},
        {.flags = UV_INHERIT_FD, .data.fd = STDERR_FILENO},
    };
    uv_process_options_t po = {
        .exit_cb = on_exit_cb,
        .file = supervised ? MS__CHILD_EXE : "/bin/sh",
        .args = args,
        .env = env,
        .stdio_count = 3,
        .stdio = stdio,
    };
    o->exited = false;
    o->exit_status = 0;
    o->term_signal = 0;
    o->proc.data = o;
    rc = uv_spawn(&o->loop, &o->proc, &po);
    o->proc_open = true; /* even on failure the handle must be closed */
    if (supervised && (rc == UV_ENOENT || rc == UV_EACCES)) {
        /* No /proc (or not executable): run the shell directly, unsupervised. */
        close_proc(o);
        char *direct[] = { arg0, arg1, line, NULL };
        po.file = "/bin/sh";
        po.args = direct;
        rc = uv_spawn(&o->loop, &o->proc, &po);
        o->proc_open = true;
    }
    if (rc < 0) {
        close_proc(o);
        rc = fail(o, MS_ECHILD, "pipe command for '%s' could not be started (%s): %s",
                  o->final_name, ms_strerror(rc), o->cmd);
        goto out;
    }
    /* Non-blocking: write_all polls it, so a command that stops reading cannot
     * hold us past a stop request. The read end (the child's) stays blocking. */
    if (fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK) < 0) {
        rc = fail(o, -errno, "pipe command for '%s': %s", o->final_name, strerror(errno));
        goto out;
    }
    o->fd = fds[1];
    fds[1] = -1;
out:
    if (fds[0] >= 0)
        close(fds[0]);
    if (fds[1] >= 0)
        close(fds[1]);
    ms_free(line);
    ms_free(env);
    ms_free(var);
    return rc;
}

/* Formats how the command ended into buf ("exit status 3", "signal 9"). */
static const char *describe_exit(const struct ms_out *o, char *buf, size_t cap)
{
    if (o->term_signal)
        snprintf(buf, cap, "was killed by signal %d", o->term_signal);
    else
        snprintf(buf, cap, "failed with exit status %" PRId64, o->exit_status);
    return buf;
}

/* --------------------------------------------------------------- emitting */

/* Writes raw (already compressed, if compressing) bytes to the destination. */
static int emit(struct ms_out *o, const void *buf, size_t len)
{
    if (len == 0)
        return 0;
    int fd = o->kind == MS_OUT_TAR ? o->tar_fd : o->fd;
    int rc = write_all(o, fd, o->kind == MS_OUT_TAR ? o->tar_mode
                              : o->kind == MS_OUT_PIPE ? WR_NONBLOCK : WR_FILE, buf, len);
    if (rc == 0)
        return 0;
    const char *cur = o->in_file ? o->name : "(end of archive)";
    if (rc == MS_ECANCELED)
        return fail(o, rc, "output: stopped while writing '%s'", cur);
    if (rc == UV_ETIMEDOUT)
        return fail(o, rc, "%s: the reader took no bytes for %u s while '%s' was written "
                    "(--stall-timeout)", o->kind == MS_OUT_TAR ? "tar output"
                    : o->kind == MS_OUT_PIPE ? o->cmd : "output", o->stall_s, cur);
    switch (o->kind) {
    case MS_OUT_DIR:
        return fail(o, rc, "%s: write failed: %s", o->tmp_path, ms_strerror(rc));
    case MS_OUT_TAR:
        if (rc == UV_EPIPE)
            return fail(o, rc, "tar output: output stream closed (broken pipe) while writing '%s'",
                        cur);
        return fail(o, rc, "tar output: write failed while writing '%s': %s", cur,
                    ms_strerror(rc));
    case MS_OUT_PIPE:
        break;
    }
    if (rc != UV_EPIPE)
        return fail(o, rc, "pipe command for '%s': write failed: %s (%s)", o->final_name,
                    ms_strerror(rc), o->cmd);
    /* The command closed its stdin before the end of the file: most likely it
     * has exited; learn how, without waiting long for one that lingers. */
    close(o->fd);
    o->fd = -1;
    char how[64];
    if (wait_exit(o, EPIPE_REAP_MS)) {
        close_proc(o);
        if (o->exit_status == 0 && o->term_signal == 0)
            snprintf(how, sizeof how, "exited with status 0");
        else
            describe_exit(o, how, sizeof how);
        return fail(o, MS_ECHILD,
                    "pipe command for '%s' %s before reading all its input (broken pipe after %"
                    PRIu64 " of %" PRIu64 " bytes): %s",
                    o->final_name, how, o->done, o->size, o->cmd);
    }
    return fail(o, MS_ECHILD,
                "pipe command for '%s' closed its input after %" PRIu64 " of %" PRIu64
                " bytes: %s",
                o->final_name, o->done, o->size, o->cmd);
}

static int zstd_fail(struct ms_out *o, size_t zr)
{
    const char *what = o->kind == MS_OUT_TAR ? "tar output" : o->final_name;
    return fail(o, MS_EIO, "%s: zstd compression failed: %s", what, ZSTD_getErrorName(zr));
}

/* Puts uncompressed stream bytes: compressed when o->cctx, else raw. With
 * end, also ends the zstd frame (len may be 0). */
static int put(struct ms_out *o, const void *buf, size_t len, bool end)
{
    if (!o->cctx)
        return emit(o, buf, len);
    ZSTD_inBuffer in = {buf, len, 0};
    ZSTD_EndDirective mode = end ? ZSTD_e_end : ZSTD_e_continue;
    for (;;) {
        ZSTD_outBuffer zo = {o->zbuf, o->zcap, 0};
        size_t zr = ZSTD_compressStream2(o->cctx, &zo, &in, mode);
        if (ZSTD_isError(zr))
            return zstd_fail(o, zr);
        int rc = emit(o, o->zbuf, zo.pos);
        if (rc < 0)
            return rc;
        if (end ? zr == 0 : in.pos == in.size)
            return 0;
    }
}

/* Zero bytes for tar padding and end blocks. */
static const unsigned char zeros[TAR_BLOCK * 2];

static int put_zeros(struct ms_out *o, uint64_t n)
{
    while (n > 0) {
        size_t k = (size_t)MS_MIN(n, (uint64_t)sizeof zeros);
        int rc = put(o, zeros, k, false);
        if (rc < 0)
            return rc;
        n -= k;
        o->tar_bytes += k;
    }
    return 0;
}

/* ------------------------------------------------------------------ tar */

/* Writes v as n-1 octal digits and a NUL; the caller checks that it fits. */
static void tar_octal(unsigned char *f, size_t n, uint64_t v)
{
    f[n - 1] = 0;
    for (size_t i = n - 1; i-- > 0;) {
        f[i] = (unsigned char)('0' + (v & 7));
        v >>= 3;
    }
}

/*
 * The 12-byte size field: 11 octal digits and a NUL up to 8 GiB - 1; above
 * that GNU's base-256 form (first byte 0x80, then the value big-endian in the
 * other 11 bytes), which GNU tar and libarchive read. A pax "size" record
 * accompanies it for strict POSIX readers (see tar_header).
 */
static void tar_size_field(unsigned char f[12], uint64_t size)
{
    if (size <= TAR_OCTAL_SIZE_MAX) {
        tar_octal(f, 12, size);
        return;
    }
    f[0] = 0x80;
    for (int i = 11; i >= 1; i--) {
        f[i] = (unsigned char)(size & 0xff);
        size >>= 8;
    }
}

/* Fills one 512-byte ustar header block (with its checksum). */
static void tar_block(unsigned char h[TAR_BLOCK], const char *name, size_t name_len,
                      uint64_t size, uint64_t mtime, char type, unsigned mode)
{
    memset(h, 0, TAR_BLOCK);
    memcpy(h, name, name_len);           /* name[100]; NUL-terminated unless full */
    tar_octal(h + 100, 8, mode);         /* mode */
    tar_octal(h + 108, 8, 0);            /* uid */
    tar_octal(h + 116, 8, 0);            /* gid */
    tar_size_field(h + 124, size);       /* size[12] */
    tar_octal(h + 136, 12, mtime);       /* mtime[12] */
    h[156] = (unsigned char)type;        /* typeflag */
    memcpy(h + 257, "ustar", 6);         /* magic "ustar\0" */
    memcpy(h + 263, "00", 2);            /* version */
    memcpy(h + 265, "root", 4);          /* uname[32] */
    memcpy(h + 297, "root", 4);          /* gname[32] */
    tar_octal(h + 329, 8, 0);            /* devmajor */
    tar_octal(h + 337, 8, 0);            /* devminor */
    memset(h + 148, ' ', 8);             /* chksum counts as spaces */
    unsigned sum = 0;
    for (size_t i = 0; i < TAR_BLOCK; i++)
        sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum); /* six digits, NUL, then the space */
    h[155] = ' ';
}

/* Appends the pax record "LEN key=value\n" (LEN counts the whole record). */
static size_t pax_record(char *dst, size_t cap, const char *key, const char *val)
{
    size_t body = 1 + strlen(key) + 1 + strlen(val) + 1; /* " key=value\n" */
    size_t len = body + 1;
    while (snprintf(NULL, 0, "%zu", len) + body != len)
        len++;
    if (len < cap)
        snprintf(dst, cap, "%zu %s=%s\n", len, key, val);
    return len;
}

/* Emits the header(s) of the current file: a pax extended header first when
 * the name is over 100 bytes or the size over 8 GiB - 1, then the ustar block. */
static int tar_header(struct ms_out *o)
{
    const char *name = o->final_name;
    bool long_name = strlen(name) > TAR_NAME_MAX;
    bool big = o->size > TAR_OCTAL_SIZE_MAX;
    unsigned char h[TAR_BLOCK];
    int rc;

    if (long_name || big) {
        char sizebuf[24];
        snprintf(sizebuf, sizeof sizebuf, "%" PRIu64, o->size);
        size_t plen = (long_name ? pax_record(NULL, 0, "path", name) : 0) +
                      (big ? pax_record(NULL, 0, "size", sizebuf) : 0);
        char *pax = ms_malloc(plen + 1);
        if (!pax)
            return fail(o, MS_ENOMEM, "tar output: '%s': out of memory", name);
        size_t at = 0;
        if (long_name)
            at += pax_record(pax + at, plen + 1 - at, "path", name);
        if (big)
            at += pax_record(pax + at, plen + 1 - at, "size", sizebuf);
        assert(at == plen);

        /* The extended header's own name is informational; keep it fixed
         * (no pid, unlike GNU tar) so that the archive is reproducible. */
        char xname[TAR_NAME_MAX + 1];
        int xn = snprintf(xname, sizeof xname, "PaxHeaders/%.*s", (int)ms_utf8_prefix(name, 89),
                          name);
        tar_block(h, xname, (size_t)xn, plen, o->mtime, 'x', 0644);
        rc = put(o, h, TAR_BLOCK, false);
        if (rc == 0)
            rc = put(o, pax, plen, false);
        ms_free(pax);
        if (rc < 0)
            return rc;
        o->tar_bytes += TAR_BLOCK + plen;
        rc = put_zeros(o, (TAR_BLOCK - plen % TAR_BLOCK) % TAR_BLOCK);
        if (rc < 0)
            return rc;
    }
    tar_block(h, name, ms_utf8_prefix(name, TAR_NAME_MAX), o->size, o->mtime, '0', o->mode);
    rc = put(o, h, TAR_BLOCK, false);
    if (rc == 0)
        o->tar_bytes += TAR_BLOCK;
    return rc;
}

/* ------------------------------------------------------------- the API */

int ms_out_open(const struct ms_out_opts *opts, struct ms_out **out)
{
    *out = NULL;
    if (opts->zstd_level < 0 || opts->zstd_level > ZSTD_maxCLevel())
        return ms_error(MS_EINVAL, "output: zstd level %d is out of range 1..%d", opts->zstd_level,
                        ZSTD_maxCLevel());
    if (opts->kind == MS_OUT_DIR && (!opts->dir || !*opts->dir))
        return ms_error(MS_EINVAL, "output: no directory given");
    if (opts->kind == MS_OUT_TAR && opts->fd < 0)
        return ms_error(MS_EINVAL, "tar output: no file descriptor given");
    if (opts->kind == MS_OUT_PIPE && (!opts->pipe_cmd || !*opts->pipe_cmd))
        return ms_error(MS_EINVAL, "--pipe: empty command");
    if (opts->kind == MS_OUT_TAR && opts->mtime > 077777777777ull)
        return ms_error(MS_EINVAL, "tar output: mtime %" PRIu64 " does not fit the header",
                        opts->mtime);

    int rc = 0;
    struct ms_out *o = ms_calloc(1, sizeof *o);
    if (!o)
        return ms_error(MS_ENOMEM, "output: out of memory");
    o->kind = opts->kind;
    o->tar_fd = opts->fd;
    o->stop = opts->stop;
    o->stall_s = opts->stall_seconds;
    if (o->kind == MS_OUT_TAR)
        o->tar_mode = fd_mode(o->tar_fd);
    o->mtime = opts->mtime;
    o->fd = -1;
    if ((opts->kind == MS_OUT_DIR && !(o->dir = ms_strdup(opts->dir))) ||
        (opts->kind == MS_OUT_PIPE && !(o->cmd = ms_strdup(opts->pipe_cmd)))) {
        rc = ms_error(MS_ENOMEM, "output: out of memory");
        goto out;
    }

    if (opts->zstd_level > 0) {
        o->zcap = ZSTD_CStreamOutSize();
        o->zbuf = ms_malloc(o->zcap);
        o->cctx = ZSTD_createCCtx();
        if (!o->zbuf || !o->cctx) {
            rc = ms_error(MS_ENOMEM, "output: out of memory for zstd");
            goto out;
        }
        size_t zr = ZSTD_CCtx_setParameter(o->cctx, ZSTD_c_compressionLevel, opts->zstd_level);
        if (!ZSTD_isError(zr))
            zr = ZSTD_CCtx_setParameter(o->cctx, ZSTD_c_checksumFlag, 1);
        if (!ZSTD_isError(zr) && opts->zstd_workers > 0)
            zr = ZSTD_CCtx_setParameter(o->cctx, ZSTD_c_nbWorkers, (int)opts->zstd_workers);
        if (ZSTD_isError(zr)) {
            rc = ms_error(MS_EUNSUPPORTED, "output: zstd setup failed (%u workers): %s",
                          opts->zstd_workers, ZSTD_getErrorName(zr));
            goto out;
        }
    }

    if (opts->kind == MS_OUT_PIPE) {
        rc = uv_loop_init(&o->loop);
        if (rc < 0) {
            rc = ms_error(rc, "--pipe: cannot create an event loop: %s", ms_strerror(rc));
            goto out;
        }
        o->loop_ok = true;
        uv_timer_init(&o->loop, &o->timer);
        o->timer.data = o;
    }
    *out = o;
    o = NULL;
out:
    ms_out_free(o);
    return rc;
}

/* A bare file name: not empty, no '/', not "." or "..". */
static bool bare_name(const char *name)
{
    return *name && !strchr(name, '/') && strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

/* Frees the per-file strings. */
static void clear_file(struct ms_out *o)
{
    ms_free(o->name);
    ms_free(o->final_name);
    ms_free(o->tmp_path);
    ms_free(o->final_path);
    o->name = o->final_name = o->tmp_path = o->final_path = NULL;
    o->in_file = false;
}

void ms_out_file_mode(struct ms_out *o, unsigned mode) { o->next_mode = (mode & 07777) | 0x10000u; }

int ms_out_file_begin(struct ms_out *o, const char *name, uint64_t size, const char **final_name)
{
    int rc = check_usable(o, "file_begin");
    if (rc < 0)
        return rc;
    if (o->in_file)
        return ms_error(MS_EINVAL, "output: '%s' begun while '%s' is still open", name, o->name);
    if (!bare_name(name))
        return ms_error(MS_EINVAL, "output: '%s' is not a bare file name", name);

    /* Per-file compression is a frame of its own, size pledged so that the
     * frame header carries the content size. */
    bool per_file_zstd = o->cctx && o->kind != MS_OUT_TAR;
    o->name = ms_strdup(name);
    o->final_name = per_file_zstd ? ms_asprintf("%s.zst", name) : ms_strdup(name);
    if (!o->name || !o->final_name) {
        clear_file(o);
        return ms_error(MS_ENOMEM, "output: '%s': out of memory", name);
    }
    if (final_name)
        *final_name = o->final_name;
    o->size = size;
    o->done = 0;
    o->in_file = true;
    o->mode = o->next_mode ? o->next_mode & 07777 : 0644;
    o->next_mode = 0;
    if (per_file_zstd) {
        size_t zr = ZSTD_CCtx_reset(o->cctx, ZSTD_reset_session_only);
        if (!ZSTD_isError(zr))
            zr = ZSTD_CCtx_setPledgedSrcSize(o->cctx, size);
        if (ZSTD_isError(zr))
            return zstd_fail(o, zr);
    }

    switch (o->kind) {
    case MS_OUT_DIR:
        o->final_path = ms_asprintf("%s/%s", o->dir, o->final_name);
        o->tmp_path = ms_asprintf("%s/%s.partial", o->dir, o->final_name);
        if (!o->final_path || !o->tmp_path)
            return fail(o, MS_ENOMEM, "output: '%s': out of memory", name);
        o->fd = ms_file_create(o->tmp_path, o->mode);
        if (o->fd < 0) {
            int e = o->fd;
            o->fd = -1;
            fail(o, e, "%s: cannot create: %s", o->tmp_path, strerror(-e));
            ms_free(o->tmp_path); /* not ours: abort must not remove it */
            o->tmp_path = NULL;
            return e;
        }
        return 0;
    case MS_OUT_TAR:
        return tar_header(o);
    case MS_OUT_PIPE:
        return spawn_cmd(o);
    }
    return ms_error(MS_EINVAL, "output: unknown kind %d", (int)o->kind);
}

int ms_out_file_write(struct ms_out *o, const void *buf, size_t len)
{
    int rc = check_usable(o, "file_write");
    if (rc < 0)
        return rc;
    if (!o->in_file)
        return ms_error(MS_EINVAL, "output: write outside a file");
    if (len > o->size - o->done)
        return fail(o, MS_EINVAL,
                    "output: '%s': %zu more bytes would pass its declared size of %" PRIu64,
                    o->name, len, o->size);
    rc = put(o, buf, len, false);
    if (rc < 0)
        return rc;
    o->done += len;
    o->tar_bytes += len;
    return 0;
}

/* DIR: fsync, close and rename the finished .partial (the directory is synced
 * once, by ms_out_finish). */
static int dir_file_end(struct ms_out *o)
{
    enum ms_file_step step;
    int rc = ms_file_commit(o->fd, o->tmp_path, o->final_path, NULL, &step);
    o->fd = -1;
    if (rc == 0)
        return 0;
    if (step == MS_FILE_STEP_RENAME)
        return fail(o, rc, "%s: cannot rename to %s: %s", o->tmp_path, o->final_name,
                    strerror(-rc));
    return fail(o, rc, "%s: %s failed: %s", o->tmp_path,
                step == MS_FILE_STEP_FSYNC ? "fsync" : "close", strerror(-rc));
}

/* PIPE: close the command's stdin and wait for its exit status. */
static int pipe_file_end(struct ms_out *o)
{
    close(o->fd);
    o->fd = -1;
    if (!wait_exit_or_stop(o))
        return fail(o, MS_ECANCELED, "output: stopped while waiting for the pipe command for "
                    "'%s' to exit", o->final_name); /* ms_out_abort kills it */
    close_proc(o);
    if (o->exit_status != 0 || o->term_signal != 0) {
        char how[64];
        return fail(o, MS_ECHILD, "pipe command for '%s' %s: %s", o->final_name,
                    describe_exit(o, how, sizeof how), o->cmd);
    }
    return 0;
}

int ms_out_file_end(struct ms_out *o)
{
    int rc = check_usable(o, "file_end");
    if (rc < 0)
        return rc;
    if (!o->in_file)
        return ms_error(MS_EINVAL, "output: file_end outside a file");
    if (o->done != o->size)
        return fail(o, MS_EINVAL, "output: '%s' ended after %" PRIu64 " of its %" PRIu64 " bytes",
                    o->name, o->done, o->size);
    switch (o->kind) {
    case MS_OUT_DIR:
        rc = put(o, NULL, 0, o->cctx != NULL);
        if (rc == 0)
            rc = dir_file_end(o);
        break;
    case MS_OUT_TAR:
        rc = put_zeros(o, (TAR_BLOCK - o->size % TAR_BLOCK) % TAR_BLOCK);
        break;
    case MS_OUT_PIPE:
        rc = put(o, NULL, 0, o->cctx != NULL);
        if (rc == 0)
            rc = pipe_file_end(o);
        break;
    }
    if (rc < 0)
        return rc;
    clear_file(o);
    return 0;
}

int ms_out_finish(struct ms_out *o)
{
    int rc = check_usable(o, "finish");
    if (rc < 0)
        return rc;
    if (o->in_file)
        return ms_error(MS_EINVAL, "output: finish while '%s' is open", o->name);
    if (o->kind == MS_OUT_TAR) {
        /* Two zero blocks end the archive; pad to a whole record as tar does. */
        uint64_t end = o->tar_bytes + 2 * TAR_BLOCK;
        end = (end + TAR_RECORD - 1) / TAR_RECORD * TAR_RECORD;
        rc = put_zeros(o, end - o->tar_bytes);
        if (rc == 0 && o->cctx)
            rc = put(o, NULL, 0, true);
        if (rc < 0)
            return rc;
    } else if (o->kind == MS_OUT_DIR) {
        int dfd = open(o->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
            return fail(o, -errno, "%s: cannot open directory to sync it: %s", o->dir,
                        strerror(errno));
        if (fsync(dfd) < 0 && errno != EINVAL)
            rc = fail(o, -errno, "%s: directory fsync failed: %s", o->dir, strerror(errno));
        close(dfd);
        if (rc < 0)
            return rc;
    }
    o->finished = true;
    return 0;
}

void ms_out_abort(struct ms_out *o)
{
    if (!o || o->aborted)
        return;
    o->aborted = true;
    if (o->fd >= 0) {
        close(o->fd);
        o->fd = -1;
    }
    if (o->kind == MS_OUT_DIR && o->tmp_path)
        unlink(o->tmp_path);
    if (o->kind == MS_OUT_PIPE)
        kill_proc(o);
    clear_file(o);
}

void ms_out_free(struct ms_out *o)
{
    if (!o)
        return;
    if (o->in_file || o->proc_open)
        ms_out_abort(o);
    clear_file(o);
    if (o->loop_ok) {
        uv_close((uv_handle_t *)&o->timer, NULL);
        uv_run(&o->loop, UV_RUN_DEFAULT);
        if (uv_loop_close(&o->loop) != 0)
            ms_log_warn("--pipe: event loop still busy at exit");
    }
    ZSTD_freeCCtx(o->cctx);
    ms_free(o->zbuf);
    ms_free(o->dir);
    ms_free(o->cmd);
    ms_free(o);
}
