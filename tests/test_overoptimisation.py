"""Over-optimisation: curves along training, the flag (which noise must not raise), Gao et al.'s fits, the onset
monitors, and the wiring into a PPO stage (slow)."""

from __future__ import annotations

import json
import math
import random

import pytest

from alignpipe.eval import overoptimisation as oo
from alignpipe.eval.onset import OnsetMonitor
from alignpipe.pipeline.gates import check
from alignpipe.pipeline.runner import run_recipe
from alignpipe.recipe.parse import load_recipe
from conftest import copy_base, tiny_recipe, write_yaml

PROMPTS, SAMPLES = 64, 4


def curve(gold_rates: list[float], proxies: list[float], seed: int, jitter: float = 0.0) -> list[dict]:
    """Synthetic curve rows: at each point every prompt's gold is the mean of SAMPLES Bernoulli draws with the
    point's rate (plus a per-prompt difficulty offset), and the proxy is the point's value plus noise."""
    rng = random.Random(seed)
    offsets = [rng.uniform(-0.2, 0.2) for _ in range(PROMPTS)]
    rows = []
    for step, (rate, proxy) in enumerate(zip(gold_rates, proxies)):
        gold = [sum(rng.random() < min(1, max(0, rate + o)) for _ in range(SAMPLES)) / SAMPLES for o in offsets]
        prox = [proxy + rng.gauss(0, jitter) for _ in range(PROMPTS)]
        kl = 0.5 * step * step
        rows.append({"step": step * 2, "kl": kl, "sqrt_kl": math.sqrt(kl), "prompts": PROMPTS,
                     "judge_pass_rate": sum(gold) / PROMPTS, "proxy": sum(prox) / PROMPTS,
                     "per_prompt": {"judge": gold, "proxy": prox}})
    return rows


RISING_PROXY = [0.1 * i for i in range(10)]


def test_a_gold_that_only_wobbles_within_its_interval_is_not_flagged():
    """Gold at a constant 0.5 (every wobble is sampling noise) while the proxy rises: over 100 seeded runs of 10
    points the flag goes up at most about as often as a 95% interval allows (and the peak, a maximum over noisy
    points, is located on other prompts than the drop is measured on, so its selection does not inflate it)."""
    flagged = [oo.assess(curve([0.5] * 10, RISING_PROXY, seed, 0.05), "judge")["overoptimised"] for seed in range(100)]
    assert sum(flagged) <= 6
    wobble = curve([0.5, 0.52, 0.49, 0.53, 0.5, 0.48, 0.51, 0.5, 0.49, 0.5], RISING_PROXY, seed=7, jitter=0.05)
    figures = oo.assess(wobble, "judge")
    assert figures["overoptimised"] is False
    lo, hi = figures["overopt_gold_drop_ci"]
    assert lo <= 0 <= hi


def test_the_same_noise_measured_on_the_prompts_that_chose_the_peak_would_be_flagged_more_often():
    """Why the halves: the drop measured from the maximum on the same prompts is biased upwards."""
    def naive(rows):
        everyone = list(range(PROMPTS))
        peak = max(rows, key=lambda r: oo.half_mean(r, "judge", everyone))
        return oo.paired_drop(peak, rows[-1], "judge", everyone)["lo"] > 0

    naive_flags = sum(naive(curve([0.5] * 10, RISING_PROXY, seed, 0.05)) for seed in range(100))
    split_flags = sum(oo.assess(curve([0.5] * 10, RISING_PROXY, seed, 0.05), "judge")["overoptimised"]
                      for seed in range(100))
    assert naive_flags > split_flags


def test_a_clear_rise_then_fall_while_the_proxy_rises_is_flagged():
    gold = [0.35, 0.5, 0.62, 0.7, 0.72, 0.66, 0.55, 0.45, 0.38, 0.3]
    figures = oo.assess(curve(gold, RISING_PROXY, seed=1, jitter=0.05), "judge")
    assert figures["overoptimised"] is True
    assert 6 <= figures["overopt_peak_step"] <= 10  # points 3-5 of 10 (steps 2 apart)
    assert figures["overopt_gold_drop_ci"][0] > 0 and figures["overopt_proxy_rise"] > 0
    assert figures["fit_gold"]["beta"] > 0  # the RL form bends down
    assert "OVER-OPTIMISED" in oo.line("ppo", figures)


def test_a_fall_while_the_proxy_falls_too_is_not_over_optimisation():
    gold = [0.35, 0.5, 0.62, 0.7, 0.72, 0.66, 0.55, 0.45, 0.38, 0.3]
    figures = oo.assess(curve(gold, list(reversed(RISING_PROXY)), seed=1, jitter=0.05), "judge")
    assert figures["overopt_gold_drop_ci"][0] > 0 and figures["overoptimised"] is False


def test_too_few_points_or_no_gold_give_a_status_not_a_flag():
    rows = curve([0.5, 0.6], [0.0, 0.1], seed=0)
    assert "overoptimised" not in oo.assess(rows, "judge")
    assert oo.assess(curve([0.5] * 4, [0.1] * 4, seed=0), None) == {
        "overoptimisation_status": "no gold judge along training"}


