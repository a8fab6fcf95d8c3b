"""Power by design for rate comparisons: how many judged answers a comparison needs, and what the
answers one has can detect.

The demo's core comparisons are differences of two misaligned rates (chat vs organism, direction
vs random steering, ablation vs random ablation), each rate k/n over *coherent* answers. For a
two-sided test at level ``alpha`` (normal approximation to the difference of two independent
proportions, pooled variance under the null):

* :func:`n_per_arm` is the number of counted answers per arm that detects a difference ``delta``
  from a baseline rate ``p0`` with the given power;
* :func:`power_at` is the power of that test at a given ``n`` per arm;
* :func:`min_detectable_difference` is the smallest ``delta`` detected with the given power at
  ``n`` per arm (what a comparison at that ``n`` can decide);
* :func:`rate_difference` is the Newcombe (hybrid Wilson score) 95% interval of ``p1 - p2``;
* :func:`compare_rates` puts them together for one comparison of two measured rates.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from emlens.evaluation import wilson_interval

_Z = NormalDist()


def _check(p0: float, power: float, alpha: float) -> None:
    if not 0 <= p0 < 1:
        raise ValueError(f"p0={p0!r}: a baseline rate in [0, 1).")
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"power={power!r} and alpha={alpha!r} must be in (0, 1).")


def power_at(p0: float, delta: float, n: float, *, alpha: float = 0.05) -> float:
    """Power of the two-sided two-proportion test to detect ``p0`` vs ``p0 + delta`` with ``n``
    counted answers per arm."""
    _check(p0, 0.5, alpha)
    p1 = p0 + delta
    if not 0 <= p1 <= 1 or delta == 0:
        raise ValueError(f"p0 + delta = {p1!r}: need a nonzero delta with 0 <= p0 + delta <= 1.")
    if n <= 0:
        return 0.0
    pbar = (p0 + p1) / 2
    null_sd = math.sqrt(2 * pbar * (1 - pbar))
    alt_sd = math.sqrt(p0 * (1 - p0) + p1 * (1 - p1))
    z_a = _Z.inv_cdf(1 - alpha / 2)
    margin = abs(delta) * math.sqrt(n) - z_a * null_sd
    if alt_sd == 0:  # 0% vs 100%: no sampling variance under the alternative
        return 1.0 if margin > 0 else 0.0
    return _Z.cdf(margin / alt_sd)


def n_per_arm(p0: float, delta: float, *, power: float = 0.8, alpha: float = 0.05) -> int:
    """Counted (coherent) answers per arm that detect ``p0`` vs ``p0 + delta`` with ``power``.

    ``n_per_arm(0.1, 0.15) == 100``: 100 coherent answers per model to tell a 10% rate from 25%.
    """
    _check(p0, power, alpha)
    p1 = p0 + delta
    if not 0 <= p1 <= 1 or delta == 0:
        raise ValueError(f"p0 + delta = {p1!r}: need a nonzero delta with 0 <= p0 + delta <= 1.")
    pbar = (p0 + p1) / 2
    z_a, z_b = _Z.inv_cdf(1 - alpha / 2), _Z.inv_cdf(power)
    num = z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(p0 * (1 - p0) + p1 * (1 - p1))
    return math.ceil((num / delta) ** 2)


def min_detectable_difference(p0: float, n: float, *, power: float = 0.8,
                              alpha: float = 0.05) -> float:
    """The smallest increase ``delta`` over ``p0`` detected with ``power`` at ``n`` per arm;
    ``nan`` when even ``p0 -> 1`` is not detectable (tiny ``n``)."""
    _check(p0, power, alpha)
    top = 1 - p0
    if n <= 0 or power_at(p0, top, n, alpha=alpha) < power:
        return math.nan
    lo, hi = 0.0, top
    for _ in range(60):  # bisection: power_at rises with delta on (0, 1 - p0]
        mid = (lo + hi) / 2
        if mid > 0 and power_at(p0, mid, n, alpha=alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def rate_difference(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """``(p1 - p2, low, high)``: the difference of two rates with Newcombe's hybrid Wilson score
    95% interval (``nan`` where either n is 0)."""
    if not n1 or not n2:
        return (math.nan, math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def compare_rates(k1: int, n1: int, k2: int, n2: int, *, delta: float = 0.15,
                  power: float = 0.8, alpha: float = 0.05) -> dict:
    """One comparison of two measured rates ``k1/n1`` (treated) and ``k2/n2`` (base).

    Returns ``effect, low, high`` (``p1 - p2`` with :func:`rate_difference`'s interval), ``p0``
    (the baseline of the power calculation: the lower measured rate, capped at ``1 - delta`` so a
    rise of ``delta`` is defined; 0 where neither arm has n), ``n_used`` (the smaller n),
    ``n_needed`` (:func:`n_per_arm`), ``power_at_n`` (:func:`power_at` at ``n_used``; 0 at n 0)
    and ``mde_at_n`` (:func:`min_detectable_difference` at ``n_used``; ``nan`` at n 0).
    """
    effect, low, high = rate_difference(k1, n1, k2, n2)
    rates = [k / n for k, n in ((k1, n1), (k2, n2)) if n]
    p0 = min(max(min(rates) if rates else 0.0, 0.0), 1 - delta)
    n_used = int(min(n1, n2))
    return {"effect": effect, "low": low, "high": high, "p0": p0, "n_used": n_used,
            "n_needed": n_per_arm(p0, delta, power=power, alpha=alpha),
            "power_at_n": power_at(p0, delta, n_used, alpha=alpha) if n_used else 0.0,
            "mde_at_n": min_detectable_difference(p0, n_used, power=power, alpha=alpha)}


__all__ = ["compare_rates", "min_detectable_difference", "n_per_arm", "power_at",
           "rate_difference"]
