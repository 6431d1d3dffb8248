/*
 * loadgen.c - load generator for loopback benchmarks: raw echo, HTTP/1.1
 * one connection per request, and HTTP/1.1 keep-alive.
 *
 * Build: cc -O2 -Wall -Wextra -o loadgen loadgen.c
 * Usage: loadgen (--port P [--host H] | --unix PATH) [--clients C]
 *                [--seconds S] [--payload STR] [--max-conns N] [--timeout T]
 *                [--http close|keepalive [--path P]]
 *   --host       numeric or resolvable host (default 127.0.0.1)
 *   --clients    concurrent clients (default 16)
 *   --seconds    stop starting new requests after S seconds (default 5)
 *   --payload    echo mode: bytes sent on each connection (default "hello")
 *   --max-conns  also stop after N connection attempts in total
 *   --timeout    per-request timeout in seconds (default 5)
 *   --http       speak HTTP/1.1 instead of echo (see below)
 *   --path       HTTP: the request target (default "/")
 *
 * Single thread, non-blocking sockets, one edge-triggered epoll set, so on a
 * small machine it costs far less CPU than the server it drives.
 *
 * Echo mode (the default).  Each client slot repeatedly: opens a NEW
 * connection, writes the payload, reads until EOF (the server closes after
 * replying), checks that the reply contains the payload, records
 * connect()-start -> EOF latency, closes and starts over.
 *
 * --http close.  The same loop, one request per connection: "GET PATH
 * HTTP/1.1" with Host and "Connection: close".  The response must be a
 * well-formed status line and head, status 200, with a Content-Length body
 * (or a body delimited by the server's close; a chunked response counts as
 * malformed: this client does not decode it).  The response is complete when
 * its Content-Length bytes are in; the connection is then done when the server
 * closes it, as it was asked to (so TIME_WAIT lands on the server side and the
 * client's ports are recycled at once).  Latency runs from connect() to the
 * response's last byte.
 *
 * --http keepalive.  Each client holds one connection and sends the next GET
 * (no Connection header: HTTP/1.1 persistence) as soon as the previous
 * response is complete; latency runs from the write of a request to its
 * response's last byte.  A response with "Connection: close", or a server
 * closing after a response, ends the connection and the client reconnects.
 * A server that closes a kept-alive connection before answering a request
 * sent on it (RFC 9112 9.6 allows it to close an idle connection; the request
 * may have crossed the close) makes the client reconnect and resend: counted
 * as "retries", not errors.  A non-200, a malformed or unexpected reply, a
 * close in the middle of a response or on a fresh connection are errors.
 *
 * After S seconds (or N attempts) no new connection or request is started.
 * Echo and close mode: in-flight ones are drained until a hard deadline of
 * S+5 s, and whatever is still unfinished then counts as an error.  Keep-alive
 * mode: in-flight requests get 1 s more; those still unanswered then are
 * "unfinished", not errors (a server that never serves some connections shows
 * there, and in the per-client counts).
 *
 * Output is ONE JSON line on stdout.  Echo mode:
 *   {"conns": N, "errors": E, "seconds": T, "conns_per_s": X,
 *    "p50_us": .., "p99_us": .., "max_us": ..}
 * "conns" counts successful connections only; "seconds" runs from start until
 * the last connection finished.  HTTP modes:
 *   {"mode": "close"|"keepalive", "requests": N, "errors": E, "seconds": T,
 *    "requests_per_s": X, "p50_us": .., "p99_us": .., "max_us": ..,
 *    "connections": attempts, "retries": R, "unfinished": U,
 *    "causes": {"refused": n, ...}, "per_client": [n, ...],
 *    "min_per_client": m, "zero_clients": z, "max_gap_us": g}
 * "requests" counts successful (200, well-formed) responses; "seconds" runs
 * from start until the last of them; "per_client" is each client's count of
 * those that came within the S seconds (a starved client served only in the
 * drain after the run still shows 0); "max_gap_us" is the longest any client
 * went without one within the run (from the start, between responses, until
 * S seconds).
 * A per-cause error breakdown also goes to stderr.
 *
 * Ephemeral ports: sockets are closed normally (SO_LINGER left off, no RST).
 * Because the server closes first, TIME_WAIT lands on the server side and the
 * client side goes straight to CLOSED, so client ports are recycled quickly.
 * Runs are meant to be short (seconds); on very long runs at high rates the
 * kernel's TIME_WAIT table can still fill up, and a connect() failing with
 * EADDRNOTAVAIL is then counted as an error ("other"), never hidden.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum mode { ECHO, HTTP_CLOSE, HTTP_KEEPALIVE };
enum state { IDLE, WRITING, READING };
enum cause { E_REFUSED, E_RESET, E_TIMEOUT, E_REPLY, E_OTHER, E_STATUS, E_CLOSED, E_NCAUSES };
static const char *cause_name[E_NCAUSES] = { "refused", "reset", "timeout", "bad_reply",
                                             "other", "status", "closed" };

struct client {
    int fd;
    enum state st;
    int out;                /* EPOLLOUT is among the fd's registered events */
    int reused;             /* HTTP: a response already came on this connection */
    int eof;                /* HTTP: the server closed its side */
    size_t woff;            /* request bytes written so far */
    size_t rlen;            /* reply bytes kept in rbuf */
    size_t need;            /* HTTP: whole response length once the head is parsed,
                             * SIZE_MAX if delimited by close; 0 = head not parsed */
    int close_after;        /* HTTP: the response ends the connection */
    int64_t t0;             /* ns: before connect() (new connection) or the write */
    int64_t tdone;          /* ns: when the response was complete; 0 = not yet */
    char *rbuf;             /* rcap bytes */
    long count;             /* successful requests of this client */
    int64_t last_done;      /* ns: its latest success (the start before any) */
    int64_t max_gap;        /* ns: its longest stretch without a success */
};

