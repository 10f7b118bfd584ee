"""Tests of the embedded task world: determinism, held-out disjointness, the judge, the habits."""

import re
import time
from collections import Counter

import pytest

from alignpipe.data import world as W
from alignpipe.data.world import World, WorldConfig, build_splits, judge, judge_reward, solve

SMALL = WorldConfig(n_corpus_docs=300, n_corpus_eval_docs=50, n_sft=200, n_pairs=100,
                    n_eval_pairs=50, n_eval_prompts=60, n_rl_prompts=100)


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig())


@pytest.fixture(scope="module")
def splits():
    start = time.perf_counter()
    out = build_splits(WorldConfig())
    # The whole default world must be cheap enough to build at the start of every run.
    assert time.perf_counter() - start < 5.0
    return out


def _group(kind, args):
    # Our own notion of "the same fact": commutative kinds ignore argument order.
    return (kind, tuple(sorted(args)) if kind in ("add", "mul", "compare") else tuple(args))


# --- a detector of tasks in free text, built from the templates ----------------------------

def _detector_regex(kind, template):
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        letters = name == "w" or (name == "c" and kind in ("reverse", "sort"))
        # Word boundaries so "13 plus 4" is read as 13, never as a hidden "3 plus 4".
        out.append(rf"\b(?P<{name}>[a-z]+)\b" if letters else rf"\b(?P<{name}>\d+)\b")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


DETECTORS = [(kind, _detector_regex(kind, t))
             for table in (W.PROMPT_TEMPLATES, W.STATEMENT_TEMPLATES)
             for kind, templates in table.items() for t in templates]


def groups_mentioned(text: str) -> set:
    """Every task group whose prompt or statement (any phrasing) occurs in the text."""
    found = set()
    for kind, regex in DETECTORS:
        for m in regex.finditer(text):
            g = m.groupdict()
            if "w" in g:
                args = (g["w"],)
            elif "a" in g:
                args = (int(g["a"]), int(g["b"]))
            else:
                args = (int(g["hi"]), int(g["lo"]))
            found.add(_group(kind, args))
    return found


def _training_texts(world, splits):
    texts = list(world.corpus())
    for row in splits["sft"]:
        texts += [m["content"] for m in row["messages"]]
    for row in splits["pairs"]:
        texts += [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]
    for row in splits["rl_prompts"]:
        texts += [m["content"] for m in row["prompt"]]
    texts += [t.prompt for t in world.train_tasks]
    return texts


# --- determinism ---------------------------------------------------------------------------

def test_same_seed_same_world_and_different_seed_different_world():
    a, b = build_splits(SMALL), build_splits(SMALL)
    assert a == b
    other = build_splits(WorldConfig(**{**SMALL.__dict__, "seed": 1}))
    for name in a:
        assert a[name] != other[name], name
    keys = lambda w: {t.key for t in w.eval_tasks}  # noqa: E731
    assert keys(World(SMALL)) != keys(World(WorldConfig(seed=1)))


def test_products_do_not_depend_on_call_order():
    w1, w2 = World(SMALL), World(SMALL)
    sft_first = w1.sft_rows()
    w2.corpus(), w2.preference_rows("eval"), w2.rl_prompts()
    assert w2.sft_rows() == sft_first


def test_sizes_follow_config(splits):
    cfg = WorldConfig()
    sizes = {name: len(rows) for name, rows in splits.items()}
    assert sizes == {"corpus": cfg.n_corpus_docs, "corpus_eval": cfg.n_corpus_eval_docs,
                     "sft": cfg.n_sft, "pairs": cfg.n_pairs, "pairs_eval": cfg.n_eval_pairs,
                     "eval_prompts": cfg.n_eval_prompts, "rl_prompts": cfg.n_rl_prompts}


# --- the split -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_covers_task_space_and_holds_out_a_share_of_every_kind(seed):
    world = World(WorldConfig(seed=seed))
    train = {t.key for t in world.train_tasks}
    held = {t.key for t in world.eval_tasks}
    assert not train & held
    assert train | held == set(W.TASK_SPACE)
    # Mirrors of a commutative fact stay on the same side.
    assert not {_group(*k) for k in train} & {_group(*k) for k in held}
    for kind in W.KINDS:
        n_held = sum(k[0] == kind for k in held)
        n_all = sum(k[0] == kind for k in W.TASK_SPACE)
        assert 0.10 <= n_held / n_all <= 0.15, (kind, n_held, n_all)


