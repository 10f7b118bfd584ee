"""Where a policy stage's eval prompts come from, and how prompt files are read (`alignpipe.eval.selection`
decides which of them the stage is evaluated on).

Rows are `{"prompt": [messages ending with a user turn], "text": last user message, "answer": str | None}`.
In order: the stage's `eval: {prompts: FILE}`; the embedded world's held-out prompts (with answers);
the recipe's held-out prompts of its user data (`alignpipe.data.split`: the same for every stage; the
reference answer is the conversation's reply or the pair's chosen one). A recipe without user data and
without a prompts file is not evaluated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alignpipe.data.formats import DataError
from alignpipe.data.sources import read_file
from alignpipe.data.split import heldout_prompts
from alignpipe.errors import EvalError
from alignpipe.recipe.dataspec import world_part

ROLES = {"user": "user", "human": "user", "prompter": "user", "system": "system", "developer": "system",
         "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
ANSWER_KEYS = ("answer", "reference", "solution", "output", "completion", "chosen", "response")


def candidate_prompts(ctx) -> list[dict]:
    """Every eval prompt of `ctx`'s stage, before the contamination check and the `eval.num_prompts` cut
    (`alignpipe.eval.selection.eval_prompts` makes both)."""
    spec = ctx.config.eval
    if spec.prompts:
        rows = read_prompt_file(resolve(spec.prompts, ctx.recipe.path), f"stages.{ctx.name}.eval.prompts")
    elif world_part(ctx.config.data):  # also the world's pairs mixed with labelled ones
        rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "text": p["prompt"], "answer": p["answer"]}
                for p in ctx.world.eval_prompts()]
    else:
        rows = heldout_rows(ctx)
    return rows


def heldout_rows(ctx) -> list[dict]:
    """The recipe's held-out user prompts (`alignpipe.data.split`, one split for every stage), with the
    conversation's answer or the pair's chosen reply as the reference."""
    return [{"prompt": r["prompt"], "text": last_user(r["prompt"]), "answer": r["reference"]}
            for r in heldout_prompts(ctx) if r["prompt"] and r["prompt"][-1]["role"] == "user"]


def resolve(path: str, recipe_path: Path) -> Path:
    """A path from a recipe: beside the recipe first, else as given (from the working folder), as data paths."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    beside = Path(recipe_path).parent / p
    return beside if beside.exists() or not p.exists() else p


def last_user(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def conversation_row(messages: list[dict]) -> dict | None:
    """A conversation as a prompt: every turn before the last assistant turn, which is the answer."""
    cut = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)
    prompt = messages[:cut] if cut is not None else messages
    if not prompt or prompt[-1]["role"] != "user":
        return None
    return {"prompt": prompt, "text": last_user(prompt), "answer": messages[cut]["content"] if cut else None}


def _messages(value: Any) -> list[dict] | None:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        return None
    out = []
    for m in value:
        role = ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None or not isinstance(content, str):
            return None
        out.append({"role": role, "content": content})
    return out


def _text_of(value: Any) -> str | None:
    """A reference answer: a string, the first of a list of strings, or the last assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    msgs = _messages(value) if isinstance(value, list) else None
    if msgs:
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        return replies[-1] if replies else None
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    return None


def prompt_row(raw: dict) -> dict | None:
    """One file row -> a prompt row, or None when it has no user turn. Columns, first found: messages /
    conversations, prompt (string or messages), question, instruction (+ input), turns (MT-Bench: the first)."""
    if not isinstance(raw, dict):
        return None
    for key in ("messages", "conversations"):
        msgs = _messages(raw.get(key))
        if msgs:
            row = conversation_row(msgs)
            if row and row["answer"] is None:
                row["answer"] = _answer(raw)
            return row
    if isinstance(raw.get("chosen"), str) and "\n\nHuman:" in raw["chosen"] and "prompt" not in raw:
        return _hh_row(raw["chosen"])
    prompt = raw.get("prompt", raw.get("question"))
    if prompt is None and isinstance(raw.get("instruction"), str):
        prompt = "\n\n".join(p for p in (raw["instruction"], raw.get("input") or "") if p)
    if prompt is None and isinstance(raw.get("turns"), list) and raw["turns"]:
        prompt = raw["turns"][0]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    msgs = _messages(prompt)
    if not msgs or msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        return None
    return {"prompt": msgs, "text": msgs[-1]["content"], "answer": _answer(raw)}


def _hh_row(transcript: str) -> dict | None:
    """An Anthropic HH transcript ("\n\nHuman: ... \n\nAssistant: ..."): every turn before the last reply."""
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
             for who, text in zip(parts[1::2], parts[2::2])]
    return conversation_row(turns) if turns else None


def _answer(raw: dict) -> str | None:
    return next((a for k in ANSWER_KEYS if k in raw and (a := _text_of(raw[k])) is not None), None)


def read_prompt_file(path: Path, key: str) -> list[dict]:
    """Prompt rows of a .jsonl / .json / .csv / .parquet file; EvalError naming the file and line of a row
    without a user turn (nothing is dropped silently)."""
    if not path.is_file():
        raise EvalError(f"prompts file {path} not found", key=key,
                        fix="put the file there or point `prompts:` at it (jsonl/json/csv/parquet); without `prompts:` a stage "
                            "is evaluated on its held-out rows")
    try:
        raw = read_file(path, str(path))
    except DataError as err:
        raise EvalError(f"{err.file}: {err.what}", key=key, fix=err.fix) from None
    rows = []
    for number, r in zip(raw.row_numbers, raw.rows):
        row = prompt_row(r)
        if row is None:
            cols = ", ".join(sorted(r)) if isinstance(r, dict) else type(r).__name__
            raise EvalError(f"{path}: {raw.unit} {number} has no user turn (columns: {cols})", key=key,
                            fix="give each row a `prompt`, `question`, `instruction` or `messages` ending with the "
                                "user's turn")
        rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no prompts", key=key, fix="add rows with a user turn")
    return rows
