"""Data validation stage: great-expectations suites over the dataset manifests.

Every dataset (``source``, ``target``) is checked by GX expectation suites built over
its manifest (``<dataset_dir>/manifest.csv``, see docs/CONTRACTS.md) and over frames
derived from it; each suite is named ``<dataset>.<table>``:

``<dataset>.manifest``      one row per file: schema, split set, label set, label equals
                            the class folder (mislabelled rows), readable files, files on
                            disk, sha256 digests, required splits present;
``<dataset>.images``        readable rows only: width/height integers within
                            ``validate.min_image_size..max_image_size``, PIL mode, channels;
``<dataset>.classes``       one row per class folder: it holds at least one readable
                            image (an empty folder is named, not a prepare crash);
``<dataset>.class_counts``  one row per (labelled split, class): at least
                            ``validate.min_per_class`` images, and for the target train
                            split at least ``finetune.labels_per_class`` (k labels per
                            class are drawn from it);
``<dataset>.duplicates``    files whose sha256 occurs more than once: the same bytes in
                            two splits (leakage: error, or warning when
                            ``validate.fail_on_duplicates`` is false), the same bytes
                            under two labels (error), duplicates inside one split (warning);
``compatibility.transfer_sense``  the "does transfer make sense" checks of
                            ``transfer/checks.py`` (input kind, colour channels, image
                            scale, source/target size ratio, class overlap; thresholds in
                            ``params.validate``), one expectation each: same input kind is
                            an error, the others warnings unless
                            ``validate.require_transfer_sense``; all of them are shown in
                            the report, the CLI output and the flow's log before training;
``compatibility.overlap``   target val/test images that also appear in the source (error:
                            the evaluation would be contaminated) or target train images
                            in the source (warning).

Manifests are read by the loader's own reader (``transfer.data.manifest``), so a row
passes here exactly when training reads it with the same meaning.

Only ``severity == "error"`` outcomes fail the gate. ``run_validation`` validates and
returns a ``ValidationReport`` (never raises on bad data); ``validate_stage`` is the whole
stage (CLI ``transfer validate``): it writes the report (json, markdown, html), publishes
the markdown as the ``validation-report`` Prefect artifact when it runs inside Prefect and
raises ``DataValidationError`` (a ``TransferError``) so the flow stops before any
training; ``tasks.validate_gate.validate_data`` is its Prefect task.

Class names are the dataset's top-level folders (ImageFolder: ``<class>/<file>``).
Unlabelled target rows (split ``unlabelled``, label ``""``) are accepted only when
``allow_unlabelled`` (``validate.allow_unlabelled_target``) is set; they may live in any
folder (a folder holding only unlabelled rows is no class), are not counted per class and
are not part of the cross-split leakage check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.adapters.gx import MAX_FAILING_ROWS, Check, CheckResult, expectations, run_suite
from transfer import checks as sense
from transfer.config import Params, ValidateParams
from transfer.data.manifest import (
    BOOL_HINT,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    ManifestTable,
    parse_bool,
    parse_int,
    parse_rows,
    read_manifest_table,
)
from transfer.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = MANIFEST_NAME
LABELLED_SPLITS = ("train", "val", "test")
UNLABELLED_SPLIT = "unlabelled"
IMAGE_MODES = ("L", "RGB", "RGBA", "P", "I;16", "LA")
CHANNEL_COUNTS = (1, 2, 3, 4)
SHA256_REGEX = r"^[0-9a-f]{64}$"
SEVERITIES = ("error", "warning")


class DataValidationError(DataError):
    """The data failed validation; ``report`` holds every outcome, ``paths`` the report files."""

    def __init__(
        self,
        message: str,
        report: ValidationReport | None = None,
        paths: dict[str, Path] | None = None,
    ) -> None:
        super().__init__(message)
        self.report = report
        self.paths = paths or {}


@dataclass
class ExpectationOutcome:
    """One expectation's verdict, in words a person can act on."""

    suite: str  # "<dataset>.<table>", e.g. "target.manifest"
    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_in_set"
    column: str | None
    success: bool
    details: str
    failing_rows: list[str] = field(default_factory=list)  # files / values, first 20
    severity: str = "error"  # "error" fails the gate, "warning" is reported only
    check: str = ""  # what the expectation means here, e.g. "label matches its class folder"
    unexpected_count: int = 0

    @property
    def failed(self) -> bool:
        return not self.success and self.severity == "error"

    def headline(self) -> str:
        column = f"({self.column})" if self.column else ""
        return f"{self.suite}: {self.expectation}{column} - {self.check}"


