"""Power by design: sample sizes, power and detectable differences for rate comparisons."""

from __future__ import annotations

import math
import random

import pytest

from emlens.power import min_detectable_difference, n_per_arm, power_at, rate_difference


def test_n_per_arm_matches_the_textbook_value_and_reaches_the_power():
    # Fleiss' formula without continuity correction: 10% vs 25%, alpha 0.05, power 0.8 -> 100
    n = n_per_arm(0.10, 0.15)
    assert n == 100
    assert power_at(0.10, 0.15, n) >= 0.8 > power_at(0.10, 0.15, n - 2)
    assert n_per_arm(0.5, 0.15) > n_per_arm(0.1, 0.15) > n_per_arm(0.0, 0.15)


def test_min_detectable_difference_inverts_power():
    for p0, n in ((0.05, 20), (0.2, 60), (0.4, 200)):
        mde = min_detectable_difference(p0, n)
        assert power_at(p0, mde, n) == pytest.approx(0.8, abs=1e-6)
    assert math.isnan(min_detectable_difference(0.5, 1))  # nothing is detectable at n = 1
    assert min_detectable_difference(0.1, n_per_arm(0.1, 0.15)) <= 0.15


def test_power_matches_a_simulated_test():
    """The normal-approximation power against the rejection rate of the same z test simulated."""
    rng = random.Random(0)
    p0, delta, n, trials = 0.1, 0.15, 100, 4000
    rejected = 0
    for _ in range(trials):
        k0 = sum(rng.random() < p0 for _ in range(n))
        k1 = sum(rng.random() < p0 + delta for _ in range(n))
        pbar = (k0 + k1) / (2 * n)
        sd = math.sqrt(2 * pbar * (1 - pbar) / n)
        rejected += sd > 0 and abs(k1 - k0) / n / sd > 1.959964
    # binomial standard error of the simulated rate: about 0.006
    assert abs(rejected / trials - power_at(p0, delta, n)) < 0.03


def test_rate_difference_is_newcombe_and_contains_the_difference():
    d, low, high = rate_difference(3, 10, 1, 10)
    assert d == pytest.approx(0.2) and low < 0 < d < high  # overlapping intervals: not decided
    # Newcombe (1998), method 10, example: 56/70 vs 48/80 -> 0.2, [0.0524, 0.3339]
    d, low, high = rate_difference(56, 70, 48, 80)
    assert (round(d, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)
    assert all(math.isnan(x) for x in rate_difference(0, 0, 1, 3))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="baseline rate"):
        n_per_arm(1.2, 0.1)
    with pytest.raises(ValueError, match="nonzero delta"):
        n_per_arm(0.9, 0.15)
    with pytest.raises(ValueError, match="power"):
        n_per_arm(0.1, 0.1, power=1.0)


def test_power_of_zero_vs_one_is_decided_without_dividing_by_zero():
    import warnings

    from emlens.power import power_at

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert power_at(0.0, 1.0, 10) == 1.0
        assert power_at(0.0, 1.0, 1) == 0.0  # 1 - 1.96 * sqrt(0.5) < 0: one answer per arm cannot


def test_compare_rates_puts_the_interval_and_the_power_of_one_comparison_together():
    from emlens.power import compare_rates

    c = compare_rates(22, 66, 0, 66)
    assert (c["effect"], c["low"], c["high"]) == rate_difference(22, 66, 0, 66)
    assert c["p0"] == 0.0 and c["n_used"] == 66 and c["n_needed"] == n_per_arm(0.0, 0.15)
    assert c["power_at_n"] == power_at(0.0, 0.15, 66) > 0.8
    assert c["mde_at_n"] == min_detectable_difference(0.0, 66) < 0.15
    # the baseline is the lower rate, capped where a rise of delta is still defined
    assert compare_rates(10, 10, 19, 20)["p0"] == 0.85
    none = compare_rates(0, 0, 3, 10)
    assert none["n_used"] == 0 and none["power_at_n"] == 0.0 and math.isnan(none["mde_at_n"])
