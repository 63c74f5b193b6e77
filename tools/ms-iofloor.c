/*
 * ms-iofloor.c - the I/O floor of a merge: the time to read every input byte
 * and write as many output bytes as the merge writes, with no merge.
 *
 *   ms-iofloor [--block BYTES] [--behind] OUT_FILE OUT_BYTES INPUT_FILE...
 *
 * Does the merge's I/O, one thread: reads the inputs in blocks (default 8 MiB;
 * --block sets it, e.g. to the merge's chunk), interleaved across files as a
 * merge reads them (one block of each in turn), reserves OUT_FILE's size as the
 * engine does (posix_fallocate) and writes OUT_BYTES to it from those blocks,
 * fsyncs and removes it. --behind does what the engine does for merges larger
 * than memory (io/src.c, io/shard.c): DONTNEED behind the inputs read (32 MiB
 * runs), and each written block's writeback started at once, waited for and
 * dropped from the page cache 64 MiB later. Prints
 * "iofloor: wall_s=... user_s=... sys_s=... read=... written=...".
 */
#define _GNU_SOURCE /* sync_file_range */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAXIN 256
#define DROP_RUN (32ull << 20)   /* as io/src.c */
#define BEHIND (64ull << 20)     /* as MS_SHARD_BEHIND_BYTES */

static double secs(struct timeval t) { return (double)t.tv_sec + (double)t.tv_usec / 1e6; }

int main(int argc, char **argv)
{
    unsigned long long block = 8ull << 20;
    int behind = 0, a = 1;
    for (; a < argc && argv[a][0] == '-' && argv[a][1] == '-'; a++) {
        if (!strcmp(argv[a], "--behind"))
            behind = 1;
        else if (!strcmp(argv[a], "--block") && a + 1 < argc)
            block = strtoull(argv[++a], NULL, 10);
        else
            break;
    }
    if (argc - a < 3 || block == 0) {
        fprintf(stderr, "usage: ms-iofloor [--block BYTES] [--behind] OUT_FILE OUT_BYTES "
                        "INPUT_FILE...\n");
        return 2;
    }
    const char *out = argv[a];
    unsigned long long want = strtoull(argv[a + 1], NULL, 10);
    int nin = argc - a - 2;
    if (nin > MAXIN) {
        fprintf(stderr, "ms-iofloor: too many inputs\n");
        return 2;
    }
    int fds[MAXIN];
    unsigned long long pos[MAXIN] = { 0 }, dropped[MAXIN] = { 0 };
    for (int i = 0; i < nin; i++) {
        fds[i] = open(argv[a + 2 + i], O_RDONLY);
        if (fds[i] < 0) {
            fprintf(stderr, "ms-iofloor: %s: %s\n", argv[a + 2 + i], strerror(errno));
            return 1;
        }
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < nin; i++)
        posix_fadvise(fds[i], 0, 0, POSIX_FADV_SEQUENTIAL); /* as io/src.c */
    int ofd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char *buf = malloc(block);
    if (ofd < 0 || !buf) {
        fprintf(stderr, "ms-iofloor: %s: %s\n", out, ofd < 0 ? strerror(errno) : "no memory");
        return 1;
    }
    memset(buf, 0x5a, block);
    if (want)
        posix_fallocate(ofd, 0, (off_t)want); /* as io/shard.c */
    unsigned long long rd = 0, wr = 0, synced = 0;
    int open_left = nin;
    char eof[MAXIN] = { 0 };
    while (open_left > 0 || wr < want) {
        for (int i = 0; i < nin; i++) {
            if (eof[i])
                continue;
            ssize_t r = read(fds[i], buf, block);
            if (r <= 0) {
                eof[i] = 1;
                open_left--;
                if (behind) /* the rest, as ms_src_free does */
                    posix_fadvise(fds[i], (off_t)dropped[i], 0, POSIX_FADV_DONTNEED);
                continue;
            }
            rd += (unsigned long long)r;
            pos[i] += (unsigned long long)r;
            if (behind && pos[i] - dropped[i] >= DROP_RUN) {
                posix_fadvise(fds[i], (off_t)dropped[i], (off_t)(pos[i] - dropped[i]),
                              POSIX_FADV_DONTNEED);
                dropped[i] = pos[i];
            }
        }
        /* Write at the rate the inputs are consumed: one output block per round. */
        if (wr < want) {
            size_t n = (size_t)(want - wr < block ? want - wr : block);
            ssize_t w = pwrite(ofd, buf, n, (off_t)wr);
            if (w <= 0) {
                fprintf(stderr, "ms-iofloor: write %s: %s\n", out, strerror(errno));
                return 1;
            }
            if (behind) {
                sync_file_range(ofd, (off_t)wr, w, SYNC_FILE_RANGE_WRITE);
                if (wr + (unsigned long long)w - synced > BEHIND) {
                    unsigned long long to = wr + (unsigned long long)w - BEHIND;
                    sync_file_range(ofd, (off_t)synced, (off_t)(to - synced),
                                    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                        SYNC_FILE_RANGE_WAIT_AFTER);
                    posix_fadvise(ofd, (off_t)synced, (off_t)(to - synced), POSIX_FADV_DONTNEED);
                    synced = to;
                }
            }
            wr += (unsigned long long)w;
        }
    }
    fsync(ofd);
    if (behind)
        posix_fadvise(ofd, 0, 0, POSIX_FADV_DONTNEED);
    close(ofd);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    unlink(out);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double wall = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("iofloor: wall_s=%.3f user_s=%.3f sys_s=%.3f read=%llu written=%llu\n", wall,
           secs(ru.ru_utime), secs(ru.ru_stime), rd, wr);
    for (int i = 0; i < nin; i++)
        close(fds[i]);
    free(buf);
    return 0;
}
