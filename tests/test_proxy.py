"""The PROXY protocol layer (src/mps/proxy.py): both parsers table-driven,
read_header over real sockets (exactly the header consumed, trickled bytes,
deadlines, EOF and reset), the allow list, and hypothesis fuzzing of both."""
from __future__ import annotations

import ast
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from mps import logs, proxy
from mps.proxy import (Allowed, Command, Family, Header, ProxyError, accept_proxied,
                       parse, parse_v1, parse_v2, read_header, real_address)

PROXY, LOCAL = Command.PROXY, Command.LOCAL
TCP4, TCP6, UNKNOWN, UNSPEC = Family.TCP4, Family.TCP6, Family.UNKNOWN, Family.UNSPEC


def v2(ver_cmd: int = 0x21, fam: int = 0x11, body: bytes = b"", length: int | None = None) -> bytes:
    """A v2 header; ``length`` overrides the declared length."""
    size = len(body) if length is None else length
    return proxy.V2_SIGNATURE + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def ports(src: int, dst: int) -> bytes:
    return src.to_bytes(2, "big") + dst.to_bytes(2, "big")


V4_BODY = (ipaddress.IPv4Address("192.0.2.1").packed + ipaddress.IPv4Address("198.51.100.7").packed
           + ports(56324, 443))
V6_BODY = (ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("2001:db8::2").packed
           + ports(1, 65535))
V6_MAX = ":".join(["ffff"] * 8)
H4 = Header(2, PROXY, TCP4, ("192.0.2.1", 56324), ("198.51.100.7", 443))

# (id, header bytes, what it parses to)
VALID: list[tuple[str, bytes, Header]] = [
    ("v1-tcp4", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     Header(1, PROXY, TCP4, ("192.168.0.1", 56324), ("192.168.0.11", 443))),
    ("v1-tcp4-extremes", b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
     Header(1, PROXY, TCP4, ("255.255.255.255", 65535), ("0.0.0.0", 0))),
    ("v1-tcp6-canonical", b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 1 2\r\n",
     Header(1, PROXY, TCP6, ("2001:db8::1", 1), ("2001:db8::2", 2))),
    ("v1-tcp6-longest", f"PROXY TCP6 {V6_MAX} {V6_MAX} 65535 65535\r\n".encode(),
     Header(1, PROXY, TCP6, (V6_MAX, 65535), (V6_MAX, 65535))),
    ("v1-unknown-short", b"PROXY UNKNOWN\r\n", Header(1, PROXY, UNKNOWN)),
    ("v1-unknown-worst-case-107", f"PROXY UNKNOWN {V6_MAX} {V6_MAX} 65535 65535\r\n".encode(),
     Header(1, PROXY, UNKNOWN)),
    ("v1-unknown-ignores-the-rest", b"PROXY UNKNOWN anything  at all\r\n",
     Header(1, PROXY, UNKNOWN)),
    ("v2-proxy-tcp4", v2(0x21, 0x11, V4_BODY), H4),
    ("v2-proxy-tcp6", v2(0x21, 0x21, V6_BODY),
     Header(2, PROXY, TCP6, ("2001:db8::1", 1), ("2001:db8::2", 65535))),
    ("v2-local", v2(0x20, 0x00), Header(2, LOCAL, UNSPEC)),
    ("v2-local-skips-its-block", v2(0x20, 0x11, V4_BODY + tlv(0x04, b"")), Header(2, LOCAL, UNSPEC)),
    ("v2-local-ignores-the-family", v2(0x20, 0xFF, b"junk"), Header(2, LOCAL, UNSPEC)),
    ("v2-tlvs", v2(0x21, 0x11, V4_BODY + tlv(0x01, b"h2") + tlv(0x04, b"") + tlv(0x05, b"id-42")),
     Header(2, PROXY, TCP4, H4.source, H4.destination,
            ((0x01, b"h2"), (0x04, b""), (0x05, b"id-42")))),
    ("v2-tlvs-up-to-the-bound", v2(0x21, 0x11, V4_BODY + tlv(0xE0, bytes(proxy.V2_MAX_LEN - 15))),
     Header(2, PROXY, TCP4, H4.source, H4.destination,
            ((0xE0, bytes(proxy.V2_MAX_LEN - 15)),))),
    ("v2-proxy-unspec", v2(0x21, 0x00), Header(2, PROXY, UNSPEC)),
    ("v2-udp4-falls-back", v2(0x21, 0x12, V4_BODY), Header(2, PROXY, UNSPEC)),
    ("v2-unix-stream-falls-back", v2(0x21, 0x31, bytes(216)), Header(2, PROXY, UNSPEC)),
]

