/*
 * lockwatch.c -- the scoreboard lock as `mps bench scale` sees it: how long
 * the master's calls hold it at a given size, and how long a child waits.
 *
 * Build (mps bench does it on first use, into its cache), with CORE the folder
 * of _mpscore.c -- this folder in an installed package (setup.py copies it
 * here), src/ in a checkout:
 *     cc -O2 -Wall -Wextra -Wno-unused-function -I"$CORE" -o lockwatch lockwatch.c -lpthread
 * Usage:
 *   lockwatch hold NSLOTS REPS
 *       C only, no server: a board of NSLOTS slots, every slot in use.
 *       Before each of REPS rounds a forked helper makes a busy and an idle
 *       transition on every slot, as the children would, so the master's
 *       reads find the lines where the children last wrote them; then it
 *       times the master's whole-board calls: mps_snapshot (the counters and
 *       the state bytes under the lock, each record after it), mps_audit
 *       (recounts the idle states under the lock) and mps_reserve on the
 *       full board (searches every state byte under the lock).  Each hold is
 *       timed from inside (the core's MPS_ON_LOCKED/MPS_ON_UNLOCK hooks,
 *       which add a clock read, ~20 ns, to it); the longest hold per call is
 *       reported, and the snapshot's whole call beside it.
 *   lockwatch watch BOARD MASTER_PID SECONDS
 *       BOARD is a live server's scoreboard (/proc/PID/fd/N of its memfd),
 *       mapped read-only.  For SECONDS, spin reading the mutex's owner word
 *       (no lock taken, no store: the server is not slowed but for the
 *       cache line being read) and time every hold seen, by owner: the
 *       master (MASTER_PID) or a child.  A hold during which this process
 *       was descheduled (reads > MAX_GAP_NS apart) is counted, not timed.
 *       Costs one core while it runs; a SIGTERM ends it early (and it
 *       prints what it saw).
 *       glibc only (the owner's TID lives in the futex word by kernel ABI).
 *   lockwatch sample BOARD SECONDS INTERVAL_US
 *       Take and release a live board's lock every INTERVAL_US, the way a
 *       child's transition does, and time the wait: what a transition
 *       arriving at a random moment waits behind the other holders.
 *   lockwatch race NSLOTS SECONDS
 *       The snapshot's promise under fire, at C speed (the tests run it): a
 *       forked writer goes round the slots making a busy and an idle
 *       transition on each, then a slow update (a writer that loses its CPU
 *       inside one: busy_since stored, ~1 us, then changed_ns) while this
 *       process snapshots in a loop.  It counts snapshots whose idle counter
 *       differs from their IDLE states ("inconsistent") and records copied
 *       from inside an update ("torn": between updates busy_since is 0 or
 *       equals changed_ns).  Both must be 0.  Every record starts as a
 *       writer that died inside it leaves it (seq odd): the next writer
 *       must keep it odd while it writes.
 * Each mode prints one JSON line; times in ns.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <time.h>

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* hold: the core calls these as it takes and releases the lock. */
static int timing_holds;            /* only hold mode pays for the clock reads */
static int64_t held_at, held_max;   /* when this hold began; the longest since reset */

static void hold_ended(void)
{
    int64_t held = now_ns() - held_at;
    if (held > held_max)
        held_max = held;
}

#define MPS_ON_LOCKED() do { if (timing_holds) held_at = now_ns(); } while (0)
#define MPS_ON_UNLOCK() do { if (timing_holds) hold_ended(); } while (0)
#include "_mpscore.c"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#define MAX_SAMPLES (1 << 20)
#define MAX_GAP_NS 2000     /* watch: reads further apart than this were interrupted */

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* "name": {"count": n, "p50": .., "p99": .., "max": .., "mean": ..} (sorts v) */
static void print_stats(const char *name, int64_t *v, int64_t n, int last)
{
    double sum = 0;
    int64_t i;
    qsort(v, (size_t)n, sizeof *v, cmp_i64);
    for (i = 0; i < n; i++)
        sum += (double)v[i];
    if (n == 0)
        printf("\"%s\": {\"count\": 0, \"p50\": null, \"p99\": null, \"max\": null, "
               "\"mean\": null}", name);
    else
        printf("\"%s\": {\"count\": %lld, \"p50\": %lld, \"p99\": %lld, \"max\": %lld, "
               "\"mean\": %.1f}", name, (long long)n, (long long)v[n / 2],
               (long long)v[(n * 99) / 100], (long long)v[n - 1], sum / (double)n);
    printf(last ? "}\n" : ", ");
}

static int64_t *samples(void)
{
    int64_t *v = malloc(MAX_SAMPLES * sizeof *v);
    if (v == NULL) {
        perror("malloc");
        exit(1);
    }
    return v;
}

/* hold's helper: on each byte from go, a busy and an idle transition on
 * every slot (the children's writes), then a byte to done; EOF ends it. */
