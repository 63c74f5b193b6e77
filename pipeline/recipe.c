/*
 * recipe.c - mergekit YAML recipes (ms_recipe.h, mergekit-spec.md section 1).
 *
 * libyaml's document API builds a node tree that keeps each node's start mark;
 * we walk it once into struct ms_recipe. mergekit reads recipes with PyYAML's
 * yaml.safe_load (YAML 1.1) and validates them with pydantic, so plain scalars
 * are resolved here with YAML 1.1's rules (booleans yes/no/on/off, octal 012,
 * floats need a dot, "1e-5" is a string) and then converted as pydantic would
 * (numeric strings become numbers where a number is expected).
 *
 * Ownership: every string and array hangs off the recipe and is allocated with
 * ms_malloc; structures are zeroed before they are filled, so that
 * ms_recipe_free can release a half-built recipe after any failure.
 */
#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <yaml.h>

#include "ms_common.h"
#include "ms_recipe.h"
#include "ms_str.h"

/* Recipes are a few kilobytes; this only stops a wrong path from eating memory. */
#define RECIPE_MAX_BYTES (16u << 20)

struct rctx {
    const char *name;             /* file name for messages */
    yaml_document_t *doc;
    bool strict;                  /* MS_RECIPE_STRICT: an unknown key is an error */
};

/* ------------------------------------------------------------------ diagnostics */

static struct ms_pos node_pos(const yaml_node_t *n)
{
    return (struct ms_pos){(int)n->start_mark.line + 1, (int)n->start_mark.column + 1};
}

/* Records "NAME:LINE:COL: message" and returns MS_ERECIPE. */
static __attribute__((format(printf, 3, 4))) int rerr(const struct rctx *c, struct ms_pos p,
                                                      const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ms_error(MS_ERECIPE, "%s:%d:%d: %s", c->name, p.line, p.col, msg);
}

/* Converts a failed yaml_parser_load into our code and message. Reader errors
 * (bad encoding, control characters) carry a byte offset instead of a mark. */
static int yaml_fail(const char *name, const yaml_parser_t *p, const char *text, size_t len)
{
    if (p->error == YAML_MEMORY_ERROR)
        return ms_error(MS_ENOMEM, "%s: out of memory while reading yaml", name);
    if (p->error == YAML_READER_ERROR) {
        size_t off = MS_MIN(p->problem_offset, len);
        int line = 1, col = 1;
        for (size_t i = 0; i < off; i++) {
            if (text[i] == '\n') {
                line++;
                col = 1;
            } else if (((unsigned char)text[i] & 0xC0) != 0x80) {
                col++;
            }
        }
        return ms_error(MS_ERECIPE, "%s:%d:%d: %s", name, line, col,
                        p->problem ? p->problem : "cannot read yaml");
    }
    int line = (int)p->problem_mark.line + 1, col = (int)p->problem_mark.column + 1;
    const char *problem = p->problem ? p->problem : "invalid yaml";
    if (p->context)
        return ms_error(MS_ERECIPE, "%s:%d:%d: %s (%s at %d:%d)", name, line, col, problem,
                        p->context, (int)p->context_mark.line + 1,
                        (int)p->context_mark.column + 1);
    return ms_error(MS_ERECIPE, "%s:%d:%d: %s", name, line, col, problem);
}

/* ------------------------------------------------------------------ YAML 1.1 scalars */

/* A scalar as yaml.safe_load constructs it. */
enum yval_kind { YV_NULL, YV_BOOL, YV_INT, YV_FLOAT, YV_STR };

struct yval {
    enum yval_kind kind;
    double num;                   /* YV_BOOL (0 or 1), YV_INT, YV_FLOAT */
    bool int_exact;               /* YV_INT and the value fits in i */
    int64_t i;
    const char *str;              /* the scalar's text, for every kind */
};

static bool is_digit(char ch) { return ch >= '0' && ch <= '9'; }

/* s[*i..] matches [0-9_]* with at least `min` characters; advances *i. */
static bool span_digits(const char *s, size_t *i, size_t min)
{
    size_t start = *i;
    while (is_digit(s[*i]) || s[*i] == '_')
        (*i)++;
    return *i - start >= min;
}

/* Copies s without '_' into buf (NUL-terminated). False if it does not fit. */
static bool strip_underscores(const char *s, char *buf, size_t cap)
{
    size_t n = 0;
    for (; *s; s++) {
        if (*s == '_')
            continue;
        if (n + 1 >= cap)
            return false;
        buf[n++] = *s;
    }
    buf[n] = 0;
    return true;
}

static bool match_null(const char *s)
{
    return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") ||
           !strcmp(s, "NULL");
}

static bool match_bool(const char *s, double *v)
{
    static const char *const yes[] = {"yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"};
    static const char *const no[] = {"no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"};
    for (size_t k = 0; k < MS_ARRAY_LEN(yes); k++) {
        if (!strcmp(s, yes[k])) {
            *v = 1;
            return true;
        }
        if (!strcmp(s, no[k])) {
            *v = 0;
            return true;
        }
    }
    return false;
}

/* Matches ":[0-5]?[0-9]" repeated at least once from s[*i]. */
static bool span_sexagesimal(const char *s, size_t *i)
{
    size_t n = 0;
    while (s[*i] == ':') {
        size_t j = *i + 1;
        if (s[j] >= '0' && s[j] <= '5' && is_digit(s[j + 1]))
            j += 2;
        else if (is_digit(s[j]))
            j += 1;
        else
            return false;
        *i = j;
        n++;
    }
    return n > 0;
}

/*
 * YAML 1.1 int: [-+]?0b[01_]+ | [-+]?0[0-7_]+ | [-+]?(0|[1-9][0-9_]*) |
 * [-+]?0x[0-9a-fA-F_]+ | [-+]?[1-9][0-9_]*(:[0-5]?[0-9])+, valued as PyYAML does.
 */
static bool match_int(const char *s, struct yval *v)
{
    char buf[128];
    if (!strip_underscores(s, buf, sizeof buf))
        return false;
    size_t i = 0;
    bool neg = false;
    if (s[0] == '-' || s[0] == '+') {
        neg = s[0] == '-';
        i = 1;
    }
    const char *d = s + i;
    unsigned base = 10;
    bool sexa = false;
    if (d[0] == '0' && d[1] == 'b') {
        base = 2;
        if (!d[2] || strspn(d + 2, "01_") != strlen(d + 2))
            return false;
    } else if (d[0] == '0' && d[1] == 'x') {
        base = 16;
        if (!d[2] || strspn(d + 2, "0123456789abcdefABCDEF_") != strlen(d + 2))
            return false;
    } else if (d[0] == '0' && d[1]) {
        base = 8;
        if (strspn(d + 1, "01234567_") != strlen(d + 1))
            return false;
    } else if (d[0] == '0') {
        base = 10;
    } else if (d[0] >= '1' && d[0] <= '9') {
        size_t j = 0;
        span_digits(d, &j, 1);
        if (d[j] == ':') {
            if (!span_sexagesimal(d, &j))
                return false;
            sexa = true;
        }
        if (d[j])
            return false;
    } else {
        return false;
    }

    /* Value: digits after the sign and prefix, underscores removed. */
    const char *p = buf + (buf[0] == '-' || buf[0] == '+');
    if (base == 2 || base == 16)
        p += 2;
    if (!*p)
        return false; /* "0b_": PyYAML's int() would raise; leave it a string */
    uint64_t acc = 0, part = 0;
    double dacc = 0, dpart = 0;
    bool exact = true;
    for (; *p; p++) {
        if (sexa && *p == ':') {
            dacc = dacc * 60 + dpart;
            if (acc > (UINT64_MAX - part) / 60)
                exact = false;
            acc = acc * 60 + part;
            part = 0;
            dpart = 0;
            continue;
        }
        unsigned dig = is_digit(*p) ? (unsigned)(*p - '0') : (unsigned)((*p | 0x20) - 'a' + 10);
        if (part > (UINT64_MAX - dig) / base)
            exact = false;
        part = part * base + dig;
        dpart = dpart * base + dig;
    }
    if (sexa) {
        dacc = dacc * 60 + dpart;
        if (acc > (UINT64_MAX - part) / 60)
            exact = false;
        acc = acc * 60 + part;
    } else {
        acc = part;
        dacc = dpart;
    }
    v->kind = YV_INT;
    v->num = neg ? -dacc : dacc;
    v->int_exact = exact && acc <= (uint64_t)INT64_MAX;
    v->i = v->int_exact ? (neg ? -(int64_t)acc : (int64_t)acc) : 0;
    if (exact)
        v->num = neg ? -(double)acc : (double)acc; /* correctly rounded, like Python's float(int) */
    else if (base == 10 && !sexa)
        v->num = strtod(buf, NULL); /* beyond 64 bits; still correctly rounded */
    return true;
}

