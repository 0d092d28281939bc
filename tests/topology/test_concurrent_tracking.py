"""Runs that log the same dataset at the same moment on one tracking server (two machines
running the pipeline on the same data) all get it: MLflow's store inserts a new dataset with
check-then-insert, and the loser of that race must not fail its pipeline run."""

from __future__ import annotations

import secrets
import threading

import pytest
from mlflow.tracking import MlflowClient

from tasks.adapters import tracking
from tasks.pipeline_run import dataset_input
from tests.topology.servers import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.server]

RUNS = 8


def test_runs_logging_one_new_dataset_at_once_all_link_to_it(
    mlflow_pg: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in mlflow_pg.client_env(mlflow_pg.pipeline).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(mlflow_pg.url, mlflow_pg.url)
    experiment = client.create_experiment(f"concurrent-inputs-{secrets.token_hex(4)}")
    run_ids = [client.create_run(experiment).info.run_id for _ in range(RUNS)]
    digest = secrets.token_hex(16)  # a dataset no run has logged yet: every run tries to insert it
    dataset = dataset_input("target", {"dir": "data/target", "version": digest}, "shared")
    barrier = threading.Barrier(RUNS)
    errors: list[BaseException] = []

    def log(run_id: str) -> None:
        barrier.wait()
        try:
            tracking.log_inputs(client, run_id, [dataset])
        except BaseException as error:  # collected: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert not errors, errors
    for run_id in run_ids:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("target-shared", digest)], run_id
