/*
 * ms_out.h - where a merge's files go, written strictly in order: a directory
 * (optionally each file zstd-compressed), one POSIX tar stream on a file
 * descriptor such as stdout (optionally zstd-compressed as a whole), or one
 * command per file fed through its stdin (`--pipe CMD`).
 *
 * Calls are blocking and sequential: one thread at a time may use an ms_out
 * (the engine runs them one after another on its thread pool). Nothing here
 * buffers a whole file: memory is zstd's window and workspace plus fixed buffers.
 *
 * The positional fast path (raw files in a directory, written at known offsets
 * in any order) does not go through ms_out; everything else does.
 */
#ifndef MS_OUT_H
#define MS_OUT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum ms_out_kind {
    MS_OUT_DIR,                   /* files in a directory */
    MS_OUT_TAR,                   /* one tar stream written to fd */
    MS_OUT_PIPE,                  /* each file into its own `sh -c CMD` */
};

struct ms_out_opts {
    enum ms_out_kind kind;
    const char *dir;              /* MS_OUT_DIR: the output directory (must exist) */
    int fd;                       /* MS_OUT_TAR: where the stream goes (e.g. 1); not closed */
    const char *pipe_cmd;         /* MS_OUT_PIPE: "{}" is replaced by the file name; the name
                                     is also in $MERGESTREAM_FILE; run with /bin/sh -c */
    int zstd_level;               /* 0 = no compression; 1..19 = zstd level */
    unsigned zstd_workers;        /* ZSTD_c_nbWorkers (0 = single-threaded) */
    uint64_t mtime;               /* tar entry mtime (seconds); fixed for reproducible output */
};

struct ms_out;

/* Creates the sink. MS_OUT_TAR with zstd compresses the whole stream (tar --zstd). */
int ms_out_open(const struct ms_out_opts *opts, struct ms_out **out);
/*
 * Starts file `name` (a bare file name) of exactly `size` bytes (uncompressed).
 * DIR: creates "<dir>/<name>[.zst].partial"; TAR: emits the 512-byte ustar header;
 * PIPE: spawns the command with the file name. Returns the written name through
 * *final_name if non-NULL (borrowed until the next begin): "<name>.zst" when
 * each file is compressed in DIR mode, else name.
 */
int ms_out_file_begin(struct ms_out *o, const char *name, uint64_t size, const char **final_name);
/* Appends len bytes to the current file. Errors name the file (and the command). */
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
/* Stops: removes the current temporary file, kills a running command. Safe after errors. */
void ms_out_abort(struct ms_out *o);
void ms_out_free(struct ms_out *o);

/*
 * Compressed inputs: a reader over a .safetensors.zst file (plain zstd frames)
 * that serves reads at increasing offsets by decompressing forward; a read
 * before the cursor restarts from the file's start (documented cost: a pass that
 * reads again decompresses again). Thread: one at a time.
 */
struct ms_zsrc;
int ms_zsrc_open(const char *path, struct ms_zsrc **out);
/* Uncompressed size (from the frame header, else by decompressing once). */
uint64_t ms_zsrc_size(const struct ms_zsrc *z);
/* Reads exactly len bytes at uncompressed offset off; short input is MS_EIO naming the file. */
int ms_zsrc_pread(struct ms_zsrc *z, void *buf, size_t len, uint64_t off);
void ms_zsrc_free(struct ms_zsrc *z);

#endif
