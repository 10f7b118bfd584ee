"""Chat templates: one per recipe, used by every stage.

Built-ins mark assistant content with `{% generation %}` so TRL can compute an assistant-only loss
(`return_assistant_tokens_mask`). A recipe's `chat_template` is a built-in name, `model` (keep the
base model's own), or a path to a Jinja file.
"""

from __future__ import annotations

import re
from pathlib import Path

from alignpipe.errors import RecipeError

# An assistant's `tool_calls`, one `<tool_call>{"name": ..., "arguments": ...}</tool_call>` each, as Qwen2.5 writes them.
_TOOL_CALLS = (
    "{%- for call in message.tool_calls -%}"
    "{%- if loop.first and message['content'] -%}{{ '\\n' }}{%- elif not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{%- if call.function.arguments is string -%}{{ call.function.arguments }}"
    "{%- else -%}{{ call.function.arguments | tojson }}{%- endif -%}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
)

# The embedded world's template: its special tokens are added by the pretrain stage's tokenizer.
EMBEDDED = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>"
    "{% generation %}{{ message['content'] }}{%- if message.tool_calls -%}" + _TOOL_CALLS + "{%- endif -%}<|end|>"
    "{% endgeneration %}"
    "{%- elif message['role'] == 'tool' -%}<|user|><tool_response>{{ message['content'] }}</tool_response><|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
EMBEDDED_SPECIAL_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# ChatML and Llama 3 as their models were trained on them (newlines included: they are literals, so
# Jinja's whitespace control cannot strip them), plus the generation markers.
# Tools (a conversation's `tools`) are listed in the system turn; an assistant's `tool_calls` are written inside its
# generation block (trained on), one `<tool_call>{"name": ..., "arguments": ...}</tool_call>` each, as Qwen2.5 does;
# tool results are their own turns, outside it (not trained on). Without tools the text is as before.
_TOOLS_INTRO = (
    "# Tools\\n\\nYou may call one or more functions to assist with the user query. Available functions:\\n<tools>"
)
_TOOLS_OUTRO = (
    "\\n</tools>\\n\\nFor each function call, return a json object with the function name and arguments within "
    "<tool_call></tool_call> tags."
)


def _tools_block(open_system: str, close: str) -> str:
    return (
        "{%- if tools -%}" + open_system
        + "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
        "{{ '" + _TOOLS_INTRO + "' }}"
        "{%- for tool in tools -%}{{ '\\n' }}{{ tool | tojson }}{%- endfor -%}"
        "{{ '" + _TOOLS_OUTRO + "' }}" + close + "{%- endif -%}"
    )


CHATML = (
    _tools_block("{{ '<|im_start|>system\\n' }}", "{{ '<|im_end|>\\n' }}")
    + "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] }}"
    "{%- if message.tool_calls -%}" + _TOOL_CALLS + "{%- endif -%}"
    "<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token -}}"
    + _tools_block("{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}", "{{ '<|eot_id|>' }}")
    + "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- else -%}"
    "{{ '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role']) + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] | trim }}"
    "{%- if message.tool_calls -%}" + _TOOL_CALLS + "{%- endif -%}"
    "<|eot_id|>{% endgeneration %}"
    "{%- else -%}{{ message['content'] | trim }}<|eot_id|>{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

BUILTIN = {"embedded": EMBEDDED, "chatml": CHATML, "llama3": LLAMA3}
# The token that ends an assistant turn under each built-in.
END_OF_TURN = {"embedded": "<|end|>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def template_special_tokens(template: str | None) -> tuple[list[str], str | None]:
    """The special tokens a tokenizer built from scratch needs for `template`, and its BOS token (or None).

    `<|pad|>` and `<|end|>` (pretraining's padding and end of document) always; then every `<|...|>` literal
    of the template (chatml's `<|im_start|>`, llama3's headers, a file's own), and `<|begin_of_text|>` as BOS
    when the template writes `bos_token`.
    """
    tokens = list(EMBEDDED_SPECIAL_TOKENS)
    for t in _SPECIAL.findall(template or ""):
        if t not in tokens:
            tokens.append(t)
    bos = "<|begin_of_text|>" if template and "bos_token" in template else None
    if bos and bos not in tokens:
        tokens.append(bos)
    return tokens, bos


def resolve_template(name: str, recipe_path: Path | None = None) -> str | None:
    """The Jinja text of a recipe's `chat_template`, or None for `model` (keep the tokenizer's own)."""
    if name == "model":
        return None
    if name in BUILTIN:
        return BUILTIN[name]
    path = Path(name)
    if not path.is_absolute() and recipe_path is not None and not path.exists():
        path = Path(recipe_path).parent / name
    if path.is_file():
        return path.read_text()
    raise RecipeError(f"unknown chat template {name!r}", where=str(recipe_path or ""), key="chat_template",
                      fix=f"use one of {', '.join(BUILTIN)}, `model`, or a path to a .jinja file")


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%- generation -%}", "{% generation %}")
