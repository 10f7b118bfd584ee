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

from dataclasses import dataclass

CHECK_LENGTHS = (7, 12, 4)  # the check's sequences: different lengths, so the padded batch has pad tokens
TOLERANCE = {"float32": 1e-4}  # other dtypes (bf16, fp16): 2e-2


@dataclass(frozen=True)
class Batching:
    """How a stage batches its rows, and why (one line for the log and the manifest)."""

    padding_free: bool
    reason: str

    def manifest(self) -> dict:
        return {"batching": "padding_free" if self.padding_free else "padded", "batching_reason": self.reason}


def flash_attention(model) -> bool:
    return str(getattr(model.config, "_attn_implementation", "") or "").startswith(("flash", "kernels-"))


def choose(model, setting: bool | None, stage: str) -> Batching:
    """The stage's batching. `setting` true/false forces it; None (auto) is padding-free on a CPU or with
    flash-attention kernels, and only when `flattening_is_exact` on this model."""
    import torch

    if setting is not None:
        choice = Batching(setting, f"padding_free: {str(setting).lower()} in the recipe")
    elif torch.cuda.is_available() and not flash_attention(model):
        choice = Batching(False, "GPU without flash-attention kernels: a flattened row's dense mask costs "
                                 "O(tokens^2)")
    else:
        error = flattening_error(model)
        if error is None:
            choice = Batching(True, "auto: padded and flattened forwards of this model agree")
        else:
            choice = Batching(False, f"auto: flattened batches are not exact on this model ({error})")
    print(f"[alignpipe] stage {stage}: {'padding-free' if choice.padding_free else 'padded'} batches "
          f"({choice.reason})", flush=True)
    return choice


def flattening_error(model) -> str | None:
    """None when the model's last hidden states on a few sequences are the same padded (right-padded, attention
    mask) and flattened (one row, restarting position_ids, no mask); else what differed or failed."""
    import torch

    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in CHECK_LENGTHS]
    longest = max(CHECK_LENGTHS)
    device = next(model.parameters()).device
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


def sft_collator(tokenizer, args):
    """TRL's language-modelling collator in padding-free mode, for rows TRL has tokenized, masked and truncated
    as for padded batches (so both do the same work)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True,
                                           pad_to_multiple_of=args.pad_to_multiple_of)