@dataclass
class ValidationReport:
    passed: bool
    outcomes: list[ExpectationOutcome]
    datasets: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sense: list[dict[str, Any]] = field(default_factory=list)  # transfer.checks, all levels

    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if o.failed]

    def warnings(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity != "error"]

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"data validation {verdict}: {len(self.outcomes)} expectations, "
            f"{len(self.failures())} failed, {len(self.warnings())} warnings"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "seconds": round(self.seconds, 3),
            "datasets": self.datasets,
            "transfer_sense": self.sense,
            "failures": [o.headline() for o in self.failures()],
            "outcomes": [asdict(o) for o in self.outcomes],
        }

    def to_markdown(self) -> str:
        lines = [
            f"# Data validation: {'PASSED' if self.passed else 'FAILED'}",
            "",
            self.summary(),
            "",
        ]
        if self.datasets:
            lines += [
                "| dataset | rows | classes | splits | unreadable | manifest |",
                "|---|---|---|---|---|---|",
            ]
            for name, info in self.datasets.items():
                cells = [name, *_dataset_cells(info)[:-1], f"`{info.get('manifest', '')}`"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        lines += _sense_markdown(self.sense)
        for title, group in (
            ("Failed expectations", self.failures()),
            ("Warnings", self.warnings()),
        ):
            if not group:
                continue
            lines += [f"## {title}", ""]
            for outcome in group:
                lines += [f"### {_md(outcome.headline())}", "", _md(outcome.details), ""]
                lines += [f"- `{row}`" for row in outcome.failing_rows]
                if outcome.unexpected_count > len(outcome.failing_rows) and outcome.failing_rows:
                    lines.append(
                        f"- ... {outcome.unexpected_count - len(outcome.failing_rows)} more"
                    )
                lines.append("")
        passed = [o for o in self.outcomes if o.success]
        if passed:
            lines += [
                "## Passed expectations",
                "",
                "| suite | expectation | column | check |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {o.suite} | {o.expectation} | {o.column or ''} | {_md(o.check)} |"
                for o in passed
            ]
            lines.append("")
        return "\n".join(lines)

    def to_html(self) -> str:
        """The report as one page (``transfer/templates/validation.html.j2``, autoescaped)."""
        from transfer.templating import render

        order = {id(o): i for i, o in enumerate(self.failures() + self.warnings())}
        outcomes = [
            {"verdict": verdict, "css": css, "rows": o.failing_rows,
             "cells": (o.suite, o.expectation, o.column or "", o.check, o.details)}
            for o in sorted(self.outcomes, key=lambda o: order.get(id(o), len(order)))
            for verdict, css in [("pass", "ok") if o.success else (("FAIL", "bad") if o.failed else ("warn", "warn"))]
        ]
        return render(
            "validation.html.j2", passed=self.passed, summary=self.summary(), sense=self.sense,
            sense_intro=SENSE_INTRO, outcomes=outcomes,
            datasets=[(name, *_dataset_cells(info)) for name, info in self.datasets.items()],
        ).rstrip("\n")

    def write(self, report_dir: str | Path) -> dict[str, Path]:
        """Write ``validation_report.{json,md,html}`` under ``report_dir``; return their paths."""
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / "validation_report.json",
            "markdown": out / "validation_report.md",
            "html": out / "validation_report.html",
        }
        paths["json"].write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        paths["markdown"].write_text(self.to_markdown() + "\n")
        paths["html"].write_text(self.to_html() + "\n")
        return paths

    def error_message(self, paths: dict[str, Path] | None = None) -> str:
        """One paragraph naming each failed expectation and its first failing rows."""
        items = []
        for o in self.failures():
            rows = "; ".join(o.failing_rows[:3])
            more = f" (+{o.unexpected_count - 3} more)" if o.unexpected_count > 3 else ""
            name = f"{o.suite} {o.expectation}({o.column or ''}) [{o.check}]"
            items.append(f"{name}: {rows or o.details}{more}")
        where = f" Full report: {paths['markdown']}." if paths and "markdown" in paths else ""
        return (
            f"Data validation failed, {len(items)} expectation(s) not met, so nothing was trained: "
            + " | ".join(items)
            + "."
            + where
        )


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _dataset_cells(info: dict[str, Any]) -> list[str]:
    """rows, classes, readable images per split (or the manifest error), unreadable, manifest."""
    splits = ", ".join(f"{k}: {v}" for k, v in info.get("splits", {}).items())
    return [
        str(info.get("rows", "-")),
        str(len(info.get("class_folders") or info.get("classes", []))),
        splits or str(info.get("error", "")),
        str(info.get("n_unreadable", "-")),
        str(info.get("manifest", "")),
    ]


