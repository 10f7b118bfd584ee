"""Experiments side by side: `alignpipe compare A B [C ...]`, the report's sibling section and the web UI's
compare view all read `build_comparison`.

What can be compared (each target is a path):

    runs/<recipe>/<stage>             a stage's current version
    runs/<recipe>/<stage>@<N>         version N of it (the current one, or one kept in `.history/<stage>/N`;
                                      `@vN` works too); so does the history folder's own path
    runs/<recipe>/<stage> alone       that stage against every version of it kept in its history
    runs/<recipe>                     a run folder: alone, its sibling stages (the same parent, the same kind
                                      family: `dpo_b01` and `dpo_b05` from one sft); several run folders, the
                                      stages of the same name in each

Stages are compared in groups (one group when the targets are stages). Per group: the resolved-config keys
that differ (nothing else), a metric table with 95% intervals (Wilson for rates with a count; the bootstrap
interval the evaluation wrote for win rates), each training-log quantity overlaid, one series per stage, and
head-to-head win rates: the k-th sample of a held-out prompt of one stage against the k-th sample of the same
prompt of the other (`eval_samples.jsonl`), by each judge both stages' samples carry (verifiers; the reward
model when both were scored by the same one), ties half, with a 95% bootstrap interval over prompts
(`eval.stats`). A judge a stage optimised gives no verdict. Nothing here writes a file except `write_figures`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from alignpipe.errors import RunError
from alignpipe.eval.stats import paired, wilson, win_rate
from alignpipe.recipe.kinds import all_kinds
from alignpipe.report.figures import SHOWN, Stage, curve_series, optimised_of
from alignpipe.runfolder.files import read_jsonl
from alignpipe.runfolder.headline import HEADLINE_METRICS
from alignpipe.runfolder.manifests import read_manifest, sha256_bytes
from alignpipe.runfolder.versions import HISTORY, history, history_root, run_root_of, version_of

TARGET_FIX = ("give runs/<recipe>, runs/<recipe>/<stage> or runs/<recipe>/<stage>@<version> "
              "(alignpipe show lists a stage's versions)")
# a rate and the metric holding the count it is a share of (its interval: Wilson over that count)
COUNT_OF = {"eot_rate": "eval_samples", "implicit_accuracy": "pairs_held_out", "pairwise_accuracy": "eval_pairs",
            "onpolicy_accuracy": "onpolicy_pairs"}
SHOWN_ELSEWHERE = ("config", "seed", "model")  # manifest inputs the resolved config and recipe settings hold
EXTRA_METRICS = ("implicit_margin", "mean_response_tokens", "repetition_rate", "distinct_2", "global_step")


@dataclass
class Entry:
    """One compared stage folder: a stage's current version or one kept in its history."""

    stage: Stage
    run_dir: Path
    version: int
    current: bool
    label: str = ""

    @property
    def name(self) -> str:
        return self.stage.name


# --- what the targets name ----------------------------------------------------------------------


def _stage_at(folder: Path) -> Stage:
    manifest = read_manifest(folder) or {}
    return Stage(str(manifest.get("stage") or folder.name), folder, manifest,
                 read_jsonl(folder / "train_log.jsonl", **SHOWN), read_jsonl(folder / "eval_samples.jsonl", **SHOWN))


def _entry(folder: Path) -> Entry:
    folder = Path(folder).absolute()
    stage = _stage_at(folder)
    current = folder.parent.parent.name != HISTORY  # runs/<recipe>/.history/<stage>/<N> is an earlier version
    return Entry(stage, run_root_of(folder), version_of(stage.manifest), current)


def _versions(stage_dir: Path) -> list[tuple[int, Path]]:
    """(version, folder) of every complete version of a stage: the current one first, then its history."""
    out = []
    current = read_manifest(stage_dir)
    if current is not None:
        out.append((version_of(current), Path(stage_dir)))
    return out + [(v, f) for v, f, m in history(stage_dir) if m.get("status") == "complete"]


