"""The report's section for a scaling stage: the fitted constants with their intervals, the held-out point's
prediction against its measured loss, the recipe line of the compute-optimal size, and the sweep's figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from alignpipe.report import scaling_plots
from alignpipe.runfolder.files import read_jsonl


def _g(v, digits: int = 3) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def _iv(pair) -> str:
    return "-" if not pair else f"[{_g(pair[0])}, {_g(pair[1])}]"


def curves_of(stage_dir: Path, names: list[str], tokens_per_step: int) -> dict[str, tuple[list, list]]:
    """Point name -> (tokens seen, training loss) from each point's train_log.jsonl."""
    out = {}
    for name in names:
        rows = read_jsonl(stage_dir / "points" / name / "train_log.jsonl", missing_ok=True)
        steps = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        out[name] = ([s * tokens_per_step for s, _ in steps], [loss for _, loss in steps])
    return out


def constants_table(details: dict) -> list[str]:
    fits, iv = details["prediction"]["fits"], details["prediction"]["bootstrap"]["intervals"]
    a3, a2 = fits["approach3"], fits["approach2"]
    other = details["other_counting"]
    c = fits["c_target"]
    refs = details["references"]
    rows = [
        ("E (irreducible loss)", _g(a3["E"]), "-"), ("A", _g(a3["A"]), "-"), ("B", _g(a3["B"]), "-"),
        ("alpha (N exponent)", _g(a3["alpha"]), _iv(iv.get("alpha"))),
        ("beta (D exponent)", _g(a3["beta"]), _iv(iv.get("beta"))),
        ("a: N_opt ∝ C^a (approach 2)", _g(a2.get("n_exponent")), _iv(iv.get("a"))),
        ("b: D_opt ∝ C^b (approach 2)", _g(a2.get("d_exponent")), _iv(iv.get("b"))),
        ("a = beta/(alpha+beta) (approach 3)", _g(a3["beta"] / (a3["alpha"] + a3["beta"])), "-"),
        (f"tokens per parameter at C = {c:.2g}, approach 2", _g(fits["optimum2"]["tokens_per_param"]),
         _iv(iv.get("tpp2"))),
        (f"tokens per parameter at C = {c:.2g}, approach 3", _g(fits["optimum3"]["tokens_per_param"]),
         _iv(iv.get("tpp3"))),
        (f"tokens per parameter, approach 3, counting {other['count']} parameters",
         _g(other["tokens_per_param"]), "-"),
        ("Chinchilla (Hoffmann et al. 2022)", _g(refs["chinchilla_tokens_per_param"]), "-"),
        ("nanochat (its own counting)", _g(refs["nanochat_tokens_per_param"]), "-"),
    ]
    lines = ["| constant | fitted | 95% bootstrap interval |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    boot = details["prediction"]["bootstrap"]
    return lines + ["", f"N counts **{details['count']}** parameters; {details['flops']}. Bootstrap: "
                        f"{boot['draws']} redraws of the points (within each budget), {boot['failed']} without a "
                        "finite optimum in at least one of the approaches."]


def _seeds(points: list[dict]) -> str:
    k = max(len(p.get("losses") or [0]) for p in points)
    return "1 seed" if k == 1 else f"{k} seeds"


def holdout_lines(details: dict) -> list[str]:
    r, h = details["holdout_result"], details["prediction"]["holdout"]
    verdict = "inside" if r["inside"] else "outside"
    return [f"Held out of the fits: **{h['name']}** (N = {h['n']:,}, D = {h['d']:,}, C = {h['c']:.3g}), the size "
            f"nearest {details.get('n_target_from', 'approach 2')}'s compute-optimal N ({details['n_target']:,.0f}) at "
            f"C = {h['budget']:.3g}. "
            f"Predicted loss {r['predicted']:.4f} (95% interval {_iv(r['interval'])}, half-width "
            f"{_g(100 * (r['half_width_relative'] or 0), 2)}%), written before it trained; measured "
            f"{r['measured']:.4f}: off by {100 * r['relative_error']:+.2f}%, {verdict} the interval."]


def section(stage_name: str, stage_dir: Path, fig_path: Callable[[str], Path],
            figure: Callable[[Path], str]) -> list[str]:
    """The Markdown lines (and figures) of one scaling stage; [] when it has no scaling.json yet."""
    path = stage_dir / "scaling.json"
    if not path.is_file():
        return []
    details = json.loads(path.read_text())
    points, prediction = details["points"], details["prediction"]
    held = details["holdout_manifest"]
    holdout = {**prediction["holdout"], "loss": held["metrics"]["eval_loss"],
               "hidden_size": held["point"]["init"]["hidden_size"],
               "num_hidden_layers": held["point"]["init"]["num_hidden_layers"]}
    tokens_per_step = details["recipe_line"]["tokens_per_step"]
    curves = curves_of(stage_dir, [p["name"] for p in points] + [holdout["name"]], tokens_per_step)
    fits = prediction["fits"]
    line = details["recipe_line"]
    figs = [scaling_plots.loss_curves(points, curves, holdout, fig_path(f"{stage_name}_loss_curves")),
            scaling_plots.isoflop(points, fits["approach2"], holdout, prediction, fig_path(f"{stage_name}_isoflop")),
            scaling_plots.contours(points, fits["approach3"], fits["approach2"], holdout,
                                   fig_path(f"{stage_name}_contours"))]
    left = details["left_out"]
    return [f"## Scaling laws: {stage_name}", "",
            f"{len(points)} points over {len({(p['hidden_size'], p['num_hidden_layers']) for p in points})} sizes "
            f"and {len({p['budget'] for p in points})} budgets, each the mean of {_seeds(points)}"
            + (f"; {len(left)} left out "
            f"({', '.join(p['name'] + ': ' + p['why'] for p in left)})" if left else "") + ".", "",
            *holdout_lines(details), "", *constants_table(details), "",
            "The compute-optimal size at the held-out budget, as a pipeline's model:", "",
            f"    {line['yaml']}   # pretrain {line['pretrain_steps']} steps of {line['tokens_per_step']} tokens",
            f"    {line['command']}", "",
            *[x for f in figs for x in (figure(f), "")]]
