"""Checks that run before anything is trained or written: `alignpipe validate` and the start of `run`.

Recipe parsing already rejected unknown keys and wrong types; here come the checks that need the
libraries (TRL config fields), the file system (data files, run folder) or the parent checkpoints.
"""

from __future__ import annotations

# Heavy imports (huggingface_hub, datasets, torch, transformers) stay inside the functions that use them: the CLI
# starts without them.
import dataclasses
import difflib
import os
import re
import sys
import tempfile
from pathlib import Path

from alignpipe.data.formats import DataError
from alignpipe.data.registry import expand as expand_registry, notes as registry_notes
from alignpipe.data.loading import HUB_ID, as_user_error, check_spec
from alignpipe.data.report import format_report, validation_report
from alignpipe.data.sources import check_one_source, offline_setting, prepare_data
from alignpipe.data.split import eval_file_rows, prompt_key, recipe_split, user_stages
from alignpipe.data.tools import resolve_tools
from alignpipe.data.world import WORLD_PART_NAMES, WORLD_PARTS, WorldConfig
from alignpipe.errors import RecipeError, RunError
from alignpipe.eval.independence import independence_line
from alignpipe.labelling.sources import check_labelled_data
from alignpipe.models import loading as modeling
from alignpipe.pipeline.eval_checks import check_eval
from alignpipe.eval.along_training import check_curves
from alignpipe.pipeline.gates import check_gates
from alignpipe.pipeline.plan import is_up_to_date
from alignpipe.pipeline.stage_templates import check_stage_templates
from alignpipe.recipe.dataspec import reads_stages
from alignpipe.recipe.kinds import kind_of, kinds_where
from alignpipe.recipe.schema import Recipe
from alignpipe.recipe.templates import has_generation_markers, resolve_template
from alignpipe.runfolder import manifests as runs
from alignpipe.runfolder.versions import base_of
from alignpipe.runtime.tracking import check_tracking
from alignpipe.stages.context import StageContext, make_context

def validate(recipe: Recipe, show_data: bool = False) -> None:
    """Raise RecipeError / RunError on the first problem found; with `show_data`, print what each stage's
    user data holds (source, format, rows read / kept / dropped, token lengths, the held-out split)."""
    where = str(recipe.path)
    template = resolve_template(recipe.chat_template, recipe.path)
    _check_model(recipe, where)
    _check_model_safety(recipe, where)
    if recipe.world:
        _check_world(recipe, where)
    check_tracking(recipe, where)
    if recipe.tools:  # imported and given their schemas now, so a typo fails before training
        resolve_tools(recipe.tools, where)
    for name, cfg in recipe.stages.items():
        key = f"stages.{name}"
        kind = kind_of(cfg.kind)
        _check_trainer_keys(kind.trainer_config(), cfg.trainer, where, f"{key}.trainer")
        prepared = _check_data(recipe, cfg, where, f"{key}.data")
        _check_eval_data(recipe, name, where)
        if show_data and prepared is not None:
            _show_data(recipe, name, prepared)
        if cfg.checkpoint_every < 0:
            raise RecipeError(f"checkpoint_every must be 0 or more, got {cfg.checkpoint_every}", where=where,
                              key=f"{key}.checkpoint_every", fix="give a number of steps (0: the stage's default)")
        check_lora_targets(recipe, name)
        if kind.assistant_loss and template is not None and not has_generation_markers(template) \
                and cfg.trainer.get("assistant_only_loss", True):
            raise RecipeError("the chat template has no {% generation %} markers, which assistant-only loss needs",
                              where=where, key="chat_template",
                              fix="use a built-in template (embedded, chatml, llama3) or add the markers, or set "
                                  f"{key}.trainer.assistant_only_loss: false")
        if cfg.from_ is None and recipe.model.init is not None and kind.chat:
            raise RecipeError("this stage starts from the recipe's model, but the model is an `init:` block "
                              "(random weights with no tokenizer)", where=where, key=f"{key}.from",
                              fix="set `from:` to a pretrain stage, or give `model.path`")
        if not kind.chat and cfg.from_ is not None:
            raise RecipeError(f"a {cfg.kind} stage starts from the recipe's model", where=where, key=f"{key}.from",
                              fix="remove `from:` (use model.path for continued pretraining)")
        check_gates(recipe, name, where)
        check_eval(recipe, name, where)
        check_curves(recipe, name, where)
        if (line := independence_line(recipe, name)) is not None:
            print(line, file=sys.stderr)
        if kind.check is not None:  # the kind's own checks (e.g. a reward_model that is not a reward stage)
            kind.check(recipe, name, where)
    check_stage_tokenizers(recipe)
    _check_runs_dir(recipe, where)
    from alignpipe.eval.contamination import validate_lines

    for line in validate_lines(recipe):
        print(line, file=sys.stderr)


