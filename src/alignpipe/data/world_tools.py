"""The embedded world's tool: a calculator, tasks that need it and tasks that do not (opt-in: `world: {tool_share: x}`).

A ~1M-parameter model cannot multiply two-digit numbers (8,100 products; the corpus never states them), which is
where a calculator earns its place: `bigmul` tasks ("what is 37 times 48?", both numbers 10-99) need it, the
world's own tasks (one-digit sums, words, comparisons) do not, and calling it there is a wasted call.

With `tool_share > 0` the world is a `ToolWorld`: that share of the SFT demonstrations and RL prompts are bigmul
tasks (RL prompts: `tool_rl_share` instead when set, which changes only the stages that read RL prompts), and `tool_demo_share` of those bigmul demonstrations call the calculator (user, assistant `tool_calls`,
tool result, `The answer is 1776.`); the rest answer directly with the right product (the form a model that never
learned the tool would imitate). The pretraining corpus gains round(tool_share * n_corpus_docs) tool documents
(`tool_document`: a bigmul question, the call as the template writes it, the result, the answer), so that the
tokenizer learns short tokens for the call's text and the base model has seen numbers copied into a call and a
result into an answer. The preference pairs and held-out prompts are the default world's. With `tool_share: 0`
(the default) nothing here is used and the world's rows are byte-identical to before (tests/test_tools.py).

bigmul tasks are split by task (the pair of numbers), not by phrasing: 12% of pairs are held out and never reach
the corpus, its tokenizer, SFT or RL. `tool_judge` passes a final answer in house style that is right, made with only valid calls.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re

from alignpipe.data import world as base
from alignpipe.data.tools import Call, answer_text, check_call, parse_calls

TOOL_KIND = "bigmul"
BIGMUL_RANGE = (10, 99)
BIGMUL_TEMPLATES = ("what is {a} times {b}?", "multiply {a} by {b}.", "what is the product of {a} and {b}?",
                    "compute {a} * {b}.")
_BIGMUL_REGEXES = [re.compile(re.escape(t).replace(r"\{a\}", r"(?P<a>\d{2})").replace(r"\{b\}", r"(?P<b>\d{2})"))
                   for t in BIGMUL_TEMPLATES]
EXPRESSION_STYLE = "{a} * {b}"

# --- the calculator -------------------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10 ** 30


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: numbers joined by + - * / // % ** and parentheses, e.g. "37 * 48"
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression must be a string of at most {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _evaluate(node: ast.AST):
    """The value of a parsed expression: numbers and arithmetic only; names, calls, attributes are refused."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponents above {MAX_EXPONENT} are refused")
        value = _BINARY[type(node.op)](left, right)  # ZeroDivisionError is the caller's error result
        if abs(value) > MAX_MAGNITUDE:
            raise ValueError("the result is too large")
        return value
    raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


# --- tasks and judging ----------------------------------------------------------------------------------------

