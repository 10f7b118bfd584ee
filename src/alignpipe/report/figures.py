"""The figures of a run folder's report, computed: pure functions from the stage folders (manifests,
`train_log.jsonl`, `eval_samples.jsonl`, gates) to plain values, one per report section. Nothing here
writes Markdown or draws; `alignpipe.report.document` renders what these return. Each section's figures carry
the notes a reader must know (`notes`: tuples `(what, stage, details...)`), which the report shows at its top.

Statistics: pass rates get 95% Wilson intervals (samples treated as independent; samples of one prompt
are correlated, so the true intervals are somewhat wider). Win rates pair the k-th sample of a prompt
from the aligned stage with the k-th sample of the same prompt from SFT and get 95% intervals from a
bootstrap over prompts, which respects that correlation.
"""

from __future__ import annotations

# Heavy imports (transformers; reward.artifact (which imports them)) stay inside the functions that use them: the CLI
# starts without them.
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignpipe.data.world import task_kind
from alignpipe.errors import RunError
from alignpipe.eval.stats import by_prompt, paired, verdict, wilson, win_rate
from alignpipe.pipeline.gates import recorded as recorded_gates
from alignpipe.recipe.kinds import StageKind, all_kinds
from alignpipe.recipe.parse import from_dict
from alignpipe.recipe.schema import ModelSpec
from alignpipe.reward.metrics import pearson
from alignpipe.runfolder.files import read_jsonl
from alignpipe.runfolder.headline import HEADLINE_METRICS, rate_count
from alignpipe.runfolder.manifests import read_manifest, read_named_file

UNKNOWN_KIND = StageKind("?", object, lambda ctx: {}, lambda: object, family=None, embedded=None)

SHOWN = {"skip_torn": True, "missing_ok": True}  # a line cut off by a kill: the rest is still worth showing
SAMPLE_PROMPTS = 8  # prompts in the report's table of sample responses
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
    def facts(self) -> StageKind:
        """What the stage's kind declares (a kind this alignpipe does not know: a policy like any other)."""
        return all_kinds().get(self.kind) or UNKNOWN_KIND

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
        return self.complete and self.facts.policy and bool(self.samples) and \
            ("judge_pass_rate" in m or "eot_rate" in m)

    @property
    def judged(self) -> bool:
        """Judged by the embedded world's judge (its samples carry a `judge` column)."""
        return self.is_policy and "judge_pass_rate" in self.metrics

    @property
    def judge_trained(self) -> bool:
        return bool(self.metrics.get("judge_used_for_training"))


# --- reading a run folder -----------------------------------------------------------------------


def load_stages(run_dir: Path) -> list[Stage]:
    """Every stage folder with a manifest, parents before children (then by start time)."""
    stages = []
    for d in sorted(p for p in Path(run_dir).iterdir() if p.is_dir()):
        manifest = read_manifest(d)
        if manifest is None:
            continue
        stages.append(Stage(d.name, d, manifest, read_jsonl(d / "train_log.jsonl", **SHOWN),
                            read_jsonl(d / "eval_samples.jsonl", **SHOWN)))
    stages.sort(key=lambda s: (len(s.lineage), s.manifest.get("started_at", ""), s.name))
    return stages


def recipe_stage_names(stages: list[Stage]) -> list[str]:
    """The stage names of the recipe that produced the run, when its file is still readable."""
    for s in stages:
        text = read_named_file(s.manifest.get("recipe") or "")  # bounded: a manifest may name /dev/zero
        if text is not None:
            try:
                return [str(k) for k in (yaml.safe_load(text) or {}).get("stages") or {}]
            except (yaml.YAMLError, AttributeError, TypeError, RecursionError):
                return []
    return []


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
    """The recorded model settings, never its trust_remote_code / allow_pickle (models.loading.spec_from_manifest)."""
    from alignpipe.models.loading import spec_from_manifest  # imports torch: only when a report scores rewards

    try:
        return spec_from_manifest(manifest)
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


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6 if path.is_dir() else 0.0


def checkpoint_description(stage: Stage) -> str:
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


def versions_line(m: dict) -> str:
    v = m.get("versions") or {}
    return ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "trl", "peft") if k in v)


