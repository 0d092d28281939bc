"""Uncertainty for every figure and significance for every comparison.

A test accuracy is a proportion of N images: it gets a Wilson 95% interval. Two models
scored on the *same* images are compared paired: the difference of accuracies with a
paired bootstrap 95% CI over test images, and the exact McNemar test on the images where
exactly one of the two is right. Library implementations throughout (scipy, statsmodels):
nothing here re-derives a statistic a library already has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999


def _correct(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=bool).reshape(-1)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's ``binomtest``)."""
    if n == 0:
        return 0.0, 1.0
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Proportion:
    """An accuracy with its interval: ``value`` = successes / n."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def accuracy_ci(correct: Any, confidence: float = CONFIDENCE) -> Proportion:
    """Accuracy of a per-image correctness vector, with its Wilson interval."""
    c = _correct(correct)
    low, high = wilson_interval(int(c.sum()), c.size, confidence)
    return Proportion(float(c.mean()) if c.size else 0.0, low, high, int(c.size))


def mcnemar_exact(correct_a: Any, correct_b: Any) -> float:
    """Exact (binomial) McNemar p-value: does A's accuracy differ from B's on the same images?"""
    a, b = _paired(correct_a, correct_b)
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    return float(mcnemar(table, exact=True).pvalue)


def paired_bootstrap_ci(
    correct_a: Any, correct_b: Any, *, confidence: float = CONFIDENCE,
    n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of acc(A) - acc(B), resampling test images (pairs kept)."""
    a, b = _paired(correct_a, correct_b)
    diff = a.astype(np.float64) - b.astype(np.float64)  # (N,) in {-1, 0, 1}
    if diff.size == 0 or np.all(diff == diff[0]):
        value = float(diff[0]) if diff.size else 0.0
        return value, value  # no spread to resample (e.g. identical predictions)
    result = sps.bootstrap(
        (diff,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
        method="percentile", rng=np.random.default_rng(seed), vectorized=True,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _paired(correct_a: Any, correct_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _correct(correct_a), _correct(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same images: {a.size} vs {b.size} predictions")
    return a, b


@dataclass(frozen=True)
class PairedComparison:
    """A vs B on the same N images: delta = acc(A) - acc(B), its CI and McNemar's p."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    only_a_right: int
    only_b_right: int

    def significant(self, alpha: float) -> bool:
        return self.p_value < alpha

    def better(self, alpha: float, min_delta: float = 0.0) -> bool:
        """A is better than B: significant, positive, and at least ``min_delta``."""
        return self.significant(alpha) and self.delta > 0 and self.delta >= min_delta

    def worse(self, alpha: float) -> bool:
        return self.significant(alpha) and self.delta < 0

    def describe(self) -> str:
        """``+0.039, 95% CI [0.021, 0.058], McNemar p = 1.2e-04``"""
        return (f"{self.delta:+.3f}, 95% CI [{self.ci_low:+.3f}, {self.ci_high:+.3f}], "
                f"McNemar p = {format_p(self.p_value)}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare_paired(correct_a: Any, correct_b: Any, *, seed: int = 0) -> PairedComparison:
    a, b = _paired(correct_a, correct_b)
    low, high = paired_bootstrap_ci(a, b, seed=seed)
    return PairedComparison(
        delta=float(a.mean() - b.mean()) if a.size else 0.0, ci_low=low, ci_high=high,
        p_value=mcnemar_exact(a, b), n=int(a.size),
        only_a_right=int((a & ~b).sum()), only_b_right=int((~a & b).sum()),
    )


def gain_verdict(comparison: PairedComparison, alpha: float) -> str:
    """Transfer (A) vs scratch (B) in words: significant gain, negative transfer, or neither."""
    if comparison.better(alpha):
        return "significant gain"
    if comparison.worse(alpha):
        return "negative transfer (scratch significantly better)"
    return "no measurable gain" if comparison.ci_low <= 0 <= comparison.ci_high else "not significant"


def format_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


@dataclass(frozen=True)
class SeedSummary:
    """A figure over seeds: mean, sample std, t-interval of the mean, and every value."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    values: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "values": list(self.values)}

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f} (n={len(self.values)})"


def over_seeds(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedSummary:
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        return SeedSummary(mean, 0.0, mean, mean, tuple(map(float, v)))
    std = float(v.std(ddof=1))
    if std == 0.0:
        return SeedSummary(mean, 0.0, mean, mean, tuple(map(float, v)))
    low, high = sps.t.interval(confidence, v.size - 1, loc=mean, scale=std / np.sqrt(v.size))
    return SeedSummary(mean, std, float(low), float(high), tuple(map(float, v)))
