"""transfer/stats.py against library results and hand-checked cases on fixed vectors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint

from transfer import stats

# 20 paired outcomes: A right on 15, B on 10; A alone right on 7, B alone on 2
A = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
B = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0], bool)


def test_wilson_matches_statsmodels() -> None:
    for successes, n in [(0, 10), (7, 10), (757, 797), (797, 797)]:
        low, high = stats.wilson_interval(successes, n)
        ref = proportion_confint(successes, n, alpha=0.05, method="wilson")
        assert (low, high) == pytest.approx(ref, abs=1e-9)
    interval = stats.accuracy_ci(A)
    assert interval.value == 0.75 and interval.n == 20 and interval.ci_low < 0.75 < interval.ci_high


def test_exact_mcnemar_is_the_binomial_test_on_discordant_pairs() -> None:
    # 7 vs 2 discordant pairs: two-sided exact binomial p = 0.1797 (hand: 2*P(X<=2 | n=9, 1/2) = 2*46/512)
    assert stats.mcnemar_exact(A, B) == pytest.approx(2 * 46 / 512)
    assert stats.mcnemar_exact(A, B) == pytest.approx(binomtest(2, 9, 0.5).pvalue)
    assert stats.mcnemar_exact(A, A) == 1.0


def test_paired_bootstrap_ci_agrees_with_a_plain_resampling_of_pairs() -> None:
    a, b = np.tile(A, 10), np.tile(B, 10)  # 200 pairs: fine enough steps to compare quantiles
    low, high = stats.paired_bootstrap_ci(a, b, n_resamples=20000)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, a.size, size=(20000, a.size))
    diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    ref_low, ref_high = np.percentile(diffs, [2.5, 97.5])
    assert low == pytest.approx(ref_low, abs=0.01) and high == pytest.approx(ref_high, abs=0.01)
    assert low < 0.25 < high


def test_identical_predictions_are_no_difference() -> None:
    same = stats.compare_paired(A, A)
    assert (same.delta, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not same.better(0.05) and not same.worse(0.05)
    assert "McNemar p = 1.000" in same.describe()
    assert stats.gain_verdict(same, 0.05) == "no measurable gain"


def test_a_clear_difference_is_significant_in_the_right_direction() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(800) < 0.95
    b = a & (rng.random(800) < 0.85)  # B loses ~15% of A's hits, never gains one
    comparison = stats.compare_paired(a, b)
    assert comparison.better(0.05) and comparison.ci_low > 0 and comparison.only_b_right == 0
    assert stats.compare_paired(b, a).worse(0.05)
    assert not comparison.better(0.05, min_delta=0.5)  # significant but below the required size
    with pytest.raises(ValueError, match="same images"):
        stats.compare_paired(a, b[:10])


def test_over_seeds_t_interval() -> None:
    summary = stats.over_seeds([0.90, 0.92, 0.94])
    assert summary.mean == pytest.approx(0.92) and summary.std == pytest.approx(0.02)
    half = 4.302653 * 0.02 / np.sqrt(3)  # t(0.975, df=2)
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.92 - half, 0.92 + half), abs=1e-6)
    assert stats.over_seeds([0.5]).std == 0.0