class RunFolder:
    """The stages of a run folder, and the reward models that score their samples (loaded on first use)."""

    def __init__(self, run_dir: Path, score_rewards: bool = True) -> None:
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise RunError("no such run folder", where=str(run_dir), fix="give runs/<recipe name>")
        self.stages = load_stages(self.dir)
        if not self.stages:
            raise RunError("no stage manifests found", where=str(run_dir),
                           fix="run the recipe first (alignpipe run RECIPE), then report runs/<recipe name>")
        self.by_name = {s.name: s for s in self.stages}
        self.score_rewards = score_rewards
        self._scorers: dict[str, RewardScorer] = {}
        self._reward_cache: dict = {}

    @property
    def policies(self) -> list[Stage]:
        return [s for s in self.stages if s.is_policy]

    @property
    def reward_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.facts.scorer and s.complete]

    def baseline_for(self, stage: Stage) -> Stage | None:
        """The nearest baseline (sft) ancestor with samples, else the first baseline policy stage."""
        for name in reversed(stage.lineage):
            s = self.by_name.get(name)
            if s is not None and s.facts.baseline and s.is_policy:
                return s
        return next((s for s in self.policies if s.facts.baseline and s is not stage), None)

    def scorer(self, rm: Stage) -> RewardScorer | None:
        return self._scorers.setdefault(rm.name, RewardScorer(rm)) if self.score_rewards else None

    def scorer_for(self, stage: Stage) -> RewardScorer | None:
        if not self.score_rewards:
            return None
        name = stage.metrics.get("reward_stage")
        rm = self.by_name.get(name) if name else None
        if rm is None or not rm.complete:
            rm = self.reward_stages[0] if self.reward_stages else None
        if rm is None:
            return None
        return self.scorer(rm)

    def with_rewards(self, stage: Stage, scorer: RewardScorer | None) -> list[dict] | None:
        return _with_rewards(stage, scorer, self._reward_cache)


# --- the sections' figures ------------------------------------------------------------------


def summary(run: RunFolder) -> dict:
    """The headline metrics of every stage (judge pass rate with its Wilson interval), and the notes on
    stages trained on the judge or failed."""
    used = [k for k in HEADLINE_METRICS if any(k in s.metrics for s in run.stages)]
    rows = []
    for s in run.stages:
        m = s.metrics
        values = {}
        for k in used:
            v = m.get(k)
            ci = wilson(m["judge_passed"], m["judge_total"]) if k == "judge_pass_rate" and v is not None and \
                m.get("judge_total") else None
            values[k] = (v, ci)
        counts = {k: rate_count(m, k) for k in used}  # each rate's n, shown beside it
        rows.append({"stage": s.name, "kind": s.kind, "status": s.status, "values": values, "counts": counts})
    notes = []
    for s in run.stages:
        if s.judge_trained:
            notes.append(("judge_trained", s.name))
        if s.status == "failed":
            notes.append(("failed", s.name, s.manifest.get("error", "")))
    return {"columns": used, "rows": rows, "notes": notes}


NOT_INDEPENDENT = "optimised on this judge; not independent evidence"
NOT_MEASURED = "not measured independently"


def optimised_of(stage: Stage) -> dict[str, str]:
    """{judge: why} of the judges the stage optimised (`optimised_judges` in its manifest; a manifest from
    before it was written: a stage trained on a reward signal optimised the reward model it names)."""
    m = stage.metrics
    if "optimised_judges" in m or "eot_rate" not in m:
        return dict(m.get("optimised_judges") or {})
    out = {"judge": "it trained on the judge as its reward"} if stage.judge_trained else {}
    own = (stage.manifest.get("resolved_config") or {}).get("reward_model")
    if stage.facts.trained_on_reward and own and own == m.get("reward_stage"):
        out["rm"] = f"it optimised reward model `{own}`"
    return out


def judge_of(key: str) -> str:
    """The judge a win-rate metric is by: `rm` for the reward model, else the judge's name."""
    return "rm" if key.startswith("rm_") else key.split("_win_rate_vs_")[0]


def rm_accuracy(run: RunFolder, stage: Stage):
    """The held-out pairwise accuracy of the reward model that scored `stage`, when it is at or below chance."""
    from alignpipe.eval.independence import below_chance

    m = stage.metrics
    rm = run.by_name.get(m.get("reward_stage") or "")
    acc = (rm.metrics.get("pairwise_accuracy") if rm is not None else None) or m.get("reward_model_below_chance")
    return acc if below_chance(acc) else None


def row_verdict(win: dict, judge: str, optimised: dict, below: float | None) -> str:
    if judge in optimised:
        return NOT_INDEPENDENT
    if judge == "rm" and below is not None:
        return f"reward model below chance on its own held-out pairs ({below:.1%}); not evidence"
    return verdict(win)


