"""Standard benchmarks through lm-evaluation-harness (`pip install alignpipe[lmeval]`): its `HFLM` on a
stage's checkpoint (a LoRA stage merged onto its base first), tasks found in the recipe's `include_path`
and in alignpipe's own task folder (`gsm8k_local`: GSM8K-style files, pointed at the user's copy with
`data_files`), offline. Results go to the manifest as `lm_eval: {task: {metric: value}}` and, for gates,
as flat names `lmeval_<task>_<metric>` (filter names appended, non-word characters as `_`)."""

from __future__ import annotations

# Heavy imports (lm_eval, transformers) stay inside the functions that use them: the CLI starts without them.
import importlib.util
import re
import tempfile
from pathlib import Path

import yaml

from alignpipe.errors import EvalError, RecipeError
from alignpipe.eval.prompts import resolve
from alignpipe.models.loading import device, load_stage_model

SHIPPED_TASKS = Path(__file__).parent / "tasks"


def require_lm_eval(where: str = "", key: str = "lm_eval") -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError("lm-eval is not installed", where=where, key=key,
                          fix="pip install 'alignpipe[lmeval]' (lm-eval==0.4.13)")


def flat_name(task: str, metric: str) -> str:
    return "lmeval_" + re.sub(r"\W+", "_", f"{task}_{metric}").strip("_")


def task_folder(spec, recipe_path: Path, workdir: Path) -> list[str]:
    """Folders lm-eval searches: the recipe's `include_path`, and copies of the shipped tasks whose
    `data_files` point at the files the recipe names."""
    folders = [str(resolve(spec.include_path, recipe_path))] if spec.include_path else []
    for task, file in spec.data_files.items():
        shipped = SHIPPED_TASKS / f"{task}.yaml"
        if not shipped.is_file():
            raise EvalError(f"no shipped lm-eval task {task!r} to point at {file}", key="eval.lm_eval.data_files",
                            fix=f"use one of {', '.join(p.stem for p in SHIPPED_TASKS.glob('*.yaml'))}")
        config = yaml.safe_load(shipped.read_text())
        config.setdefault("dataset_kwargs", {})["data_files"] = {config.get("test_split", "test"):
                                                                 str(resolve(file, recipe_path).resolve())}
        (workdir / shipped.name).write_text(yaml.safe_dump(config, sort_keys=False))
    if not spec.data_files:
        folders.append(str(SHIPPED_TASKS))
    else:
        folders.append(str(workdir))
    return folders


def run_lm_eval(ctx, model, tokenizer, spec, tasks: list[str] | None = None) -> dict:
    """Run `tasks` (default: the spec's) on `model` (or, when it is not a plain transformers model, the
    stage's saved checkpoint merged) and return the manifest's figures."""
    require_lm_eval(str(ctx.recipe.path), f"stages.{ctx.name}.eval.lm_eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # a peft wrapper: the saved stage, merged onto its base

        model = load_stage_model(ctx.dir, ctx.recipe.model).to(device())
    model.eval()
    tasks = list(tasks or spec.tasks)
    with tempfile.TemporaryDirectory(prefix="alignpipe-lmeval-") as tmp:
        manager = TaskManager(include_path=task_folder(spec, ctx.recipe.path, Path(tmp)), include_defaults=False)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise EvalError(f"unknown lm-eval task {unknown[0]!r}", key=f"stages.{ctx.name}.eval.lm_eval.tasks",
                            fix="define it in a YAML under lm_eval.include_path (dataset_path: json + data_files), "
                                "or use a shipped one: " + ", ".join(p.stem for p in SHIPPED_TASKS.glob("*.yaml")))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=spec.num_fewshot, limit=spec.limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0,
                                      gen_kwargs={"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else None,
                                      random_seed=ctx.seed, numpy_random_seed=ctx.seed, torch_random_seed=ctx.seed,
                                      fewshot_random_seed=ctx.seed)
    results: dict[str, dict[str, float]] = {}
    for task, row in (out or {}).get("results", {}).items():
        results[task] = {k: float(v) for k, v in row.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
    metrics: dict = {"lm_eval": results}
    for task, row in results.items():
        for metric, value in row.items():
            metrics[flat_name(task, metric)] = value
    return metrics
