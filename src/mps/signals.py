"""Signals: the master's handlers only record; the loop acts.

A handler records the signal number; ``signal.set_wakeup_fd`` writes a byte
to the master's wake-up pipe so its ``select()`` returns at once.  Nothing
is logged, reaped or decided inside a handler (gunicorn's years of SIGCHLD
re-entrancy deadlocks are the reason).
"""
from __future__ import annotations

import collections
import signal
from collections.abc import Callable, Iterable
from types import FrameType

import _signal  # type: ignore[import-not-found]  # signal's C half, no stub: see below

#: The signals the master acts on, and the name of the step that handles each.
MASTER_SIGNALS: dict[int, str] = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGTTIN: "ttin",
    signal.SIGTTOU: "ttou",
    signal.SIGCHLD: "chld",
    signal.SIGUSR1: "usr1",
    signal.SIGUSR2: "usr2",
}

#: Signals whose default action would end the master without a word (a
#: stray `kill -ALRM`, a profiler's timer, a real-time signal meant for
#: someone else): the master logs and ignores them.  The synchronous faults
#: (SEGV, BUS, FPE, ILL, TRAP, SYS) and ABRT keep their default: ignoring a
#: real fault would loop on it.
STRAY_SIGNALS: tuple[int, ...] = (
    signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR,
    signal.SIGXCPU, signal.SIGSTKFLT,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)

#: Everything the master's handler records (blocked across fork()).
RECORDED: tuple[int, ...] = (*MASTER_SIGNALS, *STRAY_SIGNALS)


class SignalQueue:
    """Records the master's signals for its loop, in order, losing none.

    CHLD is kept as one flag (the loop reaps every pass anyway), so a storm
    of exits cannot grow the queue; every other signal is kept, unbounded,
    because each one that stops, rotates or resizes the pool must be acted
    on (a bounded deque would silently drop the oldest: a TERM).
    """

    def __init__(self) -> None:
        self.pending: collections.deque[int] = collections.deque()
        self.chld = False

    def install(self, wake_fd: int) -> None:
        signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
        for sig in RECORDED:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGCHLD:
            self.chld = True
        else:
            self.pending.append(signum)

    def drain(self) -> list[int]:
        out = []
        while self.pending:
            out.append(self.pending.popleft())
        if self.chld:
            self.chld = False
            out.append(signal.SIGCHLD)
        return out


def name(sig: int) -> str:
    """SIGUSR2, SIGRTMIN+3, ..."""
    if signal.SIGRTMIN < sig <= signal.SIGRTMAX:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"
    try:
        return signal.Signals(sig).name
    except ValueError:      # not in the enum (glibc's own 32, 33)
        return f"signal {sig}"


# A forked child (and the master between two forks) calls signal's C half
# directly.  The public wrappers turn what each call returns into an enum,
# and a previous handler that is a function (the master's recorder) into a
# ValueError raised and formatted inside enum, once per signal: ~50
# exceptions in every child's boot, each touching -- so copying -- pages the
# child would otherwise still share with the master (with the boot's own
# handler calls, 0.1 MiB of every child's USS).

#: What a new child resets, as plain ints made once in the master (the C
#: call wants exact ints for SIG_DFL and SIG_IGN, not their enums).
_CHILD_DEFAULT: tuple[int, ...] = tuple(
    int(sig) for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, *STRAY_SIGNALS))
# Operators signal the master; a HUP, USR1, USR2 or TTIN aimed at the
# process group must neither kill nor stop a child.
# A client that goes away mid-reply must cost an EPIPE, never the child
# (CPython ignores SIGPIPE at start-up, but an app may have reset it).
_CHILD_IGNORE: tuple[int, ...] = tuple(
    int(sig) for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN,
                         signal.SIGTTOU, signal.SIGPIPE))
_SIG_DFL = int(signal.SIG_DFL)
_SIG_IGN = int(signal.SIG_IGN)
_SIG_BLOCK = int(signal.SIG_BLOCK)
_SIG_SETMASK = int(signal.SIG_SETMASK)


def reset_in_child() -> None:
    """A new child drops the master's handlers before anything else runs."""
    _signal.set_wakeup_fd(-1)
    for sig in _CHILD_DEFAULT:
        _signal.signal(sig, _SIG_DFL)
    for sig in _CHILD_IGNORE:
        _signal.signal(sig, _SIG_IGN)


def handle(sig: int, handler: Callable[[int, FrameType | None], object]) -> None:
    """``signal.signal`` for a child's boot, without the wrapper's enum
    conversions (see ``_signal`` above)."""
    _signal.signal(sig, handler)


def block(sigs: Iterable[int]) -> set[int]:
    """Block ``sigs``; the mask before, as ints (``SIG_BLOCK``, unwrapped)."""
    return set(_signal.pthread_sigmask(_SIG_BLOCK, sigs))


def set_mask(mask: Iterable[int]) -> set[int]:
    """Make ``mask`` the blocked set; the one before (``SIG_SETMASK``, unwrapped)."""
    return set(_signal.pthread_sigmask(_SIG_SETMASK, mask))
