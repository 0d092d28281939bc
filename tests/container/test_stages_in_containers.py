"""Every stage in its own container, against a real MLflow tracking server; then the
champion served from a container.

The stages run as separate ``docker run --network host --read-only`` over one bind-mounted
workspace (they share only it and the servers), and the same commands run on the host with
the same tiny params in another workspace: same source weights, same test accuracies, same
promotion, and the served model answers what the host's champion predicts.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tasks.adapters.serve import invocations_payload, predict_files, wait_until_ready
from tests.conftest import BIN, free_port, write_yaml
from tests.container.conftest import PARAMS, QUIET_ENV, docker, run_args, workspace
from tests.serving.test_serving import assert_client_error, b64, png

pytestmark = [pytest.mark.container, pytest.mark.slow]
NAME = "digits-transfer"
# (stage, argv): the per-stage CLI for data, the per-stage flows (MLflow hand-off) after it;
# finetune also trains the scratch baseline, evaluate also gates + promotes.
STAGES = [
    ("data-prepare", ["transfer", "data", "prepare"]),
    ("validate", ["transfer", "validate"]),
    ("pretrain", ["python", "-m", "flows.run_stage", "pretrain"]),
    ("finetune", ["python", "-m", "flows.run_stage", "finetune"]),
    ("evaluate", ["python", "-m", "flows.run_stage", "evaluate"]),
]


def _results(ws: Path) -> dict[str, dict[str, Any]]:
    return {s: json.loads((ws / "handoff" / f"{s}.json").read_text()) for s in ("pretrain", "evaluate")}


@pytest.fixture(scope="module")
def host_run(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> dict[str, Any]:
    """The same stage commands on the host, MLflow in a sqlite file."""
    ws = tmp_path_factory.mktemp("host-ws")
    write_yaml(ws / "params.yaml", PARAMS)
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": uri, "PREFECT_API_URL": prefect_api}
    for stage, argv in STAGES:
        proc = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"host {stage}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return {"ws": ws, "uri": uri, **_results(ws)}


@pytest.fixture(scope="module")
def container_run(tmp_path_factory: pytest.TempPathFactory, image: str, mlflow_server: str,
                  prefect_api: str) -> dict[str, Any]:
    """Each stage its own container over one workspace; MLflow = the tracking server."""
    ws = workspace(tmp_path_factory.mktemp("container-ws"))
    write_yaml(ws / "params.yaml", PARAMS)
    cids = tmp_path_factory.mktemp("cids")
    flags = run_args(ws, {"MLFLOW_TRACKING_URI": mlflow_server, "PREFECT_API_URL": prefect_api})
    for stage, argv in STAGES:
        proc = docker("run", "--rm", "--cidfile", str(cids / stage), *flags, "--entrypoint", argv[0],
                      image, *argv[1:], check=False)
        assert proc.returncode == 0, f"container {stage}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    ids = {stage: (cids / stage).read_text().strip() for stage, _ in STAGES}
    print(f"stage containers: {ids}")
    return {"ws": ws, "container_ids": ids, **_results(ws)}


def test_each_stage_in_its_own_container_matches_the_host_run(host_run, container_run, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    ids = container_run["container_ids"]
    assert len(set(ids.values())) == len(STAGES), ids
    got, want = container_run["evaluate"], host_run["evaluate"]
    assert container_run["pretrain"]["weights_sha256"] == host_run["pretrain"]["weights_sha256"]
    assert container_run["pretrain"]["source_model_uri"].startswith("runs:/")
    for key in ("promoted", "transfer_accuracy", "scratch_accuracy", "gain"):
        assert got.get(key) == want.get(key), (key, got.get(key), want.get(key))
    assert str(got["version"]) == str(want["version"])  # the REST store answers "1", sqlite 1
    assert got["promoted"], got
    client = MlflowClient(mlflow_server, mlflow_server)
    assert client.get_registered_model(NAME).aliases["champion"] == got["version"]
    # the models went to the server, not to the workspace: artifacts are proxied over HTTP
    # (mlruns/ holds only the promotion's file lock there)
    local = [p for p in (container_run["ws"] / "mlruns").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert not local, local


def test_image_runs_as_non_root_on_a_read_only_root(image: str) -> None:
    proc = docker("run", "--rm", "--network", "host", "--read-only", "--entrypoint", "sh", image, "-c",
                  "id -u; touch /app/x 2>/dev/null && echo writable || echo read-only", check=False)
    assert proc.stdout.split() == ["1000", "read-only"], proc.stdout + proc.stderr


def _post(url: str, body: bytes, token: str | None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url + "/invocations", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_champion_served_from_a_container(host_run, container_run, image: str, mlflow_server: str,
                                          tmp_path: Path) -> None:
    """The champion served by a read-only container with a bearer token from its run-time env:
    /health open, a batch of 3 = the host champion's predictions, a malformed payload -> 400,
    Docker's HEALTHCHECK healthy; the token in no image layer, config, log or workspace file."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ws = container_run["ws"]
    token = f"planted-{secrets.token_hex(16)}"
    flags = run_args(ws, {"MLFLOW_TRACKING_URI": mlflow_server, "TRANSFER_SERVE_HOST": "127.0.0.1",
                          "TRANSFER_SERVE_PORT": str(port), "TRANSFER_SERVE_TOKEN": token})
    cid = docker("run", "-d", "--health-interval", "2s", "--health-start-period", "0s", *flags,
                 image, "serve", "--set", "serve.auth_token_env=TRANSFER_SERVE_TOKEN").stdout.strip()
    try:
        try:
            wait_until_ready(url, timeout=240)
        except TimeoutError:
            pytest.fail(f"server container did not answer:\n{docker('logs', cid, check=False).stderr[-4000:]}")
        images = [png(seed) for seed in range(3)]
        paths = []
        for i, data in enumerate(images):
            paths.append(tmp_path / f"{i}.png")
            paths[-1].write_bytes(data)
        expected = predict_files(paths, f"models:/{NAME}@champion", tracking_uri=host_run["uri"])
        batch = invocations_payload([b64(i) for i in images])

        status, text = _post(url, batch, None)
        assert status == 401 and "predictions" not in text, text
        status, text = _post(url, batch, token)
        assert status == 200, text
        predictions = json.loads(text)["predictions"]
        assert [p["label"] for p in predictions] == [e["label"] for e in expected]
        for served, local in zip(predictions, expected):
            assert served["probability"] == pytest.approx(local["probability"], abs=1e-5)

        status, text = _post(url, b'{"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}}', token)
        assert_client_error(status, text, "row 0", "not valid base64")
        status, text = _post(url, b"{not json", token)
        assert status == 400, text

        deadline = time.monotonic() + 60
        while (health := docker("inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip()) != "healthy":
            assert time.monotonic() < deadline, health
            time.sleep(1)
        logs = docker("logs", cid)
    finally:
        docker("rm", "-f", cid, check=False)
    # The secret went in at run time only: not in the layers' history, the image's config, the
    # server's output, or anything the containers wrote to the workspace.
    assert token not in docker("history", "--no-trunc", image).stdout
    assert token not in docker("image", "inspect", image).stdout
    assert token not in logs.stdout + logs.stderr
    assert not [p for p in ws.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
