/*
 * _mpscore.c -- the mps scoreboard: child slots and the idle counter in
 * anonymous MAP_SHARED memory, guarded by a process-shared robust mutex.
 *
 * Compiled through cffi (build_ffi.py pastes this file into set_source) and
 * also #included by mps/_bench/lockbench.c (the C-only floor), so it must
 * stay Python-free: PODs only, no pointers inside the shared mapping, every
 * function returns 0 (or a documented non-negative value) or -errno.
 *
 * Invariant kept by every locked transition below:
 *     head.idle == number of slots whose state is MPS_IDLE
 * because the slot state and the counter change inside the same critical
 * section.  A holder that dies inside it leaves the mutex EOWNERDEAD; the
 * next locker recounts the counter from the slots and marks it consistent.
 *
 * A holder that is stopped instead (SIGSTOP, a debugger, a cgroup freezer)
 * never dies on its own, so the master's calls lock with a deadline
 * (lock_timeout_ns) and return -ETIMEDOUT; the master then reads the holder
 * (mps_lock_holder), kills it, and its retry takes the EOWNERDEAD path.
 * Children's calls keep the plain blocking lock: their hot path is unchanged.
 */
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MPS_MAGIC   0x3153504dU     /* "MPS1" */
#define MPS_VERSION 3     /* 2: lock_timeout_ns after the head; 3: requests, busy time */
#define MPS_REQUEST_LEN 64  /* bytes of a slot's request line, NUL-padded */

/* pthread_mutex_clocklock (glibc >= 2.30, declared under _GNU_SOURCE, which
 * glibc turns into __USE_GNU) waits on CLOCK_MONOTONIC; the portable
 * timedlock waits on CLOCK_REALTIME, which a clock step can stretch or cut
 * short -- acceptable for a fallback. */
#if defined(__USE_GNU) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 30)
#define MPS_CLOCKLOCK 1
#endif
#endif

enum mps_state {
    MPS_EMPTY = 0,      /* free slot */
    MPS_STARTING = 1,   /* reserved by the master before fork() */
    MPS_IDLE = 2,       /* child waiting in accept() */
    MPS_BUSY = 3,       /* child serving a connection */
    MPS_EXITING = 4     /* child told to leave, or leaving on its own */
};

struct mps_slot {
    int64_t pid;
    int64_t state;          /* enum mps_state */
    int64_t connections;    /* connections this child accepted */
    int64_t changed_ns;     /* CLOCK_MONOTONIC time of the last state change */
    int64_t retire;         /* set by the master: leave after this connection */
    int64_t requests;       /* requests begun on this child's connections (HTTP) */
    int64_t busy_since;     /* when the current connection was accepted, 0 when idle */
    int64_t busy_ns;        /* time spent serving connections, accumulated */
    char request[MPS_REQUEST_LEN];  /* the request being served (method and path) */
};

struct mps_head {
    int64_t nslots;
    int64_t idle;           /* the idle counter (the seed's servers_waiting) */
    int64_t min_spare;      /* the master's live min_spare: busy below it wakes the master */
    int64_t connections;    /* connections accepted by all children */
    int64_t repairs;        /* times the counter was recounted from the slots */
    int64_t wake_pending;   /* a child has woken the master; it re-arms when it can act */
    int64_t requests;       /* requests begun by all children (HTTP) */
    int64_t busy_ns_done;   /* busy time of the children already reaped */
};

typedef struct mps_board {
    uint32_t magic;
    uint32_t version;
    size_t size;            /* bytes mapped, for munmap */
    struct mps_head head;
    int64_t lock_timeout_ns;    /* the master's calls give up after this (0: never) */
    pthread_mutex_t lock;
    struct mps_slot slots[];
} mps_board;

static int64_t mps_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Caller holds the lock.  Returns how far the counter had drifted. */
static int64_t mps_recount(mps_board *b)
{
    int64_t idle = 0, i;
    for (i = 0; i < b->head.nslots; i++)
        idle += b->slots[i].state == MPS_IDLE;
    idle -= b->head.idle;
    b->head.idle += idle;
    return idle;
}

/* Every transition locks through here; timeout_ns 0 blocks, else the wait
 * ends with -ETIMEDOUT.  EOWNERDEAD means a process died holding the lock,
 * possibly between a slot store and the counter store: recount before anyone
 * trusts the counter again.  Inlined with a constant 0 for the children, so
 * their path is the plain pthread_mutex_lock it always was. */
