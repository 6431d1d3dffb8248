"""``mps bench``: measure the pool's own work against references, in one run.

    mps bench locks [--procs 1,2,4] [--seconds S] [--reps N] [--json]
    mps bench serve [--clients 16,64] [--seconds S] [--reps N] [--kinds K,...] [--json]
    mps bench http [--clients 16] [--seconds S] [--reps N] [--servers mps,gunicorn,uwsgi]
                   [--shapes close,keepalive] [--uwsgi PATH] [--json]
    mps bench spike [--clients 64] [--backend B] [--plot FILE] [--settings ...] [--json]
    mps bench scale [--sizes 64,256,1024] [--reps N] [--status-every S,...]
                    [--idle-seconds S] [--load-clients N] [--load-seconds S] [--plot DIR]
                    [--json]

The C programs they use (an epoll load generator, a C prefork echo reference,
the scoreboard's C-only loop) ship inside the package, in ``mps/_bench/``,
with a copy of the C core they include.  They are compiled on first use with
``$CC`` (else ``cc``) into a per-user cache, one binary per hash of its
sources, compiler and flags: ``$MPS_BENCH_CACHE``, else
``$XDG_CACHE_HOME/mps/bench``, else ``~/.cache/mps/bench`` -- never into the
installed package, so ``mps bench`` works from any directory after ``pip
install``.  ``locks`` needs no compiler (without one it skips only its
C-only floor); ``serve`` and ``http`` do (their load generator is C) and say
so in one line; ``http`` runs gunicorn and uWSGI beside mps when they are
installed (``pip install 'mps[bench]'``) and says in one line which is not;
``spike`` runs mps alone.  Results are ratios taken in one run: these
machines are shared and noisy, absolute numbers are not comparable across
runs.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import mmap
import os
import platform
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from .errors import MpsError, UsageError
from .scoreboard import BACKENDS, Scoreboard, State, c_available

CLK_TCK = os.sysconf("SC_CLK_TCK")
FIXED_POOL = ["--start-servers", "4", "--min-spare", "0", "--max-spare", "4",
              "--max-children", "4", "--max-requests", "0", "--log-level", "warning"]
SERVER_KINDS = ("c-ref", "mps-c", "mps-python", "py-naive")

SOURCES = Path(__file__).resolve().parent / "_bench"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Wno-unused-function")
LIBS: dict[str, tuple[str, ...]] = {"loadgen": (), "ref_prefork": (), "lockbench": ("-lpthread",),
                                    "lockwatch": ("-lpthread",)}
NEEDS_CORE = {"lockbench", "lockwatch"}         # #include _mpscore.c


class CannotBuild(MpsError):
    """This machine cannot build a benchmark's C program: no working C
    compiler, or the C core's source is not installed."""


# --------------------------------------------------------------- plumbing

def cache_dir() -> Path:
    """Where compiled benchmark programs are kept (per user, never site-packages)."""
    if os.environ.get("MPS_BENCH_CACHE"):
        return Path(os.environ["MPS_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mps" / "bench"


def core_source() -> Path | None:
    """_mpscore.c: the copy setup.py puts beside the benchmark sources, else
    the checkout's src/_mpscore.c (an editable install has no copy)."""
    for path in (SOURCES / "_mpscore.c", SOURCES.parents[1] / "_mpscore.c"):
        if path.is_file():
            return path
    return None


def compiler() -> list[str]:
    """The C compiler command: $CC (may carry flags), else cc, gcc or clang."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise CannotBuild("no C compiler found (install cc, or set CC)")
    return shlex.split(cc)


def build(name: str) -> str:
    """Path of benchmark program NAME, compiled from mps/_bench/NAME.c on first use."""
    sources = [SOURCES / f"{name}.c"]
    if name in NEEDS_CORE:
        core = core_source()
        if core is None:
            raise CannotBuild("the C core's source _mpscore.c is not installed "
                              "(reinstall mps from its sdist or wheel)")
        sources.append(core)
    cc = compiler()
    cmd = [*cc, *CFLAGS, f"-I{sources[-1].parent}"]
    digest = hashlib.sha256(json.dumps([cmd, LIBS[name]]).encode())
    for path in sources:
        digest.update(path.read_bytes())
    out = cache_dir() / f"{name}-{digest.hexdigest()[:16]}"
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: two benches started at once each
    # see either no binary or a whole one, never a half-written file.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    error = run_compiler([*cmd, "-o", str(tmp), str(sources[0]), *LIBS[name]])
    if error is not None:
        tmp.unlink(missing_ok=True)
        check_compiler(cc, out.parent)
        raise MpsError(f"cannot compile {sources[0].name} with {shlex.join(cc)}: {error}")
    os.replace(tmp, out)
    return str(out)


def run_compiler(cmd: list[str]) -> str | None:
    """None when the compiler succeeded, else its last line of complaint."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        return exc.strerror or str(exc)
    if r.returncode == 0:
        return None
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {r.returncode}"


def check_compiler(cc: list[str], workdir: Path) -> None:
    """After a failed build: raise CannotBuild if cc cannot compile even an
    empty program, so a missing compiler is told apart from a broken source."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        probe = Path(tmp, "probe.c")
        probe.write_text("int main(void) { return 0; }\n")
        error = run_compiler([*cc, "-o", str(probe.with_suffix("")), str(probe)])
    if error is not None:
        raise CannotBuild(f"no working C compiler (`{shlex.join(cc)}` cannot compile an "
                          f"empty program: {error}); install cc, or set CC")


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model or platform.processor(),
            "kernel": platform.release(), "python": platform.python_version(),
            "implementation": platform.python_implementation()}


def parse_list(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers (an argparse type)."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive whole numbers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """One positive whole number (an argparse type)."""
    values = parse_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive whole number, got {text!r}")
    return values[0]


def positive_float(text: str) -> float:
    """A finite positive number (an argparse type); rejects nan and inf too."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def summary(values: Sequence[float]) -> str:
    """min / median / max, each as a table number (20.3k, 512, 1.06)."""
    return f"{num(min(values))} / {num(statistics.median(values))} / {num(max(values))}"


# --------------------------------------------------------------- locks

def lock_worker(board: Scoreboard, slot: int, seconds: float, go: int, out: int,
                floor: bool) -> None:
    """In a forked process: busy+idle pairs on one slot for `seconds`."""
    os.read(go, 1)
    busy, idle = board.busy, board.idle
    if floor:
        busy = idle = board.nop     # type: ignore[attr-defined]
    ops = 0
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)
    while True:
        for _ in range(2048):
            busy(slot)
            idle(slot)
        ops += 2048
        stop = time.perf_counter_ns()
        if stop >= deadline:
            break
    os.write(out, json.dumps([(stop - start) / ops, ops]).encode() + b"\n")


def run_lock_procs(backend: str, procs: int, seconds: float, floor: bool = False) -> float:
    """ns per busy+idle pair, mean over `procs` processes on one scoreboard."""
    board = BACKENDS[backend](procs)
    slots = []
    for _ in range(procs):
        slot = board.reserve()
        board.started(slot, 0)
        board.idle(slot)
        slots.append(slot)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pids = []
    for slot in slots:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                lock_worker(board, slot, seconds, go_r, res_w, floor)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(res_w)
    os.write(go_w, b"g" * procs)
    with os.fdopen(res_r) as results:
        rows = [json.loads(line) for line in results]
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(go_r)
    os.close(go_w)
    if len(rows) != procs:
        raise MpsError(f"{procs - len(rows)} lock benchmark processes failed")
    snap = board.snapshot()
    board.close()
    ops = sum(int(r[1]) for r in rows)
    if not floor and (snap.connections != ops or
                      snap.idle_counter != snap.count(State.IDLE)):
        raise MpsError(f"lost updates on the {backend} backend: {snap.connections} "
                       f"connections counted for {ops} operations")
    return float(statistics.mean(r[0] for r in rows))


def run_lock_raw(program: str, procs: int, seconds: float) -> float:
    out = subprocess.run([program, str(procs), str(seconds)],
                         capture_output=True, text=True, check=True, timeout=seconds + 60)
    doc = json.loads(out.stdout)
    if doc["connections"] != doc["ops"] or doc["idle_counter"] != doc["idle_slots"]:
        raise MpsError("lost updates in the C-only loop")
    return float(statistics.mean(doc["ns_per_op"]))


def lock_runners() -> dict[str, Callable[[int, float], float]]:
    """The backends `locks` compares, by name; the C ones only when the
    extension is built, the C-only floor only when it can be compiled here."""
    runners: dict[str, Callable[[int, float], float]] = {}
    if c_available():
        runners["c"] = lambda procs, secs: run_lock_procs("c", procs, secs)
    runners["python"] = lambda procs, secs: run_lock_procs("python", procs, secs)
    if c_available():
        runners["cffi-floor"] = lambda procs, secs: run_lock_procs("c", procs, secs, floor=True)
        try:
            program = build("lockbench")
        except CannotBuild as exc:
            print(f"mps bench locks: c-raw (the C-only floor) skipped: {exc}", file=sys.stderr)
        else:
            runners["c-raw"] = lambda procs, secs: run_lock_raw(program, procs, secs)
    return runners


def bench_locks(args: argparse.Namespace) -> int:
    runners = lock_runners()
    results = []
    for procs in args.procs:
        # Short runs, interleaved, median per backend: a noisy neighbour then
        # hits every backend alike instead of one of them.
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.reps):
            for name, run in runners.items():
                samples[name].append(run(procs, args.seconds / args.reps))
        results += [{"backend": name, "procs": procs,
                     "ns_per_op": round(statistics.median(values), 1)}
                    for name, values in samples.items()]
    if args.json:
        print(json.dumps({"results": results, "machine": machine()}))
        return 0
    print("ns per accounting operation (busy + idle transition pair on one slot), "
          f"median of {args.reps} interleaved runs")
    print(f"{'procs':>5}  " + "".join(f"{name:>12}" for name in runners))
    for procs in args.procs:
        row = {r["backend"]: r["ns_per_op"] for r in results if r["procs"] == procs}
        print(f"{procs:>5}  " + "".join(f"{v:>12.1f}" for v in row.values()))
        ratios = [f"{a}/{b} = {row[a] / row[b]:.2f}x"
                  for a, b in (("python", "c"), ("c", "cffi-floor"), ("c", "c-raw"))
                  if a in row and b in row]
        if ratios:
            print("       " + "   ".join(ratios))
    return 0


# --------------------------------------------------------------- servers

