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
from typing import Any

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


# One spelling table for every reader: a value the loader accepts, validation accepts with
# the same meaning, and anything else is rejected by both (an error, never a silent False).
BOOL_SPELLINGS: dict[str, bool] = {
    "true": True, "1": True, "yes": True, "false": False, "0": False, "no": False,
}
BOOL_HINT = "true/false, 1/0 or yes/no"


def parse_bool(text: object) -> bool | None:
    """``readable`` text -> bool (case and surrounding blanks ignored); None if not a boolean."""
    if isinstance(text, bool):
        return text
    return BOOL_SPELLINGS.get(str(text).strip().lower()) if text is not None else None


def parse_int(text: object) -> int | None:
    """An integer column's text -> int (blanks ignored; "8.0" is not an integer); None if not."""
    if text is None:
        return None
    try:
        return int(str(text).strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class ManifestTable:
    """A manifest as read from disk: header and rows as text, nothing interpreted yet."""

    path: Path
    columns: tuple[str, ...]
    records: list[dict[str, str]]

    def missing_columns(self) -> list[str]:
        return sorted(set(MANIFEST_COLUMNS) - set(self.columns))

    def frame(self) -> Any:
        """The same rows as a pandas frame of strings (what the GX suites validate)."""
        import pandas as pd  # only validation needs it

        return pd.DataFrame(self.records, columns=list(self.columns), dtype=str)


def read_manifest_table(dataset_dir: str | Path) -> ManifestTable:
    """The one manifest reader: DataError if the file is missing or not a well-formed CSV."""
    path = manifest_path(dataset_dir)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            lines = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path} is not a readable CSV: {error}") from None
    if not lines:
        raise DataError(f"{path} is empty: no header row")
    columns = tuple(c.strip() for c in lines[0])
    records = []
    for number, values in enumerate(lines[1:], start=2):
        if not values:
            continue  # a blank line
        if len(values) != len(columns):
            raise DataError(
                f"{path} line {number}: {len(values)} fields, the header has {len(columns)}"
            )
        records.append(dict(zip(columns, values, strict=True)))
    return ManifestTable(path, columns, records)


def _row_problems(raw: dict[str, str]) -> tuple[bool | None, dict[str, int | None]]:
    readable = parse_bool(raw["readable"])
    ints = {c: parse_int(raw[c]) for c in ("width", "height", "channels")}
    return readable, ints


def parse_row(raw: dict[str, str], where: str, *, strict: bool = True) -> ManifestRow:
    """One manifest record -> ManifestRow.

    ``strict`` (the loader): a value that is not a boolean / integer is a DataError naming
    the file. Not strict (validation, which reports those values itself): such a row is
    kept as unreadable with the reason in ``error``, so summaries never count it.
    """
    unsafe = raw.get("path") and (Path(raw["path"]).is_absolute() or ".." in Path(raw["path"]).parts)
    if unsafe:  # every later step opens <dataset_dir>/<path>: keep it inside the dataset, always
        raise DataError(f"{where}: manifest path {raw['path']!r} leaves the dataset directory")
    readable, ints = _row_problems(raw)
    bad = []
    if readable is None:
        bad.append(f"readable = {raw['readable']!r} is not a boolean ({BOOL_HINT})")
    if readable:  # an unreadable row's sizes are not used: blank or 0 is fine
        bad += [f"{c} = {raw[c]!r} is not an integer" for c, v in ints.items() if v is None]
    if bad and strict:
        raise DataError(f"{where}: row {raw.get('path', '')!r}: {'; '.join(bad)}")
    usable = bool(readable) and not bad
    return ManifestRow(
        path=raw["path"].replace("\\", "/"),
        label=raw["label"],
        split=raw["split"],
        width=(ints["width"] or 0) if usable else 0,
        height=(ints["height"] or 0) if usable else 0,
        mode=raw["mode"],
        channels=(ints["channels"] or 0) if usable else 0,
        sha256=raw["sha256"],
        readable=usable,
        error=raw["error"] or ("; ".join(bad) if bad else ""),
    )


def parse_rows(table: ManifestTable, *, strict: bool = True) -> list[ManifestRow]:
    """All rows of a table; strict: DataError for missing columns or malformed values."""
    missing = table.missing_columns()
    if missing:
        if strict:
            raise DataError(f"{table.path}: manifest lacks columns {missing}")
        records = [{c: "" for c in missing} | r for r in table.records]
    else:
        records = table.records
    return [parse_row(r, str(table.path), strict=strict) for r in records]


def manifest_path(dataset_dir: str | Path) -> Path:
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"no manifest at {path}: prepare the dataset first (`transfer prepare`)"
        )
    return path


def read_manifest(dataset_dir: str | Path) -> list[ManifestRow]:
    """The manifest's rows for the loader (strict: a malformed row is a DataError)."""
    return parse_rows(read_manifest_table(dataset_dir))


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
