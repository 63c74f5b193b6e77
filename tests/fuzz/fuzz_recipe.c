/*
 * fuzz_recipe.c - libFuzzer harness: ms_recipe_parse on arbitrary text. Any
 * result is fine; crashes, leaks and sanitizer reports are not. Unknown-key
 * warnings (ms_log_warn, always printed) are silenced by running with
 * -close_fd_mask=2 (tests/fuzz/run.sh): libFuzzer closes the target's stderr
 * and still prints its own reports and any crash through a duplicate.
 */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "ms_common.h"
#include "ms_recipe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    ms_log_set_quiet(true);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ms_recipe *r = NULL;
    int rc = ms_recipe_parse("fuzz.yml", (const char *)data, size, &r);
    if (rc == 0) {
        assert(r);
        assert(r->nmodels > 0 || r->nslices > 0 || r->has_modules);
        for (size_t i = 0; i < r->nmodels; i++)
            for (size_t k = 0; k < r->models[i].params.n; k++) {
                double v;
                (void)ms_setting_eval(&r->models[i].params.v[k].value, "model.layers.0.mlp",
                                      0.5, &v);
            }
    } else {
        assert(!r);
    }
    ms_recipe_free(r);
    return 0;
}
