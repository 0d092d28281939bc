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


def test_promotion_lock_lives_with_the_store_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.promote import _file_lock

    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    params = params_from_dict({})
    locks = []
    for cwd in ("a", "b"):  # two runs started from different directories
        (tmp_path / cwd).mkdir()
        monkeypatch.chdir(tmp_path / cwd)
        locks.append(_file_lock(params))
    assert locks[0].lock_file == locks[1].lock_file == str(store / ".promote-digits-transfer.lock")
    with locks[0]:
        with pytest.raises(TimeoutError):  # filelock.Timeout is a TimeoutError
            locks[1].acquire(timeout=0.2)


def test_promotion_without_a_prefect_api_is_serialised_by_the_file_lock_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`transfer run` with Prefect's temporary API (no PREFECT_API_URL): no other machine
    shares that API, so no server-side limit is asked for (tests/topology covers that one)."""
    from filelock import FileLock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.promote import _lock

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with temporary_settings(restore_defaults={PREFECT_API_URL}), _lock(params_from_dict({})) as held:
        assert held == "file lock"
        with pytest.raises(TimeoutError):
            FileLock(str(tmp_path / ".promote-digits-transfer.lock")).acquire(timeout=0.2)
