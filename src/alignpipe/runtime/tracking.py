"""Experiment trackers: the recipe's `tracking:` list (tensorboard by default; mlflow, wandb, trackio).

Each stage is one tracker run, started by alignpipe before the stage trains, with the stage's lineage
(recipe, stage, kind, parent, the parent's manifest hash, the stage's fingerprint, seed, git revision)
as its config / tags. The TRL / transformers trainers are handed the same list as `report_to`, and
their callbacks log into that open run; what alignpipe measures itself (PPO's per-update rows, the
shared evaluation's figures, gates) is logged to it under the manifest's metric names, at the end of
the stage with the manifest's values. Nothing from the environment (API keys, tokens) is logged.

Where runs go: MLflow to `MLFLOW_TRACKING_URI`, else a local file store `runs/<recipe>/mlruns`;
W&B to its project `WANDB_PROJECT` (default: the recipe's name), files under the stage folder
(`WANDB_MODE=offline` works without an account); trackio to its local database, project = recipe.
"""

from __future__ import annotations

# Heavy imports (mlflow, wandb, trackio) stay inside the functions that use them: the CLI starts without them.
import importlib.util
import logging
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any

from alignpipe.errors import RecipeError
from alignpipe.runtime.distributed import is_main_process
from alignpipe.runtime.progress import verbose

# tracker -> (the Python module it needs, the alignpipe extra that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}
DEFAULT_TRACKING = ["tensorboard"]


def check_tracking(recipe, where: str) -> None:
    """Each tracker is known and its package importable: said by `validate`, before anything trains."""
    for i, name in enumerate(recipe.tracking):
        if name not in TRACKERS:
            raise RecipeError(f"unknown tracker {name!r}", where=where, key=f"tracking[{i}]",
                              fix=f"use one or more of {', '.join(TRACKERS)} (or an empty list: none)")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise RecipeError(f"tracker {name!r} needs the {module} package, which is not installed", where=where,
                              key=f"tracking[{i}]", fix=f"pip install 'alignpipe[{extra}]'")


def report_to(recipe) -> list[str]:
    """What the trainers' `report_to` gets: the recipe's trackers (transformers spells them the same)."""
    return list(recipe.tracking)


def lineage(ctx, parent_manifest_sha256: str | None, fingerprint: str, git_revision: str | None) -> dict[str, Any]:
    """The tracker run's config / tags: where the stage sits, never anything from the environment."""
    return {"recipe": ctx.recipe.name, "recipe_file": str(ctx.recipe.path), "stage": ctx.name,
            "kind": ctx.config.kind, "parent": ctx.config.from_ or "", "parent_manifest_sha256":
            parent_manifest_sha256 or "", "fingerprint": fingerprint, "seed": ctx.recipe.seed,
            "git_revision": git_revision or ""}


def numeric(metrics: dict) -> dict[str, float]:
    """The figures a tracker can plot: numbers (booleans as 0/1); names as in the manifest."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Number) and v == v}


def gate_metrics(results: list[dict]) -> dict[str, float]:
    """A stage's gate results as figures: `gate/<i>` is 1 when gate i passed, `gates_missed` counts the rest."""
    out = {f"gate/{i}": float(bool(row.get("passed"))) for i, row in enumerate(results)}
    if results:
        out["gates_missed"] = float(sum(not row.get("passed") for row in results))
    return out


