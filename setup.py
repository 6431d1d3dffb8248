"""Build mps with its C scoreboard core when a C compiler is available.

Without a compiler the install still succeeds (with a warning) and mps runs on
its pure-Python scoreboard backend, the way markupsafe and msgpack treat their
speedups.

The wheel also carries a copy of the C core's source beside the benchmarks'
C programs (``mps/_bench/_mpscore.c``): ``mps bench locks`` compiles it into
its C-only floor, so the floor measures the very code the extension was
built from, and src/_mpscore.c stays the one copy in the repository.
"""
from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

CORE = Path("src", "_mpscore.c")
CORE_COPY = Path("mps", "_bench", "_mpscore.c")   # inside build_lib


class OptionalBuildExt(build_ext):
    """Turn a failed C build into a warning: the Python backend still works."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._warn(exc)

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        print(
            "WARNING: mps could not build a C extension (%s); mps will run on "
            "the pure-Python scoreboard backend and HTTP layer." % exc,
            file=sys.stderr,
        )


class BuildPyWithCore(build_py):
    """Copy src/_mpscore.c into the package, beside the benchmark sources."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:     # the package stays in src/; bench finds src/_mpscore.c
            return
        target = Path(self.build_lib) / CORE_COPY
        self.mkpath(str(target.parent))
        self.copy_file(str(CORE), str(target))


setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    # The HTTP layer's per-request string work (a CPython extension: it builds
    # dicts and bytes, which cffi cannot hand back cheaply).
    # A child's accept, socket and address in C (Scoreboard.acceptor), for
    # the same reason; the two share src/_mpschild.h.
    ext_modules=[Extension("mps.http._speedups", ["src/_mpshttp.c"], depends=["src/_mpschild.h"]),
                 Extension("mps._accept", ["src/_mpsaccept.c"], depends=["src/_mpschild.h"])],
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithCore},
)
