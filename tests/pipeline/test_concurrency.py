"""Two runs at once on one workspace and one MLflow store (real DVC, real sqlite store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _start_both(code: str, cwd: Path) -> list[dict]:
    """Run ``code`` in two Python processes at once; each prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_runs_version_the_data_at_once(dvc_repo: Path) -> None:
    """The second `dvc repro prepare` waits for the first (DVC alone fails it as "busy")."""
    code = (
        "import json; from tasks.data import version_data; from transfer.config import load_params\n"
        "print(json.dumps(version_data(load_params('params.yaml'))))"
    )
    first, second = _start_both(code, dvc_repo)
    assert first == second and first["dvc"]
    assert first["target"]["dvc_md5"] and first["source"]["version"]


def test_two_runs_open_a_new_mlflow_store_at_once(tmp_path: Path) -> None:
    """Both create the same new sqlite store: one creates the schema, the other waits."""
    db = tmp_path / "store" / "mlflow.db"
    code = (
        "import json, os; from tasks.adapters import tracking; from transfer.config import params_from_dict\n"
        f"os.environ['MLFLOW_TRACKING_URI'] = 'sqlite:///{db}'\n"
        "client = tracking.configure(params_from_dict({}))\n"
        "print(json.dumps(tracking.experiment_id(client, params_from_dict({}))))"
    )
    first, second = _start_both(code, tmp_path)
    assert first == second  # one experiment, created once
