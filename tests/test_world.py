"""Tests of the embedded task world: determinism, the prompt-level split, the judge, the habits."""

import re
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
    return build_splits(WorldConfig())  # its build time is not asserted: a timing assert fails under load


# --- finding prompt strings in free text ---------------------------------------------------

def _trie_pattern(strings) -> str:
    """One regex alternation for many literal strings, shared prefixes merged (fast in `re`)."""
    trie: dict = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}  # end of a string

    def pattern(node) -> str:
        alts = [re.escape(ch) + pattern(child) if ch else "" for ch, child in sorted(node.items())]
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return pattern(trie)


def occurrences(strings, texts) -> set:
    """The strings that occur in some text as a whole phrase: "add 3 and 7." is not found inside
    "add 13 and 7." or "madd 3 and 7.", nor "compute 3 + 7." inside "compute 3 + 7.5"."""
    regex = re.compile(r"(?<!\w)" + _trie_pattern(strings) + r"(?!\w)")
    return {m.group(0) for text in texts for m in regex.finditer(text)}


def _detector_regex(kind, template):
    """A regex that finds any instance of a template in free text."""
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


def prompts_in(text: str) -> set:
    """Every world prompt (any kind, any phrasing) that occurs in the text."""
    return {m.group(0) for kind, templates in W.PROMPT_TEMPLATES.items() for t in templates
            for m in _detector_regex(kind, t).finditer(text)}


def _training_texts(world, splits):
    texts = list(world.corpus())
    for row in splits["sft"]:
        texts += [m["content"] for m in row["messages"]]
    for row in splits["pairs"]:
        texts += [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]
    for row in splits["rl_prompts"]:
        texts += [m["content"] for m in row["prompt"]]
    return texts


def _units(tasks) -> set:
    return {(t.key, t.prompt) for t in tasks}


# --- determinism ---------------------------------------------------------------------------

def test_same_seed_same_world_and_different_seed_different_world():
    a, b = build_splits(SMALL), build_splits(SMALL)
    assert a == b
    other = build_splits(WorldConfig(**{**SMALL.__dict__, "seed": 1}))
    for name in a:
        assert a[name] != other[name], name
    assert _units(World(SMALL).eval_tasks) != _units(World(WorldConfig(seed=1)).eval_tasks)


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


def test_sizes_with_the_manners_follow_their_shares():
    """`safety: true` (data/world_safety.py) adds the manners on top of the ordinary SFT rows and training pairs."""
    from alignpipe.data.world_safety import PAIR_SHARES, SFT_SHARES, counts

    cfg = WorldConfig(safety=True)
    world = World(cfg)
    manners_sft, manners_pairs = (sum(counts(s, n).values()) for s, n in ((SFT_SHARES, cfg.n_sft),
                                                                           (PAIR_SHARES, cfg.n_pairs)))
    assert (manners_sft, manners_pairs) == (1600, 340)
    assert len(world.sft_rows()) == cfg.n_sft + manners_sft
    assert len(world.preference_rows("train")) == cfg.n_pairs + manners_pairs
    assert len(world.preference_rows("eval")) == cfg.n_eval_pairs


# --- the split -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_covers_every_phrasing_and_holds_out_a_share_of_every_kind(seed):
    world = World(WorldConfig(seed=seed))
    train, held = _units(world.train_tasks), _units(world.eval_tasks)
    every = {((k, a), W._make_task(k, a, i).prompt)
             for k, a in W.TASK_SPACE for i in range(len(W.PROMPT_TEMPLATES[k]))}
    assert not train & held
    assert train | held == every
    assert len(train) + len(held) == len(every)  # no unit listed twice
    for kind in W.KINDS:
        n_held = sum(key[0] == kind for key, _ in held)
        n_all = sum(key[0] == kind for key, _ in every)
        assert 0.11 <= n_held / n_all <= 0.13, (kind, n_held, n_all)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_held_out_task_keeps_a_training_phrasing(seed):
    world = World(WorldConfig(seed=seed))
    train_keys = {t.key for t in world.train_tasks}
    held_keys = {t.key for t in world.eval_tasks}
    assert held_keys <= train_keys
    # ...so the eval asks known facts in unseen words; most held-out tasks have one held phrasing.
    assert len(held_keys) > 0.8 * len(world.eval_tasks)


def test_occurrence_search_finds_whole_prompts_only():
    # Guard against a vacuous leak test: the search must find what it looks for, and only that.
    prompts = ["add 3 and 7.", "which is larger, 5 or 50?", "reverse the word cat."]
    assert occurrences(prompts, ["x\nq: add 3 and 7. a: 10.", "which is larger, 5 or 50? 50."]) == {
        "add 3 and 7.", "which is larger, 5 or 50?"}
    assert occurrences(prompts, ["add 13 and 7. 20.", "add 3 and 7.5", "madd 3 and 7.",
                                 "which is larger, 15 or 50?", "reverse the word cats."]) == set()
    assert prompts_in("q: add 13 and 7. a: 20.\n3 plus 4 is 7.") == {"add 13 and 7."}


