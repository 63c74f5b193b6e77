/*
 * st_impl.h - helpers shared by the safetensors files of io/ (private).
 */
#ifndef MS_ST_IMPL_H
#define MS_ST_IMPL_H

#include <stddef.h>
#include <stdint.h>

/*
 * Decodes one UTF-8 sequence at s (len > 0 bytes available) as Rust's
 * str::from_utf8 accepts it: no overlong forms, no surrogates, nothing above
 * U+10FFFF. Returns its length in bytes (1-4) and sets *cp, or 0 if the bytes
 * at s are not valid UTF-8. Defined in st_read.c.
 */
size_t ms__utf8_decode(const unsigned char *s, size_t len, uint32_t *cp);

#endif
