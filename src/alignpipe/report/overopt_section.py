"""The report's over-optimisation section: per stage with a curve (`eval_curve.jsonl`), gold and proxy against
sqrt(KL) with Gao et al.'s RL form fitted, the gold's peak and the flag; per best-of-n stage its table and
figure; and each aligned stage set beside best-of-n at the nearest KL (docs/overoptimisation.md)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.eval.along_training import read_curve
from alignpipe.eval.best_of_n import at_kl
from alignpipe.eval.overoptimisation import bon_form, rl_form

GOLD, PROXY = "#2e7d32", "#1565c0"


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def curve_figure(stage: str, rows: list[dict], m: dict, out: Path) -> Path:
    """Gold (left axis) and proxy (right axis) against sqrt(KL), the fitted RL forms, the peak marked."""
    import numpy as np
    from matplotlib.figure import Figure

    gold = rows[0]["gold"]
    d = [r["sqrt_kl"] for r in rows]
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax2 = ax.twinx()
    lo = [r[f"{gold}_pass_rate"] - r[f"{gold}_ci"][0] for r in rows]
    hi = [r[f"{gold}_ci"][1] - r[f"{gold}_pass_rate"] for r in rows]
    ax.errorbar(d, [r[f"{gold}_pass_rate"] for r in rows], yerr=[lo, hi], color=GOLD, marker="o", ms=3,
                linestyle="none", label=f"gold: {gold} pass rate")
    ax2.plot(d, [r.get("proxy") for r in rows], color=PROXY, marker="s", ms=3, linestyle="none", label="proxy (RM)")
    grid = np.linspace(0, max(d) or 1, 100)
    for fit, axis, colour in ((m.get("fit_gold"), ax, GOLD), (m.get("fit_proxy"), ax2, PROXY)):
        if fit:
            axis.plot(grid, fit["y0"] + rl_form(grid, fit["alpha"], fit["beta"]), color=colour, linewidth=1)
    if "overopt_peak_kl" in m:
        ax.axvline(m["overopt_peak_kl"] ** 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("sqrt(KL to the reference), sqrt(nats)")
    ax.set_ylabel(f"{gold} pass rate", color=GOLD)
    ax2.set_ylabel("reward model score", color=PROXY)
    flag = "OVER-OPTIMISED" if m.get("overoptimised") else "not flagged"
    ax.set_title(f"{stage}: gold and proxy along training ({flag})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def stage_lines(stage, rows: list[dict]) -> list[str]:
    """The stage's peak, end, drop and flag as a table, and its fits in one line each."""
    m = stage.metrics
    if "overoptimised" not in m:
        return [f"{stage.name}: {len(rows)} curve points; {m.get('overoptimisation_status', 'not assessed')}."]
    lo, hi = m["overopt_gold_drop_ci"]
    lines = ["| | step | KL | gold (measuring half) | proxy (measuring half) |", "|---|---|---|---|---|"]
    for name in ("peak", "end"):
        lines.append(f"| {name} | {m[f'overopt_{name}_step']} | {_f(m[f'overopt_{name}_kl'], 2)} | "
                     f"{_f(m[f'overopt_{name}_gold'])} | {_f(m[f'overopt_{name}_proxy'])} |")
    verdict = "**over-optimised**" if m["overoptimised"] else "not over-optimised"
    if m["overopt_peak_step"] == m["overopt_end_step"]:
        lines += ["", f"The gold is highest at the last point: no drop; {verdict} ({m['curve_points']} curve points)."]
        return lines
    lines += ["", f"Gold drop from the peak to the end {m['overopt_gold_drop']:+.3f} (95% paired bootstrap "
              f"[{lo:+.3f}, {hi:+.3f}] over {m['overopt_measured_prompts']} prompts), "
              f"proxy {m['overopt_proxy_rise']:+.3f}:"
              f" {verdict} ({m['curve_points']} curve points)."]
    for what in ("gold", "proxy"):
        fit = m.get(f"fit_{what}")
        if fit:
            inside = fit.get("peak_d") and fit["peak_d"] <= 2 * max(r["sqrt_kl"] for r in rows)
            peak = f", peak at sqrt(KL) {fit['peak_d']:.2f}" if inside else ""
            lines.append(f"- {what} fit {fit['form']}: alpha {fit['alpha']:.3f}, beta {fit['beta']:.3f}, RMS residual "
                         f"{fit['rmse']:.3f} over {fit['points']} points{peak}")
    return lines


