/*
 * str.c - small string and number helpers: the growable string, UTF-8
 * decoding and byte counts (ms_str.h), size parsing and shape element counts
 * (ms_common.h).
 */
#include <assert.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ms_common.h"
#include "ms_str.h"

/* ------------------------------------------------------------------ string buffer */

/* Makes room for n more bytes and the NUL: the first allocation is 256 bytes,
 * then the capacity doubles. Returns false (and sets oom) on failure. */
static bool sb_reserve(struct ms_strbuf *b, size_t n)
{
    if (b->oom)
        return false;
    if (n > SIZE_MAX / 2 - b->len) {
        b->oom = true;
        return false;
    }
    if (b->len + n + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 256;
    while (b->len + n + 1 > cap)
        cap *= 2;
    char *p = ms_realloc(b->p, cap);
    if (!p) {
        b->oom = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

void ms_strbuf_add(struct ms_strbuf *b, const void *s, size_t n)
{
    if (!sb_reserve(b, n))
        return;
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void ms_strbuf_addstr(struct ms_strbuf *b, const char *s) { ms_strbuf_add(b, s, strlen(s)); }

void ms_strbuf_addf(struct ms_strbuf *b, const char *fmt, ...)
{
    va_list ap;
    if (b->oom)
        return;
    /* Formats into the free room first; only text that does not fit is formatted twice. */
    size_t room = b->p ? b->cap - b->len : 0;
    va_start(ap, fmt);
    int n = vsnprintf(room ? b->p + b->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < room) {
        b->len += (size_t)n;
        return;
    }
    if (b->p)
        b->p[b->len] = 0; /* drop what the first try wrote */
    if (n < 0) {
        b->oom = true;
        return;
    }
    if (!sb_reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void ms_strbuf_reset(struct ms_strbuf *b)
{
    b->len = 0;
    if (b->p)
        b->p[0] = 0;
}

void ms_strbuf_fini(struct ms_strbuf *b)
{
    ms_free(b->p);
    *b = (struct ms_strbuf){ 0 };
}

/* ------------------------------------------------------------------ UTF-8 */

size_t ms_utf8_decode(const unsigned char *s, size_t len, uint32_t *cp)
{
    assert(len > 0);
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t n;
    unsigned lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
    uint32_t v;
    if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
        v = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        v = c & 0x0f;
        if (c == 0xe0)
            lo = 0xa0; /* overlong */
        else if (c == 0xed)
            hi = 0x9f; /* surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        v = c & 0x07;
        if (c == 0xf0)
            lo = 0x90; /* overlong */
        else if (c == 0xf4)
            hi = 0x8f; /* above U+10FFFF */
    } else {
        return 0;
    }
    if (len < n || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t k = 1; k < n; k++) {
        if ((s[k] & 0xc0) != 0x80)
            return 0;
        v = (v << 6) | (s[k] & 0x3f);
    }
    *cp = v;
    return n;
}

size_t ms_utf8_invalid_at(const void *s, size_t len)
{
    const unsigned char *u = s;
    size_t i = 0;
    while (i < len) {
        uint32_t cp;
        size_t k = ms_utf8_decode(u + i, len - i, &cp);
        if (!k)
            return i;
        i += k;
    }
    return len;
}

size_t ms_utf8_prefix(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n <= max)
        return n;
    n = max;
    while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
        n--;
    return n;
}

/* ------------------------------------------------------------------ byte counts */

const char *ms_fmt_bytes(char *buf, size_t n, double bytes, enum ms_bytes_style style)
{
    static const struct {
        double step;
        int decimals;
        size_t nunits;
        const char *unit[6];
    } styles[] = {
        [MS_BYTES_SI] = { 1000, 2, 6, { "B", "kB", "MB", "GB", "TB", "PB" } },
        [MS_BYTES_IEC] = { 1024, 1, 6, { "B", "KiB", "MiB", "GiB", "TiB", "PiB" } },
        [MS_BYTES_PROGRESS] = { 1000, 2, 5, { "B", "KB", "MB", "GB", "TB" } },
    };
    assert((size_t)style < MS_ARRAY_LEN(styles));
    double v = bytes;
    size_t u = 0;
    while (v >= styles[style].step && u + 1 < styles[style].nunits) {
        v /= styles[style].step;
        u++;
    }
    if (u == 0)
        snprintf(buf, n, "%.0f B", v);
    else
        snprintf(buf, n, "%.*f %s", styles[style].decimals, v, styles[style].unit[u]);
    return buf;
}

/* ------------------------------------------------------------------ numbers */
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

/* Optimal string alignment distance (edits: insert, delete, substitute, swap of
 * two neighbours), capped: returns cap + 1 as soon as it must exceed cap. */
static size_t osa_distance(const char *a, const char *b, size_t cap)
{
    enum { W = 64 };
    size_t la = strlen(a), lb = strlen(b);
    if (la >= W || lb >= W)
        return cap + 1;
    if ((la > lb ? la - lb : lb - la) > cap)
        return cap + 1;
    size_t d[W][W];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            size_t cost = a[i - 1] != b[j - 1];
            size_t v = MS_MIN(d[i - 1][j] + 1, d[i][j - 1] + 1);
            v = MS_MIN(v, d[i - 1][j - 1] + cost);
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
                v = MS_MIN(v, d[i - 2][j - 2] + 1);
            d[i][j] = v;
        }
    }
    return MS_MIN(d[la][lb], cap + 1);
}

const char *ms_str_closest(const char *s, const char *const *cand, size_t n)
{
    size_t len = strlen(s), cap = len < 4 ? 1 : len < 8 ? 2 : 3, best = cap + 1;
    const char *found = NULL;
    for (size_t i = 0; i < n; i++) {
        size_t dist = osa_distance(s, cand[i], cap);
        if (dist < best) {
            best = dist;
            found = cand[i];
        }
    }
    return found;
}
