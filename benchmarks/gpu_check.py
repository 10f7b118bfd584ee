"""The GPU check (issue 43): alignpipe's own LoRA stages at a real model's shape, bf16, against plain TRL on the
same work, on one GPU in a few minutes.

    python -m benchmarks.gpu_check                       # one GPU: Qwen2.5-0.5B's shape (random weights)
    python -m benchmarks.gpu_check --cpu --out /tmp/x.json   # the dry run: tiny shapes on the CPU, same code path

What it does, in order (settings: benchmarks/gpu_work.py):
1. writes the data (generated conversations, preference pairs, prompts) and a Qwen2.5-0.5B-shaped model with
   random weights in hub layout (`alignpipe tiny-model --like qwen2 --shape qwen2.5-0.5b`) into a work folder;
2. in one process, alignpipe's recipe through `alignpipe run RECIPE --stages S` for S = sft, reward, dpo, grpo,
   ppo in turn (LoRA; bf16 on a GPU; each policy stage evaluated on a few held-out prompts), as the CLI does;
3. in another process, the same sft and dpo work through a plain TRL script (benchmarks/gpu_trl.py);
4. prints per stage: steady real tokens/s, steps/s, time to first step, the training loop's GPU memory peak,
   and alignpipe / TRL; writes everything, with the device and the versions, as JSON (`--out`).

The run's own device files: docs/performance.md (GPU) says how a task with a device runs it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import gpu_work
from benchmarks.process import T_START

ALIGNPIPE_STAGES = ("sft", "reward", "dpo", "grpo", "ppo")
COMPARED = ("sft", "dpo")  # stages the plain TRL script also runs
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "huggingface_hub")
REPO = Path(__file__).resolve().parent.parent


# --- one side, in its own process: `python -m benchmarks.gpu_check --side alignpipe|trl SPEC.json` ----------------

def alignpipe_stage(spec: dict, stage: str, probe) -> dict:
    """`alignpipe run RECIPE --stages STAGE`, as the CLI runs it, and what its manifest says of the stage."""
    from alignpipe.cli import main as alignpipe

    def call():
        rc = alignpipe(["run", spec["recipe_path"], "--stages", stage])
        if rc != 0:
            raise RuntimeError(f"alignpipe run exited with {rc}")

    row = timed_stage(probe, call, spec)
    manifest = Path(spec["runs_dir"], "gpucheck", stage, "manifest.json")
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        metrics = m.get("metrics") or {}
        keep = ("batching", "batching_reason", "torch_threads", "torch_threads_why", "eval_status", "eval_samples",
                "train_runtime", "train_steps_per_s")
        row["manifest"] = {"status": m.get("status"), **{k: metrics[k] for k in keep if k in metrics}}
    log = Path(spec["runs_dir"], "gpucheck", stage, "train_log.jsonl")
    if stage == "ppo" and log.is_file():  # its own loop (no Trainer): the per-update split from its train log
        from benchmarks.worker import ppo_summary

        row.update(ppo=ppo_summary(log.parent, probe))
        if probe.generate_calls and "time_to_first_step_s" not in row:
            row["time_to_first_step_s"] = round(probe.generate_calls[0][0] - row.pop("_t_call"), 2)
    if stage == "grpo" and log.is_file():
        row.update(grpo=grpo_summary(log, row.get("loop_s")))
    row.pop("_t_call", None)
    return row


def grpo_summary(log: Path, loop_s: float | None) -> dict:
    """GRPO's steps get prompt rows (their tokens are generated inside the step): TRL's own count of the tokens
    it trained on (prompts and completions, pad excluded) and the completions' mean length, from its log."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    counted = [r["num_tokens"] for r in rows if "num_tokens" in r]
    lengths = [r["completions/mean_length"] for r in rows if "completions/mean_length" in r]
    out = {"trl_num_tokens": counted[-1] if counted else None,
           "completion_mean_length": round(sum(lengths) / len(lengths), 1) if lengths else None}
    if counted and loop_s:
        out["trl_tokens_per_s"] = round(counted[-1] / loop_s, 1)
    return out


