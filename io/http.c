/*
 * http.c - range reads over HTTP(S) (ms_http.h): libcurl's multi-socket
 * interface on a libuv loop, as in curl's multi-uv.c example: curl tells
 * sock_cb which sockets to watch (one uv_poll_t each) and timer_cb when to
 * call it back (one uv_timer_t); the loop hands readiness back with
 * curl_multi_socket_action, and finished transfers come out of
 * curl_multi_info_read.
 *
 * Threads: a client belongs to one loop and runs on its thread. The
 * synchronous calls use one private loop and client behind a mutex.
 */
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <curl/curl.h>
#include <uv.h>

#include "ms_common.h"
#include "ms_http.h"
#include "ms_safetensors.h"

#define POOL_MAX 64    /* idle easy handles kept for reuse */
#define BACKOFF_MS 100 /* first retry wait; doubles, capped at BACKOFF_MAX_MS */
#define BACKOFF_MAX_MS 5000
#define MAX_CLIENTS 16 /* loops with a client at once */

struct sock;

struct client {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer; /* curl's timeout */
    uv_timer_t retry; /* the earliest waiting retry */
    uv_async_t keep;  /* referenced while reads are in flight: keeps the loop up */
    int inflight;
    struct ms_http_read *waiting; /* reads waiting to retry, unordered */
    bool canceled;                /* ms_http_loop_cancel: no more retries */
    struct sock *socks;           /* sockets curl asked us to watch */
    CURL *pool[POOL_MAX];
    int npool;
    int open_handles; /* closed by ms_http_loop_done; freed at zero */
    char *endpoint;   /* the hub endpoint, for the token */
    char *token;      /* the hub token, or NULL */
};

struct sock {
    uv_poll_t poll;
    curl_socket_t fd;
    struct client *c;
    struct sock *prev, *next;
};

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_init_rc;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER; /* the registry */
static struct {
    uv_loop_t *loop;
    struct client *c;
} g_clients[MAX_CLIENTS];

static void global_init(void)
{
    g_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : -1;
}

bool ms_http_is_url(const char *s)
{
    return s && (!strncasecmp(s, "http://", 7) || !strncasecmp(s, "https://", 8));
}

char *ms_http_hf_endpoint(void)
{
    const char *v = getenv("HF_ENDPOINT");
    if (!v || !*v)
        v = "https://huggingface.co";
    size_t n = strlen(v);
    while (n > 1 && v[n - 1] == '/')
        n--;
    return ms_strndup(v, n);
}

/* The hub token: $HF_TOKEN, else the token file; NULL when there is none. */
static char *hf_token(void)
{
    const char *v = getenv("HF_TOKEN");
    if (v && *v)
        return ms_strdup(v);
    char *path = NULL, *data = NULL;
    size_t len = 0;
    if ((v = getenv("HF_TOKEN_PATH")) && *v)
        path = ms_strdup(v);
    else if ((v = getenv("HF_HOME")) && *v)
        path = ms_asprintf("%s/token", v);
    else
        path = ms_asprintf("%s/.cache/huggingface/token", (v = getenv("HOME")) && *v ? v : ".");
    if (path && access(path, R_OK) == 0 && ms_read_file(path, &data, &len) == 0) {
        while (len && isspace((unsigned char)data[len - 1]))
            data[--len] = 0;
        if (!len) {
            ms_free(data);
            data = NULL;
        }
    }
    ms_error_clear();
    ms_free(path);
    return data;
}

/* ------------------------------------------------------------------ curl callbacks */

static void on_close_free(uv_handle_t *h);
static void check_done(struct client *c);

static void on_poll(uv_poll_t *p, int status, int events)
{
    struct sock *k = p->data;
    struct client *c = k->c;
    int flags = status < 0 ? CURL_CSELECT_ERR : 0;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    int running;
    curl_multi_socket_action(c->multi, k->fd, flags, &running);
    check_done(c);
}

static void on_sock_closed(uv_handle_t *h) { ms_free(h->data); }

static void sock_drop(struct client *c, struct sock *k)
{
    if (k->prev)
        k->prev->next = k->next;
    else
        c->socks = k->next;
    if (k->next)
        k->next->prev = k->prev;
    uv_poll_stop(&k->poll);
    uv_close((uv_handle_t *)&k->poll, on_sock_closed);
}