SENSE_INTRO = (
    "Transfer can be expected to help when source and target share the input kind and "
    "colour family, the images have a similar scale and the source has far more data than "
    "the target's labelled budget (thresholds: params.validate)."
)


def _sense_markdown(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["## Does transfer make sense?", ""]
    if not checks:
        return lines + ["Not evaluated: a dataset manifest is missing.", ""]
    lines += [SENSE_INTRO, "", "| result | check | detail |", "|---|---|---|"]
    lines += [f"| {c['level'].upper()} | {c['check']} | {_md(c['detail'])} |" for c in checks]
    return lines + [""]


# --------------------------------------------------------------------------- manifests


def _read_manifest(dataset_dir: Path) -> tuple[ManifestTable | None, str | None]:
    """The shared reader (transfer.data.manifest); a missing or broken file is a finding."""
    try:
        return read_manifest_table(dataset_dir), None
    except DataError as error:
        return None, str(error)


def _derive(frame: pd.DataFrame, dataset_dir: Path) -> pd.DataFrame:
    """Typed and derived columns next to the raw ones (raw text kept for type checks).

    Values are parsed by the loader's own functions, so a row passes here exactly when
    the loader reads it with the same meaning.
    """
    df = frame.copy()
    for column in MANIFEST_COLUMNS:
        if column not in df.columns:
            df[column] = ""  # missing columns are reported by the schema expectation
    if df["path"].str.contains("\\", regex=False).any():
        df["path"] = df["path"].str.replace("\\", "/", regex=False)
    parts = df["path"].str.split("/", n=1)
    df["folder"] = np.where(parts.str.len() > 1, parts.str[0], "")
    df["expected_label"] = np.where(df["split"] == UNLABELLED_SPLIT, "", df["folder"])
    df["readable_raw"] = df["readable"]
    parsed = df["readable_raw"].map(parse_bool)
    df["readable_is_bool"] = parsed.notna()
    df["readable"] = parsed.fillna(False).astype(bool)
    for column in ("width", "height", "channels"):
        df[f"{column}_raw"] = df[column]
        df[column] = pd.array(df[column].map(parse_int).tolist(), dtype="Int64")
    base = str(dataset_dir) + os.sep
    df["exists"] = [bool(p) and os.path.isfile(base + p) for p in df["path"].tolist()]
    return df


def _class_names(df: pd.DataFrame, dataset_dir: Path) -> list[str]:
    """Sorted class folder names: the dataset's top-level folders that hold labelled rows
    or no manifest rows at all (an empty class folder is a class with 0 images)."""
    labelled = df[df["split"] != UNLABELLED_SPLIT]
    folders = set(labelled["folder"].unique()) - {""}
    unlabelled_only = set(df.loc[df["split"] == UNLABELLED_SPLIT, "folder"].unique()) - folders
    if dataset_dir.is_dir():
        on_disk = {
            d.name
            for d in dataset_dir.iterdir()
            if d.is_dir() and not d.name.startswith((".", "_"))
        }
        folders |= on_disk - unlabelled_only
    return sorted(folders)


def _summary(
    table: ManifestTable | None,
    dataset_dir: Path,
    name: str,
    class_folders: list[str],
    error: str | None,
    labels_per_class: int | None = None,
) -> dict[str, Any]:
    """transfer.checks' dataset summary (what the run and the report show) + manifest facts."""
    info: dict[str, Any] = {"dir": str(dataset_dir), "manifest": str(dataset_dir / MANIFEST)}
    if table is None:
        info["error"] = error
        return info
    rows = parse_rows(table, strict=False)  # bad values are the suites' findings
    info |= sense.summarize(rows, name, dataset_dir, labels_per_class)
    info |= {
        "manifest_sha256": hashlib.sha256(table.path.read_bytes()).hexdigest(),
        "rows": len(rows),
        "class_folders": class_folders,
    }
    return info


# --------------------------------------------------------------------------- outcomes


def _outcome(
    suite: str, res: CheckResult, table_rows: list[str] | None = None, full_row: Any = None
) -> ExpectationOutcome:
    check, result = res.check, res.result
    config = check.expectation
    column = check.column or getattr(config, "column", None) or getattr(config, "column_A", None)
    unexpected = int(result.get("unexpected_count") or 0)
    if res.exception:
        details = f"could not be evaluated: {res.exception}"
    elif "unexpected_count" in result:
        total = int(result.get("element_count") or 0)
        details = (
            f"{unexpected} of {total} rows unexpected ({100.0 * unexpected / max(total, 1):.1f}%)"
            if unexpected
            else f"all {total} rows as expected"
        )
    elif "observed_value" in result:
        details = f"observed {result['observed_value']!r}"
        mismatched = (result.get("details") or {}).get("mismatched")
        if mismatched and mismatched.get("missing"):
            details += f"; missing {mismatched['missing']}"
    elif "partial_missing_list" in result:
        details = f"missing {result['partial_missing_list']}"
    else:
        details = "ok" if res.success else "failed"
    rows: list[str] = []
    if not res.success:
        index_rows = result.get("partial_unexpected_index_list") or []
        if index_rows and check.describe:
            rows = [check.describe(full_row(r) if full_row else dict(r)) for r in index_rows]
        elif table_rows is not None:
            rows = table_rows
        elif "partial_missing_list" in result:
            rows = [f"no rows with {column} = {v!r}" for v in result["partial_missing_list"]]
        elif mismatched_missing := ((result.get("details") or {}).get("mismatched") or {}).get(
            "missing"
        ):
            rows = [f"missing column: {c}" for c in mismatched_missing]
        else:
            rows = [repr(v) for v in result.get("partial_unexpected_list") or []]
        unexpected = max(unexpected, len(rows))
    return ExpectationOutcome(
        suite=suite,
        expectation=config.expectation_type,
        column=column,
        success=res.success,
        details=details,
        failing_rows=[str(r) for r in rows[:MAX_FAILING_ROWS]],
        severity=check.severity,
        check=check.title,
        unexpected_count=unexpected,
    )


def _run(
    suite: str,
    table: str,
    frame: pd.DataFrame,
    checks: list[Check],
    index: Sequence[str],
    table_rows: dict[int, list[str]] | None = None,
) -> list[ExpectationOutcome]:
    results = run_suite(suite, table, frame, checks, index)
    table_rows = table_rows or {}
    keyed = frame.drop_duplicates(list(index)).set_index(list(index)) if index else None

    def full_row(index_row: dict[str, Any]) -> dict[str, Any]:
        """GX names a failing row by its index columns; add the row's other columns."""
        key = tuple(index_row[c] for c in index) if len(index) > 1 else index_row[index[0]]
        extra = keyed.loc[key].to_dict() if keyed is not None and key in keyed.index else {}
        return {**extra, **index_row}

    return [_outcome(suite, r, table_rows.get(i), full_row) for i, r in enumerate(results)]


def _fmt(value: Any) -> str:
    return "<missing>" if value is None or value is pd.NA or value != value else str(value)


# --------------------------------------------------------------------------- dataset suites


def _manifest_checks(
    raw_columns: set[str],
    classes: list[str],
    splits: list[str],
    required_splits: Sequence[str],
    allow_unlabelled: bool,
) -> list[Check]:
    E = expectations()

    def value_of(column: str):
        return lambda r: f"{r['path']}: {column} = {_fmt(r.get(column))!r}"

    def unreadable(r: dict) -> str:
        return f"{r['path']}: {r.get('error') or 'not readable'}"

    labels = classes + ([""] if allow_unlabelled else [])
    checks = [
        Check(
            E.ExpectTableColumnsToMatchSet(column_set=list(MANIFEST_COLUMNS), exact_match=False),
            f"manifest has the columns {', '.join(MANIFEST_COLUMNS)}",
        ),
        Check(E.ExpectTableRowCountToBeBetween(min_value=1), "manifest lists at least one image"),
    ]
    has = raw_columns.__contains__
    if has("path"):
        checks += [
            Check(
                E.ExpectColumnValuesToBeUnique(column="path"),
                "each file is listed once",
                lambda r: f"{r['path']}: listed more than once",
            ),
            Check(
                E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
                "listed file exists on disk",
                lambda r: f"{r['path']}: file missing",
            ),
        ]
    if has("split"):
        unlabelled_note = (
            ""
            if allow_unlabelled
            else " (split 'unlabelled' needs validate.allow_unlabelled_target)"
        )
        checks += [
            Check(
                E.ExpectColumnValuesToBeInSet(column="split", value_set=splits),
                f"split in {{{', '.join(splits)}}}{unlabelled_note}",
                value_of("split"),
            ),
            Check(
                E.ExpectColumnDistinctValuesToContainSet(
                    column="split", value_set=list(required_splits)
                ),
                f"splits {', '.join(required_splits)} are present",
            ),
        ]
    if has("label"):
        shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
        checks.append(
            Check(
                E.ExpectColumnValuesToBeInSet(column="label", value_set=labels),
                f"label is a class folder name ({shown})"
                + (" or '' (unlabelled)" if allow_unlabelled else ""),
                value_of("label"),
            )
        )
    if has("label") and has("path"):

        def mislabelled(r: dict) -> str:
            expected = r.get("expected_label", "")
            where = (
                f"class folder {expected!r}" if expected else "an unlabelled row (label must be '')"
            )
            return f"{r['path']}: label {r.get('label')!r} but {where}"

        checks.append(
            Check(
                E.ExpectColumnPairValuesToBeEqual(column_A="label", column_B="expected_label"),
                "label matches the class folder of its path",
                mislabelled,
                column="label",
            )
        )
    if has("readable"):
        checks += [
            Check(
                E.ExpectColumnValuesToBeInSet(column="readable_is_bool", value_set=[True]),
                f"readable is a boolean ({BOOL_HINT}, any case)",
                value_of("readable_raw"),
                column="readable",
            ),
            Check(
                E.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
                "image file decodes",
                unreadable,
            ),
        ]
    if has("sha256"):
        checks.append(
            Check(
                E.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_REGEX),
                "sha256 is a 64-hex-digit digest",
                value_of("sha256"),
            )
        )
    return checks


