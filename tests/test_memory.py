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
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_until

from mps import signals
from mps.forking import VERSIONS


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


# -- forking.Forker: threading's and logging's at-fork hooks, left out ------

#: Run in a fresh interpreter (pytest's own process has a faulthandler
#: thread, and Forker.quiet() rightly skips nothing with two threads).  It
#: forks one child inside Forker.quiet() and prints what the child saw.
FORK_PROBE = textwrap.dedent("""
    import gc, json, logging, os, random, sys, threading
    from mps.forking import Forker

    class Handler(logging.StreamHandler):
        reinits = 0
        def _at_fork_reinit(self):      # (logging's after-in-child hook calls it)
            Handler.reinits += 1
            super()._at_fork_reinit()

    logging.getLogger().addHandler(Handler(sys.stderr))
    ran = []
    os.register_at_fork(after_in_child=lambda: ran.append("app hook"))
    forker = Forker.find()
    names = lambda hooks: [getattr(h, "__module__", None) or "?" for h in hooks]
    lists = lambda: {w: names(l) for w, l in forker.lists.items()}
    before = lists()
    skipped = {w: sorted(h.__module__ + "." + h.__name__ for h in hs)
               for w, hs in forker.skipped().items()}
    holder = None
    if sys.argv[1] == "threaded":
        # Another thread holds the handler's lock across the fork: the child
        # can log only if logging's hook re-made the lock.
        held, release = threading.Event(), threading.Event()
        def hold():
            with logging.getLogger().handlers[0].lock:
                held.set()
                release.wait(30)
        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
    limbo = threading._active_limbo_lock
    state = random.getstate()
    r, w = os.pipe()
    with forker.quiet():
        os.register_at_fork(after_in_child=lambda: ran.append("registered meanwhile"))
        pid = forker.fork()
        if pid == 0:
            try:
                logged = threading.Thread(target=lambda: logging.getLogger("child").warning("x"))
                logged.start()
                logged.join(5)
                os.write(w, json.dumps({
                    "app_hook_ran": ran == ["app hook", "registered meanwhile"],
                    "random_reseeded": random.getstate() != state,
                    "threading_hook_ran": threading._active_limbo_lock is not limbo,
                    "logging_hook_ran": Handler.reinits == 1,
                    "a_thread_logged": not logged.is_alive(),
                    "lists": lists(),
                }).encode())
            finally:
                os._exit(0)
    if holder is not None:
        release.set()
        holder.join()
    os.close(w)
    with os.fdopen(r) as f:
        child = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    try:
        with forker.quiet():
            raise KeyError("a failed batch")
    except KeyError:
        pass
    gc.freeze()
    print(json.dumps({"skipped": skipped, "child": child, "before": before, "after": lists(),
                      "found_when_frozen": bool(Forker.find().lists)}))
""")


def fork_probe(how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FORK_PROBE, how], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def with_meanwhile(lists: dict) -> dict:
    """``lists`` (module names by list) with the probe's hook registered inside
    quiet() added, after the others, where it goes: the child list."""
    return {**lists, "child": lists["child"] + ["__main__"]}


@pytest.mark.skipif(sys.version_info[:2] not in VERSIONS,
                    reason=f"Forker skips no hook on CPython {sys.version_info[:2]}")
def test_a_single_threaded_fork_skips_only_threading_and_logging_hooks():
    got = fork_probe("single")
    assert got["skipped"] == {"before": ["logging._acquireLock"],
                              "parent": ["logging._releaseLock"],
                              "child": ["logging._after_at_fork_child_reinit_locks",
                                        "threading._after_fork"]}
    assert got["child"] == {
        "app_hook_ran": True,           # every other hook runs: the app's (one
        "random_reseeded": True,        # registered in the batch too), random's,
        "threading_hook_ran": False,    # not threading's,
        "logging_hook_ran": False,      # not logging's,
        "a_thread_logged": True,        # and logging's lock is free without its hooks
        "lists": with_meanwhile(got["before"]),     # all back, for the child's own forks
    }
    assert {"threading", "logging"} <= set(got["before"]["child"])
    assert got["after"] == with_meanwhile(got["before"])    # back, after a failed batch too
    assert got["found_when_frozen"] is False    # frozen lists: every hook runs


def test_with_a_second_thread_every_hook_runs():
    got = fork_probe("threaded")
    assert got["child"]["threading_hook_ran"] is True
    assert got["child"]["logging_hook_ran"] is True
    assert got["child"]["a_thread_logged"] is True     # the lock held at fork was re-made
    assert got["child"]["app_hook_ran"] is True
    assert got["child"]["random_reseeded"] is True
    assert got["after"] == with_meanwhile(got["before"])


def test_children_skip_threadings_hook_and_run_the_apps(start_master, tmp_path: Path):
    # Through a real master: each child ran the hook the app registered, and
    # random (imported by the app, so in the master) gave each its own seed;
    # threading's hook did not run (it would have made a new lock).
    app = tmp_path / "forkhook_app.py"
    app.write_text(textwrap.dedent("""
        import json, os, random, threading
        hooked = []
        os.register_at_fork(after_in_child=lambda: hooked.append(os.getpid()))
        LIMBO = threading._active_limbo_lock

        def handle(conn, addr):
            conn.sendall(json.dumps([os.getpid(), hooked, random.getrandbits(64),
                                     threading._active_limbo_lock is LIMBO]).encode())
    """))
    m = start_master(f"{app}:handle", start_servers=2, min_spare=2, max_spare=2,
                     max_children=2, max_requests=1)
    m.wait_ready(idle=2)
    seen: dict[int, tuple[list[int], int, bool]] = {}

    def two_children() -> bool:
        pid, hooked, bits, same_lock = json.loads(m.echo(b""))
        seen[pid] = (hooked, bits, same_lock)
        return len(seen) >= 2

    wait_until(two_children, what="answers from two children")
    assert all(hooked == [pid] for pid, (hooked, _, _) in seen.items())
    assert len({bits for _, bits, _ in seen.values()}) == len(seen)
    skips = sys.version_info[:2] in VERSIONS
    assert all(same is skips for _, _, same in seen.values())
