"""The access log: Apache's format directives, one ``write()`` per line.

The format is compiled once into a list of small functions; each request
costs their calls and one ``os.write`` on a file opened ``O_APPEND`` in the
child (lines from all children interleave whole, never torn), or on stdout
for ``-``.  Directives (Apache's ``mod_log_config``): ``%h`` client address,
``%l`` ``%u`` (always ``-``), ``%t`` time, ``%r`` request line, ``%s`` and
``%>s`` status, ``%b`` body bytes (``-`` for none), ``%B`` body bytes, ``%D``
request time in microseconds, ``%T`` in seconds, ``%m`` method, ``%U`` path,
``%q`` query string (with its ``?``), ``%H`` protocol, ``%P`` child pid,
``%{Name}i`` a request header, ``%{Name}o`` a response header, ``%%``.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

COMBINED = '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i"'
#: The key of the request target as the client sent it, in the environ
#: handed to :meth:`AccessLog.write` (never in the app's): ``%r`` shows it.
TARGET = "mps.request_target"

log = logging.getLogger("mps")

Part = Callable[[dict[str, Any], int, int, Sequence[tuple[str, str]], float], str]
_DIRECTIVE = re.compile(r"%(>?)(\{([^}]*)\})?([a-zA-Z%])")


def _escape(text: str) -> str:
    """Logged input with quotes, backslashes and control bytes escaped, as Apache does."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append("\\x%02x" % (ord(c) & 0xFF))
    return "".join(out)


def _request_line(env: dict[str, Any]) -> str:
    """Apache's %r: the request line as it came (not the decoded path)."""
    path = env.get(TARGET)
    if path is None:
        query = env.get("QUERY_STRING")
        path = env.get("PATH_INFO", "") + ("?" + query if query else "")
    return _escape(f"{env.get('REQUEST_METHOD', '')} {path} {env.get('SERVER_PROTOCOL', '')}")


def _header_in(name: str) -> Part:
    key = "HTTP_" + name.upper().replace("-", "_")
    if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
        key = key[5:]
    return lambda env, code, size, headers, secs: _escape(env.get(key, "-"))


def _header_out(name: str) -> Part:
    low = name.lower()

    def part(env: dict[str, Any], code: int, size: int, headers: Sequence[tuple[str, str]],
             secs: float) -> str:
        return next((_escape(v) for k, v in headers if k.lower() == low), "-")
    return part


_SIMPLE: dict[str, Part] = {
    "h": lambda env, code, size, headers, secs: env.get("REMOTE_ADDR") or "-",
    "l": lambda env, code, size, headers, secs: "-",
    "u": lambda env, code, size, headers, secs: "-",
    "t": lambda env, code, size, headers, secs: time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
    "r": lambda env, code, size, headers, secs: _request_line(env),
    "s": lambda env, code, size, headers, secs: str(code),
    "b": lambda env, code, size, headers, secs: str(size) if size else "-",
    "B": lambda env, code, size, headers, secs: str(size),
    "D": lambda env, code, size, headers, secs: str(int(secs * 1e6)),
    "T": lambda env, code, size, headers, secs: str(int(secs)),
    "m": lambda env, code, size, headers, secs: _escape(env.get("REQUEST_METHOD", "")),
    "U": lambda env, code, size, headers, secs: _escape(env.get("PATH_INFO", "")),
    "q": lambda env, code, size, headers, secs:
        "?" + _escape(env["QUERY_STRING"]) if env.get("QUERY_STRING") else "",
    "H": lambda env, code, size, headers, secs: env.get("SERVER_PROTOCOL", ""),
    "P": lambda env, code, size, headers, secs: str(os.getpid()),
    "%": lambda env, code, size, headers, secs: "%",
}


def compile_format(fmt: str) -> list[Part | str]:
    """The format as literal strings and directive functions; ValueError
    naming an unknown directive."""
    parts: list[Part | str] = []
    pos = 0
    for m in _DIRECTIVE.finditer(fmt):
        if m.start() > pos:
            parts.append(fmt[pos:m.start()])
        arg, letter = m.group(3), m.group(4)
        if arg is not None and letter == "i":
            parts.append(_header_in(arg))
        elif arg is not None and letter == "o":
            parts.append(_header_out(arg))
        elif arg is None and letter in _SIMPLE:
            parts.append(_SIMPLE[letter])
        else:
            raise ValueError(f"unknown directive {m.group(0)!r}")
        pos = m.end()
    if "%" in fmt[pos:]:
        raise ValueError(f"unknown directive {fmt[pos:][fmt[pos:].index('%'):][:3]!r}")
    parts.append(fmt[pos:])
    return parts


class AccessLog:
    """One child's access log: opened in the child, written a line at a time.

    It never stops the child: a line that finds stdout full (a pipe or a
    socket whose reader is stuck) is dropped, and that is logged once.
    """

    def __init__(self, path: str, fmt: str) -> None:
        self.parts = compile_format(fmt)
        self.dropped = 0
        self.torn = False       # the last line written was cut short
        self.sock: socket.socket | None = None
        if path == "-":
            self.fd, self.sock = _stdout()
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, env: dict[str, Any], code: int, size: int, headers: Sequence[tuple[str, str]],
              secs: float) -> None:
        line = "".join(p if isinstance(p, str) else p(env, code, size, headers, secs)
                       for p in self.parts) + "\n"
        data = line.encode("utf-8", "replace")
        if self.torn:
            data = b"\n" + data    # end the piece a full stdout cut off
        try:
            if self.sock is not None:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            else:
                sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return      # a full disk or a closed pipe must not cost the request
        if sent == len(data):
            self.torn = False
        else:
            self.torn = self.torn or sent > 0
            self.drop()

    def drop(self) -> None:
        """stdout is full: the line (or its rest) is lost.  In a pipe a line
        under PIPE_BUF (4 KiB) goes whole or not at all; a longer one, or
        one sent to a socket, may be cut: the next line written ends it."""
        self.dropped += 1
        if self.dropped == 1:
            log.warning("access log: stdout is full (is its reader stuck?); dropping lines "
                        "rather than stopping this child")


def _stdout() -> tuple[int, socket.socket | None]:
    """Where ``-`` writes without ever blocking the child.  A pipe is
    reopened non-blocking through /proc: a file description of its own,
    so the flag touches nobody else writing to it (O_NONBLOCK on fd 1
    itself would reach the master and every child).  A socket (the
    journal's stdout) is sent to with MSG_DONTWAIT.  A file or a terminal
    is written as it is."""
    try:
        mode = os.fstat(1).st_mode
        if stat.S_ISFIFO(mode):
            return os.open("/proc/self/fd/1", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC), None
        if stat.S_ISSOCK(mode):
            return 1, socket.socket(fileno=os.dup(1))
    except OSError:
        pass        # no /proc, or a pipe nobody reads (ENXIO): writes fail, they never block
    return 1, None
