"""The baseline of the GPU check: the same sft and dpo work through a plain TRL script, as a TRL user writes it.

Same model folder, data files, batch, sequence length, LoRA, learning rate, loss (DPO: TRL's sigmoid plus its SFT
term, weights 1 and 2, reference log-probs precomputed, as alignpipe's stage does by default), bf16 on a GPU,
activation checkpointing off (alignpipe turns it off; TRL would turn it on). The chat template is alignpipe's
chatml, so both sides tokenize the rows alike. Nothing of alignpipe runs in the timed part: its template is a
string, read before. The probe is make bench's (gpu_measure.StageProbe), installed on transformers' Trainer.
"""

from __future__ import annotations

import json
from pathlib import Path


def tokenizer_and_model(model_dir: str, dtype: str):
    """The tokenizer with alignpipe's chatml template, and the model in the dtype alignpipe's recipe loads it in
    (`auto`: bf16 on a GPU, fp32 on a CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignpipe.recipe.templates import CHATML

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = "<|im_end|>"  # a turn ends there, as alignpipe sets it for chatml
    bf16 = dtype in ("bf16", "bfloat16") or (dtype == "auto" and torch.cuda.is_available())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return tokenizer, model


def common_args(s: dict, out: str, steps: int) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=s["batch"], max_length=s["max_length"],
                learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, logging_steps=5,
                save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=not cuda, bf16=cuda,
                dataloader_num_workers=0, disable_tqdm=True)


def no_checkpointing(config_class) -> dict:
    fields = set(getattr(config_class, "__dataclass_fields__", {}))
    return {"activation_checkpointing": False} if "activation_checkpointing" in fields else \
        {"gradient_checkpointing": False}


def lora(s: dict):
    from peft import LoraConfig

    return LoraConfig(r=s["lora"]["r"], lora_alpha=s["lora"]["alpha"], lora_dropout=s["lora"]["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def conversational_pairs(path: str) -> list[dict]:
    """The pairs as TRL's conversational preference rows (a user turn; assistant turns), as a TRL user gives chat
    data and as alignpipe hands them to the same trainer: the chat template then frames both sides' tokens alike."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows(path)]


def sft(spec: dict) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s = spec["settings"]
    tokenizer, model = tokenizer_and_model(spec["model_dir"], spec["dtype"])
    args = SFTConfig(**common_args(s, str(Path(spec["work"]) / "trl_sft"), s["steps"]["sft"]),
                     assistant_only_loss=True, **no_checkpointing(SFTConfig))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows(spec["files"]["sft"])),
                         processing_class=tokenizer, peft_config=lora(s))
    trainer.train()


def dpo(spec: dict) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    s = spec["settings"]
    tokenizer, model = tokenizer_and_model(spec["model_dir"], spec["dtype"])
    args = DPOConfig(**common_args(s, str(Path(spec["work"]) / "trl_dpo"), s["steps"]["dpo"]), **s["dpo"],
                     **no_checkpointing(DPOConfig))
    pairs = Dataset.from_list(conversational_pairs(spec["files"]["pairs"]))
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=lora(s))
    trainer.train()


STAGES = {"sft": sft, "dpo": dpo}
