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
 *
 * The master holds the lock for O(1) work plus at most one byte per slot,
 * so that no child's transition waits long behind it (issue 11: a copy of
 * every 128-byte record under the lock held it 18 us at 1024 slots).  The
 * slot states live apart from the records, one byte each (the state array
 * after the records): what the pool policy counts -- the states and the
 * head's counters -- is copied under the lock as one consistent picture,
 * and the records are copied after, without it.  A record's locked writers
 * make its seq odd while they write it (a seqlock; the lock already orders
 * the writers), and a reader copies it again until seq is even and
 * unchanged, or copies it under the lock when a writer stays inside.
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
#define MPS_VERSION 5     /* 2: lock_timeout_ns after the head; 3: requests, busy time;
                           * 4: states in a byte array, a seq in each record;
                           * 5: the hold word */
#define MPS_REQUEST_LEN 64  /* bytes of a slot's request line, NUL-padded */
#define MPS_MAX_SLOTS (1 << 20)

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

/* One child's record in the shared mapping; its state is in the board's
 * state array (mps_states), not here. */
struct mps_cell {
    int64_t pid;
    int64_t seq;            /* odd while a locked writer updates this record */
    int64_t connections;    /* connections this child accepted */
    int64_t changed_ns;     /* CLOCK_MONOTONIC time of the last state change */
    int64_t retire;         /* set by the master: leave after this connection */
    int64_t requests;       /* requests begun on this child's connections (HTTP) */
    int64_t busy_since;     /* when the current connection was accepted, 0 when idle */
    int64_t busy_ns;        /* time spent serving connections, accumulated */
    char request[MPS_REQUEST_LEN];  /* the request being served (method and path) */
};

/* A slot as mps_snapshot copies it out: the record and its state. */
struct mps_slot {
    int64_t pid;
    int64_t state;          /* enum mps_state */
    int64_t connections;
    int64_t changed_ns;
    int64_t retire;
    int64_t requests;
    int64_t busy_since;
    int64_t busy_ns;
    char request[MPS_REQUEST_LEN];
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
    int64_t hold;           /* an upgrade under way: no recycling at max_requests */
};

typedef struct mps_board {
    uint32_t magic;
    uint32_t version;
    size_t size;            /* bytes mapped, for munmap */
    struct mps_head head;
    int64_t lock_timeout_ns;    /* the master's calls give up after this (0: never) */
    pthread_mutex_t lock;
    struct mps_cell slots[];    /* then uint8_t states[nslots] (mps_states) */
} mps_board;

/* Bytes of a board of nslots slots: the records, then one state byte per
 * slot (padded to 8).  Packed, a whole-board pass under the lock reads
 * nslots bytes, not nslots cache lines. */
static size_t mps_board_size(int64_t nslots)
{
    return sizeof(mps_board) + (size_t)nslots * sizeof(struct mps_cell) +
           (((size_t)nslots + 7) & ~(size_t)7);
}

/* The state array (enum mps_state, one byte a slot): written and read under
 * the lock only.  An offset from the board, never a stored pointer. */
static inline uint8_t *mps_states(mps_board *b)
{
    return (uint8_t *)(b->slots + b->head.nslots);
}

/* Caller holds the lock: begin updating a record (seq odd, then the stores).
 * The lock serialises writers, so no atomic increment is needed, only the
 * order.  It starts from seq | 1, so a writer that died mid-update (seq left
 * odd) is followed by one that keeps it odd while it writes. */
static inline int64_t mps_write_begin(struct mps_cell *s)
{
    int64_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED) | 1;
    __atomic_store_n(&s->seq, seq, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return seq;
}

/* Caller holds the lock: the record's stores are done (seq even again). */
static inline void mps_write_end(struct mps_cell *s, int64_t seq)
{
    __atomic_store_n(&s->seq, seq + 1, __ATOMIC_RELEASE);
}

static int64_t mps_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Caller holds the lock: the IDLE states, counted 8 at a time -- the array
 * is padded to 8 bytes with zeros (EMPTY).  In each word, IDLE bytes are
 * made 0, then each 0 byte is marked 0x80 (the usual exact zero-byte test:
 * no carry crosses a byte) and the marks are added up by one multiply. */