def unmeasured_why(m: dict, optimised: dict, below) -> str:
    """Why a stage with a parent has no verdict from an independent judge."""
    why = "; ".join(f"{'the reward model' if j == 'rm' else f'`{j}`'}: {w}" for j, w in optimised.items())
    if below is not None:
        why = "; ".join(p for p in (why, f"the reward model is below chance ({below:.1%})") if p)
    if why:
        return why
    judged = any(k.endswith("_pass_rate") and f"{k[:-len('_pass_rate')]}_total" in m for k in m) or \
        "mean_reward" in m or any(k.endswith("_pairs") for k in m)
    return "no win rate against its parent's samples of the same prompts" if judged else "it has no judge"


def verdicts(run: RunFolder) -> dict | None:
    """Per policy stage: each judge's win rate against its parent (and against its parent sampled greedily)
    with its interval and verdict, never `better` on a judge it optimised; the stages not measured
    independently; the health of its responses; and pairs where judges disagree."""
    policies = [s for s in run.policies if "eot_rate" in s.metrics]
    if not policies:
        return None
    rows, health, examples, notes, unmeasured = [], [], [], [], []
    for s in policies:
        m = s.metrics
        if m.get("eval_status") == "failed":
            notes.append(("eval_failed", s.name, m.get("eval_error", ""), str(s.dir)))
        optimised, below = optimised_of(s), rm_accuracy(run, s)
        if below is not None:
            notes.append(("rm_below_chance", s.name, m.get("reward_stage"), below))
        independent = 0
        for label, key, vs in judge_figures(m, s.parent):
            ci = m.get(f"{key}_ci")
            if m.get(key) is None or not ci:
                continue
            judge = judge_of(key)
            win = {"rate": m[key], "lo": ci[0], "hi": ci[1]}
            row = {"stage": s.name, "vs": vs, "judge": label, "rate": m[key], "lo": ci[0], "hi": ci[1],
                   "verdict": row_verdict(win, judge, optimised, below), "greedy": None}
            greedy_key = key.replace("_vs_parent", "_vs_greedy_parent")
            if key.endswith("_vs_parent") and m.get(greedy_key) is not None and m.get(f"{greedy_key}_ci"):
                g = m[f"{greedy_key}_ci"]
                gwin = {"rate": m[greedy_key], "lo": g[0], "hi": g[1]}
                row["greedy"] = {**gwin, "verdict": row_verdict(gwin, judge, optimised, below)}
            independent += judge not in optimised and not (judge == "rm" and below is not None)
            rows.append(row)
        if s.parent and not independent:
            unmeasured.append({"stage": s.name, "why": unmeasured_why(m, optimised, below)})
        health.append({"stage": s.name, **{k: m.get(k) for k in ("eot_rate", "repetition_rate", "distinct_2",
                                                                   "mean_response_tokens", "p95_response_tokens",
                                                                   "kl_to_reference")},
                       "verifiers": [(k[:-len("_pass_rate")], m[k]) for k in sorted(m)
                                     if k.endswith("_pass_rate") and f"{k[:-len('_pass_rate')]}_total" in m]})
        examples += [(s.name, *d) for d in disagreements(s.samples)[:3]]
    judged = any(k.endswith(("_pass_rate", "_win_rate_vs_parent", "_position_consistency")) or k == "mean_reward"
                 for s in policies for k in s.metrics)
    return {"rows": rows, "health": health, "examples": examples, "notes": notes, "unmeasured": unmeasured,
            "any_judge": judged}


def benchmarks(run: RunFolder) -> list[tuple]:
    """(stage, task, metric, value) of the lm-evaluation-harness results in the manifests."""
    return [(s.name, task, metric, value) for s in run.stages
            for task, figures in sorted((s.metrics.get("lm_eval") or {}).items())
            for metric, value in sorted(figures.items()) if not metric.startswith("sample")]


def gates(run: RunFolder) -> dict:
    """Every stage's recorded gates, and a note for each missed one."""
    rows, notes = [], []
    for s in run.stages:
        for g in recorded_gates(s.dir):
            rows.append({"stage": s.name, **g})
            if not g.get("passed"):
                notes.append(("gate_missed", s.name, g))
    return {"rows": rows, "notes": notes}


def lineage(run: RunFolder) -> dict:
    """Per stage: kind, parent, lineage, checkpoint, status, timing, versions, git; and the wall times."""
    rows = []
    for s in run.stages:
        m = s.manifest
        rows.append({"stage": s.name, "kind": s.kind,
                     "parent": s.parent or (m.get("base_model") or {}).get("path") or "recipe model (from scratch)",
                     "chain": [*s.lineage, s.name], "checkpoint": checkpoint_description(s), "status": s.status,
                     "wall_time_s": m.get("wall_time_s", 0), "started": m.get("started_at", "-"),
                     "versions": versions_line(m), "git": str(m.get("git_revision") or "-")[:12]})
    timed = [(s.name, float(s.manifest["wall_time_s"])) for s in run.stages if s.manifest.get("wall_time_s")]
    return {"rows": rows, "wall_times": timed}