static inline int mps_lock_within_(mps_board *b, int64_t timeout_ns)
{
    struct timespec at;
    int rc;
    if (timeout_ns <= 0) {
        rc = pthread_mutex_lock(&b->lock);
    } else {
#ifdef MPS_CLOCKLOCK
        clockid_t clock = CLOCK_MONOTONIC;
#else
        clockid_t clock = CLOCK_REALTIME;
#endif
        clock_gettime(clock, &at);
        timeout_ns += at.tv_nsec;
        at.tv_sec += (time_t)(timeout_ns / 1000000000);
        at.tv_nsec = (long)(timeout_ns % 1000000000);
#ifdef MPS_CLOCKLOCK
        rc = pthread_mutex_clocklock(&b->lock, clock, &at);
#else
        rc = pthread_mutex_timedlock(&b->lock, &at);
#endif
    }
    if (rc == EOWNERDEAD) {
        mps_recount(b);
        b->head.repairs++;
        pthread_mutex_consistent(&b->lock);
        return 0;
    }
    return -rc;
}

/* Children: block until the lock is ours (a stopped holder stops them too;
 * the master, which does not block, kills it). */
static inline int mps_lock_(mps_board *b)
{
    return mps_lock_within_(b, 0);
}

/* Master: wait at most lock_timeout_ns, so a stopped holder cannot freeze
 * the master (and, behind it, every child) forever. */
static int mps_lock_master_(mps_board *b)
{
    return mps_lock_within_(b, b->lock_timeout_ns);
}

static void mps_unlock_(mps_board *b)
{
    pthread_mutex_unlock(&b->lock);
}

/* Every per-slot transition starts here: check the index, take the lock
 * (timeout_ns as in mps_lock_within_: children pass 0). */
static inline int mps_lock_slot(mps_board *b, int64_t slot, struct mps_slot **s,
                                int64_t timeout_ns)
{
    int rc;
    if (slot < 0 || slot >= b->head.nslots)
        return -EINVAL;
    if ((rc = mps_lock_within_(b, timeout_ns)) < 0)
        return rc;
    *s = &b->slots[slot];
    return 0;
}

/* A connection ends (or its child dies): add its time to the slot's busy time. */
static void mps_end_busy(struct mps_slot *s, int64_t now)
{
    if (s->busy_since) {
        s->busy_ns += now - s->busy_since;
        s->busy_since = 0;
    }
}

/* `now` is read before locking: the clock stays out of the critical section. */
static void mps_set_state(struct mps_slot *s, int64_t state, int64_t now)
{
    s->state = state;
    s->changed_ns = now;
}

/* Master, before any fork: map and initialise a board of nslots slots, in
 * the memory of fd (a memfd, so that a re-executed master can map the same
 * board again: mps_attach) or, with fd -1, in anonymous shared memory. */
static int mps_create_fd(int64_t nslots, int fd, mps_board **out)
{
    pthread_mutexattr_t attr;
    mps_board *b;
    size_t size;
    int rc;

    if (nslots < 1 || nslots > 1 << 20)
        return -EINVAL;
    size = sizeof(mps_board) + (size_t)nslots * sizeof(struct mps_slot);
    if (fd >= 0 && ftruncate(fd, (off_t)size) != 0)
        return -errno;
    b = mmap(NULL, size, PROT_READ | PROT_WRITE,
             fd >= 0 ? MAP_SHARED : MAP_SHARED | MAP_ANONYMOUS, fd, 0);
    if (b == MAP_FAILED)
        return -errno;
    memset(b, 0, size);     /* anonymous maps are zeroed; say so anyway */
    b->magic = MPS_MAGIC;
    b->version = MPS_VERSION;
    b->size = size;
    b->head.nslots = nslots;

    if ((rc = pthread_mutexattr_init(&attr)) == 0) {
        if ((rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)) == 0 &&
            (rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)) == 0)
            rc = pthread_mutex_init(&b->lock, &attr);
        pthread_mutexattr_destroy(&attr);
    }
    if (rc != 0) {
        munmap(b, size);
        return -rc;
    }
    *out = b;
    return 0;
}

/* Master, at exit (each child's copy dies with the child).  No lock. */
static int mps_create(int64_t nslots, mps_board **out)
{
    return mps_create_fd(nslots, -1, out);
}

