"""The report's figures: one function per figure, plain data in, a PNG out.

matplotlib's object API (`Figure`) only, never pyplot: no global state and no display, so it works
headless and in a process that draws many figures.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PASS, FAIL = "#2e7d32", "#c62828"


def _save(fig: Figure, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _grid(n: int, width: float = 4.2, height: float = 2.8) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def training_curves(stage: str, kind: str, series: dict[str, tuple[list[float], list[float]]], xlabel: str,
                    out: Path) -> Path:
    """One panel per logged quantity: `series[name] = (x, y)`."""
    fig, axes = _grid(len(series))
    for ax, (name, (x, y)) in zip(axes, series.items()):
        ax.plot(x, y, marker="." if len(x) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{stage} ({kind}): training log", fontsize=11)
    return _save(fig, out)


def pass_rates(rows: list[dict], out: Path) -> Path:
    """Bars of the judge pass rate per policy stage with 95% intervals.

    rows: {stage, rate, lo, hi, passed, total, judge_trained}."""
    fig = Figure(figsize=(max(5.5, 1.3 * len(rows) + 2), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(rows))
    rates = [r["rate"] for r in rows]
    err = [[r["rate"] - r["lo"] for r in rows], [r["hi"] - r["rate"] for r in rows]]
    bars = ax.bar(xs, rates, yerr=err, capsize=5, color="#4c72b0", edgecolor="black", linewidth=0.6)
    for bar, r in zip(bars, rows):
        if r.get("judge_trained"):  # hatched: this stage optimised the judge itself
            bar.set_hatch("//")
            bar.set_facecolor("#dd8452")
        ax.annotate(f"{r['rate']:.1%}\n{r['passed']}/{r['total']}", (bar.get_x() + bar.get_width() / 2, r["hi"]),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs), [r["stage"] for r in rows])
    ax.set_ylabel("judge pass rate")
    ax.set_ylim(0, min(1.15, max([r["hi"] for r in rows] + [0.1]) * 1.3 + 0.05))
    ax.set_title("Judge pass rate on held-out prompts\n(95% Wilson intervals)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def pass_by_kind(stages: list[str], kinds: list[str], rates: list[list[float | None]], out: Path) -> Path:
    """Heat map: pass rate per stage (rows) and task kind (columns)."""
    fig = Figure(figsize=(1.0 * len(kinds) + 2.5, 0.55 * len(stages) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    data = [[math.nan if v is None else v for v in row] for row in rates]
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(rates):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_yticks(range(len(stages)), stages, fontsize=8)
    ax.set_title("Judge pass rate by task kind", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, out)


def response_lengths(lengths: dict[str, list[int]], ended: dict[str, float], max_tokens: dict[str, int],
                     out: Path) -> Path:
    """Left: distribution of response tokens per stage; right: share of responses that ended their turn."""
    stages = list(lengths)
    fig = Figure(figsize=(max(7.5, 1.6 * len(stages) + 4), 3.4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.boxplot([lengths[s] or [0] for s in stages], tick_labels=stages, showmeans=True)
    caps = sorted(set(max_tokens.values()))
    for cap in caps:
        ax1.axhline(cap, color="grey", linestyle=":", linewidth=1)
    ax1.set_ylabel("response tokens")
    ax1.set_title("Response length" + (f" (dotted: max_new_tokens {', '.join(map(str, caps))})" if caps else ""),
                  fontsize=10)
    ax2.bar(range(len(stages)), [ended[s] for s in stages], color="#55a868", edgecolor="black", linewidth=0.6)
    ax2.set_xticks(range(len(stages)), stages)
    ax2.set_ylim(0, 1.05)
    ax2.set_title("Share of responses that ended their turn", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=8)
    return _save(fig, out)


def wall_times(stages: list[str], seconds: list[float], out: Path) -> Path:
    fig = Figure(figsize=(6, 0.45 * len(stages) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(stages)), seconds, color="#8172b3")
    for i, s in enumerate(seconds):
        ax.text(s, i, f" {s:.0f}s", va="center", fontsize=8)
    ax.set_yticks(range(len(stages)), stages)
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"Wall time per stage (total {sum(seconds) / 60:.1f} min)", fontsize=10)
    ax.set_xlim(0, max(seconds + [1]) * 1.2)
    return _save(fig, out)


def reward_accuracy(stage: str, bars: list[dict], out: Path) -> Path:
    """Reward-model accuracies with 95% intervals. bars: {label, value, lo, hi, n}."""
    fig = Figure(figsize=(1.6 * len(bars) + 2.5, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    for i, b in enumerate(bars):
        ax.bar(i, b["value"], color="#4c72b0", edgecolor="black", linewidth=0.6,
               yerr=[[b["value"] - b["lo"]], [b["hi"] - b["value"]]] if b.get("lo") is not None else None, capsize=5)
        ax.annotate(f"{b['value']:.1%}" + (f"\nn={b['n']}" if b.get("n") else ""), (i, b.get("hi") or b["value"]),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(bars)), [b["label"] for b in bars], fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_title(f"{stage}: held-out accuracy (dotted: chance)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def calibration(stage: str, table: list[dict], ece: float | None, out: Path) -> Path:
    """Reliability diagram: observed accuracy against the model's confidence sigmoid(|margin|)."""
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    conf = [row["confidence"] for row in table]
    acc = [row["accuracy"] for row in table]
    counts = [row["count"] for row in table]
    ax.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.plot(conf, acc, color="#4c72b0", linewidth=1)
    size = [20 + 200 * c / max(counts) for c in counts] if counts else []
    ax.scatter(conf, acc, s=size, color="#4c72b0", zorder=3, label="buckets (area: pairs)")
    ax.set_xlim(0.45, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence sigmoid(|margin|)")
    ax.set_ylabel("observed accuracy")
    title = f"{stage}: calibration on held-out pairs"
    ax.set_title(title + (f"\nECE {ece:.3f}" if ece is not None else ""), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def reward_vs_length(series: dict[str, dict], out: Path) -> Path:
    """Reward-model score against response tokens, per stage's samples, coloured by the judge.

    series[stage] = {tokens: [...], reward: [...], judge: [...], corr: float | None}."""
    fig, axes = _grid(len(series), width=4.4, height=3.4)
    for ax, (stage, s) in zip(axes, series.items()):
        for ok, colour, label in ((False, FAIL, "judge fail"), (True, PASS, "judge pass")):  # passes on top
            xs = [t for t, j in zip(s["tokens"], s["judge"]) if j == ok]
            ys = [r for r, j in zip(s["reward"], s["judge"]) if j == ok]
            ax.scatter(xs, ys, s=8, alpha=0.5, color=colour, label=f"{label} ({len(xs)})")
        corr = s.get("corr")
        ax.set_title(f"{stage} samples" + (f" (r = {corr:+.2f})" if corr is not None else ""), fontsize=10)
        ax.set_xlabel("response tokens", fontsize=8)
        ax.set_ylabel("reward-model score", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Reward vs response length", fontsize=11)
    return _save(fig, out)


def win_rates(rows: list[dict], out: Path) -> Path:
    """Side by side: win rate against the baseline by the judge and by the reward model, per aligned stage.

    rows: {stage, baseline, judge: (rate, lo, hi), rm: (rate, lo, hi) or None}."""
    fig = Figure(figsize=(max(5, 2.2 * len(rows) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38
    for offset, key, colour, label in ((-width / 2, "judge", "#4c72b0", "by the judge"),
                                       (width / 2, "rm", "#dd8452", "by the reward model")):
        for i, r in enumerate(rows):
            if r.get(key) is None:
                continue
            rate, lo, hi = r[key]
            ax.bar(i + offset, rate, width, yerr=[[rate - lo], [hi - rate]], capsize=4, color=colour,
                   edgecolor="black", linewidth=0.6, label=label if i == 0 or rows[0].get(key) is None else None)
            ax.annotate(f"{rate:.0%}", (i + offset, hi), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(rows)), [f"{r['stage']}\nvs {r['baseline']}" for r in rows], fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("win rate (ties count half)")
    ax.set_title("Win rate against SFT on held-out prompts\n(95% bootstrap intervals over prompts)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)
