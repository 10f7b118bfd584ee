"""Dataset formats: detect a dataset's format from its columns and normalise its rows.

Every format normalises to one of five *families*, the conversational shapes TRL's trainers take:

    text           {"text": str}                                           pretrain
    conversations  {"messages": [msg, ...]}                                sft
    pairs          {"prompt": [msg, ...], "chosen": [msg], "rejected": [msg]}   reward, dpo
    unpaired       {"prompt": [msg, ...], "completion": [msg], "label": bool}   kto
    prompts        {"prompt": [msg, ...]}                                  ppo, grpo, rloo

where a msg is {"role": "system" | "user" | "assistant" | "tool", "content": str}.
`to_family` converts between families where that is well defined (a pair gives SFT its chosen
conversation; any conversation gives RL its prompt) and says why when it is not.

Bad rows are dropped with a reason, never fatal; a dataset with nothing usable left is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable


class DataError(ValueError):
    """A problem with a dataset, as one line: `<file>: <where>: <what>; <fix>`."""

    def __init__(self, file: str, where: str, what: str, fix: str):
        self.file, self.where, self.what, self.fix = file, where, what, fix
        # One line, whatever the underlying error text looked like.
        super().__init__(" ".join(f"{file}: {where}: {what}; {fix}".split()))


# --------------------------------------------------------------------------- families

FAMILIES = ("text", "conversations", "pairs", "unpaired", "prompts")

FAMILY_OF_STAGE = {
    "pretrain": "text",
    "sft": "conversations",
    "reward": "pairs",
    "dpo": "pairs",
    "kto": "unpaired",
    "orpo": "pairs",
    "cpo": "pairs",
    "ppo": "prompts",
    "grpo": "prompts",
    "rloo": "prompts",
}


def family_for_stage(stage_kind: str) -> str:
    """The data family a stage kind trains on (`sft` -> `conversations`, ...)."""
    if stage_kind not in FAMILY_OF_STAGE:
        raise KeyError(f"no data family for stage kind {stage_kind!r}; known: {', '.join(FAMILY_OF_STAGE)}")
    return FAMILY_OF_STAGE[stage_kind]


# --------------------------------------------------------------------------- dropped rows


class _Drop(Exception):
    """Raised by a row normaliser: this row is unusable, for `reason` (a short code)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


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

    def summary(self) -> str:
        return ", ".join(
            f"{r} x{d['count']} (first at {d['first_rows'][0]}: {d['example']})" for r, d in self.as_dict().items()
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


# --------------------------------------------------------------------------- messages

# Role names seen in the wild (ShareGPT, LLaMA-Factory, Gemini-style) -> the four TRL chat templates use.
_ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool",
}


