"""Contamination beyond exact prompts: every eval set of a stage against every training file of the recipe,
by shared 13-word windows of normalised text (lower case, letters and digits only, whitespace collapsed).

A stage's eval sets: its `eval.prompts` file, its `eval.data` file, else the recipe's held-out rows (the
seeded split of the user files, and every stage's `eval.data` file). The training rows: every user-data
stage's files, less the rows the split holds out (those never train). A text field shorter than 13 words is
one window when it has at least `MIN_WORDS` words (so a short row copied with a changed case or comma is
found), and none otherwise (a short answer like "12." is in many rows by chance). System prompts are left
out, and so is a window found in `COMMON` (3) rows or more of the training files or of the eval set: a
shared template ("You are an AI assistant that follows instruction extremely well..."), not a copied row.

`validate` prints one line per stage with overlapping rows (eval file and line, training file, line and stage);
the evaluation writes them into the manifest (`eval_contaminated_rows`, `eval_contamination`), and
`eval.drop_contaminated: true` leaves them out of the stage's evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alignpipe.data.sources import prepare_data, read_file
from alignpipe.data.split import _uses_hub, prompt_key, recipe_split, user_stages
from alignpipe.eval.prompts import prompt_row, resolve
from alignpipe.recipe.dataspec import without_stage_sources
from alignpipe.recipe.kinds import kind_of

N = 13
MIN_WORDS = 8
SKIP_KEYS = {"role", "from", "label", "id", "weight"}
SHOWN = 20  # overlaps listed in a manifest (all are counted)
COMMON = 3  # a window in this many eval rows or training rows is a template, not a copy


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def windows(text: str, n: int = N) -> set[str]:
    w = words(text)
    if len(w) < n:
        return {" ".join(w)} if len(w) >= MIN_WORDS else set()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def strings(value, key: str = "") -> list[str]:
    """Every text field of a row (message contents, prompts, responses, answers), not roles, labels or
    system prompts (the same instructions head many rows)."""
    if key in SKIP_KEYS:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        if value.get("role") == "system" or key == "system":
            return []
        return [s for k, v in value.items() for s in strings(v, str(k))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v, key)]
    return []


def row_windows(row) -> set[str]:
    return {g for s in strings(row) for g in windows(s)}


def identity(prompt) -> str:
    """How an eval row is known when dropping it: its last user turn, normalised."""
    if isinstance(prompt, str):
        return " ".join(words(prompt))
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return " ".join(words(users[-1] if users else ""))


@dataclass
class Source:
    """Rows of one file, with their place in it."""
    name: str  # the file as the recipe names it
    stage: str  # the stage that reads it
    rows: list
    numbers: list  # line (or record) of each row
    unit: str = "line"

    def where(self, i: int) -> str:
        return f"{self.name} {self.unit} {self.numbers[i]}" if self.numbers[i] is not None else self.name


def _parts(recipe, name: str, spec: dict, family: str, key: str, local_only: bool) -> list[Source]:

    if not spec or (local_only and _uses_hub(spec)):
        return []
    data = prepare_data(spec, recipe.path.parent, family, key=key, seed=recipe.seed)
    return [Source(p.source, name, p.rows, p.row_numbers, p.unit) for p in data.parts]


def training_sources(recipe, local_only: bool = False) -> list[Source]:
    """Every user-data stage's files, with the held-out rows (which never train) left out."""
    split = recipe_split(recipe, local_only=local_only)
    out = []
    for name, cfg in user_stages(recipe).items():
        for src in _parts(recipe, name, without_stage_sources(cfg.data), kind_of(cfg.kind).family,
                          f"stages.{name}.data", local_only):
            keep = [i for i, r in enumerate(src.rows) if not split.is_heldout(prompt_key(r))]
            out.append(Source(src.name, name, [src.rows[i] for i in keep], [src.numbers[i] for i in keep], src.unit))
    return out


def heldout_sources(recipe, local_only: bool = False) -> list[Source]:
    """The recipe's held-out rows: every stage's `eval.data` file and the rows the split holds out of the files."""
    split = recipe_split(recipe, local_only=local_only)
    out = []
    for name, cfg in recipe.stages.items():
        if cfg.eval.data and kind_of(cfg.kind).user_split:
            out += _parts(recipe, name, cfg.eval.data, kind_of(cfg.kind).family, f"stages.{name}.eval.data",
                          local_only)
    for name, cfg in user_stages(recipe).items():
        for src in _parts(recipe, name, without_stage_sources(cfg.data), kind_of(cfg.kind).family,
                          f"stages.{name}.data", local_only):
            keep = [i for i, r in enumerate(src.rows) if split.is_heldout(prompt_key(r))]
            out.append(Source(src.name, name, [src.rows[i] for i in keep], [src.numbers[i] for i in keep], src.unit))
    return out


