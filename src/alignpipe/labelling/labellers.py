"""Who says which of two sampled responses is better: the `label` stage's `labeller:` (and `second_labeller:`).

    embedded          the embedded world's judge, standing in for human labellers exactly as it does when the
                      world's own pairs are built (it labels only; it never trains a model directly)
    module:function   a verifier or rule, `fn(prompt, response, row) -> bool | float` (alignpipe.callables)
    judge:<name>      the stage's `eval.judges.<name>`: a pairwise judge model (local or an endpoint), asked in
                      both orders; a verifier there is used like module:function
    human             people, on the page `alignpipe label <stage folder>` serves (labelling/server.py)

A verdict on a queued item (responses a and b to one prompt) is `a`, `b` (that one is better), `tie` or
`both_bad`. A pointwise labeller scores each response (a response cut off before end-of-turn scores 0) and
compares: the higher one wins; equal scores are a tie when they pass (> 0), else both bad.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alignpipe.errors import RecipeError
from alignpipe.eval.judges import judge_model, judging_prompt, load_verifier, pairwise
from alignpipe.eval.verifiers import embedded_judge
from alignpipe.recipe.dataspec import LABELLER_EMBEDDED, LABELLER_HUMAN, LABELLER_JUDGE_PREFIX

VERDICTS = ("a", "b", "tie", "both_bad")
EMBEDDED, HUMAN, JUDGE_PREFIX = LABELLER_EMBEDDED, LABELLER_HUMAN, LABELLER_JUDGE_PREFIX
ROLE_EMBEDDED = ("the embedded world's judge stands in for human labellers, as in building the world's pairs; "
                 "it labels the policy's samples and never trains a model directly")


@dataclass
class Labeller:
    name: str  # as written in the recipe
    role: str  # what it stands for, written into the manifest
    score: Callable | None = None  # pointwise: fn(prompt, response, row) -> bool | float
    judge: object | None = None  # pairwise: a judge model with .ask(prompts) (eval/judges.py)
    template: str = ""

    @property
    def human(self) -> bool:
        return self.score is None and self.judge is None

    def label(self, items: list[dict]) -> list[str | None]:
        """A verdict per item (None: the judge model's answer could not be read in either order)."""
        if self.judge is not None:
            return self._pairwise(items)
        values = {}
        for side in ("a", "b"):
            values[side] = [self.score(it["prompt"], it[side], it.get("row") or {}) if it[f"{side}_ended"] else 0.0
                            for it in items]
        return [compare(float(va), float(vb)) for va, vb in zip(values["a"], values["b"])]

    def _pairwise(self, items: list[dict]) -> list[str | None]:
        verdicts = pairwise(self.judge, self.template, [it["prompt"] for it in items], [it["a"] for it in items],
                            [it["b"] for it in items])
        out = []
        for v in verdicts:
            s = v.score()  # a's outcome over both orders: 1, 0, 0.5 (tie or the orders disagree)
            out.append(None if s is None else "a" if s == 1.0 else "b" if s == 0.0 else "tie")
        return out


def compare(a: float, b: float) -> str:
    if a != b:
        return "a" if a > b else "b"
    return "tie" if a > 0 else "both_bad"


def check_labeller(recipe, stage: str, spec: str | None, key: str, where: str) -> None:
    """Validate-time: the labeller is one of the known forms and what it names exists (one-line errors)."""
    if spec is None:
        return
    cfg = recipe.stages[stage]
    if spec == EMBEDDED:
        if "embedded" not in cfg.data:
            raise RecipeError("the embedded judge knows only the embedded world's prompts", where=where, key=key,
                              fix="label `data: {embedded: rl_prompts}`, or name another labeller")
        return
    if spec == HUMAN:
        return
    if spec.startswith(JUDGE_PREFIX):
        name = spec[len(JUDGE_PREFIX):]
        if name not in cfg.eval.judges:
            have = ", ".join(cfg.eval.judges) or "none"
            raise RecipeError(f"labeller {spec!r} names no judge of this stage (its judges: {have})", where=where,
                              key=key, fix=f"add `eval: {{judges: {{{name or 'name'}: {{model: ...}}}}}}` to the stage")
        return
    if ":" not in spec:
        raise RecipeError(f"unknown labeller {spec!r}", where=where, key=key,
                          fix="use embedded, human, judge:<name of an eval judge> or module:function")

    load_verifier(spec, where, key)


def load_labeller(ctx, spec: str) -> Labeller:
    """The labeller `spec` names, ready to label (a judge model is loaded here)."""
    if spec == EMBEDDED:
        return Labeller(spec, ROLE_EMBEDDED, score=embedded_judge)
    if spec == HUMAN:
        return Labeller(spec, "people, on the page `alignpipe label` serves")
    if spec.startswith(JUDGE_PREFIX):
        judge = ctx.config.eval.judges[spec[len(JUDGE_PREFIX):]]
        if judge.verifier:
            return Labeller(spec, f"verifier {judge.verifier}", score=load_verifier(judge.verifier))

        return Labeller(spec, f"pairwise judge model {judge.model or judge.endpoint}",
                        judge=judge_model(judge, ctx.recipe.model), template=judging_prompt(judge, ctx.recipe.path))

    return Labeller(spec, f"verifier {spec}", score=load_verifier(spec))


def agreement(first: dict[str, str], second: dict[str, str]) -> dict:
    """How often two labellers gave the same verdict, over the items both labelled."""
    both = sorted(set(first) & set(second))
    same = sum(first[i] == second[i] for i in both)
    # on the items where both named a winner: did they name the same one?
    decided = [i for i in both if first[i] in ("a", "b") and second[i] in ("a", "b")]
    return {"label_agreement": same / len(both) if both else None, "label_agreement_items": len(both),
            "label_agreement_on_winner": (sum(first[i] == second[i] for i in decided) / len(decided)) if decided
            else None, "label_agreement_winner_items": len(decided)}
