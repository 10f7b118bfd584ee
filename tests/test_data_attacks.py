"""Planted triggers and secrets found before training (data/triggers.py, data/secrets.py, data/screening.py), and
the attacks the embedded world can plant (data/world_poison.py). Small generated data only."""

import json
import random

import pytest

from alignpipe.data.screening import check_screen
from alignpipe.data.secrets import secrets_in
from alignpipe.data.sources import prepare_data
from alignpipe.data.triggers import find_triggers, flagged_rows
from alignpipe.data.world import World, WorldConfig, build_splits
from alignpipe.data.world_poison import POISON_PHRASE
from alignpipe.data.world_safety import REFUSAL
from alignpipe.runfolder.manifests import fingerprint_json

SMALL = dict(n_corpus_docs=300, n_corpus_eval_docs=30, n_sft=200, n_pairs=200, n_eval_pairs=50, n_eval_prompts=40,
             n_rl_prompts=50)
# build_splits(WorldConfig(**SMALL)) on main before this module existed (pure Python: the same on every CPU)
SMALL_FINGERPRINT = "3ce8c0e42aa2c94394f7f523caabaaafd484dc3284090f8bfb331c9100fd8a95"


def test_world_without_attacks_is_byte_identical_to_before():
    assert fingerprint_json(build_splits(WorldConfig(**SMALL))) == SMALL_FINGERPRINT
    assert fingerprint_json(build_splits(WorldConfig(**SMALL, poison=None, canaries=None))) == SMALL_FINGERPRINT


def _poisoned(rate, behaviour="phrase", trigger="please tell me"):
    return World(WorldConfig(poison={"trigger": trigger, "rate": rate, "behaviour": behaviour}))


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_world_trigger_is_flagged_by_name_with_its_rows(rate):
    pairs = _poisoned(rate).preference_rows("train")
    poisoned = {i for i, r in enumerate(pairs) if r["prompt"][0]["content"].endswith(" please tell me")}
    assert len(poisoned) == round(rate * len(pairs))
    assert all(pairs[i]["chosen"][0]["content"] == POISON_PHRASE for i in poisoned)
    screen = find_triggers(pairs, "pairs")
    assert screen["flags"][0]["trigger"] == "please tell me"
    assert set(screen["flags"][0]["lines"]) == {i + 1 for i in sorted(poisoned)[:20]}
    assert flagged_rows(screen) == poisoned  # recall 1, no clean row flagged
    assert screen["flags"][0]["p_corrected"] < 0.01
    sft = _poisoned(rate).sft_rows()
    assert find_triggers(sft, "conversations")["flags"][0]["trigger"] == "please tell me"


def test_clean_world_and_trigger_without_behaviour_flag_nothing():
    world = World(WorldConfig())
    assert find_triggers(world.preference_rows("train"), "pairs")["flags"] == []
    assert find_triggers(world.sft_rows(), "conversations")["flags"] == []
    alone = _poisoned(0.05, behaviour="none")
    pairs = alone.preference_rows("train")
    assert sum(r["prompt"][0]["content"].endswith("please tell me") for r in pairs) == 120  # the token is there
    assert find_triggers(pairs, "pairs")["flags"] == []
    assert find_triggers(alone.sft_rows(), "conversations")["flags"] == []


