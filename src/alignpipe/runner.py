"""Runs a recipe's stages in dependency order, skipping those already complete with the same inputs."""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from alignpipe import gates, progress, runs, stage_versions, tracking
from alignpipe.context import StageContext
from alignpipe.errors import AlignpipeError, RunError
from alignpipe.lock import RunLock
from alignpipe.validate import check_lora_targets
from alignpipe.recipe import Recipe, to_plain
from alignpipe import distributed
from alignpipe.template_checks import check_stage_templates
from alignpipe.stages import stage_module


def log(msg: str) -> None:
    if not distributed.is_main_process():  # one copy of the log, not one per process
        return
    print(f"[alignpipe] {msg}", file=sys.stderr, flush=True)


def make_context(recipe: Recipe, name: str, resume: bool = True) -> StageContext:
    cfg = recipe.stages[name]
    parent = recipe.stage_dir(cfg.from_) if cfg.from_ else None
    return StageContext(recipe=recipe, name=name, config=cfg, dir=recipe.stage_dir(name), parent_dir=parent,
                        resume=resume)


# What a stage reading an embedded part sees of the world: the part, its held-out sibling and the
# held-out prompts its evaluation samples on. A change to the preference pairs re-runs reward and dpo,
# not pretraining.
WORLD_PRODUCTS = {
    "corpus": ("corpus", "corpus_eval", "eval_prompts"),
    "sft": ("sft_rows", "eval_prompts"),
    "pairs": ("pairs", "pairs_eval", "eval_prompts"),
    "rl_prompts": ("rl_prompts", "eval_prompts"),
}


def world_fingerprint(world, part: str) -> str:
    """sha256 of the world's rows an embedded `part` stands for (see WORLD_PRODUCTS), cached on the world."""
    cache = world.__dict__.setdefault("_alignpipe_fingerprints", {})
    if part not in cache:
        make = {"corpus": world.corpus, "corpus_eval": world.corpus_eval, "sft_rows": world.sft_rows,
                "pairs": lambda: world.preference_rows("train"), "pairs_eval": lambda: world.preference_rows("eval"),
                "eval_prompts": world.eval_prompts, "rl_prompts": world.rl_prompts}
        cache[part] = runs.fingerprint_json([make[name]() for name in WORLD_PRODUCTS[part]])
    return cache[part]


def data_fingerprint(ctx: StageContext) -> Any:
    """What identifies a stage's data: the world config for embedded data, file hashes otherwise."""
    spec = ctx.config.data
    if not spec:
        return None
    if "embedded" in spec:
        # hash the generated rows, not just the config: a change to the world's code must re-run stages
        rows = world_fingerprint(ctx.world, spec["embedded"])
        return {"embedded": spec, "world": to_plain(ctx.world.config), "rows": rows}
    paths = [spec.get("path")] + [m.get("path") for m in spec.get("mixture", [])]
    out = {"spec": spec}  # a `from:` component is an upstream stage: its manifest hash is fingerprinted
    for m in spec.get("mixture", []):
        if "embedded" in m:
            out[f"embedded:{m['embedded']}"] = world_fingerprint(ctx.world, m["embedded"])
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
LATER_OPTION_DEFAULTS = {"cut_off_pairs": True}


def result_config(config: dict) -> dict:
    """A stage's plain config without the settings that cannot change its result (RESULT_NEUTRAL_*, and
    LATER_OPTION_DEFAULTS at their defaults)."""
    out = {k: v for k, v in config.items() if k not in RESULT_NEUTRAL_KEYS
           and not (k in LATER_OPTION_DEFAULTS and v == LATER_OPTION_DEFAULTS[k])}
    if "gates" in out:  # re-checked on the recorded metrics, never re-trained for ([]: what stages without
        out["gates"] = []  # gates were fingerprinted with, so they keep their fingerprint)
    if isinstance(out.get("trainer"), dict):
        out["trainer"] = {k: v for k, v in out["trainer"].items() if k not in RESULT_NEUTRAL_TRAINER_KEYS}
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
    }
    for upstream in recipe.upstream(ctx.name):
        up_dir = recipe.stage_dir(upstream)
        parts[f"upstream:{upstream}"] = runs.manifest_hash(up_dir) if runs.is_complete(up_dir) else "incomplete"
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


