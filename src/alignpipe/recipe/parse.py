"""A recipe's YAML turned into its typed configs (`alignpipe.recipe.schema`), and back into plain data.

Anything the schema does not understand is refused, naming the file and the dotted key path; `--set KEY=VALUE`
overrides are applied first. Checks that need heavy imports (TRL config fields, data files) live in
`alignpipe.pipeline.validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from alignpipe.errors import RecipeError
from alignpipe.recipe.dataspec import components, stage_sources
from alignpipe.recipe.kinds import all_kinds, config_class, references
from alignpipe.recipe.schema import ModelSpec, Recipe, StageConfig
from alignpipe.runtime.tracking import DEFAULT_TRACKING

SHARED_BLOCK_PREFIX = "x-"  # top-level keys that only hold blocks for YAML anchors (`x-eval: &eval {...}`)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`; users write `1e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _yaml_name(f: dataclasses.Field) -> str:
    return "from" if f.name == "from_" else f.name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses. Raises RecipeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, key)
            except RecipeError as err:
                errors.append(err)
        expected = " or ".join(_type_name(a) for a in args)
        raise RecipeError(f"expected {expected}, got {type(value).__name__} {value!r}", where=where, key=key,
                          fix="correct the value's type")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"expected a list, got {type(value).__name__}", where=where, key=key,
                              fix="write a YAML list")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"expected a mapping, got {type(value).__name__}", where=where, key=key,
                              fix="write a YAML mapping (key: value)")
        _, item = typing.get_args(tp) or (Any, Any)
        if dataclasses.is_dataclass(item):  # e.g. eval.judges: name -> JudgeSpec
            return {k: from_dict(item, v, where, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise RecipeError(f"expected {tp.__name__}, got {type(value).__name__} {value!r}", where=where, key=key,
                          fix=f"give a {tp.__name__}")
    return value


def from_dict(cls: type, data: Any, where: str, key: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping, got {type(data).__name__} {data!r}", where=where, key=key or "<top>",
                          fix="write a YAML mapping (key: value)")
    hints = typing.get_type_hints(cls)
    # Recipe.path is where the recipe was read from, not a YAML key (ModelSpec.path is one)
    fields = {_yaml_name(f): f for f in dataclasses.fields(cls) if not (cls is Recipe and f.name == "path")}
    kwargs = {}
    for k, v in data.items():
        sub = f"{key}.{k}" if key else str(k)
        if k not in fields:
            close = _closest(str(k), fields)
            raise RecipeError(f"unknown key {k!r}", where=where, key=sub,
                              fix=f"did you mean {close!r}?" if close else f"allowed keys: {', '.join(fields)}")
        f = fields[k]
        kwargs[f.name] = _coerce(v, hints[f.name], where, sub)
    missing = [name for name, f in fields.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kwargs]
    if missing:
        sub = f"{key}.{missing[0]}" if key else missing[0]
        raise RecipeError("missing required key", where=where, key=sub, fix=f"add `{missing[0]}:`")
    return cls(**kwargs)


def _closest(word: str, options: typing.Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def _parse_model(value: Any, where: str) -> ModelSpec:
    if isinstance(value, str):  # `model: Qwen/Qwen2.5-0.5B` shorthand
        return ModelSpec(path=value)
    spec = from_dict(ModelSpec, value, where, "model")
    if spec.path is None and spec.init is None:
        raise RecipeError("neither `path` nor `init` given", where=where, key="model",
                          fix="give a hub id / local folder as `model.path`, or an `init:` block to build one")
    return spec


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`a.b.c=value`) and type-check a recipe. Raises RecipeError naming file and key."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", where=where, fix="check the path (recipes live in recipes/)")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"YAML syntax error: {problem}", where=loc, fix="fix the YAML at that line") from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping", where=where, fix="start with `name:` and `stages:`")
    for item in overrides or []:
        apply_override(data, item, where)
    return parse_recipe(data, path)


def apply_override(data: dict, item: str, where: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (so 3, 1e-4, true work)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value", where="--set", fix="write e.g. seed=1")
    dotted, raw = item.split("=", 1)
    value = yaml_load(raw) if raw else ""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set inside a non-mapping", where="--set", key=dotted, fix="check the key path")
    node[parts[-1]] = value


def parse_recipe(data: dict, path: Path) -> Recipe:
    where = str(path)
    known = {"name", "seed", "runs_dir", "model", "chat_template", "world", "tracking", "stages", "dataset_dir", "tools"}
    for k in data:
        if isinstance(k, str) and k.startswith(SHARED_BLOCK_PREFIX):  # a block for YAML anchors, read nowhere else
            continue
        if k not in known:
            close = _closest(str(k), known)
            raise RecipeError(f"unknown key {k!r}", where=where, key=str(k),
                              fix=f"did you mean {close!r}?" if close else f"allowed keys: {', '.join(sorted(known))}, "
                                  f"or {SHARED_BLOCK_PREFIX}NAME for a block shared through YAML anchors")
    for req in ("name", "stages"):
        if req not in data:
            raise RecipeError("missing required key", where=where, key=req, fix=f"add `{req}:`")
    name = _coerce(data["name"], str, where, "name")
    if not _NAME_RE.match(name) or ".." in name:
        raise RecipeError(f"recipe name {name!r} is not a plain folder name", where=where, key="name",
                          fix="use letters, digits, '-', '_' and '.', no '/' or '..' (it names runs/<name>/)")
    raw_stages = data["stages"]
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise RecipeError("`stages` must be a non-empty mapping of stage name -> config", where=where, key="stages",
                          fix="e.g. stages: {sft: {data: {embedded: sft}}}")
    stages: dict[str, StageConfig] = {}
    for sname, sdata in raw_stages.items():
        key = f"stages.{sname}"
        if not isinstance(sname, str) or not _NAME_RE.match(sname) or ".." in sname:
            raise RecipeError(f"stage name {sname!r} is not a plain folder name", where=where, key=key,
                              fix="use letters, digits, '-' and '_'")
        if sdata is None:
            sdata = {}
        if not isinstance(sdata, dict):
            raise RecipeError("a stage must be a mapping", where=where, key=key, fix="e.g. sft: {from: pretrain}")
        kind = sdata.get("kind", sname)
        if kind not in all_kinds():
            raise RecipeError(f"unknown stage kind {kind!r}", where=where, key=f"{key}.kind",
                              fix=f"use one of {', '.join(all_kinds())} (the kind defaults to the stage name)")
        cfg = from_dict(config_class(kind), sdata, where, key)
        cfg.kind = kind
        _set_dataset_dir(cfg.data, data.get("dataset_dir"), where, f"{key}.data")
        if isinstance(cfg.gates, dict):  # {metric: "op expression"} -> ["metric op expression"]
            cfg.gates = [f"{metric} {_rule(rule)}" for metric, rule in cfg.gates.items()]
        stages[sname] = cfg
    recipe = Recipe(
        name=name,
        stages=stages,
        seed=_coerce(data.get("seed", 0), int, where, "seed"),
        runs_dir=_coerce(data.get("runs_dir", "runs"), str, where, "runs_dir"),
        model=_parse_model(data.get("model", {"init": {}}), where),
        chat_template=_coerce(data.get("chat_template", "embedded"), str, where, "chat_template"),
        world=_coerce(data.get("world", {}), dict[str, Any], where, "world"),
        tracking=_coerce(data.get("tracking", list(DEFAULT_TRACKING)), list[str], where, "tracking"),
        tools=_coerce(data.get("tools", []), list[str], where, "tools"),
        path=path,
    )
    _check_graph(recipe, where)
    return recipe


def _set_dataset_dir(spec: dict, dataset_dir: Any, where: str, key: str) -> None:
    """Give each `dataset:` component without its own `dataset_dir:` the recipe's (LLaMA-Factory's registry folder,
    relative to the recipe's folder like every path in a recipe)."""
    if dataset_dir is not None and not isinstance(dataset_dir, str):
        raise RecipeError(f"expected a folder path, got {type(dataset_dir).__name__}", where=where, key="dataset_dir",
                          fix="e.g. dataset_dir: ../LLaMA-Factory/data")
    for component in components(spec or {}):
        if "dataset" in component and "dataset_dir" not in component and dataset_dir is not None:
            component["dataset_dir"] = dataset_dir