static int sock_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    struct client *c = userp;
    struct sock *k = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (k) {
            curl_multi_assign(c->multi, s, NULL);
            sock_drop(c, k);
        }
        return 0;
    }
    if (!k) {
        k = ms_calloc(1, sizeof *k);
        if (!k)
            return -1;
        if (uv_poll_init_socket(c->loop, &k->poll, s) < 0) {
            ms_free(k);
            return -1;
        }
        k->poll.data = k;
        k->fd = s;
        k->c = c;
        k->next = c->socks;
        if (c->socks)
            c->socks->prev = k;
        c->socks = k;
        uv_unref((uv_handle_t *)&k->poll); /* the keep handle holds the loop */
        curl_multi_assign(c->multi, s, k);
    }
    int ev = (what & CURL_POLL_IN ? UV_READABLE : 0) | (what & CURL_POLL_OUT ? UV_WRITABLE : 0);
    uv_poll_start(&k->poll, ev, on_poll);
    return 0;
}

static void on_timeout(uv_timer_t *t)
{
    struct client *c = t->data;
    int running;
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(c);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    struct client *c = userp;
    if (timeout_ms < 0)
        uv_timer_stop(&c->timer);
    else
        uv_timer_start(&c->timer, on_timeout, timeout_ms ? (uint64_t)timeout_ms : 1, 0);
    return 0;
}

/* ------------------------------------------------------------------ one request */

static int fail(struct ms_http_read *req, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(struct ms_http_read *req, int code, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    req->err = ms_error(code, "%s: %s", req->url, msg);
    return req->err;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    struct ms_http_read *fr = ud;
    size_t len = size * n;
    if (len >= 5 && !strncmp(p, "HTTP/", 5)) { /* a new response (after a redirect too) */
        fr->have_cr = false;
        fr->checked = false;
    } else if (len > 14 && !strncasecmp(p, "content-range:", 14)) {
        char buf[128];
        size_t m = MS_MIN(len - 14, sizeof buf - 1);
        memcpy(buf, p + 14, m);
        buf[m] = 0;
        unsigned long long a, b, t;
        char star;
        if (sscanf(buf, " bytes %llu-%llu/%llu", &a, &b, &t) == 3) {
            fr->have_cr = true;
            fr->cr_first = a;
            fr->cr_last = b;
            fr->cr_total = t;
        } else if (sscanf(buf, " bytes %llu-%llu/%c", &a, &b, &star) == 3 && star == '*') {
            fr->have_cr = true;
            fr->cr_first = a;
            fr->cr_last = b;
            fr->cr_total = UINT64_MAX;
        }
    }
    return len;
}

/*
 * The first body bytes of a 2xx answer arrived (or the try ended): checks the
 * status and Content-Range against what was asked. 0, or the error (req->err).
 */
static int check_response(struct ms_http_read *req)
{
    struct ms_http_read *fr = req;
    req->checked = true;
    if (fr->whole)
        return 0;
    if (req->code == 200)
        return fail(req, MS_EUNSUPPORTED,
                    "the server ignores range requests (it answered a "
                    "Range request with the whole file); mergestream reads remote files only "
                    "by ranges");
    if (req->code != 206)
        return 0; /* not a body we keep; finish_try judges the status */
    uint64_t want_first = req->off + req->done, want_last = req->off + req->len - 1;
    if (!fr->have_cr)
        return fail(req, MS_EIO, "partial content without a Content-Range header");
    uint64_t total = fr->cr_total;
    if (req->expect_total && total != UINT64_MAX && total != req->expect_total)
        return fail(req, MS_EIO,
                    "the file is %" PRIu64 " bytes, not the %" PRIu64 " its header "
                    "and the plan were made from (changed on the server?)",
                    total, req->expect_total);
    if (fr->cr_first != want_first || fr->cr_last > want_last)
        return fail(req, MS_EIO,
                    "Content-Range bytes %" PRIu64 "-%" PRIu64 " does not match "
                    "the requested bytes %" PRIu64 "-%" PRIu64,
                    fr->cr_first, fr->cr_last, want_first, want_last);
    if (fr->cr_last < want_last) {
        if (total == UINT64_MAX || fr->cr_last + 1 != total)
            return fail(req, MS_EIO,
                        "Content-Range bytes %" PRIu64 "-%" PRIu64 " is shorter "
                        "than the requested bytes %" PRIu64 "-%" PRIu64,
                        fr->cr_first, fr->cr_last, want_first, want_last);
        if (!fr->allow_short)
            return fail(req, MS_EIO,
                        "the file is only %" PRIu64 " bytes; bytes up to %" PRIu64 " were expected",
                        total, want_last + 1);
        req->len = total - req->off; /* a short file, and the caller takes what there is */
    }
    return 0;
}

static size_t on_write(char *p, size_t size, size_t n, void *ud)
{
    struct ms_http_read *req = ud, *fr = req;
    size_t len = size * n;
    if (!req->checked) {
        curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &req->code);
        if (check_response(req) < 0)
            return 0; /* aborts the transfer */
    }
    if (req->code < 200 || req->code > 299)
        return len; /* an error page: dropped */
    if (fr->whole) {
        if (req->done + len + 1 > MS_SMALL_FILE_MAX) {
            fail(req, MS_EIO, "larger than %u bytes; not a small file", MS_SMALL_FILE_MAX);
            return 0;
        }
        if (req->done + len + 1 > fr->wcap) {
            size_t cap = MS_MAX(fr->wcap * 2, (size_t)req->done + len + 1);
            cap = MS_MAX(cap, (size_t)4096);
            char *d = ms_realloc(fr->wdata, cap);
            if (!d) {
                fail(req, MS_ENOMEM, "out of memory");
                return 0;
            }
            fr->wdata = d;
            fr->wcap = cap;
        }
        memcpy(fr->wdata + req->done, p, len);
    } else {
        if (len > req->len - req->done) {
            fail(req, MS_EIO, "the server sent more bytes than the %" PRIu64 " asked for",
                 req->len);
            return 0;
        }
        memcpy(req->buf + req->done, p, len);
    }
    req->done += len;
    return len;
}

