"""One manifest reader: the loader and the validation stage read every value the same way.

A manifest is written here with one image per ``readable`` spelling; the loader
(``read_manifest`` / ``load_split``) and the GX validation (``validate_dataset``) must
agree on every row, and a value that is not a boolean / integer is rejected by both with
a message naming the file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.validate import validate_dataset
from transfer.config import ValidateParams
from transfer.data import clear_memory_cache, inspect_image, load_split, read_manifest
from transfer.data.manifest import (
    BOOL_SPELLINGS,
    parse_bool,
    parse_int,
    read_manifest_table,
    write_manifest,
)
from transfer.errors import DataError

TRUTHY = ("true", "True", "TRUE", " yes ", "1", "Yes")
FALSY = ("false", "False", "0", "no", " NO")
VP = ValidateParams(min_per_class=1)


def _png(path: Path, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(path)
    return path.read_bytes()


def dataset(root: Path, spellings: list[str], column: str = "readable") -> Path:
    """One real PNG per spelling, in class a or b, all in train; ``column`` set as given."""
    rows, by_path = [], {}
    for i, text in enumerate(spellings):
        rel = f"{'ab'[i % 2]}/{i:02d}.png"
        rows.append(inspect_image(_png(root / rel, i), rel, rel[0], "train"))
        by_path[rel] = text
    write_manifest(rows, root)
    path = root / "manifest.csv"
    with path.open(newline="") as handle:
        records = list(csv.DictReader(handle))
    for record in records:  # written sorted by path
        record[column] = by_path[record["path"]]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    return root


def failing(outcomes, check_start: str) -> list[str]:
    (match,) = [o for o in outcomes if o.check.startswith(check_start)]
    return [] if match.success else [r.split(":")[0] for r in match.failing_rows]


def test_parse_bool_accepts_one_table_of_spellings():
    for text in TRUTHY:
        assert parse_bool(text) is True
    for text in FALSY:
        assert parse_bool(text) is False
    for text in ("", "maybe", "t", "2", None):
        assert parse_bool(text) is None
    assert set(BOOL_SPELLINGS) == {"true", "false", "1", "0", "yes", "no"}
    assert parse_int(" 8 ") == 8 and parse_int("8.0") is None and parse_int("") is None


def test_loader_and_validation_agree_on_every_spelling(tmp_path: Path):
    spellings = [*TRUTHY, *FALSY]
    root = dataset(tmp_path / "d", spellings)
    truthy_paths = {r.path for r in read_manifest(root) if r.readable}
    expected = {f"{'ab'[i % 2]}/{i:02d}.png" for i, t in enumerate(spellings) if t in TRUTHY}
    assert truthy_paths == expected
    clear_memory_cache()
    assert len(load_split(root, "train", 8, 1)) == len(TRUTHY)
    outcomes = validate_dataset(root, "d", VP)
    assert failing(outcomes, "readable is a boolean") == []  # every spelling is a boolean
    falsy_paths = {f"{'ab'[i % 2]}/{i:02d}.png" for i, t in enumerate(spellings) if t in FALSY}
    assert set(failing(outcomes, "image file decodes")) == falsy_paths


def test_a_non_boolean_is_rejected_by_both_with_the_file_named(tmp_path: Path):
    root = dataset(tmp_path / "d", ["true", "maybe", "true", ""])
    with pytest.raises(DataError) as info:
        read_manifest(root)
    message = str(info.value)
    assert "b/01.png" in message and "'maybe' is not a boolean" in message
    assert "true/false, 1/0 or yes/no" in message and "\n" not in message
    outcomes = validate_dataset(root, "d", VP)
    assert failing(outcomes, "readable is a boolean") == ["b/01.png", "b/03.png"]
    # the rows validation cannot read never count as images either
    assert set(failing(outcomes, "image file decodes")) == {"b/01.png", "b/03.png"}


def test_a_non_integer_size_is_rejected_by_both(tmp_path: Path):
    root = dataset(tmp_path / "d", ["8", "8.0", "8", "8"], column="width")
    with pytest.raises(DataError, match=r"b/01.png") as info:
        read_manifest(root)
    assert "width = '8.0' is not an integer" in str(info.value)
    (bad,) = [o for o in validate_dataset(root, "d", VP) if o.failed]
    assert bad.failing_rows == ["b/01.png: width is not an integer"]


def test_the_table_is_the_same_for_gx_and_the_loader(tmp_path: Path):
    root = dataset(tmp_path / "d", ["true", "no"])
    table = read_manifest_table(root)
    frame = table.frame()
    assert list(frame.columns) == list(table.columns)
    assert frame["readable"].tolist() == ["true", "no"]
    assert [r.path for r in read_manifest(root)] == frame["path"].tolist()


def test_malformed_csv_is_one_clear_error(tmp_path: Path):
    root = dataset(tmp_path / "d", ["true", "true"])
    with (root / "manifest.csv").open("a") as handle:
        handle.write("a/x.png,a,train\n")
    with pytest.raises(DataError, match=r"line 4: 3 fields, the header has 10"):
        read_manifest(root)
    (bad,) = [o for o in validate_dataset(root, "d", VP) if o.failed]
    assert "line 4: 3 fields" in bad.details
