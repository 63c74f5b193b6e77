/*
 * cli_merge.c - `mergestream merge RECIPE.yml OUT [options]`: recipe -> plan ->
 * engine. Option names follow mergekit-yaml where they apply.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ms_common.h"
#include "ms_engine.h"
#include "ms_plan.h"
#include "ms_recipe.h"
#include "ms_safetensors.h"
#include "ms_isa.h"
#include "ms_stage.h"

#include "cli.h"

static const char merge_usage[] =
    "usage: mergestream merge RECIPE.yml OUT [options]\n"
    "\n"
    "Runs the merge that RECIPE.yml (a mergekit YAML recipe) describes and writes the\n"
    "model into directory OUT: safetensors shards (and their index), config.json, the\n"
    "donor's tokenizer files, README.md and mergekit_config.yml.\n"
    "\n"
    "options (every on/off option also takes its --no- form, as in mergekit):\n"
    "  --max-memory SIZE        memory for all buffers together (default 512M; K/M/G are\n"
    "                           binary here); tensors larger than this merge chunk by chunk\n"
    "  -j, --threads N          compute threads (default: number of cores)\n"
    "  --out-shard-size SIZE    maximum shard size in bytes (default 5B; K/M/B = 1e3/1e6/1e9)\n"
    "  --random-seed N          seed for methods with random masks (default 0)\n"
    "  --allow-crimes / --no-allow-crimes\n"
    "                           allow models whose architectures differ (default off)\n"
    "  --strict / --no-strict   unknown recipe keys and parameter names are errors, not\n"
    "                           warnings (mergekit ignores them; default off)\n"
    "  --copy-tokenizer / --no-copy-tokenizer\n"
    "                           copy the donor's tokenizer files (default on)\n"
    "  --write-model-card / --no-write-model-card\n"
    "                           write README.md and mergekit_config.yml (default on)\n"
    "  --transformers-cache DIR the Hugging Face hub cache to find hub-id models in\n"
    "                           (instead of $HF_HUB_CACHE; nothing is downloaded)\n"
    "  --lora-merge-dtype DTYPE dtype a `model+lora` reference's adapter is folded in, as\n"
    "                           mergekit stores the merged model (bfloat16, float16, float32;\n"
    "                           default: the model's own)\n"
    "  --lora-merge-cache DIR   also write each folded `model+lora` model into DIR (mergekit's\n"
    "                           folder names) and read it from there in later runs\n"
    "  --intermediate-dir DIR   for a recipe of several yaml documents (mergekit-multi):\n"
    "                           each named merge is written to DIR/NAME, later documents\n"
    "                           use it by that name, the unnamed one is written to OUT\n"
    "  --lazy / --no-lazy       skip a named merge whose DIR/NAME holds a complete model\n"
    "                           (default on, as mergekit-multi)\n"
    "  --isa scalar|avx2|avx512|auto\n"
    "                           kernel versions to run (default auto: the best this CPU\n"
    "                           supports, or $MERGESTREAM_ISA); every version writes the\n"
    "                           same bytes, only the speed differs\n"
    "  -q, --quiet / --no-quiet no progress line\n"
    "  -h, --help               this text\n"
    "\n"
    "streaming outputs:\n"
    "  OUT = -                  write the whole output directory as one tar stream on stdout\n"
    "  --compress zstd[:LEVEL]  zstd (default level 3): each shard as NAME.safetensors.zst (the\n"
    "                           index names them so), or with OUT = - the whole tar stream\n"
    "  --pipe CMD               stream each output file into the stdin of its own `sh -c CMD`;\n"
    "                           {} in CMD (and $MERGESTREAM_FILE) is the file name, e.g.\n"
    "                           --pipe 'aws s3 cp - s3://bucket/merged/{}'\n"
    "  --resume / --no-resume   keep the shards an interrupted run already finished in OUT\n"
    "  --force / --no-force     write into a non-empty OUT that holds no earlier mergestream\n"
    "                           output (its other files are left alone; default off)\n"
    "  --part I/N               write only shards k with k mod N = I-1 (1-based I), for one\n"
    "                           merge spread over N machines; part 1 also writes the other files\n"
    "  --part auto[/N]          I (and N) from a Slurm array job (SLURM_ARRAY_TASK_*) or a\n"
    "                           Kubernetes Indexed Job (JOB_COMPLETION_INDEX; N required)\n"
    "  --stall-timeout SECONDS  fail when the tar reader or a --pipe command takes no bytes\n"
    "                           for this long (default 0: wait as long as it takes)\n"
    "\n"
    "not supported: --no-safe-serialization (PyTorch .bin output).\n"
    "\n"
    "accepted for mergekit compatibility, with no effect here: --cuda/--no-cuda,\n"
    "--device DEV, --low-cpu-memory/--no-low-cpu-memory, --lazy-unpickle/--no-lazy-unpickle,\n"
    "--read-to-gpu/--no-read-to-gpu, --multi-gpu/--no-multi-gpu, --gpu-rich/--no-gpu-rich,\n"
    "--async-write/--no-async-write, --write-threads N, --num-threads N (taken as --threads),\n"
    "--clone-tensors/--no-clone-tensors, --trust-remote-code/--no-trust-remote-code,\n"
    "--safe-serialization, -v, --verbose.\n"
    "\n"
    "testing knobs: --chunk-elems N caps elements per chunk; --reread (--no-reread) makes\n"
    "multi-pass methods read their inputs again in every pass instead of keeping them in memory.\n"
    "\n"
    "exit status: 0 success, 1 failure, 2 usage, 129/130/143 interrupted by\n"
    "SIGHUP/SIGINT/SIGTERM.\n";

enum {
    OPT_MAXMEM = 256,
    OPT_SHARD,
    OPT_SEED,
    OPT_CRIMES,
    OPT_COPYTOK,
    OPT_NOCOPYTOK,
    OPT_CARD,
    OPT_NOCARD,
    OPT_CHUNK,
    OPT_REREAD,
    OPT_NOOP,
    OPT_NOOP_ARG,
    OPT_UNSUP,
    OPT_UNSUP_ARG,
    OPT_NUMTHREADS,
    OPT_COMPRESS,
    OPT_PIPE,
    OPT_PART,
    OPT_RESUME,
    OPT_NOCRIMES,
    OPT_NOQUIET,
    OPT_NOREREAD,
    OPT_NORESUME,
    OPT_HFCACHE,
    OPT_STRICT,
    OPT_NOSTRICT,
    OPT_STALL,
    OPT_FORCE,
    OPT_NOFORCE,
    OPT_INTERDIR,
    OPT_LAZY,
    OPT_NOLAZY,
    OPT_LORADT,
    OPT_ISA,
    OPT_LORACACHE,
};

static const struct option merge_opts[] = {
    { "max-memory", required_argument, NULL, OPT_MAXMEM },
    { "threads", required_argument, NULL, 'j' },
    { "out-shard-size", required_argument, NULL, OPT_SHARD },
    { "random-seed", required_argument, NULL, OPT_SEED },
    { "allow-crimes", no_argument, NULL, OPT_CRIMES },
    { "no-allow-crimes", no_argument, NULL, OPT_NOCRIMES },
    { "strict", no_argument, NULL, OPT_STRICT },
    { "no-strict", no_argument, NULL, OPT_NOSTRICT },
    { "copy-tokenizer", no_argument, NULL, OPT_COPYTOK },
    { "no-copy-tokenizer", no_argument, NULL, OPT_NOCOPYTOK },
    { "write-model-card", no_argument, NULL, OPT_CARD },
    { "no-write-model-card", no_argument, NULL, OPT_NOCARD },
    { "quiet", no_argument, NULL, 'q' },
    { "no-quiet", no_argument, NULL, OPT_NOQUIET },
    { "help", no_argument, NULL, 'h' },
    { "chunk-elems", required_argument, NULL, OPT_CHUNK },
    { "reread", no_argument, NULL, OPT_REREAD },
    { "no-reread", no_argument, NULL, OPT_NOREREAD },
    { "compress", required_argument, NULL, OPT_COMPRESS },
    { "pipe", required_argument, NULL, OPT_PIPE },
    { "part", required_argument, NULL, OPT_PART },
    { "resume", no_argument, NULL, OPT_RESUME },
    { "no-resume", no_argument, NULL, OPT_NORESUME },
    { "transformers-cache", required_argument, NULL, OPT_HFCACHE },
    { "stall-timeout", required_argument, NULL, OPT_STALL },
    { "force", no_argument, NULL, OPT_FORCE },
    { "no-force", no_argument, NULL, OPT_NOFORCE },
    { "intermediate-dir", required_argument, NULL, OPT_INTERDIR },
    { "lazy", no_argument, NULL, OPT_LAZY },
    { "no-lazy", no_argument, NULL, OPT_NOLAZY },
    { "no-safe-serialization", no_argument, NULL, OPT_UNSUP },
    /* mergekit's, meaningless here */
    { "num-threads", required_argument, NULL, OPT_NUMTHREADS },
    { "cuda", no_argument, NULL, OPT_NOOP },
    { "no-cuda", no_argument, NULL, OPT_NOOP },
    { "low-cpu-memory", no_argument, NULL, OPT_NOOP },
    { "no-low-cpu-memory", no_argument, NULL, OPT_NOOP },
    { "lazy-unpickle", no_argument, NULL, OPT_NOOP },
    { "no-lazy-unpickle", no_argument, NULL, OPT_NOOP },
    { "read-to-gpu", no_argument, NULL, OPT_NOOP },
    { "no-read-to-gpu", no_argument, NULL, OPT_NOOP },
    { "multi-gpu", no_argument, NULL, OPT_NOOP },
    { "no-multi-gpu", no_argument, NULL, OPT_NOOP },
    { "gpu-rich", no_argument, NULL, OPT_NOOP },
    { "no-gpu-rich", no_argument, NULL, OPT_NOOP },
    { "async-write", no_argument, NULL, OPT_NOOP },
    { "no-async-write", no_argument, NULL, OPT_NOOP },
    { "clone-tensors", no_argument, NULL, OPT_NOOP },
    { "no-clone-tensors", no_argument, NULL, OPT_NOOP },
    { "trust-remote-code", no_argument, NULL, OPT_NOOP },
    { "no-trust-remote-code", no_argument, NULL, OPT_NOOP },
    { "safe-serialization", no_argument, NULL, OPT_NOOP },
    { "device", required_argument, NULL, OPT_NOOP_ARG },
    { "write-threads", required_argument, NULL, OPT_NOOP_ARG },
    { "lora-merge-cache", required_argument, NULL, OPT_LORACACHE },
    { "lora-merge-dtype", required_argument, NULL, OPT_LORADT },
    { "isa", required_argument, NULL, OPT_ISA },
    { "verbose", no_argument, NULL, 'v' },
    { NULL, 0, NULL, 0 },
};

