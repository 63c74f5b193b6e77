/*
 * json_alloc.c - makes jansson allocate through ms_malloc/ms_free, so that
 * allocation fault injection (ms_alloc_fail_after) covers JSON too.
 *
 * The hook is a constructor: it runs before main() in every program that links
 * this object. A constructor alone does not pull an object out of a static
 * archive, so the Makefile links with --require-defined=ms__json_alloc_hook.
 */
#include <jansson.h>

#include "ms_common.h"

void ms__json_alloc_hook(void);

__attribute__((constructor)) void ms__json_alloc_hook(void)
{
    json_set_alloc_funcs(ms_malloc, ms_free);
}
