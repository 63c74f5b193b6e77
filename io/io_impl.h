/*
 * io_impl.h - private to io/: remote safetensors headers (io/st_remote.c).
 */
#ifndef MS_IO_IMPL_H
#define MS_IO_IMPL_H

#include "ms_safetensors.h"

/*
 * ms_st_open for an http(s) URL: reads the first 64 KiB with one range request
 * (the 8-byte length and, usually, the whole header), the rest of the header
 * with a second when it is longer, and validates it like a local file's, the
 * file size being Content-Range's total. A ".zst" URL is MS_EUNSUPPORTED.
 */
int ms__st_open_url(const char *url, struct ms_st_file **out);

#endif
