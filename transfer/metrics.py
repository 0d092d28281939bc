"""Classification metrics (scikit-learn's) and calibration tables; plots: ``transfer.plots``.

Inputs may be numpy arrays, torch tensors or lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

ArrayLike = Any  # np.ndarray | torch.Tensor | Sequence


def _np(values: ArrayLike) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _labels(y: ArrayLike, num_classes: int, what: str) -> np.ndarray:
    y = _np(y).astype(np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y


# --------------------------------------------------------------------------- metrics


def _pair(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, num_classes, "y_true"), _labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    return t, p


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts; rows = true class, columns = predicted class (every class, even unseen)."""
    t, p = _pair(y_true, y_pred, num_classes)
    return skm.confusion_matrix(t, p, labels=np.arange(num_classes)).astype(np.int64)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    t, p = _np(y_true).reshape(-1), _np(y_pred).reshape(-1)
    return float(skm.accuracy_score(t, p)) if t.size else 0.0


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def per_class_recall(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """(K,) recall per class; 0 for a class with no true samples."""
    t, p = _pair(y_true, y_pred, num_classes)
    return skm.recall_score(t, p, labels=np.arange(num_classes), average=None, zero_division=0)


def per_class_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """(K,) F1 = 2TP / (2TP + FP + FN); 0 where undefined."""
    t, p = _pair(y_true, y_pred, num_classes)
    return skm.f1_score(t, p, labels=np.arange(num_classes), average=None, zero_division=0)


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all ``num_classes`` classes (unseen ones count 0)."""
    return float(per_class_f1(y_true, y_pred, num_classes).mean())


def reliability_bins(
    probs: ArrayLike, y_true: ArrayLike, n_bins: int = 10
) -> dict[str, np.ndarray]:
    """Equal-width confidence bins (lo, hi]: count, mean confidence and accuracy per bin."""
    probs = _np(probs).astype(np.float64)
    t = _np(y_true).astype(np.int64).reshape(-1)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)  # (N,), (N,)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    correct = np.bincount(idx, weights=(pred == t).astype(np.float64), minlength=n_bins)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count,
        "confidence": _safe_div(conf_sum, count),
        "accuracy": _safe_div(correct, count),
    }


def expected_calibration_error(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 10) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    bins = reliability_bins(probs, y_true, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return 0.0
    return float((bins["count"] / n * np.abs(bins["accuracy"] - bins["confidence"])).sum())


def classification_report(
    probs: ArrayLike, y_true: ArrayLike, classes: Sequence[str], n_bins: int = 10
) -> dict[str, Any]:
    """JSON-able test report: accuracy, macro_f1, ece, per_class_recall, confusion_matrix."""
    probs = _np(probs).astype(np.float64)
    k = len(classes)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise ValueError(f"probs must be (N, {k}) for {k} classes, got {probs.shape}")
    pred = probs.argmax(axis=1)
    t = _labels(y_true, k, "y_true")
    recall = per_class_recall(t, pred, k)
    return {
        "accuracy": accuracy(t, pred),
        "macro_f1": macro_f1(t, pred, k),
        "ece": expected_calibration_error(probs, t, n_bins),
        "per_class_recall": {str(c): float(r) for c, r in zip(classes, recall)},
        "confusion_matrix": confusion_matrix(t, pred, k).tolist(),
    }


def reliability_table(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """JSON-able reliability bins and the ECE: what a reliability diagram is drawn from."""
    bins = reliability_bins(probs, y_true, n_bins)
    return {"ece": expected_calibration_error(probs, y_true, n_bins),
            **{k: v.tolist() for k, v in bins.items()}}