def check_stage_tokenizers(recipe: Recipe) -> None:
    """The checks `run` makes before each stage trains (template_checks.check_stage_templates: the chat
    template, the end of turn as a stop token, the tokenizer against its parents), made for every stage
    whose tokenizer can be read now. A stage whose parents are complete and up to date (`run` will skip
    them) is checked against them, exactly as `run` will; one whose parents are still to be (re)built is
    checked on the recipe's model, the tokenizer they start from too. Stages of an `init:` model wait
    for their pretrain stage; hub models for `run` (validate works offline)."""
    local_model = recipe.model_source is not None and Path(recipe.model_source).is_dir()
    fresh: dict[str, bool] = {}  # complete, with the fingerprint `run` would compute now: it will be skipped
    for name in recipe.order():
        ctx = make_context(recipe, name)
        ups = recipe.upstream(name)
        if ups and all(fresh.get(u) for u in ups):
            check_stage_templates(ctx)
        elif local_model:
            check_stage_templates(dataclasses.replace(ctx, parent_dir=None), against_parents=not ups)
        fresh[name] = all(fresh.get(u) for u in ups) and is_up_to_date(recipe, name)


def _check_model(recipe: Recipe, where: str) -> None:
    """A local model folder must hold a config.json; anything else must look like a hub id, which is
    downloaded when a stage runs (validate works offline)."""
    path = recipe.model.path
    if path is None:
        return
    local = Path(recipe.model_source)
    if local.is_dir():
        if not (local / "config.json").is_file():
            stage = local if (local / "manifest.json").is_file() else local.parent
            if (local / "adapter_config.json").is_file() or (stage / "manifest.json").is_file():
                raise RecipeError(f"model folder {path} is an alignpipe stage (a LoRA stage saves only its "
                                  "adapter), not a model", where=where, key="model.path",
                                  fix=f"in its own recipe, start from it with `from: {stage.name}`; elsewhere, "
                                      f"run `alignpipe export {stage} OUT` and set model.path: OUT")
            raise RecipeError(f"model folder {path} has no config.json", where=where, key="model.path",
                              fix="point it at a folder written by save_pretrained (or a hub snapshot)")
        return
    if local.exists() or path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise RecipeError(f"{path!r} is neither a model folder nor a hub id", where=where, key="model.path",
                          fix="give a folder with config.json (relative to the recipe's folder, "
                                  f"{recipe.path.parent}) or org/name")
    print(f"[alignpipe] model.path: hub model {path} is downloaded when a stage runs (validate does not reach "
          "the hub)", file=sys.stderr)


def _check_world(recipe: Recipe, where: str) -> None:
    allowed = {f.name for f in dataclasses.fields(WorldConfig)}
    for k in recipe.world:
        if k not in allowed:
            raise RecipeError(f"unknown key {k!r}", where=where, key=f"world.{k}",
                              fix=f"allowed keys: {', '.join(sorted(allowed))}")
    for k in ("poison", "canaries"):  # planted attacks (data/world_poison.py): checked before any training
        try:
            WorldConfig(**{k: recipe.world.get(k)})
        except ValueError as err:
            raise RecipeError(str(err), where=where, key=f"world.{k}", fix="see docs/data-attacks.md") from None
    if not isinstance(recipe.world.get("safety", False), bool):  # the manners (data/world_safety.py): opt-in
        raise RecipeError(f"world.safety must be true or false, not {recipe.world['safety']!r}", where=where,
                          key="world.safety", fix="write `safety: true` to add the manners (docs/safety.md)")


def _check_trainer_keys(config_class, trainer: dict, where: str, key: str) -> None:
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


def _check_eval_data(recipe: Recipe, name: str, where: str) -> None:
    """An explicit `eval: {data: ...}` file is read like the stage's data, and shares no prompt with it."""
    cfg = recipe.stages[name]
    if not cfg.eval.data:
        return
    key = f"stages.{name}.eval.data"
    if not kind_of(cfg.kind).user_split or not cfg.data or "embedded" in cfg.data:
        raise RecipeError("an eval file is for a stage trained on user data", where=where, key=key,
                          fix=f"remove it, or use it on a {'/'.join(kinds_where(user_split=True))} stage with a data file")
    try:
        keys = {prompt_key(r) for r in eval_file_rows(recipe, name)}
        train = prepare_data(cfg.data, recipe.path.parent, kind_of(cfg.kind).family, key=f"stages.{name}.data")
    except DataError as err:
        raise as_user_error(err, where) from None
    shared = sorted({prompt_key(r) for r in train.rows} & keys)
    if shared:
        raise RecipeError(f"{len(shared)} prompts of the eval file are also in the training data (first: "
                          f"{shared[0][:60]!r})", where=where, key=key,
                          fix="remove them from one of the files: an evaluation on trained prompts measures memory")


