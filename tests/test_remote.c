/*
 * test_remote.c - models read over HTTP range requests (io/http.c), against
 * servers on loopback that the tests start:
 *   - Debian's nginx (`nginx -c CONF -p PREFIX`, daemon off, as the current user)
 *     serving generated models, with range support as for any static file;
 *   - a small fault-injecting server in this file (a thread, one more per
 *     connection) serving the same files: it cuts connections mid-body, answers
 *     503, lies about the file size in Content-Range, or ignores Range.
 * Expected bytes are those of the same merge from the local files.
 */
#define _GNU_SOURCE /* memmem, strcasestr */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "th.h"

static char *g_dir;
static pid_t g_nginx = -1;
static int g_port;

/* A free loopback port: bound to port 0, read back, released. */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t n = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &n) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static bool port_open(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    if (fd >= 0)
        close(fd);
    return ok;
}

static const char *nginx_bin(void)
{
    static const char *const c[] = { "/usr/sbin/nginx", "/usr/bin/nginx" };
    for (size_t i = 0; i < 2; i++)
        if (access(c[i], X_OK) == 0)
            return c[i];
    return NULL;
}

/* Models: www/m/{base,ft1,ft2} sharded with an index, www/m/one a single file;
 * www/hf/org/NAME/resolve/main -> the same directories (the hub's layout). */
static void make_models(void)
{
    TH_RUN_OK(g_dir,
              "mkdir -p www/m logs tmp && "
              "ms-mkmodel --layers 2 --hidden 64 --shard-size 40KiB www/m/base >/dev/null && "
              "ms-mkmodel --base www/m/base --seed 1 www/m/ft1 >/dev/null && "
              "ms-mkmodel --base www/m/base --seed 2 --noise 0.02 www/m/ft2 >/dev/null && "
              "ms-mkmodel --base www/m/base --seed 3 --shard-size 0 www/m/one >/dev/null && "
              "for n in base ft1 ft2; do mkdir -p www/hf/org/$n/resolve && "
              "ln -s ../../../../m/$n www/hf/org/$n/resolve/main; done");
    /* ties over the four: a base, three sharded or not, every tensor read by range */
    const char *recipe = "merge_method: ties\n"
                         "base_model: M/base\n"
                         "dtype: bfloat16\n"
                         "parameters: {density: 0.6, weight: 0.5}\n"
                         "models:\n"
                         "  - model: M/ft1\n"
                         "  - model: M/ft2\n"
                         "  - model: M/one\n";
    char *p = th_path(g_dir, "t.yml");
    cr_assert_eq(th_write(p, recipe, strlen(recipe)), 0);
    free(p);
}

static void setup(void)
{
    g_dir = th_tmpdir();
    cr_assert(g_dir);
    chmod(g_dir, 0755); /* nginx's worker may run as another user (www-data under root) */
    make_models();
    const char *bin = nginx_bin();
    if (!bin)
        return;
    g_port = free_port();
    cr_assert_gt(g_port, 0);
    char conf[4096];
    snprintf(conf, sizeof conf,
             "daemon off;\nworker_processes 1;\npid %s/nginx.pid;\n"
             "error_log %s/logs/error.log;\nevents { worker_connections 256; }\n"
             "http {\n"
             "  log_format t '$connection $request_uri $http_range $status $http_authorization';\n"
             "  access_log %s/logs/access.log t;\n"
             "  client_body_temp_path %s/tmp; proxy_temp_path %s/tmp;\n"
             "  fastcgi_temp_path %s/tmp; uwsgi_temp_path %s/tmp; scgi_temp_path %s/tmp;\n"
             "  keepalive_requests 100000;\n"
             "  server { listen 127.0.0.1:%d; root %s/www; }\n}\n",
             g_dir, g_dir, g_dir, g_dir, g_dir, g_dir, g_dir, g_dir, g_port, g_dir);
    char *cp = th_path(g_dir, "nginx.conf");
    cr_assert_eq(th_write(cp, conf, strlen(conf)), 0);
    g_nginx = fork();
    cr_assert_geq(g_nginx, 0);
    if (g_nginx == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* a crashed test leaves no server behind */
        int nul = open("/dev/null", O_RDWR);
        dup2(nul, 1);
        dup2(nul, 2);
        execl(bin, "nginx", "-c", cp, "-p", g_dir, (char *)NULL);
        _exit(127);
    }
    free(cp);
    for (int i = 0; i < 200 && !port_open(g_port); i++)
        usleep(20000);
    cr_assert(port_open(g_port), "nginx did not start on port %d", g_port);
}

