/*
 * ms_zsrc.h - random-access reads of a zstd-compressed safetensors file
 * (io/zsrc.c). Synchronous; no libuv: the header parser and the fuzz harness
 * use it as well as the engine's compressed sources (ms_src.h).
 */
#ifndef MS_ZSRC_H
#define MS_ZSRC_H

#include <stddef.h>
#include <stdint.h>

/*
 * Compressed inputs: a reader over a .safetensors.zst file (one or more
 * concatenated zstd frames; skippable frames are skipped) that serves reads at
 * increasing offsets by decompressing forward; a gap is decompressed and
 * dropped; a read before the cursor restarts from the file's start (documented
 * cost: a pass that reads again decompresses again). Thread: one at a time.
 * Open walks the frame and block headers, so a truncated file fails there
 * (MS_EIO naming the file) before any data is decompressed. Frames needing a
 * window over 128 MiB (zstd --long=28 and up) are MS_EUNSUPPORTED.
 */
struct ms_zsrc;
int ms_zsrc_open(const char *path, struct ms_zsrc **out);
/* Uncompressed size (the frame headers' sum, else counted by decompressing once at open). */
uint64_t ms_zsrc_size(const struct ms_zsrc *z);
/* Reads exactly len bytes at uncompressed offset off; short input is MS_EIO naming the file. */
int ms_zsrc_pread(struct ms_zsrc *z, void *buf, size_t len, uint64_t off);
/* Closes the file and frees; NULL is a no-op. */
void ms_zsrc_free(struct ms_zsrc *z);

#endif
