"""Fuzzing operator input: settings given as flags, ``MPS_*`` variables and
``Server(**kwargs)`` keywords, and bind strings.

``mps.config.resolve()`` run in this process predicts whether a combination
is valid.  Every invalid one is then given to the real command (or a tiny
``Server`` script) in a subprocess, which must refuse it the way SPEC §3 and
§8 say: exit status 2, exactly one line on stderr naming the setting, no
traceback, and nothing bound (the run uses ``--bind unix:DIR/x.sock`` and the
test watches that path while the process runs).

An in-process property test with many more examples checks that
``resolve()`` is total: it returns Settings that satisfy every documented
rule, or raises SettingError -- never any other exception.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from conftest import wait_until
from mps import config
from mps.errors import SettingError
from mps.sockets import parse_bind

TIMEOUT = 30.0
FIELDS = {f.name: f for f in config.fields()}
NUMERIC = sorted(n for n, f in FIELDS.items() if f.metadata["kind"] in ("int", "float"))
INT64_MAX = 2 ** 63 - 1

#: Subprocess fuzzing: a few dozen real processes per test (~0.3 s each).
SUBPROCESS = settings(max_examples=40, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])

# Text an operator might type (no NUL: argv and the environment cannot hold
# one; no lone surrogates: they cannot be encoded for exec).
CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")

BAD_NUMBER_TEXT = st.sampled_from([
    "-1", "-5", "-0.5", "abc", "", " ", "nan", "NaN", "-nan", "inf", "-inf", "Infinity",
    "1e999", "-1e999", "1.2.3", "0x10", "--", "1e", "five", "3 4", "\n", "7\n8",
])
NUMBER_TEXT = st.one_of(
    BAD_NUMBER_TEXT,
    st.integers(-10, 10 ** 20).map(str),
    st.integers(0, 200).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["9" * 5000, "1" + "0" * 400, "1_000", "+3", " 7 ", "\u0663", "1e3", "0", "1", "2",
                     "65535", "65536", "0.0", "1e-300", "18446744073709551616"]),
    st.text(CHARS, max_size=8),
)


# ----------------------------------------------------------------- running


@dataclass
class Run:
    code: int
    out: str
    err: str
    bound: bool         # the watched socket path appeared while it ran


def run_watching(cmd: list[str], watch: Path, cwd: Path,
                 env: Mapping[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion in its own session, watching for ``watch``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MPS_")}
    out_path, err_path = cwd / "stdout", cwd / "stderr"
    seen = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env={**clean, **(env or {})}, cwd=str(cwd),
                                start_new_session=True)
        try:
            def finished() -> bool:
                nonlocal seen
                seen = seen or os.path.lexists(watch)
                return proc.poll() is not None
            wait_until(finished, TIMEOUT, interval=0.002, what=f"{cmd[2:]} to exit")
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # a forked child left behind
            except ProcessLookupError:
                pass
    seen = seen or os.path.lexists(watch)
    return Run(proc.returncode, out_path.read_text(errors="replace"),
               err_path.read_text(errors="replace"), seen)


def mps_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mps", "serve", *args]


def assert_refused(r: Run, names: set[str]) -> str:
    """Exit 2, one stderr line naming one of ``names`` (setting, flag or env var)."""
    assert "Traceback" not in r.err, r.err
    assert r.code == 2, f"exit {r.code}, stderr:\n{r.err}"
    lines = r.err.splitlines()
    assert len(lines) == 1, f"want one line on stderr, got:\n{r.err}"
    line = lines[0]
    named = [n for n in names if f"setting {n}=" in line or config.flag(n) in line
             or config.env_var(n) in line]
    assert named, f"the line names none of {sorted(names)}: {line}"
    assert not r.bound, "the socket was bound although the settings were refused"
    assert r.out == ""
    return line


def predict(keywords: Mapping[str, Any] | None = None,
            command_line: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> set[str] | None:
    """None if resolve() accepts; else the settings a refusal may name.

    A SettingError names one setting.  Any other exception is a bug in
    resolve(); the subprocess must still refuse cleanly, naming one of the
    fuzzed settings."""
    try:
        config.resolve(keywords=keywords, command_line=command_line, environ=environ or {})
    except SettingError as exc:
        return {exc.name}
    except Exception:  # noqa: BLE001 - reported through the subprocess's behaviour
        return set(keywords or {}) | set(command_line or {}) | \
            {n for n in FIELDS if config.env_var(n) in (environ or {})}
    return None


def typed_flags(values: Mapping[str, str]) -> dict[str, Any] | SettingError:
    """What the CLI makes of ``--name=text`` flags (in the table's order)."""
    out: dict[str, Any] = {}
    try:
        for f in config.fields():
            if f.name in values:
                out[f.name] = config.parse_text(f, values[f.name], config.flag(f.name))
    except SettingError as exc:
        return exc
    return out


# ----------------------------------------------------------------- (a) flags


@SUBPROCESS
@given(st.dictionaries(st.sampled_from(NUMERIC), NUMBER_TEXT, min_size=1, max_size=4))
def test_fuzzed_numeric_flags_are_refused_in_one_line(values: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "x.sock"
        typed = typed_flags(values)
        if isinstance(typed, SettingError):
            names: set[str] | None = {typed.name}
        else:
            names = predict(command_line={**typed, "bind": f"unix:{sock}"})
        assume(names is not None)       # valid: nothing to refuse
        assert names is not None
        args = [f"{config.flag(n)}={v}" for n, v in values.items()]
        r = run_watching(mps_cmd(f"--bind=unix:{sock}", *args), sock, Path(tmp))
        assert_refused(r, names)


# ----------------------------------------------------------------- (b) environment


@SUBPROCESS
@given(st.dictionaries(st.sampled_from(NUMERIC), NUMBER_TEXT, min_size=1, max_size=4))
def test_fuzzed_numeric_env_vars_are_refused_in_one_line(values: dict[str, str]) -> None:
    env = {config.env_var(n): v for n, v in values.items()}
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "x.sock"
        names = predict(command_line={"bind": f"unix:{sock}"}, environ=env)
        assume(names is not None)
        assert names is not None
        r = run_watching(mps_cmd(f"--bind=unix:{sock}"), sock, Path(tmp), env=env)
        assert_refused(r, names)


# ----------------------------------------------------------------- (c) keywords


def literal(value: Any) -> str:
    """Python source for ``value`` (repr() of nan/inf is not source)."""
    if isinstance(value, float):
        return f"float({str(value)!r})"
    return repr(value)


SCRIPT = """\
import mps

server = mps.Server(**{{{kwargs}}})


@server.handler
def handle(conn, addr):
    conn.sendall(b"unreachable")


server.run()
"""

KEYWORD_VALUE = st.one_of(
    st.integers(-1000, 1000),
    st.integers(-(2 ** 70), 2 ** 70),
    st.sampled_from([0, 1, -1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63), 10 ** 20]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
)


@SUBPROCESS
@given(st.dictionaries(st.sampled_from(NUMERIC), KEYWORD_VALUE, min_size=1, max_size=4))
def test_fuzzed_server_keywords_are_refused_in_one_line(values: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "x.sock"
        names = predict(keywords=values, command_line={"bind": f"unix:{sock}"})
        assume(names is not None)
        assert names is not None
        script = Path(tmp) / "app.py"
        script.write_text(SCRIPT.format(
            kwargs=", ".join(f"{n!r}: {literal(v)}" for n, v in values.items())))
        r = run_watching([sys.executable, str(script), "--bind", f"unix:{sock}"],
                         sock, Path(tmp))
        assert_refused(r, names)


# ----------------------------------------------------------------- bind strings


HOSTS = st.one_of(st.sampled_from(["127.0.0.1", "localhost", "", "::1", "[::1]", "0.0.0.0",
                                   "host name", "\u4f8b", "1.2.3.4.5"]),
                  st.text(CHARS, max_size=6))
PORTS = st.one_of(st.sampled_from(["", "-1", "65536", "99999", "abc", "\u0663", " 80", "80 ",
                                   "+80", "8_0", "0x50", "1e3", "80:80", "\n"]),
                  st.integers(65536, 10 ** 12).map(str))
BIND_TEXT = st.one_of(
    st.builds(lambda h, p: f"{h}:{p}", HOSTS, PORTS),
    st.builds(lambda h, p: f"[{h}]:{p}", HOSTS, PORTS),
    st.builds(lambda h, p: f"[{h}]{p}", HOSTS, PORTS),
    st.builds(lambda h: h, HOSTS),
    st.sampled_from(["unix:", "unix:/" + "x" * 107, "unix:/" + "\u00e9" * 60, "fd://",
                     "fd://x", "fd://-1", "fd://3.0", "fd://0x3", "fd://-0x1", "tcp://x:1",
                     "[::1", "]:80", ":", "[]:", "[]:80"]),
    st.builds(lambda t: "fd://" + t, st.text(CHARS, max_size=6)),
    st.builds(lambda t: "unix:" + t, st.sampled_from(["", "/" + "y" * 200])),
    st.text(CHARS, max_size=12),
)


@SUBPROCESS
@given(BIND_TEXT)
def test_fuzzed_bind_strings_are_refused_in_one_line(text: str) -> None:
    flags = {"bind": text, "start_servers": "0", "min_spare": "0"}
    typed = typed_flags(flags)      # the CLI strips blanks around the text
    assert not isinstance(typed, SettingError)
    assume(predict(command_line=typed) is not None)
    with tempfile.TemporaryDirectory() as tmp:
        never = Path(tmp) / "never.sock"
        r = run_watching(mps_cmd(*(f"{config.flag(n)}={v}" for n, v in flags.items())),
                         never, Path(tmp))
        assert_refused(r, {"bind"})


# ----------------------------------------------------------------- resolve() is total


def _path_ok(path: str) -> bool:
    try:
        os.fsencode(path)
    except UnicodeError:
        return False
    return "\0" not in path


def check_invariants(s: config.Settings) -> None:
    """Every rule the settings table, SPEC §3 and STYLE promise of Settings."""
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        kind, meta = f.metadata["kind"], f.metadata
        if kind == "int":
            assert type(value) is int, (f.name, value)
        elif kind == "float":
            assert type(value) is float and math.isfinite(value), (f.name, value)
        elif kind == "bool":
            assert type(value) is bool, (f.name, value)
        elif kind in ("str", "choice"):
            assert type(value) is str, (f.name, value)
        else:
            assert value is None or (type(value) is str and value != ""), (f.name, value)
        if meta["minimum"] is not None:
            assert value >= meta["minimum"], (f.name, value)
        if meta["maximum"] is not None:
            assert value <= meta["maximum"], (f.name, value)
        if meta["choices"]:
            assert value in meta["choices"], (f.name, value)
    assert s.min_spare <= s.max_spare
    assert s.start_servers <= s.max_children <= s.backlog <= 65535
    # Numbers handed to the C core are validated in Python first (STYLE 8):
    # they fit its int64 fields.
    assert s.min_spare <= INT64_MAX and s.max_children <= INT64_MAX
    address = parse_bind(s.bind)
    if address.path:
        assert _path_ok(address.path) and len(os.fsencode(address.path)) <= 107
    if address.fd >= 0 or s.bind.startswith("fd://"):
        assert 0 <= address.fd <= 2 ** 31 - 1     # a file descriptor is a C int
    for name in ("pid_file", "log_file", "status_socket"):
        path = getattr(s, name)
        if path is not None:
            assert _path_ok(path), (name, path)     # the OS can open it
            assert os.path.isdir(os.path.dirname(os.path.abspath(path)))
    if s.status_socket is not None:
        assert len(os.fsencode(s.status_socket)) <= 107     # what bind() accepts
    s.identity()        # does not raise once resolve() accepted the user/group


ANY_TEXT = st.one_of(st.text(max_size=12),
                     st.sampled_from(["0", "nobody", "nogroup", "root", "65534", "\u00b2",
                                      "\u0663", "99999999999999999999", "c", "python",
                                      "auto", "info", "debug", "/", ".", "x.pid"]))
ANY_VALUE = st.one_of(
    st.integers(-(2 ** 70), 2 ** 70),
    st.integers(-5, 100),
    st.sampled_from([2 ** 63, 2 ** 64, 10 ** 309, -(10 ** 309), 65535, 65536]),
    st.floats(allow_nan=True, allow_infinity=True),
    ANY_TEXT,
    st.none(),
    st.booleans(),
    st.builds(lambda h, p: f"{h}:{p}", HOSTS, PORTS),
    st.builds(lambda t: "unix:" + t, st.text(max_size=120)),
    st.builds(lambda t: "fd://" + t, st.text(max_size=22)),
)
NAMES = st.sampled_from(sorted(FIELDS) + ["no_such_setting"])


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(NAMES, ANY_VALUE, max_size=6))
def test_resolve_returns_sound_settings_or_raises_setting_error(kwargs: dict[str, Any]) -> None:
    try:
        s = config.resolve(keywords=kwargs, environ={})
    except SettingError as exc:
        assert exc.name in FIELDS or exc.name in kwargs
        assert "\n" not in str(exc), f"a SettingError is one line: {str(exc)!r}"
        return
    check_invariants(s)


ENV_TEXT = st.one_of(NUMBER_TEXT, ANY_TEXT.filter(lambda t: "\0" not in t))


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)).map(config.env_var), ENV_TEXT,
                       max_size=5))