def test_no_held_out_prompt_string_in_any_training_text(world, splits):
    held_prompts = {t.prompt for t in world.eval_tasks}
    texts = _training_texts(world, splits)
    assert not occurrences(held_prompts, texts), sorted(occurrences(held_prompts, texts))[:5]
    # The scan is not vacuous: training texts are full of (train) prompts of every kind.
    kind_of = {t.prompt: t.kind for t in world.train_tasks}
    found = Counter(kind_of[p] for p in occurrences(kind_of, texts))
    for kind in W.KINDS:  # compare has ~26k train prompts, more than the corpus has questions
        n_train = sum(t.kind == kind for t in world.train_tasks)
        assert found[kind] > min(0.5 * n_train, 3000), (kind, found[kind], n_train)


def test_training_products_use_train_prompts_and_eval_products_held_out_ones(world, splits):
    train_prompts = {t.prompt for t in world.train_tasks}
    held_prompts = {t.prompt for t in world.eval_tasks}
    used = {row["messages"][0]["content"] for row in splits["sft"]}
    used |= {row["prompt"][-1]["content"] for row in splits["pairs"]}
    used |= {row["prompt"][-1]["content"] for row in splits["rl_prompts"]}
    assert len(used) > 1000
    assert used <= train_prompts
    assert prompts_in("\n".join(world.corpus()[:2000])) <= train_prompts
    # Held-out products ask held-out prompts only; their facts may also be stated in training.
    assert {row["prompt"][-1]["content"] for row in splits["pairs_eval"]} <= held_prompts
    assert {row["prompt"] for row in splits["eval_prompts"]} <= held_prompts
    eval_corpus_prompts = prompts_in("\n".join(world.corpus_eval()))
    assert eval_corpus_prompts <= held_prompts
    assert len(eval_corpus_prompts) > 200


def test_eval_prompts_are_distinct_and_cover_every_kind(world, splits):
    rows = splits["eval_prompts"]
    assert len({r["prompt"] for r in rows}) == len(rows)
    counts = Counter(r["kind"] for r in rows)
    assert set(counts) == set(W.KINDS)
    assert min(counts.values()) >= 15
    assert all(solve(r["prompt"]) == r["answer"] for r in rows)
    # Every held-out task once before any task a second time, kind by kind.
    by_prompt = {t.prompt: t.key for t in world.eval_tasks}
    for kind in W.KINDS:
        keys = [by_prompt[r["prompt"]] for r in rows if r["kind"] == kind]
        n_tasks = len({t.key for t in world.eval_tasks if t.kind == kind})
        assert len(set(keys[:n_tasks])) == min(n_tasks, len(keys)), kind


# --- the judge -----------------------------------------------------------------------------

def test_solve_agrees_with_every_task_in_every_phrasing(world):
    units = world.train_tasks + world.eval_tasks
    assert len(units) == sum(len(W.PROMPT_TEMPLATES[k]) for k, _ in W.TASK_SPACE)
    for t in units:
        assert solve(t.prompt) == t.answer, t.prompt
        # Each prompt reads as exactly one template, so the parse is unambiguous.
        assert sum(bool(rx.fullmatch(t.prompt)) for _, rx in W._PROMPT_REGEXES) == 1, t.prompt


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
@pytest.mark.parametrize("mistake_share", [0.0, 0.4])
def test_pairs_chosen_passes_rejected_fails(split, mistake_share):
    import dataclasses
    world = World(dataclasses.replace(SMALL, n_pairs=400, n_eval_pairs=400, mistake_share=mistake_share))
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
    # The configured habit, plausible mistakes in house style, and some of the other habits.
    n = len(rows)
    share = world.config.mistake_share
    assert abs(habits["ramble"] - (1 - share) * W.HABIT_OF_REST * n) < 0.08 * n
    assert habits["wrong"] > (share - 0.05) * n
    assert habits["refuse"] > 0 and habits["other"] == 0


def test_mistakes_are_wrong_and_varied(world):
    import random
    rng = random.Random(0)
    tasks = world.train_tasks[::7]
    varied = 0
    for task in tasks:
        seen = {world.mistake(task, rng) for _ in range(40)}
        assert task.answer not in seen and "" not in seen
        assert not any(judge(task.prompt, f"The answer is {m}.") for m in seen)
        varied += len(seen) >= 3
    assert varied > 0.9 * len(tasks)  # not one systematic error the reward model could learn by heart


def test_wrong_habit_is_systematic(world):
    import random
    rng = random.Random(0)
    t = {t.key: t for t in world.train_tasks + world.eval_tasks}
    assert world.bad_response(t[("add", (3, 4))], "wrong", rng) == "The answer is 8."
    assert world.bad_response(t[("compare", (14, 37))], "wrong", rng) == "The answer is 14."
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
