"""This stage's run, decided once: the fingerprint of its inputs, its manifest, and whether it is
skipped, restored from its history, resumed or started over (`plan`). The runner asks for it once per
stage and acts on it; `validate` asks the same question to check stages against up-to-date parents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.data.registry import expand as expand_registry
from alignpipe.data.world import part_config, part_fingerprint
from alignpipe.errors import RunError
from alignpipe.recipe.parse import to_plain
from alignpipe.recipe.schema import Recipe
from alignpipe.runfolder import manifests as runs, versions as stage_versions
from alignpipe.runtime import distributed
from alignpipe.stages.context import StageContext, make_context


@dataclass
class StagePlan:
    """What `run` will do with one stage, and what it decided on."""

    ctx: StageContext
    fingerprint: str  # hash of everything that determines the result (`stage_fingerprint`)
    inputs: dict  # the parts it was made from (the manifest's `inputs`)
    old: dict | None  # the manifest in the stage folder now
    action: str  # skip | reuse | resume | fresh (stage_versions.plan)
    attempt: Path  # the folder it trains in (the stage folder, `.next/<stage>`, or a history version to restore)
    attempt_manifest: dict | None  # the manifest in `attempt` now (an interrupted run's, when resuming)

    def why_fresh(self, force: bool, restart: bool) -> str:
        return "--force" if force else "--restart" if restart else why_changed(self.old, self.inputs)

    @property
    def earlier_wall_time_s(self) -> float:
        """The time the attempt already trained (resuming), counted into the stage's wall time."""
        return 0.0 if self.action == "fresh" else float((self.attempt_manifest or {}).get("wall_time_s") or 0)

    def first_record(self, template_check: dict) -> dict:
        """The manifest of the attempt while it runs: what it is, what it was made from, where it stands."""
        ctx, cfg, recipe = self.ctx, self.ctx.config, self.ctx.recipe
        parent_manifest = runs.read_manifest(ctx.parent_dir) if ctx.parent_dir else None
        return {
            "stage": ctx.name,
            "kind": cfg.kind,
            "status": "running",
            "version": (stage_versions.version_of(self.attempt_manifest) if self.action == "resume"
                        else stage_versions.new_version(recipe.stage_dir(ctx.name))),
            "recipe": str(recipe.path),
            "resolved_config": to_plain(cfg),
            "recipe_settings": {"name": recipe.name, "seed": recipe.seed, "model": to_plain(recipe.model),
                                "chat_template": recipe.chat_template, "world": recipe.world,
                                **({"tools": recipe.tools} if recipe.tools else {})},
            "parent": ({"stage": cfg.from_, "path": cfg.from_,  # relative to the run folder, which can move
                        "manifest_sha256": runs.manifest_hash(ctx.parent_dir)} if ctx.parent_dir else None),
            "base_model": ctx.base_model_ref(),
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            "seed": recipe.seed,
            "versions": runs.versions(),
            "machine": runs.machine(),
            "git_revision": runs.git_revision(),
            "trust_remote_code": recipe.model.trust_remote_code,
            "lineage": ([*parent_manifest.get("lineage", []), cfg.from_] if parent_manifest else []),
            "template_check": template_check,
            "world_size": distributed.world_size(),
        }


def plan(recipe: Recipe, name: str, force: bool = False, restart: bool = False) -> StagePlan:
    """Fingerprint the stage, read its manifest, and decide (refusing a manifest of another schema)."""
    ctx = make_context(recipe, name, resume=not restart)
    fingerprint, parts = stage_fingerprint(ctx)
    old = runs.read_manifest(ctx.dir)
    if old and not force and old.get("schema") != runs.MANIFEST_SCHEMA:  # never resume, skip or delete it
        raise RunError(f"written by an incompatible alignpipe (manifest schema {old.get('schema')!r}, this version "
                       f"writes {runs.MANIFEST_SCHEMA})", where=str(ctx.dir / runs.MANIFEST),
                       fix=f"move the folder away or use another runs_dir; or overwrite it: --stages {name} --force")
    action, attempt = stage_versions.plan(ctx.dir, fingerprint, force=force, restart=restart,
                                          same=lambda m: same_result(m, fingerprint))
    return StagePlan(ctx, fingerprint, parts, old, action, attempt, runs.read_manifest(attempt))


def is_up_to_date(recipe: Recipe, name: str) -> bool:
    """Complete, with the fingerprint `run` would compute now: `run` will skip it."""
    ctx = make_context(recipe, name)
    if runs.manifest_problem(ctx.dir):  # `run` sets the folder aside and builds the stage again
        return False
    old = runs.read_manifest(ctx.dir)
    return bool(old) and old.get("status") == "complete" and same_result(old, stage_fingerprint(ctx)[0])


def data_fingerprint(ctx: StageContext) -> Any:
    """What identifies a stage's data: the world config for embedded data, file hashes otherwise."""
    spec = ctx.config.data
    if not spec:
        return None
    if "embedded" in spec:
        # hash the generated rows, not just the config: a change to the world's code must re-run stages

        rows = part_fingerprint(ctx.world, spec["embedded"])
        return {"embedded": spec, "world": part_config(to_plain(ctx.world.config), spec["embedded"]), "rows": rows}
    out = {"spec": spec}  # a `from:` component is an upstream stage: its manifest hash is fingerprinted
    read = expand_registry(spec, ctx.recipe.path.parent, f"stages.{ctx.name}.data")
    if read != spec:  # LLaMA-Factory `dataset:` names: what their registry entries say is read, and their files
        out["registry"], spec = read, read
    paths = [spec.get("path")] + [m.get("path") for m in spec.get("mixture", [])]
    for m in spec.get("mixture", []):
        if "embedded" in m:
            out[f"embedded:{m['embedded']}"] = part_fingerprint(ctx.world, m["embedded"])
    for p in filter(None, paths):
        path = Path(p) if Path(p).is_absolute() else ctx.recipe.path.parent / p
        if not path.exists():
            path = Path(p)
        out[str(p)] = runs.fingerprint_path(path) if path.exists() else "missing"
    return out


