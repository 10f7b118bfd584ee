"""`alignpipe eval runs/<recipe>/<stage>`: re-run only a complete stage's evaluation (after a judge failed,
or with new judges in the recipe), or, with `--tasks`, only lm-eval tasks on its checkpoint. The
figures replace the evaluation's in the stage's manifest (its gates are checked again); stages built on
this one see a changed parent and re-run on the next `alignpipe run`."""

from __future__ import annotations

# Heavy imports (eval.policy, which imports torch) stay inside the functions that use them: the CLI starts without them.
from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.eval.lm_eval import run_lm_eval
from alignpipe.models.loading import device, load_stage_model, load_tokenizer
from alignpipe.models.template_checks import add_stop_token
from alignpipe.pipeline import gates
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.schema import LmEvalSpec
from alignpipe.runfolder import manifests as runs
from alignpipe.runfolder.files import write_json_atomic
from alignpipe.runtime.threads import set_threads
from alignpipe.stages.context import make_context


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="re-run a complete stage's evaluation (or lm-eval tasks: --tasks)")
    p.add_argument("stage_dir", help="a stage folder, runs/<recipe>/<stage>")
    p.add_argument("--tasks", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated lm-eval tasks to run instead of the stage's evaluation")
    p.add_argument("--include-path", default=None, help="a folder of lm-eval task YAMLs (with --tasks)")
    p.add_argument("--limit", type=int, default=None, help="examples per lm-eval task (with --tasks)")
    p.add_argument("--recipe", default=None, help="the recipe file (default: the one in the manifest)")
    p.set_defaults(func=cmd_eval)


def recipe_named_by(manifest: dict, stage_dir: Path) -> str:
    """The recipe a stage's manifest names, for `eval` without --recipe. A recipe runs the code it names
    (verifiers, trust_remote_code), so one inside the run folder, which came with the folder and may be anyone's,
    is refused: give --recipe to say that you mean it."""
    from alignpipe.errors import RunError
    from alignpipe.runfolder.versions import run_root_of

    named = manifest.get("recipe") or ""
    root = run_root_of(stage_dir).resolve()
    path = Path(named).resolve() if named else None
    if path is None or path == root or root in path.parents:
        raise RunError(f"the manifest names {'no recipe' if not named else f'the recipe {named}, inside the run folder'}"
                       "; a recipe runs the code it names, so it is not taken from a run folder",
                       where=str(Path(stage_dir) / "manifest.json"),
                       fix="give the recipe that produced the stage with --recipe RECIPE.yaml")
    return named


def cmd_eval(args) -> int:
    stage_dir = Path(args.stage_dir)
    manifest = runs.read_manifest(stage_dir)
    if manifest is None or manifest.get("status") != "complete":
        raise RunError("not a complete stage folder", where=str(stage_dir),
                       fix="give runs/<recipe>/<stage> of a stage that completed (alignpipe run RECIPE first)")
    recipe = load_recipe(args.recipe or recipe_named_by(manifest, stage_dir))
    name = manifest["stage"]
    if name not in recipe.stages or Path(recipe.stage_dir(name)).resolve() != stage_dir.resolve():
        raise RunError(f"the recipe has no stage {name!r} writing to this folder", where=str(recipe.path),
                       fix="give the recipe that produced it with --recipe")
    set_threads()
    from alignpipe.eval.policy import evaluate_stage

    ctx = make_context(recipe, name)
    tokenizer = load_tokenizer(ctx.model_dir, recipe.model)
    policy = load_stage_model(ctx.dir, recipe.model).to(device()).eval()
    if args.tasks:
        base = ctx.config.eval.lm_eval or LmEvalSpec()
        spec = LmEvalSpec(tasks=args.tasks, include_path=args.include_path or base.include_path,
                          data_files=base.data_files, limit=args.limit if args.limit is not None else base.limit,
                          num_fewshot=base.num_fewshot, batch_size=base.batch_size, max_gen_toks=base.max_gen_toks)
        figures = run_lm_eval(ctx, policy, tokenizer, spec)
    else:
        add_stop_token(policy, tokenizer.eos_token_id)
        # aligned stages are compared with their start (the parent), as when they were trained
        reference = ctx.load_model().to(device()).eval() if ctx.parent_dir and ctx.kind.aligned else None
        figures = evaluate_stage(ctx, policy, tokenizer, reference)
    metrics = {**(manifest.get("metrics") or {}), **figures}
    if figures.get("eval_status") == "complete":
        metrics.pop("eval_error", None)  # the failure this run repaired
    results = gates.evaluate_gates(recipe, name, metrics)
    manifest["metrics"] = metrics
    if results:
        manifest["gates"] = results
    write_json_atomic(stage_dir / runs.MANIFEST, manifest)
    print(f"stage {name}: evaluation {metrics.get('eval_status', 'complete')}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float))[:600])
    gates.raise_if_missed(name, results, stage_dir)
    return 0 if metrics.get("eval_status") != "failed" else 1
