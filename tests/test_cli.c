/*
 * test_cli.c - the command line as a mergekit-yaml user meets it: every option in
 * the option tables is in --help and every --help option in the man page and the
 * completions; --no- forms; notes that name the option; --transformers-cache as a
 * model cache; hub ids for inspect and verify; the model card's Hub links (format of
 * mergekit's mergekit/card.py); tar member times; plan's alignment and memory line;
 * the progress line's wording; --isa.
 */
#include <criterion/criterion.h>
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ms_isa.h"
#include "th.h"

#ifndef MS_SOURCE_DIR
#define MS_SOURCE_DIR "."
#endif

#define MS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

static char *g_dir;

#define run(out, err, ...) th_run_in(g_dir, out, err, __VA_ARGS__)

#define RUN_OK(...) TH_RUN_OK(g_dir, __VA_ARGS__)

#define HASH "0123456789abcdef0123456789abcdef01234567"

/* Models base and ft1, a hub cache tc/ holding ft1 as org/tiny, and recipes. */
static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    RUN_OK("ms-mkmodel --layers 2 --hidden 64 --intermediate 96 --vocab 128 --seed 3 base "
           ">/dev/null && ms-mkmodel --base base --noise 0.01 --seed 4 ft1 >/dev/null");
    RUN_OK("mkdir -p tc/models--org--tiny/snapshots tc/models--org--tiny/refs && "
           "cp -r ft1 tc/models--org--tiny/snapshots/" HASH " && "
           "echo " HASH " > tc/models--org--tiny/refs/main");
    RUN_OK("printf 'merge_method: linear\\nmodels:\\n  - model: base\\n    parameters: {weight: 0.5}\\n"
           "  - model: ft1\\n    parameters: {weight: 0.5}\\n' > local.yml");
    RUN_OK("sed 's|model: ft1|model: org/tiny|' local.yml > hub.yml");
}

static void teardown(void)
{
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(cli, .init = setup, .fini = teardown, .timeout = 120);

/* ------------------------------------------------------------------ help, man page, completions */

static const char *const commands[] = { "merge", "plan", "inspect", "verify", "methods" };

static char *help_of(const char *cmd)
{
    char *out = NULL;
    int rc = run(&out, NULL, "mergestream %s --help", cmd);
    cr_assert_eq(rc, 0, "mergestream %s --help: exit %d", cmd, rc);
    cr_assert(out && *out);
    return out;
}

/* Whether text holds opt ("--name" or "-x") as a whole word. */
static bool has_word(const char *text, const char *opt)
{
    size_t n = strlen(opt);
    for (const char *p = strstr(text, opt); p; p = strstr(p + 1, opt)) {
        bool start = p == text || !(isalnum((unsigned char)p[-1]) || p[-1] == '-');
        bool end = !(isalnum((unsigned char)p[n]) || p[n] == '-' || p[n] == '_');
        if (start && end)
            return true;
    }
    return false;
}

/* The long options of a getopt_long table in tools/cli_<cmd>.c: { "name", ... }. */
static size_t table_options(const char *cmd, char names[][48], bool *has_arg, size_t cap)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/tools/cli_%s.c", MS_SOURCE_DIR, cmd);
    char *src = th_read(path, NULL);
    cr_assert(src, "cannot read %s", path);
    size_t n = 0;
    for (char *p = strstr(src, "{ \""); p; p = strstr(p + 1, "{ \"")) {
        char name[48];
        char kind[32];
        if (sscanf(p, "{ \"%47[a-z0-9-]\", %31[a-z_]", name, kind) != 2)
            continue;
        if (strcmp(kind, "no_argument") && strcmp(kind, "required_argument"))
            continue;
        cr_assert(n < cap);
        snprintf(names[n], 48, "%s", name);
        has_arg[n] = !strcmp(kind, "required_argument");
        n++;
    }
    free(src);
    return n;
}

