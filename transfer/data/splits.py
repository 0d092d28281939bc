"""Deterministic stratified train/val/test splits.

A split depends only on (seed, class name, the sorted keys of the class), never on
filesystem order or on the other classes, so adding a class does not reshuffle the
others. Identical files (same sha256) in one class are kept in the same split, so a
duplicate cannot leak from train into test.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from transfer.errors import DataError

MIN_PER_CLASS = 3  # one image each for train, val and test


def _total(size: int | float, n: int) -> int:
    """An int is a count; a float in (0, 1) is a fraction of ``n``."""
    if isinstance(size, float) and size < 1:
        return int(round(size * n))
    return int(size)


def allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``total`` across classes in proportion to ``sizes`` (largest remainder)."""
    n = sum(sizes.values())
    exact = {c: total * s / n for c, s in sizes.items()}
    counts = {c: int(np.floor(q)) for c, q in exact.items()}
    leftover = total - sum(counts.values())
    by_remainder = sorted(sizes, key=lambda c: (-(exact[c] - counts[c]), c))
    for c in by_remainder[:leftover]:
        counts[c] += 1
    return counts


def _check_sizes(sizes: dict[str, int]) -> None:
    small = {c: s for c, s in sorted(sizes.items()) if s < MIN_PER_CLASS}
    if small:
        listed = ", ".join(f"'{c}' ({s})" for c, s in small.items())
        raise DataError(
            f"class(es) {listed} hold fewer than {MIN_PER_CLASS} distinct images; each class "
            "needs at least one image in each of train, val and test: add images to these "
            "class folders or remove them"
        )


def split_counts(
    sizes: dict[str, int], test_size: int | float, val_size: int | float, min_per_split: int = 1
) -> dict[str, tuple[int, int, int]]:
    """Per-class (train, val, test) counts; every class gets >= 1 in every split.

    ``test_size``/``val_size``: int = total count over all classes, float = fraction of
    all images. ``min_per_split``: val and test of each class get at least this many
    (validation's ``min_per_class``) where the class leaves a training image; otherwise
    fewer, and validation names the class. Totals are exact unless a class forces a minimum.
    """
    _check_sizes(sizes)
    n = sum(sizes.values())
    n_test, n_val = _total(test_size, n), _total(val_size, n)
    if n_test + n_val > n - len(sizes):
        raise DataError(
            f"test ({n_test}) + val ({n_val}) images leave fewer than one training image per "
            f"class out of {n}: lower data.*.test_size / val_fraction"
        )
    test = allocate(n_test, sizes)
    val = allocate(n_val, sizes)
    out = {}
    for c, s in sizes.items():
        m = max(1, min(min_per_split, (s - 1) // 2))  # keep >= 1 training image
        t = min(max(test[c], m), s - m - 1)
        v = min(max(val[c], m), s - t - 1)
        out[c] = (s - t - v, v, t)
    return out


def _class_seed(seed: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def assign_splits(
    keys: Sequence[str],
    labels: Sequence[str],
    *,
    test_size: int | float,
    val_size: int | float,
    seed: int,
    groups: Sequence[str] | None = None,
    min_per_split: int = 1,
) -> list[str]:
    """Return a split name ("train"/"val"/"test") for each key, stratified by label.

    ``groups`` (e.g. file hashes): keys sharing a group and label share a split; counts
    are then in groups. Keys must be unique.
    """
    groups = list(groups) if groups is not None else list(keys)
    units: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (label, group) in enumerate(zip(labels, groups, strict=True)):
        units[label][group].append(i)
    sizes = {label: len(g) for label, g in sorted(units.items())}
    counts = split_counts(sizes, test_size, val_size, min_per_split)
    result = [""] * len(keys)
    for label, by_group in units.items():
        # sort by each group's smallest key: independent of listing order
        ordered = sorted(by_group.values(), key=lambda idx: min(keys[i] for i in idx))
        order = _class_seed(seed, label).permutation(len(ordered))
        n_train, n_val, _ = counts[label]
        for rank, pos in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            for i in ordered[pos]:
                result[i] = split
    return result


def check_splits(labels: Sequence[str], splits: Sequence[str], where: str) -> None:
    """Every class must appear in every split (a class missing from test cannot be scored)."""
    present = {(label, split) for label, split in zip(labels, splits, strict=True)}
    for label in sorted({lab for lab in labels if lab}):
        for split in ("train", "val", "test"):
            if (label, split) not in present:
                raise DataError(
                    f"{where}: class '{label}' has no images in the {split} split; add images "
                    "to that class or change the split sizes"
                )