static struct client *client_of(struct ms_http_read *req) { return req->client; }

static void complete(struct ms_http_read *req, int status)
{
    struct client *c = client_of(req);
    if (req->easy) {
        CURL *e = req->easy;
        req->easy = NULL;
        if (c->npool < POOL_MAX) {
            curl_easy_reset(e);
            c->pool[c->npool++] = e;
        } else {
            curl_easy_cleanup(e);
        }
    }
    if (--c->inflight == 0)
        uv_unref((uv_handle_t *)&c->keep);
    req->cb(req, status);
}

static int try_start(struct ms_http_read *req);
static void on_retry(uv_timer_t *t);

static void arm_retry(struct client *c)
{
    if (!c->waiting) {
        uv_timer_stop(&c->retry);
        return;
    }
    uint64_t due = UINT64_MAX, now = uv_now(c->loop);
    for (struct ms_http_read *r = c->waiting; r; r = r->next)
        due = MS_MIN(due, r->retry_at);
    uv_timer_start(&c->retry, on_retry, due > now ? due - now : 0, 0);
}

static void on_retry(uv_timer_t *t)
{
    struct client *c = t->data;
    uint64_t now = uv_now(c->loop);
    struct ms_http_read **pp = &c->waiting, *due = NULL;
    while (*pp) {
        struct ms_http_read *r = *pp;
        if (r->retry_at <= now || c->canceled) {
            *pp = r->next;
            r->next = due;
            due = r;
        } else {
            pp = &r->next;
        }
    }
    while (due) {
        struct ms_http_read *r = due;
        due = r->next;
        r->next = NULL;
        int rc = c->canceled ? ms_error(MS_ECANCELED, "%s: read canceled", r->url) : try_start(r);
        if (rc < 0)
            complete(r, rc);
    }
    arm_retry(c);
}

/* A try failed in a way worth another: waits, or gives up after MS_HTTP_ATTEMPTS. */
static void retry_or_fail(struct ms_http_read *req, const char *why)
{
    struct client *c = client_of(req);
    if (req->done > req->done_at_try)
        req->attempts = 1; /* this try moved forward: only tries in a row without progress count */
    if (req->attempts >= MS_HTTP_ATTEMPTS) {
        complete(req,
                 ms_error(MS_EIO, "%s: %s (gave up after %d tries)", req->url, why, req->attempts));
        return;
    }
    if (c->canceled) {
        complete(req, ms_error(MS_ECANCELED, "%s: %s; read canceled", req->url, why));
        return;
    }
    struct ms_http_read *fr = req;
    if (fr->whole)
        req->done = 0; /* a whole file starts again */
    ms_log_info("%s: %s; retrying bytes %" PRIu64 "-%" PRIu64 " (try %d of %d)", req->url, why,
                req->off + req->done, req->off + req->len - 1, req->attempts + 1, MS_HTTP_ATTEMPTS);
    uint64_t wait = (uint64_t)BACKOFF_MS << MS_MIN(req->attempts - 1, 10);
    req->retry_at = uv_now(c->loop) + MS_MIN(wait, (uint64_t)BACKOFF_MAX_MS);
    req->next = c->waiting;
    c->waiting = req;
    arm_retry(c);
}