static void teardown(void)
{
    if (g_nginx > 0) {
        kill(g_nginx, SIGTERM);
        waitpid(g_nginx, NULL, 0);
        g_nginx = -1;
    }
    th_rmtree(g_dir);
    free(g_dir);
}

TestSuite(remote, .init = setup, .fini = teardown, .timeout = 300);

#define NEED_NGINX()                                                                               \
    do {                                                                                           \
        if (g_nginx <= 0)                                                                          \
            cr_skip_test("nginx is not installed (Debian package nginx; make test-deps)");         \
    } while (0)

/* Writes DIR/NAME: the recipe t.yml with M replaced by prefix. */
static void recipe_at(const char *name, const char *prefix)
{
    TH_RUN_OK(g_dir, "sed 's#M/#%s/#' t.yml > %s", prefix, name);
}

/* The safetensors files, config and tokenizer files of two outputs are equal, and there
 * are some; both have as many files. */
static void same_weights(const char *a, const char *b)
{
    TH_RUN_OK(g_dir,
              "n=0; for f in %s/*.safetensors %s/config.json %s/*token*.json "
              "%s/model.safetensors.index.json; do [ -e \"$f\" ] || continue; "
              "cmp \"$f\" %s/\"${f##*/}\" || exit 1; n=$((n+1)); done; [ $n -ge 5 ]; "
              "[ $(ls %s | wc -l) = $(ls %s | wc -l) ]",
              a, a, a, a, b, a, b);
}

/* The plan reports every model's problem: one line each, at most one per model. */
static void one_line_per_model(const char *err)
{
    int lines = 0;
    for (const char *p = err; (p = strchr(p, '\n')); p++)
        lines++;
    cr_assert(lines >= 1 && lines <= 4 && err[strlen(err) - 1] == '\n', "%s", err);
    for (const char *p = err; *p; p = strchr(p, '\n') + 1)
        cr_assert(!strncmp(p, "mergestream: ", 13), "%s", err);
}

Test(remote, merge_is_byte_identical_to_the_local_merge)
{
    NEED_NGINX();
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/m", g_port);
    recipe_at("r.yml", url);
    recipe_at("l.yml", "www/m");
    TH_RUN_OK(g_dir, "mergestream merge l.yml local -q --out-shard-size 30K");
    TH_RUN_OK(g_dir, "mergestream merge r.yml remote -q --out-shard-size 30K");
    same_weights("local", "remote");
    /* Other schedules, small chunks: many ranges per tensor, same bytes. */
    TH_RUN_OK(g_dir, "mergestream merge r.yml remote2 -q --out-shard-size 30K --threads 3 "
                     "--max-memory 8M --chunk-elems 700");
    same_weights("local", "remote2");
    /* Keep-alive: far fewer connections than requests. */
    char *out = NULL;
    int rc = th_run_in(g_dir, &out, NULL,
                       "awk '{print $1}' logs/access.log | sort -u | wc -l; "
                       "wc -l < logs/access.log");
    cr_assert_eq(rc, 0);
    int conns = 0, reqs = 0;
    cr_assert_eq(sscanf(out, "%d %d", &conns, &reqs), 2, "%s", out);
    free(out);
    cr_assert_gt(reqs, 200, "only %d requests", reqs);
    cr_assert_lt(conns * 8, reqs, "%d connections for %d requests: no keep-alive?", conns, reqs);
}

