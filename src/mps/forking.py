"""fork() for the master, without the at-fork hooks only other threads need.

``os.fork()`` runs every callable registered with ``os.register_at_fork``.
threading's and logging's re-create locks that another thread might have
held at the fork.  The master has one thread, so in its children they change
nothing -- yet they are the costliest thing a child does before it serves: they
run Python that has never run in this heap (new locks, a WeakSet walk, cold
bytecode quickened in place), and each page they write is one more private
page.  Measured on CPython 3.11: 0.38 MiB of an idle echo child's 1.3 MiB.

`Forker.quiet()` takes exactly those hooks out of the interpreter's hook
lists around a batch of forks while the process has a single thread, and puts them
back after it in the parent, and at once in each child (`Forker.fork()`).
Every other hook runs as before: random's reseed, the app's own, a library's.
Anything unexpected -- another thread, lists not found, a Python whose hooks
differ from the ones read here -- and every hook runs.

The interpreter keeps the hook lists private; `Forker.find()` gets them by
registering three no-op marks and asking the garbage collector which list
holds each.  It must run before ``gc.freeze()``, which hides the lists from it.
"""
from __future__ import annotations

import gc
import os
import logging
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger("mps")

#: The CPython versions whose threading and logging hooks were read for this
#: (3.13 also refreshes the thread's native id at fork; it gets os.fork()).
VERSIONS = ((3, 10), (3, 11), (3, 12))

#: The hooks to leave out, in groups that go whole or not at all: (list,
#: module, attribute).  logging's before-hook takes a lock that only its other
#: two let go of.
GROUPS = (
    (("child", "threading", "_after_fork"),),
    (("before", "logging", "_acquireLock"), ("parent", "logging", "_releaseLock"),
     ("child", "logging", "_after_at_fork_child_reinit_locks")),
)
LISTS = ("before", "parent", "child")


class Forker:
    """Forks without threading's and logging's hooks while single-threaded."""

    def __init__(self, lists: dict[str, list[Callable[[], Any]]]) -> None:
        self.lists = lists      # "before" / "parent" / "child" -> the interpreter's list
        #: While quiet(): each list's whole contents, and what was left in it.
        self.saved: dict[str, tuple[list[Callable[[], Any]], list[Callable[[], Any]]]] = {}

    @classmethod
    def find(cls) -> Forker:
        """The interpreter's three hook lists, or none (quiet() does nothing)."""
        if sys.implementation.name != "cpython" or sys.version_info[:2] not in VERSIONS:
            return cls({})
        # Marks that cost nothing if one is never found and stays registered:
        # a C method that does nothing, no Python frame in the child.
        marks = {where: {}.clear for where in LISTS}
        os.register_at_fork(before=marks["before"], after_in_parent=marks["parent"],
                            after_in_child=marks["child"])
        lists = {}
        for where, mark in marks.items():
            held = [r for r in gc.get_referrers(mark)
                    if type(r) is list and r and r[-1] is mark]
            if len(held) == 1:
                held[0].pop()
                lists[where] = held[0]
        if len(lists) < len(marks):
            # (gc.freeze() by the app, say: frozen lists are out of get_referrers' sight)
            log.debug("at-fork hook lists not found: every child runs every at-fork hook")
            return cls({})
        return cls(lists)

    def skipped(self) -> dict[str, list[Callable[[], Any]]]:
        """The hooks quiet() leaves out now, by list (all empty without the lists)."""
        out: dict[str, list[Callable[[], Any]]] = {where: [] for where in LISTS}
        for group in GROUPS if self.lists else ():
            hooks: list[tuple[str, Any]] = [
                (where, getattr(sys.modules.get(module), name, None))
                for where, module, name in group]
            if all(any(x is h for x in self.lists[where]) for where, h in hooks):
                for where, h in hooks:
                    out[where].append(h)
        return out

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """A batch of fork() calls: while this is the process's only thread,
        the hooks `skipped()` names are out of the lists for the block."""
        skip = self.skipped() if single_threaded() else {}
        try:
            if any(skip.values()):
                for where, lst in self.lists.items():
                    whole = lst[:]
                    lst[:] = [h for h in whole if not any(h is s for s in skip[where])]
                    self.saved[where] = (whole, lst[:])
            yield
        finally:
            self.restore()

    def fork(self) -> int:
        """os.fork(); inside quiet(), without the skipped hooks while this is
        still the only thread.  The child gets every hook back at once, for
        forks of its own."""
        if self.saved and not single_threaded():
            self.restore()      # a thread came up mid-batch: every hook from here on
        pid = os.fork()
        if pid == 0:
            self.restore()
        return pid

    def restore(self) -> None:
        """Every hook back in its list, with any registered meanwhile after them."""
        for where, (whole, left) in self.saved.items():
            lst = self.lists[where]
            if lst[:len(left)] == left:
                lst[:] = whole + lst[len(left):]
            else:       # (not ours to guess at: someone else rewrote the list)
                log.warning("the at-fork hooks changed during a fork batch; "
                            "threading's and logging's may be missing")
        self.saved = {}


def single_threaded() -> bool:
    """True when the process has one thread (any thread: Python's or C's)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False
