"""The yardstick for SFT: a minimal hand-written PyTorch training loop.

Same model (the compute recipe's pretrain checkpoint), same batches (the exact rows alignpipe's sft
stage trained on, recorded by the worker's probe), same optimiser family (AdamW, lr 1e-3, no weight
decay, gradient clipping at 1.0 as the trainer does), same thread count. It pads each batch itself,
so collation is on its clock as it is on alignpipe's. What it leaves out is everything a pipeline
adds: logging, metrics, schedulers' bookkeeping, callbacks, checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from benchmarks.process import T_START, peak_rss_mb, sync


def collate(rows: list[list[list[int]]], pad_id: int):
    """Right-pad a batch of (ids, labels) rows to its longest row."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def train_once(model_dir: Path, batches: list, lr: float = 1e-3) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    # as the trainer does: fp32 weights, bf16 autocast on a GPU that has it
    bf16 = gpu and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t_call = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    model.train()
    pad_id = model.config.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    params = sum(p.numel() for p in model.parameters())
    tokens = real = 0
    first_loss, in_step = None, 0.0
    sync()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for rows in batches:
        input_ids, mask, labels = collate(rows, pad_id)
        tokens += input_ids.numel()
        real += int(mask.sum())
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        t = time.perf_counter()
        with autocast:
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        sync()
        in_step += time.perf_counter() - t
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = loss.item()
    sync()
    loop, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    steps = len(batches)
    return {"steps": steps, "loop_s": loop, "cpu_share": cpu / loop, "fwd_bwd_share": in_step / loop,
            "setup_s": t0 - t_call,
            "steps_per_s": steps / loop, "samples_per_s": sum(len(b) for b in batches) / loop, "tokens": tokens,
            "tokens_per_s": tokens / loop, "real_tokens_per_s": real / loop, "real_share": real / tokens,
            "params": params, "model_flops_per_s": 6 * params * tokens / loop,
            "gflop_per_step": 6e-9 * params * tokens / steps, "first_loss": first_loss,
            "t0_wall": time.time() - (time.perf_counter() - t0)}


def run(spec: dict) -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    rss_imports = peak_rss_mb()
    batches = json.loads(Path(spec["work"], spec["options"]["batches_from"]).read_text())
    warm = batches[: spec["warmup_steps"]] if spec["warmup_steps"] else batches
    runs = [train_once(Path(spec["model_dir"]), warm if i == 0 else batches) for i in range(1 + spec["repeats"])]
    runs[0]["startup_s"] = runs[0]["t0_wall"] - T_START
    return {"warmup": runs[0], "runs": runs[1:], "rss_after_imports_mb": rss_imports}
