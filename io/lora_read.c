/*
 * lora_read.c - reads one LoRA fold's A and B matrices from the adapter's
 * safetensors file into float buffers (ms_lora.h, ms_lora_read).
 *
 * Blocking preads through a small stack buffer: the matrices are r x (rows +
 * cols) elements, small next to the weight they fold into, and are read once per
 * job. No allocation.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_lora.h"

#define STEP 2048 /* elements per read */

/* Reads rows x cols elements of dtype dt at off; element (p, k) lands at
 * dst[p * r + k] (transposed: element (k, p) of the stored r x n matrix). */
static int read_matrix(int fd, const struct ms_lora_fold *f, const char *name, enum ms_dtype dt,
                       uint64_t off, uint64_t nrows, uint64_t ncols, bool transposed, float *dst)
{
    uint64_t raw[STEP]; /* room for STEP elements of up to 8 bytes */
    float val[STEP];
    unsigned eb = ms_dtype_bits(dt) / 8;
    uint64_t total = nrows * ncols;
    for (uint64_t e = 0; e < total; e += STEP) {
        size_t cnt = (size_t)MS_MIN((uint64_t)STEP, total - e);
        size_t want = cnt * eb, got = 0;
        while (got < want) {
            ssize_t k = pread(fd, (char *)raw + got, want - got, (off_t)(off + e * eb + got));
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0)
                return ms_error(-errno, "%s: cannot read adapter tensor '%s': %s", f->file, name,
                                strerror(errno));
            if (k == 0)
                return ms_error(MS_EIO, "%s: adapter tensor '%s' is cut short", f->file, name);
            got += (size_t)k;
        }
        ms_dtype_decode(dt, raw, val, cnt);
        for (size_t t = 0; t < cnt; t++) {
            uint64_t p = (e + t) / ncols, k = (e + t) % ncols;
            if (transposed) /* stored r x n: (p, k) is A[p][k] -> at[k * r + p] */
                dst[k * f->r + p] = val[t];
            else /* stored n x r */
                dst[p * f->r + k] = val[t];
        }
    }
    return 0;
}

int ms_lora_read(const struct ms_lora_fold *f, float *at, float *b)
{
    if (!f->r)
        return 0;
    uint64_t na = f->transpose ? f->rows : f->cols, nb = f->transpose ? f->cols : f->rows;
    int fd = open(f->file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ms_error(-errno, "%s: cannot open: %s", f->file, strerror(errno));
    int rc = read_matrix(fd, f, f->a_name, f->a_dtype, f->a_offset, f->r, na, true, at);
    if (!rc)
        rc = read_matrix(fd, f, f->b_name, f->b_dtype, f->b_offset, nb, f->r, false, b);
    close(fd);
    return rc;
}
