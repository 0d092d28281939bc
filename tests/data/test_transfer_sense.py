"""The transfer-sense checks run in the validate stage, before any training, and are shown
in the validation report, the CLI output and the flow's log; with
``validate.require_transfer_sense`` a check that does not pass stops the run.

Scenario of the issue: a grey digit source for an RGB shapes target.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect import flow

from tasks.validate import DataValidationError
from tasks.validate_gate import validate_data
from tests.data.test_validation import make_dataset, params
from transfer.config import Params

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grey_to_rgb(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sense") / "data"
    make_dataset(root, "source", classes=tuple("0123456789"),
                 splits={"train": 40, "val": 5, "test": 5}, mode="L")
    make_dataset(root, "target", classes=("circle", "square", "triangle"), mode="RGB")
    return root


def strict(root: Path) -> Params:
    p = params(root)
    p.validate_ = p.validate_.model_copy(update={"require_transfer_sense": True})
    return p


def test_report_explains_why_transfer_may_not_help(grey_to_rgb: Path, tmp_path: Path):
    report = validate_data.fn(params(grey_to_rgb), tmp_path)
    assert report.passed  # by default the checks inform, they do not stop
    levels = {c["check"]: c["level"] for c in report.sense}
    assert levels["compatible_channels"] == "warn"
    assert levels["same_input_kind"] == levels["source_much_larger"] == "pass"
    markdown = (tmp_path / "validation_report.md").read_text()
    assert "## Does transfer make sense?" in markdown
    assert "| WARN | compatible_channels | source channels [1] (grey)" in markdown
    assert "0 of 3 target classes" in markdown
    data = json.loads((tmp_path / "validation_report.json").read_text())
    assert [c["check"] for c in data["transfer_sense"]] == list(levels)
    assert "Does transfer make sense?" in (tmp_path / "validation_report.html").read_text()


def test_require_transfer_sense_stops_the_run_and_says_why(grey_to_rgb: Path, tmp_path: Path):
    with pytest.raises(DataValidationError) as info:
        validate_data.fn(strict(grey_to_rgb), tmp_path)
    (failure,) = info.value.report.failures()
    assert failure.column == "compatible_channels"
    assert "compatible_channels" in str(info.value) and "(grey)" in str(info.value)


def _image_tree(root: Path, classes: tuple[str, ...], per_class: int, mode: str) -> Path:
    """Real (decodable) images: the CLI prepares the data the params name before validating."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            shape = (8, 8) if mode == "L" else (8, 8, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / label / f"{i}.png")
    return root


@pytest.mark.slow  # a real CLI run / Prefect flow: minutes on 2 cores
def test_cli_prints_the_checks_before_stopping(grey_to_rgb: Path, tmp_path: Path):
    params_file = tmp_path / "params.yaml"
    dump = strict(grey_to_rgb).dump()
    dump["data"]["root"] = str(tmp_path / "data")
    trees = {"source": _image_tree(tmp_path / "in" / "source", tuple("0123456789"), 50, "L"),
             "target": _image_tree(tmp_path / "in" / "target", ("circle", "square", "triangle"), 16, "RGB")}
    for name, tree in trees.items():
        dump["data"][name].update(kind="imagefolder", path=str(tree))
    dump["data"]["target"]["test_size"] = 0.3
    params_file.write_text(yaml.safe_dump(dump, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["transfer", "validate", "--params", str(params_file), "--report-dir",
         str(tmp_path / "report")],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Does transfer make sense?" in proc.stdout
    assert "WARN compatible_channels: source channels [1] (grey)" in proc.stdout
    assert "INFO class_overlap: 0 of 3 target classes" in proc.stdout
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]  # + the "preparing" note
    assert line.startswith("error: Data validation failed") and "compatible_channels" in line
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a real CLI run / Prefect flow: minutes on 2 cores
def test_flow_log_shows_the_checks(grey_to_rgb: Path, tmp_path: Path, prefect_harness, caplog):
    @flow(name="sense-log")
    def validate_flow(p: Params, out: str) -> bool:
        return validate_data(p, out).passed

    with caplog.at_level(logging.INFO, logger="prefect.task_runs"):
        assert validate_flow(params(grey_to_rgb), str(tmp_path))
    # the task-run logger: what Prefect ships to the flow run's log in the UI
    run_log = [r.getMessage() for r in caplog.records if r.name == "prefect.task_runs"]
    warn = "WARN compatible_channels: source channels [1] (grey)"
    assert any(m.startswith(warn) for m in run_log)
    assert any(m.startswith("PASS source_much_larger: 400 source") for m in run_log)
