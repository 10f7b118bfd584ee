"""`alignpipe report runs/<name>`: one Markdown file with figures that answers "did alignment help?".

Everything is read from the run folder, never assumed (`alignpipe.report.figures` computes each
section's figures from the stage folders); this module only renders them: Markdown tables and prose, and
the plots (`alignpipe.report.plots`). A stage that is missing, running or failed is listed and otherwise left
out, so the report works after pretrain+sft as well as after the full pipeline.
"""

from __future__ import annotations

# Heavy imports (matplotlib; report.plots (which imports it)) stay inside the functions that use them: the CLI starts
# without them.
import time
from pathlib import Path
from typing import Any

from alignpipe import __version__
from alignpipe.data.world import task_kind  # noqa: F401 - part of the report's interface
from alignpipe.eval.stats import paired, verdict, wilson, win_rate  # noqa: F401 - the report's statistics
from alignpipe.report import figures as rf
from alignpipe.report.attacks_section import attack_lines, screening_lines
from alignpipe.report.reward_table import reward_comparison
from alignpipe.report.safety_section import did_it_hurt
from alignpipe.runfolder.files import write_atomic

FIG_PREFIX = "fig-"


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


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


class PlottedSections:
    """The report's figures and the sections that draw them (`plots`, matplotlib): pass rates, win rates, reward
    models, training curves, response lengths. `Report` gives them the run folder and the notes."""

    run: rf.RunFolder
    run_dir: Path
    figures: list[Path]  # the PNG files written, in the order the report shows them
    notes: list[tuple]

    def figure(self, path: Path) -> str:
        self.figures.append(path)
        return f"![{path.stem}]({path.name})"

    def fig_path(self, name: str) -> Path:
        return self.run_dir / f"{FIG_PREFIX}{name}.png"

    def data_attacks(self) -> list[str]:
        """Planted triggers and secrets, backdoor and canaries (report/attacks_section.py)."""
        stages = [s for s in self.run.stages if s.dir.is_dir()]
        return screening_lines(stages) + [""] + attack_lines(stages, self.fig_path, self.figure)

    def pass_rate(self) -> list[str]:
        from alignpipe.report import plots
        figures = rf.pass_rates(self.run)
        rows = figures["rows"]
        if not rows:
            return [] if figures["any_policy"] else ["## Judge pass rate", "", "No stage has judged samples yet "
                                                                               "(`eval_samples.jsonl`)."]
        lines = ["## Judge pass rate", "",
                 "Sampled responses to the same held-out prompts, judged by the embedded world's judge (exactly "
                 "one house-style sentence with the right answer, ended with end-of-turn). Bars: 95% Wilson "
                 "intervals over samples" + ("; hatched: the stage trained on the judge." if
                                             any(r["judge_trained"] for r in rows) else "."), "",
                 self.figure(plots.pass_rates(rows, self.fig_path("pass_rate"))), ""]
        for r in figures["against_baseline"]:
            lines.append(f"- `{r['stage']}`: {r['rate']:.1%} vs `{r['baseline']}` {r['baseline_rate']:.1%} "
                         f"({r['rate'] - r['baseline_rate']:+.1%}): {r['verdict']} it (intervals "
                         f"{'overlap' if r['overlap'] else 'do not overlap'}).")
        if figures["kinds"]:
            k = figures["kinds"]
            path = plots.pass_by_kind(k["stages"], k["kinds"], k["grid"], self.fig_path("pass_by_kind"))
            lines += ["", self.figure(path)]
        return lines

    def win_rates(self) -> list[str]:
        from alignpipe.report import plots
        figures = rf.win_rates(self.run)
        if figures is None:
            return []
        self.notes += figures["notes"]
        lines = ["## Aligned policies vs SFT", "",
                 "Each aligned stage's k-th sample for a held-out prompt against SFT's k-th sample for the same "
                 "prompt. By the judge: a pass beats a fail, equal verdicts tie. By the reward model: the higher "
                 "score wins. Ties count half; intervals: 95% bootstrap over prompts.", ""]
        for stage, base in figures["missing"]:
            lines.append(f"- `{stage}`: no SFT stage with samples to compare against." if base is None else
                         f"- `{stage}`: its samples share no prompts with `{base}`'s.")
        table = []
        for t in figures["table"]:
            judge, rm, agree = t["judge"], t["rm"], t["agree"]
            agreed = "-" if agree is None else f"{agree[0]}/{agree[1]}" if agree[1] else "no decisive pairs"
            summary = "; ".join(f"{who}: {said}" for who, said in t["verdicts"].items() if said is not None)
            table.append([t["stage"], t["baseline"], f"{judge['rate']:.1%} [{judge['lo']:.1%}, {judge['hi']:.1%}]",
                          f"{judge['wins']}/{judge['ties']}/{judge['losses']}",
                          f"{rm['rate']:.1%} [{rm['lo']:.1%}, {rm['hi']:.1%}]" if rm["rate"] is not None else "-",
                          t["rm_stage"] or "-", agreed, summary])
        if figures["plot_rows"]:
            lines += [self.figure(plots.win_rates(figures["plot_rows"], self.fig_path("win_rates"))), ""]
            lines += _table(["stage", "vs", "judge win rate", "judge W/T/L", "RM win rate", "RM", "RM agrees with "
                             "judge (decisive pairs)", "verdict"], table)
        if figures["disagreements"]:
            lines += ["", "Where they disagree (pairs the judge decides, ordered the other way by the reward model):",
                      ""]
            lines += _table(["stage", "prompt", "aligned response (judge, reward)", "SFT response (judge, reward)"],
                            [[n, _md_cell(a["prompt"], 40),
                              f"{_md_cell(a['response'], 60)} ({'pass' if a['judge'] else 'fail'}, {a['reward']:.2f})",
                              f"{_md_cell(b['response'], 60)} ({'pass' if b['judge'] else 'fail'}, {b['reward']:.2f})"]
                             for n, _, a, b in figures["disagreements"]])
        return lines

    def reward_model(self) -> list[str]:
        from alignpipe.report import plots
        lines: list[str] = reward_comparison(self.run)
        for rm in rf.reward_models(self.run):
            name = rm["stage"]
            lines += [f"## Reward model: {name}", ""]
            if rm["bars"]:
                lines.append(self.figure(plots.reward_accuracy(name, rm["bars"], self.fig_path(f"{name}_accuracy"))))
            if rm["facts"]:
                lines += ["", "Metrics: " + ", ".join(f"{k} {_fmt(v)}" for k, v in rm["facts"]) + "."]
            if rm["below_chance"] is not None:
                lines += ["", f"**At or below chance on its own held-out pairs ({rm['below_chance']:.1%}):** its "
                              "scores, and every win rate and verdict by it, are no evidence."]
            if rm["by_failure_type"]:
                lines += ["", "On-policy accuracy by what is wrong with the failing sample: " + ", ".join(
                    f"{t} {_fmt(row['accuracy'])} ({row['pairs']} pairs)" for t, row in rm["by_failure_type"].items())
                    + "."]
            if rm["calibration"]:
                path = plots.calibration(name, rm["calibration"], rm["ece"], self.fig_path(f"{name}_calibration"))
                lines += ["", self.figure(path)]
            if rm["series"]:
                lines += ["", "Reward against response length (a reward model that pays for length shows a "
                              "positive r within the failing samples too):", "",
                          self.figure(plots.reward_vs_length(rm["series"], self.fig_path(f"{name}_reward_vs_length")))]
            lines.append("")
        return lines

    def curves(self) -> list[str]:
        from alignpipe.report import plots
        lines = []
        for c in rf.curves(self.run):
            path = plots.training_curves(c["stage"], c["kind"], c["series"], c["xlabel"],
                                         self.fig_path(f"curves_{c['stage']}"))
            lines += [f"### {c['stage']} ({c['kind']})", "", self.figure(path), ""]
        return ["## Training curves", "", *lines] if lines else []

    def overoptimisation(self) -> list[str]:
        from alignpipe.report.overopt_section import section
        return section(self.run, self.fig_path, self.figure)

    def responses(self) -> list[str]:
        from alignpipe.report import plots
        figures = rf.responses(self.run)
        if figures is None:
            return []
        path = plots.response_lengths(figures["lengths"], figures["ended"], figures["caps"], self.fig_path("responses"))
        return ["## Response length and end-of-turn", "", self.figure(path)]


