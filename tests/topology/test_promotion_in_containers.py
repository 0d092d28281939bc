"""Promotion across machines, in containers: two `transfer run`s, each in its own container of
the project image with its own bind-mounted workspace, race against the same authenticated
servers (MLflow on PostgreSQL with proxied artifacts, Prefect on PostgreSQL). Nothing is shared
but the servers, so only the Prefect server's global concurrency limit can serialise their
promotions: distinct versions, one chain of champion moves, no lost alias.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import write_yaml
from tests.container.conftest import docker, engine, image, run_args, workspace  # noqa: F401 (fixtures)
from tests.topology.servers import (
    RUN_TIMEOUT_S, TOPOLOGY_PARAMS, MlflowServer, PrefectServer, check_serialised_promotions, decision_of,
)
from tasks.promote import concurrency_limit_name

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.container]
MODEL = "digits-containers"  # not the host two-machine test's model: each test checks its own chain
EXPERIMENT = "containers-two-machines"


def _params() -> dict:
    return {**TOPOLOGY_PARAMS, "promote": {**TOPOLOGY_PARAMS["promote"], "model_name": MODEL},
            "runtime": {**TOPOLOGY_PARAMS["runtime"], "experiment": EXPERIMENT}}


def _start(image: str, ws: Path, env: dict[str, str], cidfile: Path) -> subprocess.Popen:
    log = (ws.parent / f"{ws.name}.log").open("w")
    return subprocess.Popen(["docker", "run", "--rm", "--cidfile", str(cidfile), *run_args(ws, env), image,
                             "run", "--params", "params.yaml"], stdout=log, stderr=subprocess.STDOUT)


def test_two_containers_promote_one_at_a_time(
    image: str, mlflow_pg: MlflowServer, prefect_pg: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**mlflow_pg.client_env(mlflow_pg.pipeline), **prefect_pg.client_env()}
    workspaces = [workspace(tmp_path / name) for name in ("machine-a", "machine-b")]
    for ws in workspaces:
        write_yaml(ws / "params.yaml", _params())
    procs = [_start(image, ws, env, tmp_path / f"{ws.name}.cid") for ws in workspaces]  # at once
    for ws, proc in zip(workspaces, procs, strict=True):
        try:
            proc.wait(RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                docker("rm", "-f", (tmp_path / f"{ws.name}.cid").read_text().strip(), check=False)
        out = (ws.parent / f"{ws.name}.log").read_text(errors="replace")
        assert proc.returncode == 0, f"container run on {ws.name} exited {proc.returncode}:\n{out[-4000:]}"
    cids = {(tmp_path / f"{ws.name}.cid").read_text().strip() for ws in workspaces}
    assert len(cids) == 2, cids

    for key, value in mlflow_pg.client_env(mlflow_pg.pipeline).items():
        monkeypatch.setenv(key, value)  # the credentials; the client itself gets the URL explicitly
    client = MlflowClient(mlflow_pg.url, mlflow_pg.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'pipeline'")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents), parents
    decisions = [decision_of(client, r.info.run_id) for r in parents]
    check_serialised_promotions(client, decisions, MODEL)
    assert sum(d["promoted"] for d in decisions) >= 1, decisions
    assert all(d["serialised_by"].startswith(f"prefect concurrency limit {concurrency_limit_name(MODEL)}")
               for d in decisions), decisions
    # the containers wrote no MLflow store of their own: everything went to the server
    stores = [p for ws in workspaces for p in ws.rglob("mlflow.db")]
    assert not stores, stores
