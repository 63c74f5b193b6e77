/*
 * zsrc.c - reads a zstd-compressed file (.safetensors.zst) at uncompressed
 * offsets (ms_zsrc.h).
 *
 * The file is one or more concatenated zstd frames (skippable frames allowed).
 * ms_zsrc_open walks the frame and block headers, which gives the exact
 * uncompressed size when every frame declares its content size and finds a
 * truncated file before any data is decompressed; when a frame does not
 * declare its size (zstd reading from a pipe), the file is decompressed once
 * to count. Reads decompress forward from a cursor: a gap is decompressed into
 * a scratch buffer and dropped, a read behind the cursor starts again from the
 * beginning of the file. Memory: the decoder (window up to zstd's default
 * limit of 128 MiB) plus ZSTD_DStreamInSize() and ZSTD_DStreamOutSize() buffers.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zstd.h>
#include <zstd_errors.h>

#include "ms_common.h"
#include "ms_zsrc.h"

#define ZSTD_MAGIC 0xFD2FB528u
#define SKIP_MAGIC_MASK 0xFFFFFFF0u
#define SKIP_MAGIC 0x184D2A50u
#define BLOCK_HEADER 3u
#define CHECKSUM_BYTES 4u

struct ms_zsrc {
    char *path;                   /* owned copy, for diagnostics */
    int fd;
    uint64_t csize;               /* compressed bytes (the file's length) */
    uint64_t size;                /* uncompressed bytes */
    ZSTD_DCtx *dctx;
    unsigned char *inbuf;         /* compressed input, incap bytes */
    size_t incap;
    ZSTD_inBuffer in;             /* the part of inbuf not yet consumed */
    uint64_t coff;                /* file offset of the next refill */
    uint64_t cursor;              /* uncompressed offset the decoder is at */
    unsigned char *scratch;       /* decompressed bytes that are skipped, scap bytes */
    size_t scap;
    size_t last_ret;              /* last ZSTD_decompressStream result; 0 = frame boundary */
};

/* ----------------------------------------------------------- file access */

