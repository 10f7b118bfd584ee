"""Rewards beyond the scalar head: the generative reward model (verdict log-odds, the genrm stage), the implicit
reward of a DPO stage, and a judge served on loopback as an RL stage's reward, with its failures counted."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from alignpipe.errors import EvalError, RecipeError
from alignpipe.pipeline.runner import run_recipe
from alignpipe.pipeline.validate import validate
from alignpipe.recipe.parse import load_recipe
from alignpipe.recipe.schema import JudgeSpec
from alignpipe.reward.artifact import load_reward_model, score
from alignpipe.reward.generative import GenerativeArtifact, judging_ids, verdict_ids
from alignpipe.reward.implicit import ImplicitReward
from alignpipe.rl.judge_reward import JudgeReward
from conftest import TINY_EVAL, copy_base, tiny_recipe, write_yaml

PAIRS = {"from": "sft", "data": {"embedded": "pairs"}, "eval": TINY_EVAL}
GENRM = {"kind": "genrm", **PAIRS, "trainer": {"max_steps": 16, "per_device_train_batch_size": 8,
                                              "learning_rate": 3e-3, "warmup_steps": 0, "logging_steps": 1}}
PPO = {"kind": "ppo", "from": "sft", "data": {"embedded": "rl_prompts"}, "eval": TINY_EVAL,
       "trainer": {"total_updates": 2, "rollout_batch_size": 8, "minibatch_size": 4, "max_new_tokens": 12}}


def _tiny_causal_lm(tiny_hub_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_hub_model).eval(), AutoTokenizer.from_pretrained(tiny_hub_model)


def test_verdict_log_odds_is_read_at_the_opened_assistant_turn(tiny_hub_model):
    """The score of a pair is logit(yes) - logit(no) after the judging conversation, whatever the batch's padding."""
    model, tok = _tiny_causal_lm(tiny_hub_model)
    art = GenerativeArtifact(model, tok, 0.0, 1.0)
    prompts = ["What is 2 + 3?", "Name a colour.", [{"role": "user", "content": "Hi"}]]
    responses = ["The answer is 5.", "Blue, I think, or maybe a long ramble about colours.", "Hello."]
    batched = art.score(prompts, responses, batch_size=3)
    yes, no = verdict_ids(tok)
    for p, r, s in zip(prompts, responses, batched):
        ids = torch.tensor([judging_ids(tok, [p], [r])[0]])
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1]
        assert s == pytest.approx(float(last[yes] - last[no]), abs=1e-4)
    text = tok.decode(judging_ids(tok, prompts[:1], responses[:1])[0])
    assert text.index("The answer is 5.") < text.index("Is that answer right?")  # the question follows the answer
    assert len(set(batched)) == 3  # the responses are told apart (a constant would pass any padding check)


def test_verdict_words_that_share_a_first_token_are_refused(tiny_hub_model):
    _, tok = _tiny_causal_lm(tiny_hub_model)
    with pytest.raises(Exception, match="do not start with different tokens"):
        verdict_ids(tok, "Yes", "Yes")


# --- a judge as the reward: an OpenAI-compatible endpoint on loopback ---------------------------------


class Judge(BaseHTTPRequestHandler):
    """Prefers the shorter answer; says "maybe" (unparseable) when the question says "(unsure)"; HTTP 500 while
    failing."""

    failing = False

    def log_message(self, *args):
        pass

    def do_POST(self):
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
        if type(self).failing:
            body, code = {"error": "overloaded"}, 500
        else:
            question = text.split("Question: ", 1)[1].split("\n\nAnswer A: ", 1)[0]
            a = text.split("Answer A: ", 1)[1].split("\n\nAnswer B: ", 1)[0]
            b = text.split("Answer B: ", 1)[1].split("\n\nReply with", 1)[0]
            reply = "maybe" if "(unsure)" in question else ("A" if len(a) <= len(b) else "B")
            body, code = {"choices": [{"message": {"role": "assistant", "content": reply}}]}, 200
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_endpoint_judge_reward_compares_within_a_prompt_and_counts_failures(endpoint):
    judge = JudgeReward("remote", JudgeSpec(endpoint=endpoint, model="judge"), "recipe.yaml")
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 3 + [[{"role": "user", "content": "(unsure) 7 + 1?"}]] * 2
    responses = ["4.", "The answer is 4.", "The answer is 4, as it happens.", "8.", "It is 8."]
    rewards = judge(prompts, responses)
    assert rewards[:3] == [1.0, 0.5, 0.0]  # the shortest wins both its comparisons, the longest loses both
    assert rewards[3:] == [None, None]  # "maybe": no verdict, so no reward, never a silent 0
    assert judge.counts == {"responses": 5, "judge_calls": 8, "failures": 1, "unrewarded": 2}

    Judge.failing = True
    try:
        with pytest.raises(EvalError, match="no usable verdict"):
            judge(prompts[:2], responses[:2])
    finally:
        Judge.failing = False
    assert judge.counts["failures"] == 2 and judge.counts["unrewarded"] == 4


