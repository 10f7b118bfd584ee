"""Tool metrics of a policy stage (a recipe with `tools:`): does it call the tool when it should, and well?

Each held-out tool prompt is answered twice, once with the recipe's tools executed (models/tool_episode.py) and
once without (a call is then no answer); each held-out plain prompt (a task that needs no tool) once, with tools.
One sample per prompt at the stage's eval temperature, seeded, and once more greedy (the same figures with
`_greedy` appended: `tool_pass_rate_with_tools_greedy`, ...). On the embedded tool world (`world: {tool_share}`)
the prompts are its held-out bigmul tasks and the world's held-out tasks, judged by `world_tools.tool_judge`; on
user data the stage's eval prompts are used and only the call figures are given (no pass rates: nothing says
which prompts need a tool or what the answer is).

  tool_pass_rate_with_tools / _without_tools   tool tasks answered right (valid calls only) with / without tools
  plain_pass_rate_with_tools                   plain tasks answered right with tools available
  tool_call_rate        tool tasks where the model called a tool
  valid_call_rate       calls that parsed, named a known tool and fit its schema, of all calls (None: no calls)
  wasted_call_rate      plain tasks where the model called a tool anyway
  turns_per_answer      model turns per episode that ended with an answer
  tool_failed_calls     calls that gave an error result (invalid, raised, timed out)
The episodes go to `eval_tool_samples.jsonl` beside the stage.
"""

from __future__ import annotations

from alignpipe.data.tools import check_call, resolve_tools, schemas
from alignpipe.data.world_tools import ToolWorld, tool_judge
from alignpipe.models.tool_episode import render_ids, run_episode, sampling_step
from alignpipe.runfolder.files import write_jsonl_atomic

TOOL_EVAL_PROMPTS = 100  # of each side: tool tasks and plain tasks
GREEDY_SUFFIX = "_greedy"  # the same figures from greedy decoding
TOOL_SAMPLES_FILE = "eval_tool_samples.jsonl"


def tool_eval_rows(ctx, n: int = TOOL_EVAL_PROMPTS) -> list[dict]:
    """`{"prompt", "needs_tool"}` rows: the tool world's held-out tasks, else the stage's eval prompts (needs_tool
    None: unknown)."""
    if "embedded" in ctx.config.data and isinstance(ctx.world, ToolWorld):
        return ctx.world.tool_eval_prompts(n)
    from alignpipe.eval.selection import checked_eval_prompts

    rows, _, _ = checked_eval_prompts(ctx)
    return [{"prompt": r["prompt"], "needs_tool": None} for r in rows[:2 * n]]


def tool_metrics(ctx, policy, tokenizer, rows: list[dict] | None = None) -> dict:
    """The tool figures of `policy` (see the module docstring), sampled and greedy; the episodes are written beside
    the stage."""
    import torch

    spec = ctx.config.eval
    tools = resolve_tools(ctx.recipe.tools, str(ctx.recipe.path))
    rows = rows if rows is not None else tool_eval_rows(ctx)
    room = getattr(policy.config, "max_position_embeddings", None) or 4096
    fits = [r for r in rows if len(render_ids(tokenizer, _messages(r), schemas(tools), True)) + spec.max_new_tokens
            <= room]  # the others: the prompt and one answer do not fit the model's context
    torch.manual_seed(ctx.seed)
    sampled = _episodes(ctx, sampling_step(policy, spec.temperature, spec.top_p), tokenizer, tools, fits)
    greedy = _episodes(ctx, sampling_step(policy, greedy=True), tokenizer, tools, fits)
    write_jsonl_atomic(ctx.dir / TOOL_SAMPLES_FILE, [{**r, "greedy": False} for r in sampled]
                       + [{**r, "greedy": True} for r in greedy])
    skipped = len(rows) - len(fits)
    return {**summarise(sampled), **{f"{k}{GREEDY_SUFFIX}": v for k, v in summarise(greedy).items()},
            **({"tool_eval_prompts_skipped": skipped} if skipped else {})}


def _messages(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]


def _episodes(ctx, step, tokenizer, tools: dict, rows: list[dict]) -> list[dict]:
    """One episode per row with the tools executed, and one without for rows that need a tool."""
    turns, timeout = getattr(ctx.config, "max_tool_turns", 3), getattr(ctx.config, "tool_timeout_s", 2.0)
    budget = ctx.config.eval.max_new_tokens * turns
    out = []
    for row in rows:
        prompt = _messages(row)
        for execute in ((True, False) if row["needs_tool"] else (True,)):
            ep = run_episode(step, tokenizer, prompt, tools, turns, budget, execute, timeout)
            for c in ep.calls:
                check_call(c, tools)
            text = prompt[-1]["content"]
            passed = tool_judge(text, ep.final, ep.calls, tools) if row["needs_tool"] is not None else None
            out.append({"prompt": text, "needs_tool": row["needs_tool"], "tools": execute, "messages": ep.messages,
                        "final": ep.final, "answered": ep.answered, "turns": ep.turns, "passed": passed,
                        "calls": len(ep.calls), "valid_calls": sum(c.valid for c in ep.calls),
                        "failed_calls": ep.failed_calls})
    return out


def _rate(rows: list[dict], test) -> float | None:
    return sum(1 for r in rows if test(r)) / len(rows) if rows else None


def summarise(out: list[dict]) -> dict:
    """The tool figures of a list of episode rows (as `tool_metrics` writes them)."""
    with_tools = [r for r in out if r["tools"]]
    tool_side = [r for r in with_tools if r["needs_tool"]]
    plain = [r for r in with_tools if r["needs_tool"] is False]
    without = [r for r in out if not r["tools"]]
    calls = sum(r["calls"] for r in with_tools)
    answered = [r for r in with_tools if r["answered"]]
    figures = {
        "tool_eval_episodes": len(out),
        "tool_pass_rate_with_tools": _rate(tool_side, lambda r: r["passed"]),
        "tool_pass_rate_without_tools": _rate(without, lambda r: r["passed"]),
        "plain_pass_rate_with_tools": _rate(plain, lambda r: r["passed"]),
        "tool_call_rate": _rate(tool_side if tool_side or plain else with_tools, lambda r: r["calls"] > 0),
        "valid_call_rate": sum(r["valid_calls"] for r in with_tools) / calls if calls else None,
        "wasted_call_rate": _rate(plain, lambda r: r["calls"] > 0),
        "turns_per_answer": sum(r["turns"] for r in answered) / len(answered) if answered else None,
        "tool_failed_calls": sum(r["failed_calls"] for r in with_tools),
    }
    return {k: v for k, v in figures.items() if v is not None}
