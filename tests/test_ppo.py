"""PPO end to end on a tiny model: it learns a reward a tiny model can learn, LoRA keeps one copy of
the base weights, a killed run resumes bit-exactly, and it trains against a real reward stage.
The maths is tested in test_ppo_math.py; here the wiring."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignpipe.errors import RecipeError
from alignpipe.models.loading import count_parameters, load_stage_model
from alignpipe.pipeline.runner import run_recipe
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.schema import ModelSpec
from alignpipe.rl import ppo_math as pm
from alignpipe.rl import rewards
from alignpipe.rl.policy import build, distinct_weights, response_logits
from alignpipe.rl.ppo_trainer import PPOSettings, prompt_batch
from alignpipe.rl.rollout import Rollout, response_mask_from
from alignpipe.stages.helpers import reward_hacking
from conftest import copy_base, tiny_recipe, write_yaml

TOY = '''
import os
CALLS = {"n": 0}

def short(prompts, completions, **kwargs):
    """1 for an empty response, falling linearly to 0 at 40 characters: learnable in a few updates."""
    CALLS["n"] += 1
    if CALLS["n"] == int(os.environ.get("TOY_CRASH_AT", "0")):
        raise RuntimeError("injected crash")
    return [1.0 - min(len(c[0]["content"]), 40) / 40 for c in completions]
'''
EVAL = {"num_prompts": 8, "samples_per_prompt": 2, "max_new_tokens": 12}
TRAINER = {"total_updates": 12, "rollout_batch_size": 16, "minibatch_size": 8, "learning_rate": 1e-3,
           "max_new_tokens": 16, "kl_coef": 0.02}


def toy_stage(**over) -> dict:
    stage = {"kind": "ppo", "from": "sft", "reward_function": "toy_rewards:short", "data": {"embedded": "rl_prompts"},
             "eval": EVAL, "trainer": dict(TRAINER)}
    trainer = over.pop("trainer", {})
    stage.update(over)
    stage["trainer"].update(trainer)
    return stage


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_base):
    """A folder with the session's tiny pretrain + sft, and the toy reward module importable."""
    root = tmp_path_factory.mktemp("ppo")
    (root / "toy_rewards.py").write_text(TOY)
    sys.path.insert(0, str(root))
    copy_base(tiny_base, root / "runs")
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("toy_rewards", None)


def run_stages(work, stages: dict, only: list[str], name: str = "recipe") -> dict:
    recipe = load_recipe(write_yaml(work / f"{name}.yaml", tiny_recipe(work / "runs", extra_stages=stages)))
    return run_recipe(recipe, only)


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_rows(stage_dir) -> list[dict]:
    return jsonl(stage_dir / "train_log.jsonl")


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_learns_a_short_response_reward(work):
    m = run_stages(work, {"ppo": toy_stage()}, ["ppo"])["ppo"]
    assert m["status"] == "complete"
    rows = log_rows(work / "runs" / "tiny" / "ppo")
    assert [r["update"] for r in rows] == list(range(1, 13))
    for key in ("reward_raw", "reward_normalised", "kl", "kl_coef", "entropy", "policy_loss", "value_loss",
                "clipfrac", "approx_kl", "response_length", "eot_share", "time_gen", "time_score", "time_train"):
        assert all(isinstance(r[key], float) for r in rows), key
    first = sum(r["reward_raw"] for r in rows[:3]) / 3
    last = sum(r["reward_raw"] for r in rows[-3:]) / 3
    assert last > first + 0.2, (first, last)  # the policy learned to answer shorter
    assert rows[-1]["kl"] > 0.1  # ... by moving away from the reference, which the KL term measured
    # the adaptive controller (kl_target 1.0 by default) moved the coefficient by its rule after each update
    ctl = pm.AdaptiveKLController(TRAINER["kl_coef"], 1.0, PPOSettings().kl_horizon)
    for r in rows:
        assert r["kl_coef"] == pytest.approx(ctl.value, rel=1e-12)
        ctl.update(r["kl"], r["samples"])
    assert len({r["kl_coef"] for r in rows}) == len(rows)
    # a response that never ended its turn lost missing_eot_penalty (1.0 by default) of its score
    for r in rows:
        assert r["score"] == pytest.approx(r["reward_normalised"] - 1.0 * (1 - r["eot_share"]), abs=1e-6)
    assert any(r["eot_share"] < 1 for r in rows)  # the penalty was applied at least once
    metrics = m["metrics"]
    assert metrics["judge_used_for_training"] is False
    assert metrics["kl_to_reference"] > 0
    samples = jsonl(work / "runs" / "tiny" / "ppo" / "eval_samples.jsonl")
    assert len(samples) == metrics["judge_total"] == EVAL["num_prompts"] * EVAL["samples_per_prompt"]
    assert metrics["judge_pass_rate"] == sum(r["judge"] for r in samples) / len(samples)
    assert metrics["reference_extra_weights"] == metrics["policy_weights"] - metrics["value_head_weights"]
    # the saved policy reloads as a plain causal LM; the value head is kept beside it
    stage = work / "runs" / "tiny" / "ppo"
    reloaded = load_stage_model(stage, ModelSpec()).state_dict()
    saved = load_file(stage / "model" / "model.safetensors")
    assert saved and all(torch.equal(reloaded[k], v) for k, v in saved.items())
    assert set(load_file(stage / "model" / "value_head.safetensors")) == {"weight", "bias"}
    assert (stage / "logs").is_dir() and any((stage / "logs").iterdir())  # TensorBoard events


