"""`make bench`'s plumbing on tiny settings (behaviour, not speed): contestants run in their own
processes, the raw loop replays exactly the batches alignpipe's SFT trained on, packing removes
padding, PPO's time split is read back, and the figures are aggregated into ratios and a table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import contestants  # noqa: E402
import run as bench  # noqa: E402
import worker  # noqa: E402

QUICK = contestants.Settings.quick()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    only = "matmul_1t,sft_1t,raw_sft_1t,sft_packed_1t,ppo"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", only,
                           "--workdir", str(tmp / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_stage_contestants_time_the_configured_steps(report):
    data, _ = report
    c = data["contestants"]
    assert [n for n, r in c.items() if r["status"] != "ok"] == []
    sft = c["sft_1t"]
    # one short warm-up run, then the timed repeats, each exactly max_steps long
    assert sft["warmup"]["steps"] == QUICK.compute_warmup_steps
    assert [r["steps"] for r in sft["runs"]] == [QUICK.compute_steps] * QUICK.repeats
    med = sft["median"]
    assert med["steps_per_s"] > 0 and med["loop_s"] > 0
    assert med["samples_per_s"] == pytest.approx(med["steps_per_s"] * QUICK.compute_batch)
    assert 0 < med["setup_s"] < sft["warmup"]["startup_s"]  # startup also pays the interpreter and imports
    assert sft["peak_rss_mb"] >= sft["rss_after_imports_mb"] > 50
    assert 0 < med["mfu"] < 5  # against the matmul limit measured in the same run


def test_raw_loop_replays_the_same_batches(report):
    data, _ = report
    sft, raw = data["contestants"]["sft_1t"]["median"], data["contestants"]["raw_sft_1t"]["median"]
    assert raw["steps"] == sft["steps"] and raw["tokens"] == sft["tokens"] and raw["params"] == sft["params"]
    assert raw["real_share"] == pytest.approx(sft["real_share"])
    # same weights, same first batch: the same loss, computed by TRL's fused head and by plain cross-entropy
    assert raw["first_loss"] == pytest.approx(sft["first_loss"], rel=1e-4)
    assert data["derived"]["sft_vs_raw_tokens_per_s_1t"] == pytest.approx(sft["tokens_per_s"] / raw["tokens_per_s"])


def test_packing_removes_padding(report):
    data, _ = report
    shares = data["derived"]["packing_real_share"]
    assert shares["on"] == 1.0 and 0 < shares["off"] < 1.0
    assert data["derived"]["packing_real_tokens_per_s_on_vs_off"] > 0


def test_ppo_split_and_peer_comparison(report):
    data, printed = report
    if "ppo" not in data["stage_kinds"]:
        pytest.skip("the ppo stage has not landed")
    ppo = data["contestants"]["ppo"]
    assert [r["steps"] for r in ppo["runs"]] == [QUICK.ppo_updates]
    med = ppo["median"]
    assert set(med["split_share"]) == {"gen", "score", "forward", "train"}
    assert sum(med["split_share"].values()) == pytest.approx(1.0)
    assert 0 < med["response_length"] <= QUICK.ppo_new_tokens
    assert med["generated_tokens_per_s"] > 0
    vs = data["derived"]["vs_llamafactory"]["ppo"]["samples_per_s"]
    assert vs["llamafactory"] == 8.9 and vs["ratio"] == pytest.approx(vs["ours"] / 8.9)
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