/*
 * YAML 1.1 float as PyYAML resolves it:
 * [-+]?[0-9][0-9_]*\.[0-9_]*([eE][-+][0-9]+)? | \.[0-9][0-9_]*([eE][-+][0-9]+)? |
 * [-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]* | [-+]?\.(inf|Inf|INF) | \.(nan|NaN|NAN)
 */
static bool match_float(const char *s, struct yval *v)
{
    size_t i = 0;
    bool neg = false, signed_ = false;
    if (s[0] == '-' || s[0] == '+') {
        neg = s[0] == '-';
        signed_ = true;
        i = 1;
    }
    if (s[i] == '.' && (!strcmp(s + i + 1, "inf") || !strcmp(s + i + 1, "Inf") ||
                        !strcmp(s + i + 1, "INF"))) {
        v->kind = YV_FLOAT;
        v->num = neg ? -INFINITY : INFINITY;
        return true;
    }
    if (!signed_ && (!strcmp(s, ".nan") || !strcmp(s, ".NaN") || !strcmp(s, ".NAN"))) {
        v->kind = YV_FLOAT;
        v->num = NAN;
        return true;
    }
    bool sexa = false;
    if (is_digit(s[i])) {
        span_digits(s, &i, 1);
        if (s[i] == ':') {
            if (!span_sexagesimal(s, &i))
                return false;
            sexa = true;
        }
        if (s[i] != '.')
            return false;
        i++;
        span_digits(s, &i, 0);
    } else if (s[i] == '.' && !signed_ && is_digit(s[i + 1])) {
        i++;
        span_digits(s, &i, 1);
    } else {
        return false;
    }
    if (!sexa && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (s[i] != '-' && s[i] != '+')
            return false;
        i++;
        size_t j = i;
        while (is_digit(s[i]))
            i++;
        if (i == j)
            return false;
    }
    if (s[i])
        return false;

    char buf[128];
    if (!strip_underscores(s, buf, sizeof buf))
        return false;
    v->kind = YV_FLOAT;
    if (!sexa) {
        v->num = strtod(buf, NULL);
        return true;
    }
    /* Sexagesimal: every ':'-separated part in base 60, the last with a fraction. */
    double acc = 0;
    char *p = buf + signed_;
    for (;;) {
        char *end;
        double part = strtod(p, &end);
        acc = acc * 60 + part;
        if (*end != ':')
            break;
        p = end + 1;
    }
    v->num = neg ? -acc : acc;
    return true;
}

/*
 * Resolves scalar node n as yaml.safe_load would: quoted scalars are strings,
 * plain ones are tried as null, bool, int and float, in that order. Explicit
 * core tags force their type (libyaml gives an explicit !!str on a plain
 * scalar the default tag, so that one case resolves implicitly). Other tags are
 * errors, as safe_load has no constructor for them.
 */
static int yval_resolve(const struct rctx *c, const yaml_node_t *n, struct yval *v)
{
    assert(n->type == YAML_SCALAR_NODE);
    const char *s = (const char *)n->data.scalar.value;
    const char *tag = (const char *)n->tag;
    bool plain = n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
    memset(v, 0, sizeof *v);
    v->str = s;
    v->kind = YV_STR;
    if (strlen(s) != n->data.scalar.length)
        return rerr(c, node_pos(n), "NUL characters are not supported in values");

    enum yval_kind want;
    if (!tag || !strcmp(tag, YAML_STR_TAG)) {
        if (!plain)
            return 0;
        want = YV_STR;
    } else if (!strcmp(tag, YAML_NULL_TAG)) {
        want = YV_NULL;
    } else if (!strcmp(tag, YAML_BOOL_TAG)) {
        want = YV_BOOL;
    } else if (!strcmp(tag, YAML_INT_TAG)) {
        want = YV_INT;
    } else if (!strcmp(tag, YAML_FLOAT_TAG)) {
        want = YV_FLOAT;
    } else {
        return rerr(c, node_pos(n), "unsupported yaml tag '%s'", tag);
    }

    if (match_null(s))
        v->kind = YV_NULL;
    else if (match_bool(s, &v->num))
        v->kind = YV_BOOL;
    else if (!match_int(s, v) && !match_float(s, v))
        v->kind = YV_STR;

    if (want == YV_STR || want == v->kind)
        return 0;
    if (want == YV_FLOAT && v->kind == YV_INT) {
        v->kind = YV_FLOAT;
        return 0;
    }
    return rerr(c, node_pos(n), "'%s' is not a valid %s", s, tag);
}

/*
 * pydantic's str -> float conversion, for strings such as "1e-5" that YAML 1.1
 * leaves as strings: surrounding whitespace, a decimal number with an optional
 * exponent, or inf/infinity/nan in any case. Hexadecimal is refused (strtod
 * would take it). Assumes the C locale's decimal point.
 */
static bool numeric_string(const char *s, double *out)
{
    char buf[128];
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r'))
        n--;
    if (!n || n >= sizeof buf)
        return false;
    memcpy(buf, s, n);
    buf[n] = 0;

    size_t i = (buf[0] == '-' || buf[0] == '+');
    const char *w = buf + i;
    bool word = !strcasecmp(w, "inf") || !strcasecmp(w, "infinity") || !strcasecmp(w, "nan");
    if (!word) {
        size_t digits = 0;
        while (is_digit(buf[i])) {
            i++;
            digits++;
        }
        if (buf[i] == '.') {
            i++;
            while (is_digit(buf[i])) {
                i++;
                digits++;
            }
        }
        if (!digits)
            return false;
        if (buf[i] == 'e' || buf[i] == 'E') {
            i++;
            if (buf[i] == '-' || buf[i] == '+')
                i++;
            size_t j = i;
            while (is_digit(buf[i]))
                i++;
            if (i == j)
                return false;
        }
        if (buf[i])
            return false;
    }
    char *end;
    *out = strtod(buf, &end);
    return *end == 0;
}

/* True for a scalar that safe_load would construct as None. */
static bool node_is_null(const yaml_node_t *n)
{
    if (n->type != YAML_SCALAR_NODE)
        return false;
    const char *tag = (const char *)n->tag;
    if (tag && !strcmp(tag, YAML_NULL_TAG))
        return true;
    return n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE && (!tag || !strcmp(tag, YAML_STR_TAG)) &&
           match_null((const char *)n->data.scalar.value);
}

static const char *node_kind_name(const yaml_node_t *n)
{
    switch (n->type) {
    case YAML_SEQUENCE_NODE: return "a list";
    case YAML_MAPPING_NODE: return "a mapping";
    default: return "a scalar";
    }
}

/* ------------------------------------------------------------------ mappings */

static yaml_node_t *get_node(const struct rctx *c, int id)
{
    yaml_node_t *n = yaml_document_get_node(c->doc, id);
    assert(n);
    return n;
}

static size_t seq_len(const yaml_node_t *n)
{
    return (size_t)(n->data.sequence.items.top - n->data.sequence.items.start);
}

static size_t map_len(const yaml_node_t *n)
{
    return (size_t)(n->data.mapping.pairs.top - n->data.mapping.pairs.start);
}

static const char *key_text(const struct rctx *c, const yaml_node_pair_t *pair)
{
    return (const char *)get_node(c, pair->key)->data.scalar.value;
}

/*
 * Checks that map is a mapping whose keys are distinct scalars, and warns about
 * keys not in `known` (NULL-terminated; NULL means any key is known). PyYAML
 * would keep the last of duplicate keys silently; a duplicate is nearly always
 * a mistake, so it is an error here. YAML 1.1 merge keys ('<<') are refused.
 */
/*
 * Keys seen so far in a mapping, for the duplicate check: a linear scan for small
 * mappings, an open-addressing hash of pair indices for large ones (a recipe with
 * tens of thousands of parameter keys stays linear, not quadratic).
 */
struct key_set {
    size_t *slot;  /* cap entries: pair index + 1, or 0 when empty */
    size_t cap, n; /* cap a power of two, n < cap / 2 */
};

#define KEY_SET_MIN 16 /* below this many keys a linear scan is as fast */

static uint64_t key_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* Records pair index j (key ks) in the table, which has room; returns the index of an
 * earlier pair with the same key, or j. */
static size_t key_set_put(const struct rctx *c, const yaml_node_pair_t *pairs, struct key_set *ks_,
                          size_t j, const char *ks)
{
    size_t mask = ks_->cap - 1;
    for (size_t h = (size_t)key_hash(ks) & mask;; h = (h + 1) & mask) {
        if (!ks_->slot[h]) {
            ks_->slot[h] = j + 1;
            ks_->n++;
            return j;
        }
        if (!strcmp(key_text(c, &pairs[ks_->slot[h] - 1]), ks))
            return ks_->slot[h] - 1;
    }
}

/* Doubles the table (or makes the first one) and re-enters pairs [0, upto). */
static bool key_set_grow(const struct rctx *c, const yaml_node_pair_t *pairs, struct key_set *s,
                         size_t upto)
{
    size_t cap = s->cap ? s->cap * 2 : 4 * KEY_SET_MIN;
    size_t *slot = ms_calloc(cap, sizeof *slot);
    if (!slot)
        return false;
    ms_free(s->slot);
    s->slot = slot;
    s->cap = cap;
    s->n = 0;
    for (size_t j = 0; j < upto; j++)
        key_set_put(c, pairs, s, j, key_text(c, &pairs[j]));
    return true;
}

