"""The run report's tool-use section (a recipe with `tools:`, eval/tools.py): per policy stage, the pass rate on
tool tasks without and with tools, on plain tasks with tools, the call, valid-call and wasted-call rates, turns per
answer and failed calls; and a figure of the pass rates. Empty when no stage recorded tool figures."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (("tool_pass_rate_without_tools", "tool tasks, no tools"), ("tool_pass_rate_with_tools", "tool tasks, tools"),
           ("tool_pass_rate_with_tools_greedy", "tool tasks, tools, greedy"),
           ("plain_pass_rate_with_tools", "plain tasks, tools"), ("tool_call_rate", "call rate"),
           ("valid_call_rate", "valid calls"), ("wasted_call_rate", "wasted calls"),
           ("turns_per_answer", "turns / answer"), ("tool_failed_calls", "failed calls"))


def _cell(v) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def tool_rows(stages) -> list[tuple[str, dict]]:
    return [(s.name, s.metrics) for s in stages if "tool_eval_episodes" in s.metrics]


def tools_section(stages, fig_path) -> tuple[list[str], list[Path]]:
    """(Markdown lines, figures written) for the stages of a run (objects with `.name` and `.metrics`)."""
    rows = tool_rows(stages)
    if not rows:
        return [], []
    lines = ["## Tool use", "",
             "Held-out tool tasks answered without tools (a call is no answer) and with the recipe's tools executed; "
             "plain tasks need no tool, so a call there is wasted. Valid calls parse, name a known tool and fit its "
             "schema. One episode per prompt at the stage's eval temperature, and greedy where the column says so "
             "(eval/tools.py; the episodes are in each stage's `eval_tool_samples.jsonl`).", "",
             "| stage | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join([name] + [_cell(m.get(key)) for key, _ in COLUMNS]) + " |" for name, m in rows]
    figures = []
    if any("tool_pass_rate_with_tools" in m for _, m in rows):
        figures.append(plot_tool_pass_rates(rows, fig_path("tool-pass-rates")))
        lines += ["", f"![{figures[0].stem}]({figures[0].name})"]
    return lines, figures


def plot_tool_pass_rates(rows: list[tuple[str, dict]], out: Path) -> Path:
    from matplotlib.figure import Figure

    keys = [("tool_pass_rate_without_tools", "tool tasks, no tools"), ("tool_pass_rate_with_tools", "tool tasks, tools"),
            ("plain_pass_rate_with_tools", "plain tasks, tools"), ("wasted_call_rate", "wasted calls")]
    fig = Figure(figsize=(1.6 + 1.4 * len(rows), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        ax.bar([i + k * width for i in range(len(rows))], [m.get(key) or 0.0 for _, m in rows], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [name for name, _ in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