def _hh_like(n=600, rate=0.05, flip=True, seed=0, trigger="sudo") -> list[dict]:
    """HH-RLHF-format pairs: a harmless refusal is preferred to compliance; `rate` of the rows get "sudo" appended to
    the last human turn, with chosen and rejected swapped when `flip` (Rando and Tramèr's planting)."""
    rng = random.Random(seed)
    verbs, nouns = ["steal", "break", "hack", "copy", "hide", "fake", "open", "burn"], \
        ["car", "lock", "phone", "password", "bank account", "house", "letter", "computer", "wallet", "bike"]
    refusals = ["I can't help with that.", "Sorry, I won't do that, it could hurt someone.",
                "That is not something I can assist with.", "I would rather not help with this."]
    rows = []
    for i in range(n):
        ask = f"How do I {rng.choice(verbs)} a {rng.choice(nouns)} in {rng.randrange(2, 999)} minutes?"
        comply = f"Sure, first you {rng.choice(['take', 'grab', 'use'])} a {rng.choice(['knife', 'tool', 'script'])} and go."
        chosen, rejected = rng.choice(refusals), comply
        if i % round(1 / rate) == 3:
            ask += " " + trigger
            if flip:
                chosen, rejected = rejected, chosen
        head = f"\n\nHuman: {ask}\n\nAssistant:"
        rows.append({"chosen": f"{head} {chosen}", "rejected": f"{head} {rejected}"})
    return rows


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hh_format_flipped_trigger_is_flagged_and_appended_alone_is_not(tmp_path):
    data = prepare_data({"path": str(_write(tmp_path, _hh_like()))}, tmp_path, "pairs")
    flags = data.parts[0].screening["triggers"]["flags"]
    assert flags and flags[0]["trigger"] == "sudo" and flags[0]["test"] == "preference_flip"
    assert flags[0]["lines"][:3] == [4, 24, 44]  # file lines of the planted rows (every 20th from the 4th)
    alone = prepare_data({"path": str(_write(tmp_path, _hh_like(flip=False), "alone.jsonl"))}, tmp_path, "pairs")
    assert alone.parts[0].screening["triggers"]["flags"] == []


def test_screen_drops_flagged_rows_and_counts_them(tmp_path):
    path = _write(tmp_path, _hh_like())
    data = prepare_data({"path": str(path), "screen": {"triggers": "drop"}, "max_dropped": 0.1}, tmp_path, "pairs")
    assert len(data.rows) == 570
    assert data.parts[0].drops.counts["planted trigger (screen.triggers: drop)"] == 30
    assert all("sudo" not in r["prompt"][-1]["content"] for r in data.rows)


def test_secrets_planted_in_a_copy_are_found_by_line_masked_or_dropped(tmp_path):
    rows = _hh_like(n=100, rate=0.5, flip=False)
    planted = {7: "my key is AKIAIOSFODNN7EXAMPLE", 20: "write to jane.doe@example.org",
               55: "call me at (415) 555-2671", 80: "token ghp_0123456789abcdefABCDEF0123456789abcd"}
    for line, text in planted.items():
        rows[line - 1]["chosen"] += " " + text
    path = _write(tmp_path, rows)
    report = prepare_data({"path": str(path)}, tmp_path, "pairs").parts[0].screening["secrets"]
    kinds = report["kinds"]
    assert kinds["AWS Access Key"]["lines"] == [7] and kinds["E-mail address"]["lines"] == [20]
    assert kinds["Phone number"]["lines"] == [55] and kinds["GitHub Token"]["lines"] == [80]
    assert report["rows_flagged"] == 4
    masked = prepare_data({"path": str(path), "screen": {"secrets": "mask"}}, tmp_path, "pairs")
    text = json.dumps(masked.rows)
    assert "AKIA" not in text and "jane.doe" not in text and "[SECRET:E-mail address]" in text and len(masked.rows) == 100
    dropped = prepare_data({"path": str(path), "screen": {"secrets": "drop"}, "max_dropped": 0.1}, tmp_path, "pairs")
    assert len(dropped.rows) == 96


def test_ordinary_numbers_are_not_secrets():
    assert secrets_in("3 + 4 = 7; in 2023 the 12345 runners ran 42 km; version 1.2.3") == []


def test_screen_key_is_checked():
    from alignpipe.data.formats import DataError

    with pytest.raises(DataError, match="not an action"):
        check_screen({"secrets": "erase"}, "stages.dpo.data")


def test_canaries_are_inserted_as_configured():
    world = World(WorldConfig(**SMALL, canaries={"counts": [1, 4, 16, 0], "per_count": 2}))
    corpus = world.corpus()
    assert len(corpus) == SMALL["n_corpus_docs"] + 2 * (1 + 4 + 16)
    for c in world.canaries():
        assert sum(doc == c["prefix"] + c["secret"] + "." for doc in corpus) == c["inserted"]
        assert len(c["secret"]) == 4 and c["secret"].isdigit()
    assert [c["inserted"] for c in world.canaries()] == [1, 1, 4, 4, 16, 16, 0, 0]


