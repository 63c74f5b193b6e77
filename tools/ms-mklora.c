/*
 * ms-mklora.c - deterministic synthetic PEFT LoRA adapter for tests and demos.
 *
 *   ms-mklora --model DIR [--r R] [--alpha A] [--rslora] [--fan-in-fan-out]
 *             [--targets q_proj,v_proj,embed_tokens] [--dtype F32|BF16|F16]
 *             [--seed S] [--std X] OUT_DIR
 *
 * For every 2-D tensor "<module>.weight" of the model whose last module name
 * component is in --targets, writes lora_A / lora_B (lora_embedding_A / _B for a
 * module named embed_tokens) with PEFT's shapes and key names into
 * OUT_DIR/adapter_model.safetensors, and OUT_DIR/adapter_config.json. With
 * --fan-in-fan-out the matrices are laid out for a weight stored (in, out) (GPT-2
 * Conv1D style). --bad-rank K (tests) gives lora_B rank K instead of r on the first
 * module. Values: a counter-based generator, uniform in [-std*sqrt(3), std*sqrt(3)],
 * the same bytes on every machine. Small: everything is held in memory.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ms_common.h"
#include "ms_dtype.h"
#include "ms_safetensors.h"
#include "ms_str.h"

#define PROG "ms-mklora"

static const char usage[] =
    "usage: ms-mklora --model DIR [options] OUT_DIR\n"
    "\n"
    "Writes a deterministic synthetic PEFT LoRA adapter for the model in DIR\n"
    "(adapter_config.json and adapter_model.safetensors) into OUT_DIR.\n"
    "\n"
    "  --r R               rank (default 4)\n"
    "  --alpha A           lora_alpha (default 8)\n"
    "  --rslora            use_rslora: scale alpha/sqrt(r)\n"
    "  --fan-in-fan-out    matrices for weights stored (in, out)\n"
    "  --targets LIST      comma-separated module names (default q_proj,v_proj)\n"
    "  --dtype DT          F32 (default), BF16 or F16\n"
    "  --seed S            generator seed (default 1)\n"
    "  --std X             standard deviation of the values (default 0.05)\n"
    "  --bad-rank K        (tests) the first module's lora_B has rank K\n";

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static bool targeted(const char *module, const char *targets)
{
    const char *last = strrchr(module, '.');
    last = last ? last + 1 : module;
    size_t n = strlen(last);
    for (const char *p = targets; *p;) {
        const char *c = strchr(p, ',');
        size_t len = c ? (size_t)(c - p) : strlen(p);
        if (len == n && !strncmp(p, last, n))
            return true;
        p += len + (c ? 1 : 0);
    }
    return false;
}

/* Fills a tensor of n values (seeded by name) encoded in dt. */
static void *gen(const char *name, uint64_t seed, double std, enum ms_dtype dt, uint64_t n)
{
    unsigned eb = ms_dtype_bits(dt) / 8;
    float *f = malloc(n * sizeof *f + 1);
    unsigned char *out = malloc(n * eb + 1);
    if (!f || !out) {
        free(f);
        free(out);
        return NULL;
    }
    uint64_t h = hash_str(name) ^ mix(seed);
    for (uint64_t e = 0; e < n; e++) {
        double u = (double)(mix(h + e) >> 11) / 9007199254740992.0; /* [0, 1) */
        f[e] = (float)((2.0 * u - 1.0) * std * 1.7320508075688772);
    }
    if (dt == MS_DT_BF16)
        ms_f32_to_bf16(f, (uint16_t *)(void *)out, n);
    else if (dt == MS_DT_F16)
        ms_f32_to_f16(f, (uint16_t *)(void *)out, n);
    else
        memcpy(out, f, n * 4);
    free(f);
    return out;
}

