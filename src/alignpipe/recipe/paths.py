"""One rule for a relative path in a recipe: it is read from the recipe's folder (data paths, `dataset_dir:`,
`model.path`), so a recipe means the same thing from any working folder. `runs_dir` is the exception: it is
where runs are written, read from the working folder (as `make pipeline` and every earlier run folder expect).

`model.path` was read from the working folder before; a relative model path found only there is still used,
with a one-line note saying how to write it (docs/recipes.md, "Paths").
"""

from __future__ import annotations

import sys
from pathlib import Path

_NOTED: set[str] = set()


def model_source(written: str | None, recipe_dir: Path) -> str | None:
    """What `model.path` names: a local folder (resolved from the recipe's folder), else the text as written
    (a hub id, or a folder that does not exist, which validate reports)."""
    if written is None:
        return None
    path = Path(written).expanduser()
    if path.is_absolute():
        return str(path)
    beside = Path(recipe_dir) / path
    if beside.exists():
        return str(beside)
    if path.exists():  # the earlier rule: the working folder
        if written not in _NOTED:
            _NOTED.add(written)
            print(f"[alignpipe] model.path {written}: read from the working folder, not the recipe's folder "
                  f"({recipe_dir}); write it relative to the recipe's folder or absolute ({path.resolve()}): "
                  "a later version reads it from the recipe's folder only", file=sys.stderr)
        return str(path.resolve())
    return written
