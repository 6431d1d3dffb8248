"""Signals: the master's handlers only record; the loop acts.

A handler appends the signal number to a queue; ``signal.set_wakeup_fd``
writes a byte to the master's wake-up pipe so its ``select()`` returns at
once.  Nothing is logged, reaped or decided inside a handler (gunicorn's
years of SIGCHLD re-entrancy deadlocks are the reason).
"""
from __future__ import annotations

import collections
import signal
from types import FrameType

#: The signals the master acts on, and the name of the step that handles each.
MASTER_SIGNALS: dict[int, str] = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGTTIN: "ttin",
    signal.SIGTTOU: "ttou",
    signal.SIGCHLD: "chld",
}


class SignalQueue:
    """Records the master's signals for its loop."""

    def __init__(self) -> None:
        self.pending: collections.deque[int] = collections.deque(maxlen=256)

    def install(self, wake_fd: int) -> None:
        signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def drain(self) -> list[int]:
        out = []
        while self.pending:
            out.append(self.pending.popleft())
        return out


def reset_in_child() -> None:
    """A new child drops the master's handlers before anything else runs."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    # Operators signal the master; a HUP or TTIN aimed at the process group
    # must neither kill nor stop a child.
    # A client that goes away mid-reply must cost an EPIPE, never the child
    # (CPython ignores SIGPIPE at start-up, but an app may have reset it).
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