def test_resolve_from_any_environment_is_total(environ: dict[str, str]) -> None:
    try:
        s = config.resolve(environ=environ)
    except SettingError as exc:
        assert "\n" not in str(exc), f"a SettingError is one line: {str(exc)!r}"
        return
    check_invariants(s)


# ----------------------------------------------------------------- found by fuzzing
# Each case below is one concrete input the fuzzers above found (or that
# sits next to one); they make every finding fail deterministically.

BIG = "1" + "0" * 400       # an int beyond a float (and below int()'s digit limit)


@pytest.mark.parametrize("kwargs, names", [
    pytest.param({"user": "a\0b"}, {"user"}, id="user-nul"),          # ValueError
    pytest.param({"user": "\u00b2"}, {"user"}, id="user-superscript"),  # isdigit(), not int()
    pytest.param({"group": "\u00b2"}, {"group"}, id="group-superscript"),
    pytest.param({"group": "a\0b"}, {"group"}, id="group-nul"),
    pytest.param({"group": "99999999999999999999"}, {"group"}, id="group-huge-gid"),
    pytest.param({"timeout": 10 ** 309}, {"timeout"}, id="timeout-int-beyond-float"),
    pytest.param({"graceful_timeout": -(10 ** 309)}, {"graceful_timeout"},
                 id="graceful-timeout-int-beyond-float"),
    pytest.param({"bind": "unix:\ud800"}, {"bind"}, id="bind-unix-surrogate"),
    pytest.param({"bind": "unix:/tmp/a\0b"}, {"bind"}, id="bind-unix-nul"),
    pytest.param({"bind": "fd://99999999999999999999"}, {"bind"}, id="bind-fd-huge"),
    pytest.param({"bind": "fd://2147483648"}, {"bind"}, id="bind-fd-beyond-c-int"),
    pytest.param({"pid_file": "mps\0.pid"}, {"pid_file"}, id="pid-file-nul"),
    pytest.param({"log_file": "mps\0.log"}, {"log_file"}, id="log-file-nul"),
    pytest.param({"status_socket": "s\0.sock"}, {"status_socket"}, id="status-socket-nul"),
    pytest.param({"status_socket": "/tmp/" + "s" * 120}, {"status_socket"},
                 id="status-socket-too-long"),
    pytest.param({"min_spare": 2 ** 64, "max_spare": 2 ** 64}, {"min_spare", "max_spare"},
                 id="min-spare-beyond-int64"),
    pytest.param({"pid_file": "/no\nsuch/mps.pid"}, {"pid_file"}, id="pid-file-newline"),
])
def test_resolve_refuses_with_a_one_line_setting_error(kwargs: dict[str, Any],
                                                      names: set[str]) -> None:
    with pytest.raises(SettingError) as info:
        config.resolve(keywords=kwargs, environ={})
    assert info.value.name in names
    assert "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("args, names", [
    pytest.param(["--min-spare=99999999999999999999", "--max-spare=99999999999999999999"],
                 {"min_spare", "max_spare"}, id="min-spare-beyond-int64"),
    pytest.param(["--user=\u00b2"], {"user"}, id="user-superscript"),
    pytest.param(["--group=99999999999999999999"], {"group"}, id="group-huge-gid"),
    pytest.param(["--backlog=" + BIG], {"backlog"}, id="backlog-huge"),
    # argparse turns an explicit "--" value into [] (it drops "--" from the
    # values); parse_text then calls [].strip().
    pytest.param(["--backlog=--"], {"backlog"}, id="flag-value-double-dash"),
    pytest.param(["--bind=fd://99999999999999999999"], {"bind"}, id="bind-fd-huge"),
])
def test_cli_refuses_without_a_traceback(args: list[str], names: set[str],
                                         tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    r = run_watching(mps_cmd(f"--bind=unix:{sock}", "--start-servers=1", "--max-children=2",
                             *args), sock, tmp_path)
    assert_refused(r, names)


def test_env_refuses_without_a_traceback(tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    r = run_watching(mps_cmd(f"--bind=unix:{sock}"), sock, tmp_path, env={"MPS_BACKLOG": BIG})
    assert_refused(r, {"backlog"})


@pytest.mark.parametrize("name", ["max_requests", "max_requests_jitter", "max_spare"])
def test_resolve_takes_any_int_without_crashing(name: str) -> None:
    # An int too big for a float may be refused or accepted, but only ever
    # through SettingError (math.isfinite(10**400) raises OverflowError).
    try:
        s = config.resolve(keywords={name: int(BIG)}, environ={})
    except SettingError as exc:
        assert exc.name == name
        return
    check_invariants(s)


@pytest.mark.parametrize("kwargs, names", [
    pytest.param("'timeout': 10 ** 309", {"timeout"}, id="timeout-int-beyond-float"),
    pytest.param("'pid_file': 'mps\\0.pid', 'start_servers': 1, 'max_children': 2",
                 {"pid_file"}, id="pid-file-nul"),
])
def test_server_script_refuses_without_a_traceback(kwargs: str, names: set[str],
                                                   tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    script = tmp_path / "app.py"
    script.write_text(SCRIPT.format(kwargs=kwargs))
    r = run_watching([sys.executable, str(script), "--bind", f"unix:{sock}"], sock, tmp_path)
    assert_refused(r, names)
