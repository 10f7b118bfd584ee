"""The scaling stage: a pretraining sweep over model sizes and compute budgets, its scaling-law fits, and the
proof of the fits, a run they never saw.

1. A byte-level BPE tokenizer is trained on the corpus (the embedded world's, or the user's text files) and the
   corpus is tokenised once into `tokens.pt`; every point reads the same stream.
2. Every size (`sizes:`, each over the recipe's `model.init`) at every budget (`budgets:`, FLOPs, C = 6 N D) is a
   point (stages/sweep.py), trained in `points/<name>/`, `parallel` at a time.
3. Chinchilla's approaches 2 and 3 are fitted on the grid, with bootstrap intervals (eval/scaling.py).
4. The held-out point: at `holdout_budget` (default 2x the largest budget), the size nearest approach 2's
   compute-optimal N; its loss is predicted, with an interval, and written to `prediction.json` before it trains.
   Then it trains; the stage's model is that point's, and `scaling.json` holds every figure.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alignpipe.errors import RecipeError, RunError
from alignpipe.eval import scaling as fits
from alignpipe.models import loading as modeling
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import ModelInit, StageConfig
from alignpipe.recipe.templates import template_special_tokens
from alignpipe.runfolder.files import write_json_atomic
from alignpipe.runtime import progress
from alignpipe.stages import sweep
from alignpipe.stages.helpers import pack, rows

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext

COUNTS = ("total", "non_embedding")
LR_RULES = ("constant", "width")


@dataclass
class Config(StageConfig):
    block_size: int = 64  # tokens per packed training block
    eval_docs: int = 300  # held-out documents whose loss every point reports
    sizes: list[dict[str, Any]] = field(default_factory=list)  # each over model.init, e.g. {hidden_size: 64, ...}
    budgets: list[float] = field(default_factory=list)  # compute budgets in FLOPs (C = 6 N D)
    holdout_budget: float | None = None  # the predicted point's budget (None: 2x the largest of `budgets`)
    count: str = "total"  # the N of the fits and of C: total (Chinchilla) or non_embedding (Kaplan) parameters
    min_steps: int = 20  # a point of fewer optimizer steps is left out (and listed)
    parallel: int = 1  # points trained at a time, one process and one torch thread each when above 1
    bootstrap: int = 200  # bootstrap redraws of the fits
    seeds: int = 1  # runs per point (seeds seed .. seed + seeds - 1); the fits use their mean loss
    lr_rule: str = "constant"  # constant: trainer.learning_rate for every size; width: that rate at model.init's
    #   hidden_size, scaled by model.init.hidden_size / the size's hidden_size (muP's rule for Adam)


def trainer_config_class():
    from transformers import TrainingArguments

    return TrainingArguments


def check(recipe, name: str, where: str) -> None:
    cfg = recipe.stages[name]
    key = f"stages.{name}"
    if recipe.model.init is None:
        raise RecipeError("a scaling sweep trains from scratch: it needs `model: {init: ...}`", where=where,
                          key="model.init", fix="give model.init (the base the sizes scale), e.g. {hidden_size: 64}")
    if len(cfg.sizes) < 3 or len(cfg.budgets) < 2:
        raise RecipeError(f"a sweep needs at least 3 sizes and 2 budgets (has {len(cfg.sizes)} and "
                          f"{len(cfg.budgets)})", where=where, key=f"{key}.sizes",
                          fix="list >= 3 sizes (an IsoFLOP parabola needs 3 points) and >= 2 budgets")
    known = set(ModelInit.__dataclass_fields__)
    for i, size in enumerate(cfg.sizes):
        if not isinstance(size, dict) or not set(size) <= known:
            raise RecipeError(f"size {size!r} is not a mapping of model.init fields", where=where,
                              key=f"{key}.sizes[{i}]", fix=f"use fields of model.init: {', '.join(sorted(known))}")
    if cfg.count not in COUNTS:
        raise RecipeError(f"count {cfg.count!r} is not one of {', '.join(COUNTS)}", where=where, key=f"{key}.count",
                          fix="write total (Chinchilla's counting) or non_embedding (Kaplan's)")
    if cfg.lr_rule not in LR_RULES:
        raise RecipeError(f"lr_rule {cfg.lr_rule!r} is not one of {', '.join(LR_RULES)}", where=where,
                          key=f"{key}.lr_rule", fix="write constant (one rate) or width (rate x base width / width)")
    if not isinstance(cfg.seeds, int) or cfg.seeds < 1:
        raise RecipeError(f"seeds {cfg.seeds!r} is not a whole number >= 1", where=where, key=f"{key}.seeds",
                          fix="give the runs per point, e.g. seeds: 2")
    if "max_steps" in cfg.trainer:
        raise RecipeError("each point's steps come from its budget", where=where, key=f"{key}.trainer.max_steps",
                          fix="remove max_steps; set budgets instead")


# --- 1. the tokenizer and the token stream -----------------------------------------------------------------------


def tokenize_corpus(ctx: StageContext) -> tuple[object, dict]:
    """(tokenizer, {train, eval} block tensors), made once per attempt and kept in the stage folder."""
    import torch
    from transformers import PreTrainedTokenizerFast

    tok_dir, tokens_file = ctx.dir / sweep.TOKENIZER_DIR, ctx.dir / sweep.TOKENS_FILE
    if tokens_file.is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir)), torch.load(tokens_file, weights_only=True)
    train, held = rows(ctx, lambda world: ([{"text": t} for t in world.corpus()],
                                           [{"text": t} for t in world.corpus_eval()[: ctx.config.eval_docs]]),
                       ctx.config.eval_docs)
    train_texts, eval_texts = [r["text"] for r in train], [r["text"] for r in held]
    specials, bos = template_special_tokens(ctx.chat_template)
    tokenizer = modeling.train_tokenizer(train_texts, ctx.recipe.model.init.vocab_size, specials,
                                         ctx.chat_template or "", bos)

    def blocks(texts):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return torch.tensor(pack([d + [tokenizer.eos_token_id] for d in ids], ctx.config.block_size), dtype=torch.int64)

    tokens = {"train": blocks(train_texts), "eval": blocks(eval_texts)}
    tokenizer.save_pretrained(str(tok_dir))
    partial = tokens_file.with_suffix(".partial")
    torch.save(tokens, partial)
    partial.replace(tokens_file)  # present only when whole
    return tokenizer, tokens


# --- 2. the grid -------------------------------------------------------------------------------------------------


def learning_rate(ctx: StageContext, init: dict) -> float:
    """A size's learning rate: the recipe's, scaled by base width / width under `lr_rule: width`."""
    lr = float(ctx.config.trainer.get("learning_rate", sweep.DEFAULT_LR))
    if ctx.config.lr_rule == "width":
        lr *= ctx.recipe.model.init.hidden_size / init["hidden_size"]
    return lr


def jobs_for(ctx: StageContext, points: list[dict], tokens_per_step: int) -> list[dict]:
    """One job per point and seed; the first seed's folder is `points/<name>`, the others' `<name>-seed<i>`."""
    import torch

    base = {"stage_dir": str(ctx.dir), "block_size": ctx.config.block_size, "use_cpu": not torch.cuda.is_available(),
            "threads": None, "save_model": None, "tokens_per_step": tokens_per_step}
    jobs = []
    for p in points:
        trainer = {**ctx.config.trainer, "learning_rate": learning_rate(ctx, p["init"])}
        for i in range(ctx.config.seeds):
            run = sweep.run_name(p["name"], i)
            jobs.append({**base, **p, "trainer": trainer, "seed": ctx.seed + i, "run": run,
                         "dir": str(sweep.point_dir(ctx.dir, run))})
    return jobs


def run_grid(ctx: StageContext, points: list[dict], tokens_per_step: int) -> dict[str, list[dict]]:
    """Point name -> the manifests of its seeds' runs; complete runs are read back, the others trained now."""
    jobs = jobs_for(ctx, points, tokens_per_step)
    done = {j["run"]: sweep.read_point(ctx.dir, j["run"]) for j in jobs}
    pending = [j for j in jobs if done[j["run"]] is None]
    if len(pending) < len(jobs):
        _log(f"{len(jobs) - len(pending)} of {len(jobs)} runs ({len(points)} points x {ctx.config.seeds} seeds) "
             f"complete from an earlier attempt; {len(pending)} to train")
    for job, manifest in zip(pending, sweep.train_points(pending, ctx.config.parallel, _log)):
        done[job["run"]] = manifest
    return {p["name"]: [done[j["run"]] for j in jobs if j["name"] == p["name"]] for p in points}


