"""The status document (SPEC §7): built by the master, read by ``mps status``.

Protocol: connect to the master's Unix socket; it writes one JSON document
and closes.  The master never waits for the client: it sends from its loop
as the client reads, and resets a client that has not read the whole
document within a few seconds (see Arbiter.answer_status).
"""
from __future__ import annotations

import json
import socket
import time
import socket
from typing import Any, Protocol

from .errors import MpsError
from .logs import printable
from .scoreboard import STATE_CHARS, Scoreboard, State
from .sockets import describe


class Source(Protocol):
    """What the document is made from: the master's state, read-only (the
    arbiter is one; this module never imports it)."""

    pid: int
    board: Scoreboard | None
    listener: socket.socket | None
    settings: Any
    min_spare: int
    max_spare: int
    started_at: float
    stopping: str
    generation: int
    progress: Any       # upgrade progress: as_dict()
    old: Any            # the old generation during an upgrade, or None: slots()

    @property
    def totals(self) -> Any:
        """An object with ``as_dict() -> dict[str, int]``."""

STATES = [s.name.lower() for s in State if s != State.EMPTY]


def document(arbiter: Source) -> dict[str, Any]:
    """The JSON document for the master's current state."""
    assert arbiter.board is not None and arbiter.listener is not None
    # The clock before the snapshot: a connection in progress then counts no
    # more than it had when its record was copied, so busy_seconds_total
    # never runs ahead of what a later document reports (a counter).
    now_ns = time.monotonic_ns()
    snap = arbiter.board.snapshot()
    live = [s for s in snap.slots if s.state != State.EMPTY]
    children = {"total": len(live)}
    children.update({name: snap.count(State[name.upper()]) for name in STATES})
    settings = arbiter.settings.public()
    settings.update(min_spare=arbiter.min_spare, max_spare=arbiter.max_spare)
    totals = {"connections": snap.connections, "requests": snap.requests,
              **arbiter.totals.as_dict(), "counter_repairs": snap.repairs}
    return {
        "pid": arbiter.pid,
        "backend": arbiter.board.name,
        "uptime_s": round(time.monotonic() - arbiter.started_at, 3),
        "listening": describe(arbiter.listener),
        "stopping": arbiter.stopping or None,
        "generation": arbiter.generation,
        "settings": settings,
        "children": children,
        "idle_counter": snap.idle_counter,
        "totals": totals,
        "busy_s": round(snap.busy_s(now_ns), 3),
        "upgrade": arbiter.progress.as_dict(),
        "old_generation": arbiter.old.slots() if arbiter.old is not None else [],
        "slots": [_slot(s, now_ns) for s in live],
        "scoreboard": "".join(STATE_CHARS[s.state] for s in snap.slots),
    }


def _slot(s: Any, now_ns: int) -> dict[str, Any]:
    out = {"slot": s.index, "pid": s.pid, "state": s.state.name.lower(),
           "connections": s.connections, "state_age_s": round(s.age_s(now_ns), 3)}
    if s.requests:
        out["requests"] = s.requests
    if s.request:
        # What a busy child serves and for how long (mod_status): the timeout
        # clock restarts with each request, so state_age_s is its age.
        out["request"] = s.request.decode("latin-1")
    return out


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the master at ``path``; MpsError with one line if it cannot."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    chunks = []
    try:
        sock.connect(path)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except FileNotFoundError:
        raise MpsError(f"no status socket at {path}; is the master running with "
                       f"--status-socket {path}?") from None
    except ConnectionRefusedError:
        raise MpsError(f"nobody answers at {path}: the master is not running") from None
    except OSError as exc:
        raise MpsError(f"cannot read status from {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        doc: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise MpsError(f"{path} did not answer with a status document") from None
    return doc


def render(doc: dict[str, Any]) -> str:
    """The plain ``mps status`` output: a summary, a scoreboard line, a table."""
    c, t = doc["children"], doc["totals"]
    lines = [
        f"mps master {doc['pid']}  backend {doc['backend']}  listening {doc['listening']}  "
        f"up {doc['uptime_s']:.1f}s" + (f"  STOPPING ({doc['stopping']})" if doc["stopping"] else ""),
        f"children  total {c['total']}  idle {c['idle']}  busy {c['busy']}  "
        f"starting {c['starting']}  exiting {c['exiting']}  (idle counter {doc['idle_counter']})",
        "totals    " + "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in t.items()),
        _upgrade_line(doc),
        f"scoreboard  {doc['scoreboard']}",
        "            _ idle  W busy  S starting  G exiting  . free",
        "",
        f"{'slot':>5} {'pid':>8} {'state':<9} {'conns':>7} {'age_s':>9}  request",
    ]
    old = doc.get("old_generation") or []
    if old:
        lines.insert(5, f"old generation (leaving): {len(old)} children, pids "
                        + " ".join(str(s["pid"]) for s in old))
    lines += [f"{s['slot']:>5} {s['pid']:>8} {s['state']:<9} {s['connections']:>7} "
              f"{s['state_age_s']:>9.2f}  {printable(s.get('request', ''), 64)}".rstrip()
              for s in doc["slots"]]
    return "\n".join(lines)


def _upgrade_line(doc: dict[str, Any]) -> str:
    up = doc.get("upgrade") or {}
    loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(up.get("loaded_at", 0)))
    line = f"code      generation {doc['generation']}  loaded {loaded}"
    if up.get("state"):
        line += f"  last upgrade #{up['serial']}: {up['state']}"
        if up.get("reason"):
            line += f" ({printable(up['reason'], 120)})"
    return line
