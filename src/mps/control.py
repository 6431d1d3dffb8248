"""``mps reload`` and ``mps stop``: signal a running master and wait until
the operation is done -- what ``ExecReload=``, ``ExecStop=`` and deploy
scripts call.

The master is named by its pid file or its status socket.  ``reload`` needs
the status socket to follow the upgrade (with only a pid file it is found in
the master's command line or environment, as ``--status-socket`` or
``MPS_STATUS_SOCKET``).  Exit status: 0 done; 1 no such master, or it did not
finish in time; 2 usage; otherwise the new release's own check status (2: a
bad setting, 4: the app cannot be imported).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from .errors import EXIT_OK, EXIT_RUNTIME, MpsError, UsageError
from .status import query

POLL_S = 0.05


class Target:
    """A running master: its pid and, when known, its status socket."""

    def __init__(self, pid_file: str | None, status_socket: str | None) -> None:
        if not pid_file and not status_socket:
            raise UsageError("name the master with --pid-file PATH or --status-socket PATH")
        self.status_socket = status_socket
        if status_socket:
            self.pid = int(query(status_socket)["pid"])
        else:
            assert pid_file is not None
            self.pid = read_pid(pid_file)
            self.status_socket = socket_of(self.pid)
        if not alive(self.pid):
            raise MpsError(f"master {self.pid} is not running")

    def status(self) -> dict[str, Any] | None:
        if not self.status_socket:
            return None
        try:
            return query(self.status_socket, timeout=2.0)
        except MpsError:
            return None     # mid-exec, or busy: ask again

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise MpsError(f"master {self.pid} is not running") from None
        except PermissionError:
            raise MpsError(f"not allowed to signal master {self.pid}; run as its user "
                           "or root") from None


def read_pid(path: str) -> int:
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except OSError as exc:
        raise MpsError(f"cannot read pid_file {path}: {exc.strerror}") from None
    if not text.isdigit():
        raise MpsError(f"pid_file {path} does not hold a pid")
    return int(text)


def socket_of(pid: int) -> str | None:
    """The status socket a running master was started with, if any."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="surrogateescape").split("\0")
        for i, arg in enumerate(argv):
            if arg == "--status-socket" and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith("--status-socket="):
                return arg.partition("=")[2]
        with open(f"/proc/{pid}/environ", "rb") as f:
            for var in f.read().decode(errors="surrogateescape").split("\0"):
                if var.startswith("MPS_STATUS_SOCKET="):
                    return var.partition("=")[2]
    except OSError:
        pass
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reload(target: Target, timeout: float) -> int:
    """USR2, then wait for the new generation to serve (0) or the release to
    be refused (the check's status)."""
    doc = target.status()
    if doc is None:
        raise UsageError("mps reload follows the upgrade through the master's status socket: "
                         "give --status-socket PATH (or start the master with one)")
    deadline = time.monotonic() + timeout
    # The master ignores USR2 until the last upgrade is over, old children
    # gone (a second deploy right after the first would otherwise wait out
    # the whole timeout): wait for that first.
    while busy_upgrading(doc):
        if time.monotonic() >= deadline:
            print(f"mps: error: master {target.pid} is still finishing an earlier upgrade "
                  f"after {timeout:g}s ({doc['upgrade']['state']}, "
                  f"{len(doc['old_generation'])} old children leaving)", file=sys.stderr)
            return EXIT_RUNTIME
        time.sleep(POLL_S)
        doc = target.status() or doc
    serial = int(doc["upgrade"]["serial"])
    target.signal(signal.SIGUSR2)
    state = "sent"
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        if not alive(target.pid):
            raise MpsError(f"master {target.pid} died during the upgrade")
        doc = target.status()
        if doc is None or int(doc["upgrade"]["serial"]) <= serial:
            continue
        state = doc["upgrade"]["state"]
        if state == "done":
            print(f"mps: master {target.pid} serves generation {doc['generation']}")
            return EXIT_OK
        if state == "failed":
            print(f"mps: error: upgrade refused, master {target.pid} still serves generation "
                  f"{doc['generation']}: {doc['upgrade']['reason']}", file=sys.stderr)
            return int(doc["upgrade"]["code"]) or EXIT_RUNTIME
    print(f"mps: error: the upgrade of master {target.pid} did not finish in {timeout:g}s "
          f"(last state: {state})", file=sys.stderr)
    return EXIT_RUNTIME


def busy_upgrading(doc: dict[str, Any]) -> bool:
    # (A failed upgrade whose old generation still serves, held, takes the
    # next release: that is how a broken one is replaced without a restart.)
    state = doc["upgrade"]["state"]
    return state in ("checking", "starting") or bool(doc["old_generation"]) and state != "failed"


def stop(target: Target, timeout: float, fast: bool) -> int:
    """TERM (or INT with ``fast``), then wait until the master is gone."""
    target.signal(signal.SIGINT if fast else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(target.pid):
            return EXIT_OK
        time.sleep(POLL_S)
    print(f"mps: error: master {target.pid} is still running after {timeout:g}s",
          file=sys.stderr)
    return EXIT_RUNTIME
