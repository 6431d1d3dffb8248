"""Listening sockets: parse the bind setting, bind, and read a queue depth.

Also the safe handling of Unix socket paths shared by ``bind = unix:PATH``
and the status socket: never follow a symlink, never delete a file that is
not a socket, never steal a socket that a live process still listens on.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import stat
import struct
from collections.abc import MutableMapping
from dataclasses import dataclass

from .errors import BindError, SettingError

# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss,
# unacked.  On a listening socket Linux reports the accept queue's current
# length in tcpi_unacked.
_TCPI_UNACKED_OFFSET = 24
_TCP_INFO_LEN = 104


@dataclass(frozen=True)
class Address:
    """A parsed ``bind`` value."""

    family: int          # AF_INET, AF_INET6, AF_UNIX, or -1 for fd://N
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1

    def describe(self) -> str:
        if self.family == socket.AF_UNIX:
            return "unix:" + self.path
        if self.fd >= 0:
            return f"fd://{self.fd}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_bind(text: str) -> Address:
    """Parse HOST:PORT, [V6]:PORT, unix:PATH or fd://N; SettingError if not."""
    def bad(rule: str) -> SettingError:
        return SettingError("bind", text, rule)

    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise bad("unix: needs a path, e.g. unix:/run/app.sock")
        try:
            raw = os.fsencode(path)
        except UnicodeError:
            raise bad("the path is not a valid file name") from None
        if b"\0" in raw:
            raise bad("the path must not contain a NUL byte")
        if len(raw) > 107:
            raise bad("a Unix socket path is at most 107 bytes")
        return Address(socket.AF_UNIX, path=path)
    if text.startswith("fd://"):
        fd = text[5:]
        if not (fd.isascii() and fd.isdigit()) or int(fd) > 2**31 - 1:
            raise bad("fd:// needs a file descriptor number, e.g. fd://3")
        return Address(-1, fd=int(fd))
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        family = socket.AF_INET6
    else:
        host, sep, port = text.rpartition(":")
        family = socket.AF_INET
    if not sep or not host:
        raise bad("expected HOST:PORT, [V6ADDR]:PORT, unix:PATH or fd://N")
    if not (port.isascii() and port.isdigit()):
        raise bad(f"port {port!r} is not a number")
    number = int(port)
    if not 0 <= number <= 65535:
        raise bad("port must be between 0 and 65535")
    if family == socket.AF_INET and ":" in host:
        raise bad("write an IPv6 address in brackets, e.g. [::1]:8000")
    if family == socket.AF_INET6 and ":" not in host:
        raise bad("brackets are for IPv6 addresses; write an IPv4 address as HOST:PORT")
    if "\0" in host:
        raise bad("the host must not contain a NUL byte")
    return Address(family, host=host, port=number)


def listen(address: Address, backlog: int, reuse_port: bool = False) -> socket.socket:
    """Create the listening socket; BindError (exit 1) with one clear line.
    ``reuse_port``: SO_REUSEPORT, so that several masters serve one port."""
    if address.fd >= 0:
        return _adopt(address.fd)
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        if address.family == socket.AF_UNIX:
            clear_stale_socket(address.path, "bind")
            sock.bind(address.path)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address.host, address.port))
        sock.listen(backlog)
    except BindError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {address.describe()}: {exc.strerror or exc}"
                        + _bind_hint(exc)) from None
    return sock


