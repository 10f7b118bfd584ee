"""One contestant, in its own process: `python -m benchmarks.worker SPEC.json` (from the repository root).

A stage contestant calls `alignpipe run RECIPE --stages STAGE --force` in-process, as the CLI does,
once as a warm-up and then `repeats` times; the spec's result file gets one row of figures per run.
The stage code is untouched: a probe wraps `Trainer.train` / `Trainer.training_step` (step times,
tokens, a step-end callback) and `generate` (rollout timing; `no_kv_cache` turns the cache off),
and PPO's own per-update time split is read back from its `train_log.jsonl`.

Only the training loop counts for steps/s: from the first step's start to the last step's end.
Process startup (interpreter, imports, data, model) is reported beside it as `startup_s`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.process import T_START, peak_rss_mb, pin, sync

def batch_rows(inputs) -> list[list[list[int]]]:
    """A batch's rows as [input_ids, labels] lists: split at each pad of a padded batch, or at each restart of
    the positions of a padding-free one (whose labels carry -100 at a sequence's first token: never predicted)."""
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"].bool()
        return [[ids[m].tolist(), lab[m].tolist()] for ids, lab, m in zip(inputs["input_ids"], inputs["labels"], mask)]
    starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [inputs["input_ids"].shape[1]]
    ids, labels = inputs["input_ids"][0].tolist(), inputs["labels"][0].tolist()
    return [[ids[a:b], labels[a:b]] for a, b in zip(starts, starts[1:]) if b > a]


class Turns:
    """Taking turns with other workers inside a timed run (the parent passes the turn): at the first step and
    after every `steps` steps this worker writes a line on the reply pipe ("loop" before its first step,
    "turn" later, "done" when its training loop has returned) and waits for the parent's next line on stdin.
    So two contestants' steps alternate every few steps, and a change in the machine's speed that lasts
    longer than a turn falls on both alike."""

    def __init__(self, steps: int, reply) -> None:
        self.steps, self.reply = steps, reply

    def hand_over(self, what: str) -> None:
        self.reply.write(what + "\n")
        self.reply.flush()
        if not sys.stdin.readline().strip():
            raise SystemExit("the bench parent ended the run in the middle of a turn")


class Probe:
    """Step and generation timings of whatever trainer runs in this process."""

    def __init__(self) -> None:
        self.turns: Turns | None = None  # set by `repeat` for the timed runs the parent interleaves by turns
        self.reset()

    def reset(self, record: bool = False) -> None:
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.cpu: list[float] = []  # process CPU time at the first step's start and at each step's end
        self.first_begin_wall: float | None = None
        self.tokens = self.real_tokens = self.label_tokens = 0
        self.batch_size = self.params = self.trainable = None
        self.first_loss: float | None = None
        self.in_step = 0.0  # seconds inside `training_step` (forward + backward); the optimiser and overhead are not
        self.generate_calls: list[tuple[float, float]] = []
        self.batches: list | None = [] if record else None
        self.paused = 0.0  # seconds waiting for our turn inside the loop: not part of it
        self.waited_before = self.waited_after = 0.0  # waiting for the others' set-up, and for our turn to finish
        self.turn_s: list[float] = []  # each turn's seconds of steps (turns: every `turns.steps` steps)
        self.turn_began: float | None = None

    # --- trainer hooks
    def on_train(self, trainer) -> None:
        a = trainer.args
        self.batch_size = a.per_device_train_batch_size * a.gradient_accumulation_steps
        self.params = sum(p.numel() for p in trainer.model.parameters())
        self.trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    def on_step_begin(self, inputs) -> None:
        import torch

        sync()
        if self.turns is not None and len(self.begins) % self.turns.steps == 0:
            t = time.perf_counter()
            if self.turn_began is not None:
                self.turn_s.append(t - self.turn_began)
            self.turns.hand_over("turn" if self.begins else "loop")
            self.turn_began = time.perf_counter()
            if self.begins:
                self.paused += self.turn_began - t
            else:
                self.waited_before = self.turn_began - t
        self.begins.append(time.perf_counter())
        if self.first_begin_wall is None:
            self.first_begin_wall = time.time()
            self.cpu.append(time.process_time())
        if not hasattr(inputs, "items"):  # GRPO / RLOO steps get the prompt rows: their tokens are made inside
            return
        for key, ids in inputs.items():
            if not (key.endswith("input_ids") and torch.is_tensor(ids)):
                continue
            mask = inputs.get(key.replace("input_ids", "attention_mask"))
            self.tokens += ids.numel()
            # padding-free / packed batches carry position_ids instead of a mask: every token is real
            self.real_tokens += int(mask.sum()) if mask is not None else ids.numel()
        labels = inputs.get("labels")
        if labels is not None:
            self.label_tokens += int((labels != -100).sum())
        if self.batches is not None:  # the raw loop replays these exact rows
            self.batches.append(batch_rows(inputs))

    def on_step_loss(self, loss) -> None:
        if self.first_loss is None:
            self.first_loss = float(loss)

    def on_step_end(self) -> None:
        sync()
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def install(self, no_kv_cache: bool = False) -> None:
        from transformers import Trainer, TrainerCallback
        from transformers.generation.utils import GenerationMixin

        probe = self

        class StepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                probe.on_step_end()

        train, training_step, generate = Trainer.train, Trainer.training_step, GenerationMixin.generate

        def probed_train(trainer, *args, **kwargs):
            probe.on_train(trainer)
            trainer.add_callback(StepEnd())
            out = train(trainer, *args, **kwargs)
            if probe.turns is not None and probe.ends:  # the loop is over: the rest of the run waits its turn too
                probe.turn_s.append(probe.ends[-1] - probe.turn_began)
                t = time.perf_counter()
                probe.turns.hand_over("done")
                probe.waited_after = time.perf_counter() - t
            return out

        def probed_training_step(trainer, model, inputs, *args, **kwargs):
            probe.on_step_begin(inputs)
            t = time.perf_counter()
            loss = training_step(trainer, model, inputs, *args, **kwargs)
            sync()
            probe.in_step += time.perf_counter() - t
            probe.on_step_loss(loss)
            return loss

        def probed_generate(model, *args, **kwargs):
            if no_kv_cache:
                kwargs["use_cache"] = False
            t, cpu = time.perf_counter(), time.process_time()
            if probe.first_begin_wall is None:
                probe.first_begin_wall = time.time()
            out = generate(model, *args, **kwargs)
            probe.generate_calls.append((t, cpu))
            return out

        Trainer.train, Trainer.training_step, GenerationMixin.generate = (probed_train, probed_training_step,
                                                                         probed_generate)

    # --- figures of one run
    def summary(self, t_call: float, t_return: float) -> dict:
        waited = self.waited_before + self.paused + self.waited_after  # taking turns: the others' time
        out = {"total_s": t_return - t_call - waited}
        if not self.ends:
            return out
        loop = self.ends[-1] - self.begins[0] - self.paused
        steps = len(self.ends)
        if self.turn_s:
            out.update(turns=len(self.turn_s), turn_s=self.turn_s)
        out.update(
            steps=steps, loop_s=loop, cpu_share=(self.cpu[-1] - self.cpu[0]) / loop, fwd_bwd_share=self.in_step / loop,
            setup_s=self.begins[0] - t_call - self.waited_before, after_s=t_return - self.ends[-1] - self.waited_after,
            steps_per_s=steps / loop, samples_per_s=steps * self.batch_size / loop,
            tokens=self.tokens, tokens_per_s=self.tokens / loop, real_tokens_per_s=self.real_tokens / loop,
            real_share=self.real_tokens / self.tokens if self.tokens else None,
            label_tokens=self.label_tokens, params=self.params, trainable_params=self.trainable,
            model_flops_per_s=6 * self.params * self.tokens / loop, first_loss=self.first_loss,
            gflop_per_step=6e-9 * self.params * self.tokens / steps,
        )
        return out


def ppo_summary(stage_dir: Path, probe: Probe) -> dict:
    """PPO's per-update split (generation / scoring / no-grad forwards / training) from its train log."""
    rows = [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    parts = ("time_gen", "time_score", "time_forward", "time_train")
    totals = {p: sum(r.get(p, 0.0) for r in rows) for p in parts}
    update_s = sum(totals.values())
    samples = sum(r["samples"] for r in rows)
    generated = sum(r["response_length"] * r["samples"] for r in rows)
    out = {
        "steps": len(rows), "loop_s": update_s, "steps_per_s": len(rows) / update_s,
        "samples_per_s": samples / update_s, "update_s": update_s / len(rows),
        "split_s": {p.removeprefix("time_"): totals[p] / len(rows) for p in parts},
        "split_share": {p.removeprefix("time_"): totals[p] / update_s for p in parts},
        "generated_tokens": generated, "generated_tokens_per_s": generated / totals["time_gen"],
        "response_length": generated / samples,
    }
    calls = probe.generate_calls
    if len(calls) == len(rows) >= 2:
        # wall clock between the first and the last rollout: every update's logging and checkpoints included
        wall = calls[-1][0] - calls[0][0]
        out["cpu_share"] = (calls[-1][1] - calls[0][1]) / wall
        out["steps_per_s_wall"] = (len(calls) - 1) / wall
        out["samples_per_s_wall"] = (len(calls) - 1) * samples / len(rows) / wall
    return out


def run_stage(spec: dict) -> dict:
    import torch  # noqa: F401 - imported before the baseline RSS is read
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from alignpipe.cli import main as alignpipe

    rss_imports = peak_rss_mb()
    probe = Probe()
    probe.install(no_kv_cache=spec["options"].get("no_kv_cache", False))
    stage_dir = Path(spec["stage_dir"])
    record = spec["options"].get("record_batches")

    def run_once(i: int) -> dict:
        probe.reset(record=bool(record) and i == min(1, spec["repeats"]))  # a full-length run
        # a long stage warms up on a short run of itself: same code paths, less time
        steps_key = "total_updates" if spec["stage_kind"] == "ppo" else "max_steps"
        warm = [] if i or not spec["warmup_steps"] else ["--set", f"stages.{spec['stage']}.trainer.{steps_key}="
                                                          f"{spec['warmup_steps']}"]
        t_call = time.perf_counter()
        rc = alignpipe(["run", spec["recipe_path"], "--stages", spec["stage"], "--force", *warm])
        t_return = time.perf_counter()
        if rc != 0:
            raise SystemExit(f"alignpipe run exited with {rc}")
        row = probe.summary(t_call, t_return)
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        # the trainer's own figure (train_runtime includes its set-up inside `train()`): what peers report
        row["trainer_steps_per_s"] = (manifest.get("metrics") or {}).get("train_steps_per_s")
        row["torch_threads"] = (manifest.get("metrics") or {}).get("torch_threads")  # what the stage trained on
        if spec["stage_kind"] == "ppo":
            row.update(ppo_summary(stage_dir, probe))
            if probe.generate_calls:
                row["setup_s"] = probe.generate_calls[0][0] - t_call
        if i == 0:  # process start to the first training step (or rollout)
            row["startup_s"] = probe.first_begin_wall - T_START if probe.first_begin_wall else None
        if probe.batches is not None:
            Path(spec["work"], record).write_text(json.dumps(probe.batches))
        return row

    runs = repeat(run_once, spec, probe)
    return {"warmup": runs[0], "runs": runs[1:], "rss_after_imports_mb": rss_imports}


def repeat(run_once, spec: dict, probe: Probe | None = None) -> list[dict]:
    """The warm-up run, then the timed ones: `repeats` in a row, or, when the parent interleaves this contestant
    with others (a `reply_fd` in the spec), one each time it writes a line to our stdin; each timed run's row
    goes back on that pipe as one JSON line, and stdin's end ends the runs. With `turn_steps` in the spec, a
    timed run's loop also takes turns with the others' (Turns)."""
    def timed(i: int) -> dict:
        started = time.time()
        # wall clock: shows the interleaving in results.json; the process: which worker process ran it
        return {**run_once(i), "started_at": started, "pid": os.getpid()}

    runs = [timed(0)]
    if spec.get("reply_fd") is None:
        return runs + [timed(i) for i in range(1, 1 + spec["repeats"])]
    with os.fdopen(spec["reply_fd"], "w", buffering=1) as reply:
        reply.write("ready\n")
        turns = Turns(spec["turn_steps"], reply) if probe is not None and spec.get("turn_steps") else None
        for line in sys.stdin:
            if not line.strip():
                break
            if turns is not None:
                probe.turns = turns  # after the warm-up: only timed runs take turns
            runs.append(timed(len(runs)))
            reply.write(json.dumps(runs[-1], default=str) + "\n")
    return runs


def matmul(spec: dict) -> dict:
    """The machine's matmul rate (fp32 on CPU, bf16 on a GPU): the median of 5 timings per size, the
    best size wins."""
    import torch

    gpu = torch.cuda.is_available()
    kw = {"device": "cuda", "dtype": torch.bfloat16} if gpu else {}
    sizes = (4096, 8192) if gpu else spec["matmul_sizes"]
    work = 1e12 if gpu else 1e9  # FLOP per timing
    per_size, shares = {}, []
    for n in sizes:
        a, b, c = torch.randn(n, n, **kw), torch.randn(n, n, **kw), torch.empty(n, n, **kw)
        reps = max(1, int(work // (2 * n**3)))
        for _ in range(2):
            torch.mm(a, b, out=c)
        times, cpu = [], time.process_time()
        for _ in range(5):
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            sync()
            times.append((time.perf_counter() - t) / reps)
        per_size[str(n)] = 2 * n**3 / statistics.median(times)
        shares.append((time.process_time() - cpu) / (sum(times) * reps))
    best = max(per_size.values())
    return {"warmup": {}, "runs": [{"flops_per_s": best, "per_size": per_size, "cpu_share": min(shares)}]}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    pin(spec)
    if spec["kind"] == "matmul":
        result = matmul(spec)
    elif spec["kind"] == "raw_sft":
        from benchmarks import raw_loop

        result = raw_loop.run(spec)
    else:
        result = run_stage(spec)
    result["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["torch_threads"] = torch.get_num_threads()
    Path(spec["out"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
