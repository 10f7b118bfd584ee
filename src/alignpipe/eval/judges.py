"""Judges of sampled responses, named in `eval.judges`.

A verifier scores one response: `module:function(prompt, response, row) -> bool | float`. A response cut
off before end-of-turn is not a finished answer and scores 0 whatever the verifier says.

A pairwise judge is a model shown this stage's response and the parent's to the same prompt, in both
orders (A/B, then B/A), with a judging prompt that asks for `A`, `B` or `TIE`. Each order's answer is
parsed; one that says none of these is counted as unparseable, never as a tie. The model is a local
transformers model (`model:` a folder or hub id) or an OpenAI-compatible endpoint (`endpoint:` base URL
ending in /v1, `model:` its model name, the key read from the environment variable `api_key_env` at
call time: it is never stored, logged or written). The endpoint is asked directly: a redirect is refused, never
followed, so the key is never sent on to another host.
"""

from __future__ import annotations

# Heavy imports (torch, transformers) stay inside the functions that use them: the CLI starts without them.
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from alignpipe.callables import import_callable
from alignpipe.errors import EvalError
from alignpipe.eval.prompts import resolve
from alignpipe.eval.stats import bootstrap_rate
from alignpipe.models.loading import device

DEFAULT_TEMPLATE = (
    "Two assistants answered the same question. Which answer is better?\n\n"
    "Question: {prompt}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Reply with one word: A, B or TIE."
)
_VERDICT = re.compile(r"\b(A|B|TIE)\b", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'TIE' from a judge's answer (the first such word), None when it says none of them."""
    m = _VERDICT.search(text or "")
    return m.group(1).upper() if m else None


def load_verifier(spec: str, where: str = "", key: str = "verifier") -> Callable:
    return import_callable(spec, "verifier", "alignpipe.eval.verifiers:gsm8k", "fn(prompt, response, row)", where, key)


def run_verifier(fn: Callable, texts: list[str], responses: list[str], rows: list[dict],
                 ended: list[bool]) -> list[bool | float]:
    """The verifier's value per response (bool or float as it returns them; 0 / False when cut off)."""
    out: list[bool | float] = []
    for p, r, row, done in zip(texts, responses, rows, ended):
        v = fn(p, r, row) if done else False
        out.append(bool(v) if isinstance(v, bool) or type(v).__name__ == "bool_" else float(v))
    return out


def judging_prompt(spec, recipe_path: Path) -> str:
    if not spec.prompt_template:
        return DEFAULT_TEMPLATE

    return resolve(spec.prompt_template, recipe_path).read_text()


def fill(template: str, prompt: str, a: str, b: str) -> str:
    # plain replacement, not str.format: responses may hold braces
    return template.replace("{prompt}", prompt).replace("{a}", a).replace("{b}", b)


# --- the two kinds of pairwise judge model ------------------------------------------------------------


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a 301/302/303 of a POST as a GET with the same headers, `Authorization` among them, to
    wherever `Location` points: refuse every redirect instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirected to {newurl[:120]} (redirects are refused: the "
                                     "key would go with it)", headers, fp)


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def open_without_redirects(req: urllib.request.Request, timeout: float):
    """urlopen, except that a redirect is an HTTPError instead of a second request carrying the same headers."""
    return _OPENER.open(req, timeout=timeout)


class EndpointJudge:
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama), greedy."""

    def __init__(self, spec) -> None:
        self.url = spec.endpoint.rstrip("/") + "/chat/completions"
        self.model, self.spec = spec.model or "default", spec

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.spec.api_key_env:
            headers["Authorization"] = "Bearer " + os.environ.get(self.spec.api_key_env, "")
        return headers

    def ask(self, prompts: list[str]) -> list[str]:
        out = []
        for text in prompts:
            body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": text}],
                               "temperature": 0, "max_tokens": self.spec.max_new_tokens}).encode()
            req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with open_without_redirects(req, self.spec.timeout_s) as resp:
                    reply = json.loads(resp.read().decode())
                out.append(str(reply["choices"][0]["message"]["content"] or ""))
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
                fix = ("give the endpoint's final address (its base URL ending in /v1) in endpoint:"
                       if isinstance(err, urllib.error.HTTPError) and 300 <= err.code < 400
                       else "check that the server runs and serves this model")
                raise EvalError(f"judge endpoint {self.url} failed: {type(err).__name__}: {_reason(err)}",
                                fix=fix) from None
        return out


def _reason(err: Exception) -> str:
    code = f"HTTP {err.code} " if isinstance(err, urllib.error.HTTPError) else ""
    return code + str(getattr(err, "reason", None) or err).splitlines()[0][:200]


class LocalJudge:
    """A transformers causal LM, prompted through its chat template when it has one, greedy."""

    def __init__(self, spec, recipe_model) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.tok = AutoTokenizer.from_pretrained(spec.model, trust_remote_code=recipe_model.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32 if device().type == "cpu"
                                                          else "auto").to(device()).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def ask(self, prompts: list[str]) -> list[str]:
        import torch

        out = []
        dev = next(self.model.parameters()).device
        for text in prompts:
            if self.tok.chat_template:
                text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)
            enc = self.tok(text, return_tensors="pt", add_special_tokens=False).to(dev)
            with torch.no_grad():
                gen = self.model.generate(**enc, do_sample=False, max_new_tokens=self.spec.max_new_tokens,
                                          pad_token_id=self.tok.pad_token_id)
            out.append(self.tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return out


def judge_model(spec, recipe_model):
    return EndpointJudge(spec) if spec.endpoint else LocalJudge(spec, recipe_model)


@dataclass
class PairVerdict:
    first: str | None  # the answer with this stage's response as A
    second: str | None  # the answer with this stage's response as B

    @property
    def parsed(self) -> bool:
        return self.first is not None and self.second is not None

    def score(self) -> float | None:
        """This stage's outcome over both orders: 1 win, 0 loss, 0.5 tie or disagreement; None unparseable."""
        if not self.parsed:
            return None
        mine = {"A": 1.0, "B": 0.0, "TIE": 0.5}[self.first] + {"B": 1.0, "A": 0.0, "TIE": 0.5}[self.second]
        return mine / 2

    @property
    def consistent(self) -> bool:
        """Both orders name the same winner (or both say tie)."""
        swap = {"A": "B", "B": "A", "TIE": "TIE"}
        return self.parsed and swap[self.first] == self.second


