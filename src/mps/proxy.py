"""HAProxy's PROXY protocol (versions 1 and 2), receiver side, spoken directly.

A balancer in TCP mode (HAProxy ``send-proxy``/``send-proxy-v2``, nginx
``proxy_protocol``, most cloud load balancers) prepends one header to each
connection naming the real client.  This module is the layer below the worker
that reads it:

- :func:`parse_v1` and :func:`parse_v2` are pure parsers of one complete
  header; every malformed, oversized or unsupported header raises
  :class:`ProxyError` with a one-line reason.
- :func:`read_header` takes exactly the header's bytes off a connected socket,
  within a deadline, and nothing more: what the client sent after it stays in
  the socket for the handler.
- :class:`Allowed` is ``proxy_allow_ips``; :func:`real_address` turns a header
  into the address the handler sees.
- :func:`accept_proxied` is all of it for one accepted connection, logging
  included: the worker's one call.

Not done, on purpose: the CRC32C TLV is kept but not verified (the spec asks a
receiver to verify it only if it supports it), and UDP/UNIX address blocks fall
back to the balancer's own address, as the spec allows.
"""
from __future__ import annotations

import ipaddress
import math
import re
import select
import socket
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .logs import log, printable

#: The deadline for the whole header.  The spec's floor is "at least 3 seconds
#: to cover a TCP retransmit": the balancer sends the header with the
#: connection, so it is late only when its segment was lost and resent (the
#: first retransmission comes after the initial RTO of 1 s, RFC 6298).  No
#: longer, because a child waiting here serves nobody: a peer that connects
#: and stays silent must not hold a child for the handler's whole timeout.
PROXY_TIMEOUT_S = 3.0

#: v1: the longest line the spec allows, CRLF included ("PROXY UNKNOWN" with
#: two full IPv6 addresses and two 5-digit ports).
V1_MAX = 107
V1_PREFIX = b"PROXY "

#: v2: the 12-byte signature, then version/command, family/protocol and the
#: big-endian length of what follows (addresses, then TLVs).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
#: Our bound on v2's length field.  The spec designs both formats to fit the
#: smallest segment every TCP host must accept (576 - 40 = 536 bytes); we allow
#: that much after the fixed part, enough for any address block (UNIX: 216)
#: and the TLVs real balancers send, while the 16-bit field could claim 64 KiB
#: from a child that would then wait for it.
V2_MAX_LEN = 536
#: The most bytes read_header ever takes (and peeks): the larger of the two.
HEADER_MAX = max(V1_MAX, V2_FIXED + V2_MAX_LEN)

_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")     # no leading zeros: not octal


class ProxyError(Exception):
    """A missing, malformed, oversized, unsupported or late header; str() is
    the one-line reason (it may quote the peer's bytes: escape before logging)."""


class Command(IntEnum):
    """v2's command nibble; a v1 header always means PROXY."""

    LOCAL = 0x0     # the balancer's own connection (a health check)
    PROXY = 0x1     # relayed: the header names the client


class Family(IntEnum):
    UNSPEC = 0      # v2 AF_UNSPEC, or a family/protocol we do not take up
    TCP4 = 1
    TCP6 = 2
    UNKNOWN = 3     # v1 "PROXY UNKNOWN": use the real connection's endpoints


Endpoint = tuple[str, int]      # (host, port), the host in canonical form


@dataclass(frozen=True)
class Header:
    """One parsed header.  ``source``/``destination`` are set for TCP4 and
    TCP6 under the PROXY command, None otherwise."""

    version: int
    command: Command
    family: Family
    source: Endpoint | None = None
    destination: Endpoint | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()     # v2 (type, value), in order


# --- the parsers -----------------------------------------------------------

def parse(data: bytes) -> Header:
    """One complete header of either version, told apart by its first byte."""
    if data[:1] == V2_SIGNATURE[:1]:
        return parse_v2(data)
    return parse_v1(data)