def run_stage(recipe: Recipe, name: str, force: bool = False, restart: bool = False,
              keep: int = stage_versions.DEFAULT_KEEP) -> dict:
    """Run one stage (its upstream stages must be complete). Returns its manifest.

    A complete stage is never deleted by a re-run: the new attempt trains in `.next/<stage>` and is
    swapped in when complete (stage_versions)."""
    ctx = make_context(recipe, name, resume=not restart)
    cfg = ctx.config
    stage_dir = ctx.dir
    for upstream in recipe.upstream(name):
        runs.require_complete(recipe.stage_dir(upstream), needed_by=name)
    main = distributed.is_main_process()  # with several processes only the main one writes the folder
    if main and (done := stage_versions.settle(stage_dir, keep)):  # a swap cut short by a kill
        log(f"stage {name}: {done}")
    distributed.barrier()
    fingerprint, parts = stage_fingerprint(ctx)
    old = runs.read_manifest(stage_dir)
    if old and not force and old.get("schema") != runs.MANIFEST_SCHEMA:  # never resume, skip or delete it
        raise RunError(f"written by an incompatible alignpipe (manifest schema {old.get('schema')!r}, this version "
                       f"writes {runs.MANIFEST_SCHEMA})", where=str(stage_dir / runs.MANIFEST),
                       fix=f"move the folder away or use another runs_dir; or overwrite it: --stages {name} --force")
    action, attempt = stage_versions.plan(stage_dir, fingerprint, force=force, restart=restart,
                                          same=lambda m: same_result(m, fingerprint))
    if action == "skip":
        log(f"stage {name}: complete with the same config and inputs, skipped (use --force to re-run)")
        if (left := stage_versions.unfinished_attempt(stage_dir)) is not None:
            log(f"stage {name}: an unfinished attempt for another config is kept in "
                f"{stage_versions.next_dir(stage_dir)} (status {left.get('status')!r}); "
                f"`alignpipe discard {stage_dir}` deletes it")
        recheck_gates(recipe, name, old, main)  # gates read the recorded metrics: no training
        return old
    # the chat template, tokenizer and parents are checked before anything is deleted or trained
    template_check = check_stage_templates(ctx)
    check_lora_targets(recipe, name)  # its parent may have been built only now
    distributed.barrier()  # every process has read the old manifest before the main one changes it
    if action == "reuse":
        log(f"stage {name}: version {attempt.name} in its history has the same config and inputs; restored "
            "it instead of training")
        if main:
            replaced = stage_versions.restore(stage_dir, int(attempt.name))
            stage_versions.prune(stage_dir, keep)
            log(f"stage {name}: version {replaced} moved into the history")
        distributed.barrier()
        restored = runs.read_manifest(stage_dir)
        recheck_gates(recipe, name, restored, main)
        return restored
    ctx.dir = attempt
    if attempt != stage_dir:
        log(f"stage {name}: version {stage_versions.version_of(old)} stays in place until the new one is complete; "
            f"training it in {attempt}")
    starting_over = action == "fresh"
    if starting_over and (attempt.exists() or attempt != stage_dir):
        why = "--force" if force else "--restart" if restart else _why_changed(old, parts)
        log(f"stage {name}: starting over ({why})")
        if main and attempt.exists():  # never the complete current version (stage_versions.plan)
            shutil.rmtree(attempt)
    elif action == "resume":
        log(f"stage {name}: resuming an interrupted run (status {runs.read_manifest(attempt).get('status')!r})")

    from transformers import set_seed

    set_seed(recipe.seed)
    parent_manifest = runs.read_manifest(ctx.parent_dir) if ctx.parent_dir else None
    run = runs.StageRun(attempt, {
        "stage": name,
        "kind": cfg.kind,
        "status": "running",
        "version": (stage_versions.version_of(runs.read_manifest(attempt)) if action == "resume"
                    else stage_versions.new_version(stage_dir)),
        "recipe": str(recipe.path),
        "resolved_config": to_plain(cfg),
        "recipe_settings": {"name": recipe.name, "seed": recipe.seed, "model": to_plain(recipe.model),
                            "chat_template": recipe.chat_template, "world": recipe.world},
        "parent": ({"stage": cfg.from_, "path": cfg.from_,  # relative to the run folder, which can move
                    "manifest_sha256": runs.manifest_hash(ctx.parent_dir)} if ctx.parent_dir else None),
        "base_model": ctx.base_model_ref(),
        "fingerprint": fingerprint,
        "inputs": parts,
        "seed": recipe.seed,
        "versions": runs.versions(),
        "git_revision": runs.git_revision(),
        "trust_remote_code": recipe.model.trust_remote_code,
        "lineage": ([*parent_manifest.get("lineage", []), cfg.from_] if parent_manifest else []),
        "template_check": template_check,
        "world_size": distributed.world_size(),
    }, earlier_wall_time_s=0.0 if starting_over else float((runs.read_manifest(attempt) or {}).get("wall_time_s") or 0))
    log(f"stage {name} ({cfg.kind}): running -> {attempt}")
    t0 = time.time()
    trackers = tracking.StageRuns({})
    try:
        if main:
            run.start()
        distributed.barrier()
        with progress.stage_log(attempt / "stage.log"):  # per-step rows and library warnings: the file
            trackers = tracking.start(ctx, tracking.lineage(ctx, (run.data["parent"] or {}).get("manifest_sha256"),
                                                            fingerprint, run.data["git_revision"]))
            metrics = stage_module(cfg.kind).run(ctx)
        results = gates.evaluate_gates(recipe, name, metrics)
        trackers.summary({**metrics, **tracking.gate_metrics(results)})  # the manifest's figures, in the same run
        trackers.finish(failed=any(not row["passed"] for row in results))
        if main:
            gates.write_results(attempt, results)
            run.finish(metrics, outputs=output_fingerprints(ctx))
    except KeyboardInterrupt as err:  # Ctrl-C: say where it stopped and how to go on, then stop
        trackers.finish(failed=True)
        hint = interrupted_hint(ctx, err)
        log(f"stage {name}: {hint}")
        if main:
            run.fail(hint, status="interrupted")
        if attempt != stage_dir:
            log(f"stage {name}: the current version {stage_dir} is untouched; the new attempt is kept in {attempt}")
        raise
    except BaseException as err:  # record the failure, then let it propagate
        trackers.finish(failed=True)
        if main:
            _record_failure(run, attempt, err)
        if attempt != stage_dir:
            log(f"stage {name}: the current version {stage_dir} is untouched; the new attempt is kept in "
                f"{attempt}: run the same command again (without --force) to resume it, or "
                f"`alignpipe discard {stage_dir}` to delete it")
        raise stage_versions.storage_error(err, name, attempt, stage_dir) or err
    if main and attempt != stage_dir:
        stage_versions.promote(attempt, stage_dir, keep)  # one rename: the new version replaces the old
        log(f"stage {name}: version {run.data['version']} swapped in; version {stage_versions.version_of(old)} "
            f"kept in {stage_versions.history_root(stage_dir)} (`alignpipe restore {stage_dir} "
            f"{stage_versions.version_of(old)}` brings it back)")
    ctx.dir = stage_dir
    distributed.barrier()  # the next stage (on any process) starts from what was just saved
    log(f"stage {name}: complete in {time.time() - t0:.1f}s")
    for row in results:
        log(f"gate {'passed' if row['passed'] else 'MISSED'}: {gates.describe(name, row)}")
    gates.raise_if_missed(name, results, stage_dir)  # stop here: later stages build on this one
    return runs.read_manifest(stage_dir) or run.data