static int64_t mps_count_idle(mps_board *b)
{
    const uint64_t ones = 0x0101010101010101ULL, low7 = 0x7f7f7f7f7f7f7f7fULL;
    const uint8_t *states = mps_states(b);
    size_t words = ((size_t)b->head.nslots + 7) / 8, i;
    int64_t idle = 0;
    for (i = 0; i < words; i++) {
        uint64_t x;
        memcpy(&x, states + 8 * i, 8);
        x ^= ones * MPS_IDLE;
        x = ~(((x & low7) + low7) | x | low7);
        idle += (int64_t)(((x >> 7) * ones) >> 56);
    }
    return idle;
}

/* Caller holds the lock.  Returns how far the counter had drifted. */
static int64_t mps_recount(mps_board *b)
{
    int64_t idle = mps_count_idle(b);
    idle -= b->head.idle;
    b->head.idle += idle;
    return idle;
}

#ifndef MPS_ON_LOCKED     /* lockwatch defines these to time each hold */
#define MPS_ON_LOCKED() ((void)0)
#define MPS_ON_UNLOCK() ((void)0)
#endif

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
        MPS_ON_LOCKED();
        mps_recount(b);
        b->head.repairs++;
        pthread_mutex_consistent(&b->lock);
        return 0;
    }
    if (rc == 0)
        MPS_ON_LOCKED();
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
    MPS_ON_UNLOCK();
    pthread_mutex_unlock(&b->lock);
}

/* Every per-slot transition starts here: check the index, take the lock
 * (timeout_ns as in mps_lock_within_: children pass 0). */
static inline int mps_lock_slot(mps_board *b, int64_t slot, struct mps_cell **s,
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
static void mps_end_busy(struct mps_cell *s, int64_t now)
{
    if (s->busy_since) {
        s->busy_ns += now - s->busy_since;
        s->busy_since = 0;
    }
}

/* `now` is read before locking: the clock stays out of the critical section.
 * Caller holds the lock, inside mps_write_begin/end of the slot's record. */
static void mps_set_state(mps_board *b, int64_t slot, int64_t state, int64_t now)
{
    mps_states(b)[slot] = (uint8_t)state;
    b->slots[slot].changed_ns = now;
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

    if (nslots < 1 || nslots > MPS_MAX_SLOTS)
        return -EINVAL;
    size = mps_board_size(nslots);
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
        b->head.nslots < 1 || b->head.nslots > MPS_MAX_SLOTS ||
        b->size != mps_board_size(b->head.nslots)) {
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
 * below); the search reads one byte a slot.  Returns the slot index, or
 * -ENOSPC when every slot is taken. */
static int64_t mps_reserve(mps_board *b)
{
    int64_t now = mps_now_ns(), i, seq;
    const uint8_t *free_at;
    struct mps_cell *s;
    int rc = mps_lock_master_(b);
    if (rc < 0)
        return rc;
    free_at = memchr(mps_states(b), MPS_EMPTY, (size_t)b->head.nslots);
    if (free_at == NULL) {
        mps_unlock_(b);
        return -ENOSPC;
    }
    i = free_at - mps_states(b);
    s = &b->slots[i];
    seq = mps_write_begin(s);
    s->pid = 0;
    s->connections = 0;
    s->retire = 0;
    s->requests = 0;
    s->busy_since = 0;
    s->busy_ns = 0;
    s->request[0] = 0;
    mps_set_state(b, i, MPS_STARTING, now);
    mps_write_end(s, seq);
    mps_unlock_(b);
    return i;
}

/* Master, after fork() returned pid for this slot.  Locks (master). */
static int mps_started(mps_board *b, int64_t slot, int64_t pid)
{
    struct mps_cell *s;
    int64_t seq;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, b->lock_timeout_ns)) < 0)
        return rc;
    seq = mps_write_begin(s);
    s->pid = pid;
    mps_write_end(s, seq);
    mps_unlock_(b);
    return 0;
}

/* Master, when it reaps the slot's pid or when fork() failed: free the slot
 * whatever state the child left it in (the seed leaked it).  Locks (master).
 * Returns the state the slot was in. */
