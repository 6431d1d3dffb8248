"""Process chores: detaching, the pid file, dying with the master."""
from __future__ import annotations

import ctypes
import os
import signal

from .errors import MpsError

_PR_SET_PDEATHSIG = 1
#: libc, loaded once in the master: CDLL(None) is the already-mapped C
#: library (find_library() would run ldconfig in every new child).
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this child when the master dies."""
    if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def daemonize() -> None:
    """Detach: two forks and setsid(); stdio to /dev/null.  Sockets survive."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def write_pid_file(path: str) -> None:
    """Write our pid atomically: a new file (never following a link), renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            os.write(fd, b"%d\n" % os.getpid())
        finally:
            os.close(fd)
        os.replace(tmp, path)   # rename() replaces a link itself, never its target
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise MpsError(f"cannot write pid_file {path}: {exc.strerror or exc}") from None


def remove_pid_file(path: str) -> None:
    """Remove the pid file if it is still ours."""
    try:
        with open(path, "rb") as f:
            if f.read().strip() != b"%d" % os.getpid():
                return
        os.unlink(path)
    except OSError:
        pass
