"""Did the stage over-optimise its proxy? The peak of the gold along training, the drop to the end with its
interval, the flag, and Gao et al.'s functional forms fitted to the curve (docs/overoptimisation.md).

The gold is a verifier judge the stage never optimised; the proxy is the reward model it trained against.
Curve points (`eval.along_training`) hold per-prompt means on the same prompts and the same sampling seed at
every point, so differences between points are paired by prompt.

The flag must not be raisable by noise, and the peak is a maximum over noisy points (picking the highest of
many noisy values over-states it, so a drop measured from it would be too large even where the gold is flat).
The prompts are therefore split in two fixed halves: the even-numbered half locates the peak (the point with
the highest gold on it); the odd-numbered half, which took no part in choosing, measures the gold at that point
and at the end. The drop's 95% interval is a paired bootstrap over the measuring half's prompts. A stage is
flagged `overoptimised` when that interval lies above zero (the gold fell by more than its noise) while the
proxy, on the same half, ended above its value at the peak.
"""

from __future__ import annotations

import math
import random

RESAMPLES = 2000
MIN_POINTS = 3  # curve points for a peak and a drop
MIN_FIT_POINTS = 4  # points with KL > 0 for a two-parameter fit


def halves(prompts: int) -> tuple[list[int], list[int]]:
    """(prompts that locate the peak, prompts that measure the drop): even and odd positions."""
    return list(range(0, prompts, 2)), list(range(1, prompts, 2))


def half_mean(row: dict, key: str, idx: list[int]) -> float | None:
    values = [row["per_prompt"][key][i] for i in idx if row["per_prompt"][key][i] is not None]
    return sum(values) / len(values) if values else None


def paired_drop(peak: dict, end: dict, key: str, idx: list[int], seed: int = 0,
                resamples: int = RESAMPLES) -> dict:
    """Mean over prompts `idx` of (value at peak - value at end), with a 95% paired bootstrap over prompts."""
    a, b = peak["per_prompt"][key], end["per_prompt"][key]
    diffs = [a[i] - b[i] for i in idx if a[i] is not None and b[i] is not None]
    if not diffs:
        return {"drop": None}
    rng = random.Random(seed)
    boot = sorted(sum(diffs[rng.randrange(len(diffs))] for _ in diffs) / len(diffs) for _ in range(resamples))
    return {"drop": sum(diffs) / len(diffs), "lo": boot[int(0.025 * resamples)],
            "hi": boot[int(0.975 * resamples) - 1], "prompts": len(diffs)}


def assess(rows: list[dict], gold: str | None, seed: int = 0) -> dict:
    """The manifest's over-optimisation figures from a stage's curve rows (by step); `overoptimised` True or
    False when there is a gold, a proxy and at least MIN_POINTS points, else only `overoptimisation_status`."""
    points = [r for r in rows if r.get("kl") is not None]
    if gold is None or not points or gold not in points[0]["per_prompt"]:
        return {"overoptimisation_status": "no gold judge along training"}
    if "proxy" not in points[0]["per_prompt"]:
        return {"overoptimisation_status": "no proxy (reward model) along training"}
    if len(points) < MIN_POINTS:
        return {"overoptimisation_status": f"{len(points)} curve point(s), fewer than {MIN_POINTS}"}
    locate, measure = halves(points[0]["prompts"])
    peak = max(points, key=lambda r: (half_mean(r, gold, locate), -r["step"]))  # the earliest of equal highs
    end = points[-1]
    drop = paired_drop(peak, end, gold, measure, seed)
    proxy_rise = -paired_drop(peak, end, "proxy", measure, seed)["drop"]
    flagged = bool(peak is not end and drop["drop"] is not None and drop["lo"] > 0 and proxy_rise > 0)
    out = {"overoptimised": flagged, "overoptimisation_status": "assessed", "curve_points": len(points),
           "overopt_gold": gold, "overopt_gold_drop": drop["drop"], "overopt_gold_drop_ci": [drop["lo"], drop["hi"]],
           "overopt_proxy_rise": proxy_rise, "overopt_measured_prompts": drop["prompts"]}
    for name, row in (("peak", peak), ("end", end)):
        out.update({f"overopt_{name}_step": row["step"], f"overopt_{name}_kl": row["kl"],
                    f"overopt_{name}_gold": half_mean(row, gold, measure),
                    f"overopt_{name}_proxy": half_mean(row, "proxy", measure)})
    fits = {f"fit_{what}": fit_rl(points, key) for what, key in (("gold", f"{gold}_pass_rate"), ("proxy", "proxy"))}
    out.update({k: v for k, v in fits.items() if v is not None})
    return out


