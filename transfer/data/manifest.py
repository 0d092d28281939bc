"""The per-dataset manifest: one CSV row per file, written at ``<dataset_dir>/manifest.csv``.

The manifest is the dataset's table of contents: every later step (validation, tensor
loading, versioning) reads it instead of walking the tree, so filesystem order never
matters and an unreadable file is recorded once, with its error, rather than crashing
a training run later.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path

from transfer.data.images import DEFAULT_MAX_PIXELS, open_bounded
from transfer.errors import DataError

MANIFEST_NAME = "manifest.csv"
SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # split of images with label "" (DANN)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class ManifestRow:
    path: str  # posix, relative to the dataset dir
    label: str  # class name; "" when unlabelled
    split: str  # train | val | test | unlabelled
    width: int
    height: int
    mode: str  # PIL mode
    channels: int
    sha256: str
    readable: bool
    error: str  # empty when readable

    def with_split(self, split: str) -> ManifestRow:
        return replace(self, split=split)


MANIFEST_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ManifestRow))


def _first_line(error: BaseException) -> str:
    """Stable one-line error text (no memory addresses: the manifest must be reproducible)."""
    lines = str(error).strip().splitlines()
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "(bytes)", lines[0] if lines else "")
    return f"{type(error).__name__}: {text}".rstrip(": ")


def inspect_image(
    data: bytes, path: str, label: str, split: str = "", max_pixels: int = DEFAULT_MAX_PIXELS
) -> ManifestRow:
    """Describe one file from its bytes; a file PIL cannot fully decode, or one over
    ``max_pixels`` (data.max_image_pixels, checked before decoding), is ``readable=False``."""
    digest = hashlib.sha256(data).hexdigest()
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        allowed = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        error = f"not an image file: extension '{suffix or '(none)'}' (expected {allowed})"
        return ManifestRow(path, label, split, 0, 0, "", 0, digest, False, error)
    try:
        with open_bounded(data, max_pixels, max_bytes=None) as image:  # bytes: see copy_imagefolder
            image.load()  # verify() misses truncated pixel data; a full decode does not
            width, height, mode = image.width, image.height, image.mode
            channels = len(image.getbands())
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb)
        return ManifestRow(path, label, split, 0, 0, "", 0, digest, False, _first_line(error))
    return ManifestRow(path, label, split, width, height, mode, channels, digest, True, "")


def generated_row(data: bytes, path: str, label: str, image_size: int) -> ManifestRow:
    """Row for a grayscale square PNG this package just encoded (known valid: no re-decode)."""
    digest = hashlib.sha256(data).hexdigest()
    return ManifestRow(path, label, "", image_size, image_size, "L", 1, digest, True, "")


def write_manifest(rows: Iterable[ManifestRow], dataset_dir: str | Path) -> Path:
    """Write rows sorted by path (stable bytes for the same content), atomically."""
    target = Path(dataset_dir) / MANIFEST_NAME
    tmp = target.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for row in sorted(rows, key=lambda r: r.path):
            writer.writerow(astuple(row))
    os.replace(tmp, target)
    return target


def _parse_row(raw: dict[str, str], where: str) -> ManifestRow:
    unsafe = raw.get("path") and (
        Path(raw["path"]).is_absolute() or ".." in Path(raw["path"]).parts
    )
    if unsafe:  # every later step opens <dataset_dir>/<path>: keep it inside the dataset
        raise DataError(f"{where}: manifest path {raw['path']!r} leaves the dataset directory")
    try:
        return ManifestRow(
            path=raw["path"],
            label=raw["label"],
            split=raw["split"],
            width=int(raw["width"]),
            height=int(raw["height"]),
            mode=raw["mode"],
            channels=int(raw["channels"]),
            sha256=raw["sha256"],
            readable=raw["readable"].strip().lower() == "true",
            error=raw["error"] or "",
        )
    except (KeyError, ValueError, AttributeError) as error:
        raise DataError(f"{where}: malformed manifest row {raw!r} ({error})") from None


def manifest_path(dataset_dir: str | Path) -> Path:
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"no manifest at {path}: prepare the dataset first (`transfer prepare`)"
        )
    return path


def read_manifest(dataset_dir: str | Path) -> list[ManifestRow]:
    path = manifest_path(dataset_dir)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: manifest lacks columns {sorted(missing)}")
        return [_parse_row(raw, str(path)) for raw in reader]


def manifest_sha256(dataset_dir: str | Path) -> str:
    """Hash of the manifest file's bytes: changes whenever any file or split changes."""
    return hashlib.sha256(manifest_path(dataset_dir).read_bytes()).hexdigest()


def dataset_version(dataset_dir: str | Path) -> str:
    """Content version of a dataset: sha256 over its (path, label, split, sha256) rows.

    Used as the data version when DVC is absent; independent of row order, image
    metadata columns and CSV formatting.
    """
    digest = hashlib.sha256()
    for row in sorted(read_manifest(dataset_dir), key=lambda r: r.path):
        digest.update("\t".join((row.path, row.label, row.split, row.sha256)).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def class_names(rows: Sequence[ManifestRow]) -> list[str]:
    """Class names = sorted distinct non-empty labels; index = position in this list."""
    return sorted({row.label for row in rows if row.label})
