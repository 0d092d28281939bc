"""Does transfer make sense here? Dataset summaries and the transfer-sense checks.

One implementation, pure (no GX, Prefect or MLflow), for every consumer: the validation
stage turns each check into a GX expectation and shows them before any training
(``tasks/validate.py``), and the transfer report shows them next to the result
(``transfer/report.py``). The thresholds are ``params.validate``:

``same_input_kind``         both datasets hold readable images                  (fail)
``compatible_channels``     same colour family (grey / colour)                  (warn)
``compatible_image_sizes``  median image sides within ``max_size_ratio``        (warn)
``source_much_larger``      source train >= ``min_source_ratio`` x target budget (fail)
``class_overlap``           how many target classes the source task knows       (info)

Each check is ``{check, passed, detail, level}``, level one of pass | warn | fail | info:
fail = transfer cannot be expected to help, warn = it may help less, info = context.
``same_input_kind`` always stops the run (nothing could be trained); the others stop it
only when ``validate.require_transfer_sense`` is true (see :func:`severity`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfer.config import ValidateParams
from transfer.data.manifest import UNLABELLED, ManifestRow

GREY, COLOUR = "grey", "colour"
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
ALWAYS_BLOCKING = frozenset({"same_input_kind"})  # without images nothing can be trained
CHECK_TITLES = {  # what each check asks, in report order
    "same_input_kind": "source and target are both image data (same input kind)",
    "compatible_channels": "same colour family (else both are converted to data.channels)",
    "compatible_image_sizes": "median image sides within validate.max_size_ratio",
    "source_much_larger": "source train set at least validate.min_source_ratio x the "
    "target's labelled budget",
    "class_overlap": "target classes known to the source task (information)",
}


# --------------------------------------------------------------------------- summaries


def _family(mode: str, channels: int) -> str:
    """Grey or colour: by PIL mode (a palette image has 1 band but colours), else bands."""
    if mode in GREY_MODES:
        return GREY
    if mode in COLOUR_MODES:
        return COLOUR
    return GREY if channels in (1, 2) else COLOUR


def _range(values: Sequence[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(
    rows: Sequence[ManifestRow],
    name: str,
    directory: str | Path = "",
    labels_per_class: int | None = None,
) -> dict[str, Any]:
    """Sizes of one dataset from its manifest rows: per split, per class, image shapes.

    Only readable rows count. ``labels_per_class`` (target): the labelled budget training
    uses is ``labels_per_class * n_classes``.
    """
    readable = [r for r in rows if r.readable]
    classes = sorted({r.label for r in readable if r.label})
    splits: dict[str, int] = {}
    per_class: dict[str, dict[str, int]] = {c: {} for c in classes}
    for row in readable:
        splits[row.split] = splits.get(row.split, 0) + 1
        if row.label:
            per_class[row.label][row.split] = per_class[row.label].get(row.split, 0) + 1
    sides = [float(np.sqrt(r.width * r.height)) for r in readable]
    order = ("train", "val", "test", UNLABELLED)
    summary: dict[str, Any] = {
        "name": name,
        "dir": str(directory),
        "kind": "images" if readable else "empty",
        "n_images": len(readable),
        "n_unreadable": len(rows) - len(readable),
        "classes": classes,
        "splits": {s: splits[s] for s in order if s in splits},
        "per_class": per_class,
        "channels": sorted({r.channels for r in readable}),
        "modes": sorted({r.mode for r in readable}),
        "colour": sorted({_family(r.mode, r.channels) for r in readable}),
        "width": _range([r.width for r in readable]),
        "height": _range([r.height for r in readable]),
        "median_side": statistics.median(sides) if sides else None,
    }
    if labels_per_class is not None:
        summary["labels_per_class"] = labels_per_class
        summary["labelled_budget"] = labels_per_class * len(classes)
    return summary


def dataset_summary(
    dataset_dir: str | Path, name: str | None = None, labels_per_class: int | None = None
) -> dict[str, Any]:
    """:func:`summarize` of a prepared dataset's manifest (DataError if it has none)."""
    from transfer.data.manifest import read_manifest

    rows = read_manifest(dataset_dir)
    return summarize(rows, name or Path(dataset_dir).name, dataset_dir, labels_per_class)


# --------------------------------------------------------------------------- sense checks


def _check(name: str, passed: bool, detail: str, level: str | None = None) -> dict[str, Any]:
    return {
        "check": name,
        "passed": bool(passed),
        "detail": detail,
        "level": level or ("pass" if passed else "fail"),
    }


def _families(summary: Mapping[str, Any]) -> set[str]:
    if summary.get("colour"):
        return set(summary["colour"])
    return {GREY if c in (1, 2) else COLOUR for c in summary.get("channels", ())}


def source_train(summary: Mapping[str, Any]) -> int:
    """Labelled images pretraining learns from: the train split (all labelled when unsplit)."""
    splits = summary.get("splits") or {}
    if splits.get("train"):
        return int(splits["train"])
    return sum(n for split, n in splits.items() if split != UNLABELLED)


