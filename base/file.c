/*
 * file.c - atomic file commit (declared in ms_file.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_file.h"

int ms_file_commit(int fd, const char *tmp, const char *final, const char *dir,
                   enum ms_file_step *failed)
{
    enum ms_file_step step = MS_FILE_STEP_FSYNC;
    int rc, dfd = -1;

    if (fsync(fd) < 0) {
        rc = ms_error(-errno, "%s: fsync failed: %s", final, strerror(errno));
        close(fd);
        goto fail;
    }
    step = MS_FILE_STEP_CLOSE;
    if (close(fd) < 0) {
        rc = ms_error(-errno, "%s: close failed: %s", final, strerror(errno));
        goto fail;
    }
    step = MS_FILE_STEP_RENAME;
    if (rename(tmp, final) < 0) {
        rc = ms_error(-errno, "%s: rename failed: %s", final, strerror(errno));
        goto fail;
    }
    if (!dir)
        return 0;
    step = MS_FILE_STEP_SYNC_DIR;
    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    /* Some file systems cannot fsync a directory (EINVAL); the rename stands. */
    if (dfd < 0 || (fsync(dfd) < 0 && errno != EINVAL)) {
        rc = ms_error(-errno, "%s: cannot sync directory %s: %s", final, dir, strerror(errno));
        goto fail;
    }
    close(dfd);
    return 0;

fail:
    if (dfd >= 0)
        close(dfd);
    /* Before the rename the file has only its temporary name; after it, only its final one. */
    unlink(step == MS_FILE_STEP_SYNC_DIR ? final : tmp);
    if (failed)
        *failed = step;
    return rc;
}
