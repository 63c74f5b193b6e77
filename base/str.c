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

/* ------------------------------------------------------------------ escaping */

/* Length of the escape-free run at s (0: s starts with something to escape). */
static size_t plain_run(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        if (s[i] < 0x20 || s[i] == 0x7f)
            break;
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        size_t n = ms_utf8_decode(s + i, len - i, &cp);
        if (n == 0 || (cp >= 0x80 && cp <= 0x9f))
            break;
        i += n;
    }
    return i;
}

bool ms_str_needs_escape(const char *s)
{
    size_t len = strlen(s);
    return plain_run((const unsigned char *)s, len) != len;
}

void ms_str_escape(struct ms_strbuf *b, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t len = strlen(s);
    while (len) {
        size_t n = plain_run(p, len);
        ms_strbuf_add(b, p, n);
        p += n;
        len -= n;
        if (!len)
            break;
        uint32_t cp;
        size_t k = *p >= 0x80 ? ms_utf8_decode(p, len, &cp) : 1;
        if (k == 0)
            k = 1; /* an invalid byte: escape it alone */
        for (size_t j = 0; j < k; j++) {
            if (p[j] == '\n')
                ms_strbuf_addstr(b, "\\n");
            else if (p[j] == '\r')
                ms_strbuf_addstr(b, "\\r");
            else if (p[j] == '\t')
                ms_strbuf_addstr(b, "\\t");
            else
                ms_strbuf_addf(b, "\\x%02X", p[j]);
        }
        p += k;
        len -= k;
    }
}

/* ------------------------------------------------------------------ XXH64 */

#define XP1 0x9E3779B185EBCA87ull
#define XP2 0xC2B2AE3D27D4EB4Full
#define XP3 0x165667B19E3779F9ull
#define XP4 0x85EBCA77C2B2AE63ull
#define XP5 0x27D4EB2F165667C5ull

static uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static uint64_t rd64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t xround(uint64_t acc, uint64_t in)
{
    acc += in * XP2;
    acc = rotl64(acc, 31);
    return acc * XP1;
}

static uint64_t xmerge(uint64_t acc, uint64_t v)
{
    acc ^= xround(0, v);
    return acc * XP1 + XP4;
}

void ms_xxh64_init(struct ms_xxh64 *h)
{
    memset(h, 0, sizeof *h);
    h->v[0] = XP1 + XP2;
    h->v[1] = XP2;
    h->v[2] = 0;
    h->v[3] = (uint64_t)0 - XP1;
}

static void xstripe(uint64_t v[4], const unsigned char *p)
{
    v[0] = xround(v[0], rd64(p));
    v[1] = xround(v[1], rd64(p + 8));
    v[2] = xround(v[2], rd64(p + 16));
    v[3] = xround(v[3], rd64(p + 24));
}

void ms_xxh64_update(struct ms_xxh64 *h, const void *data, size_t len)
{
    const unsigned char *p = data;
    h->total += len;
    if (h->nbuf) {
        size_t take = MS_MIN(len, 32 - h->nbuf);
        memcpy(h->buf + h->nbuf, p, take);
        h->nbuf += take;
        p += take;
        len -= take;
        if (h->nbuf < 32)
            return;
        xstripe(h->v, h->buf);
        h->nbuf = 0;
    }
    for (; len >= 32; p += 32, len -= 32)
        xstripe(h->v, p);
    memcpy(h->buf, p, len);
    h->nbuf = len;
}

uint64_t ms_xxh64_digest(const struct ms_xxh64 *h)
{
    uint64_t acc;
    if (h->total >= 32) {
        const uint64_t *v = h->v;
        acc = rotl64(v[0], 1) + rotl64(v[1], 7) + rotl64(v[2], 12) + rotl64(v[3], 18);
        for (int i = 0; i < 4; i++)
            acc = xmerge(acc, v[i]);
    } else {
        acc = h->v[2] + XP5; /* the seed (0) + PRIME5 */
    }
    acc += h->total;
    const unsigned char *p = h->buf;
    size_t n = h->nbuf;
    for (; n >= 8; p += 8, n -= 8) {
        acc ^= xround(0, rd64(p));
        acc = rotl64(acc, 27) * XP1 + XP4;
    }
    if (n >= 4) {
        acc ^= (uint64_t)rd32(p) * XP1;
        acc = rotl64(acc, 23) * XP2 + XP3;
        p += 4;
        n -= 4;
    }
    for (; n; p++, n--) {
        acc ^= *p * XP5;
        acc = rotl64(acc, 11) * XP1;
    }
    acc ^= acc >> 33;
    acc *= XP2;
    acc ^= acc >> 29;
    acc *= XP3;
    acc ^= acc >> 32;
    return acc;
}
