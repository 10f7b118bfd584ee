"""Which judges of a policy stage are independent evidence, and which the stage optimised.

A stage is never called better on a judge it optimised: its reward model (PPO, GRPO, RLOO), its reward
function, a judge that labelled its training pairs (a `label` stage's labeller), or a reward model trained on
the same pairs as the stage (DPO and the other preference kinds). `optimised_judges(recipe, stage, rm)`
names them, `"rm"` standing for the reward model that scores the stage's samples and any other key for
`eval.judges.<name>` (the embedded world's verifier is `judge`); the evaluation writes them into the
manifest (`optimised_judges`), the report marks their rows, and `validate` says in one line when a policy
stage has no other judge.
"""

from __future__ import annotations

from alignpipe.eval.prompts import resolve
from alignpipe.eval.reward_functions import JUDGE_PREFIX, is_judge
from alignpipe.eval.verifiers import EMBEDDED
from alignpipe.recipe.dataspec import LABELLER_EMBEDDED, LABELLER_HUMAN, LABELLER_JUDGE_PREFIX
from alignpipe.recipe.kinds import kind_of, references
from alignpipe.recipe.schema import JudgeSpec

RM = "rm"
CHANCE = 0.5  # a reward model at or below this on its own held-out pairs ranks them no better than a coin


def _data_key(recipe, data: dict) -> tuple:
    """A stage's `data:` as a comparable value (a file path resolved beside the recipe)."""
    out = []
    for k, v in sorted(data.items()):
        if k == "path" and isinstance(v, str):
            v = str(resolve(v, recipe.path).expanduser().resolve())
        out.append((k, repr(v)))
    return tuple(out)


def _same_judge(a, b) -> bool:
    if a.verifier or b.verifier:
        return bool(a.verifier) and a.verifier == b.verifier
    return (a.model, a.endpoint) == (b.model, b.endpoint)


def _judges(recipe, stage: str) -> dict:
    """The stage's judges as its evaluation has them (`eval.judges`, the embedded world's `judge` for world data)."""
    cfg = recipe.stages[stage]
    judges = dict(cfg.eval.judges)
    if "embedded" in cfg.data and "judge" not in judges:
        judges = {"judge": JudgeSpec(verifier=EMBEDDED), **judges}
    return judges


def _labellers(recipe, stage: str) -> list[tuple[str, object]]:
    """(label stage, judge spec) of each labeller of the pairs this stage trains on (`data: {from: <label>}`)."""
    source = recipe.stages[stage].data.get("from")
    label = recipe.stages.get(source) if isinstance(source, str) else None
    if label is None or label.kind != "label":
        return []
    out = []
    for spec in (label.labeller, label.second_labeller):
        if not spec or spec == LABELLER_HUMAN:
            continue
        if spec == LABELLER_EMBEDDED:
            out.append((source, JudgeSpec(verifier=EMBEDDED)))
        elif spec.startswith(LABELLER_JUDGE_PREFIX) and spec[len(LABELLER_JUDGE_PREFIX):] in label.eval.judges:
            out.append((source, label.eval.judges[spec[len(LABELLER_JUDGE_PREFIX):]]))
        elif ":" in spec:
            out.append((source, JudgeSpec(verifier=spec)))
    return out


def optimised_judges(recipe, stage: str, rm_stage: str | None) -> dict[str, str]:
    """{judge: why it is not independent evidence} for `stage`, whose samples `rm_stage` scores."""
    cfg = recipe.stages[stage]
    kind = kind_of(cfg.kind)
    judges = _judges(recipe, stage)
    out: dict[str, str] = {}
    if kind.trained_on_reward:
        if rm_stage is not None and getattr(cfg, "reward_model", None) == rm_stage:
            out[RM] = f"it optimised reward model `{rm_stage}`"
        fn = getattr(cfg, "reward_function", None)
        used = judges.get(fn[len(JUDGE_PREFIX):]) if fn and fn.startswith(JUDGE_PREFIX) else None  # judge:<name>
        for name, j in judges.items():
            same = j.verifier and (j.verifier == fn or (is_judge(fn) and j.verifier == EMBEDDED)
                                   or (used is not None and used.verifier == j.verifier))
            if fn and (same or fn == f"{JUDGE_PREFIX}{name}"):
                out[name] = f"it optimised `{fn}` as its reward"
    for label, spec in _labellers(recipe, stage):
        for name, j in judges.items():
            if _same_judge(j, spec):
                out.setdefault(name, f"it trained on pairs this judge labelled (stage `{label}`)")
    if rm_stage is not None and rm_stage in recipe.stages and kind.family is not None:
        rm_cfg = recipe.stages[rm_stage]
        if kind.family == kind_of(rm_cfg.kind).family and cfg.data and \
                _data_key(recipe, cfg.data) == _data_key(recipe, rm_cfg.data):
            out.setdefault(RM, f"reward model `{rm_stage}` was trained on the same pairs as this stage")
    return out


def judge_names(recipe, stage: str, rm_stage: str | None) -> list[str]:
    """Every judge of the stage: its reward model (`rm`) when one scores it, then `eval.judges`."""
    return ([RM] if rm_stage else []) + list(_judges(recipe, stage))


def planned_reward_stage(recipe, stage: str) -> str | None:
    """The reward stage that will score `stage`'s samples, known before anything runs: its own
    `reward_model`, else the recipe's first reward stage."""
    own = references(recipe.stages[stage]).get("reward_model")
    if own:
        return own
    return next((n for n, c in recipe.stages.items() if kind_of(c.kind).scorer), None)


def independence_line(recipe, stage: str) -> str | None:
    """`validate`'s one line for an aligned policy stage with no independent judge, else None."""
    cfg = recipe.stages[stage]
    if not kind_of(cfg.kind).aligned or not cfg.eval.enabled or cfg.from_ is None:
        return None
    rm = planned_reward_stage(recipe, stage)
    names = judge_names(recipe, stage, rm)
    optimised = optimised_judges(recipe, stage, rm)
    if any(n not in optimised for n in names):
        return None
    why = "; ".join(f"{'reward model' if n == RM else f'judge `{n}`'}: {optimised[n]}" for n in names)
    return (f"[alignpipe] stage {stage}: no independent judge, so its report verdict will be \"not measured "
            f"independently\" ({why or 'it has no judge at all'}); add one under stages.{stage}.eval.judges: a "
            "verifier, a pairwise judge model or an endpoint (docs/did-it-help.md)")


def below_chance(accuracy) -> bool:
    return isinstance(accuracy, (int, float)) and accuracy <= CHANCE