def bon_figure(stage: str, rows: list[dict], out: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    from alignpipe.eval.overoptimisation import fit_form

    d = [r["sqrt_kl"] for r in rows]
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.errorbar(d, [r["gold"] for r in rows], yerr=[[r["gold"] - r["gold_ci"][0] for r in rows],
                                                     [r["gold_ci"][1] - r["gold"] for r in rows]],
                color=GOLD, marker="o", ms=3, linestyle="none", label="gold")
    for r in rows:
        ax.annotate(f"n={r['n']}", (r["sqrt_kl"], r["gold"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fit = fit_form(bon_form, d, [r["gold"] for r in rows], rows[0]["gold"])
    if fit:
        grid = np.linspace(0, max(d) or 1, 100)
        ax.plot(grid, fit["y0"] + bon_form(grid, fit["alpha"], fit["beta"]), color=GOLD, linewidth=1)
    ax.set_xlabel("sqrt(KL), plug-in estimate")
    ax.set_ylabel("gold pass rate of the pick")
    ax.set_title(f"{stage}: best-of-n", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def bon_lines(rows: list[dict]) -> list[str]:
    lines = ["| n | KL plug-in [95%] | closed form log n - (n-1)/n | gold [95%] | proxy |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {_f(r['kl'])} [{_f(r['kl_ci'][0])}, {_f(r['kl_ci'][1])}] | "
                     f"{_f(r['kl_closed_form'])} | {_f(r['gold'])} [{_f(r['gold_ci'][0])}, {_f(r['gold_ci'][1])}] | "
                     f"{_f(r['proxy'])} |")
    return lines


def beside_lines(stages, bon_rows: list[dict], gold: str) -> list[str]:
    """Each aligned stage's final gold and KL beside the best-of-n pick at the nearest KL."""
    lines = ["| stage | KL | gold | best-of-n at nearest KL: n | its KL | its gold |", "|---|---|---|---|---|---|"]
    for s in stages:
        m = s.metrics
        if s.facts.aligned and m.get("kl_to_reference") is not None and f"{gold}_pass_rate" in m:
            b = at_kl(bon_rows, m["kl_to_reference"])
            far = m["kl_to_reference"] > 1.5 * max(r["kl"] for r in bon_rows)
            beyond = " (beyond best-of-n's range)" if far else ""
            lines.append(f"| {s.name} | {_f(m['kl_to_reference'])} | {_f(m[f'{gold}_pass_rate'])} | {b['n']}{beyond} | "
                         f"{_f(b['kl'])} | {_f(b['gold'])} |")
    return lines if len(lines) > 2 else []


def section(run, fig_path, figure) -> list[str]:
    """The section's Markdown lines (figures written through `fig_path(name)` and shown by `figure(path)`)."""
    lines: list[str] = []
    for s in run.stages:
        rows = [r for r in read_curve(s.dir) if r.get("sqrt_kl") is not None]
        if len(rows) >= 2 and s.complete:
            path = curve_figure(s.name, rows, s.metrics, fig_path(f"overopt_{s.name}"))
            lines += [f"### {s.name} ({s.kind}) along training", "", figure(path), "", *stage_lines(s, rows), ""]
    for s in run.stages:
        bon = s.metrics.get("best_of_n")
        if s.complete and bon:
            lines += [f"### {s.name}: best-of-n from {s.parent} (proxy `{s.metrics.get('bon_reward_stage')}`)", "",
                      figure(bon_figure(s.name, bon, fig_path(f"bon_{s.name}"))), "", *bon_lines(bon), ""]
            beside = beside_lines(run.stages, bon, s.metrics.get("bon_gold", "judge"))
            if beside:
                lines += ["Each aligned stage beside best-of-n at the nearest KL (the same reference):", "",
                          *beside, ""]
    return ["## Over-optimisation: gold against proxy", "", *lines] if lines else []