def prompt_file_source(recipe, name: str) -> Source:

    path = resolve(recipe.stages[name].eval.prompts, recipe.path)
    raw = read_file(path, str(path))
    rows = [prompt_row(r) or {} for r in raw.rows]
    return Source(str(recipe.stages[name].eval.prompts), name, rows, list(raw.row_numbers), raw.unit)


def eval_sources(recipe, name: str, local_only: bool = False) -> list[Source]:
    """What stage `name` is evaluated on (see the module docstring)."""
    cfg = recipe.stages[name]
    if cfg.eval.prompts:
        return [prompt_file_source(recipe, name)]
    if cfg.eval.data and kind_of(cfg.kind).user_split:
        return _parts(recipe, name, cfg.eval.data, kind_of(cfg.kind).family, f"stages.{name}.eval.data", local_only)
    if "embedded" in cfg.data and not cfg.eval.data:
        return []
    return heldout_sources(recipe, local_only)


def index(sources: list[Source], wanted: set[str]) -> dict[str, tuple[Source, int] | None]:
    """Each window of `wanted` found in a training row -> the first (file, row) holding it; a window in `COMMON`
    rows or more is a shared template (instructions, boilerplate), not a copied row, and maps to None. Only
    the eval set's windows are kept, so memory follows the eval set, not the training files."""
    out: dict[str, tuple[Source, int] | None] = {}
    seen: dict[str, int] = {}
    for src in sources:
        for i, row in enumerate(src.rows):
            for g in row_windows(row) & wanted:
                seen[g] = seen.get(g, 0) + 1
                if seen[g] >= COMMON:
                    out[g] = None
                else:
                    out.setdefault(g, (src, i))
    return out


def overlaps(evals: list[Source], train_sources: list[Source]) -> list[dict]:
    """One finding per eval row sharing a window with a training row (a window common to `COMMON` eval rows
    or training rows or more is a template, left out)."""
    counts: dict[str, int] = {}
    for src in evals:
        for row in src.rows:
            for g in row_windows(row):
                counts[g] = counts.get(g, 0) + 1
    train = index(train_sources, {g for g, c in counts.items() if c < COMMON})
    found = []
    for src in evals:
        for i, row in enumerate(src.rows):
            hit = next(((g, train[g]) for g in sorted(row_windows(row)) if train.get(g) is not None), None)
            if hit is None:
                continue
            g, (tsrc, j) = hit
            found.append({"eval": src.where(i), "train": tsrc.where(j), "train_stage": tsrc.stage, "shared": g,
                          "prompt": identity(row.get("prompt") or row.get("text") or row.get("messages") or "")})
    return found


def stage_overlaps(recipe, name: str, local_only: bool = False, train: list[Source] | None = None) -> list[dict]:
    """The rows of stage `name`'s eval sets that share a 13-word window with a training row of the recipe."""
    if not recipe.stages[name].eval.enabled and not recipe.stages[name].eval.data:
        return []
    evals = eval_sources(recipe, name, local_only)
    if not evals:
        return []
    return overlaps(evals, train if train is not None else training_sources(recipe, local_only))


def validate_lines(recipe) -> list[str]:
    """`validate`'s lines: one per stage whose eval sets overlap training rows, naming the rows by line."""
    train = training_sources(recipe, local_only=True)
    if not any(src.rows for src in train):
        return []
    out = []
    for name in recipe.stages:
        found = stage_overlaps(recipe, name, True, train)
        if found:
            shown = "; ".join(f"{f['eval']} ~ {f['train']} (stage {f['train_stage']})" for f in found[:5])
            more = f"; and {len(found) - 5} more" if len(found) > 5 else ""
            out.append(f"[alignpipe] stage {name}: {len(found)} eval row(s) share a {N}-word window with training "
                       f"rows: {shown}{more}; leave them out with stages.{name}.eval.drop_contaminated: true")
    return out


def manifest_figures(found: list[dict], dropped: int) -> dict:
    return {"eval_contaminated_rows": len(found), "eval_contaminated_dropped": dropped,
            "eval_contamination": [{k: f[k] for k in ("eval", "train", "train_stage", "shared")}
                                   for f in found[:SHOWN]]}