static int mps_release(mps_board *b, int64_t slot)
{
    int64_t now = mps_now_ns();
    struct mps_cell *s;
    int64_t was, seq;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, b->lock_timeout_ns)) < 0)
        return rc;
    was = mps_states(b)[slot];
    if (was == MPS_IDLE)
        b->head.idle--;
    seq = mps_write_begin(s);
    mps_end_busy(s, now);
    b->head.busy_ns_done += s->busy_ns;
    s->busy_ns = 0;
    s->pid = 0;
    s->retire = 0;
    mps_set_state(b, slot, MPS_EMPTY, now);
    mps_write_end(s, seq);
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
    struct mps_cell *s;
    int64_t was, seq;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, b->lock_timeout_ns)) < 0)
        return rc;
    was = mps_states(b)[slot];
    seq = mps_write_begin(s);
    if (was == MPS_IDLE) {
        b->head.idle--;
        mps_set_state(b, slot, MPS_EXITING, now);
    } else if (was == MPS_STARTING || was == MPS_BUSY) {
        s->retire = 1;
    }
    mps_write_end(s, seq);
    mps_unlock_(b);
    return (int)was;
}

/* Child, right after accept() returned a connection.  Locks.
 * Returns 1 when idle children fell below min_spare (the caller, or
 * mps_accept_busy, then wakes the master), else 0.  A child retired while it
 * was accepting stays EXITING: it serves this connection, then leaves. */
static int mps_busy(mps_board *b, int64_t slot)
{
    int64_t now = mps_now_ns(), seq;
    struct mps_cell *s;
    int rc, wake;
    if ((rc = mps_lock_slot(b, slot, &s, 0)) < 0)
        return rc;
    seq = mps_write_begin(s);
    if (mps_states(b)[slot] == MPS_IDLE) {
        b->head.idle--;
        mps_set_state(b, slot, MPS_BUSY, now);
    } else {
        s->changed_ns = now;    /* the timeout clock starts now */
    }
    mps_end_busy(s, now);       /* (never set here; a guard against a lost idle) */
    s->busy_since = now;
    s->connections++;
    mps_write_end(s, seq);
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
    int64_t now = mps_now_ns(), seq;
    struct mps_cell *s;
    int rc, leave = 0;
    if ((rc = mps_lock_slot(b, slot, &s, 0)) < 0)
        return rc;
    seq = mps_write_begin(s);
    mps_end_busy(s, now);
    if (s->retire || mps_states(b)[slot] == MPS_EXITING) {
        leave = 1;
        mps_set_state(b, slot, MPS_EXITING, now);
    } else {
        if (mps_states(b)[slot] != MPS_IDLE)
            b->head.idle++;
        mps_set_state(b, slot, MPS_IDLE, now);
    }
    mps_write_end(s, seq);
    mps_unlock_(b);
    return leave;
}

/* Child, between connections: one call (the caller released the GIL) for
 * what used to be three.  With idle_first, first the idle transition of the
 * connection just finished (-ESHUTDOWN when the master has retired the
 * slot: the child must leave).  Then epoll_wait() on epoll_fd -- the
 * listener registered EPOLLEXCLUSIVE (one idle child woken per connection,
 * not all of them) and the child's signal wake-up pipe -- and accept4() on
 * the listener, which the master made non-blocking; again while another
 * child took the connection.  An idle child sleeps there until a connection
 * or a signal: no periodic wake-up, and no lost SIGTERM -- one that lands
 * before the wait has already written its byte, so the wait returns at once
 * (-EINTR; the caller runs the handler and drains the pipe).  The wait comes
 * first even with connections queued: it returns at once then, and an
 * accept4() that finds nothing costs the kernel a socket made and freed
 * (measured: 0.2 failed accepts per connection under load, ~0.8 us more
 * CPU per connection than waiting first).  epoll_fd -1: no wait, and
 * -EAGAIN when nothing is queued.
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
        if (epoll_fd >= 0) {
            rc = epoll_wait(epoll_fd, &ev, 1, -1);
            if (rc < 0)
                return -errno;
            if (rc == 1 && ev.data.fd != listen_fd)
                return -EINTR;      /* the wake-up pipe: a signal came */
        }
        len = *addrlen;
        fd = accept4(listen_fd, (struct sockaddr *)addr, &len, SOCK_CLOEXEC);
        if (fd >= 0)
            break;
        if (errno != EAGAIN || epoll_fd < 0)
            return -errno;
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
    int64_t now = mps_now_ns(), seq;
    struct mps_cell *s;
    int rc;
    if ((rc = mps_lock_slot(b, slot, &s, 0)) < 0)
        return rc;
    if (mps_states(b)[slot] == MPS_IDLE)
        b->head.idle--;
    seq = mps_write_begin(s);
    mps_end_busy(s, now);
    mps_set_state(b, slot, MPS_EXITING, now);
    mps_write_end(s, seq);
    mps_unlock_(b);
    return 0;
}

