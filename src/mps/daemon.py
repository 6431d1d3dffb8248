"""Process chores: detaching, the pid file, dying with the master."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import stat
from collections.abc import Collection

from .errors import MpsError

_PR_SET_PDEATHSIG = 1
#: libc, loaded once in the master: CDLL(None) is the already-mapped C
#: library (find_library() would run ldconfig in every new child).
_libc = ctypes.CDLL(None, use_errno=True)
#: prctl() looked up in the master too: CDLL resolves a symbol on first use
#: and caches a new function object, work (and copied pages) every child
#: would repeat.
_prctl = _libc.prctl
#: /proc/PID/stat's start time and /proc/stat's btime are whole clock ticks
#: and whole seconds (btime also wobbles by a second under NTP slewing): a
#: process counts as started after the pid file only beyond this margin.
_START_SLACK_S = 2.0
#: The kernel's highest possible pid (PID_MAX_LIMIT on 64-bit).
_PID_MAX = 4 * 1024 * 1024


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this child when the master dies."""
    if _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def daemonize(keep: Collection[int] | None = None) -> None:
    """Detach: two forks and setsid(); stdio to /dev/null; inherited fds closed.

    What daemon(3) callers do, minus its danger: descriptors the launching
    shell left open (a CI runner's pipe, an ssh session's socket) would keep
    that pipe or session open for as long as the daemon lives, so they are
    closed.  Only *inherited* ones, though: they are exactly the descriptors
    without close-on-exec, because everything Python opens is close-on-exec
    (PEP 446).  A blind closerange() would also close descriptors that live
    objects own -- the log file, the status socket, the scoreboard's memfd, a
    file the app opened at import -- and the next open() would reuse the
    number under them.  ``keep`` names inherited descriptors to keep (the
    ``fd://N`` listener); when it is None, inherited *listening* sockets are
    kept, so a caller that names nothing never loses its listener.
    """
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    close_inherited_fds(keep)


def close_inherited_fds(keep: Collection[int] | None = None) -> list[int]:
    """Close descriptors 3 and up that lack close-on-exec, except ``keep``
    (None: except listening sockets); the ones closed."""
    closed = []
    for fd in _open_fds():
        if fd < 3 or (keep is not None and fd in keep):
            continue
        try:
            if fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                continue        # ours: Python opened it
        except OSError:
            continue            # the listing's own descriptor, gone already
        if keep is None and _is_listening(fd):
            continue
        os.close(fd)
        closed.append(fd)
    return closed


def _open_fds() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


def _is_listening(fd: int) -> bool:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False            # not a socket
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
    finally:
        sock.detach()


def check_pid_file(path: str) -> None:
    """Refuse a pid file that names a running process (MpsError, exit 1).

    The file is stale, and may be replaced, when it holds no pid, names this
    process (a container restarted with the same pid), a process that no
    longer exists or is a zombie, or one that started after the file was
    written: the pid was reused.  A process is never asked what it *is*
    (its name may be ``python myapp.py`` or anything else), only when it began.
    """
    try:
        # O_NONBLOCK: a FIFO at the path must not hang the start; O_NOFOLLOW:
        # a symlink is no pid file of ours (the write replaces the link).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return
        raise MpsError(f"cannot read pid_file {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        text = os.read(fd, 64) if stat.S_ISREG(info.st_mode) else b""
    finally:
        os.close(fd)
    try:
        pid = int(text.strip())
    except ValueError:
        return          # not a pid file we wrote: replaced
    if not 0 < pid <= _PID_MAX or pid == os.getpid() or \
            not _running_since(pid, info.st_mtime):
        return
    raise MpsError(f"pid_file {path} belongs to running process {pid} (another mps "
                   f"master?); stop it, or choose another pid_file")


def _running_since(pid: int, written: float) -> bool:
    """Whether ``pid`` is a live process that may have written a file at ``written``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass            # someone else's process: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, IndexError, StopIteration, ValueError):
        return True     # it exists and /proc says no more (hidepid): assume live
    if fields[0] == b"Z":
        return False    # dead, not yet reaped
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started <= written + _START_SLACK_S


def write_pid_file(path: str) -> None:
    """Write our pid atomically: a new file (never following a link), renamed.

    The master checks again here: another master may have written the file
    since the command line checked it, before this one bound (check_pid_file).
    """
    check_pid_file(path)
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
