"""Dataset formats: detect a dataset's format from its columns and normalise its rows.

Every format normalises to one of five *families*, the conversational shapes TRL's trainers take:

    text           {"text": str}                                           pretrain
    conversations  {"messages": [msg, ...]}                                sft
    pairs          {"prompt": [msg, ...], "chosen": [msg], "rejected": [msg]}   reward, dpo
    kto            {"prompt": [msg, ...], "completion": [msg], "label": bool}   kto (unpaired preference)
    prompts        {"prompt": [msg, ...]}                                  ppo, grpo, rloo

where a msg is {"role": "system" | "user" | "assistant" | "tool", "content": str} plus, where the data has
them, `tool_calls` and `loss_weight: 0.0` (see `alignpipe.data.messages`); a conversation may carry
`tools` (the function schemas its calls use).
`to_family` converts between families where that is well defined (a pair gives SFT its chosen
conversation; any conversation gives RL its prompt) and says why when it is not.

Bad rows are dropped with a reason, never fatal; a dataset with nothing usable left is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from alignpipe.data import messages as msgs, oasst
from alignpipe.data.messages import Drop as _Drop


class DataError(ValueError):
    """A problem with a dataset, as one line: `<file>: <where>: <what>; <fix>`."""

    def __init__(self, file: str, where: str, what: str, fix: str):
        self.file, self.where, self.what, self.fix = file, where, what, fix
        # One line, whatever the underlying error text looked like.
        super().__init__(" ".join(f"{file}: {where}: {what}; {fix}".split()))


# --------------------------------------------------------------------------- families

FAMILIES = ("text", "conversations", "pairs", "kto", "prompts")
ALIASES = {"unpaired": "kto"}  # the family's earlier name
# (each stage kind declares the family it trains on: alignpipe.recipe.kinds.StageKind.family)


# --------------------------------------------------------------------------- dropped rows


@dataclass
class Drops:
    """Dropped rows by reason: how many, the first few row numbers, and what the first one said."""

    counts: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, list[int]] = field(default_factory=dict)
    example: dict[str, str] = field(default_factory=dict)
    keep_first: int = 5

    def add(self, reason: str, row_number: int, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        firsts = self.first_rows.setdefault(reason, [])
        if len(firsts) < self.keep_first:
            firsts.append(row_number)
        self.example.setdefault(reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict]:
        return {
            reason: {"count": n, "first_rows": self.first_rows[reason], "example": self.example[reason]}
            for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1])
        }

    def summary(self, unit: str = "row") -> str:
        return ", ".join(
            f"{r} x{d['count']} (first at {d['first_rows'][0]}: {d['example']}; {unit}"
            f"{'s' if len(d['first_rows']) > 1 else ''} {', '.join(map(str, d['first_rows']))})"
            for r, d in self.as_dict().items()
        )


@dataclass
class NormalisedData:
    """Rows of one source, normalised to `family`, with where each came from and what was dropped."""

    source: str  # what the user wrote: a path or a hub id
    format: str  # the input format (alpaca, sharegpt, ...)
    family: str  # the shape of `rows` now
    rows: list[dict]
    row_numbers: list[int]  # 1-based line (jsonl, csv) or record index (json, parquet, hub) of each row
    rows_read: int
    drops: Drops
    detected: bool = False  # format came from `format: auto`
    unit: str = "row"  # "line" or "row": what row_numbers count
    notes: list[str] = field(default_factory=list)
    why: str = ""  # how the format was recognised, when detected


class BadLine:
    """A line of a file that could not be parsed: dropped with the other bad rows, not fatal on its own."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------- messages