def mean_of_seeds(runs: list[dict]) -> dict:
    """One point's manifest from its seeds' runs: the first run's point, the mean held-out loss, every seed's."""
    losses = [m["metrics"]["eval_loss"] for m in runs]
    loss = sum(losses) / len(losses)
    return {"status": "complete", "point": runs[0]["point"],
            "metrics": {"eval_loss": loss, "perplexity": math.exp(loss), "eval_losses": losses,
                        "seeds": [m["point"].get("seed") for m in runs],
                        "train_wall_s": sum(m["metrics"]["train_wall_s"] for m in runs)}}


def fit_points(manifests: list[dict], count: str) -> list[dict]:
    """The fits' points: n in the `count` convention, d, c = 6 n d, the nominal budget, the held-out loss (the mean
    of the point's seeds; `losses`: each seed's)."""
    out = []
    for m in manifests:
        p = m["point"]
        n = p["params"][count]
        out.append({"name": p["name"], "n": n, "d": p["d"], "c": 6 * n * p["d"], "budget": p["budget"],
                    "loss": m["metrics"]["eval_loss"], "losses": m["metrics"].get("eval_losses", []),
                    "hidden_size": p["init"]["hidden_size"],
                    "num_hidden_layers": p["init"]["num_hidden_layers"]})
    return out


