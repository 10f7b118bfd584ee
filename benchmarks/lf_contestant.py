"""LLaMA-Factory on the same work as alignpipe's peer contestants: same model, data, batch, cutoff and steps.

Two halves, run by two interpreters:

* `prepare(...)` runs inside `benchmarks/run.py` (alignpipe's venv): it exports the embedded world's
  rows to LLaMA-Factory's dataset format (`dataset_info.json` beside them) and writes one LLaMA-Factory
  config per contestant, taken from the matching alignpipe stage of the peer recipe (parent model,
  LoRA, max_steps, batch, cutoff; learning rate, schedule and DPO beta/SFT term as our stage defaults).
* `python -m benchmarks.lf_contestant SPEC.json` runs in LLaMA-Factory's own venv (`make bench-peers`):
  what `llamafactory-cli train cfg.yaml` does (`llamafactory.train.tuner.run_exp`), in-process, with
  worker.py's probe installed, so steps/s, tokens and startup are measured exactly as for our stages:
  one short warm-up run, then `repeats` timed runs; only the training loop counts for steps/s.

Chat template: none is named. Given no `template`, LLaMA-Factory parses the tokenizer's own Jinja
template into its slots (`<|user|>{content}<|end|><|assistant|>` and `{content}<|end|>`), so it tokenizes
our conversations as our stages do. Its built-in `phi` template looks alike but puts newlines between
the tags, which our tokenizer would spend tokens on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.process import T_START, peak_rss_mb, pin

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV = REPO / ".venv-llamafactory"  # `make bench-peers` builds it; --lf-venv or LLAMAFACTORY_VENV to override

# our stage kind -> LLaMA-Factory stage, and our stage defaults that shape the work (src/alignpipe/stages/*.py)
LF_STAGE = {"sft": "sft", "reward": "rm", "dpo": "dpo"}
STAGE_DEFAULTS = {
    "sft": {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 10},
    "reward": {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 10},
    # DPO: sigmoid loss plus an SFT term on the chosen responses, weight 2 (LLaMA-Factory's `pref_ftx`)
    "dpo": {"learning_rate": 2e-4, "lr_scheduler_type": "cosine", "warmup_steps": 5, "pref_beta": 0.1,
            "pref_loss": "sigmoid", "pref_ftx": 2.0},
}
DATASETS = {"sft": "alignpipe_sft", "reward": "alignpipe_pairs_rm", "dpo": "alignpipe_pairs"}


def venv_python(venv: str | os.PathLike | None = None) -> Path | None:
    """LLaMA-Factory's interpreter, or None when its venv has not been built."""
    venv = Path(venv or os.environ.get("LLAMAFACTORY_VENV") or DEFAULT_VENV)
    python = venv / "bin" / "python"
    return python if python.exists() and (venv / "bin" / "llamafactory-cli").exists() else None


# --- in alignpipe's venv: data and configs ------------------------------------------------------------


def export_data(recipe: dict, folder: Path, cutoff: int, tokenizer_dir: Path) -> dict:
    """The embedded world's SFT conversations and preference pairs, as LLaMA-Factory reads them.

    Reward pairs are filtered as our reward stage filters them (pairs longer than the cutoff dropped), so
    both train on the same pairs; DPO and SFT rows go as they are (both sides truncate at the cutoff).
    """
    from transformers import AutoTokenizer

    from alignpipe.data.world import World, WorldConfig
    from alignpipe.reward.pairs import filter_pairs

    folder.mkdir(parents=True, exist_ok=True)
    world = World(WorldConfig(**{"seed": recipe["seed"], **recipe["world"]}))
    pairs = world.preference_rows("train")
    kept, _ = filter_pairs(pairs, "train", AutoTokenizer.from_pretrained(tokenizer_dir), cutoff)

    def pairwise(rows):  # openai-style messages; chosen/rejected are single assistant messages
        return [{"messages": r["prompt"], "chosen": r["chosen"][-1], "rejected": r["rejected"][-1]} for r in rows]

    files = {"alignpipe_sft": world.sft_rows(), "alignpipe_pairs": pairwise(pairs),
             "alignpipe_pairs_rm": pairwise(kept)}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    info = {}
    for name, rows in files.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))
        columns = {"messages": "messages"}
        if name != "alignpipe_sft":
            columns.update(chosen="chosen", rejected="rejected")
        info[name] = {"file_name": f"{name}.json", "formatting": "sharegpt", "ranking": name != "alignpipe_sft",
                      "columns": columns, "tags": tags}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return {name: len(rows) for name, rows in files.items()}


