/*
 * cli_merge.c - `mergestream merge RECIPE.yml OUT [options]`: recipe -> plan ->
 * engine. Option names follow mergekit-yaml where they apply.
 */
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
#include "ms_stage.h"

#include "cli.h"

static const char merge_usage[] =
    "usage: mergestream merge RECIPE.yml OUT [options]\n"
    "\n"
    "Runs the merge that RECIPE.yml (a mergekit YAML recipe) describes and writes the\n"
    "model into directory OUT: safetensors shards (and their index), config.json, the\n"
    "donor's tokenizer files, README.md and mergekit_config.yml.\n"
    "\n"
    "options:\n"
    "  --max-memory SIZE        memory for all buffers together (default 512M; K/M/G are\n"
    "                           binary here); tensors larger than this merge chunk by chunk\n"
    "  -j, --threads N          compute threads (default: number of cores)\n"
    "  --out-shard-size SIZE    maximum shard size in bytes (default 5B; K/M/B = 1e3/1e6/1e9)\n"
    "  --random-seed N          seed for methods with random masks (default 0)\n"
    "  --allow-crimes           allow models whose architectures differ\n"
    "  --copy-tokenizer / --no-copy-tokenizer\n"
    "                           copy the donor's tokenizer files (default on)\n"
    "  --write-model-card / --no-write-model-card\n"
    "                           write README.md and mergekit_config.yml (default on)\n"
    "  -q, --quiet              no progress line\n"
    "  -h, --help               this text\n"
    "\n"
    "streaming outputs:\n"
    "  OUT = -                  write the whole output directory as one tar stream on stdout\n"
    "  --compress zstd[:LEVEL]  zstd (default level 3): each shard as NAME.safetensors.zst (the\n"
    "                           index names them so), or with OUT = - the whole tar stream\n"
    "  --pipe CMD               stream each output file into the stdin of its own `sh -c CMD`;\n"
    "                           {} in CMD (and $MERGESTREAM_FILE) is the file name, e.g.\n"
    "                           --pipe 'aws s3 cp - s3://bucket/merged/{}'\n"
    "  --resume                 keep the shards an interrupted run already finished in OUT\n"
    "  --force                  write into a non-empty OUT that holds no earlier mergestream\n"
    "                           output (its other files are left alone)\n"
    "  --part I/N               write only shards k with k %% N == I-1 (1-based I), for one\n"
    "                           merge spread over N machines; part 1 also writes the other files\n"
    "\n"
    "not supported: --no-safe-serialization (PyTorch .bin output).\n"
    "\n"
    "accepted for mergekit compatibility, with no effect here: --cuda, --device,\n"
    "--low-cpu-memory, --lazy-unpickle, --read-to-gpu, --multi-gpu, --gpu-rich,\n"
    "--async-write, --write-threads N, --num-threads N (use --threads), --clone-tensors,\n"
    "--trust-remote-code, --transformers-cache DIR, --lora-merge-cache DIR,\n"
    "--safe-serialization, -v.\n"
    "\n"
    "testing knobs: --chunk-elems N caps elements per chunk; --reread makes multi-pass\n"
    "methods read their inputs again in every pass instead of keeping them in memory.\n"
    "\n"
    "exit status: 0 success, 1 failure, 2 usage, 130/143 interrupted by SIGINT/SIGTERM.\n";

enum {
    OPT_MAXMEM = 256, OPT_SHARD, OPT_SEED, OPT_CRIMES, OPT_COPYTOK, OPT_NOCOPYTOK, OPT_CARD,
    OPT_NOCARD, OPT_CHUNK, OPT_REREAD, OPT_NOOP, OPT_NOOP_ARG, OPT_UNSUP, OPT_UNSUP_ARG,
    OPT_NUMTHREADS, OPT_COMPRESS, OPT_PIPE, OPT_PART, OPT_RESUME, OPT_FORCE,
};

static const struct option merge_opts[] = {
    { "max-memory", required_argument, NULL, OPT_MAXMEM },
    { "threads", required_argument, NULL, 'j' },
    { "out-shard-size", required_argument, NULL, OPT_SHARD },
    { "random-seed", required_argument, NULL, OPT_SEED },
    { "allow-crimes", no_argument, NULL, OPT_CRIMES },
    { "copy-tokenizer", no_argument, NULL, OPT_COPYTOK },
    { "no-copy-tokenizer", no_argument, NULL, OPT_NOCOPYTOK },
    { "write-model-card", no_argument, NULL, OPT_CARD },
    { "no-write-model-card", no_argument, NULL, OPT_NOCARD },
    { "quiet", no_argument, NULL, 'q' },
    { "help", no_argument, NULL, 'h' },
    { "chunk-elems", required_argument, NULL, OPT_CHUNK },
    { "reread", no_argument, NULL, OPT_REREAD },
    { "compress", required_argument, NULL, OPT_COMPRESS },
    { "pipe", required_argument, NULL, OPT_PIPE },
    { "part", required_argument, NULL, OPT_PART },
    { "resume", no_argument, NULL, OPT_RESUME },
    { "force", no_argument, NULL, OPT_FORCE },
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
    { "async-write", no_argument, NULL, OPT_NOOP },
    { "no-async-write", no_argument, NULL, OPT_NOOP },
    { "clone-tensors", no_argument, NULL, OPT_NOOP },
    { "no-clone-tensors", no_argument, NULL, OPT_NOOP },
    { "trust-remote-code", no_argument, NULL, OPT_NOOP },
    { "no-trust-remote-code", no_argument, NULL, OPT_NOOP },
    { "safe-serialization", no_argument, NULL, OPT_NOOP },
    { "device", required_argument, NULL, OPT_NOOP_ARG },
    { "write-threads", required_argument, NULL, OPT_NOOP_ARG },
    { "transformers-cache", required_argument, NULL, OPT_NOOP_ARG },
    { "lora-merge-cache", required_argument, NULL, OPT_NOOP_ARG },
    { "lora-merge-dtype", required_argument, NULL, OPT_NOOP_ARG },
    { "verbose", no_argument, NULL, 'v' },
    { NULL, 0, NULL, 0 },
};

