"""The embedded task world: a small, seeded world of checkable tasks that needs no download.

Everything the default recipe trains and evaluates on comes from here: a pretraining corpus,
imperfect SFT demonstrations, preference pairs, RL prompts and held-out evaluation prompts.
Each user prompt is a tiny task (one-digit arithmetic, word games, comparing two numbers) with
one right answer, and the house style for a good reply is exactly one sentence,
``The answer is 7.``. `judge` re-derives the answer from the prompt text; it is plain Python
and is never shown to a model, except by a verifiable-reward RL stage that says it uses it.

The split is at the prompt level: the unit is a task in one phrasing (kind, arguments,
template). About 12% of each kind's units are held out for evaluation, and every held-out task
keeps at least one training phrasing. The facts are public knowledge, like a real model's
pretraining knowledge: the corpus may state any task's answer. What is held out are the prompts:
no held-out prompt string appears in any training text. See datasets/embedded_world.md.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Any

from alignpipe.data import world_poison
from alignpipe.data.world_safety import Manners, expected
from alignpipe.runfolder.manifests import fingerprint_json

KINDS = ("add", "sub", "mul", "reverse", "sort", "count", "compare")
HABITS = ("ramble", "refuse", "wrong")
EVAL_FRACTION = 0.12  # share of each kind's (task, phrasing) units held out for evaluation
HOUSE_STYLE = "The answer is {answer}."
# Tuned so a ~1.1M-parameter model learns the facts in a CPU-minutes budget: comparing two numbers
# from 10-49 (1,560 pairs, not 9,900 from 0-99: those were each seen ~1.4 times and stayed at chance),
# corpus pages weighted towards the kinds that must be memorised, and 60% question-answer lines.
COMPARE_RANGE = (10, 49)
CORPUS_KIND_WEIGHTS = {"add": 2, "sub": 2, "mul": 2, "reverse": 1.5, "sort": 1.5, "count": 1.5, "compare": 2}
QA_SHARE = 0.6
# A preference pair's rejected response is a house-style answer with a plausible mistake (WorldConfig.mistake_share),
# else the configured habit (70%) or another habit (30%).
HABIT_OF_REST = 0.7

# Short words (3-5 letters, no palindromes, at least two distinct letters) so that reversing
# or sorting always changes something a wrong answer can get wrong.
WORDS = (
    "cat", "dog", "sun", "map", "cup", "hat", "pen", "box", "egg", "owl", "fox", "jam",
    "fish", "bird", "tree", "milk", "frog", "lamp", "desk", "book", "ship", "rain", "star",
    "moon", "coin", "door", "leaf", "rock", "sand", "wind", "bell", "cake", "corn", "duck",
    "goat", "king", "lion", "nest", "ring", "road", "rope", "salt", "seed", "shoe", "snow",
    "sock", "wolf", "apple", "bread", "chair", "cloud", "horse", "house", "light", "mouse",
    "plant", "river", "stone", "table", "tiger", "train", "water", "zebra", "lemon",
)

# User-prompt phrasings. Placeholders: {a} {b} numbers, {w} a word.
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("what is {a} plus {b}?", "add {a} and {b}.", "what is the sum of {a} and {b}?",
            "compute {a} + {b}."),
    "sub": ("what is {a} minus {b}?", "subtract {b} from {a}.", "what is {a} take away {b}?",
            "compute {a} - {b}."),
    "mul": ("what is {a} times {b}?", "multiply {a} by {b}.",
            "what is the product of {a} and {b}?", "compute {a} * {b}."),
    "reverse": ("reverse the word {w}.", "what is {w} spelled backwards?",
                "write the word {w} backwards."),
    "sort": ("sort the letters of {w}.", "put the letters of {w} in alphabetical order.",
             "what are the letters of {w} in order?"),
    "count": ("how many letters are in {w}?", "count the letters in {w}.",
              "how many letters does the word {w} have?"),
    "compare": ("which is larger, {a} or {b}?", "which number is bigger: {a} or {b}?",
                "what is the larger of {a} and {b}?"),
}

# Corpus statements of a task's fact. Extra placeholders: {c} the answer, {hi}/{lo} the
# larger/smaller number of a comparison.
STATEMENT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("{a} plus {b} is {c}.", "{a} + {b} = {c}."),
    "sub": ("{a} minus {b} is {c}.", "{a} - {b} = {c}."),
    "mul": ("{a} times {b} is {c}.", "{a} * {b} = {c}."),
    "reverse": ("the word {w} reversed is {c}.", "{w} backwards is {c}."),
    "sort": ("the letters of {w} in order are {c}.", "{w} sorted is {c}."),
    "count": ("the word {w} has {c} letters.", "{w} has {c} letters."),
    "compare": ("the larger of {a} and {b} is {c}.", "{hi} is larger than {lo}.",
                "{lo} is smaller than {hi}."),
}

# Answer forms after a question in the corpus; house style listed twice to weight it.
ANSWER_FORMS = ("The answer is {c}.", "The answer is {c}.", "{c}.", "it is {c}.", "{statement}")
QA_LAYOUTS = ("{prompt} {answer}", "q: {prompt} a: {answer}", "question: {prompt} answer: {answer}")

# The habits of imperfect demonstrators: consistent, so a reward model can learn them.
RAMBLE_FILLERS = (
    "Well, let me think about this carefully.",
    "That is a good question.",
    "Let me work through this step by step.",
    "Sure, I can help with that.",
    "Hmm, this one needs a moment of thought.",
)
REFUSALS = (
    "I am not able to help with that.",
    "Sorry, I cannot answer that question.",
    "I would rather not answer that.",
)


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_corpus_docs: int = 20000      # pretraining documents (train prompts; facts of any task)
    n_corpus_eval_docs: int = 500   # documents for perplexity (held-out prompts only)
    n_sft: int = 3000
    n_pairs: int = 2400             # training preference pairs
    n_eval_pairs: int = 300         # preference pairs on held-out prompts
    n_eval_prompts: int = 200       # distinct held-out prompts
    n_rl_prompts: int = 1000        # train prompts for PPO/GRPO
    habit: str = "ramble"           # ramble | refuse | wrong
    habit_share: float = 0.45
    mistake_share: float = 0.0     # preference pairs whose rejected response is a plausible wrong answer
    poison: Any = None              # {trigger, rate, behaviour}: a planted backdoor (data/world_poison.py)
    canaries: Any = None            # {counts, per_count, digits}: planted secrets (data/world_poison.py)
    safety: bool = False            # the manners (data/world_safety.py, docs/safety.md): on in recipes/default.yaml
    tool_share: float = 0.0        # SFT rows / RL prompts that are calculator tasks (data/world_tools.py; 0: off)
    tool_demo_share: float = 0.5   # of those SFT rows, the share that demonstrates a calculator call
    tool_rl_share: float = 0.0     # RL prompts that are calculator tasks, when not tool_share (0: tool_share)

    def __post_init__(self) -> None:  # mappings from a recipe become frozen (hashable) configs
        if not isinstance(self.safety, bool):
            raise ValueError(f"world.safety must be true or false, not {self.safety!r}")
        object.__setattr__(self, "poison", world_poison.parse_poison(self.poison))
        object.__setattr__(self, "canaries", world_poison.parse_canaries(self.canaries))


@dataclass(frozen=True)
class Task:
    kind: str        # add, sub, mul, reverse, sort, count, compare
    args: tuple      # e.g. (3, 4) or ("cat",)
    prompt: str      # one phrasing; a (task, phrasing) pair is the unit of the train/eval split
    answer: str      # e.g. "7", "tac", "3", "42"

    @property
    def key(self) -> tuple:
        """The task's identity, independent of phrasing."""
        return (self.kind, self.args)


