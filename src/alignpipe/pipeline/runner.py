"""Runs a recipe's stages in dependency order, skipping those already complete with the same inputs."""

from __future__ import annotations

# Heavy imports (transformers) stay inside the functions that use them: the CLI starts without them.
import shutil
import sys
import time
import traceback
from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.pipeline import gates, plan as stage_plan, processes as stage_processes
from alignpipe.pipeline.plan import StagePlan, output_fingerprints
from alignpipe.pipeline.stage_templates import check_stage_templates
from alignpipe.pipeline.validate import check_lora_targets
from alignpipe.recipe.schema import Recipe
from alignpipe.runfolder import manifests as runs, versions as stage_versions
from alignpipe.runfolder.headline import HEADLINE_METRICS, with_count
from alignpipe.runfolder.lock import RunLock
from alignpipe.runtime import distributed, progress, tracking
from alignpipe.stages.context import StageContext
from alignpipe.stages.training import newest_checkpoint_name


def log(msg: str) -> None:
    if not distributed.is_main_process():  # one copy of the log, not one per process
        return
    print(f"[alignpipe] {msg}", file=sys.stderr, flush=True)


def run_stage(recipe: Recipe, name: str, force: bool = False, restart: bool = False,
              keep: int = stage_versions.DEFAULT_KEEP) -> dict:
    """Run one stage (its upstream stages must be complete). Returns its manifest.

    A complete stage is never deleted by a re-run: the new attempt trains in `.next/<stage>` and is
    swapped in when complete (stage_versions)."""
    waits_for = set(recipe.evaluated_with(name)) & stage_processes.built_beside()  # built by a sibling process
    for upstream in recipe.upstream(name):
        if upstream not in waits_for:  # those are waited for before evaluating
            runs.require_complete(recipe.stage_dir(upstream), needed_by=name)
    main = distributed.is_main_process()  # with several processes only the main one writes the folder
    stage_dir = recipe.stage_dir(name)
    for kept, problem in stage_versions.set_aside_unreadable(stage_dir) if main else []:  # never deleted
        log(f"stage {name}: {problem}; the folder is kept whole in {kept} and the stage is built again")
    distributed.barrier()
    if main and (done := stage_versions.settle(stage_dir, keep)):  # a swap cut short by a kill
        log(f"stage {name}: {done}")
    distributed.barrier()
    decided = stage_plan.plan(recipe, name, force=force, restart=restart)
    if waits_for:
        decided.ctx.await_stage = _awaiter(recipe, decided)
    if decided.action == "skip":
        return _skip(recipe, name, decided.old, main)
    # the chat template, tokenizer and parents are checked before anything is deleted or trained
    template_check = check_stage_templates(decided.ctx)
    check_lora_targets(recipe, name)  # its parent may have been built only now
    distributed.barrier()  # every process has read the old manifest before the main one changes it
    if decided.action == "reuse":
        return _reuse(recipe, name, decided.attempt, keep, main)
    _open_attempt(decided, name, force, restart, main)
    from transformers import set_seed  # heavy: imported when a stage trains

    set_seed(recipe.seed)
    attempt = decided.attempt
    run = runs.StageRun(attempt, decided.first_record(template_check), earlier_wall_time_s=decided.earlier_wall_time_s)
    log(f"stage {name} ({decided.ctx.config.kind}): running -> {attempt}")
    t0 = time.time()
    results = _train(decided, run, main)
    _swap_in(decided, run, keep, main)
    distributed.barrier()  # the next stage (on any process) starts from what was just saved
    log(f"stage {name}: complete in {time.time() - t0:.1f}s")
    for row in results:
        log(f"gate {'passed' if row['passed'] else 'MISSED'}: {gates.describe(name, row)}")
    gates.raise_if_missed(name, results, stage_dir)  # stop here: later stages build on this one
    return runs.read_manifest(stage_dir) or run.data


def _awaiter(recipe: Recipe, decided: StagePlan):
    """`ctx.await_stage` for a stage evaluated with stages its siblings build: waits for the versions it planned
    with (the fingerprints in its own inputs); other stages are not waited for."""
    name = decided.ctx.name

    def await_stage(scorer: str) -> None:
        if f"evaluated_with:{scorer}" in decided.inputs:
            stage_processes.wait_until_built(recipe, scorer, decided.inputs[f"evaluated_with:{scorer}"], name, log)

    return await_stage


def _skip(recipe: Recipe, name: str, old: dict, main: bool) -> dict:
    """A complete stage with the same config and inputs: its gates are checked again, nothing is trained."""
    stage_dir = recipe.stage_dir(name)
    log(f"stage {name}: complete with the same config and inputs, skipped (use --force to re-run)")
    if (left := stage_versions.unfinished_attempt(stage_dir)) is not None:
        log(f"stage {name}: an unfinished attempt for another config is kept in "
            f"{stage_versions.next_dir(stage_dir)} (status {left.get('status')!r}); "
            f"`alignpipe discard {stage_dir}` deletes it")
    recheck_gates(recipe, name, old, main)  # gates read the recorded metrics: no training
    return old


