"""`alignpipe chat` and `generate` with tools: the stage's recipe `tools:` (recorded in its manifest) or
`--tools module:function ...`, executed as the model calls them (models/tool_episode.py); chat prints each call
and its result before the answer, generate writes them into each row (`messages`, `tool_calls`, `failed_calls`)."""

from __future__ import annotations

import json

from alignpipe.data.tools import Tool, resolve_tools
from alignpipe.models.tool_episode import Episode, run_episode, sampling_step

CHAT_MAX_TURNS = 4


def stage_tools(args, manifest: dict) -> dict[str, Tool]:
    """The tools a chat or generate run executes: `--tools`, else the stage's recipe `tools:`, else none."""
    names = getattr(args, "tools", None) or (manifest.get("recipe_settings") or {}).get("tools") or []
    return resolve_tools(list(names), where="--tools" if getattr(args, "tools", None) else "manifest.json")


def show_episode(ep: Episode) -> list[str]:
    """What chat prints for one answer: each call, its result, then the answer."""
    lines = []
    for m in ep.messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            if m["content"]:
                lines.append(f"assistant> {m['content']}")
            for c in m["tool_calls"]:
                lines.append(f"  [tool call] {c['function']['name']}({json.dumps(c['function']['arguments'])})")
        elif m["role"] == "tool":
            lines.append(f"  [tool result] {m['content']}")
        else:
            lines.append(f"assistant> {m['content']}")
    if not ep.answered:
        lines.append(f"  (no final answer within {ep.turns} turn(s) or the token limit)")
    return lines


def chat_turn(step, tokenizer, messages: list[dict], tools: dict[str, Tool], max_tokens: int) -> Episode:
    """One answer to the conversation so far, tools executed; the conversation gains its turns."""
    ep = run_episode(step, tokenizer, messages, tools, CHAT_MAX_TURNS, max_tokens)
    messages += ep.messages
    return ep


def tool_chat(args, model, tokenizer, tools: dict[str, Tool], stops: list[int]) -> int:
    """The chat loop with tools (answers are printed whole, after the calls, not streamed)."""
    step = sampling_step(model, args.temperature or 1.0, args.top_p, greedy=args.temperature <= 0, stops=stops)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"[alignpipe] tools: {', '.join(tools)}", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)")
            continue
        if line:
            messages.append({"role": "user", "content": line})
            ep = chat_turn(step, tokenizer, messages, tools, args.max_new_tokens * CHAT_MAX_TURNS)
            print("\n".join(show_episode(ep)), flush=True)


def generate_with_tools(args, model, tokenizer, rows: list[dict], tools: dict[str, Tool], stops: list[int]) -> list:
    """Each row answered with tools executed: its final `response`, `messages`, `tool_calls`, `failed_calls`."""
    step = sampling_step(model, args.temperature or 1.0, args.top_p, greedy=args.temperature <= 0, stops=stops)
    system = [{"role": "system", "content": args.system}] if args.system else []
    out = []
    for row in rows:
        prompt = system + (row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}])
        ep = run_episode(step, tokenizer, prompt, tools, CHAT_MAX_TURNS, args.max_new_tokens * CHAT_MAX_TURNS)
        out.append({**row, "response": ep.final, "ended": ep.answered, "turns": ep.turns, "messages": ep.messages,
                    "tool_calls": len(ep.calls), "failed_calls": ep.failed_calls})
    return out
