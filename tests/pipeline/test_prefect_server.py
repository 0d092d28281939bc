"""Against a real Prefect server, as docs/scheduling.md runs it (minus Docker):
`prefect server start` on loopback, a process work pool and `prefect worker start`, the
per-stage deployments chained with ``run_deployment``, then `transfer schedule` (flow.serve)
serving the retrain flow, whose deployment run finds the data unchanged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
NAME = "digits-transfer"
START_TIMEOUT_S = 120
STAGES = ("pretrain", "finetune", "evaluate")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _start(cmd: list[str], log: Path, **kwargs: Any) -> subprocess.Popen:
    """A subprocess in its own process group (so _stop also ends what it spawns)."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a subprocess this test started, and its children (its own process group)."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
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
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # one result store for the worker's flow runs and this process (run_deployment results)
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tmp_path / "server.log"
    server = _start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        log, env=env,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(env["PREFECT_API_URL"]):
            if server.poll() is not None:
                pytest.fail(f"prefect server exited {server.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                # a server that never gets healthy is a regression to see, not a reason to skip
                pytest.fail(f"prefect server not healthy within {START_TIMEOUT_S} s:\n{_tail(log, 1500)}")
            time.sleep(1)
        yield env
    finally:
        _stop(server)


def _client_settings(env: dict[str, str]) -> Any:
    """Point this process's Prefect client at the server (over any session test harness)."""
    from prefect.settings import (
        PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings,
    )

    return temporary_settings(updates={
        PREFECT_API_URL: env["PREFECT_API_URL"],
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"],
    })


def _completed(flow_run: Any, log: Path) -> Any:
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"{flow_run.name}: {flow_run.state}\n--- log ---\n{_tail(log)}"
    )
    return flow_run.state.result()


def _runs_by_deployment(names: tuple[str, ...]) -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return {
            name: [run.state.type.value for run in client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))]
            for name in names
        }


def _wait_for_deployment(name: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> Any:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                assert proc.poll() is None, f"`transfer schedule` exited {proc.returncode}:\n{_tail(log)}"
                assert time.monotonic() < deadline, f"{name} never registered:\n{_tail(log)}"
                time.sleep(2)


def test_stage_deployments_on_a_worker_and_the_served_retrain_schedule(
    dvc_repo: Path, prefect_server: dict[str, str], tmp_path: Path
) -> None:
    from prefect.deployments import run_deployment

    from flows.chained import CHAINED, deploy_stages

    env = prefect_server
    # The worker runs each flow from the deployment's source dir (its working directory),
    # which holds flows/ already (dvc_repo copies it).
    assert (dvc_repo / "flows" / "chained.py").exists()
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "test-pool", "--type", "process"],
                   env=env, check=True, capture_output=True, timeout=120)
    worker_log, schedule_log = tmp_path / "worker.log", tmp_path / "schedule.log"
    worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", "test-pool", "--type", "process"],
                    worker_log, cwd=dvc_repo, env=env)
    served = None
    try:
        with _client_settings(env):
            # 1. pretrain -> finetune -> evaluate, one deployment (flow run, process) each.
            ids = deploy_stages("test-pool", source=dvc_repo)
            assert set(ids) == {*STAGES, "chained-pipeline"}
            chained = run_deployment(CHAINED, parameters={"params_file": str(dvc_repo / "params.yaml")},
                                     timeout=540, poll_interval=2)
            decision = _completed(chained, worker_log)
            assert _runs_by_deployment(STAGES) == {stage: ["COMPLETED"] for stage in STAGES}

            # 2. `transfer schedule` serves the retrain flow with its cron; a run of that
            # deployment finds the champion's data unchanged and trains nothing.
            served = _start([str(BIN / "transfer"), "schedule", "--cron", "0 3 * * *"],
                            schedule_log, cwd=dvc_repo, env=env)
            deployment = _wait_for_deployment("retrain/retrain-schedule", served, schedule_log)
            assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
            assert deployment.parameters["params_file"] == str((dvc_repo / "params.yaml").resolve())
            retrain = _completed(run_deployment("retrain/retrain-schedule", timeout=300, poll_interval=2),
                                 schedule_log)
    finally:
        for proc in (served, worker):
            if proc is not None:
                _stop(proc)

    assert decision["promoted"], decision
    assert decision["source_model_uri"].startswith("runs:/"), decision
    for key in ("transfer_model_uris", "scratch_model_uris"):
        assert decision[key] and all(uri.startswith("runs:/") for uri in decision[key]), decision
    client = MlflowClient()
    assert client.get_registered_model(NAME).aliases["champion"] == decision["version"]
    assert not retrain["retrained"] and "unchanged" in retrain["reason"], retrain
    assert retrain["champion_version"] == decision["version"]
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1


FIND_API = (
    "from flows.prefect_api import running_prefect_api\n"
    "with running_prefect_api() as url:\n"
    "    from prefect.settings import PREFECT_API_URL\n"
    "    print(url, PREFECT_API_URL.value())\n"
)


def test_a_kept_server_is_found_without_configuration(prefect_server: dict[str, str], tmp_path: Path) -> None:
    """`transfer run`'s lookup: nothing configured, a server on PREFECT_SERVER_API_PORT -> it;
    nothing answering there -> Prefect's temporary API (None)."""
    url = prefect_server["PREFECT_API_URL"]
    bare = {k: v for k, v in prefect_server.items() if k != "PREFECT_API_URL"}
    port = url.split(":")[-1].split("/")[0]

    def lookup(api_port: str) -> str:
        proc = subprocess.run([sys.executable, "-c", FIND_API], env={**bare, "PREFECT_SERVER_API_PORT": api_port},
                              capture_output=True, text=True, cwd=REPO, check=True)
        return proc.stdout.strip()

    assert lookup(port) == f"{url} {url}"
    assert lookup(str(free_port())) == "None None"