/* Master, re-executed (an upgrade): map the board its old image created in
 * fd, where its running children still keep their slots.  No lock: the
 * mutex and the slots are as the children left them.  -EPROTO when fd does
 * not hold a board of this version. */
static int mps_attach(int fd, mps_board **out)
{
    struct stat st;
    mps_board *b;
    if (fstat(fd, &st) != 0)
        return -errno;
    if ((size_t)st.st_size < sizeof(mps_board))
        return -EPROTO;
    b = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (b == MAP_FAILED)
        return -errno;
    if (b->magic != MPS_MAGIC || b->version != MPS_VERSION || b->size != (size_t)st.st_size ||
        b->size != sizeof(mps_board) + (size_t)b->head.nslots * sizeof(struct mps_slot)) {
        munmap(b, (size_t)st.st_size);
        return -EPROTO;
    }
    *out = b;
    return 0;
}

static int mps_destroy(mps_board *b)
{
    return munmap(b, b->size) == 0 ? 0 : -errno;
}

/* Master, before fork(): claim the first empty slot as STARTING.
 * Locks (master: -ETIMEDOUT past lock_timeout_ns, as every "Locks (master)"
 * below).  Returns the slot index, or -ENOSPC when every slot is taken. */
static int64_t mps_reserve(mps_board *b)
{
    int64_t now = mps_now_ns();
    int64_t i;
    int rc = mps_lock_master_(b);
    if (rc < 0)
        return rc;
    for (i = 0; i < b->head.nslots; i++) {
        struct mps_slot *s = &b->slots[i];
        if (s->state == MPS_EMPTY) {
            s->pid = 0;
            s->connections = 0;
            s->retire = 0;
            s->requests = 0;
            s->busy_since = 0;
            s->busy_ns = 0;
            s->request[0] = 0;
            mps_set_state(s, MPS_STARTING, now);
            mps_unlock_(b);
            return i;
        }
    }
    mps_unlock_(b);
    return -ENOSPC;
}

/* Master, after fork() returned pid for this slot.  Locks (master). */
static int mps_started(mps_board *b, int64_t slot, int64_t pid)
{
    struct mps_slot *s;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, b->lock_timeout_ns)) < 0)
        return rc;
    s->pid = pid;
    mps_unlock_(b);
    return 0;
}

/* Master, when it reaps the slot's pid or when fork() failed: free the slot
 * whatever state the child left it in (the seed leaked it).  Locks (master).
 * Returns the state the slot was in. */
static int mps_release(mps_board *b, int64_t slot)
{
    int64_t now = mps_now_ns();
    struct mps_slot *s;
    int64_t was;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, b->lock_timeout_ns)) < 0)
        return rc;
    was = s->state;
    if (was == MPS_IDLE)
        b->head.idle--;
    mps_end_busy(s, now);
    b->head.busy_ns_done += s->busy_ns;
    s->busy_ns = 0;
    s->pid = 0;
    s->retire = 0;
    mps_set_state(s, MPS_EMPTY, now);
    mps_unlock_(b);
    return (int)was;
}

/* Master: ask the slot's child to leave without dropping a connection.
 * An idle child becomes EXITING at once (it no longer counts as idle); a
 * starting or busy one is flagged and leaves at its next mps_idle().
 * Locks (master).  Returns the slot's state before the call. */
static int mps_retire(mps_board *b, int64_t slot)
{
    int64_t now = mps_now_ns();
    struct mps_slot *s;
    int64_t was;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, b->lock_timeout_ns)) < 0)
        return rc;
    was = s->state;
    if (was == MPS_IDLE) {
        b->head.idle--;
        mps_set_state(s, MPS_EXITING, now);
    } else if (was == MPS_STARTING || was == MPS_BUSY) {
        s->retire = 1;
    }
    mps_unlock_(b);
    return (int)was;
}

/* Child, right after accept() returned a connection.  Locks.
 * Returns 1 when idle children fell below min_spare (the caller, or
 * mps_accept_busy, then wakes the master), else 0.  A child retired while it
 * was accepting stays EXITING: it serves this connection, then leaves. */
