"""The scoreboard contract, on both backends (the ``backend`` fixture).

Single-process tests drive the transitions directly; the concurrency and
crash tests fork real processes that share the board, and every wait on
another process has a deadline: a wedged lock fails the test instead of
hanging it (the call that could hang is made in a forked checker).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until
from mps import bench, scoreboard
from mps.scoreboard import BACKENDS, PyScoreboard, Scoreboard, Snapshot, State

NSLOTS = 8
#: Deadline for anything another process must do (hang => test failure).
DEADLINE = 15.0


@pytest.fixture
def board(backend: str) -> Iterator[Scoreboard]:
    b = BACKENDS[backend](NSLOTS)
    yield b
    b.close()


# ----------------------------------------------------------------- helpers


def consistent(snap: Snapshot) -> bool:
    return snap.idle_counter == snap.count(State.IDLE)


def whole_records(snap: Snapshot) -> bool:
    """Each slot's record comes from between two transitions, never from
    inside one: busy() sets busy_since and changed_ns to one instant, idle()
    clears busy_since (so it holds while nothing else writes the slots)."""
    return all(s.busy_since in (0, s.changed_ns) for s in snap.slots)


def state(board: Scoreboard, slot: int) -> State:
    return board.snapshot().slots[slot].state


def child_slot(board: Scoreboard, pid: int | None = None) -> int:
    """A slot as the master hands it to a child: reserved, started, idle."""
    slot = board.reserve()
    assert slot >= 0
    board.started(slot, os.getpid() if pid is None else pid)
    assert board.idle(slot) == 0
    return slot


def fork_call(fn: Callable[[], object]) -> int:
    """Fork a process that runs ``fn`` and ends in os._exit: 0 if fn returned, 1 if not."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - report, then leave
            traceback.print_exc()
        finally:
            os._exit(code)  # This must never return into pytest.
    return pid


def reap(pid: int, timeout: float = DEADLINE) -> int:
    """Wait for ``pid`` with a deadline; on expiry SIGKILL it and fail."""
    result: list[int] = []

    def finished() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            result.append(os.waitstatus_to_exitcode(status))
        return bool(done)

    try:
        wait_until(finished, timeout, what=f"process {pid} to finish (hung on the lock?)")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return result[0]