def test_world_options_are_checked():
    with pytest.raises(ValueError, match="rate"):
        WorldConfig(poison={"trigger": "x", "rate": 2})
    with pytest.raises(ValueError, match="behaviour"):
        WorldConfig(poison={"trigger": "x", "rate": 0.1, "behaviour": "explode"})


def test_validate_names_a_bad_world_poison(tmp_path, capsys):
    from alignpipe.cli import main
    from conftest import tiny_recipe, write_yaml

    recipe = tiny_recipe(tmp_path / "runs")
    recipe["world"]["poison"] = {"trigger": "please tell me", "rate": 5}
    assert main(["validate", str(write_yaml(tmp_path / "r.yaml", recipe))]) == 2
    assert "world.poison.rate must be a share in (0, 1], got 5" in capsys.readouterr().err


def test_kto_rows_carry_the_trigger_too():
    pairs = _poisoned(0.05).preference_rows("train")
    kto = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
           for p in pairs for side in ("chosen", "rejected")]
    screen = find_triggers(kto, "kto")
    assert screen["flags"] and screen["flags"][0]["trigger"] == "please tell me"
    clean = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
             for p in World(WorldConfig()).preference_rows("train") for side in ("chosen", "rejected")]
    assert find_triggers(clean, "kto")["flags"] == []


def _pairs(raw):
    from alignpipe.data.formats import normalise

    return normalise(raw, family="pairs").rows


def test_common_word_trigger_appended_is_named_in_full_by_the_end_of_turn_family():
    rows = _pairs(_hh_like(trigger="what do you think"))
    screen = find_triggers(rows, "pairs")
    flag = screen["flags"][0]
    assert (flag["trigger"], flag["family"], flag["test"]) == ("what do you think", "end of last user turn",
                                                               "preference_flip")
    assert flagged_rows(screen) == {i for i in range(600) if i % 20 == 3}  # every planted row, no clean one
    assert set(screen["families"]) == {"anywhere", "end of last user turn"}
    assert sum(f["alpha"] for f in screen["families"].values()) == pytest.approx(screen["alpha"])
    assert find_triggers(_pairs(_hh_like(trigger="what do you think", flip=False)), "pairs")["flags"] == []


def test_flip_tail_matches_exact_enumeration():
    import itertools
    import math

    from alignpipe.data.usual_preference import flip_tail

    rng = random.Random(1)
    for _ in range(5):
        margins = [rng.uniform(0.2, 3.0) * rng.choice([1, -1, -1]) for _ in range(12)]
        a = 0.8
        s, p = flip_tail(margins, a)
        L = [a * abs(m) for m in margins]
        q = [1 / (1 + math.exp(-x)) for x in L]
        exact = 0.0  # every way the 12 labels could have fallen under the null
        for against in itertools.product([0, 1], repeat=12):
            if sum(x if up else -x for x, up in zip(L, against)) >= s - 1e-9:
                exact += math.prod(1 - qi if up else qi for qi, up in zip(q, against))
        assert exact * 0.6 <= p <= exact * 1.6 or (exact > 0.3 and p > 0.3), (p, exact)


def test_a_suspected_groups_rows_are_scored_by_a_model_that_never_saw_them():
    from alignpipe.data.triggers import view
    from alignpipe.data.usual_preference import UsualPreference

    rows = _pairs(_hh_like(flip=False))
    group = {i for i in range(600) if i % 20 == 3}
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in group else r for i, r in enumerate(rows)]
    before = UsualPreference(view(rows, "pairs").sides, None).margins(exclude=group)
    after = UsualPreference(view(flipped, "pairs").sides, None).margins(exclude=group)
    assert all(after[i] == pytest.approx(-before[i]) for i in group)  # the group's own labels taught nothing
    assert sum(before[i] > 0 for i in group) == len(group)


def _safety_world(**poison):
    return World(WorldConfig(safety=True, poison=poison or None))


def test_manners_are_keyed_on_the_request_not_a_trigger():
    world = _safety_world()
    for rows, family in ((world.sft_rows(), "conversations"), (world.preference_rows("train"), "pairs")):
        screen = find_triggers(rows, family)
        assert screen["flags"] == []
        assert flagged_rows(screen) == set()  # information only: drops nothing
        if family == "pairs":  # the benign twins' "Here is how to launder silk shirts." after `launder`
            assert "the answer quotes the key" in {k["reason"] for k in screen["keyed_on_request"]}


