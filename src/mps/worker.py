"""The child: boot, serve connections, leave.  It never returns to the master.

Per connection the child makes one scoreboard call, its acceptor
(``Scoreboard.acceptor``): the previous connection's idle transition, the
wait and accept4() with the GIL released, the busy transition and the
master's wake-up when idle children ran short.  On the C backend that is one
C call, and the socket and the peer's address are made in C too
(``mps._accept``; the socket from a checked template, without
``socket.socket.__init__`` and its getsockname()).  Nothing on that path logs
or allocates beyond the connection.

A handler may take the accept over (``direct``: mps.http's C connection
loop, on the C board): one C call then accepts the same way and serves the
connection itself where it can, or hands it back with its first bytes read.
The loop below keeps the rest -- recycling, signals, the drain -- either way.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import select
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from types import FrameType
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, cast

from . import logs
from .daemon import die_with_parent
from .errors import EXIT_BOOT, EXIT_OK, EXIT_RUNTIME
from .handlers import App
from .pool import Alone
from .config import Settings
from .scoreboard import Scoreboard
from .signals import handle as handle_signal
from .signals import reset_in_child, set_mask
from .sockets import set_nonblocking

log = logging.getLogger("mps")

#: A child that was told to stop by a master that has since died gets this
#: long to finish its connection (then SIGALRM's default action ends it).
ORPHAN_GRACE_S = 1
#: Longest a leaving child keeps serving what waits in the listen queue.
DRAIN_S = 1.0

_RETRY_ACCEPT = {errno.EAGAIN, errno.EINTR, errno.ECONNABORTED, errno.EPROTO,
                 errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                 errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.ETIMEDOUT}
_SHORT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass
class Child:
    """The master's record of one child; hooks receive it as ``worker``."""

    pid: int
    slot: int
    generation: int
    limit: int                  # connections before recycling; 0 = never
    born: float                 # time.monotonic()
    retiring: bool = False      # the master asked it to leave
    timed_out: bool = False
    kill_at: float = 0.0        # SIGKILL deadline, 0 = none


