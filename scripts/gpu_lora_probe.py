"""Measure what the shipped recipes' memory figures only calculate: LoRA training of real architectures.

Builds Qwen2.5-0.5B- and Llama-3.1-8B-shaped models with random weights (no download), in bf16 on the
GPU, adds LoRA r=16 on every linear layer, trains a few steps on random tokens and prints, per
configuration, tokens/s and peak GPU memory as JSON lines:

    .venv/bin/python scripts/gpu_lora_probe.py                      # both models, the recipes' shapes
    .venv/bin/python scripts/gpu_lora_probe.py --models tiny        # a CPU smoke test of this script

Random weights train as fast and take as much memory as real ones; only the loss is meaningless.
"""

from __future__ import annotations

import argparse
import json
import time

from alignpipe.models.tiny import SHAPES

# name -> (architecture, config, (batch, seq_len, activation checkpointing) as in the recipe's sft stage)
MODELS = {
    "qwen2.5-0.5b": ("qwen2", SHAPES["qwen2.5-0.5b"], (4, 1024, False)),
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                                max_position_embeddings=8192, rope_theta=5e5), (1, 2048, True)),
    "tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                           max_position_embeddings=256), (2, 64, False)),
}


def probe(name: str, steps: int, batch: int | None, seq_len: int | None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, sizes, (default_batch, default_len, checkpointing) = MODELS[name]
    batch, seq_len = batch or default_batch, seq_len or default_len
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    with torch.device(dev):
        model = model_cls(config_cls(**sizes, attn_implementation="sdpa")).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, sizes["vocab_size"], (batch, seq_len), device=dev)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {
        "model": name, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
        "parameters": sum(p.numel() for p in model.parameters()), "lora_parameters": sum(p.numel() for p in trainable),
        "batch": batch, "seq_len": seq_len, "activation_checkpointing": checkpointing, "steps": steps,
        "tokens_per_s": round(batch * seq_len * steps / elapsed, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen2.5-0.5b,llama3-8b", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="default: the recipe's per-device batch")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the recipe's max_length")
    args = parser.parse_args()
    for name in args.models.split(","):
        print(json.dumps(probe(name, args.steps, args.batch, args.seq_len)), flush=True)
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
