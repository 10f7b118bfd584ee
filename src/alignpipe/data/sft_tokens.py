"""SFT rows that TRL cannot tokenize as they are: turns with `loss_weight: 0`, tool calls and tool schemas.

TRL trains on every assistant turn (the template's `{% generation %}` blocks) and would put `tools` and
`tool_calls` through Arrow, which pads differing argument keys with nulls. Such rows are tokenized here:
`input_ids` and `assistant_masks` (TRL builds its labels from them), with each `loss_weight: 0` turn's
block masked out. Tool-call turns sit inside their assistant block, so they are trained on; tool results
are turns of their own, outside every block, so they are not.
"""

from __future__ import annotations

from typing import Any

from alignpipe.data.formats import DataError


def needs_own_tokens(rows: list[dict]) -> bool:
    """Whether any conversation has tools, tool calls or an untrained (loss_weight 0) turn."""
    return any(row.get("tools") or any(m.get("tool_calls") or m.get("loss_weight") == 0 for m in row["messages"])
               for row in rows)


def check_template_renders(row: dict, tokenizer: Any) -> None:
    """The chat template must write every tool call and tool result (templates without tool support drop them)."""
    text = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
    for m in row["messages"]:
        missing = [c["function"]["name"] for c in m.get("tool_calls") or [] if c["function"]["name"] not in text]
        if missing or (m["role"] == "tool" and m["content"].strip() and m["content"].strip() not in text):
            raise DataError("chat template", "tools", "the recipe's chat template does not render tool calls or "
                            "tool results, so a model would be trained without them",
                            "use chat_template: chatml or llama3 (both render tools), or a template that does")


def tokenize(row: dict, tokenizer: Any) -> dict:
    """One conversation -> {"input_ids", "assistant_masks"}, loss_weight-0 turns masked out."""
    out = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    mask = list(out["assistant_masks"])
    assistant = [m for m in row["messages"] if m["role"] == "assistant"]
    blocks = mask_spans(mask)
    if len(blocks) != len(assistant):
        raise DataError("chat template", "generation markers",
                        f"{len(blocks)} trained blocks for {len(assistant)} assistant turns",
                        "use a template whose {% generation %} block holds each assistant turn (chatml, llama3)")
    for (start, end), m in zip(blocks, assistant):
        if m.get("loss_weight") == 0:
            mask[start:end] = [0] * (end - start)
    return {"input_ids": list(out["input_ids"]), "assistant_masks": mask}


def tokenize_rows(rows: list[dict], tokenizer: Any) -> list[dict]:
    """Every row tokenized; rows left with nothing to train on (all turns weight 0) are an error, not a drop."""
    with_tools = next((r for r in rows if r.get("tools") or any(m.get("tool_calls") for m in r["messages"])), None)
    if with_tools is not None:
        check_template_renders(with_tools, tokenizer)
    out = [tokenize(r, tokenizer) for r in rows]
    empty = sum(1 for r in out if 1 not in r["assistant_masks"])
    if empty:
        raise DataError("data", "loss_weight", f"{empty} of {len(rows)} conversations have no turn to train on "
                        "(every assistant turn has loss_weight 0)", "give each conversation a trained turn")
    return out


def mask_spans(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s."""
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans
