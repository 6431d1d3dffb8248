"""systemd's notify protocol (sd_notify(3)), spoken directly: no libsystemd.

One datagram per state change to the socket named by ``NOTIFY_SOCKET`` (a
path, or ``@name`` in the abstract namespace), sent without blocking; a
missing or unreachable socket costs nothing.  ``WATCHDOG_USEC`` (for this
pid, when ``WATCHDOG_PID`` is set) asks for ``WATCHDOG=1`` at least that
often: :meth:`Notifier.watchdog_interval` is half of it, as sd_watchdog_enabled
advises.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """The master's line to systemd; inert when not started by it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address: str | bytes | None = None
        self.sock: socket.socket | None = None
        path = env.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self.watchdog_interval = 0.0
        usec = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not owner or owner == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6
        self.next_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; True if it was sent."""
        if self.address is None:
            return False
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError:
            return False    # systemd gone or its queue full: never stall the master
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *(["STATUS=" + status] if status else []))

    def reloading(self) -> None:
        """For Type=notify-reload: the monotonic time the reload began."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send("STATUS=" + text)

    def watchdog_due(self, now: float) -> float:
        """Seconds until WATCHDOG=1 is due (inf when the watchdog is off)."""
        if not self.watchdog_interval:
            return float("inf")
        return max(0.0, self.next_watchdog - now)

    def pet(self, now: float) -> None:
        """WATCHDOG=1 when due: the master's loop is alive."""
        if self.watchdog_interval and now >= self.next_watchdog:
            self.send("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog_interval

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
