"""What a LLaMA-Factory / TRL user meets in their first hour (issue 33): a kind's defaults are TRL's and the default
recipe spells what was tuned on the embedded world; rates carry their counts; a missed gate stops only the stages
built on it; `alignpipe data` agrees with itself and flags template placeholders; small console cuts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_base, stage_manifest, tiny_recipe, write_yaml

import alignpipe
from alignpipe.cli import main
from alignpipe.pipeline.runner import summary_table
from alignpipe.recipe.parse import load_recipe, to_plain

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- defaults


def _dpo_args(recipe, name="dpo"):
    from trl import DPOConfig

    from alignpipe.stages import dpo
    from alignpipe.stages.context import make_context

    return make_context(recipe, name).trainer_args(DPOConfig, **dpo.trainer_defaults())


def test_dpo_kind_default_loss_is_trls(tmp_path):
    # today: [sigmoid, sft] with weights [1, 2], a choice tuned on the embedded world
    from trl import DPOConfig

    recipe = load_recipe(write_yaml(tmp_path / "r.yaml", {"name": "r", "stages": {
        "sft": {"data": {"embedded": "sft"}}, "dpo": {"from": "sft", "data": {"embedded": "pairs"}}}}))
    args = _dpo_args(recipe)
    fields = DPOConfig.__dataclass_fields__
    assert args.loss_type == fields["loss_type"].default_factory() == ["sigmoid"]
    assert args.loss_weights is None is fields["loss_weights"].default and args.beta == fields["beta"].default


def test_default_recipe_resolves_dpo_as_before():
    """The default pipeline's DPO trains on what it trained on before the kind's default moved: the loss and every
    value the kind sets, as main resolved them (2026-12-07). Its resolved config (manifest, fingerprint) names
    the loss itself, so the fingerprint is the one it had."""
    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    args = _dpo_args(recipe)
    assert (args.loss_type, args.loss_weights, args.beta) == (["sigmoid", "sft"], [1.0, 2.0], 0.1)
    assert (args.learning_rate, args.max_steps, args.per_device_train_batch_size) == (2e-4, 100, 32)
    assert (args.lr_scheduler_type.value, args.warmup_steps, args.max_length) == ("cosine", 5, 128)
    assert to_plain(recipe.stages["dpo"])["trainer"]["loss_weights"] == [1.0, 2.0]


def test_the_loss_is_said_at_the_stage_start():
    from types import SimpleNamespace

    from alignpipe.stages.dpo import describe_loss

    assert describe_loss(SimpleNamespace(loss_type=["sigmoid"], loss_weights=None, beta=0.1)) == "sigmoid, beta 0.1"
    assert describe_loss(SimpleNamespace(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 2.0], beta=0.1)) == \
        "1 x sigmoid + 2 x sft, beta 0.1"


# --------------------------------------------------------------------------- counts beside rates


def test_rates_in_the_table_carry_their_counts():
    # today: "implicit_accuracy 1.000" on 2 held-out pairs, with no count beside it
    table = summary_table({"dpo": {"kind": "dpo", "status": "complete", "wall_time_s": 3, "metrics": {
        "implicit_accuracy": 1.0, "implicit_accuracy_n": 2, "judge_pass_rate": 0.5, "judge_total": 16,
        "train_loss": 1.5}}})
    assert "1.000 (n=2)" in table and "0.500 (n=16)" in table and "1.500 (n=" not in table


# --------------------------------------------------------------------------- gates


@pytest.mark.slow
def test_a_missed_gate_stops_only_the_stages_built_on_it(tiny_base, tmp_path, capsys):
    # today: a gate missed on reward printed "not running dpo" though dpo depends only on sft
    runs = tmp_path / "runs"
    copy_base(tiny_base, runs)
    leaf = {"from": "sft", "data": {"embedded": "pairs"}, "eval": {"enabled": False},
            "trainer": {"max_steps": 2, "per_device_train_batch_size": 8}}
    data = tiny_recipe(runs, extra_stages={"reward": {**leaf, "gates": ["pairwise_accuracy >= 1.5"]},
                                           "dpo": dict(leaf), "dpo_on_reward": {**leaf, "kind": "dpo",
                                                                                "reward_model": "reward"}})
    recipe = write_yaml(tmp_path / "gated.yaml", data)
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 2  # the run still fails: a gate was missed
    err = capsys.readouterr().err
    assert "stage reward missed a gate: not running dpo_on_reward; still running dpo" in err
    assert stage_manifest(runs / "tiny" / "dpo")["status"] == "complete"
    assert not (runs / "tiny" / "dpo_on_reward").exists()
    assert "gate missed" in err.strip().splitlines()[-1]


def test_data_command_with_and_without_as_agree(tmp_path, capsys):
    # today: no --as said "5 kept, 0 dropped"; --as conversations "4 kept, 1 dropped ... a stage would stop"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)] + [{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = []
    for extra in ([], ["--as", "conversations"]):
        capsys.readouterr()
        main(["data", str(path), *extra])
        outs.append(capsys.readouterr().out)
    counts = [next(line for line in out.splitlines() if "read" in line and "kept" in line) for out in outs]
    assert counts[0] == counts[1], counts


def test_template_placeholders_are_flagged_by_line(tmp_path, capsys):
    # today: LLaMA-Factory's identity.json `{{name}}` / `{{author}}` pass unflagged
    rows = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."},
            {"instruction": "Hi", "input": "", "output": "Hello."},
            {"instruction": "Name?", "input": "", "output": "{{name}}"}]
    path = tmp_path / "identity.json"
    path.write_text(json.dumps(rows))
    assert main(["data", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "placeholders:" in x)
    assert "2 rows" in line and "{{name}}" in line and "{{author}}" in line and "row 1" in line and "3" in line


# --------------------------------------------------------------------------- trackers


def test_mlflow_store_is_read_by_the_users_own_client_as_alignpipe_says(tmp_path, monkeypatch, capsys):
    # today: a new shell's mlflow.search_runs refused the file store (MLFLOW_ALLOW_FILE_STORE was set only inside
    # alignpipe's process) and nothing said so
    import os
    import shlex
    import subprocess
    import sys
    from types import SimpleNamespace

    pytest.importorskip("mlflow")
    from alignpipe.runtime import tracking

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    recipe = SimpleNamespace(name="firsthour", tracking=["mlflow"], run_root=tmp_path / "runs" / "firsthour")
    runs = tracking.start(SimpleNamespace(recipe=recipe, name="dpo_b01"), {"stage": "dpo_b01"})
    runs.log({"implicit_accuracy": 0.75}, step=1)
    runs.finish()
    line = next(x for x in capsys.readouterr().err.splitlines() if "mlflow: runs in the file store" in x)
    command = shlex.split(line.split("MLFLOW_ALLOW_FILE_STORE=true: ", 1)[1].split(" (or set", 1)[0])
    env_var, python, flag, code = command
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env[env_var.split("=")[0]] = env_var.split("=")[1]
    out = subprocess.run([sys.executable, flag, code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dpo_b01" in out.stdout or "[1 rows x" in out.stdout, out.stdout  # pandas may elide columns


# --------------------------------------------------------------------------- several processes


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_the_first_process_writes_to_the_console(tmp_path, rank):
    # today: under `accelerate launch` with 2 processes every line, the one-line refusal too, printed twice
    import os
    import subprocess
    import sys

    env = {**os.environ, "RANK": rank, "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": f"t{os.getpid()}",
           "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(alignpipe.__file__).resolve().parents[1])}
    bad = write_yaml(tmp_path / "bad.yaml", {"name": "bad", "stages": {"sft": {"data": {"embedded": "nope"}}}})
    out = subprocess.run([sys.executable, "-m", "alignpipe.cli", "validate", str(bad)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    logs = list(tmp_path.glob("alignpipe-*-rank1.log"))
    if rank == "0":
        assert out.stderr.count("alignpipe: error: ") == 1 and not logs
    else:
        assert out.stdout == out.stderr == ""
        assert "alignpipe: error: " in logs[0].read_text()


# --------------------------------------------------------------------------- chat and generate


def test_generate_marks_a_whitespace_only_answer(tiny_hub_model):
    # today: `"response": ""` with `tokens: 64`, and nothing saying the answer was only whitespace
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignpipe.commands.chat import answer
    from alignpipe.recipe.templates import CHATML

    tok = AutoTokenizer.from_pretrained(tiny_hub_model)
    tok.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(tiny_hub_model).eval()
    space = tok(" ", add_special_tokens=False)["input_ids"][-1]
    assert tok.decode([space]).isspace()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, sequence_bias={(space,): 1e4})
    (row,) = answer(model, tok, [[{"role": "user", "content": "hi"}]], gen, stops=[tok.eos_token_id])
    assert row["response"] == "" and row["empty"] is True and row["tokens"] == 6
    assert row["raw_response"] and row["raw_response"].isspace()


def test_chat_streams_control_bytes_as_escapes(tiny_hub_model, capsys):
    # today: a model's ESC / bidi bytes went to the terminal raw
    from transformers import AutoTokenizer

    from alignpipe.commands.chat import safe_streamer

    streamer = safe_streamer()(AutoTokenizer.from_pretrained(tiny_hub_model), skip_prompt=False)
    streamer.on_finalized_text("ok \x1b[2J\u202eevil", stream_end=True)
    assert capsys.readouterr().out == "ok \\x1b[2J\\u202eevil\n"


def test_dpo_stops_in_one_line_when_trl_would_drop_every_pair(tiny_hub_model):
    # today: TRL's reference pass failed with a raw `torch.cat(): expected a non-empty list of Tensors` traceback
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from alignpipe.errors import RecipeError
    from alignpipe.recipe.templates import CHATML
    from alignpipe.stages.dpo import check_prompts_fit

    tok = AutoTokenizer.from_pretrained(tiny_hub_model)
    tok.chat_template = CHATML
    model = SimpleNamespace(config=AutoConfig.from_pretrained(tiny_hub_model))
    args = SimpleNamespace(max_length=16, truncation_mode="keep_start")
    pair = {"prompt": [{"role": "user", "content": "a long question " * 20}]}
    short = {"prompt": [{"role": "user", "content": "hi"}]}
    check_prompts_fit("dpo", "r.yaml", tok, model, args, {"training": [pair, short], "held-out": [short]})
    with pytest.raises(RecipeError, match="every one of the 2 held-out pairs") as e:
        check_prompts_fit("dpo", "r.yaml", tok, model, args, {"training": [short], "held-out": [pair, pair]})
    assert "stages.dpo.trainer.max_length=" in e.value.one_line()


def test_data_report_counts_the_pairs_a_dpo_stage_would_drop(tiny_hub_model, tmp_path):
    # today: only "longer than max_length" (truncated); the drop of whole pairs showed first inside the run
    from transformers import AutoTokenizer

    from alignpipe.data.report import format_report, validation_report
    from alignpipe.data.sources import prepare_data
    from alignpipe.recipe.templates import CHATML

    tok = AutoTokenizer.from_pretrained(tiny_hub_model)
    tok.chat_template = CHATML
    rows = [{"prompt": "a long question " * 20 if i % 3 == 0 else "hi", "chosen": "yes", "rejected": "no"}
            for i in range(6)]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    data = prepare_data({"path": "pairs.json"}, tmp_path, "pairs")
    report = validation_report(data, tok, max_length=16)
    assert report["tokens"]["prompt_fills_max_length"] == 2
    assert "2 pairs' prompts alone fill it" in format_report(report)

