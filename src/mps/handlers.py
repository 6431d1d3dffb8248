"""Finding and adapting the user's handler.

``APP`` is ``package.module:callable`` or ``path/to/file.py:callable``.  The
callable may be a plain ``handle(conn, addr)`` function, a
``socketserver.BaseRequestHandler`` subclass (called the way socketserver
calls it), or an :class:`mps.Server` whose ``@handler`` and hooks are used.
Naming the handler of the module's one Server (``myapp:handle`` for
``@app.handler def handle``) runs that Server, so every form the README shows
gets the same settings and hooks.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from .errors import AppError, SettingError
from .proxy import PROXY_TIMEOUT_S, Allowed, accept_proxied

if TYPE_CHECKING:
    import socketserver

Handler = Callable[[socket.socket, Any], object]
Hook = Callable[..., object]


@dataclass
class App:
    """What the master runs: the handler, the hooks, and the Server they came from."""

    handler: Handler
    hooks: dict[str, Hook] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    server: Any = None
    #: How APP was read, logged (at debug level) once logging is set up.
    notes: list[str] = field(default_factory=list)
    #: A WSGI application (``--wsgi``): the handler is built around it once
    #: the settings are known (see cli._serve).
    wsgi: Any = None

    def call_hook(self, name: str, *args: object) -> None:
        hook = self.hooks.get(name)
        if hook is not None:
            hook(self.server, *args)


class Proxied:
    """A handler behind a balancer that speaks the PROXY protocol: the header
    is read before the handler runs, which then sees the real client address;
    a connection from a peer not allowed, or without a valid header in time,
    is closed (one log line) and never reaches the handler."""

    def __init__(self, inner: Handler, allowed_ips: str) -> None:
        self.inner = inner
        self.allowed = Allowed(allowed_ips)
        bind = getattr(inner, "bind", None)
        if bind is not None:            # keep the inner handler's pool seam (HTTP)
            self.bind = bind
        # The PROXY header comes first, whatever the protocol behind it.
        self.client_speaks_first = getattr(inner, "client_speaks_first", 0.0) or PROXY_TIMEOUT_S

    def __call__(self, conn: socket.socket, addr: Any) -> None:
        real = accept_proxied(conn, addr, self.allowed)
        if real is not None:
            self.inner(conn, real)


class AppMaker(ABC):
    """What ``APP`` may name besides a handler: an object that makes the App
    (mps.Server is one).  Declared here so that finding the app never
    imports the layer above."""

    @abstractmethod
    def app(self) -> App:
        """The handler, hooks and settings to run."""

    @abstractmethod
    def handles(self, obj: object) -> bool:
        """Whether ``obj`` is this maker's handler, as it was given."""


def adapt(obj: object, server: object = None, spec: str = "") -> Handler:
    """Turn what the user gave into ``handle(conn, addr)``."""
    # A BaseRequestHandler subclass means its module imported socketserver;
    # mps does not (it brings threading and its own objects into the master,
    # measured at 0.1 MiB more private memory in every child).
    base: type[socketserver.BaseRequestHandler] | None = getattr(
        sys.modules.get("socketserver"), "BaseRequestHandler", None)
    if base is not None and inspect.isclass(obj) and issubclass(obj, base):
        cls = obj

        def handle_request(conn: socket.socket, addr: Any) -> None:
            # BaseRequestHandler runs setup/handle/finish; handlers that look at
            # self.server get the mps.Server.
            cls(conn, addr, server)  # type: ignore[arg-type]

        handle_request.__qualname__ = f"{cls.__qualname__}(socketserver)"
        return handle_request
    if not callable(obj):
        what = repr(spec) if spec else type(obj).__name__ + " object"
        raise AppError(f"app {what} is not callable; point APP at a handle(conn, addr) function")
    return obj