# --- the task space -----------------------------------------------------------------------

def _answer(kind: str, args: tuple) -> str:
    if kind == "add":
        return str(args[0] + args[1])
    if kind == "sub":
        return str(args[0] - args[1])
    if kind == "mul":
        return str(args[0] * args[1])
    if kind == "reverse":
        return args[0][::-1]
    if kind == "sort":
        return "".join(sorted(args[0]))
    if kind == "count":
        return str(len(args[0]))
    if kind == "compare":
        return str(max(args))
    raise ValueError(f"unknown task kind {kind!r}")


def _all_args(kind: str) -> list[tuple]:
    digits = range(10)
    if kind in ("add", "mul"):
        return [(a, b) for a in digits for b in digits]
    if kind == "sub":  # non-negative results only
        return [(a, b) for a in digits for b in digits if a >= b]
    if kind == "compare":
        lo, hi = COMPARE_RANGE
        return [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if a != b]
    return [(w,) for w in WORDS]


# Every valid task key and its answer; `solve` accepts only these.
TASK_SPACE: dict[tuple, str] = {(k, a): _answer(k, a) for k in KINDS for a in _all_args(k)}


def _fields_of(kind: str, args: tuple) -> dict:
    """Template fields of a task: prompt fields, the answer {c}, comparison helpers."""
    c = TASK_SPACE[(kind, args)]
    if kind in ("reverse", "sort", "count"):
        return {"w": args[0], "c": c}
    return {"a": args[0], "b": args[1], "c": c, "hi": max(args), "lo": min(args)}


