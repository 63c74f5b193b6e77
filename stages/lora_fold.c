/*
 * lora_fold.c - the LoRA fold kernel (ms_lora.h): W' = round_D(round_D(W) + scale * B @ A)
 * over any element range of W. Pure compute.
 *
 * Each delta is a dot product over the rank in k order, accumulated in double
 * and rounded once to float32 (PEFT's float32 B @ A, correctly rounded up to the
 * order of a double sum), then multiplied by the float32 scale, added in float32
 * and rounded to D: the same arithmetic for an element whatever chunk holds it.
 */
#include <assert.h>

#include "ms_common.h"
#include "ms_lora.h"

static float round_to(enum ms_dtype dt, float v)
{
    if (dt == MS_DT_BF16)
        return ms_round_bf16_1(v);
    if (dt == MS_DT_F16)
        return ms_round_f16_1(v);
    return v;
}

/* One row segment: x[t] += scale * dot(bp, at + q*r) for q = q0.., fixed B row bp. */
static void fold_row(const float *restrict bp, const float *restrict at, uint32_t r, uint64_t q0,
                     uint64_t qstride, float scale, enum ms_dtype dt, float *restrict x, uint64_t n)
{
    for (uint64_t t = 0; t < n; t++) {
        const float *ap = at + (q0 + t * qstride) * r;
        double s = 0.0;
        for (uint32_t k = 0; k < r; k++)
            s += (double)bp[k] * (double)ap[k];
        float d = (float)s * scale;
        x[t] = round_to(dt, round_to(dt, x[t]) + d);
    }
}

void ms_lora_fold_chunk(const struct ms_lora_fold *f, const float *restrict at,
                        const float *restrict b, uint64_t first, float *restrict x, uint64_t n)
{
    if (!f->r) {
        for (uint64_t t = 0; t < n; t++)
            x[t] = round_to(f->dtype, x[t]);
        return;
    }
    assert(f->cols > 0 && first + n <= f->rows * f->cols);
    uint64_t t = 0;
    while (t < n) {
        uint64_t e = first + t, i = e / f->cols, j = e % f->cols;
        uint64_t len = MS_MIN(n - t, f->cols - j); /* the rest of row i in this chunk */
        if (!f->transpose)                         /* delta[i][j] = B[i] . A[:, j] */
            fold_row(b + i * f->r, at, f->r, j, 1, f->scale, f->dtype, x + t, len);
        else /* delta[i][j] = B[j] . A[:, i]: B's row varies along the segment */
            for (uint64_t u = 0; u < len; u++)
                fold_row(b + (j + u) * f->r, at, f->r, i, 0, f->scale, f->dtype, x + t + u, 1);
        t += len;
    }
}
