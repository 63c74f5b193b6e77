/*
 * ms_spm.h - the vocabulary of a SentencePiece model file (tokenizer.model), read with
 * libsentencepiece's SentencePieceProcessor (io/spm.cc, a C++ shim: no exception
 * crosses this interface; every failure is a return code with a one-line
 * diagnostic naming the file).
 *
 * What tokenizer merging needs (pipeline/tokenizer.c): each piece's text and kind in
 * id order. Texts are the pieces as the model stores them (UTF-8; the word-boundary
 * mark U+2581 "▁" as is; byte pieces as "<0x0A>"), which is what transformers'
 * get_vocab() of the converted tokenizer maps to the same ids.
 *
 * Kinds come from the processor's IsControl / IsUnknown / IsUnused / IsByte, and a
 * user-defined piece is told from a normal one by SetVocabulary({}), which leaves only
 * user-defined (and control, unknown) pieces of more than one character usable. A
 * user-defined piece of one character is reported as normal: the library's public
 * interface does not tell the two apart (its protobuf types are internal).
 *
 * Ownership: one allocation (ms_malloc) holding the struct, the arrays and the texts;
 * release with ms_spm_free. The processor's own memory (about 100 bytes a piece,
 * outside our allocator) is freed before ms_spm_load returns. Any thread.
 */
#ifndef MS_SPM_H
#define MS_SPM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum ms_spm_kind {
    MS_SPM_NORMAL = 1,  /* sentencepiece_model.proto's type numbers */
    MS_SPM_UNKNOWN = 2, /* the <unk> piece */
    MS_SPM_CONTROL = 3, /* <s>, </s>, --control_symbols */
    MS_SPM_USER = 4,    /* --user_defined_symbols (of two characters or more, see above) */
    MS_SPM_UNUSED = 5,
    MS_SPM_BYTE = 6, /* <0x00>..<0xFF> with byte_fallback */
};

struct ms_spm_vocab {
    size_t n;            /* pieces: ids 0..n-1 */
    const char **piece;  /* per id: its text, NUL-terminated (pieces hold no NUL) */
    unsigned char *kind; /* per id: an enum ms_spm_kind */
    int32_t unk_id;      /* the trainer spec's ids, -1 when unset */
    int32_t bos_id, eos_id, pad_id;
};

/*
 * Loads path. 0 and *out, or MS_EMODEL ("PATH: not a SentencePiece model: ..." for a
 * file the library rejects; a piece holding a NUL byte or text that is not UTF-8),
 * MS_EUNSUPPORTED (a word or char model: user-defined pieces cannot be told apart),
 * MS_ENOMEM.
 */
int ms_spm_load(const char *path, struct ms_spm_vocab **out);
void ms_spm_free(struct ms_spm_vocab *v);

#ifdef __cplusplus
}
#endif

#endif
