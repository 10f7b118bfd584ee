"""Gates: thresholds on a stage's metrics, written in the recipe and checked when the stage completes.

    gates: ["judge_pass_rate >= sft.judge_pass_rate + 0.1", "kl_to_reference <= 5"]
    gates: {rm_win_rate_vs_sft: ">= 0.55", eot_rate: ">= 0.95"}      # the same, as a mapping

Every number a stage reports can be gated, the evaluation's the same for embedded and user data:
`eot_rate`, `repetition_rate`, `distinct_2`, `mean_response_tokens`, `kl_to_reference`, `mean_reward`,
`rm_win_rate_vs_parent`, `rm_win_rate_vs_sft`, `<verifier>_pass_rate`, `<judge>_win_rate_vs_parent`,
`<judge>_position_consistency` and `lmeval_<task>_<metric>` (see alignpipe.eval.policy).

A gate is `<metric> <op> <expression>`: the metric is one of this stage's own metrics; the expression
is arithmetic (+ - * / and parentheses) over numbers, this stage's metrics (`eval_loss`) and other
stages' metrics (`sft.judge_pass_rate`). It is parsed by a small recursive-descent parser, never by
`eval`. A missed gate leaves the stage complete (its artifacts are kept), records the result in the
stage's `gates.json` (`[{expr, value, threshold, passed}]`) and makes `alignpipe run` stop with a GateError.

Gates are not part of a stage's fingerprint: they are checked against the metrics its manifest
recorded, so changing only a threshold re-checks the stage (`alignpipe run`, `alignpipe gates runs/x`)
without training it again. `gates.json` is the latest check; the manifest is never rewritten for it
(its hash is what downstream stages are fingerprinted on).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from alignpipe.errors import AlignpipeError, RecipeError
from alignpipe.runfolder.files import write_json_atomic
from alignpipe.runfolder.manifests import read_manifest

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
                    r"|(?P<ref>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)"
                    r"|(?P<op>>=|<=|==|!=|>|<)|(?P<sym>[-+*/()]))")


class GateError(AlignpipeError):
    """A stage finished but missed one of its gates (the stage stays complete; artifacts are kept)."""


class GateSyntaxError(ValueError):
    pass


# An expression tree: ("num", value) | ("ref", stage or None, metric) | ("neg", x) | (op, left, right)
Node = tuple


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str  # this stage's metric, the left-hand side
    op: str
    rhs: Node

    def refs(self) -> list[tuple[str | None, str]]:
        """Every (stage, metric) the gate reads; stage None means the gated stage itself."""
        out = [(None, self.metric)]

        def walk(node: Node) -> None:
            if node[0] == "ref":
                out.append((node[1], node[2]))
            elif node[0] != "num":
                for child in node[1:]:
                    walk(child)

        walk(self.rhs)
        return out


# --- parsing ------------------------------------------------------------------------------------


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise GateSyntaxError(f"unexpected character {text[pos:].lstrip()[:1]!r} at position {pos}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens, self.i = tokens, 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise GateSyntaxError("the expression ends too early")
        self.i += 1
        return tok

    def expr(self) -> Node:
        node = self.term()
        while (tok := self.peek()) and tok[1] in "+-" and tok[0] == "sym":
            self.i += 1
            node = (tok[1], node, self.term())
        return node

    def term(self) -> Node:
        node = self.factor()
        while (tok := self.peek()) and tok[1] in "*/" and tok[0] == "sym":
            self.i += 1
            node = (tok[1], node, self.factor())
        return node

    def factor(self) -> Node:
        kind, text = self.take()
        if kind == "num":
            return ("num", float(text))
        if kind == "ref":
            stage, _, metric = text.rpartition(".")
            return ("ref", stage or None, metric)
        if text == "-":
            return ("neg", self.factor())
        if text == "(":
            node = self.expr()
            if self.take()[1] != ")":
                raise GateSyntaxError("missing ')'")
            return node
        raise GateSyntaxError(f"unexpected {text!r}")


def parse_gate(text: str) -> Gate:
    """`"metric op expression"` -> Gate. Raises GateSyntaxError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise GateSyntaxError("a gate must be a non-empty string like 'judge_pass_rate >= 0.5'")
    tokens = _tokens(text)
    if len(tokens) < 3 or tokens[0][0] != "ref" or "." in tokens[0][1] or tokens[1][0] != "op":
        raise GateSyntaxError("expected '<metric> <op> <expression>' with op one of "
                              f"{', '.join(OPS)}, and the metric one of this stage's own")
    parser = _Parser(tokens[2:])
    rhs = parser.expr()
    if parser.peek() is not None:
        raise GateSyntaxError(f"unexpected {parser.peek()[1]!r} after the expression")
    return Gate(text=text.strip(), metric=tokens[0][1], op=tokens[1][1], rhs=rhs)


def check_gates(recipe, stage: str, where: str) -> None:
    """Validation hook: every gate of `stage` parses, and names only stages that run before it."""
    order = recipe.order()
    for i, text in enumerate(recipe.stages[stage].gates):
        key = f"stages.{stage}.gates[{i}]"
        try:
            gate = parse_gate(text)
        except GateSyntaxError as err:
            raise RecipeError(f"malformed gate {text!r}: {err}", where=where, key=key,
                              fix="write e.g. 'judge_pass_rate >= sft.judge_pass_rate + 0.1'") from None
        for ref_stage, _ in gate.refs():
            if ref_stage is None or ref_stage == stage:
                continue
            if ref_stage not in recipe.stages:
                raise RecipeError(f"gate {text!r} names stage {ref_stage!r}, which this recipe does not have",
                                  where=where, key=key, fix=f"use one of {', '.join(recipe.stages)}")
            if order.index(ref_stage) > order.index(stage):
                raise RecipeError(f"gate {text!r} reads stage {ref_stage!r}, which runs after {stage!r}",
                                  where=where, key=key, fix="compare only with stages that run earlier")


