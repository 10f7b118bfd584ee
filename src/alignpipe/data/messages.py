"""One chat message as the field writes it -> the message alignpipe trains on.

A normalised message is `{"role": "system" | "user" | "assistant" | "tool", "content": str}`, plus, where
the source has them:

    tool_calls   [{"type": "function", "function": {"name": str, "arguments": str (JSON)}}]   assistant only
    loss_weight  0.0: an assistant turn the SFT loss skips (LLaMA-Factory `loss_weight`, OpenAI `weight`)

Content may be a string or a list of typed parts (OpenAI `{type: text, text}`, LLaMA-Factory v1
`{type: text, value}`); `reasoning` / `thinking` parts become a `<think>...</think>` block before the text,
`tool_call` parts become tool calls. Arguments are kept as JSON text: a dataset's calls have different
argument keys, and Arrow would merge them into one struct padded with nulls.
"""

from __future__ import annotations

import json
from typing import Any


class Drop(Exception):
    """Raised by a row normaliser: this row is unusable, for `reason` (a short code)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# Role names seen in the wild (ShareGPT, LLaMA-Factory, Gemini-style) -> the four TRL chat templates use.
ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
    "function_call": "assistant",  # ShareGPT tool-call turn: its value is the call
}
TEXT_PARTS = {"text", "input_text", "output_text"}
THINK_PARTS = {"reasoning", "thinking"}


def _json(value: Any, name: str, reason: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise Drop(reason, f"'{name}' is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise Drop(reason, f"'{name}' is JSON nested too deeply") from None


def tool_call(value: Any, name: str) -> dict:
    """{name, arguments} (or OpenAI's {type, function: {name, arguments}}) -> a normalised tool call."""
    value = _json(value, name, "bad_tool_call")
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]):
        raise Drop("bad_tool_call", f"'{name}' is not a call with a 'name'")
    arguments = _json(value.get("arguments", value.get("parameters", {})), f"{name}.arguments", "bad_tool_call")
    if not isinstance(arguments, dict):
        raise Drop("bad_tool_call", f"'{name}' arguments are {type(arguments).__name__}, expected an object")
    return {"type": "function", "function": {"name": value["name"], "arguments": json.dumps(arguments)}}


def tool_calls(value: Any, name: str) -> list[dict]:
    value = _json(value, name, "bad_tool_call")
    return [tool_call(v, f"{name}[{i}]") for i, v in enumerate(value)] if isinstance(value, list) \
        else [tool_call(value, name)]


def tools(value: Any, name: str = "tools") -> list[dict] | None:
    """A row's tool schemas (a list, or JSON text of one) as OpenAI function tools; None when absent."""
    if value in (None, "", []):
        return None
    value = _json(value, name, "bad_tools")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Drop("bad_tools", f"'{name}' is not a list of tool schemas")
    out = []
    for i, t in enumerate(value):
        schema = t.get("function", t) if t.get("type", "function") == "function" else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise Drop("bad_tools", f"'{name}'[{i}] is not a function schema with a 'name'")
        out.append({"type": "function", "function": schema})
    return out


def content(value: Any, name: str) -> tuple[str, list[dict]]:
    """Message content as (text, tool calls found among its parts)."""
    if value is None:
        return "", []
    if isinstance(value, str):
        return value, []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise Drop("wrong_type", f"'{name}' content is {type(value).__name__}, expected text or a list of parts")
    thoughts, texts, calls = [], [], []
    for i, part in enumerate(value):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        body = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if kind in TEXT_PARTS or kind in THINK_PARTS:
            if not isinstance(body, str):
                raise Drop("wrong_type", f"'{name}'[{i}] {kind} part has no text")
            (thoughts if kind in THINK_PARTS else texts).append(body)
        elif kind == "tool_call":
            calls.append(tool_call(body, f"{name}[{i}]"))
        else:
            raise Drop("unsupported_content", f"'{name}'[{i}] is a {kind!r} part; text, reasoning and tool_call "
                                              "parts are read")
    think = "".join(f"<think>\n{t.strip()}\n</think>\n\n" for t in thoughts)
    return think + "".join(texts), calls


def message(msg: Any, name: str, role_key: str = "role", content_key: str = "content") -> dict:
    """One message in any of the field's shapes -> a normalised message."""
    if not isinstance(msg, dict) or role_key not in msg:
        raise Drop("wrong_type", f"'{name}' is not a message with '{role_key}'")
    raw_role = str(msg[role_key]).lower()
    role = ROLES.get(raw_role)
    if role is None:
        raise Drop("unknown_role", f"'{name}' has role {msg[role_key]!r}")
    if raw_role == "function_call":  # ShareGPT: the value is the call itself
        return {"role": "assistant", "content": "", "tool_calls": tool_calls(msg.get(content_key), name)}
    text, calls = content(msg.get(content_key), name)
    out: dict[str, Any] = {"role": role, "content": text}
    if msg.get("tool_calls") or msg.get("function_call"):
        calls += tool_calls(msg.get("tool_calls") or msg["function_call"], f"{name}.tool_calls")
    if calls:
        if role != "assistant":
            raise Drop("bad_tool_call", f"'{name}' is a {role} turn with tool calls")
        out["tool_calls"] = calls
    weight = msg.get("loss_weight", msg.get("weight"))
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise Drop("wrong_type", f"'{name}' loss_weight is {weight!r}, expected a number >= 0")
        if role == "assistant" and weight == 0:
            out["loss_weight"] = 0.0
    return out


def messages(value: Any, name: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    """A list of messages -> normalised messages."""
    if not isinstance(value, list):
        raise Drop("wrong_type", f"'{name}' is {type(value).__name__}, expected a list of messages")
    if not value:
        raise Drop("empty_conversation", f"'{name}' is an empty list")
    return [message(m, f"{name}[{i}]", role_key, content_key) for i, m in enumerate(value)]


def is_empty(msg: dict) -> bool:
    """A turn with no text and no tool call."""
    return not msg["content"].strip() and not msg.get("tool_calls")
