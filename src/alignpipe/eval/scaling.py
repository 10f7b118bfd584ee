"""Scaling-law fits of a pretraining sweep: Chinchilla's approaches 2 and 3 (Hoffmann et al. 2022), with
bootstrap intervals, and the prediction of a point the fits never saw.

A point is a dict with `n` (parameters, in the sweep's counting convention), `d` (training tokens, each seen once),
`c` (FLOPs, 6 n d) and `loss` (held-out cross-entropy, nats per token).

- Approach 2: per compute budget (an IsoFLOP profile), a parabola of loss in log n; its minimum is that budget's
  n_opt; n_opt(C) = k_n C^a and d_opt(C) = k_d C^b are then least-squares lines in log-log.
- Approach 3: L(n, d) = E + A / n^alpha + B / d^beta, fitted as the paper does: parameters (a, b, e, alpha,
  beta) with A = exp(a), B = exp(b), E = exp(e); Huber loss (delta 1e-3) between log L and
  logsumexp(a - alpha log n, b - beta log d, e); L-BFGS from a grid of starts. The paper starts L-BFGS from every
  point of its grid; here the grid's objective is evaluated at every point and L-BFGS starts from the best
  `LBFGS_STARTS` of them (the same minimum on every synthetic test, at a fraction of the cost).
- Bootstrap: points drawn with replacement (within each budget for approach 2), and a point's seeds (`losses`,
  when it has several) drawn with replacement too, every fit repeated; 95% percentile intervals. The prediction
  interval of a new point adds one of the fit's own residuals (in log loss, scaled up by sqrt(n / (n - 5))) to
  each bootstrap prediction, so it covers the scatter of a point about the surface as well as the fit's
  uncertainty; a new point measured as the mean of as many seeds as the grid's has the scatter of the grid's.

numpy and scipy only; nothing here trains.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

HUBER_DELTA = 1e-3
MAX_EXTRAPOLATION = 1.0  # an IsoFLOP minimum further than this (ln n, a factor e) beyond its sizes is not measured
LBFGS_STARTS = 24
# the starting grid (the paper's: alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5, a, b in 0..25 by 5)
START_GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.01, 0.5),
              "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022
NANOCHAT_TOKENS_PER_PARAM = 10.5  # nanochat's own sweeps, with nanochat's parameter counting


def _arrays(points: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.array([p["n"] for p in points], float), np.array([p["d"] for p in points], float),
            np.array([p["loss"] for p in points], float))


# --- approach 3: L(n, d) = E + A / n^alpha + B / d^beta ---------------------------------------------------------


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """The three log-terms (a - alpha log n, b - beta log d, e), one row per point; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=1)