Test(cli, help_names_every_accepted_option)
{
    const char *cmds[] = { "merge", "plan" };
    for (size_t c = 0; c < 2; c++) {
        char names[128][48];
        bool arg[128];
        size_t n = table_options(cmds[c], names, arg, 128);
        cr_assert_gt(n, 5, "no option table found in tools/cli_%s.c", cmds[c]);
        char *help = help_of(cmds[c]);
        for (size_t i = 0; i < n; i++) {
            char opt[64];
            snprintf(opt, sizeof opt, "--%s", names[i]);
            cr_assert(has_word(help, opt), "mergestream %s --help does not name %s", cmds[c], opt);
        }
        free(help);
    }
    /* The hand-parsed commands: every "--x" they compare against. */
    const char *files[] = { "inspect", "methods" };
    for (size_t c = 0; c < 2; c++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/tools/cli_%s.c", MS_SOURCE_DIR, files[c]);
        char *src = th_read(path, NULL);
        cr_assert(src);
        char *help = help_of(files[c]);
        char *verify_help = !strcmp(files[c], "inspect") ? help_of("verify") : NULL;
        for (char *p = strstr(src, "strcmp(a, \"--"); p; p = strstr(p + 1, "strcmp(a, \"--")) {
            char opt[64];
            if (sscanf(p, "strcmp(a, \"%63[a-z0-9-]\")", opt) != 1 || !strcmp(opt, "--"))
                continue;
            cr_assert(has_word(help, opt) || (verify_help && has_word(verify_help, opt)),
                      "mergestream %s --help does not name %s", files[c], opt);
        }
        free(verify_help);
        free(help);
        free(src);
    }
    /* No printf escapes in text that goes through fputs. */
    for (size_t c = 0; c < MS_ARRAY_LEN(commands); c++) {
        char *help = help_of(commands[c]);
        cr_assert(!strstr(help, "%%"), "literal %%%% in mergestream %s --help", commands[c]);
        free(help);
    }
}

Test(cli, every_on_off_option_has_its_no_form)
{
    const char *cmds[] = { "merge", "plan" };
    for (size_t c = 0; c < 2; c++) {
        char names[128][48];
        bool arg[128];
        size_t n = table_options(cmds[c], names, arg, 128);
        for (size_t i = 0; i < n; i++) {
            if (arg[i] || !strcmp(names[i], "help") || !strcmp(names[i], "verbose"))
                continue; /* -v counts in mergekit: it has no --no- form there either */
            char want[64];
            bool neg = !strncmp(names[i], "no-", 3);
            snprintf(want, sizeof want, neg ? "%s" : "no-%s", neg ? names[i] + 3 : names[i]);
            bool found = false;
            for (size_t k = 0; k < n; k++)
                found |= !strcmp(names[k], want);
            cr_assert(found, "merge option --%s has no --%s", names[i], want);
        }
    }
    /* and they take effect: the last one wins */
    char *out = NULL, *err = NULL;
    RUN_OK("mergestream merge local.yml t1 --no-copy-tokenizer --copy-tokenizer -q && "
           "test -f t1/tokenizer.json");
    RUN_OK("mergestream merge local.yml t2 --copy-tokenizer --no-copy-tokenizer -q && "
           "test ! -f t2/tokenizer.json");
    RUN_OK("mergestream merge local.yml t3 --no-write-model-card -q --write-model-card && "
           "test -f t3/README.md");
    cr_assert_eq(run(NULL, &err, "mergestream merge local.yml t4 -q --no-quiet"), 0, "%s", err);
    cr_assert(strstr(err, "merged"), "--no-quiet after -q: %s", err);
    free(err);
    cr_assert_eq(run(NULL, &err, "mergestream merge local.yml t5 --no-quiet --quiet"), 0);
    cr_assert_str_empty(err, "--quiet after --no-quiet: %s", err);
    free(err);
    cr_assert_eq(run(&out, NULL, "mergestream plan local.yml --json --no-json"), 0);
    cr_assert(!strncmp(out, "recipe:", 7), "--no-json after --json: %.80s", out);
    free(out);
    cr_assert_eq(run(&out, NULL, "mergestream plan local.yml --no-json --json"), 0);
    cr_assert_eq(out[0], '{', "--json after --no-json: %.80s", out);
    free(out);
    cr_assert_eq(run(&out, NULL, "mergestream inspect base --json --no-json"), 0);
    cr_assert(!strncmp(out, "NAME", 4), "inspect --no-json: %.80s", out);
    free(out);
    /* --resume then --no-resume: a tar stream is allowed again */
    RUN_OK("mergestream merge local.yml - -q --resume --no-resume > t.tar && test -s t.tar");

    /* --allow-crimes / --no-allow-crimes on models whose architectures differ */
    RUN_OK("cp -r ft1 other && sed -i 's/LlamaForCausalLM/MistralForCausalLM/' other/config.json"
           " && sed 's|model: ft1|model: other|' local.yml > crimes.yml");
    cr_assert_eq(run(NULL, &err, "mergestream merge crimes.yml c1 -q"), 1);
    cr_assert(strstr(err, "architecture") || strstr(err, "Architecture"), "%s", err);
    free(err);
    RUN_OK("mergestream merge crimes.yml c2 -q --no-allow-crimes --allow-crimes");
    cr_assert_eq(run(NULL, NULL, "mergestream merge crimes.yml c3 -q --allow-crimes "
                                 "--no-allow-crimes"), 1);
    RUN_OK("mergestream plan crimes.yml -q --allow-crimes");
    cr_assert_eq(run(NULL, NULL, "mergestream plan crimes.yml -q --allow-crimes "
                                 "--no-allow-crimes"), 1);
}