# --- stages on the session's tiny base (slow: they train) ---------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("genrm")
    copy_base(tiny_base, root / "runs")
    return root


def run(root, stages: dict, only: list[str]) -> dict:
    return run_recipe(load_recipe(write_yaml(root / "r.yaml", tiny_recipe(root / "runs", extra_stages=stages))), only)


@pytest.mark.slow
def test_genrm_stage_reports_like_a_reward_stage_and_rewards_ppo(runs):
    out = run(runs, {"genrm": GENRM, "ppo": {**PPO, "reward_model": "genrm"}}, ["genrm", "ppo"])
    m = out["genrm"]["metrics"]
    assert out["genrm"]["status"] == "complete"
    assert m["train_loss"] < m["train_loss_first"]
    for key in ("pairwise_accuracy", "ece", "onpolicy_accuracy", "judge_auc", "reward_mean", "reward_std"):
        assert key in m, key
    assert m["reload_max_abs_diff"] <= 1e-4 and m["reward_std"] > 0
    scorer = load_reward_model(runs / "runs" / "tiny" / "genrm")
    assert isinstance(scorer, GenerativeArtifact)  # the one loader dispatches on the stage's kind
    assert scorer.mean == pytest.approx(m["reward_mean"])
    assert out["ppo"]["status"] == "complete" and out["ppo"]["metrics"]["reward_source"] == "genrm"
    assert out["ppo"]["metrics"]["reward_stage"] == "genrm"  # the evaluation's RM figures are the genrm's
    assert f"{m['reward_mean']:.6g}" in out["ppo"]["metrics"]["reward_normalisation"]  # normalised, and says how


@pytest.mark.slow
def test_dpo_implicit_reward_is_beta_log_ratio(runs):
    dpo = {"kind": "dpo", **PAIRS, "trainer": {"max_steps": 3, "per_device_train_batch_size": 8, "beta": 0.2,
                                               "learning_rate": 1e-3, "logging_steps": 1}}
    run(runs, {"dpo": dpo}, ["dpo"])
    scorer = load_reward_model(runs / "runs" / "tiny" / "dpo")
    assert isinstance(scorer, ImplicitReward) and scorer.beta == 0.2 and "none" in scorer.normalisation
    prompts, responses = ["What is 1 + 2?", "Say hi."], ["The answer is 3.", "Hi there, friend."]
    got = score(scorer, prompts, responses, batch_size=2)
    tok = scorer.tokenizer
    for p, r, s in zip(prompts, responses, got):  # one sequence at a time, no padding
        full = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}])
        head = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
        head = head["input_ids"] if isinstance(head, dict) or hasattr(head, "keys") else head
        ids = torch.tensor([full])
        lp = []
        for m in (scorer.model, scorer.reference):
            with torch.no_grad():
                logp = torch.log_softmax(m(input_ids=ids).logits[0, :-1].float(), -1)
            lp.append(sum(float(logp[t - 1, full[t]]) for t in range(len(head), len(full))))
        assert s == pytest.approx(0.2 * (lp[0] - lp[1]), abs=1e-3)
        assert score(scorer.reference_free(), [p], [r])[0] == pytest.approx(0.2 * lp[0], abs=1e-3)
    assert any(abs(s) > 1e-6 for s in got)  # training moved the policy away from its reference
    assert "no reference" in scorer.reference_free().normalisation

    # ... the reference-free form rewards a PPO stage, which records it
    ppo = {**PPO, "reward_model": "dpo", "implicit_reward": "likelihood"}
    m = run(runs, {"dpo": dpo, "ppo": ppo}, ["ppo"])["ppo"]
    assert m["status"] == "complete" and "no reference" in m["metrics"]["reward_normalisation"]
    rows = [json.loads(line) for line in (runs / "runs" / "tiny" / "ppo" / "train_log.jsonl").read_text().splitlines()]
    assert rows and all(r["reward_raw"] < 0 for r in rows)  # a log-likelihood, not a ratio around 0

    # ... and rewards a GRPO stage (alignpipe scores it, in TRL's reward-function form)
    grpo = {"kind": "grpo", "from": "sft", "reward_model": "dpo", "data": {"embedded": "rl_prompts"}, "eval": TINY_EVAL,
            "trainer": {"max_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4,
                        "max_completion_length": 12, "learning_rate": 1e-3, "logging_steps": 1}}
    m = run(runs, {"dpo": dpo, "grpo": grpo}, ["grpo"])["grpo"]
    assert m["status"] == "complete" and m["metrics"]["reward_stage"] == "dpo"


