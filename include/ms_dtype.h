/*
 * ms_dtype.h - the safetensors element types and the float conversion kernels.
 *
 * The enum order is the safetensors library's Dtype order (alignment order);
 * the writer sorts tensors by it, descending, as the official writer does.
 * Merges compute on F32, F16 and BF16 (values are carried as float holding a
 * value exactly representable in the compute dtype); every other type can only
 * be copied.
 *
 * Kernels are leaf functions over restrict pointers: no allocation, no errors,
 * callable from any thread. Each has a scalar reference (_ref) that the tests
 * compare the fast version against over all 65,536 bit patterns.
 * Rounding is round-to-nearest-even; NaN inputs become quiet NaNs of the same
 * sign (for bf16 as ggml does: keep the top bits and set the quiet bit).
 */
#ifndef MS_DTYPE_H
#define MS_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ms_isa.h"

enum ms_dtype {
    MS_DT_BOOL,
    MS_DT_F4,
    MS_DT_F6_E2M3,
    MS_DT_F6_E3M2,
    MS_DT_U8,
    MS_DT_I8,
    MS_DT_F8_E5M2,
    MS_DT_F8_E4M3,
    MS_DT_F8_E8M0,
    MS_DT_F8_E4M3FNUZ,
    MS_DT_F8_E5M2FNUZ,
    MS_DT_I16,
    MS_DT_U16,
    MS_DT_F16,
    MS_DT_BF16,
    MS_DT_I32,
    MS_DT_U32,
    MS_DT_F32,
    MS_DT_C64,
    MS_DT_F64,
    MS_DT_I64,
    MS_DT_U64,
    MS_DT_COUNT,
    MS_DT_NONE = -1
};

/* safetensors spelling ("BF16"); NULL for out-of-range values. */
const char *ms_dtype_name(enum ms_dtype dt);
/* Parses a safetensors dtype name of len bytes (not NUL-terminated); MS_DT_NONE if unknown. */
enum ms_dtype ms_dtype_from_name(const char *name, size_t len);
/* Parses a mergekit recipe dtype ("bfloat16", "float16", "float32", optionally
 * "torch."-prefixed); MS_DT_NONE if unknown. ("int64" is mergekit-legal but not
 * a compute type here; it returns MS_DT_I64 and the plan rejects it.) */
enum ms_dtype ms_dtype_from_recipe(const char *name);
/* Bits per element (4, 6, 8, 16, 32, 64). */
unsigned ms_dtype_bits(enum ms_dtype dt);
/* True for F16, BF16 and F32: the types merges compute on. */
bool ms_dtype_is_compute(enum ms_dtype dt);
/* True for F16, BF16, F32 and F64: types that decode to float. */
bool ms_dtype_is_float(enum ms_dtype dt);

/* Scalar conversions (reference semantics, inline for use inside kernels). */
static inline float ms_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t ms_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float ms_bf16_to_f32_1(uint16_t h) { return ms_f32_from_bits((uint32_t)h << 16); }
static inline uint16_t ms_f32_to_bf16_1(float f)
{
    uint32_t u = ms_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep sign and top payload, force quiet */
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
float ms_f16_to_f32_1(uint16_t h);
uint16_t ms_f32_to_f16_1(float f);

/* Rounds one float to the nearest value of dt (F32: identity; F16; BF16). */
static inline float ms_round_bf16_1(float f) { return ms_bf16_to_f32_1(ms_f32_to_bf16_1(f)); }
/*
 * ms_f16_to_f32_1(ms_f32_to_f16_1(f)), bit for bit, computed in the float
 * domain without branches so that loops over it vectorise in every ISA
 * version (tests/test_isa.c compares it over all 2^32 inputs' classes):
 * |f| >= 2^-14 rounds the mantissa to 10 bits (RNE, carry into the exponent);
 * |f| >= 65520 gives Inf; below 2^-14, adding 0.5 rounds |f| to a multiple of
 * 2^-24 (RNE by the FPU; DAZ/FTZ do not change it) and subtracting 0.5 is
 * exact; a NaN becomes quiet keeping the top 10 payload bits; the sign is kept.
 */
static inline float ms_round_f16_1(float f)
{
    uint32_t u = ms_f32_bits(f);
    uint32_t a = u & 0x7fffffffu;
    uint32_t nan = (a | 0x00400000u) & ~0x1fffu;
    uint32_t nrm = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;
    uint32_t sub = ms_f32_bits((ms_f32_from_bits(a) + 0.5f) - 0.5f);
    uint32_t r = a > 0x7f800000u ? nan
               : a >= 0x477ff000u ? 0x7f800000u
               : a >= 0x38800000u ? nrm : sub;
    return ms_f32_from_bits((u & 0x80000000u) | r);
}

/* Array conversions. n elements; src and dst must not overlap. */
void ms_bf16_to_f32(const uint16_t *restrict src, float *restrict dst, size_t n);
void ms_f32_to_bf16(const float *restrict src, uint16_t *restrict dst, size_t n);
void ms_f16_to_f32(const uint16_t *restrict src, float *restrict dst, size_t n);
void ms_f32_to_f16(const float *restrict src, uint16_t *restrict dst, size_t n);
/* Every version of the four above (ms_isa.h): NULL when isa is not available
 * here. The functions above call the ms_isa_active() version. */
struct ms_dtype_kernels {
    void (*bf16_to_f32)(const uint16_t *restrict src, float *restrict dst, size_t n);
    void (*f32_to_bf16)(const float *restrict src, uint16_t *restrict dst, size_t n);
    void (*f16_to_f32)(const uint16_t *restrict src, float *restrict dst, size_t n);
    void (*f32_to_f16)(const float *restrict src, uint16_t *restrict dst, size_t n);
};
const struct ms_dtype_kernels *ms_dtype_kernels(enum ms_isa isa);
/* Scalar references of the four above. */
void ms_bf16_to_f32_ref(const uint16_t *src, float *dst, size_t n);
void ms_f32_to_bf16_ref(const float *src, uint16_t *dst, size_t n);
void ms_f16_to_f32_ref(const uint16_t *src, float *dst, size_t n);
void ms_f32_to_f16_ref(const float *src, uint16_t *dst, size_t n);

/*
 * Decodes n elements of dt (F16, BF16, F32, F64) at raw into float at dst.
 * In place is allowed when dst == raw (the buffer must hold n floats): the
 * expanding conversions run from the end. F64 narrows with RNE.
 */
void ms_dtype_decode(enum ms_dtype dt, const void *raw, float *dst, size_t n);
/*
 * Decodes n elements of dt whose raw bytes sit at the top of the n-float buffer
 * dst (raw == (char *)dst + n * (4 - size of dt)), the layout a reader gets by
 * reading straight into the end of the buffer. Converting forward never
 * overwrites raw bytes not yet read, so no staging copy is needed except for the
 * last few elements. For 4-byte types raw == dst and this is ms_dtype_decode.
 */
void ms_dtype_decode_up(enum ms_dtype dt, const void *raw, float *dst, size_t n);
/* Encodes n floats into dt at raw; in place allowed when raw == src. */
void ms_dtype_encode(enum ms_dtype dt, const float *src, void *raw, size_t n);
/* Rounds n floats in place to the nearest values of dt (F32 is a no-op). */
void ms_dtype_round(enum ms_dtype dt, float *x, size_t n);

#endif