def pass_rates(run: RunFolder) -> dict:
    """The judge pass rate of each judged policy with its Wilson interval, each against the baseline's, and
    per task kind when the samples are the embedded world's prompts."""
    policies = [s for s in run.policies if s.judged]
    out: dict = {"any_policy": bool(run.policies), "rows": [], "against_baseline": [], "kinds": None}
    if not policies:
        return out
    for s in policies:
        k = sum(bool(r.get("judge")) for r in s.samples)
        n = len(s.samples)
        lo, hi = wilson(k, n)
        out["rows"].append({"stage": s.name, "rate": k / n, "lo": lo, "hi": hi, "passed": k, "total": n,
                            "judge_trained": s.judge_trained})
    base = next((s for s in policies if s.facts.baseline), None)
    if base is not None:
        b = next(r for r in out["rows"] if r["stage"] == base.name)
        for r in out["rows"]:
            if r["stage"] == base.name or r["stage"] in [s.name for s in policies if not s.facts.chat]:
                continue
            overlap = not (r["lo"] > b["hi"] or r["hi"] < b["lo"])
            out["against_baseline"].append({"stage": r["stage"], "rate": r["rate"], "baseline": base.name,
                                            "baseline_rate": b["rate"], "overlap": overlap,
                                            "verdict": ("within noise of" if overlap else "clearly above"
                                                        if r["rate"] > b["rate"] else "clearly below")})
    kinds = _task_kinds(run)
    if kinds:
        names = sorted(set(kinds.values()), key=list(dict.fromkeys(kinds.values())).index)
        grid = []
        for s in policies:
            row = []
            for kind in names:
                hits = [bool(r.get("judge")) for r in s.samples if kinds.get(r["prompt"]) == kind]
                row.append(sum(hits) / len(hits) if hits else None)
            grid.append(row)
        out["kinds"] = {"stages": [s.name for s in policies], "kinds": names, "grid": grid}
    return out


def _task_kinds(run: RunFolder) -> dict[str, str]:
    """prompt -> task kind for the embedded world's prompts (empty for user data)."""
    prompts = dict.fromkeys(r["prompt"] for s in run.policies for r in s.samples)  # in sample order: a stable figure
    kinds = {p: k for p in prompts if (k := task_kind(p))}
    return kinds if len(kinds) >= len(prompts) / 2 else {}


def win_rates(run: RunFolder) -> dict | None:
    """Each aligned, judged policy against its baseline (sft): win rates by the judge and by the reward model,
    how often the two agree on decisive pairs, and where they disagree."""
    aligned = [s for s in run.policies if s.judged and s.facts.aligned]
    if not aligned:
        return None
    missing, plot_rows, table, differing, notes = [], [], [], [], []
    for s in aligned:
        base = run.baseline_for(s)
        if base is None:
            missing.append((s.name, None))
            continue
        judge = win_rate(paired(s.samples, base.samples), "judge")
        if judge["rate"] is None:
            missing.append((s.name, base.name))
            continue
        scorer = run.scorer_for(s)
        mine, theirs = run.with_rewards(s, scorer), run.with_rewards(base, scorer)
        rm = win_rate(paired(mine, theirs), "reward") if mine and theirs else {"rate": None}
        plot_rows.append({"stage": s.name, "baseline": base.name,
                          "judge": (judge["rate"], judge["lo"], judge["hi"]),
                          "rm": (rm["rate"], rm["lo"], rm["hi"]) if rm["rate"] is not None else None})
        agree = None
        if rm["rate"] is not None:
            pairs = [p for rs in paired(mine, theirs).values() for p in rs]
            decided = [(a, b) for a, b in pairs if bool(a["judge"]) != bool(b["judge"])]
            differ = [(a, b) for a, b in decided if (a["reward"] > b["reward"]) != bool(a["judge"])]
            agree = (len(decided) - len(differ), len(decided))
            differing += [(s.name, base.name, a, b) for a, b in differ[:3]]
            if (judge["rate"] - 0.5) * (rm["rate"] - 0.5) < 0 and not (
                    judge["lo"] <= 0.5 <= judge["hi"] and rm["lo"] <= 0.5 <= rm["hi"]):
                notes.append(("judge_and_rm_disagree", s.name, judge["rate"], rm["rate"], base.name,
                              s.facts.trained_on_reward))
        elif scorer is not None and scorer.error:
            notes.append(("rm_unavailable", scorer.error))
        optimised, below = optimised_of(s), rm_accuracy(run, s)
        said = {"judge": row_verdict(judge, "judge", optimised, None),
                "RM": row_verdict(rm, "rm", optimised, below) if rm["rate"] is not None else None}
        table.append({"stage": s.name, "baseline": base.name, "judge": judge, "rm": rm,
                      "rm_stage": scorer.stage.name if scorer else None, "agree": agree, "verdicts": said})
    return {"missing": missing, "plot_rows": plot_rows, "table": table, "disagreements": differing, "notes": notes}


