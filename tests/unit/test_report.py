"""Transfer report core: sense checks, sample-efficiency sweep and plot, the HTML/PNG report."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer import stages
from transfer.config import Params
from transfer.data import ManifestRow, clear_memory_cache, prepare_target, write_manifest
from transfer.errors import TransferError
from transfer.models import create_model, save_model_dir
from transfer.report import (
    Curves,
    build_report,
    dataset_summary,
    negative_points,
    negative_transfer,
    plot_sample_efficiency,
    render_html,
    sample_efficiency,
    transfer_sense_checks,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGITS = [str(i) for i in range(10)]
SECTIONS = (
    "summary",
    "data-sizes",
    "transfer-checks",
    "sample-efficiency",
    "confusion-matrices",
    "provenance",
    "strategy",
)
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def summary(
    name: str,
    train: int,
    *,
    test: int = 100,
    channels=(1,),
    side: int = 32,
    classes=DIGITS,
    budget: int | None = None,
) -> dict:
    out = {
        "name": name,
        "kind": "images",
        "classes": list(classes),
        "channels": list(channels),
        "splits": {"train": train, "val": train // 10, "test": test},
        "n_images": train + train // 10 + test,
        "n_unreadable": 0,
        "modes": ["L"],
        "width": {"min": side, "median": side, "max": side},
        "height": {"min": side, "median": side, "max": side},
        "median_side": float(side),
        "per_class": {c: {"train": train // len(classes)} for c in classes},
    }
    if budget is not None:
        out |= {"labels_per_class": budget // len(classes), "labelled_budget": budget}
    return out


def by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["check"]: c for c in checks}


# --------------------------------------------------------------------------- sense checks


def test_sense_checks_pass_for_the_default_scenario():
    checks = transfer_sense_checks(summary("source", 8000), summary("target", 900, budget=100))
    assert [c["check"] for c in checks] == [
        "same_input_kind",
        "compatible_channels",
        "compatible_image_sizes",
        "source_much_larger",
        "class_overlap",
    ]
    assert all(c["passed"] for c in checks)
    assert all(set(c) >= {"check", "passed", "detail", "level"} for c in checks)
    ratio = by_name(checks)["source_much_larger"]
    assert "80.0x" in ratio["detail"] and "threshold 10x" in ratio["detail"]
    assert by_name(checks)["class_overlap"]["level"] == "info"
    assert "10 of 10" in by_name(checks)["class_overlap"]["detail"]


def test_sense_checks_flag_small_source_colour_mismatch_and_scale():
    source = summary("source", 500, channels=(3,), side=224, classes=["cat", "dog"])
    target = summary("target", 900, budget=100)
    checks = by_name(transfer_sense_checks(source, target))
    assert not checks["source_much_larger"]["passed"]
    assert checks["source_much_larger"]["level"] == "fail"
    assert "5.0x" in checks["source_much_larger"]["detail"]
    assert not checks["compatible_channels"]["passed"]
    assert checks["compatible_channels"]["level"] == "warn"
    assert not checks["compatible_image_sizes"]["passed"]
    assert "7.0x" in checks["compatible_image_sizes"]["detail"]
    assert checks["class_overlap"]["passed"]  # information only
    assert "0 of 10" in checks["class_overlap"]["detail"]
    # the threshold is a parameter; without a labelled budget the train split counts
    assert by_name(transfer_sense_checks(source, summary("target", 40), min_ratio=5))[
        "source_much_larger"
    ]["passed"]


def test_sense_checks_need_the_same_input_kind():
    checks = by_name(transfer_sense_checks({"kind": "empty"}, summary("target", 90)))
    assert not checks["same_input_kind"]["passed"]
    assert checks["source_much_larger"]["level"] == "fail"


def test_dataset_summary_counts_splits_classes_and_shapes(tmp_path: Path):
    rows = []
    for i in range(12):
        label, split = ("a", "b")[i % 2], ("train", "train", "val", "test")[i % 4]
        rows.append(
            ManifestRow(
                f"{label}/{i}.png", label, split, 8 + i % 2, 8, "L", 1, f"{i:064x}", True, ""
            )
        )
    rows.append(
        ManifestRow("a/bad.png", "a", "train", 0, 0, "", 0, "f" * 64, False, "OSError: truncated")
    )
    write_manifest(rows, tmp_path)
    s = dataset_summary(tmp_path, "target", labels_per_class=3)
    assert s["classes"] == ["a", "b"]
    assert s["splits"] == {"train": 6, "val": 3, "test": 3}
    assert s["per_class"] == {"a": {"train": 3, "val": 3}, "b": {"train": 3, "test": 3}}
    assert s["n_images"] == 12 and s["n_unreadable"] == 1
    assert s["channels"] == [1] and s["modes"] == ["L"]
    assert s["width"] == {"min": 8, "median": 8.5, "max": 9}
    assert s["labelled_budget"] == 6 and s["kind"] == "images"


# --------------------------------------------------------------------------- plots


def test_plot_sample_efficiency_writes_a_png(tmp_path: Path):
    curves = {
        "scratch": {1: 0.1, 5: 0.11, 10: 0.16, 50: 0.89},
        "head": {1: 0.3, 5: 0.55, 10: 0.56, 50: 0.74},
        "full": {"1": 0.35, "50": 0.97},
    }
    path = plot_sample_efficiency(
        curves,
        tmp_path / "sub" / "curve.png",
        run_point={"k": 10, "transfer_accuracy": 0.6, "scratch_accuracy": 0.2},
    )
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5000
    empty = plot_sample_efficiency({}, tmp_path / "empty.png")
    assert empty.read_bytes().startswith(PNG_MAGIC)


def test_negative_points_compare_each_k_with_scratch():
    curves = {"scratch": {5: 0.2, 50: 0.89}, "head": {5: 0.5, 50: 0.74}}
    assert negative_points(curves) == ["k=50: head 0.740 < scratch 0.890 (-0.150)"]
    assert negative_points(curves, margin=0.2) == []


# --------------------------------------------------------------------------- the report


def confusion(acc_diag: int) -> dict:
    matrix = (np.eye(10, dtype=int) * acc_diag + 1).tolist()
    return {"matrix": matrix, "classes": DIGITS, "accuracy": acc_diag / (acc_diag + 10)}


def report_data(transfer: float, scratch: float, margin: float = 0.0) -> dict:
    return {
        "title": "Transfer report",
        "run": {"run_id": "0123abcd", "status": "FINISHED", "git_commit": "deadbeef" * 5},
        "summary": {
            "transfer_accuracy": transfer,
            "scratch_accuracy": scratch,
            "gain": transfer - scratch,
            "negative_transfer_margin": margin,
            "strategy": "head",
            "strategy_reason": "10 labels/class <= auto_head_max=10: <train only the head>",
            "labels_per_class": 10,
            "model_name": "digits-transfer",
            "model_version": "3",
            "promoted": transfer > scratch,
        },
        "datasets": {
            "source": summary("source", 8000),
            "target": summary("target", 900, budget=100),
        },
        "sample_efficiency": {
            "curves": {
                "scratch": {1: 0.1, 10: 0.16, 50: 0.89},
                "head": {1: 0.3, 10: 0.56, 50: 0.74},
            },
            "notes": ["k=100 skipped: class '3' holds only 88 training images"],
            "epochs": 3,
        },
        "confusion": {"transfer": confusion(40), "scratch": confusion(20)},
        "source_model": {
            "weights_sha256": "ab" * 32,
            "recorded_weights_sha256": "ab" * 32,
            "origin": "pretrained here (1234)",
            "reused": "False",
            "initial_weights": {"weights": "random", "sha256": "cd" * 32},
            "source_data_version": "ef" * 32,
            "source_test_accuracy": 0.97,
            "arch": "small_cnn",
        },
    }


@pytest.fixture(scope="module")
def negative_report(tmp_path_factory) -> tuple[dict, str]:
    paths = build_report(report_data(0.55, 0.70), tmp_path_factory.mktemp("neg"))
    return paths, paths["html"].read_text(encoding="utf-8")


def test_report_has_every_section_and_the_numbers(negative_report):
    paths, text = negative_report
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in text
    for needle in (
        "0.550",
        "0.700",
        "-0.150",
        "small_cnn",
        "ab" * 32,
        "cd" * 32,
        "ef" * 32,
        "0.970",
        "pretrained here (1234)",
        "source_much_larger",
        "8,000",
        "k=100 skipped",
        "v3 (not promoted)",
        "0123abcd",
    ):
        assert needle in text, needle
    assert text.count('class="badge pass"') == 4 and text.count('class="badge info"') == 1
    # user/recorded text is escaped, never injected
    assert "<train only the head>" not in text and "&lt;train only the head&gt;" in text


def test_report_embeds_its_images_as_base64_png(negative_report):
    paths, text = negative_report
    images = IMG.findall(text)
    assert len(images) == 3  # curve + two confusion matrices
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    assert not re.search(r'src="(?!data:)', text)  # self-contained: no external files
    assert "<link" not in text and "<script" not in text
    for key in ("png", "curve", "confusion_transfer", "confusion_scratch"):
        assert paths[key].read_bytes().startswith(PNG_MAGIC)
    assert json.loads(paths["json"].read_text())["summary"]["strategy"] == "head"


def test_negative_transfer_warning_only_when_gain_below_minus_margin(
    negative_report, tmp_path: Path
):
    _, text = negative_report
    assert 'id="negative-transfer-warning"' in text and "Negative transfer:" in text
    assert "k=50: head 0.740 &lt; scratch 0.890" in text  # per-budget note from the sweep

    positive = build_report(report_data(0.80, 0.60), tmp_path / "pos")["html"].read_text()
    assert 'id="negative-transfer-warning"' not in positive and "Negative transfer" not in positive
    assert "Transfer helped" in positive and "+0.200" in positive

    within = render_html(report_data(0.60, 0.62, margin=0.05), None, {})  # html only: no plots
    assert 'id="negative-transfer-warning"' not in within
    assert 'id="negative-transfer-warning"' in render_html(
        report_data(0.60, 0.62, margin=0.01), None, {}
    )
    assert negative_transfer({"gain": -0.03, "negative_transfer_margin": 0.02})
    assert negative_transfer({"transfer_accuracy": 0.5}) is None


def test_report_from_almost_nothing_still_renders(tmp_path: Path):
    paths = build_report(
        {"summary": {"transfer_accuracy": 0.9}, "notes": ["no summary.json"]}, tmp_path
    )
    text = paths["html"].read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in text
    assert "not available" in text and "No scratch baseline" in text and "no summary.json" in text
    assert IMG.findall(text) == []
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)


def test_provenance_mismatch_and_external_origin_are_flagged():
    data = report_data(0.8, 0.6)
    data["source_model"] |= {"recorded_weights_sha256": "00" * 32, "origin": "models:/imagenet/1"}
    text = render_html(data, None, {})
    assert "Provenance mismatch" in text and "Audit where" in text


# --------------------------------------------------------------------------- the sweep


@pytest.fixture
def tiny_target(tmp_path: Path) -> tuple[Params, Path]:
    """4 classes x 14 stripe images (12 px) prepared as the target; a random tiny_cnn source."""
    clear_memory_cache()
    root = tmp_path / "in"
    rng = np.random.default_rng(0)
    for k in range(4):
        for i in range(14):
            image = rng.integers(0, 60, (12, 12)).astype(np.uint8)
            image[:, 3 * k : 3 * k + 2] = 200
            (root / str(k)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, "L").save(root / str(k) / f"{i:02d}.png")
    params = Params.model_validate(
        {
            "data": {
                "root": str(tmp_path / "data"),
                "image_size": 12,
                "target": {"kind": "imagefolder", "path": str(root), "test_size": 0.25},
            },
            "pretrain": {"arch": "tiny_cnn"},
            "finetune": {"epochs": 2, "batch_size": 8, "augment": False},
            "runtime": {"device": "cpu"},
        }
    )
    prepare_target(params.data, progress=False)
    source = create_model("tiny_cnn", 4)
    source_dir = save_model_dir(
        source,
        tmp_path / "source_model",
        {"image_size": 12, "channels": 1, "classes": ["0", "1", "2", "3"]},
    )
    yield params, source_dir
    clear_memory_cache()


def test_sample_efficiency_sweeps_k_per_strategy_and_caches(tiny_target, tmp_path: Path):
    params, source_dir = tiny_target
    torch.set_num_threads(1)
    work = tmp_path / "sweep"
    curves = sample_efficiency(params, source_dir, [4, 1, 50], ["head"], work, False, epochs=1)
    assert isinstance(curves, Curves) and isinstance(curves, dict)
    assert list(curves) == ["scratch", "head"]
    assert set(curves["scratch"]) == set(curves["head"]) == {1, 4}
    assert any("k=50 skipped" in n for n in curves.notes)
    assert params.finetune.labels_per_class == 5 and params.finetune.epochs == 2  # not mutated (default k)
    results = [json.loads(r.read_text()) for r in sorted(work.glob("*/result.json"))]
    assert len(results) == 4 and {r["epochs"] for r in results} == {1}
    # each point is its stored result (one seed: the mean is that seed), a count over the test split
    assert {(r["strategy"], r["k"]): r["accuracy"] for r in results} == {
        (name, k): acc for name, c in curves.items() for k, acc in c.items()}
    n_test = len(stages.target_splits(params)["test"])
    assert all(acc * n_test == pytest.approx(round(acc * n_test)) for c in curves.values() for acc in c.values())
    assert not list(work.glob("*/model"))  # models removed unless keep_models
    again = sample_efficiency(params, source_dir, [1, 4], ["head"], work, False, epochs=1)
    assert dict(again) == dict(curves) and all(p["cached"] for p in again.points)


def test_sample_efficiency_rejects_unknown_strategies(tiny_target, tmp_path: Path):
    params, source_dir = tiny_target
    with pytest.raises(TransferError, match="unknown strategies"):
        sample_efficiency(params, source_dir, [1], ["bogus"], tmp_path / "w")


def test_sweep_over_seeds_has_floors_and_the_report_states_labels_saved(tiny_target, tmp_path: Path):
    from transfer.report import efficiency_analysis

    params, source_dir = tiny_target
    torch.set_num_threads(1)
    curves = sample_efficiency(params, source_dir, [1, 4], ["head"], tmp_path / "sweep", False,
                               epochs=1, seeds=[0, 1])
    assert curves.seed_list == [0, 1] and len(curves.points) == 8  # 2 names x 2 k x 2 seeds
    assert curves["head"][4] == pytest.approx(np.mean(curves.seeds["head"][4]))
    assert all(len(curves.val[n][k]) == 2 for n in curves for k in (1, 4))
    assert set(curves.floors) == {"logreg", "svc_rbf", "label_spreading"}
    assert all(len(curves.floors[f][k]) == 2 for f in curves.floors for k in (1, 4))
    assert curves.floors["svc_rbf"][4] != [0.25, 0.25]  # stripes are easy on raw pixels: it learns

    analysis = efficiency_analysis(curves.seeds, curves.val, curves.floors, default_k=4)
    data = report_data(0.8, 0.6)
    data["sample_efficiency"] = {"curves": dict(curves), "analysis": analysis, "epochs": 1}
    paths = build_report(data, tmp_path / "report")
    text = paths["html"].read_text()
    assert "Labels saved" in text and analysis["labels_saved"]["text"].split(":")[0] in html_unescape(text)
    assert "Significance of the gain" in text and "paired t-test across 2 seeds" in text
    assert "floor: label_spreading" in text and "classical floors" in text
    assert paths["curve"].read_bytes().startswith(PNG_MAGIC)


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)