/* The method registry: every method with its parameters and defaults. */
static void print_methods(FILE *f)
{
    fprintf(f, "\nmerge methods (parameters: per-model ones are set under each model; "
               "'required' has no default):\n");
    const struct ms_method *m;
    for (size_t i = 0; (m = ms_method_at(i)); i++) {
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
    if (!s || !*s || *s == '-')
        return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end)
        return -1;
    *out = v;
    return 0;
}

int ms_cli_merge(int argc, char **argv)
{
    struct ms_engine_opts eo;
    struct ms_plan_opts po = { .out_shard_size = 5000000000ull };
    ms_engine_opts_init(&eo);
    uint64_t v;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":j:qhv", merge_opts, NULL)) != -1) {
        const char *name = optind > 0 && optind <= argc ? argv[optind - 1] : "";
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
        case OPT_SHARD:
            if (ms_parse_size(optarg, false, &po.out_shard_size))
                return usage_error("invalid --out-shard-size", optarg);
            break;
        case OPT_SEED:
            if (parse_u64(optarg, &po.seed))
                return usage_error("invalid --random-seed", optarg);
            break;
        case OPT_CRIMES: po.allow_crimes = true; break;
        case OPT_COPYTOK: eo.copy_tokenizer = true; break;
        case OPT_NOCOPYTOK: eo.copy_tokenizer = false; break;
        case OPT_CARD: eo.write_card = true; break;
        case OPT_NOCARD: eo.write_card = false; break;
        case 'q': eo.quiet = true; break;
        case 'h':
            fputs(merge_usage, stdout);
            print_methods(stdout);
            return 0;
        case OPT_CHUNK:
            if (parse_u64(optarg, &eo.chunk_elems) || !eo.chunk_elems)
                return usage_error("invalid --chunk-elems", optarg);
            break;
        case OPT_REREAD: eo.in_memory = false; break;
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
        case OPT_PART: {
            unsigned a, b;
            char tail;
            if (sscanf(optarg, "%u/%u%c", &a, &b, &tail) != 2 || b == 0 || a == 0 || a > b)
                return usage_error("--part takes I/N with 1 <= I <= N, not", optarg);
            eo.part_index = a;
            eo.part_count = b;
            break;
        }
        case OPT_RESUME: eo.resume = true; break;
        case OPT_FORCE: eo.force = true; break;
        case OPT_UNSUP:
        case OPT_UNSUP_ARG:
            fprintf(stderr, "mergestream: %s is not supported yet (see README: Status)\n", name);
            return 1;
        case 'v':
        case OPT_NOOP:
        case OPT_NOOP_ARG:
            ms_log_info("note: %s has no effect in mergestream (CPU, out of core)", name);
            break;
        case ':': return usage_error("missing value for", argv[optind - 1]);
        default: return usage_error("unknown option", argv[optind - 1]);
        }
    }
    if (argc - optind != 2)
        return usage_error("expected RECIPE.yml and OUT", NULL);
    const char *recipe_path = argv[optind];
    eo.out = argv[optind + 1];
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
    /* SIGINT/SIGTERM while the recipe and plan load: remembered, and the engine
     * then stops cleanly at once (exit 130/143, temporaries removed). */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = ms_engine_cancel;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    /* Past RLIMIT_FSIZE a write fails with EFBIG (reported, temporaries removed)
     * instead of the process dying of SIGXFSZ with a .partial file left behind. */
    signal(SIGXFSZ, SIG_IGN);
    ms_log_set_quiet(eo.quiet);
    eo.progress = !eo.quiet && isatty(STDERR_FILENO);

    struct ms_recipe *r = NULL;
    struct ms_plan *p = NULL;
    int rc = ms_recipe_load(recipe_path, &r);
    if (rc) {
        ms_cli_report(rc, NULL);
        return 1;
    }
    rc = ms_plan_build(r, &po, &p);
    if (rc) {
        /* ms_plan_build has printed every problem. */
        ms_recipe_free(r);
        return 1;
    }
    rc = ms_engine_run(p, &eo);
    if (rc)
        ms_cli_report(rc, NULL);
    else
        ms_log_info("merged %zu tensors into %s", p->njobs, eo.out);
    ms_plan_free(p);
    ms_recipe_free(r);
    if (rc == MS_ECANCELED) {
        int sig = ms_engine_signal();
        return sig ? 128 + sig : 130;
    }
    return rc ? 1 : 0;
}
