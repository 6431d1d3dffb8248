/*
 * loadgen.c - connection-per-request load generator for loopback benchmarks.
 *
 * Build: cc -O2 -Wall -Wextra -o loadgen loadgen.c
 * Usage: loadgen (--port P [--host H] | --unix PATH) [--clients C]
 *                [--seconds S] [--payload STR] [--max-conns N] [--timeout T]
 *   --host       numeric or resolvable host (default 127.0.0.1)
 *   --clients    concurrent connections kept in flight (default 16)
 *   --seconds    stop starting new connections after S seconds (default 5)
 *   --payload    bytes sent on each connection (default "hello")
 *   --max-conns  also stop after N connection attempts in total
 *   --timeout    per-connection timeout in seconds (default 5)
 *
 * Single thread, non-blocking sockets, one edge-triggered epoll set, so on a
 * small machine it costs far less CPU than the server it drives.  Each client
 * slot repeatedly: opens a NEW connection, writes the payload, reads until EOF
 * (the server closes after replying), checks that the reply contains the
 * payload, records connect()-start -> EOF latency, closes and starts over.
 * After S seconds (or N attempts) no new connection is started; in-flight
 * ones are drained until a hard deadline of S+5 s, and whatever is still
 * unfinished then counts as an error.  Output is ONE JSON line on stdout:
 *   {"conns": N, "errors": E, "seconds": T, "conns_per_s": X,
 *    "p50_us": .., "p99_us": .., "max_us": ..}
 * "conns" counts successful connections only; "seconds" runs from start until
 * the last connection finished.  A per-cause error breakdown goes to stderr.
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
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum state { IDLE, WRITING, READING };
enum cause { E_REFUSED, E_RESET, E_TIMEOUT, E_REPLY, E_OTHER, E_NCAUSES };
static const char *cause_name[E_NCAUSES] = { "refused", "reset", "timeout",
                                             "bad_reply", "other" };

struct client {
    int fd;
    enum state st;
    size_t woff;            /* payload bytes written so far */
    size_t rlen;            /* reply bytes kept in rbuf */
    int64_t t0;             /* ns, taken just before connect() */
    char *rbuf;             /* rcap bytes */
};

static struct sockaddr_storage addr;
static socklen_t addrlen;
static const char *payload = "hello";
static size_t plen, rcap;

static struct client *clients;
static int *idle, nidle;    /* stack of slots waiting for a new connection */
static int epfd;

static uint32_t *lat;       /* successful latencies, us; grows by doubling */
static size_t nlat, lcap;
static long errors, cause_count[E_NCAUSES], attempts;
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
            "[--seconds S] [--payload STR] [--max-conns N] [--timeout T]\n", prog);
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

/* End the current connection of slot i; the slot is restarted by the main
 * loop.  close() also removes the fd from the epoll set. */