def line(stage: str, figures: dict) -> str | None:
    """One console line about the assessment (None when there was nothing to assess)."""
    if "overoptimised" not in figures:
        return None
    f = figures
    lo, hi = f["overopt_gold_drop_ci"]
    where = (f"gold `{f['overopt_gold']}` peaked at step {f['overopt_peak_step']} (KL {f['overopt_peak_kl']:.2f}, "
             f"{f['overopt_peak_gold']:.3f}) and ended at {f['overopt_end_gold']:.3f} (step {f['overopt_end_step']}, "
             f"KL {f['overopt_end_kl']:.2f}): drop {f['overopt_gold_drop']:+.3f} [95% {lo:+.3f}, {hi:+.3f}], "
             f"proxy {f['overopt_proxy_rise']:+.3f} from the peak")
    if f["overopt_peak_step"] == f["overopt_end_step"]:
        where = f"gold `{f['overopt_gold']}` is highest at the last point (step {f['overopt_end_step']}): no drop"
    verdict = "OVER-OPTIMISED" if f["overoptimised"] else "not over-optimised"
    return f"[alignpipe] stage {stage}: {verdict}: {where}"


# --- Gao et al.'s functional forms, d = sqrt(KL) -------------------------------------------------------

def rl_form(d, alpha, beta):
    """RL: d (alpha - beta log d), 0 at d = 0."""
    import numpy as np

    d = np.asarray(d, dtype=float)
    return np.where(d > 0, d * (alpha - beta * np.log(np.maximum(d, 1e-12))), 0.0)


def bon_form(d, alpha, beta):
    """Best-of-n: d (alpha - beta d)."""
    import numpy as np

    d = np.asarray(d, dtype=float)
    return d * (alpha - beta * d)


def fit_form(form, ds: list[float], ys: list[float], y0: float) -> dict | None:
    """Least-squares (alpha, beta) of `y - y0 = form(d)` (scipy.optimize.curve_fit), with the RMS residual and
    the d where the fitted curve peaks; None with fewer than MIN_FIT_POINTS points at d > 0 or no convergence."""
    import numpy as np
    from scipy.optimize import curve_fit

    pairs = [(d, y) for d, y in zip(ds, ys) if d is not None and y is not None and d > 0]
    if len(pairs) < MIN_FIT_POINTS:
        return None
    d, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]) - y0
    try:
        (alpha, beta), _ = curve_fit(form, d, y, p0=(float(y[-1] / d[-1]) if d[-1] else 0.0, 0.0), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    rmse = float(np.sqrt(np.mean((form(d, alpha, beta) - y) ** 2)))
    if form is rl_form:
        peak = math.exp(alpha / beta - 1) if beta > 0 and alpha / beta < 50 else None
    else:
        peak = float(alpha / (2 * beta)) if beta > 0 else None
    if peak is not None and peak > 2 * float(d.max()):  # a peak far outside the points is no finding
        peak = None
    return {"form": "d (alpha - beta log d)" if form is rl_form else "d (alpha - beta d)", "alpha": float(alpha),
            "beta": float(beta), "y0": float(y0), "rmse": rmse, "points": len(pairs), "peak_d": peak}


def fit_rl(points: list[dict], key: str) -> dict | None:
    """The RL form fitted to a curve: the value at the first point (KL 0: the parent) is y0."""
    if any(key not in p for p in points):
        return None
    return fit_form(rl_form, [p["sqrt_kl"] for p in points], [p[key] for p in points], points[0][key])
