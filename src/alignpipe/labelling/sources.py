"""`data: {from: <label stage>}`: a label stage's pairs as (part of) a reward or dpo stage's data.

A data spec names a label stage alone (`{from: label}`) or in a mixture beside files and the embedded world's
pairs (`{mixture: [{embedded: pairs, weight: 1}, {from: label, weight: 1}]}`). The label stage is an upstream of
the stage that reads it, so its manifest hash (which records the hashes of its pairs and labels) is part of that
stage's fingerprint: new labels re-run it. Labelled pairs are training rows only: their prompts come from the
training side of the split (stages/label.py); the held-out pairs come from the other components.
"""

from __future__ import annotations

import random
from pathlib import Path

from alignpipe.data.loading import check_spec
from alignpipe.data.sources import _counts, _take, prepare_data
from alignpipe.data.split import eval_file_rows, split_rows
from alignpipe.errors import RecipeError, RunError
from alignpipe.recipe.dataspec import (PAIRS_FILE, components, file_components, stage_sources, without_stage_sources,
                                       world_part)
from alignpipe.recipe.kinds import kind_of
from alignpipe.runfolder.files import read_jsonl


def check_labelled_data(recipe, cfg, where: str, key: str):
    """Validate-time checks of a spec that reads a label stage; the files beside it are read as usual."""
    family = kind_of(cfg.kind).family
    for i, c in enumerate(components(cfg.data)):
        sub = f"{key}.mixture[{i}]" if "mixture" in cfg.data else key
        if "from" in c:
            unknown = sorted(set(c) - {"from", "weight"})
            if unknown:
                raise RecipeError(f"unknown key {unknown[0]!r} beside `from:`", where=where, key=sub,
                                  fix="a label stage's pairs take only `from:` (and `weight:` in a mixture)")
            ref = recipe.stages.get(c["from"])
            if ref is None or kind_of(ref.kind).provides != "pairs":  # the label kind writes pairs.jsonl
                raise RecipeError(f"`from: {c['from']}` names {'no stage' if ref is None else f'a {ref.kind} stage'}",
                                  where=where, key=f"{sub}.from",
                                  fix="name a stage of kind label (its pairs.jsonl is read)")
            if family != "pairs":
                raise RecipeError(f"a {cfg.kind} stage does not train on preference pairs", where=where,
                                  key=f"{sub}.from", fix="read a label stage from a reward or dpo stage")
        elif "embedded" in c and c["embedded"] != "pairs":
            raise RecipeError(f"embedded {c['embedded']!r} cannot be mixed with labelled pairs", where=where,
                              key=f"{sub}.embedded", fix="use {embedded: pairs}")
    has_heldout = world_part(cfg.data) or file_components(cfg.data) or cfg.eval.data \
        or all("embedded" in recipe.stages[s].data for s in stage_sources(cfg.data))
    if not has_heldout:
        raise RecipeError("labelled pairs are training rows only, and nothing else gives held-out pairs",
                          where=where, key=key, fix="mix them with a pairs file, or add `eval: {data: {path: ...}}`")
    rest = without_stage_sources(cfg.data)
    if not rest:
        return None
    return check_spec(rest, recipe.path.parent, where, key, family)


def read_stage_pairs(ctx, stage: str) -> list[dict]:
    """A complete label stage's pairs, in the standard pairs format."""
    path = Path(ctx.recipe.stage_dir(stage)) / PAIRS_FILE
    if not path.is_file():
        raise RunError(f"stage {stage!r} has no {PAIRS_FILE}", where=str(path.parent),
                       fix=f"run it first: alignpipe run {ctx.recipe.path} --stages {stage}")
    return read_jsonl(path)


def labelled_pairs(ctx, cap: int | None, tokenizer=None, max_length: int | None = None
                   ) -> tuple[list[dict], list[dict], dict]:
    """(train pairs, held-out pairs, what was mixed) of a spec that reads label stages. Weights and `n` mix as
    a file mixture does (alignpipe.data.sources); the held-out pairs are the world's held-out pairs, the
    files' held-out share of the recipe's split, or the stage's eval file."""
    spec = ctx.config.data
    pools, weights, sources, held, world_heldout = [], [], [], [], False
    for c in components(spec):
        if "from" in c:  # a label stage on the world's prompts: the world's held-out pairs are the test
            rows, name = read_stage_pairs(ctx, c["from"]), f"stage {c['from']}"
            world_heldout |= "embedded" in ctx.recipe.stages[c["from"]].data
        elif "embedded" in c:
            rows, name, world_heldout = ctx.world.preference_rows("train"), "embedded pairs", True
        else:
            source = {k: v for k, v in c.items() if k != "weight"}
            prepared = prepare_data(source, ctx.recipe.path.parent, "pairs", key=f"stages.{ctx.name}.data", seed=ctx.seed)
            rows, their_held, _ = split_rows(ctx, prepared.rows, cap)
            held += list(their_held)
            name = str(c.get("path") or c.get("hub") or c.get("dataset"))
        pools.append(list(rows))
        weights.append(float(c.get("weight", 1.0)))
        sources.append(name)
    if world_heldout:
        held = ctx.world.preference_rows("eval") + held
    if ctx.config.eval.data:
        held = eval_file_rows(ctx.recipe, ctx.name)
    if "mixture" in spec:
        rng = random.Random(spec.get("seed", ctx.seed))
        counts = _counts(weights, [len(p) for p in pools], spec.get("n"))
        train = []
        for pool, count in zip(pools, counts):
            train += [pool[i] for i in _take(pool, count, rng)] if pool else []
        rng.shuffle(train)
    else:
        counts, train = [len(pools[0])], pools[0]
    mixed = [{"source": s, "weight": w, "available": len(p), "taken": n}
             for s, w, p, n in zip(sources, weights, pools, counts)]
    for row in mixed:
        print(f"  {row['source']}: {row['taken']} of {row['available']} pairs (weight {row['weight']:g})", flush=True)
    return train, held, {"mixture": mixed}
