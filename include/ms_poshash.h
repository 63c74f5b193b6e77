/*
 * ms_poshash.h - a checksum of a file's bytes that can be computed from pieces
 * written at any offsets, in any order, on any threads (base/poshash.c).
 *
 * The file is read as little-endian 32-bit words v[w] (byte offset 4w; a
 * missing tail is zero), and
 *
 *     acc  = sum over w of v[w] * A^w   (mod P, P = 2^61 - 1, A a fixed constant)
 *     hash = XXH64 of ("poshash1", acc, file size)
 *
 * The sum is linear in the bytes, so a byte range [off, off + len) has its own
 * part (ms_poshash_range), and the parts of disjoint ranges that cover the file
 * add up (ms_poshash_add) to the same acc whatever the split and the order:
 * shards are hashed as their chunks are written, and the same figure is
 * recomputed by reading the file (--resume, verify --deep). Any change of one
 * word changes acc (A^w is invertible mod P); changes of several words cancel
 * only when A is a root of their difference polynomial (at most one chance in
 * P / (words changed) for data unrelated to A).
 *
 * Pure functions of their arguments, any thread.
 */
#ifndef MS_POSHASH_H
#define MS_POSHASH_H

#include <stddef.h>
#include <stdint.h>

#include "ms_isa.h"

/* The part of bytes data[0..len) lying at file offset off; in [0, 2^61 - 1). */
uint64_t ms_poshash_range(uint64_t off, const void *data, size_t len);

/* The same, computed by the given version of the kernel (ms_isa.h; it must be
 * available here): every version gives the same value. ms_poshash_range uses
 * the ms_isa_active() one. */
uint64_t ms_poshash_range_isa(enum ms_isa isa, uint64_t off, const void *data, size_t len);

/* Adds two parts (mod 2^61 - 1). */
uint64_t ms_poshash_add(uint64_t a, uint64_t b);

/* The checksum of a file of size bytes whose parts add up to acc. */
uint64_t ms_poshash_digest(uint64_t acc, uint64_t size);

#endif