def _check_graph(recipe: Recipe, where: str) -> None:
    """Every `from` / `reward_model` names a stage of this recipe, and there is no cycle."""
    for name, cfg in recipe.stages.items():
        for field_name, ref in {"from": cfg.from_, **references(cfg)}.items():
            if ref is not None and ref not in recipe.stages:
                raise RecipeError(f"names stage {ref!r}, which this recipe does not have", where=where,
                                  key=f"stages.{name}.{field_name}",
                                  fix=f"use one of {', '.join(recipe.stages)} or remove the key")
        for ref in stage_sources(cfg.data):
            if ref not in recipe.stages or ref == name:
                raise RecipeError(f"`data: {{from: {ref}}}` names no other stage of this recipe", where=where,
                                  key=f"stages.{name}.data", fix=f"name a label stage: one of {', '.join(recipe.stages)}")
    for name in recipe.stages:
        seen = [name]
        parent = recipe.stages[name].from_
        while parent:
            if parent in seen:
                cycle = " -> ".join(seen + [parent])
                raise RecipeError(f"`from` makes a cycle: {cycle}", where=where, key=f"stages.{name}.from",
                                  fix="a stage must start from an earlier stage or from the recipe's model")
            seen.append(parent)
            parent = recipe.stages[parent].from_


def to_plain(obj: Any) -> Any:
    """A recipe or config as plain JSON-able data (for manifests and fingerprints)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if isinstance(obj, Recipe) and f.name == "path":  # ModelSpec.path is config; Recipe.path is not
                continue
            out[_yaml_name(f)] = to_plain(getattr(obj, f.name))
        return out
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _rule(rule) -> str:
    """A mapping gate's rule: `">= 0.5"` as written; true / false (a flag such as `overoptimised`) as `== 1` / `== 0`."""
    return f"== {int(rule)}" if isinstance(rule, bool) else str(rule)
