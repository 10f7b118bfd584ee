"""The PPO trainer (RLHF step 3), written on transformers, peft and accelerate: the stage `ppo` wires
the recipe to it, as TRL's scripts wire theirs (its maths is in `ppo_math`, tested against hand values).

Each update: sample one response per prompt with the KV cache; score it at the end of the turn with
the reward source (a reward model normalised by its stage's held-out mean/std, or a function; a
response that never ends its turn loses `missing_eot_penalty`); turn that into per-token rewards with
a KL penalty to the reference policy (adaptive or fixed coefficient); estimate advantages with GAE
from the value head; then a few epochs of clipped policy + value loss over minibatches, stopping early
if the policy moves too far (approx-KL). Optionally PPO-ptx (InstructGPT): each optimiser step also
takes `ptx_coef` times the next-token loss on a batch of plain text.

With LoRA one copy of the base weights serves the policy (adapter on), the reference (adapter off)
and the value head beside them. Full fine-tuning keeps a frozen copy as the reference.
"""

from __future__ import annotations

# Heavy imports (torch, accelerate, safetensors; rl.policy, rl.ppo_math, rl.state, rl.rollout (which import them))
# stay inside the functions that use them: the CLI starts without them.
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.runfolder.files import read_jsonl, write_jsonl_atomic
from alignpipe.runtime.distributed import dump_parameter_checksum
from alignpipe.runtime.progress import Progress, log_row
from alignpipe.runtime.tracking import log_metrics


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


@dataclass
class PPOFolders:
    """Where the trainer writes: its log rows, TensorBoard events and resumable checkpoints."""

    train_log: Path  # one JSON row per update
    logs: Path  # TensorBoard
    checkpoints: Path  # checkpoints/update-N (alignpipe.rl.state)