def _show_data(recipe: Recipe, name: str, prepared) -> None:
    """What `run` will read for this stage, measured with the tokenizer it will start from (when it exists)."""
    cfg = recipe.stages[name]
    tokenizer, why_not = stage_tokenizer(recipe, name)
    max_length = cfg.trainer.get("max_length", kind_of(cfg.kind).max_length)
    try:
        report = validation_report(prepared, tokenizer, max_length, sample=2000, seed=recipe.seed)
    except DataError as err:
        raise as_user_error(err, str(recipe.path)) from None
    print(f"stage {name} ({cfg.kind}):")
    from alignpipe.errors import terminal_safe

    print(terminal_safe(format_report(report)))  # a file's text: escape what a terminal would act on
    if tokenizer is None:
        print(f"  tokens: not measured ({why_not})")
    if name in user_stages(recipe):
        split = recipe_split(recipe, local_only=True)
        held = [r for r in prepared.rows if split.is_heldout(prompt_key(r))]
        own = f"; its held-out rows: eval.data {cfg.eval.data.get('path', '')}".rstrip() if cfg.eval.data else ""
        print(f"  split {split.digest}: {len(prepared.rows) - len(held)} rows to train on, {len(held)} held out "
              f"({len({prompt_key(r) for r in held})} prompts{own}; the stage evaluates on at most "
              f"{getattr(cfg, 'eval_pairs', None) or getattr(cfg, 'eval_docs', None) or 200})")


def stage_tokenizer(recipe: Recipe, name: str):
    """(the tokenizer a stage starts from with the recipe's template, None) or (None, why it cannot be had yet)."""
    cfg = recipe.stages[name]
    parent = recipe.stage_dir(cfg.from_) if cfg.from_ else None
    if parent is not None and not runs.is_complete(parent):
        # stages after the first keep the model's tokenizer, unless a pretrain stage builds one from scratch
        chain, up = [], cfg.from_
        while up is not None:
            chain.append(up)
            up = recipe.stages[up].from_
        builders = [n for n in chain if not kind_of(recipe.stages[n].kind).chat]
        if builders and recipe.model.init is not None:
            return None, f"the tokenizer is trained by stage {builders[0]!r}, which has not run yet"
        parent = None
    if not kind_of(cfg.kind).chat and recipe.model.init is not None:
        return None, "plain text; the tokenizer is trained by this stage"
    if parent is None and (recipe.model_source is None or not Path(recipe.model_source).is_dir()):
        return None, "the model is not on this machine yet"
    try:
        return StageContext(recipe, name, cfg, recipe.stage_dir(name), parent).load_tokenizer(), ""
    except Exception as err:  # a tokenizer that cannot be read is reported by the stage itself
        return None, f"tokenizer not readable ({type(err).__name__})"


def _check_data(recipe: Recipe, cfg, where: str, key: str):
    spec = cfg.data
    if not spec:
        return None

    try:
        check_one_source(spec, key)
        read = expand_registry(spec, recipe.path.parent, key)  # LLaMA-Factory `dataset:` names -> their files
        for note in registry_notes(spec, recipe.path.parent, key):
            print(f"[alignpipe] {key}: {note}", file=sys.stderr)
    except DataError as err:
        raise as_user_error(err, where) from None

    if reads_stages(spec):  # data: {from: <label stage>}, alone or mixed
        return check_labelled_data(recipe, cfg, where, key)
    if "embedded" in spec:
        part, kind = spec["embedded"], kind_of(cfg.kind)
        if part not in WORLD_PARTS:
            raise RecipeError(f"unknown embedded data {part!r}", where=where, key=f"{key}.embedded",
                              fix=f"use one of {', '.join(WORLD_PARTS)}")
        if kind.embedded is not None and part != kind.embedded:
            raise RecipeError(f"a {cfg.kind} stage trains on {WORLD_PART_NAMES[kind.embedded]} (embedded "
                              f"{kind.embedded!r}), not {part!r}", where=where,
                              key=f"{key}.embedded", fix=f"use `data: {{embedded: {kind.embedded}}}` or a data file")
        return None

    _check_hub_data_offline(read, where, key)
    return check_spec(read, recipe.path.parent, where, key, kind_of(cfg.kind).family)


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
    path, offline = recipe.model.path, offline_setting()
    if path and offline and not _in_hub_cache(path, "model"):
        raise RecipeError(f"hub model {path} is not in the local cache and {offline} is set", where=where,
                          key="model.path", fix=f"download it on a connected machine first, or unset {offline}, "
                                                "or point model.path at a local folder")


def _check_hub_data_offline(spec: dict, where: str, key: str) -> None:
    offline = offline_setting()
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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = recipe.stages[stage]
    source = recipe.model_source
    if cfg.from_ is not None:
        stage_dir = recipe.stage_dir(cfg.from_)
        if not runs.is_complete(stage_dir):
            return set(), set()
        source = str(modeling.checkpoint_dir(stage_dir))
        while modeling.is_adapter(Path(source)):  # a LoRA stage saved only its adapter: its base has the config
            base = base_of(Path(source).parent)
            source = str(modeling.checkpoint_dir(base)) if isinstance(base, Path) else base
    if source is None:  # a from-scratch model: nothing to match against before it exists
        return set(), set()
    local_only = {} if Path(str(source)).is_dir() else {"local_files_only": True}  # validate works offline
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code, **local_only)
    except (OSError, ValueError):
        return set(), set()  # a hub model not downloaded yet: peft checks when the stage loads it
    model_class = AutoModelForSequenceClassification if kind_of(cfg.kind).scorer else AutoModelForCausalLM
    with torch.device("meta"):
        model = model_class.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    modules = dict(model.named_modules())
    linear = {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    return set(modules) - {""}, linear


