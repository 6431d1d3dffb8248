/*
 * ref_prefork.c - minimal C prefork echo server: the physical floor that the
 * Python prefork server is benchmarked against.
 *
 * Build: cc -O2 -Wall -Wextra -o ref_prefork ref_prefork.c
 * Usage: ref_prefork --fd N   [NCHILD]   inherit an already-listening socket
 *        ref_prefork --port P [NCHILD]   bind 127.0.0.1:P (P may be 0)
 *
 * With --port, "PORT <n>\n" (the bound port) is printed and flushed on stdout
 * once the socket is listening, so a harness can use it as a readiness signal.
 * With --fd, O_NONBLOCK is cleared on the socket; that flag lives on the open
 * file description, so the process that passed the fd sees the change too.
 *
 * NCHILD children (default 4) each loop: blocking accept() on the shared
 * socket, one read() of up to 128 bytes, write "<pid>: <data>", close.  No
 * locks, no bookkeeping.  The parent only waits; on SIGTERM/SIGINT it sends
 * SIGTERM to the children, reaps them and exits 0.  If every child dies on its
 * own the parent exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_stop(int sig) { (void)sig; stop = 1; }
static void on_chld(int sig) { (void)sig; } /* only to interrupt sigsuspend */

static void die(const char *what) { perror(what); exit(1); }

static void child_loop(int lfd, pid_t parent)
{
    /* Never outlive the parent.  The getppid() check closes the race where
     * the parent died before prctl() took effect. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
        _exit(1);
    char buf[32 + 128];
    int plen = snprintf(buf, 32, "%d: ", (int)getpid());
    for (;;) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) {
            if (errno == EBADF || errno == EINVAL || errno == ENOTSOCK)
                _exit(1);              /* not a listening socket: fatal */
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                usleep(1000);          /* resource shortage: don't spin */
            continue;                  /* EINTR, ECONNABORTED, ... */
        }
        /* Read straight behind the "<pid>: " prefix so one write() suffices. */
        ssize_t n = read(cfd, buf + plen, 128);
        if (n > 0) {
            const char *p = buf;
            size_t left = (size_t)plen + (size_t)n;
            while (left > 0) {
                ssize_t w = write(cfd, p, left);
                if (w < 0 && errno == EINTR) continue;
                if (w <= 0) break;     /* EPIPE/ECONNRESET: client is gone */
                p += w; left -= (size_t)w;
            }
        }
        close(cfd);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4 || (strcmp(argv[1], "--fd") && strcmp(argv[1], "--port"))) {
        fprintf(stderr, "usage: %s (--fd N | --port P) [NCHILD]\n", argv[0]);
        return 2;
    }
    char *end, *end2 = "";
    long val = strtol(argv[2], &end, 10);
    long nchild = argc == 4 ? strtol(argv[3], &end2, 10) : 4;
    if (*end || *end2 || end == argv[2] || val < 0 || nchild < 1 || nchild > 4096) {
        fprintf(stderr, "bad fd/port or NCHILD\n");
        return 2;
    }

    int lfd, acc = 0;
    socklen_t alen = sizeof acc;
    if (!strcmp(argv[1], "--fd")) {
        lfd = (int)val;
        if (getsockopt(lfd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &alen) < 0 || !acc) {
            fprintf(stderr, "fd %d is not a listening socket\n", lfd);
            return 2;
        }
        int fl = fcntl(lfd, F_GETFL);  /* children rely on a blocking accept() */
        if (fl < 0 || fcntl(lfd, F_SETFL, fl & ~O_NONBLOCK) < 0) die("fcntl");
    } else {
        if (val > 65535) { fprintf(stderr, "bad port\n"); return 2; }
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)val) };
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t slen = sizeof sa;
        int one = 1;
        if ((lfd = socket(AF_INET, SOCK_STREAM, 0)) < 0) die("socket");
        if (setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) die("setsockopt");
        if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
        if (listen(lfd, 1024) < 0) die("listen");
        if (getsockname(lfd, (struct sockaddr *)&sa, &slen) < 0) die("getsockname");
        printf("PORT %d\n", ntohs(sa.sin_port));
        fflush(stdout);                /* before fork: no duplicated buffers */
    }

    /* Block the signals we wait for before forking, so none is lost between
     * the waitpid() check and sigsuspend(). */
    sigset_t block, waitmask;
    sigemptyset(&block);
    sigaddset(&block, SIGCHLD); sigaddset(&block, SIGTERM); sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &waitmask);
    signal(SIGPIPE, SIG_IGN);          /* inherited by the children */
    struct sigaction sa = { .sa_handler = on_stop };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_chld;
    sigaction(SIGCHLD, &sa, NULL);

    pid_t parent = getpid(), *pids = calloc((size_t)nchild, sizeof *pids);
    if (!pids) die("calloc");
    long alive = 0;
    int rc = 0;
    for (long i = 0; i < nchild; i++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); stop = 1; rc = 1; break; }
        if (pid == 0) {
            signal(SIGTERM, SIG_DFL); signal(SIGINT, SIG_DFL); signal(SIGCHLD, SIG_DFL);
            sigprocmask(SIG_SETMASK, &waitmask, NULL);
            child_loop(lfd, parent);
        }
        pids[i] = pid;
        alive++;
    }

    int st;
    while (!stop) {
        pid_t pid;
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
            for (long i = 0; i < nchild; i++)
                if (pids[i] == pid) { pids[i] = 0; alive--; }
        }
        if (alive == 0) { fprintf(stderr, "all children exited\n"); return 1; }
        sigsuspend(&waitmask);
    }
    /* Only unreaped pids are signalled, so a recycled pid is never hit. */
    for (long i = 0; i < nchild; i++)
        if (pids[i] > 0) kill(pids[i], SIGTERM);
    while (waitpid(-1, &st, 0) > 0 || errno == EINTR)
        ;
    return rc;
}