static void touch_every_slot(mps_board *b, int64_t nslots, int go, int done)
{
    char c;
    int64_t i;
    while (read(go, &c, 1) == 1) {
        for (i = 0; i < nslots; i++) {
            mps_busy(b, i);
            mps_idle(b, i);
        }
        if (write(done, "d", 1) != 1)
            break;
    }
    _exit(0);
}

static int mode_hold(int64_t nslots, int64_t reps)
{
    mps_board *b = NULL;
    struct mps_head head;
    struct mps_slot *copy;
    uint8_t *states;
    int64_t *snap = samples(), *call = samples(), *audit = samples(), *reserve = samples();
    int64_t i, drift;
    int go[2], done[2];
    pid_t helper;
    char c;

    if (reps > MAX_SAMPLES || mps_create(nslots, &b) < 0 ||
        (copy = calloc((size_t)nslots, sizeof *copy)) == NULL ||
        (states = malloc((size_t)nslots)) == NULL) {
        fprintf(stderr, "lockwatch: cannot create a board of %lld slots\n", (long long)nslots);
        return 1;
    }
    for (i = 0; i < nslots; i++) {     /* every slot in use, as in a full pool */
        int64_t slot = mps_reserve(b);
        mps_started(b, slot, 1000 + slot);
        mps_idle(b, slot);
    }
    if (pipe(go) < 0 || pipe(done) < 0 || (helper = fork()) < 0) {
        perror("lockwatch: helper");
        return 1;
    }
    if (helper == 0) {
        close(go[1]);
        close(done[0]);
        touch_every_slot(b, nslots, go[0], done[1]);
    }
    close(go[0]);
    close(done[1]);
    timing_holds = 1;
    for (i = 0; i < reps; i++) {
        int64_t t0;
        if (write(go[1], "g", 1) != 1 || read(done[0], &c, 1) != 1) {
            fprintf(stderr, "lockwatch: the helper left\n");
            return 1;
        }
        held_max = 0;
        t0 = now_ns();
        mps_snapshot(b, &head, states, copy);
        call[i] = now_ns() - t0;
        snap[i] = held_max;
        held_max = 0;
        mps_audit(b, &drift);
        audit[i] = held_max;
        held_max = 0;
        mps_reserve(b);         /* -ENOSPC after searching every slot */
        reserve[i] = held_max;
    }
    close(go[1]);
    waitpid(helper, NULL, 0);
    printf("{\"nslots\": %lld, \"slot_bytes\": %zu, ", (long long)nslots,
           sizeof(struct mps_cell));
    print_stats("snapshot_ns", snap, reps, 0);
    print_stats("audit_ns", audit, reps, 0);
    print_stats("reserve_ns", reserve, reps, 0);
    print_stats("snapshot_call_ns", call, reps, 1);
    return 0;
}

static mps_board *map_board(const char *path, int writable)
{
    struct stat st;
    mps_board *b;
    int fd = open(path, writable ? O_RDWR : O_RDONLY);
    if (fd < 0 || fstat(fd, &st) != 0 || (size_t)st.st_size < sizeof(mps_board)) {
        perror(path);
        exit(1);
    }
    b = mmap(NULL, (size_t)st.st_size, writable ? PROT_READ | PROT_WRITE : PROT_READ,
             MAP_SHARED, fd, 0);
    close(fd);
    if (b == MAP_FAILED || b->magic != MPS_MAGIC || b->version != MPS_VERSION) {
        fprintf(stderr, "lockwatch: %s is not a version %d scoreboard\n", path, MPS_VERSION);
        exit(1);
    }
    return b;
}

static int mode_watch(const char *path, int64_t master, double seconds)
{
#ifdef __GLIBC__
    mps_board *b = map_board(path, 0);
    volatile unsigned int *word = (volatile unsigned int *)&b->lock.__data.__lock;
    int64_t *mine = samples(), *theirs = samples(), nm = 0, nt = 0, reads = 0, lost = 0;
    int64_t start = now_ns(), deadline = start + (int64_t)(seconds * 1e9);
    int64_t since = 0, t = start, last = start, gap = 0;
    unsigned int owner = 0;

    signal(SIGTERM, on_term);
    while (t < deadline && !stop) {
        unsigned int w = *word & FUTEX_TID_MASK;
        t = now_ns();
        reads++;
        /* A read that comes long after the one before means this process
         * was descheduled: a hold seen across that gap may be two holds
         * merged, or end anywhere inside it.  Such holds are not timed. */
        if (t - last > gap)
            gap = t - last;
        last = t;
        if (w == owner)
            continue;
        if (owner != 0) {       /* a hold ended (or passed straight to another) */
            if (gap > MAX_GAP_NS)
                lost++;
            else if ((int64_t)owner == master) {
                if (nm < MAX_SAMPLES)
                    mine[nm++] = t - since;
            } else if (nt < MAX_SAMPLES) {
                theirs[nt++] = t - since;
            }
        }
        owner = w;
        since = t;
        gap = 0;
    }
    printf("{\"seconds\": %.3f, \"reads\": %lld, \"resolution_ns\": %.1f, "
           "\"holds_not_timed\": %lld, ", (double)(t - start) / 1e9, (long long)reads,
           (double)(t - start) / (double)(reads ? reads : 1), (long long)lost);
    print_stats("master_holds_ns", mine, nm, 0);
    print_stats("child_holds_ns", theirs, nt, 1);
    return 0;
#else
    (void)path; (void)master; (void)seconds;
    fprintf(stderr, "lockwatch: watch needs glibc's mutex layout\n");
    return 3;
#endif
}

