"""The scaling sweep's figures: loss curves per size, IsoFLOP parabolas, L(N, D) contours with the
compute-optimal frontier. Plain data in (a scaling stage's `scaling.json` and its points' logs), a PNG out;
matplotlib's object API only, as report/plots.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import cm
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from alignpipe.eval import scaling as fits


def _save(fig: Figure, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _size_label(p: dict) -> str:
    return f"h{p['hidden_size']} l{p['num_hidden_layers']}"


def _colours(points: list[dict]) -> dict[str, tuple]:
    labels = sorted({_size_label(p) for p in points}, key=lambda s: [int(x[1:]) for x in s.split()])
    return {label: cm.viridis(i / max(1, len(labels) - 1)) for i, label in enumerate(labels)}


def loss_curves(points: list[dict], curves: dict[str, tuple[list[float], list[float]]], holdout: dict | None,
                out: Path) -> Path:
    """Training loss against tokens seen, one colour per size, one panel per budget; each run's held-out loss as
    a dot at its end. `curves`: point name -> (tokens, loss)."""
    budgets = sorted({p["budget"] for p in points} | ({holdout["budget"]} if holdout else set()))
    colours = _colours(points + ([holdout] if holdout else []))
    fig = Figure(figsize=(4.2 * len(budgets), 3.2))
    for i, budget in enumerate(budgets):
        ax = fig.add_subplot(1, len(budgets), i + 1)
        shown = [p for p in points if p["budget"] == budget] + \
            ([holdout] if holdout and holdout["budget"] == budget else [])
        for p in shown:
            colour = colours[_size_label(p)]
            tokens, loss = curves.get(p["name"], ([], []))
            ax.plot(tokens, loss, color=colour, lw=1.2, label=_size_label(p))
            ax.plot([p["d"]], [p["loss"]], "o", color=colour, ms=4)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: a short span's minor labels overlap
        title = f"C = {budget:.2g} FLOPs" + (" (held out)" if holdout and holdout["budget"] == budget else "")
        ax.set(title=title, xlabel="training tokens", ylabel="loss (nats/token)" if i == 0 else None)
        ax.legend(fontsize=7)
    return _save(fig, out)


def isoflop(points: list[dict], approach2: dict, holdout: dict | None, prediction: dict | None, out: Path) -> Path:
    """Held-out loss against N, one profile per budget, with each profile's parabola and its minimum; the held-out
    point as a star beside its predicted loss and interval."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    profiles = fits.profiles(points)
    colours = {b: cm.plasma(i / max(1, len(profiles))) for i, b in enumerate(profiles)}
    fitted = {row["budget"]: row for row in approach2.get("profiles", [])}
    for budget, group in profiles.items():
        ax.plot([p["n"] for p in group], [p["loss"] for p in group], "o", color=colours[budget],
                label=f"C = {budget:.2g}")
        row = fitted.get(budget)
        if row:
            x = np.linspace(np.log(min(p["n"] for p in group)) - 0.3, np.log(max(p["n"] for p in group)) + 0.3, 100)
            ax.plot(np.exp(x), np.polyval(row["coef"], x), "-", color=colours[budget], lw=1)
            ax.plot([row["n_opt"]], [row["loss_opt"]], "x", color=colours[budget], ms=9, mew=2)
    if holdout and prediction:
        lo, hi = prediction["interval"] or (prediction["predicted_loss"],) * 2
        ax.errorbar([holdout["n"]], [prediction["predicted_loss"]], yerr=[[prediction["predicted_loss"] - lo],
                    [hi - prediction["predicted_loss"]]], fmt="s", color="grey", capsize=4, label="predicted")
        ax.plot([holdout["n"]], [holdout["loss"]], "*", color="black", ms=12,
                label=f"held out, C = {holdout['budget']:.2g}")
    losses = [p["loss"] for p in points] + ([holdout["loss"]] if holdout else [])
    span = max(losses) - min(losses)
    ax.set_ylim(min(losses) - 0.15 * span, max(losses) + 0.15 * span)  # an interval far wider is cut, not drawn
    ax.set_xscale("log")
    ax.set(xlabel="parameters N", ylabel="held-out loss (nats/token)", title="IsoFLOP profiles (approach 2)")
    ax.legend(fontsize=7)
    return _save(fig, out)


def contours(points: list[dict], approach3: dict, approach2: dict, holdout: dict | None, out: Path) -> Path:
    """Approach 3's L(N, D) as filled contours over the sweep's range, the points on it (coloured by their
    measured loss), lines of equal compute, and the compute-optimal frontier of both approaches."""
    ns = [p["n"] for p in points] + ([holdout["n"]] if holdout else [])
    ds = [p["d"] for p in points] + ([holdout["d"]] if holdout else [])
    n_grid = np.geomspace(min(ns) / 2, max(ns) * 2, 120)
    d_grid = np.geomspace(min(ds) / 2, max(ds) * 2, 120)
    nn, dd = np.meshgrid(n_grid, d_grid)
    fig = Figure(figsize=(6.6, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    surface = fits.surface_loss(approach3, nn, dd)
    filled = ax.contourf(nn, dd, surface, levels=20, cmap="viridis_r", alpha=0.85)
    fig.colorbar(filled, ax=ax, label="L(N, D) fitted (nats/token)")
    losses = [p["loss"] for p in points]
    ax.scatter([p["n"] for p in points], [p["d"] for p in points], c=losses, cmap="viridis_r", edgecolors="white",
               norm=LogNorm(min(losses), max(losses)), s=30, zorder=3)
    budgets = np.geomspace(min(p["c"] for p in points) / 4, max(p["c"] for p in points) * 8, 40)
    for c in sorted({p["budget"] for p in points} | ({holdout["budget"]} if holdout else set())):
        ax.plot(n_grid, c / (6 * n_grid), ":", color="white", lw=0.8)
    frontier3 = np.array([fits.surface_optimum(approach3, c) for c in budgets])
    ax.plot(frontier3[:, 0], frontier3[:, 1], "-", color="red", lw=1.6, label="optimum, approach 3")
    frontier2 = np.array([fits.isoflop_optimum(approach2, c) for c in budgets])
    if np.isfinite(frontier2).all():
        ax.plot(frontier2[:, 0], frontier2[:, 1], "--", color="orange", lw=1.6, label="optimum, approach 2")
    if holdout:
        ax.plot([holdout["n"]], [holdout["d"]], "*", color="black", ms=13, zorder=4, label="held-out point")
    ax.set(xscale="log", yscale="log", xlim=(n_grid[0], n_grid[-1]), ylim=(d_grid[0], d_grid[-1]),
           xlabel="parameters N", ylabel="training tokens D", title="L(N, D) = E + A/N^α + B/D^β (dotted: equal C)")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, out)
