"""Build mps with its C scoreboard core when a C compiler is available.

Without a compiler the install still succeeds (with a warning) and mps runs on
its pure-Python scoreboard backend, the way markupsafe and msgpack treat their
speedups.
"""
from __future__ import annotations

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


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
            "WARNING: mps could not build its C scoreboard core (%s); "
            "mps will run on the pure-Python backend." % exc,
            file=sys.stderr,
        )


setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)