int main(int argc, char **argv)
{
    const char *model_dir = NULL, *out_dir = NULL, *targets = "q_proj,v_proj";
    unsigned r = 4, bad_rank = 0;
    double alpha = 8, std = 0.05;
    bool rslora = false, fifo = false;
    uint64_t seed = 1;
    enum ms_dtype dt = MS_DT_F32;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage, stdout);
            return 0;
        } else if (!strcmp(a, "--rslora")) {
            rslora = true;
        } else if (!strcmp(a, "--fan-in-fan-out")) {
            fifo = true;
        } else if (a[0] == '-' && a[1] == '-' && !v) {
            fprintf(stderr, PROG ": missing value for %s\n", a);
            return 2;
        } else if (!strcmp(a, "--model")) {
            model_dir = argv[++i];
        } else if (!strcmp(a, "--r")) {
            r = (unsigned)strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(a, "--bad-rank")) {
            bad_rank = (unsigned)strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(a, "--alpha")) {
            alpha = strtod(argv[++i], NULL);
        } else if (!strcmp(a, "--std")) {
            std = strtod(argv[++i], NULL);
        } else if (!strcmp(a, "--seed")) {
            seed = strtoull(argv[++i], NULL, 10);
        } else if (!strcmp(a, "--targets")) {
            targets = argv[++i];
        } else if (!strcmp(a, "--dtype")) {
            dt = ms_dtype_from_name(v, strlen(v));
            i++;
            if (dt != MS_DT_F32 && dt != MS_DT_BF16 && dt != MS_DT_F16) {
                fprintf(stderr, PROG ": --dtype must be F32, BF16 or F16\n");
                return 2;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, PROG ": unknown option %s\n", a);
            return 2;
        } else {
            out_dir = a;
        }
    }
    if (!model_dir || !out_dir) {
        fputs(usage, stderr);
        return 2;
    }
    struct ms_model *m = NULL;
    if (ms_model_open(model_dir, &m) < 0) {
        fprintf(stderr, PROG ": %s\n", ms_errmsg());
        return 1;
    }
    if (mkdir(out_dir, 0755) < 0 && errno != EEXIST) {
        fprintf(stderr, PROG ": %s: %s\n", out_dir, strerror(errno));
        return 1;
    }
    size_t cap = 2 * m->ntensors, n = 0;
    struct ms_out_tensor *t = calloc(cap + 1, sizeof *t);
    void **data = calloc(cap + 1, sizeof *data);
    char **names = calloc(cap + 1, sizeof *names);
    struct ms_strbuf mods = { 0 };
    int rc = 1;
    if (!t || !data || !names)
        goto out;
    for (size_t i = 0; i < m->ntensors; i++) {
        const struct ms_st_tensor *w = ms_model_tensor_at(m, i, NULL);
        size_t len = strlen(w->name);
        if (w->ndim != 2 || len < 8 || strcmp(w->name + len - 7, ".weight"))
            continue;
        char module[512];
        snprintf(module, sizeof module, "%.*s", (int)(len - 7), w->name);
        if (!targeted(module, targets))
            continue;
        bool embed = strstr(module, "embed_tokens") != NULL;
        bool tr = embed || fifo;
        uint64_t rows = (uint64_t)w->shape[0], cols = (uint64_t)w->shape[1];
        uint64_t na = tr ? rows : cols, nb = tr ? cols : rows;
        unsigned rb = (bad_rank && n == 0) ? bad_rank : r;
        for (int k = 0; k < 2; k++) {
            struct ms_out_tensor *o = &t[n];
            names[n] =
                embed ? ms_asprintf("base_model.model.%s.lora_embedding_%c", module, k ? 'B' : 'A')
                      : ms_asprintf("base_model.model.%s.lora_%c.weight", module, k ? 'B' : 'A');
            if (!names[n])
                goto out;
            o->name = names[n];
            o->dtype = dt;
            o->ndim = 2;
            o->shape[0] = k ? (int64_t)nb : (int64_t)r;
            o->shape[1] = k ? (int64_t)rb : (int64_t)na;
            uint64_t cnt = (uint64_t)o->shape[0] * (uint64_t)o->shape[1];
            o->nbytes = cnt * (ms_dtype_bits(dt) / 8);
            data[n] = gen(names[n], seed, std, dt, cnt);
            if (!data[n])
                goto out;
            n++;
        }
    }
    /* target_modules as PEFT writes it: the short names. */
    ms_strbuf_addstr(&mods, "[");
    for (const char *p = targets; *p;) {
        const char *c = strchr(p, ',');
        size_t len = c ? (size_t)(c - p) : strlen(p);
        ms_strbuf_addf(&mods, "%s\"%.*s\"", p == targets ? "" : ", ", (int)len, p);
        p += len + (c ? 1 : 0);
    }
    ms_strbuf_addstr(&mods, "]");
    char *cfg = ms_asprintf(
        "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": \"CAUSAL_LM\",\n  \"r\": %u,\n"
        "  \"lora_alpha\": %.17g,\n  \"lora_dropout\": 0.0,\n  \"use_rslora\": %s,\n"
        "  \"fan_in_fan_out\": %s,\n  \"use_dora\": false,\n  \"bias\": \"none\",\n"
        "  \"rank_pattern\": {},\n  \"alpha_pattern\": {},\n  \"target_modules\": %s\n}\n",
        r, alpha, rslora ? "true" : "false", fifo ? "true" : "false", mods.p ? mods.p : "[]");
    char *cpath = ms_asprintf("%s/adapter_config.json", out_dir);
    char *spath = ms_asprintf("%s/adapter_model.safetensors", out_dir);
    if (cfg && cpath && spath && ms_write_file_atomic(cpath, cfg, strlen(cfg)) == 0 &&
        ms_st_write_file(spath, t, (const void *const *)data, n) == 0)
        rc = 0;
    else
        fprintf(stderr, PROG ": %s\n", ms_errmsg());
    ms_free(cfg);
    ms_free(cpath);
    ms_free(spath);
out:
    for (size_t i = 0; i < n + 1 && names; i++) {
        ms_free(names[i]);
        free(data ? data[i] : NULL);
    }
    free(t);
    free(data);
    free(names);
    ms_strbuf_fini(&mods);
    ms_model_free(m);
    return rc;
}
