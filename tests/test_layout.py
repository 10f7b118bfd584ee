"""The source layout: packages are layers, each imports only the layers below it, and no import circle.

The import graph is read with `ast` from src/alignpipe: every `import` and `from ... import`, at the top of a
file and inside functions alike (an import deferred into a function still ties the two modules). A module
imports its package's `__init__` too, when it imports a module of another package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "alignpipe"

# The layers, lowest first. A module may import modules of its own layer and of the layers below it only.
LAYERS = (
    ("alignpipe", "alignpipe.errors", "alignpipe.callables", "alignpipe.local_http"),  # the version, the errors,
    # `module:function` names, the rules of every local web page or server (token, Host, Origin, body size)
    ("alignpipe.runfolder",),  # manifests, versions, the lock, one atomic writer and JSONL reader
    ("alignpipe.runtime",),  # processes, threads, padding-free batches, progress, trackers
    ("alignpipe.recipe",),  # schema and parser, the kinds registry, data specs, chat templates
    ("alignpipe.data",),  # formats, sources, the split, the embedded world
    ("alignpipe.models",),  # loading models and tokenizers, template checks, the tiny model
    ("alignpipe.reward",),  # the reward model's artifact and metrics
    ("alignpipe.eval",),  # a policy's evaluation and its parts
    ("alignpipe.rl",),  # PPO and its rewards
    ("alignpipe.labelling",),  # the label stage's queue, labellers, page and pairs
    ("alignpipe.stages",),  # the stage kinds, their context and training loop
    ("alignpipe.pipeline",),  # the plan, the runner, stage processes, validate, gates
    ("alignpipe.report",),  # the run's report
    ("alignpipe.serving",),  # a stage behind an OpenAI-compatible API; GGUF export
    ("alignpipe.ui",),  # `alignpipe ui`: the local web page over run folders
    ("alignpipe.commands",),  # the CLI's commands
    ("alignpipe.cli",),
)
# heavy libraries: a command that only reads a recipe (`--help`, `validate`) must not import them
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "matplotlib")


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module under src/alignpipe (a package by its name)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The alignpipe modules that module `name` imports anywhere in its file (packages on the way included)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in wanted:
            while target not in known and "." in target:  # an attribute of a module: the module
                target = target.rsplit(".", 1)[0]
            if target not in known:
                continue
            parts = target.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ first
            for i in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:i])
                if ancestor in known and ancestor != name and not name.startswith(ancestor + "."):
                    targets.add(ancestor)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == unit or module.startswith(unit + ".") and unit != PACKAGE for unit in layer):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_graph_sees_a_circle_when_there_is_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_only_lower_layers():
    upward = [f"{a} -> {b}" for a, targets in sorted(import_graph().items()) for b in sorted(targets)
              if layer_of(b) > layer_of(a)]
    assert upward == []


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


def heavy_after(code: str, tmp_path: Path) -> tuple[list[str], subprocess.CompletedProcess]:
    """The heavy libraries in `sys.modules` after a fresh interpreter runs `code` (which sets `rc`)."""
    script = (f"import sys\n{code}\n"
              f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    heavy = [line for line in done.stdout.splitlines() if line.startswith("heavy:")]
    assert heavy, done.stdout + done.stderr
    return [m for m in heavy[-1].removeprefix("heavy:").split(",") if m], done


def test_help_imports_no_heavy_library(tmp_path):
    loaded, done = heavy_after("from alignpipe.cli import main\n"
                               "try:\n    rc = main(['--help'])\nexcept SystemExit as e:\n    rc = e.code", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage: alignpipe" in done.stdout
    assert loaded == []


@pytest.mark.parametrize("recipe", [
    "name: bad\nstages:\n  sft: {kind: nope}\n",  # an unknown kind
    "name: bad\nmodel: {path: x}\nstages:\n  sft: {from: pretrain}\n",  # a parent that is not a stage
])
def test_validate_of_a_bad_recipe_imports_no_heavy_library(tmp_path, recipe):
    (tmp_path / "bad.yaml").write_text(recipe)
    loaded, done = heavy_after("from alignpipe.cli import main\nrc = main(['validate', 'bad.yaml'])", tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("alignpipe: error:") and len(done.stderr.strip().splitlines()) == 1
    assert loaded == []


MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 200


def test_no_function_over_80_lines_and_no_class_over_200():
    too_long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES \
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if limit is not None and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines (at most {limit})")
    assert too_long == []