def target_budget(summary: Mapping[str, Any]) -> int:
    """Labelled target images fine-tuning sees: k x classes, capped by the train split."""
    train = int((summary.get("splits") or {}).get("train", 0))
    budget = summary.get("labelled_budget")
    if budget:
        return min(int(budget), train) if train else int(budget)
    return train


def _kind_check(source: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    s_kind, t_kind = source.get("kind"), target.get("kind")
    ok = s_kind == t_kind == "images"
    why = (
        " (images -> images: low-level features can transfer)"
        if ok
        else " (transfer needs readable images on both sides)"
    )
    return _check("same_input_kind", ok, f"source: {s_kind}, target: {t_kind}{why}")


def _channels_check(source: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    s_fam, t_fam = _families(source), _families(target)
    detail = (
        f"source channels {source.get('channels')} ({'/'.join(sorted(s_fam)) or '?'}), "
        f"target channels {target.get('channels')} ({'/'.join(sorted(t_fam)) or '?'})"
    )
    same = bool(s_fam) and s_fam == t_fam
    if not same:
        detail += (
            "; both are converted to data.channels, but colour features transfer less "
            "well to grey images and vice versa"
        )
    return _check("compatible_channels", same, detail, None if same else "warn")


def _size_check(
    source: Mapping[str, Any], target: Mapping[str, Any], limit: float
) -> dict[str, Any]:
    s_side, t_side = source.get("median_side"), target.get("median_side")
    if not (s_side and t_side):
        return _check("compatible_image_sizes", False, "image sizes unknown", "warn")
    ratio = max(s_side, t_side) / min(s_side, t_side)
    ok = ratio <= limit
    detail = (
        f"median side {s_side:.0f}px (source) vs {t_side:.0f}px (target), "
        f"ratio {ratio:.1f}x (limit {limit:g}x, validate.max_size_ratio)"
    )
    if not ok:
        detail += (
            ": resizing this much changes the scale of the edges and blobs the early "
            "layers learned"
        )
    return _check("compatible_image_sizes", ok, detail, None if ok else "warn")


def _ratio_check(
    source: Mapping[str, Any], target: Mapping[str, Any], min_ratio: float
) -> dict[str, Any]:
    n_source, budget = source_train(source), target_budget(target)
    if budget <= 0:
        return _check("source_much_larger", False, "the target has no labelled training images")
    ratio = n_source / budget
    ok = ratio >= min_ratio
    detail = (
        f"{n_source:,} source training images vs a target budget of {budget:,} labelled "
        f"images: {ratio:,.1f}x (threshold {min_ratio:g}x, validate.min_source_ratio)"
    )
    if not ok:
        detail += ": the source is not much larger, so pretraining may add little"
    return _check("source_much_larger", ok, detail)


def _overlap_check(source: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    s_cls, t_cls = set(source.get("classes", ())), set(target.get("classes", ()))
    shared = sorted(s_cls & t_cls)
    if shared == sorted(t_cls) and t_cls:
        note = "every target class name also exists in the source task"
    elif shared:
        note = f"shared: {', '.join(shared[:10])}{' ...' if len(shared) > 10 else ''}"
    else:
        note = "no shared class names: only the body transfers"
    return _check(
        "class_overlap",
        True,
        f"{len(shared)} of {len(t_cls)} target classes appear among the {len(s_cls)} source "
        f"classes ({note}; the output layer is re-initialised either way)",
        "info",
    )


def transfer_sense_checks(
    source_summary: Mapping[str, Any],
    target_summary: Mapping[str, Any],
    params: ValidateParams | None = None,
    *,
    min_ratio: float | None = None,
) -> list[dict[str, Any]]:
    """Does transfer make sense? The checks in :data:`CHECK_TITLES` order.

    Thresholds from ``params`` (default ``ValidateParams()``); ``min_ratio`` overrides
    ``params.min_source_ratio``.
    """
    vp = params or ValidateParams()
    ratio = vp.min_source_ratio if min_ratio is None else min_ratio
    return [
        _kind_check(source_summary, target_summary),
        _channels_check(source_summary, target_summary),
        _size_check(source_summary, target_summary, vp.max_size_ratio),
        _ratio_check(source_summary, target_summary, ratio),
        _overlap_check(source_summary, target_summary),
    ]


def severity(check: Mapping[str, Any], params: ValidateParams) -> str:
    """"error" when this check stops the run, else "warning" (pass/info never stop it)."""
    if check["check"] in ALWAYS_BLOCKING or params.require_transfer_sense:
        return "error"
    return "warning"


def stops_run(check: Mapping[str, Any], params: ValidateParams) -> bool:
    return check["level"] in ("warn", "fail") and severity(check, params) == "error"


def describe(checks: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per check, for logs and the CLI: ``LEVEL check: detail``."""
    return [f"{c['level'].upper():<4} {c['check']}: {c['detail']}" for c in checks]
