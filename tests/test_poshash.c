/*
 * test_poshash.c - the position-keyed shard checksum (ms_poshash.h): its sum
 * against the definition written out plainly (each 32-bit little-endian word
 * times A^w, mod 2^61 - 1, with % on 128-bit integers), independence from how
 * the bytes are split and in which order the parts are added, and that
 * changing any byte, or swapping two words, changes the digest.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <string.h>

#include "ms_poshash.h"

#define P ((uint64_t)0x1fffffffffffffff)
#define A ((uint64_t)0x0b5ad4eceda1ce2b) /* the constant base/poshash.c documents */

static uint64_t def_acc(const unsigned char *d, size_t n)
{
    unsigned __int128 acc = 0, x = 1;
    for (size_t w = 0; 4 * w < n; w++) {
        uint64_t v = 0;
        for (size_t b = 0; b < 4 && 4 * w + b < n; b++)
            v |= (uint64_t)d[4 * w + b] << (8 * b);
        acc = (acc + x * v) % P;
        x = x * A % P;
    }
    return (uint64_t)acc;
}

static unsigned char g_data[4099];

static void fill(void)
{
    uint32_t s = 12345;
    for (size_t i = 0; i < sizeof g_data; i++) {
        s = s * 1103515245u + 12345u;
        g_data[i] = (unsigned char)(s >> 24);
    }
}

Test(poshash, matches_the_definition)
{
    fill();
    static const size_t lens[] = { 0,  1,  3,   4,   5,   15,  16,   17,  63,
                                   64, 65, 67, 68, 127, 128, 129, 1000, 4099 };
    for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++)
        cr_assert_eq(ms_poshash_range(0, g_data, lens[k]), def_acc(g_data, lens[k]), "length %zu",
                     lens[k]);
    /* 0xff bytes everywhere: every sum at its largest values (several 64-byte blocks) */
    unsigned char ff[1027];
    memset(ff, 0xff, sizeof ff);
    cr_assert_eq(ms_poshash_range(0, ff, sizeof ff), def_acc(ff, sizeof ff));
}

Test(poshash, any_split_in_any_order_gives_the_same_sum)
{
    fill();
    uint64_t whole = ms_poshash_range(0, g_data, sizeof g_data);
    static const size_t steps[] = { 1, 2, 3, 5, 7, 64, 333, 1024 };
    for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
        size_t st = steps[k];
        uint64_t fwd = 0, back = 0;
        for (size_t o = 0; o < sizeof g_data; o += st) {
            size_t n = sizeof g_data - o < st ? sizeof g_data - o : st;
            fwd = ms_poshash_add(fwd, ms_poshash_range(o, g_data + o, n));
        }
        size_t last = (sizeof g_data - 1) / st * st;
        for (size_t o = last + st; o-- > 0;) { /* the same pieces, last first */
            if (o % st)
                continue;
            size_t n = sizeof g_data - o < st ? sizeof g_data - o : st;
            back = ms_poshash_add(back, ms_poshash_range(o, g_data + o, n));
        }
        cr_assert_eq(fwd, whole, "step %zu", st);
        cr_assert_eq(back, whole, "step %zu reversed", st);
    }
}

Test(poshash, a_changed_byte_or_swapped_words_change_the_digest)
{
    fill();
    size_t n = sizeof g_data;
    uint64_t d0 = ms_poshash_digest(ms_poshash_range(0, g_data, n), n);
    for (size_t i = 0; i < n; i += 97) {
        for (int bit = 0; bit < 8; bit++) {
            g_data[i] ^= (unsigned char)(1u << bit);
            cr_assert_neq(ms_poshash_digest(ms_poshash_range(0, g_data, n), n), d0, "%zu", i);
            g_data[i] ^= (unsigned char)(1u << bit);
        }
    }
    unsigned char t[4];
    memcpy(t, g_data + 8, 4);
    memcpy(g_data + 8, g_data + 400, 4);
    memcpy(g_data + 400, t, 4);
    cr_assert_neq(ms_poshash_digest(ms_poshash_range(0, g_data, n), n), d0);
    /* the same bytes as a longer file (zero tail) differ through the size */
    cr_assert_neq(ms_poshash_digest(ms_poshash_range(0, g_data, n), n + 4), d0);
}

/*
 * Every version of the kernel (ms_isa.h) against the definition: lengths around
 * the vector blocks (64 words) and the scalar ones (16), several blocks with a
 * tail, odd file offsets (the head word and the power of A), and all-0xff bytes
 * (every lane sum at its largest).
 */
Test(poshash, every_version_matches_the_definition)
{
    fill();
    static unsigned char ff[4099];
    memset(ff, 0xff, sizeof ff);
    static const size_t lens[] = { 0,   4,   60,  252, 256, 260,  300,  508,
                                   512, 516, 1024, 1028, 2048, 3000, 4096, 4099 };
    static const uint64_t offs[] = { 0, 3, 4, 1000004, (uint64_t)1 << 40 };
    int versions = 0;
    for (int isa = 0; isa < MS_ISA_COUNT; isa++) {
        if (!ms_isa_available((enum ms_isa)isa))
            continue;
        versions++;
        for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++)
            for (int d = 0; d < 2; d++) {
                const unsigned char *p = d ? ff : g_data;
                /* at offset 0 the part is the definition's sum */
                cr_assert_eq(ms_poshash_range_isa((enum ms_isa)isa, 0, p, lens[k]),
                             def_acc(p, lens[k]), "%s length %zu data %d",
                             ms_isa_name((enum ms_isa)isa), lens[k], d);
                /* elsewhere: the scalar version's value */
                for (size_t o = 1; o < sizeof offs / sizeof offs[0]; o++)
                    cr_assert_eq(ms_poshash_range_isa((enum ms_isa)isa, offs[o], p, lens[k]),
                                 ms_poshash_range_isa(MS_ISA_SCALAR, offs[o], p, lens[k]),
                                 "%s length %zu offset %llu data %d",
                                 ms_isa_name((enum ms_isa)isa), lens[k],
                                 (unsigned long long)offs[o], d);
            }
    }
    cr_assert_gt(versions, 0);
}