def parse_v1(data: bytes) -> Header:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``,
    exactly: single spaces, canonical addresses, ports without leading zeros."""
    if len(data) > V1_MAX:
        raise ProxyError(f"v1 header is {len(data)} bytes, more than {V1_MAX}")
    if not data.startswith(V1_PREFIX):
        raise ProxyError(f"not a PROXY header: starts with {bytes(data[:8])!r}")
    if not data.endswith(b"\r\n"):
        raise ProxyError("v1 header does not end with CRLF")
    line = data[:-2]
    if b"\r" in line or b"\n" in line:
        raise ProxyError("v1 header has a lone CR or LF")
    try:
        fields = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not US-ASCII") from None
    proto = fields[1]
    if proto == "UNKNOWN":      # the spec: ignore whatever follows it
        return Header(1, Command.PROXY, Family.UNKNOWN)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyError(f"v1 protocol {proto[:16]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyError(f"v1 {proto} needs 4 fields after it, one space apart; "
                         f"got {len(fields) - 2}")
    family = Family.TCP4 if proto == "TCP4" else Family.TCP6
    return Header(1, Command.PROXY, family,
                  (_v1_host(fields[2], family), _v1_port(fields[4])),
                  (_v1_host(fields[3], family), _v1_port(fields[5])))


def _v1_host(text: str, family: Family) -> str:
    try:
        if "%" in text:         # a scope id names an interface of the sender's
            raise ValueError
        addr = (ipaddress.IPv4Address(text) if family is Family.TCP4
                else ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyError(f"v1 {family.name}: bad address {text[:40]!r}") from None
    return str(addr)


def _v1_port(text: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyError(f"v1: bad port {text[:8]!r}")
    return int(text)


def parse_v2(data: bytes) -> Header:
    """The binary header: signature, version 2, LOCAL or PROXY, the family,
    the addresses, then TLVs; ``data`` must be exactly one header."""
    if len(data) < V2_FIXED:
        raise ProxyError(f"v2 header truncated: {len(data)} of its {V2_FIXED} fixed bytes")
    if data[:12] != V2_SIGNATURE:
        raise ProxyError("bad v2 signature")
    command = _v2_command(data[12])
    length = _v2_length(data)
    if len(data) != V2_FIXED + length:
        raise ProxyError(f"v2 header declares {V2_FIXED + length} bytes, got {len(data)}")
    if command is Command.LOCAL:    # the spec: discard the block, family included
        return Header(2, command, Family.UNSPEC)
    fam, body = data[13], bytes(data[V2_FIXED:])
    if fam >> 4 > 3 or fam & 0xF > 2:
        raise ProxyError(f"v2 address family/protocol 0x{fam:02x} is not defined")
    if fam == 0x11:
        family, size, width = Family.TCP4, 12, 4
    elif fam == 0x21:
        family, size, width = Family.TCP6, 36, 16
    else:   # UNSPEC, UDP, UNIX: the spec lets a receiver fall back to UNSPEC
        return Header(2, command, Family.UNSPEC)
    if length < size:
        raise ProxyError(f"v2 {family.name} needs {size} address bytes, header has {length}")
    hosts = [str(ipaddress.ip_address(body[i:i + width])) for i in (0, width)]
    ports = [int.from_bytes(body[i:i + 2], "big") for i in (2 * width, 2 * width + 2)]
    return Header(2, command, family, (hosts[0], ports[0]), (hosts[1], ports[1]),
                  _v2_tlvs(body[size:]))


def _v2_command(ver_cmd: int) -> Command:
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2 header version {ver_cmd >> 4} is not 2")
    if ver_cmd & 0xF > 1:
        raise ProxyError(f"v2 command 0x{ver_cmd & 0xF:x} is neither LOCAL nor PROXY")
    return Command(ver_cmd & 0xF)


def _v2_length(data: bytes) -> int:
    length = int.from_bytes(data[14:16], "big")
    if length > V2_MAX_LEN:
        raise ProxyError(f"v2 header length {length} is over our bound of {V2_MAX_LEN}")
    return length


def _v2_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    pos = 0
    while pos < len(block):
        if len(block) - pos < 3:
            raise ProxyError("v2 TLV truncated")
        kind, size = block[pos], int.from_bytes(block[pos + 1:pos + 3], "big")
        pos += 3
        if size > len(block) - pos:
            raise ProxyError(f"v2 TLV 0x{kind:02x} of {size} bytes overruns the header")
        tlvs.append((kind, block[pos:pos + size]))
        pos += size
    return tuple(tlvs)


def header_length(view: bytes) -> int | None:
    """The length of the header ``view`` begins with, or None when more bytes
    must come before it is known; ProxyError as soon as ``view`` cannot begin
    a valid header (so an HTTP request is turned away at once, not at the
    deadline)."""
    if view[:1] == V2_SIGNATURE[:1]:
        n = min(len(view), len(V2_SIGNATURE))
        if view[:n] != V2_SIGNATURE[:n]:
            raise ProxyError("bad v2 signature")
        if len(view) > 12:
            _v2_command(view[12])
        return V2_FIXED + _v2_length(view) if len(view) >= V2_FIXED else None
    n = min(len(view), len(V1_PREFIX))
    if view[:n] != V1_PREFIX[:n]:
        raise ProxyError(f"not a PROXY header: starts with {bytes(view[:8])!r}")
    lf = view.find(b"\n", 0, V1_MAX)
    if lf >= 0:
        return lf + 1
    if len(view) >= V1_MAX:
        raise ProxyError(f"v1 header has no CRLF within {V1_MAX} bytes")
    return None


# --- the socket ------------------------------------------------------------

def read_header(sock: socket.socket, timeout: float) -> Header:
    """Take one header off ``sock`` (connected; blocking or not) within
    ``timeout`` seconds for the whole header, and parse it.

    Only header bytes are ever consumed: each pass peeks at what has arrived,
    works out how much of it is header (v1: up to the first LF; v2: the fixed
    part, then the length it declares) and receives just that.  Whatever is
    taken is gone from the socket, so the next poll() waits for *new* bytes: a
    peer trickling one byte at a time costs one pass per byte, never a spin.
    Timeout, EOF, reset and every malformed header raise ProxyError.
    """
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(sock, select.POLLIN)    # POLLERR/POLLHUP are always reported
    head = b""
    while True:
        left = deadline - time.monotonic()
        if not poller.poll(max(0, math.ceil(left * 1000))):
            raise ProxyError(f"timed out after {timeout:g} s waiting for the PROXY header "
                             f"({len(head)} bytes received)")
        more = _recv(sock, HEADER_MAX - len(head), socket.MSG_PEEK, len(head))
        if more is None:
            continue            # a spurious wake-up: poll again
        view = head + more
        total = header_length(view)
        end = len(view) if total is None else min(total, len(view))
        taken = _recv(sock, end - len(head), 0, len(head))
        head += taken or b""
        if total is not None and len(head) == total:
            return parse(head)


def _recv(sock: socket.socket, size: int, flags: int, have: int) -> bytes | None:
    """One non-blocking recv; None if nothing is there, ProxyError on EOF or error."""
    try:
        data = sock.recv(size, flags | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise ProxyError(f"connection failed after {have} header bytes: "
                         f"{exc.strerror or exc}") from None
    if not data:
        raise ProxyError(f"connection closed after {have} header bytes")
    return data


# --- who may send one, and what the handler sees ----------------------------

class Allowed:
    """``proxy_allow_ips``: comma-separated addresses and networks allowed to
    send a header; ``*`` allows anyone.  ValueError on an entry that is
    neither (config.Settings has already refused those).

    An IPv4-mapped IPv6 peer (``::ffff:127.0.0.1``, a dual-stack listener)
    matches its IPv4 entries.  Answers are cached, the cache bounded.
    """

    CACHE_MAX = 1024

    def __init__(self, spec: str) -> None:
        items = [item.strip() for item in spec.split(",") if item.strip()]
        self.anyone = "*" in items
        self.networks = tuple(ipaddress.ip_network(item, strict=False)
                              for item in items if item != "*")
        self.cache: dict[str, bool] = {}

    def __contains__(self, host: str) -> bool:
        if self.anyone:
            return True
        known = self.cache.get(host)
        if known is None:
            known = self.match(host)
            if len(self.cache) >= self.CACHE_MAX:
                self.cache.clear()
            self.cache[host] = known
        return known

    def match(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        return any(a in net for a in candidates for net in self.networks)


def real_address(header: Header, peer: Any) -> Any:
    """The address the handler sees, shaped as socket.accept() gives it for the
    header's family: ``(host, port)`` for TCP4, ``(host, port, 0, 0)`` for
    TCP6.  LOCAL (a health check), UNKNOWN and UNSPEC keep the real peer."""
    if header.command is not Command.PROXY or header.source is None:
        return peer
    host, port = header.source
    return (host, port, 0, 0) if header.family is Family.TCP6 else (host, port)


def accept_proxied(conn: socket.socket, peer: Any, allowed: Allowed,
                   timeout: float = PROXY_TIMEOUT_S) -> Any | None:
    """For one accepted connection, with proxy_protocol on: the address its
    handler should see; or None when the connection was turned away (peer
    not allowed, or no valid header in time), after one log line, with
    ``conn`` already closed: the handler must not run.

    A Unix-socket peer (``peer`` not a tuple) is local, and trusted as
    loopback is: the socket file's permissions are its allow list.
    """
    host = peer[0] if isinstance(peer, tuple) and peer and isinstance(peer[0], str) else None
    if host is not None and host not in allowed:
        log.warning("PROXY protocol: %s is not in proxy_allow_ips; connection closed "
                    "(add the balancer's address there if it is yours)", printable(host))
        conn.close()
        return None
    try:
        header = read_header(conn, timeout)
    except ProxyError as exc:
        log.warning("PROXY protocol: bad header from %s: %s; connection closed",
                    printable(host if host is not None else "unix socket"),
                    printable(str(exc)))
        conn.close()
        return None
    return real_address(header, peer)
