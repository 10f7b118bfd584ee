"""The report's data-attack sections, read from each stage folder: what the data screen flagged before training
(`data_report.json` of user data, `data_screen.json` of the embedded world), the backdoor's attack success rate
with and without its trigger, and the canaries' exposure by how many times each was inserted, with a figure
(`data_attacks.json`, eval/attacks.py)."""

from __future__ import annotations

import json
from pathlib import Path


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _screens(stage_dir: Path) -> list[tuple[str, dict]]:
    """(source, screening) of a stage's data: each user source's, or the embedded world's screen."""
    report = _read(stage_dir / "data_report.json") or {}
    out = [(s["source"], s["screening"]) for s in report.get("sources", []) if s.get("screening")]
    world = _read(stage_dir / "data_screen.json")
    if world:
        out.append((world["source"], {"triggers": world["triggers"], "secrets": world.get("secrets")}))
    return out


def screening_lines(stages) -> list[str]:
    rows = []
    for st in stages:
        for source, s in _screens(st.dir):
            t, sec = s.get("triggers") or {}, s.get("secrets") or {}
            flags = "; ".join(f"`{f['trigger']}` ({f['test']}, {f['rows']} rows, p {f['p_corrected']:.2g})"
                              for f in t.get("flags", [])[:3]) or "none"
            leaks = ", ".join(f"{k} {v['rows']}" for k, v in (sec.get("kinds") or {}).items()) or "none"
            rows.append(f"| {st.name} | {source} | {t.get('candidates', '-')} | {flags} | {leaks} |")
    if not rows:
        return []
    return ["## Data screen: planted triggers and secrets (before training)", "",
            "Candidate n-grams of the prompts tested for a fixed response or a flipped preference, Bonferroni-corrected "
            "(data/triggers.py); likely secrets by detect-secrets, phonenumbers and an e-mail pattern (data/secrets.py).",
            "", "| stage | source | candidates | triggers flagged | likely secrets (rows) |", "|---|---|---|---|---|",
            *rows]


def _rate(r: dict) -> str:
    return "-" if r["rate"] is None else f"{r['rate']:.1%} [{r['ci'][0]:.1%}, {r['ci'][1]:.1%}] (n={r['n']})"


def attack_lines(stages, fig_path, figure) -> list[str]:
    found = [(st, a) for st in stages if (a := _read(st.dir / "data_attacks.json"))]
    lines: list[str] = []
    backdoor = [(st, b) for st, a in found for b in a.get("backdoor", [])]
    if backdoor:
        lines += ["## Backdoor: attack success with and without the trigger", "",
                  "Greedy answers to the held-out prompts, the trigger appended or not; 95% Wilson intervals.", "",
                  "| stage | trigger | succeeds when | with trigger | without |", "|---|---|---|---|---|"]
        lines += [f"| {st.name} | `{b['trigger']}` | {b['criterion']} | {_rate(b['with_trigger'])} | "
                  f"{_rate(b['without_trigger'])} |" for st, b in backdoor]
        lines.append("")
    canaries = [(st, a) for st, a in found if a.get("canary_rows")]
    if canaries:
        counts = sorted({str(r["inserted"]) for _, a in canaries for r in a["canary_rows"]}, key=lambda c: (c == "None", c.zfill(6)))
        lines += ["## Canaries: exposure (bits) by times inserted", "",
                  "Rank of each true secret among sampled candidates by log-likelihood (Carlini et al. 2019); "
                  "extracted: greedy continuation of the prefix starts with the secret.", "",
                  "| stage | " + " | ".join(f"inserted {c}" for c in counts) + " | extracted |",
                  "|---|" + "---|" * (len(counts) + 1)]
        for st, a in canaries:
            by = a["canary_exposure_by_insertions"]
            lines.append(f"| {st.name} | " + " | ".join(f"{by.get(c, '-')}" for c in counts)
                         + f" | {a['canary_extracted_share']:.0%} |")
        lines += ["", figure(_exposure_plot(canaries, fig_path("canary_exposure")))]
    return lines


def _exposure_plot(canaries, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for st, a in canaries:
        pts = [(r["inserted"], r["exposure_bits"]) for r in a["canary_rows"] if r["inserted"] is not None]
        counts = sorted({c for c, _ in pts})
        means = [sum(e for c2, e in pts if c2 == c) / sum(1 for c2, _ in pts if c2 == c) for c in counts]
        line, = ax.plot(counts, means, "o-", label=f"{st.name} (mean)")
        ax.scatter([c for c, _ in pts], [e for _, e in pts], s=10, alpha=0.35, color=line.get_color())
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("times the canary is in the training text")
    ax.set_ylabel("exposure (bits; dots: one canary)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