def timed_stage(probe, call, spec: dict) -> dict:
    from benchmarks.gpu_measure import timed

    t_call = time.perf_counter()
    row = timed(probe, call, spec["settings"]["skip_steps"])
    row["_t_call"] = t_call
    return row


def run_side(spec_path: str) -> None:
    """Every stage of one side in this process, the results file rewritten after each (a stage cut off by the
    parent's timeout leaves the earlier ones)."""
    from benchmarks.gpu_measure import StageProbe

    spec = json.loads(Path(spec_path).read_text())
    side = spec["side"]
    probe = StageProbe()
    probe.install()
    out = {"side": side, "startup_s": None, "stages": {}}
    for stage in (ALIGNPIPE_STAGES if side == "alignpipe" else COMPARED):
        if side == "alignpipe":
            row = alignpipe_stage(spec, stage, probe)
        else:
            from benchmarks.gpu_trl import STAGES

            row = timed_stage(probe, lambda: STAGES[stage](spec), spec)
            row.pop("_t_call")
        if out["startup_s"] is None and probe.first_begin_wall is not None:
            out["startup_s"] = round(probe.first_begin_wall - T_START, 2)  # process start to its first step
        out["stages"][stage] = row
        Path(spec["out"]).write_text(json.dumps(out, indent=1))
        print(f"[gpu_check] {side} {stage}: {row['status']}", flush=True)


# --- the parent ---------------------------------------------------------------------------------------------

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def device() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "processor": platform.processor() or platform.machine()}
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}


def prepare(work: Path, s: gpu_work.Settings, dtype: str = "auto") -> dict:
    """Data, model and recipe in `work`; the spec both sides read."""
    import gc

    import torch
    import yaml

    files = gpu_work.write_data(work, s)
    t = time.perf_counter()
    model_dir = gpu_work.build_model(work / "model", s)
    build_s = time.perf_counter() - t
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    runs_dir = str(work / "runs")
    recipe_path = work / "gpucheck.yaml"
    recipe_path.write_text(yaml.safe_dump(gpu_work.recipe(s, files, model_dir, runs_dir, dtype), sort_keys=False))
    return {"settings": s.as_dict(), "files": files, "model_dir": model_dir, "runs_dir": runs_dir,
            "recipe_path": str(recipe_path), "work": str(work), "model_build_s": round(build_s, 1), "dtype": dtype}


def launch(spec: dict, side: str, env: dict) -> tuple[dict, str]:
    """One side in its own process, under its timeout; (its results, how it ended)."""
    work = Path(spec["work"])
    spec = {**spec, "side": side, "out": str(work / f"{side}.json")}
    spec_path = work / f"{side}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"{side}.log"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--side", side, str(spec_path)]
    env = {**env, "BENCH_T0": str(time.time())}
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=spec["settings"]["timeout_s"][side])
            ended = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            ended = f"killed after its {spec['settings']['timeout_s'][side]} s"
    results = json.loads(Path(spec["out"]).read_text()) if Path(spec["out"]).is_file() else {"stages": {}}
    results["ended"] = ended
    results["log_tail"] = log.read_text(errors="replace")[-4000:]
    return results, ended


def ratios(ours: dict, theirs: dict) -> dict:
    """alignpipe / TRL per compared stage: steady real tokens/s (higher is better for alignpipe), time to first
    step and the training loop's memory peak (lower is better for alignpipe)."""
    out = {}
    for stage in COMPARED:
        a, t = ours.get(stage) or {}, theirs.get(stage) or {}
        row = {}
        for key in ("real_tokens_per_s", "time_to_first_step_s", "peak_gpu_train_mib"):
            if a.get(key) and t.get(key):
                row[key] = round(a[key] / t[key], 3)
        if a.get("real_tokens") and t.get("real_tokens"):  # the same work: about the same real tokens per step
            row["real_tokens_per_step"] = round((a["real_tokens"] / a["steps"]) / (t["real_tokens"] / t["steps"]), 3)
        out[stage] = row
    return out