/* Reads up to len bytes at off; *got is less than len only at end of file. */
static int read_at(struct ms_zsrc *z, void *buf, size_t len, uint64_t off, size_t *got)
{
    size_t n = 0;
    while (n < len) {
        ssize_t r = pread(z->fd, (char *)buf + n, len - n, (off_t)(off + n));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return ms_error(-errno, "%s: read failed: %s", z->path, strerror(errno));
        if (r == 0)
            break;
        n += (size_t)r;
    }
    *got = n;
    return 0;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int truncated(const struct ms_zsrc *z, uint64_t off)
{
    return ms_error(MS_EIO, "%s: truncated zstd file (data ends inside the frame at byte %" PRIu64
                    " of %" PRIu64 ")", z->path, off, z->csize);
}

/* ------------------------------------------------------------ frame walk */

/*
 * Walks the frames of the whole file (RFC 8878 layout: magic, frame header,
 * blocks each with a 3-byte header, optional 4-byte checksum). Sets *total to
 * the sum of declared content sizes and *known to false if a frame declares
 * none. Only headers are read.
 */
static int walk_frames(struct ms_zsrc *z, uint64_t *total, bool *known)
{
    uint64_t off = 0;
    *total = 0;
    *known = true;
    if (z->csize == 0)
        return ms_error(MS_EIO, "%s: empty file, not zstd data", z->path);
    while (off < z->csize) {
        unsigned char h[18]; /* ZSTD_FRAMEHEADERSIZE_MAX: magic + the longest frame header */
        size_t got;
        int rc = read_at(z, h, sizeof h, off, &got);
        if (rc < 0)
            return rc;
        if (got < 4)
            return off == 0 ? ms_error(MS_EIO, "%s: not zstd data", z->path)
                            : ms_error(MS_EIO, "%s: %zu stray bytes after the last zstd frame",
                                       z->path, got);
        uint32_t magic = le32(h);
        if ((magic & SKIP_MAGIC_MASK) == SKIP_MAGIC) {
            if (got < 8)
                return truncated(z, off);
            off += 8 + (uint64_t)le32(h + 4);
            if (off > z->csize)
                return truncated(z, z->csize);
            continue;
        }
        if (magic != ZSTD_MAGIC)
            return ms_error(MS_EIO, "%s: not zstd data at byte %" PRIu64, z->path, off);
        if (got < 5)
            return truncated(z, off + got);

        unsigned fhd = h[4];
        unsigned fcs_flag = fhd >> 6, single = (fhd >> 5) & 1, checksum = (fhd >> 2) & 1;
        static const unsigned did_bytes[4] = {0, 1, 2, 4};
        static const unsigned fcs_bytes[4] = {0, 2, 4, 8};
        size_t hlen = 4 + 1 + (single ? 0 : 1) + did_bytes[fhd & 3] +
                      (fcs_flag == 0 && single ? 1 : fcs_bytes[fcs_flag]);
        if (got < hlen)
            return truncated(z, off + got);
        unsigned long long fcs = ZSTD_getFrameContentSize(h, hlen);
        if (fcs == ZSTD_CONTENTSIZE_ERROR)
            return ms_error(MS_EIO, "%s: bad zstd frame header at byte %" PRIu64, z->path, off);
        if (fcs == ZSTD_CONTENTSIZE_UNKNOWN)
            *known = false;
        else
            *total += fcs;
        off += hlen;

        for (;;) {
            unsigned char b[BLOCK_HEADER];
            rc = read_at(z, b, sizeof b, off, &got);
            if (rc < 0)
                return rc;
            if (got < sizeof b)
                return truncated(z, off + got);
            uint32_t bh = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16;
            unsigned last = bh & 1, type = (bh >> 1) & 3;
            uint32_t bsize = bh >> 3;
            if (type == 3)
                return ms_error(MS_EIO, "%s: corrupt zstd data (reserved block type at byte %"
                                PRIu64 ")", z->path, off);
            off += BLOCK_HEADER + (type == 1 ? 1 : bsize); /* RLE blocks store one byte */
            if (off > z->csize)
                return truncated(z, z->csize);
            if (last)
                break;
        }
        if (checksum) {
            off += CHECKSUM_BYTES;
            if (off > z->csize)
                return truncated(z, z->csize);
        }
    }
    return 0;
}

/* --------------------------------------------------------- decompression */

/* Goes back to the start of the file. */
static void restart(struct ms_zsrc *z)
{
    ZSTD_DCtx_reset(z->dctx, ZSTD_reset_session_only);
    z->in.pos = z->in.size = 0;
    z->coff = 0;
    z->cursor = 0;
    z->last_ret = 0;
}

/* Refills the input buffer; at end of file z->in.size is 0. */
static int refill(struct ms_zsrc *z)
{
    size_t got;
    int rc = read_at(z, z->inbuf, z->incap, z->coff, &got);
    if (rc < 0)
        return rc;
    z->coff += got;
    z->in.src = z->inbuf;
    z->in.size = got;
    z->in.pos = 0;
    return 0;
}

static int zstd_failed(const struct ms_zsrc *z, size_t r)
{
    if (ZSTD_getErrorCode(r) == ZSTD_error_frameParameter_windowTooLarge)
        return ms_error(MS_EUNSUPPORTED, "%s: zstd window over 128 MiB (compressed with --long=28 or more); "
                        "recompress without --long", z->path);
    return ms_error(MS_EIO, "%s: corrupt zstd data near uncompressed offset %" PRIu64 ": %s",
                    z->path, z->cursor, ZSTD_getErrorName(r));
}

/*
 * Decompresses the next len bytes into dst (the caller's buffer or scratch).
 * With count (len ignored), decompresses to the end of the file into scratch
 * and adds the bytes to *counted.
 */
static int produce(struct ms_zsrc *z, void *dst, size_t len, bool count, uint64_t *counted)
{
    ZSTD_outBuffer out = {count ? z->scratch : dst, count ? z->scap : len, 0};
    while (count || out.pos < out.size) {
        if (z->in.pos == z->in.size) {
            int rc = refill(z);
            if (rc < 0)
                return rc;
            if (z->in.size == 0) {
                if (count && z->last_ret == 0) {
                    *counted += out.pos;
                    return 0;
                }
                return truncated(z, z->csize);
            }
        }
        size_t r = ZSTD_decompressStream(z->dctx, &out, &z->in);
        if (ZSTD_isError(r))
            return zstd_failed(z, r);
        z->last_ret = r;
        if (count && out.pos == out.size) {
            *counted += out.pos;
            out.pos = 0;
        }
    }
    z->cursor += len;
    return 0;
}

/* ------------------------------------------------------------- the API */

void ms_zsrc_free(struct ms_zsrc *z)
{
    if (!z)
        return;
    if (z->fd >= 0)
        close(z->fd);
    ZSTD_freeDCtx(z->dctx);
    ms_free(z->inbuf);
    ms_free(z->scratch);
    ms_free(z->path);
    ms_free(z);
}

int ms_zsrc_open(const char *path, struct ms_zsrc **out)
{
    *out = NULL;
    int rc = 0;
    struct ms_zsrc *z = ms_calloc(1, sizeof *z);
    if (!z)
        return ms_error(MS_ENOMEM, "%s: out of memory", path);
    z->fd = -1;
    z->path = ms_strdup(path);
    z->incap = ZSTD_DStreamInSize();
    z->scap = ZSTD_DStreamOutSize();
    z->inbuf = ms_malloc(z->incap);
    z->scratch = ms_malloc(z->scap);
    z->dctx = ZSTD_createDCtx();
    if (!z->path || !z->inbuf || !z->scratch || !z->dctx) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    /* O_NONBLOCK: a FIFO under a .zst name must not block the open (it is then
     * refused as not a regular file); regular files ignore the flag. */
    z->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat st;
    if (z->fd < 0 || fstat(z->fd, &st) < 0) {
        rc = ms_error(-errno, "%s: cannot open: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = ms_error(MS_EIO, "%s: not a regular file", path);
        goto out;
    }
    z->csize = (uint64_t)st.st_size;

    bool known;
    rc = walk_frames(z, &z->size, &known);
    if (rc < 0)
        goto out;
    restart(z);
    if (!known) {
        z->size = 0;
        rc = produce(z, NULL, 0, true, &z->size);
        restart(z);
        if (rc < 0)
            goto out;
    }
    *out = z;
    z = NULL;
out:
    ms_zsrc_free(z);
    return rc;
}

uint64_t ms_zsrc_size(const struct ms_zsrc *z)
{
    return z->size;
}

int ms_zsrc_pread(struct ms_zsrc *z, void *buf, size_t len, uint64_t off)
{
    if (off > z->size || len > z->size - off)
        return ms_error(MS_EIO, "%s: read of %zu bytes at offset %" PRIu64
                        " passes the end of the data (%" PRIu64 " bytes)",
                        z->path, len, off, z->size);
    if (off < z->cursor)
        restart(z);
    int rc = 0;
    while (rc == 0 && z->cursor < off) {
        uint64_t gap = off - z->cursor;
        rc = produce(z, z->scratch, (size_t)MS_MIN(gap, (uint64_t)z->scap), false, NULL);
    }
    if (rc == 0)
        rc = produce(z, buf, len, false, NULL);
    if (rc < 0)
        z->cursor = UINT64_MAX; /* decoder state unknown: the next read starts over */
    return rc;
}