/* A transfer of req ended with res. */
static void finish_try(struct ms_http_read *req, CURLcode res, const char *errbuf)
{
    struct ms_http_read *fr = req;
    curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &req->code);
    if (req->err) {
        complete(req, req->err);
        return;
    }
    if (res == CURLE_OK && !req->checked && req->code >= 200 && req->code <= 299 &&
        check_response(req) < 0) {
        complete(req, req->err);
        return;
    }
    char why[300];
    if (res != CURLE_OK) {
        switch (res) {
        case CURLE_COULDNT_CONNECT:
        case CURLE_RECV_ERROR:
        case CURLE_SEND_ERROR:
        case CURLE_PARTIAL_FILE:
        case CURLE_GOT_NOTHING:
        case CURLE_OPERATION_TIMEDOUT:
        case CURLE_HTTP2:
        case CURLE_HTTP2_STREAM:
        case CURLE_SSL_CONNECT_ERROR:
            snprintf(why, sizeof why, "%s", *errbuf ? errbuf : curl_easy_strerror(res));
            retry_or_fail(req, why);
            return;
        default:
            complete(req, ms_error(MS_EIO, "%s: %s", req->url,
                                   *errbuf ? errbuf : curl_easy_strerror(res)));
            return;
        }
    }
    long code = req->code;
    if (code >= 200 && code <= 299) {
        if (fr->whole) {
            complete(req, 0);
        } else if (req->done == req->len) {
            complete(req, 0);
        } else {
            snprintf(why, sizeof why, "the connection ended after %" PRIu64 " of %" PRIu64 " bytes",
                     req->done, req->len);
            retry_or_fail(req, why);
        }
        return;
    }
    if (code >= 500 || code == 429 || code == 408) {
        snprintf(why, sizeof why, "HTTP %ld", code);
        retry_or_fail(req, why);
        return;
    }
    if (code == 404)
        complete(req, ms_error(MS_EMODEL, "%s: not found (HTTP 404)", req->url));
    else if (code == 401 || code == 403)
        complete(req, ms_error(MS_EMODEL,
                               "%s: access denied (HTTP %ld); a gated or private "
                               "hub model needs HF_TOKEN or a token file",
                               req->url, code));
    else if (code == 416)
        complete(req, ms_error(MS_EIO,
                               "%s: bytes %" PRIu64 "-%" PRIu64 " are past the end of "
                               "the file (HTTP 416)",
                               req->url, req->off + req->done, req->off + req->len - 1));
    else
        complete(req, ms_error(MS_EIO, "%s: HTTP %ld", req->url, code));
}

static void check_done(struct client *c)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(c->multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *e = msg->easy_handle;
        CURLcode res = msg->data.result;
        struct ms_http_read *req = NULL;
        curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&req);
        curl_multi_remove_handle(c->multi, e);
        char errbuf[CURL_ERROR_SIZE];
        snprintf(errbuf, sizeof errbuf, "%s", curl_easy_strerror(res));
        finish_try(req, res, res == CURLE_OK ? "" : errbuf);
    }
}

/* curl's sockets are close-on-exec: a --pipe command must not hold them open. */
static curl_socket_t open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
    return socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
}