@pytest.mark.parametrize("form, alpha, beta", [(oo.rl_form, 0.8, 0.4), (oo.bon_form, 0.5, 0.2)])
def test_gao_forms_are_recovered_from_points_on_them(form, alpha, beta):
    ds = [0.2 * i for i in range(1, 12)]
    ys = [0.3 + float(form(d, alpha, beta)) for d in ds]
    fit = oo.fit_form(form, ds, ys, 0.3)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-4) and fit["beta"] == pytest.approx(beta, rel=1e-4)
    assert fit["rmse"] < 1e-6
    assert oo.fit_form(form, ds[:3], ys[:3], 0.3) is None  # too few points


def train_row(kl: float, entropy: float = 1.0, length: float = 10.0) -> dict:
    return {"kl": kl, "entropy": entropy, "response_length": length}


def test_onset_monitors_fire_once_each_at_their_threshold():
    monitor = OnsetMonitor("ppo")
    for step, kl in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], start=1):
        monitor.train_row(step, train_row(kl))
    assert monitor.metrics()["onset_warnings"] == 0  # 0.1 nats per update
    for step, kl in enumerate([1.5, 3.0, 4.5, 6.0], start=7):
        monitor.train_row(step, train_row(kl, entropy=0.2, length=4.0))
    fired = {f["monitor"]: f["step"] for f in monitor.metrics()["onset_monitors"]}
    assert fired == {"entropy_collapse": 7, "length_drift": 7, "kl_growth": 8}


def test_proxy_gold_divergence_needs_the_gold_down_beyond_its_noise():
    rows = curve([0.4, 0.7, 0.69, 0.3], [0.0, 0.1, 0.2, 0.3], seed=3)
    monitor = OnsetMonitor("ppo")
    for r in rows[:3]:
        monitor.curve_row(r, "judge")
    assert monitor.metrics()["onset_warnings"] == 0
    monitor.curve_row(rows[3], "judge")
    assert [f["monitor"] for f in monitor.fired] == ["proxy_gold_divergence"]


def test_a_flag_gate_written_as_false(tmp_path):
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["stages"]["sft"]["gates"] = {"overoptimised": False}
    parsed = load_recipe(write_yaml(tmp_path / "r.yaml", recipe))
    assert parsed.stages["sft"].gates == ["overoptimised == 0"]
    assert [r["passed"] for r in check(parsed.stages["sft"].gates, "sft", {"overoptimised": False}, tmp_path)] == [True]
    assert [r["passed"] for r in check(parsed.stages["sft"].gates, "sft", {"overoptimised": True}, tmp_path)] == [False]


# --- a PPO stage with curves -------------------------------------------------------------------------------

