"""cffi build script for mps._mpscore (out-of-line API mode).

setup.py names this file in ``cffi_modules``; it must never import the mps
package itself (the package is not built yet when this runs).
"""
from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
struct mps_slot {
    int64_t pid;
    int64_t state;
    int64_t connections;
    int64_t changed_ns;
    int64_t retire;
    int64_t requests;
    int64_t busy_since;
    int64_t busy_ns;
    char request[64];
};
struct mps_head {
    int64_t nslots;
    int64_t idle;
    int64_t min_spare;
    int64_t connections;
    int64_t repairs;
    int64_t wake_pending;
    int64_t requests;
    int64_t busy_ns_done;
    int64_t hold;
};
typedef struct mps_board mps_board;

int mps_create(int64_t nslots, mps_board **out);
int mps_create_fd(int64_t nslots, int fd, mps_board **out);
int mps_attach(int fd, mps_board **out);
int mps_destroy(mps_board *b);
int64_t mps_reserve(mps_board *b);
int mps_started(mps_board *b, int64_t slot, int64_t pid);
int mps_release(mps_board *b, int64_t slot);
int mps_retire(mps_board *b, int64_t slot);
int mps_busy(mps_board *b, int64_t slot);
int mps_accept_busy(mps_board *b, int64_t slot, int listen_fd, int epoll_fd,
                    int idle_first, int wake_fd, void *addr, uint32_t *addrlen);
int mps_idle(mps_board *b, int64_t slot);
int mps_done(mps_board *b, int64_t slot);
int mps_snapshot(mps_board *b, struct mps_head *head, uint8_t *states,
                 struct mps_slot *slots);
int mps_audit(mps_board *b, int64_t *drift);
int mps_set_min_spare(mps_board *b, int64_t min_spare);
int mps_set_lock_timeout(mps_board *b, int64_t timeout_ns);
int64_t mps_lock_holder(mps_board *b);
int mps_hold_lock(mps_board *b, int64_t slot);
int mps_begin_request(mps_board *b, int64_t slot, const char *method, const char *target);
int64_t mps_idle_count(mps_board *b);
void mps_set_hold(mps_board *b, int64_t hold);
int64_t mps_held(mps_board *b);
int mps_nop(mps_board *b, int64_t slot);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "mps._mpscore",
    (HERE / "src" / "_mpscore.c").read_text(),
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