# --- 3-4. the fits and the held-out point --------------------------------------------------------------------------


def choose_holdout(ctx: StageContext, sizes: list[ModelInit], vocab: int, tokens_per_step: int, n_target: float,
                   corpus_tokens: int, budget: float) -> dict:
    """The size nearest `n_target` (in log N) among those whose run at `budget` fits the corpus and min_steps."""
    options = [sweep.plan_point(budget, init, vocab, ctx.config.count, tokens_per_step) for init in sizes]
    fitting = [p for p in options if p["steps"] >= ctx.config.min_steps and p["d"] <= corpus_tokens]
    if not fitting:
        raise RunError(f"no size trains at the held-out budget {budget:.3g} within the corpus "
                             f"({corpus_tokens:,} tokens) and min_steps", where=str(ctx.recipe.path),
                             key=f"stages.{ctx.name}.holdout_budget", fix="lower holdout_budget or give more text")
    return min(fitting, key=lambda p: abs(math.log(p["n"] / n_target)))


def predict(ctx: StageContext, points: list[dict], holdout: dict) -> dict:
    """Both fits on the grid, their intervals, and the held-out point's predicted loss (read back if an earlier
    attempt already made it: the prediction is fixed before the point trains)."""
    path = ctx.dir / "prediction.json"
    if path.is_file():
        return json.loads(path.read_text())
    budget = holdout["budget"]
    summary = fits.summarise(points, holdout["c"])
    boot = fits.bootstrap(points, summary, holdout["c"], {"n": holdout["n"], "d": holdout["d"]},
                          draws=ctx.config.bootstrap, seed=ctx.seed)
    predicted = float(fits.surface_loss(summary["approach3"], holdout["n"], holdout["d"]))
    out = {"holdout": holdout, "holdout_budget": budget, "predicted_loss": predicted,
           "interval": boot["intervals"].get("loss"), "fits": summary, "bootstrap": boot}
    write_json_atomic(path, out)
    return out


