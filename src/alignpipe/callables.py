"""`module:function` names in a recipe (reward functions, verifiers), imported at validate time so a typo
fails before training, with one error line naming the key."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from alignpipe.errors import RecipeError


def import_callable(spec: str, what: str, example: str, signature: str = "", where: str = "",
                    key: str = "") -> Callable:
    """The function `spec` names; `what` ("verifier", "reward function") and `example` go into the errors."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"{what} {spec!r} is not `module:function`", where=where, key=key, fix=f"e.g. {example}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        hint = f" ({signature})" if signature else ""
        raise RecipeError(f"cannot import {what} {spec!r}: {err}", where=where, key=key,
                          fix=f"name an importable module and a function in it{hint}") from None
    if not callable(fn):
        raise RecipeError(f"{what} {spec!r} is not callable", where=where, key=key, fix="name a function")
    return fn
