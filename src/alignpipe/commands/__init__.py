"""CLI commands beyond run/validate/show. Each module here defines `add_parser(subparsers)`;
they are found automatically, so adding a command never means editing a shared list."""

from __future__ import annotations

import importlib
import pkgutil


def register(subparsers) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").add_parser(subparsers)
