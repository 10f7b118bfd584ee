"""Recipes: one YAML file per experiment, as typed configs.

A recipe names a model, a chat template and a mapping of stages. Each stage's config is a dataclass
declared by its stage module (`alignpipe.stages.<kind>.Config`) on `StageConfig`; `alignpipe.recipe.parse`
turns YAML into these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignpipe.recipe.dataspec import stage_sources
from alignpipe.recipe.kinds import evaluation_references, references
from alignpipe.recipe.paths import model_source
from alignpipe.runtime.tracking import DEFAULT_TRACKING


# --- configs shared by every recipe -----------------------------------------------------------


@dataclass
class ModelInit:
    """A from-scratch Llama-architecture model, built from this config (pretraining only)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    intermediate_size: int = 512
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    vocab_size: int = 450  # target size of the byte-level BPE tokenizer trained on the corpus
    rope_theta: float = 10000.0


@dataclass
class ModelSpec:
    """Where the recipe's base model comes from: a hub id / local folder, or `init` (from scratch)."""

    path: str | None = None
    init: ModelInit | None = None
    revision: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on a GPU that supports it, float32 on CPU
    attn_implementation: str | None = None  # None: transformers' default (sdpa)
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    allow_pickle: bool = False  # permit .bin/.pt weights (pickle can run code); safetensors otherwise


