"""The scoreboard: one slot per child and the idle counter, shared by fork.

Two backends offer one interface (:class:`Scoreboard`):

* :class:`CScoreboard` -- the C core (``mps._mpscore``, built by cffi): each
  transition is one C call that takes a process-shared robust pthread mutex,
  updates the slot and the counter together, and unlocks.  The child's
  accept and its busy transition are one call, made with the GIL released.
* :class:`PyScoreboard` -- pure Python: anonymous ``mmap`` plus a POSIX
  ``fcntl`` lock on a memfd.  The kernel drops that lock when its holder
  dies; a "dirty" word set while the lock is held tells the next locker that
  the holder died mid-update, and it recounts (the C core's EOWNERDEAD path).

A holder that is *stopped* rather than dead (SIGSTOP, a debugger attaching,
a cgroup freezer) is recovered by neither, so the master never waits on the
lock without a deadline: each master-side call waits at most
:attr:`Scoreboard.lock_timeout`, then asks the master's
:attr:`Scoreboard.on_stuck` callback about the holder's pid, and retries.
Once the callback has SIGKILLed the holder, the retry gets the lock through
the dead-holder path above (and ``repairs`` counts it).  The children's calls
keep blocking: a stopped holder stalls them until the master acts.

Slot life: EMPTY -> STARTING (master, before fork) -> IDLE <-> BUSY (child)
-> EXITING (child, or master retiring it) -> EMPTY (master, when it reaps).
Invariant: ``idle counter == number of IDLE slots``.

This module is the only importer of ``mps._mpscore`` and ``mps._accept``;
the C core's errors (``-errno``) become ``OSError`` in :func:`_check`, and
on the child's accept path where its call is made (``CScoreboard.accept``,
the acceptor in C).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import math
import mmap
import os
import select
import socket
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .errors import BackendError
from .sockets import Peers

try:
    from ._mpscore import ffi as _ffi, lib as _lib
except ImportError:  # no compiler at install time: the Python backend serves
    _ffi = _lib = None
try:
    from ._accept import Acceptor as _Acceptor, template as _socket_template
except ImportError:  # (built with the C core; accept() is the same call, from Python)
    _Acceptor = _socket_template = None     # type: ignore[assignment,misc]

log = logging.getLogger("mps")

_ADDR_MAX = 128     # sizeof(struct sockaddr_storage)


class State(IntEnum):
    EMPTY = 0
    STARTING = 1
    IDLE = 2
    BUSY = 3
    EXITING = 4


#: One character per state, Apache style, for ``mps status``.
STATE_CHARS = {State.EMPTY: ".", State.STARTING: "S", State.IDLE: "_",
               State.BUSY: "W", State.EXITING: "G"}


@dataclass(frozen=True)
class Slot:
    index: int
    pid: int
    state: State
    connections: int
    changed_ns: int
    retire: bool
    requests: int = 0
    busy_since: int = 0         # ns, 0 when not serving a connection
    busy_ns: int = 0            # accumulated over finished connections
    request: bytes = b""        # the request being served (HTTP: method and path)

    def age_s(self, now_ns: int) -> float:
        return max(0, now_ns - self.changed_ns) / 1e9

    def busy_s(self, now_ns: int) -> float:
        """Time this child has spent serving, the current connection included."""
        running = now_ns - self.busy_since if self.busy_since else 0
        return (self.busy_ns + max(0, running)) / 1e9


@dataclass(frozen=True)
class Snapshot:
    idle_counter: int
    min_spare: int
    connections: int
    repairs: int
    slots: tuple[Slot, ...]
    requests: int = 0
    busy_ns_done: int = 0       # busy time of children already reaped

    def count(self, state: State) -> int:
        return sum(1 for s in self.slots if s.state == state)

    def busy_s(self, now_ns: int) -> float:
        """Seconds all children have spent serving connections, ever."""
        return self.busy_ns_done / 1e9 + sum(s.busy_s(now_ns) for s in self.slots)


#: Longest lock_timeout accepted: beyond it the deadline protects nothing.
LOCK_TIMEOUT_MAX = 3600.0


class Scoreboard(ABC):
    """The interface both backends implement.  Who calls what:

    master: reserve, started, release, retire, snapshot, audit, set_min_spare,
            lock_holder
    child:  idle (also once after boot), acceptor (its call per connection:
            idle + accept + busy), accept (the same, in Python), busy, done

    The master's calls wait for the lock at most :attr:`lock_timeout` seconds
    at a time.  Each time that expires they call :attr:`on_stuck` with the
    holder's pid (0 when unknown or already gone) and try again, for as long
    as the callback returns; the callback raises to give up.  Without a
    callback they raise ``OSError(ETIMEDOUT)``.  The callback runs inside a
    scoreboard call, so it must not call the scoreboard (it would wait on
    its own caller's lock).  The children's calls block without a deadline:
    their hot path pays nothing for this.
    """

    name: str
    #: Write end of the master's wake-up pipe (set by the master before fork).
    wake_fd: int = -1
    #: The memfd holding the board (children inherit it through fork; an
    #: upgraded master through exec, see handoff()).
    memory_fd: int = -1
    #: Child: where accept() sleeps (see set_waiter); None: accept() blocks
    #: as the listener does.
    waiter: select.epoll | None = None
    _epoll_fd: int = -1
    #: Master: called with the lock holder's pid (0: unknown) each time a
    #: master-side call has waited lock_timeout for the lock.  The master
    #: decides: SIGKILL the holder (the retry then recovers the lock and
    #: counts a repair), return to wait another lock_timeout, or raise.
    on_stuck: Callable[[int], None] | None = None
    _lock_timeout: float = 0.5

    # The child's per-connection calls.  They return the transition's code,
    # not an exception: non-zero means "act" (busy: wake the master; idle:
    # leave), which is also the safe reaction to a scoreboard error (-errno).
    # The C backend binds them straight to the C functions: no Python frame
    # between the child's loop and the lock.
    #: Child took a connection; non-zero when idle children fell below min_spare.
    busy: Callable[[int], int]
    #: Child is ready for the next connection; non-zero when it must leave instead.
    idle: Callable[[int], int]
    #: Child: the idle counter read without the lock (a hint, for "is any
    #: child idle to take a waiting connection?").
    idle_count: Callable[[], int]
    #: Child at its max_requests: non-zero while the master holds its
    #: generation for an upgrade (serve on instead of recycling).
    held: Callable[[], int]

    @abstractmethod
    def set_hold(self, hold: bool) -> None:
        """Master, about to re-execute for an upgrade (True), or after an exec
        that failed (False): its children must outlast the new image's boot,
        however long that takes, so none recycles at max_requests while set.
        The word stays in the board the new image takes over as the old
        generation's; that generation leaves only when retired."""

    @abstractmethod
    def request_marker(self, slot: int) -> Callable[[bytes, bytes], object]:
        """Child: ``mark(method, target)`` for each request that starts on its
        connection -- restart the slot's timeout clock, count the request,
        show "METHOD TARGET" (at most 63 bytes kept).  No lock: only the
        child writes these fields.  Bound once: per request it is one call."""

    def __init__(self, nslots: int) -> None:
        self.nslots = nslots

    @property
    def lock_timeout(self) -> float:
        """Seconds a master-side call waits for the lock before on_stuck (0.5)."""
        return self._lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and 0 < seconds <= LOCK_TIMEOUT_MAX):
            raise ValueError(f"lock_timeout must be in (0, {LOCK_TIMEOUT_MAX:g}] seconds, "
                             f"not {seconds!r}")
        self._lock_timeout = float(seconds)
        self._publish_lock_timeout()

    def _publish_lock_timeout(self) -> None:
        """Hand lock_timeout to where the locking happens (the C board)."""

    def _stuck(self) -> bool:
        """A master-side call waited lock_timeout: ask on_stuck about the
        holder.  True: try again; False: no callback, give up (ETIMEDOUT)."""
        if self.on_stuck is None:
            return False
        self.on_stuck(self.lock_holder())
        return True

    @abstractmethod
    def lock_holder(self) -> int:
        """The pid holding the lock, or 0 when it is free (or the holder is
        unknown).  Never waits for the lock, so the answer may be stale."""

    @abstractmethod
    def reserve(self) -> int:
        """Claim an empty slot as STARTING; its index, or -1 when all are taken."""

    @abstractmethod
    def started(self, slot: int, pid: int) -> None:
        """Record the pid fork() returned for the slot."""

    @abstractmethod
    def release(self, slot: int) -> State:
        """Free the slot whatever its state (reaped, or fork failed)."""

    @abstractmethod
    def retire(self, slot: int) -> State:
        """Ask the slot's child to leave after its current connection, if any."""

    @abstractmethod
    def done(self, slot: int) -> None:
        """Child leaves on its own."""

    @abstractmethod
    def snapshot(self) -> Snapshot:
        """A copy of the header and every slot.  The counters and every
        slot's state are one instant's (idle_counter == the IDLE slots, and
        whatever the pool policy counts, never mixed from two moments).  Each
        slot's other fields are consistent among themselves and read no
        earlier than its state: an age from changed_ns never exceeds the
        state's.  (C copies only the counters and a byte per state under the
        lock: the children never wait behind a whole-board copy.)"""

    @abstractmethod
    def audit(self) -> int:
        """Recount idle slots; repair and return any drift of the counter."""

    @abstractmethod
    def set_min_spare(self, value: int) -> None:
        """Publish the live min_spare and re-arm the children's (edge-triggered)
        wake-up: after one wake, children stay quiet until the master re-arms."""

    @abstractmethod
    def hold_lock(self, updating: int = -1) -> None:
        """Tests only: take the lock and never release it; with a slot, also
        stop in the middle of updating that slot, as a child stopped or
        killed inside a transition would."""

    @abstractmethod
    def close(self) -> None:
        """Unmap (master at exit)."""

    @abstractmethod
    def handoff(self) -> dict[str, Any]:
        """Master, before it re-executes itself (an upgrade): make the board's
        descriptors survive exec and describe them for :func:`attach`."""

    def prepare_accept(self, listener: socket.socket) -> None:
        """Master, before it forks: make what accept() needs for ``listener``
        once, so no child builds (and copies pages for) its own."""

    def set_waiter(self, waiter: select.epoll) -> None:
        """Child, after fork: its epoll set (the listener, EPOLLEXCLUSIVE, and
        its signal wake-up pipe), where accept() sleeps while none is queued."""
        self.waiter = waiter
        self._epoll_fd = waiter.fileno()

    def accept(self, slot: int, listener: socket.socket, idle_first: bool = False,
               wait: bool = True) -> tuple[socket.socket, Any]:
        """Child: the next connection, marked busy (the master woken if idle
        children ran short).  ``idle_first``: the previous connection is done
        -- OSError(ESHUTDOWN) when the master has retired the slot.  On a
        non-blocking listener it sleeps in the waiter until a connection or a
        signal (InterruptedError); ``wait=False`` or no waiter: BlockingIOError
        when nothing is queued."""
        if idle_first and self.idle(slot):
            raise OSError(errno.ESHUTDOWN, "retired by the master")
        while True:
            if self.waiter is not None:
                # Python retries an accept() that a signal interrupts (PEP
                # 475): on a shared (fd://) listener that another master
                # handed back blocking as it left, a TERM would wait here for
                # the next connection.  So the flag is checked first, and the
                # description made non-blocking again (as the master does:
                # the C backend, whose accept returns EINTR, needs neither).
                flags = fcntl.fcntl(listener.fileno(), fcntl.F_GETFL)
                if not flags & os.O_NONBLOCK:
                    fcntl.fcntl(listener.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
            try:
                conn, addr = listener.accept()
                break
            except BlockingIOError:
                if not wait or self.waiter is None:
                    raise
            for fd, _ in self.waiter.poll():
                if fd != listener.fileno():
                    raise InterruptedError(errno.EINTR, "a signal came")
        if self.busy(slot):
            wake(self.wake_fd)
        return conn, addr

    def acceptor(self, slot: int, listener: socket.socket
                 ) -> Callable[[bool], tuple[socket.socket, Any]]:
        """Child, after :meth:`set_waiter`: ``accept(slot, listener,
        idle_first)`` as a call of ``idle_first`` alone, for the worker's
        loop to make once per connection."""
        return partial(self.accept, slot, listener)


def wake(fd: int) -> None:
    """Write one byte to the master's wake-up pipe; a full pipe is awake enough."""
    if fd >= 0:
        try:
            os.write(fd, b"p")
        except (BlockingIOError, BrokenPipeError):
            pass


def _check(rc: int) -> int:
    """The one place C's ``-errno`` becomes an exception."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


class CScoreboard(Scoreboard):
    """The C core through cffi."""

    name = "c"

    def __init__(self, nslots: int, attach_fd: int = -1) -> None:
        if _lib is None:
            raise BackendError("backend 'c' is not available: the C core was not built "
                               "(install a C compiler and reinstall, or use --backend python)")
        super().__init__(nslots)
        out = _ffi.new("mps_board **")
        if attach_fd >= 0:      # a re-executed master, back on its children's board
            _check(_lib.mps_attach(attach_fd, out))
            self.memory_fd = attach_fd
        else:
            # A memfd, not anonymous memory: an upgrade re-executes the master,
            # and its new image maps the same board again (nothing in /tmp).
            self.memory_fd = os.memfd_create("mps-scoreboard", os.MFD_CLOEXEC)
            try:
                _check(_lib.mps_create_fd(nslots, self.memory_fd, out))
            except OSError:
                os.close(self.memory_fd)
                raise
        self._board = out[0]
        self._head = _ffi.new("struct mps_head *")
        self._states = _ffi.new("uint8_t[]", nslots)     # the snapshot's scratch
        self._slots = _ffi.new("struct mps_slot[]", nslots)
        self._addrlen = _ffi.new("uint32_t *")
        self._drift = _ffi.new("int64_t *")
        self._peers: Peers | None = None
        self._peer_buf: Any = None
        self._entry: tuple[int, ...] = ()
        self._template: bytes | None = None
        self.busy = partial(_lib.mps_busy, self._board)
        self.idle = partial(_lib.mps_idle, self._board)
        self.idle_count = partial(_lib.mps_idle_count, self._board)
        self.held = partial(_lib.mps_held, self._board)
        #: The floor busy/idle are measured against (benchmarks only).
        self.nop: Callable[[int], int] = partial(_lib.mps_nop, self._board)
        self._publish_lock_timeout()

    def _publish_lock_timeout(self) -> None:
        if self._board is not None:     # not after close(): C would get NULL
            _check(_lib.mps_set_lock_timeout(self._board, round(self._lock_timeout * 1e9)))

    def _master(self, call: Callable[..., int], *args: Any) -> int:
        """Make a master-side C call; while it times out on the lock, ask
        on_stuck and call again (nothing was changed: C gave up before it
        locked).  The one place the master's C calls meet ETIMEDOUT."""
        rc = int(call(self._board, *args))
        while rc == -errno.ETIMEDOUT and self._stuck():
            rc = int(call(self._board, *args))
        return rc

    def lock_holder(self) -> int:
        return int(_lib.mps_lock_holder(self._board))

    def reserve(self) -> int:
        rc = self._master(_lib.mps_reserve)
        return -1 if rc == -errno.ENOSPC else _check(rc)   # every slot taken

    def started(self, slot: int, pid: int) -> None:
        _check(self._master(_lib.mps_started, slot, pid))

    def release(self, slot: int) -> State:
        return State(_check(self._master(_lib.mps_release, slot)))

    def retire(self, slot: int) -> State:
        return State(_check(self._master(_lib.mps_retire, slot)))

    def done(self, slot: int) -> None:
        _check(_lib.mps_done(self._board, slot))

    def prepare_accept(self, listener: socket.socket) -> None:
        self._peers = Peers(listener)
        self._peer_buf = _ffi.from_buffer(self._peers.buf)
        # accept_entry's addresses, here in the master: cffi's casts would
        # allocate in every child.
        self._entry = tuple(int(_ffi.cast("uintptr_t", p)) for p in (
            _ffi.addressof(_lib, "mps_accept_busy"), _ffi.addressof(_lib, "mps_begin_request"),
            self._board, self._peer_buf, self._addrlen))
        # The acceptor's checked socket template (mps._accept), made here
        # too: probing in a child would copy every page it touches.
        peers = self._peers
        self._template = None if _socket_template is None else _socket_template(
            socket.socket, peers.family, peers.type, peers.proto, peers.fd)

    def accept(self, slot: int, listener: socket.socket, idle_first: bool = False,
               wait: bool = True) -> tuple[socket.socket, Any]:
        # One C call per connection, with the GIL released: the previous
        # connection's idle transition, accept4() (sleeping in epoll while
        # none is queued), the busy transition and the wake-up write.  No
        # Python objects until a connection exists.
        peers = self._peers
        if peers is None or peers.listener is not listener:
            self.prepare_accept(listener)
            peers = self._peers
            assert peers is not None
        self._addrlen[0] = _ADDR_MAX
        fd = _lib.mps_accept_busy(self._board, slot, peers.fd, self._epoll_fd if wait else -1,
                                  idle_first, self.wake_fd, self._peer_buf, self._addrlen)
        if fd < 0:
            raise OSError(-fd, os.strerror(-fd))
        return (socket.socket(peers.family, peers.type, peers.proto, fd),
                peers.decode(self._addrlen[0]))

    def accept_entry(self, slot: int, listener: socket.socket) -> tuple[int, ...]:
        """Child: what a C caller of accept() needs, as addresses and fds --
        mps_accept_busy's, mps_begin_request's (request_marker's call), the
        board's, the slot, the listener, the waiter, the wake-up fd, the peer
        buffer and its length -- for mps.http's C connection loop
        (speedups.Responder.serve_one), which then calls it with the GIL
        released exactly as accept() does.  adopt() turns what it accepted
        into accept()'s (socket, address)."""
        if self._peers is None or self._peers.listener is not listener:
            self.prepare_accept(listener)
        assert self._peers is not None
        accept, begin, board, peer_buf, addrlen = self._entry
        return (accept, begin, board, slot, self._peers.fd, self._epoll_fd, self.wake_fd,
                peer_buf, addrlen)

    def acceptor(self, slot: int, listener: socket.socket
                 ) -> Callable[[bool], tuple[socket.socket, Any]]:
        # The whole accept in C (mps._accept): the C call of accept(), then
        # the socket and the peer's address, with no Python frame between.
        # The socket is made from a checked template of socket.socket's
        # fields (no __init__ frame, no getsockname() per connection).  Per
        # connection that saves what making it in Python costs: cffi's
        # conversions, this method's frame, Peers.decode, socket.__init__
        # (measured 2.4 us of an accept and close's 15.0; see RESULTS.md,
        # fifth session).  A connection lost after its busy transition (no
        # socket could be made) is closed there and the next call goes idle
        # first.
        if _Acceptor is None or self._epoll_fd < 0:
            return super().acceptor(slot, listener)
        entry = self.accept_entry(slot, listener)
        peers = self._peers
        assert peers is not None
        return _Acceptor(entry, self, socket.socket, peers.family, peers.type, peers.proto,
                         peers.decode, self._template)

    def adopt(self, fd: int) -> tuple[socket.socket, Any]:
        """accept()'s answer for a connection a C caller accepted (accept_entry)."""
        assert self._peers is not None
        address = self._peers.decode(self._addrlen[0])
        return self.socket_for(fd), address     # (the socket last: then it owns fd)

    def socket_for(self, fd: int) -> socket.socket:
        """The socket object of a connection a C caller accepted."""
        peers = self._peers
        assert peers is not None
        return socket.socket(peers.family, peers.type, peers.proto, fd)

    def snapshot(self) -> Snapshot:
        _check(self._master(_lib.mps_snapshot, self._head, self._states, self._slots))
        h = self._head
        return Snapshot(
            idle_counter=h.idle, min_spare=h.min_spare, connections=h.connections,
            repairs=h.repairs, requests=h.requests, busy_ns_done=h.busy_ns_done,
            slots=tuple(Slot(i, s.pid, State(s.state), s.connections, s.changed_ns,
                             bool(s.retire), s.requests, s.busy_since, s.busy_ns,
                             _ffi.string(s.request) if s.state == State.BUSY else b"")
                        for i, s in enumerate(self._slots)))

    def request_marker(self, slot: int) -> Callable[[bytes, bytes], object]:
        return partial(_lib.mps_begin_request, self._board, slot)   # no Python frame

    def audit(self) -> int:
        _check(self._master(_lib.mps_audit, self._drift))
        return int(self._drift[0])

    def set_min_spare(self, value: int) -> None:
        _check(self._master(_lib.mps_set_min_spare, value))

    def set_hold(self, hold: bool) -> None:
        _lib.mps_set_hold(self._board, int(hold))

    def hold_lock(self, updating: int = -1) -> None:
        _check(_lib.mps_hold_lock(self._board, updating))

    def close(self) -> None:
        if self._board is not None:
            _lib.mps_destroy(self._board)
            self._board = None
            os.close(self.memory_fd)

    def handoff(self) -> dict[str, Any]:
        os.set_inheritable(self.memory_fd, True)
        return {"backend": self.name, "nslots": self.nslots, "memory_fd": self.memory_fd}


# PyScoreboard layout: int64 words.  Header words, then 5 words per slot.
(_H_NSLOTS, _H_IDLE, _H_MIN_SPARE, _H_CONNS, _H_REPAIRS, _H_DIRTY, _H_WAKE, _H_REQUESTS,
 _H_BUSY_DONE, _H_HOLD, _H_LAYOUT) = range(11)
_HEADER = 11
#: In _H_LAYOUT: "mpsPY" and a layout number, bumped with any change above,
#: so that a re-executed master of another release never reads a board it
#: would misread (as the C board's version field).
PY_BOARD_LAYOUT = 0x6D70735059_0001
_PID, _STATE, _CONNS, _CHANGED, _RETIRE, _REQUESTS, _BUSY_SINCE, _BUSY_NS, _REQUEST = range(9)
_REQUEST_LEN = 64   # bytes: 8 words from _REQUEST on
_SLOT = _REQUEST + _REQUEST_LEN // 8
#: struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hhqqi"
#: Polling a held fcntl lock: first pause, longest pause (seconds).
_POLL_FIRST, _POLL_MAX = 0.001, 0.01


class PyScoreboard(Scoreboard):
    """Pure Python: anonymous shared mmap + fcntl lock.  Same contract as C.

    Stores go through ``memoryview.cast("q")`` item assignment, one 8-byte
    store each: ``struct.pack_into`` zero-fills before storing, so an
    unlocked reader could see a transient 0.  Its snapshot still copies the
    whole board under the lock (the contract's stronger form: this backend's
    holds are fcntl system calls first, and it is the baseline, not the
    fast path).
    """

    name = "python"

    def __init__(self, nslots: int, attach_fd: int = -1, lock_fd: int = -1) -> None:
        super().__init__(nslots)
        if nslots < 1:
            raise OSError(22, "nslots must be positive")
        size = 8 * (_HEADER + _SLOT * nslots)
        if attach_fd >= 0:      # a re-executed master, back on its children's board
            if os.fstat(attach_fd).st_size != size:
                raise OSError(errno.EPROTO, "not a scoreboard of this size")
            self.memory_fd = attach_fd
        else:
            # A memfd (see CScoreboard): an upgraded master maps it again.
            self.memory_fd = os.memfd_create("mps-scoreboard", os.MFD_CLOEXEC)
            os.ftruncate(self.memory_fd, size)
        self._map = mmap.mmap(self.memory_fd, size, flags=mmap.MAP_SHARED)
        self._w = memoryview(self._map).cast("q")
        if attach_fd < 0:
            self._w[_H_NSLOTS] = nslots
            self._w[_H_LAYOUT] = PY_BOARD_LAYOUT
        elif self._w[_H_LAYOUT] != PY_BOARD_LAYOUT or self._w[_H_NSLOTS] != nslots:
            self._w.release()
            self._map.close()
            raise OSError(errno.EPROTO, "not a scoreboard of this release's layout and size")
        # An anonymous in-memory file: nothing in /tmp.  POSIX (lockf) locks
        # belong to the process, so each child locks for itself; never dup or
        # close this fd in a child: closing *any* fd of the file drops the lock.
        self._lock_fd = lock_fd if lock_fd >= 0 else \
            os.memfd_create("mps-scoreboard-lock", os.MFD_CLOEXEC)

    def _lock(self) -> memoryview:
        """Block until the lock is ours (children; the master via _lock_master)."""
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)
        w = self._w
        if w[_H_DIRTY]:     # the last holder died (or was killed) mid-update
            self._recount(w)
            w[_H_REPAIRS] += 1
        w[_H_DIRTY] = 1
        return w

    def _lock_master(self) -> memoryview:
        """Master: lock, waiting at most lock_timeout at a time; between the
        waits on_stuck decides (see Scoreboard).  fcntl has no timed wait, so
        this polls; the pauses grow to _POLL_MAX, which bounds how late the
        master notices that a killed holder's lock was dropped."""
        while not self._try_lock(self._lock_timeout):
            if not self._stuck():
                _check(-errno.ETIMEDOUT)
        # Already ours: POSIX locks belong to the process, so this re-lock
        # returns at once; it runs the one dead-holder check, and keeps the
        # children's _lock free of any extra call.
        return self._lock()

    def _try_lock(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pause = _POLL_FIRST
        while True:
            try:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)

    def _unlock(self, w: memoryview) -> None:
        w[_H_DIRTY] = 0
        fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)

    def lock_holder(self) -> int:
        # F_GETLK reports a lock that would block ours, with its owner's pid.
        # Our own lock never conflicts with us: a master holding it sees 0.
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        got = fcntl.fcntl(self._lock_fd, fcntl.F_GETLK, probe)
        l_type, _, _, _, pid = struct.unpack(_FLOCK, got)
        return 0 if l_type == fcntl.F_UNLCK else int(pid)

    def _recount(self, w: memoryview) -> int:
        idle = sum(1 for i in range(self.nslots) if w[_HEADER + _SLOT * i + _STATE] == State.IDLE)
        drift = idle - w[_H_IDLE]
        w[_H_IDLE] = idle
        return drift

    def _base(self, slot: int) -> int:
        if not 0 <= slot < self.nslots:
            raise OSError(22, f"bad slot {slot}")
        return _HEADER + _SLOT * slot

    @staticmethod
    def _set_state(w: memoryview, base: int, state: int, now: int) -> None:
        w[base + _STATE] = state
        w[base + _CHANGED] = now

    def reserve(self) -> int:
        now = time.monotonic_ns()     # read outside the lock, as in C
        w = self._lock_master()
        try:
            for i in range(self.nslots):
                base = _HEADER + _SLOT * i
                if w[base + _STATE] == State.EMPTY:
                    w[base + _PID] = 0
                    w[base + _CONNS] = 0
                    w[base + _RETIRE] = 0
                    w[base + _REQUESTS] = 0
                    w[base + _BUSY_SINCE] = 0
                    w[base + _BUSY_NS] = 0
                    w[base + _REQUEST] = 0
                    self._set_state(w, base, State.STARTING, now)
                    return i
            return -1
        finally:
            self._unlock(w)

    def started(self, slot: int, pid: int) -> None:
        base = self._base(slot)
        w = self._lock_master()
        try:
            w[base + _PID] = pid
        finally:
            self._unlock(w)

    def release(self, slot: int) -> State:
        base = self._base(slot)
        now = time.monotonic_ns()     # read outside the lock, as in C
        w = self._lock_master()
        try:
            was = w[base + _STATE]
            if was == State.IDLE:
                w[_H_IDLE] -= 1
            self._end_busy(w, base, now)
            w[_H_BUSY_DONE] += w[base + _BUSY_NS]
            w[base + _BUSY_NS] = 0
            w[base + _PID] = 0
            w[base + _RETIRE] = 0
            self._set_state(w, base, State.EMPTY, now)
            return State(was)
        finally:
            self._unlock(w)

    def retire(self, slot: int) -> State:
        base = self._base(slot)
        now = time.monotonic_ns()     # read outside the lock, as in C
        w = self._lock_master()
        try:
            was = w[base + _STATE]
            if was == State.IDLE:
                w[_H_IDLE] -= 1
                self._set_state(w, base, State.EXITING, now)
            elif was in (State.STARTING, State.BUSY):
                w[base + _RETIRE] = 1
            return State(was)
        finally:
            self._unlock(w)

    def busy(self, slot: int) -> int:
        if not 0 <= slot < self.nslots:
            return -errno.EINVAL     # like the C core: a code, not an exception
        base = _HEADER + _SLOT * slot
        now = time.monotonic_ns()     # read outside the lock, as in C
        w = self._lock()
        try:
            if w[base + _STATE] == State.IDLE:
                w[_H_IDLE] -= 1
                self._set_state(w, base, State.BUSY, now)
            else:
                w[base + _CHANGED] = now
            self._end_busy(w, base, now)
            w[base + _BUSY_SINCE] = now
            w[base + _CONNS] += 1
            w[_H_CONNS] += 1
            wake_master = w[_H_IDLE] < w[_H_MIN_SPARE] and not w[_H_WAKE]  # edge, as in C
            if wake_master:
                w[_H_WAKE] = 1
            return int(wake_master)
        finally:
            self._unlock(w)

    def idle(self, slot: int) -> int:
        if not 0 <= slot < self.nslots:
            return -errno.EINVAL     # like the C core: a code, not an exception
        base = _HEADER + _SLOT * slot
        now = time.monotonic_ns()     # read outside the lock, as in C
        w = self._lock()
        try:
            self._end_busy(w, base, now)
            if w[base + _RETIRE] or w[base + _STATE] == State.EXITING:
                self._set_state(w, base, State.EXITING, now)
                return 1
            if w[base + _STATE] != State.IDLE:
                w[_H_IDLE] += 1
            self._set_state(w, base, State.IDLE, now)
            return 0
        finally:
            self._unlock(w)

    def done(self, slot: int) -> None:
        base = self._base(slot)
        now = time.monotonic_ns()     # read outside the lock, as in C
        w = self._lock()
        try:
            if w[base + _STATE] == State.IDLE:
                w[_H_IDLE] -= 1
            self._end_busy(w, base, now)
            self._set_state(w, base, State.EXITING, now)
        finally:
            self._unlock(w)

    @staticmethod
    def _end_busy(w: memoryview, base: int, now: int) -> None:
        since = w[base + _BUSY_SINCE]
        if since:
            w[base + _BUSY_NS] += now - since
            w[base + _BUSY_SINCE] = 0

    def request_marker(self, slot: int) -> Callable[[bytes, bytes], object]:
        return partial(self._begin_request, slot)

    def _begin_request(self, slot: int, method: bytes, target: bytes) -> None:
        line = method + b" " + target
        base = self._base(slot)
        start = 8 * (base + _REQUEST)
        line = line[:_REQUEST_LEN - 1]
        self._map[start:start + _REQUEST_LEN] = line + bytes(_REQUEST_LEN - len(line))
        w = self._w
        w[base + _CHANGED] = time.monotonic_ns()
        w[base + _REQUESTS] += 1
        # Not atomic across children: the total is a statistic, and a lost
        # increment costs one count (the C core adds atomically).
        w[_H_REQUESTS] += 1

    def idle_count(self) -> int:
        return int(self._w[_H_IDLE])

    def held(self) -> int:
        return int(self._w[_H_HOLD])

    def set_hold(self, hold: bool) -> None:
        self._w[_H_HOLD] = int(hold)    # one 8-byte store: no lock

    def snapshot(self) -> Snapshot:
        w = self._lock_master()
        try:
            words = w.tolist()
            raw = bytes(self._map)
        finally:
            self._unlock(w)
        return Snapshot(
            idle_counter=words[_H_IDLE], min_spare=words[_H_MIN_SPARE],
            connections=words[_H_CONNS], repairs=words[_H_REPAIRS],
            requests=words[_H_REQUESTS], busy_ns_done=words[_H_BUSY_DONE],
            slots=tuple(self._slot(words, raw, i) for i in range(self.nslots)))

    @staticmethod
    def _slot(words: list[int], raw: bytes, i: int) -> Slot:
        base = _HEADER + _SLOT * i
        state = State(words[base + _STATE])
        request = b""
        if state == State.BUSY:
            start = 8 * (base + _REQUEST)
            request = raw[start:start + _REQUEST_LEN].split(b"\0", 1)[0]
        return Slot(i, words[base + _PID], state, words[base + _CONNS], words[base + _CHANGED],
                    bool(words[base + _RETIRE]), words[base + _REQUESTS],
                    words[base + _BUSY_SINCE], words[base + _BUSY_NS], request)

    def audit(self) -> int:
        w = self._lock_master()
        try:
            drift = self._recount(w)
            if drift:
                w[_H_REPAIRS] += 1
            return drift
        finally:
            self._unlock(w)

    def set_min_spare(self, value: int) -> None:
        w = self._lock_master()
        try:
            w[_H_MIN_SPARE] = value
            w[_H_WAKE] = 0
        finally:
            self._unlock(w)

    def hold_lock(self, updating: int = -1) -> None:
        # The dirty word already says "mid-update"; the snapshot locks.
        self._lock()

    def close(self) -> None:
        if self._lock_fd >= 0:
            self._w.release()
            self._map.close()
            os.close(self._lock_fd)
            os.close(self.memory_fd)
            self._lock_fd = -1

    def handoff(self) -> dict[str, Any]:
        os.set_inheritable(self.memory_fd, True)
        os.set_inheritable(self._lock_fd, True)
        return {"backend": self.name, "nslots": self.nslots, "memory_fd": self.memory_fd,
                "lock_fd": self._lock_fd}


BACKENDS: dict[str, type[Scoreboard]] = {"c": CScoreboard, "python": PyScoreboard}


def c_available() -> bool:
    return _lib is not None


def attach(info: dict[str, Any]) -> Scoreboard:
    """The board an earlier image of this master handed off (see handoff())."""
    if info["backend"] == "c":
        return CScoreboard(int(info["nslots"]), attach_fd=int(info["memory_fd"]))
    return PyScoreboard(int(info["nslots"]), attach_fd=int(info["memory_fd"]),
                        lock_fd=int(info["lock_fd"]))


def open_scoreboard(backend: str, nslots: int) -> Scoreboard:
    """Create the scoreboard the ``backend`` setting asks for."""
    if backend == "auto":
        backend = "c" if c_available() else "python"
        if backend == "python":
            log.warning("backend auto: the C core is not built; using the pure-Python "
                        "scoreboard (slower bookkeeping, same behaviour)")
        else:
            log.info("backend auto: using the C scoreboard core")
    try:
        return BACKENDS[backend](nslots)
    except OSError as exc:
        raise BackendError(f"cannot create the {backend} scoreboard: {exc.strerror}") from None
