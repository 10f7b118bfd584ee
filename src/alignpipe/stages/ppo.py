"""PPO against a reward model (RLHF step 3), written here on transformers, peft and accelerate.

Each update: sample one response per prompt with the KV cache; score it at the end of the turn with
the reward model (normalised by the reward stage's held-out mean/std; a response that never ends
its turn loses `missing_eot_penalty`); turn that into per-token rewards with a KL penalty to the
reference policy (adaptive or fixed coefficient); estimate advantages with GAE from the value head;
then a few epochs of clipped policy + value loss over minibatches, stopping early if the policy
moves too far (approx-KL). The maths is in `alignpipe.rl.ppo_math`, tested against hand values.
Optionally PPO-ptx (InstructGPT): each optimiser step also takes `ptx_coef` times the next-token loss
on a batch of plain text (`ptx_data`, e.g. the pretraining corpus), against the drift of what the
model knew while PPO changes how it answers.

With LoRA one copy of the base weights serves the policy (adapter on), the reference (adapter off)
and the value head beside them. Full fine-tuning keeps a frozen copy as the reference.
Recipe:
    ppo:
      from: sft
      reward_model: reward            # or reward_function: alignpipe.data.world:judge_reward
      data: {embedded: rl_prompts}
      trainer: {total_updates: 60, rollout_batch_size: 64, learning_rate: 3.0e-5, kl_target: 2.0}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignpipe.errors import RecipeError
from alignpipe.recipe import StageConfig


@dataclass
class Config(StageConfig):
    reward_model: str | None = None  # a reward stage of this recipe
    reward_function: str | None = None  # or `module:function` in TRL's reward-function form
    ptx_data: dict = field(default_factory=dict)  # plain text for PPO-ptx, e.g. {embedded: corpus} or {path: ...}


@dataclass
class PPOSettings:
    """The `trainer:` block of a ppo stage (per process: DDP multiplies the batch)."""

    total_updates: int = 60  # rollout + optimisation rounds
    rollout_batch_size: int = 64  # prompts (one response each) per update
    minibatch_size: int = 16  # responses per optimiser step
    micro_batch_size: int | None = None  # split a minibatch to save memory (accumulated); None: no split
    forward_batch_size: int = 64  # responses per no-grad forward when scoring a rollout
    ppo_epochs: int = 2  # passes over each rollout
    learning_rate: float = 3.0e-5
    lr_schedule: str = "constant"  # constant | linear (to 0 at the last update)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.05  # initial (adaptive) or constant (kl_target: null) KL penalty coefficient
    kl_target: float | None = 1.0  # adaptive controller's target, nats per response; null: fixed kl_coef
    kl_horizon: int = 10000  # controller horizon, in responses
    kl_estimator: str = "k1"  # per-token penalty: k1 | k2 | k3
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    # entropy term of the loss: > 0 is the usual exploration bonus, < 0 sharpens the policy towards its own
    # most likely tokens (entropy minimisation); measured on the default recipe in docs/ppo.md
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    missing_eot_penalty: float = 1.0  # subtracted from the normalised score of a response cut off unfinished
    target_approx_kl: float | None = None  # stop an update's remaining minibatches once approx-KL exceeds this
    ptx_coef: float = 0.0  # PPO-ptx: weight of the next-token loss on `ptx_data` in every optimiser step (0: off)
    ptx_batch_size: int = 8  # text blocks per optimiser step
    ptx_block_size: int = 64  # tokens per block
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    seed: int | None = None  # default: the recipe's seed


def trainer_config_class():
    return PPOSettings


def settings(recipe, name: str) -> PPOSettings:
    """The stage's PPO settings, type-checked like the rest of the recipe."""
    from alignpipe.recipe import from_dict

    where, key = str(recipe.path), f"stages.{name}.trainer"
    s = from_dict(PPOSettings, recipe.stages[name].trainer, where, key)
    positive = ("total_updates", "rollout_batch_size", "minibatch_size", "forward_batch_size", "ppo_epochs",
                "learning_rate", "max_new_tokens", "temperature", "kl_horizon", "clip_range", "clip_range_value")
    for field in positive:
        if not getattr(s, field) > 0:
            raise RecipeError(f"{field} must be > 0, got {getattr(s, field)!r}", where=where, key=f"{key}.{field}",
                              fix=f"set a positive {field}")
    if s.minibatch_size > s.rollout_batch_size:
        raise RecipeError("minibatch_size is larger than rollout_batch_size", where=where, key=f"{key}.minibatch_size",
                          fix="use a minibatch no larger than the rollout batch")
    choices = {"lr_schedule": ("constant", "linear"), "kl_estimator": ("k1", "k2", "k3")}
    for field, allowed in choices.items():
        if getattr(s, field) not in allowed:
            raise RecipeError(f"{field} {getattr(s, field)!r} is not one of {allowed}", where=where,
                              key=f"{key}.{field}", fix=f"use one of {', '.join(allowed)}")
    return s


