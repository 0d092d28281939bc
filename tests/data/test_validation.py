"""Data validation: real great-expectations suites over small manifests made here.

The manifests follow docs/CONTRACTS.md (path,label,split,width,height,mode,channels,
sha256,readable,error) and are written directly, independent of ``transfer.data``.
GX runs cost ~0.1 s per suite, so one faulty dataset carrying one fault of each kind is
validated once (module fixture) and each test checks that its fault is reported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

import tasks.validate as validate
from tasks.validate import (
    DataValidationError,
    ExpectationOutcome,
    ValidationReport,
    check_compatibility,
    run_validation,
    validate_dataset,
)
from tasks.validate_gate import validate_data
from transfer.config import Params, ValidateParams
from transfer.errors import TransferError

CLASSES = ("0", "1", "2")
SPLITS = {"train": 6, "val": 5, "test": 5}
SOURCE_SPLITS = {"train": 40, "val": 5, "test": 5}
VP = ValidateParams(min_per_class=4)


def make_dataset(
    root: Path, name: str, *, classes=CLASSES, splits=SPLITS, mode: str = "L", size: int = 8
) -> Path:
    """An ImageFolder tree of placeholder files plus its manifest; content unique per file."""
    dataset = root / name
    rows = []
    for label in classes:
        (dataset / label).mkdir(parents=True, exist_ok=True)
        for split, n in splits.items():
            for i in range(n):
                rel = f"{label}/{split}_{i}.png"
                data = f"{name}/{rel}".encode()
                (dataset / rel).write_bytes(data)
                rows.append(
                    {
                        "path": rel,
                        "label": label,
                        "split": split,
                        "width": size,
                        "height": size,
                        "mode": mode,
                        "channels": 1 if mode == "L" else 3,
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "readable": True,
                        "error": "",
                    }
                )
    save(dataset, pd.DataFrame(rows))
    return dataset


def manifest(dataset: Path) -> pd.DataFrame:
    return pd.read_csv(dataset / "manifest.csv", dtype=str, keep_default_na=False)


def save(dataset: Path, df: pd.DataFrame) -> None:
    df.to_csv(dataset / "manifest.csv", index=False)


def set_row(df: pd.DataFrame, path: str, **values: str) -> None:
    for column, value in values.items():
        df.loc[df.path == path, column] = value


def sha_of(df: pd.DataFrame, path: str) -> str:
    return df.loc[df.path == path, "sha256"].item()


def failed(outcomes: list[ExpectationOutcome]) -> list[ExpectationOutcome]:
    return [o for o in outcomes if o.failed]


def params(root: Path | None = None, labels_per_class: int = 4) -> Params:
    p = Params()
    p.validate_ = VP
    p.finetune = p.finetune.model_copy(update={"labels_per_class": labels_per_class})
    if root is not None:
        p.data = p.data.model_copy(update={"root": str(root)})
    return p


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, ValidationReport]:
    """A clean source/target pair validated once through the Prefect task body."""
    root = tmp_path_factory.mktemp("good")
    make_dataset(root / "data", "source", splits=SOURCE_SPLITS)
    make_dataset(root / "data", "target")
    return root, validate_data.fn(params(root / "data"), root / "reports")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> tuple[pd.DataFrame, list[ExpectationOutcome]]:
    """A target set with one fault of each kind, on different rows."""
    dataset = make_dataset(tmp_path_factory.mktemp("faulty"), "target")
    df = manifest(dataset)
    set_row(
        df,
        "1/test_3.png",
        readable="False",
        error="cannot identify image file",
        width="",
        height="",
        mode="",
        channels="",
    )
    set_row(df, "0/train_1.png", label="1")  # mislabelled: it lies in folder 0
    set_row(df, "1/test_2.png", sha256=sha_of(df, "1/train_0.png"))  # train/test leakage
    set_row(df, "2/train_5.png", sha256=sha_of(df, "0/train_5.png"))  # same bytes, two labels
    set_row(df, "0/train_0.png", mode="CMYK")
    set_row(df, "1/val_0.png", width="4")  # below validate.min_image_size=8
    df = df[~df.path.isin(["2/val_0.png", "2/val_1.png"])]  # class 2 keeps 3 val images
    (dataset / "3").mkdir()
    (dataset / "3" / "stray.png").write_bytes(b"stray")
    stray = {
        **df[df.path == "0/val_2.png"].iloc[0].to_dict(),
        "path": "3/stray.png",
        "label": "3",
        "sha256": hashlib.sha256(b"stray").hexdigest(),
    }
    df = pd.concat([df, pd.DataFrame([stray])], ignore_index=True)
    save(dataset, df)
    return df, validate_dataset(dataset, "target", VP, expected_classes=list(CLASSES))


def failure(outcomes: list[ExpectationOutcome], column: str) -> ExpectationOutcome:
    (match,) = [o for o in failed(outcomes) if o.column == column]
    return match


def test_good_data_passes_every_suite(good):
    root, report = good
    assert report.passed, report.to_markdown()
    assert all(o.success for o in report.outcomes)
    suites = {o.suite for o in report.outcomes}
    for name in ("source", "target"):
        assert {
            f"{name}.{t}" for t in ("manifest", "images", "class_counts", "duplicates")
        } <= suites
    assert report.datasets["target"]["splits"] == {"test": 15, "train": 18, "val": 15}
    assert report.datasets["target"]["classes"] == list(CLASSES)
    for suffix in ("json", "md", "html"):
        assert (root / "reports" / f"validation_report.{suffix}").is_file()


def test_faulty_data_reports_exactly_its_faults(faulty):
    _, outcomes = faulty
    found = sorted((o.suite, o.expectation, o.column) for o in failed(outcomes))
    assert found == [
        ("target.class_counts", "expect_column_pair_values_a_to_be_greater_than_b", "count"),
        ("target.duplicates", "expect_column_values_to_be_between", "n_labels"),
        ("target.duplicates", "expect_column_values_to_be_between", "n_splits"),
        ("target.images", "expect_column_values_to_be_between", "width"),
        ("target.images", "expect_column_values_to_be_in_set", "mode"),
        ("target.manifest", "expect_column_pair_values_to_be_equal", "label"),
        ("target.manifest", "expect_column_values_to_be_in_set", "label"),
        ("target.manifest", "expect_column_values_to_be_in_set", "readable"),
    ]
    # duplicates inside one split are reported as a warning, never fatal
    (warning,) = [o for o in outcomes if not o.success and not o.failed]
    assert warning.column == "n_same_split" and warning.severity == "warning"


def test_corrupt_file_is_named_with_its_error(faulty):
    assert failure(faulty[1], "readable").failing_rows == [
        "1/test_3.png: cannot identify image file"
    ]


def test_mislabelled_row_is_named(faulty):
    bad = [o for o in failed(faulty[1]) if o.expectation == "expect_column_pair_values_to_be_equal"]
    assert bad[0].failing_rows == ["0/train_1.png: label '1' but class folder '0'"]


def test_label_outside_the_class_set_is_named(faulty):
    bad = [o for o in failed(faulty[1]) if o.column == "label" and "class folder name" in o.check]
    assert bad[0].failing_rows == ["3/stray.png: label = '3'"]


def test_cross_split_duplicate_names_both_files(faulty):
    leak = failure(faulty[1], "n_splits")
    assert leak.unexpected_count == 2
    assert leak.failing_rows == [
        "1/train_0.png [train, label '1'] same bytes as 1/test_2.png [test]",
        "1/test_2.png [test, label '1'] same bytes as 1/train_0.png [train]",
    ]
    conflict = failure(faulty[1], "n_labels")
    assert (
        "2/train_5.png [train, label '2'] same bytes as 0/train_5.png [train]"
        in conflict.failing_rows
    )


def test_too_few_images_per_class_names_the_class(faulty):
    assert failure(faulty[1], "count").failing_rows == [
        "class '2' in split 'val': 3 images, needs at least validate.min_per_class=4"
    ]


def test_unknown_mode_and_too_small_image_are_named(faulty):
    assert failure(faulty[1], "mode").failing_rows == ["0/train_0.png: mode 'CMYK' not supported"]
    assert failure(faulty[1], "width").failing_rows == [
        "1/val_0.png: width = 4 px (allowed 8..4096)"
    ]


def test_leakage_is_a_warning_when_duplicates_are_tolerated(tmp_path):
    dataset = make_dataset(tmp_path, "target")
    df = manifest(dataset)
    set_row(df, "1/test_2.png", sha256=sha_of(df, "1/train_0.png"))
    save(dataset, df)
    outcomes = validate_dataset(
        dataset, "target", ValidateParams(min_per_class=4, fail_on_duplicates=False)
    )
    assert not failed(outcomes)
    assert [o.column for o in outcomes if not o.success] == ["n_splits"]


def test_missing_manifest_and_missing_columns_are_reported(tmp_path):
    (bad,) = failed(validate_dataset(tmp_path / "nowhere", "source", VP))
    assert "manifest.csv" in bad.details and "transfer prepare" in bad.details
    dataset = make_dataset(tmp_path, "source")
    save(dataset, manifest(dataset).drop(columns=["sha256", "mode"]))
    (bad,) = failed(validate_dataset(dataset, "source", VP))
    assert bad.expectation == "expect_table_columns_to_match_set"
    assert sorted(bad.failing_rows) == ["missing column: mode", "missing column: sha256"]


def test_unlabelled_target_rows_allowed_only_when_enabled(tmp_path):
    dataset = make_dataset(tmp_path, "target")
    (dataset / "unlabelled").mkdir()
    rows = []
    for i in range(4):
        rel, data = f"unlabelled/u_{i}.png", f"u{i}".encode()
        (dataset / rel).write_bytes(data)
        rows.append(
            {
                "path": rel,
                "label": "",
                "split": "unlabelled",
                "width": "8",
                "height": "8",
                "mode": "L",
                "channels": "1",
                "sha256": hashlib.sha256(data).hexdigest(),
                "readable": "True",
                "error": "",
            }
        )
    df = pd.concat([manifest(dataset), pd.DataFrame(rows)], ignore_index=True)
    save(dataset, df)
    refused = failed(validate_dataset(dataset, "target", VP))
    assert sorted(o.column for o in refused) == ["label", "split"]
    split = next(o for o in refused if o.column == "split")
    assert split.failing_rows[0] == "unlabelled/u_0.png: split = 'unlabelled'"
    assert split.unexpected_count == 4
    # allowed: only the two rows with wrong labels fail (an unlabelled row carries no label,
    # a labelled split needs one); the unlabelled folder is no class
    set_row(df, "unlabelled/u_1.png", label="0")
    set_row(df, "0/train_0.png", label="")
    save(dataset, df)
    (bad,) = failed(validate_dataset(dataset, "target", VP, allow_unlabelled=True))
    assert bad.failing_rows == [
        "0/train_0.png: label '' but class folder '0'",
        "unlabelled/u_1.png: label '0' but an unlabelled row (label must be '')",
    ]


def test_compatibility(tmp_path):
    source = make_dataset(tmp_path, "source", splits=SOURCE_SPLITS, mode="L")
    target = make_dataset(tmp_path, "target", mode="RGB")
    outcomes = check_compatibility(source, target, target_labelled=6)
    assert not failed(outcomes)
    # the transfer-sense checks of transfer.checks, one GX expectation each
    (layout,) = [o for o in outcomes if not o.success]
    assert layout.column == "compatible_channels" and layout.severity == "warning"
    assert layout.suite == "compatibility.transfer_sense"
    assert "target channels [3] (colour)" in layout.failing_rows[0]
    # a small source makes transfer doubtful (a warning unless require_transfer_sense);
    # target test images inside the source data contaminate the evaluation (error)
    small = make_dataset(tmp_path, "small", mode="RGB")
    sdf = manifest(small)
    set_row(sdf, "0/train_0.png", sha256=sha_of(manifest(target), "2/test_1.png"))
    save(small, sdf)
    outcomes = check_compatibility(small, target)
    ratio = next(o for o in outcomes if o.column == "source_much_larger")
    assert not ratio.success and ratio.severity == "warning"
    assert ratio.failing_rows[0].startswith(
        "18 source training images vs a target budget of 18 labelled images: 1.0x "
        "(threshold 10x, validate.min_source_ratio)"
    )
    (bad,) = failed(outcomes)
    assert bad.failing_rows == ["target 2/test_1.png [test] is also in the source data"]


def test_target_train_needs_k_labels_per_class(good, tmp_path):
    data = good[0] / "data"
    report = run_validation(data / "source", data / "target", params(labels_per_class=8), tmp_path)
    assert not report.passed
    (bad,) = report.failures()
    assert bad.failing_rows == [
        f"class '{c}' in split 'train': 6 images, needs at least finetune.labels_per_class=8"
        for c in CLASSES
    ]
    markdown = (tmp_path / "validation_report.md").read_text()
    assert "expect_column_pair_values_a_to_be_greater_than_b" in markdown
    assert "class '1' in split 'train'" in markdown
    assert json.loads((tmp_path / "validation_report.json").read_text())["passed"] is False


def test_report_names_failing_expectations_and_files(faulty, tmp_path):
    report = ValidationReport(passed=False, outcomes=faulty[1], datasets={})
    markdown = report.to_markdown()
    assert "## Failed expectations" in markdown and "## Warnings" in markdown
    assert "expect_column_values_to_be_in_set" in markdown
    assert "1/test_3.png: cannot identify image file" in markdown
    paths = report.write(tmp_path)
    assert set(paths) == {"json", "markdown", "html"}
    assert json.loads(paths["json"].read_text())["failures"] == [
        o.headline() for o in report.failures()
    ]
    html = paths["html"].read_text()
    assert "FAILED" in html and "1/test_3.png: cannot identify image file" in html


def test_task_stops_the_flow_with_a_transfer_error(faulty, tmp_path, monkeypatch):
    failing = ValidationReport(passed=False, outcomes=faulty[1], datasets={})
    monkeypatch.setattr(validate, "run_validation", lambda *args, **kwargs: failing)
    with pytest.raises(DataValidationError) as info:
        validate_data.fn(params(tmp_path / "data"), tmp_path / "reports")
    error = info.value
    assert isinstance(error, TransferError) and error.report is failing
    message = str(error)
    assert "\n" not in message and message.startswith("Data validation failed, 8 expectation(s)")
    assert "expect_column_pair_values_to_be_equal" in message and "0/train_1.png" in message
    assert str(tmp_path / "reports" / "validation_report.md") in message
    assert error.paths["markdown"].is_file()
