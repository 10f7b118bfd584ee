"""The generative reward model: a causal LM that keeps its language-model head and judges by a verdict token.

A (prompt, response) pair is scored as a conversation the policy already knows, rendered by the recipe's chat
template: [user prompt, assistant response, user JUDGING_QUESTION] and the assistant's turn opened
(add_generation_prompt). The score is the log-odds of the verdict, logit(YES) - logit(NO), of the first token
of each word at that position (Zhang et al. 2024, "Generative Verifiers"; Mahan et al. 2024, "Generative Reward
Models"). The genrm stage (alignpipe.stages.genrm) trains it on preference pairs with the Bradley-Terry loss on
that log-odds, so a chosen response's verdict is "yes" more than a rejected one's.

    <stage>/model/   AutoModelForCausalLM and its tokenizer (the chat template included);
                     genrm.json: {"mean", "std", "question", "yes", "no", ...}: the held-out score statistics PPO
                     normalises with, and the judging question and verdict words it was trained with
"""

from __future__ import annotations

# Heavy imports (torch, transformers) stay inside the functions that use them: the CLI starts without them.
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpipe.errors import AlignpipeError, RunError
from alignpipe.models import loading as modeling
from alignpipe.recipe.schema import ModelSpec
from alignpipe.reward.artifact import conversation
from alignpipe.runtime.progress import track

if TYPE_CHECKING:
    import torch

STATS_FILE = "genrm.json"
JUDGING_QUESTION = "Is that answer right? Reply Yes or No."
YES, NO = "Yes", "No"


def verdict_ids(tokenizer, yes: str = YES, no: str = NO) -> tuple[int, int]:
    """The first token of each verdict word; they must differ or the log-odds is always 0."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (yes, no)]
    if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
        raise AlignpipeError(f"the verdict words {yes!r} and {no!r} do not start with different tokens "
                             f"({ids[0][:1]} vs {ids[1][:1]})", fix="this tokenizer cannot read the verdict apart")
    return ids[0][0], ids[1][0]


def judging_ids(tokenizer, prompts: list, responses: list, question: str = JUDGING_QUESTION) -> list[list[int]]:
    """Token ids of each judging conversation, ending with the opened assistant turn the verdict is read at."""
    if len(prompts) != len(responses):
        raise AlignpipeError(f"{len(prompts)} prompts but {len(responses)} responses", fix="give one prompt per response")
    convs = [conversation(p, r) + [{"role": "user", "content": question}] for p, r in zip(prompts, responses)]
    if not convs:
        return []
    out = tokenizer.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    return [list(ids) for ids in out["input_ids"]]


def left_padded(rows: list[list[int]], pad: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ids, attention mask), left-padded: every row's last real token sits at the last position."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def verdict_logodds(model, ids: "torch.Tensor", mask: "torch.Tensor", yes: int, no: int) -> "torch.Tensor":
    """logit(yes) - logit(no) at the last position of left-padded rows, shape [batch] (with gradients when on)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
    return (logits[:, yes] - logits[:, no]).float()


@dataclass
class GenerativeArtifact:
    model: Any  # AutoModelForCausalLM, in eval mode
    tokenizer: Any
    mean: float  # of the parent's held-out samples' scores (or the held-out pairs'): PPO uses (score - mean) / std
    std: float
    question: str = JUDGING_QUESTION
    yes: str = YES
    no: str = NO
    kind: str = "genrm"

    def normalise(self, scores: list[float]) -> list[float]:
        return [(s - self.mean) / self.std for s in scores]

    def score(self, prompts: list, responses: list, batch_size: int = 64) -> list[float]:
        """Verdict log-odds of (prompt, response) pairs, without gradients."""
        import torch

        yes, no = verdict_ids(self.tokenizer, self.yes, self.no)
        rows = judging_ids(self.tokenizer, prompts, responses, self.question)
        dev = next(self.model.parameters()).device
        out: list[float] = []
        for start in track(range(0, len(rows), batch_size), "scoring", unit="batch"):
            ids, mask = left_padded(rows[start:start + batch_size], self.tokenizer.pad_token_id)
            with torch.no_grad():
                out.extend(verdict_logodds(self.model, ids.to(dev), mask.to(dev), yes, no).tolist())
        return out


def save_generative_model(stage_dir: Path, model, tokenizer, stats: dict) -> None:
    """Write `model/` (the causal LM, its tokenizer) and genrm.json (`stats` must hold mean and std)."""
    model_dir = Path(stage_dir) / "model"
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    (model_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")


def load_generative_dir(model_dir: Path, spec: ModelSpec | None = None) -> GenerativeArtifact:
    """The generative reward model in a genrm stage's `model/` folder (or the stage folder), in eval mode."""
    model_dir = Path(model_dir)
    if not (model_dir / STATS_FILE).is_file():
        model_dir = model_dir / "model"
    stats_path = model_dir / STATS_FILE
    if not stats_path.is_file():
        raise RunError(f"no generative reward model here ({STATS_FILE} missing)", where=str(model_dir),
                       fix="give a genrm stage folder built by `alignpipe run` (runs/<recipe>/<stage>)")
    stats = json.loads(stats_path.read_text())
    spec = spec or ModelSpec()
    model = modeling.load_pretrained(model_dir, spec).eval()
    if not (spec.load_in_4bit or spec.load_in_8bit):
        model.to(modeling.device())
    tokenizer = modeling.load_tokenizer(model_dir, spec)
    return GenerativeArtifact(model, tokenizer, float(stats["mean"]), float(stats["std"]),
                              stats.get("question", JUDGING_QUESTION), stats.get("yes", YES), stats.get("no", NO))