static int mps_busy(mps_board *b, int64_t slot)
{
    int64_t now = mps_now_ns();
    struct mps_slot *s;
    int rc, wake;
    if ((rc = mps_lock_slot(b, slot, &s, 0)) < 0)
        return rc;
    if (s->state == MPS_IDLE) {
        b->head.idle--;
        mps_set_state(s, MPS_BUSY, now);
    } else {
        s->changed_ns = now;    /* the timeout clock starts now */
    }
    mps_end_busy(s, now);       /* (never set here; a guard against a lost idle) */
    s->busy_since = now;
    s->connections++;
    b->head.connections++;
    /* Edge-triggered: one wake-up until the master re-arms, so a pool held
     * below min_spare (saturated) does not cost the master a pass per
     * connection. */
    wake = b->head.idle < b->head.min_spare && !b->head.wake_pending;
    if (wake)
        b->head.wake_pending = 1;
    mps_unlock_(b);
    return wake;
}

/* Child, after each connection (and once after boot, STARTING -> IDLE).
 * Locks.  Returns 1 when the master has retired the slot (it is now
 * EXITING and the child must leave), else 0 (the slot is IDLE). */
static int mps_idle(mps_board *b, int64_t slot)
{
    int64_t now = mps_now_ns();
    struct mps_slot *s;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, 0)) < 0)
        return rc;
    mps_end_busy(s, now);
    if (s->retire || s->state == MPS_EXITING) {
        mps_set_state(s, MPS_EXITING, now);
        mps_unlock_(b);
        return 1;
    }
    if (s->state != MPS_IDLE)
        b->head.idle++;
    mps_set_state(s, MPS_IDLE, now);
    mps_unlock_(b);
    return 0;
}

/* Child, between connections: one call (the caller released the GIL) for
 * what used to be three.  With idle_first, first the idle transition of the
 * connection just finished (-ESHUTDOWN when the master has retired the
 * slot: the child must leave).  Then accept4() on the listener -- which the
 * master made non-blocking -- and, while nothing is queued, epoll_wait() on
 * epoll_fd: the listener registered EPOLLEXCLUSIVE (one idle child woken
 * per connection, not all of them) and the child's signal wake-up pipe.  An
 * idle child sleeps there until a connection or a signal: no periodic
 * wake-up, and no lost SIGTERM -- one that lands before the wait has already
 * written its byte, so the wait returns at once (-EINTR; the caller runs
 * the handler and drains the pipe).  epoll_fd -1: do not wait (-EAGAIN).
 * Then the busy transition and, when idle children fell below min_spare,
 * one byte to wake_fd so the master forks at once.  Locks for the two
 * transitions only.  Returns the connected fd or -errno. */
static int mps_accept_busy(mps_board *b, int64_t slot, int listen_fd, int epoll_fd,
                           int idle_first, int wake_fd, void *addr, uint32_t *addrlen)
{
    struct epoll_event ev;
    socklen_t len;
    int fd, rc;

    if (idle_first && (rc = mps_idle(b, slot)) != 0)
        return rc < 0 ? rc : -ESHUTDOWN;
    for (;;) {
        len = *addrlen;
        fd = accept4(listen_fd, (struct sockaddr *)addr, &len, SOCK_CLOEXEC);
        if (fd >= 0)
            break;
        if (errno != EAGAIN || epoll_fd < 0)
            return -errno;
        rc = epoll_wait(epoll_fd, &ev, 1, -1);
        if (rc < 0)
            return -errno;
        if (rc == 1 && ev.data.fd != listen_fd)
            return -EINTR;      /* the wake-up pipe: a signal came */
    }
    *addrlen = len;
    rc = mps_busy(b, slot);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    if (rc == 1 && wake_fd >= 0) {
        /* Non-blocking pipe: a full pipe already means "wake up". */
        ssize_t ignored = write(wake_fd, "c", 1);
        (void)ignored;
    }
    return fd;
}

/* Child, when it leaves on its own (connection budget spent, stop).  Locks. */
static int mps_done(mps_board *b, int64_t slot)
{
    int64_t now = mps_now_ns();
    struct mps_slot *s;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, 0)) < 0)
        return rc;
    if (s->state == MPS_IDLE)
        b->head.idle--;
    mps_end_busy(s, now);
    mps_set_state(s, MPS_EXITING, now);
    mps_unlock_(b);
    return 0;
}