def _image_checks(raw_columns: set[str], vp: ValidateParams) -> list[Check]:
    E = expectations()
    checks: list[Check] = []
    lo, hi = vp.min_image_size, vp.max_image_size
    for column in ("width", "height"):
        if column in raw_columns:
            checks += [
                Check(
                    E.ExpectColumnValuesToNotBeNull(column=column),
                    f"{column} is an integer",
                    lambda r, c=column: f"{r['path']}: {c} is not an integer",
                ),
                Check(
                    E.ExpectColumnValuesToBeBetween(column=column, min_value=lo, max_value=hi),
                    f"{column} between {lo} and {hi} px",
                    lambda r, c=column: (
                        f"{r['path']}: {c} = {_fmt(r.get(c))} px (allowed {lo}..{hi})"
                    ),
                ),
            ]
    if "mode" in raw_columns:
        checks.append(
            Check(
                E.ExpectColumnValuesToBeInSet(column="mode", value_set=list(IMAGE_MODES)),
                f"PIL mode in {{{', '.join(IMAGE_MODES)}}}",
                lambda r: f"{r['path']}: mode {r.get('mode')!r} not supported",
            )
        )
    if "channels" in raw_columns:
        checks += [
            Check(
                E.ExpectColumnValuesToNotBeNull(column="channels"),
                "channels is an integer",
                lambda r: f"{r['path']}: channels is not an integer",
            ),
            Check(
                E.ExpectColumnValuesToBeInSet(column="channels", value_set=list(CHANNEL_COUNTS)),
                "channels in {1, 2, 3, 4}",
                lambda r: f"{r['path']}: channels = {_fmt(r.get('channels'))}",
            ),
        ]
    return checks


