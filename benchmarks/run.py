"""`make bench`: throughput and memory of every alignpipe stage, against a raw PyTorch loop, the
machine's matmul limit and LLaMA-Factory (with `make bench-peers`, LLaMA-Factory itself on the same work in the
same run; for PPO, which it cannot run here, its reported figure). See benchmarks/README.md.

    python -m benchmarks.run                    # everything (~10 min on 2 cores), from the repository root
    python -m benchmarks.run --only sft_1t,raw_sft_1t --repeats 5
    python -m benchmarks.run --quick            # tiny settings: checks the plumbing, not the speed
    python -m benchmarks.run --only sft_full,lf_sft_full --lf-venv /path/to/venv   # ours and LLaMA-Factory

Each contestant runs in its own process (benchmarks/worker.py): one warm-up run, then `repeats`
timed runs; the median is reported. Results: benchmarks/results/results.json and a printed table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from benchmarks import lf_contestant as lf_bench
from benchmarks.contestants import (REFERENCE, REFERENCE_STARTUP_S, Contestant, Settings, available_kinds,
                                    compute_recipe, peer_recipe, plan, prep_stages)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"  # result files, beside none of the code

# figures whose median is reported (each run gives one value)
MEDIAN_KEYS = ("steps_per_s", "samples_per_s", "tokens_per_s", "real_tokens_per_s", "model_flops_per_s",
               "setup_s", "loop_s", "total_s", "after_s", "flops_per_s", "update_s", "generated_tokens_per_s",
               "steps_per_s_wall", "samples_per_s_wall", "response_length", "cpu_share", "trainer_steps_per_s",
               "fwd_bwd_share")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# malloc's arenas on transparent huge pages, for every contestant alike (glibc >= 2.35; others ignore it):
# it made one contestant pair's ratio repeat within 2.4% (sd) over fresh processes, against 5.6% without
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGE_PAGES]))
    # ALIGNPIPE_THREADS: a trainer stage's threads, as asked (auto would probe, and unset takes OMP_NUM_THREADS)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), ALIGNPIPE_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(
                   filter(None, [str(REPO), env.get("PYTHONPATH")])))  # `python -m benchmarks.worker`
    return env


def cpu_model() -> str:
    """The CPU's model name (figures from two hosts of one machine kind differ ~2x here)."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor()


# --- preparation: recipes and the parents every contestant starts from --------------------------------


def write_recipes(settings: Settings, work: Path, kinds: set[str]) -> dict[str, dict]:
    runs_dir = str(work / "runs")
    recipes = {"compute": compute_recipe(settings, runs_dir, kinds), "peer": peer_recipe(settings, runs_dir, kinds)}
    for name, data in recipes.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return recipes


def prepare(recipes: dict[str, dict], work: Path, timeout: int) -> dict[str, float]:
    """Build the parent stages (pretrain, sft, reward) once; nothing here is timed for the table."""
    took = {}
    for name, data in recipes.items():
        stages = prep_stages(data)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "alignpipe.cli", "run", str(work / f"{name}.yaml"), "--stages", ",".join(stages)]
        with open(work / f"prepare_{name}.log", "w") as fh:
            proc = subprocess.run(cmd, env=child_env(1), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"preparing {name} failed; see {work / f'prepare_{name}.log'}")
        took[name] = time.perf_counter() - t
        log(f"prepared {name} ({', '.join(stages)}) in {took[name]:.1f}s")
    return took


# --- one contestant ------------------------------------------------------------------------------------