/* A --help option as the man page source spells it: every '-' as "\-". */
static void roff_escape(const char *opt, char *buf, size_t cap)
{
    size_t k = 0;
    for (const char *p = opt; *p && k + 3 < cap; p++) {
        if (*p == '-')
            buf[k++] = '\\';
        buf[k++] = *p;
    }
    buf[k] = 0;
}

Test(cli, man_page_describes_every_help_option_and_method)
{
    char *man = th_read(MS_BUILD_DIR "/mergestream.1", NULL);
    cr_assert(man, "no " MS_BUILD_DIR "/mergestream.1 (make builds it)");
    size_t nopt = 0;
    for (size_t c = 0; c <= MS_ARRAY_LEN(commands); c++) {
        char *help = c < MS_ARRAY_LEN(commands) ? help_of(commands[c]) : NULL;
        if (!help)
            cr_assert_eq(run(&help, NULL, "mergestream --help"), 0);
        for (char *p = strstr(help, "--"); p; p = strstr(p + 2, "--")) {
            size_t n = 2;
            while (isalnum((unsigned char)p[n]) || (p[n] == '-' && isalnum((unsigned char)p[n + 1])))
                n++;
            if (n == 2 || (n == 4 && !strncmp(p, "--no", 4)))
                continue; /* "--" or the "--no- form" of the text */
            char opt[64], esc[160];
            snprintf(opt, sizeof opt, "%.*s", (int)n, p);
            roff_escape(opt, esc, sizeof esc);
            cr_assert(has_word(man, esc), "the man page does not describe %s (from %s --help)", opt,
                      c < MS_ARRAY_LEN(commands) ? commands[c] : "mergestream");
            nopt++;
        }
        free(help);
    }
    cr_assert_gt(nopt, 50);
    char *names = NULL;
    cr_assert_eq(run(&names, NULL, "mergestream methods --names"), 0);
    size_t nm = 0;
    for (char *line = strtok(names, "\n"); line; line = strtok(NULL, "\n"), nm++) {
        char want[96];
        snprintf(want, sizeof want, "\n.B %s\n", line);
        cr_assert(strstr(man, want), "the man page does not list method %s", line);
    }
    cr_assert_geq(nm, 20);
    free(names);
    /* exit statuses and the environment the code reads */
    const char *need[] = { "\n.B 0\n", "\n.B 1\n", "\n.B 2\n", "129", "130", "143", "HF_HUB_CACHE",
                           "HF_HOME", "MERGESTREAM_FILE", "SOURCE_DATE_EPOCH", "rclone rcat",
                           "aws s3 cp" };
    for (size_t i = 0; i < MS_ARRAY_LEN(need); i++)
        cr_assert(strstr(man, need[i]), "the man page lacks %s", need[i]);
    free(man);
    /* It renders without warnings. */
    char *err = NULL;
    int rc = run(NULL, &err, "command -v groff >/dev/null || exit 77; "
                             "groff -man -ww -z '%s/mergestream.1'", MS_BUILD_DIR);
    if (rc == 77)
        cr_skip_test("groff is not installed");
    cr_assert_eq(rc, 0);
    cr_assert_str_empty(err, "groff warnings: %s", err);
    free(err);
}