def _class_counts(
    df: pd.DataFrame,
    classes: list[str],
    required_splits: Sequence[str],
    base_min: int,
    train_min: int | None,
) -> pd.DataFrame:
    labelled = df[df["split"].isin(LABELLED_SPLITS) & df["readable"]]
    present = set(labelled["split"].unique())
    splits = [s for s in LABELLED_SPLITS if s in present or s in required_splits]
    counts = labelled.groupby(["split", "label"]).size()
    rows = []
    for split in splits:
        required, rule = base_min, "validate.min_per_class"
        if split == "train" and train_min is not None and train_min > base_min:
            required, rule = train_min, "finetune.labels_per_class"
        for label in classes:
            count = int(counts.get((split, label), 0))
            rows.append(
                {"split": split, "label": label, "count": count, "required": required, "rule": rule}
            )
    columns = {"split": "str", "label": "str", "count": "int64", "required": "int64", "rule": "str"}
    return pd.DataFrame(rows, columns=list(columns)).astype(columns)


def _class_folder_outcomes(
    name: str, df: pd.DataFrame, classes: list[str]
) -> list[ExpectationOutcome]:
    """Every class folder holds a readable image (an empty folder is a class with none)."""
    labelled = df[df["split"] != UNLABELLED_SPLIT]
    files = labelled.groupby("folder").size()
    images = labelled[labelled["readable"]].groupby("folder").size()
    table = pd.DataFrame(
        {
            "label": classes,
            "files": [int(files.get(c, 0)) for c in classes],
            "images": [int(images.get(c, 0)) for c in classes],
        }
    ).astype({"label": "str", "files": "int64", "images": "int64"})

    def empty(r: dict) -> str:
        if not r.get("files"):
            return f"{r['label']}/: class folder holds no files"
        return f"{r['label']}/: none of its {r['files']} files is a readable image"

    check = Check(
        expectations().ExpectColumnValuesToBeBetween(column="images", min_value=1),
        "every class folder holds at least one readable image",
        empty,
    )
    return _run(f"{name}.classes", "classes", table, [check], ["label"])