static void finish(int i, int cause, int err)
{
    struct client *c = &clients[i];
    close(c->fd);
    c->fd = -1;
    c->st = IDLE;
    idle[nidle++] = i;
    if (cause >= 0) {
        record_error(cause, err);
        return;
    }
    if (!memmem(c->rbuf, c->rlen, payload, plen)) {
        record_error(E_REPLY, 0);      /* short or mismatched reply */
        return;
    }
    if (nlat == lcap) {
        lcap = lcap ? lcap * 2 : 65536;
        if (!(lat = realloc(lat, lcap * sizeof *lat))) { perror("realloc"); exit(1); }
    }
    int64_t us = (now_ns() - c->t0) / 1000;
    lat[nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

/* Write the rest of the payload.  Returns 1 when all is written, 0 on EAGAIN
 * (wait for EPOLLOUT), -1 if the connection failed and was finished.  A failed
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
        if (n < 0) { finish(i, errno_cause(errno), errno); return -1; }
        c->woff += (size_t)n;
    }
    c->st = READING;
    return 1;
}

/* Start a new connection on idle slot i.  A synchronous failure is recorded
 * and leaves the slot idle, to be retried on the next loop iteration (no
 * recursion, no busy loop inside one iteration). */
static void start(int i)
{
    struct client *c = &clients[i];
    attempts++;
    c->woff = c->rlen = 0;
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { record_error(E_OTHER, errno); idle[nidle++] = i; return; }
    c->t0 = now_ns();
    if (connect(c->fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        /* AF_UNIX reports a full backlog as EAGAIN: count it as refused. */
        int err = errno;
        finish(i, err == EAGAIN ? E_REFUSED : errno_cause(err), err);
        return;
    }
    /* Write at once: on loopback the handshake has usually completed inside
     * connect(), which saves an epoll round trip per connection. */
    c->st = WRITING;
    int done = try_write(i);
    if (done < 0) return;
    /* Edge-triggered, registered once (no EPOLL_CTL_MOD per state change).
     * EPOLLOUT only if the write is still pending; ADD reports readiness that
     * already exists, so nothing that happened before it is missed. */
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | EPOLLET | (done ? 0 : EPOLLOUT),
                              .data.u32 = (uint32_t)i };
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
}

static void on_event(int i, uint32_t events)
{
    struct client *c = &clients[i];
    if (c->st == WRITING) {
        /* The reply cannot arrive before the request is written, and with
         * EPOLLET any later arrival raises a fresh event: return either way. */
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) try_write(i);
        return;
    }
    /* READING.  Events carrying only EPOLLOUT (send-buffer wakeups) have
     * nothing to read; every data/FIN arrival raises its own EPOLLIN edge. */
    if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    /* Drain until EAGAIN (required by edge triggering) or EOF.  Bytes beyond
     * rcap are read and dropped; the reply check uses the kept part. */
    for (;;) {
        char scratch[4096];
        int keep = c->rlen < rcap;
        char *dst = keep ? c->rbuf + c->rlen : scratch;
        size_t room = keep ? rcap - c->rlen : sizeof scratch;
        ssize_t n = read(c->fd, dst, room);
        if (n > 0) { if (keep) c->rlen += (size_t)n; continue; }
        if (n == 0) { finish(i, -1, 0); return; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return;
        finish(i, errno_cause(errno), errno);
        return;
    }
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

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *port = NULL, *upath = NULL;
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
        else if (!strcmp(o, "--clients")) nclients = (long)num_arg(argv[0], v, 1);
        else if (!strcmp(o, "--seconds")) seconds = num_arg(argv[0], v, 0);
        else if (!strcmp(o, "--max-conns")) max_conns = (long)num_arg(argv[0], v, 1);
        else if (!strcmp(o, "--timeout")) timeout = num_arg(argv[0], v, 0.001);
        else usage(argv[0]);
    }
    if (!port == !upath || nclients > 1000000 || seconds > 1e6 || timeout > 1e6)
        usage(argv[0]);
    plen = strlen(payload);
    if (!plen) usage(argv[0]);
    rcap = plen + 256;                 /* room for any "<pid>: " style prefix */

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
    for (long i = 0; i < nclients; i++) {
        clients[i].fd = -1;
        clients[i].rbuf = rbufs + (size_t)i * rcap;
        idle[nidle++] = (int)(nclients - 1 - i);
    }

    const int64_t t_start = now_ns();
    const int64_t t_stop = t_start + (int64_t)(seconds * 1e9);
    const int64_t t_hard = t_stop + 5000000000LL;
    const int64_t tmo = (int64_t)(timeout * 1e9);
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

        /* Per-connection timeouts, checked every 50 ms (O(clients)). */
        if (now - last_scan >= 50000000) {
            last_scan = now;
            for (long i = 0; i < nclients; i++)
                if (clients[i].st != IDLE && now - clients[i].t0 >= tmo)
                    finish((int)i, E_TIMEOUT, ETIMEDOUT);
        }
    }

    /* Hard deadline reached: unfinished connections are errors. */
    for (long i = 0; i < nclients; i++)
        if (clients[i].st != IDLE)
            finish((int)i, E_TIMEOUT, ETIMEDOUT);
    double elapsed = (double)(now_ns() - t_start) / 1e9;

    if (nlat) qsort(lat, nlat, sizeof *lat, cmp_u32);   /* lat may be NULL */
    printf("{\"conns\": %zu, \"errors\": %ld, \"seconds\": %.3f, \"conns_per_s\": %.1f, "
           "\"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u}\n",
           nlat, errors, elapsed, elapsed > 0 ? (double)nlat / elapsed : 0.0,
           pct(0.50), pct(0.99), nlat ? lat[nlat - 1] : 0);
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
