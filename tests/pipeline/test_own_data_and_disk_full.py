"""The user's own ImageFolder through the whole `transfer run`, and a disk that fills up
during training: the real CLI in a subprocess, real Prefect, MLflow, torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY_PARAMS, small_tmpfs
from tests.pipeline.test_cli_errors import _cli, _one_error_line, _project, _runs, _shapes

pytestmark = pytest.mark.slow


def test_own_imagefolder_with_default_params_runs_and_registers_under_its_name(tmp_path: Path) -> None:
    """The shipped params.yaml plus only kind and path; the source, epochs and seeds are
    shrunk to keep the test short (they are not what is tested). A model version is
    registered whatever the promotion gates decide (they only move the champion alias),
    so the gates keep their shipped values: this test is about naming and registration."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    shapes = _shapes(tmp_path / "shapes", per_class=36)
    proc = _cli(["run", "--set", "data.target.kind=imagefolder", "--set", f"data.target.path={shapes}",
                 "--set", "data.source.n=1000", "--set", "pretrain.epochs=2", "--set", "finetune.epochs=6",
                 "--set", "finetune.seeds=2"], project, COLUMNS="200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = dict(re.findall(r"^│ (\w+) +│ (\S+)", proc.stdout, re.MULTILINE))  # the summary table
    assert summary["model_name"] == "shapes-transfer", proc.stdout
    assert summary["model_version"] == "1", proc.stdout

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    assert [m.name for m in client.search_registered_models()] == ["shapes-transfer"]
    version = client.get_model_version("shapes-transfer", "1")
    assert version.tags["data.target.version"]  # the user's data, versioned
    assert client.search_model_versions("name='digits-transfer'") == []


def test_disk_full_during_training_is_one_line_not_retried_and_leaves_no_temp(tmp_path: Path) -> None:
    """runtime.artifacts_dir on a 1 MB filesystem: the first pretraining checkpoint (the
    small CNN and its AdamW state, ~2 MB) does not fit."""
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "1m") as mounted:
        if not mounted:  # tests/unit/test_disk_full.py covers this with a failing writer
            pytest.skip("mounting a size-limited tmpfs is not allowed here (needs root)")
        params = {**TINY_PARAMS, "runtime": {**TINY_PARAMS["runtime"], "artifacts_dir": str(disk)}}
        project = _project(tmp_path / "p", params)
        proc = _cli(["run"], project)
        line = _one_error_line(proc)
        assert line.startswith(f"error: no space left on {disk}/"), line
        assert line.endswith("MB): free space or point runtime.artifacts_dir elsewhere"), line
        assert "/checkpoints (need about " in line, line
        assert "Retry" not in proc.stderr  # a retry logs "Retry 1/2 will start"
        left = [p.name for p in disk.rglob("*") if ".tmp" in p.name]
        assert left == [], left  # no partial last.tmp filling the disk
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    pretrain = _runs(client, "tags.stage = 'pretrain'")
    assert len(pretrain) == 1 and pretrain[0].info.status == "FAILED"  # attempted once
    assert client.search_registered_models() == []
