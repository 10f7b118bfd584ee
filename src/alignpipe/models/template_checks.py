"""Chat-template checks of a tokenizer, run before a stage trains, and the end-of-turn fix applied at load time.

A wrong template does not crash a training run: it trains a model that never stops, or learns from
the user's turns, or is evaluated with a prompt it never saw (alignment-handbook #93, LLaMA-Factory
#2984, TRL #2059). So before any stage trains, the runner calls `check_stage_templates`
(`alignpipe.pipeline.stage_templates`), which renders a probe conversation with the tokenizer the stage
will use and checks that

- the assistant-token mask (`{% generation %}`) covers exactly the assistant turns, end-of-turn
  token included (when the stage trains on assistant tokens only);
- the token that ends an assistant turn is the tokenizer's EOS or one of the generation config's
  stop tokens (otherwise sampling never stops);
- the generation prompt is the start of an assistant turn: prompt + response renders the same text
  as the whole conversation;
- every upstream stage (`from`, `reward_model`) saved the same vocabulary and chat template, and its
  tokenizer files are the ones its manifest recorded (`alignpipe.pipeline.stage_templates`).

Any failure is an AlignpipeError: one line, naming what and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from alignpipe.data.sft_tokens import mask_spans
from alignpipe.errors import AlignpipeError

# Distinct, template-neutral strings: each must be findable in the rendered text.
PROBE = [
    {"role": "system", "content": "Probe system note."},
    {"role": "user", "content": "Probe question one?"},
    {"role": "assistant", "content": "Probe answer one."},
    {"role": "user", "content": "Probe question two?"},
    {"role": "assistant", "content": "Probe answer two."},
]


class TemplateError(AlignpipeError):
    """The chat template (or the tokenizer it runs with) would train or sample the wrong thing."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def probe_conversation(tokenizer) -> list[dict]:
    """PROBE, without the system turn for templates that reject one (e.g. Gemma's)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template", key="chat_template",
                            fix="set chat_template: chatml, llama3, a .jinja file, or use a model that ships one")
    try:
        _render(tokenizer, PROBE)
        return PROBE
    except Exception:  # noqa: BLE001 - jinja raises whatever the template's raise_exception says
        pass
    try:
        _render(tokenizer, PROBE[1:])
    except Exception as err:  # noqa: BLE001
        raise TemplateError(f"the chat template cannot render a user/assistant conversation "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                            key="chat_template", fix="fix the template or choose a built-in one") from None
    return PROBE[1:]


# --- the end-of-turn token ---------------------------------------------------------------------


def end_of_turn(tokenizer) -> tuple[str, int] | None:
    """The text the template writes right after an assistant message, and the id of its first token.
    None when the template writes nothing there (then nothing can end a turn)."""
    content = PROBE[2]["content"]
    text = _render(tokenizer, [PROBE[1], PROBE[2]])
    at = text.rfind(content)
    if at < 0:
        raise TemplateError("the chat template does not render the assistant's message", key="chat_template",
                            fix="the template must write message['content'] for assistant turns")
    after = text[at + len(content):]
    if not after.strip():
        return None
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return after, ids[0]


def stop_ids(tokenizer, generation_eos: int | list[int] | None = None) -> list[int]:
    """The token ids that end sampling: the tokenizer's EOS and the generation config's eos ids."""
    extra = [] if generation_eos is None else [generation_eos] if isinstance(generation_eos, int) else generation_eos
    return [i for i in [tokenizer.eos_token_id, *extra] if i is not None]


def use_end_of_turn_as_eos(tokenizer) -> str | None:
    """Make the template's end-of-turn token the tokenizer's EOS when it is a special token of its own.

    Base models often ship EOS = end-of-document (`<|endoftext|>`, `<|end_of_text|>`) while their chat
    format ends a turn with another token (`<|im_end|>`, `<|eot_id|>`); trained that way, a model
    stops only where documents end. This is what TRL's `eos_token` argument does. Returns the new
    EOS, or None when nothing changed. A multi-token end-of-turn is left alone (the check refuses it).
    """
    try:
        found = end_of_turn(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    except Exception:  # noqa: BLE001 - a template that cannot render is reported by the checks
        found = None
    if found is None:
        return None
    after, first = found
    if first == tokenizer.eos_token_id:
        return None
    token = tokenizer.convert_ids_to_tokens(first)
    special = {t.content for t in tokenizer.added_tokens_decoder.values()}
    if token not in special or not after.startswith(token):
        return None
    if tokenizer.pad_token is None:  # keep padding on the old EOS rather than on the new one
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.eos_token = token
    return token


def add_stop_token(model, token_id: int | None) -> None:
    """Mirror the tokenizer's EOS onto the model's config and generation config, as TRL does, so that
    `generate` (here and wherever the model goes next) stops at the end of a turn."""
    if token_id is None:
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config.eos_token_id = token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        ids = stop_ids_list(gen.eos_token_id)
        if token_id not in ids:
            gen.eos_token_id = [token_id, *ids] if ids else token_id


def stop_ids_list(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


# --- the checks --------------------------------------------------------------------------------


def check_assistant_mask(tokenizer, messages: list[dict], eot_text: str) -> dict:
    """The `{% generation %}` mask covers each assistant turn's content and its end-of-turn token,
    and nothing of the other turns."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    others = [m["content"] for m in messages if m["role"] != "assistant"]
    spans = mask_spans(mask)
    fix = "mark each assistant turn as {% generation %}content + end-of-turn{% endgeneration %} in the template"
    if not spans:
        raise TemplateError("the chat template marks no assistant tokens (no {% generation %} block), which "
                            "assistant-only loss needs", key="chat_template",
                            fix="use a built-in template (chatml, llama3, embedded), add the markers, or set "
                                "the stage's trainer.assistant_only_loss: false")
    if len(spans) != len(answers):
        raise TemplateError(f"the assistant mask has {len(spans)} spans for {len(answers)} assistant turns",
                            key="chat_template", fix=fix)
    eot = eot_text.strip()
    for (start, end), answer in zip(spans, answers):
        text = tokenizer.decode(ids[start:end]).strip()
        if any(o in text for o in others):
            raise TemplateError(f"the assistant mask covers a user/system turn: {text!r}", key="chat_template",
                                fix=fix)
        if answer not in text:
            raise TemplateError(f"the assistant mask misses part of the answer {answer!r}: it covers {text!r}",
                                key="chat_template", fix=fix)
        if not text.endswith(eot):
            raise TemplateError(f"the assistant mask stops before the end-of-turn token {eot!r} ({text!r}): the "
                                "model would never learn to stop", key="chat_template", fix=fix)
    return {"turns": len(spans), "tokens": sum(mask)}


