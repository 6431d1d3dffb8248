/*
 * lockbench.c -- "c-raw": the scoreboard's busy+idle transition pair called
 * in a plain C loop, no Python: the floor for `mps bench locks`.
 *
 * Build (mps bench does it on first use, into its cache), with CORE the folder
 * of _mpscore.c -- this folder in an installed package (setup.py copies it
 * here), src/ in a checkout:
 *     cc -O2 -Wall -Wextra -Wno-unused-function -I"$CORE" -o lockbench lockbench.c -lpthread
 * Usage: lockbench PROCS SECONDS
 * Forks PROCS processes on one scoreboard, each owning one slot; after a
 * common start signal each runs busy/idle pairs for SECONDS and reports its
 * ns per pair.  Prints one JSON line:
 *   {"procs": P, "ns_per_op": [..per process..], "ops": N, "connections": C,
 *    "idle_counter": I, "idle_slots": J}
 * where connections must equal ops (no lost update) and idle_counter must
 * equal idle_slots.
 */
#define _GNU_SOURCE
#include "_mpscore.c"

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#define CHUNK 4096

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int procs, go[2], res[2], i;
    double seconds;
    mps_board *b = NULL;
    int64_t total = 0;

    if (argc != 3 || (procs = atoi(argv[1])) < 1 || (seconds = atof(argv[2])) <= 0) {
        fprintf(stderr, "usage: %s PROCS SECONDS\n", argv[0]);
        return 2;
    }
    if (mps_create(procs, &b) < 0 || pipe(go) < 0 || pipe(res) < 0) {
        perror("setup");
        return 1;
    }
    for (i = 0; i < procs; i++) {
        int64_t slot = mps_reserve(b);
        mps_started(b, slot, 0);
        mps_idle(b, slot);
        if (fork() == 0) {
            char c;
            int64_t ops = 0, start, stop, deadline, j;
            double out[2];
            close(go[1]);
            if (read(go[0], &c, 1) != 1)
                _exit(1);
            start = now_ns();
            deadline = start + (int64_t)(seconds * 1e9);
            do {
                for (j = 0; j < CHUNK; j++) {
                    mps_busy(b, slot);
                    mps_idle(b, slot);
                }
                ops += CHUNK;
            } while ((stop = now_ns()) < deadline);
            out[0] = (double)(stop - start) / (double)ops;
            out[1] = (double)ops;
            if (write(res[1], out, sizeof out) != sizeof out)
                _exit(1);
            _exit(0);
        }
    }
    close(go[0]);
    close(res[1]);
    for (i = 0; i < procs; i++)
        if (write(go[1], "g", 1) != 1)
            return 1;
    printf("{\"procs\": %d, \"ns_per_op\": [", procs);
    for (i = 0; i < procs; i++) {
        double out[2];
        if (read(res[0], out, sizeof out) != sizeof out)
            return 1;
        printf("%s%.2f", i ? ", " : "", out[0]);
        total += (int64_t)out[1];
    }
    while (wait(NULL) > 0)
        ;
    {
        struct mps_head head = {0};
        struct mps_slot *slots = calloc((size_t)procs, sizeof *slots);
        uint8_t *states = calloc((size_t)procs, 1);
        int64_t idle = 0;
        mps_snapshot(b, &head, states, slots);
        for (i = 0; i < procs; i++)
            idle += slots[i].state == MPS_IDLE;
        printf("], \"ops\": %lld, \"connections\": %lld, \"idle_counter\": %lld, "
               "\"idle_slots\": %lld}\n", (long long)total, (long long)head.connections,
               (long long)head.idle, (long long)idle);
        free(slots);
        free(states);
    }
    return 0;
}