def proc_cpu(pid: int) -> tuple[float, float]:
    """(own user+sys, reaped children's user+sys) of pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])
    reaped = int(fields[13]) + int(fields[14])
    return own / CLK_TCK, reaped / CLK_TCK


def tree_cpu(pid: int) -> float:
    """CPU seconds used by pid, its live children, and the children it reaped."""
    own, reaped = proc_cpu(pid)
    total = own + reaped
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    for kid in kids:
        try:
            total += sum(proc_cpu(kid))
        except OSError:
            pass
    return total


def naive_prefork(sock: socket.socket, children: int = 4) -> None:
    """A Python prefork with no scoreboard at all: ``conn, addr =
    sock.accept()``, mps's own echo handler, ``conn.close()``.

    The floor of `mps bench serve` (issue 11): what Python itself costs per
    connection with the same handler, so the framework's own share can be
    read off; and of `mps bench scale`'s memory per idle child.
    """
    from .daemon import die_with_parent
    from .examples import echo
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)     # sigwait() needs them blocked
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)
                die_with_parent(signal.SIGKILL)
                while True:
                    conn, addr = sock.accept()
                    echo(conn, addr)
                    conn.close()
            finally:
                os._exit(0)
        pids.append(pid)
    signal.sigwait(stop)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        os.waitpid(pid, 0)


@contextmanager
def launched(command: Callable[[int], list[str]], stderr: IO[bytes] | None = None,
             backlog: int = 1024) -> Iterator[tuple[int, int]]:
    """Run ``command(fd)`` in a session of its own, handing it a socket that
    listens on 127.0.0.1 (a free port); yield (port, pid); end it by its pid
    and its process group, whatever happens meanwhile."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(backlog)
        port = sock.getsockname()[1]
        fd = sock.fileno()
        proc = subprocess.Popen(command(fd), pass_fds=[fd], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    finally:
        sock.close()
    try:
        yield port, proc.pid
    finally:
        end_group(proc)


def end_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """TERM the server's first process, give it ``grace`` seconds, then
    SIGKILL its whole process group (a straggler, or all of it).  The first
    process is left unreaped until then (WNOWAIT), so its pid -- the group's
    id -- cannot have been reused by someone else when the group is killed."""
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        time.sleep(0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def server(kind: str, extra: Sequence[str] = (), app: str = "mps.examples:echo",
           status: str | None = None) -> AbstractContextManager[tuple[int, int]]:
    """Start one echo server kind on 127.0.0.1:0; yield (port, pid); stop it by its pid."""
    def command(fd: int) -> list[str]:
        if kind == "c-ref":
            return [build("ref_prefork"), "--fd", str(fd), "4"]
        if kind == "py-naive":
            return [sys.executable, "-c", "import socket, sys; from mps.bench import "
                    f"naive_prefork; naive_prefork(socket.socket(fileno={fd}))"]
        cmd = [sys.executable, "-m", "mps", "serve", app, "--bind", f"fd://{fd}",
               "--backend", kind.split("-", 1)[1], *extra]
        return cmd + (["--status-socket", status] if status else [])
    return launched(command)


def wait_serving(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"ping")
                if s.recv(64):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise MpsError(f"the server on port {port} did not start serving")


def load(port: int, clients: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run([build("loadgen"), "--port", str(port), "--clients", str(clients),
                          "--seconds", str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise MpsError(f"loadgen failed: {out.stderr.strip()[-200:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def bench_serve(args: argparse.Namespace) -> int:
    kinds = args.kinds
    if not c_available():
        kinds = [k for k in kinds if k != "mps-c"]
    if not kinds:
        raise UsageError("nothing to run: mps-c needs the C extension, which is not built")
    # Build the C programs before any server starts: no compiler is one line
    # up front, not a traceback in the middle of a run.
    for name in ("loadgen", "ref_prefork") if "c-ref" in kinds else ("loadgen",):
        try:
            build(name)
        except CannotBuild as exc:
            raise CannotBuild(f"mps bench serve cannot build its {name} program: {exc}") \
                from None
    rows: list[dict[str, Any]] = []
    for clients in args.clients:
        for rep in range(args.reps):
            order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]   # interleave
            for kind in order:
                with server(kind, FIXED_POOL) as (port, pid):
                    wait_serving(port)
                    load(port, clients, min(0.5, args.seconds))     # warm up
                    cpu0 = tree_cpu(pid)
                    result = load(port, clients, args.seconds)
                    cpu = tree_cpu(pid) - cpu0
                result.update(kind=kind, clients=clients, rep=rep,
                              cpu_us_per_conn=1e6 * cpu / max(1, result["conns"]))
                rows.append(result)
                if not args.json:
                    print(f"  clients={clients} rep={rep} {kind:<10} "
                          f"{result['conns_per_s']:>8.0f} conn/s  p50 {result['p50_us']:>6} us  "
                          f"p99 {result['p99_us']:>6} us  cpu {result['cpu_us_per_conn']:6.1f} "
                          f"us/conn  errors {result['errors']}", flush=True)
    if args.json:
        print(json.dumps({"results": rows, "targets": serve_targets(rows, args.clients),
                          "machine": machine()}))
        return 0
    print(serve_report(rows, kinds, args.clients))
    return 0


def serve_ratios(rows: list[dict[str, Any]], clients: int, kind: str, ref: str,
                 key: str) -> list[float]:
    """kind/ref of ``key`` within each rep at ``clients`` clients."""
    by = {(r["kind"], r["rep"]): r for r in rows if r["clients"] == clients}
    return [by[kind, rep][key] / by[ref, rep][key] for (k, rep) in sorted(by)
            if k == kind and (ref, rep) in by and by[ref, rep][key] > 0]


#: Issue 11's targets for `mps bench serve`: (label, kind, reference, key, op, goal).
SERVE_TARGETS = (
    ("CPU per connection mps-c / py-naive", "mps-c", "py-naive", "cpu_us_per_conn", "<=", 1.0),
    ("connections/s mps-c / c-ref", "mps-c", "c-ref", "conns_per_s", ">=", 0.95),
)


def serve_targets(rows: list[dict[str, Any]], clients_list: list[int]) -> list[dict[str, Any]]:
    """Each target at each client count: the median over reps of a same-rep ratio."""
    targets = []
    for clients in clients_list:
        for label, kind, ref, key, op, goal in SERVE_TARGETS:
            values = serve_ratios(rows, clients, kind, ref, key)
            measured = statistics.median(values) if values else None
            targets.append({"target": label, "clients": clients, "measured": measured,
                            "reps": len(values), "op": op, "goal": goal,
                            "status": verdict(measured, op, goal)})
    return targets


def serve_report(rows: list[dict[str, Any]], kinds: list[str], clients_list: list[int]) -> str:
    """Markdown tables: min / median / max over reps, per-rep ratios to c-ref
    and to py-naive, and issue 11's targets."""
    lines = []
    for clients in clients_list:
        lines += [f"\n### {clients} concurrent clients (min / median / max over reps)\n",
                  "| server | conn/s | p50 µs | p99 µs | CPU µs/conn | CPU ratio to c-ref "
                  "| conn/s ratio to c-ref | CPU ratio to py-naive | conn/s ratio to py-naive "
                  "| errors |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        mine = [r for r in rows if r["clients"] == clients]
        for kind in kinds:
            rs = [r for r in mine if r["kind"] == kind]
            if not rs:
                continue
            cells = []
            for ref in ("c-ref", "py-naive"):
                for key in ("cpu_us_per_conn", "conns_per_s"):
                    values = serve_ratios(rows, clients, kind, ref, key)
                    cells.append(summary(values) if values else "-")
            lines.append(
                f"| {kind} | {summary([r['conns_per_s'] for r in rs])} "
                f"| {summary([r['p50_us'] for r in rs])} | {summary([r['p99_us'] for r in rs])} "
                f"| {summary([r['cpu_us_per_conn'] for r in rs])} | " + " | ".join(cells)
                + f" | {sum(r['errors'] for r in rs)} |")
    lines += ["\n### targets (issue 11; medians of same-rep ratios)\n",
              "| target | clients | reps | measured | goal | |", "|---|---|---|---|---|---|"]
    for t in serve_targets(rows, clients_list):
        measured = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        lines.append(f"| {t['target']} | {t['clients']} | {t['reps']} | {measured} "
                     f"| {t['op']} {t['goal']:.2f} | {t['status']} |")
    return "\n".join(lines)


# --------------------------------------------------------------- http

#: The app all servers run, written to a temporary file by the bench: nothing
#: to import, so each server's memory is its own.
HELLO_APP = '''\
"""mps bench http: the hello-world WSGI app every server runs."""


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, world!"]
'''
HTTP_SERVERS = ("mps", "gunicorn", "uwsgi")
HTTP_SHAPES = ("close", "keepalive")
SHAPE_TITLE = {"close": "one connection per request", "keepalive": "keep-alive"}
UWSGI_SOCKET = {"close": "--http-socket", "keepalive": "--http11-socket"}
WORKERS = 4
MIB = 1024.0        # KiB per MiB: /proc reports KiB


def server_label(kind: str, shape: str) -> str:
    return f"uwsgi {UWSGI_SOCKET[shape]}" if kind == "uwsgi" else \
        "gunicorn sync" if kind == "gunicorn" else kind


@dataclass(frozen=True)
class HttpRun:
    """What one `mps bench http` run compares, and how."""

    servers: tuple[str, ...]
    shapes: tuple[str, ...]
    clients: int
    seconds: float
    reps: int
    app_file: Path
    uwsgi: str | None
    backend: str


def http_command(run: HttpRun, kind: str, shape: str, fd: int) -> list[str]:
    """The command line of one server, WORKERS processes on inherited fd."""
    app_dir, module = str(run.app_file.parent), run.app_file.stem
    if kind == "mps":
        return [sys.executable, "-m", "mps", "serve", "--wsgi", f"{run.app_file}:app",
                "--bind", f"fd://{fd}", "--backend", run.backend, *FIXED_POOL]
    if kind == "gunicorn":
        return [sys.executable, "-m", "gunicorn", "--workers", str(WORKERS),
                "--worker-class", "sync", "--bind", f"fd://{fd}", "--pythonpath", app_dir,
                "--log-level", "warning", f"{module}:app"]
    assert run.uwsgi is not None
    # --die-on-term: TERM stops uWSGI 2.0 instead of reloading it; its
    # per-request log is off, as mps's and gunicorn's access logs are.
    return [run.uwsgi, "--master", "--processes", str(WORKERS), UWSGI_SOCKET[shape],
            f"fd://{fd}", "--wsgi-file", str(run.app_file), "--callable", "app",
            "--disable-logging", "--die-on-term", "--need-app"]


def find_uwsgi(given: str) -> str | None:
    """The uwsgi program: --uwsgi, else beside this Python (a venv), else on PATH."""
    if given:
        return given if os.path.isfile(given) and os.access(given, os.X_OK) else None
    beside = Path(sys.executable).parent / "uwsgi"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uwsgi")


def http_servers(wanted: Sequence[str], uwsgi_flag: str) -> tuple[list[str], str | None]:
    """The servers that can run here, and the uwsgi program; one line on
    stderr for each one that cannot."""
    servers, uwsgi = [], None
    for kind in wanted:
        if kind == "gunicorn" and importlib.util.find_spec("gunicorn") is None:
            print("mps bench http: gunicorn skipped: not installed in this Python "
                  "(pip install 'mps[bench]')", file=sys.stderr)
            continue
        if kind == "uwsgi":
            uwsgi = find_uwsgi(uwsgi_flag)
            if uwsgi is None:
                where = f"{uwsgi_flag} is not an executable file" if uwsgi_flag else \
                    "no uwsgi program beside this Python or on PATH"
                print(f"mps bench http: uWSGI skipped: {where} (pip install 'mps[bench]', "
                      "or --uwsgi PATH)", file=sys.stderr)
                continue
        servers.append(kind)
    return servers, uwsgi


def get_ok(port: int) -> bool:
    """One GET with Connection: close; True on a whole 200 response.  Read
    until its Content-Length is in, not until the close: uWSGI's
    --http11-socket ignores a client's Connection: close."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
                head, sep, body = reply.partition(b"\r\n\r\n")
                length = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if sep and length and len(body) >= int(length[0]):
                    break
    except (OSError, ValueError):
        return False
    return reply.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 "))


def exited(pid: int) -> bool:
    """Has pid (our unreaped child) exited?  It is left unreaped."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def wait_http(port: int, pid: int, log_path: Path, timeout: float = 30.0) -> None:
    """Until the server answers a GET with 200; else MpsError with its log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not exited(pid):
        if get_ok(port):
            return
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    why = "exited" if exited(pid) else f"did not answer a GET with 200 within {timeout:.0f} s"
    raise MpsError(f"the server on port {port} {why}; its last log lines: "
                   + (" | ".join(tail) or "(none)"))


def load_http(port: int, shape: str, clients: int, seconds: float) -> dict[str, Any]:
    """One loadgen run; its result, plus ``loadgen_cpu_s`` (the load
    generator's own user+sys seconds) and ``idle_cpu_s`` (the machine's idle
    CPU seconds meanwhile): on a small machine the two say how much of it the
    server under test could have had."""
    # Keep-alive: a request that waits the whole run is starvation (counted
    # in per_client), not a timeout error.
    timeout = max(5.0, seconds + 2) if shape == "keepalive" else 5.0
    program = build("loadgen")      # (a first build is not the loadgen's CPU)
    before, idle = os.times(), host_idle_s()
    out = subprocess.run([program, "--port", str(port), "--clients", str(clients),
                          "--seconds", str(seconds), "--http", shape,
                          "--timeout", str(timeout)],
                         capture_output=True, text=True, timeout=seconds + 60)
    idle, after = host_idle_s() - idle, os.times()
    if out.returncode != 0:
        raise MpsError(f"loadgen failed: {out.stderr.strip()[-200:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    # (os.times' children_*: the processes this one has reaped -- here the
    # loadgen alone; the servers are reaped when they stop.)
    result["loadgen_cpu_s"] = (after.children_user + after.children_system
                               - before.children_user - before.children_system)
    result["idle_cpu_s"] = max(0.0, idle)
    return result


def host_idle_s() -> float:
    """The machine's idle CPU seconds so far, all its CPUs (/proc/stat: in a
    container limited to fewer CPUs, the host's idle ones count too)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def smaps_rollup(pid: int) -> tuple[int, int]:
    """(USS, PSS) of pid in KiB: Private_Clean + Private_Dirty, and Pss."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def children_of(pid: int) -> list[int]:
    """The pids of pid's live children, from /proc ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def worker_memory(master: int) -> list[tuple[int, int]]:
    """(USS, PSS) in KiB of each child of the server's first process."""
    memory = []
    for kid in children_of(master):
        try:
            memory.append(smaps_rollup(kid))
        except (OSError, KeyError, ValueError):
            pass        # gone meanwhile, or a kernel without smaps_rollup
    return memory


def measure_http(run: HttpRun, kind: str, shape: str, rep: int) -> dict[str, Any]:
    """Start one server, warm it up, load it, read its CPU and its idle
    workers' memory (fresh, and after the load), stop it."""
    log_path = run.app_file.parent / f"{kind}-{shape}-{rep}.log"
    with open(log_path, "wb") as log, \
            launched(lambda fd: http_command(run, kind, shape, fd), stderr=log) as (port, pid):
        wait_http(port, pid, log_path)
        time.sleep(0.2)     # the workers booted; at most one has served (the GET above)
        fresh = worker_memory(pid)
        load_http(port, shape, run.clients, min(0.5, run.seconds))     # warm up
        cpu0 = tree_cpu(pid)
        result = load_http(port, shape, run.clients, run.seconds)
        cpu = tree_cpu(pid) - cpu0
        time.sleep(0.3)     # the workers back to idle
        memory = worker_memory(pid)
    requests = result["requests"]
    result.update(
        kind=kind, server=server_label(kind, shape), shape=shape, rep=rep,
        cpu_us_per_req=round(1e6 * cpu / max(1, requests), 2),
        loadgen_cpu_us_per_req=round(1e6 * result.pop("loadgen_cpu_s") / max(1, requests), 2),
        idle_us_per_req=round(1e6 * result.pop("idle_cpu_s") / max(1, requests), 2),
        conns_per_req=round(result["connections"] / max(1, requests), 3),
        workers=len(memory),
        uss_kib=statistics.median(m[0] for m in memory) if memory else None,
        uss_kib_max=max(m[0] for m in memory) if memory else None,
        pss_kib=statistics.median(m[1] for m in memory) if memory else None,
        uss_kib_fresh=statistics.median(m[0] for m in fresh) if fresh else None)
    return result


def bench_http(args: argparse.Namespace) -> int:
    servers, uwsgi = http_servers(args.servers, args.uwsgi)
    if not servers:
        raise UsageError("nothing to run: none of " + ", ".join(args.servers)
                         + " can run here")
    backend = "c" if c_available() else "python"
    if "mps" in servers and backend != "c":
        print("mps bench http: mps runs on the python backend: the C scoreboard is not built",
              file=sys.stderr)
    try:
        build("loadgen")    # before any server starts: no compiler is one line up front
    except CannotBuild as exc:
        raise CannotBuild(f"mps bench http cannot build its loadgen program: {exc}") from None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mps-bench-http-") as tmp:
        app_file = Path(tmp, "hello_wsgi.py")
        app_file.write_text(HELLO_APP)
        run = HttpRun(servers=tuple(servers), shapes=tuple(args.shapes), clients=args.clients,
                      seconds=args.seconds, reps=args.reps, app_file=app_file, uwsgi=uwsgi,
                      backend=backend)
        if not args.json:
            print(f"hello-world WSGI app, {WORKERS} worker processes each, {run.clients} "
                  f"clients, {run.seconds:g} s per run after a 0.5 s warm-up, {run.reps} "
                  "reps, servers interleaved", flush=True)
        for rep in range(run.reps):
            for shape in run.shapes:
                # A rotating order: a noisy neighbour hits every server alike.
                order = servers[rep % len(servers):] + servers[:rep % len(servers)]
                for kind in order:
                    row = measure_http(run, kind, shape, rep)
                    rows.append(row)
                    if not args.json:
                        print(progress_line(row), flush=True)
    targets = http_targets(rows)
    settings = {"servers": servers, "shapes": list(run.shapes), "clients": run.clients,
                "seconds": run.seconds, "reps": run.reps, "workers": WORKERS,
                "mps_backend": backend}
    if args.json:
        print(json.dumps({"results": rows, "targets": targets, "settings": settings,
                          "machine": machine()}))
        return 0
    print(http_report(rows, run))
    print(targets_table(targets))
    return 0


def progress_line(row: dict[str, Any]) -> str:
    uss = "-" if row["uss_kib"] is None else f"{row['uss_kib'] / MIB:.2f}"
    return (f"  rep={row['rep']} {row['shape']:<9} {row['server']:<22} "
            f"{row['requests_per_s']:>8.0f} req/s  cpu {row['cpu_us_per_req']:6.1f} us/req  "
            f"p50 {row['p50_us']:>6} us  errors {row['errors']}  "
            f"clients min {row['min_per_client']} zero {row['zero_clients']}  "
            f"uss {uss} MiB")


def rep_ratios(rows: list[dict[str, Any]], shape: str, a: str, b: str,
               key: str) -> list[float]:
    """a/b of ``key``, server against server within each rep of ``shape``."""
    by = {(r["kind"], r["rep"]): r for r in rows if r["shape"] == shape}
    return [by[a, rep][key] / by[b, rep][key] for (kind, rep) in sorted(by)
            if kind == a and (b, rep) in by and by[b, rep][key] > 0]


def http_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 8's targets, each the median over reps of a same-rep ratio."""
    targets: list[dict[str, Any]] = []

    def ratio(name: str, shape: str, a: str, b: str, key: str, op: str, goal: float) -> None:
        values = rep_ratios(rows, shape, a, b, key)
        measured = statistics.median(values) if values else None
        targets.append({"target": name, "shape": shape, "measured": measured, "goal": goal,
                        "op": op, "status": verdict(measured, op, goal)})

    for shape in HTTP_SHAPES:
        ratio("req/s mps / gunicorn sync", shape, "mps", "gunicorn", "requests_per_s",
              ">=", 4.5)
        ratio("CPU per request mps / gunicorn sync", shape, "mps", "gunicorn",
              "cpu_us_per_req", "<=", 0.15)
    for shape in HTTP_SHAPES:
        ratio(f"CPU per request mps / uwsgi {UWSGI_SOCKET[shape]}", shape, "mps", "uwsgi",
              "cpu_us_per_req", "<=", 1.2)
    ratio("req/s mps / uwsgi --http11-socket", "keepalive", "mps", "uwsgi",
          "requests_per_s", ">=", 0.9)
    mine = [r for r in rows if r["kind"] == "mps" and r["shape"] == "keepalive"]
    starved = max((r["zero_clients"] for r in mine), default=None)
    targets.append({"target": "mps keep-alive clients with no response (worst rep)",
                    "shape": "keepalive", "measured": starved, "goal": 0, "op": "<=",
                    "status": verdict(starved, "<=", 0)})
    for key, when in (("uss_kib", "after the load"), ("uss_kib_fresh", "freshly started")):
        uss = [r[key] / MIB for r in rows if r["kind"] == "mps" and r[key] is not None]
        measured = statistics.median(uss) if uss else None
        targets.append({"target": f"mps USS per idle worker {when}, MiB", "shape": "",
                        "measured": measured, "goal": 1.5, "op": "<=",
                        "status": verdict(measured, "<=", 1.5)})
    errors = sum(r["errors"] for r in rows if r["kind"] == "mps") if any(
        r["kind"] == "mps" for r in rows) else None
    targets.append({"target": "mps errors (every run; a check, not an issue-8 target)",
                    "shape": "", "measured": errors, "goal": 0, "op": "<=",
                    "status": verdict(errors, "<=", 0)})
    return targets


def verdict(measured: float | None, op: str, goal: float) -> str:
    if measured is None:
        return "SKIP"
    met = {">=": measured >= goal, "<=": measured <= goal, "<": measured < goal}[op]
    return "PASS" if met else "MISS"


def num(value: float) -> str:
    """A table number: 20.3k, 512, 53.5, 0.315."""
    if abs(value) >= 10000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def span(values: Sequence[float]) -> str:
    """min / median / max, or one number when the run had one rep."""
    if len(values) == 1:
        return num(values[0])
    return f"{num(min(values))} / **{num(statistics.median(values))}** / {num(max(values))}"


def http_report(rows: list[dict[str, Any]], run: HttpRun) -> str:
    """Markdown: one table per shape, where the CPU went, the memory table,
    the ratios."""
    lines = []
    for shape in run.shapes:
        mine = [r for r in rows if r["shape"] == shape]
        lines += [f"\n### {SHAPE_TITLE[shape]}, {run.clients} clients "
                  "(min / median / max over reps)\n",
                  "| server | req/s | CPU µs/req | p50 µs | p99 µs | connections/req "
                  "| errors | retries | fewest responses of a client | clients with none "
                  "| longest wait, ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind in run.servers:
            rs = [r for r in mine if r["kind"] == kind]
            if not rs:
                continue
            lines.append(
                f"| {server_label(kind, shape)} | {span([r['requests_per_s'] for r in rs])} "
                f"| {span([r['cpu_us_per_req'] for r in rs])} "
                f"| {statistics.median(r['p50_us'] for r in rs):.0f} "
                f"| {statistics.median(r['p99_us'] for r in rs):.0f} "
                f"| {statistics.median(r['conns_per_req'] for r in rs):.2f} "
                f"| {sum(r['errors'] for r in rs)} | {sum(r['retries'] for r in rs)} "
                f"| {min(r['min_per_client'] for r in rs)} "
                f"| {max(r['zero_clients'] for r in rs)} "
                f"| {max(r['max_gap_us'] for r in rs) / 1000:.0f} |")
    lines += ["\n### where the CPU went, per request (medians, µs)\n",
              "The load generator shares the machine with the server: its CPU is CPU the "
              "server could not have had; idle CPU is what nobody used.\n",
              "| server | shape | server CPU | load generator CPU | idle |",
              "|---|---|---|---|---|"]
    for shape in run.shapes:
        for kind in run.servers:
            rs = [r for r in rows if r["kind"] == kind and r["shape"] == shape]
            if rs:
                lines.append(
                    f"| {server_label(kind, shape)} | {SHAPE_TITLE[shape]} "
                    f"| {statistics.median(r['cpu_us_per_req'] for r in rs):.1f} "
                    f"| {statistics.median(r['loadgen_cpu_us_per_req'] for r in rs):.1f} "
                    f"| {statistics.median(r['idle_us_per_req'] for r in rs):.1f} |")
    lines += ["\n### private memory per idle worker (median over workers and runs)\n",
              "| server | USS MiB, freshly started | USS MiB, after the load "
              "| largest after the load | PSS MiB, after the load |",
              "|---|---|---|---|---|"]
    for kind in run.servers:
        rs = [r for r in rows if r["kind"] == kind and r["uss_kib"] is not None]
        fresh = [r["uss_kib_fresh"] for r in rs if r["uss_kib_fresh"] is not None]
        if rs:
            lines.append(f"| {kind} "
                         f"| {statistics.median(fresh) / MIB if fresh else float('nan'):.2f} "
                         f"| {statistics.median(r['uss_kib'] for r in rs) / MIB:.2f} "
                         f"| {max(r['uss_kib_max'] for r in rs) / MIB:.2f} "
                         f"| {statistics.median(r['pss_kib'] for r in rs) / MIB:.2f} |")
    lines += ["\n### ratios within each rep (min / median / max)\n",
              "| ratio | " + " | ".join(SHAPE_TITLE[s] for s in run.shapes) + " |",
              "|---|" + "---|" * len(run.shapes)]
    for label, other, key in (("req/s mps / gunicorn", "gunicorn", "requests_per_s"),
                              ("CPU/req mps / gunicorn", "gunicorn", "cpu_us_per_req"),
                              ("req/s mps / uwsgi", "uwsgi", "requests_per_s"),
                              ("CPU/req mps / uwsgi", "uwsgi", "cpu_us_per_req")):
        cells = []
        for shape in run.shapes:
            values = rep_ratios(rows, shape, "mps", other, key)
            cells.append(span(values) if values else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["\n### targets (issue 8; medians of same-rep ratios)\n",
             "| target | shape | measured | goal | |", "|---|---|---|---|---|"]
    for t in targets:
        value = t["measured"]
        measured = "-" if value is None else str(value) if isinstance(value, int) \
            else f"{value:.3f}"
        lines.append(f"| {t['target']} | {SHAPE_TITLE.get(t['shape'], '')} | {measured} "
                     f"| {t['op']} {t['goal']} | {t['status']} |")
    return "\n".join(lines)


# --------------------------------------------------------------- spike

def sample_children(master: int, stop: threading.Event, out: list[tuple[float, int]],
                    t0: Callable[[], float]) -> None:
    """Children over time, read from /proc: asking the master's status socket
    would both lag (it answers between passes, and during a burst it is busy
    forking) and slow the very thing being measured."""
    path = f"/proc/{master}/task/{master}/children"
    while not stop.is_set():
        try:
            with open(path) as f:
                total = len(f.read().split())
        except OSError:
            return
        out.append((t0(), total))
        time.sleep(0.001)


def burst(port: int, clients: int, timeout: float = 30.0) -> tuple[list[float], list[socket.socket]]:
    """Open `clients` connections as fast as one thread can; seconds from the
    first connect until each got its first byte.  Replies are read between
    the connects too, so one that comes early is timed when it comes, not
    after the last connect (opening 1024 takes this thread ~50 ms)."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    accepted: list[float] = []
    start = time.perf_counter()

    def harvest(wait: float) -> None:
        for key, _ in sel.select(wait):
            conn = key.fileobj
            if not isinstance(conn, socket.socket):
                continue
            try:
                if conn.recv(1):
                    accepted.append(time.perf_counter() - start)
            except OSError:
                pass
            sel.unregister(conn)

    for i in range(clients):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
        if i % 16 == 15:
            harvest(0)
    deadline = start + timeout
    while sel.get_map() and time.perf_counter() < deadline:
        harvest(0.5)
    sel.close()
    return accepted, socks


def bench_spike(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        status_path = os.path.join(tmp, "status.sock")
        extra = ["--log-level", "warning", *args.settings.split()]
        with server(f"mps-{args.backend}", extra, app="mps.examples:hold",
                    status=status_path) as (port, master):
            wait_pool(status_path)
            samples: list[tuple[float, int]] = []
            stop = threading.Event()
            t_start = time.perf_counter()
            sampler = threading.Thread(target=sample_children,
                                       args=(master, stop, samples,
                                             lambda: time.perf_counter() - t_start))
            sampler.start()
            time.sleep(0.05)    # a baseline before the burst
            t_burst = time.perf_counter() - t_start
            accepted, socks = burst(port, args.clients)
            time.sleep(0.1)     # and the settled pool after it
            stop.set()
            sampler.join()
            for s in socks:
                s.close()
    accepted.sort()
    done = accepted[-1] if len(accepted) == args.clients else None
    result = {"clients": args.clients, "accepted": len(accepted), "all_accepted_s": done,
              "accepted_at_s": [round(t, 5) for t in accepted],
              "children_over_time": [(round(t - t_burst, 5), total) for t, total in samples],
              "machine": machine()}
    if args.json:
        print(json.dumps(result))
    else:
        when = "never" if done is None else f"{done * 1000:.1f} ms"
        print(f"burst of {args.clients} held connections against the default pool "
              f"({args.backend} backend): {len(accepted)} accepted; all accepted after {when}")
        print("children over time (ms after the burst: children):")
        series = [(t, n) for t, n in result["children_over_time"] if t >= -0.005]
        changes = [pt for i, pt in enumerate(series) if i == 0 or pt[1] != series[i - 1][1]]
        print("  " + "  ".join(f"{t * 1000:.0f}:{n}" for t, n in changes))
    if args.plot:
        plot_spike(result, args.plot)
    return 0 if done is not None else 1


def wait_pool(status_path: str, timeout: float = 30.0) -> None:
    from .status import query
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            doc = query(status_path, timeout=2)
            if doc["children"]["idle"] >= doc["settings"]["start_servers"]:
                return
        except MpsError:
            pass
        time.sleep(0.02)
    raise MpsError("the pool did not come up")


def plot_spike(result: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install 'mps[plot]' for matplotlib)", file=sys.stderr)
        return
    series = result["children_over_time"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.step([s[0] * 1000 for s in series], [s[1] for s in series], where="post",
            label="children (from /proc)")
    times = result["accepted_at_s"]
    ax.step([0.0] + [t * 1000 for t in times], list(range(len(times) + 1)), where="post",
            label="connections accepted")
    if result["all_accepted_s"] is not None:
        ax.axvline(result["all_accepted_s"] * 1000, color="grey", linestyle=":",
                   label=f"all {result['clients']} accepted")
    ax.set_xlabel("ms after the burst")
    ax.set_ylabel("children")
    ax.set_title(f"mps: burst of {result['clients']} held connections, default pool")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


# --------------------------------------------------------------- scale

SCALE_SIZES = [64, 256, 1024]
ECHO_APP, HOLD_APP = "mps.examples:echo", "mps.examples:hold"
#: The C core's board as _mpscore.c lays it out (struct mps_board): magic and
#: version (uint32 each), size (size_t), then struct mps_head's int64 nslots
#: and idle.  A map checks magic, version and nslots before it is trusted.
BOARD_MAGIC, BOARD_VERSION, BOARD_NSLOTS_AT, BOARD_IDLE_AT = 0x3153504D, 5, 16, 24
#: How often the bench's own sampler reads /proc and the board.
SAMPLE_S = 0.002
#: Longest a pool may take to come up, or a spike to be accepted.
SCALE_TIMEOUT_S = 120.0
#: After start-up, before the pool is measured: the master's start-up polls
#: (every 20 ms until ready) are over, and every child sleeps.
SETTLE_S = 1.0
#: The master's costs: status queries, and loop passes forced by SIGCHLD.
STATUS_QUERIES, STATUS_GAP_S, PASSES, PASS_GAP_S = 10, 0.05, 50, 0.01
#: One lock sample (take, release) every this many µs under the echo load.
LOCK_SAMPLE_US = 500


def schedstat(pid: int) -> tuple[int, int] | None:
    """(CPU time (user+sys), time spent runnable but waiting for a CPU) of
    pid in ns, from /proc/PID/schedstat: the scheduler's own counts.
    /proc/PID/stat's 10 ms ticks are too coarse for a thousand processes
    that each use next to nothing."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def runtime_ns(pid: int) -> int | None:
    """CPU time (user+sys) of pid in ns (schedstat)."""
    stat = schedstat(pid)
    return None if stat is None else stat[0]


def board_path(master: int) -> str | None:
    """/proc/PID/fd/N of the master's scoreboard memfd, or None (not yet)."""
    try:
        fds = os.listdir(f"/proc/{master}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{master}/fd/{fd}").startswith("/memfd:mps-scoreboard"):
                return f"/proc/{master}/fd/{fd}"
        except OSError:
            continue
    return None


class BoardView:
    """A live server's scoreboard mapped read-only: the bench reads the idle
    counter without asking the master, so watching costs the master nothing
    (a status query at 1024 slots costs it milliseconds)."""

    def __init__(self, path: str, nslots: int) -> None:
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
        magic, version = struct.unpack_from("<II", self.map, 0)
        found = struct.unpack_from("<q", self.map, BOARD_NSLOTS_AT)[0]
        if magic == 0 or found == 0:    # sized, not yet written: mps_create_fd is under way
            self.map.close()
            raise ValueError("the scoreboard is not initialised yet")
        if magic != BOARD_MAGIC or version != BOARD_VERSION or found != nslots:
            self.map.close()
            raise MpsError(f"{path} is not a version {BOARD_VERSION} scoreboard of {nslots} "
                           f"slots (magic {magic:#x}, version {version}, {found} slots): "
                           "mps bench and the C core disagree")

    @classmethod
    def find(cls, master: int, nslots: int) -> BoardView | None:
        path = board_path(master)
        if path is None:
            return None
        try:
            return cls(path, nslots)
        except (OSError, ValueError):
            return None     # being created: not sized yet (or the master left)

    def idle(self) -> int:
        return int(struct.unpack_from("<q", self.map, BOARD_IDLE_AT)[0])

    def close(self) -> None:
        self.map.close()


class PoolWatch:
    """Children (from /proc) and idle children (from the board) every
    SAMPLE_S, in a thread of the bench, as (seconds since t0, children, idle)."""

    def __init__(self, master: int, nslots: int, t0: float) -> None:
        self.master, self.nslots, self.t0 = master, nslots, t0
        self.series: list[tuple[float, int, int]] = []
        #: the master's (CPU, runqueue wait) in ns at each point of the series
        self.master_ns: list[tuple[int, int]] = []
        self.board: BoardView | None = None
        self.error: MpsError | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> PoolWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if self.board is not None:
            self.board.close()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.board is None:
                try:
                    self.board = BoardView.find(self.master, self.nslots)
                except MpsError as exc:
                    self.error = exc
                    return
            idle = self.board.idle() if self.board is not None else 0
            cpu = schedstat(self.master) or (self.master_ns[-1] if self.master_ns else (0, 0))
            self.series.append((time.perf_counter() - self.t0, len(children_of(self.master)),
                                idle))
            self.master_ns.append(cpu)
            time.sleep(SAMPLE_S)

    def latest(self) -> tuple[float, int, int]:
        if self.error is not None:
            raise self.error
        return self.series[-1] if self.series else (0.0, 0, 0)

    def first(self, children: int = 0, idle: int = 0) -> float | None:
        """When the pool first had at least `children` children and `idle` idle."""
        return next((t for t, c, i in self.series if c >= children and i >= idle), None)

    def master_busy(self, start: float, end: float) -> tuple[float, float, float]:
        """(the master's CPU seconds, its seconds runnable but waiting for a
        CPU, wall seconds) from `start` to `end`."""
        points = [(t, ns) for (t, _, _), ns in zip(self.series, self.master_ns)
                  if start <= t <= end]
        if len(points) < 2:
            return 0.0, 0.0, 0.0
        (t0, (cpu0, wait0)), (t1, (cpu1, wait1)) = points[0], points[-1]
        return (cpu1 - cpu0) / 1e9, (wait1 - wait0) / 1e9, t1 - t0

    def changes(self, since: float = 0.0) -> list[tuple[float, int, int]]:
        """The series from `since` on, where something changed (kept for plots)."""
        out: list[tuple[float, int, int]] = []
        for point in self.series:
            if point[0] >= since and (not out or point[1:] != out[-1][1:]):
                out.append((round(point[0], 4), point[1], point[2]))
        return out


@dataclass(frozen=True)
class ScaleRun:
    """What one `mps bench scale` run measures, and how."""

    sizes: tuple[int, ...]
    reps: int
    status_every: tuple[float, ...]
    idle_seconds: float
    load_clients: int
    load_seconds: float
    workdir: Path
    lockwatch: str


@dataclass(frozen=True)
class ScaleServer:
    port: int
    master: int
    status: str
    log: Path


def small_spare(n: int) -> int:
    """min_spare of a pool measured idle: small, so that nothing forks meanwhile."""
    return max(1, n // 32)


@contextmanager
def scale_server(run: ScaleRun, name: str, n: int, start: int, min_spare: int,
                 app: str) -> Iterator[ScaleServer]:
    """`mps serve APP` (C backend) with max_children n, start_servers start,
    max_spare n, no recycling, its log in the run's directory."""
    status = str(run.workdir / f"{name}.sock")
    log_path = run.workdir / f"{name}.log"
    backlog = max(1024, 2 * n)
    flags = ["--start-servers", str(start), "--min-spare", str(min_spare),
             "--max-spare", str(n), "--max-children", str(n), "--max-requests", "0",
             "--backlog", str(backlog), "--log-level", "warning", "--status-socket", status]
    with open(log_path, "wb") as log, launched(
            lambda fd: [sys.executable, "-m", "mps", "serve", app, "--bind", f"fd://{fd}",
                        "--backend", "c", *flags], stderr=log, backlog=backlog) as (port, pid):
        yield ScaleServer(port, pid, status, log_path)


def server_failed(srv: ScaleServer, what: str) -> MpsError:
    tail = srv.log.read_text(errors="replace").strip().splitlines()[-3:]
    why = "exited" if exited(srv.master) else what
    return MpsError(f"mps serve (max_children from the run) {why}; its last log lines: "
                    + (" | ".join(tail) or "(none)"))


def measure_startup(srv: ScaleServer, n: int, t0: float, every: float | None) -> dict[str, Any]:
    """From launch to n children idle, watched from /proc and the board; the
    run ends when the board says so (every None) or when a status query,
    made every `every` s, does."""
    queries = 0
    with PoolWatch(srv.master, n, t0) as watch:
        deadline = time.monotonic() + SCALE_TIMEOUT_S
        while True:
            if every is None:
                done = watch.latest()[2] >= n
            else:
                try:
                    queries += 1
                    done = status_query(srv.status, 5.0)["children"]["idle"] >= n
                except MpsError:
                    done = False
            if done:
                break
            if time.monotonic() > deadline or exited(srv.master):
                raise server_failed(srv, f"did not start {n} children within "
                                         f"{SCALE_TIMEOUT_S:.0f} s")
            time.sleep(0.01 if every is None else every)
        seen = time.perf_counter() - t0
        # A status answer can come before the sampler's next look at the board.
        settle = time.monotonic() + 1.0
        while watch.latest()[2] < n and time.monotonic() < settle:
            time.sleep(SAMPLE_S)
        boot_ns = [runtime_ns(kid) for kid in children_of(srv.master)]
    first, forked, idle = watch.first(children=1), watch.first(children=n), watch.first(idle=n)
    span = forked - first if forked is not None and first is not None else 0.0
    cpu, waited, wall = watch.master_busy(first or 0.0, forked or 0.0)
    booted = [ns for ns in boot_ns if ns is not None]
    return {"poll": "board" if every is None else "status", "every_s": every,
            "ready_seen_s": round(seen, 4), "status_queries": queries,
            "first_child_s": first, "all_forked_s": forked, "all_idle_s": idle,
            "forks_per_s": round((n - 1) / span, 1) if n > 1 and span > 0 else None,
            "master_ms_per_fork": 1000 * cpu / (n - 1) if n > 1 and cpu else None,
            "master_busy": cpu / wall if wall else None,
            "master_waiting": waited / wall if wall else None,
            "child_boot_ms": statistics.median(booted) / 1e6 if booted else None,
            "series": watch.changes()}


def status_query(path: str, timeout: float) -> dict[str, Any]:
    from .status import query
    return query(path, timeout=timeout)


def smaps_breakdown(pid: int, top: int = 8) -> list[tuple[str, int]]:
    """pid's private memory (Private_Clean + Private_Dirty, KiB) by mapping
    name -- a file's base name, [heap], [stack], or [anon] -- largest first."""
    totals: dict[str, int] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and not head[0].endswith(":"):     # a mapping's first line
                name = os.path.basename(head[5].strip()) if len(head) > 5 else "[anon]"
                name = name or "[anon]"
            elif head[0] in ("Private_Clean:", "Private_Dirty:"):
                totals[name] = totals.get(name, 0) + int(head[1])
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def pool_memory(master: int) -> dict[str, Any]:
    """USS and PSS of every child (KiB), the median child's private memory by
    mapping, and the master's RSS and USS."""
    rows = []
    for kid in children_of(master):
        try:
            rows.append((kid, *smaps_rollup(kid)))
        except (OSError, KeyError, ValueError):
            pass        # gone meanwhile
    if not rows:
        raise MpsError("no child to measure")
    rows.sort(key=lambda r: r[1])
    median_pid = rows[len(rows) // 2][0]
    try:
        breakdown = smaps_breakdown(median_pid)
    except OSError:
        breakdown = []
    with open(f"/proc/{master}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"children": len(rows),
            "uss_kib": statistics.median(r[1] for r in rows),
            "uss_kib_min": rows[0][1], "uss_kib_max": rows[-1][1],
            "pss_kib": statistics.median(r[2] for r in rows),
            "child_private_by_mapping_kib": breakdown,
            "master_rss_kib": rss, "master_uss_kib": smaps_rollup(master)[0]}


#: The smallest Python prefork: a master that imports only os, socket and
#: signal.  Its children's USS is what forking CPython itself costs.
MINIMAL_PREFORK = """\
import os, signal, socket
sock = socket.socket(fileno={fd})
for _ in range({children}):
    if os.fork() == 0:
        while True:
            conn, addr = sock.accept()
            conn.sendall(b"%d: %s" % (os.getpid(), conn.recv(128)))
            conn.close()
while True:
    signal.pause()
"""


def naive_memory(children: int = 8) -> dict[str, Any]:
    """USS and PSS of an idle child of two floors: py-naive (naive_prefork,
    whose master has imported mps, as `bench serve` runs it) and a minimal
    Python prefork (a master that imports nothing else)."""
    commands: dict[str, Callable[[int], list[str]]] = {
        "py-naive": lambda fd: [sys.executable, "-c", "import socket; from mps.bench import "
                                f"naive_prefork; naive_prefork(socket.socket(fileno={fd}), "
                                f"{children})"],
        "py-minimal": lambda fd: [sys.executable, "-c",
                                  MINIMAL_PREFORK.format(fd=fd, children=children)]}
    out = {}
    for name, command in commands.items():
        with launched(command) as (port, pid):
            wait_serving(port)
            time.sleep(0.3)     # every child in accept(); at most one has served
            memory = worker_memory(pid)
        if not memory:
            raise MpsError(f"{name} had no child to measure")
        out[name] = {"children": len(memory), "uss_kib": statistics.median(m[0] for m in memory),
                     "pss_kib": statistics.median(m[1] for m in memory)}
    return out


def idle_cpu(master: int, seconds: float) -> dict[str, Any]:
    """CPU (user+sys, ns) of the master and its children over `seconds` of idleness."""
    pids = [master, *children_of(master)]
    before = {pid: runtime_ns(pid) for pid in pids}
    t0 = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - t0
    after = {pid: runtime_ns(pid) for pid in pids}
    deltas = {pid: after[pid] - before[pid]                         # type: ignore[operator]
              for pid in pids if before[pid] is not None and after[pid] is not None}
    master_ns = deltas.get(master, 0)
    kids = [d for pid, d in deltas.items() if pid != master]
    return {"seconds": round(elapsed, 3), "children": len(pids) - 1,
            "children_gone": len(pids) - len(deltas),
            "master_ns": master_ns, "children_ns": sum(kids),
            "children_woken": sum(1 for d in kids if d > 0),
            "master_pct": 100 * master_ns / (elapsed * 1e9),
            "children_pct": 100 * sum(kids) / (elapsed * 1e9),
            "total_pct": 100 * (master_ns + sum(kids)) / (elapsed * 1e9)}


def end_program(proc: subprocess.Popen[str], sig: int | None,
                grace: float = 30.0) -> tuple[str, str]:
    """Signal one of the bench's C programs (None: let it finish), collect its
    output; SIGKILL it by its pid if it is still there after `grace` s."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return "", f"{proc.args!r} did not stop within {grace:g} s"


def lockwatch_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise MpsError(f"lockwatch failed: {out.stderr.strip()[-200:]}")
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def master_costs(run: ScaleRun, srv: ScaleServer, n: int, idle_ns_per_s: float,
                 board: str) -> dict[str, Any]:
    """The master's CPU per status query and per loop pass (forced by
    SIGCHLD), its idle rate subtracted; status query latency; every lock
    hold seen meanwhile (lockwatch watch); and the C-only hold of its two
    whole-board calls at this size (lockwatch hold)."""
    c_only = lockwatch_json([run.lockwatch, "hold", str(n), "2000"], 60)
    watch = subprocess.Popen([run.lockwatch, "watch", board, str(srv.master), "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.1)     # spinning before the first query
        latency = []
        c0, t0 = runtime_ns(srv.master), time.perf_counter()
        for _ in range(STATUS_QUERIES):
            q0 = time.perf_counter()
            status_query(srv.status, 10.0)
            latency.append(time.perf_counter() - q0)
            time.sleep(STATUS_GAP_S)
        c1, t1 = runtime_ns(srv.master), time.perf_counter()
        for _ in range(PASSES):
            os.kill(srv.master, signal.SIGCHLD)     # a pass: reap finds nothing
            time.sleep(PASS_GAP_S)
        c2, t2 = runtime_ns(srv.master), time.perf_counter()
    finally:
        out, err = end_program(watch, signal.SIGTERM)
    if c0 is None or c1 is None or c2 is None:
        raise server_failed(srv, "left during the status queries")
    holds: dict[str, Any] = json.loads(out) if watch.returncode == 0 else {}
    return {
        "status_latency_ms": [round(x * 1000, 3) for x in latency],
        "status_cpu_ms": (c1 - c0 - idle_ns_per_s * (t1 - t0)) / STATUS_QUERIES / 1e6,
        "pass_cpu_ms": (c2 - c1 - idle_ns_per_s * (t2 - t1)) / PASSES / 1e6,
        "lock_watch": holds or None,
        "lock_watch_error": None if holds else err.strip()[-200:],
        "c_only": c_only}


def load_cost(run: ScaleRun, srv: ScaleServer, board: str) -> dict[str, Any]:
    """An echo load of run.load_clients clients: CPU per connection of the
    whole server (schedstat of every process), and how long a transition
    waits for the scoreboard lock meanwhile (lockwatch sample)."""
    load(srv.port, run.load_clients, min(0.3, run.load_seconds))    # warm up
    pids = [srv.master, *children_of(srv.master)]
    before = {pid: runtime_ns(pid) or 0 for pid in pids}
    sampler = subprocess.Popen([run.lockwatch, "sample", board, str(run.load_seconds),
                                str(LOCK_SAMPLE_US)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        result = load(srv.port, run.load_clients, run.load_seconds)
    finally:
        out, err = end_program(sampler, None)     # it stops on its own after load_seconds
    pids = list(dict.fromkeys(pids + children_of(srv.master)))
    cpu_ns = sum((runtime_ns(pid) or before.get(pid, 0)) - before.get(pid, 0) for pid in pids)
    if sampler.returncode != 0:
        raise MpsError(f"lockwatch sample failed: {err.strip()[-200:]}")
    waits = json.loads(out)["wait_ns"]
    return {"clients": run.load_clients, "conns": result["conns"],
            "conns_per_s": result["conns_per_s"], "errors": result["errors"],
            "p50_us": result["p50_us"], "p99_us": result["p99_us"],
            "cpu_us_per_conn": cpu_ns / 1e3 / max(1, result["conns"]), "lock_wait_ns": waits}


def measure_spike(run: ScaleRun, n: int, rep: int) -> dict[str, Any]:
    """n held connections at once against a pool of n/4 (min_spare n/8,
    max_children n): time until all are accepted, children over time."""
    start, min_spare = max(1, n // 4), max(1, n // 8)
    with scale_server(run, f"spike-{n}-{rep}", n, start, min_spare, HOLD_APP) as srv:
        t0 = time.perf_counter()
        with PoolWatch(srv.master, n, t0) as watch:
            deadline = time.monotonic() + SCALE_TIMEOUT_S
            while watch.latest()[2] < start:
                if time.monotonic() > deadline or exited(srv.master):
                    raise server_failed(srv, f"did not start {start} children")
                time.sleep(0.01)
            time.sleep(0.2)     # a baseline before the burst
            t_burst = time.perf_counter() - t0
            at_burst = watch.latest()[1]
            before = {kid: runtime_ns(kid) for kid in children_of(srv.master)}
            accepted, socks = burst(srv.port, n, timeout=SCALE_TIMEOUT_S)
            time.sleep(0.1)     # and the pool after it
        # The new children's CPU so far: boot, one accept, one send.
        new = [runtime_ns(kid) for kid in children_of(srv.master) if kid not in before]
        for s in socks:
            s.close()
    accepted.sort()
    series = [(round(t - t_burst, 4), c, i) for t, c, i in watch.changes(since=t_burst - 0.02)]
    peak = max((c for _, c, _ in series), default=at_burst)
    grew = [t for t, c, _ in series if c > at_burst]
    full = next((t for t, c, _ in series if c >= peak), None)
    forks = peak - at_burst
    span = full - grew[0] if grew and full is not None else 0.0
    cpu, waited, wall = watch.master_busy(t_burst + grew[0], t_burst + full) \
        if grew and full else (0.0, 0.0, 0.0)
    done = accepted[-1] if len(accepted) == n else None
    booted = [ns for ns in new if ns is not None]
    return {"clients": n, "start_servers": start, "min_spare": min_spare,
            "children_at_burst": at_burst, "children_peak": peak, "forks": forks,
            "accepted": len(accepted), "all_accepted_s": done,
            "first_fork_s": grew[0] if grew else None, "last_fork_s": full if grew else None,
            "forks_per_s": round((forks - 1) / span, 1) if forks > 1 and span > 0 else None,
            "forks_per_s_overall": round(forks / done, 1) if forks and done else None,
            "master_ms_per_fork": 1000 * cpu / (forks - 1) if forks > 1 and cpu else None,
            "master_busy": cpu / wall if wall else None,
            "master_waiting": waited / wall if wall else None,
            "new_child_cpu_ms": statistics.median(booted) / 1e6 if booted else None,
            "accepted_at_s": [round(t, 4) for t in accepted], "series": series}


def scale_size(run: ScaleRun, n: int, rep: int) -> dict[str, Any]:
    """Every measurement at max_children n, in the order that needs fewest
    server starts: start-up with status polling (one server per interval);
    start-up watched only, then memory, idle CPU, the master's costs and
    the echo load on that same pool; the spike on a pool of its own."""
    row: dict[str, Any] = {"size": n, "rep": rep, "startup": []}
    for every in run.status_every:
        t0 = time.perf_counter()
        with scale_server(run, f"startup-{n}-{rep}-{every}", n, n, small_spare(n),
                          ECHO_APP) as srv:
            row["startup"].append(measure_startup(srv, n, t0, every))
    t0 = time.perf_counter()
    with scale_server(run, f"pool-{n}-{rep}", n, n, small_spare(n), ECHO_APP) as srv:
        row["startup"].append(measure_startup(srv, n, t0, None))
        time.sleep(SETTLE_S)
        row["memory"] = pool_memory(srv.master)
        row["idle"] = idle_cpu(srv.master, run.idle_seconds)
        board = board_path(srv.master)
        if board is None:
            raise server_failed(srv, "has no scoreboard memfd")
        rate = row["idle"]["master_ns"] / row["idle"]["seconds"]
        row["master"] = master_costs(run, srv, n, rate, board)
        row["load"] = load_cost(run, srv, board)
        time.sleep(0.3)     # the children back to idle
        after = pool_memory(srv.master)
        row["memory"]["uss_kib_after_load"] = after["uss_kib"]
        row["memory"]["master_rss_kib_after_load"] = after["master_rss_kib"]
    row["spike"] = measure_spike(run, n, rep)
    return row


def bench_scale(args: argparse.Namespace) -> int:
    if not c_available():
        raise UsageError("mps bench scale runs the C backend, which is not built here")
    programs = {}
    # Both before any server starts: no compiler is one line up front (load()
    # finds loadgen in the cache again).
    for name in ("loadgen", "lockwatch"):
        try:
            programs[name] = build(name)
        except CannotBuild as exc:
            raise CannotBuild(f"mps bench scale cannot build its {name} program: {exc}") \
                from None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mps-bench-scale-") as tmp:
        run = ScaleRun(sizes=tuple(args.sizes), reps=args.reps,
                       status_every=tuple(args.status_every), idle_seconds=args.idle_seconds,
                       load_clients=args.load_clients, load_seconds=args.load_seconds,
                       workdir=Path(tmp), lockwatch=programs["lockwatch"])
        naive = naive_memory()
        for rep in range(run.reps):
            for n in run.sizes:
                row = scale_size(run, n, rep)
                rows.append(row)
                if not args.json:
                    print(scale_progress(row), flush=True)
    settings = {"sizes": list(run.sizes), "reps": run.reps,
                "status_every_s": list(run.status_every), "idle_seconds": run.idle_seconds,
                "load_clients": run.load_clients, "load_seconds": run.load_seconds}
    targets = scale_targets(rows)
    if args.json:
        print(json.dumps({"results": rows, "naive": naive, "targets": targets,
                          "settings": settings, "machine": machine()}))
    else:
        print(scale_report(rows, naive, run))
        print(scale_targets_table(targets))
    if args.plot:
        plot_scale(rows, args.plot)
    return 0


def at_size(rows: list[dict[str, Any]], n: int, get: Callable[[dict[str, Any]], Any]) -> Any:
    """The median over reps at size n of get(row), None values left out (None if none)."""
    values = [v for v in (get(r) for r in rows if r["size"] == n) if v is not None]
    return statistics.median(values) if values else None


def startup_of(row: dict[str, Any], every: float | None) -> dict[str, Any]:
    return next(s for s in row["startup"] if s["every_s"] == every)


def lock_max_us(row: dict[str, Any], who: str = "master_holds_ns", stat: str = "max") -> Any:
    watch = row["master"]["lock_watch"]
    value = watch[who][stat] if watch else None
    return None if value is None else value / 1000


def scale_progress(row: dict[str, Any]) -> str:
    board = startup_of(row, None)
    spike, mem, idle = row["spike"], row["memory"], row["idle"]
    done = "never" if spike["all_accepted_s"] is None else f"{spike['all_accepted_s']:.3f} s"
    return (f"  size={row['size']} rep={row['rep']} start-up {board['all_idle_s'] or 0:.3f} s "
            f"({board['forks_per_s'] or 0:.0f} forks/s)  spike: all accepted {done}, "
            f"{spike['forks_per_s'] or 0:.0f} forks/s  USS {mem['uss_kib'] / MIB:.2f} MiB  "
            f"idle {idle['total_pct']:.4f} %  status {row['master']['status_cpu_ms']:.2f} ms "
            f"CPU  load {row['load']['cpu_us_per_conn']:.1f} us/conn")


def pick(*keys: str) -> Callable[[dict[str, Any]], Any]:
    """A getter of row[k1][k2]...: pick("idle", "total_pct")."""
    def get(row: dict[str, Any]) -> Any:
        value: Any = row
        for key in keys:
            value = value[key]
        return value
    return get


def fmt(value: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def scale_report(rows: list[dict[str, Any]], naive: dict[str, Any], run: ScaleRun) -> str:
    """Markdown: one table per measurement, a row per size (medians over reps)."""
    sizes = run.sizes
    lines = [f"\n### pool start-up: start_servers = max_children = N (median of {run.reps})\n",
             "| N | watched (board, /proc): all idle, s | forks/s | master CPU ms per fork "
             "| master on a CPU | master waiting for one | child's boot CPU, ms | " + " | ".join(
                 f"status every {e:g} s: all idle, s | seen by status, s | forks/s"
                 for e in run.status_every) + " |",
             "|---|---|---|---|---|---|---|" + "---|---|---|" * len(run.status_every)]
    for n in sizes:
        def watched(key: str) -> Callable[[dict[str, Any]], Any]:
            return lambda r: startup_of(r, None)[key]
        cells = [fmt(at_size(rows, n, watched("all_idle_s"))),
                 fmt(at_size(rows, n, watched("forks_per_s")), ".0f"),
                 fmt(at_size(rows, n, watched("master_ms_per_fork"))),
                 fmt(at_size(rows, n, watched("master_busy")), ".0%"),
                 fmt(at_size(rows, n, watched("master_waiting")), ".0%"),
                 fmt(at_size(rows, n, watched("child_boot_ms")))]
        for e in run.status_every:
            def polled(key: str, e: float = e) -> Callable[[dict[str, Any]], Any]:
                return lambda r: startup_of(r, e)[key]
            cells += [fmt(at_size(rows, n, polled("all_idle_s"))),
                      fmt(at_size(rows, n, polled("ready_seen_s"))),
                      fmt(at_size(rows, n, polled("forks_per_s")), ".0f")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")

    lines += ["\n### spike: N held connections against a pool of N/4 (min_spare N/8)\n",
              "| N | children at the burst | all N accepted, s | forks | forks/s while forking "
              "| forks/s over the whole spike | master CPU ms per fork | master on a CPU "
              "| master waiting for one | a new child's CPU, ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        specs = (("children_at_burst", ".0f"), ("all_accepted_s", ".3g"), ("forks", ".0f"),
                 ("forks_per_s", ".0f"), ("forks_per_s_overall", ".0f"),
                 ("master_ms_per_fork", ".3g"), ("master_busy", ".0%"),
                 ("master_waiting", ".0%"),
                 ("new_child_cpu_ms", ".3g"))
        lines.append(f"| {n} | " + " | ".join(fmt(at_size(rows, n, pick("spike", key)), spec)
                                              for key, spec in specs) + " |")

    lines += ["\n### memory per idle echo child (smaps_rollup; median over children)\n",
              "| N | USS MiB (min–max) | PSS MiB | USS MiB after the load | master RSS MiB "
              "| master USS MiB |", "|---|---|---|---|---|---|"]
    for n in sizes:
        m = [lambda r, k=k: r["memory"][k] for k in
             ("uss_kib", "uss_kib_min", "uss_kib_max", "pss_kib", "uss_kib_after_load",
              "master_rss_kib", "master_uss_kib")]
        v = [at_size(rows, n, g) for g in m]
        lines.append(f"| {n} | {fmt(v[0], '.2f', 1 / MIB)} ({fmt(v[1], '.2f', 1 / MIB)}–"
                     f"{fmt(v[2], '.2f', 1 / MIB)}) | {fmt(v[3], '.2f', 1 / MIB)} "
                     f"| {fmt(v[4], '.2f', 1 / MIB)} | {fmt(v[5], '.1f', 1 / MIB)} "
                     f"| {fmt(v[6], '.1f', 1 / MIB)} |")
    for name, what in (("py-naive", "naive_prefork, its master has imported mps"),
                       ("py-minimal", "a master that imports only os, socket, signal")):
        floor = naive[name]
        lines.append(f"| {name} ({what}; {floor['children']} children) "
                     f"| {floor['uss_kib'] / MIB:.2f} | {floor['pss_kib'] / MIB:.2f} | | | |")
    last = [r for r in rows if r["size"] == sizes[-1]][-1]
    lines.append(f"\nprivate memory of the median idle child at N = {sizes[-1]}, by mapping "
                 "(KiB): " + ", ".join(f"{name} {kib}" for name, kib in
                                      last["memory"]["child_private_by_mapping_kib"]))

    lines += [f"\n### idle: N idle children for {run.idle_seconds:g} s, user+sys from "
              "/proc/PID/schedstat\n",
              "| N | master, % of one core | children | total | children woken at all |",
              "|---|---|---|---|---|"]
    for n in sizes:
        i = [lambda r, k=k: r["idle"][k] for k in
             ("master_pct", "children_pct", "total_pct", "children_woken")]
        lines.append(f"| {n} | {fmt(at_size(rows, n, i[0]), '.4f')} "
                     f"| {fmt(at_size(rows, n, i[1]), '.4f')} "
                     f"| {fmt(at_size(rows, n, i[2]), '.4f')} "
                     f"| {fmt(at_size(rows, n, i[3]), '.0f')} |")

    lines += ["\n### the master's costs, and the scoreboard lock (N idle children)\n",
              "| N | status query latency, ms | master CPU per status query, ms "
              "| master CPU per loop pass, ms | longest lock hold by the master, µs "
              "| its p99, µs | longest by a child, µs | holds not timed (watcher descheduled) "
              "| C only: mps_snapshot hold, µs | mps_audit hold, µs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        c = [lambda r: statistics.median(r["master"]["status_latency_ms"]),
             lambda r: r["master"]["status_cpu_ms"], lambda r: r["master"]["pass_cpu_ms"],
             lambda r: lock_max_us(r), lambda r: lock_max_us(r, stat="p99"),
             lambda r: lock_max_us(r, "child_holds_ns"),
             lambda r: (r["master"]["lock_watch"] or {}).get("holds_not_timed"),
             lambda r: r["master"]["c_only"]["snapshot_ns"]["p50"] / 1000,
             lambda r: r["master"]["c_only"]["audit_ns"]["p50"] / 1000]
        lines.append(f"| {n} | " + " | ".join(fmt(at_size(rows, n, g)) for g in c) + " |")

    lines += [f"\n### under an echo load ({run.load_clients} clients, {run.load_seconds:g} s, "
              f"one lock sample every {LOCK_SAMPLE_US} µs)\n",
              "| N | conn/s | CPU µs/conn (whole server) | lock wait p50, µs | p99, µs "
              "| longest, µs | errors |", "|---|---|---|---|---|---|---|"]
    for n in sizes:
        g = [lambda r: r["load"]["conns_per_s"], lambda r: r["load"]["cpu_us_per_conn"],
             lambda r: r["load"]["lock_wait_ns"]["p50"] / 1000,
             lambda r: r["load"]["lock_wait_ns"]["p99"] / 1000,
             lambda r: r["load"]["lock_wait_ns"]["max"] / 1000]
        errors = sum(r["load"]["errors"] for r in rows if r["size"] == n)
        lines.append(f"| {n} | {fmt(at_size(rows, n, g[0]), '.0f')} | "
                     + " | ".join(fmt(at_size(rows, n, f)) for f in g[1:]) + f" | {errors} |")
    return "\n".join(lines)


#: Issue 11's scale targets: (label, getter, op, goal); each checked at every size.
SCALE_TARGETS: tuple[tuple[str, Callable[[dict[str, Any]], Any], str, float], ...] = (
    ("spike: forks/s sustained", lambda r: r["spike"]["forks_per_s"], ">=", 500),
    ("USS per idle echo child, MiB", lambda r: r["memory"]["uss_kib"] / MIB, "<=", 1.0),
    ("idle pool: master + children, % of one core", lambda r: r["idle"]["total_pct"], "<",
     0.1),
    ("longest scoreboard lock hold by the master, µs (issue: 'a few µs')",
     lambda r: lock_max_us(r), "<=", 5.0),
)


def scale_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    targets = []
    for label, get, op, goal in SCALE_TARGETS:
        for n in sorted({r["size"] for r in rows}):
            measured = at_size(rows, n, get)
            each = [get(r) for r in rows if r["size"] == n]
            targets.append({"target": label, "size": n, "measured": measured, "op": op,
                            "goal": goal, "status": verdict(measured, op, goal),
                            "per_rep": each})
    return targets


def scale_targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["\n### targets (issue 11; medians over reps)\n",
             "| target | N | measured | each rep | goal | |", "|---|---|---|---|---|---|"]
    for t in targets:
        each = " / ".join(fmt(v, ".3g") for v in t["per_rep"])
        lines.append(f"| {t['target']} | {t['size']} | {fmt(t['measured'], '.4g')} | {each} "
                     f"| {t['op']} {t['goal']:g} | {t['status']} |")
    return "\n".join(lines)


def plot_scale(rows: list[dict[str, Any]], directory: str) -> None:
    """PNGs where a curve says more than a table: children over time in a
    spike and at start-up, idle CPU, memory, and the load's cost against N."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plots: pip install 'mps[plot]' for matplotlib)", file=sys.stderr)
        return
    os.makedirs(directory, exist_ok=True)
    sizes = sorted({r["size"] for r in rows})
    first = {n: next(r for r in rows if r["size"] == n) for n in sizes}
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        spike = first[n]["spike"]
        series = spike["series"]
        ax.step([t * 1000 for t, _, _ in series], [c for _, c, _ in series], where="post",
                label="children (/proc)")
        times = spike["accepted_at_s"]
        ax.step([0.0] + [t * 1000 for t in times], list(range(len(times) + 1)), where="post",
                label="connections accepted")
        ax.set_title(f"N = {n}: burst of {n}, pool of {spike['start_servers']}")
        ax.set_xlabel("ms after the burst")
        ax.set_ylabel("children / connections")
        ax.legend(fontsize=8)
    save(fig, "scale-spike.png")

    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for s in first[n]["startup"]:
            label = "watched" if s["every_s"] is None else f"status every {s['every_s']:g} s"
            ts = [t for t, _, _ in s["series"]]
            ax.step(ts, [c for _, c, _ in s["series"]], where="post",
                    label=f"children, {label}")
            ax.step(ts, [i for _, _, i in s["series"]], where="post", linestyle="--",
                    label=f"idle, {label}")
        ax.set_title(f"start-up of {n} children")
        ax.set_xlabel("s after launch")
        ax.legend(fontsize=7)
    save(fig, "scale-startup.png")

    def medians(get: Callable[[dict[str, Any]], Any]) -> list[Any]:
        return [at_size(rows, n, get) for n in sizes]

    def against_n(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
        """An axis of the pool sizes (log 2) and its labels."""
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, label, style in (("master_pct", "master", "-"), ("children_pct", "children", "-"),
                              ("total_pct", "total", ":")):
        ax.plot(sizes, medians(pick("idle", key)), marker="o", linestyle=style, label=label)
    ax.axhline(0.1, color="grey", linestyle=":", label="target 0.1 %")
    against_n(ax, "idle children (N)", "% of one core", "an idle pool's CPU")
    ax.legend(fontsize=8)
    save(fig, "scale-idle-cpu.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(sizes, medians(lambda r: r["memory"]["uss_kib"] / MIB), marker="o",
            label="USS per idle child")
    ax.plot(sizes, medians(lambda r: r["memory"]["pss_kib"] / MIB), marker="o",
            label="PSS per idle child")
    ax.plot(sizes, medians(lambda r: r["memory"]["uss_kib_after_load"] / MIB), marker="o",
            label="USS per child after the load")
    ax.axhline(1.0, color="grey", linestyle=":", label="target USS 1.0 MiB")
    against_n(ax, "children (N)", "MiB", "memory per child")
    ax.legend(fontsize=8)
    save(fig, "scale-memory.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(sizes, medians(lambda r: r["load"]["cpu_us_per_conn"]), marker="o")
    against_n(left, "children (N)", "server CPU µs per connection",
              "echo load: CPU per connection")
    left.set_ylim(bottom=0)
    for stat in ("p50", "p99", "max"):
        right.plot(sizes, [v / 1000 for v in medians(pick("load", "lock_wait_ns", stat))],
                   marker="o", label=f"wait {stat}")
    right.plot(sizes, medians(lambda r: lock_max_us(r)), marker="s", linestyle="--",
               label="longest master hold (idle)")
    against_n(right, "children (N)", "µs", "scoreboard lock")
    right.set_yscale("log")
    right.legend(fontsize=8)
    save(fig, "scale-load.png")
    print("plots written: " + ", ".join(written), file=sys.stderr)


# --------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line and exit 2 (UsageError), no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "locks": bench_locks, "serve": bench_serve, "http": bench_http, "spike": bench_spike,
    "scale": bench_scale}


def build_parser() -> argparse.ArgumentParser:
    """`mps bench` and its subcommands; every flag has a help line."""
    parser = _Parser(
        prog="mps bench",
        description="Measure the pool's own work against C and Python references, in one run "
                    "(method and recorded numbers: benchmarks/RESULTS.md in the source).",
        epilog="The C programs ship inside the package and are compiled on first use with $CC "
               "(else cc) into $MPS_BENCH_CACHE, else $XDG_CACHE_HOME/mps/bench, else "
               "~/.cache/mps/bench.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    json_help = "print one JSON document instead of the report"

    locks = sub.add_parser(
        "locks", help="scoreboard cost of one connection: C vs Python backend vs C floors",
        description="ns per busy+idle transition pair on one slot, each process on its own "
                    "slot of one shared scoreboard; no C compiler needed (without one only "
                    "the C-only floor, c-raw, is skipped).")
    locks.add_argument("--procs", default=[1, 2, 4], type=parse_list, metavar="N[,N...]",
                       help="numbers of processes to measure, comma-separated (default: 1,2,4)")
    locks.add_argument("--seconds", default=1.0, type=positive_float, metavar="S",
                       help="measuring time per backend and process count, split over the "
                            "reps (default: %(default)s)")
    locks.add_argument("--reps", default=5, type=positive_int, metavar="N",
                       help="interleaved runs per backend; the median is reported "
                            "(default: %(default)s)")
    locks.add_argument("--json", action="store_true", help=json_help)

    serve = sub.add_parser(
        "serve", help="echo servers under a loopback load: mps vs a C and a naive Python prefork",
        description="Connections/s, latency and server CPU per connection of each server kind "
                    "under a C load generator; needs a C compiler.")
    serve.add_argument("--clients", default=[16, 64], type=parse_list, metavar="N[,N...]",
                       help="concurrent client counts, comma-separated (default: 16,64)")
    serve.add_argument("--seconds", default=3.0, type=positive_float, metavar="S",
                       help="load time per measurement, after a warm-up (default: %(default)s)")
    serve.add_argument("--reps", default=5, type=positive_int, metavar="N",
                       help="repetitions, the kinds interleaved in a rotating order; "
                            "ratios are taken within each rep (default: %(default)s)")
    serve.add_argument("--kinds", default=list(SERVER_KINDS), type=server_kinds,
                       metavar="K[,K...]",
                       help="servers to compare, comma-separated, from "
                            f"{', '.join(SERVER_KINDS)} (default: all)")
    serve.add_argument("--json", action="store_true", help=json_help)

    http = sub.add_parser(
        "http", help="a hello-world WSGI app on mps, gunicorn and uWSGI: req/s, CPU, memory",
        description="Requests/s, server CPU per request (user+sys of each server's process "
                    "tree) and private memory per idle worker, 4 worker processes each, in "
                    "two shapes: one connection per request, and keep-alive (per-client "
                    "response counts show starvation).  gunicorn and uWSGI run when "
                    "installed (pip install 'mps[bench]'); needs a C compiler.")
    http.add_argument("--clients", default=16, type=positive_int, metavar="N",
                      help="concurrent clients in each shape (default: %(default)s)")
    http.add_argument("--seconds", default=3.0, type=positive_float, metavar="S",
                      help="load time per measurement, after a 0.5 s warm-up "
                           "(default: %(default)s)")
    http.add_argument("--reps", default=5, type=positive_int, metavar="N",
                      help="repetitions, the servers interleaved in a rotating order; "
                           "medians are reported (default: %(default)s)")
    http.add_argument("--servers", default=list(HTTP_SERVERS),
                      type=choices_list("server", HTTP_SERVERS), metavar="S[,S...]",
                      help=f"servers to compare, from {', '.join(HTTP_SERVERS)} "
                           "(default: all; those not installed are skipped, said in one line)")
    http.add_argument("--shapes", default=list(HTTP_SHAPES),
                      type=choices_list("shape", HTTP_SHAPES), metavar="S[,S...]",
                      help=f"load shapes, from {', '.join(HTTP_SHAPES)} (default: both)")
    http.add_argument("--uwsgi", default="", metavar="PATH",
                      help="the uwsgi program (default: uwsgi beside this Python, else on PATH)")
    http.add_argument("--json", action="store_true", help=json_help)

    spike = sub.add_parser(
        "spike", help="a burst of held connections against the default pool",
        description="Time until every connection of a burst has a child, and the children "
                    "over time, read from /proc.")
    spike.add_argument("--clients", default=64, type=positive_int, metavar="N",
                       help="connections opened at once, each holding a child "
                            "(default: %(default)s)")
    spike.add_argument("--backend", default="c" if c_available() else "python",
                       choices=["c", "python"],
                       help="scoreboard backend of the server (default: %(default)s)")
    spike.add_argument("--plot", default="", metavar="FILE",
                       help="write the children-over-time plot to this PNG (needs matplotlib)")
    spike.add_argument("--settings", default="", metavar="FLAGS",
                       help="extra mps serve flags, e.g. '--max-children 128'")
    spike.add_argument("--json", action="store_true", help=json_help)

    scale = sub.add_parser(
        "scale", help="the pool's own cost as it grows: start-up, spike, memory, idle CPU",
        description="For each max_children N: pool start-up (watched from /proc and the "
                    "scoreboard, and with status polled), a spike of N held connections "
                    "against a pool of N/4, memory per idle child, the idle pool's CPU, the "
                    "master's cost of a status query and of a loop pass, the scoreboard "
                    "lock's holds and waits, and CPU per connection under an echo load; "
                    "the C backend; needs a C compiler.")
    scale.add_argument("--sizes", default=SCALE_SIZES, type=parse_list, metavar="N[,N...]",
                       help="max_children values, comma-separated (default: 64,256,1024)")
    scale.add_argument("--reps", default=1, type=positive_int, metavar="N",
                       help="repetitions of every measurement; medians are reported "
                            "(default: %(default)s)")
    scale.add_argument("--status-every", default=[0.1], type=parse_floats, metavar="S[,S...]",
                       help="start-up is also measured with `mps status` polled every S "
                            "seconds, one pool start per value (default: 0.1)")
    scale.add_argument("--idle-seconds", default=10.0, type=positive_float, metavar="S",
                       help="how long the idle pool's CPU is measured (default: %(default)s)")
    scale.add_argument("--load-clients", default=64, type=positive_int, metavar="N",
                       help="concurrent clients of the echo load (default: %(default)s)")
    scale.add_argument("--load-seconds", default=2.0, type=positive_float, metavar="S",
                       help="echo load time per size, after a 0.3 s warm-up "
                            "(default: %(default)s)")
    scale.add_argument("--plot", default="", metavar="DIR",
                       help="write scale-*.png plots into DIR (needs matplotlib)")
    scale.add_argument("--json", action="store_true", help=json_help)
    return parser


def parse_floats(text: str) -> list[float]:
    """Comma-separated positive numbers (an argparse type)."""
    return [positive_float(x) for x in text.split(",") if x] or [positive_float(text)]


def server_kinds(text: str) -> list[str]:
    """Comma-separated server kinds (an argparse type)."""
    kinds = [k for k in text.split(",") if k]
    unknown = sorted(set(kinds) - set(SERVER_KINDS))
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"unknown server kind {', '.join(unknown) or text!r}; "
                                         f"choose from {', '.join(SERVER_KINDS)}")
    return kinds


def choices_list(what: str, allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names from ``allowed``, no repeats."""
    def parse(text: str) -> list[str]:
        names = [k for k in text.split(",") if k]
        unknown = sorted(set(names) - set(allowed))
        if not names or unknown or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(
                f"unknown or repeated {what} {', '.join(unknown) or text!r}; "
                f"choose from {', '.join(allowed)}")
        return names
    return parse


def main(argv: Sequence[str]) -> int:
    """`mps bench ARGV`: parse, run one subcommand, return its exit status."""
    args = build_parser().parse_args(list(argv))
    if args.command is None:
        raise UsageError("mps bench needs one of: " + ", ".join(COMMANDS)
                         + " (see `mps bench --help`)")
    return COMMANDS[args.command](args)
