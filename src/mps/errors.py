"""The one exception hierarchy of mps.

Library code raises these; only the command line (and ``Server.run``) turns
them into one line on stderr and the exit status of SPEC §8.  An operator
mistake never shows a traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1      # cannot bind, cannot fork, ...
EXIT_USAGE = 2        # bad setting or command line
EXIT_BOOT = 3         # children cannot boot (crash-loop brake)
EXIT_APP = 4          # the app cannot be imported or is not callable


class MpsError(Exception):
    """Base of every error an operator can act on; str() is the one line."""

    exit_code = EXIT_RUNTIME


class SettingError(MpsError):
    """A setting has a bad value, or two settings contradict each other."""

    exit_code = EXIT_USAGE

    def __init__(self, name: str, value: object, rule: str) -> None:
        self.name = name
        self.value = value
        self.rule = rule
        super().__init__(f"setting {name}={value!r}: {rule}")


class UsageError(MpsError):
    """The command line itself is wrong (unknown flag, missing argument)."""

    exit_code = EXIT_USAGE


class AppError(MpsError):
    """The app cannot be imported or is not a usable handler."""

    exit_code = EXIT_APP


class BindError(MpsError):
    """The listening socket cannot be created."""

    exit_code = EXIT_RUNTIME


class BootError(MpsError):
    """Children keep dying before they can serve: the crash-loop brake."""

    exit_code = EXIT_BOOT


class BackendError(MpsError):
    """The requested scoreboard backend is not available."""

    exit_code = EXIT_USAGE