def _duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Files in labelled splits whose sha256 occurs more than once, with their partners."""
    rows = df[df["split"].isin(LABELLED_SPLITS) & (df["sha256"] != "")]
    rows = rows[rows.duplicated("sha256", keep=False)][["path", "split", "label", "sha256"]].copy()
    columns = {
        "path": "str",
        "split": "str",
        "label": "str",
        "sha256": "str",
        "n_splits": "int64",
        "n_labels": "int64",
        "n_same_split": "int64",
        "others": "str",
    }
    if rows.empty:
        return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in columns.items()})
    groups = rows.groupby("sha256")
    rows["n_splits"] = groups["split"].transform("nunique")
    rows["n_labels"] = groups["label"].transform("nunique")
    rows["n_same_split"] = rows.groupby(["sha256", "split"])["path"].transform("size")
    members = {h: list(zip(g["path"], g["split"], strict=True)) for h, g in groups}
    others = []
    for path, digest in zip(rows["path"], rows["sha256"], strict=True):
        partners = [f"{p} [{s}]" for p, s in members[digest] if p != path]
        more = f" (+{len(partners) - 3} more)" if len(partners) > 3 else ""
        others.append(", ".join(partners[:3]) + more)
    rows["others"] = others
    return rows.astype(columns).reset_index(drop=True)


def _duplicate_checks(fail_on_duplicates: bool) -> list[Check]:
    E = expectations()

    def same_bytes(r: dict) -> str:
        where = f"[{r.get('split')}, label {r.get('label')!r}]"
        return f"{r['path']} {where} same bytes as {r.get('others')}"

    return [
        Check(
            E.ExpectColumnValuesToBeBetween(column="n_splits", max_value=1),
            "no image in two splits (train/val/test leakage by sha256)",
            same_bytes,
            severity="error" if fail_on_duplicates else "warning",
        ),
        Check(
            E.ExpectColumnValuesToBeBetween(column="n_labels", max_value=1),
            "identical images carry the same label",
            same_bytes,
        ),
        Check(
            E.ExpectColumnValuesToBeBetween(column="n_same_split", max_value=1),
            "no duplicate images inside a split",
            same_bytes,
            severity="warning",
        ),
    ]


def _validate_dataset(
    dataset_dir: str | Path,
    name: str,
    params: ValidateParams,
    *,
    expected_classes: list[str] | None,
    min_per_class: int | None,
    min_train_per_class: int | None,
    allow_unlabelled: bool,
    required_splits: Sequence[str],
    labels_per_class: int | None = None,
) -> tuple[list[ExpectationOutcome], dict[str, Any], pd.DataFrame | None]:
    dataset_dir = Path(dataset_dir)
    table, error = _read_manifest(dataset_dir)
    if table is None:
        outcome = ExpectationOutcome(
            suite=f"{name}.manifest",
            expectation="manifest_file_readable",
            column=None,
            success=False,
            details=str(error),
            failing_rows=[str(dataset_dir / MANIFEST)],
            check="manifest.csv exists",
            unexpected_count=1,
        )
        return [outcome], _summary(None, dataset_dir, name, [], error), None
    frame = table.frame()
    raw_columns = set(frame.columns)
    df = _derive(frame, dataset_dir)
    classes = (
        sorted(expected_classes) if expected_classes is not None else _class_names(df, dataset_dir)
    )
    splits = list(LABELLED_SPLITS) + ([UNLABELLED_SPLIT] if allow_unlabelled else [])
    base_min = params.min_per_class if min_per_class is None else min_per_class

    placeholders = [c for c in MANIFEST_COLUMNS if c not in raw_columns]
    outcomes = _run(
        f"{name}.manifest",
        "manifest",
        df.drop(columns=placeholders),
        _manifest_checks(raw_columns, classes, splits, required_splits, allow_unlabelled),
        ["path"],
    )
    images = df[df["readable"]].reset_index(drop=True)
    outcomes += _run(
        f"{name}.images", "images", images, _image_checks(raw_columns, params), ["path"]
    )

    if {"label", "split"} <= raw_columns:
        outcomes += _class_folder_outcomes(name, df, classes)
        counts = _class_counts(df, classes, required_splits, base_min, min_train_per_class)

        def too_few(r: dict) -> str:
            why = f"{r.get('rule', 'required')}={r['required']}"
            what = f"class {r['label']!r} in split {r['split']!r}"
            return f"{what}: {r['count']} images, needs at least {why}"

        count_checks = [
            Check(
                expectations().ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A="count", column_B="required", or_equal=True
                ),
                "enough images per class in every labelled split",
                too_few,
                column="count",
            ),
            Check(
                expectations().ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2),
                "at least two classes",
            ),
        ]
        outcomes += _run(
            f"{name}.class_counts",
            "class_counts",
            counts,
            count_checks,
            ["split", "label"],
            table_rows={1: [f"classes found: {classes}"]},
        )
    if {"sha256", "split", "path"} <= raw_columns:
        outcomes += _run(
            f"{name}.duplicates",
            "duplicates",
            _duplicates(df),
            _duplicate_checks(params.fail_on_duplicates),
            ["path"],
        )
    info = _summary(table, dataset_dir, name, classes, None, labels_per_class)
    return outcomes, info, df


def validate_dataset(
    dataset_dir: str | Path,
    name: str,
    params: ValidateParams,
    *,
    expected_classes: list[str] | None = None,
    min_per_class: int | None = None,
    allow_unlabelled: bool = False,
    min_train_per_class: int | None = None,
    required_splits: Sequence[str] = ("train",),
) -> list[ExpectationOutcome]:
    """Run the GX suites of one dataset (see the module docstring); never raises on bad data.

    ``expected_classes`` defaults to the dataset's class folder names; ``min_per_class``
    (default ``params.min_per_class``) applies to every labelled split and
    ``min_train_per_class`` raises it for the train split (the k labels per class).
    """
    outcomes, _, _ = _validate_dataset(
        dataset_dir,
        name,
        params,
        expected_classes=expected_classes,
        min_per_class=min_per_class,
        min_train_per_class=min_train_per_class,
        allow_unlabelled=allow_unlabelled,
        required_splits=required_splits,
    )
    return outcomes


# --------------------------------------------------------------------------- compatibility


def _sense_outcomes(checks: list[dict[str, Any]], vp: ValidateParams) -> list[ExpectationOutcome]:
    """transfer.checks' verdicts as GX expectations: one column per check holding its level."""
    E = expectations()
    levels = {c["check"]: c["level"] for c in checks}
    frame = pd.DataFrame([{"datasets": "source -> target"} | levels]).astype("str")
    suite: list[Check] = []
    for c in checks:
        stops = sense.severity(c, vp) == "error"
        why = "stops the run" if stops else "reported only (validate.require_transfer_sense)"
        title = f"{sense.CHECK_TITLES.get(c['check'], c['check'])}: {why}"
        suite.append(
            Check(
                E.ExpectColumnValuesToBeInSet(column=c["check"], value_set=["pass", "info"]),
                title,
                lambda r, detail=c["detail"]: detail,
                severity=sense.severity(c, vp),
            )
        )
    return _run("compatibility.transfer_sense", "compat_sense", frame, suite, ["datasets"])