Test(remote, plan_reads_headers_only)
{
    NEED_NGINX();
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/m", g_port);
    recipe_at("r.yml", url);
    TH_RUN_OK(g_dir, ": > logs/access.log && kill -USR1 $(cat nginx.pid) && sleep 0.2");
    char *out = NULL, *err = NULL;
    int rc = th_run_in(g_dir, &out, &err, "mergestream plan r.yml");
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert(strstr(out, "/m/ft2"), "%s", out);
    free(out);
    free(err);
    /* Every safetensors request is the first 64 KiB; the rest are the small files. */
    TH_RUN_OK(g_dir,
              "sleep 0.2; n=$(grep -c 'safetensors ' logs/access.log); [ $n -ge 4 ] && "
              "! grep 'safetensors ' logs/access.log | grep -v 'safetensors bytes=0-65535 206' "
              "&& ! grep -v -e 'safetensors ' -e '\\.json - \\(200\\|404\\)' logs/access.log");
    /* The three indexed models' indexes are fetched once each (they were fetched
     * twice: to learn whether they are there, then to read them). */
    TH_RUN_OK(g_dir, "[ $(grep -c 'index.json - 200' logs/access.log) = 3 ] && "
                     "! grep 'index.json - 200' logs/access.log | awk '{print $2}' | sort | "
                     "uniq -d | grep .");
}

Test(remote, hf_references_map_to_the_hub_layout_with_the_token)
{
    NEED_NGINX();
    TH_RUN_OK(
        g_dir,
        "sed -e 's#M/one#www/m/one#' -e 's#M/\\(ft[12]\\)#hf://org/\\1#' "
        "-e 's#M/base#hf://org/base@main#' t.yml > hf.yml && "
        "sed 's#M/#www/m/#' t.yml > l.yml && "
        "mergestream merge l.yml local -q && "
        "HF_ENDPOINT=http://127.0.0.1:%d/hf/ HF_TOKEN=s3cret mergestream merge hf.yml hfout -q "
        "&& grep -q '/hf/org/ft1/resolve/main/model-00001-of-00009.safetensors "
        "bytes=0-65535 206 Bearer s3cret' logs/access.log",
        g_port);
    same_weights("local", "hfout");
    /* A revision that the server does not have: a one-line 404 naming the URL. */
    char *err = NULL;
    int rc = th_run_in(g_dir, NULL, &err,
                       "sed 's#hf://org/ft1#hf://org/ft1@v9#' hf.yml > hf9.yml"
                       " && HF_ENDPOINT=http://127.0.0.1:%d/hf mergestream merge hf9.yml x -q",
                       g_port);
    cr_assert_neq(rc, 0);
    cr_assert(strstr(err, "/hf/org/ft1/resolve/v9: no model.safetensors or "
                          "model.safetensors.index.json on the server"),
              "%s", err);
    cr_assert_eq(strchr(err, '\n'), err + strlen(err) - 1, "not one line: %s", err);
    free(err);
}

Test(remote, missing_model_is_a_one_line_error_naming_the_url)
{
    NEED_NGINX();
    char url[128], *err = NULL;
    snprintf(url, sizeof url, "http://127.0.0.1:%d/nothere", g_port);
    recipe_at("r.yml", url);
    int rc = th_run_in(g_dir, NULL, &err, "mergestream merge r.yml out -q");
    cr_assert_neq(rc, 0);
    cr_assert(strstr(err, "/nothere/base: no model.safetensors or model.safetensors.index.json "
                          "on the server"),
              "%s", err);
    one_line_per_model(err);
    cr_assert_neq(access("out", F_OK), 0);
    free(err);
}