/* Words bash completion offers for the command line WORDS (the last one is completed). */
static char *bash_complete(const char *words)
{
    char *out = NULL, *err = NULL;
    int rc = run(&out, &err,
                 "bash -c 'source \"$0\"; COMP_WORDS=(%s); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); "
                 "_mergestream; for w in \"${COMPREPLY[@]}\"; do echo \"$w\"; done' "
                 "'%s/completions/mergestream.bash'",
                 words, MS_BUILD_DIR);
    cr_assert_eq(rc, 0, "bash completion of %s: %s", words, err);
    free(err);
    return out;
}

Test(cli, bash_completion_offers_commands_options_and_methods)
{
    char *out = bash_complete("mergestream me");
    cr_assert_str_eq(out, "merge\nmethods\n");
    free(out);
    out = bash_complete("mergestream merge --no-al");
    cr_assert_str_eq(out, "--no-allow-crimes\n");
    free(out);
    out = bash_complete("mergestream plan --tra");
    cr_assert_str_eq(out, "--transformers-cache\n");
    free(out);
    out = bash_complete("mergestream merge r.yml out --transformers-cache t");
    cr_assert_str_eq(out, "tc\n", "a directory after --transformers-cache: %s", out);
    free(out);
    out = bash_complete("mergestream merge --max-memory \"\"");
    cr_assert_str_empty(out, "no words for a size: %s", out);
    free(out);
    /* every method of the registry, and only those */
    char *names = NULL;
    cr_assert_eq(run(&names, NULL, "mergestream methods --names | sort"), 0);
    out = bash_complete("mergestream methods \"\"");
    char *sorted = NULL;
    char *p = th_path(g_dir, "offered");
    cr_assert_eq(th_write(p, out, strlen(out)), 0);
    cr_assert_eq(run(&sorted, NULL, "sort offered"), 0);
    cr_assert_str_eq(sorted, names);
    free(p);
    free(sorted);
    free(out);
    /* every option of every command's --help */
    for (size_t c = 0; c < MS_ARRAY_LEN(commands); c++) {
        char words[64];
        snprintf(words, sizeof words, "mergestream %s -", commands[c]);
        out = bash_complete(words);
        char *help = help_of(commands[c]);
        for (char *q = strstr(help, "--"); q; q = strstr(q + 2, "--")) {
            size_t n = 2;
            while (isalnum((unsigned char)q[n]) || (q[n] == '-' && isalnum((unsigned char)q[n + 1])))
                n++;
            if (n == 2 || (n == 4 && !strncmp(q, "--no", 4)))
                continue;
            char opt[64];
            snprintf(opt, sizeof opt, "\n%.*s\n", (int)n, q);
            cr_assert(strstr(out, opt) || !strncmp(out, opt + 1, n + 1),
                      "bash completion of %s lacks %.*s", commands[c], (int)n, q);
        }
        free(help);
        free(out);
    }
    free(names);
}

Test(cli, zsh_completion_is_valid_and_lists_methods)
{
    if (run(NULL, NULL, "command -v zsh >/dev/null"))
        cr_skip_test("zsh is not installed (make test-deps installs it)");
    char *err = NULL;
    cr_assert_eq(run(NULL, &err, "zsh -n '%s/completions/_mergestream'", MS_BUILD_DIR), 0, "%s",
                 err);
    free(err);
    char *z = th_read(MS_BUILD_DIR "/completions/_mergestream", NULL);
    cr_assert(z);
    cr_assert(!strncmp(z, "#compdef mergestream\n", 21));
    char *names = NULL;
    cr_assert_eq(run(&names, NULL, "mergestream methods --names"), 0);
    for (char *line = strtok(names, "\n"); line; line = strtok(NULL, "\n"))
        cr_assert(has_word(z, line), "zsh completion lacks method %s", line);
    cr_assert(has_word(z, "--no-allow-crimes") && has_word(z, "--transformers-cache"));
    free(names);
    free(z);
}

