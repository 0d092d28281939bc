"""The Prefect Docker work pool for real: a Prefect server on loopback, a ``docker`` work pool,
``prefect worker start --type docker``, the stage deployments of prefect.yaml deployed with
``prefect deploy`` (the locally built image, no build/push), and the chained pipeline run so
that every stage is its own flow run in its own container.

Only the job variables a one-machine test needs are overridden: the image tag, host networking
(no registry or compose network here), a bind-mounted workspace, the tracking server's URL,
and, where the engine has no NVIDIA runtime, the GPU request (the default is asserted).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BIN, REPO, write_yaml
from tests.container.conftest import PARAMS, QUIET_ENV, docker, workspace
from tests.pipeline.test_prefect_server import _start, _stop, _tail

pytestmark = [pytest.mark.container, pytest.mark.slow]
POOL = "gpu-docker"
DEPLOYMENTS = ("pretrain", "finetune", "evaluate", "chained-pipeline")
STAGES = DEPLOYMENTS[:3]
MODEL = "digits-pool"  # another registered model than the per-stage container test's


def _has_nvidia_runtime() -> bool:
    runtimes = json.loads(docker("info", "--format", "{{json .Runtimes}}").stdout or "{}")
    return "nvidia" in runtimes


def local_prefect_yaml(ws: Path, image: str, mlflow_url: str, gpu: bool) -> dict[str, Any]:
    """prefect.yaml's stage deployments, pointed at the local image and this host's servers."""
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    config.pop("build", None)  # the image is already built (and there is no registry to push to)
    config.pop("push", None)
    deployments = []
    for deployment in config["deployments"]:
        if deployment["name"] not in DEPLOYMENTS:
            continue
        deployment = copy.deepcopy(deployment)  # YAML anchors: the deployments share one dict
        variables = deployment["work_pool"]["job_variables"]
        kwargs = variables["container_create_kwargs"]
        if deployment["name"] in STAGES:  # the default asks Docker for every GPU
            assert kwargs["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
            if not gpu:  # an engine without the NVIDIA runtime refuses the request
                del kwargs["device_requests"]
        variables.update(
            image=image, networks=[], network_mode="host", volumes=[f"{ws}:{ws}"],
            container_create_kwargs=kwargs,
            env={**variables["env"], **QUIET_ENV, "MLFLOW_TRACKING_URI": mlflow_url,
                 # one result store (the same path inside and outside) for run_deployment
                 "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(ws / "results")},
        )
        deployments.append(deployment)
    config["deployments"] = deployments
    return config


def test_chained_pipeline_on_a_docker_work_pool(
    image: str, mlflow_server: str, prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.chained import CHAINED

    ws = workspace(tmp_path_factory.mktemp("pool-ws"))
    params = {**PARAMS, "data": {**PARAMS["data"], "root": str(ws / "data")},
              "promote": {**PARAMS["promote"], "model_name": MODEL},
              "runtime": {**PARAMS["runtime"], "artifacts_dir": str(ws / "artifacts"), "experiment": "pool"}}
    write_yaml(ws / "params.yaml", params)
    gpu = _has_nvidia_runtime()
    prefect_file = tmp_path_factory.mktemp("pool") / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(local_prefect_yaml(ws, image, mlflow_server, gpu), sort_keys=False))
    env = {**os.environ, **QUIET_ENV, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(ws / "results")}

    def cli(*args: str) -> None:
        proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    cli("work-pool", "create", POOL, "--type", "docker")
    cli("deploy", "--prefect-file", str(prefect_file), "--all")
    log = ws.parent / "worker.log"
    worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "docker"], log, env=env)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_api,
                                         PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(ws / "results")}):
            started = time.perf_counter()
            chained = run_deployment(CHAINED, parameters={"params_file": str(ws / "params.yaml")},
                                     timeout=900, poll_interval=2)
            # a figure for benchmarks/containers.py, which runs this test: nothing asserts it
            print(f"work-pool chained pipeline: {time.perf_counter() - started:.1f} s")
            assert chained.state is not None and chained.state.is_completed(), f"{chained.state}\n{_tail(log)}"
            decision = chained.state.result()
            with get_client(sync_client=True) as client:
                runs = {name: client.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[name]))) for name in DEPLOYMENTS}
    finally:
        _stop(worker)

    containers = {}
    for name, flow_runs in runs.items():
        (flow_run,) = flow_runs
        assert flow_run.state.is_completed(), (name, flow_run.state)
        containers[name] = flow_run.infrastructure_pid.rsplit(":", 1)[1]  # "<engine url>:<container id>"
    print(f"flow-run containers: {containers}")
    assert len(set(containers.values())) == len(DEPLOYMENTS), containers
    assert decision["promoted"], decision
    assert decision["source_model_uri"].startswith("runs:/") and decision["model_name"] == MODEL
