/*
 * spm.cc - SentencePiece vocabularies (ms_spm.h) through libsentencepiece.
 *
 * The only C++ in the tree: everything below runs inside one try block, so that
 * neither the library's exceptions nor std::bad_alloc reach C callers.
 */
#include <sentencepiece_processor.h>

#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

extern "C" {
#include "ms_common.h"
#include "ms_spm.h"
#include "ms_str.h"
}

/* The kind of piece id, before the user-defined pass (normal stays normal). */
static unsigned char kind_of(const sentencepiece::SentencePieceProcessor &sp, int id)
{
    if (sp.IsUnknown(id))
        return MS_SPM_UNKNOWN;
    if (sp.IsControl(id))
        return MS_SPM_CONTROL;
    if (sp.IsByte(id))
        return MS_SPM_BYTE;
    if (sp.IsUnused(id))
        return MS_SPM_UNUSED;
    return MS_SPM_NORMAL;
}

/* Bytes of the first UTF-8 character of s (s valid UTF-8, len > 0). */
static size_t first_char_len(const std::string &s)
{
    uint32_t cp;
    return ms_utf8_decode(reinterpret_cast<const unsigned char *>(s.data()), s.size(), &cp);
}

static int load(const char *path, struct ms_spm_vocab **out)
{
    sentencepiece::SentencePieceProcessor sp;
    sentencepiece::util::Status st = sp.Load(path);
    if (!st.ok())
        return ms_error(MS_EMODEL, "%s: not a SentencePiece model: %s", path, st.message());
    int n = sp.GetPieceSize();
    if (n <= 0)
        return ms_error(MS_EMODEL, "%s: a SentencePiece model without pieces", path);
    std::vector<unsigned char> kind(static_cast<size_t>(n));
    size_t text_bytes = 0;
    for (int i = 0; i < n; i++) {
        const std::string &p = sp.IdToPiece(i);
        if (p.empty() || std::memchr(p.data(), 0, p.size()))
            return ms_error(MS_EMODEL, "%s: piece %d is empty or holds a NUL byte", path, i);
        if (ms_utf8_invalid_at(p.data(), p.size()) != p.size())
            return ms_error(MS_EMODEL, "%s: piece %d is not valid UTF-8", path, i);
        kind[static_cast<size_t>(i)] = kind_of(sp, i);
        text_bytes += p.size() + 1;
    }
    /* With an empty vocabulary constraint every piece that is not control, unknown or
     * user-defined becomes unused, except single characters: what stays usable and is
     * longer than one character is user-defined. */
    st = sp.SetVocabulary(std::vector<absl::string_view>());
    if (!st.ok())
        return ms_error(MS_EUNSUPPORTED,
                        "%s: cannot tell user-defined pieces in this SentencePiece model "
                        "(only unigram and BPE models are supported): %s",
                        path, st.message());
    for (int i = 0; i < n; i++) {
        const std::string &p = sp.IdToPiece(i);
        size_t k = static_cast<size_t>(i);
        if (kind[k] == MS_SPM_NORMAL && !sp.IsUnused(i) && first_char_len(p) != p.size())
            kind[k] = MS_SPM_USER;
    }
    size_t un = static_cast<size_t>(n);
    size_t head = sizeof(struct ms_spm_vocab) + un * sizeof(const char *);
    head = (head + un + 7) / 8 * 8;
    char *mem = static_cast<char *>(ms_malloc(head + text_bytes));
    if (!mem)
        return ms_error(MS_ENOMEM, "out of memory reading %s", path);
    struct ms_spm_vocab *v = reinterpret_cast<struct ms_spm_vocab *>(mem);
    v->n = un;
    v->piece = reinterpret_cast<const char **>(mem + sizeof *v);
    v->kind = reinterpret_cast<unsigned char *>(mem + sizeof *v + un * sizeof(const char *));
    char *text = mem + head;
    for (size_t i = 0; i < un; i++) {
        const std::string &p = sp.IdToPiece(static_cast<int>(i));
        std::memcpy(text, p.c_str(), p.size() + 1);
        v->piece[i] = text;
        v->kind[i] = kind[i];
        text += p.size() + 1;
    }
    v->unk_id = sp.unk_id();
    v->bos_id = sp.bos_id();
    v->eos_id = sp.eos_id();
    v->pad_id = sp.pad_id();
    *out = v;
    return 0;
}

extern "C" int ms_spm_load(const char *path, struct ms_spm_vocab **out)
{
    *out = nullptr;
    try {
        return load(path, out);
    } catch (const std::bad_alloc &) {
        return ms_error(MS_ENOMEM, "out of memory reading %s", path);
    } catch (const std::exception &e) {
        return ms_error(MS_EMODEL, "%s: not a SentencePiece model: %s", path, e.what());
    } catch (...) {
        return ms_error(MS_EMODEL, "%s: not a SentencePiece model", path);
    }
}

extern "C" void ms_spm_free(struct ms_spm_vocab *v) { ms_free(v); }