Test(remote, peak_rss_stays_under_the_budget)
{
    NEED_NGINX();
    TH_RUN_OK(g_dir,
              "ms-mkmodel --layers 2 --hidden 1024 --intermediate 2816 --vocab 4096 "
              "--shard-size 20M www/m/big >/dev/null && "
              "ms-mkmodel --base www/m/big --seed 5 www/m/big2 > /dev/null && "
              "printf 'merge_method: linear\\ndtype: bfloat16\\nmodels:\\n"
              "  - model: http://127.0.0.1:%d/m/big\\n    parameters: {weight: 0.5}\\n"
              "  - model: http://127.0.0.1:%d/m/big2\\n    parameters: {weight: 0.5}\\n' > big.yml",
              g_port, g_port);
    char *err = NULL;
    int rc = th_run_in(g_dir, NULL, &err,
                       "ms-timeit mergestream merge big.yml bigout -q "
                       "--max-memory 8M");
    cr_assert_eq(rc, 0, "%s", err);
    const char *p = strstr(err, "maxrss_kib=");
    cr_assert(p, "%s", err);
    long kib = atol(p + 11);
    free(err);
    cr_log_info("peak RSS %ld KiB at --max-memory 8M, two remote 67 MB inputs", kib);
#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("RSS bound not checked under AddressSanitizer (measured %ld KiB)", kib);
#else
    cr_assert_lt(kib, (8 + 32) * 1024, "peak RSS %ld KiB over 8 MiB + 32 MiB", kib);
#endif
    /* the inputs are ~60 MB each: the budget, not the files, bounds memory */
    TH_RUN_OK(g_dir, "ls bigout/*.safetensors >/dev/null");
}

/* ------------------------------------------------------------------ fault server */

/* F_STUCK: ft1's data ranges are always answered 503, ft2's have the wrong size. */
enum fault { F_CUT, F_503, F_SIZE, F_NORANGE, F_STUCK };

#define FSRV_RANGES 4096

struct fsrv {
    int lfd, port;
    enum fault mode;
    atomic_int n;      /* requests served */
    atomic_int faults; /* faults injected */
    atomic_bool stop;
    pthread_t th;
    /* F_STUCK: how often each 503'd range was asked for (open addressing by key) */
    pthread_mutex_t lock;
    uint64_t key[FSRV_RANGES];
    int tries[FSRV_RANGES];
};

/* Counts one more request of (path, first byte); returns the count. */
static int fsrv_try(struct fsrv *s, const char *path, unsigned long long a)
{
    uint64_t k = 1469598103934665603u ^ a;
    for (const char *p = path; *p; p++)
        k = (k ^ (unsigned char)*p) * 1099511628211u;
    k |= 1;
    pthread_mutex_lock(&s->lock);
    size_t i = (size_t)(k % FSRV_RANGES);
    while (s->key[i] && s->key[i] != k)
        i = (i + 1) % FSRV_RANGES;
    s->key[i] = k;
    int n = ++s->tries[i];
    pthread_mutex_unlock(&s->lock);
    return n;
}

static int fsrv_max_tries(struct fsrv *s)
{
    int m = 0;
    for (size_t i = 0; i < FSRV_RANGES; i++)
        m = s->tries[i] > m ? s->tries[i] : m;
    return m;
}

static bool send_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w <= 0)
            return false;
        c += w;
        n -= (size_t)w;
    }
    return true;
}

struct conn {
    struct fsrv *s;
    int fd;
};

