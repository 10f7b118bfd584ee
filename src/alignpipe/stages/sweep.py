"""The points of a scaling sweep: planned from the recipe, each trained in a folder of its own with its manifest.

A point is one model size (the recipe's `model.init` scaled in width and depth) trained from scratch for one
compute budget C = 6 N D: D = C / (6 N) tokens, rounded to whole steps, each token seen once (the sweep refuses a
point that would need more tokens than the corpus holds). Every point trains from the same tokenizer and the same
token stream (the first D tokens of it), with a cosine schedule as long as its own run, so its held-out loss is
that of a model trained for exactly its budget (Hoffmann et al.'s correction of Kaplan et al.).

`points/<name>/manifest.json` is written, atomically, only when the point is complete: a killed sweep keeps its
complete points and starts its incomplete one again.
"""

from __future__ import annotations

# Heavy imports (torch, transformers, datasets) stay inside the functions that use them.
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

from alignpipe.errors import RunError
from alignpipe.recipe.schema import ModelInit
from alignpipe.runfolder.files import write_json_atomic

TOKENS_FILE = "tokens.pt"
TOKENIZER_DIR = "tokenizer"
POINTS_DIR = "points"
DEFAULT_LR = 3e-3


def scaled_init(base: ModelInit, size: dict) -> ModelInit:
    """`base` with a size's overrides; a new width keeps base's head width and its MLP-to-width ratio unless the
    size names them."""
    width = size.get("hidden_size", base.hidden_size)
    head_dim = base.hidden_size // base.num_attention_heads
    derived = {"intermediate_size": round(base.intermediate_size * width / base.hidden_size),
               "num_attention_heads": max(1, width // head_dim)}
    if base.num_key_value_heads is not None:
        derived["num_key_value_heads"] = max(1, base.num_key_value_heads * width // base.hidden_size)
    return dataclasses.replace(base, **{**derived, **size})


def parameter_counts(init: ModelInit, vocab: int) -> dict:
    """{total, non_embedding, embedding} of a Llama built from `init` for `vocab` tokens, by formula (checked
    against the built model in the tests). The input embedding is the embedding; an untied output head counts
    as non-embedding (it is a matmul every token pays for)."""
    h, i, layers = init.hidden_size, init.intermediate_size, init.num_hidden_layers
    kv = (init.num_key_value_heads or init.num_attention_heads) * (h // init.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    embedding = vocab * h
    head = 0 if init.tie_word_embeddings else vocab * h
    non_embedding = layers * per_layer + h + head  # + the final norm
    return {"total": embedding + non_embedding, "non_embedding": non_embedding, "embedding": embedding}


def point_name(budget: float, init: ModelInit) -> str:
    return f"c{budget:.3g}-h{init.hidden_size}-l{init.num_hidden_layers}".replace("+", "")


def plan_point(budget: float, init: ModelInit, vocab: int, count: str, tokens_per_step: int) -> dict:
    """One point: its size, its counted parameters, its steps and the tokens and FLOPs they make."""
    counts = parameter_counts(init, vocab)
    n = counts[count]
    steps = max(1, round(budget / (6 * n) / tokens_per_step))
    d = steps * tokens_per_step
    return {"name": point_name(budget, init), "budget": budget, "init": dataclasses.asdict(init), "n": n,
            "params": counts, "steps": steps, "d": d, "c": 6 * n * d}


def plan_grid(sizes: list[ModelInit], budgets: list[float], vocab: int, count: str, tokens_per_step: int,
              min_steps: int, corpus_tokens: int, where: str) -> tuple[list[dict], list[dict]]:
    """(points, left out): every size at every budget, sizes whose run would be shorter than `min_steps` left out
    (with the reason). A point needing more tokens than the corpus holds stops the sweep before anything trains."""
    points, left_out = [], []
    for budget in sorted(budgets):
        for init in sizes:
            p = plan_point(budget, init, vocab, count, tokens_per_step)
            if p["steps"] < min_steps:
                left_out.append({**p, "why": f"{p['steps']} steps < min_steps {min_steps}"})
            elif p["d"] > corpus_tokens:
                raise RunError(f"point {p['name']} needs {p['d']:,} training tokens; the corpus holds "
                               f"{corpus_tokens:,} (each token is seen once)", where=where,
                               fix="lower the budgets, drop the smallest sizes, or give more text "
                                   "(world: {n_corpus_docs: ...} for the embedded corpus)")
            else:
                points.append(p)
    return points, left_out


# --- one point ---------------------------------------------------------------------------------------------------


def run_name(point: str, seed_index: int) -> str:
    """The folder of a point's run with its `seed_index`-th seed (the first keeps the point's name)."""
    return point if seed_index == 0 else f"{point}-seed{seed_index}"


def point_dir(stage_dir: Path, name: str) -> Path:
    return stage_dir / POINTS_DIR / name


def read_point(stage_dir: Path, name: str) -> dict | None:
    """A complete point's manifest, or None (absent, or never finished)."""
    path = point_dir(stage_dir, name) / "manifest.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("status") == "complete" else None


def training_arguments(job: dict):
    from transformers import TrainingArguments

    args = {"output_dir": str(Path(job["dir"]) / "checkpoints"), "report_to": [], "seed": job["seed"],
            "data_seed": job["seed"], "use_cpu": job["use_cpu"], "save_strategy": "no", "eval_strategy": "no",
            "disable_tqdm": True, "dataloader_num_workers": 0, "lr_scheduler_type": "cosine",
            "per_device_train_batch_size": 16, "learning_rate": DEFAULT_LR, "warmup_steps": 0.05, "weight_decay": 0.0,
            "logging_steps": max(1, job["steps"] // 25)}
    args.update(job["trainer"])
    args["max_steps"] = job["steps"]  # the point's own budget, never the recipe's
    return TrainingArguments(**args)


def held_out_loss(model, blocks, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over the held-out blocks."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            x = blocks[i: i + batch]
            total += model(input_ids=x, labels=x).loss.item() * len(x)
    return total / len(blocks)


def train_point(job: dict) -> dict:
    """Train one point from scratch and write its folder; returns its manifest. `job`: the point (plan_point),
    plus dir, stage_dir, seed, trainer overrides, block_size, use_cpu, threads (None: the process's own),
    save_model (a folder for the trained model and tokenizer, or None)."""
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, Trainer, default_data_collator, set_seed
    from transformers.trainer_callback import PrinterCallback

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    out = Path(job["dir"])
    if out.exists():  # an earlier attempt, killed before it finished: start the point again
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stage_dir = Path(job["stage_dir"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(stage_dir / TOKENIZER_DIR))
    tokens = torch.load(stage_dir / TOKENS_FILE, weights_only=True)
    set_seed(job["seed"])
    from alignpipe.models.loading import build_model, count_parameters

    model = build_model(ModelInit(**job["init"]), tokenizer)
    args = training_arguments(job)
    blocks = tokens["train"][: job["d"] // job["block_size"]].tolist()
    train_ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=default_data_collator)
    trainer.remove_callback(PrinterCallback)  # the point's log goes to its train_log.jsonl, not the console
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    loss = held_out_loss(trainer.model, tokens["eval"].to(next(trainer.model.parameters()).device))
    history = trainer.state.log_history
    with open(out / "train_log.jsonl", "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    if job.get("save_model"):
        trainer.save_model(job["save_model"])
        tokenizer.save_pretrained(job["save_model"])
    built = count_parameters(trainer.model)
    if built != job["params"]["total"]:
        raise RunError(f"point {job['name']}: the model has {built} parameters, the sweep counted "
                       f"{job['params']['total']}", where=str(out), fix="report this as a bug in stages/sweep.py")
    point = {k: job[k] for k in ("name", "budget", "init", "n", "params", "steps", "d", "c")}
    point.update(run=job.get("run", job["name"]), seed=job["seed"], learning_rate=args.learning_rate)
    manifest = {"status": "complete", "point": point,
                "metrics": {"eval_loss": loss, "perplexity": math.exp(loss), "train_wall_s": wall,
                            "train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
                            "torch_threads": torch.get_num_threads()}}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _worker_init() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train_points(jobs: list[dict], parallel: int, log) -> list[dict]:
    """Train `jobs` (their folders incomplete), `parallel` at a time: in this process when 1, else in worker
    processes of one torch thread each. Returns their manifests in job order."""
    if not jobs:
        return []
    names = [j.get("run", j["name"]) for j in jobs]
    if parallel <= 1 or len(jobs) <= 1:
        out = []
        for name, job in zip(names, jobs):
            log(f"point {name}: N={job['n']:,} D={job['d']:,} ({job['steps']} steps, seed {job['seed']})")
            out.append(train_point(job))
            log(f"point {name}: held-out loss {out[-1]['metrics']['eval_loss']:.4f}")
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    log(f"points {', '.join(names)}: {parallel} at a time, one process and thread each")
    results: dict[int, dict] = {}
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        running = {pool.submit(train_point, {**j, "threads": 1}): i for i, j in enumerate(jobs)}
        for done in as_completed(running):
            results[running[done]] = r = done.result()
            log(f"point {names[running[done]]}: held-out loss {r['metrics']['eval_loss']:.4f} "
                f"({len(results)} of {len(jobs)} done)")
    return [results[i] for i in range(len(jobs))]