/* Starts one try of req for the bytes still missing. */
static int try_start(struct ms_http_read *req)
{
    struct client *c = client_of(req);
    struct ms_http_read *fr = req;
    if (!req->easy) {
        req->easy = c->npool ? c->pool[--c->npool] : curl_easy_init();
        if (!req->easy)
            return ms_error(MS_ENOMEM, "%s: cannot create a request", req->url);
    }
    CURL *e = req->easy;
    req->attempts++;
    req->done_at_try = req->done;
    req->checked = false;
    req->code = 0;
    fr->have_cr = false;
    char range[64];
    curl_easy_setopt(e, CURLOPT_URL, req->url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)req);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, fr);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, fr);
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(e, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, (long)MS_HTTP_STALL_SECONDS);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, (long)MS_HTTP_STALL_SECONDS);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "mergestream/" MS_VERSION);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    if (!fr->whole) {
        snprintf(range, sizeof range, "%" PRIu64 "-%" PRIu64, req->off + req->done,
                 req->off + req->len - 1);
        curl_easy_setopt(e, CURLOPT_RANGE, range); /* copied by curl */
    }
    if (c->token && c->endpoint && !strncmp(req->url, c->endpoint, strlen(c->endpoint)) &&
        req->url[strlen(c->endpoint)] == '/') {
        curl_easy_setopt(e, CURLOPT_HTTPAUTH, (long)CURLAUTH_BEARER);
        curl_easy_setopt(e, CURLOPT_XOAUTH2_BEARER, c->token);
    }
    CURLMcode mc = curl_multi_add_handle(c->multi, e);
    if (mc != CURLM_OK)
        return ms_error(MS_EIO, "%s: cannot start a request: %s", req->url,
                        curl_multi_strerror(mc));
    return 0;
}

/* ------------------------------------------------------------------ clients */

static void on_keep(uv_async_t *a) { (void)a; }

static int client_new(uv_loop_t *loop, struct client **out)
{
    *out = NULL;
    pthread_once(&g_once, global_init);
    if (g_init_rc)
        return ms_error(MS_EIO, "cannot initialise libcurl");
    struct client *c = ms_calloc(1, sizeof *c);
    if (!c)
        return ms_error(MS_ENOMEM, "out of memory");
    c->loop = loop;
    c->multi = curl_multi_init();
    c->endpoint = ms_http_hf_endpoint();
    c->token = hf_token();
    if (!c->multi || !c->endpoint) {
        if (c->multi)
            curl_multi_cleanup(c->multi);
        ms_free(c->endpoint);
        ms_free(c->token);
        ms_free(c);
        return ms_error(MS_ENOMEM, "out of memory");
    }
    uv_timer_init(loop, &c->timer);
    uv_timer_init(loop, &c->retry);
    uv_async_init(loop, &c->keep, on_keep);
    c->timer.data = c->retry.data = c->keep.data = c;
    uv_unref((uv_handle_t *)&c->timer);
    uv_unref((uv_handle_t *)&c->retry);
    uv_unref((uv_handle_t *)&c->keep);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, sock_cb);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)MS_HTTP_MAX_CONNECTIONS);
    curl_multi_setopt(c->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    c->open_handles = 3;
    *out = c;
    return 0;
}

static void on_close_free(uv_handle_t *h)
{
    struct client *c = h->data;
    if (--c->open_handles == 0) {
        ms_free(c->endpoint);
        ms_free(c->token);
        ms_free(c);
    }
}

static void client_close(struct client *c)
{
    assert(c->inflight == 0 && !c->waiting);
    while (c->socks)
        sock_drop(c, c->socks);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, NULL);
    curl_multi_cleanup(c->multi);
    for (int i = 0; i < c->npool; i++)
        curl_easy_cleanup(c->pool[i]);
    c->npool = 0;
    uv_close((uv_handle_t *)&c->timer, on_close_free);
    uv_close((uv_handle_t *)&c->retry, on_close_free);
    uv_close((uv_handle_t *)&c->keep, on_close_free);
}

static int read_start(struct client *c, struct ms_http_read *req)
{
    req->client = c;
    req->easy = NULL;
    req->attempts = 0;
    req->err = 0;
    req->next = NULL;
    int rc = try_start(req);
    if (rc < 0) {
        if (req->easy) {
            curl_easy_cleanup(req->easy);
            req->easy = NULL;
        }
        return rc;
    }
    if (c->inflight++ == 0)
        uv_ref((uv_handle_t *)&c->keep);
    return 0;
}

/* ------------------------------------------------------------------ asynchronous */