@pytest.mark.slow
def test_grpo_with_a_loopback_judge_as_its_reward(runs, endpoint):
    grpo = {"kind": "grpo", "from": "sft", "reward_function": "judge:remote", "data": {"embedded": "rl_prompts"},
            "eval": {**TINY_EVAL, "judges": {"remote": {"endpoint": endpoint, "model": "judge"}}},
            "trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
                        "max_completion_length": 12, "learning_rate": 1e-3, "logging_steps": 1}}
    m = run(runs, {"grpo": grpo}, ["grpo"])["grpo"]
    assert m["status"] == "complete"
    counts = {k: v for k, v in m["metrics"].items() if k.startswith("reward_judge_")}
    assert counts["reward_judge_responses"] == 2 * 8 and counts["reward_judge_judge_calls"] > 0
    assert counts["reward_judge_unrewarded"] <= counts["reward_judge_responses"]


def test_genrm_and_dpo_stages_can_be_named_as_reward_models(tmp_path):
    stages = {"genrm": GENRM, "dpo": {"kind": "dpo", **PAIRS, "reward_model": "genrm"},
              "ppo": {**PPO, "reward_model": "dpo"}, "ppo2": {**PPO, "reward_model": "sft"}}
    path = write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages=stages))
    with pytest.raises(RecipeError, match="'sft' is not a reward stage"):  # a plain policy gives no reward
        validate(load_recipe(path))
    del stages["ppo2"]
    validate(load_recipe(write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages=stages))))


def test_likelihood_implicit_reward_needs_a_dpo_stage(tmp_path):
    stages = {"genrm": GENRM, "dpo": {"kind": "dpo", **PAIRS}}
    for ppo, needle in (({**PPO, "reward_model": "genrm", "implicit_reward": "likelihood"}, "DPO-family"),
                        ({**PPO, "reward_model": "dpo", "implicit_reward": "both"}, "not one of")):
        path = write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages={**stages, "ppo": ppo}))
        with pytest.raises(RecipeError, match=needle):
            validate(load_recipe(path))
    ppo = {**PPO, "reward_model": "dpo", "implicit_reward": "likelihood"}
    validate(load_recipe(write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs",
                                                                    extra_stages={**stages, "ppo": ppo}))))


def test_ppo_refuses_a_pairwise_judge_and_an_unknown_one(tmp_path, endpoint):
    judges = {"remote": {"endpoint": endpoint, "model": "judge"}}
    for fn, needle in (("judge:remote", "pairwise judge"), ("judge:nobody", "not in this stage's eval.judges")):
        ppo = {**PPO, "reward_function": fn, "eval": {**TINY_EVAL, "judges": judges}}
        path = write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages={"ppo": ppo}))
        with pytest.raises(RecipeError, match=needle):
            validate(load_recipe(path))


def test_report_sets_every_reward_kind_side_by_side(tmp_path):
    from types import SimpleNamespace

    from alignpipe.report.figures import Stage
    from alignpipe.report.reward_table import reward_comparison

    def stage(name, kind, **metrics):
        return Stage(name, tmp_path / name, {"kind": kind, "status": "complete", "metrics": metrics})

    run = SimpleNamespace(stages=[stage("sft", "sft"), stage("reward", "reward", pairwise_accuracy=0.967,
                                                             onpolicy_wrong_answer_accuracy=0.52, ece=0.05),
                                  stage("genrm", "genrm", pairwise_accuracy=0.95, onpolicy_wrong_answer_accuracy=0.8),
                                  stage("dpo", "dpo", implicit_accuracy=0.9)])
    lines = reward_comparison(run)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"stage", "reward", "genrm", "dpo"}  # sft gives no reward
    assert "0.520" in rows["reward"] and "0.800" in rows["genrm"] and "0.900" in rows["dpo"]
    assert rows["dpo"].count("n/a") == 4  # measured only on held-out pairs: said, not invented
    assert reward_comparison(SimpleNamespace(stages=run.stages[:2])) == []  # one reward: nothing to compare


def test_a_judge_used_as_the_reward_is_no_longer_independent_evidence(tmp_path, endpoint):
    from alignpipe.eval.independence import optimised_judges

    judges = {"remote": {"endpoint": endpoint, "model": "judge"}, "other": {"endpoint": endpoint, "model": "j2"}}
    grpo = {"kind": "grpo", "from": "sft", "reward_function": "judge:remote", "data": {"embedded": "rl_prompts"},
            "eval": {**TINY_EVAL, "judges": judges}}
    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", tiny_recipe(tmp_path / "runs", extra_stages={"grpo": grpo})))
    out = optimised_judges(recipe, "grpo", None)
    assert "remote" in out and "judge:remote" in out["remote"]
    assert "other" not in out  # another judge still counts as evidence