def check(recipe, name: str, where: str) -> None:
    cfg = recipe.stages[name]
    key = f"stages.{name}"
    s = settings(recipe, name)
    from alignpipe.rl.rewards import check_reward_source

    check_reward_source(recipe, name, where)
    if s.ptx_coef > 0 and not cfg.ptx_data:
        raise RecipeError("ptx_coef > 0 needs text to train on", where=where, key=f"{key}.ptx_data",
                          fix="e.g. ptx_data: {embedded: corpus}, or set trainer.ptx_coef: 0")
    if "embedded" in cfg.ptx_data:
        if cfg.ptx_data["embedded"] != "corpus":
            raise RecipeError(f"ptx_data: embedded {cfg.ptx_data['embedded']!r} is not plain text", where=where,
                              key=f"{key}.ptx_data.embedded", fix="use {embedded: corpus} or a text file")
    elif cfg.ptx_data:  # a text file: read it now, as pretraining would
        from alignpipe.data.loading import check_spec

        check_spec(cfg.ptx_data, recipe.path.parent, where, f"{key}.ptx_data", "pretrain")
    if cfg.from_ is None:
        raise RecipeError("a ppo stage starts from a policy stage", where=where, key=f"{key}.from",
                          fix="set from: sft")


def load_prompts(ctx) -> list[list[dict]]:
    """Prompt conversations (lists of messages ending with the user's turn)."""
    if ctx.config.data.get("embedded") == "rl_prompts":
        rows = ctx.world.rl_prompts()
    else:
        from alignpipe.data.loading import load_family

        rows = load_family(ctx, "prompts")
    return [r["prompt"] for r in rows]


def load_ptx_blocks(ctx, tokenizer, block_size: int) -> "torch.Tensor":
    """The `ptx_data` texts, each ending in EOS, packed into blocks [N, block_size] (as pretraining packs)."""
    import dataclasses

    import torch

    from alignpipe.stages import pretrain

    if "embedded" in ctx.config.ptx_data:
        texts = ctx.world.corpus()
    else:
        from alignpipe.data.loading import load_family

        texts_ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, data=ctx.config.ptx_data))
        texts = [r["text"] for r in load_family(texts_ctx, "text")]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pretrain.pack([d + [tokenizer.eos_token_id] for d in ids], block_size)
    if not blocks:
        raise RecipeError(f"ptx_data gives no block of {block_size} tokens", where=str(ctx.recipe.path),
                          key=f"stages.{ctx.name}.ptx_data", fix="give more text, or a smaller ptx_block_size")
    return torch.tensor(blocks, dtype=torch.long)


def prompt_batch(prompts: list, update: int, size: int, rank: int, world: int, seed: int) -> list:
    """The prompts of `update` for process `rank`: consecutive slices of a stream that walks a fresh
    seeded permutation of the prompts each epoch. A pure function of its arguments, so a resumed run
    draws exactly the prompts the uninterrupted one would have."""
    import torch

    out, n = [], len(prompts)
    start = (update * world + rank) * size
    for i in range(start, start + size):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(prompts[int(perm[pos])])
    return out


def update_seed(seed: int, update: int, rank: int) -> int:
    return (seed * 1_000_003 + update * 1_009 + rank) % (2**31 - 1)