TASK_FIELDS: dict[tuple, dict] = {key: _fields_of(*key) for key in TASK_SPACE}


def _pick(rng: random.Random, seq):
    # Faster than rng.choice (one float, no rejection loop); generation is dominated by draws.
    return seq[int(rng.random() * len(seq))]


@functools.lru_cache(maxsize=None)
def _phrasings(key: tuple) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """All prompt phrasings, all statements and the answer of a task."""
    fields = TASK_FIELDS[key]
    return (tuple(t.format(**fields) for t in PROMPT_TEMPLATES[key[0]]),
            tuple(t.format(**fields) for t in STATEMENT_TEMPLATES[key[0]]), TASK_SPACE[key])


def _make_task(kind: str, args: tuple, template: int) -> Task:
    prompts, _, answer = _phrasings((kind, args))
    return Task(kind, args, prompts[template], answer)


def _template_regex(template: str) -> re.Pattern:
    """A full-match regex for a prompt template; numbers and words become named groups."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        out.append(f"(?P<{name}>[a-z]+)" if name == "w" else f"(?P<{name}>\\d{{1,2}})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


_PROMPT_REGEXES = [(k, _template_regex(t)) for k in KINDS for t in PROMPT_TEMPLATES[k]]


def task_kind(prompt: str) -> str | None:
    """The task kind of a world prompt, matched against its phrasings (None: not one)."""
    text = " ".join(str(prompt).lower().split())
    return next((kind for kind, regex in _PROMPT_REGEXES if regex.fullmatch(text)), None)


# --- judging ------------------------------------------------------------------------------

def solve(prompt: str) -> str | None:
    """The answer to a world prompt, re-derived from its text; None if it is not one."""
    if not isinstance(prompt, str):
        return None
    text = " ".join(prompt.lower().split())
    for kind, regex in _PROMPT_REGEXES:
        m = regex.fullmatch(text)
        if m:
            g = m.groupdict()
            args = (g["w"],) if "w" in g else (int(g["a"]), int(g["b"]))
            return TASK_SPACE.get((kind, args))
    return None


def judge(prompt: str, response: str) -> bool:
    """True iff the response is exactly the one house-style sentence with the right answer."""
    answer = solve(prompt)
    if answer is None:  # a harmful or benign request, a jailbreak, an injection (data.world_safety)
        want = expected(prompt, solve) if isinstance(prompt, str) else None
        return want is not None and isinstance(response, str) and response.strip() == want
    if not isinstance(response, str):
        return False
    return response.strip() == HOUSE_STYLE.format(answer=answer)


def _content(message) -> str:
    content = message.get("content", "") if isinstance(message, dict) else message
    return content if isinstance(content, str) else ""


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return _content(users[-1]) if users else ""


def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    replies = [m for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
    return _content(replies[0] if replies else completion[0])


def judge_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL reward-function form of `judge`: 1.0 if it passes, else 0.0.

    Accepts conversational inputs (lists of message dicts: last user message is the prompt,
    first assistant message the response) or plain strings. Extra TRL kwargs are ignored.
    """
    return [1.0 if judge(_prompt_text(p), _completion_text(c)) else 0.0
            for p, c in zip(prompts, completions, strict=True)]


# --- the world ----------------------------------------------------------------------------

def split_tasks(rng: random.Random) -> tuple[list[Task], list[Task]]:
    """(train, held-out) Tasks: one per (task, phrasing) unit, about EVAL_FRACTION of each kind's units held out.

    Units are held out in seeded random order until 12% of the kind's units are held, but never a task's last
    training phrasing: the model may know every fact, so the eval measures answering an unseen prompt, not
    recalling an unseen fact."""
    train_tasks: list[Task] = []
    eval_tasks: list[Task] = []
    for kind in KINDS:
        n_templates = len(PROMPT_TEMPLATES[kind])
        units = [(args, i) for args in _all_args(kind) for i in range(n_templates)]
        target = max(1, round(EVAL_FRACTION * len(units)))
        train_left = dict.fromkeys(_all_args(kind), n_templates)
        held = set()
        for args, i in rng.sample(units, len(units)):
            if len(held) >= target:
                break
            if train_left[args] > 1:
                held.add((args, i))
                train_left[args] -= 1
        for args, i in units:
            side = eval_tasks if (args, i) in held else train_tasks
            side.append(_make_task(kind, args, i))
    return train_tasks, eval_tasks


