"""Built-in handlers.  ``mps serve mps.examples:echo`` is the seed's service."""
from __future__ import annotations

import os
import socket
from typing import Any


def echo(conn: socket.socket, addr: Any) -> None:
    """The seed's handle_connection: read up to 128 bytes, reply b"<pid>: " + data."""
    conn.sendall(b"%d: %s" % (os.getpid(), conn.recv(128)))


def hold(conn: socket.socket, addr: Any) -> None:
    """Reply with the pid at once, then hold the child until the client
    closes: ``mps bench spike`` and ``scale`` count children with it."""
    conn.sendall(b"%d\n" % os.getpid())
    while conn.recv(1024):
        pass
