"""The Prefect API with basic auth, as the production topology runs it: a real `prefect
server start` with PREFECT_SERVER_API_AUTH_STRING refuses clients without (or with wrong)
credentials, keeps /health open for probes, and serves clients that send
PREFECT_API_AUTH_STRING (the pipeline's tasks, workers and CLI all use that client)."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.pipeline.test_prefect_server import BIN, START_TIMEOUT_S, _healthy, _start, _stop, _tail

pytestmark = pytest.mark.slow


def _post(url: str, auth: str | None) -> int:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def _prefect(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=120)


def test_prefect_api_refuses_clients_without_the_auth_string(tmp_path: Path) -> None:
    secret = f"pipeline:{secrets.token_hex(12)}"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_AUTH")}
    env = {**base, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    log = tmp_path / "server.log"
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                     "--no-ui"], log, env={**env, "PREFECT_SERVER_API_AUTH_STRING": secret})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(api):  # the probe needs no credentials
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up:\n{_tail(log)}")
            time.sleep(1)
        assert _post(f"{api}/flows/filter", None) == 401
        assert _post(f"{api}/flows/filter", "pipeline:wrong") == 401
        assert _post(f"{api}/flows/filter", secret) == 200

        refused = _prefect(["work-pool", "create", "sneaky", "--type", "process"], env)
        assert refused.returncode != 0
        client = {**env, "PREFECT_API_AUTH_STRING": secret}
        made = _prefect(["work-pool", "create", "pipeline-pool", "--type", "process"], client)
        assert made.returncode == 0, made.stdout + made.stderr
        assert _prefect(["work-pool", "inspect", "pipeline-pool"], client).returncode == 0
        assert _prefect(["work-pool", "inspect", "sneaky"], client).returncode != 0  # never created
    finally:
        _stop(server)
    assert secret.split(":")[1] not in log.read_text()  # the server never logs the credentials