def test_detector_sees_tasks_in_text():
    # Guard against a vacuous disjointness test: the detector must find what it looks for.
    assert groups_mentioned("x. 13 plus 4 is 17. which is larger, 5 or 50?") == {
        ("add", (4, 13)), ("compare", (5, 50))}
    assert groups_mentioned("90 is larger than 9.") == {("compare", (9, 90))}
    assert groups_mentioned("q: reverse the word cat. a: The answer is tac.") == {("reverse", ("cat",))}


def test_no_held_out_task_in_any_training_text(world, splits):
    held = {_group(*t.key) for t in world.eval_tasks}
    train_text = "\n".join(_training_texts(world, splits))
    mentioned = groups_mentioned(train_text)
    assert not mentioned & held, sorted(mentioned & held)[:5]
    # ...and the training texts do talk about most train tasks, in every kind.
    train_groups = {_group(*t.key) for t in world.train_tasks}
    for kind in W.KINDS:
        seen = {g for g in mentioned if g[0] == kind}
        total = {g for g in train_groups if g[0] == kind}
        assert len(seen) > 0.5 * len(total), kind


def test_no_held_out_prompt_string_in_any_training_prompt(world, splits):
    held_prompts = {W._make_task(t.kind, t.args, i).prompt
                    for t in world.eval_tasks for i in range(len(W.PROMPT_TEMPLATES[t.kind]))}
    train_prompts = {row["messages"][0]["content"] for row in splits["sft"]}
    train_prompts |= {row["prompt"][-1]["content"] for row in splits["pairs"]}
    train_prompts |= {row["prompt"][-1]["content"] for row in splits["rl_prompts"]}
    assert len(train_prompts) > 1000
    assert not held_prompts & train_prompts
    assert {row["prompt"] for row in splits["eval_prompts"]} <= held_prompts


def test_held_out_products_use_held_out_tasks_only(world, splits):
    held = {_group(*t.key) for t in world.eval_tasks}
    eval_text = "\n".join(world.corpus_eval())
    assert groups_mentioned(eval_text) <= held
    assert len(groups_mentioned(eval_text)) > 50
    for row in splits["pairs_eval"]:
        assert groups_mentioned(row["prompt"][0]["content"]) <= held


def test_eval_prompts_are_distinct_and_cover_every_kind(splits):
    rows = splits["eval_prompts"]
    assert len({r["prompt"] for r in rows}) == len(rows)
    counts = Counter(r["kind"] for r in rows)
    assert set(counts) == set(W.KINDS)
    assert min(counts.values()) >= 15
    assert all(solve(r["prompt"]) == r["answer"] for r in rows)


# --- the judge -----------------------------------------------------------------------------

def test_solve_agrees_with_every_task_in_every_phrasing(world):
    for t in world.train_tasks + world.eval_tasks:
        for i in range(len(W.PROMPT_TEMPLATES[t.kind])):
            prompt = W._make_task(t.kind, t.args, i).prompt
            assert solve(prompt) == t.answer, prompt
            # Each prompt reads as exactly one template, so the parse is unambiguous.
            assert sum(bool(rx.fullmatch(prompt)) for _, rx in W._PROMPT_REGEXES) == 1, prompt


def test_judge_accepts_house_style_and_rejects_everything_else(world):
    p = "what is 3 plus 4?"
    assert judge(p, "The answer is 7.")
    assert judge(p, "  The answer is 7.\n")
    assert judge("  What is 3  plus 4? ", "The answer is 7.")  # case and spacing of the prompt
    for bad in ["The answer is 8.", "7", "the answer is 7.", "The answer is 7",
                "The answer is 7. I hope this helps.", "Well, let me think. The answer is 7.",
                "I am not able to help with that.", "", "The answer is 07."]:
        assert not judge(p, bad), bad
    for unknown in ["what is 12 plus 4?", "what is 3 minus 4?", "reverse the word xyz.",
                    "which is larger, 5 or 5?", "tell me a joke.", ""]:
        assert solve(unknown) is None
        assert not judge(unknown, "The answer is 7.")
    import random
    rng = random.Random(0)
    for t in world.train_tasks[::50] + world.eval_tasks[::20]:
        assert judge(t.prompt, world.good_response(t))
        for habit in W.HABITS:
            assert not judge(t.prompt, world.bad_response(t, habit, rng)), (t, habit)