@pytest.mark.slow
def test_fixed_kl_early_stop_and_eot_penalty_are_wired(work):
    """kl_target: null keeps kl_coef fixed; target_approx_kl stops an update's minibatches early;
    missing_eot_penalty is the configured one."""
    full = {"total_updates": 2, "ppo_epochs": 2, "rollout_batch_size": 16, "minibatch_size": 8}
    stages = {"ppo_stop": toy_stage(eval={"enabled": False}, trainer={
                  **full, "kl_target": None, "target_approx_kl": 1e-9, "missing_eot_penalty": 3.0}),
              "ppo_nostop": toy_stage(eval={"enabled": False}, trainer=full)}
    run_stages(work, stages, list(stages))
    stop, nostop = (log_rows(work / "runs" / "tiny" / s) for s in stages)
    assert [r["kl_coef"] for r in stop] == [TRAINER["kl_coef"]] * 2
    assert [(r["optimizer_steps"], r["early_stopped"]) for r in nostop] == [(4, False)] * 2  # 2 epochs x 2
    for r in stop:
        assert r["early_stopped"] is True and 1 <= r["optimizer_steps"] < 4
        assert r["score"] == pytest.approx(r["reward_normalised"] - 3.0 * (1 - r["eot_share"]), abs=1e-6)
    # the first rollout is the same in both (same seed, same start): only what came after it differs
    assert stop[0]["reward_raw"] == nostop[0]["reward_raw"] and stop[0]["eot_share"] == nostop[0]["eot_share"]


