"""Padding-free batches: a batch's rows laid end to end in one row, positions restarting at each sequence.

transformers' masking utilities see the restarting `position_ids` (with no attention mask) and keep each
sequence to itself, so the model computes what it computes on the padded batch without the pad tokens. On a
CPU that is less work per step (make bench: only ~57% of a padded peer SFT batch is real). With sdpa the mask
of the flattened row is dense, O(total tokens^2): on a GPU that pays only with flash-attention's varlen kernels.

Whether flattening is exact depends on the model (its mask function, its position handling), so the automatic
choice runs a one-off check on the stage's own model: a few short sequences, padded and flattened, the same
hidden states within a tolerance. The choice and its reason go to the log and the manifest (`batching`).
"""

from __future__ import annotations

# Heavy imports (torch, trl) stay inside the functions that use them: the CLI starts without them.
from dataclasses import dataclass

CHECK_LENGTHS = (7, 12, 4)  # the check's sequences: different lengths, so the padded batch has pad tokens
TOLERANCE = {"float32": 1e-4}  # other dtypes (bf16, fp16): 2e-2


@dataclass(frozen=True)
class Batching:
    """How a stage batches its rows, and why (one line for the log and the manifest). `costs` (per token, per
    attention score, from the model's shape) make each batch flattened only when that costs less; None: always."""

    padding_free: bool
    reason: str
    costs: tuple[float, float] | None = None

    def manifest(self) -> dict:
        return {"batching": "padding_free" if self.padding_free else "padded", "batching_reason": self.reason}

    def flatten(self, lengths: list[int]) -> bool:
        """Whether a batch of sequences of these lengths runs flattened. With a dense mask (sdpa, eager) the
        flattened row's attention spans all its tokens (T^2 scores against B x L^2 padded), so a batch of many
        sequences can cost more flattened than padded; the estimate weighs that against the pad tokens saved."""
        if not self.padding_free:
            return False
        if self.costs is None:
            return True
        per_token, per_score = self.costs
        total, longest, rows = sum(lengths), max(lengths), len(lengths)
        flat = total * per_token + total ** 2 * per_score
        padded = rows * longest * per_token + rows * longest ** 2 * per_score
        return flat < padded


def step_costs(model) -> tuple[float, float]:
    """FLOPs per token (linear layers and head) and per attention score (all layers), from the model's config.
    The per-score figure is ~2 x hidden per layer: measured on a 4-layer, hidden-128 Llama on this CPU (sdpa),
    where batches of 64 sequences of ~40 tokens ran 1.4x slower flattened and 32 of ~40 equally fast."""
    config = model.config.get_text_config()
    hidden, layers = config.hidden_size, config.num_hidden_layers
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = layers * (8 * hidden ** 2 + 6 * hidden * mlp) + 2 * hidden * config.vocab_size
    return float(per_token), float(layers * 2 * hidden)


def flash_attention(model) -> bool:
    return str(getattr(model.config, "_attn_implementation", "") or "").startswith(("flash", "kernels-"))


def choose(model, setting: bool | None, stage: str) -> Batching:
    """The stage's batching. `setting` true/false forces it (true: every batch flattened); None (auto) is
    padding-free on a CPU or with flash-attention kernels, only when `flattening_error` finds none on this model,
    and, with a dense mask, batch by batch where it costs less (`Batching.flatten`)."""
    import torch

    if setting is not None:
        choice = Batching(setting, f"padding_free: {str(setting).lower()} in the recipe")
    elif torch.cuda.is_available() and not flash_attention(model):
        choice = Batching(False, "GPU without flash-attention kernels: a flattened row's dense mask costs "
                                 "O(tokens^2)")
    else:
        error = flattening_error(model)
        if error is not None:
            choice = Batching(False, f"auto: flattened batches are not exact on this model ({error})")
        elif flash_attention(model):
            choice = Batching(True, "auto: padded and flattened forwards of this model agree (flash-attention)")
        else:
            choice = Batching(True, "auto: padded and flattened forwards of this model agree; each batch is "
                                    "flattened when that costs less than padding it", step_costs(model))
    print(f"[alignpipe] stage {stage}: {'padding-free' if choice.padding_free else 'padded'} batches "
          f"({choice.reason})", flush=True)
    return choice