class PPOTrainer:
    """`train()` runs `settings.total_updates` updates of the policy `load_model()` returns (with a value
    head; `peft_config`: LoRA), resuming from the newest complete checkpoint when `resume`; `save(folder)`
    writes the policy and its value head. Seeded by `seed` alone: a resumed run draws what an
    uninterrupted one would."""

    def __init__(self, settings: PPOSettings, load_model: Callable[[], Any], tokenizer, peft_config, seed: int,
                 folders: PPOFolders, name: str, resume: bool = True, checkpoint_every: int = 25):
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from alignpipe.rl import policy as rl_policy
        from alignpipe.rl import ppo_math as pm

        s = self.settings = settings
        self.tokenizer, self.seed, self.folders, self.name = tokenizer, seed, folders, name
        self.resume, self.checkpoint_every = resume, checkpoint_every
        # Without a GPU, processes only form a (gloo) group with cpu=True; a PartialState made earlier without
        # it (the runner's barrier) would leave each process training alone, so start accelerate's state afresh,
        # as transformers' TrainingArguments does for the TRL stages.
        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device, self.rank, self.world = (self.accelerator.device, self.accelerator.process_index,
                                              self.accelerator.num_processes)
        torch.manual_seed(seed)

        # --- models: policy + value head, reference
        lm = load_model()
        if s.activation_checkpointing:
            lm.activation_checkpointing_enable()
        policy, self.reference = rl_policy.build(lm, peft_config)
        self.reference.to(self.device)
        self.memory = {"policy_weights": rl_policy.distinct_weights(policy),
                       "value_head_weights": rl_policy.distinct_weights(policy.value_head),
                       # 0 with LoRA: the reference is the policy with its adapter off
                       "reference_extra_weights": rl_policy.distinct_weights(policy, self.reference)
                       - rl_policy.distinct_weights(policy)}
        self.trainable = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=s.learning_rate, weight_decay=s.weight_decay)
        schedule = (lambda u: 1.0) if s.lr_schedule == "constant" else (lambda u: max(0.0, 1.0 - u / s.total_updates))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.policy, self.optimizer = self.accelerator.prepare(policy, self.optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.policy)
        if s.kl_target is None:
            self.kl_ctl = pm.FixedKLController(s.kl_coef)
        else:
            self.kl_ctl = pm.AdaptiveKLController(s.kl_coef, s.kl_target, s.kl_horizon)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def mean_all(self, x) -> float:
        """Mean over processes (every process must call it)."""
        import torch

        return self.accelerator.reduce(torch.as_tensor(x, dtype=torch.float32, device=self.device),
                                       reduction="mean").item()

    def train(self, source, prompts: list, ptx_blocks=None, on_update: Callable = lambda update, row: None) -> dict:
        """Every update from the resumed one on, scored by `source` (`rl.rewards.RewardSource`) on `prompts`, PPO-ptx
        on `ptx_blocks` [N, block], `on_update(update, row)` after each and (start, None) first; memory, summary."""
        s = self.settings
        start, history, writer = self._resume()
        on_update(start, None)
        bar = Progress(f"stage {self.name} ppo", s.total_updates, start=start, unit="update")
        for update in range(start, s.total_updates):
            row = self._update(update, source, prompts, ptx_blocks)
            history.append(row)
            self._log(row, writer)
            bar.set(update + 1)
            on_update(update + 1, row)
            self._checkpoint(update + 1)
        bar.close()
        if writer is not None:
            writer.close()
        dump_parameter_checksum(self.name, self.policy, self.unwrapped, s.total_updates)
        return {**self.memory, **summarise(history)}

    def _resume(self):
        """(the first update, the train log's rows before it, the TensorBoard writer or None): from the newest
        complete checkpoint; the log keeps only the updates that checkpoint contains."""
        from torch.utils.tensorboard import SummaryWriter

        from alignpipe.rl import state

        folders, log_path = self.folders, self.folders.train_log
        start = 0
        resume_from = state.newest(folders.checkpoints) if self.resume else None
        if resume_from is not None:
            start = state.load(resume_from, self.unwrapped, self.optimizer, self.scheduler, self.kl_ctl)
            print(f"[alignpipe] stage {self.name}: resuming from {resume_from} (update {start})", flush=True)
        history = [] if start == 0 or not log_path.is_file() else \
            [row for row in read_jsonl(log_path) if row["update"] <= start]
        writer = None
        if self.accelerator.is_main_process:
            write_jsonl_atomic(log_path, history)
            writer = SummaryWriter(str(folders.logs), purge_step=start + 1)  # drop events past the checkpoint
        return start, history, writer

    def _update(self, update: int, source, prompts: list, ptx_blocks) -> dict:
        """One PPO update: rollout, scores, advantages, PPO epochs, the KL controller. Returns its log row."""
        import torch

        from alignpipe.rl import ppo_math as pm
        from alignpipe.rl.rollout import generate

        s, dev, world, tokenizer, mean_all = self.settings, self.device, self.world, self.tokenizer, self.mean_all
        torch.manual_seed(update_seed(self.seed, update, self.rank))
        t0 = time.perf_counter()

        # --- 1. rollout: sample with the KV cache
        batch = prompt_batch(prompts, update, s.rollout_batch_size, self.rank, world, self.seed)
        ro = generate(self.unwrapped.lm, tokenizer, batch, s.max_new_tokens, s.temperature, tokenizer.eos_token_id)
        t1 = time.perf_counter()

        # --- 2. score at the end of the turn; a response cut off unfinished is penalised
        raw = torch.tensor(source.raw(ro.prompts, ro.responses), device=dev)
        normalised = (raw - source.mean) / source.std
        scores = normalised - s.missing_eot_penalty * (~ro.ended).float()
        t2 = time.perf_counter()

        # --- 3. old log-probs, values and reference log-probs; per-token rewards; advantages
        mask = ro.response_mask
        old_logp, old_values, ref_logp, entropy = forward_rollout(self.unwrapped, self.reference, ro, s)
        token_r, kl = pm.token_rewards(scores, old_logp, ref_logp, mask, self.kl_ctl.value, s.kl_estimator)
        if s.whiten_rewards:
            token_r = pm.masked_whiten(token_r, mask, shift_mean=False)
        advantages, returns = pm.gae(token_r, old_values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = pm.masked_whiten(advantages, mask)
        t3 = time.perf_counter()

        # --- 4. PPO epochs over minibatches
        ptx = None if ptx_blocks is None else ptx_batches(ptx_blocks, s, update_seed(self.seed, update, self.rank), dev)
        stats, steps, stopped = optimise(self.policy, self.optimizer, self.accelerator, self.trainable, ro, old_logp,
                                         old_values, advantages, returns, s, mean_all, ptx)
        self.scheduler.step()
        t4 = time.perf_counter()

        # --- 5. KL controller
        mean_kl = mean_all((kl * mask).sum(1).mean())  # nats per response
        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, len(ro) * world)
        return {
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
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "time_gen": t1 - t0,
            "time_score": t2 - t1,
            "time_forward": t3 - t2,
            "time_train": t4 - t3,
            "samples": len(ro) * world,
            "samples_per_s": len(ro) * world / (t4 - t0),
        }

    def _log(self, row: dict, writer) -> None:
        """An update's row: the train log, TensorBoard, the stage log (the console with -v), the recipe's trackers."""
        if not self.accelerator.is_main_process:
            return
        with open(self.folders.train_log, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "update":
                writer.add_scalar(f"ppo/{k}", float(v), row["update"])
        log_row(row)
        log_metrics(row, step=row["update"])

    def _checkpoint(self, done: int) -> None:
        """A checkpoint after every `checkpoint_every` updates (not after the last: the stage saves its model)."""
        from alignpipe.rl import state

        if done % self.checkpoint_every == 0 and done < self.settings.total_updates:
            if self.accelerator.is_main_process:
                state.save(self.folders.checkpoints, done, self.unwrapped, self.optimizer, self.scheduler, self.kl_ctl)
            self.accelerator.wait_for_everyone()

    def save(self, folder: Path) -> None:
        """The policy (LoRA: the adapter only), its tokenizer and its value head (main process)."""
        if not self.accelerator.is_main_process:
            return
        from safetensors.torch import save_file

        self.unwrapped.lm.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in self.unwrapped.value_head.state_dict().items()},
                  str(folder / "value_head.safetensors"))


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