def pairwise(model, template: str, texts: list[str], mine: list[str], theirs: list[str]) -> list[PairVerdict]:
    """Ask `model` about each (mine, theirs) pair in both orders."""
    asks = [fill(template, p, a, b) for p, a, b in zip(texts, mine, theirs)]
    asks += [fill(template, p, b, a) for p, a, b in zip(texts, mine, theirs)]
    answers = [parse_verdict(t) for t in model.ask(asks)]
    n = len(texts)
    return [PairVerdict(answers[i], answers[n + i]) for i in range(n)]


def pairwise_metrics(name: str, texts: list[str], verdicts: list[PairVerdict], seed: int) -> dict[str, Any]:
    """`<name>_win_rate_vs_parent` (+ `_ci`, bootstrap over prompts), ties, unparseable answers, position
    consistency (share of pairs whose two orders agree, of those parsed)."""
    per_prompt: dict[str, list[float]] = {}
    for t, v in zip(texts, verdicts):
        if (s := v.score()) is not None:
            per_prompt.setdefault(t, []).append(s)
    win = bootstrap_rate(per_prompt, seed)
    parsed = [v for v in verdicts if v.parsed]
    out: dict[str, Any] = {
        f"{name}_win_rate_vs_parent": win["rate"],
        f"{name}_pairs": len(verdicts),
        f"{name}_unparseable": sum(a is None for v in verdicts for a in (v.first, v.second)),
        f"{name}_ties": sum(a == "TIE" for v in verdicts for a in (v.first, v.second)),
        f"{name}_position_consistency": (sum(v.consistent for v in parsed) / len(parsed)) if parsed else None,
    }
    if win["rate"] is not None:
        out[f"{name}_win_rate_vs_parent_ci"] = [win["lo"], win["hi"]]
    return out