/* ------------------------------------------------------------------ merge options */

Test(cli, notes_name_the_option_not_its_value)
{
    char *err = NULL;
    cr_assert_eq(run(NULL, &err, "mergestream merge local.yml out -vv --device cpu "
                                 "--lora-merge-dtype bfloat16 --write-threads 3 --no-cuda "
                                 "--lora-merge-cache lmc"), 0, "%s", err);
    const char *want[] = { "note: -v has no effect", "note: --device has no effect",
                           "note: --write-threads has no effect", "note: --no-cuda has no effect" };
    for (size_t i = 0; i < MS_ARRAY_LEN(want); i++)
        cr_assert(strstr(err, want[i]), "missing '%s' in:\n%s", want[i], err);
    const char *v = strstr(err, "note: -v");
    cr_assert(!strstr(v + 1, "note: -v"), "-vv noted twice:\n%s", err);
    /* --lora-merge-dtype and --lora-merge-cache are real options now (test_lora.c) */
    const char *bad[] = { "note: cpu", "note: out", "note: 3", "note: bfloat16", "note: lmc",
                          "--lora-merge-dtype", "--lora-merge-cache" };
    for (size_t i = 0; i < MS_ARRAY_LEN(bad); i++)
        cr_assert(!strstr(err, bad[i]), "'%s' in:\n%s", bad[i], err);
    free(err);
}

/* --isa: each version this CPU runs writes the bytes of the default choice;
 * an unknown name, or one the CPU or build cannot run, is a one-line usage error. */
Test(cli, isa_option_forces_a_version_or_refuses_in_one_line)
{
    static const char *const names[] = { "scalar", "avx2", "avx512", "auto" };
    RUN_OK("mergestream merge local.yml isa-def -q");
    for (size_t i = 0; i < MS_ARRAY_LEN(names); i++) {
        if (i < MS_ISA_COUNT && !ms_isa_available((enum ms_isa)i))
            continue;
        RUN_OK("mergestream merge local.yml isa-%s -q --isa %s && "
               "cmp isa-def/model.safetensors isa-%s/model.safetensors",
               names[i], names[i], names[i]);
    }
    /* --isa wins over MERGESTREAM_ISA */
    RUN_OK("MERGESTREAM_ISA=scalar mergestream merge local.yml isa-env -q --isa auto && "
           "cmp isa-def/model.safetensors isa-env/model.safetensors");
    char *err = NULL;
    cr_assert_eq(run(NULL, &err, "mergestream merge local.yml isa-bad -q --isa sse9"), 2);
    cr_assert(strstr(err, "--isa: 'sse9' is not one of scalar, avx2, avx512, auto"), "%s", err);
    cr_assert(strchr(err, '\n') == err + strlen(err) - 1, "not one line:\n%s", err);
    free(err);
    for (int i = 1; i < MS_ISA_COUNT; i++) {
        if (ms_isa_available((enum ms_isa)i))
            continue;
        err = NULL;
        cr_assert_eq(run(NULL, &err, "mergestream merge local.yml isa-na -q --isa %s",
                         ms_isa_name((enum ms_isa)i)), 2);
        cr_assert(strstr(err, "is not available on this CPU or build"), "%s", err);
        cr_assert(strchr(err, '\n') == err + strlen(err) - 1, "not one line:\n%s", err);
        free(err);
    }
}

Test(cli, transformers_cache_is_the_model_cache)
{
    char *err = NULL;
    const char *env = "env -u HF_HOME HF_HUB_CACHE=/nonexistent-ms-cache";
    cr_assert_eq(run(NULL, &err, "%s mergestream merge hub.yml h0 -q", env), 1);
    cr_assert(strstr(err, "org/tiny") && strstr(err, "not found"), "%s", err);
    free(err);
    RUN_OK("%s mergestream merge hub.yml h1 -q --transformers-cache tc", env);
    RUN_OK("%s mergestream plan hub.yml -q --transformers-cache \"$PWD/tc\"", env);
    /* the same bytes as the merge of the local copy */
    RUN_OK("mergestream merge local.yml l1 -q && cmp h1/model.safetensors l1/model.safetensors");
}