def call_in_child(fn: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """Run ``fn`` in a forked process with a deadline; its JSON-able result."""
    r, w = os.pipe()

    def body() -> None:
        os.close(r)
        os.write(w, json.dumps(fn()).encode())

    pid = fork_call(body)
    os.close(w)
    try:
        code = reap(pid, timeout)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
    assert code == 0, f"checker process failed with {code}"
    return json.loads(data)


def wait_byte(fd: int, timeout: float = DEADLINE) -> bytes:
    readable, _, _ = select.select([fd], [], [], timeout)
    assert readable, f"no byte within {timeout}s"
    return os.read(fd, 1)


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def shift_idle_counter(board: Scoreboard, delta: int) -> None:
    """Move the shared idle counter behind the board's back (a half-done update)."""
    if isinstance(board, PyScoreboard):
        board._w[scoreboard._H_IDLE] += delta
        return
    from mps._mpscore import ffi
    addr = int(ffi.cast("uintptr_t", board._board))  # type: ignore[attr-defined]
    # struct mps_board: uint32 magic, uint32 version, size_t size, then the
    # head: int64 nslots, int64 idle, ...  Check the layout before poking.
    assert ctypes.c_uint32.from_address(addr).value == 0x3153504D, "mps_board layout changed"
    assert ctypes.c_int64.from_address(addr + 16).value == board.nslots, "mps_board layout changed"
    ctypes.c_int64.from_address(addr + 24).value += delta


def snapshot_summary(board: Scoreboard) -> dict[str, int]:
    snap = board.snapshot()
    return {"idle_counter": snap.idle_counter, "idle": snap.count(State.IDLE),
            "repairs": snap.repairs}


# ----------------------------------------------------------------- slot life


def test_new_board_is_empty(board: Scoreboard) -> None:
    snap = board.snapshot()
    assert len(snap.slots) == NSLOTS
    assert snap.count(State.EMPTY) == NSLOTS
    assert (snap.idle_counter, snap.connections, snap.repairs, snap.min_spare) == (0, 0, 0, 0)
    assert [s.index for s in snap.slots] == list(range(NSLOTS))


def test_reserve_returns_distinct_slots_until_full(board: Scoreboard) -> None:
    slots = [board.reserve() for _ in range(NSLOTS)]
    assert sorted(slots) == list(range(NSLOTS))
    assert board.reserve() == -1
    assert board.reserve() == -1
    snap = board.snapshot()
    assert snap.count(State.STARTING) == NSLOTS
    assert snap.idle_counter == 0


def test_reserve_reuses_a_released_slot(board: Scoreboard) -> None:
    for _ in range(NSLOTS):
        board.reserve()
    assert board.release(3) == State.STARTING
    assert state(board, 3) == State.EMPTY
    assert board.reserve() == 3
    assert board.reserve() == -1


def test_reserve_resets_the_previous_childs_record(board: Scoreboard) -> None:
    slot = child_slot(board, pid=4242)
    board.busy(slot)
    board.retire(slot)
    board.release(slot)
    again = board.reserve()
    assert again == slot
    s = board.snapshot().slots[slot]
    assert (s.state, s.pid, s.connections, s.retire) == (State.STARTING, 0, 0, False)


def test_started_records_the_pid(board: Scoreboard) -> None:
    slot = board.reserve()
    board.started(slot, 31337)
    s = board.snapshot().slots[slot]
    assert (s.pid, s.state) == (31337, State.STARTING)


def test_release_frees_a_slot_and_returns_its_state(board: Scoreboard) -> None:
    slot = child_slot(board, pid=999)
    board.busy(slot)
    assert board.release(slot) == State.BUSY
    s = board.snapshot().slots[slot]
    assert (s.state, s.pid, s.retire) == (State.EMPTY, 0, False)
    assert board.release(slot) == State.EMPTY   # releasing twice is harmless
    assert consistent(board.snapshot())


def test_release_of_an_idle_slot_decrements_the_counter(board: Scoreboard) -> None:
    a, b = child_slot(board), child_slot(board)
    assert board.snapshot().idle_counter == 2
    assert board.release(a) == State.IDLE
    snap = board.snapshot()
    assert snap.idle_counter == 1 == snap.count(State.IDLE)
    assert snap.slots[b].state == State.IDLE


def test_changed_ns_moves_on_each_transition(board: Scoreboard) -> None:
    slot = board.reserve()
    t0 = board.snapshot().slots[slot].changed_ns
    assert t0 > 0
    board.idle(slot)
    t1 = board.snapshot().slots[slot].changed_ns
    board.busy(slot)
    t2 = board.snapshot().slots[slot].changed_ns
    assert t0 <= t1 <= t2
    assert t2 <= time.monotonic_ns()
    assert board.snapshot().slots[slot].age_s(time.monotonic_ns()) >= 0


@pytest.mark.parametrize("call", ["started", "release", "retire", "done"])
@pytest.mark.parametrize("bad", [-1, NSLOTS, NSLOTS + 100])
def test_a_bad_slot_is_refused_with_einval(board: Scoreboard, call: str, bad: int) -> None:
    args = (bad, 1) if call == "started" else (bad,)
    with pytest.raises(OSError) as info:
        getattr(board, call)(*args)
    assert info.value.errno == errno.EINVAL
    assert consistent(board.snapshot())


@pytest.mark.parametrize("call", ["busy", "idle"])
@pytest.mark.parametrize("bad", [-1, NSLOTS, NSLOTS + 100])
def test_a_bad_slot_on_the_childs_hot_path_is_refused(board: Scoreboard, call: str,
                                                      bad: int) -> None:
    """busy/idle may return -EINVAL instead of raising (the hot path returns
    codes), but must never touch the board."""
    before = board.snapshot()
    try:
        rc = getattr(board, call)(bad)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
    else:
        assert rc == -errno.EINVAL
    after = board.snapshot()
    assert (after.idle_counter, after.connections, after.slots) == \
        (before.idle_counter, before.connections, before.slots)


def test_a_board_needs_at_least_one_slot(backend: str) -> None:
    with pytest.raises(OSError):
        BACKENDS[backend](0)


# ----------------------------------------------------------------- idle / busy


def test_idle_busy_transitions_keep_the_counter_exact(board: Scoreboard) -> None:
    slots = [board.reserve() for _ in range(5)]
    for s in slots:
        board.started(s, 1000 + s)
    snap = board.snapshot()
    assert snap.idle_counter == 0 and consistent(snap)
    for s in slots:
        assert board.idle(s) == 0
        assert consistent(board.snapshot())
    assert board.snapshot().idle_counter == 5
    sequence = [(slots[0], "busy"), (slots[1], "busy"), (slots[0], "idle"),
                (slots[2], "busy"), (slots[1], "idle"), (slots[2], "idle"),
                (slots[3], "busy"), (slots[4], "busy"), (slots[3], "idle")]
    for s, verb in sequence:
        getattr(board, verb)(s)
        snap = board.snapshot()
        assert consistent(snap), (s, verb, snap)
    snap = board.snapshot()
    assert snap.idle_counter == 4
    assert snap.slots[slots[4]].state == State.BUSY
    assert snap.connections == 5


def test_idle_twice_counts_once(board: Scoreboard) -> None:
    slot = child_slot(board)
    assert board.idle(slot) == 0
    snap = board.snapshot()
    assert snap.idle_counter == 1 == snap.count(State.IDLE)


def test_busy_counts_connections_per_slot_and_in_total(board: Scoreboard) -> None:
    a, b = child_slot(board), child_slot(board)
    for _ in range(3):
        board.busy(a)
        board.idle(a)
    board.busy(b)
    snap = board.snapshot()
    assert snap.slots[a].connections == 3
    assert snap.slots[b].connections == 1
    assert snap.connections == 4


def test_busy_reports_when_idle_falls_below_min_spare(board: Scoreboard) -> None:
    slots = [child_slot(board) for _ in range(4)]
    board.set_min_spare(2)
    assert board.snapshot().min_spare == 2
    # idle after each busy: 3, 2, 1, 0 -- below min_spare (2) from the third
    # on; the wake-up is edge-triggered: once, until the master re-arms.
    assert [board.busy(s) for s in slots] == [0, 0, 1, 0]
    for s in slots:
        board.idle(s)
    board.set_min_spare(2)              # the master re-arms on its next pass
    assert [board.busy(s) for s in slots] == [0, 0, 1, 0]
    for s in slots:
        board.idle(s)
    board.set_min_spare(0)
    assert [board.busy(s) for s in slots] == [0] * 4


def test_busy_never_wakes_with_min_spare_zero(board: Scoreboard) -> None:
    slot = child_slot(board)
    assert board.busy(slot) == 0   # a new board's min_spare is 0


def test_a_hold_set_by_the_master_is_seen_by_a_child(board: Scoreboard) -> None:
    """The upgrade's hold (no recycling at max_requests) crosses processes
    through the board, both ways, without the lock."""
    assert not board.held()            # a new board holds nothing
    board.set_hold(True)

    def child_sees_hold() -> None:
        assert board.held()

    assert reap(fork_call(child_sees_hold)) == 0
    board.set_hold(False)
    assert not board.held()


def test_min_spare_can_be_raised_at_run_time(board: Scoreboard) -> None:
    a, b = child_slot(board), child_slot(board)
    board.set_min_spare(1)
    assert board.busy(a) == 0      # one idle left: not below 1
    board.idle(a)
    board.set_min_spare(3)             # TTIN
    assert board.busy(a) == 1
    assert board.busy(b) == 0          # already woken; no second byte until re-armed
    board.set_min_spare(3)
    board.idle(b)
    assert board.busy(b) == 1


# ----------------------------------------------------------------- retire / done


def test_retire_an_idle_slot_makes_it_exiting_at_once(board: Scoreboard) -> None:
    a, b = child_slot(board), child_slot(board)
    assert board.retire(a) == State.IDLE
    snap = board.snapshot()
    assert snap.slots[a].state == State.EXITING
    assert snap.idle_counter == 1 == snap.count(State.IDLE)
    assert board.idle(a) == 1       # the child, waking up, learns it must leave
    assert state(board, a) == State.EXITING
    assert board.snapshot().idle_counter == 1
    assert state(board, b) == State.IDLE


def test_retired_idle_child_keeps_the_connection_it_just_accepted(board: Scoreboard) -> None:
    """Retired while blocked in accept(): it serves that connection, then leaves."""
    slot = child_slot(board)
    board.retire(slot)
    board.busy(slot)                   # accept() returned after all
    snap = board.snapshot()
    assert snap.slots[slot].state == State.EXITING
    assert snap.slots[slot].connections == 1
    assert snap.idle_counter == 0 and consistent(snap)
    assert board.idle(slot) == 1
    assert consistent(board.snapshot())


def test_accept_on_a_listener_made_blocking_under_it_still_hears_signals(
        board: Scoreboard) -> None:
    """Another master sharing an fd:// listener hands it back blocking as it
    leaves: a child's accept() must still return on a signal (Python retries
    a blocking accept that one interrupts, PEP 475, so a TERM would wait for
    the next connection there)."""
    import threading
    slot = child_slot(board)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    waiter = select.epoll()
    waiter.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
    waiter.register(wake_r, select.EPOLLIN)
    board.prepare_accept(listener)
    board.set_waiter(waiter)
    flags = fcntl.fcntl(listener.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(listener.fileno(), fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    outcome: list[BaseException | None] = []

    def accept() -> None:
        try:
            board.accept(slot, listener)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)
    previous = signal.signal(signal.SIGWINCH, lambda *_: None)
    thread = threading.Thread(target=accept)
    thread.start()
    try:
        # What a handled signal does in a child: a byte to the wake-up pipe,
        # and EINTR for a system call under way.
        os.write(wake_w, b"s")
        deadline = time.monotonic() + 5
        while thread.is_alive() and time.monotonic() < deadline:
            assert thread.ident is not None
            signal.pthread_kill(thread.ident, signal.SIGWINCH)
            thread.join(0.05)
        assert not thread.is_alive(), "accept() blocked on the listener"
        assert len(outcome) == 1 and isinstance(outcome[0], InterruptedError), outcome
    finally:
        if thread.is_alive():
            listener.shutdown(socket.SHUT_RDWR)     # (wakes the blocked accept)
            thread.join(5)
        signal.signal(signal.SIGWINCH, previous)
        waiter.close()
        listener.close()
        os.close(wake_r)
        os.close(wake_w)


def test_retire_a_busy_slot_takes_effect_at_its_next_idle(board: Scoreboard) -> None:
    slot = child_slot(board)
    board.busy(slot)
    assert board.retire(slot) == State.BUSY
    s = board.snapshot().slots[slot]
    assert (s.state, s.retire) == (State.BUSY, True)   # the connection is not dropped
    assert board.idle(slot) == 1
    snap = board.snapshot()
    assert snap.slots[slot].state == State.EXITING
    assert snap.idle_counter == 0 and consistent(snap)


def test_retire_a_starting_slot_makes_its_first_idle_leave(board: Scoreboard) -> None:
    slot = board.reserve()
    assert board.retire(slot) == State.STARTING
    assert board.idle(slot) == 1
    snap = board.snapshot()
    assert snap.slots[slot].state == State.EXITING
    assert snap.idle_counter == 0


def test_retire_an_empty_or_exiting_slot_changes_nothing(board: Scoreboard) -> None:
    assert board.retire(0) == State.EMPTY
    assert state(board, 0) == State.EMPTY
    slot = child_slot(board)
    board.done(slot)
    assert board.retire(slot) == State.EXITING
    assert state(board, slot) == State.EXITING
    assert consistent(board.snapshot())


def test_done_from_idle_and_from_busy(board: Scoreboard) -> None:
    a, b = child_slot(board), child_slot(board)
    board.busy(b)
    board.done(a)
    board.done(b)
    snap = board.snapshot()
    assert snap.slots[a].state == State.EXITING
    assert snap.slots[b].state == State.EXITING
    assert snap.idle_counter == 0 and consistent(snap)
    assert board.idle(a) == 1       # an exiting slot never turns idle again
    assert board.snapshot().idle_counter == 0


def test_release_after_exit_empties_the_slot(board: Scoreboard) -> None:
    slot = child_slot(board)
    board.done(slot)
    assert board.release(slot) == State.EXITING
    snap = board.snapshot()
    assert snap.slots[slot].state == State.EMPTY and consistent(snap)


# ----------------------------------------------------------------- audit


def test_audit_returns_zero_when_consistent(board: Scoreboard) -> None:
    a, b = child_slot(board), child_slot(board)
    board.busy(a)
    assert board.audit() == 0
    snap = board.snapshot()
    assert snap.repairs == 0 and snap.idle_counter == 1
    assert snap.slots[b].state == State.IDLE


@pytest.mark.parametrize("delta", [3, -1])
def test_audit_repairs_drift_and_counts_it(board: Scoreboard, delta: int) -> None:
    a, b, c = child_slot(board), child_slot(board), child_slot(board)
    board.busy(c)
    shift_idle_counter(board, delta)
    snap = board.snapshot()
    assert [snap.slots[s].state for s in (a, b)] == [State.IDLE, State.IDLE]
    assert snap.idle_counter == 2 + delta       # the drift is visible ...
    assert board.audit() == -delta              # ... audit returns recount - counter
    snap = board.snapshot()
    assert snap.idle_counter == 2 == snap.count(State.IDLE)
    assert snap.repairs == 1
    assert board.audit() == 0
    assert board.snapshot().repairs == 1


# ----------------------------------------------------------------- processes


N_PROCS = 4
#: busy/idle pairs per process: enough for the processes to overlap (C is ~50x faster).
K_PAIRS = {"c": 20000, "python": 2000}


def test_concurrent_children_lose_no_update(board: Scoreboard) -> None:
    """N processes, one slot each, K busy/idle pairs at once: exact totals."""
    pairs = K_PAIRS[board.name]
    slots = [board.reserve() for _ in range(N_PROCS)]
    go_r, go_w = os.pipe()

    def child(slot: int) -> None:
        os.close(go_w)
        assert board.idle(slot) == 0
        os.read(go_r, 1)                # every child starts on the same EOF
        for _ in range(pairs):
            assert board.busy(slot) >= 0
            if board.idle(slot) != 0:
                raise AssertionError("idle() said leave, but nobody retired the slot")

    pids = []
    for slot in slots:
        pid = fork_call(lambda slot=slot: child(slot))
        board.started(slot, pid)
        pids.append(pid)
    os.close(go_r)
    try:
        wait_until(lambda: board.snapshot().idle_counter == N_PROCS, DEADLINE,
                   what="every child to report idle")
    finally:
        os.close(go_w)                  # go (and never leave a child blocked)
    # The master's view while they hammer: every snapshot is consistent --
    # the counter with the states, each slot's record in itself.
    deadline = time.monotonic() + DEADLINE
    while True:
        snap = board.snapshot()
        assert consistent(snap), snap
        assert whole_records(snap), snap
        if snap.connections >= N_PROCS * pairs or time.monotonic() > deadline:
            break
    codes = [reap(pid) for pid in pids]
    assert codes == [0] * N_PROCS
    snap = board.snapshot()
    assert snap.connections == N_PROCS * pairs
    assert [snap.slots[s].connections for s in slots] == [pairs] * N_PROCS
    assert [snap.slots[s].pid for s in slots] == pids
    assert snap.idle_counter == snap.count(State.IDLE) == N_PROCS
    assert snap.repairs == 0
    assert board.audit() == 0


@pytest.mark.skipif(not scoreboard.c_available() or not (
    os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
    reason="the C core and a C compiler are needed")
def test_c_snapshots_at_c_speed_are_never_inconsistent_or_torn(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The C core only: its snapshot copies the records without the lock, so
    a record must never be copied from inside a writer's update.  Python
    calls are too slow to catch that window; lockwatch's race mode snapshots
    in a C loop against a writer that stretches its updates (and starts from
    records a dead writer left open).  It caught a reader that ignored the
    record's seq with 8-10 torn copies per run on a loaded 2-core machine."""
    monkeypatch.setenv("MPS_BENCH_CACHE", str(tmp_path))
    program = bench.build("lockwatch")      # against the installed core's source
    out = subprocess.run([program, "race", "256", "0.5"], capture_output=True, text=True,
                         timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert (seen["inconsistent"], seen["torn"]) == (0, 0), seen
    assert seen["snapshots"] > 1000, seen


def test_master_retires_a_child_that_is_serving_in_another_process(board: Scoreboard) -> None:
    slot = board.reserve()
    other = child_slot(board)

    def child() -> None:
        assert board.idle(slot) == 0
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            assert board.busy(slot) >= 0
            rc = board.idle(slot)
            if rc == 1:
                return                  # retired: leave
            assert rc == 0
        raise AssertionError("never told to leave")

    pid = fork_call(child)
    board.started(slot, pid)
    wait_until(lambda: board.snapshot().slots[slot].connections >= 50, DEADLINE,
               what="the child to serve")
    board.retire(slot)
    assert reap(pid) == 0
    snap = board.snapshot()
    assert snap.slots[slot].state == State.EXITING
    assert snap.idle_counter == 1 == snap.count(State.IDLE)
    assert snap.slots[other].state == State.IDLE
    assert board.release(slot) == State.EXITING


@pytest.mark.parametrize("death", ["os._exit", "SIGKILL"])
def test_a_holder_dying_with_the_lock_does_not_wedge_the_board(
        board: Scoreboard, death: str) -> None:
    """C: the next locker gets EOWNERDEAD; Python: the kernel drops the fcntl
    lock and the dirty word says so.  Either way: recount, count a repair."""
    idle_slot = child_slot(board)
    busy_slot = child_slot(board)
    board.busy(busy_slot)
    ready_r, ready_w = os.pipe()

    def holder() -> None:
        board.hold_lock()
        os.write(ready_w, b"h")
        if death == "SIGKILL":
            while True:
                time.sleep(60)          # until the test kills us, lock in hand

    pid = fork_call(holder)
    os.close(ready_w)
    try:
        assert wait_byte(ready_r) == b"h"
    finally:
        os.close(ready_r)
    if death == "SIGKILL":
        os.kill(pid, signal.SIGKILL)
    assert reap(pid) == (0 if death == "os._exit" else -signal.SIGKILL)

    # The call that would hang on a wedged lock runs under a deadline first.
    seen = call_in_child(lambda: snapshot_summary(board))
    assert seen == {"idle_counter": 1, "idle": 1, "repairs": 1}
    snap = board.snapshot()
    assert snap.repairs == 1            # repaired once, not on every later call
    assert snap.slots[idle_slot].state == State.IDLE
    assert snap.slots[busy_slot].state == State.BUSY
    # The board still works.
    board.idle(busy_slot)
    assert board.snapshot().idle_counter == 2
    assert board.audit() == 0
    assert board.snapshot().repairs == 1


def test_a_waiter_blocked_on_the_lock_is_released_when_the_holder_dies(
        board: Scoreboard) -> None:
    slot = child_slot(board)
    ready_r, ready_w = os.pipe()

    def holder() -> None:
        board.hold_lock()
        os.write(ready_w, b"h")
        while True:
            time.sleep(60)

    holder_pid = fork_call(holder)
    try:
        assert wait_byte(ready_r) == b"h"
        result_r, result_w = os.pipe()

        def waiter() -> None:
            os.write(result_w, b"w")        # about to block on the held lock
            board.busy(slot)
            os.write(result_w, json.dumps(snapshot_summary(board)).encode())

        waiter_pid = fork_call(waiter)
        os.close(result_w)
        try:
            assert wait_byte(result_r) == b"w"
            wait_until(lambda: process_state(waiter_pid) == "S", DEADLINE,
                       what="the waiter to block on the lock")
            assert not select.select([result_r], [], [], 0)[0], "the lock did not exclude"
        finally:
            os.kill(holder_pid, signal.SIGKILL)
        assert reap(waiter_pid) == 0
        data = os.read(result_r, 4096)
        os.close(result_r)
    finally:
        os.close(ready_r)
        os.close(ready_w)
        try:
            os.kill(holder_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap(holder_pid)
    assert json.loads(data) == {"idle_counter": 0, "idle": 0, "repairs": 1}
    snap = board.snapshot()
    assert snap.slots[slot].state == State.BUSY
    assert snap.connections == 1


def test_a_holder_killed_between_slot_and_counter_store_is_repaired(
        board: Scoreboard) -> None:
    """Simulate a child dying mid-update: lock held, counter already moved,
    slot not.  The next locker must recount before anyone trusts the counter."""
    a, b, c = child_slot(board), child_slot(board), child_slot(board)
    board.busy(c)

    def half_done_update() -> None:
        board.hold_lock()
        shift_idle_counter(board, -2)   # e.g. two decrements whose slot stores never landed

    pid = fork_call(half_done_update)
    assert reap(pid) == 0
    seen = call_in_child(lambda: snapshot_summary(board))
    assert seen == {"idle_counter": 2, "idle": 2, "repairs": 1}
    assert board.audit() == 0
    snap = board.snapshot()
    assert snap.repairs == 1
    assert [snap.slots[s].state for s in (a, b, c)] == [State.IDLE, State.IDLE, State.BUSY]


# ----------------------------------------------------------------- accept


@pytest.fixture
def wake_pipe(board: Scoreboard) -> Iterator[tuple[int, int]]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    board.wake_fd = w
    yield r, w
    board.wake_fd = -1
    os.close(r)
    os.close(w)


def pending_bytes(fd: int) -> bytes:
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""


def guarded_listener(family: int, address: object) -> socket.socket:
    """A blocking listener whose accept() gives up (EAGAIN) instead of hanging."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", 5, 0))
    listener.bind(address)
    listener.listen(16)
    return listener


def wait_acceptable(listener: socket.socket) -> None:
    assert select.select([listener], [], [], DEADLINE)[0], "no connection to accept"


def talk(conn: socket.socket, client: socket.socket) -> None:
    conn.settimeout(DEADLINE)
    client.settimeout(DEADLINE)
    client.sendall(b"ping")
    assert conn.recv(16) == b"ping"
    conn.sendall(b"pong")
    assert client.recv(16) == b"pong"


@pytest.mark.parametrize("min_spare, woken", [(1, True), (0, False)])
def test_accept_tcp_marks_busy_and_wakes_the_master_below_min_spare(
        board: Scoreboard, wake_pipe: tuple[int, int], min_spare: int, woken: bool) -> None:
    wake_r, _ = wake_pipe
    slot = child_slot(board)
    board.set_min_spare(min_spare)
    listener = guarded_listener(socket.AF_INET, ("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=DEADLINE)
    try:
        wait_acceptable(listener)
        conn, addr = board.accept(slot, listener)
        with conn:
            assert isinstance(conn, socket.socket)
            assert conn.family == socket.AF_INET and conn.type == socket.SOCK_STREAM
            assert addr == ("127.0.0.1", client.getsockname()[1])
            assert conn.getpeername() == client.getsockname()
            talk(conn, client)
            snap = board.snapshot()
            assert snap.slots[slot].state == State.BUSY
            assert snap.slots[slot].connections == 1
            assert snap.connections == 1
            assert snap.idle_counter == 0 and consistent(snap)
            assert (len(pending_bytes(wake_r)) == 1) is woken
    finally:
        client.close()
        listener.close()
    assert board.idle(slot) == 0
    assert board.snapshot().idle_counter == 1


def test_accept_tcp_ipv6_address(board: Scoreboard) -> None:
    try:
        listener = guarded_listener(socket.AF_INET6, ("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    slot = child_slot(board)
    client = socket.create_connection(("::1", listener.getsockname()[1]), timeout=DEADLINE)
    try:
        wait_acceptable(listener)
        conn, addr = board.accept(slot, listener)
        with conn:
            assert addr == client.getsockname()
            assert addr[0] == "::1"
            talk(conn, client)
    finally:
        client.close()
        listener.close()
    assert state(board, slot) == State.BUSY


@pytest.mark.parametrize("named_client", [False, True])
def test_accept_unix_returns_a_usable_socket(board: Scoreboard, tmp_path: Path,
                                             named_client: bool) -> None:
    path = str(tmp_path / "listen.sock")
    listener = guarded_listener(socket.AF_UNIX, path)
    slot = child_slot(board)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if named_client:
            client.bind(str(tmp_path / "client.sock"))
        client.connect(path)
        wait_acceptable(listener)
        conn, addr = board.accept(slot, listener)
        with conn:
            assert conn.family == socket.AF_UNIX
            assert addr == (str(tmp_path / "client.sock") if named_client else "")
            talk(conn, client)
    finally:
        client.close()
        listener.close()
    snap = board.snapshot()
    assert snap.slots[slot].state == State.BUSY and snap.connections == 1


def test_accept_that_times_out_leaves_the_slot_idle(board: Scoreboard) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", 0, 50_000))   # 50 ms
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    slot = child_slot(board)
    try:
        with pytest.raises(OSError) as info:
            board.accept(slot, listener)
        assert info.value.errno == 11   # EAGAIN: the worker's cue to check on its master
    finally:
        listener.close()
    snap = board.snapshot()
    assert snap.slots[slot].state == State.IDLE
    assert snap.connections == 0 and snap.idle_counter == 1


# ----------------------------------------------------------------- the acceptor


class Waiting:
    """A child's accept set-up: a non-blocking listener and the epoll set the
    worker makes (the listener EPOLLEXCLUSIVE, and the signal wake-up pipe),
    handed to the board as Worker.boot does."""

    def __init__(self, board: Scoreboard, family: int, address: object) -> None:
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.waiter = select.epoll()
        self.waiter.register(self.listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.waiter.register(self.wake_r, select.EPOLLIN)
        board.prepare_accept(self.listener)
        board.set_waiter(self.waiter)

    def close(self) -> None:
        self.waiter.close()
        self.listener.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture
def waiting(board: Scoreboard) -> Iterator[Callable[[int, object], Waiting]]:
    made: list[Waiting] = []

    def make(family: int, address: object) -> Waiting:
        made.append(Waiting(board, family, address))
        return made[-1]
    yield make
    for w in made:
        w.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "unix", "unix-named"])
def test_the_acceptor_gives_what_accept_gives(board: Scoreboard, waiting: Any,
                                              tmp_path: Path, family: str) -> None:
    """The worker's per-connection call: a socket.socket, the peer's address as
    socket.accept() gives it, the busy transition; with idle_first, the
    previous connection's idle transition first."""
    if family == "ipv6" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    fam, address = {"ipv4": (socket.AF_INET, ("127.0.0.1", 0)),
                    "ipv6": (socket.AF_INET6, ("::1", 0)),
                    "unix": (socket.AF_UNIX, str(tmp_path / "l.sock")),
                    "unix-named": (socket.AF_UNIX, str(tmp_path / "l.sock"))}[family]
    w = waiting(fam, address)
    slot = child_slot(board)
    accept = board.acceptor(slot, w.listener)
    for n, idle_first in ((1, False), (2, True)):
        client = socket.socket(fam, socket.SOCK_STREAM)
        try:
            if family == "unix-named":
                name = str(tmp_path / f"client{n}.sock")
                client.bind(name)
            client.connect(w.listener.getsockname())
            conn, addr = accept(idle_first)
            with conn:
                assert type(conn) is socket.socket
                assert conn.family == fam and conn.type == socket.SOCK_STREAM
                expected = client.getsockname() if fam != socket.AF_UNIX else (
                    name if family == "unix-named" else "")
                assert addr == expected
                assert type(addr) is type(expected)
                talk(conn, client)
                snap = board.snapshot()
                assert snap.slots[slot].state == State.BUSY
                assert snap.slots[slot].connections == n
                assert snap.idle_counter == 0 and consistent(snap)
        finally:
            client.close()


def test_the_acceptor_sleeps_until_a_connection_comes(board: Scoreboard, waiting: Any) -> None:
    """Nothing queued: it waits in epoll (the worker's idle sleep) and takes
    the connection that comes, from a client started after the call."""
    import threading
    w = waiting(socket.AF_INET, ("127.0.0.1", 0))
    slot = child_slot(board)
    accept = board.acceptor(slot, w.listener)
    clients: list[socket.socket] = []

    def connect() -> None:
        try:
            clients.append(socket.create_connection(w.listener.getsockname(),
                                                    timeout=DEADLINE))
        finally:
            if not clients:
                os.write(w.wake_w, b"s")    # no client: end the wait, fail below
    timer = threading.Timer(0.2, connect)
    timer.start()
    try:
        conn, addr = accept(False)
        conn.close()
        timer.join(DEADLINE)
        assert addr == clients[0].getsockname()
    finally:
        timer.cancel()
        for c in clients:
            c.close()


def test_the_acceptor_returns_on_a_signal_and_leaves_when_retired(
        board: Scoreboard, waiting: Any) -> None:
    w = waiting(socket.AF_INET, ("127.0.0.1", 0))
    slot = child_slot(board)
    accept = board.acceptor(slot, w.listener)
    os.write(w.wake_w, b"s")        # what a handled signal writes
    with pytest.raises(InterruptedError):
        accept(False)
    assert state(board, slot) == State.IDLE
    os.read(w.wake_r, 8)
    with socket.create_connection(w.listener.getsockname(), timeout=DEADLINE):
        conn, _ = accept(False)
        conn.close()
    board.retire(slot)              # the master, while it served
    with pytest.raises(OSError) as info:
        accept(True)
    assert info.value.errno == errno.ESHUTDOWN
    assert state(board, slot) == State.EXITING


def test_a_connection_lost_after_its_busy_transition_owes_the_slot_its_idle() -> None:
    """The socket cannot be made (here: the socket type refuses it) after
    the slot went busy: the connection is closed, the error raised, and the
    next call goes idle first even when not asked to."""
    if scoreboard._Acceptor is None:
        pytest.skip("mps._accept is not built (install a C compiler and reinstall mps)")
    board = scoreboard.CScoreboard(NSLOTS)
    w = Waiting(board, socket.AF_INET, ("127.0.0.1", 0))
    made: list[socket.socket] = []

    def refusing(family: int, type: int, proto: int, fd: int) -> socket.socket:
        raise OSError(errno.EMFILE, "no socket for you")
    try:
        slot = child_slot(board)
        peers = board._peers
        assert peers is not None
        accept = scoreboard._Acceptor(board.accept_entry(slot, w.listener), board, refusing,
                                      peers.family, peers.type, peers.proto, peers.decode)
        made.append(socket.create_connection(w.listener.getsockname(), timeout=DEADLINE))
        with pytest.raises(OSError) as info:
            accept(False)
        assert info.value.errno == errno.EMFILE
        assert made[0].recv(16) == b""          # closed, not leaked
        assert state(board, slot) == State.BUSY
        os.write(w.wake_w, b"s")
        with pytest.raises(InterruptedError):
            accept(False)                       # not asked to go idle ...
        assert state(board, slot) == State.IDLE     # ... and it did
        assert consistent(board.snapshot())
    finally:
        for c in made:
            c.close()
        w.close()
        board.close()


def c_acceptor_board() -> tuple[Scoreboard, Waiting]:
    if scoreboard._Acceptor is None:
        pytest.skip("mps._accept is not built (install a C compiler and reinstall mps)")
    board = scoreboard.CScoreboard(NSLOTS)
    return board, Waiting(board, socket.AF_INET, ("127.0.0.1", 0))


def test_the_c_acceptors_socket_is_the_one_socket_socket_makes() -> None:
    """On the CPythons mps supports, the acceptor makes each socket from a
    checked template (no __init__, no getsockname); the socket must be the
    one socket.socket(family, type, proto, fd) would have made."""
    board, w = c_acceptor_board()
    made: list[socket.socket] = []
    try:
        accept = board.acceptor(child_slot(board), w.listener)
        assert type(accept) is scoreboard._Acceptor
        assert accept.fast == 1, "the layout probe failed on this CPython"
        made.append(socket.create_connection(w.listener.getsockname(), timeout=DEADLINE))
        conn, addr = accept(False)
        with conn:
            assert type(conn) is socket.socket
            assert (conn.family, conn.type, conn.proto) == (socket.AF_INET, socket.SOCK_STREAM, 0)
            assert conn.gettimeout() is None and conn.getblocking()
            assert conn.getpeername() == made[0].getsockname() == addr
            assert not os.get_inheritable(conn.fileno())
            with conn.makefile("rwb") as f:       # (the _io_refs slot at work)
                made[0].sendall(b"line\n")
                assert f.readline() == b"line\n"
            conn.sendall(b"pong")
            assert made[0].recv(8) == b"pong"
            fd = conn.fileno()
        assert conn.fileno() == -1 and "[closed]" in repr(conn)
        with pytest.raises(OSError):
            os.fstat(fd)                        # closed for real
        # An object like any other socket: weak references, the cycle
        # collector, the type's reference count, the error handler, and the
        # finalizer of one never closed.
        import gc
        import warnings
        import weakref
        for _ in range(8):      # (the clients are socket.socket objects too: made first)
            made.append(socket.create_connection(w.listener.getsockname(), timeout=DEADLINE))
        refs = sys.getrefcount(socket.socket)
        for _ in range(8):
            conn, _ = accept(True)
            conn.close()
        del conn
        assert sys.getrefcount(socket.socket) == refs
        made.append(socket.create_connection(w.listener.getsockname(), timeout=DEADLINE))
        conn, _ = accept(True)
        assert gc.is_tracked(conn)
        gone = weakref.ref(conn)
        with pytest.raises(OSError):
            conn.connect(w.listener.getsockname())      # already connected: EISCONN
        fd = conn.fileno()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del conn
            gc.collect()
        warned = [c for c in caught if issubclass(c.category, ResourceWarning)]
        assert warned, caught
        assert warned[0].source is gone()       # (the warning keeps it, as any socket's)
        del caught, warned
        gc.collect()
        assert gone() is None
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        for c in made:
            c.close()
        w.close()
        board.close()


def test_the_c_acceptor_honours_a_default_timeout_and_other_socket_types() -> None:
    """Where the template would be wrong, sockets are made by calling the
    type: with socket.setdefaulttimeout in force (the socket then has the
    timeout, as socket.accept() gives it), and for a socket type the layout
    probe does not know."""
    board, w = c_acceptor_board()
    made: list[socket.socket] = []

    class Mine(socket.socket):
        __slots__ = ("tag",)
    try:
        slot = child_slot(board)
        accept = board.acceptor(slot, w.listener)
        socket.setdefaulttimeout(7.5)
        try:
            made.append(socket.create_connection(w.listener.getsockname(), timeout=DEADLINE))
            conn, _ = accept(False)
        finally:
            socket.setdefaulttimeout(None)
        with conn:
            # (a timeout makes the descriptor non-blocking underneath)
            assert conn.gettimeout() == 7.5 and not os.get_blocking(conn.fileno())
        peers = board._peers
        assert peers is not None
        # The master's template is socket.socket's: it is not taken for
        # another type, and none is made for one.
        assert board._template is not None
        other = scoreboard._Acceptor(board.accept_entry(slot, w.listener), board, Mine,
                                     peers.family, peers.type, peers.proto, peers.decode,
                                     board._template)
        assert other.fast == 0
        assert scoreboard._socket_template(Mine, peers.family, peers.type, peers.proto,
                                           peers.fd) is None
        made.append(socket.create_connection(w.listener.getsockname(), timeout=DEADLINE))
        conn, _ = other(True)
        with conn:
            assert type(conn) is Mine and conn.gettimeout() is None
            assert conn.getpeername() == made[-1].getsockname()
    finally:
        for c in made:
            c.close()
        w.close()
        board.close()


AUDIT_PROBE = """
import os, select, socket, sys
from mps import scoreboard
seen, armed = [], []
def hook(event, args):
    if event == "socket.__new__":
        if armed and os.environ.get("REFUSE"):
            raise RuntimeError("refused by the audit hook")
        seen.append(args)
sys.addaudithook(hook)
board = scoreboard.CScoreboard(2)
listener = socket.socket()
listener.bind(("127.0.0.1", 0)); listener.listen(4); listener.setblocking(False)
waiter = select.epoll(); waiter.register(listener, select.EPOLLIN | select.EPOLLEXCLUSIVE)
board.prepare_accept(listener); board.set_waiter(waiter)
slot = board.reserve(); board.started(slot, os.getpid()); board.idle(slot)
accept = board.acceptor(slot, listener)
assert accept.fast == 1
client = socket.create_connection(listener.getsockname(), timeout=10)
before = len(seen)
armed.append(1)
try:
    conn, addr = accept(False)
except RuntimeError as exc:
    print("refused", client.recv(8) == b"")
else:
    new = seen[before:]
    print("events", len(new), new[0][0] is conn, new[0][1:] == (2, 1, 0))
"""


@pytest.mark.parametrize("refuse", [False, True])
def test_the_c_acceptor_raises_sockets_audit_event(refuse: bool) -> None:
    """socket.socket's __init__ raises the "socket.__new__" audit event (PEP
    578); the acceptor's template path raises it too, and an audit hook that
    refuses it refuses the connection, which is closed.  (In a fresh
    interpreter: an audit hook cannot be removed.)"""
    if scoreboard._Acceptor is None:
        pytest.skip("mps._accept is not built (install a C compiler and reinstall mps)")
    env = {**os.environ, **({"REFUSE": "1"} if refuse else {})}
    out = subprocess.run([sys.executable, "-W", "error::ResourceWarning", "-c", AUDIT_PROBE],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.split() == (["refused", "True"] if refuse
                                  else ["events", "1", "True", "True"]), out.stdout


def test_the_c_board_accepts_in_c() -> None:
    """Where mps._accept is built (with the C core), the C board's acceptor
    is its C type, not the Python accept() wrapped."""
    if scoreboard._lib is None:
        pytest.skip("the C core is not built (install a C compiler and reinstall mps)")
    if scoreboard._Acceptor is None:
        pytest.fail("mps._accept was not built beside the C core")
    board = scoreboard.CScoreboard(NSLOTS)
    w = Waiting(board, socket.AF_INET, ("127.0.0.1", 0))
    try:
        accept = board.acceptor(child_slot(board), w.listener)
        assert type(accept) is scoreboard._Acceptor
        with pytest.raises(ValueError):
            scoreboard._Acceptor((0, 0, 0, 0, -1, -1, -1, 0, 0), board, socket.socket,
                                 2, 1, 0, str)
        with pytest.raises(RuntimeError):
            accept.__init__(board.accept_entry(0, w.listener), board,    # type: ignore[misc]
                            socket.socket, 2, 1, 0, str)
    finally:
        w.close()
        board.close()


# ----------------------------------------------------------------- a stopped holder


#: The master's lock deadline in these tests: short, to keep them quick.
LOCK_TIMEOUT = 0.2
#: "The pool serves again within a couple of seconds" (generous for a loaded CI box).
RECOVERY = LOCK_TIMEOUT + 3.0


class StoppedHolder:
    """A forked process that takes the lock, leaves a half-done update (the
    counter moved by -1, no slot did; with ``updating``, that slot's record
    opened for writing too) and SIGSTOPs itself, lock in hand: what a child
    looks like to a master when a debugger or freezer stops it."""

    def __init__(self, board: Scoreboard, updating: int = -1) -> None:
        self._ready_r, ready_w = os.pipe()

        def hold() -> None:
            os.close(self._ready_r)
            board.hold_lock(updating)
            shift_idle_counter(board, -1)
            os.write(ready_w, b"h")
            os.kill(os.getpid(), signal.SIGSTOP)
            while True:
                time.sleep(60)          # continued after all: keep the lock until killed

        self.pid = fork_call(hold)
        os.close(ready_w)
        self.reaped = False

    def wait_stopped(self) -> None:
        try:
            assert wait_byte(self._ready_r) == b"h"
        finally:
            os.close(self._ready_r)
        wait_until(lambda: process_state(self.pid) == "T", DEADLINE,
                   what=f"holder {self.pid} to stop")

    def reap(self) -> int:
        self.reaped = True              # reap() collects the pid even when it fails
        return reap(self.pid)

    def finish(self) -> None:
        if not self.reaped:             # not reaped: the pid is still our child's
            os.kill(self.pid, signal.SIGKILL)
            self.reap()


@pytest.fixture
def stop_a_holder() -> Iterator[Callable[..., StoppedHolder]]:
    """Factory: a stopped lock holder on the board; killed and reaped at teardown."""
    made: list[StoppedHolder] = []

    def make(board: Scoreboard, updating: int = -1) -> StoppedHolder:
        holder = StoppedHolder(board, updating)
        made.append(holder)
        holder.wait_stopped()
        return holder

    yield make
    for holder in made:
        holder.finish()


def killer(holder_pid: int) -> Callable[[int], None]:
    """The master's on_stuck, reduced to its decision: SIGKILL the reported
    holder if it is the stopped one; refuse (raise) any other pid.  A later
    call may still report the same pid, or 0, while the killed holder exits."""
    killed: list[int] = []

    def on_stuck(pid: int) -> None:
        if pid == holder_pid:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        elif not (pid == 0 and killed):
            raise AssertionError(f"on_stuck got pid {pid}; the stopped holder is {holder_pid}")

    return on_stuck


#: Every master-side call, on the board set up by stuck_board(): each takes
#: the lock with a deadline.  Value: (call, what it returns once the lock is
#: recovered, a check of its effect on the snapshot afterwards).
MASTER_CALLS: dict[str, tuple[Callable[[Scoreboard, int], Any], Any,
                              Callable[[Snapshot, int], bool]]] = {
    "reserve": (lambda b, spare: b.reserve(), 3,
                lambda snap, spare: snap.slots[3].state == State.STARTING),
    "started": (lambda b, spare: b.started(spare, 4242), None,
                lambda snap, spare: snap.slots[spare].pid == 4242),
    "release": (lambda b, spare: int(b.release(spare)), State.STARTING,
                lambda snap, spare: snap.slots[spare].state == State.EMPTY),
    "retire": (lambda b, spare: int(b.retire(spare)), State.STARTING,
               lambda snap, spare: snap.slots[spare].retire),
    "snapshot": (lambda b, spare: snapshot_summary(b),
                 {"idle_counter": 1, "idle": 1, "repairs": 1},
                 lambda snap, spare: True),
    "audit": (lambda b, spare: b.audit(), 0,     # recovering the lock already recounted
              lambda snap, spare: True),
    "set_min_spare": (lambda b, spare: b.set_min_spare(1), None,
                      lambda snap, spare: snap.min_spare == 1),
}


def stuck_board(board: Scoreboard) -> tuple[int, int, int]:
    """Slots 0 idle, 1 busy, 2 starting (the spare the calls act on)."""
    idle_slot, busy_slot = child_slot(board), child_slot(board)
    board.busy(busy_slot)
    spare = board.reserve()
    assert (idle_slot, busy_slot, spare) == (0, 1, 2)
    board.lock_timeout = LOCK_TIMEOUT
    return idle_slot, busy_slot, spare


@pytest.mark.parametrize("call", sorted(MASTER_CALLS))
def test_a_stopped_holder_is_killed_through_on_stuck_and_the_lock_recovered(
        board: Scoreboard, stop_a_holder: Callable[[Scoreboard], StoppedHolder],
        call: str) -> None:
    """Issue 7 item 7: the master's call does not block forever; it reports
    the holder, the callback kills it, and the retry recovers the lock (a
    repair, the half-done counter recounted)."""
    fn, expected, effect = MASTER_CALLS[call]
    idle_slot, busy_slot, spare = stuck_board(board)
    holder = stop_a_holder(board)
    assert board.lock_holder() == holder.pid

    def master() -> dict[str, Any]:
        reported: list[int] = []
        kill = killer(holder.pid)

        def on_stuck(pid: int) -> None:
            reported.append(pid)
            kill(pid)

        board.on_stuck = on_stuck
        start = time.monotonic()
        result = fn(board, spare)
        return {"result": result, "reported": reported, "elapsed": time.monotonic() - start}

    # The master's call runs in a checker: were it to block, the deadline fails the test.
    seen = call_in_child(master)
    assert seen["reported"][0] == holder.pid
    assert set(seen["reported"]) <= {holder.pid, 0}
    assert seen["result"] == expected
    assert seen["elapsed"] < RECOVERY
    assert holder.reap() == -signal.SIGKILL
    snap = board.snapshot()
    assert snap.repairs == 1
    assert snap.idle_counter == 1 == snap.count(State.IDLE)     # the -1 was recounted away
    assert snap.slots[idle_slot].state == State.IDLE
    assert snap.slots[busy_slot].state == State.BUSY
    assert effect(snap, spare)
    assert board.lock_holder() == 0
    assert board.audit() == 0 and board.snapshot().repairs == 1


def test_on_stuck_is_asked_again_for_as_long_as_it_returns(
        board: Scoreboard, stop_a_holder: Callable[[Scoreboard], StoppedHolder]) -> None:
    stuck_board(board)
    holder = stop_a_holder(board)

    def master() -> list[int]:
        reported: list[int] = []
        kill = killer(holder.pid)

        def on_stuck(pid: int) -> None:
            reported.append(pid)
            if len(reported) >= 3:      # the first two times, wait another lock_timeout
                kill(pid)

        board.on_stuck = on_stuck
        board.snapshot()
        return reported

    reported = call_in_child(master)
    assert reported[:3] == [holder.pid] * 3
    assert set(reported[3:]) <= {holder.pid, 0}
    assert holder.reap() == -signal.SIGKILL
    assert board.snapshot().repairs == 1


class GiveUp(Exception):
    pass


def test_on_stuck_raising_abandons_the_call_without_touching_the_board(
        board: Scoreboard, stop_a_holder: Callable[[Scoreboard], StoppedHolder]) -> None:
    _, _, spare = stuck_board(board)
    holder = stop_a_holder(board)

    def master() -> int:
        def on_stuck(pid: int) -> None:
            raise GiveUp(pid)

        board.on_stuck = on_stuck
        try:
            board.release(spare)
        except GiveUp as exc:
            return int(exc.args[0])
        return -1

    assert call_in_child(master) == holder.pid
    assert board.lock_holder() == holder.pid    # the lock was left alone
    holder.finish()
    snap = board.snapshot()
    assert snap.slots[spare].state == State.STARTING   # release never ran
    assert snap.repairs == 1 and consistent(snap)


@pytest.mark.parametrize("call", ["snapshot", "reserve"])
def test_without_on_stuck_a_master_call_gives_up_with_etimedout(
        board: Scoreboard, stop_a_holder: Callable[[Scoreboard], StoppedHolder],
        call: str) -> None:
    fn = MASTER_CALLS[call][0]
    _, _, spare = stuck_board(board)
    holder = stop_a_holder(board)

    def master() -> dict[str, Any]:
        assert board.on_stuck is None
        start = time.monotonic()
        try:
            fn(board, spare)
        except OSError as exc:
            return {"errno": exc.errno, "elapsed": time.monotonic() - start}
        return {"errno": 0, "elapsed": time.monotonic() - start}

    seen = call_in_child(master)
    assert seen["errno"] == errno.ETIMEDOUT
    assert LOCK_TIMEOUT * 0.9 <= seen["elapsed"] < RECOVERY
    assert process_state(holder.pid) == "T"
    assert board.lock_holder() == holder.pid    # giving up did not break the lock
    holder.finish()
    snap = board.snapshot()
    assert snap.repairs == 1 and snap.idle_counter == 1 and consistent(snap)
    assert snap.count(State.STARTING) == 1      # reserve never ran


def test_children_blocked_behind_a_stopped_holder_serve_again_once_it_is_killed(
        board: Scoreboard, stop_a_holder: Callable[[Scoreboard], StoppedHolder]) -> None:
    """Children's calls have no deadline (their hot path is unchanged): they
    wait behind the stopped holder until the master's on_stuck kills it."""
    idle_slot, busy_slot, _ = stuck_board(board)
    holder = stop_a_holder(board)
    result_r, result_w = os.pipe()

    def child() -> None:
        os.write(result_w, b"w")        # about to block on the held lock
        os.write(result_w, b"%d" % board.idle(busy_slot))

    child_pid = fork_call(child)
    child_reaped = False
    os.close(result_w)
    try:
        assert wait_byte(result_r) == b"w"
        wait_until(lambda: process_state(child_pid) == "S", DEADLINE,
                   what="the child to block on the lock")
        # Several lock_timeouts pass: the child keeps waiting, it never gives up.
        assert not select.select([result_r], [], [], 3 * LOCK_TIMEOUT)[0]
        assert process_state(child_pid) == "S"

        def master() -> None:
            board.on_stuck = killer(holder.pid)
            board.audit()

        call_in_child(master)
        child_reaped = True
        assert reap(child_pid) == 0
        assert os.read(result_r, 16) == b"0"
    finally:
        os.close(result_r)
        if not child_reaped:
            os.kill(child_pid, signal.SIGKILL)
            reap(child_pid)
    assert holder.reap() == -signal.SIGKILL
    snap = board.snapshot()
    assert snap.repairs == 1
    assert [snap.slots[s].state for s in (idle_slot, busy_slot)] == [State.IDLE, State.IDLE]
    assert snap.idle_counter == 2 == snap.count(State.IDLE)


def test_a_snapshot_gets_past_a_holder_stopped_inside_a_slots_update(
        board: Scoreboard, stop_a_holder: Callable[..., StoppedHolder]) -> None:
    """C copies the records after the lock, each until it is read whole: a
    record whose writer stopped inside it must not wedge the master's
    snapshot (on_stuck kills the writer, the record is read under the lock)."""
    idle_slot, busy_slot, _ = stuck_board(board)
    before = board.snapshot().slots[busy_slot]
    holder = stop_a_holder(board, updating=busy_slot)

    def master() -> dict[str, Any]:
        board.on_stuck = killer(holder.pid)
        snap = board.snapshot()
        s = snap.slots[busy_slot]
        return {"state": int(s.state), "pid": s.pid, "connections": s.connections,
                "busy_since": s.busy_since, "consistent": consistent(snap)}

    seen = call_in_child(master)
    assert seen == {"state": State.BUSY, "pid": before.pid, "connections": 1,
                    "busy_since": before.busy_since, "consistent": True}
    assert holder.reap() == -signal.SIGKILL
    # The record's next writer ends what the dead one began: the slot works on.
    assert board.idle(busy_slot) == 0
    assert board.busy(busy_slot) >= 0
    snap = board.snapshot()
    assert snap.slots[busy_slot].connections == 2
    assert snap.slots[busy_slot].state == State.BUSY and whole_records(snap)
    assert snap.idle_counter == 1 == snap.count(State.IDLE) and snap.repairs == 1


def test_a_record_left_open_by_a_dead_holder_does_not_stall_the_snapshot(
        board: Scoreboard) -> None:
    """The holder dies inside a slot's update: the next snapshot, with no
    on_stuck at all, reads that record (under the lock) at once."""
    idle_slot, busy_slot = child_slot(board), child_slot(board)
    board.busy(busy_slot)
    board.lock_timeout = LOCK_TIMEOUT
    assert reap(fork_call(lambda: board.hold_lock(busy_slot))) == 0    # died inside it

    def master() -> dict[str, Any]:
        start = time.monotonic()
        snap = board.snapshot()
        return {"elapsed": time.monotonic() - start, "repairs": snap.repairs,
                "states": [int(snap.slots[s].state) for s in (idle_slot, busy_slot)],
                "connections": snap.slots[busy_slot].connections}

    seen = call_in_child(master)
    assert seen["elapsed"] < LOCK_TIMEOUT
    assert (seen["repairs"], seen["states"], seen["connections"]) == \
        (1, [State.IDLE, State.BUSY], 1)
    assert board.idle(busy_slot) == 0
    snap = board.snapshot()
    assert snap.idle_counter == 2 == snap.count(State.IDLE) and whole_records(snap)


def test_lock_holder_is_zero_when_the_lock_is_free(board: Scoreboard) -> None:
    assert board.lock_holder() == 0
    slot = child_slot(board)
    board.busy(slot)
    board.audit()
    assert board.lock_holder() == 0
    assert reap(fork_call(board.hold_lock)) == 0    # died holding it
    assert board.lock_holder() == 0                 # a dead holder holds nothing
    assert call_in_child(lambda: snapshot_summary(board))["repairs"] == 1
    assert board.lock_holder() == 0


def test_lock_holder_names_a_live_holder(board: Scoreboard) -> None:
    ready_r, ready_w = os.pipe()

    def holder() -> None:
        board.hold_lock()
        os.write(ready_w, b"h")
        while True:
            time.sleep(60)              # until the test kills us, lock in hand

    pid = fork_call(holder)
    try:
        assert wait_byte(ready_r) == b"h"
        assert board.lock_holder() == pid
    finally:
        os.close(ready_r)
        os.close(ready_w)
        os.kill(pid, signal.SIGKILL)
        reap(pid)


def test_lock_timeout_defaults_to_half_a_second(board: Scoreboard) -> None:
    assert board.lock_timeout == 0.5
    assert board.on_stuck is None
    board.lock_timeout = 2
    assert board.lock_timeout == 2.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), 1e9])
def test_lock_timeout_must_be_positive_and_finite(board: Scoreboard, bad: float) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        board.lock_timeout = bad
    assert board.lock_timeout == 0.5


def _attached_copy(b: Scoreboard) -> dict[str, Any]:
    """b's handoff, with fds of its own (attach takes them over; b closes its own)."""
    info = b.handoff()
    return {**info, **{k: os.dup(v) for k, v in info.items() if k.endswith("_fd")}}


def test_a_reexecuted_master_attaches_to_its_childrens_board(board: Scoreboard) -> None:
    slot = board.reserve()
    board.started(slot, 4242)
    info = _attached_copy(board)
    again = scoreboard.attach(info)
    try:
        assert again.snapshot().slots[slot].pid == 4242
    finally:
        again.close()


def test_a_board_of_another_layout_is_refused(board: Scoreboard) -> None:
    """An upgrade to a release whose board differs must not misread the old
    one: its header is checked (the C board's version, the Python board's
    layout word), and a mismatch refused."""
    info = _attached_copy(board)
    header = os.pread(info["memory_fd"], 128, 0)
    os.pwrite(info["memory_fd"], b"\xab" * 128, 0)      # not this release's header
    try:
        with pytest.raises(OSError) as caught:
            scoreboard.attach(info)
        assert caught.value.errno == errno.EPROTO
    finally:
        os.pwrite(info["memory_fd"], header, 0)     # (the fixture's board, as it was)
        for key, fd in info.items():
            if key.endswith("_fd"):
                os.close(fd)
    assert board.snapshot().idle_counter == 0


def test_the_python_board_checks_its_layout_word() -> None:
    """Same size, same slots, another layout: refused all the same."""
    b = PyScoreboard(NSLOTS)
    try:
        info = _attached_copy(b)
        word = 8 * scoreboard._H_LAYOUT
        good = os.pread(info["memory_fd"], 8, word)
        os.pwrite(info["memory_fd"], struct.pack("q", scoreboard.PY_BOARD_LAYOUT + 1), word)
        with pytest.raises(OSError) as caught:
            scoreboard.attach(info)
        assert caught.value.errno == errno.EPROTO
        os.pwrite(info["memory_fd"], good, word)
        scoreboard.attach(info).close()     # the same board, its word back: attached
    finally:
        b.close()
