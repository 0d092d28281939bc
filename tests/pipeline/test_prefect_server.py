"""Against a real Prefect server: `prefect server start` on loopback, a process work pool,
a `prefect worker start` subprocess, and the per-stage deployments chained with
``run_deployment`` (the way docs/scheduling.md runs them, minus Docker)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
NAME = "digits-transfer"
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _stop(proc: subprocess.Popen) -> None:
    """Stop a subprocess we started and everything it spawned (its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real Prefect server on a free loopback port; yields the env for its clients."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--analytics-off"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(env["PREFECT_API_URL"]):
            if server.poll() is not None:
                pytest.fail(f"prefect server exited {server.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.skip(f"prefect server not healthy within {START_TIMEOUT_S} s:\n{_tail(log, 1500)}")
            time.sleep(1)
        yield env
    finally:
        _stop(server)


def test_chained_stage_deployments_on_a_process_worker(
    dvc_repo: Path, prefect_server: dict[str, str], tmp_path: Path
) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import (
        PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings,
    )

    from flows.chained import CHAINED, deploy_stages

    env = prefect_server
    # The worker runs each flow from the project dir (the deployment's source); with no
    # shared disk assumed, the stages hand models over through MLflow only.
    shutil.copytree(REPO / "flows", dvc_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", "test-pool", "--type", "process"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as out:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "test-pool", "--type", "process",
             "--name", "test-worker"],
            cwd=dvc_repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        with temporary_settings(updates={
            PREFECT_API_URL: env["PREFECT_API_URL"],
            PREFECT_RESULTS_LOCAL_STORAGE_PATH: env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"],
        }):
            ids = deploy_stages("test-pool", source=dvc_repo)
            assert set(ids) == {"pretrain", "finetune", "evaluate", "chained-pipeline"}
            flow_run = run_deployment(
                CHAINED, parameters={"params_file": str(dvc_repo / "params.yaml")}, timeout=540,
                poll_interval=2,
            )
            assert flow_run.state is not None and flow_run.state.is_completed(), (
                f"{flow_run.state}\n--- worker log ---\n{_tail(worker_log)}"
            )
            decision = flow_run.state.result()
            stage_runs = _stage_run_states()
    finally:
        _stop(worker)

    assert decision["promoted"], decision
    for key in ("source_model_uri", "transfer_model_uri", "scratch_model_uri"):
        assert decision[key].startswith("runs:/"), decision
    client = MlflowClient()
    assert client.get_registered_model(NAME).aliases["champion"] == decision["version"]
    # Each stage ran as its own flow run of its own deployment (a subflow of the chain).
    assert stage_runs == {stage: ["COMPLETED"] for stage in ("pretrain", "finetune", "evaluate")}


def _stage_run_states() -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    states = {}
    with get_client(sync_client=True) as client:
        for stage in ("pretrain", "finetune", "evaluate"):
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[stage]))
            )
            states[stage] = [run.state.type.value for run in runs]
    return states
