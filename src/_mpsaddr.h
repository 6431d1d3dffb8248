/*
 * _mpsaddr.h - a peer's address as text, without printf: shared by the two
 * CPython extensions that accept connections in C (_mpshttp.c's connection
 * loop, _mpsaccept.c's acceptor).  One connection's address and port through
 * glibc's inet_ntop and a "%d" format cost as much as a request's environ
 * keys: vfprintf both times.
 */
#ifndef MPS_ADDR_H
#define MPS_ADDR_H

#include <arpa/inet.h>
#include <netinet/in.h>
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

#endif