def train_holdout(ctx: StageContext, holdout: dict, tokens_per_step: int) -> list[dict]:
    """The held-out point's runs (its seeds, as the grid's), each read back when complete; the first seed's model
    is the stage's model."""
    jobs = jobs_for(ctx, [holdout], tokens_per_step)
    jobs[0]["save_model"] = str(ctx.model_dir)
    done = [sweep.read_point(ctx.dir, j["run"]) for j in jobs]
    if not (ctx.model_dir / "config.json").is_file():
        done[0] = None  # the stage's model is missing: its run trains again
    pending = [j for j, m in zip(jobs, done) if m is None]
    trained = iter(sweep.train_points(pending, ctx.config.parallel, _log))
    return [m if m is not None else next(trained) for m in done]


def other_counting(manifests: list[dict], count: str, holdout_manifest: dict) -> dict:
    """Approach 3 with the other parameter counting, and its tokens per parameter at the held-out point's budget."""
    other = next(c for c in COUNTS if c != count)
    points = fit_points(manifests, other)
    surface = fits.fit_loss_surface(points)
    p = holdout_manifest["point"]
    c = 6 * p["params"][other] * p["d"]
    n_opt, d_opt = fits.surface_optimum(surface, c)
    return {"count": other, "approach3": surface, "c": c, "n_opt": n_opt, "d_opt": d_opt,
            "tokens_per_param": d_opt / n_opt}


def recipe_line(point: dict, batch: int, block_size: int) -> dict:
    """The held-out (compute-optimal) size as a pipeline's `model.init`, with its pretraining steps."""
    init = point["init"]
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    fields = ", ".join(f"{k}: {init[k]}" for k in keys)
    tokens_per_step = batch * block_size
    steps = point["d"] // tokens_per_step
    sets = " ".join(f"--set model.init.{k}={init[k]}" for k in keys)
    lr = f" --set stages.pretrain.trainer.learning_rate={point['learning_rate']:.3g}" if "learning_rate" in point else ""
    return {"yaml": f"model: {{init: {{{fields}}}}}", "pretrain_steps": steps, "tokens_per_step": tokens_per_step,
            "command": f"alignpipe run recipes/default.yaml {sets} --set stages.pretrain.trainer.max_steps={steps}{lr} "
                       f"--set stages.pretrain.trainer.per_device_train_batch_size={batch} "
                       f"--set stages.pretrain.block_size={block_size}"}