def _objective(theta: np.ndarray, log_n, log_d, log_l) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of log-prediction minus log-loss, and its gradient in theta."""
    t = _terms(theta, log_n, log_d)
    top = t.max(axis=1, keepdims=True)
    w = np.exp(t - top)
    pred = top[:, 0] + np.log(w.sum(axis=1))
    w /= w.sum(axis=1, keepdims=True)  # d pred / d term
    r = pred - log_l
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array([(dr * w[:, 0]).sum(), (dr * w[:, 1]).sum(), (dr * w[:, 2]).sum(),
                     -(dr * w[:, 0] * log_n).sum(), -(dr * w[:, 1] * log_d).sum()])
    return float(value), grad


def _grid_starts(log_n, log_d, log_l, keep: int) -> list[np.ndarray]:
    """The `keep` points of START_GRID with the lowest objective, best first."""
    g = START_GRID
    combos = np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))
    a, b, e, alpha, beta = (combos[:, i:i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)  # one row per start
    r = np.abs(pred - log_l)
    cost = np.where(r <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(axis=1)
    return [combos[i] for i in np.argsort(cost, kind="stable")[:keep]]


def fit_loss_surface(points: list[dict], starts: list[np.ndarray] | None = None) -> dict:
    """Approach 3 on `points`: {E, A, B, alpha, beta, objective, theta}. `starts`: L-BFGS starting thetas
    (None: the best of START_GRID)."""
    from scipy.optimize import minimize

    n, d, loss = _arrays(points)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    best = None
    for theta0 in starts if starts is not None else _grid_starts(log_n, log_d, log_l, LBFGS_STARTS):
        res = minimize(_objective, np.asarray(theta0, float), args=(log_n, log_d, log_l), jac=True,
                       method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta),
            "objective": float(best.fun), "theta": [float(v) for v in best.x]}


def surface_loss(fit: dict, n, d):
    """L(n, d) of an approach-3 fit (numbers or numpy arrays)."""
    return fit["E"] + fit["A"] / np.power(n, fit["alpha"]) + fit["B"] / np.power(d, fit["beta"])


def surface_optimum(fit: dict, c: float) -> tuple[float, float]:
    """(n_opt, d_opt) minimising L(n, d) under 6 n d = c (the paper's closed form)."""
    alpha, beta = fit["alpha"], fit["beta"]
    if alpha <= 0 or beta <= 0:
        return math.nan, math.nan
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
    n_opt = g * (c / 6.0) ** (beta / (alpha + beta))
    return n_opt, (c / 6.0) / n_opt


# --- approach 2: IsoFLOP profiles --------------------------------------------------------------------------------


def profiles(points: list[dict]) -> dict[float, list[dict]]:
    """Points grouped by their budget (`budget`, the nominal FLOPs the sweep asked for; else `c`)."""
    out: dict[float, list[dict]] = {}
    for p in points:
        out.setdefault(float(p.get("budget", p["c"])), []).append(p)
    return dict(sorted(out.items()))


def fit_isoflop(points: list[dict]) -> dict:
    """Approach 2: {profiles: [{budget, coef (loss = c2 x^2 + c1 x + c0 in x = ln n), n_opt, d_opt, loss_opt,
    inside}], dropped: [{budget, why}], n_exponent, n_coef, d_exponent, d_coef}. A profile needs 3 distinct sizes,
    an upward parabola, and its minimum at most MAX_EXTRAPOLATION (in ln n) beyond the sizes it was fitted on;
    `inside` says whether the minimum lies within those sizes."""
    rows, dropped = [], []
    for budget, group in profiles(points).items():
        x = np.log([p["n"] for p in group])
        if len(set(x.round(9))) < 3:
            dropped.append({"budget": budget, "why": "fewer than 3 distinct sizes"})
            continue
        c2, c1, c0 = np.polyfit(x, [p["loss"] for p in group], 2)
        if c2 <= 0:
            dropped.append({"budget": budget, "why": "no minimum (the parabola opens downwards)"})
            continue
        x_opt = -c1 / (2 * c2)
        if not x.min() - MAX_EXTRAPOLATION <= x_opt <= x.max() + MAX_EXTRAPOLATION:
            dropped.append({"budget": budget, "why": f"minimum at N = {math.exp(min(x_opt, 700)):.3g}, more than "
                                                     f"{math.exp(MAX_EXTRAPOLATION):.2g}x beyond the sizes"})
            continue
        n_opt = math.exp(x_opt)
        c_mean = float(np.mean([p["c"] for p in group]))  # 6 n d of the points actually trained
        rows.append({"budget": budget, "c": c_mean, "coef": [float(c2), float(c1), float(c0)], "n_opt": n_opt,
                     "d_opt": c_mean / (6 * n_opt), "loss_opt": float(c0 - c1 * c1 / (4 * c2)),
                     "inside": bool(x.min() <= x_opt <= x.max())})
    out = {"profiles": rows, "dropped": dropped}
    if len(rows) >= 2:
        log_c = np.log([r["c"] for r in rows])
        sn, in_ = np.polyfit(log_c, np.log([r["n_opt"] for r in rows]), 1)
        sd, id_ = np.polyfit(log_c, np.log([r["d_opt"] for r in rows]), 1)
        out.update(n_exponent=float(sn), n_coef=float(math.exp(in_)), d_exponent=float(sd), d_coef=float(math.exp(id_)))
    return out


def isoflop_optimum(fit: dict, c: float) -> tuple[float, float]:
    """(n_opt, d_opt) at budget c from approach 2's power laws."""
    if "n_exponent" not in fit:
        return math.nan, math.nan
    return fit["n_coef"] * c ** fit["n_exponent"], fit["d_coef"] * c ** fit["d_exponent"]


# --- both, with bootstrap intervals and a prediction -------------------------------------------------------------


def summarise(points: list[dict], c_target: float) -> dict:
    """Both fits on `points` and what they say at budget `c_target` (no intervals)."""
    surface, iso = fit_loss_surface(points), fit_isoflop(points)
    n3, d3 = surface_optimum(surface, c_target)
    n2, d2 = isoflop_optimum(iso, c_target)
    return {"approach3": surface, "approach2": iso, "c_target": c_target,
            "optimum3": {"n": n3, "d": d3, "tokens_per_param": d3 / n3, "loss": float(surface_loss(surface, n3, d3))},
            "optimum2": {"n": n2, "d": d2, "tokens_per_param": d2 / n2}}


def _interval(values: list[float]) -> list[float] | None:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 10:
        return None
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def _resample(points: list[dict], rng: np.random.Generator) -> list[dict]:
    """Points drawn with replacement within each IsoFLOP profile (so every profile keeps its size); a point with
    several seeds' losses (`losses`) gets the mean of as many seeds redrawn with replacement."""
    out = []
    for group in profiles(points).values():
        for i in rng.integers(0, len(group), len(group)):
            p = group[i]
            seeds = p.get("losses") or []
            if len(seeds) > 1:
                p = {**p, "loss": float(np.mean(rng.choice(seeds, len(seeds))))}
            out.append(p)
    return out


def prediction_residuals(points: list[dict], surface: dict) -> np.ndarray:
    """The fit's residuals in log loss, scaled by sqrt(n / (n - 5)): residuals about a fit of 5 constants are
    smaller than the scatter of a point the fit never saw."""
    n, d, loss = _arrays(points)
    residuals = np.log(loss) - np.log(surface_loss(surface, n, d))
    return residuals * math.sqrt(len(points) / max(1, len(points) - 5))


def bootstrap(points: list[dict], base: dict, c_target: float, new_point: dict | None = None, draws: int = 200,
              seed: int = 0) -> dict:
    """95% intervals of the exponents and of tokens per parameter at `c_target` (both approaches), and of the
    loss of `new_point` ({n, d}) under approach 3. `base`: `summarise(points, c_target)` (its optimum starts
    each redraw's L-BFGS). Redraws whose fit is degenerate are counted in `failed`, never hidden."""
    rng = np.random.default_rng(seed)
    draws_of: dict[str, list[float]] = {k: [] for k in ("alpha", "beta", "a", "b", "tpp3", "tpp2", "loss")}
    residuals = prediction_residuals(points, base["approach3"])
    failed = 0
    for _ in range(draws):
        sample = _resample(points, rng)
        surface = fit_loss_surface(sample, starts=[np.array(base["approach3"]["theta"])])
        iso = fit_isoflop(sample)
        n3, d3 = surface_optimum(surface, c_target)
        n2, d2 = isoflop_optimum(iso, c_target)
        failed += int(not math.isfinite(n2) or not math.isfinite(n3))
        draws_of["alpha"].append(surface["alpha"])
        draws_of["beta"].append(surface["beta"])
        draws_of["a"].append(iso.get("n_exponent", math.nan))
        draws_of["b"].append(iso.get("d_exponent", math.nan))
        draws_of["tpp3"].append(d3 / n3)
        draws_of["tpp2"].append(d2 / n2)
        if new_point is not None:
            noise = math.exp(float(residuals[rng.integers(0, len(residuals))]))
            draws_of["loss"].append(float(surface_loss(surface, new_point["n"], new_point["d"])) * noise)
    return {"draws": draws, "failed": failed, "seed": seed,
            "intervals": {k: _interval(v) for k, v in draws_of.items() if v}}


def miss(predicted: float, interval: list[float] | None, measured: float) -> dict:
    """How far the measured loss of the held-out point is from the prediction."""
    return {"predicted": predicted, "measured": measured, "relative_error": (measured - predicted) / predicted,
            "interval": interval, "half_width_relative": None if interval is None
            else (interval[1] - interval[0]) / 2 / predicted,
            "inside": None if interval is None else bool(interval[0] <= measured <= interval[1])}
