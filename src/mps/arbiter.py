"""The master: binds, forks the pool, and keeps it the right size.

The loop is a few named steps (gunicorn's arbiter is the model)::

    wait()            sleep until a signal, a child's wake-up byte, a status
                      client or the next deadline
    handle_signals()  dispatch recorded signals to handle_<name>()
    reap()            waitpid() every exited child and free its slot
    audit()           re-arm the children's wake-up, then snapshot the board
    murder()          kill children stuck on one connection past `timeout`
    maintain()        fork the idle deficit, retire surplus; while a graceful
                      stop drains, notice when the queue is empty

A graceful stop (TERM) has two phases: "draining" -- the listener refuses
new handshakes while the pool goes on serving everything the kernel already
accepted -- then "graceful", once the queue is empty: children are retired,
finish their connection, and the master leaves.

The master owns slot life and death (Apache's rule): it reserves a slot
before fork(), rolls it back if fork() fails, and frees it when it reaps the
pid, whatever the child managed to write.
"""
from __future__ import annotations

import errno
import gc
import math
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, fields
from typing import NoReturn

from . import daemon, logs, metrics, signals, sockets, status
from .forking import Forker
from .notify import Notifier
from .upgrade import Check, Handoff, OldGeneration, Progress, keep_board_fds, reexec
from .config import Settings
from .errors import EXIT_BOOT, EXIT_OK, BootError
from .handlers import App
from .scoreboard import Scoreboard, Snapshot, State, open_scoreboard
from .signals import MASTER_SIGNALS, RECORDED, SignalQueue
from .worker import Child, child_main

log = logging.getLogger("mps")

#: Idle children must stay above max_spare this long before any is retired.
SURPLUS_GRACE_S = 1.0
#: Children that die before booting this many times in a row stop the server.
BOOT_FAILURE_LIMIT = 5
#: Longest back-off between spawns after repeated boot failures or fork errors.
MAX_BACKOFF_S = 5.0
#: Grace between SIGABRT (timeout, fast stop) and SIGKILL.
KILL_GRACE_S = 1.0
#: A child still STARTING (its post_fork hook hangs) after this long (or
#: after `timeout`, when that is set) is killed and counted as a boot
#: failure; after STALE_START_S it no longer counts as a spare, so the master
#: forks others meanwhile.
BOOT_TIMEOUT_S = 30.0
STALE_START_S = 5.0
#: A booted child that dies this young without serving is a crash loop too:
#: the master backs off before replacing it.
YOUNG_S = 1.0
#: The master's loop runs at least this often when `timeout` is set (it
#: watches busy children's clocks), else at least every IDLE_TICK_S; signals,
#: children's wake-ups and deadlines wake it sooner.
TICK_S = 1.0
IDLE_TICK_S = 5.0
#: How often a draining master looks at its listen queue.
DRAIN_POLL_S = 0.02
#: How often a master not yet ready (start, upgrade) looks for idle children.
READY_POLL_S = 0.02
#: Longest a status client may take to read the document before the master
#: resets it (it gets the whole document or an error, never a part).
STATUS_SEND_S = 5.0
#: Status clients served at once; more wait in the status socket's backlog.
STATUS_CLIENTS = 64
#: How often systemd's STATUS= line is refreshed.
NOTIFY_STATUS_S = 5.0


@dataclass
class Totals:
    """The master's counters for the status document (SPEC §7); connections
    and counter repairs are counted in the scoreboard itself."""

    spawned: int = 0
    reaped: int = 0
    crashed: int = 0
    recycled: int = 0
    retired: int = 0
    timed_out: int = 0
    max_children_reached: int = 0
    lock_holders_killed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def jitter(most: int) -> int:
    """0 to ``most``, to spread the children's recycling.  From os.urandom:
    the master imports no ``random``, whose reseed at fork would run -- and
    copy pages -- in every child."""
    return int.from_bytes(os.urandom(4), "little") % (most + 1)


