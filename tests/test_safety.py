"""Loading is safe by default: no model code runs unless the recipe trusts it, pickle weights need an
explicit opt-in, YAML cannot build Python objects, and no recipe string reaches a shell."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignpipe.cli import main
from alignpipe.errors import AlignpipeError
from alignpipe.models.loading import load_pretrained
from alignpipe.recipe.schema import ModelSpec
from conftest import REPO, tiny_recipe, write_yaml

SRC = REPO / "src" / "alignpipe"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A complete 2-step pretrain run (the smallest real model folder alignpipe writes)."""
    root = tmp_path_factory.mktemp("safety")
    recipe = tiny_recipe(root / "runs", name="safe")
    del recipe["stages"]["sft"]
    recipe["stages"]["pretrain"]["eval"] = {"enabled": False}
    recipe["stages"]["pretrain"]["trainer"]["max_steps"] = 2
    assert main(["run", str(write_yaml(root / "safe.yaml", recipe))]) == 0
    return root / "runs" / "safe" / "pretrain"


@pytest.mark.slow
def test_trust_remote_code_is_off_and_recorded(tiny_run):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["trust_remote_code"] is False
    assert manifest["recipe_settings"]["model"]["trust_remote_code"] is False


@pytest.mark.slow
def test_model_code_in_a_folder_is_not_run_without_trust(tiny_run, tmp_path):
    """A folder whose config points at its own Python (auto_map) loads with the library's class; its code
    is never imported (it would leave a marker file)."""
    folder = shutil.copytree(tiny_run / "model", tmp_path / "remote")
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    pass\n"
                                    "class EvilModel(LlamaForCausalLM):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    model = load_pretrained(folder, ModelSpec(path=str(folder)))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def _pickle_only(tiny_run: Path, dest: Path) -> Path:
    folder = shutil.copytree(tiny_run / "model", dest)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.slow
def test_pickle_weights_are_refused_unless_allowed(tiny_run, tmp_path, capsys):
    folder = _pickle_only(tiny_run, tmp_path / "bin-only")
    # loading refuses, naming the opt-in
    with pytest.raises(AlignpipeError, match="allow_pickle"):
        load_pretrained(folder, ModelSpec(path=str(folder)))
    # and a recipe on it fails before anything runs, naming the key
    recipe = tiny_recipe(tmp_path / "runs", model={"path": str(folder)})
    recipe["stages"] = {"sft": recipe["stages"]["sft"]}
    del recipe["stages"]["sft"]["from"]
    path = write_yaml(tmp_path / "bin.yaml", recipe)
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.allow_pickle" in err and "pytorch_model.bin" in err and "pickle" in err
    assert not (tmp_path / "runs").exists()
    # opting in loads the same weights
    model = load_pretrained(folder, ModelSpec(path=str(folder), allow_pickle=True))
    reference = load_file(tiny_run / "model" / "model.safetensors")
    assert all(torch.equal(p, reference[n]) for n, p in model.state_dict().items() if n in reference)


def test_yaml_cannot_build_python_objects(tmp_path, capsys):
    marker = tmp_path / "yaml-ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstages: {{sft: {{}}}}\n")
    assert main(["validate", str(path)]) == 2
    assert "YAML syntax error" in capsys.readouterr().err
    assert not marker.exists()


# --- static checks over the package source ---------------------------------------------------------

SHELL_CALLS = {("os", "system"), ("os", "popen"), ("pty", "spawn")}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            yield node, owner, name


def shell_problems(tree: ast.AST, where: str) -> list[str]:
    """Shell calls, eval/exec, shell=, and subprocesses whose command is not a fixed list of strings."""
    problems = []
    for node, owner, name in _calls(tree):
        if (owner, name) in SHELL_CALLS or (owner == "os" and name and name.startswith(("exec", "spawn"))):
            problems.append(f"{where}:{node.lineno}: {owner}.{name}")
        if isinstance(node.func, ast.Name) and name in ("eval", "exec"):  # the builtins, not model.eval()
            problems.append(f"{where}:{node.lineno}: {name}()")
        if any(k.arg == "shell" for k in node.keywords):
            problems.append(f"{where}:{node.lineno}: shell=")
        if owner == "subprocess":
            argv = node.args[0] if node.args else None
            fixed = isinstance(argv, (ast.List, ast.Tuple)) and all(
                isinstance(a, ast.Constant) and isinstance(a.value, str) for a in argv.elts)
            if not fixed:
                problems.append(f"{where}:{node.lineno}: subprocess.{name} with a computed command")
    return problems


