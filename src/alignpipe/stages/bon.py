"""Best-of-n as a baseline (`alignpipe.eval.best_of_n`): N = max(ns) samples per held-out prompt from the parent,
scored by the reward model, judged by the gold; gold, proxy and KL for each n in `ns`. It trains nothing and
saves no model: its figures are the manifest's `best_of_n` rows, its samples `bon_samples.jsonl`.

Recipe:
    bon:
      from: sft
      reward_model: reward
      ns: [1, 2, 4, 8, 16, 32]
      eval: {num_prompts: 100, max_new_tokens: 32}     # the prompts and the sampling protocol
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignpipe.errors import AlignpipeError, RecipeError
from alignpipe.eval.best_of_n import DEFAULT_NS, curve
from alignpipe.recipe.kinds import StageKind
from alignpipe.recipe.schema import StageConfig
from alignpipe.runfolder.files import write_jsonl_atomic
from alignpipe.runtime.progress import say
from alignpipe.stages.helpers import check_scorer_reference

SAMPLES_FILE = "bon_samples.jsonl"


@dataclass
class Config(StageConfig):
    reward_model: str | None = None  # the proxy that picks the best of n
    ns: list[int] = field(default_factory=lambda: list(DEFAULT_NS))


@dataclass
class NoTrainer:
    """A bon stage trains nothing: any `trainer:` key is an error."""


def trainer_config_class():
    return NoTrainer


def check(recipe, name: str, where: str) -> None:
    cfg, key = recipe.stages[name], f"stages.{name}"
    if cfg.from_ is None:
        raise RecipeError("a bon stage samples from a policy stage", where=where, key=f"{key}.from",
                          fix="add `from: sft`")
    if cfg.reward_model is None:
        raise RecipeError("a bon stage needs the proxy that picks the best response", where=where,
                          key=f"{key}.reward_model", fix="add `reward_model: reward`")
    check_scorer_reference(recipe, name, where)
    if not cfg.ns or any(not isinstance(n, int) or n < 1 for n in cfg.ns):
        raise RecipeError(f"ns must be positive whole numbers, got {cfg.ns!r}", where=where, key=f"{key}.ns",
                          fix="e.g. ns: [1, 2, 4, 8, 16, 32]")


def run(ctx) -> dict:
    from alignpipe.eval.judges import load_verifier, run_verifier
    from alignpipe.eval.policy import judges_of, sample
    from alignpipe.eval.selection import eval_prompts
    from alignpipe.reward.artifact import load_reward_model, score

    cfg, spec = ctx.config, ctx.config.eval
    ctx.dir.mkdir(parents=True, exist_ok=True)
    rows = eval_prompts(ctx)
    verifiers = [(n, j) for n, j in judges_of(ctx).items() if not j.pairwise]
    if not rows or not verifiers:
        raise AlignpipeError("best-of-n needs held-out prompts and a verifier judge", where=str(ctx.recipe.path),
                             key=f"stages.{ctx.name}.eval", fix="give eval.prompts and eval.judges")
    gold, judge = verifiers[0]
    tokenizer = ctx.load_tokenizer()
    drawn = sample(ctx.load_model(), tokenizer, [r["prompt"] for r in rows], max(cfg.ns), spec.max_new_tokens,
                   spec.temperature, spec.top_p, ctx.seed, spec.batch_size, spec.batch_memory_mb, stage=ctx.name)
    fn = load_verifier(judge.verifier, str(ctx.recipe.path), f"stages.{ctx.name}.eval.judges.{gold}.verifier")
    verdicts = run_verifier(fn, drawn.prompts, drawn.responses, [rows[i] for i in drawn.prompt_index], drawn.ended)
    artifact = load_reward_model(ctx.stage_dir(cfg.reward_model), ctx.recipe.model)
    scores = score(artifact, drawn.prompt_messages, drawn.responses)
    samples = [{"prompt": p, "response": r, "ended": e, "proxy": s, gold: float(v)}
               for p, r, e, s, v in zip(drawn.prompts, drawn.responses, drawn.ended, scores, verdicts)]
    write_jsonl_atomic(ctx.dir / SAMPLES_FILE, samples)
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s)
    table = curve(by_prompt, sorted(set(cfg.ns)), gold, ctx.seed)
    for row in table:
        say(f"[alignpipe] stage {ctx.name}: best of {row['n']}: {gold} {row['gold']:.3f}, proxy "
                 f"{row['proxy']:.3f}, KL {row['kl']:.3f} nats (plug-in; closed form {row['kl_closed_form']:.3f})")
    return {"best_of_n": table, "bon_gold": gold, "bon_reward_stage": cfg.reward_model, "bon_prompts": len(by_prompt),
            "bon_samples_per_prompt": max(cfg.ns), "best_of_n_distinct_share":
                len({(s["prompt"], s["response"]) for s in samples}) / len(samples)}


DECLARES = (StageKind("bon", Config, run, trainer_config_class, family="prompts", embedded=None, policy=False,
                      references=("reward_model",), check=check),)
