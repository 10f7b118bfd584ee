"""`make bench`'s plumbing on tiny settings (behaviour, not speed): contestants run in their own
processes, the raw loop replays exactly the batches alignpipe's SFT trained on, packing removes
padding, PPO's time split is read back, and the figures are aggregated into ratios and a table.
LLaMA-Factory itself is not needed: its contestants are missing without its venv, and the data and
configs they would get are checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import contestants, worker
from benchmarks import lf_contestant as lf_bench
from benchmarks import run as bench
from conftest import REPO

QUICK = contestants.Settings.quick()


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def report(bench_dir):
    tmp = bench_dir
    out = tmp / "results.json"
    only = "matmul_1t,sft_1t,raw_sft_1t,sft_packed_1t,ppo,sft_2t"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", only,
                           "--workdir", str(tmp / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_stage_contestants_time_the_configured_steps(report):
    data, _ = report
    c = data["contestants"]
    assert [n for n, r in c.items() if r["status"] != "ok"] == []
    sft = c["sft_1t"]
    # one short warm-up run, then the timed repeats, each exactly max_steps long
    assert sft["warmup"]["steps"] == QUICK.compute_warmup_steps
    assert [r["steps"] for r in sft["runs"]] == [QUICK.compute_steps] * QUICK.repeats
    med = sft["median"]
    assert med["loop_s"] > 0 and med["steps_per_s"] == pytest.approx(QUICK.compute_steps / med["loop_s"])  # 1 repeat
    assert med["samples_per_s"] == pytest.approx(med["steps_per_s"] * QUICK.compute_batch)
    assert 0 < med["setup_s"] < sft["warmup"]["startup_s"]  # startup also pays the interpreter and imports
    assert sft["peak_rss_mb"] >= sft["rss_after_imports_mb"] > 50
    assert 0 < med["mfu"] < 5  # against the matmul limit measured in the same run
    # a contestant's threads are the ones its stage trained on (ALIGNPIPE_THREADS set for it, no probe)
    assert [r["torch_threads"] for r in sft["runs"] + c["sft_2t"]["runs"]] == [1] * QUICK.repeats + [2] * QUICK.repeats


@pytest.mark.slow
def test_raw_loop_replays_the_same_batches(report):
    data, _ = report
    sft, raw = data["contestants"]["sft_1t"]["median"], data["contestants"]["raw_sft_1t"]["median"]
    assert raw["steps"] == sft["steps"] and raw["params"] == sft["params"]
    # the same real tokens (the raw loop pads them; alignpipe's padding-free batches have no pad)
    assert raw["tokens"] * raw["real_share"] == pytest.approx(sft["tokens"] * sft["real_share"])
    # same weights, same first batch: the same loss, computed by TRL's fused head and by plain cross-entropy
    assert raw["first_loss"] == pytest.approx(sft["first_loss"], rel=1e-4)
    assert data["derived"]["sft_vs_raw_tokens_per_s_1t"] == pytest.approx(sft["real_tokens_per_s"] /
                                                                          raw["real_tokens_per_s"])


@pytest.mark.slow
def test_packing_removes_padding(report):
    data, _ = report
    shares = data["derived"]["packing_real_share"]
    # off: the sft stage's own batching, padding-free where it pays (alignpipe.runtime.padding_free), so at most all real
    assert shares["on"] == 1.0 and 0 < shares["off"] <= 1.0
    assert data["derived"]["packing_real_tokens_per_s_on_vs_off"] > 0


@pytest.mark.slow
def test_ppo_split_and_peer_comparison(report):
    data, printed = report
    assert "ppo" in data["stage_kinds"]  # a missing stage fails here, it does not skip
    ppo = data["contestants"]["ppo"]
    assert [r["steps"] for r in ppo["runs"]] == [QUICK.ppo_updates]
    med = ppo["median"]
    assert set(med["split_share"]) == {"gen", "score", "forward", "train"}
    assert sum(med["split_share"].values()) == pytest.approx(1.0)
    assert 0 < med["response_length"] <= QUICK.ppo_new_tokens
    assert med["generated_tokens_per_s"] > 0
    # the comparison is our measured figure (over the whole run when it was timed so) over the peer's recorded one
    vs = data["derived"]["vs_llamafactory"]["ppo"]["samples_per_s"]
    assert vs["ours"] == pytest.approx(med.get("samples_per_s_wall") or med["samples_per_s"])
    assert vs["llamafactory"] == data["reference_llamafactory"]["figures"]["ppo"]["samples_per_s"]
    assert vs["ratio"] == pytest.approx(vs["ours"] / vs["llamafactory"])
    for name in ("sft_1t", "raw_sft_1t", "ppo", "ratios:"):
        assert name in printed


def test_missing_stage_kind_is_reported_not_run(tmp_path):
    settings = contestants.Settings.quick()
    kinds = {"pretrain", "sft"}
    recipes = bench.write_recipes(settings, tmp_path, kinds)
    assert {s["kind"] for s in recipes["peer"]["stages"].values()} == {"pretrain", "sft"}
    dpo = next(c for c in contestants.plan(settings) if c.name == "dpo_full")
    result = bench.run_contestant(dpo, settings, recipes, tmp_path, kinds)
    assert result["status"] == "missing"


def test_ppo_summary_from_train_log(tmp_path):
    rows = [{"update": u, "time_gen": 0.2, "time_score": 0.1, "time_forward": 0.1, "time_train": 0.6,
             "samples": 8, "response_length": 12.0} for u in (1, 2)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = worker.ppo_summary(tmp_path, worker.Probe())
    assert out["update_s"] == pytest.approx(1.0) and out["steps_per_s"] == pytest.approx(1.0)
    assert out["samples_per_s"] == pytest.approx(8.0)
    assert out["split_share"]["train"] == pytest.approx(0.6)
    assert out["generated_tokens_per_s"] == pytest.approx(2 * 8 * 12 / 0.4)


def test_llamafactory_contestants_missing_without_their_venv(tmp_path):
    settings = replace(QUICK, lf_venv=str(tmp_path / "no-venv"))
    recipes = bench.write_recipes(settings, tmp_path, contestants.available_kinds())
    lf = [c for c in contestants.plan(settings) if c.kind == "llamafactory"]
    assert {c.name for c in lf} == {"lf_sft_full", "lf_sft_lora", "lf_reward_lora", "lf_dpo_full", "lf_dpo_lora"}
    result = bench.run_contestant(lf[0], settings, recipes, tmp_path, contestants.available_kinds())
    assert result["status"] == "missing" and "bench-peers" in result["error"]


@pytest.mark.slow
def test_llamafactory_gets_our_data_and_settings(report, bench_dir):
    """The exported rows are the embedded world's, and each config carries the peer stage's work."""
    import yaml

    recipe = yaml.safe_load((bench_dir / "work" / "peer.yaml").read_text())
    data = bench_dir / "lf_data"
    model_dir = bench_dir / "work" / "runs" / "peer" / "pretrain" / "model"
    counts = lf_bench.export_data(recipe, data, QUICK.peer_cutoff, model_dir)
    info = json.loads((data / "dataset_info.json").read_text())
    assert counts["alignpipe_sft"] == QUICK.world["n_sft"] and counts["alignpipe_pairs"] == QUICK.world["n_pairs"]
    assert 0 < counts["alignpipe_pairs_rm"] <= counts["alignpipe_pairs"]  # our reward stage's filter
    assert info["alignpipe_pairs"]["ranking"] and not info["alignpipe_sft"]["ranking"]
    pair = json.loads((data / "alignpipe_pairs.json").read_text())[0]
    assert pair["messages"][-1]["role"] == "user" and pair["chosen"]["role"] == "assistant"
    for c in contestants.plan(QUICK):
        if c.kind != "llamafactory" or c.stage not in recipe["stages"]:
            continue
        args = lf_bench.lf_config(recipe, c.stage, data, bench_dir / c.name)
        stage = recipe["stages"][c.stage]
        assert args["stage"] == {"sft": "sft", "reward": "rm", "dpo": "dpo"}[stage["kind"]]
        assert (args["cutoff_len"], args["per_device_train_batch_size"], args["max_steps"]) == (
            QUICK.peer_cutoff, QUICK.peer_batch, QUICK.peer_steps[stage["kind"]])
        assert Path(args["model_name_or_path"]).parent.name == stage["from"]
        assert args["finetuning_type"] == ("lora" if "lora" in c.name else "full")
        assert "template" not in args  # parsed from our tokenizer's chat template
        if "lora" in c.name:
            assert (args["lora_rank"], args["lora_alpha"]) == (8, 16)


def test_same_work_ratios():
    def ok(steps_per_s, tokens, kind="stage", **extra):
        return {"status": "ok", "kind": kind, "warmup": {"startup_s": 5.0}, **extra,
                "median": {"steps_per_s": steps_per_s, "tokens": tokens, "steps": 40, "real_share": 0.5}}

    results = {"sft_full": ok(20.0, 40 * 480), "dpo_full": ok(10.0, 40 * 900),
               "lf_sft_full": ok(16.0, 40 * 496, kind="llamafactory", same_work_as=["sft_full"]),
               "lf_dpo_full": ok(8.0, 40 * 960, kind="llamafactory", same_work_as=["dpo_full", "dpo_full_live_ref"])}
    same = bench.derive(results)["vs_llamafactory_same_work"]
    assert set(same) == {"sft_full/lf_sft_full", "dpo_full/lf_dpo_full"}  # live ref did not run: no row
    row = same["sft_full/lf_sft_full"]
    assert row["steps_per_s"]["ratio"] == pytest.approx(1.25)
    assert row["tokens_per_step"] == {"ours": 480, "llamafactory": 496, "ratio": pytest.approx(480 / 496)}
    assert row["real_tokens_per_step"]["ours"] == 240
    assert "same work, LLaMA-Factory" in bench.table(results, bench.derive(results))


@pytest.mark.slow
def test_contestants_on_the_same_work_run_interleaved(report, bench_dir):
    """Workers kept alive side by side on one CPU: warm-ups first, then the rounds go round the groups (round 1
    of each group, then round 2 of each), and in a group's round its training loops take turns every
    `versus_turn_steps` steps (a, b, a, b, ...), the waiting not counted as loop time."""
    import yaml

    work = bench_dir / "work"
    recipes = {"peer": yaml.safe_load((work / "peer.yaml").read_text())}
    plan = {c.name: c for c in contestants.plan(QUICK)}
    groups = [[plan["sft_full"], plan["sft_lora"]], [plan["reward_lora"]]]
    results = bench.run_interleaved(groups, QUICK, recipes, work, contestants.available_kinds())
    assert [r["status"] for r in results.values()] == ["ok", "ok", "ok"], results
    assert results["sft_full"]["interleaved_with"] == ["sft_lora"]
    assert results["reward_lora"]["interleaved_with"] == []
    starts = sorted((run["started_at"], name) for name, r in results.items() for run in r["runs"])
    assert [name for _, name in starts] == ["sft_full", "sft_lora", "reward_lora"] * QUICK.versus_repeats
    for r in results.values():  # the rounds were shared out over fresh worker processes, one pair after the other
        assert [run["pair"] for run in r["runs"]] == list(range(QUICK.versus_process_pairs))
        assert len({run["pid"] for run in r["runs"]}) == QUICK.versus_process_pairs == r["process_pairs"]
        assert len(r["warmups"]) == QUICK.versus_process_pairs
    results.pop("reward_lora")
    steps, k = QUICK.peer_steps["sft"], QUICK.versus_turn_steps
    assert steps > k  # so there are turns to take
    for name, r in results.items():
        assert [run["steps"] for run in r["runs"]] == [steps] * QUICK.versus_repeats
        assert r["warmup"]["started_at"] < min(run["started_at"] for run in results["sft_full"]["runs"])
        assert "turns" not in r["warmup"]
        for run in r["runs"]:
            assert run["turns"] == -(-steps // k) == len(run["turn_s"])
            # the loop is the turns' own seconds (each ends at a step's end), not the other's turns between them
            assert run["loop_s"] == pytest.approx(sum(run["turn_s"]), rel=0.05)
            assert run["loop_s"] < run["total_s"] - run["setup_s"]
    # while one worker's loop ran, the other's did not: its turns fit in the gaps
    a, b = (results[n]["runs"][0] for n in ("sft_full", "sft_lora"))
    assert a["started_at"] < b["started_at"]


def test_versus_has_one_key_per_stage_with_paired_spread():
    def ok(rates, kind="stage", **extra):  # the first two rounds from one process pair, the third from another
        runs = [{"steps_per_s": v, "cpu_share": 0.5, "steps": 10, "loop_s": 10 / v, "turns": 2, "pair": i // 2}
                for i, v in enumerate(rates)]
        return {"status": "ok", "kind": kind, "peak_rss_mb": 500.0, "runs": runs, **extra,
                "median": {"steps_per_s": sorted(rates)[len(rates) // 2], "tokens": 4000, "real_share": 0.5,
                           "steps": 10, "real_tokens_per_s": 1.0, "cpu_share": 1.0}}

    results = {"sft_full": ok([10.0, 12.0, 11.0], interleaved_with=["lf_sft_full"]),
               "dpo_full": ok([6.0, 6.0, 6.0]),  # not interleaved: a ratio, but no paired spread
               "lf_sft_full": ok([8.0, 10.0, 10.0], kind="llamafactory", same_work_as=["sft_full"],
                                 interleaved_with=["sft_full"]),
               "lf_dpo_full": ok([5.0, 5.0, 5.0], kind="llamafactory", same_work_as=["dpo_full"])}
    versus = bench.derive(results)["versus_llamafactory"]
    assert set(versus) == {"sft_full", "dpo_full"}
    sft = versus["sft_full"]
    assert sft["paired"] == pytest.approx([1.25, 1.2, 1.1]) and sft["rounds"] == 3
    # interleaved: all rounds' steps over all loop seconds, ours over theirs; each round's ratio beside it
    assert sft["ratio"] == pytest.approx((30 / (10 / 10 + 10 / 12 + 10 / 11)) / (30 / (10 / 8 + 10 / 10 + 10 / 10)))
    assert sft["paired_median"] == pytest.approx(1.2)
    assert sft["ratio_of_medians"] == pytest.approx(11.0 / 10.0)
    assert versus["dpo_full"]["ratio"] == pytest.approx(6.0 / 5.0) and versus["dpo_full"]["paired_median"] is None
    assert (sft["paired_min"], sft["paired_max"]) == (pytest.approx(1.1), pytest.approx(1.25))
    assert sft["ours"]["real_tokens_per_step"] == 200 and sft["theirs"]["peak_rss_mb"] == 500.0
    assert sft["ratio_per_cpu_s"] == pytest.approx(1.2)  # same CPU share: the median of the paired ratios
    assert versus["dpo_full"]["rounds"] == 0 and versus["dpo_full"]["paired_min"] is None
    # each process pair's rounds pooled the same way: pair 0 (rounds 1-2), pair 1 (round 3)
    assert sft["by_pair"] == pytest.approx([(20 / (10 / 10 + 10 / 12)) / (20 / (10 / 8 + 10 / 10)), 1.1])
    assert sft["process_pairs"] == 2 and versus["dpo_full"]["by_pair"] == []
    printed = bench.table(results, bench.derive(results))
    assert "alignpipe vs LLaMA-Factory" in printed and "1.1..1.25" in printed and "1.1..1.23" in printed
