"""Every plot the pipeline and the report draw: evaluation figures, the sample-efficiency
curve, confusion matrices, reliability diagrams and the report's one-page PNG.

Drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas): no pyplot state, no GUI backend.
``draw_*`` functions draw on a given axes (shared by single plots and the one-page figure);
``plot_*`` functions write a PNG and return its path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transfer.metrics import ArrayLike, _np, reliability_table

SCRATCH = "scratch"  # the baseline's name on the sample-efficiency curve


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------- confusion matrices


def draw_confusion(
    ax: Any, fig: Any, matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str
) -> None:
    cm = np.asarray(matrix, dtype=np.int64)
    support = cm.sum(axis=1, keepdims=True)
    rates = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    ticks = range(len(classes))
    ax.set_xticks(
        ticks, [str(c) for c in classes], rotation=45 if len(classes) > 10 else 0, fontsize=8
    )
    ax.set_yticks(ticks, [str(c) for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 20:
        for (i, j), count in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )


def plot_confusion_matrix(
    cm: ArrayLike, classes: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Counts annotated in each cell, colour = row-normalised rate (recall per true class)."""
    size = 1.5 + 0.45 * len(classes)
    fig = _figure(size + 1.2, size)
    draw_confusion(fig.subplots(), fig, _np(cm).astype(np.int64).tolist(), classes, title)
    return _save(fig, path)


def confusion_title(name: str, block: Mapping[str, Any]) -> str:
    acc = block.get("accuracy")
    return f"{name}" + (f" (accuracy {acc:.3f})" if acc is not None else "")


def plot_confusion(block: Mapping[str, Any], name: str, path: str | Path) -> Path:
    """A report block ``{matrix, classes?, accuracy?}`` as a confusion-matrix PNG."""
    classes = block.get("classes") or [str(i) for i in range(len(block["matrix"]))]
    return plot_confusion_matrix(block["matrix"], classes, path, confusion_title(name, block))


# --------------------------------------------------------------------------- training and evaluation


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