# --- evaluation ---------------------------------------------------------------------------------


class _Missing(Exception):
    pass


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    raise _Missing(f"{what} is {value!r}, not a number" if value is not None else f"{what} was not reported")


def _value(node: Node, lookup: Callable[[str | None, str], Any]) -> float:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "ref":
        name = f"{node[1]}.{node[2]}" if node[1] else node[2]
        return _number(lookup(node[1], node[2]), name)
    if kind == "neg":
        return -_value(node[1], lookup)
    a, b = _value(node[1], lookup), _value(node[2], lookup)
    if kind == "/" and b == 0:
        raise _Missing("division by zero")
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else math.nan}[kind]


def evaluate_gates(recipe, stage: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Check `stage`'s gates against its `metrics` (other stages' metrics come from their
    manifests). Never raises for a missing metric: that gate is recorded as missed, with the reason."""
    return check(recipe.stages[stage].gates, stage, metrics, recipe.run_root)


def check(texts: list[str], stage: str, metrics: dict[str, Any], run_root: Path) -> list[dict[str, Any]]:
    """Gates `texts` of `stage` against `metrics`; other stages' metrics from `run_root/<stage>`."""
    def lookup(ref_stage: str | None, metric: str) -> Any:
        if ref_stage is None or ref_stage == stage:
            return metrics.get(metric)
        manifest = read_manifest(Path(run_root) / ref_stage) or {}
        if manifest.get("status") != "complete":
            raise _Missing(f"stage {ref_stage!r} is not complete")
        return (manifest.get("metrics") or {}).get(metric)

    results = []
    for text in texts:
        gate = parse_gate(text)
        row: dict[str, Any] = {"expr": gate.text, "metric": gate.metric, "op": gate.op}
        try:
            value = _number(lookup(None, gate.metric), gate.metric)
            threshold = _value(gate.rhs, lookup)
            row.update(value=value, threshold=threshold, passed=bool(OPS[gate.op](value, threshold)))
        except _Missing as why:
            have = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)))
            row.update(value=None, threshold=None, passed=False, reason=f"{why} (stage {stage!r} reports: {have})")
        results.append(row)
    return results


RESULTS = "gates.json"


def write_results(stage_dir: Path, results: list[dict[str, Any]]) -> None:
    """The latest check of a stage's gates, beside its manifest (none: the file is removed)."""
    path = Path(stage_dir) / RESULTS
    if results:
        write_json_atomic(path, results)
    elif path.is_file():
        path.unlink()


def recorded(stage_dir: Path) -> list[dict[str, Any]]:
    """The latest recorded gate results of a stage (folders from before gates.json: the manifest's)."""
    path = Path(stage_dir) / RESULTS
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return []
    return (read_manifest(stage_dir) or {}).get("gates") or []


def recheck_run(run_root: Path, recipe=None) -> dict[str, list[dict[str, Any]]]:
    """Re-check every complete stage of a run folder on its recorded metrics and rewrite gates.json.
    The gates are the recipe's when one is given, else those each stage recorded. By stage name."""
    out = {}
    for d in sorted(p for p in Path(run_root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = read_manifest(d)
        if not manifest or manifest.get("status") != "complete":
            continue
        if recipe is not None:
            texts = list(recipe.stages[d.name].gates) if d.name in recipe.stages else []
        else:
            texts = [row["expr"] for row in recorded(d)]
        results = check(texts, d.name, manifest.get("metrics") or {}, run_root)
        write_results(d, results)
        if results:
            out[d.name] = results
    return out


def describe(stage: str, row: dict[str, Any]) -> str:
    """One line about one gate result, e.g. `stage 'dpo': judge_pass_rate = 0.12, threshold >= 0.175 (= ...)`."""
    if row.get("value") is None or row.get("threshold") is None:
        return f"stage {stage!r}: gate {row['expr']!r} could not be checked: {row.get('reason', '')}"
    rhs = row["expr"].split(row["op"], 1)[1].strip()
    shown = "" if rhs == _fmt(row["threshold"]) else f" (= {rhs})"
    return (f"stage {stage!r}: {row['metric']} = {_fmt(row['value'])}, threshold {row['op']} "
            f"{_fmt(row['threshold'])}{shown}")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def raise_if_missed(stage: str, results: list[dict[str, Any]], stage_dir: Path) -> None:
    """Raise GateError naming the stage, metric, value and threshold of the first missed gate."""
    missed = [(i, r) for i, r in enumerate(results) if not r.get("passed")]
    if not missed:
        return
    i, row = missed[0]
    more = f" (and {len(missed) - 1} more missed gate(s))" if len(missed) > 1 else ""
    raise GateError(f"gate missed: {describe(stage, row)}{more}; the stage is complete and its artifacts are kept",
                    where=str(Path(stage_dir) / "manifest.json"), key=f"stages.{stage}.gates[{i}]",
                    fix="improve the stage (config, data, steps) and re-run it with --force, or change the gate")