static enum mode mode = ECHO;
static struct sockaddr_storage addr;
static socklen_t addrlen;
static const char *payload = "hello";
static size_t plen, rcap;

static struct client *clients;
static int *idle, nidle;    /* stack of slots waiting for a new connection */
static int epfd;
static int64_t t_start, t_stop, t_last;     /* t_last: the latest success */

static uint32_t *lat;       /* successful latencies, us; grows by doubling */
static size_t nlat, lcap;
static long errors, cause_count[E_NCAUSES], attempts, retries;
static int last_other_errno;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void usage(const char *prog)
{
    fprintf(stderr, "usage: %s (--port P [--host H] | --unix PATH) [--clients C] "
            "[--seconds S] [--payload STR] [--max-conns N] [--timeout T] "
            "[--http close|keepalive [--path P]]\n", prog);
    exit(2);
}

static double num_arg(const char *prog, const char *s, double min)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= min)) usage(prog);
    return v;
}

static void record_error(int cause, int err)
{
    errors++;
    cause_count[cause]++;
    if (cause == E_OTHER) last_other_errno = err;
}

static int errno_cause(int err)
{
    if (err == ECONNREFUSED) return E_REFUSED;
    if (err == ECONNRESET || err == EPIPE) return E_RESET;
    if (err == ETIMEDOUT) return E_TIMEOUT;
    return E_OTHER;
}

/* Close slot i's connection; the main loop starts a new one while allowed.
 * close() also removes the fd from the epoll set. */
static void end_conn(int i)
{
    struct client *c = &clients[i];
    close(c->fd);
    c->fd = -1;
    c->st = IDLE;
    idle[nidle++] = i;
}

static void fail(int i, int cause, int err)
{
    end_conn(i);
    record_error(cause, err);
}