def unsafe_loads(tree: ast.AST, where: str) -> list[str]:
    """torch.load calls without weights_only=True (a full unpickler can run code)."""
    problems = []
    for node, owner, name in _calls(tree):
        if owner == "torch" and name == "load":
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}:{node.lineno}")
    return problems


def _package():
    return [(ast.parse(p.read_text()), str(p.relative_to(SRC))) for p in sorted(SRC.rglob("*.py"))]


# the one computed argument list: `run --parallel` starts this interpreter on alignpipe.cli for each stage
# (pipeline/processes.child_command); the recipe path, stage names and --set items are single list items, no shell
COMPUTED_ARGV = {"pipeline/processes.py": "subprocess.Popen with a computed command"}


@pytest.mark.slow
def test_no_recipe_string_reaches_a_shell():
    """No shell anywhere; the subprocesses are fixed argument lists (git, for the manifest) or the stage child's."""
    problems = [p for tree, where in _package() for p in shell_problems(tree, where)]
    assert [p for p in problems if COMPUTED_ARGV.get(p.split(":")[0]) != p.split(": ", 1)[1]] == []


def test_the_stage_child_is_this_interpreter_with_one_argument_per_item(tmp_path):
    """The computed argv above: a list of strings, this Python first, a hostile recipe value kept as one item."""
    import sys
    from types import SimpleNamespace

    from alignpipe.pipeline.processes import child_command

    recipe = SimpleNamespace(path=tmp_path / "r; rm -rf x.yaml")
    cmd = child_command(recipe, ["reward", "ppo"], ["stages.dpo.trainer.beta=$(id)"], force={"reward", "ppo"},
                        restart=set(), keep=2)
    assert cmd[:4] == [sys.executable, "-m", "alignpipe.cli", "run"]
    assert all(isinstance(a, str) for a in cmd) and "reward,ppo" in cmd and "--force" in cmd
    assert str(tmp_path / "r; rm -rf x.yaml") in cmd and "stages.dpo.trainer.beta=$(id)" in cmd


def test_every_torch_load_is_weights_only():
    """alignpipe's own torch.load calls restrict unpickling to tensors (transformers' resume does too)."""
    assert [p for tree, where in _package() for p in unsafe_loads(tree, where)] == []


@pytest.mark.slow
def test_the_static_checks_can_fail():
    """The checks above see what they look for (a check that cannot fail proves nothing)."""
    bad = ast.parse("\n".join([
        "import os, subprocess, torch", "os.system(x)", "subprocess.run(cmd)", "subprocess.run(['git'], shell=True)",
        "subprocess.run(['git', name])", "subprocess.run(['git', 'status'])", "eval(s)", "model.eval()",
        "load(p).eval()", "torch.load(p)", "torch.load(p, weights_only=True)"]))
    assert [p.split(": ", 1)[1] for p in shell_problems(bad, "x")] == [
        "os.system", "subprocess.run with a computed command", "shell=", "subprocess.run with a computed command",
        "eval()"]
    assert unsafe_loads(bad, "x") == ["x:10"]


# --- a tampered or damaged run folder ------------------------------------------------------------------------


def _copy_run(tiny_run: Path, dest: Path) -> Path:
    """A copy of the tiny run folder; its pretrain stage folder."""
    return shutil.copytree(tiny_run.parent, dest / "safe") / "pretrain"


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "what is 1 plus 2?"}\n')
    return path


