"""The public API: ``mps.Server``."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import config
from .errors import AppError
from .handlers import App, AppMaker, Handler, Hook, adapt, load_wsgi_app


class Server(AppMaker):
    """A prefork server around one handler.

    ``Server(**settings)`` takes the settings of ``mps serve --help`` as
    keywords; ``@server.handler`` names the ``handle(conn, addr)`` function
    (or a ``socketserver.BaseRequestHandler`` subclass); the hooks
    ``on_starting(server)``, ``post_fork(server, worker)``,
    ``child_exit(server, worker)`` and ``on_exit(server)`` are optional.
    ``run()`` serves until stopped, then exits the process.
    """

    def __init__(self, handler: Any = None, *, wsgi: Any = None, **settings: Any) -> None:
        config.check_names(settings)
        self.settings = dict(settings)
        self._handler: Any = handler
        #: A WSGI application served instead of a handler (``mps serve --wsgi``).
        self.wsgi: Any = wsgi
        self.hooks: dict[str, Hook] = {}

    def handler(self, fn: Any) -> Any:
        """Decorator: the function (or BaseRequestHandler class) that serves a connection."""
        self._handler = fn
        return fn

    def handles(self, obj: object) -> bool:
        """Whether ``obj`` is this Server's handler, as it was given."""
        return self._handler is not None and self._handler is obj

    def on_starting(self, fn: Hook) -> Hook:
        self.hooks["on_starting"] = fn
        return fn

    def post_fork(self, fn: Hook) -> Hook:
        self.hooks["post_fork"] = fn
        return fn

    def child_exit(self, fn: Hook) -> Hook:
        self.hooks["child_exit"] = fn
        return fn

    def on_exit(self, fn: Hook) -> Hook:
        self.hooks["on_exit"] = fn
        return fn

    def app(self) -> App:
        if self.wsgi is not None:
            if self._handler is not None:
                raise AppError("the Server has both a handler and a wsgi app; give it one")
            if not callable(self.wsgi):
                raise AppError("the Server's wsgi app is not callable; pass a WSGI "
                               "application (environ, start_response)")
            return load_wsgi_app(self.wsgi, self)
        if self._handler is None:
            raise AppError("the Server has no handler; decorate a handle(conn, addr) "
                           "function with @server.handler")
        handler: Handler = adapt(self._handler, self)
        return App(handler=handler, hooks=dict(self.hooks), settings=self.settings, server=self)

    def serve(self, argv: Sequence[str] | None = None) -> int:
        """Serve with settings from keywords, ``MPS_*`` and ``argv``; the exit status."""
        from .cli import serve_app
        # self.app, not self.app(): a missing handler is one line and exit 4
        # there, as with `mps serve`, rather than a traceback here.
        return serve_app(self.app, sys.argv[1:] if argv is None else list(argv))

    def run(self, argv: Sequence[str] | None = None) -> NoReturn:
        """Serve until stopped, then exit the process with the status of SPEC §8."""
        sys.exit(self.serve(argv))