def _parse_target(target: str | Path) -> tuple[str, Path]:
    """("stage", folder) or ("run", folder) for one target (see the module docstring); one line when it is
    neither."""
    text = str(target)
    path, version = Path(text), None
    found = re.fullmatch(r"(.+)@v?(\d+)", text)
    if found and not path.exists():
        path, version = Path(found.group(1)), int(found.group(2))
    if not path.is_dir():
        raise RunError("no such stage or run folder", where=text, fix=TARGET_FIX)
    manifest = read_manifest(path)
    if manifest is None:
        if version is not None:
            raise RunError("a version was given for a folder that is not a stage", where=text, fix=TARGET_FIX)
        if not any(read_manifest(d) for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")):
            raise RunError("neither a stage folder (no manifest.json) nor a run folder (no stage in it)",
                           where=text, fix=TARGET_FIX)
        return "run", path
    if version is None:
        return "stage", path
    for v, folder in _versions(path):
        if v == version:
            return "stage", folder
    have = ", ".join(str(v) for v, _ in _versions(path)) or "none"
    raise RunError(f"stage {path.name!r} has no complete version {version} (versions kept: {have})",
                   where=str(history_root(path)), fix=TARGET_FIX)


def run_stages(run_dir: Path) -> list[Entry]:
    """The current stages of a run folder, parents before children, then by name."""
    entries = [_entry(d) for d in Path(run_dir).iterdir()
               if d.is_dir() and not d.name.startswith(".") and read_manifest(d) is not None]
    return sorted(entries, key=lambda e: (len(e.stage.lineage), e.name))


def family_of(stage: Stage) -> tuple:
    """What makes two stages of one parent siblings: their kind's data family and whether it is a policy."""
    kind = all_kinds().get(stage.kind)
    return (kind.family, kind.policy) if kind is not None else (stage.kind, True)


def sibling_groups(entries: list[Entry]) -> list[tuple[str, list[Entry]]]:
    """Complete stages with the same parent and kind family, two or more: (group name, stages)."""
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        if e.stage.complete and e.stage.parent:
            groups.setdefault((e.stage.parent, *family_of(e.stage)), []).append(e)
    return [(f"from {key[0]}: {', '.join(e.name for e in members)}", members)
            for key, members in groups.items() if len(members) >= 2]


def _groups(targets: list[str | Path]) -> list[tuple[str, list[Entry]]]:
    """The groups of stages the targets ask to compare (module docstring)."""
    if not targets:
        raise RunError("nothing to compare", where="alignpipe compare", fix=TARGET_FIX)
    parsed = [_parse_target(t) for t in targets]
    kinds = {k for k, _ in parsed}
    if kinds == {"run", "stage"}:
        raise RunError("give either stages or run folders, not both", where=" ".join(map(str, targets)),
                       fix="compare runs/<a> runs/<b>, or runs/<a>/<stage> runs/<b>/<stage>")
    folders = list(dict.fromkeys(p.absolute() for _, p in parsed))
    if kinds == {"stage"}:
        if len(folders) == 1:  # one stage: its versions
            folders = [f for _, f in _versions(run_root_of(folders[0]) / _stage_at(folders[0]).name)]
            if len(folders) < 2:
                raise RunError("this stage has no earlier version to compare with", where=str(targets[0]),
                               fix="give two or more stages, or re-run the stage with a change (--set) first")
        entries = [_entry(f) for f in folders]
        return [(", ".join(dict.fromkeys(e.name for e in entries)), entries)]
    runs = [run_stages(f) for f in folders]
    if len(runs) == 1:
        groups = sibling_groups(runs[0])
        if not groups:
            raise RunError("this run folder has no sibling stages (stages of one parent and one kind family)",
                           where=str(targets[0]), fix="give two or more stages or run folders to compare")
        return groups
    names = list(dict.fromkeys(e.name for run in runs for e in run))
    groups = [(n, [e for run in runs for e in run if e.name == n]) for n in names]
    groups = [(n, members) for n, members in groups if len(members) >= 2]
    if not groups:
        raise RunError("these run folders share no stage name", where=" ".join(map(str, targets)),
                       fix="compare their stages by path instead: runs/<a>/<stage> runs/<b>/<stage>")
    return groups


def _label(entries: list[Entry]) -> None:
    """Short unique names: the stage; the run folder's name before it when several runs are compared; `@vN`
    for a version kept in history, and for the current one when one of its history versions is compared too."""
    runs = {e.run_dir for e in entries}
    run_names = {r: r.name if len({x.name for x in runs}) == len(runs) else str(r) for r in runs}
    several = {(e.run_dir, e.name) for e in entries if not e.current}
    for e in entries:
        label = f"{run_names[e.run_dir]}/{e.name}" if len(runs) > 1 else e.name
        e.label = label + (f"@v{e.version}" if not e.current or (e.run_dir, e.name) in several else "")


# --- the comparison -----------------------------------------------------------------------------


def build_comparison(targets: list[str | Path]) -> dict:
    """The comparison of the targets (module docstring) as plain JSON-serialisable data:

    {"targets": [str], "entries": [{label, stage, kind, path, run_dir, version, current, status, parent,
                                    history_versions}],
     "groups": [{"name", "members": [label],
                 "config": {"differs": {key: {label: value}}, "same": int},
                 "metrics": [{"metric", "values": {label: {"value", "lo", "hi", "n"}}}],
                 "curves": {"xlabel", "metrics": {name: {label: {"x": [...], "y": [...]}}}},
                 "head_to_head": [head_to_head(a, b)]}]}

    Reads the folders only; raises RunError (one line) for a target that is not a stage or run folder."""
    groups = _groups(list(targets))
    entries = list({id(e): e for _, members in groups for e in members}.values())
    _label(entries)
    return {"targets": [str(t) for t in targets],
            "entries": [describe(e) for e in entries],
            "groups": [{"name": name, "members": [e.label for e in members],
                        "config": config_diff(members), "metrics": metric_table(members),
                        "curves": curves(members),
                        "head_to_head": [head_to_head(a, b) for a, b in combinations(members, 2)]}
                       for name, members in groups]}


def describe(e: Entry) -> dict:
    return {"label": e.label, "stage": e.name, "kind": e.stage.kind, "path": str(e.stage.dir),
            "run_dir": str(e.run_dir), "version": e.version, "current": e.current, "status": e.stage.status,
            "parent": e.stage.parent,
            "history_versions": [v for v, _, _ in history(e.run_dir / e.name)] if e.current else []}


def flat_config(manifest: dict) -> dict[str, Any]:
    """A stage's resolved config as dotted keys (`trainer.beta`), with its parent version, the fingerprints of its
    inputs, its seed and the recipe's settings (`recipe.*`): everything that can make two runs of it differ."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", manifest.get("resolved_config") or {})
    parent = manifest.get("parent") or {}
    if parent.get("manifest_sha256"):
        out["parent.version"] = f"{parent.get('stage')} sha256 {parent['manifest_sha256'][:12]}"
    for k, v in (manifest.get("inputs") or {}).items():
        if k not in SHOWN_ELSEWHERE:  # the data, the chat template, the upstream stages: by fingerprint
            out[f"inputs.{k}"] = v[:12] if re.fullmatch(r"[0-9a-f]{64}", str(v)) else \
                f"sha256 {sha256_bytes(str(v).encode())[:12]}"
    out["seed"] = manifest.get("seed")
    settings = {k: v for k, v in (manifest.get("recipe_settings") or {}).items() if k not in ("seed",)}
    walk("recipe", settings)
    return out


def config_diff(members: list[Entry]) -> dict:
    """{"differs": {key: {label: value}} for the keys whose values are not all equal (None: unset), "same": how
    many keys are equal}."""
    flat = {e.label: flat_config(e.stage.manifest) for e in members}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    differs, same = {}, 0
    for k in keys:
        values = {label: f.get(k) for label, f in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            differs[k] = values
        else:
            same += 1
    return {"differs": differs, "same": same}


def _metric_keys(members: list[Entry]) -> list[str]:
    found = list(dict.fromkeys(k for e in members for k, v in e.stage.metrics.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)))
    chosen = [k for k in HEADLINE_METRICS if k in found]
    chosen += [k for k in found if k.endswith("_pass_rate") and k not in chosen]
    chosen += [k for k in found if "_win_rate_vs_" in k and k not in chosen]
    return chosen + [k for k in EXTRA_METRICS if k in found and k not in chosen]


def metric_cell(m: dict, key: str) -> dict | None:
    """{value, lo, hi, n} of one metric of a manifest: a pass rate or a rate with a count gets its Wilson interval,
    a win rate the bootstrap interval the evaluation wrote; None when the stage has no such metric."""
    value = m.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    cell = {"value": value, "lo": None, "hi": None, "n": None}
    name = key[: -len("_pass_rate")] if key.endswith("_pass_rate") else None
    if name and isinstance(m.get(f"{name}_total"), int) and isinstance(m.get(f"{name}_passed"), int):
        n = m[f"{name}_total"]
        cell["lo"], cell["hi"] = wilson(m[f"{name}_passed"], n)
        cell["n"] = n
    elif key in COUNT_OF and isinstance(m.get(COUNT_OF[key]), int) and m[COUNT_OF[key]] > 0:
        n = m[COUNT_OF[key]]
        cell["lo"], cell["hi"] = wilson(round(value * n), n)
        cell["n"] = n
    elif isinstance(m.get(f"{key}_ci"), list) and len(m[f"{key}_ci"]) == 2:
        cell["lo"], cell["hi"] = m[f"{key}_ci"]
    return cell


def metric_table(members: list[Entry]) -> list[dict]:
    """Rows of the metric table: the headline metrics, every pass rate and win rate, a few more; each cell with its
    interval where it has one (`metric_cell`)."""
    return [{"metric": k, "values": {e.label: metric_cell(e.stage.metrics, k) for e in members}}
            for k in _metric_keys(members)]


def curves(members: list[Entry]) -> dict:
    """Each logged quantity of the stages' training logs (`report.figures.curve_series`), one series per stage."""
    out: dict[str, dict] = {}
    xlabels = []
    for e in members:
        series, xlabel = curve_series(e.stage.log)
        if series:
            xlabels.append(xlabel)
        for name, (x, y) in series.items():
            out.setdefault(name, {})[e.label] = {"x": x, "y": y}
    return {"xlabel": xlabels[0] if len(set(xlabels)) == 1 else "step / log row", "metrics": out}


# --- head to head -------------------------------------------------------------------------------


def shared_judges(a: Entry, b: Entry) -> tuple[list[str], list[str]]:
    """(the sample columns both stages were judged by, why other judges were left out). Verifiers: the metrics
    `<name>_pass_rate` with `<name>_total`; the reward model: `reward` when both were scored by the same reward
    stage of one run folder, unchanged between them."""
    def verifiers(e: Entry) -> list[str]:
        m = e.stage.metrics
        names = [k[: -len("_pass_rate")] for k in m if k.endswith("_pass_rate")]
        return [n for n in names if f"{n}_total" in m]

    mine = verifiers(a)
    judges = [j for j in mine if j in verifiers(b)]
    left = [f"verifier `{j}` judged only {x.label}" for x, y in ((a, b), (b, a)) for j in verifiers(x)
            if j not in verifiers(y)]
    rm_a, rm_b = a.stage.metrics.get("reward_stage"), b.stage.metrics.get("reward_stage")
    if rm_a and rm_a == rm_b and a.run_dir == b.run_dir:
        if _scored_by(a, rm_a) == _scored_by(b, rm_b):
            judges.append("reward")
        else:
            left.append(f"reward model `{rm_a}` changed between them: their scores are not on one scale")
    elif rm_a or rm_b:
        left.append(f"the reward model scores come from different reward stages ({rm_a or '-'} / {rm_b or '-'})")
    models = sorted({k[: -len("_vs_parent")] for e in (a, b) for r in e.stage.samples[:1] for k in r
                     if k.endswith("_vs_parent")})
    left += [f"judge model `{j}` compared each stage with its parent only (not run head to head)" for j in models]
    return judges, left


def _scored_by(e: Entry, rm: str) -> str | None:
    """What identifies the reward model that scored a stage: the fingerprint its evaluation recorded, else (stages
    evaluated before it was) the reward stage's manifest hash among the stage's inputs."""
    inputs = e.stage.manifest.get("inputs") or {}
    return e.stage.metrics.get("reward_stage_fingerprint") or inputs.get(f"upstream:{rm}")


def head_to_head(a: Entry, b: Entry) -> dict:
    """`a`'s k-th sample of each prompt against `b`'s k-th sample of the same prompt, by each shared judge: wins,
    ties and losses of `a` (they add up to `pairs`), its win rate (ties half) with a 95% bootstrap interval over
    prompts, and a verdict; prompts only one of them answered are counted, not paired."""
    pairs = paired(a.stage.samples, b.stage.samples)
    prompts_a = {r["prompt"] for r in a.stage.samples}
    prompts_b = {r["prompt"] for r in b.stage.samples}
    judges, left_out = shared_judges(a, b)
    by_judge = {}
    for j in judges:
        usable = {p: [(x, y) for x, y in rows if x.get(j) is not None and y.get(j) is not None]
                  for p, rows in pairs.items()}
        win = win_rate(usable, j)
        by_judge[j] = {**win, "verdict": pair_verdict(win, a, b, j)}
    return {"a": a.label, "b": b.label, "prompts_a": len(prompts_a), "prompts_b": len(prompts_b),
            "paired_prompts": len(pairs), "pairs": sum(len(rows) for rows in pairs.values()),
            "by_judge": by_judge, "left_out": left_out}


def pair_verdict(win: dict, a: Entry, b: Entry, judge: str) -> str:
    """`<a> better` / `<b> better` when the interval excludes 50%, else no clear difference; no verdict by a judge
    either stage optimised (`optimised_judges`: `rm` is its reward model)."""
    if win.get("rate") is None:
        return "no pairs"
    key = "rm" if judge == "reward" else judge
    trained = [e.label for e in (a, b) if key in optimised_of(e.stage)]
    if trained:
        return f"not independent: {' and '.join(trained)} optimised it"
    if win["lo"] > 0.5:
        return f"{a.label} better"
    if win["hi"] < 0.5:
        return f"{b.label} better"
    return "no clear difference"


# --- history ------------------------------------------------------------------------------------


def history_summary(stage_dir: Path) -> dict | None:
    """A stage with earlier versions kept: {"stage", "current", "versions" (kept, newest first), "previous",
    "config": config_diff of the current version against the previous one}; None when it has none."""
    kept = [(v, f) for v, f, m in history(stage_dir) if m.get("status") == "complete"]
    current = read_manifest(stage_dir)
    if not kept or current is None:
        return None
    now, before = _entry(Path(stage_dir)), _entry(kept[0][1])
    _label([now, before])
    return {"stage": now.name, "current": now.version, "versions": [v for v, _ in kept], "previous": kept[0][0],
            "config": config_diff([now, before]), "labels": [now.label, before.label]}


# --- rendering: Markdown (also what the terminal shows) and figures ------------------------------


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _cell(c: dict | None) -> str:
    if c is None:
        return "-"
    value = f"{c['value']:.3f}" if isinstance(c["value"], float) else str(c["value"])
    if c.get("lo") is not None:
        value += f" [{c['lo']:.3f}, {c['hi']:.3f}]"
    return value + (f" n={c['n']}" if c.get("n") else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(map(esc, row)) + " |" for row in rows)]


