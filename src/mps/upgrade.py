"""Upgrading the code in place: check the new release, re-execute, adopt.

USR2 (or ``mps reload``) runs three steps, each here, orchestrated by the
arbiter:

1. :class:`Check` -- the same command line, in a separate process with
   ``MPS_UPGRADE_CHECK=1``: it parses the settings and imports the app (the
   start-up checks, exit codes 2 and 4 included) and exits.  A failure is
   logged in one line and nothing else changes.
2. :func:`reexec` -- the master executes itself again: the same pid, command
   line and environment, so a virtualenv switched by a symlink or a changed
   file is picked up.  The listening socket, the status socket and the
   scoreboard's memfd stay open across ``exec`` (described in
   ``MPS_UPGRADE_STATE``); signals stay blocked until the new image has its
   handlers, so none is lost or fatal in between.
3. :class:`OldGeneration` -- the new image maps the old board again, starts
   its own children from the new code, and once they are ready retires the
   old ones gracefully; they finish what they serve.

The children never notice the exec: their parent pid does not change, so
``PR_SET_PDEATHSIG`` still ties them to the master, and a new image that
crashes takes them down with it (no orphans).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import BackendError
from .scoreboard import Scoreboard, State, attach
from .signals import name as signal_name

log = logging.getLogger("mps")

STATE_VAR = "MPS_UPGRADE_STATE"
CHECK_VAR = "MPS_UPGRADE_CHECK"
#: Longest the new release's check may take (an import that hangs).
CHECK_TIMEOUT_S = 60.0


@dataclass
class Progress:
    """What ``mps reload`` and the status document see of upgrades."""

    serial: int = 0             # upgrades asked for, ever (carried across exec)
    state: str = ""             # "", checking, starting, done, failed
    reason: str = ""
    code: int = 0               # the check's exit status when it failed
    loaded_at: float = field(default_factory=time.time)     # the code's load time (epoch)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Handoff:
    """What the old image tells the new one across exec (as JSON in the env)."""

    listener_fd: int
    status_fd: int
    metrics_fd: int
    board: dict[str, Any]
    children: list[tuple[int, int, int]]       # (pid, slot, generation)
    generation: int
    owned_paths: list[str]
    inherited: bool                             # the listener is fd://N, not ours
    progress: dict[str, Any]
    totals: dict[str, int]
    started_at_wall: float
    bind_setting: str

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def take(cls) -> Handoff | None:
        """The handoff in this process's environment, removed from it."""
        raw = os.environ.pop(STATE_VAR, None)
        if raw is None:
            return None
        data = json.loads(raw)
        data["children"] = [tuple(c) for c in data["children"]]
        return cls(**data)


class Check:
    """The new release's start-up checks, in a process of their own."""

    def __init__(self) -> None:
        self.out = os.memfd_create("mps-upgrade-check", os.MFD_CLOEXEC)
        env = {**os.environ, CHECK_VAR: "1"}
        env.pop(STATE_VAR, None)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.pid = os.posix_spawn(
                sys.executable, sys.orig_argv, env,
                file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, self.out, 1),
                              (os.POSIX_SPAWN_DUP2, self.out, 2)],
                setsigmask=())     # not the master's mask (blocked during a fork)
        except OSError:
            os.close(self.out)
            raise
        finally:
            os.close(null)
        self.deadline = time.monotonic() + CHECK_TIMEOUT_S

    def kill(self) -> None:
        """Abandon the check (the master stops, or it overran CHECK_TIMEOUT_S);
        the master's loop reaps it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reason(self, code: int) -> str:
        """The check's last line of output: its one-line reason."""
        try:
            size = os.fstat(self.out).st_size
            text = os.pread(self.out, min(size, 65536), max(0, size - 65536)).decode(
                errors="replace")
        except OSError:
            text = ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1].removeprefix("mps: error: ")
        if code < 0:
            return "the check was killed by " + signal_name(-code)
        return f"the check exited with status {code}"

    def close(self) -> None:
        os.close(self.out)


