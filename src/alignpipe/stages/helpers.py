"""What several stage kinds share, so that no stage module imports another: the LoRA config, the
(train, held-out) rows of "embedded world or user data", packing, prompts, the reference a policy is
evaluated against, the one policy evaluation, and the checks of a stage that starts from a policy."""

from __future__ import annotations

# Heavy imports (peft; rl.policy, eval.policy (which import them)) stay inside the functions that use them: the CLI
# starts without them.
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

from alignpipe.data.loading import load_family, load_split
from alignpipe.data.screening import screen_world_rows
from alignpipe.errors import RecipeError
from alignpipe.labelling.sources import labelled_pairs
from alignpipe.recipe.dataspec import reads_stages
from alignpipe.recipe.kinds import kind_of
from alignpipe.reward.artifact import load_reward_model, score
from alignpipe.runtime.distributed import is_main_process
from alignpipe.runfolder.files import read_jsonl

if TYPE_CHECKING:
    from alignpipe.stages.context import StageContext


def lora_config(ctx: StageContext, task_type: str):
    """The stage's peft LoraConfig, or None for full fine-tuning."""
    spec = ctx.config.lora
    if spec is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
                      modules_to_save=spec.modules_to_save, task_type=task_type)


def rows(ctx: StageContext, embedded: Callable[[object], tuple[list[dict], list[dict]]], cap: int | None,
         tokenizer=None, max_length: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of the stage: `embedded(world)` for `data: {embedded: ...}`, a label stage's pairs
    for `data: {from: ...}`, else the user's data in the kind's family, split by the recipe's held-out prompts
    (at most `cap` held out; the report counts tokens after the chat template when given the tokenizer)."""
    if "embedded" in ctx.config.data:
        train, held = embedded(ctx.world)
        if is_main_process():  # planted triggers, looked for before training (data/screening.py)
            screen_world_rows(ctx.dir, train, ctx.kind.family)
        return train, held

    if reads_stages(ctx.config.data):  # a label stage's pairs, alone or mixed (alignpipe.labelling.sources)
        return labelled_pairs(ctx, cap, tokenizer, max_length)[:2]

    return load_split(ctx, ctx.kind.family, cap, tokenizer, max_length)


def preference_pairs(ctx: StageContext) -> tuple[list[dict], list[dict]]:
    """(train, held-out) `{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}` rows: the embedded
    world's preference pairs, or a user dataset split by the recipe's held-out prompts."""
    return rows(ctx, lambda world: (world.preference_rows("train"), world.preference_rows("eval")), 200)


def pack(docs: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenate tokenised documents (each ending in EOS) and cut into full blocks; the tail is dropped."""
    flat = [t for d in docs for t in d]
    return [flat[i: i + block_size] for i in range(0, len(flat) - block_size + 1, block_size)]


def load_prompts(ctx: StageContext) -> list[list[dict]]:
    """Prompt conversations (lists of messages ending with the user's turn): the embedded world's RL prompts,
    or the user's prompts."""
    if "embedded" in ctx.config.data:
        found = ctx.world.rl_prompts()
    else:
        found = load_family(ctx, "prompts")
    return [r["prompt"] for r in found]


def start_as_reference(ctx: StageContext, policy):
    """The policy's start as a model to measure KL against: with LoRA the same weights with the adapter off
    (no second copy), else the start loaded again, frozen, on the policy's device."""
    from alignpipe.rl.policy import AdapterOff

    if hasattr(policy, "disable_adapter"):
        return AdapterOff(policy)
    return ctx.load_model().eval().requires_grad_(False).to(next(policy.parameters()).device)


def evaluate_policy(ctx: StageContext, policy, tokenizer, reference=None, against_parent: bool = False) -> dict:
    """The one evaluation of a policy stage (`alignpipe.eval.policy.evaluate_stage`), nothing when the stage's
    `eval.enabled` is off; `reference` is the model KL is measured against, or a function that makes it (called
    only when the stage is evaluated). With `against_parent`, also the parent's figures on its own samples and
    whether reward hacking is suspected (`parent_comparison`)."""
    from alignpipe.eval.policy import evaluate_stage

    if not ctx.config.eval.enabled:
        return {}
    if inspect.isfunction(reference):  # a model (an nn.Module) is callable too: only a function is called
        reference = reference()
    metrics = evaluate_stage(ctx, policy, tokenizer, reference)
    if against_parent:
        metrics.update(parent_comparison(ctx, metrics))
    return metrics


def parent_comparison(ctx: StageContext, metrics: dict) -> dict:
    """The parent's judge pass rate and reward-model score on its own held-out samples (same protocol),
    and `reward_hacking_suspected` when the RM score rose while the judge pass rate fell."""
    from alignpipe.eval.policy import reward_stage_of

    samples_file = ctx.parent_dir / "eval_samples.jsonl"
    rm_stage = metrics.get("reward_stage") or reward_stage_of(ctx.recipe, ctx.name)
    if rm_stage is None or not samples_file.is_file() or "mean_reward" not in metrics \
            or "judge_pass_rate" not in metrics:
        return {}

    saved = read_jsonl(samples_file)
    artifact = load_reward_model(ctx.stage_dir(rm_stage), ctx.recipe.model)
    parent_scores = score(artifact, [r["prompt"] for r in saved], [r["response"] for r in saved])
    out = {
        "parent_mean_reward": sum(parent_scores) / len(parent_scores),
        "parent_judge_pass_rate": sum(bool(r["judge"]) for r in saved) / len(saved),
    }
    out["reward_hacking_suspected"] = reward_hacking(metrics["mean_reward"], metrics["judge_pass_rate"],
                                                     out["parent_mean_reward"], out["parent_judge_pass_rate"])
    if out["reward_hacking_suspected"]:
        print(f"[alignpipe] stage {ctx.name}: reward hacking suspected: reward-model score rose "
              f"{out['parent_mean_reward']:.3f} -> {metrics['mean_reward']:.3f} while the judge pass rate fell "
              f"{out['parent_judge_pass_rate']:.3f} -> {metrics['judge_pass_rate']:.3f}", flush=True)
    return out


def reward_hacking(mean_reward: float, judge: float, parent_mean_reward: float, parent_judge: float) -> bool:
    """The reward model says better while the judge says worse: the policy found the RM's blind spots."""
    return bool(mean_reward > parent_mean_reward and judge < parent_judge)


def check_policy_references(recipe, name: str, where: str) -> None:
    """A stage trained from a policy (dpo, kto, orpo, ...) does not start from a scorer, and its `reward_model`
    (reported beside the judge), if set, names a scorer."""
    cfg = recipe.stages[name]
    key = f"stages.{name}"
    # without `from`, the stage starts from `model.path` (validate rejects that for an `init:` model)
    if cfg.from_ is not None and not kind_of(recipe.stages[cfg.from_].kind).policy:
        raise RecipeError(f"starts from reward stage {cfg.from_!r}, which is not a policy", where=where,
                          key=f"{key}.from", fix="set `from:` to an sft stage")
    check_scorer_reference(recipe, name, where)


def check_scorer_reference(recipe, name: str, where: str) -> None:
    """The stage's `reward_model`, if set, names a stage whose model scores responses."""
    ref = recipe.stages[name].reward_model
    if ref is not None and not kind_of(recipe.stages[ref].kind).scorer:
        raise RecipeError(f"{ref!r} is not a reward stage", where=where, key=f"stages.{name}.reward_model",
                          fix="name a stage of kind reward, or remove the key")
