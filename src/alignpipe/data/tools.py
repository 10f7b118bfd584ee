"""Tools a model may call: their JSON schemas, the tool-call text a model writes, checking and running a call.

A tool is a Python function named `module:function` (a recipe's `tools:`); its schema comes from its signature
and docstring through transformers' `get_json_schema`, so a function without type hints or an `Args:` section
fails at validate time with one line naming it. A model calls a tool by writing, in its turn,

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "37 * 48"}}
    </tool_call>

(the Qwen2.5 form that the built-in chat templates render `tool_calls` as). `run_call` checks the call against
the schema and runs it with a time limit; a call that does not parse, names no known tool, has arguments that do
not fit, raises or times out gives an error result (a string starting `error:`), which is counted, never raised.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from alignpipe.callables import import_callable
from alignpipe.errors import RecipeError

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"
DEFAULT_TIMEOUT_S = 2.0
MAX_RESULT_CHARS = 200  # a tool's result is cut here: a tiny model's context is short
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


@dataclass(frozen=True)
class Tool:
    name: str
    function: Callable
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}

    @property
    def parameters(self) -> dict:
        return self.schema["function"].get("parameters", {})


def tool_from_function(fn: Callable, where: str = "", key: str = "tools") -> Tool:
    """A Tool with its schema from `fn`'s signature and docstring (transformers' get_json_schema)."""
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as err:  # noqa: BLE001 - DocstringParsingException, TypeHintParsingException
        raise RecipeError(f"tool {getattr(fn, '__name__', fn)!r} has no JSON schema: {err}", where=where, key=key,
                          fix="give every argument a type hint and a line in the docstring's `Args:` section") from None
    return Tool(schema["function"]["name"], fn, schema)


def resolve_tools(names: list[str], where: str = "") -> dict[str, Tool]:
    """The recipe's `tools: [module:function, ...]`, by tool name; a duplicate name is an error."""
    tools: dict[str, Tool] = {}
    for i, spec in enumerate(names):
        key = f"tools[{i}]"
        fn = import_callable(spec, "tool", "alignpipe.data.world_tools:calculator",
                             "a function with type hints and a docstring", where=where, key=key)
        tool = tool_from_function(fn, where, key)
        if tool.name in tools:
            raise RecipeError(f"two tools are named {tool.name!r}", where=where, key=key, fix="name each tool once")
        tools[tool.name] = tool
    return tools


def schemas(tools: dict[str, Tool]) -> list[dict]:
    """The schemas in the form `apply_chat_template(tools=...)` takes."""
    return [t.schema for t in tools.values()]


@dataclass
class Call:
    """One tool call as the model wrote it: `name` and `arguments` when it parsed, else `error` says why."""

    text: str
    name: str | None = None
    arguments: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None

    def as_message_call(self) -> dict:
        return {"type": "function", "function": {"name": self.name or "unknown", "arguments": self.arguments}}


def parse_calls(text: str) -> list[Call]:
    """Every `<tool_call>...</tool_call>` of a model's turn; an opening tag never closed counts as one bad call."""
    calls = []
    for m in TOOL_CALL.finditer(text):
        body = m.group(1).strip()
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            calls.append(Call(body, error="the call is not JSON"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            calls.append(Call(body, error="the call has no \"name\""))
        elif not isinstance(data.get("arguments", {}), dict):
            calls.append(Call(body, data["name"], error="\"arguments\" is not an object"))
        else:
            calls.append(Call(body, data["name"], data.get("arguments", {})))
    rest = TOOL_CALL.sub("", text)
    if OPEN_TAG in rest:
        calls.append(Call(rest[rest.index(OPEN_TAG):], error="the call is not closed with </tool_call>"))
    return calls


def answer_text(text: str) -> str:
    """A turn's text without its tool calls: what the user would read as the answer."""
    return TOOL_CALL.sub("", text).strip()


def check_call(call: Call, tools: dict[str, Tool]) -> Call:
    """`call` with `error` set if it names no known tool or its arguments do not fit the schema."""
    if not call.valid:
        return call
    tool = tools.get(call.name)
    if tool is None:
        call.error = f"no tool is named {call.name!r} (known: {', '.join(sorted(tools)) or 'none'})"
        return call
    params = tool.parameters
    props, required = params.get("properties", {}), params.get("required", [])
    missing = [r for r in required if r not in call.arguments]
    unknown = [a for a in call.arguments if a not in props]
    wrong = [a for a, v in call.arguments.items() if a in props and not _fits(v, props[a])]
    if missing or unknown or wrong:
        call.error = "; ".join(part for part in (
            missing and f"missing argument(s) {', '.join(missing)}", unknown and f"unknown argument(s) {', '.join(unknown)}",
            wrong and f"argument(s) of the wrong type {', '.join(wrong)}") if part)
    return call


def _fits(value, prop: dict) -> bool:
    kind = _JSON_TYPES.get(prop.get("type"))
    if kind is None:
        return True
    if isinstance(value, bool) and prop.get("type") in ("integer", "number"):
        return False
    return isinstance(value, kind)


def run_call(call: Call, tools: dict[str, Tool], timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[str, bool]:
    """(result text, failed): the tool's result, or `error: ...` when the call is invalid, raises or times out."""
    check_call(call, tools)
    if not call.valid:
        return f"error: {call.error}", True
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = tools[call.name].function(**call.arguments)
        except Exception as err:  # noqa: BLE001 - any failure of a user's tool becomes an error result
            box["error"] = f"{type(err).__name__}: {err}"

    worker = threading.Thread(target=target, daemon=True)  # a hung tool is left behind, never waited on
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return f"error: the tool took longer than {timeout_s:g} s", True
    if "error" in box:
        return f"error: {box['error']}"[:MAX_RESULT_CHARS], True
    result = box.get("result")
    text = result if isinstance(result, str) else json.dumps(result, default=str)
    return text[:MAX_RESULT_CHARS], False