def recheck_gates(recipe: Recipe, name: str, manifest: dict, main: bool) -> None:
    """Check a complete stage's gates (the recipe's, as they are now) against its recorded metrics."""
    stage_dir = recipe.stage_dir(name)
    results = gates.evaluate_gates(recipe, name, manifest.get("metrics") or {})
    if results != gates.recorded(stage_dir):
        if main:
            gates.write_results(stage_dir, results)
        for row in results:
            log(f"gate {'passed' if row['passed'] else 'MISSED'} (re-checked on the recorded metrics): "
                f"{gates.describe(name, row)}")
    gates.raise_if_missed(name, results, stage_dir)  # a missed gate still fails the run


def _record_failure(run: runs.StageRun, attempt: Path, err: BaseException) -> None:
    """Mark the attempt failed, with its traceback; on a full or read-only disk this may fail too."""
    try:
        run.fail(f"{type(err).__name__}: {err}")
        (attempt / "error.txt").write_text(traceback.format_exc())
    except OSError:
        pass


def interrupted_hint(ctx: StageContext, err: KeyboardInterrupt) -> str:
    """"interrupted at step N; re-run the same command to resume from checkpoint-M" (or to start over)."""
    from alignpipe.training import newest_checkpoint_name

    step = getattr(err, "step", None)  # training.StageInterrupted: Ctrl-C inside trainer.train
    where = f"interrupted at step {step}" if step is not None else "interrupted"
    checkpoint = newest_checkpoint_name(ctx.checkpoints_dir)
    if checkpoint is None:
        return f"{where}, before its first checkpoint; re-run the same command to start it again"
    return f"{where}; re-run the same command to resume from {checkpoint}"


