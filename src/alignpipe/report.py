"""`alignpipe report runs/<name>`: one Markdown file with figures that answers "did alignment help?".

Everything is read from the run folder, never assumed: each stage folder's `manifest.json`,
`train_log.jsonl` (trainer log rows, or one row per PPO update) and `eval_samples.jsonl` (prompt,
response, judge, ended, tokens, optional reward). A stage that is missing, running or failed is listed
and otherwise left out, so the report works after pretrain+sft as well as after the full pipeline.

Statistics: pass rates get 95% Wilson intervals (samples treated as independent; samples of one prompt
are correlated, so the true intervals are somewhat wider). Win rates pair the k-th sample of a prompt
from the aligned stage with the k-th sample of the same prompt from SFT and get 95% intervals from a
bootstrap over prompts, which respects that correlation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignpipe.errors import RunError
from alignpipe.gates import recorded as recorded_gates

FIG_PREFIX = "fig-"
POLICY_BASELINE_KIND = "sft"
SAMPLE_PROMPTS = 8
# log-history keys that are bookkeeping, not training signal
_SKIP_KEYS = {"epoch", "step", "update", "step_time", "learning_rate", "lr", "num_tokens", "total_flos",
              "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "eval_runtime",
              "eval_samples_per_second", "eval_steps_per_second", "time", "elapsed_s", "seconds"}
_SKIP_PREFIXES = ("time_", "samples")  # timings and throughput (per-update PPO rows)
# what a reader looks for first: exact keys the stages log (trainer loss, reward-model accuracy, DPO margins,
# PPO reward / KL / entropy / clip fraction / response length), then anything else by these substrings
_PREFERRED = ("loss", "eval_loss", "policy_loss", "value_loss", "accuracy", "mean_token_accuracy", "rewards/accuracies",
              "margin", "rewards/margins", "rewards/chosen", "rewards/rejected", "reward_normalised", "reward",
              "score", "kl", "entropy", "clipfrac", "clip_ratio/region_mean", "response_length",
              "completions/mean_length", "eot_share", "completions/clipped_ratio")
_PRIORITY = ("loss", "accurac", "margin", "reward", "score", "kl", "entropy", "clip", "length", "token")
MAX_PANELS = 9


@dataclass
class Stage:
    name: str
    dir: Path
    manifest: dict
    log: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "?")

    @property
    def status(self) -> str:
        return self.manifest.get("status", "?")

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics") or {}

    @property
    def parent(self) -> str | None:
        return (self.manifest.get("parent") or {}).get("stage")

    @property
    def lineage(self) -> list[str]:
        return list(self.manifest.get("lineage") or [])

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def is_policy(self) -> bool:
        """A complete stage with sampled, evaluated responses (embedded world or user data)."""
        m = self.metrics
        return self.complete and self.kind != "reward" and bool(self.samples) and \
            ("judge_pass_rate" in m or "eot_rate" in m)

    @property
    def judged(self) -> bool:
        """Judged by the embedded world's judge (its samples carry a `judge` column)."""
        return self.is_policy and "judge_pass_rate" in self.metrics

    @property
    def judge_trained(self) -> bool:
        return bool(self.metrics.get("judge_used_for_training"))


# --- reading a run folder -----------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a kill: the rest is still worth showing
    return rows


def load_stages(run_dir: Path) -> list[Stage]:
    """Every stage folder with a manifest, parents before children (then by start time)."""
    from alignpipe.runs import read_manifest

    stages = []
    for d in sorted(p for p in Path(run_dir).iterdir() if p.is_dir()):
        manifest = read_manifest(d)
        if manifest is None:
            continue
        stages.append(Stage(d.name, d, manifest, _jsonl(d / "train_log.jsonl"), _jsonl(d / "eval_samples.jsonl")))
    stages.sort(key=lambda s: (len(s.lineage), s.manifest.get("started_at", ""), s.name))
    return stages


def recipe_stage_names(stages: list[Stage]) -> list[str]:
    """The stage names of the recipe that produced the run, when its file is still readable."""
    import yaml

    for s in stages:
        path = Path(s.manifest.get("recipe", ""))
        if path.is_file():
            try:
                return list((yaml.safe_load(path.read_text()) or {}).get("stages") or {})
            except (yaml.YAMLError, AttributeError):
                return []
    return []


# --- statistics --------------------------------------------------------------------------------