def load(spec: str) -> App:
    """Import ``spec`` in the master; AppError (exit 4) with one line if it fails."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise AppError(f"app {spec!r}: expected module:callable or path/file.py:callable")
    module = _import(spec, target)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise AppError(f"app {spec!r}: {target} has no attribute {attr!r}") from None
    if isinstance(obj, AppMaker):
        return obj.app()
    servers = _servers_serving(module, obj)
    if len(servers) == 1:
        return servers[0][1].app()
    app = App(handler=adapt(obj, spec=spec))
    if servers:
        names = ", ".join(name for name, _ in servers)
        app.notes.append(f"app {spec!r} is the handler of {len(servers)} Servers ({names}); "
                         f"serving it without their settings and hooks (name one, as in "
                         f"{target}:{servers[0][0]}, to run it)")
    return app


def load_wsgi(spec: str) -> App:
    """``--wsgi module:app``, ``path/file.py:app`` or ``module:create_app(...)``
    (a factory called with literal arguments, as gunicorn allows)."""
    target, sep, expr = spec.rpartition(":")
    if not sep or not target or not expr:
        raise AppError(f"wsgi app {spec!r}: expected module:app, path/file.py:app "
                       "or module:create_app()")
    name, args, kwargs = _parse_factory(spec, expr)
    module = _import(spec, target)
    try:
        obj = getattr(module, name)
    except AttributeError:
        raise AppError(f"wsgi app {spec!r}: {target} has no attribute {name!r}") from None
    if args is not None:
        if not callable(obj):
            raise AppError(f"wsgi app {spec!r}: {name} is not callable, so it is no factory")
        try:
            obj = obj(*args, **kwargs)
        except Exception as exc:
            raise AppError(f"wsgi app {spec!r}: the factory failed: "
                           f"{type(exc).__name__}: {exc}") from exc
    if isinstance(obj, AppMaker):
        return obj.app()
    if not callable(obj):
        raise AppError(f"wsgi app {spec!r} is not callable; point --wsgi at a WSGI "
                       "application (environ, start_response)")
    return App(handler=_wsgi_placeholder, wsgi=obj)


def load_wsgi_app(wsgi: Any, server: Any) -> App:
    """The App of a Server built around a WSGI application."""
    return App(handler=_wsgi_placeholder, hooks=dict(server.hooks), settings=server.settings,
               server=server, wsgi=wsgi)


def _wsgi_placeholder(conn: socket.socket, addr: Any) -> None:
    raise RuntimeError("the WSGI handler is built once the settings are known")


def _parse_factory(spec: str, expr: str) -> tuple[str, list[Any] | None, dict[str, Any]]:
    """``app`` -> (app, None, {}); ``create_app(1, debug=True)`` -> a call
    with literal arguments only (never code from the command line)."""
    import ast

    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise AppError(f"wsgi app {spec!r}: {expr!r} is neither a name nor a call") from None
    if isinstance(node, ast.Name):
        return node.id, None, {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except ValueError:
            raise AppError(f"wsgi app {spec!r}: a factory takes literal arguments only "
                           "(strings, numbers, True/False/None, lists, dicts)") from None
        return node.func.id, args, kwargs
    raise AppError(f"wsgi app {spec!r}: {expr!r} is neither a name nor a call")


def _servers_serving(module: Any, obj: object) -> list[tuple[str, AppMaker]]:
    """The mps.Servers in ``module`` whose handler is ``obj``: (first name, Server)."""
    found: dict[int, tuple[str, AppMaker]] = {}
    for name, value in vars(module).items():
        if isinstance(value, AppMaker) and value.handles(obj):
            found.setdefault(id(value), (name, value))
    return list(found.values())


def import_traceback(error: BaseException) -> str:
    """The traceback of the user's code behind an AppError from the import,
    without importlib's frames and ours; "" when there is none."""
    cause = error.__cause__
    if cause is None:
        return ""
    ours = tuple(os.path.dirname(os.path.abspath(path)) + os.sep
                 for path in (__file__, importlib.__file__))
    frames = [frame for frame in traceback.extract_tb(cause.__traceback__)
              if not frame.filename.startswith(("<frozen importlib", *ours))]
    return ("Traceback (most recent call last):\n"
            + "".join(traceback.format_list(frames))
            + "".join(traceback.format_exception_only(type(cause), cause)))


def _import(spec: str, target: str) -> Any:
    try:
        if target.endswith(".py") or os.sep in target:
            return _import_path(target)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())   # `mps serve myapp:handle` from the app's folder
        return importlib.import_module(target)
    except (AppError, SettingError):
        raise       # a bad mps.Server(...) keyword in the app: exit 2, not 4
    except BaseException as exc:   # noqa: BLE001 - any failure of the user's import
        if isinstance(exc, KeyboardInterrupt):
            raise
        # The cause is kept for --log-level debug (import_traceback); the
        # error itself is one line.
        raise AppError(f"cannot import app {spec!r}: {type(exc).__name__}: {exc}") from exc


def _import_path(path: str) -> Any:
    if not os.path.isfile(path):
        raise AppError(f"cannot import app: file {path!r} does not exist")
    name = "_mps_app_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise AppError(f"cannot import app: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    module_spec.loader.exec_module(module)
    return module
