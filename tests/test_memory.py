"""Private memory per idle child (issues 8 and 11): what keeps it small.

A forked child copies every page it writes, and CPython writes a page for
each object it touches (reference counts).  These tests pin the causes that
were removed -- modules whose at-fork hooks run in every child, the signal
module's enum wrappers in a child's boot -- without measuring memory: the
numbers are benchmarks/RESULTS.md's business.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

from conftest import wait_until

from mps import signals


def test_the_master_forks_without_random_or_socketserver(start_master, tmp_path: Path):
    # random reseeds itself in every forked child (os.register_at_fork): a
    # master that imported it would make each child run Python at fork.
    # socketserver is only the app's to import (for a BaseRequestHandler).
    seen = tmp_path / "modules.json"
    app = tmp_path / "modules_app.py"
    app.write_text(textwrap.dedent(f"""
        import json, sys
        import mps

        server = mps.Server()

        @server.handler
        def handle(conn, addr):
            conn.sendall(b"ok")

        @server.on_starting
        def record(server):
            with open({str(seen)!r}, "w") as f:
                json.dump(sorted(sys.modules), f)
    """))
    m = start_master(f"{app}:server", start_servers=1, min_spare=0, max_spare=1,
                     max_children=1)
    m.wait_ready(idle=1)
    modules = json.loads(wait_until(seen.read_text, what="the hook's module list"))
    assert "mps.arbiter" in modules     # the hook ran in the master, about to fork
    assert "random" not in modules
    assert "socketserver" not in modules


def _in_child(body) -> dict:
    """Run ``body()`` in a forked child; its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, json.dumps(body()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def test_reset_in_child_restores_defaults_and_ignores_operator_signals():
    def body() -> dict:
        for sig in (signal.SIGALRM, signal.SIGINT, signal.SIGRTMIN + 3, signal.SIGUSR1,
                    signal.SIGPIPE):
            signal.signal(sig, lambda signum, frame: None)   # as the master's recorder
        signals.reset_in_child()
        return {signals.name(s): int(signal.getsignal(s))
                for s in (signal.SIGALRM, signal.SIGINT, signal.SIGRTMIN + 3, signal.SIGUSR1,
                          signal.SIGPIPE)}

    got = _in_child(body)
    dfl, ign = int(signal.SIG_DFL), int(signal.SIG_IGN)
    assert got == {"SIGALRM": dfl, "SIGINT": dfl, "SIGRTMIN+3": dfl, "SIGUSR1": ign,
                   "SIGPIPE": ign}


def test_block_and_set_mask_return_plain_ints():
    def body() -> dict:
        before = signals.block((signal.SIGUSR1, signal.SIGRTMIN + 1))
        during = signals.set_mask(before)
        after = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        signals.handle(signal.SIGUSR2, lambda signum, frame: None)
        return {"before": sorted(before), "during": sorted(during),
                "types": sorted({type(s).__name__ for s in during}),
                "after": sorted(int(s) for s in after),
                "handled": callable(signal.getsignal(signal.SIGUSR2))}

    got = _in_child(body)
    assert set(got["during"]) >= {int(signal.SIGUSR1), int(signal.SIGRTMIN) + 1}
    assert got["types"] == ["int"]          # no enums made on the way
    assert got["after"] == got["before"]
    assert got["handled"] is True