Test(cli, inspect_and_verify_take_hub_ids)
{
    char *a = NULL, *b = NULL;
    cr_assert_eq(run(&a, NULL, "HF_HUB_CACHE=tc mergestream inspect org/tiny"), 0);
    cr_assert_eq(run(&b, NULL, "mergestream inspect ft1"), 0);
    cr_assert_str_eq(a, b);
    free(a);
    free(b);
    cr_assert_eq(run(&a, NULL, "HF_HUB_CACHE=tc mergestream verify org/tiny base"), 0);
    cr_assert(!strncmp(a, "ok: org/tiny (", 14), "%s", a);
    cr_assert(strstr(a, "\nok: base ("), "%s", a);
    free(a);
    /* not in the cache: the usual one-line error, exit 1 */
    cr_assert_eq(run(NULL, &b, "HF_HUB_CACHE=tc mergestream verify org/absent"), 1);
    cr_assert(strstr(b, "org/absent"), "%s", b);
    free(b);
    cr_assert_eq(run(NULL, &b, "HF_HUB_CACHE=tc mergestream inspect org/absent"), 1);
    cr_assert(strstr(b, "org/absent"), "%s", b);
    free(b);
}

/* ------------------------------------------------------------------ outputs */

/* mergekit/card.py: maybe_link_hf gives "[id](https://huggingface.co/id)" for a hub id,
 * used in the base text and in every bullet; local paths stay as they are. */
Test(cli, model_card_links_hub_models)
{
    RUN_OK("HF_HUB_CACHE=tc mergestream merge hub.yml m1 -q");
    char *p = th_path(g_dir, "m1/README.md");
    char *card = th_read(p, NULL);
    cr_assert(card);
    cr_assert(strstr(card, "base_model:\n- org/tiny\n"), "%s", card);
    cr_assert(strstr(card, "merge:\n* base\n* [org/tiny](https://huggingface.co/org/tiny)\n"),
              "%s", card);
    free(card);
    free(p);
    RUN_OK("printf 'merge_method: task_arithmetic\\nbase_model: org/tiny\\nmodels:\\n"
           "  - model: base\\n    parameters: {weight: 0.5}\\n' > ta.yml && "
           "HF_HUB_CACHE=tc mergestream merge ta.yml m2 -q");
    p = th_path(g_dir, "m2/README.md");
    card = th_read(p, NULL);
    cr_assert(strstr(card, " merge method using [org/tiny](https://huggingface.co/org/tiny) as "
                           "a base.\n"), "%s", card);
    cr_assert(strstr(card, "merge:\n* base\n\n"), "%s", card);
    free(card);
    free(p);
}

Test(cli, tar_members_carry_the_merge_time)
{
    time_t t0 = time(NULL);
    RUN_OK("mergestream merge local.yml - -q > now.tar");
    time_t t1 = time(NULL);
    /* ustar header: mtime is 11 octal digits at offset 136 of each 512-byte header */
    char *out = NULL;
    cr_assert_eq(run(&out, NULL, "dd if=now.tar bs=1 skip=136 count=11 2>/dev/null"), 0);
    long long m = strtoll(out, NULL, 8);
    free(out);
    cr_assert(m >= (long long)t0 && m <= (long long)t1, "member mtime %lld not in [%lld, %lld]",
              m, (long long)t0, (long long)t1);
    /* every member, as GNU tar reads them; SOURCE_DATE_EPOCH fixes the time */
    RUN_OK("SOURCE_DATE_EPOCH=1700000000 mergestream merge local.yml - -q > fixed.tar && "
           "TZ=UTC tar -tv --full-time -f fixed.tar > list && test -s list && "
           "! grep -v ' 2023-11-14 22:13:20 ' list");
}

