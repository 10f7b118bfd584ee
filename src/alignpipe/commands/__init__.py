"""The CLI's commands. Each module here defines `add_parser(subparsers)`; they are found automatically, so
adding a command never means editing a shared list (`run`, `validate` and `show` are listed first)."""

from __future__ import annotations

import importlib
import pkgutil


FIRST = ("run", "validate", "show")  # the everyday commands, first in `alignpipe --help`


def register(subparsers) -> None:
    def order(m):
        return (FIRST.index(m.name) if m.name in FIRST else len(FIRST), m.name)

    for info in sorted(pkgutil.iter_modules(__path__), key=order):
        importlib.import_module(f"{__name__}.{info.name}").add_parser(subparsers)
