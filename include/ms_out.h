/*
 * ms_out.h - where a merge's files go, written strictly in order: a directory
 * (optionally each file zstd-compressed), one POSIX tar stream on a file
 * descriptor such as stdout (optionally zstd-compressed as a whole), or one
 * command per file fed through its stdin (`--pipe CMD`).
 *
 * Calls are blocking and sequential: one thread at a time may use an ms_out
 * (the engine runs them one after another on its thread pool); successive calls
 * may come from different threads. Call from a worker thread, not from a loop
 * callback: writes block on the destination (a pipe's reader gives
 * backpressure) and PIPE's file_end waits for the command to exit; both look at
 * opts.stop every 200 ms and give up when it says so (and writes after
 * opts.stall_seconds without progress). PIPE runs a private uv loop inside these calls, in the calling thread.
 * Nothing here buffers a whole file: memory is zstd's window and workspace plus
 * fixed buffers (ZSTD_CStreamOutSize).
 *
 * SIGPIPE: a write to a closed pipe or stream is an error code, never a signal:
 * each write blocks SIGPIPE in the calling thread and discards the one it
 * raised, so the process survives even where SIGPIPE is not ignored (the CLI
 * should still ignore it for everything else). Commands are started with
 * default signal dispositions (libuv resets them), so an ignored SIGPIPE does not
 * leak into `--pipe` commands.
 *
 * Errors: 0 or negative; -errno (e.g. -EPIPE, -ENOSPC) for I/O, MS_ECHILD for a
 * failed command, MS_EINVAL for misuse (wrong order, more or fewer bytes than
 * declared, a name with '/'), MS_ENOMEM. The one-line diagnostic (ms_errmsg())
 * names the file (the .partial path in DIR mode) and, for PIPE, the command.
 * After an error every call but abort and free fails again with the same code
 * and message; the caller then calls ms_out_abort.
 *
 * The positional fast path (raw shard files in a directory, written at known
 * offsets in any order) does not go through ms_out: it is struct ms_shard_file
 * below. Every output path is declared here.
 */
#ifndef MS_OUT_H
#define MS_OUT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

enum ms_out_kind {
    MS_OUT_DIR,                   /* files in a directory */
    MS_OUT_TAR,                   /* one tar stream written to fd */
    MS_OUT_PIPE,                  /* each file into its own `sh -c CMD` */
};

struct ms_out_opts {
    enum ms_out_kind kind;
    const char *dir;              /* MS_OUT_DIR: the output directory (must exist) */
    int fd;                       /* MS_OUT_TAR: where the stream goes (e.g. 1); not closed */
    const char *pipe_cmd;         /* MS_OUT_PIPE: each "{}" is replaced by the file name,
                                     quoted for the shell where it stands (bare, or inside
                                     double or single quotes); the name
                                     is also in $MERGESTREAM_FILE; run with /bin/sh -c; stdout
                                     and stderr are ours. Copied by ms_out_open. */
    int zstd_level;               /* 0 = no compression; 1..ZSTD_maxCLevel() (22) = zstd level */
    unsigned zstd_workers;        /* ZSTD_c_nbWorkers (0 = single-threaded) */
    uint64_t mtime;               /* tar entry mtime (seconds since the epoch), the same for all */
    /* (optional) Polled every 200 ms while a write waits on a reader (tar on a pipe or
     * socket, a --pipe command) and while file_end waits for a command: nonzero makes
     * the call fail with MS_ECANCELED ("stopped"). Called on the writing thread. */
    int (*stop)(void);
    /* 0: no limit; else a write that gets no byte accepted for this many seconds fails
     * with UV_ETIMEDOUT, naming the reader. */
    unsigned stall_seconds;
};

struct ms_out;

/* Creates the sink; *out is NULL on error. MS_OUT_TAR with zstd compresses the
 * whole stream as one frame (tar --zstd); DIR and PIPE compress each file as
 * one frame whose header declares the content size. opts is copied. */
int ms_out_open(const struct ms_out_opts *opts, struct ms_out **out);
/*
 * Starts file `name` (a bare file name) of exactly `size` bytes (uncompressed).
 * DIR: creates "<dir>/<name>[.zst].partial"; TAR: emits the 512-byte ustar header;
 * PIPE: spawns the command with the file name. Returns the written name through
 * *final_name if non-NULL (borrowed until file_end, abort or free):
 * "<name>.zst" when each file is compressed (DIR or PIPE with zstd), else name;
 * PIPE gives the command that name. TAR names over 100 bytes get a pax "path"
 * record, sizes over 8 GiB - 1 a pax "size" record plus GNU base-256 in the
 * ustar field. name must be a bare file name (no '/', not "." or "..").
 */