Test(cli, plan_aligns_long_names_and_shows_memory_in_use)
{
    const char *lng = "a-fine-tune-whose-directory-name-is-long";
    RUN_OK("cp -r ft1 %s && sed 's|model: ft1|model: %s|' local.yml > long.yml", lng, lng);
    char *out = NULL;
    cr_assert_eq(run(&out, NULL, "mergestream plan long.yml"), 0);
    /* "  weight       REF<pad> 0.5": the value starts in the same column on both lines */
    const char *l1 = strstr(out, "\n  weight       base ");
    const char *l2 = strstr(out, "\n  weight       a-fine-tune");
    cr_assert(l1 && l2, "%s", out);
    const char *v1 = strstr(l1, " 0.5\n"), *v2 = strstr(l2, " 0.5\n");
    cr_assert(v1 && v2, "%s", out);
    cr_assert_eq(v1 - l1, v2 - l2, "columns differ:\n%s", out);
    const char *mem = strstr(out, "\nmemory:       at most ");
    cr_assert(mem && strstr(mem, " in use (buffers of ") && strstr(mem, " reserved at --max-memory "),
              "%s", out);
    free(out);
    /* the figures: what the chunks touch is within the reservation, and a 100 kB model
     * does not touch the whole 512 MiB */
    cr_assert_eq(run(&out, NULL, "mergestream plan long.yml --json | "
                                 "grep -E '\"(pool|used)_bytes\"' | tr -dc '0-9\\n'"), 0);
    unsigned long long pool = 0, used = 0;
    cr_assert_eq(sscanf(out, "%llu\n%llu", &pool, &used), 2, "%s", out);
    free(out);
    cr_assert_gt(used, 0);
    cr_assert_lt(used, pool);
    cr_assert_leq(pool, 512ull << 20);
}

Test(cli, progress_line_says_read_plus_written)
{
    if (run(NULL, NULL, "command -v script >/dev/null"))
        cr_skip_test("script(1) is not installed: no terminal to draw the progress line on");
    char *out = NULL;
    /* script(1) gives the merge a terminal, where the progress line is drawn. */
    cr_assert_eq(run(&out, NULL, "script -qec 'mergestream merge local.yml pr' /dev/null"), 0);
    cr_assert(strstr(out, " read+written "), "%s", out);
    cr_assert(strstr(out, " tensors] "), "%s", out);
    free(out);
}

/* ------------------------------------------------------------------ install */

Test(cli, make_install_and_uninstall_with_prefix_and_destdir)
{
    if (run(NULL, NULL, "command -v make >/dev/null"))
        cr_skip_test("make is not installed");
    /* -o: take what this build made as is (the test must not rebuild it). */
    char mk[2048];
    snprintf(mk, sizeof mk, "make -s --no-print-directory -C '%s' BUILD='%s' -o '%s/mergestream' "
             "-o '%s/mergestream.1' -o '%s/completions/mergestream.bash' "
             "-o '%s/completions/_mergestream'", MS_SOURCE_DIR, MS_BUILD_DIR, MS_BUILD_DIR,
             MS_BUILD_DIR, MS_BUILD_DIR, MS_BUILD_DIR);
    RUN_OK("%s install DESTDIR=\"$PWD/stage\" PREFIX=/usr >/dev/null", mk);
    char *out = NULL;
    cr_assert_eq(run(&out, NULL, "cd stage && find . -type f | sort"), 0);
    cr_assert_str_eq(out, "./usr/bin/mergestream\n"
                          "./usr/share/bash-completion/completions/mergestream\n"
                          "./usr/share/man/man1/mergestream.1\n"
                          "./usr/share/zsh/site-functions/_mergestream\n");
    free(out);
    RUN_OK("test -x stage/usr/bin/mergestream && stage/usr/bin/mergestream --version | "
           "grep -q '^mergestream [0-9]'");
    RUN_OK("cmp stage/usr/share/man/man1/mergestream.1 '%s/mergestream.1'", MS_BUILD_DIR);
    RUN_OK("%s uninstall DESTDIR=\"$PWD/stage\" PREFIX=/usr >/dev/null && "
           "test -z \"$(find stage -type f)\"", mk);
    /* the default prefix */
    cr_assert_eq(run(&out, NULL, "%s -n install DESTDIR=/d", mk), 0);
    cr_assert(strstr(out, "/d/usr/local/bin/mergestream") &&
              strstr(out, "/d/usr/local/share/man/man1/mergestream.1"), "%s", out);
    free(out);
}