def _rewrite_manifest(stage: Path, change) -> dict:
    manifest = json.loads((stage / "manifest.json").read_text())
    change(manifest)
    (stage / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_tampered_manifest_cannot_turn_on_remote_code(tiny_run, tmp_path, capsys):
    """A run folder whose model has its own Python (auto_map) and whose manifest says trust_remote_code and
    allow_pickle (with the model hash updated to match, as a tamperer would): `generate` never imports that
    code. Only `--trust-remote-code` on the command line runs it."""
    from alignpipe.runfolder.manifests import fingerprint_path

    stage = _copy_run(tiny_run, tmp_path)
    marker = tmp_path / "code-ran"
    (stage / "model" / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((stage / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (stage / "model" / "config.json").write_text(json.dumps(config))

    def trust(m):
        m["trust_remote_code"] = True
        m["recipe_settings"]["model"].update(trust_remote_code=True, allow_pickle=True)
        m.setdefault("outputs", {})["model"] = fingerprint_path(stage / "model")

    _rewrite_manifest(stage, trust)
    args = ["generate", str(stage), "--in", str(_prompts(tmp_path)), "--out", str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "2"]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert not marker.exists()
    assert main([*args, "--trust-remote-code"]) == 0, capsys.readouterr().err
    assert marker.exists()  # the flag is what turns it on


def test_a_flipped_weight_byte_is_refused_by_generate_and_export(tiny_run, tmp_path, capsys, monkeypatch):
    """One bit flipped in the data region of model.safetensors (the header still parses): the model's files
    no longer match the hash the manifest records, and `generate` and `export` refuse with one line; also
    after an earlier load remembered the folder as verified (the cache keys on each file's change time)."""
    from alignpipe.runfolder.manifests import verified_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stage = _copy_run(tiny_run, tmp_path)
    assert main(["generate", str(stage), "--in", str(_prompts(tmp_path)), "--out", str(tmp_path / "ok.jsonl"),
                 "--max-new-tokens", "2"]) == 0
    assert verified_cache(stage / "model").is_file()
    weights = stage / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    for args in (["generate", str(stage), "--in", str(_prompts(tmp_path)), "--out", str(tmp_path / "o.jsonl")],
                 ["export", str(stage), str(tmp_path / "exported")]):
        assert main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "do not match" in lines[0] and str(stage / "model") in lines[0], lines
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("damage", ["truncated", "wrong_types"])
def test_a_complete_stage_with_an_unreadable_manifest_goes_to_history(damage, tiny_run, tmp_path, capsys):
    """A truncated manifest.json of a complete stage (or one with a field of the wrong type): `run` trains the
    stage again and keeps the old folder, weights and all, in `.history/` instead of deleting it."""
    stage = _copy_run(tiny_run, tmp_path)
    weights = (stage / "model" / "model.safetensors").read_bytes()
    text = (stage / "manifest.json").read_text()
    if damage == "truncated":
        (stage / "manifest.json").write_text(text[: len(text) // 2])
    else:
        _rewrite_manifest(stage, lambda m: m.update(lineage=7))
    damaged = (stage / "manifest.json").read_text()
    recipe = tiny_recipe(tmp_path, name="safe")
    del recipe["stages"]["sft"]
    recipe["stages"]["pretrain"]["eval"] = {"enabled": False}
    recipe["stages"]["pretrain"]["trainer"]["max_steps"] = 2
    assert main(["run", str(write_yaml(tmp_path / "safe.yaml", recipe))]) == 0, capsys.readouterr().err
    kept = sorted((tmp_path / "safe" / ".history" / "pretrain").glob("*/model/model.safetensors"))
    assert [p.read_bytes() == weights for p in kept] == [True], kept
    assert (kept[0].parents[1] / "manifest.json").read_text() == damaged
    assert json.loads((stage / "manifest.json").read_text())["status"] == "complete"
    capsys.readouterr()
    assert main(["show", str(stage.parent)]) == 0
    assert f"kept aside: {kept[0].parents[1]}" in capsys.readouterr().out


BAD_MANIFESTS = {
    "wrong_types": lambda m: m.update(lineage=7, recipe_settings="model", parent="x", metrics=[1]),
    "status_a_list": lambda m: m.update(status=["complete"]),
    "not_an_object": None,
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
@pytest.mark.parametrize("command", ["show", "report", "chat", "export", "generate"])
def test_a_manifest_of_wrong_types_is_one_line(case, command, tiny_run, tmp_path, capsys):
    stage = _copy_run(tiny_run, tmp_path)
    if BAD_MANIFESTS[case] is None:
        (stage / "manifest.json").write_text("[1, 2, 3]\n")
    else:
        _rewrite_manifest(stage, BAD_MANIFESTS[case])
    args = {"show": ["show", str(stage.parent)], "report": ["report", str(stage.parent)],
            "chat": ["chat", str(stage)], "export": ["export", str(stage), str(tmp_path / "x")],
            "generate": ["generate", str(stage), "--in", str(_prompts(tmp_path)), "--out", str(tmp_path / "o")]}
    capsys.readouterr()
    assert main(args[command]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "manifest.json" in lines[0] and "fix:" in lines[0], lines


def test_show_reads_no_unbounded_file_a_manifest_names(tiny_run, tmp_path, capsys):
    """A manifest naming /dev/zero (or a huge file) as its recipe: `show` reads at most a bounded amount."""
    stage = _copy_run(tiny_run, tmp_path)
    _rewrite_manifest(stage, lambda m: m.update(recipe="/dev/zero"))
    assert main(["show", str(stage.parent)]) == 0
    assert "pretrain" in capsys.readouterr().out


def test_a_broken_safetensors_header_is_one_line(tiny_run, tmp_path, capsys):
    """The header length of model.safetensors garbled (and the manifest's hash made to match): one line."""
    from alignpipe.runfolder.manifests import fingerprint_path

    stage = _copy_run(tiny_run, tmp_path)
    weights = stage / "model" / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    _rewrite_manifest(stage, lambda m: m["outputs"].update(model=fingerprint_path(stage / "model")))
    capsys.readouterr()
    assert main(["generate", str(stage), "--in", str(_prompts(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(stage / "model") in lines[0] and "fix:" in lines[0], lines


def test_data_escapes_control_characters_and_survives_deep_nesting(tmp_path, capsys):
    """`alignpipe data` on a file whose text holds terminal escape sequences prints them escaped (a file
    cannot clear the screen or retitle the terminal), and a 10,000-deep nested line is a dropped row, not a
    traceback."""
    rows = [{"messages": [{"role": "user", "content": f"hello\x1b]0;owned\x07\x1b[2J {i}\r"},
                          {"role": "assistant", "content": "hi\x1b[31m red\x9b"}]} for i in range(3)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[" * 10_000 + "]" * 10_000 + "\n")
    capsys.readouterr()
    assert main(["data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hello" in out and "\\x1b" in out
    assert not any(c in out for c in "\x1b\x07\x9b\r"), repr(out[:400])


def test_a_refused_pickle_in_a_checkpoint_is_one_line_on_resume(tiny_run, tmp_path, capsys):
    """An interrupted stage whose checkpoint's optimizer.pt holds a pickled function (weights-only loading
    refuses it): resuming fails with one line naming the checkpoints and --restart, not a traceback."""
    import os

    stage = _copy_run(tiny_run, tmp_path)
    _rewrite_manifest(stage, lambda m: m.update(status="interrupted"))
    checkpoint = sorted((stage / "checkpoints").glob("checkpoint-*"))[-1]
    torch.save({"state": os.getcwd}, checkpoint / "optimizer.pt")
    recipe = tiny_recipe(tmp_path, name="safe")
    del recipe["stages"]["sft"]
    recipe["stages"]["pretrain"]["eval"] = {"enabled": False}
    recipe["stages"]["pretrain"]["trainer"]["max_steps"] = 2
    capsys.readouterr()
    assert main(["run", str(write_yaml(tmp_path / "safe.yaml", recipe))]) == 2
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("[alignpipe]")]
    assert len(lines) == 1 and "--restart" in lines[0] and "checkpoint" in lines[0], lines


def test_eval_takes_no_recipe_from_inside_the_run_folder(tiny_run, tmp_path, capsys):
    """A run folder whose manifest names a recipe shipped inside the folder (a recipe runs the code it names):
    `alignpipe eval` without --recipe refuses it with one line instead of loading it."""
    stage = _copy_run(tiny_run, tmp_path)
    inside = stage.parent / "recipe.yaml"
    recipe = tiny_recipe(tmp_path, name="safe")
    del recipe["stages"]["sft"]
    write_yaml(inside, recipe)
    _rewrite_manifest(stage, lambda m: m.update(recipe=str(inside)))
    capsys.readouterr()
    assert main(["eval", str(stage)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--recipe" in lines[0] and "inside the run folder" in lines[0], lines