def _log(msg: str) -> None:
    """To the console and the stage's log file."""
    line = f"[alignpipe] scaling: {msg}"
    progress.log_line(line)  # the stage.log (and the console with -v)
    if not progress.verbose():
        print(line, file=sys.stderr, flush=True)


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    tokenizer, tokens = tokenize_corpus(ctx)
    vocab = len(tokenizer)
    batch = int(cfg.trainer.get("per_device_train_batch_size", 16))
    tokens_per_step = batch * cfg.block_size
    corpus_tokens = tokens["train"].numel()
    sizes = [sweep.scaled_init(ctx.recipe.model.init, s) for s in cfg.sizes]
    where = f"{ctx.recipe.path} (stages.{ctx.name})"
    points, left_out = sweep.plan_grid(sizes, cfg.budgets, vocab, cfg.count, tokens_per_step, cfg.min_steps,
                                       corpus_tokens, where)
    for p in left_out:
        _log(f"point {p['name']} left out: {p['why']}")
    _log(f"{len(points)} points, corpus {corpus_tokens:,} training tokens (each seen at most once)")
    manifests = [mean_of_seeds(runs) for runs in run_grid(ctx, points, tokens_per_step).values()]

    grid = fit_points(manifests, cfg.count)
    budget = cfg.holdout_budget or 2 * max(cfg.budgets)
    iso = fits.fit_isoflop(grid)
    n_target, _ = fits.isoflop_optimum(iso, budget)
    n_target_from = "approach 2"
    if not math.isfinite(n_target):  # fewer than two profiles with a minimum: approach 3's optimum instead
        n_target, _ = fits.surface_optimum(fits.fit_loss_surface(grid), budget)
        n_target_from = "approach 3"
    holdout = choose_holdout(ctx, sizes, vocab, tokens_per_step, n_target, corpus_tokens, budget)
    prediction = predict(ctx, grid, holdout)
    iv = prediction["interval"]
    _log(f"held-out point {holdout['name']}: predicted loss {prediction['predicted_loss']:.4f}, 95% interval "
         + (f"[{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "none (under 10 finite bootstrap fits)") + "; training it")
    held = mean_of_seeds(train_holdout(ctx, holdout, tokens_per_step))
    return summarise_run(ctx, prediction, manifests, held, left_out, tokens_per_step, (n_target, n_target_from))


def summarise_run(ctx: StageContext, prediction: dict, manifests: list[dict], held: dict, left_out: list[dict],
                  tokens_per_step: int, target: tuple[float, str]) -> dict:
    """Write scaling.json (every figure) and return the manifest's metrics (the headline ones)."""
    cfg = ctx.config
    result = fits.miss(prediction["predicted_loss"], prediction["interval"], held["metrics"]["eval_loss"])
    summary, iv = prediction["fits"], prediction["bootstrap"]["intervals"]
    line = recipe_line(held["point"], tokens_per_step // cfg.block_size, cfg.block_size)
    details = {"count": cfg.count, "flops": "C = 6 N D, N in the `count` convention", "prediction": prediction,
               "holdout_result": result, "holdout_manifest": held, "left_out": left_out, "n_target": target[0], "n_target_from": target[1],
               "other_counting": other_counting(manifests, cfg.count, held), "recipe_line": line,
               "points": fit_points(manifests, cfg.count), "references": {
                   "chinchilla_tokens_per_param": fits.CHINCHILLA_TOKENS_PER_PARAM,
                   "nanochat_tokens_per_param": fits.NANOCHAT_TOKENS_PER_PARAM}}
    write_json_atomic(ctx.dir / "scaling.json", details)
    a3, a2 = summary["approach3"], summary["approach2"]
    metrics = {"eval_loss": held["metrics"]["eval_loss"], "perplexity": held["metrics"]["perplexity"],
               "points": len(manifests), "points_left_out": len(left_out),
               "holdout_predicted_loss": prediction["predicted_loss"], "holdout_relative_error": result["relative_error"],
               "holdout_interval_half_width": result["half_width_relative"], "holdout_inside": result["inside"],
               "E": a3["E"], "A": a3["A"], "B": a3["B"], "alpha": a3["alpha"], "beta": a3["beta"],
               "n_exponent": a2.get("n_exponent"), "d_exponent": a2.get("d_exponent"),
               "tokens_per_param_approach2": summary["optimum2"]["tokens_per_param"],
               "tokens_per_param_approach3": summary["optimum3"]["tokens_per_param"],
               "tokens_per_param_other_counting": details["other_counting"]["tokens_per_param"],
               "bootstrap_failed": prediction["bootstrap"]["failed"]}
    for key, name in (("alpha", "alpha"), ("beta", "beta"), ("a", "n_exponent"), ("b", "d_exponent"),
                      ("tpp2", "tokens_per_param_approach2"), ("tpp3", "tokens_per_param_approach3")):
        if iv.get(key):
            metrics[f"{name}_low"], metrics[f"{name}_high"] = iv[key]
    # a figure a fit could not give (e.g. approach 2 with under two profiles) is None, never NaN
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


DECLARES = (StageKind("scaling", Config, run, trainer_config_class, family="text", embedded="corpus", policy=False,
                      chat=False, user_split=True, check=check),)