class Report(PlottedSections):
    """Renders a run folder's figures (`report_figures`) as `report.md` and its PNG figures."""

    def __init__(self, run_dir: Path, score_rewards: bool = True) -> None:
        self.run = rf.RunFolder(run_dir, score_rewards)
        self.run_dir = self.run.dir
        self.figures: list[Path] = []
        self.notes: list[tuple] = []  # what the sections' figures say a reader must know, in section order

    def write(self) -> Path:
        for old in self.run_dir.glob(f"{FIG_PREFIX}*.png"):  # figures of stages that no longer exist
            old.unlink()
        body: list[str] = []
        for section in (self.summary, self.verdicts, self.benchmarks, self.gates, self.lineage, self.pass_rate,
                        self.win_rates, self.tools, self.compared, lambda: did_it_hurt(self), self.reward_model,
                        self.scaling, self.curves, self.overoptimisation, self.responses, self.sample_table, self.data_attacks):
            lines = section()
            if lines:
                body += lines + [""]
        head = self.header()
        out = self.run_dir / "report.md"
        write_atomic(out, "\n".join(head + body).rstrip() + "\n")
        return out

    def scaling(self) -> list[str]:  # a scaling sweep's fits and figures (report/scaling_section.py)
        from alignpipe.report import scaling_section

        return [x for s in self.run.stages for x in scaling_section.section(s.name, s.dir, self.fig_path, self.figure)]

    def header(self) -> list[str]:
        stages = self.run.stages
        name = (stages[0].manifest.get("recipe_settings") or {}).get("name", self.run_dir.name)
        lines = [f"# Run report: {name}", "",
                 f"Generated {time.strftime('%Y-%m-%d %H:%M')} by alignpipe {__version__} from `{self.run_dir}`: "
                 f"{len(stages)} stage(s), {len(self.figures)} figure(s).", ""]
        missing = [n for n in rf.recipe_stage_names(stages) if n not in self.run.by_name]
        if missing:
            lines += [f"Stages of the recipe not run yet: {', '.join(missing)}.", ""]
        if self.notes:
            lines += [f"> **Note:** {note_text(n)}" for n in self.notes] + [""]
        return lines

    # --- sections

    def compared(self) -> list[str]:
        """Sibling stages side by side, and stages with earlier versions kept (`report.compare_section`)."""
        from alignpipe.report.compare_section import compared
        lines, notes = compared(self.run_dir)
        self.notes += notes
        return lines

    def tools(self) -> list[str]:
        """Tool use, for a recipe with `tools:` (`report.tools_section`)."""
        from alignpipe.report.tools_section import tools_section
        lines, figures = tools_section(self.run.stages, self.fig_path)
        self.figures += figures
        return lines

    def summary(self) -> list[str]:
        figures = rf.summary(self.run)
        self.notes += figures["notes"]
        rows = []
        for r in figures["rows"]:
            cells = [f"**{r['stage']}**", r["kind"], r["status"]]
            for k in figures["columns"]:
                v, ci = r["values"][k]
                n = r.get("counts", {}).get(k)
                cells.append((f"{v:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else _fmt(v)) + (f" (n={n})" if n is not None and v is not None else ""))
            rows.append(cells)
        return ["## Summary", "", *_table(["stage", "kind", "status", *figures["columns"]], rows)]

    def verdicts(self) -> list[str]:
        """Per policy stage: a verdict against its parent by each judge, from the interval of its win rate
        (the figures of the stage's manifest), the health of its responses, and where judges disagree."""
        figures = rf.verdicts(self.run)
        if figures is None:
            return []
        self.notes += figures["notes"]
        greedy = any(r["greedy"] for r in figures["rows"])
        rows = []
        for r in figures["rows"]:
            cells = [f"**{r['stage']}**", r["vs"] or "-", r["judge"], f"{r['rate']:.1%} [{r['lo']:.1%}, {r['hi']:.1%}]",
                     r["verdict"]]
            if greedy:
                g = r["greedy"]
                cells += [f"{g['rate']:.1%} [{g['lo']:.1%}, {g['hi']:.1%}]" if g else "-", g["verdict"] if g else "-"]
            rows.append(cells)
        health = [[h["stage"], _pct(h["eot_rate"]), _pct(h["repetition_rate"]), _fmt(h["distinct_2"]),
                   f"{_fmt(h['mean_response_tokens'], 1)} / {_fmt(h['p95_response_tokens'], 0)}",
                   _fmt(h["kl_to_reference"]), ", ".join(f"{n} {v:.1%}" for n, v in h["verifiers"]) or "-"]
                  for h in figures["health"]]
        examples = figures["examples"]
        lines = ["## Did it help?", "",
                 "Each stage's k-th sample of a held-out prompt against its parent's k-th sample of the same prompt, "
                 "by each judge: win rate (ties count half) with a 95% bootstrap interval over prompts. Verdict: "
                 "better / worse when the interval excludes 50%, else no clear difference; never `better` on a judge "
                 "the stage optimised (its reward model or reward function, a judge that labelled its pairs, a reward "
                 "model trained on its pairs): that row says so."
                 + (" Against the parent sampled greedily: the same samples against the parent's one greedy answer "
                    "per prompt, by the same judges; a stage that beats its parent at temperature 1 but not its "
                    "greedy parent may only have become colder (sharpened), not learned." if greedy else ""), ""]
        header = ["stage", "vs", "judge", "win rate [95% CI]", "verdict"]
        if greedy:
            header += ["vs parent greedy [95% CI]", "verdict (greedy parent)"]
        if rows:
            lines += _table(header, rows) + [""]
        elif figures["any_judge"]:
            lines += ["No stage has a parent's samples of the same prompts to compare with.", ""]
        else:
            lines += ["The stages have samples but no judge: add a verifier, a pairwise judge model or an endpoint "
                      "under `eval.judges`, or a reward stage (docs/did-it-help.md).", ""]
        for u in figures["unmeasured"]:
            lines += [f"- **`{u['stage']}`: {rf.NOT_MEASURED}** ({u['why']}); add a judge it did not optimise "
                      "(docs/did-it-help.md)."]
        if figures["unmeasured"]:
            lines.append("")
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
        rows = [[stage, task, metric, _fmt(value, 4)] for stage, task, metric, value in rf.benchmarks(self.run)]
        if not rows:
            return []
        return ["## Benchmarks (lm-evaluation-harness)", "", *_table(["stage", "task", "metric", "value"], rows)]

    def gates(self) -> list[str]:
        figures = rf.gates(self.run)
        self.notes += figures["notes"]
        rows = []
        for g in figures["rows"]:
            result = "passed" if g.get("passed") else "**MISSED**"
            rows.append([g["stage"], f"`{_md_cell(g.get('expr', ''))}`", _fmt(g.get("value"), 4),
                         _fmt(g.get("threshold"), 4), result + (f" ({_md_cell(g['reason'])})" if g.get("reason")
                                                                else "")])
        if not rows:
            return []
        return ["## Gates", "", *_table(["stage", "gate", "value", "threshold", "result"], rows)]

    def lineage(self) -> list[str]:
        figures = rf.lineage(self.run)
        rows = [[r["stage"], r["kind"], r["parent"], " → ".join(r["chain"]), r["checkpoint"], r["status"],
                 f"{r['wall_time_s']:.0f}", r["started"], r["versions"], f"`{r['git']}`"] for r in figures["rows"]]
        versions = {r[8] for r in rows}
        header = ["stage", "kind", "parent", "lineage", "checkpoint", "status", "wall s", "started", "versions", "git"]
        if len(versions) == 1:  # the common case: say it once
            rows = [r[:8] + r[9:] for r in rows]
            header = header[:8] + header[9:]
        lines = ["## Lineage", "", *_table(header, rows)]
        if len(versions) == 1 and (common := versions.pop()):
            lines += ["", f"Versions (all stages): {common}."]
        if figures["wall_times"]:
            from alignpipe.report import plots
            path = self.fig_path("wall_time")
            plots.wall_times([n for n, _ in figures["wall_times"]], [t for _, t in figures["wall_times"]], path)
            lines += ["", self.figure(path)]
        return lines

    def sample_table(self) -> list[str]:
        figures = rf.sample_rows(self.run)
        if figures is None:
            return []
        rows = []
        for p, cells in zip(figures["prompts"], figures["cells"]):
            row = [_md_cell(p, 40)]
            for r in cells:
                if r is None:
                    row.append("-")
                    continue
                mark = ("✅" if r.get("judge") else "❌") if "judge" in r else ""
                cut = "" if r.get("ended", True) else " *(cut off)*"
                row.append(f"{mark} {_md_cell(r['response'], 70)}{cut}")
            rows.append(row)
        return ["## Sample responses", "",
                f"The first sample of each policy stage for the same {len(figures['prompts'])} held-out prompts "
                "(✅ the judge passes it).", "", *_table(["prompt", *figures["stages"]], rows)]


def note_text(note: tuple) -> str:
    """One note of the report's header, from a section's `(what, stage, details...)`."""
    what, *rest = note
    if what == "judge_trained":
        return (f"stage `{rest[0]}` trained on the judge (`judge_used_for_training`), so its judge pass rate "
                "measures how well it fit its own training reward, not independent quality; read its reward-model "
                "win rate and samples instead.")
    if what == "failed":
        return f"stage `{rest[0]}` failed: {_md_cell(rest[1], 200)}"
    if what == "eval_failed":
        return (f"stage `{rest[0]}`'s evaluation failed: {_md_cell(rest[1], 200)} "
                f"(re-run it: `alignpipe eval {rest[2]}`).")
    if what == "gate_missed":
        g = rest[1]
        return (f"stage `{rest[0]}` missed its gate `{g.get('expr')}` "
                f"(value {_fmt(g.get('value'), 4)}, threshold {_fmt(g.get('threshold'), 4)}).")
    if what == "judge_and_rm_disagree":
        stage, judge, rm, base, trained_on_reward = rest
        return (f"the judge and the reward model disagree about `{stage}`: judge win rate {judge:.0%}, reward-model "
                f"win rate {rm:.0%} against `{base}`"
                + (" (it optimised that reward model: possible reward hacking)" if trained_on_reward else "") + ".")
    if what == "rm_below_chance":
        stage, rm, accuracy = rest
        return (f"reward model `{rm}` ranks only {accuracy:.1%} of its own held-out pairs right (chance: 50%); its "
                f"scores of `{stage}` are not evidence.")
    if what == "rm_unavailable":
        return f"reward-model scores unavailable ({_md_cell(rest[0], 160)})."
    return " ".join(str(x) for x in note)


def write_report(run_dir: Path, score_rewards: bool = True) -> tuple[Path, list[Path]]:
    """Write `run_dir/report.md` and its figures; returns the report's path and the figures'."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless, whatever the environment says
    report = Report(run_dir, score_rewards=score_rewards)
    path = report.write()
    return path, report.figures
