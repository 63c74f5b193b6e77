/*
 * json_out.c - JSON text the way Python's json.dumps(indent=2) writes it, for
 * the output config.json and `mergestream plan --json` (declared in plan_impl.h).
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "plan_impl.h"

struct jbuf {
    char *p;
    size_t len, cap;
    bool oom;
};

static void jb_put(struct jbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t nc = MS_MAX(b->cap * 2, b->len + n + 256);
        char *q = ms_realloc(b->p, nc);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p = q;
        b->cap = nc;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void jb_puts(struct jbuf *b, const char *s) { jb_put(b, s, strlen(s)); }

static void jb_indent(struct jbuf *b, int depth)
{
    jb_put(b, "\n", 1);
    for (int i = 0; i < depth; i++)
        jb_put(b, "  ", 2);
}

/* Decodes one UTF-8 sequence (jansson strings are valid UTF-8); returns its length. */
static size_t utf8_decode(const unsigned char *s, uint32_t *cp)
{
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    if ((s[0] & 0xe0) == 0xc0) {
        *cp = ((uint32_t)(s[0] & 0x1f) << 6) | (s[1] & 0x3f);
        return 2;
    }
    if ((s[0] & 0xf0) == 0xe0) {
        *cp = ((uint32_t)(s[0] & 0x0f) << 12) | ((uint32_t)(s[1] & 0x3f) << 6) | (s[2] & 0x3f);
        return 3;
    }
    *cp = ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3f) << 12) |
          ((uint32_t)(s[2] & 0x3f) << 6) | (s[3] & 0x3f);
    return 4;
}

static void jb_string(struct jbuf *b, const char *s, size_t n)
{
    char tmp[16];
    jb_put(b, "\"", 1);
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t k = utf8_decode(u + i, &cp);
        i += k;
        switch (cp) {
        case '"': jb_puts(b, "\\\""); continue;
        case '\\': jb_puts(b, "\\\\"); continue;
        case '\n': jb_puts(b, "\\n"); continue;
        case '\r': jb_puts(b, "\\r"); continue;
        case '\t': jb_puts(b, "\\t"); continue;
        case '\b': jb_puts(b, "\\b"); continue;
        case '\f': jb_puts(b, "\\f"); continue;
        default: break;
        }
        if (cp < 0x20 || (cp > 0x7f && cp < 0x10000)) {
            snprintf(tmp, sizeof tmp, "\\u%04x", (unsigned)cp);
            jb_puts(b, tmp);
        } else if (cp >= 0x10000) {
            uint32_t v = cp - 0x10000;
            snprintf(tmp, sizeof tmp, "\\u%04x\\u%04x", (unsigned)(0xd800 + (v >> 10)),
                     (unsigned)(0xdc00 + (v & 0x3ff)));
            jb_puts(b, tmp);
        } else {
            char c = (char)cp;
            jb_put(b, &c, 1);
        }
    }
    jb_put(b, "\"", 1);
}

/*
 * Python's float repr: the shortest digit string that reads back to v, written
 * positionally when the decimal exponent is in [-4, 16) (with ".0" for whole
 * numbers), else in scientific notation with at least two exponent digits.
 */
static void jb_real(struct jbuf *b, double v)
{
    char sci[40], out[64];
    if (!isfinite(v)) {
        jb_puts(b, isnan(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity");
        return;
    }
    int prec = 1;
    for (; prec < 17; prec++) {
        snprintf(sci, sizeof sci, "%.*e", prec - 1, v);
        if (strtod(sci, NULL) == v)
            break;
    }
    snprintf(sci, sizeof sci, "%.*e", prec - 1, v);
    /* sci = [-]d[.ddd]e[+-]XX */
    const char *p = sci;
    size_t o = 0;
    if (*p == '-')
        out[o++] = *p++;
    char digits[24];
    size_t nd = 0;
    for (; *p && *p != 'e'; p++)
        if (*p != '.')
            digits[nd++] = *p;
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    int exp = atoi(p + 1);
    if (exp >= -4 && exp < 16) {
        if (exp >= 0) {
            for (int i = 0; i <= exp; i++)
                out[o++] = (size_t)i < nd ? digits[i] : '0';
            out[o++] = '.';
            if ((size_t)exp + 1 < nd)
                for (size_t i = (size_t)exp + 1; i < nd; i++)
                    out[o++] = digits[i];
            else
                out[o++] = '0';
        } else {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = 0; i < -exp - 1; i++)
                out[o++] = '0';
            for (size_t i = 0; i < nd; i++)
                out[o++] = digits[i];
        }
        out[o] = 0;
    } else {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (size_t i = 1; i < nd; i++)
                out[o++] = digits[i];
        }
        snprintf(out + o, sizeof out - o, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    }
    jb_puts(b, out);
}

static void jb_value(struct jbuf *b, const json_t *v, int depth)
{
    char tmp[32];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        if (!json_object_size(v)) {
            jb_puts(b, "{}");
            break;
        }
        jb_puts(b, "{");
        bool first = true;
        const char *key;
        json_t *val;
        json_object_foreach((json_t *)v, key, val) {
            if (!first)
                jb_puts(b, ",");
            first = false;
            jb_indent(b, depth + 1);
            jb_string(b, key, strlen(key));
            jb_puts(b, ": ");
            jb_value(b, val, depth + 1);
        }
        jb_indent(b, depth);
        jb_puts(b, "}");
        break;
    }
    case JSON_ARRAY: {
        if (!json_array_size(v)) {
            jb_puts(b, "[]");
            break;
        }
        jb_puts(b, "[");
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i)
                jb_puts(b, ",");
            jb_indent(b, depth + 1);
            jb_value(b, json_array_get(v, i), depth + 1);
        }
        jb_indent(b, depth);
        jb_puts(b, "]");
        break;
    }
    case JSON_STRING:
        jb_string(b, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER:
        snprintf(tmp, sizeof tmp, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        jb_puts(b, tmp);
        break;
    case JSON_REAL:
        jb_real(b, json_real_value(v));
        break;
    case JSON_TRUE: jb_puts(b, "true"); break;
    case JSON_FALSE: jb_puts(b, "false"); break;
    case JSON_NULL: jb_puts(b, "null"); break;
    }
}

int ms__json_render(const json_t *v, bool newline, char **out, size_t *len)
{
    struct jbuf b = { 0 };
    jb_value(&b, v, 0);
    if (newline)
        jb_puts(&b, "\n");
    if (b.oom || !b.p) {
        ms_free(b.p);
        *out = NULL;
        return ms_error(MS_ENOMEM, "out of memory");
    }
    *out = b.p;
    if (len)
        *len = b.len;
    return 0;
}