def check_generation_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt rendered with add_generation_prompt=True is exactly where the last answer starts."""
    prompt, answer = messages[:-1], messages[-1]["content"]
    with_prompt = _render(tokenizer, prompt, generation_prompt=True)
    without = _render(tokenizer, prompt)
    full = _render(tokenizer, messages)
    fix = "the template must write the assistant header when add_generation_prompt is true"
    if with_prompt == without:
        raise TemplateError("the chat template ignores add_generation_prompt: sampling would start without the "
                            "assistant header", key="chat_template", fix=fix)
    if not full.startswith(with_prompt):
        raise TemplateError(f"prompt + generation prompt {with_prompt[len(without):]!r} is not how the template "
                            "renders the start of an assistant turn", key="chat_template", fix=fix)
    if not full[len(with_prompt):].lstrip().startswith(answer):
        raise TemplateError(f"after the generation prompt the template writes "
                            f"{full[len(with_prompt):][:40]!r}, not the answer", key="chat_template", fix=fix)
    return with_prompt[len(without):]


def check_template(tokenizer, *, assistant_mask: bool, generation_eos: int | list[int] | None = None) -> dict:
    """Run every template check on `tokenizer`; returns what was found (for the manifest)."""
    messages = probe_conversation(tokenizer)
    found = end_of_turn(tokenizer)
    if found is None:
        raise TemplateError("the chat template writes nothing after an assistant message, so nothing ends a turn",
                            key="chat_template", fix="end assistant turns with the model's end-of-turn token")
    eot_text, eot_id = found
    eot_token = tokenizer.convert_ids_to_tokens(eot_id)
    stops = stop_ids(tokenizer, generation_eos)
    if eot_id not in stops:
        names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in stops) or "none"
        raise TemplateError(f"an assistant turn ends with {eot_text.strip()!r} (first token {eot_token!r}), which is "
                            f"neither the tokenizer's EOS nor a generation stop token ({names}): sampling would not "
                            "stop", key="chat_template",
                            fix="use the model's own template (chat_template: model) or a built-in whose end-of-turn "
                                "token is a special token of this tokenizer")
    report: dict[str, Any] = {"end_of_turn": eot_token, "end_of_turn_id": eot_id, "eos": tokenizer.eos_token,
                              "generation_prompt": check_generation_prompt(tokenizer, messages)}
    report["assistant_mask"] = (check_assistant_mask(tokenizer, messages, eot_text) if assistant_mask
                                else "not used by this stage")
    return report


# --- across stages -----------------------------------------------------------------------------


def tokenizer_signature(tokenizer) -> dict:
    """What must not change between a stage and its parent: the vocabulary and the chat template."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    template = tokenizer.chat_template or ""
    return {"vocab_size": len(tokenizer), "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
            "chat_template_sha256": hashlib.sha256(template.strip().encode()).hexdigest()}