class Arbiter:
    """Runs the pool until stopped; :meth:`run` returns the exit status."""

    def __init__(self, settings: Settings, app: App) -> None:
        self.settings = settings
        self.app = app
        self.min_spare = settings.min_spare
        self.max_spare = settings.max_spare
        self.children: dict[int, Child] = {}
        self.totals = Totals()
        self.generation = 0
        self.stopping = ""              # "", "delaying", "draining", "graceful" or "fast"
        self.delay_until = 0.0          # drain_delay: not ready, still serving, until then
        self.stop_deadline = 0.0
        self.spawn_after = 0.0          # back-off: no fork before this time
        self.boot_failures = 0          # consecutive children dead before booting
        self.fork_failures = 0
        self.surplus_since = 0.0
        self.saturated = False
        self.warned_saturation = False
        self.started_at = time.monotonic()
        self.signals = SignalQueue()
        self.board: Scoreboard | None = None
        self.listener: socket.socket | None = None
        self.status_sock: socket.socket | None = None
        self.selector: selectors.BaseSelector | None = None
        self.wake_r = self.wake_w = -1
        self.pid = os.getpid()
        self.started = False            # start() finished: on_exit and "exiting" are due
        self.owned_paths: list[str] = []    # socket files we created (not inherited)
        self.identity: tuple[int, int] | None = None
        #: fd://N: shared with its owner; made non-blocking while we serve,
        #: handed back blocking as listeners are handed over.
        self.inherited = False
        self.status_out: dict[socket.socket, tuple[memoryview, float]] = {}
        self.progress = Progress()              # upgrades (USR2), for reload and status
        self.check: Check | None = None         # the new release's check, while it runs
        self.old: OldGeneration | None = None   # children of the image before an upgrade
        self.notifier = Notifier()
        self.metrics_sock: socket.socket | None = None
        self.metrics: metrics.MetricsServer | None = None
        self.ready_sent = False
        self.notify_next = 0.0
        self.rate_mark = (time.monotonic(), 0)  # (when, connections) for STATUS= rates
        self.last_boot_failure = 0.0
        #: This image is an upgrade whose children cannot boot (see
        #: upgrade_cannot_boot); the old generation serves, held.
        self.boot_stuck = False
        self.forker = Forker({})    # every hook runs until start() finds the lists

    # ----------------------------------------------------------- life cycle

    def run(self) -> int:
        try:
            self.start()
            while True:
                self.handle_signals()
                self.reap()
                if self.stopping in ("graceful", "fast") and not self.children \
                        and not (self.old and self.old.children):
                    return EXIT_OK
                self.keep_nonblocking()
                snap = self.audit()
                self.murder(snap)
                self.maintain(snap)
                self.wait()
        except BootError as exc:
            log.error("%s", exc)
            self.stop_now()
            self.wait_for_children()
            return EXIT_BOOT
        finally:
            self.cleanup()

    def start(self) -> None:
        s = self.settings
        self.identity = s.identity()     # resolved once, never in a child
        handoff = Handoff.take()
        if handoff is not None:
            self.adopt(handoff)
        else:
            self.bind()
        assert self.listener is not None
        self.board = open_scoreboard(s.backend, s.max_children)
        self.board.on_stuck = self.lock_stuck
        self.board.set_min_spare(self.wake_below())
        if s.daemon and handoff is None:
            if not s.log_file:
                log.warning("daemon without log_file: log lines are discarded")
            daemon.daemonize()
            self.pid = os.getpid()
        if s.pid_file:
            daemon.write_pid_file(s.pid_file)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.board.wake_fd = self.wake_w
        self.signals.install(self.wake_w)
        # An upgrade's exec kept every recorded signal blocked until now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RECORDED)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        if self.status_sock is not None:
            self.selector.register(self.status_sock, selectors.EVENT_READ)
        if self.metrics_sock is not None:
            self.metrics = metrics.MetricsServer(self.metrics_sock, self.selector,
                                                 self.render_metrics, self.is_ready)
            where = metrics.app_metrics_dir()   # imports prometheus_client now, not mid-scrape
            log.info("metrics at http://%s/metrics%s", sockets.describe(self.metrics_sock),
                     f" (with the app's, from {where})" if where else "")
        log.info("mps master %d listening at %s (backend %s, %d %s)",
                 self.pid, sockets.describe(self.listener), self.board.name, s.start_servers,
                 "child" if s.start_servers == 1 else "children")
        self.app.call_hook("on_starting")
        self.started = True
        self.board.prepare_accept(self.listener)    # once here, not in every child
        self.warm_up()
        self.forker = Forker.find()     # before gc.freeze(), which hides what it looks for
        gc.freeze()     # keep the master's objects out of the children's GC: less copy-on-write
        self.spawn_many(s.start_servers)

    def warm_up(self) -> None:
        """The handler's own warm-up (WSGI's: see WSGIHandler.mps_warm_up), once,
        before the first fork; a failure costs only the saving."""
        warm = getattr(self.app.handler, "mps_warm_up", None)
        if warm is None:
            return
        try:
            warm()
        except Exception as exc:    # (its requests are ours: a bug, not the app's)
            log.warning("the HTTP warm-up failed (%s); serving without it", exc)

    def bind(self) -> None:
        """The listening socket: systemd's (socket activation), or bind's."""
        s = self.settings
        address = sockets.parse_bind(s.bind)
        fds, names = sockets.activated(os.environ)
        if fds:
            address = sockets.Address(-1, fd=fds[0])
            log.info("socket activation: serving the socket systemd passed (fd %d%s)",
                     fds[0], f", {names[0]!r}" if names[0] else "")
            if len(fds) > 1:
                log.warning("socket activation passed %d sockets; serving the first only",
                            len(fds))
        self.listener = sockets.listen(address, s.backlog, s.reuse_port)
        if address.fd >= 0:     # shared with its owner: hand it back as it came
            self.inherited = True
        if address.family == socket.AF_UNIX:
            self.owned_paths.append(address.path)
        # Children sleep in epoll between connections (EPOLLEXCLUSIVE: one
        # woken per connection) and take it with a non-blocking accept.
        self.listener.setblocking(False)
        wait = getattr(self.app.handler, "client_speaks_first", 0.0)
        if wait and not self.inherited and \
                self.listener.family in (socket.AF_INET, socket.AF_INET6):
            # The client speaks first (HTTP, PROXY): the kernel holds a new
            # connection until its first bytes arrive, so a child is woken
            # with a request to read, and a client that sends nothing waits
            # in the kernel, not in a child.
            self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                                     max(1, math.ceil(wait)))
        if s.status_socket:
            self.status_sock = sockets.listen_unix_private(s.status_socket)
            self.owned_paths.append(s.status_socket)
            self.status_sock.setblocking(False)
        if s.metrics_bind:
            self.metrics_sock = sockets.listen(sockets.parse_bind(s.metrics_bind), 64)

    def adopt(self, handoff: Handoff) -> None:
        """The new image after an upgrade's exec: the old image's sockets,
        and its children on their own board, to be retired once ours serve."""
        self.listener = socket.socket(fileno=handoff.listener_fd)
        self.listener.set_inheritable(False)
        self.inherited = handoff.inherited
        self.listener.setblocking(False)
        if handoff.status_fd >= 0:
            self.status_sock = socket.socket(fileno=handoff.status_fd)
            self.status_sock.set_inheritable(False)
            self.status_sock.setblocking(False)
        if handoff.metrics_fd >= 0:
            self.metrics_sock = socket.socket(fileno=handoff.metrics_fd)
            self.metrics_sock.set_inheritable(False)
        self.owned_paths = list(handoff.owned_paths)
        self.old = OldGeneration(handoff)
        if self.old.board is not None:
            self.old.board.on_stuck = self.lock_stuck   # its lock has a deadline too
        keep_board_fds(handoff.board, False)
        self.generation = handoff.generation + 1
        self.progress = Progress(**handoff.progress)
        self.progress.state = "starting"
        self.progress.loaded_at = time.time()
        for name, value in handoff.totals.items():
            setattr(self.totals, name, value)
        self.started_at = time.monotonic() - (time.time() - handoff.started_at_wall)
        if self.settings.bind != handoff.bind_setting:
            log.warning("bind changed to %s in the new release; an upgrade keeps the listening "
                        "socket: restart the service to move it", self.settings.bind)
        log.info("upgrade: new image of master %d, generation %d; adopted %d children of "
                 "generation %s", self.pid, self.generation, len(self.old.children),
                 ", ".join(str(g) for g in sorted({g for _, _, g in handoff.children})) or "-")

    def cleanup(self) -> None:
        if self.pid != os.getpid():
            return      # a child that got here by mistake must not tear down
        if self.started:
            try:
                self.app.call_hook("on_exit")
            except Exception:
                log.exception("on_exit hook failed")
        if self.inherited and self.listener is not None:
            try:
                sockets.set_nonblocking(self.listener, False)   # hand it back as we got it
            except OSError:
                pass    # closed under us: nothing left to hand back
        for conn in list(self.status_out):
            conn.close()
        if self.metrics is not None:
            self.metrics.close()
        for sock in (self.status_sock, self.listener, self.metrics_sock):
            if sock is not None:
                sock.close()
        for path in self.owned_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.settings.pid_file:
            daemon.remove_pid_file(self.settings.pid_file)
        if self.board is not None:
            self.board.close()
        if self.old is not None:
            self.old.close()
        if self.check is not None:
            self.check.kill()       # never left behind (an import that hangs)
            self.check.close()
        self.notifier.close()
        if self.wake_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self.wake_r)
            os.close(self.wake_w)
        if self.started:
            log.info("mps master %d exiting", self.pid)

    # ----------------------------------------------------------- loop steps

    def wait(self) -> None:
        assert self.selector is not None
        for key, events in self.selector.select(self.deadlines()):
            if key.fileobj is self.status_sock:
                self.answer_status()
            elif key.fileobj in self.status_out:
                self.send_status(key.fileobj)
            elif self.metrics is not None and key.data is self.metrics:
                self.metrics.handle(key.fileobj, events)
            else:
                self.drain_wake_pipe()
        self.expire_status_clients()
        if self.metrics is not None:
            self.metrics.expire(time.monotonic())
        self.notify_systemd()

    def deadlines(self) -> float:
        """Seconds until the next thing the loop must do (at most TICK_S, or
        IDLE_TICK_S when no `timeout` is to be watched: a pass costs O(slots),
        and an idle pool must cost nearly nothing)."""
        now = time.monotonic()
        # With min_spare 0 nobody wakes the master for a connection queued
        # behind busy children: it looks every TICK_S.
        watch = self.settings.timeout > 0 or self.min_spare == 0
        due = [TICK_S if watch else IDLE_TICK_S]
        if self.spawn_after > now:
            due.append(self.spawn_after - now)
        if self.surplus_since:
            due.append(self.surplus_since + SURPLUS_GRACE_S - now)
        if self.stopping in ("draining", "graceful") and self.stop_deadline > now:
            due.append(self.stop_deadline - now)
        if self.stopping == "draining":
            due.append(DRAIN_POLL_S)
        if not self.ready_sent and not self.stopping and self.progress.state != "failed":
            # A child going idle wakes nobody: without this, READY=1 (and an
            # upgrade's retirement of the old children) waited for the 1 s tick.
            # (An upgrade whose children cannot boot retries every few
            # seconds: the tick is soon enough, and polls nothing for nothing.)
            due.append(READY_POLL_S)
        if self.stopping == "delaying":
            due.append(self.delay_until - now)
        if self.status_out:
            due.append(min(d for _, d in self.status_out.values()) - now)
        if self.notifier.enabled:
            due.append(self.notifier.watchdog_due(now))
            due.append(self.notify_next - now)
        if self.check is not None:
            due.append(self.check.deadline - now)
        scrape_due = self.metrics.next_deadline() if self.metrics is not None else None
        if scrape_due:
            due.append(scrape_due - now)
        if self.old is not None:
            due.append(self.old.next_deadline() - now)
        due.extend(c.kill_at - now for c in self.children.values() if c.kill_at > now)
        # Past deadlines were acted on in the last pass: never spin on them.
        return max(0.001, min(due))

    def drain_wake_pipe(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        for sig in self.signals.drain():
            if sig in MASTER_SIGNALS:
                getattr(self, "handle_" + MASTER_SIGNALS[sig])()
            else:
                log.warning("%s received; ignored (mps gives it no meaning)",
                            signals.name(sig))

    def reap(self) -> None:
        exited = []
        check_code: int | None = None
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(wait_status)
            if self.check is not None and pid == self.check.pid:
                check_code = code   # acted on after this reap: an exec must not
                continue            # discard the exits collected below
            metrics.mark_dead(pid)      # the app's prometheus_client files, if any
            if self.old is not None and self.old.reaped(pid):
                self.totals.reaped += 1
                continue
            child = self.children.pop(pid, None)
            if child is not None:       # else not ours (a hook's subprocess)
                exited.append((child, code))
        if exited:
            assert self.board is not None
            slots = self.board.snapshot().slots     # what each child served, before release
            for child, code in exited:
                was = self.board.release(child.slot)
                self.totals.reaped += 1
                self.account_exit(child, was, code, slots[child.slot].connections)
                try:
                    self.app.call_hook("child_exit", child)
                except Exception:
                    log.exception("child_exit hook failed")
        if check_code is not None:
            self.check_done(check_code)

    def keep_nonblocking(self) -> None:
        """A shared listener may be handed back blocking to its owner by
        another mps master that leaves before us: make it ours again (a
        blocking accept would keep an idle child from its signals)."""
        assert self.listener is not None
        if self.inherited and not self.stopping and \
                not sockets.is_nonblocking(self.listener):
            sockets.set_nonblocking(self.listener, True)
            # A child that entered accept() meanwhile sleeps in a blocking
            # one, deaf to its wake-up pipe: a handled signal gets it out.
            for child in self.children.values():
                self.kill(child, signal.SIGWINCH)

    def audit(self) -> Snapshot:
        """Check idle_counter == idle slots (repairing drift); the pass's snapshot.

        The children's wake-up is re-armed *before* the snapshot: a busy
        transition after the re-arm writes a wake byte (another pass), one
        before it is in the snapshot, so none falls between the two unseen.
        It is re-armed only when the master could act on a wake-up (room to
        fork, no back-off): a saturated pool must not cost a pass per
        connection."""
        assert self.board is not None
        if self.can_fork():
            self.board.set_min_spare(self.wake_below())
        drift = self.board.audit()
        if drift:
            log.warning("idle counter drifted by %d from the slots; repaired", drift)
        return self.board.snapshot()

    def wake_below(self) -> int:
        """The idle count under which a child going busy wakes the master: the
        live min_spare, but at least 1, so that with min_spare 0 the last idle
        child going busy still brings a pass (a queued connection then gets a
        child at once, not at the next tick)."""
        return max(1, self.min_spare)

    def can_fork(self) -> bool:
        return (len(self.children) < self.settings.max_children
                and time.monotonic() >= self.spawn_after)

    def murder(self, snap: Snapshot) -> None:
        """Kill children stuck past `timeout` or in boot, and those past a kill deadline."""
        now = time.monotonic()
        self.kill_stuck(snap, now)
        if self.stopping in ("draining", "graceful") and now >= self.stop_deadline:
            busy = [c for c in self.children.values() if not c.kill_at]
            if busy:
                log.warning("graceful_timeout (%gs) expired; killing %d children",
                            self.settings.graceful_timeout, len(busy))
            for child in busy:
                child.kill_at = now
        for child in self.children.values():
            if child.kill_at and now >= child.kill_at:
                self.kill(child, signal.SIGKILL)
                child.kill_at = now + 3600   # once; the reap follows
        if self.old is not None:
            self.old.murder(now)
        if self.check is not None and now >= self.check.deadline:
            log.error("USR2: the new release's check has not finished in time; killing it")
            self.check.kill()
            self.check.deadline = now + 3600

    def kill_stuck(self, snap: Snapshot, now: float) -> None:
        timeout = self.settings.timeout
        boot_timeout = timeout if timeout > 0 else BOOT_TIMEOUT_S
        now_ns = time.monotonic_ns()
        by_slot = self.children_by_slot()
        for slot in snap.slots:
            child = by_slot.get(slot.index)
            if child is None or child.timed_out or child.kill_at:
                continue
            age = slot.age_s(now_ns)
            if slot.state == State.STARTING and age >= boot_timeout:
                log.error("child %d (slot %d) has not booted in %gs (post_fork hangs?); "
                          "killing it", child.pid, child.slot, boot_timeout)
                child.kill_at = now
                continue
            if timeout <= 0 or slot.state not in (State.BUSY, State.EXITING) or age < timeout:
                continue
            log.warning("child %d (slot %d) exceeded timeout (%gs) on one connection; killing it",
                        child.pid, child.slot, timeout)
            child.timed_out = True
            child.kill_at = now + KILL_GRACE_S
            self.totals.timed_out += 1
            self.kill(child, signal.SIGABRT)

    def maintain(self, snap: Snapshot) -> None:
        if self.stopping == "delaying" and time.monotonic() >= self.delay_until:
            self.graceful_stop()
        if self.stopping not in ("", "delaying", "draining"):
            return
        self.note_boots(snap)
        self.spawn_deficit(snap)
        self.retire_surplus(snap)
        if self.stopping == "draining" and self.drained():
            self.retire_all()
        if not self.stopping:
            self.note_ready(snap)
        if self.old is not None and not self.old.children:
            log.info("upgrade: the last child of the old generation has left")
            self.old.close()
            self.old = None

    def render_metrics(self) -> bytes:
        assert self.listener is not None
        return metrics.exposition(status.document(self), ready=self.is_ready(),
                                  queue_depth=sockets.queue_depth(self.listener),
                                  queue_limit=self.settings.backlog)

    def is_ready(self) -> bool:
        """/ready: the pool serves and no stop (or drain delay) has begun.  An
        upgrade whose new children cannot boot still serves: on the old
        generation, held for it."""
        serves_on_old = self.old is not None and not self.old.retired and bool(self.old.children)
        return (self.ready_sent or serves_on_old) and not self.stopping

    def note_ready(self, snap: Snapshot) -> None:
        """The pool serves: start_servers children idle (READY=1).  After an
        upgrade that is when the old generation is retired."""
        if self.ready_sent:
            return
        want = max(1, min(self.settings.start_servers, self.settings.max_children))
        if snap.count(State.IDLE) < want:
            return
        if self.check is not None and self.old is not None and not self.old.retired:
            return      # a release is being checked to replace this one: it decides
        self.ready_sent = True
        if self.progress.state == "starting" or self.old is not None and not self.old.retired:
            # The new image of an upgrade (also one whose boot failed for a
            # while, then came through).
            # Done even when no old child is left to retire: under load they
            # may all have recycled themselves (max_requests) during the exec.
            self.progress.state = "done"
            leaving = 0
            if self.old is not None and not self.old.retired:
                self.old.retire_all(self.settings.graceful_timeout)
                leaving = len(self.old.children)
            log.info("upgrade: generation %d serves; retiring %d children of the old code",
                     self.generation, leaving)
        self.notifier.ready(self.status_line(snap))

    def note_boots(self, snap: Snapshot) -> None:
        """A child born after the last boot failure has booted: the streak is over."""
        if not self.boot_failures:
            return
        booted = {s.index for s in snap.slots if s.state in (State.IDLE, State.BUSY)}
        if any(c.slot in booted and c.born > self.last_boot_failure
               for c in self.children.values()):
            self.boot_failures = 0

    # ----------------------------------------------------------- pool policy

    def spawn_deficit(self, snap: Snapshot) -> None:
        now_ns = time.monotonic_ns()
        spare = snap.count(State.IDLE) + sum(
            1 for s in snap.slots if s.state == State.STARTING and s.age_s(now_ns) < STALE_START_S)
        room = self.settings.max_children - len(self.children)
        want = self.min_spare - spare
        if want <= 0 and spare > 0:
            self.saturated = False
            return
        assert self.listener is not None
        # A burst shows in the listen queue before children report it: size
        # the fork batch from the queue, not one deficit at a time.
        queued = sockets.queue_depth(self.listener)
        if want > 0:
            want += queued
        elif queued or sockets.readable(self.listener) or not self.serving_children():
            # min_spare 0 (TTOU can get there): the pool still never falls to
            # zero children, and a queued connection always gets one.
            want = max(1, queued)
        else:
            self.saturated = False
            return
        if want > room and not any(c.retiring for c in self.children.values()):
            self.note_saturation()
        if self.can_fork():
            self.spawn_many(min(want, room))

    def serving_children(self) -> int:
        return sum(1 for c in self.children.values() if not c.retiring)

    def note_saturation(self) -> None:
        if self.saturated:
            return
        self.saturated = True
        self.totals.max_children_reached += 1
        if not self.warned_saturation:
            self.warned_saturation = True
            log.warning("reached max_children (%d); consider raising it",
                        self.settings.max_children)

    def retire_surplus(self, snap: Snapshot) -> None:
        idle = [s for s in snap.slots if s.state == State.IDLE]
        if len(idle) <= self.max_spare:
            self.surplus_since = 0.0
            return
        now = time.monotonic()
        if not self.surplus_since:
            self.surplus_since = now
            return
        if now - self.surplus_since < SURPLUS_GRACE_S:
            return
        self.surplus_since = 0.0
        by_slot = self.children_by_slot()
        surplus = len(idle) - self.max_spare
        log.info("%d idle children exceed max_spare (%d); retiring %d",
                 len(idle), self.max_spare, surplus)
        for slot in reversed(idle[-surplus:]):   # highest slots first, like Apache
            child = by_slot.get(slot.index)
            if child is not None:
                self.retire(child)

    def spawn_many(self, count: int) -> None:
        """Fork up to ``count`` children, each into a slot reserved first."""
        assert self.board is not None
        batch = self.reserve(count)
        if not batch:
            return
        # Between two forks the master does as little as it can: each page
        # it writes there is one more private page in every child forked
        # before.  So the slots, the children's records and the signal mask
        # are made before the batch, the bookkeeping after it.
        close_fds = self.child_close_fds()
        pids: list[int] = []
        # Signals stay blocked across fork() so that none reaches a child
        # while it still has the master's handlers; it unblocks after its own.
        # (Blocked for the batch: the master's loop, which acts on them, is
        # not running meanwhile anyway.)
        old_mask = signals.block(RECORDED)
        try:
            with self.forker.quiet():
                for child in batch:
                    pid = self.forker.fork()
                    if pid == 0:
                        self.become(child, close_fds, old_mask)
                    pids.append(pid)
        except OSError as exc:
            if pids:
                self.fork_failures = 0  # the streak ended with the batch's first fork
            self.fork_failed(exc)
        else:
            self.fork_failures = 0
        finally:
            signals.set_mask(old_mask)
            self.enlist(batch, pids)

    def reserve(self, count: int) -> list[Child]:
        """Up to ``count`` slots reserved (STARTING), with the records of the
        children to fork into them."""
        assert self.board is not None
        s = self.settings
        now = time.monotonic()
        batch = []
        for _ in range(count):
            slot = self.board.reserve()
            if slot < 0:
                break
            limit = s.max_requests + jitter(s.max_requests_jitter) if s.max_requests else 0
            batch.append(Child(pid=0, slot=slot, generation=self.generation, limit=limit,
                               born=now))
        return batch

    def become(self, child: Child, close_fds: tuple[int, ...], old_mask: set[int]) -> NoReturn:
        """In a new child: its life, then its exit."""
        assert self.board is not None and self.listener is not None
        try:
            child.pid = os.getpid()
            child_main(self.app, self.board, self.listener, child, self.pid,
                       close_fds, self.identity, old_mask)
        finally:
            os._exit(1)     # This must never return into the master's frames.

    def enlist(self, batch: list[Child], pids: list[int]) -> None:
        """After a batch: its children (the first ``len(pids)``) on the board
        and in the master's table; the slots of those never forked released,
        or they would say STARTING forever."""
        assert self.board is not None
        for child, pid in zip(batch, pids):
            child.pid = pid
            self.children[pid] = child
        for child in batch[:len(pids)]:
            # (after the table: lock_stuck knows the batch if one of it
            # holds the board's lock meanwhile)
            self.board.started(child.slot, child.pid)
        for child in batch[len(pids):]:
            self.board.release(child.slot)
        self.totals.spawned += len(pids)

    def children_by_slot(self) -> dict[int, Child]:
        return {c.slot: c for c in self.children.values()}

    def child_close_fds(self) -> tuple[int, ...]:
        """The master's own descriptors, which a child must not keep."""
        fds = [self.wake_r]
        if self.selector is not None:
            fds.append(self.selector.fileno())  # type: ignore[attr-defined]
        if self.status_sock is not None:
            fds.append(self.status_sock.fileno())
        fds += [conn.fileno() for conn in self.status_out]
        if self.check is not None:
            fds.append(self.check.out)
        if self.metrics is not None:
            fds += self.metrics.fds()
        return tuple(fd for fd in fds if fd >= 0)

    def fork_failed(self, exc: OSError) -> None:
        self.fork_failures += 1
        delay = self.back_off(self.fork_failures)
        log.error("fork failed: %s; retrying in %.1f s", exc.strerror, delay)

    def account_exit(self, child: Child, was: State, code: int, served: int) -> None:
        """Count one reaped child and apply the crash-loop brake."""
        how = f"exit {code}" if code >= 0 else "killed by " + signals.name(-code)
        if child.timed_out or self.stopping:
            return
        if was == State.STARTING and not child.retiring:
            self.totals.crashed += 1
            self.boot_failures += 1
            self.last_boot_failure = time.monotonic()
            self.back_off(self.boot_failures)
            log.error("child %d (slot %d) died before it could serve (%s); %d in a row",
                      child.pid, child.slot, how, self.boot_failures)
            if self.boot_failures >= BOOT_FAILURE_LIMIT:
                if self.old is not None and not self.old.retired and self.old.children:
                    self.upgrade_cannot_boot(how)
                    return
                raise BootError(f"children cannot boot: {self.boot_failures} in a row died "
                                f"before serving (last: {how}); see the log above for the cause")
            return
        if code == 0:
            if child.retiring:
                self.totals.retired += 1
            else:
                self.totals.recycled += 1
            return
        self.totals.crashed += 1
        young = served == 0 and time.monotonic() - child.born < YOUNG_S
        if young:       # booted, then died at once: do not fork in a tight loop
            self.back_off(1)
        log.warning("child %d (slot %d) died (%s)%s; replacing it", child.pid, child.slot, how,
                    " before serving anything" if young else "")

    def back_off(self, streak: int) -> float:
        """No fork for 0.1 * 2**(streak-1) s (capped); returns that delay."""
        delay = min(0.1 * 2.0 ** (streak - 1), MAX_BACKOFF_S)
        self.spawn_after = max(self.spawn_after, time.monotonic() + delay)
        return delay

    # ----------------------------------------------------------- signals

    def handle_term(self) -> None:
        if self.stopping == "delaying":
            log.info("TERM again: the drain delay is cut short")
            self.graceful_stop()
            return
        if self.stopping:
            return
        delay = self.settings.drain_delay
        if delay > 0:
            # The balancer's health checks see /ready turn 503 and take this
            # instance out of rotation while it still serves what they send.
            log.info("TERM: not ready from now on; still serving for drain_delay (%gs), "
                     "then a graceful stop", delay)
            self.notifier.stopping()
            self.stopping = "delaying"
            self.delay_until = time.monotonic() + delay
            return
        self.graceful_stop()

    def graceful_stop(self) -> None:
        log.info("TERM: graceful stop; serving what is queued, then waiting up to %gs in all "
                 "for busy children", self.settings.graceful_timeout)
        self.abandon_check()
        self.notifier.stopping()
        if self.old is not None and not self.old.retired:
            self.old.retire_all(self.settings.graceful_timeout)
        self.stop_deadline = time.monotonic() + self.settings.graceful_timeout
        if self.stop_accepting():
            self.stopping = "draining"      # maintain() retires the pool once drained
        else:
            self.retire_all()

    def stop_accepting(self) -> bool:
        """Let no new connection in; True when the queue is ours to drain.

        A listener we created: new handshakes are refused (TCP: a filter that
        drops pure SYNs; unix: its path is removed) while the pool serves what
        the kernel already accepted.  An inherited (fd://) listener may be
        shared with its owner (systemd, the next master): it is never changed
        for them; we only stop accepting, and its queue stays theirs."""
        assert self.listener is not None
        if self.inherited:
            return False
        if self.listener.family == socket.AF_UNIX:
            path = self.listener.getsockname()
            if path not in self.owned_paths:
                return False
            os.unlink(path)     # new clients get ENOENT: refused, never reset
            self.owned_paths.remove(path)
            return True
        return sockets.refuse_new_connections(self.listener)

    def drained(self) -> bool:
        """Nothing queued and no handshake under way: no client is left that
        believes it is connected but has no child."""
        assert self.listener is not None
        if sockets.readable(self.listener):
            return False
        # --reuse-port siblings share the address and port: their handshakes
        # are theirs (and /proc cannot tell them apart from ours).
        return self.settings.reuse_port or not sockets.handshakes_in_progress(self.listener)

    def retire_all(self) -> None:
        if self.stopping == "draining":
            log.info("listen queue drained; retiring %d children", len(self.children))
        self.stopping = "graceful"
        self.surplus_since = 0.0
        for child in list(self.children.values()):
            self.retire(child)

    def handle_int(self) -> None:
        if self.stopping == "fast":
            return
        log.info("fast stop")
        self.stop_now()

    handle_quit = handle_int

    def handle_hup(self) -> None:
        self.reopen_log("HUP")
        self.rotate("HUP: log reopened")

    def handle_usr1(self) -> None:
        """logrotate's signal (as for nginx and gunicorn): reopen the log file.
        The children write to it too, so they are replaced gracefully, as
        Apache's `graceful` after a rotation: no connection is lost."""
        self.reopen_log("USR1")
        self.rotate("USR1: log reopened")

    def handle_usr2(self) -> None:
        """Upgrade: check the new release, then re-execute into it."""
        if self.stopping:
            log.warning("USR2: stopping; no upgrade")
            return
        if self.check is not None or self.old is not None and not self.stuck_upgrade():
            log.warning("USR2: an upgrade is already under way (%s); this one is ignored",
                        self.progress.state)
            return
        self.progress.serial += 1
        self.progress.state = "checking"
        self.progress.reason = ""
        self.notifier.reloading()
        try:
            self.check = Check()
        except OSError as exc:
            self.upgrade_failed(1, f"cannot start the check: {exc.strerror}")
            return
        log.info("USR2: checking the new release (pid %d)", self.check.pid)

    def check_done(self, code: int) -> None:
        check, self.check = self.check, None
        assert check is not None
        if self.stopping:
            # A stop came while the check ran: it wins (an exec now would
            # forget the stop and start a new pool on a refusing listener).
            check.close()
            self.upgrade_failed(1, "the master is stopping")
            return
        if code != 0:
            reason = check.reason(code)
            check.close()
            self.upgrade_failed(code if code > 0 else 1, reason)
            return
        check.close()
        log.info("USR2: the new release passed its check; re-executing master %d", self.pid)
        self.reexec()

    def abandon_check(self) -> None:
        """A stop ends a running check (reaped as usual; check_done then
        records the upgrade as refused)."""
        if self.check is not None:
            self.check.kill()

    def upgrade_cannot_boot(self, how: str) -> None:
        """An upgrade's new children die before serving (post_fork fails, say,
        which the check cannot see).  Stopping the pool, as a plain start
        would, would also end the old generation, which serves: it serves on
        instead, the boot is retried with the capped back-off (a cause that
        passes -- a database back -- completes the upgrade), and the upgrade
        is reported failed."""
        if self.progress.state != "starting":
            return      # said once
        self.boot_stuck = True
        self.upgrade_failed(
            EXIT_BOOT, f"the new release's children cannot boot ({self.boot_failures} in a row "
            f"died before serving, last: {how}); the old generation serves on while mps "
            f"retries every {MAX_BACKOFF_S:g} s: fix the cause, or reload a fixed release",
            outcome="failed")

    def upgrade_failed(self, code: int, reason: str, outcome: str = "refused") -> None:
        """Record and say it: "refused" before the exec (the old image serves
        on), "failed" after it (the old generation serves on)."""
        self.progress.state = "failed"
        self.progress.code = code
        self.progress.reason = reason
        if outcome == "refused":
            log.error("USR2: upgrade refused, still serving generation %d: %s",
                      self.generation, reason)
        else:
            log.error("upgrade %s: %s", outcome, reason)
        self.notifier.ready(f"upgrade {outcome}: {reason}"[:200])

    def stuck_upgrade(self) -> bool:
        """This image's children cannot boot and the old generation serves,
        held, on a board this image can read: a fixed release may take over
        from here, and is handed that generation instead of this one's."""
        return (self.boot_stuck and self.old is not None and self.old.board is not None
                and not self.old.retired and bool(self.old.children))

    def reexec(self) -> None:
        assert self.board is not None and self.listener is not None
        board: Scoreboard = self.board
        children = [(c.pid, c.slot, c.generation) for c in self.children.values()]
        held = self.stuck_upgrade()
        if held:
            assert self.old is not None and self.old.board is not None
            board = self.old.board
            children = [(c.pid, c.slot, c.generation) for c in self.old.children.values()]
            # The failed release's children: most died booting; one that came
            # through meanwhile finishes its connection and leaves (TERM), as
            # a child the next image does not know (not in its totals).
            for child in self.children.values():
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.progress.state = "starting"
        handoff = Handoff(
            listener_fd=self.listener.fileno(),
            status_fd=self.status_sock.fileno() if self.status_sock is not None else -1,
            metrics_fd=self.metrics_sock.fileno() if self.metrics_sock is not None else -1,
            board=board.handoff(),
            children=children,
            generation=self.generation, owned_paths=self.owned_paths,
            inherited=self.inherited,
            progress=self.progress.as_dict(), totals=self.totals.as_dict(),
            started_at_wall=time.time() - (time.monotonic() - self.started_at),
            bind_setting=self.settings.bind)
        for conn in list(self.status_out):
            self.end_status_client(conn)
        keep = [fd for fd in (handoff.listener_fd, handoff.status_fd, handoff.metrics_fd)
                if fd >= 0]
        # This generation must outlast the new one's boot, however long that
        # takes: no recycling (max_requests) until it is retired.
        board.set_hold(True)
        error = reexec(handoff, keep, RECORDED)
        board.set_hold(held)        # (a held old generation stays held)
        keep_board_fds(handoff.board, False)    # exec failed: no child may inherit them
        self.upgrade_failed(1, f"cannot re-execute {sys.executable}: {error.strerror}")

    def reopen_log(self, why: str) -> None:
        try:
            logs.reopen(self.settings.log_level, self.settings.log_file)
        except OSError as exc:      # keep the old handler: losing the log beats dying
            log.error("%s: cannot reopen log_file %s: %s; still writing to the old one",
                      why, self.settings.log_file, exc.strerror)

    def rotate(self, why: str) -> None:
        """Replace every child gracefully: new ones start, old ones finish first."""
        if self.stopping:
            return
        self.generation += 1
        old = list(self.children.values())
        log.info("%s; replacing %d children gracefully (generation %d)",
                 why, len(old), self.generation)
        for child in old:
            self.retire(child)
        self.spawn_many(self.settings.start_servers)

    def handle_ttin(self) -> None:
        self.set_spares(self.min_spare + 1, self.max_spare + 1)

    def handle_ttou(self) -> None:
        self.set_spares(max(0, self.min_spare - 1), max(1, self.max_spare - 1))

    def handle_chld(self) -> None:
        pass    # reap() runs on every pass

    def set_spares(self, min_spare: int, max_spare: int) -> None:
        cap = self.settings.max_children
        self.max_spare = min(max_spare, cap)
        self.min_spare = min(min_spare, self.max_spare)
        assert self.board is not None
        self.board.set_min_spare(self.wake_below())
        log.info("min_spare=%d max_spare=%d", self.min_spare, self.max_spare)

    # ----------------------------------------------------------- children

    def retire(self, child: Child) -> None:
        """Ask a child to leave after its current connection (or at once if idle)."""
        assert self.board is not None
        child.retiring = True
        self.board.retire(child.slot)
        self.kill(child, signal.SIGTERM)

    def stop_now(self) -> None:
        """Fast stop: children die at once (SIGINT is SIG_DFL in them)."""
        if self.stopping != "fast":
            self.notifier.stopping()
        if self.old is not None:
            self.old.stop_now()
        self.abandon_check()
        self.stopping = "fast"
        self.surplus_since = 0.0
        deadline = time.monotonic() + KILL_GRACE_S
        for child in self.children.values():
            self.kill(child, signal.SIGINT)
            child.retiring = True
            child.kill_at = child.kill_at or deadline

    def wait_for_children(self) -> None:
        """When the loop itself is leaving (BootError): reap what stop_now() ended."""
        assert self.board is not None
        while self.children:
            self.murder(self.board.snapshot())
            time.sleep(0.01)
            self.reap()

    # ----------------------------------------------------------- systemd

    def notify_systemd(self) -> None:
        """WATCHDOG=1 when due (the loop runs), and a STATUS= line every few seconds."""
        if not self.notifier.enabled:
            return
        now = time.monotonic()
        self.notifier.pet(now)
        if now >= self.notify_next and self.board is not None:
            self.notify_next = now + NOTIFY_STATUS_S
            self.notifier.status(self.status_line(self.board.snapshot()))

    def status_line(self, snap: Snapshot) -> str:
        now = time.monotonic()
        then, conns = self.rate_mark
        rate = (snap.connections - conns) / (now - then) if now > then else 0.0
        self.rate_mark = (now, snap.connections)
        live = sum(1 for s in snap.slots if s.state != State.EMPTY)
        return (f"{snap.count(State.IDLE)} idle, {snap.count(State.BUSY)} busy, {live} children "
                f"(generation {self.generation}); {rate:.1f} connections/s")

    def lock_stuck(self, holder: int) -> None:
        """A master call has waited lock_timeout for the scoreboard lock (the
        scoreboard calls this, then retries).  A child that holds it that
        long is stopped (SIGSTOP, a debugger, a freezer) or wedged: it is
        killed, and the lock comes back through the dead-holder recovery
        (EOWNERDEAD / the dirty word).  Never touch the board from here: the
        call that asked is still waiting for its lock."""
        child = self.children.get(holder)
        if child is None and self.old is not None and holder in self.old.children:
            log.error("old child %d has held its scoreboard lock for over %gs; killing it",
                      holder, self.board.lock_timeout if self.board else 0)
            self.totals.lock_holders_killed += 1
            os.kill(holder, signal.SIGKILL)
            return
        if child is None:
            log.warning("scoreboard lock held for over %gs by %s; waiting",
                        self.board.lock_timeout if self.board else 0,
                        f"pid {holder}, not a child" if holder else "a holder that just let go")
            return
        log.error("child %d (slot %d) has held the scoreboard lock for over %gs (stopped?); "
                  "killing it so the pool can go on", child.pid, child.slot,
                  self.board.lock_timeout if self.board else 0)
        self.totals.lock_holders_killed += 1
        child.timed_out = True      # counted here, not as a crash
        self.kill(child, signal.SIGKILL)

    def kill(self, child: Child, sig: int) -> None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass    # already dead; reap() will see it

    # ----------------------------------------------------------- status

    def answer_status(self) -> None:
        """Start sending the JSON document to each waiting client; never block.

        A document larger than one send() (a big pool) is finished from the
        loop as the client reads; one that has not read it all within
        STATUS_SEND_S is reset, so a client gets the whole document or an
        error, never a silently truncated one."""
        assert self.status_sock is not None and self.selector is not None
        doc = b""
        while True:
            if len(self.status_out) >= STATUS_CLIENTS:
                # Full: stop listening until one leaves (a level-triggered
                # listener would wake every pass meanwhile).
                self.selector.unregister(self.status_sock)
                return
            try:
                conn, _ = self.status_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("status socket accept failed: %s", exc.strerror)
                return
            conn.setblocking(False)
            doc = doc or status.encode(status.document(self))   # once per batch
            self.status_out[conn] = (memoryview(doc), time.monotonic() + STATUS_SEND_S)
            self.send_status(conn)
            if conn in self.status_out:
                self.selector.register(conn, selectors.EVENT_WRITE)

    def send_status(self, conn: socket.socket) -> None:
        """Send what the client can take now; close it once it has it all."""
        rest, deadline = self.status_out[conn]
        try:
            sent = conn.send(rest)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("status client failed: %s", exc.strerror)
            self.end_status_client(conn)
            return
        if sent < len(rest):
            self.status_out[conn] = (rest[sent:], deadline)
        else:
            self.end_status_client(conn)

    def expire_status_clients(self) -> None:
        now = time.monotonic()
        for conn, (_, deadline) in list(self.status_out.items()):
            if now >= deadline:
                # Reset, not close: a partial document must read as an error.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.end_status_client(conn)

    def end_status_client(self, conn: socket.socket) -> None:
        assert self.selector is not None and self.status_sock is not None
        if len(self.status_out) >= STATUS_CLIENTS:
            self.selector.register(self.status_sock, selectors.EVENT_READ)    # room again
        del self.status_out[conn]
        try:
            self.selector.unregister(conn)
        except KeyError:
            pass    # finished by its first send, never registered
        conn.close()