def lf_config(recipe: dict, stage: str, data_dir: Path, out_dir: Path) -> dict:
    """LLaMA-Factory's training arguments for the work of our peer stage `stage`."""
    cfg = recipe["stages"][stage]
    runs_root = Path(recipe["runs_dir"]) / recipe["name"]
    trainer = cfg["trainer"]
    args = {
        "stage": LF_STAGE[cfg["kind"]],
        "do_train": True,
        "model_name_or_path": str(runs_root / cfg["from"] / "model"),
        "finetuning_type": "lora" if cfg.get("lora") else "full",
        "dataset": DATASETS[cfg["kind"]],
        "dataset_dir": str(data_dir),
        # no `template`: parsed from the tokenizer's chat template (see the module docstring)
        "cutoff_len": trainer["max_length"],
        "overwrite_cache": True,
        "output_dir": str(out_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": trainer["per_device_train_batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": trainer["max_steps"],
        **STAGE_DEFAULTS[cfg["kind"]],
        "seed": recipe["seed"],
        "bf16": False,
        "fp16": False,
        # LLaMA-Factory turns gradient checkpointing on by default (a second forward in every backward); our
        # stages turn it off, so the same work means off here too. With it on, its steps/s on this work were
        # 0.65-0.9x of these (2026-11-28, busy machine): SFT-LoRA the most, DPO the least.
        "disable_gradient_checkpointing": True,
        "save_strategy": "no",  # the model is still saved once, after the last step
        "eval_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if cfg.get("lora"):
        args.update(lora_rank=cfg["lora"]["r"], lora_alpha=cfg["lora"]["alpha"], lora_dropout=0.0, lora_target="all")
    return args


_exported: dict[Path, dict] = {}  # data folder -> row counts and digests, exported once per bench run


def prepare(contestant, settings, recipe: dict, work: Path, spec: dict) -> dict:
    """Export the data (once per bench run: a folder left by an earlier run may hold rows of older code) and
    add this contestant's config to its worker spec."""
    data_dir = work / "llamafactory_data"
    if data_dir not in _exported:
        model_dir = Path(recipe["runs_dir"]) / recipe["name"] / "pretrain" / "model"
        counts = export_data(recipe, data_dir, settings.peer_cutoff, model_dir)
        digests = {name: hashlib.sha256((data_dir / f"{name}.json").read_bytes()).hexdigest()[:16] for name in counts}
        _exported[data_dir] = {"rows": counts, "sha256": digests}
    args = lf_config(recipe, contestant.stage, data_dir, work / f"{contestant.name}.out")
    (work / f"{contestant.name}.yaml").write_text(json.dumps(args, indent=1))  # JSON is YAML: llamafactory-cli reads it
    return {**spec, "lf_args": args, "lf_data": _exported[data_dir]}


# --- in LLaMA-Factory's venv: the timed runs -----------------------------------------------------------


def stub_torchaudio() -> None:
    """LLaMA-Factory 0.9.5 imports torchaudio at the top of its data code (for audio inputs only). PyPI has no
    torchaudio that loads beside torch 2.13 (the newest, 2.11.1, fails to load its library), so `make bench-peers`
    removes it and this empty module stands in: text training never touches it, audio would fail loudly."""
    import importlib.machinery
    import types

    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is not None:
        return

    def missing(name):
        raise AttributeError(f"torchaudio.{name}: torchaudio is a stub in this benchmark (text only)")

    stub = types.ModuleType("torchaudio")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    stub.__getattr__ = missing
    sys.modules["torchaudio"] = stub


def run_lf(spec: dict) -> dict:
    """`llamafactory-cli train` in-process, with worker.py's probe: warm-up, then the timed runs."""
    from benchmarks.worker import Probe, repeat

    pin(spec)
    stub_torchaudio()
    import torch  # noqa: F401 - imported before the baseline RSS is read
    import transformers  # noqa: F401
    from llamafactory.train.tuner import run_exp

    rss_imports = peak_rss_mb()
    probe = Probe()
    probe.install()
    out_dir = Path(spec["lf_args"]["output_dir"])

    def run_once(i: int) -> dict:
        probe.reset()
        args = dict(spec["lf_args"])
        if i == 0 and spec["warmup_steps"]:
            args["max_steps"] = spec["warmup_steps"]
        t_call = time.perf_counter()
        run_exp(args)
        t_return = time.perf_counter()
        row = probe.summary(t_call, t_return)
        results = out_dir / "train_results.json"  # the trainer's own figure; train_runtime includes its set-up
        if results.exists():
            row["trainer_steps_per_s"] = json.loads(results.read_text()).get("train_steps_per_second")
        if i == 0:  # process start (interpreter, imports, data, model) to the first training step
            row["startup_s"] = probe.first_begin_wall - T_START if probe.first_begin_wall else None
        return row

    runs = repeat(run_once, spec, probe)
    return {"warmup": runs[0], "runs": runs[1:], "rss_after_imports_mb": rss_imports, "data": spec["lf_data"]}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    result = run_lf(spec)
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_threads"] = torch.get_num_threads()
    import llamafactory
    import transformers
    import trl

    result["versions"] = {"llamafactory": llamafactory.__version__, "transformers": transformers.__version__,
                          "trl": trl.__version__, "torch": torch.__version__}
    Path(spec["out"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