/*
 * The index (< i) of an earlier pair whose key is ks, else i after recording pair i
 * as seen; SIZE_MAX when out of memory. Pairs are offered in order 0, 1, ...
 */
static size_t dup_find(const struct rctx *c, const yaml_node_pair_t *pairs, size_t i,
                       const char *ks, struct key_set *seen)
{
    if (i < KEY_SET_MIN) {
        for (size_t j = 0; j < i; j++)
            if (!strcmp(key_text(c, &pairs[j]), ks))
                return j;
        return i;
    }
    if ((seen->n + 1) * 2 > seen->cap && !key_set_grow(c, pairs, seen, i))
        return SIZE_MAX;
    return key_set_put(c, pairs, seen, i, ks);
}

static int map_check(const struct rctx *c, const yaml_node_t *map, const char *what,
                     const char *const *known)
{
    if (map->type != YAML_MAPPING_NODE)
        return rerr(c, node_pos(map), "%s must be a mapping, not %s", what, node_kind_name(map));
    if (map->tag && strcmp((const char *)map->tag, YAML_MAP_TAG))
        return rerr(c, node_pos(map), "unsupported yaml tag '%s'", (const char *)map->tag);
    const yaml_node_pair_t *pairs = map->data.mapping.pairs.start;
    size_t n = map_len(map);
    struct key_set seen = { 0 };
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        const yaml_node_t *k = get_node(c, pairs[i].key);
        if (k->type != YAML_SCALAR_NODE) {
            rc = rerr(c, node_pos(k), "keys of %s must be strings", what);
            goto out;
        }
        const char *ks = (const char *)k->data.scalar.value;
        if (strlen(ks) != k->data.scalar.length) {
            rc = rerr(c, node_pos(k), "NUL characters are not supported in keys");
            goto out;
        }
        if (k->data.scalar.style == YAML_PLAIN_SCALAR_STYLE && !strcmp(ks, "<<")) {
            rc = rerr(c, node_pos(k), "yaml merge keys ('<<') are not supported");
            goto out;
        }
        size_t j = dup_find(c, pairs, i, ks, &seen);
        if (j == SIZE_MAX) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", c->name);
            goto out;
        }
        if (j < i) {
            struct ms_pos first = node_pos(get_node(c, pairs[j].key));
            rc = rerr(c, node_pos(k), "duplicate key '%s' (first at %d:%d)", ks, first.line,
                      first.col);
            goto out;
        }
        if (!known)
            continue;
        bool ok = false;
        for (const char *const *kn = known; *kn && !ok; kn++)
            ok = !strcmp(*kn, ks);
        /* mergekit-multi's `name:` of a document: known, but never suggested for a typo. */
        if (!ok && map == yaml_document_get_root_node(c->doc) && !strcmp(ks, "name"))
            ok = true;
        if (!ok) {
            struct ms_pos p = node_pos(k);
            size_t nk = 0;
            while (known[nk])
                nk++;
            const char *near = ms_str_closest(ks, known, nk);
            if (c->strict) {
                rc = rerr(c, p, "unknown key '%s'%s%s%s", ks, near ? " (did you mean '" : "",
                          near ? near : "", near ? "'?)" : "");
                goto out;
            }
            ms_log_warn("%s:%d:%d: unknown key '%s'%s%s%s", c->name, p.line, p.col, ks,
                        near ? " (did you mean '" : "", near ? near : "", near ? "'?)" : "");
        }
    }
out:
    ms_free(seen.slot);
    return rc;
}

/* The value of `key` in a checked mapping, or NULL when the key is absent or its
 * value is null (pydantic's Optional fields treat both alike). *key_pos, when
 * given, receives the key's position if the key is present. */
static yaml_node_t *map_get(const struct rctx *c, const yaml_node_t *map, const char *key,
                            struct ms_pos *key_pos)
{
    assert(map->type == YAML_MAPPING_NODE);
    const yaml_node_pair_t *pairs = map->data.mapping.pairs.start;
    for (size_t i = 0; i < map_len(map); i++) {
        if (strcmp(key_text(c, &pairs[i]), key))
            continue;
        if (key_pos)
            *key_pos = node_pos(get_node(c, pairs[i].key));
        yaml_node_t *v = get_node(c, pairs[i].value);
        return node_is_null(v) ? NULL : v;
    }
    return NULL;
}

/* ------------------------------------------------------------------ typed values */

/* A string field (pydantic str: numbers and booleans are not strings). *out stays
 * NULL when n is NULL. */
static int string_parse(const struct rctx *c, const yaml_node_t *n, const char *what, char **out,
                        struct ms_pos *pos)
{
    struct yval v;
    int rc;
    assert(!*out);
    if (!n)
        return 0;
    if (pos)
        *pos = node_pos(n);
    if (n->type != YAML_SCALAR_NODE)
        return rerr(c, node_pos(n), "%s must be a string, not %s", what, node_kind_name(n));
    if ((rc = yval_resolve(c, n, &v)) < 0)
        return rc;
    if (v.kind != YV_STR)
        return rerr(c, node_pos(n), "%s must be a string, not '%s'", what, v.str);
    *out = ms_strndup(v.str, n->data.scalar.length);
    if (!*out)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    return 0;
}

/* A number where pydantic expects a float: YAML int, float or bool, or a numeric
 * string. `what` names the value in messages. */
static int number_parse(const struct rctx *c, const yaml_node_t *n, const char *what, double *out)
{
    struct yval v;
    int rc;
    if (n->type != YAML_SCALAR_NODE)
        return rerr(c, node_pos(n), "%s must be a number, not %s", what, node_kind_name(n));
    if ((rc = yval_resolve(c, n, &v)) < 0)
        return rc;
    switch (v.kind) {
    case YV_NULL: return rerr(c, node_pos(n), "%s has no value", what);
    case YV_BOOL:
    case YV_INT:
    case YV_FLOAT: *out = v.num; return 0;
    case YV_STR:
        if (numeric_string(v.str, out))
            return 0;
        return rerr(c, node_pos(n), "%s must be a number, not '%s'", what, v.str);
    }
    assert(0);
    return MS_ERECIPE;
}

/* An integer where pydantic expects an int: YAML int, a float with no fraction,
 * or a string of decimal digits. */
static bool integer_get(const struct rctx *c, const yaml_node_t *n, int64_t *out)
{
    struct yval v;
    if (n->type != YAML_SCALAR_NODE || yval_resolve(c, n, &v) < 0)
        return false;
    if (v.kind == YV_INT && v.int_exact) {
        *out = v.i;
        return true;
    }
    double d;
    if (v.kind == YV_FLOAT)
        d = v.num;
    else if (v.kind == YV_STR && strspn(v.str, "+-0123456789") == strlen(v.str) &&
             numeric_string(v.str, &d))
        ;
    else
        return false;
    if (!(d == floor(d)) || fabs(d) > 9007199254740992.0)
        return false;
    *out = (int64_t)d;
    return true;
}

/* ------------------------------------------------------------------ model references */

/* Splits "path@revision" (mergekit's ModelPath): at most one '@'. */
static int modelpath_split(const struct rctx *c, const yaml_node_t *n, const char *s, size_t len,
                           char **path, char **rev)
{
    const char *at = memchr(s, '@', len);
    if (at && memchr(at + 1, '@', len - (size_t)(at + 1 - s)))
        return rerr(c, node_pos(n), "model path '%.*s' has more than one '@'", (int)len, s);
    size_t plen = at ? (size_t)(at - s) : len;
    if (!plen)
        return rerr(c, node_pos(n), "model path '%.*s' is empty", (int)len, s);
    *path = ms_strndup(s, plen);
    if (!*path)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    if (at) {
        *rev = ms_strndup(at + 1, len - plen - 1);
        if (!*rev)
            return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    }
    return 0;
}

/* mergekit's ModelPath: a "path@revision" string or a {path, revision} mapping. */
static int modelpath_parse(const struct rctx *c, const yaml_node_t *n, const char *what,
                           char **path, char **rev)
{
    static const char *const keys[] = {"path", "revision", NULL};
    struct yval v;
    int rc;
    if (n->type == YAML_MAPPING_NODE) {
        if ((rc = map_check(c, n, what, keys)) < 0)
            return rc;
        const yaml_node_t *p = map_get(c, n, "path", NULL);
        if (!p)
            return rerr(c, node_pos(n), "%s: missing 'path'", what);
        if ((rc = string_parse(c, p, "path", path, NULL)) < 0)
            return rc;
        if (!**path)
            return rerr(c, node_pos(p), "%s: path is empty", what);
        return string_parse(c, map_get(c, n, "revision", NULL), "revision", rev, NULL);
    }
    if (n->type != YAML_SCALAR_NODE)
        return rerr(c, node_pos(n), "%s must be a string or a mapping, not %s", what,
                    node_kind_name(n));
    if ((rc = yval_resolve(c, n, &v)) < 0)
        return rc;
    if (v.kind != YV_STR)
        return rerr(c, node_pos(n), "%s must be a string, not '%s'", what, v.str);
    return modelpath_split(c, n, v.str, n->data.scalar.length, path, rev);
}