/* Child, when a request starts on its connection (HTTP keep-alive serves
 * many): restart the slot's timeout clock, count the request, show its line.
 * No lock: only this child writes these fields, each 8-byte store is atomic,
 * and a reader that races the line copy shows a mixed line, nothing worse. */
static int mps_begin_request(mps_board *b, int64_t slot, const char *method,
                             const char *target)
{
    struct mps_slot *s;
    size_t n = 0;
    if (slot < 0 || slot >= b->head.nslots)
        return -EINVAL;
    s = &b->slots[slot];
    /* "METHOD TARGET", cut to fit: both are NUL-terminated (cffi passes
     * bytes so, and llhttp lets no NUL into either). */
    while (*method && n < MPS_REQUEST_LEN - 1)
        s->request[n++] = *method++;
    if (n < MPS_REQUEST_LEN - 1)
        s->request[n++] = ' ';
    while (*target && n < MPS_REQUEST_LEN - 1)
        s->request[n++] = *target++;
    memset(s->request + n, 0, MPS_REQUEST_LEN - n);
    __atomic_store_n(&s->changed_ns, mps_now_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(&s->requests, s->requests + 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&b->head.requests, 1, __ATOMIC_RELAXED);
    return 0;
}

/* Child: the idle counter, read without the lock -- a hint ("is any child
 * idle to take a waiting connection?"), stale by the time it is used. */
static int64_t mps_idle_count(mps_board *b)
{
    return __atomic_load_n(&b->head.idle, __ATOMIC_RELAXED);
}

/* Master or status: copy the header and every slot out.  Locks (master). */
static int mps_snapshot(mps_board *b, struct mps_head *head, struct mps_slot *slots)
{
    int rc = mps_lock_master_(b);
    if (rc < 0)
        return rc;
    *head = b->head;
    memcpy(slots, b->slots, (size_t)b->head.nslots * sizeof(struct mps_slot));
    mps_unlock_(b);
    return 0;
}

/* Master, every pass: recount idle slots; repair and count any drift,
 * stored in *drift (recount - counter).  Locks (master). */
static int mps_audit(mps_board *b, int64_t *drift)
{
    int rc = mps_lock_master_(b);
    if (rc < 0)
        return rc;
    *drift = mps_recount(b);
    if (*drift != 0)
        b->head.repairs++;
    mps_unlock_(b);
    return 0;
}

/* Master: publish the live min_spare and re-arm the children's wake-up
 * (on start, on TTIN/TTOU, and on each pass that can fork).  Locks (master). */
static int mps_set_min_spare(mps_board *b, int64_t min_spare)
{
    int rc = mps_lock_master_(b);
    if (rc < 0)
        return rc;
    b->head.min_spare = min_spare;
    b->head.wake_pending = 0;
    mps_unlock_(b);
    return 0;
}

/* Master: how long its calls wait for the lock before -ETIMEDOUT (0, the
 * default, waits forever).  No lock: a plain store that only master-side
 * calls read. */
static int mps_set_lock_timeout(mps_board *b, int64_t timeout_ns)
{
    if (timeout_ns < 0)
        return -EINVAL;
    b->lock_timeout_ns = timeout_ns;
    return 0;
}

/* Master, after -ETIMEDOUT: the pid holding the lock, or 0 when it is free,
 * its holder died, or the C library is not glibc.  No lock (it must not
 * wait on the lock it asks about), so the answer may already be stale.
 * It reads the robust futex word, whose low bits are the holder's TID by
 * kernel ABI (FUTEX_TID_MASK); the holders are single-threaded children,
 * so TID == pid.  Nothing is stored on the children's hot path for this. */
static int64_t mps_lock_holder(mps_board *b)
{
#ifdef __GLIBC__
    unsigned int word = __atomic_load_n((unsigned int *)&b->lock.__data.__lock,
                                        __ATOMIC_RELAXED);
    return (int64_t)(word & FUTEX_TID_MASK);
#else
    (void)b;
    return 0;
#endif
}

/* Benchmarks only: an empty call with a transition's arguments -- the floor
 * of crossing from Python into C that mps_busy/mps_idle are measured against. */
static int mps_nop(mps_board *b, int64_t slot)
{
    (void)b;
    return (int)(slot & 0);
}

/* Tests only: take the lock and keep it (the caller then dies holding it). */
static int mps_hold_lock(mps_board *b)
{
    return mps_lock_(b);
}