def training_device(model) -> "torch.device":
    """Where a stage's model trains: where it is, except that a model loaded on the CPU of a machine with a GPU
    trains on this process's GPU (the trainer moves it there; from_pretrained loads onto the CPU)."""
    import os

    import torch

    here = next(model.parameters()).device
    if here.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return here


def flattening_error(model) -> str | None:
    """None when the model's last hidden states on a few sequences are the same padded (right-padded, attention
    mask) and flattened (one row, restarting position_ids, no mask); else what differed or failed. Checked on
    the device the stage trains on (`training_device`, where the model is left): the attention kernels there
    are the ones that must agree, and flash-attention's run only on a GPU."""
    import torch

    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in CHECK_LENGTHS]
    longest = max(CHECK_LENGTHS)
    device = training_device(model)
    model.to(device)
    padded = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, :len(s)], mask[i, :len(s)] = s, 1
    flat = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids=padded.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                        use_cache=False).hidden_states[-1]
            got = model(input_ids=flat.to(device), position_ids=positions.to(device), output_hidden_states=True,
                        use_cache=False).hidden_states[-1]
    except Exception as err:  # a model that cannot take the flattened row is simply not padding-free
        return f"{type(err).__name__}: {err}"[:200]
    finally:
        model.train(was_training)
    ref = ref[mask.to(device).bool()]
    got = got[0]
    tol = TOLERANCE.get(str(ref.dtype).removeprefix("torch."), 2e-2)
    diff = (ref.float() - got.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    if diff > tol * max(1.0, scale):
        return f"largest difference {diff:.2g} over tolerance {tol:g}"
    return None


def sft_collator(tokenizer, args, batching: Batching):
    """TRL's language-modelling collator, padding-free for the batches `batching` flattens and padded for the
    others, on rows TRL has tokenized, masked and truncated as for padded batches (the same work either way)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flat, padded = (DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=free,
                                                    pad_to_multiple_of=args.pad_to_multiple_of)
                    for free in (True, False))

    def collate(examples: list[dict]) -> dict:
        return (flat if batching.flatten([len(e["input_ids"]) for e in examples]) else padded)(examples)

    return collate


# --- reward models: chosen and rejected laid end to end, scored at each sequence's last token -----------------

def pair_collator(pad_token_id: int, batching: Batching):
    """Collates TRL's tokenized preference rows (`chosen_ids`, `rejected_ids`, optional `margin`) into one row:
    the chosen sequences, then the rejected ones (TRL's order), positions restarting at each. The all-ones
    `attention_mask` is only for TRL's token count: `score_flat_rows` drops it before the model sees it. A
    batch that `batching` keeps padded goes through TRL's own collator."""
    import torch
    from trl.trainer.reward_trainer import DataCollatorForPreference

    padded = DataCollatorForPreference(pad_token_id=pad_token_id)

    def collate(examples: list[dict]) -> dict:
        seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        if not batching.flatten([len(s) for s in seqs]):
            return padded(examples)
        ids = torch.tensor([t for s in seqs for t in s])[None]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        return batch

    return collate


def score_flat_rows(model) -> list:
    """Hooks that make a sequence-classification model (transformers' `...ForSequenceClassification`, under peft
    or not) score a flattened row as the padded batch: the forward drops the mask so transformers keeps each
    sequence to itself, and the output's logits become the score head's output at each sequence's last non-pad
    token (what the model pools on a padded row). Hooks sit on the model and its `score` module as they are after
    peft wrapped them, so DDP / FSDP / peft stay in the call path. Inert on padded batches. Returns the handles."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state: dict = {}

    def flattened(kwargs) -> bool:
        pos, ids = kwargs.get("position_ids"), kwargs.get("input_ids")
        return pos is not None and ids is not None and ids.shape[0] == 1 and int((pos[0] == 0).sum()) > 1

    def before(module, args, kwargs):
        state.clear()
        if not args and flattened(kwargs):
            state["ids"], state["pos"] = kwargs["input_ids"][0], kwargs["position_ids"][0]
            kwargs = {**kwargs, "attention_mask": None}
        return args, kwargs

    def keep_scores(module, args, output):
        if "ids" in state:
            state["scores"] = output[0]

    def after(module, args, kwargs, output):
        if "scores" not in state:
            return output
        ids, pos = state["ids"], state["pos"]
        seq = (pos == 0).cumsum(0) - 1
        index = torch.arange(len(ids), device=ids.device)
        starts = index[pos == 0]
        pad = base.config.get_text_config().pad_token_id
        real = ids != pad if pad is not None else torch.ones_like(ids, dtype=torch.bool)
        last = torch.where(real, index, starts[seq])  # no real token: the sequence's first, as argmax of zeros
        last = torch.full_like(starts, -1).scatter_reduce(0, seq, last, "amax")
        output.logits = state.pop("scores")[last]
        state.clear()
        return output

    return [base.register_forward_pre_hook(before, with_kwargs=True),
            base.score.register_forward_hook(keep_scores),
            base.register_forward_hook(after, with_kwargs=True)]


# --- causal LMs called with padded batches (TRL's DPOTrainer): flattened inside the forward -------------------

def flatten_padded_forward(model, batching: Batching) -> list:
    """Hooks that make a causal LM patched with TRL's fused LM head (`model(..., labels=, fused_lm_head=True)`)
    run a right-padded batch as one flattened row of its real tokens, and hand back the per-token outputs
    (log-probs, entropy, label mask, ...) in the padded batch's layout, zeros at the pad: the trainer's loss and
    metrics code sees the padded batch it built. Hooked on the model itself, so peft (adapter on or off), DDP and
    FSDP stay in the call path. Inert on any other call (generation, a left-padded batch) and on a batch that
    `batching` keeps padded. Returns the handles."""
    import torch

    state: dict = {}

    def before(module, args, kwargs):
        state.clear()
        ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
        if (args or not kwargs.get("fused_lm_head") or ids is None or mask is None or labels is None
                or ids.shape[0] < 2 or kwargs.get("position_ids") is not None or kwargs.get("shift_labels") is not None):
            return args, kwargs
        lengths = mask.sum(1)
        if not torch.equal(mask.bool(), torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]):
            return args, kwargs  # not right-padded: left as it is
        counts = lengths.tolist()  # one copy from the device, not one per sequence
        if not batching.flatten(counts):
            return args, kwargs
        real = mask.bool()
        positions = torch.cat([torch.arange(n, device=ids.device) for n in counts])[None]
        flat_labels = labels[real][None].clone()
        flat_labels[positions == 0] = -100  # a sequence's first token is never predicted (the padded shift drops it)
        state.update(real=real)
        return args, {**kwargs, "input_ids": ids[real][None], "attention_mask": None, "position_ids": positions,
                      "labels": flat_labels}

    def after(module, args, kwargs, output):
        real = state.pop("real", None)
        if real is None:
            return output
        # padded output (r, i) predicts token (r, i+1): flat output index = flat index of token (r, i+1) - 1
        flat_index = real.flatten().cumsum(0).view(real.shape) - 1
        predicted = real[:, 1:]
        source = flat_index[:, 1:][predicted] - 1
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
            flat = getattr(output, name, None)
            if flat is not None:
                padded = flat.new_zeros(predicted.shape)
                padded[predicted] = flat[0, source]
                setattr(output, name, padded)
        return output

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True)]