/* A model reference (see struct ms_modelref). n is not NULL. */
static int modelref_parse(const struct rctx *c, const yaml_node_t *n, const char *what,
                          struct ms_modelref *out)
{
    static const char *const keys[] = {"model", "lora", "override_architecture", NULL};
    struct yval v;
    int rc;
    out->pos = node_pos(n);
    if (n->type == YAML_MAPPING_NODE) {
        if ((rc = map_check(c, n, what, keys)) < 0)
            return rc;
        const yaml_node_t *m = map_get(c, n, "model", NULL);
        if (!m)
            return rerr(c, node_pos(n), "%s: missing 'model'", what);
        if ((rc = modelpath_parse(c, m, "model", &out->path, &out->revision)) < 0)
            return rc;
        const yaml_node_t *l = map_get(c, n, "lora", NULL);
        if (l && (rc = modelpath_parse(c, l, "lora", &out->lora, &out->lora_revision)) < 0)
            return rc;
        return string_parse(c, map_get(c, n, "override_architecture", NULL),
                            "override_architecture", &out->override_architecture, NULL);
    }
    if (n->type != YAML_SCALAR_NODE)
        return rerr(c, node_pos(n), "%s must be a string or a mapping, not %s", what,
                    node_kind_name(n));
    if ((rc = yval_resolve(c, n, &v)) < 0)
        return rc;
    if (v.kind != YV_STR)
        return rerr(c, node_pos(n), "%s must be a string, not '%s'", what, v.str);
    /* mergekit cuts the string at '+' first (model+lora), then each part at '@'. */
    const char *s = v.str;
    size_t len = n->data.scalar.length;
    const char *plus = memchr(s, '+', len);
    if (plus && memchr(plus + 1, '+', len - (size_t)(plus + 1 - s)))
        return rerr(c, node_pos(n),
                    "cannot parse model reference '%s': more than one '+' (write "
                    "{model: ..., lora: ...} instead)",
                    s);
    size_t mlen = plus ? (size_t)(plus - s) : len;
    if ((rc = modelpath_split(c, n, s, mlen, &out->path, &out->revision)) < 0)
        return rc;
    if (plus)
        return modelpath_split(c, n, plus + 1, len - mlen - 1, &out->lora, &out->lora_revision);
    return 0;
}

/* ------------------------------------------------------------------ settings */

/* A gradient: a non-empty list of numbers. */
static int gradient_parse(const struct rctx *c, const yaml_node_t *n, const char *pname,
                          struct ms_setting *out)
{
    char what[160];
    size_t len = seq_len(n);
    int rc;
    if (!len)
        return rerr(c, node_pos(n), "parameter '%s': empty list", pname);
    out->kind = MS_SET_GRADIENT;
    out->grad = ms_calloc(len, sizeof *out->grad);
    if (!out->grad)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    out->ngrad = len;
    snprintf(what, sizeof what, "parameter '%s': gradient entry", pname);
    for (size_t i = 0; i < len; i++) {
        const yaml_node_t *e = get_node(c, n->data.sequence.items.start[i]);
        if ((rc = number_parse(c, e, what, &out->grad[i])) < 0)
            return rc;
    }
    return 0;
}

/* A number or a gradient (the `value` of a conditional entry, or a whole setting
 * that is not a conditional list). */
static int scalar_or_gradient_parse(const struct rctx *c, const yaml_node_t *n, const char *pname,
                                    struct ms_setting *out)
{
    char what[160];
    out->pos = node_pos(n);
    if (n->type == YAML_SEQUENCE_NODE)
        return gradient_parse(c, n, pname, out);
    snprintf(what, sizeof what, "parameter '%s'", pname);
    out->kind = MS_SET_SCALAR;
    return number_parse(c, n, what, &out->scalar);
}

/* One {filter?, value} entry of a conditional list. */
static int cond_parse(const struct rctx *c, const yaml_node_t *n, const char *pname,
                      struct ms_cond *out)
{
    static const char *const keys[] = {"filter", "value", NULL};
    char what[160];
    int rc;
    snprintf(what, sizeof what, "parameter '%s': conditional entry", pname);
    if ((rc = map_check(c, n, what, keys)) < 0)
        return rc;
    if ((rc = string_parse(c, map_get(c, n, "filter", NULL), "filter", &out->filter, NULL)) < 0)
        return rc;
    const yaml_node_t *v = map_get(c, n, "value", NULL);
    if (!v)
        return rerr(c, node_pos(n), "parameter '%s': conditional entry has no 'value'", pname);
    if (v->type == YAML_MAPPING_NODE)
        return rerr(c, node_pos(v),
                    "parameter '%s': value must be a number or a list of numbers, not a mapping",
                    pname);
    return scalar_or_gradient_parse(c, v, pname, &out->value);
}

/*
 * A parameter setting (mergekit-spec.md 1.5): a number, a list of numbers, or a
 * list of {filter?, value} mappings. A bare {filter, value} mapping passes
 * mergekit's validation but fails when evaluated, so it is refused here.
 */
static int setting_parse(const struct rctx *c, const yaml_node_t *n, const char *pname,
                         struct ms_setting *out)
{
    int rc;
    out->pos = node_pos(n);
    if (n->type == YAML_MAPPING_NODE)
        return rerr(c, node_pos(n),
                    "parameter '%s': a {filter, value} mapping must be inside a list "
                    "(write '- filter: ...' / '  value: ...')",
                    pname);
    if (n->type != YAML_SEQUENCE_NODE || !seq_len(n) ||
        get_node(c, n->data.sequence.items.start[0])->type != YAML_MAPPING_NODE)
        return scalar_or_gradient_parse(c, n, pname, out);

    size_t len = seq_len(n);
    out->kind = MS_SET_COND;
    out->cond = ms_calloc(len, sizeof *out->cond);
    if (!out->cond)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    out->ncond = len;
    for (size_t i = 0; i < len; i++) {
        const yaml_node_t *e = get_node(c, n->data.sequence.items.start[i]);
        if (e->type != YAML_MAPPING_NODE)
            return rerr(c, node_pos(e),
                        "parameter '%s': entries of a conditional list must be {filter, value} "
                        "mappings",
                        pname);
        if ((rc = cond_parse(c, e, pname, &out->cond[i])) < 0)
            return rc;
    }
    return 0;
}

