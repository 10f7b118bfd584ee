"""The evaluation's statistics (`alignpipe.eval.stats`) against values worked out by hand in the comments: Wilson
intervals from the formula, win rates and bootstrap intervals from counting. No function under test is its own
oracle. Pure: no model, no files."""

from __future__ import annotations

import pytest

from alignpipe.eval.stats import bootstrap_rate, outcome, paired, verdict, wilson, win_rate

TOL = 1e-4


# Wilson score interval of k successes in n, at z:
#   p = k/n,  denom = 1 + z^2/n,  centre = (p + z^2/(2n)) / denom,  half = z sqrt(p(1-p)/n + z^2/(4n^2)) / denom
@pytest.mark.parametrize("k, n, z, lo, hi", [
    # 7/10, z = 1.96: z^2 = 3.8416, z^2/n = 0.38416, denom = 1.38416
    #   centre = (0.7 + 0.19208) / 1.38416 = 0.89208 / 1.38416 = 0.644492
    #   half = 1.96 sqrt(0.021 + 0.009604) / 1.38416 = 1.96 x 0.174940 / 1.38416 = 0.342882 / 1.38416 = 0.247718
    #   -> [0.396774, 0.892210]
    (7, 10, 1.96, 0.396774, 0.892210),
    # 0/10: centre = half = 0.19208 / 1.38416 = 0.138771 -> [0, 0.277541] (the lower end clipped at 0)
    (0, 10, 1.96, 0.0, 0.277541),
    # 10/10: the mirror image of 0/10 -> [1 - 0.277541, 1] = [0.722459, 1]
    (10, 10, 1.96, 0.722459, 1.0),
    # 5/20, z = 1: p = 0.25, z^2/n = 0.05, denom = 1.05, centre = (0.25 + 0.025) / 1.05 = 0.275 / 1.05
    #   half = sqrt(0.25 x 0.75 / 20 + 1/1600) / 1.05 = sqrt(0.009375 + 0.000625) / 1.05 = 0.1 / 1.05
    #   -> [0.175 / 1.05, 0.375 / 1.05] = [1/6, 0.357143]
    (5, 20, 1.0, 1 / 6, 0.357143),
])
def test_wilson_interval_by_hand(k, n, z, lo, hi):
    got = wilson(k, n, z)
    assert got == pytest.approx((lo, hi), abs=TOL)


def test_wilson_of_no_samples_is_the_whole_range():
    assert wilson(0, 0) == (0.0, 1.0)


def test_outcome_is_win_tie_loss():
    assert (outcome(2.0, 1.0), outcome(1.0, 1.0), outcome(0.0, 1.0)) == (1.0, 0.5, 0.0)


def test_paired_matches_the_kth_samples_of_prompts_in_both():
    aligned = [{"prompt": "a", "s": 1}, {"prompt": "a", "s": 2}, {"prompt": "b", "s": 3}, {"prompt": "only", "s": 9}]
    baseline = [{"prompt": "a", "s": 10}, {"prompt": "b", "s": 30}, {"prompt": "b", "s": 31}]
    pairs = paired(aligned, baseline)
    # "a": aligned has 2 samples, baseline 1 -> one pair; "b": 1 and 2 -> one pair; "only" is in one list
    assert {p: [(x["s"], y["s"]) for x, y in rows] for p, rows in pairs.items()} == {"a": [(1, 10)], "b": [(3, 30)]}


def test_win_rate_counts_wins_ties_and_losses():
    pairs = {"p1": [({"r": 2}, {"r": 1}), ({"r": 1}, {"r": 1})],  # a win, a tie
             "p2": [({"r": 0}, {"r": 3})]}  # a loss
    win = win_rate(pairs, "r")
    # outcomes 1, 0.5, 0 -> rate 1.5 / 3 = 0.5
    assert win["rate"] == pytest.approx(0.5)
    assert (win["wins"], win["ties"], win["losses"], win["pairs"], win["prompts"]) == (1, 1, 1, 3, 2)


def test_bootstrap_interval_of_two_prompts():
    # prompt a: outcomes 1, 0.5 (sum 1.5 over 2); prompt b: 0, 0, 1 (sum 1 over 3); pooled 2.5 / 5 = 0.5.
    # A resample draws 2 prompts with replacement: a+a = 3/4 = 0.75 (chance 1/4), b+b = 2/6 = 1/3 (1/4),
    # a+b = 2.5/5 = 0.5 (1/2). Of 1000 resamples about 250 are b+b and 250 a+a, so the 2.5% point (the 25th
    # smallest) is 1/3 and the 97.5% point (the 975th) is 0.75.
    rate = bootstrap_rate({"a": [1.0, 0.5], "b": [0.0, 0.0, 1.0]}, seed=0)
    assert rate["rate"] == pytest.approx(0.5)
    assert rate["lo"] == pytest.approx(1 / 3) and rate["hi"] == pytest.approx(0.75)
    assert (rate["pairs"], rate["prompts"], rate["wins"], rate["ties"], rate["losses"]) == (5, 2, 2, 1, 2)


def test_bootstrap_of_identical_outcomes_has_no_spread_and_empty_prompts_are_left_out():
    # every outcome a win: every resample's rate is 1
    rate = bootstrap_rate({"a": [1.0, 1.0], "b": [1.0], "empty": []})
    assert (rate["rate"], rate["lo"], rate["hi"], rate["prompts"]) == (1.0, 1.0, 1.0, 2)
    assert bootstrap_rate({"a": []}) == {"rate": None}


@pytest.mark.parametrize("win, said", [
    ({"rate": 0.7, "lo": 0.55, "hi": 0.8}, "better"),  # the interval lies above 50%
    ({"rate": 0.3, "lo": 0.2, "hi": 0.45}, "worse"),  # below
    ({"rate": 0.6, "lo": 0.5, "hi": 0.7}, "no clear difference"),  # touches 50%: not excluded
    ({"rate": 0.5, "lo": 0.4, "hi": 0.6}, "no clear difference"),
    ({"rate": None}, "-"),
])
def test_verdict_needs_the_interval_to_exclude_one_half(win, said):
    assert verdict(win) == said
