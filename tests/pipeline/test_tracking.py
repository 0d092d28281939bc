"""Where the MLflow store puts artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.adapters import tracking
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


def _store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    params = params_from_dict({"runtime": {"experiment": "run-lifecycle"}})
    return tracking.configure(params), params


@pytest.mark.parametrize("error", [ValueError("bad"), KeyboardInterrupt()])
def test_a_tracked_run_that_raises_is_failed_not_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    client, params = _store(tmp_path, monkeypatch)
    with pytest.raises(type(error)):
        with tracking.tracked_run(client, params, "doomed", tags={"stage": "x"}) as run_id:
            raise error
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["stage"] == "x"


def test_a_tracked_run_nests_under_its_parent_and_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, params = _store(tmp_path, monkeypatch)
    with tracking.tracked_run(client, params, "parent") as parent:
        with tracking.tracked_run(client, params, "child", parent) as child:
            assert client.get_run(child).info.status == "RUNNING"
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert {client.get_run(r).info.status for r in (parent, child)} == {"FINISHED"}


def _published_model(tmp_path: Path, client: object, params: object) -> str:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    with tracking.tracked_run(client, params, "publish") as run_id:
        client.log_artifacts(run_id, str(model), "model_dir")
    return f"runs:/{run_id}/model_dir"


def test_a_downloaded_model_folder_is_removed_after_the_block_also_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, params = _store(tmp_path, monkeypatch)
    uri = _published_model(tmp_path, client, params)
    with tracking.downloaded(uri) as model_dir:
        assert (model_dir / "model.json").exists()
    assert not model_dir.exists()
    with pytest.raises(RuntimeError):
        with tracking.downloaded(uri, model_dir=False) as root:
            assert (root / "model.json").exists()
            raise RuntimeError("the caller failed")
    assert not root.exists()


def test_a_download_without_a_transfer_model_is_one_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transfer.errors import TransferError

    client, params = _store(tmp_path, monkeypatch)
    with tracking.tracked_run(client, params, "empty") as run_id:
        tracking.log_json(client, run_id, {"a": 1}, "other/a.json")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    with pytest.raises(TransferError, match="holds no transfer model"):
        with tracking.downloaded(f"runs:/{run_id}/other"):
            pass
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow  # a second interpreter importing MLflow
def test_a_kept_download_lives_until_its_process_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    client, params = _store(tmp_path, monkeypatch)
    uri = _published_model(tmp_path, client, params)
    script = (
        "import sys; from tasks.adapters import tracking; from transfer.config import params_from_dict\n"
        "tracking.configure(params_from_dict({'runtime': {'experiment': 'run-lifecycle'}}))\n"
        f"path = tracking.kept_download({uri!r}); print(path, (path / 'model.json').exists())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    path, existed = out.stdout.split()
    assert existed == "True"
    assert not Path(path).exists()


# the fast set keeps one Prefect flow (the harness start is the cost); Ctrl-C runs in the full suite
@pytest.mark.parametrize("error", [ValueError("bad input"), pytest.param(KeyboardInterrupt(), marks=pytest.mark.slow)])
def test_a_flow_body_that_raises_fails_its_parent_run_with_the_error(
    prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    from prefect import flow

    from tasks.pipeline_run import failing_pipeline_run, start_pipeline_run

    client, params = _store(tmp_path, monkeypatch)
    started: list[str] = []

    @flow
    def doomed() -> None:
        run_id = start_pipeline_run(params, "doomed")
        started.append(run_id)
        with failing_pipeline_run(params, run_id):
            raise error

    with pytest.raises(type(error)):
        doomed()
    run = client.get_run(started[0])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith(type(error).__name__)


def test_log_batch_splits_at_mlflows_limits_and_keeps_every_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call for a run's outcome; over MLflow's per-call limits it splits, losing nothing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = params_from_dict({"runtime": {"experiment": "batches"}})
    client = tracking.configure(params)
    with tracking.tracked_run(client, params, "batch") as run_id:
        history = [{"epoch": e, "train_loss": 1.0 / e, "val_acc": e / 300, "lr": None} for e in range(1, 301)]
        tracking.log_batch(
            client, run_id, history=history, params={"p": {str(i): i for i in range(150)}},
            metrics={"val_accuracy": 0.5, "missing": None}, tags={f"t{i}": i for i in range(120)} | {"none": None},
        )
    run = client.get_run(run_id)
    assert len(run.data.params) == 150 and run.data.params["p.149"] == "149"
    assert {f"t{i}" for i in range(120)} <= set(run.data.tags) and "none" not in run.data.tags
    assert run.data.metrics["val_accuracy"] == 0.5 and "missing" not in run.data.metrics
    curve = client.get_metric_history(run_id, "val_acc")
    assert sorted(m.step for m in curve) == list(range(1, 301)) and "lr" not in run.data.metrics


def test_log_inputs_does_not_retry_an_error_that_is_not_a_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a unique-key collision (another run inserting the same dataset) is retried: an
    input the store refuses fails at once, on the first call."""
    from mlflow.exceptions import MlflowException

    from tasks.pipeline_run import dataset_input

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = params_from_dict({"runtime": {"experiment": "inputs"}})
    client = tracking.configure(params)
    with tracking.tracked_run(client, params, "inputs") as run_id:
        dataset = dataset_input("target", {"dir": str(tmp_path), "version": "d" * 32}, "digits")
        tracking.log_inputs(client, run_id, [dataset])
        tracking.log_inputs(client, run_id, [dataset])  # again: the dataset exists, the link is kept once
    assert [d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs] == ["d" * 32]
    calls = []
    monkeypatch.setattr(client, "log_inputs", lambda *a, **k: calls.append(1) or client.get_run("no-such-run"))
    with pytest.raises(MlflowException):
        tracking.log_inputs(client, run_id, [dataset])
    assert len(calls) == 1