@pytest.mark.slow
@pytest.mark.parametrize("whiten", [True, False])
def test_advantage_whitening_is_wired(work, whiten):
    """One update, one minibatch holding the whole rollout, one step: the policy has not moved, so the
    ratio is 1 and the policy loss is minus the mean advantage, which whitening makes 0."""
    name = f"ppo_whiten_{whiten}".lower()
    stage = toy_stage(eval={"enabled": False}, trainer={
        "total_updates": 1, "ppo_epochs": 1, "rollout_batch_size": 16, "minibatch_size": 16,
        "whiten_advantages": whiten})
    run_stages(work, {name: stage}, [name])
    (row,) = log_rows(work / "runs" / "tiny" / name)
    assert row["optimizer_steps"] == 1 and row["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    if whiten:
        assert abs(row["policy_loss"]) < 1e-5
    else:
        assert abs(row["policy_loss"]) > 1e-3


@pytest.mark.slow
def test_ppo_ptx_trains_on_the_text_beside_the_reward(work):
    """PPO-ptx: every optimiser step adds the next-token loss on corpus text; that loss falls as it trains."""
    stage = toy_stage(ptx_data={"embedded": "corpus"}, trainer={"total_updates": 8, "ptx_coef": 2.0})
    assert run_stages(work, {"ppo_ptx": stage}, ["ppo_ptx"])["ppo_ptx"]["status"] == "complete"
    rows = log_rows(work / "runs" / "tiny" / "ppo_ptx")
    losses = [r["ptx_loss"] for r in rows]
    assert all(isinstance(x, float) and x > 0 for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


@pytest.mark.slow
def test_negative_entropy_coef_sharpens_the_policy(work):
    """entropy_coef < 0 (entropy minimisation) lowers the policy's entropy against the same run without it."""
    last = {}
    for name, coef in (("ppo_ent0", 0.0), ("ppo_entneg", -5.0)):
        stage = toy_stage(trainer={"total_updates": 6, "entropy_coef": coef})
        assert run_stages(work, {name: stage}, [name])[name]["status"] == "complete"
        last[name] = log_rows(work / "runs" / "tiny" / name)[-1]["entropy"]
    assert last["ppo_entneg"] < 0.8 * last["ppo_ent0"], last


@pytest.mark.slow
def test_lora_ppo_holds_one_copy_of_the_base_weights(work):
    sft = work / "runs" / "tiny" / "sft"
    from peft import LoraConfig

    base_model = load_stage_model(sft, ModelSpec())
    untouched = load_stage_model(sft, ModelSpec())
    n_base = count_parameters(base_model)
    # init_lora_weights=False: a random adapter, so the policy differs from the reference from the start
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    policy, reference = build(base_model, lora)
    n_adapter = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    n_head = sum(p.numel() for p in policy.value_head.parameters())
    assert n_adapter > 0
    assert distinct_weights(policy, reference) == n_base + n_adapter + n_head
    assert distinct_weights(reference) == distinct_weights(policy.lm)  # the reference's weights ARE the policy's

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 11, 12, 13, 14, 15]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    ref_logits = response_logits(reference, ids, am, prompt_len=3)
    assert torch.allclose(ref_logits, response_logits(untouched, ids, am, prompt_len=3), atol=1e-5)
    assert not torch.allclose(ref_logits, response_logits(policy.lm, ids, am, prompt_len=3), atol=1e-3)

    # full fine-tuning: the reference is a frozen copy, which the policy's optimiser cannot move
    full_policy, frozen = build(load_stage_model(sft, ModelSpec()))
    assert distinct_weights(full_policy, frozen) == 2 * n_base + n_head
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_gradients(work):
    from peft import LoraConfig

    grads = []
    for checkpointing in (False, True):
        lm = load_stage_model(work / "runs" / "tiny" / "sft", ModelSpec())
        if checkpointing:
            lm.activation_checkpointing_enable()
        assert lm.is_activation_checkpointing == checkpointing
        torch.manual_seed(0)  # the same random adapter and value head both times
        policy, _ = build(lm, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM",
                                         init_lora_weights=False))
        policy.value_head.weight.data.normal_()  # a value head that is not zero, so its gradient flows into the trunk
        policy.train()
        ids = torch.tensor([[0, 5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16]])
        logits, values = policy(ids, (ids > 0).long(), prompt_len=3)
        (logits.logsumexp(-1).mean() + values.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 2
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


@pytest.mark.slow
def test_lora_ppo_stage_saves_an_adapter(work):
    stage = toy_stage(lora={"r": 4, "alpha": 8}, trainer={"total_updates": 3})
    m = run_stages(work, {"ppo_lora": stage}, ["ppo_lora"])["ppo_lora"]
    metrics = m["metrics"]
    assert metrics["reference_extra_weights"] == 0  # the reference adds no weights: the adapter is switched off
    out = work / "runs" / "tiny" / "ppo_lora"
    assert (out / "model" / "adapter_config.json").is_file() and not (out / "model" / "model.safetensors").exists()
    merged = load_stage_model(out, ModelSpec())  # base (the sft stage) + adapter, merged
    assert count_parameters(merged) == count_parameters(load_stage_model(work / "runs" / "tiny" / "sft", ModelSpec()))


@pytest.mark.slow
def test_crashed_run_resumes_bit_exactly(work, monkeypatch, capsys):
    """A run that fails (an exception; the SIGKILL case is in test_resume.py) resumes from its checkpoint:
    the resumed run scores only the 3 updates after it, and ends where the uninterrupted run ended."""
    toy = sys.modules.get("toy_rewards") or __import__("toy_rewards")
    stages = {"ppo_a": toy_stage(trainer={"total_updates": 5}, checkpoint_every=2),
              "ppo_b": toy_stage(trainer={"total_updates": 5}, checkpoint_every=2)}
    run_stages(work, stages, ["ppo_a"])
    # ppo_b dies while scoring update 4, after its checkpoint at update 2 ...
    toy.CALLS["n"] = 0
    monkeypatch.setenv("TOY_CRASH_AT", "4")
    with pytest.raises(RuntimeError, match="injected crash"):
        run_stages(work, stages, ["ppo_b"])
    runs = work / "runs" / "tiny"
    assert json.loads((runs / "ppo_b" / "manifest.json").read_text())["status"] == "failed"
    assert [r["update"] for r in log_rows(runs / "ppo_b")] == [1, 2, 3]
    assert (runs / "ppo_b" / "checkpoints" / "update-2" / "state.json").is_file()
    # ... and the next run resumes from update 2 and ends exactly where the uninterrupted run did
    monkeypatch.delenv("TOY_CRASH_AT")
    toy.CALLS["n"] = 0
    capsys.readouterr()
    m = run_stages(work, stages, ["ppo_b"])["ppo_b"]
    assert m["status"] == "complete"
    assert toy.CALLS["n"] == 3  # one reward call per update: updates 3, 4 and 5, not a restart
    assert f"resuming from {runs / 'ppo_b' / 'checkpoints' / 'update-2'} (update 2)" in capsys.readouterr().out
    a, b = (load_file(runs / s / "model" / "model.safetensors") for s in ("ppo_a", "ppo_b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = {"time_gen", "time_score", "time_forward", "time_train", "samples_per_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in log_rows(runs / "ppo_a")]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in log_rows(runs / "ppo_b")]


@pytest.mark.slow
def test_ppo_against_a_reward_stage(work):
    stages = {
        "reward": {"from": "sft", "data": {"embedded": "pairs"}, "eval": EVAL,
                   "trainer": {"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-3}},
        "ppo_rm": toy_stage(reward_function=None, reward_model="reward", trainer={"total_updates": 3}),
    }
    manifests = run_stages(work, stages, ["ppo_rm"], name="with_rm")
    metrics = manifests["ppo_rm"]["metrics"]
    assert metrics["reward_source"] == "reward" and metrics["reward_stage"] == "reward"
    for key in ("mean_reward", "parent_mean_reward", "parent_judge_pass_rate", "kl_to_reference"):
        assert isinstance(metrics[key], float), key
    assert isinstance(metrics["reward_hacking_suspected"], bool)
    # scores are normalised with the reward stage's held-out statistics
    stats = json.loads((work / "runs" / "tiny" / "reward" / "model" / "reward.json").read_text())
    for r in log_rows(work / "runs" / "tiny" / "ppo_rm"):
        assert r["reward_normalised"] == pytest.approx((r["reward_raw"] - stats["mean"]) / stats["std"], abs=1e-4)


@pytest.mark.slow
def test_two_process_ddp_ppo_keeps_the_ranks_identical(work, tmp_path):
    """`make ppo ACCELERATE=recipes/accelerate/ddp.yaml NPROC=2`: two gloo processes, each sampling its own
    prompts; gradients are averaged by accelerate's DDP, so both ranks end with the same policy."""
    import os
    import shlex
    import shutil
    import subprocess

    from conftest import REPO

    runs = tmp_path / "runs" / "tiny"
    for parent in ("pretrain", "sft"):
        shutil.copytree(work / "runs" / "tiny" / parent, runs / parent)
    recipe = write_yaml(tmp_path / "ddp.yaml", tiny_recipe(tmp_path / "runs", extra_stages={
        "ppo": toy_stage(lora={"r": 4, "alpha": 8}, trainer={"total_updates": 3, "rollout_batch_size": 8,
                                                             "minibatch_size": 4})}))
    dry = subprocess.run(["make", "-n", "ppo", f"RECIPE={recipe}", "ACCELERATE=recipes/accelerate/ddp.yaml",
                          "NPROC=2"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    command = shlex.split(next(line for line in dry.splitlines() if "accelerate launch" in line))
    sums = tmp_path / "checksums"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNPIPE_DEBUG_PARAM_CHECKSUM": str(sums),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((sums / f"ppo-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["wrapped_as"] == "DistributedDataParallel" for r in ranks), (ranks, proc.stderr[-3000:])
    assert ranks[0]["checksum"] == ranks[1]["checksum"], "the ranks hold different policies"
    rows = log_rows(runs / "ppo")
    assert len(rows) == 3 and all(r["samples"] == 16 for r in rows)  # 8 responses per process per update
    assert json.loads((runs / "ppo" / "manifest.json").read_text())["status"] == "complete"


# --- pieces -------------------------------------------------------------------------------------


def test_response_mask_stops_after_the_first_end_of_turn():
    ids = torch.tensor([[4, 9, 3, 9, 2], [4, 4, 4, 4, 4], [9, 0, 0, 0, 0]])
    mask, ended = response_mask_from(ids, eot_id=9)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_rollout_rows_drop_columns_that_are_padding_in_every_row():
    # prompts left-padded to width 3, responses right-padded to width 3 (pad 0, end-of-turn 9)
    ids = torch.tensor([[0, 0, 5, 7, 9, 0], [0, 6, 5, 7, 7, 9], [1, 2, 3, 9, 0, 0]])
    am = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    mask, ended = response_mask_from(ids[:, 3:], eot_id=9)
    ro = Rollout([[]] * 3, [""] * 3, ids, am, 3, ids[:, 3:], mask, ended)
    sub_ids, sub_am, prompt_len, tokens, width = ro.rows(torch.tensor([0, 1]))
    assert sub_ids.tolist() == [[0, 5, 7, 9, 0], [6, 5, 7, 7, 9]] and prompt_len == 2 and width == 3
    assert sub_am.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]] and tokens.tolist() == [[7, 9, 0], [7, 7, 9]]
    sub_ids, _, prompt_len, _, width = ro.rows(torch.tensor([2, 0]))
    assert sub_ids.tolist() == [[1, 2, 3, 9, 0], [0, 0, 5, 7, 9]] and prompt_len == 3 and width == 2


def test_prompt_batches_cover_every_prompt_once_per_epoch():
    prompts = list(range(10))
    seen = [p for u in range(5) for p in prompt_batch(prompts, u, 2, rank=0, world=1, seed=3)]
    assert sorted(seen) == prompts  # 5 updates x 2 = one epoch: a permutation
    assert prompt_batch(prompts, 7, 4, 0, 1, 3) == prompt_batch(prompts, 7, 4, 0, 1, 3)
    ranks = [prompt_batch(prompts, 0, 5, rank=r, world=2, seed=3) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == prompts  # two processes split the stream, no overlap


def test_reward_hacking_needs_rm_up_and_judge_down():
    assert reward_hacking(mean_reward=1.0, judge=0.2, parent_mean_reward=0.5, parent_judge=0.3)
    assert not reward_hacking(mean_reward=1.0, judge=0.4, parent_mean_reward=0.5, parent_judge=0.3)
    assert not reward_hacking(mean_reward=0.4, judge=0.2, parent_mean_reward=0.5, parent_judge=0.3)


def test_reward_functions_and_the_judge_flag():
    assert rewards.is_judge("alignpipe.data.world:judge_reward")
    assert not rewards.is_judge("toy_rewards:short") and not rewards.is_judge(None)
    with pytest.raises(RecipeError, match="module:function"):
        rewards.load_function("judge_reward")
    with pytest.raises(RecipeError, match="cannot import"):
        rewards.load_function("alignpipe.data.world:no_such_function")


def test_zero_reward_is_zero_for_every_response_and_is_not_the_judge():
    fn = rewards.load_function("alignpipe.eval.reward_functions:zero_reward")
    out = fn(prompts=[[{"role": "user", "content": "what is 3 plus 4?"}]] * 2,
             completions=[[{"role": "assistant", "content": "The answer is 7."}],
                          [{"role": "assistant", "content": "no"}]])
    assert out == [0.0, 0.0] and not rewards.is_judge("alignpipe.eval.reward_functions:zero_reward")


def test_missing_ptx_file_fails_validation_naming_the_key(tmp_path):
    from alignpipe.errors import AlignpipeError
    from alignpipe.pipeline.validate import validate

    stage = toy_stage(reward_function="alignpipe.data.world:judge_reward", ptx_data={"path": "no-such-file.jsonl"},
                      trainer={"ptx_coef": 0.1})
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages={"ppo": stage})))
    with pytest.raises(AlignpipeError, match=r"ptx_data[\s\S]*no-such-file"):
        validate(recipe)


