"""Checks that run before anything is trained or written: `alignpipe validate` and the start of `run`.

Recipe parsing already rejected unknown keys and wrong types; here come the checks that need the
libraries (TRL config fields), the file system (data files, run folder) or the parent checkpoints.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
from pathlib import Path

from alignpipe.errors import RecipeError, RunError
from alignpipe.gates import check_gates
from alignpipe.recipe import Recipe
from alignpipe.stages import stage_module
from alignpipe.templates import has_generation_markers, resolve_template
from alignpipe.tracking import check_tracking

EMBEDDED_PARTS = ("corpus", "sft", "pairs", "rl_prompts")


def validate(recipe: Recipe) -> None:
    """Raise RecipeError / RunError on the first problem found."""
    where = str(recipe.path)
    template = resolve_template(recipe.chat_template, recipe.path)
    _check_model(recipe, where)
    _check_model_safety(recipe, where)
    if recipe.world:
        _check_world(recipe, where)
    check_tracking(recipe, where)
    for name, cfg in recipe.stages.items():
        key = f"stages.{name}"
        module = stage_module(cfg.kind)
        # a module serving several kinds (grpo, rloo) takes the kind: each has its own TRL config class
        takes_kind = "kind" in inspect.signature(module.trainer_config_class).parameters
        config_class = module.trainer_config_class(cfg.kind) if takes_kind else module.trainer_config_class()
        _check_trainer_keys(config_class, cfg.trainer, where, f"{key}.trainer")
        _check_data(recipe, cfg, where, f"{key}.data")
        if cfg.checkpoint_every < 0:
            raise RecipeError(f"checkpoint_every must be 0 or more, got {cfg.checkpoint_every}", where=where,
                              key=f"{key}.checkpoint_every", fix="give a number of steps (0: the stage's default)")
        check_lora_targets(recipe, name)
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

    _check_hub_data_offline(spec, where, key)
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
    if not probe.is_dir():
        raise RunError(f"run folder {root} cannot be made: {probe} is a file", where=where, key="runs_dir",
                       fix="set runs_dir to a folder")
    try:  # try it: os.access says yes to root, and to read-only mounts such as /sys
        fd, tmp = tempfile.mkstemp(prefix=".alignpipe-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise RunError(f"run folder {root} is not writable ({probe}: {err.strerror})", where=where,
                       key="runs_dir", fix="set runs_dir to a writable folder or fix the permissions") from None


def _check_model_safety(recipe: Recipe, where: str) -> None:
    """A local model folder must hold safetensors weights: pickle (`.bin`/`.pt`) can run code when read,
    so it needs `model.allow_pickle: true` (loading refuses it too; this says so before anything runs).
    Its own Python code (config `auto_map`) is never imported unless `model.trust_remote_code: true`."""
    spec = recipe.model
    if spec.path is None or not Path(spec.path).expanduser().is_dir():
        return _check_hub_model_offline(recipe, where)
    folder = Path(spec.path).expanduser()
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if not spec.allow_pickle and pickled and not any(folder.glob("*.safetensors")):
        raise RecipeError(f"model folder {folder} has only pickle weights ({pickled[0]}), which can run code when "
                          "loaded", where=where, key="model.allow_pickle",
                          fix="convert them to safetensors, or set model.allow_pickle: true if you trust them")


def _check_hub_model_offline(recipe: Recipe, where: str) -> None:
    from alignpipe.data.sources import _offline_setting

    path, offline = recipe.model.path, _offline_setting()
    if path and offline and not _in_hub_cache(path, "model"):
        raise RecipeError(f"hub model {path} is not in the local cache and {offline} is set", where=where,
                          key="model.path", fix=f"download it on a connected machine first, or unset {offline}, "
                                                "or point model.path at a local folder")


def _check_hub_data_offline(spec: dict, where: str, key: str) -> None:
    from alignpipe.data.sources import _offline_setting

    offline = _offline_setting()
    for i, part in enumerate(spec.get("mixture", [spec])):
        hub = part.get("hub") if isinstance(part, dict) else None
        if hub and offline and not _in_hub_cache(str(hub), "dataset"):
            at = f"{key}.mixture[{i}].hub" if "mixture" in spec else f"{key}.hub"
            raise RecipeError(f"hub dataset {hub} is not in the local cache and {offline} is set", where=where,
                              key=at, fix=f"download it on a connected machine first, or unset {offline}, or use "
                                          "a local file (path:)")


def _in_hub_cache(repo_id: str, kind: str) -> bool:
    """Whether anything of `repo_id` was ever downloaded here (offline, nothing else can be read)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folders = [Path(HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}"]
    if kind == "dataset":
        from datasets import config

        folders.append(Path(config.HF_DATASETS_CACHE) / repo_id.replace("/", "___"))
    return any(f.is_dir() for f in folders)


def check_lora_targets(recipe: Recipe, stage: str) -> None:
    """Every LoRA `target_modules` entry names a module of the model the stage starts from.

    Matching follows peft: a list entry matches a module whose full name is it or ends in `.<entry>`; a
    string is a regex over full names. peft fails only when nothing at all matches; a list entry
    matching nothing is a typo that would silently train fewer modules, so it is refused here too.
    Checked when that model is on disk: by `validate`, and by the runner just before the stage starts.
    """
    import re

    cfg = recipe.stages[stage]
    if cfg.lora is None or cfg.lora.target_modules == "all-linear":
        return
    names, linear = _module_names(recipe, stage)
    if not names:
        return
    targets = cfg.lora.target_modules
    for target in [targets] if isinstance(targets, str) else targets:
        if isinstance(targets, str):
            found = any(re.fullmatch(target, n) for n in names)
        else:
            found = any(n == target or n.endswith(f".{target}") for n in names)
        if not found:
            raise RecipeError(f"LoRA target {target!r} matches no module of the model", where=str(recipe.path),
                              key=f"stages.{stage}.lora.target_modules",
                              fix=f"use all-linear or names of its linear layers: {', '.join(sorted(linear))}")


def _module_names(recipe: Recipe, stage: str) -> tuple[set[str], set[str]]:
    """Module names of the model a stage starts from, built on the meta device (no weights read), and the
    last part of its linear layers' names; empty while that model is not on disk yet."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignpipe import modeling, runs

    cfg = recipe.stages[stage]
    source = recipe.model.path
    if cfg.from_ is not None:
        stage_dir = recipe.stage_dir(cfg.from_)
        if not runs.is_complete(stage_dir):
            return set(), set()
        source = str(modeling.checkpoint_dir(stage_dir))
        while modeling.is_adapter(Path(source)):  # a LoRA stage saved only its adapter: its base has the config
            base = json.loads((Path(source).parent / runs.MANIFEST).read_text())["base_model"]
            source = str(modeling.checkpoint_dir(Path(base["stage_dir"]))) if base.get("stage_dir") else base["path"]
    if source is None:  # a from-scratch model: nothing to match against before it exists
        return set(), set()
    local_only = {} if Path(str(source)).is_dir() else {"local_files_only": True}  # validate works offline
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code, **local_only)
    except (OSError, ValueError):
        return set(), set()  # a hub model not downloaded yet: peft checks when the stage loads it
    model_class = AutoModelForSequenceClassification if cfg.kind == "reward" else AutoModelForCausalLM
    with torch.device("meta"):
        model = model_class.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    modules = dict(model.named_modules())
    linear = {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    return set(modules) - {""}, linear


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
