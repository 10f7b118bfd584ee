"""Stages answering the same chat message side by side, streamed (the page's `#/chat/...` view).

Each stage is loaded as `alignpipe serve` loads it and answers as it does (serving/engine.py: the checkpoint's
chat template and end-of-turn stops, one lock per model, text released only where it can no longer change),
so a greedy answer here is `alignpipe serve`'s and `alignpipe generate`'s. The models are loaded into this
process on first use (torch is imported then, not before), at most MAX_MODELS at a time, the least recently
used let go first. A stage is read, never written.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from alignpipe.serving import engine

MAX_MODELS = 4
MAX_TOKENS = 256  # as serving/engine.token_budget gives when a request names none
MAX_MESSAGES = 64
ROLES = ("system", "user", "assistant")


def read_request(body: dict) -> engine.Job:
    """The conversation and sampling a page sent (a ValueError naming what is wrong)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise ValueError(f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"each message is {{role: one of {', '.join(ROLES)}, content: text}}")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's")
    temperature, max_tokens, seed = body.get("temperature", 0.0), body.get("max_tokens"), body.get("seed")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ValueError("temperature must be a number from 0 to 2")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or not 1 <= max_tokens <= MAX_TOKENS):  # None: as many as fit, at most 256
        raise ValueError(f"max_tokens must be a whole number from 1 to {MAX_TOKENS}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError("seed must be a whole number")
    return engine.Job(messages=[{"role": m["role"], "content": m["content"]} for m in messages], prompt=None,
                      max_tokens=max_tokens, temperature=float(temperature), top_p=1.0, stop=[], seed=seed)


class Chats:
    """The stages loaded for chat, by folder."""

    def __init__(self) -> None:
        self._models: OrderedDict[Path, engine.ServedModel] = OrderedDict()
        self._lock = threading.Lock()

    def model(self, stage_dir: Path) -> engine.ServedModel:
        key = Path(stage_dir).resolve()
        with self._lock:  # one load at a time; a second request for the same stage waits for the first
            if key not in self._models:
                self._models[key] = engine.load_served(key)
                while len(self._models) > MAX_MODELS:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def answer(self, stage_dir: Path, job: engine.Job) -> Iterator[dict]:
        """The reply as it is generated: {"text": piece}, ..., then {"done": true, "text": the whole reply,
        "finish_reason", "tokens"}; a failure mid-way is {"error": ...}. Generation stops when the page leaves."""
        served = self.model(stage_dir)
        ids = engine.prompt_ids(served, job)
        budget = engine.token_budget(served, len(ids), job.max_tokens)
        cancel = threading.Event()
        tokens = engine.start(served, job, ids, budget, cancel)
        text, reply = engine.StreamText(served, job), []
        try:
            while (t := tokens.get()) is not engine.DONE:
                if isinstance(t, Exception):
                    yield {"error": f"generation failed: {type(t).__name__}: {t}"}
                    return
                reply.append(t)
                if new := text.more(reply):
                    yield {"text": new}
            result = engine.finish(served, job, len(ids), reply, budget)
            if rest := text.rest(result.text):
                yield {"text": rest}
            yield {"done": True, "text": result.text, "finish_reason": result.finish_reason,
                   "tokens": result.completion_tokens}
        finally:
            cancel.set()
