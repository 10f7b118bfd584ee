"""A stage's user data (files, hub datasets, mixtures), normalised to the family its kind trains on,
with the validation report written to the run folder. The embedded world is served by the stages."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from alignpipe.data.formats import DataError
from alignpipe.data.report import format_report, validation_report
from alignpipe.data.sources import prepare_data
from alignpipe.data.split import Rows, split_rows
from alignpipe.errors import AlignpipeError
from alignpipe.runtime.distributed import is_main_process

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # name or org/name


def as_user_error(err: DataError, recipe_file: str) -> AlignpipeError:
    """Name the recipe and, for a problem inside a data file, that file too."""
    what = err.what if err.file == "recipe" else f"{err.file}: {err.what}"
    return AlignpipeError(what, where=recipe_file, key=err.where, fix=err.fix)


def check_spec(spec: dict, base_dir: Path, where: str, key: str, family: str = "conversations"):
    """Read and normalise the data once, so that `validate` fails on what `run` would fail on; returns what
    was read (a PreparedData; None when every source is a hub dataset).

    Hub datasets are not downloaded here (validate works offline): their ids are checked for form and
    noted; `run` downloads them, or fails at once with the hub's error when it is not reachable.
    """
    hub = [c for c in spec.get("mixture", [spec]) if isinstance(c, dict) and "hub" in c]
    try:
        for component in hub:
            unknown = sorted(set(component) - {"hub", "split", "subset", "format", "weight", "columns", "max_dropped"})
            if unknown:
                raise DataError("recipe", key, f"unknown key {unknown[0]!r}", "use hub, split, subset, format")
            if not HUB_ID.match(str(component["hub"])):
                raise DataError("recipe", f"{key}.hub", f"{component['hub']!r} is not a hub dataset id",
                                "write it as org/name, e.g. HuggingFaceH4/ultrachat_200k")
            print(f"[alignpipe] {key}: hub dataset {component['hub']} is downloaded when the stage runs "
                  "(validate does not reach the hub)", file=sys.stderr)
        if not hub:
            return prepare_data(spec, base_dir, family, key=key)
        if "mixture" in spec:  # the local components are still read and checked
            local = [c for c in spec["mixture"] if "hub" not in c]
            if local:
                return prepare_data({**spec, "mixture": local}, base_dir, family, key=key)
        return None
    except DataError as err:
        raise as_user_error(err, where) from None


def load_split(ctx, family: str, cap: int | None, tokenizer=None, max_length: int | None = None
               ) -> tuple[list[dict], list[dict]]:
    """The stage's rows split by the recipe's held-out prompts (`alignpipe.data.split`): (train, held out, at
    most `cap`). The split's counts and hash go into `data_report.json` and on the screen."""
    rows = load_family(ctx, family, tokenizer, max_length, numbered=True)
    train, held, info = split_rows(ctx, rows, cap)
    if not train or not held:
        raise AlignpipeError(f"the held-out split leaves {len(train)} rows to train on and {len(held)} held out",
                             where=str(ctx.recipe.path), key=f"stages.{ctx.name}.data",
                             fix="give the stage more rows (prompts are held out by a seeded hash of their first "
                                 "user turn)")
    if is_main_process():
        path = ctx.dir / "data_report.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "split": info}, indent=2))
        extra = f" ({info['heldout_unused']} more held-out rows unused)" if info["heldout_unused"] else ""
        print(f"  split {info['heldout_hash']}: {len(train)} rows to train on, {len(held)} held out "
              f"({info['heldout_prompts']} prompts){extra}", flush=True)
    return train, held


def load_family(ctx, family: str | None = None, tokenizer=None, max_length: int | None = None,
                numbered: bool = False) -> list[dict]:
    """The stage's rows in `family` (default: its kind's), plus `data_report.json` in its folder. `numbered`:
    as a `split.Rows` that knows each row's line (without a mixture)."""
    family = family or ctx.kind.family
    try:
        prepared = prepare_data(ctx.config.data, ctx.recipe.path.parent, family, key=f"stages.{ctx.name}.data",
                                seed=ctx.seed)
    except DataError as err:
        raise as_user_error(err, str(ctx.recipe.path)) from None
    report = validation_report(prepared, tokenizer, max_length, sample=2000, seed=ctx.seed)

    if is_main_process():  # several processes read the same data; one writes and prints the report
        ctx.dir.mkdir(parents=True, exist_ok=True)
        (ctx.dir / "data_report.json").write_text(json.dumps(report, indent=2))
        print(format_report(report), flush=True)
    if numbered and prepared.mixture is None and len(prepared.parts) == 1:
        part = prepared.parts[0]
        if len(part.row_numbers) == len(prepared.rows):
            return Rows(prepared.rows, part.row_numbers, part.unit)
    return prepared.rows