def _get(row: dict, name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise _Drop("missing_field", f"no '{name}' field")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Drop("wrong_type", f"'{name}' is {type(value).__name__}, expected a string")
    return value


def _content(content: Any, name: str) -> str:
    """Message content as a string; OpenAI-style lists of text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise _Drop("wrong_type", f"'{name}' has a {type(content).__name__} content, expected text")


def _messages(value: Any, name: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    """A list of {role, content} dicts (or {from, value} for ShareGPT) -> normalised messages."""
    if not isinstance(value, list):
        raise _Drop("wrong_type", f"'{name}' is {type(value).__name__}, expected a list of messages")
    if not value:
        raise _Drop("empty_conversation", f"'{name}' is an empty list")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or role_key not in msg:
            raise _Drop("wrong_type", f"'{name}'[{i}] is not a message with '{role_key}'")
        role = _ROLES.get(str(msg[role_key]).lower())
        if role is None:
            raise _Drop("unknown_role", f"'{name}'[{i}] has role {msg[role_key]!r}")
        out.append({"role": role, "content": _content(msg.get(content_key), f"{name}[{i}]")})
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
    if not turns[-1]["content"].strip():
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
    # Most ShareGPT dumps use from/value; some re-exports switched to role/content.
    keys = ("role", "content") if conv and isinstance(conv[0], dict) and "role" in conv[0] else ("from", "value")
    messages = _messages(conv, "conversations", *keys)
    if row.get("system") and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": _text(row["system"], "system")})
    return {"messages": messages}


def _row_messages(row: dict) -> dict:
    return {"messages": _messages(_get(row, "messages"), "messages")}


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


def _row_kto(row: dict) -> dict:
    prompt = _turns(_get(row, "prompt"), "prompt", "user")
    completion = _turns(_get(row, "completion"), "completion", "assistant")
    label = _kto_label(row)
    _check_prompt(prompt, "prompt")
    _check_response(completion, "completion")
    return {"prompt": prompt, "completion": completion, "label": label}


def _row_kto_messages(row: dict) -> dict:
    """LLaMA-Factory's KTO rows (its `kto_en_demo.json`): `messages` ending in the judged assistant reply,
    and a boolean `label`. Added for the kto stage (issue 20): the prompt is every turn before that reply."""
    messages = _messages(_get(row, "messages"), "messages")
    label = _kto_label(row)
    cut = _last_assistant(messages)
    if cut is None or cut != len(messages) - 1:
        raise _Drop("last_turn_not_assistant", f"last turn is {messages[-1]['role']}, expected the judged "
                                               "assistant reply")
    prompt, completion = messages[:cut], messages[cut:]
    _check_prompt(prompt, "messages")
    _check_response(completion, "messages")
    return {"prompt": prompt, "completion": completion, "label": label}


def _row_prompt_only(row: dict) -> dict:
    prompt = _turns(_get(row, "prompt"), "prompt", "user")
    _check_prompt(prompt, "prompt")
    return {"prompt": prompt}


@dataclass(frozen=True)
class Format:
    name: str
    columns: frozenset[str]  # the columns that identify it
    family: str  # what its rows normalise to
    normalise_row: Callable[[dict], dict]  # raises _Drop for an unusable row
    example: str  # for error messages


FORMATS = {
    f.name: f
    for f in [
        Format("text", frozenset({"text"}), "text", _row_text, "text"),
        Format("alpaca", frozenset({"instruction", "output"}), "conversations", _row_alpaca,
               "instruction/input/output"),
        Format("sharegpt", frozenset({"conversations"}), "conversations", _row_sharegpt, "conversations[from/value]"),
        Format("messages", frozenset({"messages"}), "conversations", _row_messages, "messages[role/content]"),
        Format("prompt_completion", frozenset({"prompt", "completion"}), "conversations", _row_prompt_completion,
               "prompt/completion"),
        Format("preference", frozenset({"prompt", "chosen", "rejected"}), "pairs", _row_preference,
               "prompt/chosen/rejected (or chosen/rejected conversations)"),
        Format("hh_rlhf", frozenset({"chosen", "rejected"}), "pairs", _row_hh_rlhf,
               "chosen/rejected strings with '\\n\\nHuman:'/'\\n\\nAssistant:' turns"),
        Format("kto", frozenset({"prompt", "completion", "label"}), "unpaired", _row_kto, "prompt/completion/label"),
        Format("kto_messages", frozenset({"messages", "label"}), "unpaired", _row_kto_messages,
               "messages[role/content] + label (LLaMA-Factory's KTO)"),
        Format("prompt_only", frozenset({"prompt"}), "prompts", _row_prompt_only, "prompt"),
    ]
}

# Formats a family takes as they are; used to settle a dataset whose columns fit several formats
# (UltraFeedback has prompt/chosen/rejected *and* messages; Alpaca dumps often carry a `text` column).
_NATIVE = {
    "text": {"text"},
    "conversations": {"messages", "sharegpt", "alpaca", "prompt_completion"},
    "pairs": {"preference", "hh_rlhf"},
    "unpaired": {"kto", "kto_messages"},
    "prompts": {"prompt_only", "preference", "prompt_completion", "kto"},  # those with an explicit prompt
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
    if not candidates:
        raise DataError(source_name, "format: auto", f"unknown shape: columns [{cols}] match no known format",
                        f"expected one of: {_expected()}")
    raise DataError(source_name, "format: auto",
                    f"ambiguous: columns [{cols}] fit {' and '.join(sorted(candidates))}",
                    f"set format: to one of {', '.join(sorted(candidates))} in the recipe")


# --------------------------------------------------------------------------- normalise and convert


def _no_rows_left(data: NormalisedData, where: str) -> DataError:
    return DataError(data.source, where, f"no usable rows out of {data.rows_read} ({data.drops.summary()})",
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
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(rows, source, family)
    if fmt not in FORMATS:
        raise DataError(source, f"format: {fmt}", "unknown format", f"use auto or one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    numbers = row_numbers if row_numbers is not None else list(range(1, len(rows) + 1))
    data = NormalisedData(source, fmt, spec.family, [], [], len(rows), Drops(), detected, unit)
    for row, number in zip(rows, numbers):
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
    if not messages[-1]["content"].strip():
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
    ("unpaired", "prompts"): lambda r: {"prompt": r["prompt"]},
    ("pairs", "unpaired"): _unpair,
}
_NOTES = {
    ("pairs", "conversations"): "sft on the chosen response of each pair",
    ("pairs", "unpaired"): "each pair split into a desirable (chosen) and an undesirable (rejected) example",
    ("conversations", "prompts"): "prompt = every turn before the last assistant turn",
}


def to_family(data: NormalisedData, family: str) -> NormalisedData:
    """Convert normalised rows to `family` (what a stage trains on); DataError when that is impossible."""
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
                         data.unit, notes)
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