def setup_contestant(c: Contestant, settings: Settings, recipes: dict, work: Path, kinds: set[str]) -> tuple:
    """(the result's fixed fields, the worker's command, its spec) for one contestant; the command is None when
    it cannot run here (the fields then say why)."""
    base = {"kind": c.kind, "recipe": c.recipe, "stage": c.stage, "threads": c.threads, "note": c.note,
            "reference": c.reference}
    if c.stage_kind and (c.stage_kind not in kinds or c.stage not in recipes[c.recipe]["stages"]):
        return {**base, "status": "missing", "error": f"stage kind {c.stage_kind!r} not in this checkout"}, None, None
    if c.kind == "llamafactory":
        base["same_work_as"] = c.options["same_work_as"]
        if lf_bench.venv_python(settings.lf_venv) is None:
            where = settings.lf_venv or os.environ.get("LLAMAFACTORY_VENV") or lf_bench.DEFAULT_VENV
            return {**base, "status": "missing", "error": f"no LLaMA-Factory venv at {where} (make bench-peers)"}, \
                None, None
    if c.options.get("batches_from") and not (work / c.options["batches_from"]).is_file():
        return {**base, "status": "skipped", "error": f"needs {c.options['batches_from']} (run sft_1t first)"}, \
            None, None
    runs_root = Path(recipes[c.recipe]["runs_dir"]) / c.recipe if c.recipe else None
    spec = {**asdict(c), "repeats": settings.repeats, "work": str(work), "out": str(work / f"{c.name}.json"),
            "recipe_path": str(work / f"{c.recipe}.yaml") if c.recipe else None,
            "stage_dir": str(runs_root / c.stage) if c.stage else None,
            "model_dir": str(runs_root / "pretrain" / "model") if c.recipe else None,
            "matmul_sizes": list(settings.matmul_sizes)}
    cmd = [sys.executable, "-m", "benchmarks.worker"]
    if c.kind == "llamafactory":  # its data and config are written here, it trains in its own venv
        spec = lf_bench.prepare(c, settings, recipes[c.recipe], work, spec)
        cmd = [str(lf_bench.venv_python(settings.lf_venv)), "-m", "benchmarks.lf_contestant"]
    return base, cmd, spec


def write_spec(c: Contestant, spec: dict, work: Path) -> Path:
    path = work / f"{c.name}.spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def collect(c: Contestant, base: dict, spec: dict, work: Path, returncode: int, wall: float) -> dict:
    """A finished worker's result: its runs and their medians, or why it failed (the log's last lines)."""
    if returncode != 0:
        tail = (work / f"{c.name}.log").read_text().strip().splitlines()[-3:]
        return {**base, "status": "failed", "error": " | ".join(tail), "wall_s": wall}
    raw = json.loads(Path(spec["out"]).read_text())
    return {**base, "status": "ok", "wall_s": wall, **raw, "median": medians(raw["runs"])}


def run_contestant(c: Contestant, settings: Settings, recipes: dict, work: Path, kinds: set[str]) -> dict:
    base, cmd, spec = setup_contestant(c, settings, recipes, work, kinds)
    if cmd is None:
        return base
    spec_path = write_spec(c, spec, work)
    env = child_env(c.threads)
    env["BENCH_T0"] = repr(time.time())
    t = time.perf_counter()
    try:
        with open(work / f"{c.name}.log", "w") as fh:
            proc = subprocess.run([*cmd, str(spec_path)], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=settings.timeout_s)
    except subprocess.TimeoutExpired:
        return {**base, "status": "failed", "error": f"timed out after {settings.timeout_s}s"}
    return collect(c, base, spec, work, proc.returncode, time.perf_counter() - t)


def _read_reply(reply, timeout: float) -> str:
    """One line from a worker's reply pipe ('' when it died or took longer than `timeout`)."""
    ready, _, _ = select.select([reply], [], [], timeout)
    return reply.readline() if ready else ""