/* A `parameters:` mapping; n may be NULL (absent or null). */
static int params_parse(const struct rctx *c, const yaml_node_t *n, struct ms_params *out)
{
    int rc;
    if (!n)
        return 0;
    if ((rc = map_check(c, n, "parameters", NULL)) < 0)
        return rc;
    size_t len = map_len(n);
    if (!len)
        return 0;
    out->v = ms_calloc(len, sizeof *out->v);
    if (!out->v)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    out->n = len;
    for (size_t i = 0; i < len; i++) {
        const yaml_node_pair_t *pair = &n->data.mapping.pairs.start[i];
        const yaml_node_t *k = get_node(c, pair->key), *v = get_node(c, pair->value);
        struct ms_param *p = &out->v[i];
        p->pos = node_pos(k);
        p->name = ms_strndup((const char *)k->data.scalar.value, k->data.scalar.length);
        if (!p->name)
            return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
        if (node_is_null(v))
            return rerr(c, node_pos(v), "parameter '%s' has no value", p->name);
        if ((rc = setting_parse(c, v, p->name, &p->value)) < 0)
            return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------ sources and slices */

/* An entry of `models` (in_slice false) or of a slice's `sources` (in_slice true,
 * where layer_range is required). */
static int source_parse(const struct rctx *c, const yaml_node_t *n, bool in_slice,
                        struct ms_source *out)
{
    static const char *const model_keys[] = {"model", "parameters", NULL};
    static const char *const source_keys[] = {"model", "layer_range", "parameters", NULL};
    const char *what = in_slice ? "a source" : "an entry of models";
    int rc;
    out->pos = node_pos(n);
    if ((rc = map_check(c, n, what, in_slice ? source_keys : model_keys)) < 0)
        return rc;
    const yaml_node_t *m = map_get(c, n, "model", NULL);
    if (!m)
        return rerr(c, node_pos(n), "%s needs a 'model'", what);
    if ((rc = modelref_parse(c, m, "model", &out->model)) < 0)
        return rc;
    if (in_slice) {
        const yaml_node_t *lr = map_get(c, n, "layer_range", NULL);
        if (!lr)
            return rerr(c, node_pos(n), "a source needs a 'layer_range'");
        if (lr->type != YAML_SEQUENCE_NODE || seq_len(lr) != 2)
            return rerr(c, node_pos(lr), "layer_range must be a list of two integers");
        for (int i = 0; i < 2; i++) {
            const yaml_node_t *e = get_node(c, lr->data.sequence.items.start[i]);
            if (!integer_get(c, e, &out->layer_range[i]))
                return rerr(c, node_pos(e), "layer_range must be a list of two integers");
        }
        if (out->layer_range[0] < 0 || out->layer_range[1] < out->layer_range[0])
            return rerr(c, node_pos(lr),
                        "layer_range [%lld, %lld] is not a range [start, end) with 0 <= start "
                        "<= end",
                        (long long)out->layer_range[0], (long long)out->layer_range[1]);
        out->has_range = true;
    }
    return params_parse(c, map_get(c, n, "parameters", NULL), &out->params);
}

/* A list of sources; *out and *count are set before the entries are filled. */
static int sources_parse(const struct rctx *c, const yaml_node_t *n, bool in_slice,
                         const char *what, struct ms_source **out, size_t *count)
{
    int rc;
    if (n->type != YAML_SEQUENCE_NODE)
        return rerr(c, node_pos(n), "%s must be a list, not %s", what, node_kind_name(n));
    size_t len = seq_len(n);
    if (!len)
        return 0;
    *out = ms_calloc(len, sizeof **out);
    if (!*out)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    *count = len;
    for (size_t i = 0; i < len; i++) {
        const yaml_node_t *e = get_node(c, n->data.sequence.items.start[i]);
        if ((rc = source_parse(c, e, in_slice, &(*out)[i])) < 0)
            return rc;
    }
    return 0;
}

static int slice_parse(const struct rctx *c, const yaml_node_t *n, struct ms_slice *out)
{
    static const char *const keys[] = {"sources", "base_model", "parameters", "residual_weight",
                                       NULL};
    int rc;
    out->pos = node_pos(n);
    if ((rc = map_check(c, n, "a slice", keys)) < 0)
        return rc;
    const yaml_node_t *s = map_get(c, n, "sources", NULL);
    if (!s)
        return rerr(c, node_pos(n), "a slice needs 'sources'");
    if ((rc = sources_parse(c, s, true, "sources", &out->sources, &out->nsources)) < 0)
        return rc;
    if (!out->nsources)
        return rerr(c, node_pos(s), "sources must not be empty");
    const yaml_node_t *b = map_get(c, n, "base_model", NULL);
    if (b && (rc = modelref_parse(c, b, "base_model", &out->base_model)) < 0)
        return rc;
    /* residual_weight is an Optional[float] that mergekit never reads. */
    const yaml_node_t *rw = map_get(c, n, "residual_weight", NULL);
    double ignored;
    if (rw && (rc = number_parse(c, rw, "residual_weight", &ignored)) < 0)
        return rc;
    return params_parse(c, map_get(c, n, "parameters", NULL), &out->params);
}

/* A list of slices; *out and *count are set before the entries are filled. */
static int slices_parse(const struct rctx *c, const yaml_node_t *n, struct ms_slice **out,
                        size_t *count)
{
    int rc;
    if (n->type != YAML_SEQUENCE_NODE)
        return rerr(c, node_pos(n), "slices must be a list, not %s", node_kind_name(n));
    size_t len = seq_len(n);
    if (!len)
        return 0;
    *out = ms_calloc(len, sizeof **out);
    if (!*out)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    *count = len;
    for (size_t i = 0; i < len; i++) {
        const yaml_node_t *e = get_node(c, n->data.sequence.items.start[i]);
        if ((rc = slice_parse(c, e, &(*out)[i])) < 0)
            return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------ modules */

/* A `modules:` entry as parsed, before it is folded into the recipe. */
struct module_def {
    struct ms_source *models;
    size_t nmodels;
    struct ms_slice *slices;
    size_t nslices;
    struct ms_params params;
};

static void sources_free(struct ms_source *v, size_t n);
static void slices_free(struct ms_slice *v, size_t n);
static void params_fini(struct ms_params *p);
static void setting_fini(struct ms_setting *s);

static int slices_parse(const struct rctx *c, const yaml_node_t *n, struct ms_slice **out,
                        size_t *count);

/* One module's {models | slices, parameters} (mergekit's OutputModuleDefinition). */
static int module_parse(const struct rctx *c, const char *name, const yaml_node_t *n,
                        struct module_def *m)
{
    static const char *const keys[] = { "models", "slices", "parameters", NULL };
    char what[160];
    int rc;
    snprintf(what, sizeof what, "module '%s'", name);
    if ((rc = map_check(c, n, what, keys)) < 0)
        return rc;
    const yaml_node_t *v;
    if ((v = map_get(c, n, "models", NULL)) &&
        (rc = sources_parse(c, v, false, "models", &m->models, &m->nmodels)) < 0)
        return rc;
    if ((v = map_get(c, n, "slices", NULL)) &&
        (rc = slices_parse(c, v, &m->slices, &m->nslices)) < 0)
        return rc;
    if ((m->nmodels > 0) == (m->nslices > 0))
        return rerr(c, node_pos(n),
                    "module '%s' must have either 'models' or 'slices' (one, not "
                    "empty)",
                    name);
    return params_parse(c, map_get(c, n, "parameters", NULL), &m->params);
}

/*
 * Folds module parameter `mp` over global parameter `gp` so that one lookup of
 * the result gives what mergekit's module-then-global lookup gives: a scalar or
 * gradient always answers, so it replaces; a conditional list that matches
 * nothing falls through, so the global value follows as more entries (a scalar
 * or gradient global as one entry without a filter). Takes mp's contents.
 */
static int fold_setting(const struct rctx *c, struct ms_setting *gp, struct ms_setting *mp)
{
    if (mp->kind != MS_SET_COND || gp->kind == MS_SET_NONE) {
        setting_fini(gp);
        *gp = *mp;
        memset(mp, 0, sizeof *mp);
        return 0;
    }
    size_t extra = gp->kind == MS_SET_COND ? gp->ncond : 1;
    struct ms_cond *v = ms_realloc(mp->cond, (mp->ncond + extra) * sizeof *v);
    if (!v)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    mp->cond = v;
    if (gp->kind == MS_SET_COND) {
        memcpy(v + mp->ncond, gp->cond, gp->ncond * sizeof *v);
        ms_free(gp->cond);
    } else {
        memset(&v[mp->ncond], 0, sizeof *v);
        v[mp->ncond].value = *gp;
    }
    mp->ncond += extra;
    mp->pos = gp->pos;
    *gp = *mp;
    memset(mp, 0, sizeof *mp);
    return 0;
}

/* Moves module m into r (as its models or slices) and folds its parameters over
 * the global ones: with one module, the same lookups as mergekit's. */
static int module_fold(const struct rctx *c, struct ms_recipe *r, struct module_def *m)
{
    r->models = m->models;
    r->nmodels = m->nmodels;
    r->slices = m->slices;
    r->nslices = m->nslices;
    m->models = NULL;
    m->slices = NULL;
    m->nmodels = m->nslices = 0;
    for (size_t i = 0; i < m->params.n; i++) {
        struct ms_param *mp = &m->params.v[i];
        struct ms_param *gp = NULL;
        for (size_t j = 0; j < r->params.n && !gp; j++)
            if (!strcmp(r->params.v[j].name, mp->name))
                gp = &r->params.v[j];
        if (!gp) {
            struct ms_param *v = ms_realloc(r->params.v, (r->params.n + 1) * sizeof *v);
            if (!v)
                return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
            r->params.v = v;
            gp = &v[r->params.n++];
            memset(gp, 0, sizeof *gp);
            gp->name = mp->name;
            gp->pos = mp->pos;
            mp->name = NULL;
        }
        int rc = fold_setting(c, &gp->value, &mp->value);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static void module_fini(struct module_def *m)
{
    sources_free(m->models, m->nmodels);
    slices_free(m->slices, m->nslices);
    params_fini(&m->params);
}

/* ------------------------------------------------------------------ the recipe */

/* ------------------------------------------------------------------ tokenizer */

/* A tokenizer.tokens entry's value (mergekit's TokenEmbeddingConfig). */
static int tokemb_parse(const struct rctx *c, const yaml_node_t *n, struct ms_tokemb *t)
{
    static const char *const keys[] = { "source", "force", NULL };
    static const char *const mt_keys[] = { "kind", "model", "token", "token_id", NULL };
    int rc;
    if ((rc = map_check(c, n, "tokenizer token", keys)) < 0)
        return rc;
    const yaml_node_t *f = map_get(c, n, "force", NULL), *s = map_get(c, n, "source", NULL);
    struct yval v;
    if (f) {
        if ((rc = yval_resolve(c, f, &v)) < 0)
            return rc;
        if (v.kind != YV_BOOL)
            return rerr(c, node_pos(f), "force must be true or false, not '%s'", v.str);
        t->force = v.num != 0;
    }
    if (!s)
        return 0;
    const yaml_node_t *kind = s->type == YAML_MAPPING_NODE ? map_get(c, s, "kind", NULL) : NULL;
    if (!kind) {
        t->kind = MS_TOKEMB_MODEL;
        return modelref_parse(c, s, "token source", &t->model);
    }
    char *k = NULL;
    if ((rc = string_parse(c, kind, "kind", &k, NULL)) < 0)
        return rc;
    bool zero = !strcmp(k, "zero"), mt = !strcmp(k, "model_token");
    ms_free(k);
    if (zero) {
        static const char *const z_keys[] = { "kind", NULL };
        t->kind = MS_TOKEMB_ZERO;
        return map_check(c, s, "token source", z_keys);
    }
    if (!mt)
        return rerr(c, node_pos(kind), "token source kind must be 'model_token' or 'zero'");
    t->kind = MS_TOKEMB_MODEL_TOKEN;
    t->src_token_id = -1;
    if ((rc = map_check(c, s, "token source", mt_keys)) < 0)
        return rc;
    const yaml_node_t *m = map_get(c, s, "model", NULL), *tok = map_get(c, s, "token", NULL),
                      *id = map_get(c, s, "token_id", NULL);
    if (!m)
        return rerr(c, node_pos(s), "token source of kind model_token: missing 'model'");
    if ((rc = modelref_parse(c, m, "model", &t->model)) < 0)
        return rc;
    if (!tok == !id)
        return rerr(c, node_pos(s),
                    "token source of kind model_token: give exactly one of "
                    "token and token_id");
    if (id && (!integer_get(c, id, &t->src_token_id) || t->src_token_id < 0))
        return rerr(c, node_pos(id), "token_id must be a non-negative integer");
    return string_parse(c, tok, "token", &t->src_token, NULL);
}

/* A tokenizer source: "union", "base" or a model reference (a string or a mapping);
 * *src is the string, or the reference's path. */
static int toksource_parse(const struct rctx *c, const yaml_node_t *n, const char *what,
                           char **src, struct ms_modelref *ref)
{
    int rc;
    if (n->type == YAML_SCALAR_NODE) {
        if ((rc = string_parse(c, n, what, src, NULL)) < 0)
            return rc;
        if (strcmp(*src, "union") && strcmp(*src, "base") &&
            (rc = modelref_parse(c, n, what, ref)) < 0)
            return rc;
        return 0;
    }
    if ((rc = modelref_parse(c, n, what, ref)) < 0)
        return rc;
    *src = ms_strdup(ref->path);
    return *src ? 0 : ms_error(MS_ENOMEM, "%s: out of memory", c->name);
}

/* The `tokenizer:` mapping (mergekit's TokenizerConfig): source, tokens, pad_to_multiple_of. */
static int tokcfg_parse(const struct rctx *c, const yaml_node_t *n, struct ms_tokcfg *t)
{
    static const char *const keys[] = { "source", "tokens", "pad_to_multiple_of", NULL };
    int rc;
    if ((rc = map_check(c, n, "tokenizer", keys)) < 0)
        return rc;
    const yaml_node_t *s = map_get(c, n, "source", NULL);
    if (s) {
        t->source_pos = node_pos(s);
        if ((rc = toksource_parse(c, s, "tokenizer source", &t->source, &t->source_ref)) < 0)
            return rc;
    } else {
        t->source = ms_strdup("union");
    }
    if (!t->source)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    const yaml_node_t *p = map_get(c, n, "pad_to_multiple_of", &t->pad_pos);
    if (p && (!integer_get(c, p, &t->pad_to_multiple_of) || t->pad_to_multiple_of < 1 ||
              t->pad_to_multiple_of > (1 << 20)))
        return rerr(c, node_pos(p), "pad_to_multiple_of must be an integer from 1 to 1048576");
    const yaml_node_t *toks = map_get(c, n, "tokens", NULL);
    if (!toks)
        return 0;
    if ((rc = map_check(c, toks, "tokenizer tokens", NULL)) < 0)
        return rc;
    size_t nt = map_len(toks);
    t->tokens = ms_calloc(nt ? nt : 1, sizeof *t->tokens);
    if (!t->tokens)
        return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
    const yaml_node_pair_t *pairs = toks->data.mapping.pairs.start;
    for (size_t i = 0; i < nt; i++) {
        struct ms_tokemb *e = &t->tokens[t->ntokens++];
        const yaml_node_t *k = get_node(c, pairs[i].key), *v = get_node(c, pairs[i].value);
        e->pos = node_pos(k);
        e->src_token_id = -1;
        e->token = ms_strndup((const char *)k->data.scalar.value, k->data.scalar.length);
        if (!e->token)
            return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
        if (node_is_null(v))
            continue;
        if ((rc = tokemb_parse(c, v, e)) < 0)
            return rc;
    }
    return 0;
}

/* Whether mapping n has a scalar key `key` (no other check made). */
static bool has_key(const struct rctx *c, const yaml_node_t *n, const char *key)
{
    const yaml_node_pair_t *pairs = n->data.mapping.pairs.start;
    for (size_t i = 0; i < map_len(n); i++) {
        const yaml_node_t *k = get_node(c, pairs[i].key);
        if (k->type == YAML_SCALAR_NODE && !strcmp((const char *)k->data.scalar.value, key))
            return true;
    }
    return false;
}

/*
 * A file without merge_method that another tool reads: says which, instead of
 * "missing 'merge_method'". 0 when it looks like none of them.
 */
static int other_tool(const struct rctx *c, const yaml_node_t *root)
{
    static const struct {
        const char *key, *key2; /* both present (key2 NULL: key alone) */
        const char *what;
    } sig[] = {
        { "experts", NULL,
          "a mergekit-moe config (it has 'experts'): mergestream does not build "
          "mixture-of-experts models; use mergekit-moe" },
        { "gate_mode", NULL,
          "a mergekit-moe config (it has 'gate_mode'): mergestream does not "
          "build mixture-of-experts models; use mergekit-moe" },
        { "genome", "tasks",
          "a mergekit-evolve config (it has 'genome' and 'tasks'): mergestream "
          "does not run evolutionary merge searches; use mergekit-evolve" },
        { "peft_type", NULL,
          "a PEFT adapter config (adapter_config.json), not a recipe; a LoRA is "
          "referenced from a recipe as 'model+lora'" },
        { "architectures", NULL, "a model's config.json, not a merge recipe" },
        { "datasets", NULL,
          "a training config (it has 'datasets', as axolotl's do), not a merge "
          "recipe" },
    };
    if (root->type != YAML_MAPPING_NODE || has_key(c, root, "merge_method"))
        return 0;
    for (size_t i = 0; i < MS_ARRAY_LEN(sig); i++)
        if (has_key(c, root, sig[i].key) && (!sig[i].key2 || has_key(c, root, sig[i].key2)))
            return rerr(c, node_pos(root), "this is %s", sig[i].what);
    return 0;
}

static int root_parse(const struct rctx *c, const yaml_node_t *root, struct ms_recipe *r,
                      struct module_def *module)
{
    static const char *const keys[] = {"merge_method", "models", "slices", "modules",
                                       "base_model", "parameters", "dtype", "out_dtype",
                                       "tokenizer_source", "tokenizer", "chat_template", NULL};
    struct ms_pos kpos_models = {0, 0}, kpos_slices = {0, 0}, kpos_tok = {0, 0};
    const yaml_node_t *n;
    int rc;

    if (!root || node_is_null(root))
        return rerr(c, (struct ms_pos){1, 1}, "recipe is empty");
    if ((rc = other_tool(c, root)) < 0)
        return rc;
    if ((rc = map_check(c, root, "the recipe", keys)) < 0)
        return rc;

    n = map_get(c, root, "merge_method", NULL);
    if (!n)
        return rerr(c, node_pos(root), "missing 'merge_method'");
    if ((rc = string_parse(c, n, "merge_method", &r->merge_method, &r->merge_method_pos)) < 0)
        return rc;

    /* The three forms; a null or empty one counts as absent (pydantic's truthiness). */
    if ((n = map_get(c, root, "models", &kpos_models)) &&
        (rc = sources_parse(c, n, false, "models", &r->models, &r->nmodels)) < 0)
        return rc;
    if ((n = map_get(c, root, "slices", &kpos_slices)) &&
        (rc = slices_parse(c, n, &r->slices, &r->nslices)) < 0)
        return rc;
    if ((n = map_get(c, root, "modules", &r->modules_pos))) {
        /* One module is folded into the recipe below; mergekit's single-module
         * architectures call theirs 'default' (the plan checks the name). */
        if ((rc = map_check(c, n, "modules", NULL)) < 0)
            return rc;
        size_t len = map_len(n);
        const yaml_node_pair_t *pairs = n->data.mapping.pairs.start;
        if (len > 1)
            return rerr(c, node_pos(get_node(c, pairs[1].key)),
                        "modules: more than one module ('%s', '%s'): only multi-module "
                        "architectures (vision-language models) have several, and mergestream "
                        "supports none",
                        key_text(c, &pairs[0]), key_text(c, &pairs[1]));
        if (len == 1) {
            r->has_modules = true;
            r->module_name = ms_strdup(key_text(c, &pairs[0]));
            if (!r->module_name)
                return ms_error(MS_ENOMEM, "%s: out of memory", c->name);
            r->module_pos = node_pos(get_node(c, pairs[0].key));
            const yaml_node_t *mv = get_node(c, pairs[0].value);
            if (node_is_null(mv))
                return rerr(c, node_pos(mv), "module '%s' has no value", r->module_name);
            if ((rc = module_parse(c, r->module_name, mv, module)) < 0)
                return rc;
        }
    }
    int forms = (r->nmodels > 0) + (r->nslices > 0) + r->has_modules;
    if (forms > 1) {
        /* Point at whichever of the given forms comes last in the file. */
        struct ms_pos p = {0, 0};
        const struct ms_pos given[3] = {r->nmodels ? kpos_models : p, r->nslices ? kpos_slices : p,
                                        r->has_modules ? r->modules_pos : p};
        for (int i = 0; i < 3; i++)
            if (given[i].line > p.line || (given[i].line == p.line && given[i].col > p.col))
                p = given[i];
        return rerr(c, p, "only one of 'models', 'slices' or 'modules' may be given");
    }
    if (!forms) {
        struct ms_pos p = kpos_models.line ? kpos_models
                          : kpos_slices.line ? kpos_slices
                          : r->modules_pos.line ? r->modules_pos
                                                : node_pos(root);
        return rerr(c, p, "one of 'models', 'slices' or 'modules' must be given and not empty");
    }

    if ((n = map_get(c, root, "base_model", NULL)) &&
        (rc = modelref_parse(c, n, "base_model", &r->base_model)) < 0)
        return rc;
    if ((rc = params_parse(c, map_get(c, root, "parameters", NULL), &r->params)) < 0)
        return rc;
    if (r->has_modules && (rc = module_fold(c, r, module)) < 0)
        return rc;
    if ((rc = string_parse(c, map_get(c, root, "dtype", NULL), "dtype", &r->dtype,
                           &r->dtype_pos)) < 0)
        return rc;
    if ((rc = string_parse(c, map_get(c, root, "out_dtype", NULL), "out_dtype", &r->out_dtype,
                           &r->out_dtype_pos)) < 0)
        return rc;
    if ((rc = string_parse(c, map_get(c, root, "chat_template", NULL), "chat_template",
                           &r->chat_template, &r->chat_template_pos)) < 0)
        return rc;
    if ((rc = string_parse(c, map_get(c, root, "name", NULL), "name", &r->name, &r->name_pos)) < 0)
        return rc;

    /* tokenizer_source: "union", "base" or a model reference (string or mapping). */
    if ((n = map_get(c, root, "tokenizer_source", NULL))) {
        r->tokenizer_source_pos = node_pos(n);
        if ((rc = toksource_parse(c, n, "tokenizer_source", &r->tokenizer_source,
                                  &r->tokenizer_source_ref)) < 0)
            return rc;
    }
    if ((n = map_get(c, root, "tokenizer", &kpos_tok))) {
        if (n->type != YAML_MAPPING_NODE)
            return rerr(c, node_pos(n), "tokenizer must be a mapping, not %s", node_kind_name(n));
        r->has_tokenizer = true;
        r->tokenizer_pos = kpos_tok;
        if ((rc = tokcfg_parse(c, n, &r->tok)) < 0)
            return rc;
    }
    if (r->has_tokenizer && r->tokenizer_source && *r->tokenizer_source)
        return rerr(c, r->tokenizer_pos, "tokenizer_source and tokenizer cannot both be given");
    return 0;
}

int ms_recipe_parse(const char *name, const char *text, size_t len, struct ms_recipe **out)
{
    return ms_recipe_parse_opts(name, text, len, 0, out);
}

/* Recipes nest a few levels (a conditional gradient under a model's parameters is
 * six); libyaml's scanner slows down quadratically with depth, so a file nested
 * deeper than this is refused before it is loaded. */
#define RECIPE_MAX_DEPTH 64

/*
 * Scans text's events (not building nodes) until the nesting passes
 * RECIPE_MAX_DEPTH (MS_ERECIPE at that node), the end, or a YAML error (0: the
 * load that follows reports it with its position).
 */
static int depth_check(const char *name, const char *text, size_t len)
{
    yaml_parser_t p;
    yaml_event_t ev;
    int depth = 0, rc = 0;
    if (!yaml_parser_initialize(&p))
        return ms_error(MS_ENOMEM, "%s: out of memory", name);
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    for (;;) {
        if (!yaml_parser_parse(&p, &ev))
            break;
        yaml_event_type_t t = ev.type;
        if (t == YAML_SEQUENCE_START_EVENT || t == YAML_MAPPING_START_EVENT) {
            if (++depth > RECIPE_MAX_DEPTH)
                rc = ms_error(MS_ERECIPE, "%s:%d:%d: nested deeper than %d levels; not a recipe",
                              name, (int)ev.start_mark.line + 1, (int)ev.start_mark.column + 1,
                              RECIPE_MAX_DEPTH);
        } else if (t == YAML_SEQUENCE_END_EVENT || t == YAML_MAPPING_END_EVENT) {
            depth--;
        }
        yaml_event_delete(&ev);
        if (rc || t == YAML_STREAM_END_EVENT)
            break;
    }
    yaml_parser_delete(&p);
    return rc;
}

/* A recipe with its own copies of the file name and of text[0..len). */
static struct ms_recipe *recipe_new(const char *name, const char *text, size_t len)
{
    struct ms_recipe *r = ms_calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->path = ms_strdup(name);
    r->text = ms_strndup(text ? text : "", len);
    r->text_len = len;
    if (!r->path || !r->text) {
        ms_recipe_free(r);
        return NULL;
    }
    return r;
}

/*
 * Parses every YAML document of text into *docs (ms_malloc'd array of *ndocs
 * recipes, freed by the caller even on error). Without `multi` a second document
 * is an error, as yaml.safe_load has it. A single document keeps the whole text
 * (the saved mergekit_config.yml is the file verbatim); several keep their own part.
 */
static int parse_docs(const char *name, const char *text, size_t len, unsigned flags, bool multi,
                      struct ms_recipe ***docs, size_t *ndocs)
{
    yaml_parser_t parser;
    yaml_document_t doc;
    bool parser_ok = false, doc_ok = false;
    struct rctx c = { name, &doc, (flags & MS_RECIPE_STRICT) != 0 };
    char *copy = NULL;
    size_t cap = 0;
    int rc = 0;

    *docs = NULL;
    *ndocs = 0;
    copy = ms_strndup(text ? text : "", len); /* libyaml reads it; the caller's may move */
    if (!copy) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", name);
        goto out;
    }
    if ((rc = depth_check(name, copy, len)) < 0)
        goto out;
    if (!yaml_parser_initialize(&parser)) {
        rc = ms_error(MS_ENOMEM, "%s: out of memory", name);
        goto out;
    }
    parser_ok = true;
    yaml_parser_set_input_string(&parser, (const unsigned char *)copy, len);
    for (;;) {
        if (!yaml_parser_load(&parser, &doc)) {
            rc = yaml_fail(name, &parser, copy, len);
            goto out;
        }
        doc_ok = true;
        yaml_node_t *root = yaml_document_get_root_node(&doc);
        if (!root && *ndocs)
            break; /* end of the stream */
        if (multi && *ndocs && node_is_null(root)) {
            /* An empty document (a trailing "---"): nothing to merge. */
            yaml_document_delete(&doc);
            doc_ok = false;
            continue;
        }
        if (*ndocs && !multi) {
            /* safe_load accepts exactly one document. */
            rc = ms_error(MS_ERECIPE, "%s:%d:%d: expected a single yaml document", name,
                          (int)doc.start_mark.line + 1, (int)doc.start_mark.column + 1);
            goto out;
        }
        if (*ndocs == cap) {
            size_t ncap = cap ? cap * 2 : 4;
            struct ms_recipe **nd = ms_realloc(*docs, ncap * sizeof *nd);
            if (!nd) {
                rc = ms_error(MS_ENOMEM, "%s: out of memory", name);
                goto out;
            }
            *docs = nd;
            cap = ncap;
        }
        size_t a = MS_MIN(doc.start_mark.index, len), b = MS_MIN(doc.end_mark.index, len);
        if (b - a >= 3 && !memcmp(text + a, "---", 3) &&
            (b - a == 3 || text[a + 3] == '\n' || text[a + 3] == '\r')) {
            /* A document's own text starts after its "---" line. */
            a += 3;
            a += a < b && text[a] == '\r';
            a += a < b && text[a] == '\n';
        }
        struct ms_recipe *r = recipe_new(name, text + a, b > a ? b - a : 0);
        if (!r) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", name);
            goto out;
        }
        (*docs)[(*ndocs)++] = r;
        struct module_def module = { 0 };
        r->doc_pos = root ? node_pos(root) : (struct ms_pos){ 1, 1 };
        rc = root_parse(&c, root, r, &module);
        module_fini(&module);
        if (rc < 0)
            goto out;
        yaml_document_delete(&doc);
        doc_ok = false;
        if (!root)
            break;
    }
    if (*ndocs == 1) {
        struct ms_recipe *r = (*docs)[0];
        char *whole = ms_strndup(text ? text : "", len);
        if (!whole) {
            rc = ms_error(MS_ENOMEM, "%s: out of memory", name);
            goto out;
        }
        ms_free(r->text);
        r->text = whole;
        r->text_len = len;
    }
out:
    if (doc_ok)
        yaml_document_delete(&doc);
    if (parser_ok)
        yaml_parser_delete(&parser);
    ms_free(copy);
    return rc;
}

int ms_recipe_parse_opts(const char *name, const char *text, size_t len, unsigned flags,
                         struct ms_recipe **out)
{
    struct ms_recipe **docs = NULL;
    size_t n = 0;
    assert(name && (text || !len) && out);
    *out = NULL;
    int rc = parse_docs(name, text, len, flags, false, &docs, &n);
    if (!rc) {
        assert(n == 1);
        *out = docs[0];
        n = 0;
    }
    for (size_t i = 0; i < n; i++)
        ms_recipe_free(docs[i]);
    ms_free(docs);
    return rc;
}

int ms_recipe_file_parse(const char *name, const char *text, size_t len, unsigned flags,
                         struct ms_recipe_file **out)
{
    assert(name && (text || !len) && out);
    *out = ms_calloc(1, sizeof **out);
    if (!*out)
        return ms_error(MS_ENOMEM, "%s: out of memory", name);
    int rc = parse_docs(name, text, len, flags, true, &(*out)->docs, &(*out)->n);
    if (rc) {
        ms_recipe_file_free(*out);
        *out = NULL;
    }
    return rc;
}

void ms_recipe_file_free(struct ms_recipe_file *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->n; i++)
        ms_recipe_free(f->docs[i]);
    ms_free(f->docs);
    ms_free(f->order);
    ms_free(f->uses);
    for (size_t i = 0; f->out && i < f->n; i++)
        ms_free(f->out[i]);
    ms_free(f->out);
    ms_free(f);
}

int ms_recipe_load(const char *path, struct ms_recipe **out)
{
    return ms_recipe_load_opts(path, 0, out);
}

/* Reads a recipe file whole (at most RECIPE_MAX_BYTES): *buf (ms_free), *len. */
static int read_recipe(const char *path, char **out_buf, size_t *out_len)
{
    FILE *f = NULL;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = 0;

    *out_buf = NULL;
    *out_len = 0;
    f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        rc = ms_error(-e, "%s: %s", path, strerror(e));
        goto out;
    }
    for (;;) {
        if (len == cap) {
            if (cap >= RECIPE_MAX_BYTES) {
                rc = ms_error(MS_ERECIPE, "%s: larger than %u bytes; not a recipe", path,
                              RECIPE_MAX_BYTES);
                goto out;
            }
            size_t ncap = cap ? cap * 2 : 4096;
            char *nbuf = ms_realloc(buf, ncap);
            if (!nbuf) {
                rc = ms_error(MS_ENOMEM, "%s: out of memory", path);
                goto out;
            }
            buf = nbuf;
            cap = ncap;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) {
            if (ferror(f)) {
                rc = ms_error(MS_EIO, "%s: read error", path);
                goto out;
            }
            break;
        }
    }
    *out_buf = buf;
    *out_len = len;
    buf = NULL;

out:
    if (f)
        fclose(f);
    ms_free(buf);
    return rc;
}

int ms_recipe_load_opts(const char *path, unsigned flags, struct ms_recipe **out)
{
    char *buf = NULL;
    size_t len = 0;
    assert(path && out);
    *out = NULL;
    int rc = read_recipe(path, &buf, &len);
    if (!rc)
        rc = ms_recipe_parse_opts(path, buf, len, flags, out);
    ms_free(buf);
    return rc;
}

int ms_recipe_file_load(const char *path, unsigned flags, struct ms_recipe_file **out)
{
    char *buf = NULL;
    size_t len = 0;
    assert(path && out);
    *out = NULL;
    int rc = read_recipe(path, &buf, &len);
    if (!rc)
        rc = ms_recipe_file_parse(path, buf, len, flags, out);
    ms_free(buf);
    return rc;
}

/* ------------------------------------------------------------------ freeing */

static void setting_fini(struct ms_setting *s)
{
    ms_free(s->grad);
    for (size_t i = 0; i < s->ncond; i++) {
        ms_free(s->cond[i].filter);
        setting_fini(&s->cond[i].value);
    }
    ms_free(s->cond);
}

static void params_fini(struct ms_params *p)
{
    for (size_t i = 0; i < p->n; i++) {
        ms_free(p->v[i].name);
        setting_fini(&p->v[i].value);
    }
    ms_free(p->v);
}

static void modelref_fini(struct ms_modelref *m)
{
    ms_free(m->path);
    ms_free(m->revision);
    ms_free(m->lora);
    ms_free(m->lora_revision);
    ms_free(m->override_architecture);
}

static void sources_free(struct ms_source *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        modelref_fini(&v[i].model);
        params_fini(&v[i].params);
    }
    ms_free(v);
}

static void slices_free(struct ms_slice *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        sources_free(v[i].sources, v[i].nsources);
        modelref_fini(&v[i].base_model);
        params_fini(&v[i].params);
    }
    ms_free(v);
}