# Settings that cannot change what a stage trains: how it logs, reports and keeps checkpoints, and how
# it batches evaluation. They stay in the manifest's resolved_config but not in the fingerprint, so
# changing one skips a complete stage (or resumes an interrupted one) instead of training it again.
RESULT_NEUTRAL_KEYS = ("checkpoint_every",)
RESULT_NEUTRAL_TRAINER_KEYS = (
    "logging_steps", "logging_first_step", "logging_strategy", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "disable_tqdm", "report_to", "run_name", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "save_total_limit", "save_steps",
    "per_device_eval_batch_size", "eval_accumulation_steps", "skip_memory_metrics",
    "include_num_input_tokens_seen", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
    "hub_private_repo", "hub_always_push", "hub_revision",
)


# Options added after stages were run, at the default that gives the earlier result: fingerprinted only when set
# otherwise, so adding one re-runs no finished stage.
LATER_OPTION_DEFAULTS = {"cut_off_pairs": True, "max_tool_turns": 3, "tool_timeout_s": 2.0, "implicit_reward": "ratio"}
LATER_EVAL_DEFAULTS = {"every": 0, "curve_prompts": 32, "curve_samples": 4,  # eval.along_training (curves)
                       "safety": {}}  # eval.safety (eval/safety_suites.py)


def result_config(config: dict) -> dict:
    """A stage's plain config without the settings that cannot change its result (RESULT_NEUTRAL_*, and
    LATER_OPTION_DEFAULTS at their defaults)."""
    out = {k: v for k, v in config.items() if k not in RESULT_NEUTRAL_KEYS
           and not (k in LATER_OPTION_DEFAULTS and v == LATER_OPTION_DEFAULTS[k])}
    if "gates" in out:  # re-checked on the recorded metrics, never re-trained for ([]: what stages without
        out["gates"] = []  # gates were fingerprinted with, so they keep their fingerprint)
    if isinstance(out.get("trainer"), dict):
        out["trainer"] = {k: v for k, v in out["trainer"].items() if k not in RESULT_NEUTRAL_TRAINER_KEYS}
    if isinstance(out.get("eval"), dict):
        out["eval"] = {k: v for k, v in out["eval"].items()
                       if not (k in LATER_EVAL_DEFAULTS and v == LATER_EVAL_DEFAULTS[k])}
    return out


def same_result(old: dict, fingerprint: str) -> bool:
    """Whether a manifest was made from the inputs that give `fingerprint`. Manifests written before
    RESULT_NEUTRAL_* existed hashed those settings too: their recorded inputs are re-hashed without them,
    so upgrading alignpipe does not re-train every finished stage."""
    if old.get("fingerprint") == fingerprint:
        return True
    inputs = old.get("inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("config"), dict):
        return False
    return runs.fingerprint_json({**inputs, "config": result_config(inputs["config"])}) == fingerprint


def changed_inputs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for each leaf that differs between two fingerprint parts (manifest `inputs`)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key, "(unset)"), new.get(key, "(unset)"), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_inputs(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def stage_fingerprint(ctx: StageContext) -> tuple[str, dict]:
    """A hash of everything that determines a stage's result, and the parts it was made from."""
    recipe = ctx.recipe
    parts: dict[str, Any] = {
        "config": result_config(to_plain(ctx.config)),
        "seed": recipe.seed,
        "model": to_plain(recipe.model) if ctx.parent_dir is None else None,
        "chat_template": runs.sha256_bytes((ctx.chat_template or "model").encode()),
        "data": data_fingerprint(ctx),
        # tools change a chat policy's rollouts and evaluation (eval/tools.py), nothing else
        **({"tools": recipe.tools} if recipe.tools and ctx.kind.policy and ctx.kind.chat else {}),
    }
    for upstream in recipe.start_after(ctx.name):
        up_dir = recipe.stage_dir(upstream)
        parts[f"upstream:{upstream}"] = runs.manifest_hash(up_dir) if runs.is_complete(up_dir) else "incomplete"
    for scorer in recipe.evaluated_with(ctx.name):  # known before it is built: it may be built beside this stage
        parts[f"evaluated_with:{scorer}"] = stage_fingerprint(make_context(recipe, scorer))[0]
    return runs.fingerprint_json(parts), parts


def output_fingerprints(ctx: StageContext) -> dict[str, str]:
    """Hashes of what the stage wrote, so a child's manifest can be traced to these exact files."""
    model_dir = ctx.model_dir
    if not model_dir.is_dir():
        return {}
    out = {"model": runs.fingerprint_path(model_dir)}
    for name in ("tokenizer.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            out[name] = runs.fingerprint_path(model_dir / name)
    return out


def why_changed(old: dict | None, parts: dict) -> str:
    """What differs from the folder's last run, for the "starting over" line."""
    if not old:
        return "no manifest"
    changed = changed_inputs(old.get("inputs") or {}, parts)
    if not changed:
        return "its config or inputs changed"
    more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
    return "its config or inputs changed: " + "; ".join(changed[:5]) + more
