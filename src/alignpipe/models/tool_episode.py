"""A conversation in which the model's tool calls are executed: generate until the turn ends; if it called tools,
run them, append their results as a tool turn and generate again, until a turn without a call (the final answer),
the turn limit or the token budget. Used by GRPO's rollouts (rl/tool_rollout.py), the tool evaluation
(eval/tools.py) and `alignpipe chat` / `generate`.

An episode's completion is every token after the prompt: the model's turns (mask 1) and the tool turns the
template wraps around each result (mask 0: never trained on). A call that does not parse, names no known tool,
has arguments that do not fit, raises or times out gives an `error: ...` result the model reads in its next turn,
and is counted (`Episode.failed_calls`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from alignpipe.data.tools import Call, Tool, answer_text, parse_calls, run_call

DEFAULT_MAX_TURNS = 3


@dataclass
class Episode:
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: the model's token, 0: a tool turn's token
    messages: list[dict] = field(default_factory=list)  # the completion as messages (assistant and tool turns)
    calls: list[Call] = field(default_factory=list)
    failed_calls: int = 0
    turns: int = 0
    final: str = ""  # the last model turn's text without tool calls
    answered: bool = False  # ended with a turn that called no tool, within the limits


def render_ids(tokenizer, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tool_turn_ids(tokenizer, history: list[dict], tool_messages: list[dict], schema: list[dict] | None) -> list[int]:
    """The tokens the template puts after the assistant turn in `history`: the tool turns and the next assistant
    header. The rendered text must extend the history's (a prefix-preserving template, as TRL also requires)."""
    before = tokenizer.apply_chat_template(history, tools=schema or None, tokenize=False)
    after = tokenizer.apply_chat_template(history + tool_messages, tools=schema or None, tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template is not prefix-preserving: a tool turn changes the text before it")
    return tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]


def run_episode(step: Callable[[list[int], int], list[int]], tokenizer, prompt: list[dict], tools: dict[str, Tool],
                max_turns: int = DEFAULT_MAX_TURNS, max_tokens: int = 64, execute: bool = True,
                timeout_s: float = 2.0) -> Episode:
    """One conversation. `step(ids, budget)` returns the model's next turn (at most `budget` tokens, ending with the
    end-of-turn token if it ended). With `execute=False` the first turn is the answer (tools unavailable)."""
    schema = [t.schema for t in tools.values()] if execute else None
    ep = Episode(render_ids(tokenizer, prompt, schema, generation_prompt=True))
    history, end_ids = list(prompt), {tokenizer.eos_token_id}
    while ep.turns < max_turns and len(ep.completion_ids) < max_tokens:
        new = list(step(ep.prompt_ids + ep.completion_ids, max_tokens - len(ep.completion_ids)))
        ep.completion_ids += new
        ep.mask += [1] * len(new)
        ep.turns += 1
        text = tokenizer.decode(new, skip_special_tokens=True)
        calls = parse_calls(text) if execute else []
        ended = bool(new) and new[-1] in end_ids
        if not calls:
            ep.final, ep.answered = answer_text(text), ended
            ep.messages.append({"role": "assistant", "content": text})
            break
        turn = {"role": "assistant", "content": answer_text(text), "tool_calls": [c.as_message_call() for c in calls]}
        ep.messages.append(turn)
        ep.calls += calls
        results = []
        for call in calls:
            result, failed = run_call(call, tools, timeout_s)
            ep.failed_calls += failed
            results.append({"role": "tool", "name": call.name or "unknown", "content": result})
        ep.messages += results
        if not ended or ep.turns >= max_turns:
            break
        suffix = tool_turn_ids(tokenizer, history + [turn], results, schema)
        if len(ep.completion_ids) + len(suffix) >= max_tokens:
            break  # no room for the result and an answer: the episode ends unanswered
        history += [turn, *results]
        ep.completion_ids += suffix
        ep.mask += [0] * len(suffix)
    return ep


def sampling_step(model, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                  stops: list[int] | None = None, streamer=None):
    """A `step` for run_episode: one sampled (or greedy) turn from a causal LM, stopping at its EOS (or `stops`)."""
    import torch

    def step(ids: list[int], budget: int) -> list[int]:
        device = next(model.parameters()).device
        room = model.config.max_position_embeddings - len(ids)
        if room <= 0:
            return []
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long, device=device), max_new_tokens=min(budget, room),
                                 do_sample=not greedy, temperature=temperature if not greedy else None,
                                 top_p=top_p if not greedy else None, top_k=None, streamer=streamer,
                                 **({"eos_token_id": stops} if stops else {}))
        return out[0, len(ids):].tolist()

    return step
