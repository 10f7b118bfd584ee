"""One held-out split per recipe for user data, shared by every stage.

A row's *prompt key* is its first user turn, lower-cased with runs of whitespace made one space (a text row's
key is its text). A key is held out when a seeded hash of it falls below FRACTION, so the choice needs no list
of all rows: every row with that prompt, every pair and every multi-turn continuation of it, in any stage's
file, falls on the same side. So the reward model's held-out pairs are never DPO's training pairs, and SFT's
eval loss is on prompts no stage trained on. A stage whose rows would have no held-out key at all (a tiny
file) also holds out its lowest-hashed key; that is decided over every stage's data at once.

When every user-data stage names its own held-out file (`eval: {data: FILE}`), those files are the whole split:
nothing is hashed out of the training files (so `alignpipe world export`'s files train on exactly the embedded
world's rows).

The split is written to `runs/<recipe>/heldout.json` (the held-out prompt keys and their hash); each stage
records the hash in its `data_report.json`. `heldout_prompts(ctx)` gives the policy evaluation those prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from alignpipe.data.sources import prepare_data
from alignpipe.recipe.dataspec import without_stage_sources
from alignpipe.recipe.kinds import kind_of
from alignpipe.runfolder.files import write_json_atomic
from alignpipe.runtime.distributed import is_main_process


FRACTION = 0.05  # share of prompt keys held out
FILE = "heldout.json"


def prompt_key(row: dict) -> str:
    """The normalised first user turn of a row of any family (a text row: its text)."""
    if "text" in row:
        text = row["text"]
    else:
        turns = row.get("messages") or row.get("prompt") or []
        users = [m for m in turns if m["role"] == "user"]
        text = (users or turns or [{"content": ""}])[0]["content"]
    return " ".join(text.lower().split())


def score(seed: int, key: str) -> float:
    """A key's place in [0, 1): the same for the same seed in every stage and process."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()
    return int(digest[:15], 16) / 16**15


@dataclass(frozen=True)
class Split:
    seed: int
    fraction: float
    extra: frozenset[str]  # keys held out because a stage had none below the fraction
    digest: str  # hash of the settings and the extra keys: equal digests, equal splits

    def is_heldout(self, key: str) -> bool:
        return score(self.seed, key) < self.fraction or key in self.extra


def _kind(cfg):
    """The stage's kind (`recipe.kinds.StageKind`): whether it takes its held-out rows from here, its family."""
    return kind_of(cfg.kind)


def user_stages(recipe) -> dict:
    """Stages whose data is the user's (a path, hub dataset or mixture, not the embedded world)."""
    return {name: cfg for name, cfg in recipe.stages.items()  # labelled pairs are training rows by construction
            if without_stage_sources(cfg.data) and "embedded" not in cfg.data and _kind(cfg).user_split}


_CACHE: dict[str, Split] = {}


def _stage_rows(recipe, name: str, cfg) -> list[dict]:
    return prepare_data(without_stage_sources(cfg.data), recipe.path.parent, _kind(cfg).family,
                        key=f"stages.{name}.data", seed=recipe.seed).rows


def eval_file_rows(recipe, name: str) -> list[dict]:
    """The rows of a stage's explicit `eval: {data: ...}` file, in the stage's family."""
    cfg = recipe.stages[name]
    return prepare_data(cfg.eval.data, recipe.path.parent, _kind(cfg).family,
                        key=f"stages.{name}.eval.data", seed=recipe.seed).rows


def _uses_hub(spec: dict) -> bool:
    return any(isinstance(c, dict) and "hub" in c for c in spec.get("mixture", [spec]))


def explicit_only(recipe) -> bool:
    """Every user-data stage names its held-out file: the files are the split, no prompt is hashed out."""
    stages = user_stages(recipe)
    return bool(stages) and all(cfg.eval.data for cfg in stages.values())


def recipe_split(recipe, local_only: bool = False) -> Split:
    """The recipe's split, decided over every user-data stage's rows (read once per process). `local_only`
    (validate, offline) leaves out hub datasets; only a tiny hub split's fallback key can differ then."""
    specs = json.dumps({n: [c.data, c.eval.data] for n, c in recipe.stages.items()}, sort_keys=True, default=str)
    cache_key = f"{recipe.path.resolve()}\0{recipe.seed}\0{specs}\0{local_only}"
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    fraction = 0.0 if explicit_only(recipe) else FRACTION
    extra = set()
    for name, cfg in recipe.stages.items():  # explicit eval files: their prompts are held out everywhere
        if cfg.eval.data and _kind(cfg).user_split:
            extra |= {prompt_key(r) for r in eval_file_rows(recipe, name)}
    for name, cfg in user_stages(recipe).items() if fraction else ():
        if local_only and _uses_hub(cfg.data):
            continue
        keys = {prompt_key(r) for r in _stage_rows(recipe, name, cfg)}
        if len(keys) >= 2 and not any(score(recipe.seed, k) < FRACTION for k in keys):
            extra.add(min(keys, key=lambda k: score(recipe.seed, k)))
    digest = hashlib.sha256(json.dumps([recipe.seed, fraction, sorted(extra)]).encode()).hexdigest()[:16]
    _CACHE[cache_key] = split = Split(recipe.seed, fraction, frozenset(extra), digest)
    return split


