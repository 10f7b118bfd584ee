"""The models `alignpipe serve` answers with: each a stage loaded as `alignpipe generate` loads it (the
checkpoint's chat template, its end-of-turn stops), generating as `generate` does for one prompt, so the
server's greedy answer is `generate`'s. One lock per model: requests to a model wait their turn, none
shares a forward pass with another, so none can see another's tokens or seed.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_OPEN = "<tool_call>"


@dataclass
class Job:
    """One validated request: a conversation (chat) or a raw prompt (completions), and its sampling."""

    messages: list[dict] | None
    prompt: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    tools: list[dict] | None = None


@dataclass
class Result:
    text: str
    tool_calls: list[dict]
    finish_reason: str  # stop | length | tool_calls
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ServedModel:
    name: str
    stage_dir: Path
    model: object
    tokenizer: object
    stops: list[int]
    context: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def has_tools(self) -> bool:
        return "tools" in (self.tokenizer.chat_template or "")


def model_name(stage_dir: Path) -> str:
    """`<run>/<stage>`: the name clients ask for, e.g. judged/sft."""
    stage_dir = Path(stage_dir).resolve()
    return f"{stage_dir.parent.name}/{stage_dir.name}"


def load_served(stage_dir: Path) -> ServedModel:
    from alignpipe.models.stage_model import load_stage, stop_ids

    model, tokenizer, manifest = load_stage(Path(stage_dir))
    context = getattr(model.config, "max_position_embeddings", None) or 4096
    return ServedModel(model_name(stage_dir), Path(stage_dir), model, tokenizer, stop_ids(tokenizer, manifest), context)


class PromptTooLong(ValueError):
    pass


def prompt_ids(served: ServedModel, job: Job) -> list[int]:
    tok = served.tokenizer
    if job.messages is None:
        return tok(job.prompt)["input_ids"]
    text = tok.apply_chat_template(job.messages, tools=job.tools, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def token_budget(served: ServedModel, n_prompt: int, asked: int | None) -> int:
    room = served.context - n_prompt
    if room <= 0 or (asked is not None and asked > room):
        raise PromptTooLong(f"this model's context is {served.context} tokens; the prompt has {n_prompt} and "
                            f"max_tokens asks for {asked if asked is not None else 'at least 1'} more")
    return asked if asked is not None else min(256, room)


class _Tokens:
    """A `generate` streamer that hands each new token id to a queue (the prompt, put first, is skipped)."""

    def __init__(self, out: "queue.Queue") -> None:
        self.out, self.prompt_seen = out, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.out.put(t)

    def end(self) -> None:
        pass


class _Cancelled:
    """A stopping criterion: ends generation once the client has gone (a closed stream)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


DONE = object()


def start(served: ServedModel, job: Job, ids: list[int], budget: int, cancel: threading.Event) -> "queue.Queue":
    """Generate in a thread of its own under the model's lock; token ids arrive on the queue, then DONE
    (or the exception that ended it)."""
    out: queue.Queue = queue.Queue()

    def work() -> None:
        import torch
        from transformers import StoppingCriteriaList

        tok = served.tokenizer
        sample = job.temperature > 0
        kwargs = dict(max_new_tokens=budget, do_sample=sample, eos_token_id=served.stops, pad_token_id=tok.pad_token_id,
                      streamer=_Tokens(out), stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
        if sample:
            kwargs.update(temperature=job.temperature, top_p=job.top_p, top_k=0)
        if job.stop:
            kwargs.update(stop_strings=job.stop, tokenizer=tok)
        try:
            with served.lock:
                if job.seed is not None:
                    torch.manual_seed(job.seed)
                device = next(served.model.parameters()).device
                input_ids = torch.tensor([ids], device=device)
                with torch.no_grad():
                    served.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            out.put(DONE)
        except Exception as err:  # handed to the request, which answers with it
            out.put(err)

    threading.Thread(target=work, daemon=True).start()
    return out


# --- from token ids to the text a client sees -------------------------------------------------------


def visible_text(served: ServedModel, reply: list[int], job: Job) -> tuple[str, bool]:
    """The reply's text as `alignpipe generate` writes it (special tokens dropped, stripped), cut at the
    first stop string; and whether a stop string cut it."""
    text = served.tokenizer.decode(reply, skip_special_tokens=True).strip()
    cuts = [i for s in job.stop if (i := text.find(s)) >= 0]
    if cuts:
        return text[: min(cuts)].rstrip(), True
    return text, False


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content before the first <tool_call>, the calls as OpenAI tool_calls) when every call block is
    JSON with a name; else (text, [])."""
    blocks = TOOL_CALL.findall(text)
    if not blocks:
        return text, []
    calls = []
    for n, block in enumerate(blocks):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        args = call.get("arguments", {})
        calls.append({"id": f"call_{n}", "type": "function",
                      "function": {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return text.split(TOOL_OPEN, 1)[0].rstrip(), calls


def finish(served: ServedModel, job: Job, n_prompt: int, reply: list[int], budget: int) -> Result:
    """The Result of a finished generation whose new tokens are `reply`."""
    from alignpipe.models.stage_model import cut

    kept, ended = cut(reply, served.stops)
    kept = [t for t in kept if t != served.tokenizer.pad_token_id]
    text, stopped = visible_text(served, kept, job)
    calls: list[dict] = []
    if job.tools:
        text, calls = split_tool_calls(text)
    reason = "tool_calls" if calls else ("stop" if ended or stopped or len(reply) < budget else "length")
    return Result(text, calls, reason, n_prompt, len(kept) + ended)


class StreamText:
    """The text of a growing reply, released only where it can no longer change: not trailing whitespace
    (the final text is stripped), not an unfinished character, not what may be the start of a stop string
    or of a tool call. What it releases, joined, is a prefix of the final text; `rest` gives the remainder."""

    def __init__(self, served: ServedModel, job: Job) -> None:
        self.served, self.job, self.sent = served, job, ""
        self.holds = list(job.stop) + ([TOOL_OPEN] if job.tools else [])

    def _safe(self, reply: list[int]) -> str:
        from alignpipe.models.stage_model import cut

        kept, _ = cut(reply, self.served.stops)
        text = self.served.tokenizer.decode(kept, skip_special_tokens=True).lstrip()
        cuts = [i for s in self.holds if (i := text.find(s)) >= 0]
        if cuts:
            text = text[: min(cuts)]
        text = text.rstrip().rstrip("\ufffd")
        longest = 0  # a tail that may grow into a stop string or a tool call
        for s in self.holds:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return text[: len(text) - longest]

    def more(self, reply: list[int]) -> str:
        safe = self._safe(reply)
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        new, self.sent = safe[len(self.sent):], safe
        return new

    def rest(self, final: str) -> str:
        if not final.startswith(self.sent):  # cannot happen if the rules above hold; never send wrong text
            raise RuntimeError("streamed text is not a prefix of the final text")
        return final[len(self.sent):]
