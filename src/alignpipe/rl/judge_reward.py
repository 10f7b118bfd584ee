"""A judge of `eval.judges` as an RL stage's reward: `reward_function: judge:<name>`.

A verifier judge (`verifier: module:function(prompt, response, row)`) scores each response on its own (its float
value; a bool as 1 / 0; the row is `{}`: a verifier that needs the world's gold answer is the world's judge, which
evaluates and must not train). A pairwise judge model (local, or an OpenAI-compatible endpoint) compares the
responses to the same prompt with each other, in both orders (alignpipe.eval.judges.pairwise): a response's reward
is its mean outcome (1 win, 0.5 tie or disagreement, 0 loss) over the others of its group (GRPO / RLOO's
`num_generations`), a relative reward in the spirit of OpenPipe ART's RULER.

Failures are counted, never silently zero: a verifier that raises, a judge answer that says none of A / B / TIE, or
an endpoint that fails leaves that response without a reward (None: TRL's GRPO / RLOO leave it out of the
group's statistics; PPO refuses it) and adds to `counts`, which the stage writes to its manifest. A batch in which
no response got a reward stops the stage with one line naming the judge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from alignpipe.errors import EvalError, RecipeError
from alignpipe.eval.judges import judge_model, judging_prompt, load_verifier, pairwise
from alignpipe.eval.reward_functions import JUDGE_PREFIX as PREFIX


def judge_name(spec: str | None) -> str | None:
    """`<name>` of `reward_function: judge:<name>`, None for a `module:function`."""
    return spec[len(PREFIX):] if spec and spec.startswith(PREFIX) else None


def check_judge_reward(cfg, name: str, where: str) -> None:
    """The judge a `reward_function: judge:<name>` names is one of the stage's `eval.judges`."""
    judge = judge_name(cfg.reward_function)
    if judge not in cfg.eval.judges:
        known = ", ".join(cfg.eval.judges) or "none"
        raise RecipeError(f"reward_function names judge {judge!r}, which is not in this stage's eval.judges "
                          f"(known: {known})", where=where, key=f"stages.{name}.reward_function",
                          fix=f"add eval: {{judges: {{{judge}: {{endpoint: ..., model: ...}}}}}} to the stage")


def _text(prompt) -> str:
    """The user's question of a prompt given as messages (its last user turn) or text."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


@dataclass
class JudgeReward:
    """`__call__(prompts, responses) -> list[float | None]`; `counts` says how many were asked and failed."""

    name: str
    spec: object  # recipe.schema.JudgeSpec
    recipe_path: str
    recipe_model: object = None
    counts: dict = field(default_factory=lambda: {"responses": 0, "judge_calls": 0, "failures": 0,
                                                  "unrewarded": 0})
    _model: object = None
    _verifier: Callable | None = None

    def __call__(self, prompts: list, responses: list[str]) -> list[float | None]:
        texts = [_text(p) for p in prompts]
        rewards = self._verify(texts, responses) if self.spec.verifier else self._compare(texts, responses)
        self.counts["responses"] += len(responses)
        self.counts["unrewarded"] += sum(r is None for r in rewards)
        if responses and all(r is None for r in rewards):
            raise EvalError(f"the reward judge {self.name!r} gave no usable verdict for any of {len(responses)} "
                            f"responses ({self.counts['failures']} failures so far)",
                            fix="check the judge (its endpoint, model and prompt template)")
        return rewards

    def _verify(self, texts: list[str], responses: list[str]) -> list[float | None]:
        if self._verifier is None:
            self._verifier = load_verifier(self.spec.verifier, self.recipe_path)
        out: list[float | None] = []
        for text, response in zip(texts, responses):
            self.counts["judge_calls"] += 1
            try:
                out.append(float(self._verifier(text, response, {})))
            except Exception:  # noqa: BLE001 - a user's verifier: counted, the response left unrewarded
                self.counts["failures"] += 1
                out.append(None)
        return out

    def _compare(self, texts: list[str], responses: list[str]) -> list[float | None]:
        """Each response against every other response to the same prompt, both orders; mean outcome."""
        if self._model is None:
            self._model = judge_model(self.spec, self.recipe_model)
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            groups.setdefault(t, []).append(i)
        pairs = [(i, j) for idx in groups.values() for i in idx for j in idx if i < j]
        outcomes: list[list[float]] = [[] for _ in responses]
        verdicts = self._ask_pairs([texts[i] for i, _ in pairs], [responses[i] for i, _ in pairs],
                                   [responses[j] for _, j in pairs])
        for (i, j), v in zip(pairs, verdicts):
            s = v.score() if v is not None else None
            if s is None:
                self.counts["failures"] += 1
                continue
            outcomes[i].append(s)
            outcomes[j].append(1.0 - s)
        return [sum(o) / len(o) if o else None for o in outcomes]

    def _ask_pairs(self, texts: list[str], mine: list[str], theirs: list[str]) -> list:
        """The judge's verdicts, batched; when the batch fails (an endpoint error), pair by pair, each failure
        counted as None."""
        template = judging_prompt(self.spec, self.recipe_path)
        self.counts["judge_calls"] += 2 * len(texts)
        try:
            return pairwise(self._model, template, texts, mine, theirs)
        except EvalError:
            out = []
            for t, a, b in zip(texts, mine, theirs):
                try:
                    out.extend(pairwise(self._model, template, [t], [a], [b]))
                except EvalError:
                    out.append(None)
            return out


def from_judge(cfg, recipe, name: str) -> JudgeReward:
    """The JudgeReward of a stage whose `reward_function` is `judge:<name>`."""
    check_judge_reward(cfg, name, str(recipe.path))
    judge = judge_name(cfg.reward_function)
    return JudgeReward(judge, cfg.eval.judges[judge], str(recipe.path), recipe.model)