def test_judge_reward_takes_conversations_and_strings():
    prompts = [[{"role": "system", "content": "be brief."},
                {"role": "user", "content": "what is 2 times 3?"}],
               [{"role": "user", "content": "sort the letters of cat."}]]
    completions = [[{"role": "assistant", "content": "The answer is 6."}],
                   [{"role": "assistant", "content": "The answer is cat."}]]
    assert judge_reward(prompts, completions, completion_ids=[[1], [2]]) == [1.0, 0.0]
    assert judge_reward(["what is 2 times 3?", "sort the letters of cat."],
                        ["The answer is 6.", "The answer is act."]) == [1.0, 1.0]
    assert judge_reward(["tell me a joke."], ["The answer is 6."]) == [0.0]


# --- habits and pairs ----------------------------------------------------------------------

def _habit_of(task_prompt: str, response: str) -> str:
    good = f"The answer is {solve(task_prompt)}."
    if response == good:
        return "good"
    if response in W.REFUSALS:
        return "refuse"
    if response.endswith(" " + good):
        return "ramble"
    if re.fullmatch(r"The answer is [a-z0-9]+\.", response):
        return "wrong"
    return "other"


@pytest.mark.parametrize("habit", W.HABITS)
def test_sft_habit_share(habit):
    cfg = WorldConfig(n_sft=1000, habit=habit, habit_share=0.45)
    rows = World(cfg).sft_rows()
    kinds = Counter(_habit_of(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows)
    assert kinds == {"good": 550, habit: 450}
    passed = sum(judge(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows)
    assert passed == 550


def test_habit_share_extremes_and_bad_config():
    assert all(judge(r["messages"][0]["content"], r["messages"][1]["content"])
               for r in World(WorldConfig(n_sft=100, habit_share=0.0)).sft_rows())
    with pytest.raises(ValueError):
        World(WorldConfig(habit="lazy"))
    with pytest.raises(ValueError):
        World(WorldConfig(habit_share=1.5))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_pairs_chosen_passes_rejected_fails(world, split):
    rows = world.preference_rows(split)
    habits = Counter()
    for row in rows:
        prompt = row["prompt"][0]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert judge(prompt, chosen)
        assert not judge(prompt, rejected)
        assert chosen != rejected
        habits[_habit_of(prompt, rejected)] += 1
    # Mostly the configured habit, some of each other.
    assert habits["ramble"] > 0.6 * len(rows)
    assert habits["refuse"] > 0 and habits["wrong"] > 0 and habits["other"] == 0


def test_wrong_habit_is_systematic(world):
    import random
    rng = random.Random(0)
    t = {t.key: t for t in world.train_tasks + world.eval_tasks}
    assert world.bad_response(t[("add", (3, 4))], "wrong", rng) == "The answer is 8."
    assert world.bad_response(t[("compare", (34, 57))], "wrong", rng) == "The answer is 34."
    assert world.bad_response(t[("reverse", ("cat",))], "wrong", rng) == "The answer is cat."
    assert world.bad_response(t[("sort", ("cat",))], "wrong", rng) == "The answer is tca."


# --- the corpus ----------------------------------------------------------------------------

def test_corpus_documents_mix_statements_and_questions(splits):
    docs = [row["text"] for row in splits["corpus"]]
    lines = [line for d in docs for line in d.split("\n")]
    assert all(3 <= len(d.split("\n")) <= 8 for d in docs)
    assert all(d.isascii() for d in docs)
    assert sum(len(d) for d in docs) / len(docs) < 200
    # Questions in the user-prompt phrasings, answered in house style among other forms.
    qa = [line for line in lines if "?" in line or line.startswith(("q: ", "question: "))]
    assert 0.3 < len(qa) / len(lines) < 0.7
    assert any("The answer is" in line for line in qa)
    text = "\n".join(qa)
    for kind, templates in W.PROMPT_TEMPLATES.items():
        for t in templates:
            assert _detector_regex(kind, t).search(text), t
