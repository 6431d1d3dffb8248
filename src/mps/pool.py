"""The one narrow seam between the pool and a protocol layer (HTTP, PROXY).

A handler that serves many requests on one connection (HTTP keep-alive)
must know when to let go of its child: when a new connection waits for a
child and none is idle, or when this child has been told to leave.  The
worker hands such a handler a :class:`PoolView`; the handler learns nothing
else about the pool.
"""
from __future__ import annotations

from typing import Protocol


class PoolView(Protocol):
    #: Descriptors that turn readable when :meth:`leaving` or :meth:`wanted`
    #: may have become true (the listener, the child's signal wake-up pipe):
    #: a handler parked on an idle connection polls them beside it.
    fds: tuple[int, ...]

    def leaving(self) -> bool:
        """This child has been told to leave (stop, rotation, retirement)."""

    def wanted(self) -> bool:
        """A connection waits for a child and no child is idle to take it."""

    def begin_request(self, method: bytes, target: bytes) -> object:
        """A request starts on this connection: restart the child's `timeout`
        clock and show its method and target in the status."""


class Alone:
    """The pool of one (``--single``, tests): nothing ever waits for a child."""

    fds: tuple[int, ...] = ()

    def leaving(self) -> bool:
        return False

    def wanted(self) -> bool:
        return False

    def begin_request(self, method: bytes, target: bytes) -> object:
        return None
