"""The settings table: the single source of every mps setting.

Each field of :class:`Settings` declares, once, a setting's name, type,
default, help text and rule.  The command-line flags (``--start-servers``),
the environment variables (``MPS_START_SERVERS``), the ``Server(**kwargs)``
keywords and the README's settings section are all generated from it
(``tests/test_config.py`` fails when the README drifts).

Precedence: default < ``MPS_*`` environment < keyword argument < command line.
"""
from __future__ import annotations

import dataclasses
import grp
import math
import os
import pwd
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingError

ENV_PREFIX = "MPS_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def setting(default: Any, help: str, *, kind: str, seed: str = "",
            minimum: float | None = None, maximum: float | None = None,
            choices: tuple[str, ...] = ()) -> Any:
    """Declare one row of the table (a dataclass field with its metadata)."""
    meta = {"help": help, "kind": kind, "seed": seed, "minimum": minimum,
            "maximum": maximum, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Every setting, with the seed's defaults.  Build with :func:`resolve`."""

    bind: str = setting(
        "127.0.0.1:8000", kind="str", seed="PORT 8000",
        help="Address to listen on: HOST:PORT, [V6ADDR]:PORT, unix:PATH or fd://N "
             "(an inherited listening socket). Port 0 picks a free port.")
    reuse_port: bool = setting(
        False, kind="bool",
        help="SO_REUSEPORT: several masters may listen on one port (blue/green, one per "
             "NUMA node); the kernel spreads connections, a stopping master drains its own.")
    backlog: int = setting(
        1024, kind="int", minimum=1, maximum=65535, seed="MAXLISTEN",
        help="Length of the kernel's queue of connections waiting for a child.")
    start_servers: int = setting(
        32, kind="int", minimum=0, maximum=65535, seed="STARTSERVERS",
        help="Children forked at start (and after a HUP rotation).")
    min_spare: int = setting(
        8, kind="int", minimum=0, maximum=65535, seed="MINSPARESERVERS",
        help="Fewest idle children: below it the master forks the deficit at once.")
    max_spare: int = setting(
        32, kind="int", minimum=1, maximum=65535, seed="MAXSPARESERVERS",
        help="Most idle children: a lasting surplus is retired gracefully.")
    max_children: int = setting(
        64, kind="int", minimum=1, maximum=65535, seed="MAXCLIENTS",
        help="Hard cap on children; beyond it connections wait in the backlog.")
    max_requests: int = setting(
        128, kind="int", minimum=0, maximum=2**62, seed="MAXSERVICES",
        help="Connections a child serves before it is replaced; 0 = never.")
    max_requests_jitter: int = setting(
        0, kind="int", minimum=0, maximum=2**62,
        help="Each child's limit is max_requests + randint(0, jitter), so children "
             "do not recycle together.")
    timeout: float = setting(
        0.0, kind="float", minimum=0, maximum=10**9,
        help="Seconds one connection may hold a child before the master kills it; 0 = off.")
    graceful_timeout: float = setting(
        30.0, kind="float", minimum=0, maximum=10**9,
        help="Seconds a graceful stop (TERM) waits for busy children before SIGKILL.")
    backend: str = setting(
        "auto", kind="choice", choices=("auto", "c", "python"),
        help="Scoreboard backend: c, python, or auto (C if built, else Python).")
    status_socket: str | None = setting(
        None, kind="path",
        help="Path of a Unix socket (mode 0600) where the master answers status queries.")
    pid_file: str | None = setting(
        None, kind="path", help="Write the master's pid here (atomically); removed on exit.")
    daemon: bool = setting(
        False, kind="bool", seed="daemon(1,1), always on in the seed",
        help="Detach from the terminal after binding and run in the background.")
    log_file: str | None = setting(
        None, kind="path", help="Append log lines to this file instead of stderr; "
                                "reopened on HUP.")
    log_level: str = setting(
        "info", kind="choice", choices=("debug", "info", "warning", "error"),
        help="Least severe log level written.")
    user: str | None = setting(
        None, kind="path",
        help="Run children as this user (name or uid). The master binds first, as root.")
    group: str | None = setting(
        None, kind="path",
        help="Run children with this group (name or gid); default: the user's group.")
    single: bool = setting(
        False, kind="bool",
        help="Debug mode: serve in one process in the foreground, no fork "
             "(like Apache's -X).")
    # --- behind a load balancer --------------------------------------------
    proxy_protocol: bool = setting(
        False, kind="bool",
        help="Read a PROXY protocol header (v1 or v2, HAProxy's send-proxy) before each "
             "connection's handler runs; the handler sees the real client address.")
    proxy_allow_ips: str = setting(
        "127.0.0.1,::1", kind="str",
        help="Comma-separated addresses or networks allowed to send a PROXY header; "
             "a connection from anyone else is closed. * = any.")
    metrics_bind: str | None = setting(
        None, kind="path",
        help="HOST:PORT where the master serves /metrics (Prometheus), /ready and /live; "
             "off by default.")
    drain_delay: float = setting(
        0.0, kind="float", minimum=0, maximum=3600,
        help="On TERM, first report not-ready on /ready for this long while still serving "
             "(the balancer takes the instance out), then stop as usual.")
    # --- HTTP (mps serve --wsgi) -------------------------------------------
    limit_request_line: int = setting(
        8190, kind="int", minimum=64, maximum=1 << 20,
        help="WSGI: longest request target (bytes); longer is answered 414.")
    limit_request_fields: int = setting(
        100, kind="int", minimum=1, maximum=32768,
        help="WSGI: most header fields in a request; more is answered 431.")
    limit_request_field_size: int = setting(
        8190, kind="int", minimum=64, maximum=1 << 20,
        help="WSGI: longest header field, name and value (bytes); longer is answered 431.")
    max_body: int = setting(
        16 << 20, kind="int", minimum=0, maximum=2**62,
        help="WSGI: largest request body (bytes); larger is answered 413 before it is "
             "read. 0 = no limit.")
    header_timeout: float = setting(
        10.0, kind="float", minimum=0.1, maximum=3600,
        help="WSGI: seconds a client has to send a whole request head (then 408); under "
             "pool pressure a head still arriving after 1 s is dropped (slowloris).")
    body_timeout: float = setting(
        20.0, kind="float", minimum=0.1, maximum=3600,
        help="WSGI: seconds a request body may take, plus one second per body_min_rate "
             "bytes received (Apache's mod_reqtimeout); then 408.")
    body_min_rate: int = setting(
        500, kind="int", minimum=1, maximum=2**62,
        help="WSGI: bytes a second that extend body_timeout.")
    keepalive_timeout: float = setting(
        5.0, kind="float", minimum=0, maximum=3600,
        help="WSGI: seconds an idle keep-alive connection may wait for its next request; "
             "0 = no keep-alive. Idle connections are also closed at once when a new "
             "connection waits for a child.")
    # 1000, as nginx since 1.19.10, not Apache's 100: under pool pressure a
    # busy connection already lets go after KEEPALIVE_SLICE_S (mps.http.wsgi),
    # so the count is only a bound, and 100 made the keep-alive benchmark
    # reconnect every 100 requests, at a tenth of the CPU per request.
    keepalive_requests: int = setting(
        1000, kind="int", minimum=1, maximum=2**62,
        help="WSGI: requests served on one connection before it is closed.")
    forwarded_allow_ips: str = setting(
        "127.0.0.1,::1", kind="str",
        help="WSGI: comma-separated addresses or networks of proxies whose "
             "X-Forwarded-For/-Proto set REMOTE_ADDR and wsgi.url_scheme; * = any.")
    access_log: str | None = setting(
        None, kind="path",
        help="WSGI: append an access log line per request to this file (- = stdout).")
    access_log_format: str = setting(
        '%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i"', kind="str",
        help="WSGI: access log format, Apache's directives (%D: request time in µs).")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        self._check_combinations()

    def _check_combinations(self) -> None:
        from .sockets import parse_bind  # sockets imports nothing from here

        parse_bind(self.bind)
        self._check_http()
        if self.min_spare > self.max_spare:
            raise SettingError("min_spare", self.min_spare,
                               f"must not exceed max_spare ({self.max_spare})")
        if self.start_servers > self.max_children:
            raise SettingError("start_servers", self.start_servers,
                               f"must not exceed max_children ({self.max_children})")
        if self.max_children > self.backlog:
            raise SettingError("max_children", self.max_children,
                               f"must not exceed backlog ({self.backlog})")
        self.identity()     # an unknown user or group is a setting error
        if self.status_socket is not None:
            check_path("status_socket", self.status_socket, limit=107)  # sun_path
        for name in ("pid_file", "log_file", "status_socket"):
            path = getattr(self, name)
            if path is not None:
                parent = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(parent):
                    raise SettingError(name, path, f"directory {parent!r} does not exist")

    def _check_http(self) -> None:
        import ipaddress

        for name in ("forwarded_allow_ips", "proxy_allow_ips"):
            value = getattr(self, name)
            for item in value.split(","):
                item = item.strip()
                if item and item != "*":
                    try:
                        ipaddress.ip_network(item, strict=False)
                    except ValueError:
                        raise SettingError(name, value,
                                           f"{item!r} is not an address or network") from None
        if self.metrics_bind is not None:
            from .sockets import parse_bind
            try:
                address = parse_bind(self.metrics_bind)
            except SettingError as exc:
                raise SettingError("metrics_bind", self.metrics_bind, exc.rule) from None
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                raise SettingError("metrics_bind", self.metrics_bind,
                                   "expected HOST:PORT or [V6ADDR]:PORT")
        if "%" in self.access_log_format:
            from .http.accesslog import compile_format  # downward: http imports no config
            try:
                compile_format(self.access_log_format)
            except ValueError as exc:
                raise SettingError("access_log_format", self.access_log_format,
                                   str(exc)) from None

    def identity(self) -> tuple[int, int] | None:
        """(uid, gid) children switch to, or None to stay as they are."""
        if self.user is None and self.group is None:
            return None
        uid, gid = os.getuid(), os.getgid()
        if self.user is not None:
            entry = _lookup(pwd.getpwuid, pwd.getpwnam, "user", self.user)
            uid, gid = entry.pw_uid, entry.pw_gid
        if self.group is not None:
            gid = _lookup(grp.getgrgid, grp.getgrnam, "group", self.group).gr_gid
        if os.geteuid() != 0 and (uid, gid) != (os.getuid(), os.getgid()):
            name = "user" if self.user is not None else "group"
            raise SettingError(name, getattr(self, name), "switching identity needs root; "
                               "start mps as root or drop the setting")
        return uid, gid

    def public(self) -> dict[str, Any]:
        """The settings as a plain dict (for the status document)."""
        return dataclasses.asdict(self)


def _lookup(by_id: Callable[[int], Any], by_name: Callable[[str], Any], name: str,
            value: str) -> Any:
    """A passwd/group entry by number or name; SettingError if there is none."""
    try:
        if value.isascii() and value.isdigit():
            return by_id(int(value))
        return by_name(value)
    except (KeyError, ValueError, OverflowError):
        raise SettingError(name, value, f"no such {name} on this machine") from None


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
    "choice": (str,), "path": (str, type(None)),
}


