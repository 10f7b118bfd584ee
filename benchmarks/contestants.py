"""What `make bench` measures: the settings, the two generated recipes and the list of contestants.

Two model sizes. The *compute* recipe has a ~11M-parameter Llama (random init, fp32), big enough
that matmuls dominate a step on a CPU: there alignpipe's SFT is compared with a hand-written loop
and with the machine's matmul limit (MFU). The *peer* recipe has the ~0.66M-parameter tiny Llama
and the settings LLaMA-Factory was measured with on this machine (batch 8, cutoff 64; 200 / 100 / 90 steps of
SFT / reward / DPO, so that each run trains >= 10 s;
PPO 30 updates of 8 prompts, 16 new tokens), so steps/s compare with its figures directly.

Those figures were taken on data nobody recorded (much shorter sequences than the embedded world's), so
when LLaMA-Factory's venv is built (`make bench-peers`) the `lf_*` contestants run LLaMA-Factory itself on
the same model, data, batch, cutoff and steps as our peer stages, in the same bench run
(benchmarks/lf_contestant.py); without it they are listed as missing.

Contestants are leaf stages of those recipes (their parents are built once, by `prepare`), so
forcing one never invalidates another. A stage kind whose module has not landed yet is reported
as missing instead of failing the run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace

# LLaMA-Factory 0.9.5's PPO figure reported earlier for this 2-core machine (issue 9 / shared/STACK.md): 0.66M-param
# tiny Llama, batch 8, fp32, 30 steps, 16 new tokens, on data of its own. Its PPO does not run on its own declared
# dependencies, so there is no `lf_ppo` contestant, and this is the only comparison for ours. The other stages'
# reported figures (SFT 64-71 steps/s, reward 46, DPO 31-37) were dropped on 2026-12-06: taken on unknown, much
# shorter data (a raw PyTorch loop stays near 25 steps/s on the bench's rows), they printed 0.4-0.5 "ratios" beside
# the `lf_*` contestants' same-work ones (make bench-peers), which are the ratios to read.
REFERENCE = {
    "ppo": {"steps_per_s": 1.1, "samples_per_s": 8.9},
}
REFERENCE_STARTUP_S = 6.5  # LLaMA-Factory spends 6-7 s per command before training starts


@dataclass
class Settings:
    repeats: int = 3  # timed runs per contestant, after one warm-up run in the same process
    # compute-bound model: 6 layers x (4*384^2 + 3*384*1024) + embeddings ~ 10.8M parameters
    compute_model: dict = field(default_factory=lambda: {
        "hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1024, "num_attention_heads": 6,
        "vocab_size": 450, "max_position_embeddings": 256})
    compute_batch: int = 16
    compute_steps: int = 8
    compute_warmup_steps: int = 2  # the warm-up run of a contestant is this short (PPO: updates)
    # peer model: 2 x (4*128^2 + 3*128*608) + 450*128 ~ 0.66M parameters
    peer_model: dict = field(default_factory=lambda: {
        "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 608, "num_attention_heads": 4,
        "vocab_size": 450, "max_position_embeddings": 256})
    peer_batch: int = 8
    peer_cutoff: int = 64
    # per stage kind: >= 10 s of steps for each contestant on the idle machine (about 20 / 9.5 / 9 steps/s),
    # so that a run's timing is not a matter of a second or two
    peer_steps: dict = field(default_factory=lambda: {"sft": 200, "reward": 100, "dpo": 90})
    ppo_updates: int = 30
    ppo_new_tokens: int = 16
    peer_warmup_steps: int = 5
    ppo_warmup_updates: int = 2
    # parents of the contestants (built once, not timed)
    prep_steps: dict = field(default_factory=lambda: {"compute_pretrain": 2, "pretrain": 60, "sft": 30,
                                                      "reward": 30})
    world: dict = field(default_factory=lambda: {
        "n_corpus_docs": 2000, "n_corpus_eval_docs": 50, "n_sft": 600, "n_pairs": 400, "n_eval_pairs": 32,
        "n_eval_prompts": 16, "n_rl_prompts": 256})
    matmul_sizes: tuple = (512, 1024, 2048)
    lf_venv: str | None = None  # LLaMA-Factory's venv (None: $LLAMAFACTORY_VENV or .venv-llamafactory)
    timeout_s: int = 600  # per contestant process
    versus_repeats: int = 8  # interleaved timed runs of ours and LLaMA-Factory's on the same work (paired ratios)
    versus_turn_steps: int = 5  # inside those runs the training loops take turns every this many steps
    # the rounds are shared out over this many fresh pairs of worker processes: the ratio moves with the process
    # pair (sd 2.4% over 6 fresh sft_lora pairs with huge pages), so a run pools several pairs' draws
    versus_process_pairs: int = 4
    budget_s: int = 3600  # contestants still waiting after this are skipped (a full idle run: 30 min, 22 of them versus)

    @classmethod
    def quick(cls) -> "Settings":
        """Tiny everything: checks the plumbing in seconds (tests), says nothing about speed."""
        tiny = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2,
                "vocab_size": 300, "max_position_embeddings": 128}
        return replace(cls(), repeats=1, compute_model=dict(tiny), compute_batch=4, compute_steps=3,
                       peer_model=dict(tiny), peer_steps={"sft": 4, "reward": 4, "dpo": 4},
                       versus_repeats=2, versus_turn_steps=2, versus_process_pairs=2, ppo_updates=2, ppo_new_tokens=6,
                       peer_warmup_steps=2, ppo_warmup_updates=1,
                       prep_steps={"compute_pretrain": 2, "pretrain": 10, "sft": 4, "reward": 4},
                       world={"n_corpus_docs": 300, "n_corpus_eval_docs": 20, "n_sft": 100, "n_pairs": 60,
                              "n_eval_pairs": 8, "n_eval_prompts": 8, "n_rl_prompts": 32},
                       matmul_sizes=(64, 128), timeout_s=300)


@dataclass
class Contestant:
    name: str
    # "matmul" | "stage" (an alignpipe stage via `alignpipe run`) | "raw_sft" (the hand-written loop) |
    # "llamafactory" (LLaMA-Factory in its own venv, on the work of the peer stage `stage`)
    kind: str
    recipe: str | None = None  # "compute" | "peer"
    stage: str | None = None  # stage name in that recipe
    stage_kind: str | None = None  # the alignpipe stage kind it needs
    threads: int = 1
    reference: str | None = None  # key of REFERENCE
    # worker switches (record_batches, no_kv_cache, batches_from); llamafactory: same_work_as (our contestants)
    options: dict = field(default_factory=dict)
    warmup_steps: int | None = None  # warm up on a shorter run of the same stage (None: a full run)
    note: str = ""


def available_kinds() -> set[str]:
    """Stage kinds whose module exists in this checkout (reward/dpo/ppo land over time)."""
    kinds = set()
    for kind in ("pretrain", "sft", "reward", "dpo", "ppo"):
        if importlib.util.find_spec(f"alignpipe.stages.{kind}") is not None:
            kinds.add(kind)
    return kinds


def plan(settings: Settings) -> list[Contestant]:
    """Every contestant, in the order they run (the raw loop replays the batches the sft run recorded; the
    2-thread runs come last, as they are the first to skip when a busy machine eats the time budget)."""
    batches = "sft_1t.batches.json"

    def compute(name, kind, stage, stage_kind, **kw):
        return Contestant(name, kind, "compute", stage, stage_kind, warmup_steps=settings.compute_warmup_steps, **kw)

    def peer(name, kind, stage, stage_kind, **kw):
        warm = settings.ppo_warmup_updates if stage_kind == "ppo" else settings.peer_warmup_steps
        return Contestant(name, kind, "peer", stage, stage_kind, warmup_steps=warm, **kw)

    return [
        Contestant("matmul_1t", "matmul", threads=1, note="fp32 matmul limit, 1 thread"),
        Contestant("matmul_2t", "matmul", threads=2, note="fp32 matmul limit, 2 threads"),
        compute("pretrain_1t", "stage", "pretrain_timed", "pretrain", note="compute model"),
        compute("sft_1t", "stage", "sft", "sft", options={"record_batches": batches}, note="compute model, padding"),
        compute("raw_sft_1t", "raw_sft", "sft", "sft", options={"batches_from": batches},
                note="hand-written loop, same batches"),
        compute("sft_packed_1t", "stage", "sft_packed", "sft", note="compute model, packing (BFD)"),
        peer("sft_full", "stage", "sft_full", "sft",
             options={"record_batches": "sft_full.batches.json"}),
        peer("raw_sft_full", "raw_sft", "sft_full", "sft", options={"batches_from": "sft_full.batches.json"},
             note="hand-written loop, same batches: the compute floor of this work"),
        peer("sft_lora", "stage", "sft_lora", "sft"),
        peer("reward_full", "stage", "reward_full", "reward"),
        peer("reward_lora", "stage", "reward_lora", "reward"),
        peer("dpo_full", "stage", "dpo_full", "dpo", note="precomputed reference log-probs"),
        peer("dpo_full_live_ref", "stage", "dpo_full_live_ref", "dpo", note="reference forward every step"),
        peer("dpo_lora", "stage", "dpo_lora", "dpo"),
        peer("ppo", "stage", "ppo", "ppo", reference="ppo", note="KV cache"),
        peer("ppo_no_cache", "stage", "ppo", "ppo", options={"no_kv_cache": True},
             note="generation without KV cache"),
        # LLaMA-Factory on the same model, data and settings as our peer stages (only when its venv is built)
        peer("lf_sft_full", "llamafactory", "sft_full", "sft", options={"same_work_as": ["sft_full"]},
             note="LLaMA-Factory, same work as sft_full"),
        peer("lf_sft_lora", "llamafactory", "sft_lora", "sft", options={"same_work_as": ["sft_lora"]},
             note="LLaMA-Factory, same work as sft_lora"),
        peer("lf_reward_lora", "llamafactory", "reward_lora", "reward", options={"same_work_as": ["reward_lora"]},
             note="LLaMA-Factory, same work as reward_lora"),
        # LLaMA-Factory's full DPO runs the reference forward every step, as our live-ref variant does
        peer("lf_dpo_full", "llamafactory", "dpo_full", "dpo",
             options={"same_work_as": ["dpo_full", "dpo_full_live_ref"]},
             note="LLaMA-Factory, same work as dpo_full; reference forward every step"),
        peer("lf_dpo_lora", "llamafactory", "dpo_lora", "dpo", options={"same_work_as": ["dpo_lora"]},
             note="LLaMA-Factory, same work as dpo_lora; reference = adapter off, every step"),
        compute("sft_2t", "stage", "sft", "sft", threads=2, note="compute model, 2 threads"),
        compute("raw_sft_2t", "raw_sft", "sft", "sft", threads=2, options={"batches_from": batches},
                note="hand-written loop, 2 threads"),
        Contestant("matmul_1t_end", "matmul", threads=1, note="fp32 matmul limit again, at the end"),
        Contestant("matmul_2t_end", "matmul", threads=2, note="fp32 matmul limit again, at the end"),
    ]


# --- recipes -------------------------------------------------------------------------------------------

NO_EVAL = {"enabled": False}  # the sampled policy evaluation is not training; contestants skip it


def compute_recipe(s: Settings, runs_dir: str, kinds: set[str]) -> dict:
    def sft(**extra):
        return {"kind": "sft", "from": "pretrain", "data": {"embedded": "sft"}, "eval": NO_EVAL,
                "trainer": {"max_steps": s.compute_steps, "per_device_train_batch_size": s.compute_batch, **extra}}

    pretrain = {"kind": "pretrain", "data": {"embedded": "corpus"}, "block_size": 64, "eval_docs": 16,
                "eval": NO_EVAL, "trainer": {"per_device_train_batch_size": s.compute_batch}}
    stages = {
        "pretrain": {**pretrain, "trainer": {**pretrain["trainer"], "max_steps": s.prep_steps["compute_pretrain"]}},
        "pretrain_timed": {**pretrain, "trainer": {**pretrain["trainer"], "max_steps": s.compute_steps}},
        "sft": sft(),
        "sft_packed": sft(packing=True),
    }
    return _recipe("compute", s, runs_dir, s.compute_model, stages, kinds)


def peer_recipe(s: Settings, runs_dir: str, kinds: set[str]) -> dict:
    timed = {"per_device_train_batch_size": s.peer_batch, "max_length": s.peer_cutoff}
    lora = {"r": 8, "alpha": 16}

    # DPO's loss as LLaMA-Factory's contestant computes it (pref_loss sigmoid, pref_ftx 2): the same work
    same_loss = {"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 2.0]}}

    def leaf(kind, parent, data, trainer=None, **extra):
        return {"kind": kind, "from": parent, "data": {"embedded": data}, "eval": NO_EVAL,
                "trainer": {**timed, "max_steps": s.peer_steps[kind], **same_loss.get(kind, {}), **(trainer or {})},
                **extra}

    stages = {
        # parents, built once
        "pretrain": {"kind": "pretrain", "data": {"embedded": "corpus"}, "block_size": 64, "eval_docs": 16,
                     "eval": NO_EVAL, "trainer": {"max_steps": s.prep_steps["pretrain"]}},
        "sft": {"kind": "sft", "from": "pretrain", "data": {"embedded": "sft"}, "eval": NO_EVAL,
                "trainer": {"max_steps": s.prep_steps["sft"]}},
        "reward": {"kind": "reward", "from": "sft", "data": {"embedded": "pairs"}, "eval": NO_EVAL,
                   "trainer": {"max_steps": s.prep_steps["reward"]}},
        # contestants
        "sft_full": leaf("sft", "pretrain", "sft"),
        "sft_lora": leaf("sft", "pretrain", "sft", lora=lora),
        "reward_full": leaf("reward", "sft", "pairs"),
        "reward_lora": leaf("reward", "sft", "pairs", lora=lora),
        "dpo_full": leaf("dpo", "sft", "pairs"),
        "dpo_full_live_ref": leaf("dpo", "sft", "pairs", {"precompute_ref_log_probs": False}),
        "dpo_lora": leaf("dpo", "sft", "pairs", lora=lora),
        "ppo": {"kind": "ppo", "from": "sft", "reward_model": "reward", "data": {"embedded": "rl_prompts"},
                "eval": NO_EVAL, "trainer": {"total_updates": s.ppo_updates, "rollout_batch_size": s.peer_batch,
                                             "minibatch_size": s.peer_batch, "forward_batch_size": s.peer_batch,
                                             "max_new_tokens": s.ppo_new_tokens}},
    }
    if "reward" not in kinds:  # ppo needs the reward stage as its parent
        kinds = kinds - {"ppo"}
    return _recipe("peer", s, runs_dir, s.peer_model, stages, kinds)


def _recipe(name: str, s: Settings, runs_dir: str, model: dict, stages: dict, kinds: set[str]) -> dict:
    return {"name": name, "seed": 0, "runs_dir": runs_dir, "model": {"init": dict(model)},
            "chat_template": "embedded", "world": dict(s.world),
            "stages": {k: v for k, v in stages.items() if v["kind"] in kinds}}


PREP = {"compute": ("pretrain",), "peer": ("pretrain", "sft", "reward")}


def prep_stages(recipe: dict) -> list[str]:
    """The parent stages `prepare` builds before anything is timed."""
    return [n for n in PREP[recipe["name"]] if n in recipe["stages"]]
