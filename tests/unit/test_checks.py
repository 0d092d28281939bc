"""transfer.checks: one dataset summary and one set of transfer-sense checks, thresholds
from params.validate (the same ones validation, the run and the report use)."""

from __future__ import annotations

from pathlib import Path

from transfer import checks, report
from transfer.config import ValidateParams, load_params
from transfer.data import ManifestRow, write_manifest


def rows(n: int, *, mode: str = "L", channels: int = 1, side: int = 32, classes="01") -> list:
    out = []
    for i in range(n):
        label = classes[i % len(classes)]
        out.append(
            ManifestRow(f"{label}/{i}.png", label, "train", side, side, mode, channels,
                        f"{i:064x}", True, "")
        )
    return out


def by_name(found: list[dict]) -> dict[str, dict]:
    return {c["check"]: c for c in found}


def test_report_and_validation_share_the_implementation():
    assert report.transfer_sense_checks is checks.transfer_sense_checks
    assert report.dataset_summary is checks.dataset_summary
    assert [c["check"] for c in checks.transfer_sense_checks(
        checks.summarize(rows(400), "s"), checks.summarize(rows(20), "t", labels_per_class=2)
    )] == list(checks.CHECK_TITLES)


def test_thresholds_come_from_params_validate():
    source = checks.summarize(rows(400, side=32), "source")
    target = checks.summarize(rows(40, side=96), "target", labels_per_class=10)  # budget 20
    default = by_name(checks.transfer_sense_checks(source, target, ValidateParams()))
    assert default["source_much_larger"]["passed"]  # 400 / 20 = 20x >= 10x
    assert default["compatible_image_sizes"]["passed"]  # 3x <= 4x
    strict = by_name(checks.transfer_sense_checks(
        source, target, ValidateParams(min_source_ratio=25, max_size_ratio=2)
    ))
    assert strict["source_much_larger"]["level"] == "fail"
    ratio = strict["source_much_larger"]["detail"]
    assert "20.0x (threshold 25x, validate.min_source_ratio)" in ratio
    assert strict["compatible_image_sizes"]["level"] == "warn"
    assert "limit 2x, validate.max_size_ratio" in strict["compatible_image_sizes"]["detail"]
    shipped = load_params(Path(__file__).parents[2] / "params.yaml").validate_
    assert (shipped.min_source_ratio, shipped.max_size_ratio) == (10.0, 4.0)


def test_budget_is_capped_by_the_target_train_split():
    target = checks.summarize(rows(6), "target", labels_per_class=10)  # asks 20, has 6
    assert checks.target_budget(target) == 6


def test_grey_digits_for_rgb_shapes_says_why_transfer_may_not_help():
    source = checks.summarize(rows(2000, classes="0123456789"), "source")
    target = checks.summarize(
        rows(60, mode="RGB", channels=3, classes="CST"), "target", labels_per_class=5
    )
    found = by_name(checks.transfer_sense_checks(source, target))
    assert found["compatible_channels"]["level"] == "warn"
    assert "(grey)" in found["compatible_channels"]["detail"]
    assert "(colour)" in found["compatible_channels"]["detail"]
    assert found["class_overlap"]["detail"].startswith("0 of 3 target classes")
    lines = checks.describe(found.values())
    assert any(line.startswith("WARN compatible_channels:") for line in lines)


def test_palette_images_are_colour_although_they_have_one_band():
    summary = checks.summarize(rows(4, mode="P", channels=1), "p")
    assert summary["colour"] == ["colour"]
    grey = checks.summarize(rows(4), "g")
    assert not by_name(checks.transfer_sense_checks(summary, grey))["compatible_channels"][
        "passed"
    ]


def test_require_transfer_sense_decides_what_stops_the_run():
    source = checks.summarize(rows(30), "source")
    target = checks.summarize(rows(30, mode="RGB", channels=3), "target", labels_per_class=5)
    found = checks.transfer_sense_checks(source, target)
    relaxed, strict = ValidateParams(), ValidateParams(require_transfer_sense=True)
    assert [c["check"] for c in found if checks.stops_run(c, relaxed)] == []
    assert [c["check"] for c in found if checks.stops_run(c, strict)] == [
        "compatible_channels",
        "source_much_larger",
    ]
    empty = checks.summarize([], "empty")
    kind = by_name(checks.transfer_sense_checks(empty, target))["same_input_kind"]
    assert checks.stops_run(kind, relaxed)  # nothing to train on: always stops


def test_dataset_summary_reads_the_shared_manifest(tmp_path: Path):
    write_manifest(rows(6) + [ManifestRow("0/bad.png", "0", "train", 0, 0, "", 0, "f" * 64,
                                          False, "OSError")], tmp_path)
    s = checks.dataset_summary(tmp_path, "t", labels_per_class=2)
    assert s["n_images"] == 6 and s["n_unreadable"] == 1 and s["labelled_budget"] == 4