class Rows(list):
    """A list of rows that also knows where each came from (`numbers`: file lines or record indices; None when
    unknown, e.g. after mixing), so later drops can name the line."""

    def __init__(self, rows=(), numbers: list | None = None, unit: str = "row"):
        super().__init__(rows)
        self.numbers = list(numbers) if numbers is not None else [None] * len(self)
        self.unit = unit


def split_rows(ctx, rows: list[dict], cap: int | None = None) -> tuple[Rows, Rows, dict]:
    """(train rows, held-out rows, what was done) for one stage; held-out rows past `cap` are used by neither,
    so a large file's evaluation stays small without its held-out prompts leaking into training."""
    split = recipe_split(ctx.recipe)
    numbers = getattr(rows, "numbers", [None] * len(rows))
    train, held = [], []
    for row, number in zip(rows, numbers):
        (held if split.is_heldout(prompt_key(row)) else train).append((row, number))
    held.sort(key=lambda rn: score(split.seed, prompt_key(rn[0])))  # a stable subset under the cap
    unit = getattr(rows, "unit", "row")
    train = Rows([r for r, _ in train], [n for _, n in train], unit)
    held = Rows([r for r, _ in held], [n for _, n in held], unit)
    if ctx.config.eval.data:  # an explicit eval file replaces this stage's share of the split
        held = Rows(eval_file_rows(ctx.recipe, ctx.name))
    unused = held[cap:] if cap is not None else []
    if cap is not None:
        held = Rows(held[:cap], held.numbers[:cap], held.unit)
    info = {"heldout_hash": split.digest, "fraction": split.fraction, "seed": split.seed, "train_rows": len(train),
            "heldout_rows": len(held), "heldout_unused": len(unused),
            "heldout_prompts": len({prompt_key(r) for r in held})}
    _write(ctx, split, held)
    return train, held, info


def _write(ctx, split: Split, held: list[dict]) -> None:
    """Add this stage's held-out prompt keys to runs/<recipe>/heldout.json (one file for the recipe)."""
    if not is_main_process():
        return
    path = Path(ctx.recipe.run_root) / FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("hash") != split.digest:
        old = {}
    stages = old.get("stages", {})
    chat = [r for r in held if "text" not in r]
    stages[ctx.name] = sorted({prompt_key(r) for r in chat}) if chat else {"documents": len(held)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"hash": split.digest, "seed": split.seed, "fraction": split.fraction,
                             "rule": "held out: sha256(f'{seed}\\0{key}') below fraction, or in extra; key = "
                                     "first user turn, lower-cased, whitespace collapsed",
                             "extra": sorted(split.extra), "stages": stages})


def heldout_prompts(ctx) -> list[dict]:
    """The recipe's held-out prompts from user data, for the policy evaluation.

    One row per distinct prompt: {"prompt": [messages up to the turn to answer], "reference": str | None (the
    conversation's answer or the pair's chosen one), "key": its prompt key, "stage": the stage it came from}.
    Empty when no stage has user data. `ctx` is any stage's context (only `ctx.recipe` is read).
    """
    recipe = ctx.recipe
    split = recipe_split(recipe)
    out, seen = [], set()
    sources = [(n, eval_file_rows(recipe, n)) for n, c in recipe.stages.items() if c.eval.data and _kind(c).user_split]
    sources += [(n, _stage_rows(recipe, n, c)) for n, c in user_stages(recipe).items()]
    for name, rows in sources:
        if _kind(recipe.stages[name]).family == "text":
            continue
        for row in rows:
            key = prompt_key(row)
            if not split.is_heldout(key):
                continue
            if "messages" in row:
                messages = row["messages"]
                cut = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                prompt, answer = messages[:cut], messages[cut]
            else:
                good = row.get("chosen") or (row.get("completion") if row.get("label", True) else None)
                prompt, answer = row["prompt"], (good or [None])[-1]
            ident = json.dumps(prompt, sort_keys=True)
            if ident in seen:
                continue
            seen.add(ident)
            out.append({"prompt": prompt, "reference": answer["content"] if answer else None, "key": key,
                        "stage": name})
    return out
