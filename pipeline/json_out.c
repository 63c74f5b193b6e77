/*
 * json_out.c - JSON text the way Python's json.dumps(indent=2) writes it, for
 * the output config.json and `mergestream plan --json` (declared in plan_impl.h).
 */
#include <assert.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_str.h"
#include "plan_impl.h"

static void jb_indent(struct ms_strbuf *b, int depth)
{
    ms_strbuf_add(b, "\n", 1);
    for (int i = 0; i < depth; i++)
        ms_strbuf_add(b, "  ", 2);
}

static void jb_string(struct ms_strbuf *b, const char *s, size_t n)
{
    char tmp[16];
    ms_strbuf_add(b, "\"", 1);
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t k = ms_utf8_decode(u + i, n - i, &cp);
        assert(k > 0); /* jansson keeps strings valid UTF-8 */
        i += k;
        switch (cp) {
        case '"': ms_strbuf_addstr(b, "\\\""); continue;
        case '\\': ms_strbuf_addstr(b, "\\\\"); continue;
        case '\n': ms_strbuf_addstr(b, "\\n"); continue;
        case '\r': ms_strbuf_addstr(b, "\\r"); continue;
        case '\t': ms_strbuf_addstr(b, "\\t"); continue;
        case '\b': ms_strbuf_addstr(b, "\\b"); continue;
        case '\f': ms_strbuf_addstr(b, "\\f"); continue;
        default: break;
        }
        /* Python escapes all but ' '..'~' (ensure_ascii): DEL (0x7f) too. */
        if (cp < 0x20 || (cp >= 0x7f && cp < 0x10000)) {
            snprintf(tmp, sizeof tmp, "\\u%04x", (unsigned)cp);
            ms_strbuf_addstr(b, tmp);
        } else if (cp >= 0x10000) {
            uint32_t v = cp - 0x10000;
            snprintf(tmp, sizeof tmp, "\\u%04x\\u%04x", (unsigned)(0xd800 + (v >> 10)),
                     (unsigned)(0xdc00 + (v & 0x3ff)));
            ms_strbuf_addstr(b, tmp);
        } else {
            char c = (char)cp;
            ms_strbuf_add(b, &c, 1);
        }
    }
    ms_strbuf_add(b, "\"", 1);
}

/*
 * Python's float repr: the shortest digit string that reads back to v, written
 * positionally when the decimal exponent is in [-4, 16) (with ".0" for whole
 * numbers), else in scientific notation with at least two exponent digits.
 */
static void jb_real(struct ms_strbuf *b, double v)
{
    char sci[40], out[64];
    if (!isfinite(v)) {
        ms_strbuf_addstr(b, isnan(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity");
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
    ms_strbuf_addstr(b, out);
}

static void jb_value(struct ms_strbuf *b, const json_t *v, int depth)
{
    char tmp[32];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        if (!json_object_size(v)) {
            ms_strbuf_addstr(b, "{}");
            break;
        }
        ms_strbuf_addstr(b, "{");
        bool first = true;
        const char *key;
        json_t *val;
        json_object_foreach((json_t *)v, key, val) {
            if (!first)
                ms_strbuf_addstr(b, ",");
            first = false;
            jb_indent(b, depth + 1);
            jb_string(b, key, strlen(key));
            ms_strbuf_addstr(b, ": ");
            jb_value(b, val, depth + 1);
        }
        jb_indent(b, depth);
        ms_strbuf_addstr(b, "}");
        break;
    }
    case JSON_ARRAY: {
        if (!json_array_size(v)) {
            ms_strbuf_addstr(b, "[]");
            break;
        }
        ms_strbuf_addstr(b, "[");
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i)
                ms_strbuf_addstr(b, ",");
            jb_indent(b, depth + 1);
            jb_value(b, json_array_get(v, i), depth + 1);
        }
        jb_indent(b, depth);
        ms_strbuf_addstr(b, "]");
        break;
    }
    case JSON_STRING:
        jb_string(b, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER:
        snprintf(tmp, sizeof tmp, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        ms_strbuf_addstr(b, tmp);
        break;
    case JSON_REAL:
        jb_real(b, json_real_value(v));
        break;
    case JSON_TRUE: ms_strbuf_addstr(b, "true"); break;
    case JSON_FALSE: ms_strbuf_addstr(b, "false"); break;
    case JSON_NULL: ms_strbuf_addstr(b, "null"); break;
    }
}

int ms__json_render(const json_t *v, bool newline, char **out, size_t *len)
{
    struct ms_strbuf b = { 0 };
    jb_value(&b, v, 0);
    if (newline)
        ms_strbuf_addstr(&b, "\n");
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