def _bind_hint(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return " (another process listens there; stop it or choose another --bind)"
    if exc.errno == errno.EACCES:
        return " (ports below 1024 need root; choose a higher port)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return " (no interface has that address)"
    return ""


def _adopt(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(f"cannot use fd://{fd}: {exc.strerror or exc}") from None
    if sock.type != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise BindError(f"fd://{fd} is not a listening stream socket")
    # Shared with its owner (systemd, another master): its backlog and
    # filters are left alone (the master only borrows O_NONBLOCK, and hands
    # it back blocking, as listeners are handed over).
    return sock


#: systemd passes activated sockets from this descriptor on (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3
_ACTIVATION = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def activated(environ: MutableMapping[str, str]) -> tuple[list[int], list[str]]:
    """systemd socket activation: the descriptors (and names) passed to this
    process.  The variables are checked (LISTEN_PID must be ours) and then
    removed, so that children and sub-processes never take them for theirs."""
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    names = environ.get("LISTEN_FDNAMES", "")
    for var in _ACTIVATION:
        environ.pop(var, None)
    if pid != str(os.getpid()) or not count.isdigit() or int(count) < 1:
        return [], []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    return fds, (names.split(":") if names else [""] * len(fds))


def clear_stale_socket(path: str, what: str) -> None:
    """Remove a socket file left by a dead process, refusing anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise BindError(f"{what}: {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)     # nobody listens: a dead master's leftover
        return
    except OSError as exc:
        raise BindError(f"{what}: cannot check {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise BindError(f"{what}: {path} is in use by a running process; stop it or choose another path")


def listen_unix_private(path: str, backlog: int = 16) -> socket.socket:
    """A Unix listening socket with mode 0600 from the moment it exists."""
    clear_stale_socket(path, "status_socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)   # no window in which others may connect
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot create status socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


# SO_ATTACH_FILTER with a classic BPF program that drops pure SYNs only.  A
# TCP socket's filter sees the segment from its TCP header on, so byte 13 is
# the flags.  struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}.
_SO_ATTACH_FILTER = 26
_SYN, _ACK = 0x02, 0x10
_DROP_SYN = b"".join(struct.pack("HBBI", *insn) for insn in (
    (0x30, 0, 0, 13),               # ldb [13]          A = TCP flags
    (0x54, 0, 0, _SYN | _ACK),      # and #SYN|ACK
    (0x15, 0, 1, _SYN),             # jeq #SYN, drop, keep
    (0x06, 0, 0, 0),                # drop: ret #0
    (0x06, 0, 0, 0xFFFFFFFF),       # keep: ret #-1 (the whole segment)
))


def refuse_new_connections(sock: socket.socket) -> bool:
    """Graceful stop: drop new handshakes (pure SYNs) from now on; True if done.

    Everything else still reaches the listener: the ACK (or, with
    TCP_DEFER_ACCEPT, the first data) that completes a handshake already
    under way, so a client that believes it is connected is queued and
    served, never reset.  A client whose SYN is dropped retries it after a
    second and then meets either the closed port (connection refused: it
    never started) or a new server on the same port.  Only for a listener
    this master created: a filter on a shared socket would refuse the next
    master's connections too.  Unix sockets have no handshake (and take no
    filter); their path is removed instead.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    program = ctypes.create_string_buffer(_DROP_SYN, len(_DROP_SYN))
    fprog = struct.pack("HL", len(_DROP_SYN) // 8, ctypes.addressof(program))  # sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False    # the caller falls back to stopping at once
    return True


def readable(sock: socket.socket) -> bool:
    """True when a connection waits in the listener's accept queue (any family)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


_SYN_RECV = "03"


def handshakes_in_progress(sock: socket.socket) -> int:
    """Handshakes under way on a TCP listener (request sockets in SYN_RECV,
    TCP_DEFER_ACCEPT's included), from /proc/net/tcp{,6}: connections the
    accept queue does not show yet but that a client may already think
    established.  O(sockets on the host): call it only while stopping."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0
    host, port = sock.getsockname()[:2]
    # /proc prints the local address as 32-bit words in host byte order; a
    # wildcard listener's request sockets show the address they came to.
    raw = socket.inet_pton(sock.family, host)
    words = struct.unpack("=%dI" % (len(raw) // 4), raw)
    local = "" if not any(words) else "".join("%08X" % w for w in words)
    suffix = ":%04X" % port
    table = "/proc/net/tcp6" if sock.family == socket.AF_INET6 else "/proc/net/tcp"
    count = 0
    try:
        with open(table) as f:
            next(f, None)
            for line in f:
                cols = line.split(None, 4)
                if len(cols) > 3 and cols[3] == _SYN_RECV and cols[1].endswith(suffix) \
                        and (not local or cols[1].startswith(local + ":")):
                    count += 1
    except OSError:
        return 0
    return count


def set_nonblocking(sock: socket.socket, on: bool) -> None:
    """O_NONBLOCK on the file description itself (shared with every process
    that holds the socket), whatever the Python object believes."""
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    wanted = flags | os.O_NONBLOCK if on else flags & ~os.O_NONBLOCK
    if wanted != flags:
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, wanted)


def is_nonblocking(sock: socket.socket) -> bool:
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


def queue_depth(sock: socket.socket) -> int:
    """Connections waiting in a TCP listener's accept queue (0 if unknown)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return 0
    return int(struct.unpack_from("I", info, _TCPI_UNACKED_OFFSET)[0])


def describe(sock: socket.socket) -> str:
    """What the socket really listens on (port 0 resolved)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return "unix:" + (name if isinstance(name, str) else name.decode(errors="replace"))
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


class Peers:
    """Per-listener state for accepting from C: the listener's cached family,
    type and proto (``socket.family`` is a Python property that builds an
    enum on every read), and the buffer accept4() writes the peer's sockaddr
    into, decoded into what ``socket.accept()`` returns.
    """

    _MAX_HOSTS = 4096

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.fd = listener.fileno()
        # From the kernel, not the family and type properties: each builds an
        # enum.  (The master makes Peers before it forks -- see
        # Scoreboard.prepare_accept -- so no child copies pages for it.)
        self.family = listener.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        self.type = listener.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        self.proto = listener.proto
        self.buf = bytearray(128)           # sizeof(struct sockaddr_storage)
        self._hosts: dict[bytes, str] = {}  # IPv4 text by raw address, bounded

    def decode(self, length: int) -> object:
        buf = self.buf
        if self.family != socket.AF_INET:
            return _decode_other(self.family, bytes(buf[:length]))
        key = bytes(buf[4:8])
        host = self._hosts.get(key)
        if host is None:
            if len(self._hosts) >= self._MAX_HOSTS:
                self._hosts.clear()
            host = self._hosts[key] = socket.inet_ntop(socket.AF_INET, key)
        return (host, buf[2] << 8 | buf[3])


def _decode_other(family: int, raw: bytes) -> object:
    """An IPv6 or Unix peer sockaddr, as socket.accept() would return it."""
    if family == socket.AF_INET6:
        port, flow, = struct.unpack_from("!HI", raw, 2)
        scope, = struct.unpack_from("I", raw, 24)
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, scope)
    path = raw[2:].split(b"\0", 1)[0]
    return path.decode(errors="surrogateescape")
