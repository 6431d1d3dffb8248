"""``mps bench``: measure the pool's own work against references, in one run.

    mps bench locks [--procs 1,2,4] [--seconds S] [--reps N] [--json]
    mps bench serve [--clients 16,64] [--seconds S] [--reps N] [--kinds K,...] [--json]
    mps bench http [--clients 16] [--seconds S] [--reps N] [--servers mps,gunicorn,uwsgi]
                   [--shapes close,keepalive] [--uwsgi PATH] [--json]
    mps bench spike [--clients 64] [--backend B] [--plot FILE] [--settings ...] [--json]

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
import os
import platform
import selectors
import shlex
import shutil
import signal
import socket
import statistics
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
LIBS: dict[str, tuple[str, ...]] = {"loadgen": (), "ref_prefork": (), "lockbench": ("-lpthread",)}
NEEDS_CORE = {"lockbench"}          # #includes _mpscore.c


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
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


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
    """A Python prefork with no scoreboard at all: accept, echo, close.

    The context row of `mps bench serve`: what Python itself costs per
    connection, so the framework's own share can be read off.
    """
    from .daemon import die_with_parent
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
                    conn, _ = sock.accept()
                    conn.sendall(b"%d: %s" % (os.getpid(), conn.recv(128)))
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
def launched(command: Callable[[int], list[str]],
             stderr: IO[bytes] | None = None) -> Iterator[tuple[int, int]]:
    """Run ``command(fd)`` in a session of its own, handing it a socket that
    listens on 127.0.0.1 (a free port); yield (port, pid); end it by its pid
    and its process group, whatever happens meanwhile."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
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
        print(json.dumps({"results": rows, "machine": machine()}))
        return 0
    print(serve_report(rows, kinds, args.clients))
    return 0


def serve_report(rows: list[dict[str, Any]], kinds: list[str], clients_list: list[int]) -> str:
    """Markdown tables: min / median / max over reps, and per-rep ratios to c-ref."""
    lines = []
    for clients in clients_list:
        lines += [f"\n### {clients} concurrent clients (min / median / max over reps)\n",
                  "| server | conn/s | p50 µs | p99 µs | CPU µs/conn | CPU ratio to c-ref "
                  "| conn/s ratio to c-ref | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        mine = [r for r in rows if r["clients"] == clients]
        ref = {r["rep"]: r for r in mine if r["kind"] == "c-ref"}
        for kind in kinds:
            rs = [r for r in mine if r["kind"] == kind]
            if not rs:
                continue
            cpu_ratio = [r["cpu_us_per_conn"] / ref[r["rep"]]["cpu_us_per_conn"]
                         for r in rs if r["rep"] in ref]
            cps_ratio = [r["conns_per_s"] / ref[r["rep"]]["conns_per_s"]
                         for r in rs if r["rep"] in ref]
            lines.append(
                f"| {kind} | {summary([r['conns_per_s'] for r in rs])} "
                f"| {summary([r['p50_us'] for r in rs])} | {summary([r['p99_us'] for r in rs])} "
                f"| {summary([r['cpu_us_per_conn'] for r in rs])} "
                f"| {summary(cpu_ratio) if cpu_ratio else '-'} "
                f"| {summary(cps_ratio) if cps_ratio else '-'} "
                f"| {sum(r['errors'] for r in rs)} |")
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
    # Keep-alive: a request that waits the whole run is starvation (counted
    # in per_client), not a timeout error.
    timeout = max(5.0, seconds + 2) if shape == "keepalive" else 5.0
    out = subprocess.run([build("loadgen"), "--port", str(port), "--clients", str(clients),
                          "--seconds", str(seconds), "--http", shape,
                          "--timeout", str(timeout)],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise MpsError(f"loadgen failed: {out.stderr.strip()[-200:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def smaps_rollup(pid: int) -> tuple[int, int]:
    """(USS, PSS) of pid in KiB: Private_Clean + Private_Dirty, and Pss."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def worker_memory(master: int) -> list[tuple[int, int]]:
    """(USS, PSS) in KiB of each child of the server's first process."""
    try:
        with open(f"/proc/{master}/task/{master}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    memory = []
    for kid in kids:
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
    return "PASS" if (measured >= goal if op == ">=" else measured <= goal) else "MISS"


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
    """Markdown: one table per shape, the memory table, the ratios."""
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

def hold(conn: socket.socket, addr: Any) -> None:
    """Spike handler: say hello at once, then hold the child until released."""
    conn.sendall(b"!")
    while conn.recv(64):
        pass


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
    """Open `clients` connections at once; seconds until each got its first byte."""
    sel = selectors.DefaultSelector()
    socks = []
    start = time.perf_counter()
    for _ in range(clients):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    accepted: list[float] = []
    deadline = start + timeout
    while len(accepted) < clients and time.perf_counter() < deadline:
        for key, _ in sel.select(0.5):
            conn = key.fileobj
            if not isinstance(conn, socket.socket):
                continue
            try:
                if conn.recv(1):
                    accepted.append(time.perf_counter() - start)
            except OSError:
                pass
            sel.unregister(conn)
    sel.close()
    return accepted, socks


def bench_spike(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        status_path = os.path.join(tmp, "status.sock")
        extra = ["--log-level", "warning", *args.settings.split()]
        with server(f"mps-{args.backend}", extra, app="mps.bench:hold",
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


# --------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line and exit 2 (UsageError), no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "locks": bench_locks, "serve": bench_serve, "http": bench_http, "spike": bench_spike}


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
        "serve", help="echo servers under a loopback load: mps vs a C prefork reference",
        description="Connections/s, latency and server CPU per connection of each server kind "
                    "under a C load generator; needs a C compiler.")
    serve.add_argument("--clients", default=[16, 64], type=parse_list, metavar="N[,N...]",
                       help="concurrent client counts, comma-separated (default: 16,64)")
    serve.add_argument("--seconds", default=3.0, type=positive_float, metavar="S",
                       help="load time per measurement, after a warm-up (default: %(default)s)")
    serve.add_argument("--reps", default=3, type=positive_int, metavar="N",
                       help="repetitions, the kinds interleaved in a rotating order "
                            "(default: %(default)s)")
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
    return parser


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