static int mode_sample(const char *path, double seconds, int64_t interval_us)
{
    mps_board *b = map_board(path, 1);
    int64_t *waits = samples(), n = 0;
    int64_t deadline = now_ns() + (int64_t)(seconds * 1e9);
    struct timespec pause = {interval_us / 1000000, (long)(interval_us % 1000000) * 1000};

    while (now_ns() < deadline && n < MAX_SAMPLES) {
        int64_t t0 = now_ns();
        if (mps_lock_(b) < 0) {
            fprintf(stderr, "lockwatch: cannot lock the board\n");
            return 1;
        }
        waits[n++] = now_ns() - t0;
        mps_unlock_(b);
        nanosleep(&pause, NULL);
    }
    printf("{");
    print_stats("wait_ns", waits, n, 1);
    return 0;
}

/* race's writer: an update of slot's record stretched to about 1 us, under
 * the lock, in the order that leaves it torn until it ends. */
static void slow_update(mps_board *b, int64_t slot)
{
    struct mps_cell *s = &b->slots[slot];
    int64_t t = now_ns(), seq;
    mps_lock_(b);
    seq = mps_write_begin(s);
    __atomic_store_n(&s->busy_since, t, __ATOMIC_RELAXED);
    while (now_ns() < t + 1000)
        ;
    __atomic_store_n(&s->changed_ns, t, __ATOMIC_RELAXED);
    mps_write_end(s, seq);
    mps_unlock_(b);
}

static int mode_race(int64_t nslots, double seconds)
{
    mps_board *b = NULL;
    struct mps_head head;
    struct mps_slot *copy;
    uint8_t *states;
    int64_t i, snapshots = 0, inconsistent = 0, torn = 0, deadline;
    pid_t writer;

    if (mps_create(nslots, &b) < 0 || (copy = calloc((size_t)nslots, sizeof *copy)) == NULL ||
        (states = malloc((size_t)nslots)) == NULL) {
        fprintf(stderr, "lockwatch: cannot create a board of %lld slots\n", (long long)nslots);
        return 1;
    }
    for (i = 0; i < nslots; i++) {
        int64_t slot = mps_reserve(b);
        mps_started(b, slot, 1000 + slot);
        mps_idle(b, slot);
        mps_write_begin(&b->slots[slot]);       /* and never ended */
    }
    deadline = now_ns() + (int64_t)(seconds * 1e9);
    if ((writer = fork()) < 0) {
        perror("lockwatch: writer");
        return 1;
    }
    if (writer == 0) {
        for (i = 0; now_ns() < deadline; i = (i + 1) % nslots) {
            mps_busy(b, i);
            mps_idle(b, i);
            slow_update(b, i);
        }
        _exit(0);
    }
    while (now_ns() < deadline) {
        int64_t idle = 0;
        if (mps_snapshot(b, &head, states, copy) < 0) {
            fprintf(stderr, "lockwatch: snapshot failed\n");
            return 1;
        }
        snapshots++;
        for (i = 0; i < nslots; i++) {
            idle += copy[i].state == MPS_IDLE;
            torn += copy[i].busy_since != 0 && copy[i].busy_since != copy[i].changed_ns;
        }
        inconsistent += idle != head.idle;
    }
    waitpid(writer, NULL, 0);
    printf("{\"nslots\": %lld, \"snapshots\": %lld, \"inconsistent\": %lld, "
           "\"torn\": %lld}\n", (long long)nslots, (long long)snapshots,
           (long long)inconsistent, (long long)torn);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "hold") == 0 && atoll(argv[2]) > 0 && atoll(argv[3]) > 0)
        return mode_hold(atoll(argv[2]), atoll(argv[3]));
    if (argc == 5 && strcmp(argv[1], "watch") == 0 && atof(argv[4]) > 0)
        return mode_watch(argv[2], atoll(argv[3]), atof(argv[4]));
    if (argc == 5 && strcmp(argv[1], "sample") == 0 && atof(argv[3]) > 0 && atoll(argv[4]) > 0)
        return mode_sample(argv[2], atof(argv[3]), atoll(argv[4]));
    if (argc == 4 && strcmp(argv[1], "race") == 0 && atoll(argv[2]) > 0 && atof(argv[3]) > 0)
        return mode_race(atoll(argv[2]), atof(argv[3]));
    fprintf(stderr, "usage: %s hold NSLOTS REPS | watch BOARD MASTER_PID SECONDS | "
            "sample BOARD SECONDS INTERVAL_US | race NSLOTS SECONDS\n", argv[0]);
    return 2;
}
