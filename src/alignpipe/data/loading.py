"""A stage's user data (files, hub datasets, mixtures), normalised to the family its kind trains on,
with the validation report written to the run folder. The embedded world is served by the stages."""

from __future__ import annotations

import json
from pathlib import Path

from alignpipe.data.formats import DataError, family_for_stage
from alignpipe.errors import AlignpipeError


def as_user_error(err: DataError, recipe_file: str) -> AlignpipeError:
    """Name the recipe and, for a problem inside a data file, that file too."""
    what = err.what if err.file == "recipe" else f"{err.file}: {err.what}"
    return AlignpipeError(what, where=recipe_file, key=err.where, fix=err.fix)


def check_spec(spec: dict, base_dir: Path, where: str, key: str, kind: str = "sft") -> None:
    """Read and normalise the data once, so that `validate` fails on what `run` would fail on."""
    from alignpipe.data.sources import prepare_data

    try:
        prepare_data(spec, base_dir, family_for_stage(kind), key=key)
    except DataError as err:
        raise as_user_error(err, where) from None


def load_family(ctx, family: str | None = None, tokenizer=None, max_length: int | None = None) -> list[dict]:
    """The stage's rows in `family` (default: its kind's), plus `data_report.json` in its folder."""
    from alignpipe.data.report import format_report, validation_report
    from alignpipe.data.sources import prepare_data

    family = family or family_for_stage(ctx.config.kind)
    try:
        prepared = prepare_data(ctx.config.data, ctx.recipe.path.parent, family, key=f"stages.{ctx.name}.data",
                                seed=ctx.seed)
    except DataError as err:
        raise as_user_error(err, str(ctx.recipe.path)) from None
    report = validation_report(prepared, tokenizer, max_length, sample=2000, seed=ctx.seed)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    (ctx.dir / "data_report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report), flush=True)
    return prepared.rows
