"""Checks that run before anything is trained or written: `alignpipe validate` and the start of `run`.

Recipe parsing already rejected unknown keys and wrong types; here come the checks that need the
libraries (TRL config fields), the file system (data files, run folder) or the parent checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from alignpipe.errors import RecipeError, RunError
from alignpipe.gates import check_gates
from alignpipe.recipe import Recipe
from alignpipe.stages import stage_module
from alignpipe.templates import has_generation_markers, resolve_template

EMBEDDED_PARTS = ("corpus", "sft", "pairs", "rl_prompts")


def validate(recipe: Recipe) -> None:
    """Raise RecipeError / RunError on the first problem found."""
    where = str(recipe.path)
    template = resolve_template(recipe.chat_template, recipe.path)
    _check_model(recipe, where)
    if recipe.world:
        _check_world(recipe, where)
    for name, cfg in recipe.stages.items():
        key = f"stages.{name}"
        module = stage_module(cfg.kind)
        _check_trainer_keys(module.trainer_config_class(), cfg.trainer, where, f"{key}.trainer")
        _check_data(recipe, cfg, where, f"{key}.data")
        if cfg.kind == "sft" and template is not None and not has_generation_markers(template) \
                and cfg.trainer.get("assistant_only_loss", True):
            raise RecipeError("the chat template has no {% generation %} markers, which assistant-only loss needs",
                              where=where, key="chat_template",
                              fix="use a built-in template (embedded, chatml, llama3) or add the markers, or set "
                                  f"{key}.trainer.assistant_only_loss: false")
        if cfg.from_ is None and recipe.model.init is not None and cfg.kind != "pretrain":
            raise RecipeError("this stage starts from the recipe's model, but the model is an `init:` block "
                              "(random weights with no tokenizer)", where=where, key=f"{key}.from",
                              fix="set `from:` to a pretrain stage, or give `model.path`")
        if cfg.kind == "pretrain" and cfg.from_ is not None:
            raise RecipeError("a pretrain stage starts from the recipe's model", where=where, key=f"{key}.from",
                              fix="remove `from:` (use model.path for continued pretraining)")
        check_gates(recipe, name, where)
        check = getattr(module, "check", None)
        if check is not None:  # stage-specific checks (e.g. a reward_model that is not a reward stage)
            check(recipe, name, where)
    _check_runs_dir(recipe, where)


def _check_model(recipe: Recipe, where: str) -> None:
    """A local model folder must hold a config.json; anything else must look like a hub id, which is
    downloaded when a stage runs (validate works offline)."""
    import sys

    from alignpipe.data.loading import HUB_ID

    path = recipe.model.path
    if path is None:
        return
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise RecipeError(f"model folder {path} has no config.json", where=where, key="model.path",
                              fix="point it at a folder written by save_pretrained (or a hub snapshot)")
        return
    if local.exists() or path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise RecipeError(f"{path!r} is neither a model folder nor a hub id", where=where, key="model.path",
                          fix="give a folder with config.json (relative to the current directory) or org/name")
    print(f"[alignpipe] model.path: hub model {path} is downloaded when a stage runs (validate does not reach "
          "the hub)", file=sys.stderr)


def _check_world(recipe: Recipe, where: str) -> None:
    from alignpipe.data.world import WorldConfig

    allowed = {f.name for f in dataclasses.fields(WorldConfig)}
    for k in recipe.world:
        if k not in allowed:
            raise RecipeError(f"unknown key {k!r}", where=where, key=f"world.{k}",
                              fix=f"allowed keys: {', '.join(sorted(allowed))}")


def _check_trainer_keys(config_class, trainer: dict, where: str, key: str) -> None:
    import difflib

    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for k, v in trainer.items():
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1, cutoff=0.6)
            raise RecipeError(f"unknown {config_class.__name__} key {k!r}", where=where, key=f"{key}.{k}",
                              fix=f"did you mean {close[0]!r}?" if close else
                              f"see the fields of {config_class.__module__}.{config_class.__name__}")
        if k in ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size") and \
                not (isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or (k == "max_steps" and v == -1))):
            raise RecipeError(f"{k} must be a positive number, got {v!r}", where=where, key=f"{key}.{k}",
                              fix=f"set a positive {k}")


def _check_data(recipe: Recipe, cfg, where: str, key: str) -> None:
    spec = cfg.data
    if not spec:
        return
    if "embedded" in spec:
        if spec["embedded"] not in EMBEDDED_PARTS:
            raise RecipeError(f"unknown embedded data {spec['embedded']!r}", where=where, key=f"{key}.embedded",
                              fix=f"use one of {', '.join(EMBEDDED_PARTS)}")
        return
    from alignpipe.data.loading import check_spec

    check_spec(spec, recipe.path.parent, where, key, cfg.kind)


def _check_runs_dir(recipe: Recipe, where: str) -> None:
    root = recipe.run_root.resolve()
    base = Path(recipe.runs_dir)
    base = (base if base.is_absolute() else Path.cwd() / base).resolve()
    if base not in root.parents:
        raise RecipeError(f"run folder {root} escapes runs_dir {base}", where=where, key="name",
                          fix="use a plain recipe name without '/' or '..'")
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise RunError(f"run folder {root} is not writable ({probe} is read-only)", where=where, key="runs_dir",
                       fix="set runs_dir to a writable folder or fix the permissions")


def check_parent_template(recipe: Recipe, stage: str) -> None:
    """A stage refuses a parent whose saved chat template differs from the recipe's."""
    cfg = recipe.stages[stage]
    if cfg.from_ is None:
        return
    template = resolve_template(recipe.chat_template, recipe.path)
    saved = recipe.stage_dir(cfg.from_) / "model" / "chat_template.jinja"
    if template is not None and saved.is_file() and saved.read_text().strip() != template.strip():
        raise RunError(f"parent {cfg.from_!r} was trained with a different chat template than this recipe's "
                       f"({recipe.chat_template!r})", where=str(saved), key=f"stages.{stage}.from",
                       fix=f"use the template the parent was trained with, or re-run {cfg.from_!r} with --force")