def run(ctx) -> dict:
    import json
    import time

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.utils.tensorboard import SummaryWriter

    from alignpipe.rl import ppo_math as pm
    from alignpipe.rl import policy as rl_policy
    from alignpipe.rl import rewards, state
    from alignpipe.progress import Progress, log_row
    from alignpipe.rl.rollout import generate
    from alignpipe.stages.sft import lora_config
    from alignpipe.tracking import log_metrics

    cfg, s = ctx.config, settings(ctx.recipe, ctx.name)
    seed = ctx.seed if s.seed is None else s.seed
    # Without a GPU, processes only form a (gloo) group with cpu=True; a PartialState made earlier without
    # it (the runner's barrier) would leave each process training alone, so start accelerate's state afresh,
    # as transformers' TrainingArguments does for the TRL stages.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dev, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    torch.manual_seed(seed)

    # --- models: policy + value head, reference, reward
    tokenizer = ctx.load_tokenizer()
    lm = ctx.load_model()
    if s.activation_checkpointing:
        lm.activation_checkpointing_enable()
    policy, reference = rl_policy.build(lm, lora_config(ctx, "CAUSAL_LM"))
    reference.to(dev)
    memory = {"policy_weights": rl_policy.distinct_weights(policy),
              "value_head_weights": rl_policy.distinct_weights(policy.value_head),
              # 0 with LoRA: the reference is the policy with its adapter off
              "reference_extra_weights": rl_policy.distinct_weights(policy, reference)
              - rl_policy.distinct_weights(policy)}
    if cfg.reward_model:
        source, artifact = rewards.from_reward_stage(ctx.stage_dir(cfg.reward_model), ctx.recipe.model)
        artifact.model.to(dev).eval()
    else:
        source = rewards.from_function(cfg.reward_function, str(ctx.recipe.path))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.learning_rate, weight_decay=s.weight_decay)
    schedule = (lambda u: 1.0) if s.lr_schedule == "constant" else (lambda u: max(0.0, 1.0 - u / s.total_updates))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    if s.kl_target is None:
        kl_ctl = pm.FixedKLController(s.kl_coef)
    else:
        kl_ctl = pm.AdaptiveKLController(s.kl_coef, s.kl_target, s.kl_horizon)

    # --- resume from the newest complete checkpoint; the log keeps only the updates it contains
    log_path = ctx.dir / "train_log.jsonl"
    start = 0
    resume_from = state.newest(ctx.checkpoints_dir) if ctx.resume else None
    if resume_from is not None:
        start = state.load(resume_from, unwrapped, optimizer, scheduler, kl_ctl)
        print(f"[alignpipe] stage {ctx.name}: resuming from {resume_from} (update {start})", flush=True)
    history = [] if start == 0 or not log_path.is_file() else \
        [row for row in map(json.loads, log_path.read_text().splitlines()) if row["update"] <= start]
    writer = None
    if accelerator.is_main_process:
        ctx.dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(row) + "\n" for row in history))
        writer = SummaryWriter(str(ctx.logs_dir), purge_step=start + 1)  # drop events past the checkpoint

    prompts = load_prompts(ctx)
    ptx_blocks = load_ptx_blocks(ctx, tokenizer, s.ptx_block_size) if s.ptx_coef > 0 else None
    every = cfg.checkpoint_every or 25

    def mean_all(x) -> float:
        """Mean over processes (every process must call it)."""
        return accelerator.reduce(torch.as_tensor(x, dtype=torch.float32, device=dev), reduction="mean").item()

    bar = Progress(f"stage {ctx.name} ppo", s.total_updates, start=start, unit="update")
    for update in range(start, s.total_updates):
        torch.manual_seed(update_seed(seed, update, rank))
        t0 = time.perf_counter()

        # --- 1. rollout: sample with the KV cache
        batch = prompt_batch(prompts, update, s.rollout_batch_size, rank, world, seed)
        ro = generate(unwrapped.lm, tokenizer, batch, s.max_new_tokens, s.temperature, tokenizer.eos_token_id)
        t1 = time.perf_counter()

        # --- 2. score at the end of the turn; a response cut off unfinished is penalised
        raw = torch.tensor(source.raw(ro.prompts, ro.responses), device=dev)
        normalised = (raw - source.mean) / source.std
        scores = normalised - s.missing_eot_penalty * (~ro.ended).float()
        t2 = time.perf_counter()

        # --- 3. old log-probs, values and reference log-probs; per-token rewards; advantages
        mask = ro.response_mask
        old_logp, old_values, ref_logp, entropy = forward_rollout(unwrapped, reference, ro, s)
        token_r, kl = pm.token_rewards(scores, old_logp, ref_logp, mask, kl_ctl.value, s.kl_estimator)
        if s.whiten_rewards:
            token_r = pm.masked_whiten(token_r, mask, shift_mean=False)
        advantages, returns = pm.gae(token_r, old_values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = pm.masked_whiten(advantages, mask)
        t3 = time.perf_counter()

        # --- 4. PPO epochs over minibatches
        ptx = None if ptx_blocks is None else ptx_batches(ptx_blocks, s, update_seed(seed, update, rank), dev)
        stats, steps, stopped = optimise(policy, optimizer, accelerator, trainable, ro, old_logp, old_values,
                                         advantages, returns, s, mean_all, ptx)
        scheduler.step()
        t4 = time.perf_counter()

        # --- 5. KL controller, log, checkpoint
        mean_kl = mean_all((kl * mask).sum(1).mean())  # nats per response
        kl_coef_used = kl_ctl.value
        kl_ctl.update(mean_kl, len(ro) * world)
        row = {
            "update": update + 1,
            "reward_raw": mean_all(raw.mean()),
            "reward_normalised": mean_all(normalised.mean()),
            "score": mean_all(scores.mean()),  # what PPO optimised: normalised minus the end-of-turn penalty
            "kl": mean_kl,
            "kl_coef": kl_coef_used,
            "entropy": mean_all(pm.masked_mean(entropy, mask)),
            **{k: mean_all(v) for k, v in sorted(stats.items())},
            "response_length": mean_all(mask.sum(1).mean()),
            "eot_share": mean_all(ro.ended.float().mean()),
            "value_mean": mean_all(pm.masked_mean(old_values, mask)),
            "return_mean": mean_all(pm.masked_mean(returns, mask)),
            "optimizer_steps": steps,
            "early_stopped": stopped,
            "learning_rate": optimizer.param_groups[0]["lr"],
            "time_gen": t1 - t0,
            "time_score": t2 - t1,
            "time_forward": t3 - t2,
            "time_train": t4 - t3,
            "samples": len(ro) * world,
            "samples_per_s": len(ro) * world / (t4 - t0),
        }
        history.append(row)
        if accelerator.is_main_process:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            for k, v in row.items():
                if k != "update":
                    writer.add_scalar(f"ppo/{k}", float(v), update + 1)
            log_row(row)  # the stage log (the console with -v) and the recipe's trackers
            log_metrics(row, step=update + 1)
        bar.set(update + 1)
        if (update + 1) % every == 0 and update + 1 < s.total_updates:
            if accelerator.is_main_process:
                state.save(ctx.checkpoints_dir, update + 1, unwrapped, optimizer, scheduler, kl_ctl)
            accelerator.wait_for_everyone()
    bar.close()
    if writer is not None:
        writer.close()

    dump_parameter_checksum(ctx, policy, unwrapped, s.total_updates)

    # --- save the policy (LoRA: the adapter only; its base is the parent, recorded in the manifest)
    metrics: dict = {"updates": s.total_updates, "reward_source": cfg.reward_model or cfg.reward_function,
                     "judge_used_for_training": rewards.is_judge(cfg.reward_function), **memory,
                     **summarise(history)}
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        unwrapped.lm.save_pretrained(str(ctx.model_dir))
        tokenizer.save_pretrained(str(ctx.model_dir))
        save_file({k: v.contiguous() for k, v in unwrapped.value_head.state_dict().items()},
                  str(ctx.model_dir / "value_head.safetensors"))

    # --- evaluate as every policy stage does, then look for reward hacking (main process)
    if cfg.reward_model:
        del source, artifact  # evaluate_stage loads the reward model itself
    if ctx.config.eval.enabled and accelerator.is_main_process:
        from alignpipe.evaluation import evaluate_stage

        unwrapped.eval()
        metrics.update(evaluate_stage(ctx, unwrapped.lm, tokenizer, reference))
        metrics.update(parent_comparison(ctx, metrics))
    if world > 1:  # every process returns the same metrics (the runner checks gates on each)
        from accelerate.utils import broadcast_object_list

        metrics = broadcast_object_list([metrics], from_process=0)[0]
    accelerator.wait_for_everyone()
    return metrics


def dump_parameter_checksum(ctx, wrapped, model, updates: int) -> None:
    """With ALIGNPIPE_DEBUG_PARAM_CHECKSUM set: record this process's view of the trained policy, in
    the format of `alignpipe.distributed.dump_parameter_checksum` (tests compare ranks with it)."""
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist

    from alignpipe.distributed import CHECKSUM_ENV, parameter_checksum

    folder = os.environ.get(CHECKSUM_ENV)
    if not folder:
        return
    record = {"stage": ctx.name, "rank": dist.get_rank() if dist.is_initialized() else 0,
              "world_size": dist.get_world_size() if dist.is_initialized() else 1,
              "backend": dist.get_backend() if dist.is_initialized() else None,
              "wrapped_as": type(wrapped).__name__, "checksum": parameter_checksum(model), "global_step": updates}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{ctx.name}-rank{record['rank']}.json").write_text(json.dumps(record, indent=2) + "\n")


def forward_rollout(policy, reference, ro, s: PPOSettings):
    """Without gradients, in chunks: the sampling policy's log-probs, values and entropy, and the
    reference's log-probs, of every response token. [B, T] each."""
    import torch

    from alignpipe.rl import ppo_math as pm
    from alignpipe.rl.policy import response_logits

    full_width = ro.response_ids.shape[1]
    parts: list[list] = [[], [], [], []]
    with torch.no_grad():
        for i in range(0, len(ro), s.forward_batch_size):
            ids, am, prompt_len, tokens, width = ro.rows(torch.arange(i, min(i + s.forward_batch_size, len(ro))))
            logits, values = policy(ids, am, prompt_len, s.temperature)
            ref_logits = response_logits(reference, ids, am, prompt_len, s.temperature)
            for part, x in zip(parts, (pm.logprobs_from_logits(logits, tokens), values,
                                       pm.logprobs_from_logits(ref_logits, tokens), pm.entropy_from_logits(logits))):
                part.append(torch.nn.functional.pad(x, (0, full_width - width)))  # back to the batch's width
    return tuple(torch.cat(p) for p in parts)


def ptx_batches(blocks, s: PPOSettings, seed: int, dev):
    """An endless stream of `ptx_batch_size` random text blocks for one update (seeded: resumable)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        yield blocks[torch.randint(len(blocks), (s.ptx_batch_size,), generator=gen)].to(dev)


def optimise(policy, optimizer, accelerator, trainable, ro, old_logp, old_values, advantages, returns,
             s: PPOSettings, mean_all, ptx=None) -> tuple[dict[str, float], int, bool]:
    """`ppo_epochs` passes over the rollout in shuffled minibatches, one optimiser step each
    (a minibatch split into micro-batches accumulates; with `ptx`, a batch of text blocks adds
    `ptx_coef` times its next-token loss). Stops early when a minibatch's approx-KL exceeds
    `target_approx_kl`. Returns (mean stats per step, optimiser steps, stopped early)."""
    from contextlib import nullcontext

    import torch

    from alignpipe.rl import ppo_math as pm

    policy.train()
    mask = ro.response_mask
    sums: dict[str, float] = {}
    steps = 0
    micro = s.micro_batch_size or s.minibatch_size
    for _epoch in range(s.ppo_epochs):
        order = torch.randperm(len(ro))
        for mb_start in range(0, len(ro), s.minibatch_size):
            mb = order[mb_start:mb_start + s.minibatch_size]
            chunks = [mb[j:j + micro] for j in range(0, len(mb), micro)]
            step: dict[str, float] = {}
            if ptx is not None:  # through the policy's own forward, so DDP sees it; synced with the last chunk
                blocks = next(ptx)
                with accelerator.no_sync(policy):
                    logits, _ = policy(blocks, torch.ones_like(blocks), 1)
                    ptx_loss = -pm.logprobs_from_logits(logits, blocks[:, 1:]).mean()
                    accelerator.backward(s.ptx_coef * ptx_loss)
                step["ptx_loss"] = ptx_loss.item()
            for c, idx in enumerate(chunks):
                # gradients are averaged over processes once per optimiser step, not per micro-batch
                with accelerator.no_sync(policy) if c < len(chunks) - 1 else nullcontext():
                    ids, am, prompt_len, tokens, w = ro.rows(idx)  # padding columns cost compute, drop them
                    logits, values = policy(ids, am, prompt_len, s.temperature)
                    logp = pm.logprobs_from_logits(logits, tokens)
                    pg_loss, pg_stats = pm.policy_loss(logp, old_logp[idx, :w], advantages[idx, :w], mask[idx, :w],
                                                       s.clip_range)
                    vf_loss, vf_stats = pm.value_loss(values, old_values[idx, :w], returns[idx, :w], mask[idx, :w],
                                                      s.clip_range_value)
                    share = len(idx) / len(mb)
                    loss = pg_loss + s.vf_coef * vf_loss
                    if s.entropy_coef:
                        ent = pm.masked_mean(pm.entropy_from_logits(logits), mask[idx, :w])
                        loss = loss - s.entropy_coef * ent
                    accelerator.backward(loss * share)
                for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss, **pg_stats, **vf_stats}.items():
                    step[k] = step.get(k, 0.0) + v.item() * share
            step["grad_norm"] = float(accelerator.clip_grad_norm_(trainable, s.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            for k, v in step.items():
                sums[k] = sums.get(k, 0.0) + v
            # every process takes the same decision, or DDP would wait forever
            if s.target_approx_kl is not None and mean_all(step["approx_kl"]) > s.target_approx_kl:
                return {k: v / steps for k, v in sums.items()}, steps, True
    return {k: v / steps for k, v in sums.items()}, steps, False


def summarise(history: list[dict]) -> dict:
    """Headline training figures: reward and KL at the start and end (means of 5 updates), totals of
    the time split, throughput."""
    if not history:
        return {}
    head, tail = history[:5], history[-5:]

    def avg(rows, k):
        return sum(r[k] for r in rows) / len(rows)

    times = {k: sum(r[k] for r in history) for k in ("time_gen", "time_score", "time_forward", "time_train")}
    total = sum(times.values())
    samples = sum(r["samples"] for r in history)
    return {
        "train_reward_first": avg(head, "reward_normalised"),
        "train_reward_last": avg(tail, "reward_normalised"),
        "train_reward_raw_first": avg(head, "reward_raw"),
        "train_reward_raw_last": avg(tail, "reward_raw"),
        "train_kl_last": avg(tail, "kl"),
        "kl_coef_last": history[-1]["kl_coef"],
        "train_eot_share_last": avg(tail, "eot_share"),
        "train_runtime_s": total,
        **{f"{k}_s": v for k, v in times.items()},
        "train_samples_per_s": samples / total if total else None,
    }


def parent_comparison(ctx, metrics: dict) -> dict:
    """The parent's judge pass rate and reward-model score on its own held-out samples (same protocol),
    and `reward_hacking_suspected` when the RM score rose while the judge pass rate fell."""
    import json

    from alignpipe.evaluation import reward_stage_of

    samples_file = ctx.parent_dir / "eval_samples.jsonl"
    rm_stage = metrics.get("reward_stage") or reward_stage_of(ctx.recipe, ctx.name)
    if rm_stage is None or not samples_file.is_file() or "mean_reward" not in metrics \
            or "judge_pass_rate" not in metrics:
        return {}
    from alignpipe.reward.artifact import load_reward_model, score

    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    artifact = load_reward_model(ctx.stage_dir(rm_stage), ctx.recipe.model)
    parent_scores = score(artifact, [r["prompt"] for r in rows], [r["response"] for r in rows])
    out = {
        "parent_mean_reward": sum(parent_scores) / len(parent_scores),
        "parent_judge_pass_rate": sum(bool(r["judge"]) for r in rows) / len(rows),
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