void ms_cli_print_methods(FILE *f, const char *only)
{
    if (!only)
        fprintf(f, "\nmerge methods (parameters: per-model ones are set under each model; "
                   "'required' has no default):\n");
    const struct ms_method *m;
    for (size_t i = 0; (m = ms_method_at(i)); i++) {
        if (only && strcmp(only, m->name))
            continue;
        const char *base = (m->flags & MS_M_BASE_REQUIRED) ? "base_model required"
                           : (m->flags & MS_M_BASE_PARAMS) ? "base_model optional (weighted)"
                                                            : "base_model optional";
        fprintf(f, "  %-17s %s%s; %s\n", m->name, m->summary, m->ops ? "" : " [not supported]",
                base);
        for (uint32_t k = 0; k < m->nparams; k++) {
            const struct ms_param_decl *d = &m->params[k];
            char def[32];
            if (d->required)
                snprintf(def, sizeof def, "required");
            else if (isnan(d->def))
                snprintf(def, sizeof def, "unset");
            else if (d->is_bool)
                snprintf(def, sizeof def, "%s", d->def != 0 ? "true" : "false");
            else
                snprintf(def, sizeof def, "%g", d->def);
            fprintf(f, "      %-18s %-9s %s\n", d->name, d->per_model ? "per-model" : "global", def);
        }
    }
}