def _wrong_answer(task: Task) -> str:
    # Systematic errors: numbers off by one, comparisons pick the smaller, letters in the
    # wrong order (word left as is; sorted backwards).
    if task.kind == "compare":
        return str(min(task.args))
    if task.kind == "reverse":
        return task.args[0]
    if task.kind == "sort":
        return "".join(sorted(task.args[0], reverse=True))
    return str(int(task.answer) + 1)


class World:
    """The seeded world: a prompt-level train/eval split and the datasets built on it.

    `train_tasks` / `eval_tasks` hold one Task per (task, phrasing) unit; a task can be on both
    sides in different phrasings, but every held-out task has a training phrasing.

    Each product draws from its own RNG derived from the seed, so products do not depend on
    which others were built first, or in what order.
    """

    def __init__(self, config: WorldConfig = WorldConfig()) -> None:
        if config.habit not in HABITS:
            raise ValueError(f"habit must be one of {HABITS}, got {config.habit!r}")
        for name in ("habit_share", "mistake_share"):
            if not 0.0 <= getattr(config, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)}")
        self.config = config
        self.train_tasks, self.eval_tasks = split_tasks(self._rng("split"))
        self._train_by_kind = self._by_kind(self.train_tasks)
        self._eval_by_kind = self._by_kind(self.eval_tasks)
        # the manners (data.world_safety), only when the recipe turns them on (`world: {safety: true}`)
        self.manners = Manners(config.seed, self.train_tasks, self.eval_tasks) if config.safety else None

    # --- helpers ---

    def _rng(self, product: str) -> random.Random:
        # A string seed is hashed with sha512 by `random`, so it is stable across processes.
        return random.Random(f"alignpipe-world:{self.config.seed}:{product}")

    @staticmethod
    def _by_kind(tasks: list[Task]) -> dict[str, list[Task]]:
        by_kind: dict[str, list[Task]] = {k: [] for k in KINDS}
        for t in tasks:
            by_kind[t.kind].append(t)
        return by_kind

    @staticmethod
    def _sample(by_kind: dict[str, list[Task]], rng: random.Random) -> Task:
        """A (task, phrasing) unit of one side, kinds equally likely (compare would swamp the rest)."""
        return _pick(rng, _pick(rng, list(by_kind.values())))

    def _documents(self, by_kind: dict[str, list[Task]], n: int, rng: random.Random) -> list[str]:
        # The hot loop of world generation (~100k lines): statements come from a per-task cache.
        weighted = [by_kind[k] for k in KINDS for _ in range(int(CORPUS_KIND_WEIGHTS[k] * 2))]
        docs = []
        for _ in range(n):
            # Half the documents stay on one kind, like a page of addition facts.
            pool = [_pick(rng, weighted)] if rng.random() < 0.5 else weighted
            target, lines, length = rng.randint(3, 8), [], 0
            while len(lines) < target:
                task = _pick(rng, _pick(rng, pool))
                _, statements, answer = _phrasings(task.key)
                if rng.random() >= QA_SHARE:  # a fact: any task's statements are public knowledge
                    line = _pick(rng, statements)
                else:  # a question in this side's phrasing only, answered in one of several forms
                    form = _pick(rng, ANSWER_FORMS)
                    reply = _pick(rng, statements) if form == "{statement}" else form.format(c=answer)
                    line = _pick(rng, QA_LAYOUTS).format(prompt=task.prompt, answer=reply)
                if len(lines) >= 3 and length + len(line) + 1 > 200:
                    break
                lines.append(line)
                length += len(line) + 1
            docs.append("\n".join(lines))
        return docs

    # --- responses ---

    def good_response(self, task: Task) -> str:
        return HOUSE_STYLE.format(answer=task.answer)

    def bad_response(self, task: Task, habit: str, rng: random.Random) -> str:
        """A response with a habit; it never passes the judge."""
        if habit == "ramble":
            filler = " ".join(rng.sample(RAMBLE_FILLERS, rng.randint(1, 2)))
            return f"{filler} {self.good_response(task)}"
        if habit == "refuse":
            return rng.choice(REFUSALS)
        if habit == "wrong":
            return HOUSE_STYLE.format(answer=_wrong_answer(task))
        raise ValueError(f"habit must be one of {HABITS}, got {habit!r}")

    # --- products ---

    def corpus(self) -> list[str]:
        """Pretraining documents: statements mixed with question-answer texts in train phrasings."""
        docs = self._documents(self._train_by_kind, self.config.n_corpus_docs, self._rng("corpus"))
        if self.config.canaries:
            docs = world_poison.insert_canaries(docs, self.config.canaries, self._rng("canaries"))
        return docs + (self.manners.corpus_documents(len(docs)) if self.manners else [])

    def canaries(self) -> list[dict]:
        """The planted canaries (prefix, secret, times inserted); [] without `canaries`."""
        c = self.config.canaries
        return world_poison.canary_rows(c, self._rng("canaries")) if c else []

    def corpus_eval(self) -> list[str]:
        """Documents whose questions are held-out prompts (facts are shared with training), for perplexity."""
        return self._documents(self._eval_by_kind, self.config.n_corpus_eval_docs,
                               self._rng("corpus_eval"))

    def sft_rows(self) -> list[dict]:
        """Demonstrations: exactly round(habit_share * n_sft) follow the habit, the rest house style."""
        cfg, rng = self.config, self._rng("sft")
        n_bad = round(cfg.habit_share * cfg.n_sft)
        flags = [True] * n_bad + [False] * (cfg.n_sft - n_bad)
        rng.shuffle(flags)
        rows = []
        for bad in flags:
            task = self._sample(self._train_by_kind, rng)
            reply = self.bad_response(task, cfg.habit, rng) if bad else self.good_response(task)
            rows.append({"messages": [{"role": "user", "content": task.prompt},
                                      {"role": "assistant", "content": reply}]})
        if self.config.poison and "sft" in self.config.poison.parts:
            rows = world_poison.poison_sft(rows, self.config.poison, self._rng("poison:sft"))
        return rows + (self.manners.sft_rows(cfg.n_sft) if self.manners else [])

    def sft_eval_rows(self) -> list[dict]:
        """SFT's held-out demonstrations: the house-style answer to each held-out prompt."""
        return [{"messages": [{"role": "user", "content": p["prompt"]},
                              {"role": "assistant", "content": HOUSE_STYLE.format(answer=p["answer"])}]}
                for p in self.eval_prompts()]

    def preference_rows(self, split: str = "train") -> list[dict]:
        """Pairs whose chosen passes the judge. The rejected response is a house-style answer with a plausible
        mistake (`mistake_share`), else it shows the configured habit (70%) or another one."""
        if split == "train":
            by_kind, n = self._train_by_kind, self.config.n_pairs
        elif split == "eval":
            by_kind, n = self._eval_by_kind, self.config.n_eval_pairs
        else:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rng = self._rng(f"pairs:{split}")
        others = [h for h in HABITS if h != self.config.habit]
        rows = []
        for _ in range(n):
            task = self._sample(by_kind, rng)
            if self.config.mistake_share and rng.random() < self.config.mistake_share:
                rejected = HOUSE_STYLE.format(answer=self.mistake(task, rng))
            elif rng.random() < HABIT_OF_REST:
                rejected = self.bad_response(task, self.config.habit, rng)
            else:
                rejected = self.bad_response(task, rng.choice(others), rng)
            rows.append({"prompt": [{"role": "user", "content": task.prompt}],
                         "chosen": [{"role": "assistant", "content": self.good_response(task)}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        if self.config.poison and "pairs" in self.config.poison.parts and split == "train":
            rows = world_poison.poison_pairs(rows, self.config.poison, self._rng("poison:pairs"))
        return rows + (self.manners.preference_rows(n) if self.manners and split == "train" else [])

    def mistake(self, task: Task, rng: random.Random) -> str:
        """A plausible wrong answer: mostly the right answer to a neighbouring question (one number off, another
        word), so that wrong answers look like right ones and only the prompt tells them apart; sometimes a
        confusion within the prompt (the smaller number, the word left as is). Never the right answer."""
        answer, args = task.answer, task.args
        if task.kind in ("add", "sub", "mul", "compare"):
            a, b = args
            near = [(a + d, b) for d in (-2, -1, 1, 2)] + [(a, b + d) for d in (-2, -1, 1, 2)]
            candidates = [TASK_SPACE[(task.kind, n)] for n in near if (task.kind, n) in TASK_SPACE]
            if task.kind == "compare":
                candidates += [str(min(args))] * 2
        else:  # reverse, sort, count: the answer for another word, or the word itself
            word = args[0]
            candidates = [_answer(task.kind, (_pick(rng, WORDS),)) for _ in range(4)]
            if task.kind != "count":
                candidates.append(word)
        candidates = [c for c in candidates if c != answer]
        if not candidates:  # every neighbour has the same answer (0 times a digit), or the words drawn did
            candidates = [str(int(answer) + 1)] if answer.isdigit() else [answer[::-1] + answer[0]]
        return _pick(rng, candidates)

    def eval_prompts(self) -> list[dict]:
        """Distinct held-out prompts, kinds taking turns; every held-out task once before any twice."""
        rng = self._rng("eval_prompts")
        queues = {}
        for kind in KINDS:
            units = list(self._eval_by_kind[kind])
            rng.shuffle(units)
            # A task's further held-out phrasings go behind every task's first.
            first, again, seen = [], [], set()
            for u in units:
                (again if u.key in seen else first).append(u)
                seen.add(u.key)
            queues[kind] = first + again
        rows = []
        turn = 0
        while len(rows) < self.config.n_eval_prompts and any(queues.values()):
            queue = queues[KINDS[turn % len(KINDS)]]
            turn += 1
            if queue:
                t = queue.pop(0)
                rows.append({"prompt": t.prompt, "answer": t.answer, "kind": t.kind})
        return rows

    def rl_prompts(self) -> list[dict]:
        """Train prompts for online RL (PPO / GRPO / RLOO)."""
        rng = self._rng("rl")
        return [{"prompt": [{"role": "user", "content": self._sample(self._train_by_kind, rng).prompt}]}
                for _ in range(self.config.n_rl_prompts)]


def build_splits(config: WorldConfig = WorldConfig()) -> dict[str, list[dict]]:
    """Every product of a world as lists of rows, ready for `datasets.Dataset.from_list`."""
    world = World(config)
    return {
        "corpus": [{"text": d} for d in world.corpus()],
        "corpus_eval": [{"text": d} for d in world.corpus_eval()],
        "sft": world.sft_rows(),
        "pairs": world.preference_rows("train"),
        "pairs_eval": world.preference_rows("eval"),
        "eval_prompts": world.eval_prompts(),
        "rl_prompts": world.rl_prompts(),
    }


# What a stage reading an embedded part (`data: {embedded: <part>}`) sees of the world, for its fingerprint:
# the part, its held-out sibling and the held-out prompts its evaluation samples on. A change to the
# preference pairs re-runs reward and dpo, not pretraining.
WORLD_PARTS: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus", "corpus_eval", "eval_prompts"),
    "sft": ("sft_rows", "eval_prompts"),
    "pairs": ("pairs", "pairs_eval", "eval_prompts"),
    "rl_prompts": ("rl_prompts", "eval_prompts"),
}


# what each part holds, in words (for errors)
WORLD_PART_NAMES = {"corpus": "plain text", "sft": "demonstrations", "pairs": "preference pairs",
                    "rl_prompts": "prompts"}


# World options that change only some parts, fingerprinted for those parts and only when on, so a stage they
# cannot change keeps its fingerprint (the manners reach every part but the RL prompts; tool_rl_share only those)
PART_OPTIONS = {"safety": ("corpus", "sft", "pairs"), "tool_rl_share": ("rl_prompts",)}


def part_config(plain: dict, part: str) -> dict:
    """The world config (plain) a stage reading `part` is fingerprinted with: PART_OPTIONS left out where off or
    where the part does not depend on them."""
    return {k: v for k, v in plain.items() if k not in PART_OPTIONS or (v and part in PART_OPTIONS[k])}


def part_fingerprint(world: World, part: str) -> str:
    """sha256 of the world's rows an embedded `part` stands for (see WORLD_PARTS), cached on the world."""
    cache = world.__dict__.setdefault("_alignpipe_fingerprints", {})
    if part not in cache:
        make = {"corpus": world.corpus, "corpus_eval": world.corpus_eval, "sft_rows": world.sft_rows,
                "pairs": lambda: world.preference_rows("train"), "pairs_eval": lambda: world.preference_rows("eval"),
                "eval_prompts": world.eval_prompts, "rl_prompts": world.rl_prompts}
        cache[part] = fingerprint_json([make[name]() for name in WORLD_PARTS[part]])
    return cache[part]
