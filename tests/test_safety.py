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


def test_trust_remote_code_is_off_and_recorded(tiny_run):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["trust_remote_code"] is False
    assert manifest["recipe_settings"]["model"]["trust_remote_code"] is False


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
    cmd = child_command(recipe, "dpo", ["stages.dpo.trainer.beta=$(id)"], force=True, restart=False, keep=2)
    assert cmd[:4] == [sys.executable, "-m", "alignpipe.cli", "run"]
    assert all(isinstance(a, str) for a in cmd)
    assert str(tmp_path / "r; rm -rf x.yaml") in cmd and "stages.dpo.trainer.beta=$(id)" in cmd


def test_every_torch_load_is_weights_only():
    """alignpipe's own torch.load calls restrict unpickling to tensors (transformers' resume does too)."""
    assert [p for tree, where in _package() for p in unsafe_loads(tree, where)] == []


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