def _overlap_outcomes(
    source: pd.DataFrame | None, target: pd.DataFrame | None, fail_on_overlap: bool
) -> list[ExpectationOutcome]:
    """Target images that also lie in the source: val/test ones contaminate the evaluation."""
    E = expectations()
    overlap = pd.DataFrame(columns=["path", "split"], dtype="str")
    if source is not None and target is not None:
        hashes = set(source["sha256"].unique()) - {""}
        shared = target[target["sha256"].isin(hashes)]
        overlap = shared[["path", "split"]].astype("str").reset_index(drop=True)
    shared_rows = [f"{p} [{s}]" for p, s in zip(overlap["path"], overlap["split"], strict=True)]
    checks = [
        Check(
            E.ExpectColumnValuesToNotBeInSet(column="split", value_set=["val", "test"]),
            "no target val/test image appears in the source data (evaluation contamination)",
            lambda r: f"target {r['path']} [{r['split']}] is also in the source data",
            severity="error" if fail_on_overlap else "warning",
        ),
        Check(
            E.ExpectTableRowCountToEqual(value=0),
            "source and target share no images",
            severity="warning",
        ),
    ]
    return _run(
        "compatibility.overlap",
        "compat_overlap",
        overlap,
        checks,
        ["path"],
        {1: shared_rows[:MAX_FAILING_ROWS]},
    )


