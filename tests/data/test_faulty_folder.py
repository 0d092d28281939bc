"""A user's ImageFolder with four faults gets one validation report naming all four.

The faults: an empty class folder, a truncated JPEG, a text file named ``.png`` and the
same image bytes in two classes. ``transfer data prepare --record-bad`` records them
(it does not stop on the empty class), ``transfer validate`` names every one with its
path in one report and one error line, and nothing is trained.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_yaml

BIN = Path(sys.executable).parent
FAULTS = {  # what the report must name: path -> words of its finding
    "triangle/": "class folder holds no files",
    "circle/broken.jpg": "OSError: Truncated File Read",
    "square/notes.png": "cannot identify image file",
    "square/copy.png": "same bytes as circle/000.png",
}


def _png(path: Path, seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (16, 16, 3) if mode == "RGB" else (16, 16)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def faulty_folder(root: Path) -> Path:
    for c, label in enumerate(("circle", "square")):
        for i in range(8):
            _png(root / label / f"{i:03d}.png", 100 * c + i)
    (root / "triangle").mkdir()  # fault 1: an empty class
    jpeg = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(jpeg, "JPEG")
    (root / "circle" / "broken.jpg").write_bytes(jpeg.getvalue()[:-200])  # 2: truncated
    (root / "square" / "notes.png").write_text("not an image, just text\n")  # 3: text as .png
    (root / "square" / "copy.png").write_bytes((root / "circle" / "000.png").read_bytes())  # 4
    return root


def source_folder(root: Path) -> Path:
    for c, label in enumerate(("a", "b")):
        for i in range(20):
            _png(root / label / f"{i:03d}.png", 1000 + 100 * c + i, mode="L")
    return root


def transfer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["transfer", *args], cwd=cwd, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("faulty")
    params = {
        "data": {
            "image_size": 16,
            "source": {"kind": "imagefolder", "path": str(source_folder(work / "src"))},
            "target": {"kind": "imagefolder", "path": str(faulty_folder(work / "user")),
                       "test_size": 0.25},
        },
        "validate": {"min_per_class": 1},
        "finetune": {"labels_per_class": 1},
        "runtime": {"device": "cpu"},
    }
    write_yaml(work / "params.yaml", params)
    prepared = transfer("data", "prepare", "--record-bad", cwd=work)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    return work, transfer("validate", "--report-dir", "reports/validation", cwd=work)


def test_prepare_records_the_empty_class_instead_of_stopping(validated):
    work, _ = validated
    target = work / "data" / "target"
    # kept as a class without images (a hidden marker survives a DVC checkout)
    assert [p.name for p in (target / "triangle").iterdir()] == [".empty-class"]
    manifest = (target / "manifest.csv").read_text()
    assert "circle/broken.jpg" in manifest and "square/notes.png" in manifest


def test_one_report_names_all_four_faults_with_paths(validated):
    work, proc = validated
    assert proc.returncode == 2, proc.stdout + proc.stderr
    report = json.loads((work / "reports" / "validation" / "validation_report.json").read_text())
    assert report["passed"] is False
    rows = [r for o in report["outcomes"] if not o["success"] and o["severity"] == "error"
            for r in o["failing_rows"]]
    for path, words in FAULTS.items():
        assert any(r.startswith(path) and words in r for r in rows), (path, rows)
    markdown = (work / "reports" / "validation" / "validation_report.md").read_text()
    for path in FAULTS:
        assert f"`{path}" in markdown


def test_the_error_is_one_line_naming_every_fault_and_nothing_is_trained(validated):
    work, proc = validated
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("error: Data validation failed") and "nothing was trained" in line
    for path in FAULTS:
        assert path in line, path
    assert "Traceback" not in proc.stderr
    assert not (work / "models").exists() and not (work / "checkpoints").exists()


@pytest.mark.slow
def test_the_flow_stops_at_validation_naming_every_fault(
    dvc_repo: Path, tmp_path: Path, prefect_harness
) -> None:
    """Same folder through the flow (``dvc repro prepare`` = ``prepare --record-bad``)."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import transfer_pipeline
    from tasks.validate import DataValidationError
    from tests.conftest import TINY_PARAMS

    data = {
        **TINY_PARAMS["data"],
        "source": {"kind": "imagefolder", "path": str(source_folder(tmp_path / "src"))},
        "target": {"kind": "imagefolder", "path": str(faulty_folder(tmp_path / "user")),
                   "test_size": 0.25},
    }
    write_yaml(dvc_repo / "params.yaml", {**TINY_PARAMS, "data": data,
                                          "finetune": {**TINY_PARAMS["finetune"],
                                                       "labels_per_class": 1}})
    with pytest.raises(DataValidationError) as error:
        transfer_pipeline(params_file="params.yaml")
    for path in FAULTS:
        assert path in str(error.value), path
    client = MlflowClient()
    experiment = client.get_experiment_by_name("transfer-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags.get("stage") for r in runs] == ["pipeline"]  # no training child run
    assert runs[0].info.status == "FAILED"
    assert not (dvc_repo / "models").exists()