@dataclass
class StageRuns:
    """The open tracker runs of the stage running now (main process only)."""

    handles: dict[str, Any]

    def log(self, metrics: dict, step: int | None = None) -> None:
        values = numeric(metrics)
        if not values:
            return
        for name, handle in self.handles.items():
            if name == "mlflow":
                handle.log_metrics(values, step=step)
            elif name == "wandb":  # W&B drops rows whose step is below its own counter: the step goes as a value
                handle.log({**values, **({"train/global_step": step} if step is not None else {})})
            elif name == "trackio":
                handle.log(values, step=step)

    def summary(self, metrics: dict) -> None:
        """The stage's closing figures, as in its manifest."""
        values = numeric(metrics)
        if "trackio_reopen" in self.handles:
            self.handles.pop("trackio_reopen")()
        if "wandb" in self.handles and values:
            self.handles["wandb"].summary.update(values)
        step = int(metrics.get("global_step") or metrics.get("updates") or 0) or None
        self.log(values, step=step)

    def finish(self, failed: bool = False) -> None:
        self.handles.pop("trackio_reopen", None)
        for name, handle in self.handles.items():
            if name == "mlflow":
                handle.end_run(status="FAILED" if failed else "FINISHED")
            elif name == "wandb":
                handle.finish(exit_code=1 if failed else 0)
            elif name == "trackio":
                handle.finish()
        self.handles = {}  # finished once: a later failure does not end the runs again
        _ACTIVE.clear()


_ACTIVE: list[StageRuns] = []


_SAID: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)


def mlflow_read_back(uri: str, experiment: str) -> str:
    """How to read alignpipe's local MLflow store with MLflow's own client: MLflow 3 opens a file store only
    with MLFLOW_ALLOW_FILE_STORE=true (alignpipe sets it for its own writes; a new shell does not have it)."""
    return (f"[alignpipe] mlflow: runs in the file store {uri}; MLflow 3 reads a file store only with "
            f"MLFLOW_ALLOW_FILE_STORE=true: MLFLOW_ALLOW_FILE_STORE=true python -c \"import mlflow; "
            f"mlflow.set_tracking_uri('{uri}'); print(mlflow.search_runs(experiment_names=['{experiment}']))\" "
            "(or set MLFLOW_TRACKING_URI to your server or database before the run)")


def start(ctx, config: dict[str, Any]) -> StageRuns:
    """Open one run per tracker for the stage (none for tensorboard: its files are the stage's `logs/`)."""
    handles: dict[str, Any] = {}
    wanted = [t for t in ctx.recipe.tracking if t != "tensorboard"] if is_main_process() else []
    if "mlflow" in wanted:
        import mlflow

        if not verbose():  # its INFO lines ("creating experiment ...") are not the console's business
            logging.getLogger("mlflow").setLevel(logging.WARNING)

        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or ctx.recipe.name
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database otherwise
            os.environ["MLFLOW_TRACKING_URI"] = (ctx.recipe.run_root / "mlruns").resolve().as_uri()
            _say_once(mlflow_read_back(os.environ["MLFLOW_TRACKING_URI"], experiment))
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(experiment)
        mlflow.start_run(run_name=ctx.name, tags={k: str(v) for k, v in config.items()})
        handles["mlflow"] = mlflow
    if "wandb" in wanted:
        import wandb

        ctx.dir.mkdir(parents=True, exist_ok=True)

        # W&B's own console lines (its run summary) only with -v; it never wraps alignpipe's console
        settings = wandb.Settings(silent=not verbose(), console="off", x_disable_stats=True)
        handles["wandb"] = wandb.init(project=os.environ.get("WANDB_PROJECT") or ctx.recipe.name, name=ctx.name,
                                      group=ctx.recipe.name, job_type=ctx.config.kind, config=config,
                                      tags=[ctx.config.kind], dir=str(ctx.dir), reinit="finish_previous",
                                      settings=settings)
    if "trackio" in wanted:
        import trackio

        # transformers' TrackioCallback re-opens this run (same project and name, resume="allow") and closes
        # it when training ends; `reopen` opens it again for the stage's closing figures
        trackio.init(project=ctx.recipe.name, name=ctx.name, config=config, resume="allow")
        handles["trackio"] = trackio
        handles["trackio_reopen"] = lambda: trackio.init(project=ctx.recipe.name, name=ctx.name, resume="allow")
    runs = StageRuns(handles)
    _ACTIVE[:] = [runs]
    return runs


def log_metrics(metrics: dict, step: int | None = None) -> None:
    """From a stage alignpipe drives itself (PPO): a row to the stage's tracker runs, if any are open."""
    for runs in _ACTIVE:
        runs.log(metrics, step)
