/*
 * ms_file.h - putting a finished file in place atomically (base/file.c).
 *
 * A file is written under a temporary name next to its final one and renamed
 * when complete, so that a reader never sees a partial file under the final
 * name, and a crash leaves at most a stray temporary.
 */
#ifndef MS_FILE_H
#define MS_FILE_H

/* The step of ms_file_commit that failed. */
enum ms_file_step {
    MS_FILE_STEP_FSYNC = 1, /* fsync(fd) */
    MS_FILE_STEP_CLOSE,     /* close(fd) */
    MS_FILE_STEP_RENAME,    /* rename(tmp, final) */
    MS_FILE_STEP_SYNC_DIR,  /* opening or fsyncing dir */
};

/*
 * Finishes the file open as fd and written under the name tmp: fsync(fd),
 * close(fd), rename(tmp, final), then, when dir is not NULL, opens and fsyncs
 * dir (the directory holding final) so that the rename survives a crash. A file
 * system that cannot fsync a directory (EINVAL) counts as success.
 *
 * Takes fd and closes it in every case. Returns 0, or the failing step's
 * -errno with *failed (if not NULL) set to the step; nothing is then left under
 * either name (tmp is unlinked, and after a failed directory sync so is final).
 * The diagnostic names final: "<final>: fsync failed: <strerror>" (likewise
 * "close failed", "rename failed") or "<final>: cannot sync directory <dir>:
 * <strerror>"; a caller that names the file otherwise records its own.
 * Synchronous: blocks for the fsyncs. Any thread.
 */
int ms_file_commit(int fd, const char *tmp, const char *final, const char *dir,
                   enum ms_file_step *failed);

#endif