@dataclass
class LoraSpec:
    """peft LoRA settings; `task_type` is chosen by the stage."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None


@dataclass
class JudgeSpec:
    """One judge of sampled responses (`eval.judges.<name>`): a verifier `module:function(prompt, response,
    row) -> bool | float`, or a pairwise judge model, local (`model:` a folder or hub id) or behind an
    OpenAI-compatible `endpoint:` (base URL, e.g. http://127.0.0.1:8000/v1, with `model:` its name)."""

    verifier: str | None = None
    model: str | None = None
    endpoint: str | None = None
    api_key_env: str | None = None  # the environment variable holding the endpoint's key (never the key)
    prompt_template: str | None = None  # a judging-prompt file with {prompt}, {a} and {b}; None: the built-in one
    max_new_tokens: int = 8
    timeout_s: float = 60.0

    @property
    def pairwise(self) -> bool:
        return self.verifier is None


@dataclass
class LmEvalSpec:
    """lm-evaluation-harness tasks run on the stage's checkpoint (`pip install alignpipe[lmeval]`)."""

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None  # a folder of task YAMLs (e.g. over local files), relative to the recipe
    data_files: dict[str, str] = field(default_factory=dict)  # shipped task -> your local file (gsm8k_local)
    limit: int | None = None  # examples per task (None: all)
    num_fewshot: int | None = None
    batch_size: int = 8
    max_gen_toks: int | None = None  # caps generation tasks' answers (None: each task's own setting)


@dataclass
class EvalSpec:
    """Sampled evaluation of a policy on held-out prompts (same protocol for every policy stage)."""

    num_prompts: int = 100
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 128  # at most this many sequences per batch
    # the memory one sampling / scoring batch may take (alignpipe.eval.budget): default 1024 MB on CPU,
    # 40% of the free GPU memory on a GPU
    batch_memory_mb: float | None = None
    # leave out eval rows that share a 13-word window with a training row of the recipe (eval.contamination)
    drop_contaminated: bool = False
    enabled: bool = True
    prompts: str | None = None  # a file of prompts (any format with a user turn; optional reference answers)
    judges: dict[str, JudgeSpec] = field(default_factory=dict)  # name -> judge; embedded data: `judge` built in
    lm_eval: LmEvalSpec | None = None
    # along training (alignpipe.eval.along_training): a curve point every `every` updates / steps (0: none) on
    # the first `curve_prompts` eval prompts, `curve_samples` samples each
    every: int = 0
    curve_prompts: int = 32
    curve_samples: int = 4
    # an explicit held-out file (a data spec, e.g. {path: eval.jsonl}) instead of the recipe's seeded split;
    # its prompts are held out of every stage's training rows (alignpipe.data.split)
    data: dict[str, Any] = field(default_factory=dict)
    # the safety suites (alignpipe.eval.safety_suites): {harmful: FILE, benign: FILE, injection: FILE, ...};
    # empty: the embedded world's held-out manners for a stage on embedded data, else none
    safety: dict[str, Any] = field(default_factory=dict)
    # suspected triggers (strings or {trigger, response}) and a canary file (prefix + secret rows): eval/attacks.py
    triggers: list[Any] = field(default_factory=list)
    canaries: str | None = None


@dataclass
class StageConfig:
    """Fields every stage has. Stage modules extend this with their own fields."""

    kind: str = ""
    from_: str | None = None  # YAML key `from`
    data: dict[str, Any] = field(default_factory=dict)
    lora: LoraSpec | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    # e.g. ["judge_pass_rate >= sft.judge_pass_rate + 0.1"], or a mapping {eot_rate: ">= 0.95"} (read as a list)
    gates: list[str] | dict[str, str] = field(default_factory=list)
    checkpoint_every: int = 0  # save a resumable training state every N steps (0: the trainer's default)


@dataclass
class Recipe:
    name: str
    stages: dict[str, StageConfig]
    seed: int = 0
    runs_dir: str = "runs"
    model: ModelSpec = field(default_factory=ModelSpec)
    chat_template: str = "embedded"
    world: dict[str, Any] = field(default_factory=dict)  # WorldConfig overrides for the embedded world
    tracking: list[str] = field(default_factory=lambda: list(DEFAULT_TRACKING))  # experiment trackers (tracking.py)
    tools: list[str] = field(default_factory=list)  # `module:function` tools the policy may call (data/tools.py)
    path: Path = Path("<memory>")  # the file it was read from (not a YAML key)

    @property
    def run_root(self) -> Path:
        base = Path(self.runs_dir)
        if not base.is_absolute():
            base = Path.cwd() / base
        return base / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.run_root / stage

    @property
    def model_source(self) -> str | None:
        """`model.path` to load: a local folder read from the recipe's folder, else as written (a hub id)."""
        return model_source(self.model.path, self.path.parent)

    def order(self, only: list[str] | None = None) -> list[str]:
        """Stages in dependency order (parents first). With `only`, those stages plus their ancestors."""
        wanted = set(only or self.stages)
        for name in list(wanted):
            parent = self.stages[name].from_
            while parent:
                wanted.add(parent)
                parent = self.stages[parent].from_
        for name, cfg in self.stages.items():  # a stage's reward model and labelled data are upstreams too
            refs = [*references(cfg).values(), *stage_sources(cfg.data)]
            if name in wanted and refs:
                wanted |= set(self.order(refs))
        done: list[str] = []
        while len(done) < len(wanted):
            for name in self.stages:
                if name in wanted and name not in done and all(d in done for d in self.upstream(name)):
                    done.append(name)
        return done

    def upstream(self, stage: str) -> list[str]:
        """The stages `stage` needs complete: the one it starts `from`, the ones its config names, its data's."""
        cfg = self.stages[stage]
        deps = [cfg.from_] if cfg.from_ else []
        deps += list(references(cfg).values())
        deps += [s for s in stage_sources(cfg.data) if s not in deps]  # data: {from: <label stage>}
        return deps

    def evaluated_with(self, stage: str) -> list[str]:
        """The upstream stages `stage` needs only to score its evaluation after training (a DPO stage's
        `reward_model`); none when it also evaluates along training (`eval.every`), which scores with them."""
        cfg = self.stages[stage]
        if getattr(cfg.eval, "every", 0):
            return []
        return list(evaluation_references(cfg).values())

    def start_after(self, stage: str) -> list[str]:
        """The upstream stages `stage` trains from: complete before it starts (`evaluated_with` may still run)."""
        cfg, later = self.stages[stage], set(self.evaluated_with(stage))
        trained_from = {cfg.from_, *stage_sources(cfg.data), *(s for s in references(cfg).values() if s not in later)}
        return [s for s in self.upstream(stage) if s in trained_from]