def _get(row: dict, name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise _Drop("missing_field", f"no '{name}' field")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Drop("wrong_type", f"'{name}' is {type(value).__name__}, expected a string")
    return value


def _messages(value: Any, name: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    return msgs.messages(value, name, role_key, content_key)


def _with_tools(row: dict, out: dict) -> dict:
    """Carry a row's tool schemas (`tools`, a list or JSON text) with its conversation."""
    schemas = msgs.tools(row.get("tools"))
    if schemas:
        out["tools"] = schemas
    elif any(m.get("tool_calls") for m in out.get("messages", [])):
        raise _Drop("bad_tools", "the conversation calls tools but the row has no 'tools' schemas")
    return out


def _turns(value: Any, name: str, role: str) -> list[dict]:
    """A string (one turn by `role`) or a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, name)


def _check_response(turns: list[dict], name: str) -> None:
    """A response must be a non-empty run of turns ending in a non-empty assistant message."""
    if not turns:
        raise _Drop("empty_response", f"'{name}' has no response turn")
    if turns[0]["role"] != "assistant" or turns[-1]["role"] != "assistant":
        raise _Drop("prompt_mismatch", f"'{name}' does not continue the prompt with an assistant turn")
    if msgs.is_empty(turns[-1]):
        raise _Drop("empty_response", f"'{name}' response is empty")


def _check_prompt(turns: list[dict], name: str) -> None:
    if not turns or not any(m["content"].strip() for m in turns):
        raise _Drop("empty_prompt", f"'{name}' is empty")


# --------------------------------------------------------------------------- row normalisers


def _row_text(row: dict) -> dict:
    text = _text(_get(row, "text"), "text")
    if not text.strip():
        raise _Drop("empty_text", "'text' is empty")
    return {"text": text}


def _row_alpaca(row: dict) -> dict:
    instruction = _text(_get(row, "instruction"), "instruction")
    extra = _text(row.get("input") or "", "input")
    output = _text(_get(row, "output"), "output")
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": _text(row["system"], "system")})
    # LLaMA-Factory's alpaca carries earlier turns as [[question, answer], ...].
    for i, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise _Drop("wrong_type", f"'history'[{i}] is not a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    if not prompt.strip():
        raise _Drop("empty_prompt", "'instruction' and 'input' are empty")
    if not output.strip():
        raise _Drop("empty_response", "'output' is empty")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _row_sharegpt(row: dict) -> dict:
    conv = _get(row, "conversations")
    messages = _messages(conv, "conversations", *_sharegpt_keys(conv))
    if row.get("system") and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": _text(row["system"], "system")})
    return _with_tools(row, {"messages": messages})


def _sharegpt_keys(conv: Any) -> tuple[str, str]:
    # Most ShareGPT dumps use from/value; some re-exports switched to role/content.
    return ("role", "content") if conv and isinstance(conv[0], dict) and "role" in conv[0] else ("from", "value")


def _row_sharegpt_preference(row: dict) -> dict:
    """LLaMA-Factory's ranking format: `conversations` is the prompt, chosen/rejected one message each."""
    conv = _get(row, "conversations")
    prompt = _messages(conv, "conversations", *_sharegpt_keys(conv))
    if row.get("system") and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": _text(row["system"], "system")})
    sides = []
    for side in ("chosen", "rejected"):
        value = _get(row, side)
        if isinstance(value, str):
            sides.append([{"role": "assistant", "content": value}])
        else:
            value = value if isinstance(value, list) else [value]
            sides.append(_messages(value, side, *_sharegpt_keys(value)))
    return _pair(prompt, *sides)


def _row_alpaca_preference(row: dict) -> dict:
    """LLaMA-Factory's alpaca ranking format: instruction (+ input, system, history) and chosen/rejected answers."""
    chosen, rejected = _get(row, "chosen"), _get(row, "rejected")
    messages = _row_alpaca({**row, "output": "-"})["messages"][:-1]  # the prompt turns, as alpaca builds them
    return _pair(messages, _turns(chosen, "chosen", "assistant"), _turns(rejected, "rejected", "assistant"))


def _row_messages(row: dict) -> dict:
    return _with_tools(row, {"messages": _messages(_get(row, "messages"), "messages")})


def _row_messages_preference(row: dict) -> dict:
    """`chosen_messages` / `rejected_messages`: two whole conversations sharing their prompt turns."""
    chosen = _messages(_get(row, "chosen_messages"), "chosen_messages")
    rejected = _messages(_get(row, "rejected_messages"), "rejected_messages")
    prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
    if not prompt:
        raise _Drop("prompt_mismatch", "chosen and rejected do not start with the same prompt turn")
    return _pair(prompt, chosen, rejected)


def _kto_label(row: dict) -> bool:
    label = _get(row, "label")
    # CSV files carry booleans as text.
    if isinstance(label, str) and label.strip().lower() in _TRUE | _FALSE:
        label = label.strip().lower() in _TRUE
    elif isinstance(label, int) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise _Drop("wrong_type", f"'label' is {label!r}, expected true or false")
    return label


def _row_kto_messages(row: dict) -> dict:
    """A conversation ending in the judged assistant reply, and its `label` (LLaMA-Factory's kto_tag)."""
    messages = _messages(_get(row, "messages"), "messages")
    label = _kto_label(row)
    if messages[-1]["role"] != "assistant":
        raise _Drop("last_turn_not_assistant", f"last turn is {messages[-1]['role']}, expected assistant")
    cut = len(messages) - 1
    while cut > 0 and messages[cut - 1]["role"] == "assistant":
        cut -= 1
    prompt, completion = messages[:cut], messages[cut:]
    _check_prompt(prompt, "messages")
    _check_response(completion, "messages")
    return {"prompt": prompt, "completion": completion, "label": label}


def _row_prompt_completion(row: dict) -> dict:
    prompt = _turns(_get(row, "prompt"), "prompt", "user")
    completion = _turns(_get(row, "completion"), "completion", "assistant")
    _check_prompt(prompt, "prompt")
    _check_response(completion, "completion")
    return {"messages": prompt + completion}


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Full conversations -> (shared prompt, chosen rest, rejected rest).

    The prompt is the longest shared prefix, cut back so that both responses start with an assistant turn.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    if chosen == rejected:
        raise _Drop("identical_pair", "chosen and rejected are identical")
    _check_prompt(prompt, "prompt")
    _check_response(chosen, "chosen")
    _check_response(rejected, "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _row_preference(row: dict) -> dict:
    chosen_raw, rejected_raw = _get(row, "chosen"), _get(row, "rejected")
    chosen = _turns(chosen_raw, "chosen", "assistant")
    rejected = _turns(rejected_raw, "rejected", "assistant")
    if chosen == rejected:
        raise _Drop("identical_pair", "chosen and rejected are identical")
    if chosen[0]["role"] != "assistant":
        # UltraFeedback-binarised style: chosen/rejected are whole conversations, prompt included.
        prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
        if not prompt:
            raise _Drop("prompt_mismatch", "chosen and rejected do not start with the same prompt turn")
    else:
        prompt = _turns(_get(row, "prompt"), "prompt", "user")
    return _pair(prompt, chosen, rejected)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _parse_hh(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> messages."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text  # a few rows lack the leading blank line
    head, *parts = _HH_TURN.split(text)
    if head.strip() or not parts:
        raise _Drop("unparseable", f"'{name}' does not start with a 'Human:' turn")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[0::2], parts[1::2])
    ]


def _row_hh_rlhf(row: dict) -> dict:
    chosen = _parse_hh(_text(_get(row, "chosen"), "chosen"), "chosen")
    rejected = _parse_hh(_text(_get(row, "rejected"), "rejected"), "rejected")
    # HH pairs share every turn but the last assistant one: that turn is the completion.
    if chosen[:-1] != rejected[:-1]:
        raise _Drop("prompt_mismatch", "chosen and rejected differ before their last turn")
    return _pair(chosen[:-1], chosen[-1:], rejected[-1:])


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _row_kto(row: dict) -> dict:
    prompt = _turns(_get(row, "prompt"), "prompt", "user")
    completion = _turns(_get(row, "completion"), "completion", "assistant")
    label = _kto_label(row)
    _check_prompt(prompt, "prompt")
    _check_response(completion, "completion")
    return {"prompt": prompt, "completion": completion, "label": label}


def _row_turns(row: dict) -> dict:
    """MT-Bench style: `turns` is the user's questions in order; the first is the prompt (the later ones
    follow the model's own answers, so they cannot be asked up front)."""
    turns = _get(row, "turns")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
        raise _Drop("wrong_type", "'turns' is not a list of strings")
    prompt = [{"role": "user", "content": turns[0]}]
    _check_prompt(prompt, "turns")
    return {"prompt": prompt}


def _row_prompt_only(row: dict) -> dict:
    prompt = _turns(_get(row, "prompt"), "prompt", "user")
    _check_prompt(prompt, "prompt")
    return {"prompt": prompt}


def _oasst_flat(rows: list, numbers: list[int], family: str | None, drops: Drops):
    return oasst.normalise_messages(list(zip(rows, numbers)), family or "conversations", drops)


def _oasst_tree(rows: list, numbers: list[int], family: str | None, drops: Drops):
    flat = []
    for row, number in zip(rows, numbers):
        try:
            flat += oasst.flatten_tree(row, number)
        except _Drop as drop:
            drops.add(drop.reason, number, drop.detail)
    return oasst.normalise_messages(flat, family or "conversations", drops)


@dataclass(frozen=True)
class Format:
    name: str
    columns: frozenset[str]  # the columns that identify it
    family: str  # what its rows normalise to
    normalise_row: Callable[[dict], dict] | None  # raises _Drop for an unusable row
    example: str  # for error messages
    # Formats whose rows only mean something together (message trees): (rows, numbers, family, drops) ->
    # (rows of that family, their row numbers, notes, messages read).
    normalise_all: Callable | None = None
    families: tuple[str, ...] = ()  # the families normalise_all builds directly (beside `family`)


FORMATS = {
    f.name: f
    for f in [
        Format("text", frozenset({"text"}), "text", _row_text, "text"),
        Format("alpaca", frozenset({"instruction", "output"}), "conversations", _row_alpaca,
               "instruction/input/output"),
        Format("sharegpt", frozenset({"conversations"}), "conversations", _row_sharegpt,
               "conversations[from/value], optional tools"),
        Format("messages", frozenset({"messages"}), "conversations", _row_messages,
               "messages[role/content], optional tools"),
        Format("prompt_completion", frozenset({"prompt", "completion"}), "conversations", _row_prompt_completion,
               "prompt/completion"),
        Format("oasst", frozenset({"message_id", "parent_id", "text", "role"}), "conversations", None,
               "oasst1 flat rows: message_id/parent_id/text/role/rank", _oasst_flat, ("pairs",)),
        Format("oasst_tree", frozenset({"message_tree_id", "prompt"}), "conversations", None,
               "OpenAssistant tree export: message_tree_id/prompt{text, role, replies}", _oasst_tree, ("pairs",)),
        Format("preference", frozenset({"prompt", "chosen", "rejected"}), "pairs", _row_preference,
               "prompt/chosen/rejected (or chosen/rejected conversations)"),
        Format("hh_rlhf", frozenset({"chosen", "rejected"}), "pairs", _row_hh_rlhf,
               "chosen/rejected strings with '\\n\\nHuman:'/'\\n\\nAssistant:' turns"),
        Format("sharegpt_preference", frozenset({"conversations", "chosen", "rejected"}), "pairs",
               _row_sharegpt_preference, "conversations + one chosen/rejected message each (LLaMA-Factory ranking)"),
        Format("alpaca_preference", frozenset({"instruction", "chosen", "rejected"}), "pairs", _row_alpaca_preference,
               "instruction/input + chosen/rejected answers (LLaMA-Factory alpaca ranking)"),
        Format("messages_preference", frozenset({"chosen_messages", "rejected_messages"}), "pairs",
               _row_messages_preference, "chosen_messages/rejected_messages"),
        Format("kto", frozenset({"prompt", "completion", "label"}), "kto", _row_kto, "prompt/completion/label"),
        Format("kto_messages", frozenset({"messages", "label"}), "kto", _row_kto_messages, "messages/label"),
        Format("prompt_only", frozenset({"prompt"}), "prompts", _row_prompt_only, "prompt"),
        Format("turns", frozenset({"turns"}), "prompts", _row_turns, "turns (MT-Bench: the user's questions)"),
    ]
}

# Formats a family takes as they are; used to settle a dataset whose columns fit several formats
# (UltraFeedback has prompt/chosen/rejected *and* messages; Alpaca dumps often carry a `text` column).
_NATIVE = {
    "text": {"text"},
    "conversations": {"messages", "sharegpt", "alpaca", "prompt_completion", "oasst", "oasst_tree"},
    "pairs": {"preference", "hh_rlhf", "sharegpt_preference", "alpaca_preference", "messages_preference", "oasst", "oasst_tree"},
    "kto": {"kto", "kto_messages"},
    "prompts": {"prompt_only", "preference", "prompt_completion", "kto", "turns"},  # those with an explicit prompt
}


# --------------------------------------------------------------------------- detection


def _columns(rows: list, sample: int = 1000) -> set[str]:
    """Columns with a value in any of the first `sample` rows (parquet/hub fill absent ones with None)."""
    dicts = [row for row in rows[:sample] if isinstance(row, dict)]
    return {k for row in dicts for k, v in row.items() if v is not None and isinstance(k, str)}


def _expected() -> str:
    return "; ".join(f"{f.name} ({f.example})" for f in FORMATS.values())


def detect_format(rows: list, source_name: str, family: str | None = None) -> str:
    """Name of the format whose columns these rows have; `family` settles rows that fit several."""
    seen = _columns(rows)
    candidates = {name for name, f in FORMATS.items() if f.columns <= seen}
    # Chosen/rejected without a prompt column: HH raw strings, or whole conversations (preference).
    if "hh_rlhf" in candidates and "prompt" not in seen:
        first = next(r["chosen"] for r in rows if isinstance(r, dict) and r.get("chosen") is not None)
        if isinstance(first, list):
            candidates.discard("hh_rlhf")
            candidates.add("preference")
        elif not (isinstance(first, str) and "Human:" in first and "Assistant:" in first):
            candidates.discard("hh_rlhf")
    # A format whose columns are a strict subset of another match's is not what the data is
    # (prompt/completion/label is kto, not prompt_completion).
    candidates = {c for c in candidates if not any(FORMATS[c].columns < FORMATS[o].columns for o in candidates)}
    if len(candidates) > 1 and family is not None:
        candidates &= _NATIVE[family]
    if len(candidates) == 1:
        return candidates.pop()
    cols = ", ".join(sorted(seen)) or "none"
    if not seen and rows and all(isinstance(r, BadLine) for r in rows[:1000]):
        first = rows[0]
        raise DataError(source_name, "format: auto", f"no line could be read ({first.detail})",
                        "check that the file is JSON Lines, one object per line")
    if not candidates:
        raise DataError(source_name, "format: auto", f"unknown shape: columns [{cols}] match no known format",
                        f"expected one of: {_expected()}")
    raise DataError(source_name, "format: auto",
                    f"ambiguous: columns [{cols}] fit {' and '.join(sorted(candidates))}",
                    f"set format: to one of {', '.join(sorted(candidates))} in the recipe")


def detection_reason(fmt: str) -> str:
    """Why `fmt` was detected: the columns it recognised."""
    spec = FORMATS[fmt]
    return f"columns {', '.join(sorted(spec.columns))} ({spec.example})"


# --------------------------------------------------------------------------- normalise and convert


def _no_rows_left(data: NormalisedData, where: str) -> DataError:
    return DataError(data.source, where, f"no usable rows out of {data.rows_read} ({data.drops.summary(data.unit)})",
                     "fix the data, or check that format: matches it")


def normalise(
    rows: list,
    fmt: str = "auto",
    *,
    source: str = "<rows>",
    row_numbers: list[int] | None = None,
    family: str | None = None,
    unit: str = "row",
) -> NormalisedData:
    """Rows in `fmt` (or detected: "auto") -> rows of that format's family; with `family`, converted to it.

    Unusable rows are dropped and counted by reason; raises DataError when none are left.
    """
    family = ALIASES.get(family, family)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(rows, source, family)
    if fmt not in FORMATS:
        raise DataError(source, f"format: {fmt}", "unknown format", f"use auto or one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    numbers = row_numbers if row_numbers is not None else list(range(1, len(rows) + 1))
    data = NormalisedData(source, fmt, spec.family, [], [], len(rows), Drops(), detected, unit,
                          why=detection_reason(fmt) if detected else "")
    good = []
    for row, number in zip(rows, numbers):
        if isinstance(row, BadLine):
            data.drops.add(row.reason, number, row.detail)
        else:
            good.append((row, number))
    if spec.normalise_all is not None:
        built = family if family in spec.families else None
        data.rows, data.row_numbers, data.notes, messages_read = spec.normalise_all(
            [r for r, _ in good], [n for _, n in good], built, data.drops)
        data.family = built or spec.family
        data.rows_read = messages_read + len(rows) - len(good)  # a tree's rows are its messages
        if not data.rows:
            raise _no_rows_left(data, f"format {fmt}")
        return to_family(data, family) if family is not None else data
    for row, number in good:
        try:
            if not isinstance(row, dict):
                raise _Drop("wrong_type", f"row is a {type(row).__name__}, expected an object")
            data.rows.append(spec.normalise_row(row))
            data.row_numbers.append(number)
        except _Drop as drop:
            data.drops.add(drop.reason, number, drop.detail)
    if not data.rows:
        raise _no_rows_left(data, f"format {fmt}")
    return to_family(data, family) if family is not None else data


def _last_assistant(messages: list[dict]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)


def _sft_row(row: dict) -> dict:
    messages = row["messages"]
    if messages[-1]["role"] != "assistant":
        raise _Drop("last_turn_not_assistant", f"last turn is {messages[-1]['role']}, expected assistant")
    if msgs.is_empty(messages[-1]):
        raise _Drop("empty_response", "last assistant turn is empty")
    if len(messages) < 2 or not any(m["role"] == "user" for m in messages):
        raise _Drop("empty_prompt", "conversation has no user turn")
    return row


def _prompt_of_conversation(row: dict) -> dict:
    # The prompt is everything before the last assistant turn (or all of it, if it has none).
    messages = row["messages"]
    cut = _last_assistant(messages)
    prompt = messages[:cut] if cut is not None else messages
    _check_prompt(prompt, "messages")
    return {"prompt": prompt}


def _unpair(row: dict) -> list[dict]:
    return [
        {"prompt": row["prompt"], "completion": row["chosen"], "label": True},
        {"prompt": row["prompt"], "completion": row["rejected"], "label": False},
    ]


# (from, to) -> row converter returning one row, a list of rows, or raising _Drop.
_CONVERT: dict[tuple[str, str], Callable[[dict], dict | list[dict]]] = {
    ("conversations", "conversations"): _sft_row,
    ("pairs", "conversations"): lambda r: _sft_row({"messages": r["prompt"] + r["chosen"]}),
    ("conversations", "prompts"): _prompt_of_conversation,
    ("pairs", "prompts"): lambda r: {"prompt": r["prompt"]},
    ("kto", "prompts"): lambda r: {"prompt": r["prompt"]},
    ("pairs", "kto"): _unpair,
}
_NOTES = {
    ("pairs", "conversations"): "sft on the chosen response of each pair",
    ("pairs", "kto"): "each pair split into a desirable (chosen) and an undesirable (rejected) example",
    ("conversations", "prompts"): "prompt = every turn before the last assistant turn",
}


def to_family(data: NormalisedData, family: str) -> NormalisedData:
    """Convert normalised rows to `family` (what a stage trains on); DataError when that is impossible."""
    family = ALIASES.get(family, family)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if data.family == family and family != "conversations":
        return data
    convert = _CONVERT.get((data.family, family))
    if convert is None:
        wanted = ", ".join(sorted(_NATIVE[family]))
        raise DataError(data.source, f"format {data.format}",
                        f"{data.format} rows are {data.family}, but this stage needs {family}",
                        f"use a dataset in one of these formats: {wanted}")
    note = _NOTES.get((data.family, family))
    notes = data.notes + [note] if note else list(data.notes)
    out = NormalisedData(data.source, data.format, family, [], [], data.rows_read, data.drops, data.detected,
                         data.unit, notes, data.why)
    for row, number in zip(data.rows, data.row_numbers):
        try:
            new = convert(row)
        except _Drop as drop:
            data.drops.add(drop.reason, number, drop.detail)
            continue
        for r in new if isinstance(new, list) else [new]:
            out.rows.append(r)
            out.row_numbers.append(number)
    if not out.rows:
        raise _no_rows_left(out, f"format {data.format} as {family}")
    return out