@pytest.mark.parametrize("stage, message", [
    ({"reward_function": None}, "exactly one reward"),
    ({"reward_model": "sft"}, "exactly one reward"),
    ({"reward_function": None, "reward_model": "sft"}, "not a reward stage"),
    ({"trainer": {"learning_rte": 1e-4}}, "learning_rte"),
    ({"trainer": {"ppo_epochs": "two"}}, "expected int"),
    ({"trainer": {"minibatch_size": 64}}, "larger than rollout_batch_size"),
    ({"trainer": {"kl_estimator": "k4"}}, "kl_estimator"),
    ({"trainer": {"ptx_coef": 0.5}}, "needs text"),
    ({"ptx_data": {"embedded": "pairs"}}, "not plain text"),
    ({"data": {}}, "no prompts"),
])
def test_recipe_errors_name_the_key(tmp_path, stage, message):
    from alignpipe.pipeline.validate import validate

    stage = {"reward_function": "alignpipe.data.world:judge_reward", **stage}
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages={
        "ppo": toy_stage(**stage)})))
    with pytest.raises(RecipeError, match=message):
        validate(recipe)


def test_implicit_reward_at_its_default_keeps_existing_ppo_fingerprints():
    from alignpipe.pipeline.plan import result_config

    before = {"kind": "ppo", "from": "sft", "reward_model": "reward", "trainer": {"total_updates": 20}}
    assert result_config({**before, "implicit_reward": "ratio"}) == result_config(before)
    assert result_config({**before, "implicit_reward": "likelihood"}) != result_config(before)