int ms_out_file_begin(struct ms_out *o, const char *name, uint64_t size, const char **final_name);
/* Permission bits for the next file begun (the DIR file's mode before the umask,
 * the TAR header's mode): 0644 unless set; ms_out_file_begin resets it to 0644.
 * For files copied from a model, whose mode must not widen. */
void ms_out_file_mode(struct ms_out *o, unsigned mode);
/* Appends len bytes to the current file. Errors name the file (and the command).
 * TAR: -EPIPE "output stream closed (broken pipe)". PIPE: a command that closed
 * its stdin early is MS_ECHILD with its exit status when it has exited. */
int ms_out_file_write(struct ms_out *o, const void *buf, size_t len);
/*
 * Ends the current file: checks that exactly `size` bytes came; DIR: finishes the
 * zstd frame, fsyncs, renames to the final name; TAR: pads to 512; PIPE: closes the
 * command's stdin and waits for it; a non-zero exit status is an error naming the
 * file and the status (MS_ECHILD).
 */
int ms_out_file_end(struct ms_out *o);
/* Ends the stream (tar end-of-archive blocks, zstd epilogue; DIR: syncs the directory). */
int ms_out_finish(struct ms_out *o);
/* Stops: removes the current .partial (DIR), kills a running command (SIGTERM,
 * SIGKILL after 5 s) and reaps it (PIPE); a TAR stream is left cut short so that
 * readers see it as truncated. Idempotent; safe after errors; later calls fail. */
void ms_out_abort(struct ms_out *o);
/* Frees the sink (aborting first if a file is open). ms_out_free(NULL) is a no-op. */
void ms_out_free(struct ms_out *o);

/*
 * Positional shard files (io/shard.c): an uncompressed safetensors shard in a
 * directory, created as "<name>.partial" with its whole size reserved and its
 * header written, filled by writes at known offsets in any order on a libuv
 * loop, then synced and renamed to its final name. A crash never leaves a file
 * that looks complete under the final name.
 *
 * struct ms_shard_file is the caller's (the engine keeps one per output shard).
 * fd and finished may be read; the other fields are private. Calls are on the
 * loop thread that runs the writes; open and finish block (they run once per
 * shard). Errors: 0 or negative (-errno / UV_E*, MS_EIO, MS_ENOMEM) with a
 * diagnostic (ms_errmsg()) naming the file.
 *
 * Fault injection: each header write call of open and each ms_shard_write_start
 * consult ms__io_should_fail() (ms_common.h) once; an injected failure is EIO.
 * Continuations of a short write do not consult it.
 */
#define MS_SHARD_BEHIND_RANGES 16

struct ms_shard_file {
    int fd;                       /* the open .partial, or -1 */
    bool finished;                /* complete under final_path (finish, or ms_shard_file_keep) */
    bool canceled;                /* private */
    bool created;                 /* private: this process created tmp_path (only then is it
                                     removed on abort: another --part may be writing its own) */
    char *tmp_path;               /* private: "<dir>/<name>.partial" (owned) */
    char *final_path;             /* "<dir>/<name><suffix>" (owned); may be read */
    /* private: write-behind (ms_shard_file_behind): ranges written and not yet known to be
     * on disk, oldest first, under wb_lock (the writes' pool threads) */
    bool behind;
    uv_mutex_t wb_lock;
    uint64_t wb_off[MS_SHARD_BEHIND_RANGES], wb_len[MS_SHARD_BEHIND_RANGES];
    unsigned wb_first, wb_n;
    uint64_t wb_bytes, wb_window;
};

struct ms_shard_write;
/*
 * Completion of a write, on the loop thread. status 0: all len bytes are in the
 * file. Negative: the diagnostic, recorded for the loop thread just before the
 * call, is "<tmp>: write failed: <reason>" (UV_E*, or MS_EIO "no progress"),
 * or MS_ECANCELED after ms_shard_file_cancel. The callback may start writes.
 */
typedef void (*ms_shard_write_cb)(struct ms_shard_write *req, int status);

/* One write in flight. Caller-owned; `data` is the caller's, the rest is private to io/shard.c. */
struct ms_shard_write {
    void *data;                   /* the caller's; io/ does not touch it */
    /* private */
    union {
        uv_fs_t fs;               /* the uv_fs_write in flight */
        uv_work_t work;           /* write-behind: the write and its writeback on the pool */
    } u;
    uv_loop_t *loop;
    struct ms_shard_file *file;
    const unsigned char *buf;
    uint64_t len, done, off;      /* bytes to write, bytes written, file offset of buf[0] */
    int wrc;                      /* write-behind: the worker's result (0 or -errno) */
    ms_shard_write_cb cb;
};