def _reuse(recipe: Recipe, name: str, attempt: Path, keep: int, main: bool) -> dict:
    """A version in the stage's history has the same config and inputs: it is restored instead of trained."""
    stage_dir = recipe.stage_dir(name)
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


def _open_attempt(decided: StagePlan, name: str, force: bool, restart: bool, main: bool) -> None:
    """The folder the stage trains in: the stage's own, or `.next/<stage>` beside a complete version; a fresh
    start clears what an earlier attempt left there."""
    ctx, attempt, old = decided.ctx, decided.attempt, decided.old
    stage_dir = ctx.recipe.stage_dir(name)
    ctx.dir = attempt
    if attempt != stage_dir:
        log(f"stage {name}: version {stage_versions.version_of(old)} stays in place until the new one is complete; "
            f"training it in {attempt}")
    if decided.action == "fresh" and (attempt.exists() or attempt != stage_dir):
        log(f"stage {name}: starting over ({decided.why_fresh(force, restart)})")
        if main and attempt.exists():  # never the complete current version (stage_versions.plan)
            shutil.rmtree(attempt)
    elif decided.action == "resume":
        log(f"stage {name}: resuming an interrupted run (status {decided.attempt_manifest.get('status')!r})")


def _train(decided: StagePlan, run: runs.StageRun, main: bool) -> list[dict]:
    """The stage's kind trains it, under its log file and trackers; its gates are evaluated and the manifest is
    finished. A failure (Ctrl-C included) is recorded in the attempt's manifest, then raised. Returns the gates."""
    ctx, attempt, name = decided.ctx, decided.attempt, decided.ctx.name
    stage_dir = ctx.recipe.stage_dir(name)
    trackers = tracking.StageRuns({})
    try:
        if main:
            run.start()
        distributed.barrier()
        with progress.stage_log(attempt / "stage.log"):  # per-step rows and library warnings: the file
            trackers = tracking.start(ctx, tracking.lineage(ctx, (run.data["parent"] or {}).get("manifest_sha256"),
                                                            decided.fingerprint, run.data["git_revision"]))
            metrics = ctx.kind.run(ctx)
        results = gates.evaluate_gates(ctx.recipe, name, metrics)
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
        raise stage_versions.storage_error(err, name, attempt, stage_dir) or refused_checkpoint(err, name, attempt) \
            or err
    return results


def _swap_in(decided: StagePlan, run: runs.StageRun, keep: int, main: bool) -> None:
    """A new version trained beside the complete one replaces it in one rename; the old one goes to the history."""
    ctx, attempt, old = decided.ctx, decided.attempt, decided.old
    stage_dir = ctx.recipe.stage_dir(ctx.name)
    if main and attempt != stage_dir:
        stage_versions.promote(attempt, stage_dir, keep)  # one rename: the new version replaces the old
        log(f"stage {ctx.name}: version {run.data['version']} swapped in; version {stage_versions.version_of(old)} "
            f"kept in {stage_versions.history_root(stage_dir)} (`alignpipe restore {stage_dir} "
            f"{stage_versions.version_of(old)}` brings it back)")
    ctx.dir = stage_dir


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


def refused_checkpoint(err: BaseException, name: str, attempt: Path) -> RunError | None:
    """A checkpoint file that weights-only loading refuses (it pickles Python objects: damaged, or not written
    by this training) is one line saying how to go on without it, not a traceback."""
    import pickle

    if not isinstance(err, pickle.UnpicklingError):
        return None
    reason = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err).splitlines()[0])[:160]
    return RunError(f"stage {name!r} cannot resume: a checkpoint file holds pickled Python objects that loading "
                    f"refuses ({reason.strip()})", where=str(attempt / "checkpoints"),
                    fix=f"start the stage over without its checkpoints: alignpipe run RECIPE --stages {name} --restart")


def _record_failure(run: runs.StageRun, attempt: Path, err: BaseException) -> None:
    """Mark the attempt failed, with its traceback; on a full or read-only disk this may fail too."""
    try:
        run.fail(f"{type(err).__name__}: {err}")
        (attempt / "error.txt").write_text(traceback.format_exc())
    except OSError:
        pass


def interrupted_hint(ctx: StageContext, err: KeyboardInterrupt) -> str:
    """"interrupted at step N; re-run the same command to resume from checkpoint-M" (or to start over)."""
    step = getattr(err, "step", None)  # training.StageInterrupted: Ctrl-C inside trainer.train
    where = f"interrupted at step {step}" if step is not None else "interrupted"
    checkpoint = newest_checkpoint_name(ctx.checkpoints_dir)
    if checkpoint is None:
        return f"{where}, before its first checkpoint; re-run the same command to start it again"
    return f"{where}; re-run the same command to resume from {checkpoint}"