void ms_recipe_free(struct ms_recipe *r)
{
    if (!r)
        return;
    ms_free(r->path);
    ms_free(r->text);
    ms_free(r->merge_method);
    sources_free(r->models, r->nmodels);
    slices_free(r->slices, r->nslices);
    ms_free(r->module_name);
    modelref_fini(&r->base_model);
    params_fini(&r->params);
    ms_free(r->dtype);
    ms_free(r->out_dtype);
    ms_free(r->tokenizer_source);
    modelref_fini(&r->tokenizer_source_ref);
    ms_free(r->tok.source);
    modelref_fini(&r->tok.source_ref);
    for (size_t i = 0; i < r->tok.ntokens; i++) {
        ms_free(r->tok.tokens[i].token);
        modelref_fini(&r->tok.tokens[i].model);
        ms_free(r->tok.tokens[i].src_token);
    }
    ms_free(r->tok.tokens);
    ms_free(r->chat_template);
    ms_free(r->name);
    ms_free(r);
}

/* ------------------------------------------------------------------ queries */

const struct ms_setting *ms_params_get(const struct ms_params *p, const char *name)
{
    assert(p && name);
    for (size_t i = 0; i < p->n; i++)
        if (!strcmp(p->v[i].name, name))
            return &p->v[i].value;
    return NULL;
}

