/*
 * ms_str.h - small string helpers shared by every folder: a growable string,
 * UTF-8 decoding and byte counts for people (implemented in base/str.c).
 *
 * None of these keep state between calls; each may be called from any thread
 * on data that thread owns.
 */
#ifndef MS_STR_H
#define MS_STR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------ string buffer */

/*
 * A growable byte string, always NUL-terminated once anything was added.
 * Start from { 0 } (p is NULL until the first add, even an empty one). The
 * first failure (allocation, or a format vsnprintf rejects) sets oom and makes
 * every later add a no-op, so a writer adds everything and checks oom once.
 * The owner of the struct owns p: ms_strbuf_fini frees it, or the owner takes
 * it and frees it with ms_free.
 */
struct ms_strbuf {
    char *p;    /* the bytes, then a NUL; NULL before the first add */
    size_t len; /* bytes in p, not counting the NUL */
    size_t cap; /* bytes allocated at p */
    bool oom;   /* an add failed; the contents are incomplete */
};

/* Appends n bytes (which may contain NULs). */
void ms_strbuf_add(struct ms_strbuf *b, const void *s, size_t n);
/* Appends a NUL-terminated string. */
void ms_strbuf_addstr(struct ms_strbuf *b, const char *s);
/* Appends printf-formatted text. */
void ms_strbuf_addf(struct ms_strbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Empties b (len 0, p "" if allocated) and keeps its allocation; a sticky oom stays. */
void ms_strbuf_reset(struct ms_strbuf *b);
/* Frees p and resets *b to { 0 }. */
void ms_strbuf_fini(struct ms_strbuf *b);

/*
 * Appends s with what could act on a terminal made inert: '\n', '\r' and '\t'
 * as those two-character escapes, every other C0 control, DEL, the C1 controls
 * (U+0080..U+009F, as their two UTF-8 bytes) and bytes that are not valid UTF-8
 * as "\xNN". Everything else (printable ASCII, valid UTF-8) is copied as is.
 * For names and paths that come from files and reach the terminal.
 */
void ms_str_escape(struct ms_strbuf *b, const char *s);
/* True when ms_str_escape would change s. */
bool ms_str_needs_escape(const char *s);

/* ------------------------------------------------------------------ checksum */
/*
 * XXH64 (xxHash, 64-bit, seed 0) computed incrementally: start from
 * ms_xxh64_init, add bytes in order with ms_xxh64_update, read the digest with
 * ms_xxh64_digest (which leaves the state usable). The digest of a whole byte
 * string does not depend on how it was split. Used for the checksums of
 * finished shards (--resume, verify --deep).
 */
struct ms_xxh64 {
    uint64_t v[4];
    uint64_t total;
    unsigned char buf[32];
    size_t nbuf;
};
void ms_xxh64_init(struct ms_xxh64 *h);
void ms_xxh64_update(struct ms_xxh64 *h, const void *data, size_t len);
uint64_t ms_xxh64_digest(const struct ms_xxh64 *h);

/* ------------------------------------------------------------------ UTF-8 */

/*
 * Decodes one UTF-8 sequence at s (len > 0 bytes available) as Rust's
 * str::from_utf8 accepts it: no overlong forms, no surrogates, nothing above
 * U+10FFFF. Returns its length in bytes (1-4) and sets *cp, or returns 0 (and
 * leaves *cp alone) if the bytes at s are not valid UTF-8.
 */
size_t ms_utf8_decode(const unsigned char *s, size_t len, uint32_t *cp);

/* Offset of the first byte of s[0, len) that does not start a valid UTF-8
 * sequence (as ms_utf8_decode judges), or len if all of it is valid. */
size_t ms_utf8_invalid_at(const void *s, size_t len);

/* Length of the longest prefix of the NUL-terminated s, at most max bytes, that
 * does not end inside a multi-byte sequence (only lead and continuation bytes are
 * looked at; s need not be valid UTF-8). */
size_t ms_utf8_prefix(const char *s, size_t max);

/* ------------------------------------------------------------------ byte counts */

/* How ms_fmt_bytes writes a byte count. Below one unit every style writes the
 * count rounded to a whole number, "512 B". */
enum ms_bytes_style {
    MS_BYTES_SI,       /* "1.23 GB": powers of 1000, kB MB GB TB PB, two decimals */
    MS_BYTES_IEC,      /* "512.0 MiB": powers of 1024, KiB MiB GiB TiB PiB, one decimal */
    MS_BYTES_PROGRESS, /* "1.23 GB": powers of 1000, KB MB GB TB, two decimals (progress line) */
};

/* Writes bytes (>= 0, need not be whole: a rate) into buf of n bytes as style
 * says, truncating to fit, and returns buf. */
const char *ms_fmt_bytes(char *buf, size_t n, double bytes, enum ms_bytes_style style);

/* ------------------------------------------------------------------ names */

/* The candidate closest to s (of n in cand) by edit distance (insertions,
 * deletions, substitutions, swaps of neighbours), or NULL when none is within
 * 1 edit (s shorter than 4 bytes), 2 (shorter than 8) or 3. The first of equals
 * wins. For "did you mean" hints on misspelt keys. Borrowed pointers. */
const char *ms_str_closest(const char *s, const char *const *cand, size_t n);

#endif