def plot_runs_learning_curves(
    histories: Mapping[str, Iterable[Any]], path: str | Path, title: str = "Learning curves"
) -> Path:
    """Train loss and val accuracy per epoch, one line per trained run (every seed of the
    fine-tune solid, of the scratch baseline dashed): the seeds' spread at a glance."""
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    for name, history in histories.items():
        rows = [_as_dict(r) for r in history]
        style = "--" if "scratch" in name else "-"
        for ax, key in zip(axes, ("train_loss", "val_acc")):
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, style, linewidth=1.2, label=name)
    for ax, label in zip(axes, ("train loss", "val accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7)
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


# --------------------------------------------------------------------------- calibration


def plot_reliability(
    probs: ArrayLike, y_true: ArrayLike, path: str | Path, n_bins: int = 10,
    title: str = "Reliability diagram",
) -> Path:
    """Accuracy vs confidence per bin against the diagonal; ECE in the title."""
    return plot_reliability_bins(
        reliability_table(probs, y_true, n_bins), path, title
    )


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


def plot_calibration(calibration: Mapping[str, Any], path: str | Path) -> Path:
    """The transfer model's reliability diagram before and after temperature scaling."""
    fig = _figure(9, 4.5)
    before, after = fig.subplots(1, 2)
    tables = calibration["reliability"]
    draw_reliability(before, tables["uncalibrated"], "uncalibrated (T = 1)")
    draw_reliability(after, tables["calibrated"], f"temperature T = {calibration.get('temperature') or 1:.2f}")
    fig.suptitle("Test holdout: reliability before and after temperature scaling (T fitted on val)")
    return _save(fig, path)


# --------------------------------------------------------------------------- sample efficiency


def norm_curves(curves: Mapping[str, Mapping[Any, float]]) -> dict[str, list[tuple[int, float]]]:
    return {
        name: sorted((int(k), float(v)) for k, v in curve.items())
        for name, curve in curves.items()
        if curve
    }


def _draw_curves(
    ax: Any,
    curves: Mapping[str, Mapping[Any, float]],
    run_point: Mapping[str, Any] | None = None,
    analysis: Mapping[str, Any] | None = None,
) -> None:
    """Means per k; with ``analysis`` (:func:`efficiency_analysis`) 95% error bars over seeds
    and the classical floors as thin dotted lines."""
    norm = norm_curves(curves)
    summary = (analysis or {}).get("summary") or {}
    ks = sorted({k for points in norm.values() for k, _ in points})
    colours = iter(
        [
            "tab:blue",
            "tab:orange",
            "tab:green",
            "tab:purple",
            "tab:brown",
            "tab:pink",
            "tab:olive",
            "tab:cyan",
            "tab:red",
        ]
    )
    ordered = [n for n in norm if n == SCRATCH] + [n for n in norm if n != SCRATCH]
    for name in ordered:
        xs, ys = zip(*norm[name], strict=True)
        err = _errors(summary.get(name) or {}, xs, ys)
        style = (
            {"linestyle": "--", "marker": "s", "color": "tab:gray", "label": "scratch (baseline)"}
            if name == SCRATCH
            else {"linestyle": "-", "marker": "o", "color": next(colours, None), "label": name}
        )
        if err is not None:
            ax.errorbar(xs, ys, yerr=err, capsize=3, **style)
        else:
            ax.plot(xs, ys, **style)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(
                f"{y:.2f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 5),
                ha="center",
                fontsize=7,
            )
    floor_colours = iter(["darkred", "darkgoldenrod", "teal", "black"])  # apart from the strategies'
    for name, row in ((analysis or {}).get("floors") or {}).items():
        pts = sorted((int(k), float(v["mean"])) for k, v in row.items())
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, linestyle=":", linewidth=1.2, marker=".", color=next(floor_colours, None),
                    label=f"floor: {name}")
    if run_point and run_point.get("k"):
        k = int(run_point["k"])
        for key, label, colour in (
            ("transfer_accuracy", f"this run: {run_point.get('strategy', 'transfer')}", "black"),
            ("scratch_accuracy", "this run: scratch", "tab:gray"),
        ):
            if run_point.get(key) is not None:
                ax.plot(
                    [k],
                    [float(run_point[key])],
                    marker="*",
                    markersize=13,
                    linestyle="none",
                    color=colour,
                    label=label,
                )
                ks = sorted(set(ks) | {k})
    if not ks:
        ax.text(
            0.5,
            0.5,
            "no sample-efficiency points",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    if len(ks) == 1:
        ax.set_xlim(ks[0] / 2, ks[0] * 2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("labelled target images per class (log scale)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _errors(summary: Mapping[Any, Mapping[str, Any]], xs: Sequence[int], ys: Sequence[float]) -> Any:
    """(2, n) distances from each mean to its 95% interval ends; None without seed spread."""
    rows = {int(k): v for k, v in summary.items()}
    if not rows or any(x not in rows for x in xs):
        return None
    low = [max(y - float(rows[x]["ci_low"]), 0.0) for x, y in zip(xs, ys, strict=True)]
    high = [max(float(rows[x]["ci_high"]) - y, 0.0) for x, y in zip(xs, ys, strict=True)]
    return np.array([low, high]) if any(low) or any(high) else None


def plot_sample_efficiency(
    curves: Mapping[str, Mapping[Any, float]],
    path: str | Path,
    title: str = "Sample efficiency: accuracy vs labels per class",
    run_point: Mapping[str, Any] | None = None,
    analysis: Mapping[str, Any] | None = None,
) -> Path:
    """Accuracy vs k (log x), one line per strategy, scratch dashed, 95% error bars over
    seeds and the classical floors dotted when ``analysis`` has them; PNG at ``path``."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    _draw_curves(ax, curves, run_point, analysis)
    ax.set_title(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- the report's one page


def plot_report_page(
    path: str | Path,
    title: str,
    headline: Sequence[str],
    negative: bool | None,
    sample_efficiency: Mapping[str, Any],
    run_point: Mapping[str, Any] | None,
    confusion: Mapping[str, Any],
) -> Path:
    """One page: headline lines on top, curve + transfer + scratch confusion matrices below."""
    fig = _figure(16, 7.2)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 4.2])
    top.suptitle(title, fontsize=14, fontweight="bold")
    for i, line in enumerate(headline):
        top.text(0.01, 0.62 - i * 0.24, line, fontsize=10, family="monospace", va="center")
    if negative:
        top.text(0.99, 0.62, "NEGATIVE TRANSFER", fontsize=13, color="white", ha="right", va="center",
                 fontweight="bold", bbox={"facecolor": "#cf222e", "edgecolor": "none", "pad": 4})
    axes = bottom.subplots(1, 3, width_ratios=[1.25, 1, 1])
    _draw_curves(axes[0], sample_efficiency.get("curves") or {}, run_point, sample_efficiency.get("analysis"))
    axes[0].set_title("sample efficiency")
    for ax, name in zip(axes[1:], ("transfer", "scratch"), strict=True):
        block = confusion.get(name)
        if block and block.get("matrix"):
            classes = block.get("classes") or [str(i) for i in range(len(block["matrix"]))]
            draw_confusion(ax, bottom, block["matrix"], classes, confusion_title(name, block))
        else:
            ax.axis("off")
            ax.text(0.5, 0.5, f"{name}: no confusion matrix", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)