def config_lines(config: dict, members: list[str]) -> list[str]:
    if not config["differs"]:
        return [f"Resolved configs: identical ({config['same']} keys)."]
    rows = [[key, *(fmt_value(values.get(m)) for m in members)] for key, values in config["differs"].items()]
    return [f"Resolved-config differences ({len(rows)} of {len(rows) + config['same']} keys differ):", "",
            *_table(["key", *members], rows)]


def head_to_head_lines(rows: list[dict]) -> list[str]:
    table, notes = [], []
    for h in rows:
        for judge, w in h["by_judge"].items():
            rate = "-" if w.get("rate") is None else f"{w['rate']:.1%} [{w['lo']:.1%}, {w['hi']:.1%}]"
            wtl = "-" if w.get("rate") is None else f"{w['wins']}/{w['ties']}/{w['losses']}"
            table.append([f"{h['a']} vs {h['b']}", "reward model" if judge == "reward" else judge, wtl, rate,
                          w["verdict"]])
        if h["prompts_a"] != h["paired_prompts"] or h["prompts_b"] != h["paired_prompts"]:
            notes.append(f"- {h['a']} vs {h['b']}: the prompts differ; {h['paired_prompts']} paired "
                         f"({h['prompts_a']} answered by {h['a']}, {h['prompts_b']} by {h['b']}).")
        if not h["by_judge"]:
            notes.append(f"- {h['a']} vs {h['b']}: no judge scored both stages' samples.")
        notes += [f"- {h['a']} vs {h['b']}: {why}." for why in h["left_out"]]
    if not rows:
        return []
    pairs = ", ".join(sorted({f"{h['pairs']} pairs of {h['paired_prompts']} prompts" for h in rows}))
    lines = ["Head to head on the same held-out prompts: the first stage's k-th sample of a prompt against the "
             f"second's k-th sample of it ({pairs}); wins/ties/losses of the first, win rate with ties half and a 95% "
             "bootstrap interval over prompts; a verdict only when the interval excludes 50%.", ""]
    return lines + (_table(["pair", "judge", "W/T/L", "win rate [95% CI]", "verdict"], table) if table else []) + \
        ([""] + notes if notes else [])


