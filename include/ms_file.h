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
/* (ms_file_commit renames tmp only while it is still the file open as fd - the
 * same device and inode, not a symlink -; a replaced tmp fails the rename step
 * with MS_EINVAL, "<final>: temporary <tmp> was replaced; not renamed".) */

/*
 * Creates the temporary file path for writing, exclusively: a stale entry under
 * that name (a temporary a killed run left, or anything planted there, a
 * symlink included) is unlinked first - unlink removes a symlink itself, never
 * its target - and the file is then opened with O_CREAT | O_EXCL | O_NOFOLLOW,
 * so the bytes written go into a new file this process made, nowhere else.
 * Mode is passed to open (the umask applies). Returns the descriptor
 * (O_WRONLY | O_CLOEXEC), or -errno with no diagnostic recorded. Any thread.
 */
int ms_file_create(const char *path, unsigned mode);

/*
 * The folder a model directory's files may resolve into: realpath(dir), or,
 * when dir is a Hugging Face cache snapshot (".../models--ORG--NAME/snapshots/
 * REV", whose files are symlinks into the repository's own blobs/), that
 * repository folder. *root is allocated (ms_free). Returns 0, or -errno (with a
 * diagnostic naming dir).
 */
int ms_path_model_root(const char *dir, char **root);

/*
 * Resolves path (realpath: every symlink, "..") and says whether it lies
 * inside root, an already resolved folder: 1 inside (or equal), 0 outside,
 * -errno when path cannot be resolved (no diagnostic recorded). With real not
 * NULL and a return of 0 or 1, *real is the resolved path (ms_free).
 */
int ms_path_inside(const char *root, const char *path, char **real);

#endif
