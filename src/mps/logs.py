"""Logging: every line carries the pid and the slot (or "master")."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("mps")

FORMAT = "%(asctime)s [%(process)d] [%(slot)s] %(levelname)s %(message)s"
_MAX_FIELD = 200


class SlotFilter(logging.Filter):
    """Stamps each record with this process's role; set once after fork."""

    def __init__(self) -> None:
        super().__init__()
        self.slot = "master"

    def filter(self, record: logging.LogRecord) -> bool:
        record.slot = self.slot
        return True


#: One per process (a child sets .slot after fork).
slot_filter = SlotFilter()


def configure(level: str, log_file: str | None) -> None:
    """(Re)install mps's one handler: stderr, or the log file in append mode."""
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(slot_filter)
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


def reopen(level: str, log_file: str | None) -> None:
    """HUP: reopen the log file (logrotate has moved the old one away)."""
    if log_file:
        configure(level, log_file)


def printable(data: object, limit: int = _MAX_FIELD) -> str:
    """Network input made safe for one log line: escaped and bounded.

    Text keeps its printable characters and has the rest (newlines, escape
    sequences) escaped the way repr() does; anything else is shown as repr().
    """
    text = repr(data)[1:-1] if isinstance(data, str) else repr(data)
    return text if len(text) <= limit else text[:limit] + "...(%d chars)" % len(text)