def run_recipe(recipe: Recipe, only: list[str] | None = None, force: bool = False,
               restart: bool = False, keep: int = stage_versions.DEFAULT_KEEP, parallel: int = 1,
               overrides: list[str] | None = None) -> dict[str, dict]:
    """Run `only` (default: every stage) and whatever they need, in order. Returns manifests by stage.

    With `parallel` > 1 (one process, not under torchrun), up to that many lanes of stages run at a time, each
    in a process of its own (stage_processes: a stage starts once the stages it trains from are complete, and
    waits for those that only score its evaluation); `overrides` are the `--set` items those processes need to
    read the same recipe."""
    order = [s for s in recipe.order(only) if s not in stage_processes.built_beside()]  # siblings build those
    if only:
        extra = [s for s in order if s not in only]
        missing = [s for s in extra if not runs.is_complete(recipe.stage_dir(s))]
        if missing:
            log(f"building upstream stage(s) first: {', '.join(missing)} (needed by {', '.join(only)})")
    explicit = set(only or order)
    if distributed.world_size() > 1:
        parallel = 1  # the ranks of one run train one stage together
    new_folder = not recipe.run_root.exists()
    try:
        with RunLock(recipe.run_root):  # one writer per run folder; refuses while another run holds it
            return _run_in_order(recipe, order, explicit if force else set(), explicit if restart else set(), keep,
                                 parallel, overrides or [])
    finally:
        distributed.destroy()  # without it, multi-process runs crashed at exit (3 of 15 here)
        _remove_if_empty(recipe.run_root, new_folder)


def _run_in_order(recipe: Recipe, order: list[str], force: set[str], restart: set[str], keep: int, parallel: int,
                  overrides: list[str]) -> dict[str, dict]:
    """Run `order`'s stages, each group of lanes when its upstream stages are done (`stage_processes`)."""
    pending, done, missed_gate, manifests = list(order), set(), None, {}
    while pending:
        lanes = stage_processes.ready_group(recipe, pending, done, parallel, force | restart)
        group = [s for lane in lanes for s in lane]
        try:
            if len(lanes) > 1:
                stage_processes.run_together(recipe, lanes, overrides, force, restart, keep, log)
                manifests.update(_manifests_of(recipe, group))
            else:
                name = group[0]
                manifests[name] = run_stage(recipe, name, force=name in force, restart=name in restart, keep=keep)
        except gates.GateError as err:  # only the stages built on the one that missed it stop
            missed_gate = missed_gate or err
            stopped = _missed_gates(recipe, group)
            manifests.update(_manifests_of(recipe, group))
            _, behind = _without_downstream(recipe, [s for s in group if s not in stopped], stopped)
            pending, skipped = _without_downstream(recipe, [s for s in pending if s not in group], stopped)
            skipped = behind + skipped
            log(f"stage {', '.join(stopped)} missed a gate: " + (f"not running {', '.join(skipped)}" if skipped
                else "no later stage depends on it") + (f"; still running {', '.join(pending)}" if pending else ""))
            done |= set(group) - set(stopped) - set(behind)
            continue
        except RunError:
            left = [s for s in pending if s not in group]
            if left:  # say what the failed stage stopped
                log(f"stage {', '.join(group)} did not complete: not running {', '.join(left)}")
            raise
        done |= set(group)
        pending = [s for s in pending if s not in group]
    if missed_gate is not None:
        raise missed_gate
    return manifests


def _manifests_of(recipe: Recipe, stages: list[str]) -> dict[str, dict]:
    """The manifests the stages' own processes wrote (a stage that did not run has none to show)."""
    return {s: m for s in stages if (m := runs.read_manifest(recipe.stage_dir(s)))}


def _missed_gates(recipe: Recipe, group: list[str]) -> list[str]:
    """The stages of `group` whose recorded gates were missed (all of the group when none is recorded)."""
    missed = [s for s in group if any(not r.get("passed") for r in gates.recorded(recipe.stage_dir(s)) or [])]
    return missed or list(group)


def _without_downstream(recipe: Recipe, pending: list[str], stopped: list[str]) -> tuple[list[str], list[str]]:
    """(`pending` without the stages that need a `stopped` one, those stages): `from:`, `reward_model:` and
    `data: {from: ...}` count, transitively (`Recipe.order`)."""
    downstream = [s for s in pending if set(stopped) & set(recipe.order([s])) - {s}]
    return [s for s in pending if s not in downstream], downstream


def _remove_if_empty(run_root: Path, created: bool) -> None:
    """A run refused before its first stage wrote anything leaves no run folder behind."""
    if created and distributed.is_main_process() and run_root.is_dir() and not any(run_root.iterdir()):
        run_root.rmdir()


def summary_table(manifests: dict[str, dict]) -> str:
    """A per-stage table of the headline metrics."""
    keys = list(HEADLINE_METRICS)
    rows = [["stage", "kind", "status", "time_s"] + keys]
    for name, m in manifests.items():
        metrics = m.get("metrics") or {}
        cells = [name, m.get("kind", ""), m.get("status", ""), f"{m.get('wall_time_s', 0):.0f}"]
        for k in keys:
            v = metrics.get(k)
            cells.append(with_count("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v), metrics, k))
        rows.append(cells)
    used = [i for i in range(len(rows[0])) if i < 4 or any(r[i] != "-" for r in rows[1:])]
    rows = [[r[i] for i in used] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