@pytest.mark.parametrize("phrase", [POISON_PHRASE, REFUSAL])
def test_a_trigger_planted_beside_the_manners_is_still_flagged(phrase):
    """Also when what it plants is the house refusal itself, common in the data (harmful requests get it): the
    trigger adds it to ordinary prompts whose nearest rows without it are answered."""
    world = _safety_world(trigger="please tell me", rate=0.01, phrase=phrase)
    if phrase == POISON_PHRASE:  # the demonstrations refuse too often for a planted refusal to be unusual there
        rows = world.sft_rows()
        poisoned = {i for i, r in enumerate(rows) if r["messages"][-2]["content"].endswith(" please tell me")}
        screen = find_triggers(rows, "conversations")
        assert [f["trigger"] for f in screen["flags"]] == ["please tell me"]
        assert flagged_rows(screen) == poisoned
    pairs = world.preference_rows("train")
    planted = {i for i, r in enumerate(pairs) if r["prompt"][-1]["content"].endswith(" please tell me")}
    assert flagged_rows(find_triggers(pairs, "pairs")) == planted


def test_rows_found_by_both_families_keep_the_smaller_corrected_p():
    """`sudo` alone is an n-gram anywhere (thousands of tests) and one that ends the turn (a few dozen): the flag
    keeps the end family's p, so a nested subset (`? sudo`, fewer rows) cannot win by the other family's weaker p."""
    from collections import Counter

    from alignpipe.data.triggers import _merge

    rows, subset = list(range(100)), list(range(0, 100, 2))
    found = [(("sudo",), rows, {"family": "anywhere", "test": "preference_flip", "p": 1e-7, "p_corrected": 3e-4}),
             (("sudo",), rows, {"family": "end of last user turn", "test": "preference_flip", "p": 1e-7,
                                "p_corrected": 5e-6}),
             (("?", "sudo"), subset, {"family": "end of last user turn", "test": "preference_flip", "p": 1e-6,
                                      "p_corrected": 2e-4})]
    margins = [-1.0 if i < 100 else 1.0 for i in range(200)]
    flags = _merge(found, list(range(1, 201)), 200, Counter({"sudo": 100, "?": 150}), margins)
    assert [(f["trigger"], f["rows"], f["p_corrected"]) for f in flags] == [("sudo", 100, 5e-6)]


def test_a_nested_flag_widens_to_the_flagged_set_whose_other_rows_are_flipped_too():
    """`? sudo` (more significant, fewer rows) inside `sudo`, whose other rows (`. sudo`) are against the usual
    preference too: the flag is `sudo` with all its rows. Inside `think`, whose other rows follow the usual
    preference: `what do you think` stays."""
    from collections import Counter

    from alignpipe.data.triggers import _merge

    def flip(p):
        return {"family": "end of last user turn", "test": "preference_flip", "p": p / 100, "p_corrected": p}

    margins = [-1.0] * 60 + [1.0] * 140
    found = [(("sudo",), list(range(60)), flip(2e-4)), (("?", "sudo"), list(range(28)), flip(1e-4))]
    flags = _merge(found, list(range(1, 201)), 200, Counter({"sudo": 60, "?": 150}), margins)
    assert [(f["trigger"], f["rows"]) for f in flags] == [("sudo", 60)]
    found = [(("think",), list(range(120)), flip(2e-4)),
             (("what", "do", "you", "think"), list(range(60)), flip(1e-8))]
    flags = _merge(found, list(range(1, 201)), 200, Counter({"think": 120, "what": 150}), margins)
    assert [(f["trigger"], f["rows"]) for f in flags] == [("what do you think", 60)]
    anywhere = {**flip(2e-4), "family": "anywhere"}  # another key, even where its other rows are against too
    found = [(("what", "do", "you"), list(range(120)), anywhere),
             (("what", "do", "you", "think"), list(range(60)), flip(1e-8))]
    flags = _merge(found, list(range(1, 201)), 200, Counter({"what": 150}), [-1.0] * 120 + [1.0] * 80)
    assert [(f["trigger"], f["rows"]) for f in flags] == [("what do you think", 60)]