int ms_http_read_start(uv_loop_t *loop, struct ms_http_read *req, const char *url, void *buf,
                       uint64_t len, uint64_t off, uint64_t expect_total, ms_http_read_cb cb)
{
    assert(loop && req && url && buf && len > 0 && cb);
    struct client *c = NULL;
    pthread_mutex_lock(&g_lock);
    int free_i = -1;
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (g_clients[i].loop == loop)
            c = g_clients[i].c;
        else if (!g_clients[i].loop && free_i < 0)
            free_i = i;
    }
    int rc = 0;
    if (!c) {
        if (free_i < 0)
            rc = ms_error(MS_EIO, "%s: too many event loops reading over HTTP at once", url);
        else if ((rc = client_new(loop, &c)) == 0) {
            g_clients[free_i].loop = loop;
            g_clients[free_i].c = c;
        }
    }
    pthread_mutex_unlock(&g_lock);
    if (rc)
        return rc;
    req->url = url;
    req->buf = buf;
    req->len = len;
    req->done = 0;
    req->off = off;
    req->expect_total = expect_total;
    req->cb = cb;
    req->whole = req->allow_short = false;
    req->wdata = NULL;
    req->wcap = 0;
    return read_start(c, req);
}

void ms_http_loop_done(uv_loop_t *loop)
{
    struct client *c = NULL;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (g_clients[i].loop == loop) {
            c = g_clients[i].c;
            g_clients[i].loop = NULL;
            g_clients[i].c = NULL;
        }
    pthread_mutex_unlock(&g_lock);
    if (c)
        client_close(c);
}

void ms_http_loop_cancel(uv_loop_t *loop)
{
    struct client *c = NULL;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (g_clients[i].loop == loop)
            c = g_clients[i].c;
    pthread_mutex_unlock(&g_lock);
    if (!c || c->canceled)
        return;
    c->canceled = true;
    if (c->waiting) /* fail them from the loop, not from inside the caller */
        uv_timer_start(&c->retry, on_retry, 0, 0);
}

/* ------------------------------------------------------------------ synchronous */

static pthread_mutex_t g_sync_lock = PTHREAD_MUTEX_INITIALIZER;
static uv_loop_t g_sync_loop;
static struct client *g_sync; /* kept for the process: connections stay open between calls */

static void on_sync_done(struct ms_http_read *req, int status)
{
    req->err = status;
    req->data = NULL; /* finished */
}

/* Runs req to its end on the private loop. Called with g_sync_lock held. */
static int sync_run(struct ms_http_read *req)
{
    if (!g_sync) {
        int rc = uv_loop_init(&g_sync_loop);
        if (rc)
            return ms_error(rc, "cannot start an event loop: %s", ms_strerror(rc));
        rc = client_new(&g_sync_loop, &g_sync);
        if (rc) {
            uv_loop_close(&g_sync_loop);
            return rc;
        }
    }
    req->data = req; /* cleared by on_sync_done */
    req->cb = on_sync_done;
    req->done = 0;
    int rc = read_start(g_sync, req);
    if (rc)
        return rc;
    while (req->data)
        uv_run(&g_sync_loop, UV_RUN_ONCE);
    return req->err;
}

int ms_http_get_range(const char *url, void *buf, uint64_t off, uint64_t len, bool allow_short,
                      uint64_t *got, uint64_t *total)
{
    assert(url && buf && len > 0);
    struct ms_http_read req;
    memset(&req, 0, sizeof req);
    req.url = url;
    req.buf = buf;
    req.off = off;
    req.len = len;
    req.allow_short = allow_short;
    pthread_mutex_lock(&g_sync_lock);
    int rc = sync_run(&req);
    pthread_mutex_unlock(&g_sync_lock);
    if (rc)
        return rc;
    if (got)
        *got = req.done;
    if (total)
        *total = req.cr_total;
    return 0;
}

int ms_http_get_file(const char *url, char **data, size_t *len)
{
    assert(url && data && len);
    *data = NULL;
    *len = 0;
    struct ms_http_read req;
    memset(&req, 0, sizeof req);
    unsigned char dummy;
    req.url = url;
    req.buf = &dummy;
    req.len = 1;
    req.whole = true;
    pthread_mutex_lock(&g_sync_lock);
    int rc = sync_run(&req);
    pthread_mutex_unlock(&g_sync_lock);
    if (rc == MS_EMODEL && req.code == 404) {
        ms_free(req.wdata);
        ms_error_clear();
        return 0;
    }
    if (rc) {
        ms_free(req.wdata);
        return rc;
    }
    if (!req.wdata && !(req.wdata = ms_malloc(1)))
        return ms_error(MS_ENOMEM, "out of memory");
    req.wdata[req.done] = 0;
    *data = req.wdata;
    *len = (size_t)req.done;
    return 1;
}