static void *conn_main(void *arg)
{
    struct conn *c = arg;
    struct fsrv *s = c->s;
    char req[8192];
    size_t have = 0;
    for (;;) {
        char *end;
        while (!(end = memmem(req, have, "\r\n\r\n", 4))) {
            if (have == sizeof req)
                goto done;
            ssize_t r = recv(c->fd, req + have, sizeof req - have, 0);
            if (r <= 0)
                goto done;
            have += (size_t)r;
        }
        *end = 0;
        char path[1024], full[2048];
        if (sscanf(req, "GET %1023s", path) != 1)
            goto done;
        unsigned long long a = 0, b = 0;
        const char *rg = strcasestr(req, "\nrange: bytes=");
        bool ranged = rg && sscanf(rg + 14, "%llu-%llu", &a, &b) == 2;
        size_t used = (size_t)(end + 4 - req);
        memmove(req, req + used, have - used);
        have -= used;
        int k = atomic_fetch_add(&s->n, 1);
        snprintf(full, sizeof full, "%s/www%s", g_dir, path);
        char hdr[512];
        int fd = open(full, O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0) {
            int n =
                snprintf(hdr, sizeof hdr, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            if (fd >= 0)
                close(fd);
            if (!send_all(c->fd, hdr, (size_t)n))
                goto done;
            continue;
        }
        unsigned long long total = (unsigned long long)st.st_size;
        bool stuck = s->mode == F_STUCK && ranged && a > 0 && strstr(path, "/ft1/");
        if (stuck)
            fsrv_try(s, path, a);
        if (stuck || (s->mode == F_503 && ranged && a > 0 && k % 3 == 1)) {
            atomic_fetch_add(&s->faults, 1);
            int n = snprintf(hdr, sizeof hdr, "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n");
            close(fd);
            if (!send_all(c->fd, hdr, (size_t)n))
                goto done;
            continue;
        }
        if (!ranged || s->mode == F_NORANGE) {
            a = 0;
            b = total - 1;
        }
        if (b >= total)
            b = total - 1;
        unsigned long long len = b - a + 1;
        bool wrong_size = (s->mode == F_SIZE || (s->mode == F_STUCK && strstr(path, "/ft2/"))) &&
                          ranged && a > 0;
        int n =
            ranged && s->mode != F_NORANGE
                ? snprintf(hdr, sizeof hdr,
                           "HTTP/1.1 206 Partial Content\r\nContent-Length: "
                           "%llu\r\nContent-Range: bytes %llu-%llu/%llu\r\n\r\n",
                           len, a, b, wrong_size ? total + 8 : total)
                : snprintf(hdr, sizeof hdr, "HTTP/1.1 200 OK\r\nContent-Length: %llu\r\n\r\n", len);
        if (wrong_size)
            atomic_fetch_add(&s->faults, 1);
        bool cut = s->mode == F_CUT && ranged && a > 0 && len >= 64 && k % 2 == 1;
        unsigned long long send_n = cut ? len / 2 : len;
        if (!send_all(c->fd, hdr, (size_t)n)) {
            close(fd);
            goto done;
        }
        char buf[65536];
        unsigned long long off = a;
        while (send_n) {
            ssize_t r =
                pread(fd, buf, (size_t)(send_n < sizeof buf ? send_n : sizeof buf), (off_t)off);
            if (r <= 0 || !send_all(c->fd, buf, (size_t)r))
                break;
            off += (unsigned long long)r;
            send_n -= (unsigned long long)r;
        }
        close(fd);
        if (cut) {
            atomic_fetch_add(&s->faults, 1);
            goto done; /* the connection drops mid-body */
        }
    }
done:
    close(c->fd);
    free(c);
    return NULL;
}

static void *accept_main(void *arg)
{
    struct fsrv *s = arg;
    while (!atomic_load(&s->stop)) {
        struct pollfd p = { .fd = s->lfd, .events = POLLIN };
        if (poll(&p, 1, 50) <= 0)
            continue;
        int fd = accept(s->lfd, NULL, NULL);
        if (fd < 0)
            continue;
        struct conn *c = malloc(sizeof *c);
        c->s = s;
        c->fd = fd;
        pthread_t t;
        if (pthread_create(&t, NULL, conn_main, c) == 0)
            pthread_detach(t);
        else {
            close(fd);
            free(c);
        }
    }
    return NULL;
}

static void fsrv_start(struct fsrv *s, enum fault mode)
{
    memset(s, 0, sizeof *s);
    s->mode = mode;
    pthread_mutex_init(&s->lock, NULL);
    s->lfd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(s->lfd, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t n = sizeof a;
    cr_assert_eq(bind(s->lfd, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(s->lfd, 64), 0);
    cr_assert_eq(getsockname(s->lfd, (struct sockaddr *)&a, &n), 0);
    s->port = ntohs(a.sin_port);
    cr_assert_eq(pthread_create(&s->th, NULL, accept_main, s), 0);
}

static void fsrv_stop(struct fsrv *s)
{
    atomic_store(&s->stop, true);
    pthread_join(s->th, NULL);
    close(s->lfd);
}

/* Merges through the fault server; returns the exit status, *err the stderr;
 * *max_tries (may be NULL) the most tries of one range (F_STUCK). */
static int fault_merge_tries(enum fault mode, const char *out, char **err, int *faults,
                             int *max_tries)
{
    static struct fsrv s; /* 48 KiB of counters: not on the stack */
    fsrv_start(&s, mode);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/m", s.port);
    recipe_at("f.yml", url);
    int rc = th_run_in(g_dir, NULL, err,
                       "mergestream merge f.yml %s -q --max-memory 8M "
                       "--chunk-elems 5000 --out-shard-size 30K",
                       out);
    fsrv_stop(&s);
    *faults = atomic_load(&s.faults);
    if (max_tries)
        *max_tries = fsrv_max_tries(&s);
    return rc;
}

static int fault_merge(enum fault mode, const char *out, char **err, int *faults)
{
    return fault_merge_tries(mode, out, err, faults, NULL);
}

Test(remote, cut_connections_are_resumed_and_give_the_same_bytes)
{
    char *err = NULL;
    int faults = 0;
    recipe_at("l.yml", "www/m");
    TH_RUN_OK(g_dir, "mergestream merge l.yml local -q --out-shard-size 30K");
    int rc = fault_merge(F_CUT, "cut", &err, &faults);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_gt(faults, 20, "only %d connections cut", faults);
    same_weights("local", "cut");
    free(err);
}

Test(remote, http_503_is_retried_and_gives_the_same_bytes)
{
    char *err = NULL;
    int faults = 0;
    recipe_at("l.yml", "www/m");
    TH_RUN_OK(g_dir, "mergestream merge l.yml local -q --out-shard-size 30K");
    int rc = fault_merge(F_503, "busy", &err, &faults);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_gt(faults, 10, "only %d 503 answers", faults);
    same_weights("local", "busy");
    free(err);
}

static void one_line_error(enum fault mode, const char *want)
{
    char *err = NULL;
    int faults = 0;
    int rc = fault_merge(mode, "bad", &err, &faults);
    cr_assert_neq(rc, 0);
    cr_assert(strstr(err, want), "%s", err);
    cr_assert(strstr(err, "http://127.0.0.1:"), "%s", err);
    one_line_per_model(err);
    free(err);
    TH_RUN_OK(g_dir, "! ls bad/*.safetensors 2>/dev/null");
}

Test(remote, a_server_without_range_support_is_refused)
{
    one_line_error(F_NORANGE, "the server ignores range requests");
}

Test(remote, a_size_that_disagrees_with_the_header_is_an_error)
{
    one_line_error(F_SIZE, "not the ");
}

/* One model fails for good while another's reads wait to retry (503 each time): the
 * waiting reads are canceled with the merge, not retried MS_HTTP_ATTEMPTS (6) times
 * over 3 s of backoff. A range asked for when the failure came may have started one
 * more try; none gets a third. */
Test(remote, a_failed_merge_stops_retrying_the_other_reads)
{
    char *err = NULL;
    int faults = 0, tries = 0;
    int rc = fault_merge_tries(F_STUCK, "stuck", &err, &faults, &tries);
    cr_assert_neq(rc, 0);
    cr_assert(strstr(err, "not the "), "%s", err);
    cr_assert(!strstr(err, "gave up"), "%s", err);
    one_line_per_model(err);
    cr_assert_gt(tries, 0, "no 503 was served");
    cr_assert_leq(tries, 2, "a range was tried %d times after the merge failed", tries);
    free(err);
    TH_RUN_OK(g_dir, "! ls stuck/*.safetensors 2>/dev/null");
}
