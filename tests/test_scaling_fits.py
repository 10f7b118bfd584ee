"""The scaling-law fits (alignpipe.eval.scaling) recover the constants that made synthetic points."""

import math

import numpy as np
import pytest

from alignpipe.eval import scaling

TRUE = {"E": 1.1, "A": 60.0, "B": 900.0, "alpha": 0.36, "beta": 0.30}
BUDGETS = [1e11, 3e11, 1e12, 3e12]


def isoflop_points(noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Seven sizes per budget, spread 4x either side of the true optimum, losses from TRUE (times log-normal noise)."""
    rng = np.random.default_rng(seed)
    points = []
    for c in BUDGETS:
        n_opt, _ = scaling.surface_optimum(TRUE, c)
        for n in n_opt * np.geomspace(0.25, 4.0, 7):
            d = c / (6 * n)
            loss = float(scaling.surface_loss(TRUE, n, d)) * math.exp(rng.normal(0, noise)) if noise else \
                float(scaling.surface_loss(TRUE, n, d))
            points.append({"n": float(n), "d": float(d), "c": c, "budget": c, "loss": loss})
    return points


def test_approach3_recovers_the_constants():
    fit = scaling.fit_loss_surface(isoflop_points())
    for key, value in TRUE.items():
        assert fit[key] == pytest.approx(value, rel=0.02), key


def test_approach3_optimum_is_the_closed_form_minimum():
    c = 1e13
    n_opt, d_opt = scaling.surface_optimum(TRUE, c)
    ns = n_opt * np.geomspace(0.5, 2.0, 201)
    losses = scaling.surface_loss(TRUE, ns, c / (6 * ns))
    assert ns[int(np.argmin(losses))] == pytest.approx(n_opt, rel=0.01)
    assert 6 * n_opt * d_opt == pytest.approx(c)


def test_approach2_exponents_are_those_of_the_surface():
    """On IsoFLOP profiles of L(n, d), n_opt grows as C^(beta/(alpha+beta)) and d_opt as C^(alpha/(alpha+beta))."""
    fit = scaling.fit_isoflop(isoflop_points())
    total = TRUE["alpha"] + TRUE["beta"]
    assert fit["n_exponent"] == pytest.approx(TRUE["beta"] / total, abs=0.02)
    assert fit["d_exponent"] == pytest.approx(TRUE["alpha"] / total, abs=0.02)
    assert fit["n_exponent"] + fit["d_exponent"] == pytest.approx(1.0, abs=1e-9)  # 6 n d = C on every profile
    assert all(row["inside"] for row in fit["profiles"])


def test_bootstrap_intervals_cover_the_truth_and_the_prediction():
    points = isoflop_points(noise=0.004, seed=1)
    target = 1e13
    n_new, _ = scaling.surface_optimum(TRUE, target)
    new = {"n": n_new, "d": target / (6 * n_new)}
    base = scaling.summarise(points, target)
    boot = scaling.bootstrap(points, base, target, new, draws=60, seed=0)
    iv = boot["intervals"]
    assert iv["alpha"][0] <= TRUE["alpha"] <= iv["alpha"][1]
    assert iv["beta"][0] <= TRUE["beta"] <= iv["beta"][1]
    true_loss = float(scaling.surface_loss(TRUE, new["n"], new["d"]))
    assert iv["loss"][0] <= true_loss <= iv["loss"][1]
    assert iv["loss"][1] - iv["loss"][0] < 0.1 * true_loss  # an interval that says something
    assert boot["failed"] == 0
    result = scaling.miss(float(scaling.surface_loss(base["approach3"], new["n"], new["d"])), iv["loss"], true_loss)
    assert result["inside"] and abs(result["relative_error"]) < 0.02


def test_a_profile_of_two_sizes_is_left_out_not_fitted():
    points = [p for p in isoflop_points() if p["budget"] != BUDGETS[0]]
    points += [{"n": 1e4, "d": 1e6, "c": 6e10, "budget": 6e10, "loss": 3.0},
               {"n": 2e4, "d": 5e5, "c": 6e10, "budget": 6e10, "loss": 2.9}]
    fit = scaling.fit_isoflop(points)
    assert [row["budget"] for row in fit["profiles"]] == BUDGETS[1:]


def test_a_profile_whose_minimum_lies_far_beyond_its_sizes_is_dropped_and_said():
    points = isoflop_points()
    c = BUDGETS[-1]
    n_opt, _ = scaling.surface_optimum(TRUE, c)
    far = [p for p in points if p["budget"] != c]
    for n in n_opt * np.geomspace(8, 40, 4):  # every size well above the optimum: the minimum is extrapolated
        far.append({"n": float(n), "d": c / (6 * n), "c": c, "budget": c,
                    "loss": float(scaling.surface_loss(TRUE, n, c / (6 * n)))})
    fit = scaling.fit_isoflop(far)
    assert [row["budget"] for row in fit["profiles"]] == BUDGETS[:-1]
    assert fit["dropped"][0]["budget"] == c and "beyond the sizes" in fit["dropped"][0]["why"]


def test_bootstrap_redraws_each_points_seeds():
    """A point of several seeds enters a redraw as the mean of its seeds drawn with replacement: the redrawn
    losses stay within its seeds' range and vary from redraw to redraw; the prediction interval, from means of
    three seeds of 3% scatter, covers the true loss."""
    rng = np.random.default_rng(3)
    points = []
    for p in isoflop_points():
        losses = [p["loss"] * math.exp(rng.normal(0, 0.03)) for _ in range(3)]
        points.append({**p, "losses": losses, "loss": float(np.mean(losses))})
    drawn = [q for _ in range(20) for q in scaling._resample(points, np.random.default_rng(_))]
    by_n: dict[float, set] = {}
    for q in drawn:
        seeds = next(p["losses"] for p in points if p["n"] == q["n"] and p["budget"] == q["budget"])
        assert min(seeds) - 1e-12 <= q["loss"] <= max(seeds) + 1e-12
        by_n.setdefault((q["n"], q["budget"]), set()).add(round(q["loss"], 12))
    assert max(len(v) for v in by_n.values()) > 3  # seeds redrawn, not the point's mean every time
    target = 1e13
    n_new, _ = scaling.surface_optimum(TRUE, target)
    new = {"n": n_new, "d": target / (6 * n_new)}
    boot = scaling.bootstrap(points, scaling.summarise(points, target), target, new, draws=60, seed=0)
    true_loss = float(scaling.surface_loss(TRUE, new["n"], new["d"]))
    assert boot["intervals"]["loss"][0] <= true_loss <= boot["intervals"]["loss"][1]


def test_prediction_residuals_are_scaled_for_the_fits_five_constants():
    points = isoflop_points(noise=0.02, seed=2)
    surface = scaling.fit_loss_surface(points)
    n, d, loss = (np.array([p[k] for p in points]) for k in ("n", "d", "loss"))
    raw = np.log(loss) - np.log(scaling.surface_loss(surface, n, d))
    scaled = scaling.prediction_residuals(points, surface)
    assert np.allclose(scaled, raw * math.sqrt(len(points) / (len(points) - 5)))