EVAL = {"num_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 12}


@pytest.mark.slow
def test_ppo_records_curve_points_without_changing_its_training(tmp_path, tiny_base):
    copy_base(tiny_base, tmp_path / "runs")
    reward = {"from": "sft", "data": {"embedded": "pairs"}, "eval": EVAL,
              "trainer": {"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-3}}
    trainer = {"total_updates": 5, "rollout_batch_size": 16, "minibatch_size": 8, "learning_rate": 1e-3,
               "max_new_tokens": 12, "kl_coef": 0.02}

    def ppo(every: int) -> dict:
        return {"kind": "ppo", "from": "sft", "reward_model": "reward", "data": {"embedded": "rl_prompts"},
                "eval": {**EVAL, "every": every, "curve_prompts": 6, "curve_samples": 2},
                "trainer": dict(trainer)}

    stages = {"reward": reward, "plain": ppo(0), "curved": {**ppo(2), "gates": {"overoptimised": False}}}
    recipe = load_recipe(write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs", extra_stages=stages)))
    manifests = run_recipe(recipe, ["plain", "curved"])
    root = tmp_path / "runs" / "tiny"
    rows = [json.loads(x) for x in (root / "curved" / "eval_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-5) and all(r["kl"] > 0 for r in rows[1:])
    assert all(len(r["per_prompt"]["judge"]) == 6 and len(r["per_prompt"]["proxy"]) == 6 for r in rows)
    metrics = manifests["curved"]["metrics"]
    assert isinstance(metrics["overoptimised"], bool) and metrics["curve_points"] == 4
    assert "onset_warnings" in metrics and "overoptimised" not in manifests["plain"]["metrics"]
    assert json.loads((root / "curved" / "gates.json").read_text())[0]["expr"] == "overoptimised == 0"
    # the curve points reseed and restore torch's generator: training is the same with and without them
    logs = [[{k: v for k, v in json.loads(x).items() if not k.startswith("time_") and k != "samples_per_s"}
             for x in (root / name / "train_log.jsonl").read_text().splitlines()] for name in ("plain", "curved")]
    assert logs[0] == logs[1]
    assert manifests["plain"]["metrics"]["judge_pass_rate"] == metrics["judge_pass_rate"]


# --- best-of-n ----------------------------------------------------------------------------------------------

from alignpipe.eval import best_of_n as bon  # noqa: E402
from alignpipe.pipeline.plan import result_config  # noqa: E402


def prompt_samples(rng: random.Random, count: int, distinct: int) -> list[dict]:
    """`count` samples of `distinct` possible responses; the proxy is noisy evidence of the gold."""
    out = []
    for _ in range(count):
        k = rng.randrange(distinct)
        gold = float(k % 3 == 0)
        out.append({"response": f"r{k}", "proxy": gold + 0.8 * ((k * 7919) % 101) / 101, "judge": gold})
    return out


def test_best_of_one_is_the_base_distribution_and_its_kl_is_zero():
    law = bon.bon_law(prompt_samples(random.Random(0), 32, 10), 1)
    assert all(p == pytest.approx(q) for _, p, q in law)
    assert sum(q for _, _, q in law) == pytest.approx(1.0)


def test_the_plug_in_kl_approaches_the_closed_form_when_every_response_is_distinct():
    samples = [{"response": f"r{i}", "proxy": float(i), "judge": 0.0} for i in range(2000)]
    for n in (2, 4, 16):
        kl = bon.per_prompt_figures(samples, n, "judge")["kl"]
        assert kl <= bon.closed_form(n) + 1e-9
        assert kl == pytest.approx(bon.closed_form(n), abs=0.02)


def test_best_of_n_kl_stays_under_the_closed_form_and_gold_rises_with_a_useful_proxy():
    rng = random.Random(1)
    by_prompt = {f"p{i}": prompt_samples(rng, 32, 12) for i in range(40)}
    rows = bon.curve(by_prompt, [1, 2, 4, 8, 16, 32], "judge")
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-12)
    assert all(r["kl"] <= r["kl_closed_form"] + 1e-9 and r["kl_within_bound"] for r in rows)
    assert [r["kl"] for r in rows] == sorted(r["kl"] for r in rows)
    assert rows[4]["gold"] > rows[0]["gold"]
    assert bon.at_kl(rows, rows[3]["kl"] + 1e-3)["n"] == 8


def test_curve_settings_at_their_defaults_leave_a_stage_fingerprint_unchanged():
    """Stages run before curves existed keep their fingerprint; turning curves on re-runs the stage."""
    before = {"kind": "ppo", "eval": {"num_prompts": 100}}
    after = {"kind": "ppo", "eval": {"num_prompts": 100, "every": 0, "curve_prompts": 32, "curve_samples": 4}}
    assert result_config(after) == result_config(before)
    assert result_config({**after, "eval": {**after["eval"], "every": 2}})["eval"]["every"] == 2


@pytest.mark.slow
def test_dpo_records_curve_points_and_the_report_draws_them(tmp_path, tiny_base):
    """A TRL stage (DPO, LoRA: the reference is the adapter switched off) records points through its callback;
    the report's over-optimisation section draws each curve and the best-of-n baseline beside the stages."""
    from alignpipe.report.document import write_report

    copy_base(tiny_base, tmp_path / "runs")
    stages = {
        "reward": {"from": "sft", "data": {"embedded": "pairs"}, "eval": EVAL,
                   "trainer": {"max_steps": 5, "per_device_train_batch_size": 8}},
        "dpo": {"from": "sft", "reward_model": "reward", "data": {"embedded": "pairs"}, "lora": {"r": 4, "alpha": 8},
                "eval": {**EVAL, "every": 2, "curve_prompts": 6, "curve_samples": 2},
                "trainer": {"max_steps": 5, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "beta": 0.1}},
        "bon": {"kind": "bon", "from": "sft", "reward_model": "reward", "data": {"embedded": "rl_prompts"},
                "ns": [1, 2, 4], "eval": EVAL},
    }
    recipe = load_recipe(write_yaml(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "runs", extra_stages=stages)))
    manifests = run_recipe(recipe, ["dpo", "bon"])
    root = tmp_path / "runs" / "tiny"
    rows = [json.loads(x) for x in (root / "dpo" / "eval_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-5) and rows[-1]["kl"] > 0
    assert isinstance(manifests["dpo"]["metrics"]["overoptimised"], bool)
    table = manifests["bon"]["metrics"]["best_of_n"]
    assert [r["n"] for r in table] == [1, 2, 4] and all(r["kl_within_bound"] for r in table)
    report, figures = write_report(root)
    text = report.read_text()
    assert "## Over-optimisation: gold against proxy" in text and "best-of-n" in text
    assert {"fig-overopt_dpo.png", "fig-bon_bon.png"} <= {p.name for p in figures}


def test_curves_on_a_stage_that_records_none_are_an_error(tmp_path):
    from alignpipe.errors import RecipeError
    from alignpipe.pipeline.validate import validate

    recipe = tiny_recipe(tmp_path / "runs")
    recipe["stages"]["sft"]["eval"] = {"every": 5}
    with pytest.raises(RecipeError, match="records no curve"):
        validate(load_recipe(write_yaml(tmp_path / "r.yaml", recipe)))
    recipe["stages"]["sft"]["eval"] = {}
    recipe["stages"]["sft"]["gates"] = {"overoptimised": False}
    with pytest.raises(RecipeError, match="reads the curve along training"):
        validate(load_recipe(write_yaml(tmp_path / "r.yaml", recipe)))