def checking() -> bool:
    """True in the process that only checks a new release (see Check)."""
    return os.environ.get(CHECK_VAR) == "1"


def reexec(handoff: Handoff, keep: Iterable[int], blocked: Iterable[int]) -> OSError:
    """Execute this master again; returns only if exec failed (the error).

    Signals are blocked first and stay blocked across exec (the mask is
    inherited): a TERM sent meanwhile waits for the new image's handler
    instead of meeting the default action."""
    for fd in keep:
        os.set_inheritable(fd, True)
    os.environ[STATE_VAR] = handoff.encode()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    for handler in logging.getLogger("mps").handlers:
        handler.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.environ.pop(STATE_VAR, None)
        for fd in keep:
            os.set_inheritable(fd, False)
        return exc
    raise AssertionError("unreachable: execv returned")


@dataclass
class OldChild:
    pid: int
    slot: int
    generation: int
    kill_at: float = 0.0


class OldGeneration:
    """The children of the image before the exec, on their own board.

    A release whose scoreboard layout differs cannot read that board (the
    old image's children keep using it as they finish): then the old
    children are known by pid alone, told to leave by signal, counted as they
    are reaped, and shown in the status with their state "unknown"."""

    def __init__(self, handoff: Handoff) -> None:
        self.children = {pid: OldChild(pid, slot, gen) for pid, slot, gen in handoff.children}
        self.retired = False
        self.board: Scoreboard | None = None
        try:
            self.board = attach(handoff.board)
        except (OSError, BackendError) as exc:
            log.warning("the old generation's scoreboard is not one this release can read (%s); "
                        "its %d children are told to leave by signal alone",
                        getattr(exc, "strerror", None) or exc, len(self.children))

    def retire_all(self, graceful_timeout: float) -> None:
        """The new generation serves: the old one finishes and leaves."""
        self.retired = True
        deadline = time.monotonic() + graceful_timeout
        for child in self.children.values():
            if self.board is not None:
                self.board.retire(child.slot)
            _kill(child.pid, signal.SIGTERM)
            child.kill_at = deadline

    def reaped(self, pid: int) -> bool:
        """True when ``pid`` was an old child (its slot is freed)."""
        child = self.children.pop(pid, None)
        if child is None:
            return False
        if self.board is not None:
            self.board.release(child.slot)
        return True

    def murder(self, now: float) -> None:
        for child in self.children.values():
            if child.kill_at and now >= child.kill_at:
                log.warning("old child %d (generation %d) still busy after graceful_timeout; "
                            "killing it", child.pid, child.generation)
                _kill(child.pid, signal.SIGKILL)
                child.kill_at = now + 3600

    def next_deadline(self) -> float:
        due = [c.kill_at for c in self.children.values() if c.kill_at]
        return min(due) if due else float("inf")

    def stop_now(self) -> None:
        for child in self.children.values():
            _kill(child.pid, signal.SIGINT)

    def slots(self) -> list[dict[str, Any]]:
        """The old children's slots, for the status document."""
        if self.board is None:
            return [{"slot": c.slot, "pid": c.pid, "state": "unknown", "connections": None,
                     "state_age_s": None} for c in self.children.values()]
        now_ns = time.monotonic_ns()
        snap = self.board.snapshot()
        pids = set(self.children)
        return [{"slot": s.index, "pid": s.pid, "state": s.state.name.lower(),
                 "connections": s.connections, "state_age_s": round(s.age_s(now_ns), 3)}
                for s in snap.slots if s.state != State.EMPTY and s.pid in pids]

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def keep_board_fds(board: dict[str, Any], keep: bool) -> None:
    """Make a handed-off board's descriptors survive exec (or not)."""
    for key in ("memory_fd", "lock_fd"):
        fd = board.get(key, -1)
        if isinstance(fd, int) and fd >= 0:
            try:
                os.set_inheritable(fd, keep)
            except OSError:
                pass