def _check_field(f: dataclasses.Field[Any], value: object) -> None:
    kind = f.metadata["kind"]
    if not isinstance(value, _TYPES[kind]) or (kind in ("int", "float")
                                               and isinstance(value, bool)):
        raise SettingError(f.name, value, f"must be of type {kind}")
    if isinstance(value, (int, float)):
        _check_number(f, value)
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise SettingError(f.name, value, "must be one of " + ", ".join(choices))
    if kind == "path" and isinstance(value, str):
        check_path(f.name, value)


def _check_number(f: dataclasses.Field[Any], value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):   # NaN passes every < and >
        raise SettingError(f.name, value, "must be a finite number")
    minimum, maximum = f.metadata["minimum"], f.metadata["maximum"]
    if minimum is not None and value < minimum:
        raise SettingError(f.name, value, f"must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise SettingError(f.name, value, f"must be at most {maximum:g}")


def check_path(name: str, path: str, limit: int = 4096) -> None:
    """A usable file system path: not empty, no NUL, encodable, not too long."""
    if path == "":
        raise SettingError(name, path, "must not be empty")
    try:
        raw = os.fsencode(path)
    except UnicodeError:
        raise SettingError(name, path, "is not a valid file name") from None
    if b"\0" in raw:
        raise SettingError(name, path, "must not contain a NUL byte")
    if len(raw) > limit:
        raise SettingError(name, path, f"is longer than {limit} bytes")


def fields() -> tuple[dataclasses.Field[Any], ...]:
    """The rows of the table, in declaration order."""
    return dataclasses.fields(Settings)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parse_text(f: dataclasses.Field[Any], text: str, source: str) -> Any:
    """Convert a flag or environment string to the field's type."""
    kind = f.metadata["kind"]
    if not isinstance(text, str):       # argparse hands `--flag --` over as []
        raise SettingError(f.name, text, f"{source} needs a value")
    parsers: dict[str, Callable[[str], Any]] = {
        "int": int, "float": float, "str": str, "choice": str, "path": str,
        "bool": _parse_bool,
    }
    try:
        return parsers[kind](text.strip() if kind != "path" else text)
    except ValueError:
        raise SettingError(f.name, text, f"{source} must be a{'n' if kind == 'int' else ''} "
                                         f"{kind} value") from None


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(text)


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as ``MPS_*`` variables."""
    out: dict[str, Any] = {}
    for f in fields():
        var = env_var(f.name)
        if var in environ:
            out[f.name] = parse_text(f, environ[var], var)
    return out


def check_names(values: Mapping[str, Any]) -> None:
    known = {f.name for f in fields()}
    for name in values:
        if name not in known:
            raise SettingError(name, values[name], "no such setting (see `mps serve --help`)")


def resolve(keywords: Mapping[str, Any] | None = None,
            command_line: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> Settings:
    """Merge default < environment < keywords < command line, then validate."""
    merged: dict[str, Any] = from_env(os.environ if environ is None else environ)
    for layer in (keywords or {}, command_line or {}):
        check_names(layer)
        merged.update(layer)
    fixed = {f.name: f for f in fields()}
    for name, value in merged.items():
        if fixed[name].metadata["kind"] == "float" and isinstance(value, int) \
                and not isinstance(value, bool):
            try:
                merged[name] = float(value)
            except OverflowError:
                raise SettingError(name, value, "must be a finite number") from None
    return Settings(**merged)


def settings_markdown() -> str:
    """The README's settings table, generated from the table above."""
    rows = ["| setting | flag | environment | default | seed | meaning |",
            "|---|---|---|---|---|---|"]
    for f in fields():
        default = "none" if f.default is None else repr(f.default).strip("'")
        if f.metadata["kind"] == "bool":
            default = "off" if not f.default else "on"
        rows.append(f"| `{f.name}` | `{flag(f.name)}` | `{env_var(f.name)}` | `{default}` "
                    f"| {f.metadata['seed']} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"
