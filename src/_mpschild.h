/*
 * _mpschild.h - what the two CPython extensions that accept connections in
 * a child share (_mpshttp.c's connection loop, _mpsaccept.c's acceptor):
 * the C core's accept entry, as Scoreboard.accept_entry hands it over, and
 * the call made through it; a peer's address as text, without printf (one
 * connection's address and port through glibc's inet_ntop and a "%d" format
 * cost as much as a request's environ keys: vfprintf both times).
 * Include after <Python.h>.
 */
#ifndef MPS_CHILD_H
#define MPS_CHILD_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <sys/socket.h>

/* The decimal digits of v at out, which has room for 5; how many. */
static int decimal(unsigned v, char *out)
{
    char tmp[5];
    int n = 0, i;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0 && n < 5);
    for (i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* An IPv4 or IPv6 sockaddr's host as text at host (NUL-terminated; size at
 * least INET6_ADDRSTRLEN) and its port; -1 for any other family. */
static int address_text(const struct sockaddr *sa, char *host, size_t size, int *port)
{
    if (sa->sa_family == AF_INET && size >= INET_ADDRSTRLEN) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        const unsigned char *a = (const unsigned char *)&in->sin_addr;
        char *p = host;
        *port = ntohs(in->sin_port);
        for (int i = 0; i < 4; i++) {
            p += decimal(a[i], p);
            *p++ = i < 3 ? '.' : '\0';
        }
        return 0;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        *port = ntohs(in6->sin6_port);
        return inet_ntop(AF_INET6, &in6->sin6_addr, host, (socklen_t)size) ? 0 : -1;
    }
    return -1;
}

/* ------------------------------------------------------------ the accept entry */

/* mps_accept_busy and mps_begin_request (src/_mpscore.c) */
typedef int (*mps_accept_fn)(void *board, int64_t slot, int listen_fd, int epoll_fd,
                             int idle_first, int wake_fd, void *addr, uint32_t *addrlen);
typedef int (*mps_begin_fn)(void *board, int64_t slot, const char *method, const char *target);

struct mps_entry {
    mps_accept_fn accept;
    mps_begin_fn begin;     /* PoolView.begin_request's call */
    void *board, *addr;     /* the board; the peer's sockaddr buffer */
    uint32_t *addrlen;
    int64_t slot;
    int listen_fd, epoll_fd, wake_fd;
};

/* A PyArg_Parse "O&" converter: Scoreboard.accept_entry()'s tuple into the
 * struct mps_entry at out (0, with an exception, for anything else). */
static int mps_entry_converter(PyObject *obj, void *out)
{
    unsigned long long accept, begin, board, addr, addrlen;
    long long slot;
    int listen_fd, epoll_fd, wake_fd;
    if (!PyArg_ParseTuple(obj, "KKKLiiiKK;entry: not Scoreboard.accept_entry()'s tuple",
                          &accept, &begin, &board, &slot, &listen_fd, &epoll_fd, &wake_fd,
                          &addr, &addrlen))
        return 0;
    if (accept == 0 || begin == 0 || board == 0 || addr == 0 || addrlen == 0) {
        PyErr_SetString(PyExc_ValueError, "entry: a NULL address");
        return 0;
    }
    struct mps_entry *e = out;
    e->accept = (mps_accept_fn)(uintptr_t)accept;
    e->begin = (mps_begin_fn)(uintptr_t)begin;
    e->board = (void *)(uintptr_t)board;
    e->addr = (void *)(uintptr_t)addr;
    e->addrlen = (uint32_t *)(uintptr_t)addrlen;
    e->slot = slot;
    e->listen_fd = listen_fd;
    e->epoll_fd = epoll_fd;
    e->wake_fd = wake_fd;
    return 1;
}

/* The child's accept through the entry, with the GIL released (the idle
 * transition first with idle_first, the wait, accept4(), the busy
 * transition): the connected fd, or -errno.  The peer's sockaddr is then
 * in e->addr, its length in *e->addrlen. */
static int mps_entry_accept(const struct mps_entry *entry, int idle_first)
{
    struct mps_entry e = *entry;    /* (read while the GIL is held) */
    int fd;
    *e.addrlen = (uint32_t)sizeof(struct sockaddr_storage);
    Py_BEGIN_ALLOW_THREADS
    fd = e.accept(e.board, e.slot, e.listen_fd, e.epoll_fd, idle_first, e.wake_fd, e.addr,
                  e.addrlen);
    Py_END_ALLOW_THREADS
    return fd;
}

#endif