def reward_models(run: RunFolder) -> list[dict]:
    """Per complete reward stage: its accuracies (with intervals), headline metrics, calibration table, and
    reward against response length for the samples it scored and each chat policy's."""
    out = []
    for rm in run.reward_stages:
        m = rm.metrics
        bars = []
        for label, key, n_key in (("held-out pairs", "pairwise_accuracy", "eval_pairs"),
                                  ("on-policy pairs\n(judge pass vs fail)", "onpolicy_accuracy", "onpolicy_pairs"),
                                  ("judge AUC", "judge_auc", None)):
            v = m.get(key)
            if isinstance(v, (int, float)):
                n = m.get(n_key) if n_key else None
                lo, hi = wilson(round(v * n), n) if n else (None, None)
                bars.append({"label": label, "value": float(v), "lo": lo, "hi": hi, "n": n})
        facts = [(k, m[k]) for k in ("pairwise_accuracy", "mean_margin", "ece", "onpolicy_accuracy", "judge_auc",
                                     "reward_length_corr", "reward_length_corr_pairs") if m.get(k) is not None]
        evals = rm.dir / "reward_eval.json"
        calibration = json.loads(evals.read_text()).get("calibration") if evals.is_file() else None
        # reward vs length: the samples the reward stage scored (its parent's), and each policy's
        series = {}
        if rm.samples and all("reward" in r for r in rm.samples):
            series[f"{rm.parent} (scored by {rm.name})"] = rm.samples
        scorer = run.scorer(rm)
        for p in run.policies:
            if p.facts.chat and p.name != rm.parent:
                rows = run.with_rewards(p, scorer)
                if rows:
                    series[p.name] = rows
        series = {label: {"tokens": [r["tokens"] for r in rows], "reward": [r["reward"] for r in rows],
                          "judge": [bool(r.get("judge")) for r in rows],
                          "corr": pearson([float(r["tokens"]) for r in rows], [r["reward"] for r in rows], at_least=3)}
                  for label, rows in series.items()}
        from alignpipe.eval.independence import below_chance

        out.append({"stage": rm.name, "ece": m.get("ece"), "bars": bars, "facts": facts, "calibration": calibration,
                    "below_chance": m["pairwise_accuracy"] if below_chance(m.get("pairwise_accuracy")) else None,
                    "by_failure_type": m.get("onpolicy_accuracy_by_failure_type"),  # reward/onpolicy.py
                    "series": series})
    return out


def curves(run: RunFolder) -> list[dict]:
    """Per stage with a training log: the logged quantities worth a panel (`curve_series`)."""
    out = []
    for s in run.stages:
        series, xlabel = curve_series(s.log)
        if series:
            out.append({"stage": s.name, "kind": s.kind, "series": series, "xlabel": xlabel})
    return out


def responses(run: RunFolder) -> dict | None:
    """Per policy: its samples' response lengths, the share that ends its turn, and its eval token cap."""
    policies = run.policies
    if not policies:
        return None
    caps = {s.name: (s.manifest.get("resolved_config") or {}).get("eval", {}).get("max_new_tokens") for s in policies}
    return {"lengths": {s.name: [int(r.get("tokens", 0)) for r in s.samples] for s in policies},
            "ended": {s.name: sum(bool(r.get("ended")) for r in s.samples) / len(s.samples) for s in policies},
            "caps": {k: v for k, v in caps.items() if v}}


def sample_rows(run: RunFolder, n_prompts: int = SAMPLE_PROMPTS) -> dict | None:
    """The first sample of each policy for the baseline's (else the first policy's) first `n_prompts` prompts."""
    policies = run.policies
    if not policies:
        return None
    first = next((s for s in policies if s.facts.baseline), policies[0])
    prompts = list(by_prompt(first.samples))[:n_prompts]
    grouped = {s.name: by_prompt(s.samples) for s in policies}
    return {"stages": [s.name for s in policies], "prompts": prompts,
            "cells": [[(grouped[s.name].get(p) or [None])[0] for s in policies] for p in prompts]}


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
