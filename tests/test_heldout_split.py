"""One held-out split per recipe: sft, reward and dpo stages fed files that share prompts (in different formats,
spellings and turn counts) never train on a prompt another stage holds out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignpipe.data.split import heldout_prompts, prompt_key
from alignpipe.recipe.parse import load_recipe
from alignpipe.stages.context import StageContext
from conftest import write_yaml


pytestmark = pytest.mark.slow  # every test here trains a model


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_hub_model) -> Path:
    return tiny_hub_model  # the session's, built once


def write_files(folder: Path, n: int = 120) -> dict[str, Path]:
    questions = [f"What is {i} plus {i + 1}?" for i in range(n)]  # sorted, as files often are
    sft = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{2 * i + 1}."}]}
           for i, q in enumerate(questions)]
    # multi-turn continuations of the same prompts: they must fall on the same side
    sft += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{2 * i + 1}."},
                          {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]}
            for i, q in enumerate(questions[::3])]
    # the same prompts, spelled differently, as prompt/chosen/rejected and as HH transcripts
    pairs = [{"prompt": f"  {q.upper()} ", "chosen": f"{2 * i + 1}.", "rejected": "No idea."}
             for i, q in enumerate(questions)]
    hh = [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {2 * i + 1}.", "rejected": f"\n\nHuman: {q}\n\nAssistant: Dunno."}
          for i, q in enumerate(questions[: n // 2])]
    return {"sft": jsonl(folder / "chat.jsonl", sft), "reward": jsonl(folder / "prefs.jsonl", pairs),
            "dpo": jsonl(folder / "hh.jsonl", hh)}


def recipe_file(folder: Path, model_dir: Path, files: dict[str, Path]) -> Path:
    trainer = {"max_steps": 1, "max_length": 64}
    stages = {"sft": {"data": {"path": str(files["sft"])}, "trainer": trainer},
              "reward": {"from": "sft", "data": {"path": str(files["reward"])}, "trainer": trainer},
              "dpo": {"from": "sft", "data": {"path": str(files["dpo"])}, "trainer": trainer}}
    return write_yaml(folder / "r.yaml", {"name": "split", "seed": 0, "runs_dir": str(folder / "runs"),
                                          "model": {"path": str(model_dir)}, "chat_template": "chatml",
                                          "stages": stages})


def contexts(path: Path) -> dict[str, StageContext]:
    recipe = load_recipe(path)
    return {n: StageContext(recipe, n, cfg, recipe.stage_dir(n), None) for n, cfg in recipe.stages.items()}


def test_no_stage_trains_on_a_prompt_any_stage_holds_out(tmp_path, model_dir):
    from alignpipe.stages import reward, sft
    from alignpipe.stages.helpers import preference_pairs

    ctx = contexts(recipe_file(tmp_path, model_dir, write_files(tmp_path)))
    tok = ctx["reward"].load_tokenizer()
    splits = {"sft": sft.conversations(ctx["sft"]), "dpo": preference_pairs(ctx["dpo"])}
    r_train, r_held, _ = reward.pair_rows(ctx["reward"], tok, 64)
    splits["reward"] = (r_train, r_held)
    train = {name: {prompt_key(r) for r in rows} for name, (rows, _) in splits.items()}
    held = {name: {prompt_key(r) for r in rows} for name, (_, rows) in splits.items()}
    all_train, all_held = set().union(*train.values()), set().union(*held.values())
    assert all(held.values()) and not all_held & all_train
    assert held["sft"] & held["reward"]  # the same prompts are held out across formats and spellings
    # multi-turn continuations sit with their prompt; the held-out rows are not the file's first rows
    sft_held = splits["sft"][1]
    assert any(len(r["messages"]) == 4 for r in sft_held)
    assert [prompt_key(r) for r in sft_held] != [f"what is {i} plus {i + 1}?" for i in range(len(sft_held))]
    # written once for the recipe, with its hash, and the hash is in every stage's report
    saved = json.loads((tmp_path / "runs" / "split" / "heldout.json").read_text())
    assert set(saved["stages"]) == {"sft", "reward", "dpo"}
    assert set(saved["stages"]["sft"]) == held["sft"]
    for name in ("sft", "reward", "dpo"):
        report = json.loads((tmp_path / "runs" / "split" / name / "data_report.json").read_text())
        assert report["split"]["heldout_hash"] == saved["hash"]
    # what the policy evaluation gets: one row per held-out prompt, with the answer to compare with
    prompts = heldout_prompts(ctx["dpo"])
    assert {p["key"] for p in prompts} == all_held
    first = next(p for p in prompts if p["stage"] == "sft" and len(p["prompt"]) == 1)
    assert first["prompt"][0]["role"] == "user" and first["reference"].endswith(".")


def test_a_tiny_file_still_holds_out_a_prompt(tmp_path, model_dir):
    from alignpipe.stages import sft

    files = write_files(tmp_path)
    files["sft"] = jsonl(tmp_path / "few.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                               {"role": "assistant", "content": "a"}]}
                                                 for i in range(6)])
    ctx = contexts(recipe_file(tmp_path, model_dir, files))
    train, held = sft.conversations(ctx["sft"])
    assert len(held) == 1 and len(train) == 5


def test_an_explicit_eval_file_is_held_out_everywhere_and_checked_for_overlap(tmp_path, model_dir, capsys):
    from alignpipe.cli import main
    from alignpipe.stages import sft
    from alignpipe.stages.helpers import preference_pairs

    files = write_files(tmp_path)
    evals = jsonl(tmp_path / "eval.jsonl", [{"prompt": "What is 500 plus 501?", "chosen": "1001.", "rejected": "2."}])
    path = recipe_file(tmp_path, model_dir, files)
    import yaml

    data = yaml.safe_load(path.read_text())
    data["stages"]["dpo"]["eval"] = {"data": {"path": str(evals)}}
    # the same prompt in sft's file: held out there too, because dpo's eval file names it
    extra = {"messages": [{"role": "user", "content": "what is 500  plus 501?"}, {"role": "assistant", "content": "x"}]}
    with open(files["sft"], "a") as f:
        f.write(json.dumps(extra) + "\n")
    write_yaml(path, data)
    ctx = contexts(path)
    train, held = preference_pairs(ctx["dpo"])
    assert [prompt_key(r) for r in held] == ["what is 500 plus 501?"]
    sft_train, _ = sft.conversations(ctx["sft"])
    assert "what is 500 plus 501?" not in {prompt_key(r) for r in sft_train}
    # an eval file sharing prompts with the stage's own training file is refused before anything runs
    data["stages"]["dpo"]["eval"] = {"data": {"path": str(files["dpo"])}}
    write_yaml(path, data)
    assert main(["validate", str(path)]) == 2
    assert "stages.dpo.eval.data: 60 prompts of the eval file are also in the training data" in capsys.readouterr().err


def test_when_every_stage_names_its_held_out_file_nothing_is_hashed_out(tmp_path, model_dir):
    """The files are the split (as `world export` writes them): every training row is trained on, in order;
    one stage without its own file brings the hashed split back for all."""
    from alignpipe.stages import sft
    from alignpipe.stages.helpers import preference_pairs

    files = write_files(tmp_path)
    path = recipe_file(tmp_path, model_dir, files)
    import yaml

    data = yaml.safe_load(path.read_text())
    for name in ("sft", "reward", "dpo"):
        data["stages"][name]["eval"] = {"data": {"path": str(jsonl(tmp_path / f"{name}_eval.jsonl", [
            {"prompt": f"What is {900 + i} plus 1?", "chosen": "ok.", "rejected": "no."} for i in range(3)]))}}
    data["stages"]["sft"]["eval"]["data"]["path"] = str(jsonl(tmp_path / "sft_eval.jsonl", [
        {"messages": [{"role": "user", "content": "What is 1000 plus 1?"}, {"role": "assistant", "content": "1001."}]}]))
    write_yaml(path, data)
    ctx = contexts(path)
    sft_rows = [json.loads(x) for x in files["sft"].read_text().splitlines()]
    train, held = sft.conversations(ctx["sft"])
    assert list(train) == sft_rows and [prompt_key(r) for r in held] == ["what is 1000 plus 1?"]
    d_train, d_held = preference_pairs(ctx["dpo"])
    assert len(d_train) == 60 and len(d_held) == 3
    assert {p["key"] for p in heldout_prompts(ctx["dpo"])} == {"what is 1000 plus 1?"} | {
        f"what is {900 + i} plus 1?" for i in range(3)}

    del data["stages"]["reward"]["eval"]  # one stage without its own file: the seeded hash holds prompts out again
    write_yaml(path, data)
    train, _ = sft.conversations(contexts(path)["sft"])
    assert 0 < len(sft_rows) - len(train) < len(sft_rows) // 5


def test_validate_shows_what_each_stage_read(tmp_path, model_dir, capsys):
    from alignpipe.cli import main

    files = write_files(tmp_path)
    with open(files["reward"], "a") as f:  # one invalid line and one bad row: both listed, in one pass
        f.write('{"prompt": "broken",\n' + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    assert main(["validate", str(recipe_file(tmp_path, model_dir, files))]) == 0
    out = capsys.readouterr().out
    assert "stage sft (sft):" in out and "messages (detected from columns messages" in out
    assert "160 read -> 160 kept" in out
    assert "tokens after the template: p50" in out and "longer than max_length 64" in out
    assert "122 read -> 120 kept" in out
    assert "invalid_json: invalid JSON" in out and "(line 121)" in out and "identical_pair" in out and "(line 122)" in out
    assert "split " in out and "held out (" in out and out.rstrip().endswith("ok (3 stages: sft, reward, dpo)")
