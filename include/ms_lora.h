/*
 * ms_lora.h - LoRA references (`model+adapter`): folding a PEFT adapter into the
 * weights of one input as they are read, never as a merged copy on disk.
 *
 * mergekit merges a LoRA into its model with PEFT's merge_and_unload before the
 * merge reads it (mergekit-spec.md 1.2): the model is loaded in the LoRA merge
 * dtype D (--lora-merge-dtype; by default the model's own dtype, as transformers'
 * dtype="auto" loads it), each targeted weight becomes
 *
 *     W' = round_D( float32(round_D(W)) + float32(float32(B @ A) * float32(scale)) )
 *
 * with scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), B @ A
 * transposed for fan_in_fan_out layers and for embeddings (PEFT's
 * lora_embedding_A / lora_embedding_B convention), and every other tensor of
 * the model becomes round_D(W). The merge then reads the model as if it were
 * stored in D. Here each k-sum of B @ A is taken in double in k order and
 * rounded once to float32, so it does not depend on chunking or threads.
 *
 * A struct ms_lora_fold is fixed by the plan (pipeline/lora.c) and read-only
 * afterwards; the engine loads A and B for the job that uses it into a
 * budget-accounted buffer (ms_lora_read) and applies ms_lora_fold_chunk to
 * each decoded chunk on a compute thread.
 */
#ifndef MS_LORA_H
#define MS_LORA_H

#include <stdbool.h>
#include <stdint.h>

#include "ms_dtype.h"

struct ms_lora_fold {
    enum ms_dtype dtype; /* D: the folded weight's dtype (every value is exact in it) */
    uint32_t r;          /* rank; 0 = no adapter for this tensor, only the change
                                     to dtype D */
    uint64_t rows, cols; /* W as stored, as a matrix: leading dims x last dim */
    bool transpose;      /* delta = (B @ A)^T: B is cols x r, A is r x rows
                                     (otherwise B is rows x r, A is r x cols) */
    float scale;         /* lora_alpha / r, or lora_alpha / sqrt(r) (rsLoRA) */
    /* Where A and B are (r > 0): the adapter file and their absolute offsets. Borrowed
     * from the plan. */
    const char *file;
    const char *a_name, *b_name; /* adapter tensor names, for messages */
    enum ms_dtype a_dtype, b_dtype;
    uint64_t a_offset, b_offset;
};

/* Floats a loaded fold takes: B (nB x r) and A transposed (nA x r), nA + nB = rows + cols. */
static inline uint64_t ms_lora_floats(const struct ms_lora_fold *f)
{
    return f->r ? (uint64_t)f->r * (f->rows + f->cols) : 0;
}

/*
 * Reads the fold's A and B from its adapter file (io/lora_read.c), decoded to
 * float: b[p * r + k] = B[p][k] and at[q * r + k] = A[k][q] (A transposed, so
 * both are contiguous in k). at holds nA * r floats, b nB * r (nA = rows when
 * transpose, else cols; nB the other). Blocking (small reads, no allocation);
 * any thread. Errors: MS_EIO / MS_EDATA naming the file and tensor.
 */
int ms_lora_read(const struct ms_lora_fold *f, float *at, float *b);

/*
 * Folds the adapter into x[0..n), elements first..first+n of W (row-major, any
 * range; rows need not be whole): x[t] becomes round_D(x[t] + delta) after x is
 * rounded to D, as in the formula above. at and b are ms_lora_read's (unused
 * when f->r == 0). Pure compute (stages/lora_fold.c); any thread.
 */
void ms_lora_fold_chunk(const struct ms_lora_fold *f, const float *restrict at,
                        const float *restrict b, uint64_t first, float *restrict x, uint64_t n);

#endif
