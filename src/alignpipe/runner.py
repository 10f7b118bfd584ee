"""Runs a recipe's stages in dependency order, skipping those already complete with the same inputs."""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from alignpipe import gates, progress, runs, tracking
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
    out = {"spec": spec}
    for p in filter(None, paths):
        path = Path(p) if Path(p).is_absolute() else ctx.recipe.path.parent / p
        if not path.exists():
            path = Path(p)
        out[str(p)] = runs.fingerprint_path(path) if path.exists() else "missing"
    return out


def stage_fingerprint(ctx: StageContext) -> tuple[str, dict]:
    """A hash of everything that determines a stage's result, and the parts it was made from."""
    recipe = ctx.recipe
    parts: dict[str, Any] = {
        "config": to_plain(ctx.config),
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


def run_stage(recipe: Recipe, name: str, force: bool = False, restart: bool = False) -> dict:
    """Run one stage (its upstream stages must be complete). Returns its manifest."""
    ctx = make_context(recipe, name, resume=not restart)
    cfg = ctx.config
    for upstream in recipe.upstream(name):
        runs.require_complete(recipe.stage_dir(upstream), needed_by=name)
    fingerprint, parts = stage_fingerprint(ctx)
    old = runs.read_manifest(ctx.dir)
    if old and not force and old.get("schema") != runs.MANIFEST_SCHEMA:  # never resume, skip or delete it
        raise RunError(f"written by an incompatible alignpipe (manifest schema {old.get('schema')!r}, this version "
                       f"writes {runs.MANIFEST_SCHEMA})", where=str(ctx.dir / runs.MANIFEST),
                       fix=f"move the folder away or use another runs_dir; or overwrite it: --stages {name} --force")
    if old and not force and old.get("status") == "complete" and old.get("fingerprint") == fingerprint:
        log(f"stage {name}: complete with the same config and inputs, skipped (use --force to re-run)")
        gates.raise_if_missed(name, old.get("gates") or [], ctx.dir)  # a missed gate still fails the run
        return old
    # the chat template, tokenizer and parents are checked before anything is deleted or trained
    template_check = check_stage_templates(ctx)
    check_lora_targets(recipe, name)  # its parent may have been built only now
    main = distributed.is_main_process()  # with several processes only the main one writes the folder
    distributed.barrier()  # every process has read the old manifest before the main one changes it
    if ctx.dir.exists() and (force or restart or not old or old.get("fingerprint") != fingerprint):
        why = "--force" if force else "--restart" if restart else "its config or inputs changed"
        log(f"stage {name}: starting over ({why})")
        if main:
            shutil.rmtree(ctx.dir)
    elif old:
        log(f"stage {name}: resuming an interrupted run (status {old.get('status')!r})")

    from transformers import set_seed

    set_seed(recipe.seed)
    parent_manifest = runs.read_manifest(ctx.parent_dir) if ctx.parent_dir else None
    run = runs.StageRun(ctx.dir, {
        "stage": name,
        "kind": cfg.kind,
        "status": "running",
        "recipe": str(recipe.path),
        "resolved_config": to_plain(cfg),
        "recipe_settings": {"name": recipe.name, "seed": recipe.seed, "model": to_plain(recipe.model),
                            "chat_template": recipe.chat_template, "world": recipe.world},
        "parent": ({"stage": cfg.from_, "path": str(ctx.parent_dir),
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
    })
    if main:
        run.start()
    distributed.barrier()
    log(f"stage {name} ({cfg.kind}): running -> {ctx.dir}")
    t0 = time.time()
    trackers = tracking.StageRuns({})
    try:
        with progress.stage_log(ctx.dir / "stage.log"):  # per-step rows and library warnings: the file
            trackers = tracking.start(ctx, tracking.lineage(ctx, (run.data["parent"] or {}).get("manifest_sha256"),
                                                            fingerprint, run.data["git_revision"]))
            metrics = stage_module(cfg.kind).run(ctx)
    except BaseException as err:  # record the failure, then let it propagate (KeyboardInterrupt too)
        trackers.finish(failed=True)
        if main:
            run.fail(f"{type(err).__name__}: {err}")
            (ctx.dir / "error.txt").write_text(traceback.format_exc())
        raise
    results = gates.evaluate_gates(recipe, name, metrics)
    trackers.summary({**metrics, **tracking.gate_metrics(results)})  # the manifest's figures, in the same run
    trackers.finish(failed=any(not row["passed"] for row in results))
    if main:
        run.finish(metrics, outputs=output_fingerprints(ctx), **({"gates": results} if results else {}))
    distributed.barrier()  # the next stage (on any process) starts from what was just saved
    log(f"stage {name}: complete in {time.time() - t0:.1f}s")
    for row in results:
        log(f"gate {'passed' if row['passed'] else 'MISSED'}: {gates.describe(name, row)}")
    gates.raise_if_missed(name, results, ctx.dir)  # stop here: later stages build on this one
    return run.data if main else (runs.read_manifest(ctx.dir) or run.data)


def run_recipe(recipe: Recipe, only: list[str] | None = None, force: bool = False,
               restart: bool = False) -> dict[str, dict]:
    """Run `only` (default: every stage) and whatever they need, in order. Returns manifests by stage."""
    order = recipe.order(only)
    if only:
        extra = [s for s in order if s not in only]
        missing = [s for s in extra if not runs.is_complete(recipe.stage_dir(s))]
        if missing:
            log(f"building upstream stage(s) first: {', '.join(missing)} (needed by {', '.join(only)})")
    manifests = {}
    try:
        with RunLock(recipe.run_root):  # one writer per run folder; refuses while another run holds it
            for name in order:
                explicit = only is None or name in only
                manifests[name] = run_stage(recipe, name, force=force and explicit, restart=restart and explicit)
    finally:
        distributed.destroy()  # without it, multi-process runs crashed at exit (3 of 15 here)
    return manifests


def summary_table(manifests: dict[str, dict]) -> str:
    """A per-stage table of the headline metrics."""
    keys = ["perplexity", "unigram_perplexity", "eval_loss", "judge_pass_rate", "pairwise_accuracy",
            "onpolicy_accuracy", "mean_reward", "kl_to_reference", "train_loss"]
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