static bool str_eq(const char *a, const char *b)
{
    return a == b || (a && b && !strcmp(a, b));
}

bool ms_modelref_eq(const struct ms_modelref *a, const struct ms_modelref *b)
{
    return str_eq(a->path, b->path) && str_eq(a->revision, b->revision) &&
           str_eq(a->lora, b->lora) && str_eq(a->lora_revision, b->lora_revision) &&
           str_eq(a->override_architecture, b->override_architecture);
}

/*
 * mergekit's gradient interpolation, operation for operation in double so that
 * the result is Python's bit for bit (the build uses -ffp-contract=off).
 */
static double gradient_eval(const double *g, size_t n, double t)
{
    assert(n >= 1);
    assert(t >= 0.0 && t <= 1.0);
    double s = t * (double)(n - 1);
    size_t i0 = (size_t)s; /* Python int(): truncation; s >= 0 */
    size_t i1 = MS_MIN(n - 1, i0 + 1);
    double f = s - (double)i0;
    return (1 - f) * g[i0] + f * g[i1];
}

bool ms_setting_eval(const struct ms_setting *s, const char *tensor_name, double t, double *out)
{
    assert(s && out);
    switch (s->kind) {
    case MS_SET_NONE: return false;
    case MS_SET_SCALAR: *out = s->scalar; return true;
    case MS_SET_GRADIENT: *out = gradient_eval(s->grad, s->ngrad, t); return true;
    case MS_SET_COND:
        for (size_t i = 0; i < s->ncond; i++) {
            const struct ms_cond *e = &s->cond[i];
            /* Python: filter is None or filter == "*" or (tensor_name and filter in tensor_name) */
            if (!e->filter || !strcmp(e->filter, "*") ||
                (tensor_name && *tensor_name && strstr(tensor_name, e->filter))) {
                assert(e->value.kind == MS_SET_SCALAR || e->value.kind == MS_SET_GRADIENT);
                return ms_setting_eval(&e->value, tensor_name, t, out);
            }
        }
        return false;
    }
    assert(0);
    return false;
}
