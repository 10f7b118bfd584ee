"""Chat templates: one per recipe, used by every stage.

Built-ins mark assistant content with `{% generation %}` so TRL can compute an assistant-only loss
(`return_assistant_tokens_mask`). A recipe's `chat_template` is a built-in name, `model` (keep the
base model's own), or a path to a Jinja file.
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.errors import RecipeError

# The embedded world's template: its special tokens are added by the pretrain stage's tokenizer.
EMBEDDED = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
EMBEDDED_SPECIAL_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# ChatML and Llama 3 as their models were trained on them (newlines included: they are literals, so
# Jinja's whitespace control cannot strip them), plus the generation markers.
CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] | trim }}<|eot_id|>{% endgeneration %}"
    "{%- else -%}{{ message['content'] | trim }}<|eot_id|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

BUILTIN = {"embedded": EMBEDDED, "chatml": CHATML, "llama3": LLAMA3}
# The token that ends an assistant turn under each built-in.
END_OF_TURN = {"embedded": "<|end|>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


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