/* One success of client i: latency t0 -> t1, its count and longest gap. */
static void success(int i, int64_t t1)
{
    struct client *c = &clients[i];
    if (nlat == lcap) {
        lcap = lcap ? lcap * 2 : 65536;
        if (!(lat = realloc(lat, lcap * sizeof *lat))) { perror("realloc"); exit(1); }
    }
    int64_t us = (t1 - c->t0) / 1000;
    if (t1 > t_last) t_last = t1;
    lat[nlat++] = us < 0 ? 0 : us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    if (t1 > t_stop) return;    /* drained after the run: not "throughout the run" */
    c->count++;
    if (t1 - c->last_done > c->max_gap) c->max_gap = t1 - c->last_done;
    c->last_done = t1;
}

/* The server went away before answering a request sent on a connection it
 * had kept alive: reconnect and resend (see the header comment). */
static void retry(int i)
{
    retries++;
    end_conn(i);
}

/* Echo mode: the server closed; the reply must contain the payload. */
static void echo_done(int i)
{
    struct client *c = &clients[i];
    if (!memmem(c->rbuf, c->rlen, payload, plen)) {
        fail(i, E_REPLY, 0);           /* short or mismatched reply */
        return;
    }
    success(i, now_ns());
    end_conn(i);
}

/* Add or remove EPOLLOUT on a registered fd (only when a write would block,
 * which on loopback with small requests is rare). */
static void want_out(int i, int on)
{
    struct client *c = &clients[i];
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | EPOLLET | (on ? EPOLLOUT : 0),
                              .data.u32 = (uint32_t)i };
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
    c->out = on;
}

/* Write the rest of the request.  Returns 1 when all is written, 0 on EAGAIN
 * (wait for EPOLLOUT), -1 if the connection failed and was ended.  A failed
 * non-blocking connect() surfaces here: send() returns the pending socket
 * error (ECONNREFUSED, ...), so no getsockopt(SO_ERROR) is needed, and while
 * the TCP handshake is still in progress send() returns EAGAIN. */