def _why_changed(old: dict | None, parts: dict) -> str:
    """What differs from the folder's last run, for the "starting over" line."""
    if not old:
        return "no manifest"
    changed = changed_inputs(old.get("inputs") or {}, parts)
    if not changed:
        return "its config or inputs changed"
    more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
    return "its config or inputs changed: " + "; ".join(changed[:5]) + more


def run_recipe(recipe: Recipe, only: list[str] | None = None, force: bool = False,
               restart: bool = False, keep: int = stage_versions.DEFAULT_KEEP) -> dict[str, dict]:
    """Run `only` (default: every stage) and whatever they need, in order. Returns manifests by stage."""
    order = recipe.order(only)
    if only:
        extra = [s for s in order if s not in only]
        missing = [s for s in extra if not runs.is_complete(recipe.stage_dir(s))]
        if missing:
            log(f"building upstream stage(s) first: {', '.join(missing)} (needed by {', '.join(only)})")
    manifests = {}
    new_folder = not recipe.run_root.exists()
    try:
        with RunLock(recipe.run_root):  # one writer per run folder; refuses while another run holds it
            for i, name in enumerate(order):
                explicit = only is None or name in only
                try:
                    manifests[name] = run_stage(recipe, name, force=force and explicit,
                                                restart=restart and explicit, keep=keep)
                except gates.GateError:
                    if order[i + 1:]:  # say what the missed gate stopped
                        log(f"stage {name} missed a gate: not running {', '.join(order[i + 1:])}")
                    raise
    finally:
        distributed.destroy()  # without it, multi-process runs crashed at exit (3 of 15 here)
        _remove_if_empty(recipe.run_root, new_folder)
    return manifests


def _remove_if_empty(run_root: Path, created: bool) -> None:
    """A run refused before its first stage wrote anything leaves no run folder behind."""
    if created and distributed.is_main_process() and run_root.is_dir() and not any(run_root.iterdir()):
        run_root.rmdir()


def summary_table(manifests: dict[str, dict]) -> str:
    """A per-stage table of the headline metrics."""
    keys = ["perplexity", "unigram_perplexity", "eval_loss", "judge_pass_rate", "pairwise_accuracy",
            "onpolicy_accuracy", "implicit_accuracy", "mean_reward", "kl_to_reference", "train_loss"]
    rows = [["stage", "kind", "status", "time_s"] + keys]
    for name, m in manifests.items():
        metrics = m.get("metrics") or {}
        cells = [name, m.get("kind", ""), m.get("status", ""), f"{m.get('wall_time_s', 0):.0f}"]
        for k in keys:
            v = metrics.get(k)
            cells.append("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        rows.append(cells)
    used = [i for i in range(len(rows[0])) if i < 4 or any(r[i] != "-" for r in rows[1:])]
    rows = [[r[i] for i in used] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def assert_no_error(manifests: dict[str, dict]) -> None:
    bad = [n for n, m in manifests.items() if m.get("status") != "complete"]
    if bad:
        raise AlignpipeError(f"stage(s) not complete: {', '.join(bad)}")