/* Child, when a request starts on its connection (HTTP keep-alive serves
 * many): restart the slot's timeout clock, count the request, show its line.
 * No lock, and outside the record's seq (only locked writers may move it):
 * only this child writes these fields, each 8-byte store is atomic, and a
 * reader that races the line copy shows a mixed line, nothing worse. */
static int mps_begin_request(mps_board *b, int64_t slot, const char *method,
                             const char *target)
{
    struct mps_cell *s;
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

/* Master, about to re-execute for an upgrade: its children must outlast the
 * new image's boot, however long that takes, so a child at max_requests
 * serves on while this is set (mps_held).  One word: no lock. */
static void mps_set_hold(mps_board *b, int64_t hold)
{
    __atomic_store_n(&b->head.hold, hold, __ATOMIC_RELAXED);
}

static int64_t mps_held(mps_board *b)
{
    return __atomic_load_n(&b->head.hold, __ATOMIC_RELAXED);
}

/* The fields of one record into a snapshot's slot (not its state). */
static void mps_cell_out(const struct mps_cell *s, struct mps_slot *out)
{
    out->pid = __atomic_load_n(&s->pid, __ATOMIC_RELAXED);
    out->connections = __atomic_load_n(&s->connections, __ATOMIC_RELAXED);
    out->changed_ns = __atomic_load_n(&s->changed_ns, __ATOMIC_RELAXED);
    out->retire = __atomic_load_n(&s->retire, __ATOMIC_RELAXED);
    out->requests = __atomic_load_n(&s->requests, __ATOMIC_RELAXED);
    out->busy_since = __atomic_load_n(&s->busy_since, __ATOMIC_RELAXED);
    out->busy_ns = __atomic_load_n(&s->busy_ns, __ATOMIC_RELAXED);
    memcpy(out->request, s->request, MPS_REQUEST_LEN);
}

/* Tries at a whole copy of a record before mps_snapshot copies it under the
 * lock: a live writer is inside for tens of ns, unless it lost its CPU. */
#define MPS_COPY_TRIES 64

/* Copy a record without the lock.  1 when the copy is whole (seq even, and
 * the same after the copy), 0 when a writer was inside at every try. */
static int mps_copy_cell(const struct mps_cell *s, struct mps_slot *out)
{
    int try;
    for (try = 0; try < MPS_COPY_TRIES; try++) {
        int64_t seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        if (seq & 1)
            continue;
        mps_cell_out(s, out);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->seq, __ATOMIC_RELAXED) == seq)
            return 1;
    }
    return 0;
}

/* Master or status: copy the header and every slot out.  Locks (master)
 * only while it copies the header and the state array (one byte a slot):
 * the counts the pool policy acts on -- the idle counter, which slots are
 * idle, busy, starting, free -- come from one instant.  Each slot's record
 * is copied after the unlock, whole (its seq), so the fields beside a state
 * are as new as that state or newer: an age from changed_ns never exceeds
 * the state's real age, and a torn busy_since/busy_ns pair is never seen.
 * The pid and retire fields only the master writes.  A record a writer
 * stays inside (stopped, or dead and not yet reaped) is copied under the
 * lock, as every record used to be.  states: nslots bytes of scratch. */
static int mps_snapshot(mps_board *b, struct mps_head *head, uint8_t *states,
                        struct mps_slot *slots)
{
    int64_t i, n;
    int rc = mps_lock_master_(b);
    if (rc < 0)
        return rc;
    *head = b->head;
    n = head->nslots;
    memcpy(states, mps_states(b), (size_t)n);
    mps_unlock_(b);
    for (i = 0; i < n; i++) {
        slots[i].state = states[i];
        if (mps_copy_cell(&b->slots[i], &slots[i]))
            continue;
        if ((rc = mps_lock_master_(b)) < 0)
            return rc;
        mps_cell_out(&b->slots[i], &slots[i]);
        mps_unlock_(b);
    }
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

/* Tests only: take the lock and keep it (the caller then dies holding it);
 * with a slot (>= 0), also begin updating its record and stop there, as a
 * child stopped or killed in the middle of a transition would. */
static int mps_hold_lock(mps_board *b, int64_t slot)
{
    int rc = mps_lock_(b);
    if (rc == 0 && slot >= 0 && slot < b->head.nslots)
        mps_write_begin(&b->slots[slot]);
    return rc;
}