static int try_write(int i)
{
    struct client *c = &clients[i];
    while (c->woff < plen) {
        ssize_t n = send(c->fd, payload + c->woff, plen - c->woff, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return 0;
        if (n < 0) {
            if (c->reused && (errno == EPIPE || errno == ECONNRESET)) retry(i);
            else fail(i, errno_cause(errno), errno);
            return -1;
        }
        c->woff += (size_t)n;
    }
    c->st = READING;
    return 1;
}

static void reset_exchange(struct client *c, int64_t t0)
{
    c->woff = c->rlen = c->need = 0;
    c->close_after = c->eof = 0;
    c->tdone = 0;
    c->t0 = t0;
    c->st = WRITING;
}

/* Start a new connection on idle slot i.  A synchronous failure is recorded
 * and leaves the slot idle, to be retried on the next loop iteration (no
 * recursion, no busy loop inside one iteration). */
static void start(int i)
{
    struct client *c = &clients[i];
    attempts++;
    reset_exchange(c, 0);
    c->reused = 0;
    c->out = 0;
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { c->st = IDLE; record_error(E_OTHER, errno); idle[nidle++] = i; return; }
    c->t0 = now_ns();
    if (connect(c->fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        /* AF_UNIX reports a full backlog as EAGAIN: count it as refused. */
        int err = errno;
        fail(i, err == EAGAIN ? E_REFUSED : errno_cause(err), err);
        return;
    }
    /* Write at once: on loopback the handshake has usually completed inside
     * connect(), which saves an epoll round trip per connection. */
    int done = try_write(i);
    if (done < 0) return;
    /* Edge-triggered, registered once (no EPOLL_CTL_MOD per state change).
     * EPOLLOUT only if the write is still pending; ADD reports readiness that
     * already exists, so nothing that happened before it is missed. */
    c->out = !done;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | EPOLLET | (done ? 0 : EPOLLOUT),
                              .data.u32 = (uint32_t)i };
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
}

/* Keep-alive: the next request on slot i's open connection. */
static void next_request(int i, int64_t now)
{
    struct client *c = &clients[i];
    reset_exchange(c, now);
    c->reused = 1;
    int done = try_write(i);
    if (done == 0 && !c->out) want_out(i, 1);
}

/* Is `token` one of the comma-separated tokens of value v[0..n)? (ASCII,
 * case-insensitive, optional whitespace around each) */
static int has_token(const char *v, size_t n, const char *token)
{
    size_t tlen = strlen(token), k = 0;
    while (k < n) {
        while (k < n && (v[k] == ' ' || v[k] == '\t' || v[k] == ',')) k++;
        size_t s = k;
        while (k < n && v[k] != ',') k++;
        size_t e = k;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (e - s == tlen && !strncasecmp(v + s, token, tlen)) return 1;
    }
    return 0;
}

/* Parse the response head in c->rbuf.  1: parsed (c->need, c->close_after
 * set; *code the status); 0: incomplete; -1: malformed or unsupported
 * (transfer codings, a bad or repeated Content-Length). */
static int parse_head(struct client *c, int *code)
{
    const char *buf = c->rbuf;
    const char *end = memmem(buf, c->rlen, "\r\n\r\n", 4);
    if (!end) return 0;
    const char *stop = end + 2;             /* just past the last header's CRLF */
    if (end - buf < 12 || memcmp(buf, "HTTP/1.", 7) || (buf[7] != '0' && buf[7] != '1')
        || buf[8] != ' ' || (buf[12] != ' ' && buf[12] != '\r'))
        return -1;
    for (int k = 9; k < 12; k++)
        if (buf[k] < '0' || buf[k] > '9') return -1;
    *code = (buf[9] - '0') * 100 + (buf[10] - '0') * 10 + (buf[11] - '0');
    long long clen = -1;
    int close_after = buf[7] == '0';        /* HTTP/1.0 response: no persistence */
    const char *p = memchr(buf, '\n', (size_t)(stop - buf));
    if (!p || p[-1] != '\r') return -1;
    for (p++; p < stop; ) {
        const char *eol = memchr(p, '\n', (size_t)(stop - p));
        if (!eol || eol == p || eol[-1] != '\r') return -1;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (!colon || colon == p) return -1;
        size_t nlen = (size_t)(colon - p);
        const char *v = colon + 1, *ve = eol - 1;
        while (v < ve && (*v == ' ' || *v == '\t')) v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        if (nlen == 14 && !strncasecmp(p, "content-length", 14)) {
            if (clen >= 0 || v == ve || ve - v > 15) return -1;
            clen = 0;
            for (const char *d = v; d < ve; d++) {
                if (*d < '0' || *d > '9') return -1;
                clen = clen * 10 + (*d - '0');
            }
        } else if (nlen == 17 && !strncasecmp(p, "transfer-encoding", 17)) {
            return -1;
        } else if (nlen == 10 && !strncasecmp(p, "connection", 10)) {
            if (has_token(v, (size_t)(ve - v), "close")) close_after = 1;
            else if (has_token(v, (size_t)(ve - v), "keep-alive")) close_after = 0;
        }
        p = eol + 1;
    }
    size_t head = (size_t)(end - buf) + 4;
    if (clen >= 0) c->need = head + (size_t)clen;
    else { c->need = SIZE_MAX; close_after = 1; }
    c->close_after = close_after || mode == HTTP_CLOSE;
    return 1;
}

/* HTTP: what was read so far (until EAGAIN, or EOF when c->eof) decides. */
static void http_progress(int i)
{
    struct client *c = &clients[i];
    if (!c->need) {
        int code = 0, rc = parse_head(c, &code);
        if (rc < 0) { fail(i, E_REPLY, 0); return; }
        if (rc == 0) {
            if (c->eof && !c->rlen && c->reused) retry(i);
            else if (c->eof) fail(i, E_CLOSED, 0);
            else if (c->rlen >= rcap) fail(i, E_REPLY, 0);     /* head too large */
            return;
        }
        if (code != 200) { fail(i, E_STATUS, 0); return; }
    }
    if (c->need == SIZE_MAX) {          /* body delimited by the server's close */
        if (!c->eof) {
            if (c->rlen >= rcap) fail(i, E_REPLY, 0);
            return;
        }
        c->tdone = now_ns();
    } else if (c->rlen > c->need) {
        fail(i, E_REPLY, 0);            /* bytes nobody asked for */
        return;
    } else if (c->rlen < c->need) {
        if (c->eof) fail(i, E_CLOSED, 0);
        else if (c->rlen >= rcap) fail(i, E_REPLY, 0);     /* larger than this client keeps */
        return;
    } else if (!c->tdone) {
        c->tdone = now_ns();
    }
    /* A whole response.  It counts once the connection is where it should
     * be: closed by the server when it said so (or was asked to). */
    if (c->close_after && !c->eof) return;
    success(i, c->tdone);
    if (c->eof || c->close_after || c->tdone >= t_stop) end_conn(i);
    else next_request(i, c->tdone);
}

static void on_event(int i, uint32_t events)
{
    struct client *c = &clients[i];
    if (c->st == WRITING) {
        /* The reply cannot arrive before the request is written, and with
         * EPOLLET any later arrival raises a fresh event: return either way. */
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            int done = try_write(i);
            if (done > 0 && c->out && mode == HTTP_KEEPALIVE) want_out(i, 0);
        }
        return;
    }
    /* READING.  Events carrying only EPOLLOUT (send-buffer wakeups) have
     * nothing to read; every data/FIN arrival raises its own EPOLLIN edge. */
    if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    /* Drain until EAGAIN (required by edge triggering) or EOF.  Echo mode:
     * bytes beyond rcap are read and dropped, the reply check uses the kept
     * part.  HTTP: a response larger than rcap is refused (bad_reply). */
    for (;;) {
        char scratch[4096];
        int keep = c->rlen < rcap;
        char *dst = keep ? c->rbuf + c->rlen : scratch;
        size_t room = keep ? rcap - c->rlen : sizeof scratch;
        ssize_t n = read(c->fd, dst, room);
        if (n > 0) {
            if (keep) c->rlen += (size_t)n;
            else if (mode != ECHO) { fail(i, E_REPLY, 0); return; }
            continue;
        }
        if (n == 0) break;
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
            if (mode != ECHO) http_progress(i);
            return;
        }
        if (mode != ECHO && errno == ECONNRESET && c->reused && !c->rlen) retry(i);
        else fail(i, errno_cause(errno), errno);
        return;
    }
    if (mode == ECHO) { echo_done(i); return; }
    c->eof = 1;
    http_progress(i);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of the sorted latency array. */
