"""The command line: ``mps serve``, ``mps status``, ``mps bench``.

Only this module turns an :class:`MpsError` into an exit status: one line on
stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from . import config, daemon, logs
from ._version import __version__
from .errors import EXIT_OK, EXIT_USAGE, AppError, MpsError, UsageError
from .handlers import App

DEFAULT_APP = "mps.examples:echo"


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line and exit 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def add_setting_flags(parser: argparse.ArgumentParser,
                      defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per row of the settings table; ``defaults`` (an app's Server
    keywords) replace the table's in the help, as they do in the settings."""
    group = parser.add_argument_group("settings (also MPS_<NAME> environment variables)")
    for f in config.fields():
        default = (defaults or {}).get(f.name, f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f.metadata["help"].replace("%", "%%") + _default_text(default)}
        if f.metadata["kind"] == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
        group.add_argument(config.flag(f.name), **kwargs)


def _default_text(value: object) -> str:
    """The help's ' (default: X)'; nothing for an unset path.  (Not `value in
    (None, False)`: 0 == False would hide the default of --timeout.)"""
    if value is None:
        return ""
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f" (default: {value})".replace("%", "%%")    # argparse %-formats help


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mps", description="A prefork multi-process service framework.")
    parser.add_argument("--version", action="version", version=f"mps {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = sub.add_parser("serve", help="run APP in a prefork pool")
    serve.add_argument("app", nargs="?", default=None, metavar="APP",
                       help=f"module:callable or path/file.py:callable (default: {DEFAULT_APP})")
    serve.add_argument("--wsgi", metavar="TARGET", default=None,
                       help="serve a WSGI application over HTTP instead: module:app, "
                            "path/file.py:app or module:create_app()")
    add_setting_flags(serve)
    status = sub.add_parser("status", help="ask a running master for its status")
    status.add_argument("socket", metavar="PATH", help="the master's --status-socket")
    status.add_argument("--json", action="store_true", help="print the JSON document")
    for name, what, default in (("reload", "upgrade a running master to the code on disk "
                                            "(USR2) and wait until it serves", 60.0),
                                ("stop", "stop a running master gracefully (TERM) and wait "
                                         "until it is gone", 90.0)):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("--pid-file", metavar="PATH", help="the master's --pid-file")
        cmd.add_argument("--status-socket", metavar="PATH", help="the master's --status-socket")
        cmd.add_argument("--timeout", metavar="SECONDS", type=float, default=default,
                         help=f"give up after this long (default: {default:g})")
        if name == "stop":
            cmd.add_argument("--fast", action="store_true",
                             help="fast stop (INT): children are ended at once")
    bench = sub.add_parser("bench", help="benchmarks (see benchmarks/RESULTS.md)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def settings_from_flags(namespace: argparse.Namespace) -> dict[str, Any]:
    """Typed values of the setting flags given on the command line."""
    given: dict[str, Any] = {}
    for f in config.fields():
        if hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            given[f.name] = value if isinstance(value, bool) else \
                config.parse_text(f, value, config.flag(f.name))
    return given


def serve_app(make_app: Callable[[], App], argv: list[str]) -> int:
    """``Server.run()``: settings from keywords, env and ``argv``; exit status."""
    def serve() -> int:
        app = make_app()
        parser = _Parser(prog=os.path.basename(sys.argv[0]) or "mps",
                         description="Serve this app in an mps prefork pool. A default "
                                     "shown is the app's own (its Server keywords) or mps's.")
        add_setting_flags(parser, app.settings)
        return _serve(app, settings_from_flags(parser.parse_args(argv)))
    return _guard(serve)


def _serve(app: App, flags: dict[str, Any]) -> int:
    settings = config.resolve(keywords=app.settings, command_line=flags)
    if app.wsgi is not None:
        from .http.wsgi import WSGIHandler
        app.handler = WSGIHandler.from_settings(app.wsgi, settings)
    if settings.proxy_protocol:
        from .handlers import Proxied
        app.handler = Proxied(app.handler, settings.proxy_allow_ips)
    from .upgrade import checking
    if checking():      # USR2's check of a new release: it imports and parses, that is all
        return EXIT_OK
    if settings.pid_file and not settings.single:
        # Before anything binds: a second master must not take over a live
        # master's pid file (and delete it when it stops).
        daemon.check_pid_file(settings.pid_file)
    try:
        logs.configure(settings.log_level, settings.log_file)
    except OSError as exc:
        raise MpsError(f"cannot open log_file {settings.log_file}: {exc.strerror}") from None
    for note in app.notes:
        # Debug, not a warning: a refusal that follows must stay one line.
        logs.log.debug("%s", note)
    if settings.single:
        from .worker import run_single
        try:
            return run_single(settings, app)
        except KeyboardInterrupt:
            return EXIT_OK      # Ctrl-C (INT) stops the pool with 0 too: a fast stop
    from .arbiter import Arbiter
    return Arbiter(settings, app).run()


def _load(spec: str, flags: Mapping[str, Any], wsgi: bool = False) -> App:
    """Import APP; at --log-level debug a failed import also shows its traceback."""
    from .handlers import import_traceback, load, load_wsgi
    try:
        return load_wsgi(spec) if wsgi else load(spec)
    except AppError as exc:
        level = flags.get("log_level", config.from_env(os.environ).get("log_level"))
        if level == "debug":
            print(import_traceback(exc), end="", file=sys.stderr)
        raise


def _status(path: str, as_json: bool) -> int:
    from . import status
    doc = status.query(path)
    print(json.dumps(doc, indent=2) if as_json else status.render(doc))
    return 0


def _guard(action: Any) -> int:
    try:
        return int(action())
    except MpsError as exc:
        print(f"mps: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def dispatch() -> int:
        if args[:1] == ["bench"]:   # bench parses its own arguments, --help included
            from .bench import main as bench_main
            return bench_main(args[1:])
        ns, extra = build_parser().parse_known_args(args)
        if extra:       # argparse would blame `mps`, even for a `serve` flag
            where = f"mps {ns.command}" if ns.command else "mps"
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} "
                             f"(see `{where} --help`)")
        if ns.command == "serve":
            flags = settings_from_flags(ns)
            config.from_env(os.environ)   # a bad MPS_* value: exit 2 before the import
            if ns.app is not None and ns.wsgi is not None:
                raise UsageError("give APP or --wsgi TARGET, not both (see `mps serve --help`)")
            if ns.wsgi is not None:
                return _serve(_load(ns.wsgi, flags, wsgi=True), flags)
            return _serve(_load(ns.app or DEFAULT_APP, flags), flags)
        if ns.command == "status":
            return _status(ns.socket, ns.json)
        if ns.command in ("reload", "stop"):
            from . import control
            target = control.Target(ns.pid_file, ns.status_socket)
            if ns.command == "reload":
                return control.reload(target, ns.timeout)
            return control.stop(target, ns.timeout, ns.fast)
        raise UsageError("a command is required: serve, status, reload, stop or bench "
                         "(see `mps --help`)")

    return _guard(dispatch)


def exit_main() -> NoReturn:
    sys.exit(main())


__all__ = ["main", "build_parser", "EXIT_USAGE"]