# (id, bytes, a fragment of the one-line reason)
MALFORMED: list[tuple[str, bytes, str]] = [
    # v1
    ("http-request", b"GET / HTTP/1.1\r\n", "not a PROXY header"),
    ("empty", b"", "not a PROXY header"),
    ("lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY header"),
    ("no-space-after-PROXY", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY header"),
    ("v1-truncated", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", "does not end with CRLF"),
    ("v1-bare-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "does not end with CRLF"),
    ("v1-lone-cr", b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "lone CR or LF"),
    ("v1-two-lines", b"PROXY UNKNOWN\r\nPROXY UNKNOWN\r\n", "lone CR or LF"),
    ("v1-oversized", b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n", "more than 107"),
    ("v1-not-ascii", b"PROXY TCP4 1.2.3.4 5.6.7.\xff 1 2\r\n", "not US-ASCII"),
    ("v1-protocol-tcp5", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
    ("v1-protocol-udp4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
    ("v1-protocol-missing", b"PROXY \r\n", "not TCP4, TCP6 or UNKNOWN"),
    ("v1-unknownx", b"PROXY UNKNOWNX\r\n", "not TCP4, TCP6 or UNKNOWN"),
    ("v1-double-space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "needs 4 fields"),
    ("v1-field-missing", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs 4 fields"),
    ("v1-field-extra", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "needs 4 fields"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "needs 4 fields"),
    ("v1-tab", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "needs 4 fields"),
    ("v1-octet-leading-zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad address"),
    ("v1-octet-256", b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", "bad address"),
    ("v1-three-octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad address"),
    ("v1-hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "bad address"),
    ("v1-v6-in-tcp4", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad address"),
    ("v1-v4-in-tcp6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad address"),
    ("v1-v6-scope", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad address"),
    ("v1-v6-nine-groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad address"),
    ("v1-port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "bad port"),
    ("v1-port-negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
    ("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad port"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", "bad port"),
    # v2
    ("v2-truncated-fixed", proxy.V2_SIGNATURE + b"\x21", "truncated"),
    ("v2-bad-signature", b"\r\n\r\n\x00\r\nQUIT\r" + b"\x21\x11\x00\x0c" + V4_BODY, "bad v2 signature"),
    ("v2-version-1", v2(0x11, 0x11, V4_BODY), "version 1 is not 2"),
    ("v2-version-3", v2(0x31, 0x11, V4_BODY), "version 3 is not 2"),
    ("v2-command-2", v2(0x22, 0x11, V4_BODY), "neither LOCAL nor PROXY"),
    ("v2-command-f", v2(0x2F, 0x11, V4_BODY), "neither LOCAL nor PROXY"),
    ("v2-length-over-bound", v2(0x21, 0x11, V4_BODY + bytes(proxy.V2_MAX_LEN - 11)), "over our bound"),
    ("v2-length-ffff", v2(0x21, 0x11, V4_BODY, length=0xFFFF), "over our bound"),
    ("v2-body-truncated", v2(0x21, 0x11, V4_BODY[:5], length=12), "declares 28 bytes, got 21"),
    ("v2-trailing-byte", v2(0x21, 0x11, V4_BODY) + b"x", "declares 28 bytes, got 29"),
    ("v2-tcp4-short-block", v2(0x21, 0x11, V4_BODY[:8]), "TCP4 needs 12 address bytes"),
    ("v2-tcp6-with-v4-block", v2(0x21, 0x21, V4_BODY), "TCP6 needs 36 address bytes"),
    ("v2-family-undefined", v2(0x21, 0x41, V4_BODY), "0x41 is not defined"),
    ("v2-protocol-undefined", v2(0x21, 0x13, V4_BODY), "0x13 is not defined"),
    ("v2-tlv-truncated", v2(0x21, 0x11, V4_BODY + b"\x01\x00"), "TLV truncated"),
    ("v2-tlv-overrun", v2(0x21, 0x11, V4_BODY + b"\x01\x00\x05ab"), "overruns the header"),
]


# --- the parsers, table-driven ---------------------------------------------

@pytest.mark.parametrize("data, expected", [(d, h) for _, d, h in VALID], ids=[i for i, _, _ in VALID])
def test_a_valid_header_parses(data: bytes, expected: Header) -> None:
    assert parse(data) == expected
    assert (parse_v1 if expected.version == 1 else parse_v2)(data) == expected


def test_the_v1_limits_are_the_specs() -> None:
    assert len(dict((i, d) for i, d, _ in VALID)["v1-unknown-worst-case-107"]) == proxy.V1_MAX == 107
    assert len(dict((i, d) for i, d, _ in VALID)["v1-tcp6-longest"]) == 104


@pytest.mark.parametrize("data, reason", [(d, r) for _, d, r in MALFORMED],
                         ids=[i for i, _, _ in MALFORMED])
def test_a_malformed_header_raises_proxy_error_with_one_line(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyError) as info:
        parse(data)
    assert reason in str(info.value)
    assert "\n" not in str(info.value) and "\r" not in str(info.value)


def test_each_parser_refuses_the_other_version() -> None:
    with pytest.raises(ProxyError, match="not a PROXY header"):
        parse_v1(v2(0x21, 0x11, V4_BODY))
    with pytest.raises(ProxyError, match="bad v2 signature"):
        parse_v2(b"PROXY UNKNOWN\r\n" + bytes(8))


# --- real_address -----------------------------------------------------------

PEER4 = ("127.0.0.1", 40000)


@pytest.mark.parametrize("header, expected", [
    (Header(1, PROXY, TCP4, ("192.0.2.1", 5), ("192.0.2.2", 80)), ("192.0.2.1", 5)),
    (Header(2, PROXY, TCP6, ("2001:db8::1", 6), ("2001:db8::2", 80)), ("2001:db8::1", 6, 0, 0)),
    (Header(2, LOCAL, UNSPEC), PEER4),
    (Header(1, PROXY, UNKNOWN), PEER4),
    (Header(2, PROXY, UNSPEC), PEER4),
], ids=["tcp4", "tcp6", "local", "unknown", "unspec"])
def test_real_address_is_shaped_like_accept(header: Header, expected: object) -> None:
    assert real_address(header, PEER4) == expected


# --- read_header over real sockets ------------------------------------------

@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


Pair = tuple[socket.socket, socket.socket]      # (client, server side)


def tcp_pair(listener: socket.socket) -> Pair:
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server


def unix_pair(listener: socket.socket) -> Pair:
    client, server = socket.socketpair()
    return client, server


@pytest.fixture(params=[tcp_pair, unix_pair], ids=["tcp", "unix"])
def pair(request: pytest.FixtureRequest, listener: socket.socket) -> Iterator[Pair]:
    make: Callable[[socket.socket], Pair] = request.param
    client, server = make(listener)
    yield client, server
    client.close()
    server.close()


@pytest.fixture
def tcp(listener: socket.socket) -> Iterator[Pair]:
    client, server = tcp_pair(listener)
    yield client, server
    client.close()
    server.close()


def rest(sock: socket.socket, timeout: float = 2.0) -> bytes:
    """Everything still readable on ``sock`` until the peer's EOF."""
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def available(sock: socket.socket, size: int, timeout: float = 2.0) -> bytes:
    """Exactly ``size`` bytes (the peer keeps its side open)."""
    sock.settimeout(timeout)
    out = b""
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        assert chunk, "EOF before the expected bytes"
        out += chunk
    return out


APP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()`` in a thread: its result (or exception), or an AssertionError if
    it still runs after ``seconds``, so a reader that spins past its deadline
    fails the test instead of hanging it."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:    # handed to the test's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def read(server: socket.socket, timeout: float) -> Header:
    """read_header, failing (not hanging) if it overstays its deadline by 1.5 s."""
    header: Header = within(timeout + 1.5, lambda: read_header(server, timeout))
    return header


@pytest.mark.parametrize("data, expected", [(d, h) for _, d, h in VALID], ids=[i for i, _, _ in VALID])
def test_read_header_takes_exactly_the_header(pair: Pair, data: bytes, expected: Header) -> None:
    client, server = pair
    client.sendall(data + APP)      # one send: header and request in the same segment
    t0 = time.monotonic()
    assert read(server, 5.0) == expected
    assert time.monotonic() - t0 < 2.0      # did not wait for anything more
    assert available(server, len(APP)) == APP


def test_read_header_returns_without_waiting_for_the_client(tcp: Pair) -> None:
    # The header alone, the peer still open and silent (a server-speaks-first protocol).
    client, server = tcp
    client.sendall(b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 80\r\n")
    t0 = time.monotonic()
    assert read(server, 5.0).source == ("10.0.0.1", 1000)
    assert time.monotonic() - t0 < 2.0
    client.sendall(b"late")
    assert available(server, 4) == b"late"


class CountingSocket(socket.socket):
    """Counts recv() calls: a busy-looping reader would make thousands."""

    calls: int

    def recv(self, *args: Any) -> bytes:
        self.calls += 1
        return super().recv(*args)


def counting(sock: socket.socket) -> CountingSocket:
    wrapped = CountingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    wrapped.calls = 0
    return wrapped


def trickle(sock: socket.socket, data: bytes, pause: float) -> threading.Thread:
    def run() -> None:
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
            time.sleep(pause)   # the point of the test: a peer that sends slowly
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("data, expected", [
    (VALID[2][1], VALID[2][2]),
    (v2(0x21, 0x11, V4_BODY + tlv(0x01, b"h2")), Header(2, PROXY, TCP4, H4.source, H4.destination,
                                                      ((0x01, b"h2"),))),
], ids=["v1", "v2"])
def test_a_trickled_header_parses_without_spinning(pair: Pair, data: bytes, expected: Header) -> None:
    client, raw = pair
    server = counting(raw)
    try:
        sender = trickle(client, data + APP, 0.003)
        t0 = time.process_time()
        assert read(server, 10.0) == expected
        cpu = time.process_time() - t0
        sender.join(10)
        assert available(server, len(APP)) == APP
        # One peek and one recv per arrived byte at most (+ the final reads).
        assert server.calls <= 2 * len(data) + 2 * len(APP) + 4
        assert cpu < 1.0
    finally:
        server.close()


def test_a_silent_peer_times_out_within_the_deadline(pair: Pair) -> None:
    _, server = pair
    t0 = time.monotonic()
    with pytest.raises(ProxyError, match=r"^timed out after 0.3 s .*\(0 bytes received\)"):
        read(server, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_a_peer_that_stalls_mid_header_times_out(pair: Pair) -> None:
    client, server = pair
    client.sendall(b"PROXY TCP4 1.2")
    t0 = time.monotonic()
    with pytest.raises(ProxyError, match=r"timed out .*\(14 bytes received\)"):
        read(server, 0.3)
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_a_peer_closing_mid_header_is_an_error(pair: Pair) -> None:
    client, server = pair
    client.sendall(v2(0x21, 0x11, V4_BODY)[:20])
    client.close()
    with pytest.raises(ProxyError, match="connection closed after 20 header bytes"):
        read(server, 5.0)


def test_a_peer_closing_before_any_byte_is_an_error(pair: Pair) -> None:
    client, server = pair
    client.close()
    with pytest.raises(ProxyError, match="connection closed after 0 header bytes"):
        read(server, 5.0)


def test_a_reset_mid_header_is_an_error(tcp: Pair) -> None:
    client, server = tcp
    client.sendall(b"PROXY TCP4 ")
    server.settimeout(2.0)
    assert server.recv(1, socket.MSG_PEEK) == b"P"      # arrived before the reset
    server.settimeout(None)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()      # SO_LINGER 0: an RST, not a FIN
    t0 = time.monotonic()
    with pytest.raises(ProxyError, match="connection (failed|closed) after"):
        read(server, 5.0)
    assert time.monotonic() - t0 < 2.0


def test_a_non_proxy_peer_is_refused_at_once_and_nothing_is_consumed(pair: Pair) -> None:
    client, server = pair
    client.sendall(APP)
    t0 = time.monotonic()
    with pytest.raises(ProxyError, match="not a PROXY header"):
        read(server, 5.0)
    assert time.monotonic() - t0 < 2.0
    assert available(server, len(APP)) == APP


def test_a_v1_line_without_crlf_is_refused_after_107_bytes(pair: Pair) -> None:
    client, server = pair
    data = b"PROXY UNKNOWN " + b"x" * 300
    client.sendall(data)
    with pytest.raises(ProxyError, match="no CRLF within 107 bytes"):
        read(server, 5.0)
    client.close()
    assert len(rest(server)) >= len(data) - proxy.V1_MAX


def test_a_v2_length_beyond_the_bound_is_refused_without_waiting_for_it(pair: Pair) -> None:
    client, server = pair
    client.sendall(v2(0x21, 0x11, V4_BODY, length=0xFFFF))
    t0 = time.monotonic()
    with pytest.raises(ProxyError, match="over our bound"):
        read(server, 5.0)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("mode", ["non-blocking", "timeout"])
def test_read_header_works_whatever_the_sockets_mode(pair: Pair, mode: str) -> None:
    client, server = pair
    if mode == "non-blocking":
        server.setblocking(False)
    else:
        server.settimeout(0.05)
    sender = trickle(client, VALID[0][1] + b"!", 0.002)
    assert read(server, 5.0) == VALID[0][2]
    sender.join(5)
    assert available(server, 1) == b"!"


# --- Allowed ----------------------------------------------------------------

@pytest.mark.parametrize("spec, host, allowed", [
    ("127.0.0.1,::1", "127.0.0.1", True),
    ("127.0.0.1,::1", "::1", True),
    ("127.0.0.1,::1", "127.0.0.2", False),
    ("127.0.0.1,::1", "::2", False),
    ("10.0.0.0/8", "10.200.3.4", True),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("192.168.1.5/24", "192.168.1.200", True),        # host bits set: the network is meant
    ("2001:db8::/32", "2001:db8:ffff::5", True),
    ("2001:db8::/32", "2001:db9::1", False),
    ("fe80::/10", "fe80::1%eth0", True),
    ("127.0.0.1", "::ffff:127.0.0.1", True),          # a v4 client on a dual-stack listener
    ("::1", "127.0.0.1", False),
    (" 127.0.0.1 , 10.0.0.0/8 ", "10.9.9.9", True),
    ("*", "203.0.113.9", True),
    ("*", "2001:db8::9", True),
    ("10.0.0.1,*", "203.0.113.9", True),
    ("", "127.0.0.1", False),
    ("127.0.0.1", "localhost", False),
    ("127.0.0.1", "", False),
])
def test_allowed(spec: str, host: str, allowed: bool) -> None:
    rule = Allowed(spec)
    assert (host in rule) is allowed
    assert (host in rule) is allowed    # the cached answer too


def test_allowed_cache_is_bounded_and_still_right() -> None:
    rule = Allowed("10.0.0.0/16")
    for i in range(3 * Allowed.CACHE_MAX):
        host = f"10.{i % 2}.{i // 256 % 256}.{i % 256}"
        assert (host in rule) is (i % 2 == 0)
        assert len(rule.cache) <= Allowed.CACHE_MAX


def test_allowed_refuses_a_bad_entry() -> None:
    with pytest.raises(ValueError):
        Allowed("127.0.0.1,example.com")


# --- accept_proxied: the worker's one call ----------------------------------

@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    keep, level = Keep(), logs.log.level
    logs.log.addHandler(keep)
    logs.log.setLevel(logging.INFO)
    yield got
    logs.log.removeHandler(keep)
    logs.log.setLevel(level)


def test_accept_proxied_gives_the_client_address(tcp: Pair, records: list[logging.LogRecord]) -> None:
    client, server = tcp
    client.sendall(b"PROXY TCP6 2001:db8::7 2001:db8::1 4321 80\r\n" + APP)
    peer = client.getsockname()
    assert accept_proxied(server, peer, Allowed("127.0.0.1")) == ("2001:db8::7", 4321, 0, 0)
    assert available(server, len(APP)) == APP
    assert records == []


def test_accept_proxied_keeps_the_peer_for_a_health_check(tcp: Pair) -> None:
    client, server = tcp
    client.sendall(v2(0x20, 0x00))
    peer = client.getsockname()
    assert accept_proxied(server, peer, Allowed("127.0.0.1")) == peer


def test_accept_proxied_closes_an_untrusted_peer_with_one_line(
        tcp: Pair, records: list[logging.LogRecord]) -> None:
    client, server = tcp
    client.sendall(VALID[0][1])
    assert accept_proxied(server, client.getsockname(), Allowed("10.0.0.0/8")) is None
    assert server.fileno() == -1
    try:        # unread bytes at close make the kernel send an RST rather than a FIN
        assert rest(client) == b""
    except ConnectionResetError:
        pass
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "127.0.0.1 is not in proxy_allow_ips" in records[0].getMessage()


def test_accept_proxied_closes_a_bad_header_with_one_escaped_line(
        tcp: Pair, records: list[logging.LogRecord]) -> None:
    client, server = tcp
    client.sendall(b"\x1b[2J\r\nGET /\r\n")
    assert accept_proxied(server, client.getsockname(), Allowed("127.0.0.1")) is None
    assert server.fileno() == -1
    assert len(records) == 1
    line = records[0].getMessage()
    assert "bad header from 127.0.0.1" in line
    assert all(ch.isprintable() for ch in line), line


def test_accept_proxied_times_out_a_silent_peer(tcp: Pair, records: list[logging.LogRecord]) -> None:
    client, server = tcp
    assert accept_proxied(server, client.getsockname(), Allowed("*"), timeout=0.2) is None
    assert "timed out" in records[0].getMessage()


def test_accept_proxied_trusts_a_unix_socket_peer(records: list[logging.LogRecord]) -> None:
    client, server = socket.socketpair()
    with client, server:
        client.sendall(VALID[0][1])
        assert accept_proxied(server, "", Allowed("10.0.0.0/8")) == ("192.168.0.1", 56324)
    assert records == []


# --- the layer's imports ------------------------------------------------------

def test_proxy_imports_only_the_stdlib_and_the_bottom_of_mps() -> None:
    source = Path(proxy.__file__).read_text()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    local = {name for name in found if name.startswith(".") or name.startswith("mps")}
    assert local <= {".logs", ".errors", "mps.logs", "mps.errors"}
    stdlib = found - local - {"__future__"}
    assert all(name.split(".")[0] in sys.stdlib_module_names for name in stdlib), stdlib


# --- fuzzing --------------------------------------------------------------------

VALID_BYTES = [data for _, data, _ in VALID]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid header with a few bytes flipped, inserted, deleted, or cut off."""
    data = bytearray(draw(st.sampled_from(VALID_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[i]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


inputs = st.one_of(st.binary(max_size=700), mutated(),
                   st.binary(max_size=40).map(lambda b: b"PROXY " + b),
                   st.binary(max_size=600).map(lambda b: proxy.V2_SIGNATURE + b))


def check_header(header: Header) -> None:
    for end in (header.source, header.destination):
        if end is not None:
            ipaddress.ip_address(end[0])
            assert 0 <= end[1] <= 65535
    assert (header.source is None) == (header.family in (UNSPEC, UNKNOWN))


@settings(max_examples=1500, deadline=None)
@given(inputs)
def test_fuzz_parsers_raise_only_proxy_error(data: bytes) -> None:
    for fn in (parse, parse_v1, parse_v2):
        try:
            check_header(fn(data))
        except ProxyError as exc:
            assert "\n" not in str(exc)
    try:
        total = proxy.header_length(data) if data else None
    except ProxyError:
        return
    assert total is None or len(proxy.V1_PREFIX) < total <= proxy.HEADER_MAX


@settings(max_examples=250, deadline=None)
@given(inputs, st.binary(max_size=64))
def test_fuzz_read_header_consumes_no_more_than_the_header(data: bytes, tail: bytes) -> None:
    client, server = socket.socketpair()
    with client, server:
        stream = data + tail
        client.sendall(stream)
        client.shutdown(socket.SHUT_WR)     # an incomplete header meets EOF, not the deadline
        t0 = time.monotonic()
        try:
            header: Header | None = read(server, 2.0)
        except ProxyError:
            header = None
        assert time.monotonic() - t0 < 1.5
        left = rest(server)
        consumed = len(stream) - len(left)
        assert stream[consumed:] == left
        assert consumed <= proxy.HEADER_MAX
        if header is not None:
            assert parse(stream[:consumed]) == header
            assert proxy.header_length(stream) == consumed


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.binary(max_size=600))
def test_fuzz_read_header_leaves_any_following_bytes(case: tuple[str, bytes, Header], tail: bytes) -> None:
    _, data, expected = case
    client, server = socket.socketpair()
    with client, server:
        client.sendall(data + tail)
        client.shutdown(socket.SHUT_WR)
        assert read(server, 2.0) == expected
        assert rest(server) == tail


@settings(max_examples=30, deadline=None)
@given(inputs)
def test_fuzz_read_header_never_hangs_on_an_open_peer(data: bytes) -> None:
    client, server = socket.socketpair()
    with client, server:
        client.sendall(data)
        try:
            read(server, 0.05)
        except ProxyError:
            pass