from alignpipe.eval.stats import by_prompt, paired, verdict, wilson, win_rate  # noqa: E402,F401 - shared statistics


def _verdict(win: dict) -> str:
    return verdict(win)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


# --- reward-model scores for samples that lack them ---------------------------------------------


class RewardScorer:
    """Scores (prompt, response) samples with a reward stage's model, loaded on first use."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._artifact = None
        self.error: str | None = None

    def score(self, samples: list[dict]) -> list[float] | None:
        if self.error:
            return None
        try:
            if self._artifact is None:
                from transformers.utils import logging as hf_logging

                from alignpipe.reward.artifact import load_reward_model

                hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in a report

                self._artifact = load_reward_model(self.stage.dir, _model_spec(self.stage.manifest))
            from alignpipe.reward.artifact import score

            return score(self._artifact, [r["prompt"] for r in samples], [r["response"] for r in samples])
        except Exception as err:  # noqa: BLE001 - a report without RM scores beats no report
            self.error = f"{type(err).__name__}: {err}"
            return None


def _model_spec(manifest: dict):
    from alignpipe.recipe import ModelSpec, from_dict

    raw = (manifest.get("recipe_settings") or {}).get("model") or {}
    try:
        return from_dict(ModelSpec, raw, "manifest.json", "recipe_settings.model")
    except Exception:  # noqa: BLE001 - written by another version: fall back to defaults
        return ModelSpec()


def _with_rewards(stage: Stage, scorer: RewardScorer | None, cache: dict) -> list[dict] | None:
    """`stage`'s samples with a `reward` column from `scorer`'s reward stage (reusing the stage's own
    column when that same reward stage scored it)."""
    if scorer is None:
        return None
    key = (stage.name, scorer.stage.name)
    if key not in cache:
        own = stage.metrics.get("reward_stage") == scorer.stage.name or stage.name == scorer.stage.name
        if own and stage.samples and all("reward" in r for r in stage.samples):
            cache[key] = stage.samples
        else:
            scores = scorer.score(stage.samples)
            cache[key] = None if scores is None else [{**r, "reward": s} for r, s in zip(stage.samples, scores)]
    return cache[key]


# --- the report --------------------------------------------------------------------------------


def _md_cell(text: Any, limit: int = 90) -> str:
    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;") or " "


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6 if path.is_dir() else 0.0


def _checkpoint(stage: Stage) -> str:
    model = stage.dir / "model"
    if not model.is_dir():
        return "-"
    if (model / "adapter_config.json").is_file():
        cfg = json.loads((model / "adapter_config.json").read_text())
        base = (stage.manifest.get("base_model") or {})
        over = base.get("stage") or (Path(base["stage_dir"]).name if base.get("stage_dir") else base.get("path", "?"))
        what = f"LoRA adapter r={cfg.get('r')} over {over}"
    elif (model / "reward.json").is_file():
        what = "reward model (full weights + score head)"
    else:
        what = "full weights"
    return f"`model/` {what}, {_mb(model):.1f} MB"


def _versions(m: dict) -> str:
    v = m.get("versions") or {}
    return ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "trl", "peft") if k in v)


class Report:
    def __init__(self, run_dir: Path, score_rewards: bool = True) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise RunError("no such run folder", where=str(run_dir), fix="give runs/<recipe name>")
        self.stages = load_stages(self.run_dir)
        if not self.stages:
            raise RunError("no stage manifests found", where=str(run_dir),
                           fix="run the recipe first (alignpipe run RECIPE), then report runs/<recipe name>")
        self.by_name = {s.name: s for s in self.stages}
        self.score_rewards = score_rewards
        self.figures: list[Path] = []
        self.notes: list[str] = []  # things a reader must know, collected as sections are written
        self._scorers: dict[str, RewardScorer] = {}
        self._reward_cache: dict = {}

    # --- helpers

    @property
    def policies(self) -> list[Stage]:
        return [s for s in self.stages if s.is_policy]

    @property
    def reward_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "reward" and s.complete]

    def baseline_for(self, stage: Stage) -> Stage | None:
        """The nearest sft ancestor with samples, else the first sft policy stage."""
        for name in reversed(stage.lineage):
            s = self.by_name.get(name)
            if s is not None and s.kind == POLICY_BASELINE_KIND and s.is_policy:
                return s
        return next((s for s in self.policies if s.kind == POLICY_BASELINE_KIND and s is not stage), None)

    def scorer_for(self, stage: Stage) -> RewardScorer | None:
        if not self.score_rewards:
            return None
        name = stage.metrics.get("reward_stage")
        rm = self.by_name.get(name) if name else None
        if rm is None or not rm.complete:
            rm = self.reward_stages[0] if self.reward_stages else None
        if rm is None:
            return None
        return self._scorers.setdefault(rm.name, RewardScorer(rm))

    def figure(self, path: Path) -> str:
        self.figures.append(path)
        return f"![{path.stem}]({path.name})"

    def fig_path(self, name: str) -> Path:
        return self.run_dir / f"{FIG_PREFIX}{name}.png"

    # --- sections

    def write(self) -> Path:
        for old in self.run_dir.glob(f"{FIG_PREFIX}*.png"):  # figures of stages that no longer exist
            old.unlink()
        body: list[str] = []
        for section in (self.summary, self.verdicts, self.benchmarks, self.gates, self.lineage, self.pass_rate, self.win_rates,
                        self.reward_model,
                        self.curves, self.responses, self.sample_table):
            lines = section()
            if lines:
                body += lines + [""]
        head = self.header()
        out = self.run_dir / "report.md"
        tmp = out.with_name(".report.md.tmp")
        tmp.write_text("\n".join(head + body).rstrip() + "\n")
        tmp.replace(out)
        return out

    def header(self) -> list[str]:
        from alignpipe import __version__

        name = (self.stages[0].manifest.get("recipe_settings") or {}).get("name", self.run_dir.name)
        lines = [f"# Run report: {name}", "",
                 f"Generated {time.strftime('%Y-%m-%d %H:%M')} by alignpipe {__version__} from `{self.run_dir}`: "
                 f"{len(self.stages)} stage(s), {len(self.figures)} figure(s).", ""]
        missing = [n for n in recipe_stage_names(self.stages) if n not in self.by_name]
        if missing:
            lines += [f"Stages of the recipe not run yet: {', '.join(missing)}.", ""]
        if self.notes:
            lines += [f"> **Note:** {n}" for n in self.notes] + [""]
        return lines

    def summary(self) -> list[str]:
        keys = ["judge_pass_rate", "eot_rate", "kl_to_reference", "mean_reward", "rm_win_rate_vs_sft",
                "pairwise_accuracy", "onpolicy_accuracy", "onpolicy_wrong_answer_accuracy", "perplexity", "eval_loss"]
        used = [k for k in keys if any(k in s.metrics for s in self.stages)]
        rows = []
        for s in self.stages:
            m = s.metrics
            cells = [f"**{s.name}**", s.kind, s.status]
            for k in used:
                v = m.get(k)
                if k == "judge_pass_rate" and v is not None and m.get("judge_total"):
                    lo, hi = wilson(m["judge_passed"], m["judge_total"])
                    cells.append(f"{v:.1%} [{lo:.1%}, {hi:.1%}]")
                else:
                    cells.append(_fmt(v))
            rows.append(cells)
        for s in self.stages:
            if s.judge_trained:
                self.notes.append(f"stage `{s.name}` trained on the judge (`judge_used_for_training`), so its judge "
                                  "pass rate measures how well it fit its own training reward, not independent "
                                  "quality; read its reward-model win rate and samples instead.")
            if s.status == "failed":
                self.notes.append(f"stage `{s.name}` failed: {_md_cell(s.manifest.get('error', ''), 200)}")
        return ["## Summary", "", *_table(["stage", "kind", "status", *used], rows)]

    def verdicts(self) -> list[str]:
        """Per policy stage: a verdict against its parent by each judge, from the interval of its win rate
        (the figures of the stage's manifest), the health of its responses, and where judges disagree."""
        policies = [s for s in self.policies if "eot_rate" in s.metrics]
        if not policies:
            return []
        rows, health, examples = [], [], []
        for s in policies:
            m = s.metrics
            if m.get("eval_status") == "failed":
                self.notes.append(f"stage `{s.name}`'s evaluation failed: {_md_cell(m.get('eval_error', ''), 200)} "
                                  f"(re-run it: `alignpipe eval {s.dir}`).")
            for label, key, vs in judge_figures(m, s.parent):
                ci = m.get(f"{key}_ci")
                if m.get(key) is None or not ci:
                    continue
                win = {"rate": m[key], "lo": ci[0], "hi": ci[1]}
                rows.append([f"**{s.name}**", vs or "-", label, f"{m[key]:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]",
                             verdict(win)])
            health.append([s.name, _pct(m.get("eot_rate")), _pct(m.get("repetition_rate")), _fmt(m.get("distinct_2")),
                           f"{_fmt(m.get('mean_response_tokens'), 1)} / {_fmt(m.get('p95_response_tokens'), 0)}",
                           _fmt(m.get("kl_to_reference")),
                           ", ".join(f"{k[:-len('_pass_rate')]} {m[k]:.1%}" for k in sorted(m)
                                     if k.endswith("_pass_rate") and f"{k[:-len('_pass_rate')]}_total" in m) or "-"])
            examples += [(s.name, *d) for d in disagreements(s.samples)[:3]]
        lines = ["## Did it help?", "",
                 "Each stage's k-th sample of a held-out prompt against its parent's k-th sample of the same prompt, "
                 "by each judge: win rate (ties count half) with a 95% bootstrap interval over prompts. Verdict: "
                 "better / worse when the interval excludes 50%, else no clear difference.", ""]
        if rows:
            lines += _table(["stage", "vs", "judge", "win rate [95% CI]", "verdict"], rows) + [""]
        else:
            lines += ["No stage has a parent's samples of the same prompts to compare with.", ""]
        lines += ["Response health: the share that ends its turn within max_new_tokens (`eot_rate`; low means "
                  "\"never stops\"), the share stuck in a repetition loop (`repetition_rate`), distinct word "
                  "bigrams (`distinct_2`), response length, KL to the reference (nats per response) and each "
                  "verifier's pass rate.", "",
                  *_table(["stage", "ends its turn", "loops", "distinct-2", "tokens mean / p95", "KL to ref",
                           "verifiers"], health)]
        if examples:
            lines += ["", "Where judges disagree (one says this stage's response is better, another its parent's):",
                      "", *_table(["stage", "prompt", "this stage", "parent", "judges"],
                                  [[n, _md_cell(r["prompt"], 40), _md_cell(r["response"], 60),
                                    _md_cell(r.get("parent_response", ""), 60), why] for n, r, why in examples])]
        return lines

    def benchmarks(self) -> list[str]:
        """lm-evaluation-harness results in the stages' manifests (`eval.lm_eval`, `alignpipe eval --tasks`)."""
        rows = [[s.name, task, metric, _fmt(value, 4)] for s in self.stages
                for task, figures in sorted((s.metrics.get("lm_eval") or {}).items())
                for metric, value in sorted(figures.items()) if not metric.startswith("sample")]
        if not rows:
            return []
        return ["## Benchmarks (lm-evaluation-harness)", "", *_table(["stage", "task", "metric", "value"], rows)]

    def gates(self) -> list[str]:
        rows = []
        for s in self.stages:
            for g in recorded_gates(s.dir):
                verdict = "passed" if g.get("passed") else "**MISSED**"
                rows.append([s.name, f"`{_md_cell(g.get('expr', ''))}`", _fmt(g.get("value"), 4),
                             _fmt(g.get("threshold"), 4), verdict + (f" ({_md_cell(g['reason'])})" if g.get("reason")
                                                                     else "")])
                if not g.get("passed"):
                    self.notes.append(f"stage `{s.name}` missed its gate `{g.get('expr')}` "
                                      f"(value {_fmt(g.get('value'), 4)}, threshold {_fmt(g.get('threshold'), 4)}).")
        if not rows:
            return []
        return ["## Gates", "", *_table(["stage", "gate", "value", "threshold", "result"], rows)]

    def lineage(self) -> list[str]:
        rows = []
        for s in self.stages:
            m = s.manifest
            chain = " → ".join([*s.lineage, s.name])
            parent = s.parent or (m.get("base_model") or {}).get("path") or "recipe model (from scratch)"
            rows.append([s.name, s.kind, parent, chain, _checkpoint(s), s.status,
                         f"{m.get('wall_time_s', 0):.0f}", m.get("started_at", "-"), _versions(m),
                         f"`{str(m.get('git_revision') or '-')[:12]}`"])
        versions = {r[8] for r in rows}
        header = ["stage", "kind", "parent", "lineage", "checkpoint", "status", "wall s", "started", "versions", "git"]
        if len(versions) == 1:  # the common case: say it once
            rows = [r[:8] + r[9:] for r in rows]
            header = header[:8] + header[9:]
        lines = ["## Lineage", "", *_table(header, rows)]
        if len(versions) == 1 and (common := versions.pop()):
            lines += ["", f"Versions (all stages): {common}."]
        timed = [s for s in self.stages if s.manifest.get("wall_time_s")]
        if timed:
            path = self.fig_path("wall_time")
            from alignpipe import plots

            plots.wall_times([s.name for s in timed], [float(s.manifest["wall_time_s"]) for s in timed], path)
            lines += ["", self.figure(path)]
        return lines

    def pass_rate(self) -> list[str]:
        from alignpipe import plots

        policies = [s for s in self.policies if s.judged]
        if not policies:
            return [] if self.policies else ["## Judge pass rate", "", "No stage has judged samples yet "
                                                                       "(`eval_samples.jsonl`)."]
        rows = []
        for s in policies:
            k = sum(bool(r.get("judge")) for r in s.samples)
            n = len(s.samples)
            lo, hi = wilson(k, n)
            rows.append({"stage": s.name, "rate": k / n, "lo": lo, "hi": hi, "passed": k, "total": n,
                         "judge_trained": s.judge_trained})
        lines = ["## Judge pass rate", "",
                 "Sampled responses to the same held-out prompts, judged by the embedded world's judge (exactly "
                 "one house-style sentence with the right answer, ended with end-of-turn). Bars: 95% Wilson "
                 "intervals over samples" + ("; hatched: the stage trained on the judge." if
                                             any(r["judge_trained"] for r in rows) else "."), "",
                 self.figure(plots.pass_rates(rows, self.fig_path("pass_rate"))), ""]
        base = next((s for s in policies if s.kind == POLICY_BASELINE_KIND), None)
        if base is not None:
            b = next(r for r in rows if r["stage"] == base.name)
            for r in rows:
                if r["stage"] == base.name or r["stage"] in [s.name for s in policies if s.kind == "pretrain"]:
                    continue
                overlap = not (r["lo"] > b["hi"] or r["hi"] < b["lo"])
                verdict = ("within noise of" if overlap else "clearly above" if r["rate"] > b["rate"]
                           else "clearly below")
                lines.append(f"- `{r['stage']}`: {r['rate']:.1%} vs `{base.name}` {b['rate']:.1%} "
                             f"({r['rate'] - b['rate']:+.1%}): {verdict} it (intervals "
                             f"{'overlap' if overlap else 'do not overlap'}).")
        # per task kind, when the samples are embedded-world prompts
        kinds = self._kinds()
        if kinds:
            names = sorted(set(kinds.values()), key=list(dict.fromkeys(kinds.values())).index)
            grid = []
            for s in policies:
                row = []
                for kind in names:
                    hits = [bool(r.get("judge")) for r in s.samples if kinds.get(r["prompt"]) == kind]
                    row.append(sum(hits) / len(hits) if hits else None)
                grid.append(row)
            path = plots.pass_by_kind([s.name for s in policies], names, grid, self.fig_path("pass_by_kind"))
            lines += ["", self.figure(path)]
        return lines

    def _kinds(self) -> dict[str, str]:
        """prompt -> task kind for the embedded world's prompts (empty for user data)."""
        prompts = {r["prompt"] for s in self.policies for r in s.samples}
        kinds = {p: k for p in prompts if (k := task_kind(p))}
        return kinds if len(kinds) >= len(prompts) / 2 else {}

    def win_rates(self) -> list[str]:
        from alignpipe import plots

        aligned = [s for s in self.policies if s.judged and s.kind not in ("pretrain", POLICY_BASELINE_KIND)]
        if not aligned:
            return []
        lines = ["## Aligned policies vs SFT", "",
                 "Each aligned stage's k-th sample for a held-out prompt against SFT's k-th sample for the same "
                 "prompt. By the judge: a pass beats a fail, equal verdicts tie. By the reward model: the higher "
                 "score wins. Ties count half; intervals: 95% bootstrap over prompts.", ""]
        rows, table, disagreements = [], [], []
        for s in aligned:
            base = self.baseline_for(s)
            if base is None:
                lines.append(f"- `{s.name}`: no SFT stage with samples to compare against.")
                continue
            judge = win_rate(paired(s.samples, base.samples), "judge")
            if judge["rate"] is None:
                lines.append(f"- `{s.name}`: its samples share no prompts with `{base.name}`'s.")
                continue
            scorer = self.scorer_for(s)
            mine, theirs = _with_rewards(s, scorer, self._reward_cache), _with_rewards(base, scorer, self._reward_cache)
            rm = win_rate(paired(mine, theirs), "reward") if mine and theirs else {"rate": None}
            rm_name = scorer.stage.name if scorer else None
            rows.append({"stage": s.name, "baseline": base.name,
                         "judge": (judge["rate"], judge["lo"], judge["hi"]),
                         "rm": (rm["rate"], rm["lo"], rm["hi"]) if rm["rate"] is not None else None})
            agree = "-"
            if rm["rate"] is not None:
                pairs = [p for rs in paired(mine, theirs).values() for p in rs]
                decided = [(a, b) for a, b in pairs if bool(a["judge"]) != bool(b["judge"])]
                differ = [(a, b) for a, b in decided if (a["reward"] > b["reward"]) != bool(a["judge"])]
                agree = f"{len(decided) - len(differ)}/{len(decided)}" if decided else "no decisive pairs"
                disagreements += [(s.name, base.name, a, b) for a, b in differ[:3]]
                if (judge["rate"] - 0.5) * (rm["rate"] - 0.5) < 0 and not (
                        judge["lo"] <= 0.5 <= judge["hi"] and rm["lo"] <= 0.5 <= rm["hi"]):
                    self.notes.append(f"the judge and the reward model disagree about `{s.name}`: judge win rate "
                                      f"{judge['rate']:.0%}, reward-model win rate {rm['rate']:.0%} against "
                                      f"`{base.name}`" + (" (it optimised that reward model: possible reward "
                                                          "hacking)" if s.kind in ("ppo", "grpo", "rloo") else "")
                                      + ".")
            elif scorer is not None and scorer.error:
                self.notes.append(f"reward-model scores unavailable ({_md_cell(scorer.error, 160)}).")
            verdict = "; ".join(f"{who}: {_verdict(r)}" for who, r in (("judge", judge), ("RM", rm))
                                if r["rate"] is not None)
            table.append([s.name, base.name, f"{judge['rate']:.1%} [{judge['lo']:.1%}, {judge['hi']:.1%}]",
                          f"{judge['wins']}/{judge['ties']}/{judge['losses']}",
                          f"{rm['rate']:.1%} [{rm['lo']:.1%}, {rm['hi']:.1%}]" if rm["rate"] is not None else "-",
                          rm_name or "-", agree, verdict])
        if rows:
            lines += [self.figure(plots.win_rates(rows, self.fig_path("win_rates"))), ""]
            lines += _table(["stage", "vs", "judge win rate", "judge W/T/L", "RM win rate", "RM", "RM agrees with "
                             "judge (decisive pairs)", "verdict"], table)
        if disagreements:
            lines += ["", "Where they disagree (pairs the judge decides, ordered the other way by the reward model):",
                      ""]
            lines += _table(["stage", "prompt", "aligned response (judge, reward)", "SFT response (judge, reward)"],
                            [[n, _md_cell(a["prompt"], 40),
                              f"{_md_cell(a['response'], 60)} ({'pass' if a['judge'] else 'fail'}, {a['reward']:.2f})",
                              f"{_md_cell(b['response'], 60)} ({'pass' if b['judge'] else 'fail'}, {b['reward']:.2f})"]
                             for n, _, a, b in disagreements])
        return lines

    def reward_model(self) -> list[str]:
        from alignpipe import plots

        lines: list[str] = []
        for rm in self.reward_stages:
            m = rm.metrics
            lines += [f"## Reward model: {rm.name}", ""]
            bars = []
            for label, key, n_key in (("held-out pairs", "pairwise_accuracy", "eval_pairs"),
                                      ("on-policy pairs\n(judge pass vs fail)", "onpolicy_accuracy", "onpolicy_pairs"),
                                      ("judge AUC", "judge_auc", None)):
                v = m.get(key)
                if isinstance(v, (int, float)):
                    n = m.get(n_key) if n_key else None
                    lo, hi = wilson(round(v * n), n) if n else (None, None)
                    bars.append({"label": label, "value": float(v), "lo": lo, "hi": hi, "n": n})
            if bars:
                lines.append(self.figure(plots.reward_accuracy(rm.name, bars, self.fig_path(f"{rm.name}_accuracy"))))
            facts = [f"{k} {_fmt(m[k])}" for k in ("pairwise_accuracy", "mean_margin", "ece", "onpolicy_accuracy",
                                                  "judge_auc", "reward_length_corr", "reward_length_corr_pairs")
                     if m.get(k) is not None]
            if facts:
                lines += ["", "Metrics: " + ", ".join(facts) + "."]
            if by_type := m.get("onpolicy_accuracy_by_failure_type"):  # reward/onpolicy.py
                lines += ["", "On-policy accuracy by what is wrong with the failing sample: " + ", ".join(
                    f"{t} {_fmt(row['accuracy'])} ({row['pairs']} pairs)" for t, row in by_type.items()) + "."]
            evals = rm.dir / "reward_eval.json"
            table = json.loads(evals.read_text()).get("calibration") if evals.is_file() else None
            if table:
                path = plots.calibration(rm.name, table, m.get("ece"), self.fig_path(f"{rm.name}_calibration"))
                lines += ["", self.figure(path)]
            # reward vs length: the samples the reward stage scored (its parent's), and each policy's
            series = {}
            if rm.samples and all("reward" in r for r in rm.samples):
                series[f"{rm.parent} (scored by {rm.name})"] = rm.samples
            scorer = self._scorers.setdefault(rm.name, RewardScorer(rm)) if self.score_rewards else None
            for p in self.policies:
                if p.kind != "pretrain" and p.name != rm.parent:
                    rows = _with_rewards(p, scorer, self._reward_cache)
                    if rows:
                        series[p.name] = rows
            series = {label: {"tokens": [r["tokens"] for r in rows], "reward": [r["reward"] for r in rows],
                              "judge": [bool(r.get("judge")) for r in rows],
                              "corr": pearson([float(r["tokens"]) for r in rows], [r["reward"] for r in rows])}
                      for label, rows in series.items()}
            if series:
                lines += ["", "Reward against response length (a reward model that pays for length shows a "
                              "positive r within the failing samples too):", "",
                          self.figure(plots.reward_vs_length(series, self.fig_path(f"{rm.name}_reward_vs_length")))]
            lines.append("")
        return lines

    def curves(self) -> list[str]:
        from alignpipe import plots

        lines = []
        for s in self.stages:
            series, xlabel = curve_series(s.log)
            if not series:
                continue
            path = plots.training_curves(s.name, s.kind, series, xlabel, self.fig_path(f"curves_{s.name}"))
            lines += [f"### {s.name} ({s.kind})", "", self.figure(path), ""]
        return ["## Training curves", "", *lines] if lines else []

    def responses(self) -> list[str]:
        from alignpipe import plots

        policies = self.policies
        if not policies:
            return []
        lengths = {s.name: [int(r.get("tokens", 0)) for r in s.samples] for s in policies}
        ended = {s.name: sum(bool(r.get("ended")) for r in s.samples) / len(s.samples) for s in policies}
        caps = {s.name: (s.manifest.get("resolved_config") or {}).get("eval", {}).get("max_new_tokens")
                for s in policies}
        path = plots.response_lengths(lengths, ended, {k: v for k, v in caps.items() if v}, self.fig_path("responses"))
        return ["## Response length and end-of-turn", "", self.figure(path)]

    def sample_table(self) -> list[str]:
        policies = self.policies
        if not policies:
            return []
        first = next((s for s in policies if s.kind == POLICY_BASELINE_KIND), policies[0])
        prompts = list(by_prompt(first.samples))[:SAMPLE_PROMPTS]
        grouped = {s.name: by_prompt(s.samples) for s in policies}
        rows = []
        for p in prompts:
            cells = [_md_cell(p, 40)]
            for s in policies:
                got = grouped[s.name].get(p)
                if not got:
                    cells.append("-")
                    continue
                r = got[0]
                mark = ("✅" if r.get("judge") else "❌") if "judge" in r else ""
                cut = "" if r.get("ended", True) else " *(cut off)*"
                cells.append(f"{mark} {_md_cell(r['response'], 70)}{cut}")
            rows.append(cells)
        return ["## Sample responses", "",
                f"The first sample of each policy stage for the same {len(prompts)} held-out prompts "
                "(✅ the judge passes it).", "", *_table(["prompt", *[s.name for s in policies]], rows)]


def judge_figures(m: dict, parent: str | None) -> list[tuple[str, str, str | None]]:
    """(label, metric, baseline) of every win rate a stage's manifest holds: reward model, verifiers, judges."""
    out = []
    if "rm_win_rate_vs_parent" in m:
        out.append((f"reward model `{m.get('reward_stage', '?')}`", "rm_win_rate_vs_parent", parent))
    for key in sorted(m):
        if key.endswith("_win_rate_vs_parent") and not key.startswith("rm_"):
            name = key[: -len("_win_rate_vs_parent")]
            kind = "judge model" if f"{name}_position_consistency" in m else "verifier"
            extra = ""
            if kind == "judge model" and m.get(f"{name}_position_consistency") is not None:
                extra = (f" (position consistency {m[f'{name}_position_consistency']:.0%}, "
                         f"{m.get(f'{name}_unparseable', 0)} unparseable)")
            out.append((f"{kind} `{name}`{extra}", key, parent))
    if "rm_win_rate_vs_sft" in m and "rm_win_rate_vs_parent" not in m:
        out.append((f"reward model `{m.get('reward_stage', '?')}`", "rm_win_rate_vs_sft", "sft"))
    return out


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def pair_outcomes(row: dict) -> dict[str, int]:
    """Each judge's say on one (this stage, parent) pair: +1 this stage's response, -1 the parent's, 0 even."""
    out = {}
    if "parent_reward" in row and "reward" in row:
        out["reward model"] = _sign(float(row["reward"]) - float(row["parent_reward"]))
    for k, v in row.items():
        if k.startswith("parent_") and k not in ("parent_response", "parent_ended", "parent_reward") and \
                k[len("parent_"):] in row:
            out[k[len("parent_"):]] = _sign(float(row[k[len("parent_"):]]) - float(v))
        elif k.endswith("_vs_parent") and v is not None:
            out[k[: -len("_vs_parent")]] = _sign(float(v) - 0.5)
    return out


def disagreements(samples: list[dict]) -> list[tuple[dict, str]]:
    """Pairs on which one judge prefers this stage's response and another the parent's."""
    found, seen = [], set()
    for row in samples:
        says = pair_outcomes(row)
        pro = [j for j, v in says.items() if v > 0]
        con = [j for j, v in says.items() if v < 0]
        if pro and con and row["prompt"] not in seen:  # one example per prompt
            seen.add(row["prompt"])
            found.append((row, f"{', '.join(pro)}: this stage; {', '.join(con)}: parent"))
    return found


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def task_kind(prompt: str) -> str | None:
    """The embedded world's task kind of a prompt, matched against its phrasings (None: not one)."""
    import re

    from alignpipe.data.world import PROMPT_TEMPLATES

    text = " ".join(str(prompt).lower().split())
    for kind, templates in PROMPT_TEMPLATES.items():
        for t in templates:
            pattern = re.escape(t).replace(r"\{w\}", "[a-z]+")
            pattern = re.sub(r"\\\{[ab]\\\}", r"\\d+", pattern)
            if re.fullmatch(pattern, text):
                return kind
    return None


def curve_series(rows: list[dict]) -> tuple[dict[str, tuple[list[float], list[float]]], str]:
    """The logged quantities worth a panel: numeric, varying, not bookkeeping; best-known first."""
    xkey = next((k for k in ("step", "update", "global_step") if any(k in r for r in rows)), None)
    found: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(rows):
        if "train_runtime" in row:  # the trainer's end-of-training summary row
            continue
        x = row.get(xkey, i) if xkey else i
        for k, v in row.items():
            if k in _SKIP_KEYS or k.startswith(_SKIP_PREFIXES) or isinstance(v, bool) or \
                    not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = found.setdefault(k, ([], []))
            xs.append(float(x))
            ys.append(float(v))
    found = {k: v for k, v in found.items() if len(set(v[0])) >= 2 and len(set(v[1])) > 1}

    def rank(key: str) -> tuple[int, int, str]:
        if key in _PREFERRED:
            return (0, _PREFERRED.index(key), key)
        low = key.lower()
        hit = next((i for i, p in enumerate(_PRIORITY) if p in low), len(_PRIORITY))
        return (1, hit + (len(_PRIORITY) if "grad" in low else 0), key)

    keys = sorted(found, key=rank)[:MAX_PANELS]
    return {k: found[k] for k in keys}, xkey or "log row"


def write_report(run_dir: Path, score_rewards: bool = True) -> tuple[Path, list[Path]]:
    """Write `run_dir/report.md` and its figures; returns the report's path and the figures'."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless, whatever the environment says
    report = Report(run_dir, score_rewards=score_rewards)
    path = report.write()
    return path, report.figures