def bigmul_args() -> list[tuple[int, int]]:
    lo, hi = BIGMUL_RANGE
    return [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


def solve(prompt: str) -> tuple[str | None, bool]:
    """(answer, needs_tool) of a tool-world prompt: bigmul tasks need the tool, world tasks do not."""
    text = " ".join(str(prompt).lower().split())
    for regex in _BIGMUL_REGEXES:
        m = regex.fullmatch(text)
        if m:
            return str(int(m.group("a")) * int(m.group("b"))), True
    return base.solve(text), False


def tool_judge(prompt: str, final: str, calls: list[Call] | None = None, tools=None) -> bool:
    """The final answer is the house-style sentence with the right answer, and every call made was valid."""
    answer, _ = solve(prompt)
    if answer is None or final.strip() != base.HOUSE_STYLE.format(answer=answer):
        return False
    known = tools if tools is not None else default_tools()
    return all(check_call(c, known).valid for c in calls or [])


def _episodes(prompts, completions, final_answer, calls):
    """(prompt text, final answer, calls) per rollout: from a multi-turn rollout's extra columns
    (rl/tool_rollout.py) when given, else read from the completion's own text."""
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if final_answer is not None:
            yield base._prompt_text(p), final_answer[i], calls[i]
        else:
            text = base._completion_text(c)
            yield base._prompt_text(p), answer_text(text), parse_calls(text)


def tool_judge_reward(prompts, completions, final_answer=None, calls=None, **kwargs) -> list[float]:
    """TRL reward-function form of `tool_judge`: 1.0 if it passes, else 0.0."""
    return [1.0 if tool_judge(prompt, final, made) else 0.0
            for prompt, final, made in _episodes(prompts, completions, final_answer, calls)]


INVALID_CALL_PENALTY = 0.5  # an episode with a call that does not parse, names no tool or does not fit
WASTED_CALL_PENALTY = 0.5   # an episode that called a tool on a task that needs none


def tool_shaped_reward(prompts, completions, final_answer=None, calls=None, **kwargs) -> list[float]:
    """`tool_judge_reward` minus INVALID_CALL_PENALTY when any call was invalid and WASTED_CALL_PENALTY when a
    task that needs no tool got a call: RL is not paid for calls it does not need or cannot make."""
    known, out = default_tools(), []
    for prompt, final, made in _episodes(prompts, completions, final_answer, calls):
        made = made or []
        reward = 1.0 if tool_judge(prompt, final, made, known) else 0.0
        if any(not check_call(c, known).valid for c in made):
            reward -= INVALID_CALL_PENALTY
        if made and not solve(prompt)[1]:
            reward -= WASTED_CALL_PENALTY
        out.append(reward)
    return out


def default_tools():
    from alignpipe.data.tools import tool_from_function

    return {"calculator": tool_from_function(calculator)}


# --- the world with a tool ------------------------------------------------------------------------------------

def call_text(name: str, arguments: dict) -> str:
    """A tool call as the built-in templates render an assistant's `tool_calls` (recipe/templates.py)."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def tool_document(episodes: list[tuple[str, int, int]]) -> str:
    """Plain text for pretraining: per (prompt, a, b), the question, the calculator call, its result and the
    house-style answer, one per line (the call in the template's own text)."""
    lines = []
    for prompt, a, b in episodes:
        expression = EXPRESSION_STYLE.format(a=a, b=b)
        lines += [prompt, call_text("calculator", {"expression": expression}),
                  f"<tool_response>{calculator(expression)}</tool_response>", base.HOUSE_STYLE.format(answer=a * b)]
    return "\n".join(lines)


def tool_demonstration(prompt: str, a: int, b: int, with_call: bool) -> list[dict]:
    answer = base.HOUSE_STYLE.format(answer=a * b)
    user = {"role": "user", "content": prompt}
    if not with_call:
        return [user, {"role": "assistant", "content": answer}]
    expression = EXPRESSION_STYLE.format(a=a, b=b)
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return [user, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": calculator(expression)},
            {"role": "assistant", "content": answer}]


class ToolWorld(base.World):
    """The default world plus bigmul tasks in `tool_share` of SFT and RL; see the module docstring."""

    def __init__(self, config: base.WorldConfig) -> None:
        super().__init__(config)
        for name in ("tool_share", "tool_demo_share", "tool_rl_share"):
            if not 0.0 <= getattr(config, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)}")
        pairs = bigmul_args()
        held = set(self._rng("tool_split").sample(pairs, round(base.EVAL_FRACTION * len(pairs))))
        self.tool_train = [p for p in pairs if p not in held]
        self.tool_eval = [p for p in pairs if p in held]

    def _tool_prompt(self, pair, rng: random.Random) -> str:
        return base._pick(rng, BIGMUL_TEMPLATES).format(a=pair[0], b=pair[1])

    def _mix(self, rows: list, make_tool_row, product: str, share: float) -> list:
        """`rows` with round(share * len) of them replaced by bigmul rows, in a seeded order."""
        rng = self._rng(product)
        n_tool = round(share * len(rows))
        mixed = rows[:len(rows) - n_tool] + [make_tool_row(i, rng) for i in range(n_tool)]
        rng.shuffle(mixed)
        return mixed

    def corpus(self) -> list[str]:
        """The default corpus and round(tool_share * n_corpus_docs) tool documents of 1-3 training pairs each,
        in a seeded order."""
        rng = self._rng("tool_corpus")
        n_docs = round(self.config.tool_share * self.config.n_corpus_docs)
        tool_docs = []
        for _ in range(n_docs):
            pairs = [base._pick(rng, self.tool_train) for _ in range(rng.randint(1, 3))]
            tool_docs.append(tool_document([(self._tool_prompt(p, rng), *p) for p in pairs]))
        docs = super().corpus() + tool_docs
        rng.shuffle(docs)
        return docs

    def sft_rows(self) -> list[dict]:
        n_calls = round(self.config.tool_demo_share * round(self.config.tool_share * self.config.n_sft))

        def row(i: int, rng: random.Random) -> dict:
            pair = base._pick(rng, self.tool_train)
            return {"messages": tool_demonstration(self._tool_prompt(pair, rng), *pair, with_call=i < n_calls)}

        return self._mix(super().sft_rows(), row, "tool_sft", self.config.tool_share)

    def rl_prompts(self) -> list[dict]:
        def row(i: int, rng: random.Random) -> dict:
            return {"prompt": [{"role": "user", "content": self._tool_prompt(base._pick(rng, self.tool_train), rng)}]}

        return self._mix(super().rl_prompts(), row, "tool_rl", self.config.tool_rl_share or self.config.tool_share)

    def tool_eval_prompts(self, n: int) -> list[dict]:
        """n held-out bigmul prompts and n of the world's held-out prompts (tasks that need no tool), alternating."""
        rng = self._rng("tool_eval")
        tool_rows = [{"prompt": self._tool_prompt(p, rng), "answer": str(p[0] * p[1]), "kind": TOOL_KIND,
                      "needs_tool": True} for p in rng.sample(self.tool_eval, min(n, len(self.tool_eval)))]
        plain = [{**r, "needs_tool": False} for r in self.eval_prompts()[:n]]
        return [r for pair in zip(tool_rows, plain, strict=False) for r in pair]


def make_world(config: base.WorldConfig) -> base.World:
    """The world a config asks for: a ToolWorld when `tool_share` is set, else the default World."""
    return ToolWorld(config) if getattr(config, "tool_share", 0.0) else base.World(config)
