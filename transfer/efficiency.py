"""Sample efficiency over seeds: gains with p-values, labels saved, the default budget.

Shared by ``benchmarks/transfer_gain.py`` and the report's sweep. Inputs are per-seed
figures in seed order, ``grid[name][k] = [value for seed in seeds]``, the same seeds for
every name, so two names at one k are paired by seed (seed = the k-label subset + the init).

The combined significance of a gain is a paired t-test across seeds (``scipy.stats.ttest_rel``)
on the per-seed accuracy differences: the seeds are the repeated experiments, and the test
images are the same in every seed, so pooling McNemar over (seed, image) pairs would count
correlated images as independent. Per-seed McNemar p-values come from ``transfer.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from transfer.stats import wilson_interval, format_p, over_seeds

ALPHA = 0.05
SCRATCH = "scratch"
Grid = Mapping[str, Mapping[int, Sequence[float]]]


@dataclass(frozen=True)
class SeedGain:
    """mean(A - B) over seeds, its t-interval and the paired t-test p-value (nan: < 2 seeds)."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n_seeds: int

    def significant(self, alpha: float = ALPHA) -> bool:
        return not math.isnan(self.p_value) and self.p_value < alpha

    def better(self, alpha: float = ALPHA) -> bool:
        return self.significant(alpha) and self.mean > 0

    def describe(self) -> str:
        why = "1 seed" if self.n_seeds < 2 else "no spread across seeds"
        p = f"n/a ({why})" if math.isnan(self.p_value) else format_p(self.p_value)
        return f"{self.mean:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}], paired t p = {p}"

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def seed_gain(a: Sequence[float], b: Sequence[float]) -> SeedGain:
    """A against B paired by seed."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired by seed: {x.size} vs {y.size} values")
    diff = over_seeds(x - y)
    if x.size < 2:
        p = float("nan")
    elif np.allclose(x - y, (x - y)[0]):
        # No spread across seeds: the t-test is undefined; a zero difference is no gain, any
        # other is left unproven (nan) rather than declared infinitely significant.
        p = 1.0 if math.isclose(float((x - y)[0]), 0.0, abs_tol=1e-12) else float("nan")
    else:
        p = float(sps.ttest_rel(x, y).pvalue)
    return SeedGain(diff.mean, diff.ci_low, diff.ci_high, p, int(x.size))


def means(grid: Grid) -> dict[str, dict[int, float]]:
    return {name: {int(k): float(np.mean(v)) for k, v in row.items() if len(v)} for name, row in grid.items()}


def best_by_val(val: Grid, k: int, exclude: Sequence[str] = (SCRATCH,)) -> str | None:
    """The strategy with the highest mean VALIDATION accuracy at ``k`` (ties: first listed)."""
    scores = {name: float(np.mean(row[k])) for name, row in val.items()
              if name not in exclude and k in row and len(row[k])}
    return max(scores, key=scores.get) if scores else None


def gains_over_scratch(grid: Grid, scratch: str = SCRATCH) -> dict[str, dict[int, SeedGain]]:
    base = grid.get(scratch) or {}
    return {name: {int(k): seed_gain(v, base[k]) for k, v in row.items() if k in base}
            for name, row in grid.items() if name != scratch}


def labels_saved(scratch_mean: Mapping[int, float], transfer_mean: float, k_transfer: int) -> dict[str, Any]:
    """The smallest swept k at which scratch's mean reaches transfer's mean at ``k_transfer``."""
    reached = sorted(k for k, v in scratch_mean.items() if v >= transfer_mean)
    k_match = reached[0] if reached else None
    ks = sorted(scratch_mean)
    if k_match is None:
        text = (f"scratch does not reach transfer's {transfer_mean:.3f} (k={k_transfer}) within the sweep "
                f"(k <= {ks[-1] if ks else '?'}: best scratch {max(scratch_mean.values(), default=float('nan')):.3f})")
    else:
        text = (f"scratch needs k={k_match} labels per class to match transfer at k={k_transfer} "
                f"({scratch_mean[k_match]:.3f} vs {transfer_mean:.3f}): "
                f"{max(k_match - k_transfer, 0)} labels per class saved")
    return {"k_transfer": k_transfer, "transfer_mean": transfer_mean, "k_scratch_match": k_match,
            "saved_per_class": None if k_match is None else max(k_match - k_transfer, 0), "text": text}


def gain_stops_significant(gains: Mapping[int, SeedGain], alpha: float = ALPHA) -> dict[str, Any]:
    """The smallest k (ascending) at which the gain is no longer a significant positive gain."""
    ks = sorted(gains)
    stop = next((k for k in ks if not gains[k].better(alpha)), None)
    if not ks:
        text = "no gains measured"
    elif stop is None:
        text = f"the gain is significant (p < {alpha}) at every k in the sweep ({', '.join(map(str, ks))})"
    elif stop == ks[0]:
        text = f"transfer is not a significant gain over scratch even at the smallest k={stop} ({gains[stop].describe()})"
    else:
        text = f"transfer stops being a significant gain over scratch at k={stop} ({gains[stop].describe()})"
    return {"k": stop, "alpha": alpha, "text": text}


def recommend_default_k(
    val: Grid, ks: Sequence[int], scratch: str = SCRATCH, *, floor: float = 0.0, n_val: int | None = None,
) -> dict[str, Any]:
    """From VALIDATION only: the k where the val-best strategy gains most over scratch on val,
    among the budgets where that strategy clears the promotion ``floor`` with confidence (the
    Wilson 95% lower bound of its mean val accuracy over ``n_val`` images >= floor): a
    default the pipeline would have to reject on its own floor is no default."""
    rows = []
    for k in sorted(ks):
        best = best_by_val(val, k, exclude=(scratch,))
        if best is None or k not in (val.get(scratch) or {}):
            continue
        gain = seed_gain(val[best][k], val[scratch][k])
        mean = float(np.mean(val[best][k]))
        low = wilson_interval(round(mean * n_val), n_val)[0] if n_val else mean
        rows.append({"k": k, "strategy": best, "val_mean": mean, "val_low": low,
                     "val_scratch_mean": float(np.mean(val[scratch][k])), "val_gain": gain.to_json(),
                     "clears_floor": low >= floor})
    eligible = [r for r in rows if r["clears_floor"]]
    if not eligible:
        return {"k": None, "strategy": None, "reason": "no budget clears the floor on validation", "candidates": rows}
    top = max(eligible, key=lambda r: r["val_gain"]["mean"])
    others = ", ".join(
        f"k={r['k']} {r['strategy']} {r['val_gain']['mean']:+.3f}"
        + ("" if r["clears_floor"] else f" (val {r['val_mean']:.3f}, 95% lower bound {r['val_low']:.3f} < floor {floor})")
        for r in rows if r is not top)
    reason = (f"largest VALIDATION gain over scratch of the val-ranked best strategy among the budgets that "
              f"clear the floor {floor} on val: {top['strategy']} at k={top['k']}, val {top['val_mean']:.3f} vs "
              f"scratch {top['val_scratch_mean']:.3f} ({top['val_gain']['mean']:+.3f}); other k: {others}")
    return {"k": top["k"], "strategy": top["strategy"], "reason": reason, "candidates": rows}
