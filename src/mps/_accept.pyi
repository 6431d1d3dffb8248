"""Types of mps._accept (src/_mpsaccept.c): Scoreboard.accept in C."""
import socket
from collections.abc import Callable
from typing import Any

class Acceptor:
    fast: int
    def __init__(self, entry: tuple[int, ...], owner: object,
                 socket_type: Callable[[int, int, int, int], socket.socket],
                 family: int, type: int, proto: int,
                 decode: Callable[[int], Any], template: bytes | None = None) -> None: ...
    def __call__(self, idle_first: bool) -> tuple[socket.socket, Any]: ...

def template(socket_type: type[socket.socket], family: int, type: int, proto: int,
             fd: int) -> bytes | None: ...
