/*
 * file.c - atomic file commit (declared in ms_file.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
    struct stat mine, now;
    if (fstat(fd, &mine) < 0) {
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
    /* Rename only the file this process wrote: tmp may have been swapped since. */
    if (lstat(tmp, &now) < 0 || !S_ISREG(now.st_mode) || now.st_dev != mine.st_dev ||
        now.st_ino != mine.st_ino) {
        if (failed)
            *failed = step;
        return ms_error(MS_EINVAL, "%s: temporary %s was replaced; not renamed", final, tmp);
    }
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

int ms_file_create(const char *path, unsigned mode)
{
    if (unlink(path) < 0 && errno != ENOENT && errno != EISDIR && errno != EPERM)
        return -errno;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)mode);
    return fd < 0 ? -errno : fd;
}

/* The last component of path, which has no trailing '/'. */
static const char *last_name(const char *path, size_t len)
{
    while (len && path[len - 1] != '/')
        len--;
    return path + len;
}

int ms_path_model_root(const char *dir, char **root)
{
    *root = NULL;
    char *real = realpath(dir, NULL);
    if (!real)
        return ms_error(-errno, "%s: cannot resolve: %s", dir, strerror(errno));
    /* .../models--ORG--NAME/snapshots/REV */
    char *s1 = strrchr(real, '/');
    if (s1 && s1 != real) {
        size_t n1 = (size_t)(s1 - real);
        const char *snap = last_name(real, n1);
        if ((size_t)(s1 - snap) == strlen("snapshots") && !strncmp(snap, "snapshots", 9) &&
            snap - 1 > real) {
            size_t n2 = (size_t)(snap - 1 - real);
            const char *repo = last_name(real, n2);
            if (!strncmp(repo, "models--", 8))
                real[n2] = 0;
        }
    }
    char *r = ms_strdup(real);
    free(real);
    if (!r)
        return ms_error(MS_ENOMEM, "out of memory");
    *root = r;
    return 0;
}

int ms_path_inside(const char *root, const char *path, char **real)
{
    if (real)
        *real = NULL;
    char *rp = realpath(path, NULL);
    if (!rp)
        return -errno;
    size_t n = strlen(root);
    while (n > 1 && root[n - 1] == '/')
        n--;
    int in = !strncmp(rp, root, n) && (rp[n] == 0 || rp[n] == '/' || (n == 1 && root[0] == '/'));
    if (real) {
        *real = ms_strdup(rp);
        if (!*real) {
            free(rp);
            return ms_error(MS_ENOMEM, "out of memory");
        }
    }
    free(rp);
    return in;
}