/*
 * Names shard `name` (a bare file name) in directory dir: the temporary
 * "<dir>/<name>.partial" and the final "<dir>/<name><suffix>" (suffix "" or
 * ".zst"); nothing is touched on disk. dir NULL: f names no file (output that is
 * not a directory); only fini applies. f may be given to fini even when this
 * fails. Returns 0 or MS_ENOMEM.
 */
int ms_shard_file_init(struct ms_shard_file *f, const char *dir, const char *name,
                       const char *suffix);
/* True when a file exists under the final name. */
bool ms_shard_file_exists(const struct ms_shard_file *f);
/*
 * --resume: a file under the final name was synced before it was renamed, so
 * it is complete; it is kept (f->finished set, true returned) when it holds
 * `size` bytes (uncompressed; a zstd stream when compressed) that begin with
 * header[0..header_bytes). Any failure to read it is "not kept"; the
 * diagnostic is cleared.
 */
bool ms_shard_file_keep(struct ms_shard_file *f, uint64_t size, const void *header,
                        size_t header_bytes, bool compressed);
/*
 * Creates the temporary (truncating a stale one), reserves size bytes so that a
 * full disk is reported before any work (ENOSPC, EFBIG; other fallocate
 * failures are ignored), and writes header_bytes of header at offset 0.
 * Errors: "<tmp>: cannot create|cannot reserve N bytes|cannot write header: <reason>";
 * f->fd stays set when it was created (fini closes it).
 */
int ms_shard_file_open(struct ms_shard_file *f, uint64_t size, const void *header,
                       size_t header_bytes);
/*
 * Starts writing exactly len bytes (len > 0) of buf, which must stay valid
 * until the callback, at offset off of the open file (positional: writes may
 * run at once and in any order). Loop thread. Returns 0 when cb will be called
 * exactly once; else a negative code, the diagnostic "<tmp>: write failed:
 * <reason>" (UV_EIO from the fault hook) and no callback.
 */
int ms_shard_write_start(uv_loop_t *loop, struct ms_shard_file *f, struct ms_shard_write *req,
                         const void *buf, size_t len, uint64_t off, ms_shard_write_cb cb);
/*
 * Writes exactly len bytes (len > 0) of buf at offset off of the open file,
 * blocking: for a caller already on a pool thread (the engine's fused chunks);
 * not with write-behind. Any thread; f is only read, and must stay open until
 * the call returns. Consults ms__io_should_fail() once. Returns 0, or a negative
 * code with the diagnostic (thread-local) "<tmp>: write failed: <reason>".
 */
int ms_shard_file_pwrite(const struct ms_shard_file *f, const void *buf, size_t len,
                         uint64_t off);
/*
 * Write-behind, for output larger than memory: after this, each write also
 * starts the writeback of its bytes (sync_file_range), and once more than
 * `window` bytes (MS_SHARD_BEHIND_BYTES) have been written after them, waits
 * for them to reach the disk and lets the page cache drop them (posix_fadvise
 * DONTNEED); finish drops the rest. So dirty pages stay bounded, writeback runs
 * all along instead of in the final fsync, and written data does not push out
 * inputs. The bytes in the file are the same. Call after ms_shard_file_open,
 * before any write; loop thread. Returns 0 or a negative code and the
 * diagnostic "<tmp>: cannot start write-behind: <reason>".
 */
#define MS_SHARD_BEHIND_BYTES (64u << 20)
int ms_shard_file_behind(struct ms_shard_file *f, uint64_t window);
/* After the last write: fsync, close, rename to the final name (ms_file_commit),
 * f->finished set. On failure the file is closed and the temporary removed.
 * Errors: "<tmp>: fsync failed|close failed|cannot rename to <final>: <reason>". */
int ms_shard_file_finish(struct ms_shard_file *f);
/* Stops f's writes (the caller is giving up): a write that needs another call
 * ends with MS_ECANCELED instead. A call in flight completes. Idempotent. */
void ms_shard_file_cancel(struct ms_shard_file *f);
/* Closes the temporary if open and removes it unless f is finished or this
 * process did not create it (ms_shard_file_open); the names stay. No write may
 * be in flight. Idempotent. */
void ms_shard_file_abort(struct ms_shard_file *f);
/* Aborts (above) and frees the names. */
void ms_shard_file_fini(struct ms_shard_file *f);

#endif