def group_lines(group: dict, figures: dict[str, str] | None, curves_hint: str = "`--out DIR` draws them overlaid") \
        -> list[str]:
    members = group["members"]
    lines = [*config_lines(group["config"], members), ""]
    if group["metrics"]:
        lines += ["Metrics (95% intervals: Wilson over n for rates, the evaluation's bootstrap over prompts for win "
                  "rates):", "", *_table(["metric", *members],
                                         [[r["metric"], *(_cell(r["values"][m]) for m in members)]
                                          for r in group["metrics"]]), ""]
    lines += [*head_to_head_lines(group["head_to_head"]), ""]
    names = list(group["curves"]["metrics"])
    if names and figures is not None:
        lines += ["Training curves, overlaid:", ""] + [f"![{n}]({figures[n]})" for n in names if n in figures]
    elif names:
        lines.append(f"Training curves logged: {', '.join(names)} ({curves_hint}).")
    return lines


def render_markdown(comparison: dict, figures: dict[str, dict[str, str]] | None = None) -> str:
    """The comparison as Markdown, readable as it is in a terminal. `figures`: {group name: {curve: file name}}
    from `write_figures` (None: the curves are listed by name)."""
    lines = ["# Comparison", "", *_table(
        ["stage", "kind", "version", "status", "parent", "folder"],
        [[e["label"], e["kind"], f"{e['version']}{'' if e['current'] else ' (history)'}", e["status"],
          e["parent"] or "-", e["path"]] for e in comparison["entries"]]), ""]
    several = len(comparison["groups"]) > 1
    for g in comparison["groups"]:
        if several:
            lines += [f"## {g['name']}", ""]
        lines += group_lines(g, None if figures is None else figures.get(g["name"], {})) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def write_figures(comparison: dict, out_dir: Path) -> dict[str, dict[str, str]]:
    """One PNG per training-log quantity and group, the stages' series overlaid: {group: {quantity: file name}}."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, str]] = {}
    several = len(comparison["groups"]) > 1
    for g in comparison["groups"]:
        for name, series in g["curves"]["metrics"].items():
            fig = Figure(figsize=(5.6, 3.4))
            ax = fig.add_subplot(1, 1, 1)
            for label, s in series.items():
                ax.plot(s["x"], s["y"], marker="." if len(s["x"]) < 30 else None, linewidth=1.2, label=label)
            ax.set_title(f"{name}" + (f" ({g['name']})" if several else ""), fontsize=10)
            ax.set_xlabel(g["curves"]["xlabel"], fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            file = f"fig-compare-{_slug(g['name']) + '-' if several else ''}{_slug(name)}.png"
            fig.savefig(out_dir / file, dpi=110)
            written.setdefault(g["name"], {})[name] = file
    return written
