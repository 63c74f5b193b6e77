/*
 * str.c - small string and number helpers: size parsing and shape element
 * counts (declared in ms_common.h).
 */
#include <stdbool.h>
#include <stdint.h>

#include "ms_common.h"

/* ------------------------------------------------------------------ parsing */

int ms_parse_size(const char *s, bool binary, uint64_t *out)
{
    const char *p = s;
    uint64_t v = 0;
    if (!s || *p < '0' || *p > '9')
        return ms_error(MS_EINVAL, "invalid size '%s'", s ? s : "");
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > (UINT64_MAX - 9) / 10)
            return ms_error(MS_EINVAL, "size '%s' is too large", s);
        v = v * 10 + (uint64_t)(*p - '0');
    }
    uint64_t mul = 1;
    char c = *p;
    if (c) {
        bool ibi = (p[1] == 'i' || p[1] == 'I') && (p[2] == 'b' || p[2] == 'B') && !p[3];
        bool one = !p[1];
        if (!ibi && !one)
            return ms_error(MS_EINVAL, "invalid size suffix in '%s'", s);
        uint64_t k = (binary || ibi) ? 1024 : 1000;
        switch (c) {
        case 'k': case 'K': mul = k; break;
        case 'm': case 'M': mul = k * k; break;
        case 'g': case 'G': mul = k * k * k; break;
        case 'b': case 'B':
            if (ibi)
                return ms_error(MS_EINVAL, "invalid size suffix in '%s'", s);
            mul = binary ? 1024ull * 1024 * 1024 : 1000000000ull; /* mergekit: B = billion */
            break;
        case 't': case 'T': mul = k * k * k * k; break;
        default:
            return ms_error(MS_EINVAL, "invalid size suffix in '%s'", s);
        }
    }
    if (mul > 1 && v > UINT64_MAX / mul)
        return ms_error(MS_EINVAL, "size '%s' is too large", s);
    *out = v * mul;
    return 0;
}

bool ms_shape_numel(const int64_t *shape, uint32_t ndim, uint64_t *out)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return false;
        uint64_t d = (uint64_t)shape[i];
        if (d && n > UINT64_MAX / d)
            return false;
        n *= d;
    }
    *out = n;
    return true;
}
