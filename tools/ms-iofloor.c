/*
 * ms-iofloor.c - the I/O floor of a merge: the time to read every input byte
 * and write as many output bytes as the merge writes, with no merge.
 *
 *   ms-iofloor OUT_FILE OUT_BYTES INPUT_FILE...
 *
 * Reads the inputs in 8 MiB blocks, interleaved across files as a merge reads
 * them (one block of each in turn), writes OUT_BYTES to OUT_FILE from those
 * blocks, fsyncs and removes it. Prints "iofloor: wall_s=... read=... written=...".
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (8u << 20)
#define MAXIN 256

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: ms-iofloor OUT_FILE OUT_BYTES INPUT_FILE...\n");
        return 2;
    }
    const char *out = argv[1];
    unsigned long long want = strtoull(argv[2], NULL, 10);
    int nin = argc - 3;
    if (nin > MAXIN) {
        fprintf(stderr, "ms-iofloor: too many inputs\n");
        return 2;
    }
    int fds[MAXIN];
    for (int i = 0; i < nin; i++) {
        fds[i] = open(argv[3 + i], O_RDONLY);
        if (fds[i] < 0) {
            fprintf(stderr, "ms-iofloor: %s: %s\n", argv[3 + i], strerror(errno));
            return 1;
        }
    }
    int ofd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char *buf = malloc(BLOCK);
    if (ofd < 0 || !buf) {
        fprintf(stderr, "ms-iofloor: %s: %s\n", out, strerror(errno));
        return 1;
    }
    memset(buf, 0x5a, BLOCK);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    unsigned long long rd = 0, wr = 0;
    int open_left = nin;
    char eof[MAXIN] = { 0 };
    while (open_left > 0 || wr < want) {
        for (int i = 0; i < nin; i++) {
            if (eof[i])
                continue;
            ssize_t r = read(fds[i], buf, BLOCK);
            if (r <= 0) {
                eof[i] = 1;
                open_left--;
                continue;
            }
            rd += (unsigned long long)r;
        }
        /* Write at the rate the inputs are consumed: one output block per round. */
        if (wr < want) {
            size_t n = (size_t)(want - wr < BLOCK ? want - wr : BLOCK);
            ssize_t w = write(ofd, buf, n);
            if (w <= 0) {
                fprintf(stderr, "ms-iofloor: write %s: %s\n", out, strerror(errno));
                return 1;
            }
            wr += (unsigned long long)w;
        }
    }
    fsync(ofd);
    close(ofd);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    unlink(out);
    double wall = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("iofloor: wall_s=%.3f read=%llu written=%llu\n", wall, rd, wr);
    for (int i = 0; i < nin; i++)
        close(fds[i]);
    free(buf);
    return 0;
}