static int usage_error(const char *msg, const char *arg)
{
    fprintf(stderr, "mergestream merge: %s%s%s\n", msg, arg ? " " : "", arg ? arg : "");
    fprintf(stderr, "usage: mergestream merge RECIPE.yml OUT [options]  (--help for more)\n");
    return 2;
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    if (!s || *s < '0' || *s > '9')
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || errno == ERANGE)
        return -1;
    *out = v;
    return 0;
}

/* An environment variable holding a decimal number; -1 if unset, -2 if not a number. */
static int env_u64(const char *name, uint64_t *out)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return -1;
    if (parse_u64(s, out)) {
        fprintf(stderr, "mergestream merge: --part auto: %s is '%s', not a number\n", name, s);
        return -2;
    }
    return 0;
}

/*
 * --part I/N, or --part auto[/N]: the index from a scheduler's array job. Slurm
 * (SLURM_ARRAY_TASK_ID, _MIN, _MAX, _COUNT, _STEP: any evenly spaced --array range)
 * gives I and N; a Kubernetes Indexed Job gives only JOB_COMPLETION_INDEX (0-based),
 * so N must be written. Prints the error and returns nonzero on a bad value.
 */
static int parse_part(const char *arg, unsigned *index, unsigned *count)
{
    uint64_t a = 0, b = 0;
    const char *slash = strchr(arg, '/');
    bool has_n = slash != NULL;
    if (has_n && parse_u64(slash + 1, &b))
        return usage_error("--part takes I/N or auto[/N] with 1 <= I <= N, not", arg);
    if (strncmp(arg, "auto", 4) || (arg[4] && arg[4] != '/')) {
        /* Digits only: sscanf's %u would take "-1" as 4294967295. */
        char ibuf[24];
        size_t il = has_n ? (size_t)(slash - arg) : 0;
        if (!has_n || il == 0 || il >= sizeof ibuf)
            return usage_error("--part takes I/N or auto[/N] with 1 <= I <= N, not", arg);
        memcpy(ibuf, arg, il);
        ibuf[il] = 0;
        if (parse_u64(ibuf, &a) || b == 0 || a == 0 || a > b || b > UINT32_MAX)
            return usage_error("--part takes I/N or auto[/N] with 1 <= I <= N, not", arg);
        goto done;
    }

    uint64_t id, mn, mx, cnt, step = 1, k8s;
    int slurm = env_u64("SLURM_ARRAY_TASK_ID", &id);
    int kube = env_u64("JOB_COMPLETION_INDEX", &k8s);
    if (slurm == -2 || kube == -2)
        return 2;
    if (slurm == 0 && kube == 0) {
        fprintf(stderr, "mergestream merge: --part auto: both SLURM_ARRAY_TASK_ID and "
                        "JOB_COMPLETION_INDEX are set; write --part I/N\n");
        return 2;
    }
    if (slurm == 0) {
        int r1 = env_u64("SLURM_ARRAY_TASK_MIN", &mn), r2 = env_u64("SLURM_ARRAY_TASK_MAX", &mx);
        int r3 = env_u64("SLURM_ARRAY_TASK_COUNT", &cnt), r4 = env_u64("SLURM_ARRAY_TASK_STEP", &step);
        if (r1 == -2 || r2 == -2 || r3 == -2 || r4 == -2)
            return 2;
        if (r1 || r2 || r3) {
            fprintf(stderr, "mergestream merge: --part auto: SLURM_ARRAY_TASK_ID is set but not "
                            "SLURM_ARRAY_TASK_MIN, _MAX and _COUNT\n");
            return 2;
        }
        if (r4)
            step = 1;
        /* Only a range min-max:step maps onto 1..N; a list such as --array=1,2,7 does not. */
        if (step == 0 || cnt == 0 || cnt > UINT32_MAX || mn > id || id > mx ||
            (id - mn) % step || (mx - mn) / step + 1 != cnt || (mx - mn) % step) {
            fprintf(stderr, "mergestream merge: --part auto: the Slurm array (task %" PRIu64
                            " of %" PRIu64 "-%" PRIu64 ":%" PRIu64 ", %" PRIu64 " tasks) is not an "
                            "evenly spaced range; write --part I/N\n", id, mn, mx, step, cnt);
            return 2;
        }
        a = (id - mn) / step + 1;
        if (has_n && b != cnt) {
            fprintf(stderr, "mergestream merge: --part %s: the Slurm array has %" PRIu64
                            " tasks, not %" PRIu64 "\n", arg, cnt, b);
            return 2;
        }
        b = cnt;
    } else if (kube == 0) {
        if (!has_n) {
            fprintf(stderr, "mergestream merge: --part auto: JOB_COMPLETION_INDEX gives the index "
                            "only; write --part auto/N with N the Job's completions\n");
            return 2;
        }
        if (b == 0 || b > UINT32_MAX || k8s >= b) {
            fprintf(stderr, "mergestream merge: --part %s: JOB_COMPLETION_INDEX %" PRIu64
                            " is not below %" PRIu64 "\n", arg, k8s, b);
            return 2;
        }
        a = k8s + 1;
    } else {
        fprintf(stderr, "mergestream merge: --part auto: neither SLURM_ARRAY_TASK_ID nor "
                        "JOB_COMPLETION_INDEX is set\n");
        return 2;
    }
done:
    *index = (unsigned)a;
    *count = (unsigned)b;
    return 0;
}

