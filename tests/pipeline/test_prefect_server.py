"""Against a real Prefect server: `prefect server start` on loopback, a process work pool,
a worker, and a deployment of the retrain flow run through it."""

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

from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.skip(f"prefect server did not answer within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def prefect_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_healthy(env["PREFECT_API_URL"], server)
        for key in ("PREFECT_HOME", "PREFECT_API_URL"):
            monkeypatch.setenv(key, env[key])
        yield env
    finally:
        _stop(server)


def test_deployment_runs_on_a_process_worker(prefect_server: dict[str, str], dvc_repo: Path) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    shutil.copytree(REPO / "flows", dvc_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**prefect_server, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "test-pool", "--type", "process"],
                   env=env, check=True, capture_output=True, timeout=120)
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        from flows.retrain import retrain_flow

        retrain_flow.from_source(source=str(dvc_repo), entrypoint="flows/retrain.py:retrain_flow").deploy(
            name="retrain-test", work_pool_name="test-pool", print_next_steps=False,
        )
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "test-pool", "--limit", "1"],
            env=env, cwd=dvc_repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            flow_run = run_deployment("retrain/retrain-test", parameters={"force": True}, timeout=600)
        finally:
            _stop(worker)
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
