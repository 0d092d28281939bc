"""Classification metrics, calibration and the plots the pipeline logs.

Inputs may be numpy arrays, torch tensors or lists. Plots are drawn on a bare
``matplotlib.figure.Figure`` (Agg canvas), so no pyplot state and no GUI backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts; rows = true class, columns = predicted class."""
    t, p = _labels(y_true, num_classes, "y_true"), _labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    counts = np.bincount(t * num_classes + p, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    t, p = _np(y_true).reshape(-1), _np(y_pred).reshape(-1)
    return float((t == p).mean()) if t.size else 0.0


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def per_class_recall(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """(K,) recall per class; 0 for a class with no true samples."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return _safe_div(np.diag(cm).astype(np.float64), cm.sum(axis=1))


def per_class_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """(K,) F1 = 2TP / (2TP + FP + FN); 0 where undefined."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    return _safe_div(2 * tp, 2 * tp + fp + fn)


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all ``num_classes`` classes."""
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


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_confusion_matrix(
    cm: ArrayLike, classes: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Counts annotated in each cell, colour = row-normalised rate (recall per true class)."""
    cm = _np(cm).astype(np.int64)
    support = cm.sum(axis=1, keepdims=True).repeat(cm.shape[1], axis=1)  # (K, K)
    rates = _safe_div(cm.astype(np.float64), support)
    size = 1.2 + 0.45 * len(classes)
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    ticks = range(len(classes))
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=45 if len(classes) > 10 else 0)
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black")
    return _save(fig, path)


def _as_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    return asdict(row) if is_dataclass(row) else vars(row)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_learning_curves(
    history: Iterable[Any], path: str | Path, title: str = "Learning curves"
) -> Path:
    """Loss and accuracy per epoch, train vs val (val may be missing)."""
    rows = [_as_dict(r) for r in history]
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-o"), ("val", "--s")):
            xs, ys = _series(rows, f"{split}_{metric}")
            if xs:
                ax.plot(xs, ys, style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def _baseline_name(results: Mapping[str, float], baseline: str | None) -> str | None:
    if baseline is not None:
        return baseline if baseline in results else None
    return next((name for name in results if "scratch" in name.lower()), None)


def _bar_colour(is_baseline: bool, value: float, base_acc: float | None) -> str:
    if is_baseline or base_acc is None:
        return "tab:gray"
    return "tab:green" if value >= base_acc else "tab:red"


def plot_transfer_gain(
    results: Mapping[str, float], path: str | Path, title: str = "Transfer gain",
    baseline: str | None = None, intervals: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Accuracy per run as bars; each bar annotated with its gain over the scratch baseline.

    The baseline is ``baseline`` or the first name containing "scratch"; bars below it
    (negative transfer) are red. ``intervals`` (name -> (low, high), e.g. Wilson 95% CIs)
    are drawn as error bars.
    """
    names = list(results)
    values = [float(results[n]) for n in names]
    base = _baseline_name(results, baseline)
    base_acc = float(results[base]) if base is not None else None
    colours = [_bar_colour(n == base, v, base_acc) for n, v in zip(names, values)]
    fig = _figure(max(4.5, 1.1 * len(names) + 1.5), 4)
    ax = fig.subplots()
    yerr = None
    if intervals:
        lows = [v - intervals[n][0] if n in intervals else 0.0 for n, v in zip(names, values)]
        highs = [intervals[n][1] - v if n in intervals else 0.0 for n, v in zip(names, values)]
        yerr = np.array([lows, highs])  # (2, bars): distances below and above each bar
    bars = ax.bar(names, values, color=colours, yerr=yerr, capsize=4 if yerr is not None else 0)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    if base_acc is not None:
        ax.axhline(base_acc, color="tab:gray", linestyle="--", linewidth=1,
                   label=f"{base} = {base_acc:.3f}")
        ax.legend(loc="upper left", fontsize=8)
    for bar, name, value in zip(bars, names, values):
        label = f"{value:.3f}"
        if base_acc is not None and name != base:
            label += f"\n({value - base_acc:+.3f})"
        x = bar.get_x() + bar.get_width() / 2
        top = max(value, (intervals or {}).get(name, (value, value))[1])  # above its error bar
        ax.text(x, top + 0.01, label, ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelrotation=20 if len(names) > 4 else 0)
    return _save(fig, path)


def plot_reliability(
    probs: ArrayLike, y_true: ArrayLike, path: str | Path, n_bins: int = 10,
    title: str = "Reliability diagram",
) -> Path:
    """Accuracy vs confidence per bin against the diagonal; ECE in the title."""
    return plot_reliability_bins(
        reliability_table(probs, y_true, n_bins), path, title
    )


def reliability_table(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """JSON-able reliability bins and the ECE: what a reliability diagram is drawn from."""
    bins = reliability_bins(probs, y_true, n_bins)
    return {"ece": expected_calibration_error(probs, y_true, n_bins),
            **{k: v.tolist() for k, v in bins.items()}}


def draw_reliability(ax: Any, table: Mapping[str, Any], title: str) -> None:
    edges = np.asarray(table["edges"])
    count, acc, conf = (np.asarray(table[k], dtype=np.float64) for k in ("count", "accuracy", "confidence"))
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / len(count)
    filled = count > 0
    ax.bar(centres[filled], acc[filled], width=width, edgecolor="black",
           color="tab:blue", alpha=0.8, label="accuracy")
    ax.bar(centres[filled], (conf - acc)[filled], width=width,
           bottom=acc[filled], color="tab:red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE = {table['ece']:.3f})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)


def plot_reliability_bins(table: Mapping[str, Any], path: str | Path, title: str = "Reliability diagram") -> Path:
    fig = _figure(4.5, 4.5)
    draw_reliability(fig.subplots(), table, title)
    return _save(fig, path)
