"""The reward-model artifact: one folder format that the reward stage writes and PPO, evaluation and
`alignpipe score` load unchanged.

    <stage>/model/        AutoModelForSequenceClassification, num_labels=1, config.pad_token_id set,
                          score head included (LoRA: the merged copy, so loading never needs the base);
                          the tokenizer with the recipe's chat template (chat_template.jinja);
                          reward.json: {"mean", "std", ...} of held-out scores, for normalisation
    <stage>/adapter/      LoRA only: the adapter with the score head (peft modules_to_save)
    <stage>/manifest.json the stage's metrics, reward_mean / reward_std among them

Peer tools lose the score head or reload the wrong class (TRL #1379, #2718; LLaMA-Factory #7706): here
the head lives in the same safetensors file as the body, and the stage reloads what it saved and
checks that it scores the same before it marks itself complete.

A (prompt, response) pair is scored exactly as RewardTrainer saw it in training: the conversation
[user prompt, assistant response] rendered and tokenised by the chat template (whose assistant turn
ends with the end-of-turn token), the score read at the last non-pad token.
"""

from __future__ import annotations

# Heavy imports (torch, transformers, trl) stay inside the functions that use them: the CLI starts without them.
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpipe.errors import AlignpipeError, RunError
from alignpipe.models import loading as modeling
from alignpipe.recipe.kinds import is_scorer_manifest, reward_loader_of
from alignpipe.recipe.schema import ModelSpec
from alignpipe.runfolder.manifests import read_manifest
from alignpipe.runtime.progress import track

if TYPE_CHECKING:
    import torch

STATS_FILE = "reward.json"


@dataclass
class RewardArtifact:
    model: Any  # AutoModelForSequenceClassification with num_labels=1, in eval mode
    tokenizer: Any
    mean: float  # of held-out scores: PPO uses (score - mean) / std
    std: float

    def normalise(self, scores: list[float]) -> list[float]:
        return [(s - self.mean) / self.std for s in scores]


# --- loading -----------------------------------------------------------------------------------


class OneOutput:
    """`AutoModelForSequenceClassification` with one output, as a `model_class` for alignpipe.models.loading's
    loaders (they call `model_class.from_pretrained(path, **kwargs)`). Loading a causal-LM checkpoint
    this way keeps its body and adds a freshly initialised score head."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import AutoModelForSequenceClassification

        try:  # the "score.weight newly initialised / lm_head.weight unused" report is expected here
            from trl.trainer.reward_trainer import suppress_seqcls_warning
        except ImportError:  # pragma: no cover - a TRL without it just prints the report
            import contextlib

            suppress_seqcls_warning = contextlib.nullcontext
        with suppress_seqcls_warning():
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)


def load_reward_model(stage_dir: Path, spec: ModelSpec | None = None) -> Any:
    """A reward stage's scorer, loaded fresh, in eval mode, on the GPU when there is one: the one place a stage
    becomes a scoring function. A kind with its own `reward_loader` (the registry: a generative reward model, the
    implicit reward of a DPO stage) is loaded by it; a reward stage gives its `RewardArtifact`. Every scorer has
    `mean`, `std`, `normalise` and is scored with `score` below.

    `stage_dir` is a reward stage's folder (its manifest must say complete) or its `model/` folder.
    `spec` supplies dtype / trust_remote_code / allow_pickle (default: the recipe defaults).
    """
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    loader = reward_loader_of(manifest)
    if manifest is not None:
        if not is_scorer_manifest(manifest) and loader is None:
            raise RunError(f"not a reward stage (kind {manifest.get('kind')!r})", where=str(stage_dir),
                           fix="give the folder of a stage with `kind: reward`")
        if manifest.get("status") != "complete":
            raise RunError(f"the reward stage is not complete (status {manifest.get('status')!r})",
                           where=str(stage_dir), fix=f"re-run stage {stage_dir.name!r}")
    model_dir = stage_dir if (stage_dir / STATS_FILE).is_file() else stage_dir / "model"
    if manifest is not None:
        from alignpipe.runfolder.manifests import verify_model_files

        verify_model_files(stage_dir, manifest)
    if loader is not None:
        return loader(stage_dir, spec)
    return load_reward_dir(model_dir, spec)


def load_reward_dir(model_dir: Path, spec: ModelSpec | None = None) -> RewardArtifact:
    """The artifact in a `model/` folder, whatever state its stage's manifest is in."""
    model_dir = Path(model_dir)
    stats_path = model_dir / STATS_FILE
    if not stats_path.is_file():
        raise RunError("no reward model here (reward.json missing)", where=str(model_dir),
                       fix="give a reward stage folder built by `alignpipe run` (runs/<recipe>/<stage>)")
    stats = json.loads(stats_path.read_text())
    spec = spec or ModelSpec()
    model = modeling.load_pretrained(model_dir, spec, OneOutput).eval()
    if not (spec.load_in_4bit or spec.load_in_8bit):  # bitsandbytes places quantised weights itself
        model.to(modeling.device())
    if model.config.num_labels != 1 or model.config.pad_token_id is None:
        raise RunError(f"expected a one-output classifier with a pad token, found num_labels="
                       f"{model.config.num_labels}, pad_token_id={model.config.pad_token_id}", where=str(model_dir),
                       fix="rebuild the reward stage with this alignpipe (alignpipe run RECIPE --stages NAME --force)")
    tokenizer = modeling.load_tokenizer(model_dir, spec)
    return RewardArtifact(model=model, tokenizer=tokenizer, mean=float(stats["mean"]), std=float(stats["std"]))


