/*
 * cli_plan.c - `mergestream plan RECIPE.yml [options]`: validates a recipe
 * against its models (headers and config.json only; no tensor data is read) and
 * prints the plan.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ms_common.h"
#include "ms_engine.h"
#include "ms_plan.h"
#include "ms_recipe.h"
#include "ms_safetensors.h"

#include "cli.h"

static const char plan_usage[] =
    "usage: mergestream plan RECIPE.yml [options]\n"
    "\n"
    "Checks RECIPE.yml (a mergekit YAML recipe) against the models it names and prints\n"
    "what a merge would do: the models, the resolved parameters, the output tensors and\n"
    "shards, the bytes to read and write, and the memory the merge will use. Reads only\n"
    "config.json files and safetensors headers. Every problem found is reported.\n"
    "\n"
    "options (every on/off option also takes its --no- form):\n"
    "  --json / --no-json       print the whole plan as JSON (every tensor: shape, dtypes,\n"
    "                           resolved parameters, inputs with file and offset, shard)\n"
    "  --out-shard-size SIZE    maximum shard size in bytes (default 5B; K/M/B = 1e3/1e6/1e9)\n"
    "  --max-memory SIZE        memory budget the estimate assumes (default 512M)\n"
    "  --random-seed N          seed for methods with random masks (default 0)\n"
    "  --allow-crimes / --no-allow-crimes\n"
    "                           allow models whose architectures differ (default off)\n"
    "  --transformers-cache DIR the Hugging Face hub cache to find hub-id models in\n"
    "                           (instead of $HF_HUB_CACHE; nothing is downloaded)\n"
    "  --strict / --no-strict   unknown recipe keys and parameter names are errors, not\n"
    "                           warnings (mergekit ignores them; default off)\n"
    "  --lora-merge-dtype DTYPE dtype `model+lora` adapters are folded in (as merge)\n"
    "  --intermediate-dir DIR   for a recipe of several yaml documents (mergekit-multi):\n"
    "                           where the named merges are (DIR/NAME); a stage whose inputs\n"
    "                           are not built yet is checked as far as its recipe allows\n"
    "  -q, --quiet / --no-quiet print nothing on success (exit status only)\n"
    "  -h, --help               this text\n"
    "\n"
    "exit status: 0 the plan is valid, 1 problems found, 2 usage.\n";

enum {
    OPT_JSON = 256,
    OPT_SHARD,
    OPT_MAXMEM,
    OPT_SEED,
    OPT_CRIMES,
    OPT_NOJSON,
    OPT_NOCRIMES,
    OPT_NOQUIET,
    OPT_HFCACHE,
    OPT_STRICT,
    OPT_NOSTRICT,
    OPT_INTERDIR,
    OPT_LORADT,
};

static const struct option plan_opts[] = {
    { "json", no_argument, NULL, OPT_JSON },
    { "no-json", no_argument, NULL, OPT_NOJSON },
    { "out-shard-size", required_argument, NULL, OPT_SHARD },
    { "max-memory", required_argument, NULL, OPT_MAXMEM },
    { "random-seed", required_argument, NULL, OPT_SEED },
    { "allow-crimes", no_argument, NULL, OPT_CRIMES },
    { "no-allow-crimes", no_argument, NULL, OPT_NOCRIMES },
    { "transformers-cache", required_argument, NULL, OPT_HFCACHE },
    { "strict", no_argument, NULL, OPT_STRICT },
    { "no-strict", no_argument, NULL, OPT_NOSTRICT },
    { "lora-merge-dtype", required_argument, NULL, OPT_LORADT },
    { "intermediate-dir", required_argument, NULL, OPT_INTERDIR },
    { "quiet", no_argument, NULL, 'q' },
    { "no-quiet", no_argument, NULL, OPT_NOQUIET },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
};

static int plan_usage_error(const char *msg, const char *arg)
{
    fprintf(stderr, "mergestream plan: %s%s%s\n", msg, arg ? " " : "", arg ? arg : "");
    fprintf(stderr, "usage: mergestream plan RECIPE.yml [options]  (--help for more)\n");
    return 2;
}

int ms_cli_plan(int argc, char **argv)
{
    struct ms_plan_opts po = { .out_shard_size = 5000000000ull };
    uint64_t max_memory = MS_DEFAULT_MAX_MEMORY;
    bool json = false, quiet = false;
    const char *interdir = NULL;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":qh", plan_opts, NULL)) != -1) {
        switch (c) {
        case OPT_JSON: json = true; break;
        case OPT_NOJSON: json = false; break;
        case OPT_SHARD:
            if (ms_parse_size(optarg, false, &po.out_shard_size))
                return plan_usage_error("invalid --out-shard-size", optarg);
            break;
        case OPT_MAXMEM:
            if (ms_parse_size(optarg, true, &max_memory) || !max_memory)
                return plan_usage_error("invalid --max-memory", optarg);
            break;
        case OPT_SEED: {
            char *end;
            if (*optarg < '0' || *optarg > '9')
                return plan_usage_error("invalid --random-seed", optarg);
            errno = 0;
            po.seed = strtoull(optarg, &end, 10);
            if (*end || errno == ERANGE)
                return plan_usage_error("invalid --random-seed", optarg);
            break;
        }
        case OPT_CRIMES: po.allow_crimes = true; break;
        case OPT_NOCRIMES: po.allow_crimes = false; break;
        case OPT_HFCACHE:
            if (!*optarg || setenv("HF_HUB_CACHE", optarg, 1))
                return plan_usage_error("invalid --transformers-cache", optarg);
            break;
        case OPT_INTERDIR:
            if (!*optarg)
                return plan_usage_error("--intermediate-dir needs a directory", NULL);
            interdir = optarg;
            break;
        case OPT_STRICT: po.strict = true; break;
        case OPT_NOSTRICT: po.strict = false; break;
        case OPT_LORADT:
            po.lora_dtype = ms_dtype_from_recipe(optarg);
            if (!ms_dtype_is_compute(po.lora_dtype))
                return plan_usage_error("invalid --lora-merge-dtype (bfloat16, float16 or "
                                        "float32)", optarg);
            break;
        case 'q': quiet = true; break;
        case OPT_NOQUIET: quiet = false; break;
        case 'h': fputs(plan_usage, stdout); return 0;
        case ':': return plan_usage_error("missing value for", argv[optind - 1]);
        default: return plan_usage_error("unknown option", argv[optind - 1]);
        }
    }
    if (argc - optind != 1)
        return plan_usage_error(argc - optind ? "expected one recipe, got more" : "missing recipe",
                                NULL);
    if (quiet)
        ms_log_set_quiet(true);
    ms_st_set_memory(max_memory); /* as merge: headers are parsed within the budget */

    struct ms_recipe_file *file = NULL;
    struct ms_plan *p = NULL;
    int rc = ms_recipe_file_load(argv[optind], po.strict ? MS_RECIPE_STRICT : 0, &file);
    if (rc) {
        ms_cli_report(rc, NULL);
        return 1;
    }
    int status = ms_cli_multi_link(file, interdir);
    if (!status && file->n > 1)
        status = ms_cli_multi_plan(file, &po, max_memory, json, quiet);
    if (status || file->n > 1) {
        ms_recipe_file_free(file);
        return status;
    }
    const struct ms_recipe *r = file->docs[0];
    rc = ms_plan_build(r, &po, &p);
    if (rc) {
        /* ms_plan_build has printed every problem already. */
        ms_recipe_file_free(file);
        return 1;
    }
    if (!quiet) {
        rc = ms_plan_print(p, max_memory, json, stdout);
        if (rc)
            ms_cli_report(rc, NULL);
    }
    ms_plan_free(p);
    ms_recipe_file_free(file);
    return rc ? 1 : 0;
}