class Worker:
    """One child's life.  Override points: ``boot``, ``serve``, ``handle_error``."""

    def __init__(self, app: App, board: Scoreboard, listener: socket.socket,
                 child: Child, master_pid: int, identity: tuple[int, int] | None = None) -> None:
        self.app = app
        self.board = board
        self.listener = listener
        self.child = child
        self.master_pid = master_pid
        self.identity = identity    # (uid, gid) to switch to after fork, or None
        self.alive = True
        self.wake_r = -1        # the signal wake-up pipe (see boot)
        #: The handler's C connection loop (see boot), or None: accept() and
        #: the handler, per connection.
        self.serve_one: Callable[[bool], Any] | None = None
        #: The mask to restore once the child's own handlers are in place (the
        #: master blocks its signals across fork()); None: leave it as it is.
        self.signal_mask: set[int] | None = None

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def slot(self) -> int:
        return self.child.slot

    @property
    def generation(self) -> int:
        return self.child.generation

    def run(self) -> int:
        """Boot, serve, and return the exit code for ``os._exit``."""
        if not self.boot():
            return EXIT_BOOT
        if self.board.idle(self.child.slot):    # retired before it ever served
            return EXIT_OK
        return self.serve()

    def boot(self) -> bool:
        reset_in_child()
        # (signals.handle: no enum built per call, fewer master pages copied)
        handle_signal(signal.SIGTERM, self._on_term)
        handle_signal(signal.SIGABRT, self._on_timeout)
        # The master's poke (see Arbiter.keep_nonblocking): only to interrupt
        # an accept() caught on a listener another master made blocking.
        handle_signal(signal.SIGWINCH, self._on_poke)
        if self.signal_mask is not None:
            set_mask(self.signal_mask)
        logs.slot_filter.slot = f"slot {self.child.slot}"
        self.make_waiter()
        if self.identity is not None:
            drop_privileges(*self.identity)
        # After any setuid(): the kernel clears the parent-death signal when a
        # process changes its credentials.
        die_with_parent(signal.SIGTERM)
        if os.getppid() != self.master_pid:     # the master died before prctl()
            return False
        try:
            self.app.call_hook("post_fork", self)
        except Exception:
            log.exception("post_fork hook failed; this child cannot boot")
            return False
        bind = getattr(self.app.handler, "bind", None)
        if bind is not None:    # a protocol layer that holds connections (HTTP keep-alive)
            bind(ChildPool(self))
        direct = getattr(self.app.handler, "direct", None)
        entry = getattr(self.board, "accept_entry", None)
        if direct is not None and entry is not None:
            # The handler accepts and serves in C where it can (mps.http):
            # on the C board, with the accept() the loop below would make.
            self.serve_one = direct(entry(self.child.slot, self.listener), self.board)
        return True

    def serve(self) -> int:
        # Locals: this loop runs once per connection.
        board, listener, slot = self.board, self.listener, self.child.slot
        accept, handle = board.acceptor(slot, listener), self.app.handler
        one = self.serve_one
        # With the C loop: the C board's adopt(fd), and the handler as one that
        # takes a connection over with its first bytes read.
        adopt = cast(Callable[[int], tuple[socket.socket, Any]], getattr(board, "adopt", None))
        resume = cast(Callable[[socket.socket, Any, int], object], handle)
        left = self.child.limit or -1      # connections before recycling; -1 = never
        done = False        # a connection finished: the next accept marks us idle first
        while self.alive:
            conn: socket.socket | None = None
            preread = 0
            try:
                if one is None:
                    conn, addr = accept(done)
                else:
                    try:
                        # accept(), and the connection served in C where it can be
                        got = one(done)
                    except Exception:   # accepted, then failed while served (and closed)
                        got = None
                        self.handle_error("a connection served in C")
                    if got.__class__ is int:
                        raise OSError(-got, os.strerror(-got))      # as accept() would
                    if got is not None:
                        fd, preread = got       # handed over, its first bytes read
                        try:
                            conn, addr = adopt(fd)
                        except Exception:   # (adopt makes the socket last: fd is ours)
                            os.close(fd)
                            self.handle_error("a connection handed over from C")
            except OSError as exc:
                done = False    # the idle transition happened (or failed) in the call
                if exc.errno == errno.ESHUTDOWN:
                    break       # retired by the master; it counts the exit
                if not self.accept_failed(exc):
                    break
                continue
            done = True
            if conn is not None:
                try:
                    if preread:
                        resume(conn, addr, preread)
                    else:
                        handle(conn, addr)
                except Exception:
                    self.handle_error(addr)
                finally:
                    conn.close()    # always: the handler need not
            left -= 1
            if not left:
                if board.held():
                    # An upgrade under way: this generation serves until it is
                    # retired (the new one may take long to boot); ask again
                    # after the next connection.
                    left = 1
                    continue
                log.info("served %d connections (max_requests); recycling", self.child.limit)
                break
        if not self.alive:
            self.drain()
        board.done(slot)
        return EXIT_OK

    def drain(self) -> None:
        """Told to stop (SIGTERM): first serve what already waits in the listen
        queue, so a graceful stop never resets an accepted-by-the-kernel
        connection.  The master stops new connections entering the queue; the
        drain is bounded anyway (DRAIN_S), so a retired child under overload
        still leaves."""
        deadline = time.monotonic() + DRAIN_S
        set_nonblocking(self.listener, True)    # (see accept_failed)
        while time.monotonic() < deadline:
            try:
                conn, addr = self.board.accept(self.child.slot, self.listener, wait=False)
            except OSError:
                return          # the queue is empty (or another child took it)
            try:        # the same per-connection policy as serve(), kept inline there
                self.app.handler(conn, addr)
            except Exception:
                self.handle_error(addr)
            finally:
                conn.close()

    def accept_failed(self, exc: OSError) -> bool:
        """An accept() error: True to go on accepting, False to leave."""
        if exc.errno in _RETRY_ACCEPT:
            if exc.errno == errno.EINTR:
                self.drain_wakeups()    # the signal's handler has run: alive is current
                # A shared listener may have been handed back blocking by
                # another master leaving: never sleep in a blocking accept.
                set_nonblocking(self.listener, True)
            if os.getppid() != self.master_pid:
                self.alive = False
            return True
        if exc.errno in _SHORT_OF_RESOURCES:
            log.error("accept failed: %s; retrying in 0.1 s", exc.strerror)
            time.sleep(0.1)
            return True
        log.error("accept failed: %s; this child exits", exc.strerror or exc)
        return False

    def make_waiter(self) -> None:
        """Between connections the child sleeps in epoll: the listener (one
        idle child woken per connection) and a pipe every handled signal
        writes a byte to -- a SIGTERM that lands before the wait is never
        lost, and nothing wakes an idle child for nothing."""
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        waiter = select.epoll()
        waiter.register(self.listener, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        waiter.register(self.wake_r, select.EPOLLIN)
        self.board.set_waiter(waiter)

    def drain_wakeups(self) -> None:
        if self.wake_r < 0:
            return      # --single: no pipe, the signal interrupted accept() itself
        try:
            while os.read(self.wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def handle_error(self, addr: object) -> None:
        """A handler raised: log where, and go on serving.

        The exception's message may carry network input, so it is escaped and
        bounded (logs.printable); the stack is code locations only.
        """
        exc = sys.exc_info()[1]
        stack = "".join(traceback.format_tb(exc.__traceback__ if exc else None))
        log.error("handler failed on a connection from %s: %s: %s\nTraceback (most recent "
                  "call last):\n%s", logs.printable(addr), type(exc).__name__,
                  logs.printable(str(exc)), stack.rstrip())

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        # Graceful: finish the current connection, then leave.
        self.alive = False
        if os.getppid() != self.master_pid:
            signal.alarm(ORPHAN_GRACE_S)    # no master will ever SIGKILL us

    def _on_poke(self, signum: int, frame: FrameType | None) -> None:
        pass    # its byte in the wake-up pipe (and EINTR in C) is the point

    def _on_timeout(self, signum: int, frame: FrameType | None) -> None:
        # The master's `timeout` expired on our connection.  We are being
        # killed; say where the handler was stuck, then go.
        where = "".join(traceback.format_stack(frame, limit=8)) if frame else ""
        log.error("connection exceeded timeout; exiting. Handler was at:\n%s", where)
        os._exit(EXIT_RUNTIME)


class ChildPool:
    """What a protocol layer may ask of the pool (:class:`mps.pool.PoolView`),
    answered for one child: is it leaving, and does a connection wait for a
    child while none is idle?"""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.board = worker.board
        self.slot = worker.child.slot
        #: PoolView.begin_request, bound to this child's slot: one C call.
        self.begin_request = worker.board.request_marker(self.slot)
        # SIGTERM writes a byte to the worker's wake-up pipe, so a handler
        # parked on an idle connection (polling these fds beside it) wakes at
        # once to leave.
        self.wake_r = worker.wake_r
        self.listener = worker.listener.fileno()
        self.fds = (self.listener, self.wake_r)
        self.watch = select.poll()
        for fd in self.fds:
            self.watch.register(fd, select.POLLIN)

    def leaving(self) -> bool:
        # Asked before every response: an attribute read, no system call
        # (SIGTERM's handler clears it; the wake-up byte is drained in wanted()).
        return not self.worker.alive

    def wanted(self) -> bool:
        # One poll for both fds: a connection in the listen queue, and a
        # wake-up byte to drain (left there, it would keep a parked handler's
        # poll of self.fds returning at once).
        queued = False
        for fd, _ in self.watch.poll(0):
            if fd == self.listener:
                queued = True
            else:
                self.worker.drain_wakeups()
        # While a child is idle, it takes the waiting connection itself.
        return queued and self.board.idle_count() <= 0



def drop_privileges(uid: int, gid: int) -> None:
    """Become the --user/--group identity (the master, still root, bound first)."""
    if os.getuid() == uid and os.getgid() == gid:
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def child_main(app: App, board: Scoreboard, listener: socket.socket, child: Child,
               master_pid: int, close_fds: tuple[int, ...],
               identity: tuple[int, int] | None = None,
               signal_mask: Iterable[int] = ()) -> NoReturn:
    """Entry point right after fork(), in the child.  This must never return."""
    code = EXIT_RUNTIME
    try:
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        worker = Worker(app, board, listener, child, master_pid, identity)
        worker.signal_mask = set(signal_mask)
        code = worker.run()
    except BaseException as exc:  # noqa: BLE001 - log anything, then leave
        try:
            # SystemExit and friends from a handler may carry network input.
            log.error("child failed: %s: %s\n%s", type(exc).__name__, logs.printable(str(exc)),
                      "".join(traceback.format_tb(exc.__traceback__)).rstrip())
        finally:
            code = EXIT_RUNTIME
    finally:
        os._exit(code)


def run_single(settings: Settings, app: App) -> int:
    """Debug mode (``--single``): serve in this process, no master, no fork."""
    from . import sockets
    from .scoreboard import open_scoreboard

    listener = sockets.listen(sockets.parse_bind(settings.bind), settings.backlog)
    board = open_scoreboard(settings.backend, 1)
    slot = board.reserve()
    board.started(slot, os.getpid())
    child = Child(pid=os.getpid(), slot=slot, generation=0, limit=0, born=time.monotonic())
    listener.setblocking(False)     # as the master sets it for its children
    worker = Worker(app, board, listener, child, master_pid=os.getppid())
    signal.signal(signal.SIGTERM, worker._on_term)
    # Ctrl-C (or kill -INT) ends it as it ends a pool, even when it was started
    # with SIGINT ignored (in the background of a script), where Python would
    # have left it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    worker.make_waiter()
    log.info("single-process debug mode: listening at %s in pid %d",
             sockets.describe(listener), os.getpid())
    try:
        app.call_hook("on_starting")
        app.call_hook("post_fork", worker)
        bind = getattr(app.handler, "bind", None)
        if bind is not None:
            bind(Alone())       # nobody else to wait for a child
        board.idle(slot)
        return worker.serve()
    finally:
        app.call_hook("on_exit")
        listener.close()
        board.close()