def table(result: dict) -> str:
    ours, theirs = result["alignpipe"]["stages"], result["trl"]["stages"]
    lines = [f"device: {result['machine']['device']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"{'stage':<11}{'status':<8}{'steps':>6}{'real tok/s':>12}{'steps/s':>9}{'1st step s':>11}"
             f"{'peak MiB':>10}{'vs TRL':>8}"]
    rows = [(f"{s}", ours.get(s) or {}, s) for s in ALIGNPIPE_STAGES] + [(f"trl {s}", theirs.get(s) or {}, None)
                                                                          for s in COMPARED]
    for name, r, stage in rows:
        ratio = result["ratios"].get(stage, {}).get("real_tokens_per_s") if stage else None
        status = "ok" if r.get("status") == "ok" else ("missing" if not r else "FAILED")
        steps_per_s = r.get("steps_per_s") or round((r.get("ppo") or {}).get("steps_per_s") or 0, 3) or None
        lines.append(f"{name:<11}{status:<8}{r.get('steps') or (r.get('ppo') or {}).get('steps') or '-':>6}"
                     f"{r.get('real_tokens_per_s') or '-':>12}{steps_per_s or '-':>9}"
                     f"{r.get('time_to_first_step_s') or '-':>11}{r.get('peak_gpu_train_mib') or '-':>10}"
                     f"{ratio or '-':>8}")
    failed = [f"{side} {s}: {r['status']}" for side in ("alignpipe", "trl")
              for s, r in result[side]["stages"].items() if r.get("status") != "ok"]
    return "\n".join(lines + failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the dry run: tiny shapes on the CPU (CUDA hidden)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on this machine's device (a smoke run)")
    parser.add_argument("--dtype", default="auto", help="alignpipe's model.dtype (auto: bf16 on a GPU, fp32 on a CPU; "
                                                         "--cpu --dtype bfloat16 runs the bf16 paths on the CPU)")
    parser.add_argument("--out", default=None, help="the JSON result (default benchmarks/results/gpu-check-DATE.json)")
    parser.add_argument("--workdir", default=None, help="keep the data, model, runs and logs here (default: temp)")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        run_side(args.spec)
        return 0
    env = dict(os.environ)
    if importlib.util.find_spec("alignpipe") is None:  # a bare checkout (the GPU machine): this tree's sources
        sys.path.insert(0, str(REPO / "src"))
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
        env.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not args.cpu and not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu for the dry run", file=sys.stderr)
        return 2
    settings = gpu_work.CPU if (args.cpu or args.tiny) else gpu_work.GPU
    date = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu-check-{date:%Y-%m-%d}.json")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {"date": date.isoformat(timespec="seconds"), "machine": device(), "versions": versions(),
                  "mode": "cpu dry run" if args.cpu else ("tiny smoke run" if args.tiny else "gpu"),
                  "dtype": args.dtype}
        print(f"[gpu_check] {result['mode']} on {result['machine']['device']}; {result['versions']}", flush=True)
        spec = prepare(work, settings, args.dtype)
        result.update(settings=spec["settings"], model_build_s=spec["model_build_s"])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH")) if p)
        for side in ("alignpipe", "trl"):
            result[side], ended = launch(spec, side, env)
            print(f"[gpu_check] {side}: {ended}", flush=True)
        result["ratios"] = ratios(result["alignpipe"]["stages"], result["trl"]["stages"])
        result["total_s"] = round(time.time() - T_START, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"[gpu_check] {result['total_s']} s in all; written to {out}", flush=True)
    return 0 if all(r.get("status") == "ok" for side in ("alignpipe", "trl")
                    for r in result[side]["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
