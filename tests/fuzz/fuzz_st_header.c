/*
 * fuzz_st_header.c - libFuzzer harness: ms_st_parse on arbitrary bytes, as if
 * they were a whole safetensors file (file_size = len). Any result is fine;
 * crashes, leaks and sanitizer reports are not. A successful parse must
 * describe a file of exactly len bytes.
 */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "ms_common.h"
#include "ms_safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ms_st_file *f = NULL;
    int rc = ms_st_parse("fuzz.safetensors", data, size, size, &f);
    if (rc == 0) {
        assert(f);
        uint64_t end = f->ntensors ? f->tensors[f->ntensors - 1].end : 0;
        for (size_t i = 0; i < f->ntensors; i++) {
            assert(f->tensors[i].end <= end);
            assert(ms_st_find(f, f->tensors[i].name));
        }
        if (f->data_start + end != size)
            abort();
    } else {
        assert(!f);
        assert(rc < 0 && ms_errmsg()[0]);
    }
    ms_st_free(f);
    return 0;
}