def run_interleaved(groups: list[list[Contestant]], settings: Settings, recipes: dict, work: Path,
                    kinds: set[str]) -> dict[str, dict]:
    """Groups of contestants on the same work, interleaved, on one CPU: every worker of every group starts and
    warms up (one after another) and stays alive. Then the rounds go round the groups: round 1 of each group,
    round 2 of each, and so on, so one group's rounds are spread over the whole bench, and a slow spell of
    some minutes falls on a round or two of every group, not on all the rounds of one.

    In a group's round r each worker sets up its r-th timed run in turn, their training loops take turns of
    `versus_turn_steps` steps (ours, theirs, ours, theirs, ...; the others wait idle), and each finishes its
    run in turn. A change in the machine's speed that lasts longer than a turn (a second or so) falls on both
    sides alike, so each round gives a paired ratio. Our workers' runs overlap in time (one waits mid-run for
    its turn) in one run folder: this process holds the folder's lock for them, as `alignpipe run --parallel`
    does for its stage processes (their stages are distinct).

    The rounds are shared out over `versus_process_pairs` sets of fresh worker processes, one set after the
    other: the rounds of one process pair agree within ~2%, but the ratio moves with the pair itself (what sets
    it lives as long as the processes), so one pair per run is one draw, and a run pools several."""
    from alignpipe.runfolder.lock import LOCK_PARENT_ENV, RunLock

    pairs = max(1, min(settings.versus_process_pairs, settings.versus_repeats))
    rounds = [settings.versus_repeats // pairs + (i < settings.versus_repeats % pairs) for i in range(pairs)]
    with contextlib.ExitStack() as locks:
        for root in {Path(recipes[c.recipe]["runs_dir"]) / recipes[c.recipe]["name"]
                     for g in groups for c in g if c.kind == "stage"}:
            locks.enter_context(RunLock(root))
        env = {LOCK_PARENT_ENV: str(os.getpid())}
        parts = [_interleave(groups, settings, recipes, work, kinds, env, pair, n) for pair, n in enumerate(rounds)]
    return {name: merge_pairs([part[name] for part in parts]) for name in parts[0]}


def merge_pairs(parts: list[dict]) -> dict:
    """One contestant's result over its process pairs: every timed run (each says its `pair`), their medians,
    the first process's warm-up (`warmups`: each one's), the highest peak RSS. A pair that failed fails it."""
    failed = [p for p in parts if p.get("status") != "ok"]
    if failed:
        return failed[0]
    runs = [{**run, "pair": i} for i, part in enumerate(parts) for run in part["runs"]]
    return {**parts[0], "runs": runs, "median": medians(runs), "process_pairs": len(parts),
            "warmups": [part["warmup"] for part in parts], "wall_s": sum(part["wall_s"] for part in parts),
            "peak_rss_mb": max(part["peak_rss_mb"] for part in parts)}


def _interleave(groups: list[list[Contestant]], settings: Settings, recipes: dict, work: Path, kinds: set[str],
                extra_env: dict, pair: int, rounds: int) -> dict[str, dict]:
    """One set of worker processes, started, warmed up, and taking `rounds` interleaved rounds."""
    results, live = {}, {}
    cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    for c in (c for g in groups for c in g):
        base, cmd, spec = setup_contestant(c, settings, recipes, work, kinds)
        if cmd is None:
            results[c.name] = base
            continue
        read_fd, write_fd = os.pipe()
        spec = {**spec, "repeats": rounds, "reply_fd": write_fd,
                "turn_steps": settings.versus_turn_steps, "cpu": cpu}
        env = {**child_env(c.threads), **extra_env, "BENCH_T0": repr(time.time())}
        log_fh = open(work / f"{c.name}.log", "a" if pair else "w")
        proc = subprocess.Popen([*cmd, str(write_spec(c, spec, work))], env=env, stdin=subprocess.PIPE, text=True,
                                stdout=log_fh, stderr=subprocess.STDOUT, pass_fds=(write_fd,))
        os.close(write_fd)
        reply = os.fdopen(read_fd)
        live[c.name] = {"c": c, "base": base, "spec": spec, "proc": proc, "reply": reply, "log": log_fh,
                        "t": time.perf_counter()}
        if _read_reply(reply, settings.timeout_s).strip() != "ready":  # started and warmed up
            live.pop(c.name)["proc"].kill()
            results[c.name] = {**base, "status": "failed", "error": "did not get through its warm-up"}

    def turn(name: str, expected: set[str], what: str) -> str | None:
        """Let worker `name` go on until its next reply; None (and the worker dropped) when it is not expected."""
        w = live[name]
        w["proc"].stdin.write("go\n")
        w["proc"].stdin.flush()
        line = _read_reply(w["reply"], settings.timeout_s)
        said = "row" if line.startswith("{") else line.strip()
        if said in expected:
            return said
        w["proc"].kill()
        results[name] = {**w["base"], "status": "failed",
                         "error": f"{what}: expected {' or '.join(sorted(expected))}, got {said or 'nothing'}"}
        live.pop(name)
        return None

    for r in range(rounds):
        what = f"timed run {r + 1} of process pair {pair + 1}"
        for group in groups:
            names = [c.name for c in group if c.name in live]
            in_loop = [n for n in names if turn(n, {"loop"}, what)]  # each sets up its run, then waits
            while in_loop:
                in_loop = [n for n in in_loop if n in live and turn(n, {"turn", "done"}, what) == "turn"]
            for name in (n for n in names if n in live):
                turn(name, {"row"}, what)  # each finishes its run (evaluation, saving) in turn
            log(f"  pair {pair + 1}, round {r + 1}/{rounds} of {', '.join(c.name for c in group)} "
                f"(load {os.getloadavg()[0]:.2f})")
    group_of = {c.name: g for g in groups for c in g}
    for name, w in live.items():
        w["proc"].stdin.close()  # the end of the runs: the worker writes its result file and exits
        rc = w["proc"].wait(timeout=settings.timeout_s)
        w["reply"].close()
        w["log"].close()
        results[name] = {**collect(w["c"], w["base"], w["spec"], work, rc, time.perf_counter() - w["t"]),
                         "interleaved_with": [c.name for c in group_of[name] if c.name != name]}
    return results


def versus_groups(contestants: list[Contestant], settings: Settings) -> list[list[Contestant]]:
    """Each LLaMA-Factory contestant with ours on the same work (ours first), when its venv is here."""
    if lf_bench.venv_python(settings.lf_venv) is None:
        return []
    by_name = {c.name: c for c in contestants}
    return [[by_name[n] for n in c.options["same_work_as"] if n in by_name] + [c]
            for c in contestants if c.kind == "llamafactory"
            and any(n in by_name for n in c.options["same_work_as"])]


def medians(runs: list[dict]) -> dict:
    out = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    for key in ("steps", "tokens", "params", "trainable_params", "real_share", "label_tokens", "first_loss",
                "gflop_per_step"):
        if runs and runs[0].get(key) is not None:
            out[key] = runs[0][key]
    if runs and "split_s" in runs[0]:  # PPO: median of each part of the update
        for field in ("split_s", "split_share"):
            out[field] = {k: statistics.median(r[field][k] for r in runs) for k in runs[0][field]}
    return out


# --- figures across contestants ------------------------------------------------------------------------


def derive(results: dict[str, dict]) -> dict:
    """MFU, the ratios the issue asks for, and the comparison with LLaMA-Factory."""

    def m(name, key):
        r = results.get(name, {})
        return (r.get("median") or {}).get(key) if r.get("status") == "ok" else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    def per_cpu_s(name, key):  # a rate per CPU-second of the process: less sensitive to a busy machine
        value, share = m(name, key), m(name, "cpu_share")
        return value / share if value and share else None

    matmuls = {t: [f"matmul_{t}t", f"matmul_{t}t_end"] for t in (1, 2)}
    limits = {t: max(filter(None, [m(n, "flops_per_s") for n in names]), default=None) for t, names in matmuls.items()}
    limits_cpu = {t: max(filter(None, [per_cpu_s(n, "flops_per_s") for n in names]), default=None)
                  for t, names in matmuls.items()}
    for name, r in results.items():
        med = r.get("median") or {}
        if r.get("kind") == "matmul" or not med.get("model_flops_per_s"):
            continue
        t = r.get("threads")
        if limits.get(t):
            med["mfu"] = med["model_flops_per_s"] / limits[t]
        if limits_cpu.get(t) and med.get("cpu_share"):
            med["mfu_cpu"] = med["model_flops_per_s"] / med["cpu_share"] / limits_cpu[t]
            med["tokens_per_cpu_s"] = med["tokens_per_s"] / med["cpu_share"]
            if med.get("real_tokens_per_s"):
                med["real_tokens_per_cpu_s"] = med["real_tokens_per_s"] / med["cpu_share"]
    derived = {
        "matmul_flops_per_s": {f"{t}t": v for t, v in limits.items()},
        "matmul_flops_per_cpu_s": {f"{t}t": v for t, v in limits_cpu.items()},
        # real tokens: the same rows on both sides, padded by the raw loop, padding-free (or not) in alignpipe
        "sft_vs_raw_tokens_per_s_1t": ratio(m("sft_1t", "real_tokens_per_s"), m("raw_sft_1t", "real_tokens_per_s")),
        "sft_vs_raw_tokens_per_s_2t": ratio(m("sft_2t", "real_tokens_per_s"), m("raw_sft_2t", "real_tokens_per_s")),
        "sft_vs_raw_tokens_per_cpu_s_1t": ratio(m("sft_1t", "real_tokens_per_cpu_s"),
                                                m("raw_sft_1t", "real_tokens_per_cpu_s")),
        "sft_vs_raw_tokens_per_s_peer": ratio(m("sft_full", "real_tokens_per_s"), m("raw_sft_full", "real_tokens_per_s")),
        "sft_2t_vs_1t": ratio(m("sft_2t", "tokens_per_s"), m("sft_1t", "tokens_per_s")),
        "packing_real_share": {"on": m("sft_packed_1t", "real_share"), "off": m("sft_1t", "real_share")},
        "packing_real_tokens_per_s_on_vs_off": ratio(m("sft_packed_1t", "real_tokens_per_s"),
                                                     m("sft_1t", "real_tokens_per_s")),
        "dpo_precomputed_vs_live_ref_pairs_per_s": ratio(m("dpo_full", "samples_per_s"),
                                                         m("dpo_full_live_ref", "samples_per_s")),
        "dpo_setup_s": {"precomputed": m("dpo_full", "setup_s"), "live_ref": m("dpo_full_live_ref", "setup_s")},
        "ppo_kv_cache_vs_none_generated_tokens_per_s": ratio(m("ppo", "generated_tokens_per_s"),
                                                             m("ppo_no_cache", "generated_tokens_per_s")),
        "ppo_kv_cache_vs_none_update_time": ratio(m("ppo_no_cache", "update_s"), m("ppo", "update_s")),
        "ppo_split_share": m("ppo", "split_share"),
    }
    vs_peer = {}
    for name, r in results.items():
        ref = REFERENCE.get(r.get("reference") or "")
        if not ref or r.get("status") != "ok":
            continue
        row = {}
        for key, theirs in ref.items():
            ours = m(name, f"{key}_wall") or m(name, key)
            row[key] = {"ours": ours, "llamafactory": theirs, "ratio": ratio(ours, theirs)}
        startup = (r.get("warmup") or {}).get("startup_s")
        row["startup_s"] = {"ours": startup, "llamafactory": REFERENCE_STARTUP_S}
        vs_peer[name] = row
    derived["vs_llamafactory"] = vs_peer
    derived["vs_llamafactory_same_work"] = same_work(results, m, ratio)
    derived["versus_llamafactory"] = versus(results)
    return derived


def versus(results: dict[str, dict]) -> dict:
    """Ours against LLaMA-Factory on the same work, from this run only, one key per stage (our contestant's
    name). Interleaved: `ratio` is pooled over the rounds (all our steps over all our loop seconds, over the
    same of theirs; their loops took turns), `paired` each round's ratio (our r-th timed run's steps/s over
    their r-th) with its median and min..max. Measured: identical contestants taking turns agree within 1-2%
    per round, ours against LLaMA-Factory's moves by ~5% from round to round (the machine's state slows the
    two programs differently), so the mean over rounds repeats better than their median. Not interleaved:
    `ratio` is the median of our steps/s over the median of theirs, with no spread."""

    def pool(runs: list[dict]) -> float | None:
        """All steps over all loop seconds of these timed runs."""
        timed = [x for x in runs if x.get("loop_s")]
        return sum(x["steps"] for x in timed) / sum(x["loop_s"] for x in timed) if timed else None

    def side(r: dict) -> dict:
        med = r["median"]
        return {"steps_per_s": med.get("steps_per_s"), "real_tokens_per_s": med.get("real_tokens_per_s"),
                "real_tokens_per_step": med["tokens"] * med["real_share"] / med["steps"]
                if med.get("tokens") and med.get("real_share") is not None and med.get("steps") else None,
                "steps": med.get("steps"), "loop_s": med.get("loop_s"), "cpu_share": med.get("cpu_share"),
                "peak_rss_mb": r.get("peak_rss_mb"), "runs_steps_per_s": [x.get("steps_per_s") for x in r.get("runs", [])],
                "pooled_steps_per_s": pool(r.get("runs", [])),
                "turns_per_run": r["runs"][0].get("turns") if r.get("runs") else None,
                # per CPU-second of the process: what a busy machine (a neighbour taking part of the core) moves less
                "runs_steps_per_cpu_s": [x["steps_per_s"] / x["cpu_share"] if x.get("steps_per_s") and x.get("cpu_share")
                                         else None for x in r.get("runs", [])]}

    def pooled_by_pair(r: dict) -> dict[int, float]:
        """Each process pair's rounds, pooled."""
        runs = [x for x in r.get("runs", []) if x.get("loop_s")]
        return {p: pool([x for x in runs if x.get("pair", 0) == p]) for p in {x.get("pair", 0) for x in runs}}

    out = {}
    for lf, theirs in results.items():
        if theirs.get("kind") != "llamafactory" or theirs.get("status") != "ok":
            continue
        for name in theirs.get("same_work_as", []):
            ours = results.get(name) or {}
            if ours.get("status") != "ok":
                continue
            a, b = side(ours), side(theirs)
            interleaved = lf in ours.get("interleaved_with", [])
            paired = [x / y for x, y in zip(a["runs_steps_per_s"], b["runs_steps_per_s"]) if x and y] \
                if interleaved else []
            per_cpu = [x / y for x, y in zip(a["runs_steps_per_cpu_s"], b["runs_steps_per_cpu_s"]) if x and y] \
                if interleaved else []
            medians_ratio = a["steps_per_s"] / b["steps_per_s"] if a["steps_per_s"] and b["steps_per_s"] else None
            pooled = a["pooled_steps_per_s"] / b["pooled_steps_per_s"] \
                if interleaved and a["pooled_steps_per_s"] and b["pooled_steps_per_s"] else None
            ours_pairs, theirs_pairs = pooled_by_pair(ours), pooled_by_pair(theirs)
            by_pair = [ours_pairs[p] / theirs_pairs[p] for p in sorted(ours_pairs) if p in theirs_pairs] \
                if interleaved else []
            out[name] = {"llamafactory": lf, "interleaved": interleaved, "rounds": len(paired),
                         "process_pairs": len(by_pair), "by_pair": by_pair,
                         "pair_min": min(by_pair, default=None), "pair_max": max(by_pair, default=None),
                         "ratio": pooled if pooled else medians_ratio, "ratio_of_medians": medians_ratio,
                         "paired_median": statistics.median(paired) if paired else None,
                         "paired_min": min(paired, default=None), "paired_max": max(paired, default=None),
                         "paired": paired, "ratio_per_cpu_s": statistics.median(per_cpu) if per_cpu else None,
                         "paired_per_cpu_s": per_cpu, "ours": a, "theirs": b}
    return out


def versus_table(rows: dict) -> list[str]:
    """The per-stage comparison the README shows: steps/s, real tokens/s, peak RSS, ratio with its spread."""
    if not rows:
        return []
    head = ["stage", "alignpipe steps/s", "LLaMA-Factory steps/s", "ratio", "process pairs: min..max",
            "rounds: min..max", "median", "pairs x rounds x turns",
            "real tokens/s (ours / theirs)", "real tokens/step", "peak RSS MB", "cpu"]
    lines = [head]
    for name, v in rows.items():
        a, b = v["ours"], v["theirs"]
        pairs = v.get("process_pairs") or 1
        lines.append([name, fmt(a["steps_per_s"]), fmt(b["steps_per_s"]), fmt(v["ratio"], 3),
                      f"{fmt(v.get('pair_min'), 3)}..{fmt(v.get('pair_max'), 3)}",
                      f"{fmt(v['paired_min'], 3)}..{fmt(v['paired_max'], 3)}", fmt(v["paired_median"], 3),
                      f"{pairs} x {v['rounds'] // pairs} x {a['turns_per_run'] or '-'}",
                      f"{fmt(a['real_tokens_per_s'])} / {fmt(b['real_tokens_per_s'])}",
                      f"{fmt(a['real_tokens_per_step'])} / {fmt(b['real_tokens_per_step'])}",
                      f"{fmt(a['peak_rss_mb'], 4)} / {fmt(b['peak_rss_mb'], 4)}",
                      f"{fmt(a['cpu_share'], 2)} / {fmt(b['cpu_share'], 2)}"])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return ["", "alignpipe vs LLaMA-Factory on the same work, this run (steps/s: medians over rounds; ratio: "
                "all rounds' steps/s, ours over theirs, their training loops taking turns every few steps; then "
                "the same for each fresh pair of worker processes, and each round's ratio):", *out]


def same_work(results: dict[str, dict], m, ratio) -> dict:
    """Ours / LLaMA-Factory run here on the same model, data and settings: steps/s (training loop only, both
    measured by worker.py's probe), the trainer's own steps/s (its `train()` set-up included), tokens per step
    (padding included, and without it) to check the work is the same, and process start -> first step."""

    def per_step(name, share=False):
        tokens, steps = m(name, "tokens"), m(name, "steps")
        if share:
            tokens = tokens * m(name, "real_share") if tokens and m(name, "real_share") is not None else None
        return tokens / steps if tokens and steps else None

    def startup(name):
        return (results[name].get("warmup") or {}).get("startup_s")

    out = {}
    for lf, r in results.items():
        if r.get("kind") != "llamafactory" or r.get("status") != "ok":
            continue
        for ours in r.get("same_work_as", []):
            if (results.get(ours) or {}).get("status") != "ok":
                continue
            row = {}
            for key, get in (("steps_per_s", lambda n: m(n, "steps_per_s")),
                             ("trainer_steps_per_s", lambda n: m(n, "trainer_steps_per_s")),
                             ("tokens_per_step", per_step), ("real_tokens_per_step", lambda n: per_step(n, True)),
                             ("startup_s", startup)):
                row[key] = {"ours": get(ours), "llamafactory": get(lf), "ratio": ratio(get(ours), get(lf))}
            out[f"{ours}/{lf}"] = row
    return out


# --- the table -----------------------------------------------------------------------------------------


def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1e9:
            return f"{v / 1e9:.1f}G"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


COLUMNS = ("contestant", "thr", "cpu", "fwd+bwd", "steps/s", "samples/s", "tokens/s", "real", "MFU", "MFU/cpu",
           "setup_s", "startup_s", "rss_MB", "LF reported", "ratio", "note")


def table_row(name: str, r: dict, derived: dict) -> dict:
    """One contestant's cells, by column name."""
    med = r.get("median") or {}
    cells = {"contestant": name, "thr": str(r.get("threads", "")), "rss_MB": fmt(r.get("peak_rss_mb"), 4),
             "cpu": f"{med['cpu_share']:.0%}" if med.get("cpu_share") is not None else "-"}
    if r.get("status") != "ok":
        return {**cells, "steps/s": r.get("status", "?"), "note": r.get("error", "")[:80]}
    if r["kind"] == "matmul":
        return {**cells, "note": f"{fmt(med.get('flops_per_s'))}FLOP/s fp32 matmul"}
    vs = derived["vs_llamafactory"].get(name, {})
    ref = vs.get("samples_per_s") or vs.get("steps_per_s") or {}
    note = r.get("note", "")
    if "split_share" in med:
        sh = med["split_share"]
        note += (f"; update {med['update_s']:.3f}s = gen {sh['gen']:.0%} score {sh['score']:.0%} "
                 f"fwd {sh['forward']:.0%} train {sh['train']:.0%}; {fmt(med['generated_tokens_per_s'])} gen tok/s")
    return {**cells, "steps/s": fmt(med.get("steps_per_s_wall") or med.get("steps_per_s")),
            "samples/s": fmt(med.get("samples_per_s_wall") or med.get("samples_per_s")),
            "tokens/s": fmt(med.get("tokens_per_s")), "real": fmt(med.get("real_share"), 2),
            "fwd+bwd": f"{med['fwd_bwd_share']:.0%}" if med.get("fwd_bwd_share") is not None else "-",
            "MFU": fmt(med.get("mfu"), 2), "MFU/cpu": fmt(med.get("mfu_cpu"), 2), "setup_s": fmt(med.get("setup_s"), 2),
            "startup_s": fmt((r.get("warmup") or {}).get("startup_s"), 2),
            "LF reported": fmt(ref.get("llamafactory")), "ratio": fmt(ref.get("ratio"), 3), "note": note}


def table(results: dict[str, dict], derived: dict) -> str:
    head = list(COLUMNS)
    rows = [head] + [[table_row(n, r, derived).get(c, "") for c in head] for n, r in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    d = derived
    lines += ["", "ratios:"]
    pairs = [
        ("SFT alignpipe / raw loop, real tokens/s, 1 thread", d["sft_vs_raw_tokens_per_s_1t"]),
        ("SFT alignpipe / raw loop, real tokens per CPU-second, 1 thread", d["sft_vs_raw_tokens_per_cpu_s_1t"]),
        ("SFT alignpipe / raw loop, real tokens/s, 2 threads", d["sft_vs_raw_tokens_per_s_2t"]),
        ("SFT alignpipe / raw loop, real tokens/s, peer model", d["sft_vs_raw_tokens_per_s_peer"]),
        ("SFT 2 threads / 1 thread", d["sft_2t_vs_1t"]),
        ("packing on / off, real tokens/s", d["packing_real_tokens_per_s_on_vs_off"]),
        ("real-token share, packing on / off", "{} / {}".format(fmt(d["packing_real_share"]["on"]),
                                                                fmt(d["packing_real_share"]["off"]))),
        ("DPO precomputed ref / live ref, pairs/s", d["dpo_precomputed_vs_live_ref_pairs_per_s"]),
        ("DPO set-up s before the first step, precomputed / live ref", "{} / {}".format(
            fmt(d["dpo_setup_s"]["precomputed"]), fmt(d["dpo_setup_s"]["live_ref"]))),
        ("PPO generated tokens/s, KV cache / none", d["ppo_kv_cache_vs_none_generated_tokens_per_s"]),
        ("PPO update time, no cache / KV cache", d["ppo_kv_cache_vs_none_update_time"]),
        ("matmul limit FLOP/s, 1 / 2 threads", "{} / {}".format(fmt(d["matmul_flops_per_s"].get("1t")),
                                                               fmt(d["matmul_flops_per_s"].get("2t")))),
    ]
    lines += [f"  {k}: {fmt(v)}" for k, v in pairs]
    if d.get("vs_llamafactory_same_work"):
        lines += ["", "same work, LLaMA-Factory run here (ours / LLaMA-Factory = ratio):"]
        for pair, row in d["vs_llamafactory_same_work"].items():
            cells = [f"{label} {fmt(row[key]['ours'])} / {fmt(row[key]['llamafactory'])}"
                     + (f" = {fmt(row[key]['ratio'])}" if key == "steps_per_s" else "")
                     for key, label in (("steps_per_s", "steps/s"), ("tokens_per_step", "tokens/step"),
                                        ("real_tokens_per_step", "real"), ("startup_s", "startup s"))]
            lines.append(f"  {pair}: " + "; ".join(cells))
    lines += versus_table(d.get("versus_llamafactory") or {})
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: plumbing check only")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per contestant (default 3; --quick 1)")
    p.add_argument("--only", default=None, help="comma-separated contestant names")
    p.add_argument("--out", default=str(RESULTS / "results.json"))
    p.add_argument("--workdir", default=None, help="keep recipes, runs and logs here (default: a temp folder)")
    p.add_argument("--lf-venv", default=None, help="LLaMA-Factory's venv (default: $LLAMAFACTORY_VENV or "
                   ".venv-llamafactory, built by `make bench-peers`); without one the lf_* contestants are missing")
    p.add_argument("--budget", type=int, default=None, help="seconds after which waiting contestants are skipped")
    args = p.parse_args(argv)

    settings = Settings.quick() if args.quick else Settings()
    if args.repeats is not None:
        settings.repeats = args.repeats
    if args.budget is not None:
        settings.budget_s = args.budget
    if args.lf_venv is not None:
        settings.lf_venv = str(Path(args.lf_venv).resolve())
    contestants = plan(settings)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in contestants}
        if unknown:
            p.error(f"unknown contestant(s) {sorted(unknown)}; choose from {[c.name for c in contestants]}")
        contestants = [c for c in contestants if c.name in wanted]

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="alignpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    kinds = available_kinds()
    started = time.time()
    load_before = os.getloadavg()
    log(f"work folder {work}; stage kinds here: {', '.join(sorted(kinds))}; load {load_before[0]:.2f}")
    recipes = write_recipes(settings, work, kinds)
    needed = {c.recipe for c in contestants if c.recipe}
    prep = prepare({k: v for k, v in recipes.items() if k in needed}, work, settings.timeout_s)

    results: dict[str, dict] = {}
    groups = versus_groups(contestants, settings)
    grouped = {c.name for g in groups for c in g}
    for c in contestants:
        if c.name in results:  # ran with the groups
            continue
        t = time.perf_counter()
        if time.time() - started > settings.budget_s:
            results[c.name] = {"kind": c.kind, "threads": c.threads, "status": "skipped",
                               "error": f"time budget of {settings.budget_s}s spent (busy machine?)"}
            log(f"{c.name}: skipped, over the time budget")
            continue
        ran = run_interleaved(groups, settings, recipes, work, kinds) if c.name in grouped else \
            {c.name: run_contestant(c, settings, recipes, work, kinds)}
        results.update(ran)
        log(f"{', '.join(ran)}: {', '.join(r['status'] for r in ran.values())} in {time.perf_counter() - t:.1f}s "
            f"(load {os.getloadavg()[0]:.2f})")
    results = {c.name: results[c.name] for c in contestants}  # in the plan's order
    derived = derive(results)

    import torch

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "load_before": load_before, "load_after": os.getloadavg(),
                    "glibc_tunables": child_env(1)["GLIBC_TUNABLES"]},
        "settings": {**asdict(settings), "quick": args.quick},
        "stage_kinds": sorted(kinds),
        "prepare_s": prep,
        "total_s": time.time() - started,
        "contestants": results,
        "derived": derived,
        "reference_llamafactory": {"figures": REFERENCE, "startup_s": REFERENCE_STARTUP_S},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(table(results, derived))
    print(f"\n{len(results)} contestants in {report['total_s']:.0f}s; load {load_before[0]:.2f} -> "
          f"{report['machine']['load_after'][0]:.2f}; results: {args.out}")
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    if failed:
        log(f"failed: {', '.join(failed)}; logs kept in {work}")
    elif not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
