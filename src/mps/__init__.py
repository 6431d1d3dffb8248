"""mps: a prefork multi-process service framework for Linux.

Write ``handle(conn, addr)``; mps runs it in a pool of pre-forked children
that accept on one listening socket, sized between min_spare and max_spare
idle children, recycled, replaced when they crash or hang, and stopped or
rotated gracefully on signals.
"""
from __future__ import annotations

from ._version import __version__

from .errors import (AppError, BindError, BootError, MpsError, SettingError,  # noqa: E402
                     UsageError)
from .server import Server  # noqa: E402

__all__ = ["Server", "MpsError", "SettingError", "UsageError", "AppError", "BindError",
           "BootError", "__version__"]
