/*
 * st_remote.c - safetensors headers of remote files (io_impl.h), read with
 * range requests through ms_http.
 */
#include <assert.h>
#include <string.h>

#include "ms_common.h"
#include "ms_http.h"
#include "io_impl.h"

#define FIRST_READ (64u << 10) /* most headers fit: one request per shard */

static bool has_suffix(const char *s, const char *suf)
{
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && !strcmp(s + n - m, suf);
}

int ms__st_open_url(const char *url, struct ms_st_file **out)
{
    assert(url && out);
    *out = NULL;
    if (has_suffix(url, ".zst"))
        return ms_error(MS_EUNSUPPORTED, "%s: compressed remote shards are not supported", url);
    unsigned char *buf = ms_malloc(FIRST_READ);
    if (!buf)
        return ms_error(MS_ENOMEM, "out of memory");
    uint64_t got = 0, total = 0, have = 0;
    int rc = ms_http_get_range(url, buf, 0, FIRST_READ, true, &got, &total);
    if (rc)
        goto out;
    have = got;
    if (total == UINT64_MAX) {
        rc = ms_error(MS_EIO,
                      "%s: the server does not say the file's size (Content-Range "
                      "bytes .../*)",
                      url);
        goto out;
    }
    if (got >= 8) {
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--)
            n = n << 8 | buf[i];
        /* Fetch the rest of a long header only when ms_st_parse could accept it. */
        if (n <= MS_ST_MAX_HEADER && 8 + n <= total && 8 + n > got) {
            unsigned char *nb = ms_realloc(buf, (size_t)(8 + n));
            if (!nb) {
                rc = ms_error(MS_ENOMEM, "out of memory");
                goto out;
            }
            buf = nb;
            rc = ms_http_get_range(url, buf + got, got, 8 + n - got, false, NULL, NULL);
            if (rc)
                goto out;
            have = 8 + n;
        }
    }
    rc = ms_st_parse(url, buf, (size_t)have, total, out);
out:
    ms_free(buf);
    return rc;
}