def sense_checks(
    source_info: dict[str, Any], target_info: dict[str, Any], vp: ValidateParams
) -> list[dict[str, Any]]:
    """The transfer-sense checks of two validated datasets; [] when a manifest is missing."""
    if "kind" not in source_info or "kind" not in target_info:
        return []
    return sense.transfer_sense_checks(source_info, target_info, vp)


def check_compatibility(
    source_dir: str | Path,
    target_dir: str | Path,
    *,
    target_labelled: int | None = None,
    fail_on_overlap: bool = True,
    params: ValidateParams | None = None,
) -> list[ExpectationOutcome]:
    """Source/target compatibility: the transfer-sense checks and the shared images.

    ``target_labelled`` is the target's labelled training budget (k x classes); it
    defaults to the target train split size.
    """
    vp = params or ValidateParams()
    frames, infos = [], []
    for name, directory in (("source", Path(source_dir)), ("target", Path(target_dir))):
        table, error = _read_manifest(directory)
        frames.append(None if table is None else _derive(table.frame(), directory))
        infos.append(_summary(table, directory, name, [], error))
    if target_labelled is not None and "kind" in infos[1]:
        infos[1]["labelled_budget"] = target_labelled
    checks = sense_checks(infos[0], infos[1], vp)
    outcomes = _sense_outcomes(checks, vp) if checks else []
    return outcomes + _overlap_outcomes(frames[0], frames[1], fail_on_overlap)


# --------------------------------------------------------------------------- the stage


def run_validation(
    source_dir: str | Path,
    target_dir: str | Path,
    params: Params,
    report_dir: str | Path | None = None,
) -> ValidationReport:
    """Validate source and target, check their compatibility, and write the report files."""
    start = time.perf_counter()
    vp = params.validate_
    k = params.finetune.labels_per_class
    source_outcomes, source_info, source_df = _validate_dataset(
        source_dir,
        "source",
        vp,
        expected_classes=None,
        min_per_class=None,
        min_train_per_class=None,
        allow_unlabelled=False,
        required_splits=("train",),
    )
    target_outcomes, target_info, target_df = _validate_dataset(
        target_dir,
        "target",
        vp,
        expected_classes=None,
        min_per_class=None,
        min_train_per_class=k,
        allow_unlabelled=vp.allow_unlabelled_target,
        required_splits=("train", "test"),
        labels_per_class=k,
    )
    checks = sense_checks(source_info, target_info, vp)  # before any training: why it may fail
    outcomes = source_outcomes + target_outcomes
    outcomes += _sense_outcomes(checks, vp) if checks else []
    outcomes += _overlap_outcomes(source_df, target_df, vp.fail_on_duplicates)
    report = ValidationReport(
        passed=not any(o.failed for o in outcomes),
        outcomes=outcomes,
        datasets={"source": source_info, "target": target_info},
        seconds=time.perf_counter() - start,
        sense=checks,
    )
    if report_dir is not None:
        report.write(report_dir)
    _log_report(report)
    return report


def _log_report(report: ValidationReport) -> None:
    """The summary and every transfer-sense check, into the Prefect run's log when inside one."""
    logger: Any = log
    if _in_prefect_run():
        from prefect import get_run_logger

        logger = get_run_logger()
    logger.info("%s (%.2f s)", report.summary(), report.seconds)
    if not report.sense:
        logger.warning("transfer-sense checks not evaluated (a dataset manifest is missing)")
    for line in sense.describe(report.sense):
        logger.info(line)


def default_report_dir(params: Params) -> Path:
    return Path(params.runtime.artifacts_dir) / "validation"


def dataset_dirs(params: Params) -> tuple[Path, Path]:
    root = Path(params.data.root)
    return root / "source", root / "target"


def validate_stage(params: Params, report_dir: str | Path | None = None) -> ValidationReport:
    """The whole stage: validate ``<data.root>/{source,target}``, write the report (default
    ``<runtime.artifacts_dir>/validation``), publish it as the ``validation-report`` markdown
    artifact when running inside Prefect, and raise ``DataValidationError`` if the gate fails.

    The CLI (``transfer validate``) calls this directly; ``tasks.validate_gate.validate_data`` is its Prefect task.
    """
    report_dir = Path(report_dir) if report_dir is not None else default_report_dir(params)
    source_dir, target_dir = dataset_dirs(params)
    report = run_validation(source_dir, target_dir, params)
    paths = report.write(report_dir)
    if _in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            key="validation-report", markdown=report.to_markdown(), description=report.summary()
        )
    if not report.passed:
        raise DataValidationError(report.error_message(paths), report, paths)
    return report


def _in_prefect_run() -> bool:
    if "prefect" not in sys.modules:  # never imported: no Prefect run here (and no import cost)
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None