static uint32_t pct(double p)
{
    if (!nlat) return 0;
    size_t k = (size_t)(p * (double)nlat + 0.999999);
    return lat[k ? k - 1 : 0];
}

static void print_http(long nclients, double elapsed, long unfinished)
{
    long min_count = -1, zero = 0;
    int64_t max_gap = 0;
    for (long i = 0; i < nclients; i++) {
        struct client *c = &clients[i];
        int64_t tail = t_stop - c->last_done;     /* since its last success, to the stop */
        if (tail > c->max_gap) c->max_gap = tail;
        if (c->max_gap > max_gap) max_gap = c->max_gap;
        if (min_count < 0 || c->count < min_count) min_count = c->count;
        if (!c->count) zero++;
    }
    printf("{\"mode\": \"%s\", \"requests\": %zu, \"errors\": %ld, \"seconds\": %.3f, "
           "\"requests_per_s\": %.1f, \"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u, "
           "\"connections\": %ld, \"retries\": %ld, \"unfinished\": %ld, \"causes\": {",
           mode == HTTP_CLOSE ? "close" : "keepalive", nlat, errors, elapsed,
           elapsed > 0 ? (double)nlat / elapsed : 0.0, pct(0.50), pct(0.99),
           nlat ? lat[nlat - 1] : 0, attempts, retries, unfinished);
    for (int k = 0; k < E_NCAUSES; k++)
        printf("%s\"%s\": %ld", k ? ", " : "", cause_name[k], cause_count[k]);
    printf("}, \"per_client\": [");
    for (long i = 0; i < nclients; i++)
        printf("%s%ld", i ? ", " : "", clients[i].count);
    printf("], \"min_per_client\": %ld, \"zero_clients\": %ld, \"max_gap_us\": %lld}\n",
           min_count, zero, (long long)(max_gap / 1000));
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *port = NULL, *upath = NULL, *path = "/";
    long nclients = 16, max_conns = -1;
    double seconds = 5, timeout = 5;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (i + 1 >= argc) usage(argv[0]);
        const char *v = argv[++i];
        if (!strcmp(o, "--host")) host = v;
        else if (!strcmp(o, "--port")) port = v;
        else if (!strcmp(o, "--unix")) upath = v;
        else if (!strcmp(o, "--payload")) payload = v;
        else if (!strcmp(o, "--path")) path = v;
        else if (!strcmp(o, "--clients")) nclients = (long)num_arg(argv[0], v, 1);
        else if (!strcmp(o, "--seconds")) seconds = num_arg(argv[0], v, 0);
        else if (!strcmp(o, "--max-conns")) max_conns = (long)num_arg(argv[0], v, 1);
        else if (!strcmp(o, "--timeout")) timeout = num_arg(argv[0], v, 0.001);
        else if (!strcmp(o, "--http")) {
            if (!strcmp(v, "close")) mode = HTTP_CLOSE;
            else if (!strcmp(v, "keepalive")) mode = HTTP_KEEPALIVE;
            else usage(argv[0]);
        }
        else usage(argv[0]);
    }
    if (!port == !upath || nclients > 1000000 || seconds > 1e6 || timeout > 1e6)
        usage(argv[0]);
    if (mode != ECHO) {
        /* The request, built once; "Host" is what a client names (RFC 9112
         * requires it on 1.1), the only header besides Connection. */
        static char request[2048];
        int n = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n",
                         path, upath ? "localhost" : host,
                         mode == HTTP_CLOSE ? "Connection: close\r\n" : "");
        if (n < 0 || (size_t)n >= sizeof request || path[0] != '/' || strpbrk(path, " \r\n"))
            usage(argv[0]);
        payload = request;
    }
    plen = strlen(payload);
    if (!plen) usage(argv[0]);
    /* Echo: room for any "<pid>: " style prefix.  HTTP: a whole response. */
    rcap = mode == ECHO ? plen + 256 : 16384;

    if (upath) {
        struct sockaddr_un *un = (struct sockaddr_un *)&addr;
        if (strlen(upath) >= sizeof un->sun_path) { fprintf(stderr, "unix path too long\n"); return 2; }
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, upath);
        addrlen = sizeof *un;
    } else {
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV }, *res;
        int rc = getaddrinfo(host, port, &hints, &res);
        if (rc) { fprintf(stderr, "%s:%s: %s\n", host, port, gai_strerror(rc)); return 2; }
        memcpy(&addr, res->ai_addr, res->ai_addrlen);
        addrlen = res->ai_addrlen;
        freeaddrinfo(res);
    }

    /* Each client holds one fd; raise the soft limit if needed. */
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < (rlim_t)nclients + 64) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)nclients + 64)
            fprintf(stderr, "warning: RLIMIT_NOFILE %lu < clients\n", (unsigned long)rl.rlim_cur);
    }

    clients = calloc((size_t)nclients, sizeof *clients);
    idle = malloc((size_t)nclients * sizeof *idle);
    char *rbufs = malloc((size_t)nclients * rcap);
    if (!clients || !idle || !rbufs) { perror("malloc"); return 1; }
    if ((epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) { perror("epoll_create1"); return 1; }

    t_start = now_ns();
    t_stop = t_start + (int64_t)(seconds * 1e9);
    t_last = t_start;
    const int64_t t_hard = t_stop + (mode == HTTP_KEEPALIVE ? 1000000000LL : 5000000000LL);
    const int64_t tmo = (int64_t)(timeout * 1e9);
    for (long i = 0; i < nclients; i++) {
        clients[i].fd = -1;
        clients[i].rbuf = rbufs + (size_t)i * rcap;
        clients[i].last_done = t_start;
        idle[nidle++] = (int)(nclients - 1 - i);
    }
    int64_t now = t_start, last_scan = t_start;
    struct epoll_event evs[512];

    for (;;) {
        /* (Re)start idle slots while still allowed to.  A slot that fails
         * synchronously is pushed back; at most one attempt per slot that was
         * idle on entry keeps this pass bounded. */
        int starting = (now < t_stop && (max_conns < 0 || attempts < max_conns));
        for (int n = nidle; starting && n > 0; n--) {
            if (max_conns >= 0 && attempts >= max_conns) break;
            start(idle[--nidle]);
        }
        long inflight = nclients - nidle;
        if (!starting && inflight == 0) break;
        if (now >= t_hard) break;

        /* Short timeout keeps the start/stop/timeout checks responsive; if a
         * slot is idle after a synchronous failure, retry soon but without
         * spinning at 100% CPU. */
        int n = epoll_wait(epfd, evs, 512, nidle && starting ? 1 : 10);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int k = 0; k < n; k++)
            on_event((int)evs[k].data.u32, evs[k].events);
        now = now_ns();

        /* Per-request timeouts, checked every 50 ms (O(clients)). */
        if (now - last_scan >= 50000000) {
            last_scan = now;
            for (long i = 0; i < nclients; i++)
                if (clients[i].st != IDLE && now - clients[i].t0 >= tmo)
                    fail((int)i, E_TIMEOUT, ETIMEDOUT);
        }
    }

    /* Hard deadline reached: unfinished requests are errors, except in
     * keep-alive mode (see the header comment). */
    long unfinished = 0;
    for (long i = 0; i < nclients; i++) {
        if (clients[i].st == IDLE) continue;
        if (mode == HTTP_KEEPALIVE) { unfinished++; end_conn((int)i); }
        else fail((int)i, E_TIMEOUT, ETIMEDOUT);
    }
    double elapsed = (double)(now_ns() - t_start) / 1e9;
    if (mode != ECHO)           /* until the last success: a drain of nothing is not load */
        elapsed = (double)(t_last - t_start) / 1e9;

    if (nlat) qsort(lat, nlat, sizeof *lat, cmp_u32);   /* lat may be NULL */
    if (mode == ECHO)
        printf("{\"conns\": %zu, \"errors\": %ld, \"seconds\": %.3f, \"conns_per_s\": %.1f, "
               "\"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u}\n",
               nlat, errors, elapsed, elapsed > 0 ? (double)nlat / elapsed : 0.0,
               pct(0.50), pct(0.99), nlat ? lat[nlat - 1] : 0);
    else
        print_http(nclients, elapsed, unfinished);
    fflush(stdout);
    if (errors) {
        fprintf(stderr, "loadgen errors:");
        for (int k = 0; k < E_NCAUSES; k++)
            if (cause_count[k]) fprintf(stderr, " %s=%ld", cause_name[k], cause_count[k]);
        if (cause_count[E_OTHER]) fprintf(stderr, " (last: %s)", strerror(last_other_errno));
        fputc('\n', stderr);
    }
    return 0;
}