# --- saving ------------------------------------------------------------------------------------


def save_reward_model(stage_dir: Path, model, tokenizer, stats: dict) -> Any:
    """Write the artifact; returns the full (LoRA: merged) model that `model/` now holds.

    `stats` must hold `mean` and `std`; anything else in it is kept for the record. A peft model is
    saved twice: the adapter with its score head in `adapter/`, the merged model in `model/`.
    """
    stage_dir = Path(stage_dir)
    model_dir = stage_dir / "model"
    if hasattr(model, "merge_and_unload"):  # peft: adapter first, then merge (merging changes the model)
        model.save_pretrained(str(stage_dir / "adapter"))
        tokenizer.save_pretrained(str(stage_dir / "adapter"))
        model = model.merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier pools at the last non-pad token
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    (model_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return model


# --- scoring -----------------------------------------------------------------------------------


def conversation(prompt: str | list[dict], response: str | list[dict]) -> list[dict]:
    """[user prompt, assistant response]. Either side may also be given as messages (a multi-turn prompt,
    a pair's response turns) and is then used as is."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return turns + ([{"role": "assistant", "content": response}] if isinstance(response, str) else list(response))


def encode(tokenizer, prompts: list, responses: list) -> list[list[int]]:
    """Token ids of each (prompt, response) conversation, rendered by the chat template as in training."""
    if len(prompts) != len(responses):
        raise AlignpipeError(f"{len(prompts)} prompts but {len(responses)} responses",
                             fix="give one prompt per response")
    convs = [conversation(p, r) for p, r in zip(prompts, responses)]
    if not convs:
        return []
    return [list(ids) for ids in tokenizer.apply_chat_template(convs, tokenize=True, return_dict=True)["input_ids"]]


def score_ids(artifact: RewardArtifact, input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
    """Raw scores (float32, shape [batch]) of token sequences, without gradients; for PPO.

    Sequences may be left- or right-padded; padding is read from `attention_mask` (its positions are
    set to the pad token, and positions are counted over real tokens only), so the score is the one
    the same sequence gets unpadded: the head's output at the last real token. Each sequence should be
    a full chat-template rendering (see `encode`); one cut off before its end-of-turn token still gets
    a score, read at its last token, so penalise truncation separately if that matters.
    """
    import torch

    model = artifact.model
    dev = next(model.parameters()).device
    mask = attention_mask.to(dev).long()
    ids = input_ids.to(dev).masked_fill(mask == 0, model.config.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return logits[:, 0].float().to(input_ids.device)


def score(artifact: RewardArtifact, prompts: list, responses: list[str], batch_size: int = 64) -> list[float]:
    """Raw scalar scores of (user prompt, assistant response) pairs; normalise with `artifact.normalise`. A scorer
    of another kind (load_reward_model) scores with its own `score` method."""
    import torch

    if not isinstance(artifact, RewardArtifact):
        return artifact.score(prompts, responses, batch_size)

    rows = encode(artifact.tokenizer, prompts, responses)
    pad = artifact.model.config.pad_token_id
    out: list[float] = []

    for start in track(range(0, len(rows), batch_size), "scoring", unit="batch"):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):  # right padding, as RewardTrainer's collator pads
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        out.extend(score_ids(artifact, ids, mask).tolist())
    return out