int ms_cli_merge(int argc, char **argv)
{
    struct ms_engine_opts eo;
    struct ms_plan_opts po = { .out_shard_size = 5000000000ull };
    ms_engine_opts_init(&eo);
    uint64_t v;
    int c, li;
    bool noted_v = false, lazy = true;
    const char *interdir = NULL;
    optind = 1;
    opterr = 0;
    while ((li = -1, c = getopt_long(argc, argv, ":j:qhv", merge_opts, &li)) != -1) {
        /* The option as spelled in the table (li is -1 for a short option). */
        const char *name = li >= 0 ? merge_opts[li].name : NULL;
        switch (c) {
        case OPT_MAXMEM:
            if (ms_parse_size(optarg, true, &eo.max_memory) || !eo.max_memory)
                return usage_error("invalid --max-memory", optarg);
            break;
        case 'j':
        case OPT_NUMTHREADS:
            if (parse_u64(optarg, &v) || v == 0 || v > 1024)
                return usage_error("invalid thread count", optarg);
            eo.threads = (unsigned)v;
            if (c == OPT_NUMTHREADS)
                ms_log_info("note: --num-threads is taken as --threads %u", eo.threads);
            break;
        case OPT_ISA:
            if (ms_isa_select(optarg)) {
                ms_cli_report(MS_EINVAL, NULL);
                return 2;
            }
            break;
        case OPT_SHARD:
            if (ms_parse_size(optarg, false, &po.out_shard_size))
                return usage_error("invalid --out-shard-size", optarg);
            break;
        case OPT_SEED:
            if (parse_u64(optarg, &po.seed))
                return usage_error("invalid --random-seed", optarg);
            break;
        case OPT_CRIMES: po.allow_crimes = true; break;
        case OPT_NOCRIMES: po.allow_crimes = false; break;
        case OPT_STRICT: po.strict = true; break;
        case OPT_NOSTRICT: po.strict = false; break;
        case OPT_COPYTOK: eo.copy_tokenizer = true; break;
        case OPT_NOCOPYTOK: eo.copy_tokenizer = false; break;
        case OPT_CARD: eo.write_card = true; break;
        case OPT_NOCARD: eo.write_card = false; break;
        case 'q': eo.quiet = true; break;
        case OPT_NOQUIET: eo.quiet = false; break;
        case 'h':
            fputs(merge_usage, stdout);
            ms_cli_print_methods(stdout, NULL);
            return 0;
        case OPT_CHUNK:
            if (parse_u64(optarg, &eo.chunk_elems) || !eo.chunk_elems)
                return usage_error("invalid --chunk-elems", optarg);
            break;
        case OPT_REREAD: eo.in_memory = false; break;
        case OPT_NOREREAD: eo.in_memory = true; break;
        case OPT_COMPRESS: {
            long lvl = 3;
            if (strncmp(optarg, "zstd", 4) || (optarg[4] && optarg[4] != ':'))
                return usage_error("--compress takes zstd or zstd:LEVEL, not", optarg);
            if (optarg[4] == ':') {
                char *end;
                lvl = strtol(optarg + 5, &end, 10);
                if (*end || lvl < 1 || lvl > 19)
                    return usage_error("zstd level must be 1..19:", optarg);
            }
            eo.zstd_level = (int)lvl;
            break;
        }
        case OPT_PIPE:
            if (!*optarg)
                return usage_error("--pipe needs a command", NULL);
            eo.kind = MS_OUT_PIPE;
            eo.pipe_cmd = optarg;
            break;
        case OPT_PART:
            if (parse_part(optarg, &eo.part_index, &eo.part_count))
                return 2;
            break;
        case OPT_RESUME: eo.resume = true; break;
        case OPT_NORESUME: eo.resume = false; break;
        case OPT_HFCACHE:
            /* mergekit hands it to huggingface_hub as cache_dir: the hub cache layout. */
            if (!*optarg || setenv("HF_HUB_CACHE", optarg, 1))
                return usage_error("invalid --transformers-cache", optarg);
            break;
        case OPT_STALL:
            if (parse_u64(optarg, &v) || v > 1000000)
                return usage_error("--stall-timeout takes whole seconds (0 to 1000000), not",
                                   optarg);
            eo.stall_seconds = (unsigned)v;
            break;
        case OPT_INTERDIR:
            if (!*optarg)
                return usage_error("--intermediate-dir needs a directory", NULL);
            interdir = optarg;
            break;
        case OPT_LAZY: lazy = true; break;
        case OPT_NOLAZY: lazy = false; break;
        case OPT_FORCE: eo.force = true; break;
        case OPT_LORACACHE:
            if (!*optarg)
                return usage_error("invalid --lora-merge-cache", optarg);
            po.lora_cache = optarg;
            break;
        case OPT_LORADT:
            po.lora_dtype = ms_dtype_from_recipe(optarg);
            if (!ms_dtype_is_compute(po.lora_dtype))
                return usage_error("invalid --lora-merge-dtype (bfloat16, float16 or float32)",
                                   optarg);
            break;
        case OPT_NOFORCE: eo.force = false; break;
        case OPT_UNSUP:
        case OPT_UNSUP_ARG:
            fprintf(stderr, "mergestream: --%s is not supported yet (see README: Status)\n", name);
            return 1;
        case 'v':
            if (!noted_v)
                ms_log_info("note: -v has no effect in mergestream (see --quiet)");
            noted_v = true;
            break;
        case OPT_NOOP:
        case OPT_NOOP_ARG:
            ms_log_info("note: --%s has no effect in mergestream (CPU, out of core)", name);
            break;
        case ':': return usage_error("missing value for", argv[optind - 1]);
        default: return usage_error("unknown option", argv[optind - 1]);
        }
    }
    if (argc - optind != 2)
        return usage_error("expected RECIPE.yml and OUT", NULL);
    const char *recipe_path = argv[optind];
    eo.out = argv[optind + 1];
    ms_st_set_memory(eo.max_memory); /* headers are parsed within the budget too */
    eo.seed = po.seed;
    if (!strcmp(eo.out, "-")) {
        if (eo.kind == MS_OUT_PIPE)
            return usage_error("OUT '-' and --pipe exclude each other", NULL);
        if (isatty(STDOUT_FILENO)) {
            fprintf(stderr, "mergestream: refusing to write a tar stream to a terminal; "
                            "redirect stdout or pipe it\n");
            return 2;
        }
        eo.kind = MS_OUT_TAR;
        eo.out_fd = STDOUT_FILENO;
    }
    if (eo.resume && eo.kind != MS_OUT_DIR)
        return usage_error("--resume needs a directory OUT (not '-' or --pipe)", NULL);
    /* A closed stdout or pipe is reported as EPIPE with the file's name, not a silent death. */
    signal(SIGPIPE, SIG_IGN);
    /* SIGINT/SIGTERM/SIGHUP while the recipe and plan load: remembered, and the engine
     * then stops cleanly at once (exit 130/143/129, temporaries removed). */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = ms_engine_cancel;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    /* Past RLIMIT_FSIZE a write fails with EFBIG (reported, temporaries removed)
     * instead of the process dying of SIGXFSZ with a .partial file left behind. */
    signal(SIGXFSZ, SIG_IGN);
    ms_log_set_quiet(eo.quiet);
    eo.progress = !eo.quiet && isatty(STDERR_FILENO);

    struct ms_recipe_file *file = NULL;
    struct ms_plan *p = NULL;
    int rc = ms_recipe_file_load(recipe_path, po.strict ? MS_RECIPE_STRICT : 0, &file);
    if (rc) {
        ms_cli_report(rc, NULL);
        return 1;
    }
    int status = ms_cli_multi_link(file, interdir);
    if (status) {
        ms_recipe_file_free(file);
        return status;
    }
    if (file->n > 1) {
        /* A mergekit-multi file: cli_multi.c runs its stages. */
        status = ms_cli_multi_merge(file, &po, &eo, lazy, &rc);
        ms_recipe_file_free(file);
        if (rc == MS_ECANCELED) {
            int sig = ms_engine_signal();
            return sig ? 128 + sig : 130;
        }
        return status;
    }
    const struct ms_recipe *r = file->docs[0];
    rc = ms_plan_build(r, &po, &p);
    if (rc) {
        /* ms_plan_build has printed every problem. */
        ms_recipe_file_free(file);
        return 1;
    }
    if (po.lora_cache && (rc = ms_plan_lora_cache_fill(p, po.lora_dtype)) < 0) {
        ms_cli_report(rc, NULL);
        ms_plan_free(p);
        ms_recipe_file_free(file);
        return 1;
    }
    rc = ms_engine_run(p, &eo);
    if (rc)
        ms_cli_report(rc, NULL);
    else
        ms_log_info("merged %zu tensors into %s", p->njobs, eo.out);
    ms_plan_free(p);
    ms_recipe_file_free(file);
    if (rc == MS_ECANCELED) {
        int sig = ms_engine_signal();
        return sig ? 128 + sig : 130;
    }
    return rc ? 1 : 0;
}
