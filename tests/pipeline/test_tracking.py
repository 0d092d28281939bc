"""Where the MLflow store puts artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks import tracking
from transfer.config import params_from_dict


def test_sqlite_store_keeps_artifacts_beside_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the first run starts far from the database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    params = params_from_dict({"runtime": {"experiment": "where-artifacts-go"}})
    client = tracking.configure(params)
    experiment = client.get_experiment_by_name("where-artifacts-go")
    assert experiment.artifact_location == (store / "artifacts").as_uri()
    assert not (elsewhere / "mlruns").exists()


def test_default_store_is_mlruns_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = params_from_dict({})
    uri = tracking.tracking_uri(params)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    assert tracking.artifact_root(uri) == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()
