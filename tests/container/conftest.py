"""A Docker engine, the project image, a real MLflow tracking server and a Prefect server,
once per session, for the tests that run stages in containers (marker ``container``).

The engine: whatever ``docker info`` answers (``.ci/run`` starts one and exports
``DOCKER_HOST``); else the test session starts one through ``../shared/containers/engine.sh``
beside the checkout and stops it at the end; else the tests skip with one line. The image is
built FROM a local base (no registry is reachable): ``TRANSFER_TEST_BASE_IMAGE``, default the
engine script's ``local/debian-py:bookworm``; pip installs the host's pinned wheels through the
script's loopback mirror.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_PARAMS, free_port
from tests.pipeline.test_prefect_server import _healthy, _start, _stop, _tail

BIN = Path(sys.executable).parent
ENGINE_SH = REPO.parent / "shared" / "containers" / "engine.sh"
IMAGE = os.environ.get("TRANSFER_TEST_IMAGE", "transfer-pipeline:test")
BASE_IMAGE = os.environ.get("TRANSFER_TEST_BASE_IMAGE", "local/debian-py:bookworm")
APP_UID = 1000  # the image's user (Dockerfile ARG APP_UID)
# The suite's tiny params, one fine-tuning seed: every stage still runs (CI time budget).
PARAMS = {**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "seeds": 1}}
# Prefect/MLflow/GX quiet and offline inside the containers too.
QUIET_ENV = {
    "GX_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "TQDM_DISABLE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def engine_sh(script: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``script`` after sourcing the engine script, in bash; its env is printed by callers."""
    return subprocess.run(["bash", "-c", f'source "{ENGINE_SH}" > /dev/null && {script}'],
                          capture_output=True, text=True, timeout=timeout)


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    """A Docker engine that answers, with the base image present."""
    started = False
    if not _docker_answers():
        if not ENGINE_SH.is_file():
            pytest.skip(f"no container engine: `docker info` does not answer and {ENGINE_SH} is absent")
        # the script's socket and its docker CLI (an engine it started earlier may be running)
        proc = engine_sh('echo "DOCKER_HOST=$DOCKER_HOST"; echo "PATH=$PATH"', timeout=60)
        os.environ.update(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        os.environ["DOCKER_BUILDKIT"] = "1"
    if not _docker_answers():
        proc = engine_sh("ctr_start", timeout=120)
        if proc.returncode != 0:
            pytest.skip(f"no container engine: engine.sh ctr_start failed: {proc.stderr.strip().splitlines()[-1:]}")
        started = True
    try:
        if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
            if not ENGINE_SH.is_file():
                pytest.skip(f"base image {BASE_IMAGE} absent and no {ENGINE_SH} to build it")
            proc = engine_sh("ctr_base")
            assert proc.returncode == 0, f"ctr_base failed:\n{proc.stderr[-3000:]}"
        yield
    finally:
        if started:
            engine_sh("ctr_stop", timeout=120)


def _pip_build_args() -> list[str]:
    """The engine script's loopback mirror of pip's local wheel dirs (the pinned torch)."""
    if not ENGINE_SH.is_file():
        return []
    proc = engine_sh('ctr_pip_mirror_start && printf "%s\\n" "${CTR_PIP_BUILD_ARGS[@]}"', timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


@pytest.fixture(scope="session")
def image(engine: None) -> str:
    """The project image, built once (a rebuild with unchanged code is all cache hits)."""
    args = _pip_build_args()
    try:
        docker("build", "--network", "host", *args, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
               "-t", IMAGE, str(REPO), timeout=1800)
    finally:
        if args:
            engine_sh("ctr_pip_mirror_stop", timeout=30)
    return IMAGE


@contextmanager
def _server(cmd: list[str], log: Path, env: dict[str, str], health_url: str, what: str) -> Iterator[None]:
    """A server subprocess, healthy before the body runs, stopped (its process group) after."""
    proc = _start(cmd, log, env=env)
    try:
        deadline = time.monotonic() + 180
        while not _healthy(health_url):
            assert proc.poll() is None, f"{what} exited {proc.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"{what} not healthy within 180 s:\n{_tail(log)}"
            time.sleep(1)
        yield
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on loopback: sqlite backend, artifacts proxied (clients upload over
    HTTP, never touching the artifact directory); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    with _server(cmd, root / "server.log", {**os.environ, **QUIET_ENV}, url, "mlflow server"):
        yield url


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``prefect server start`` on loopback (sqlite); yields its API URL."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = str(free_port())
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(root / "home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port, "--no-ui"]
    url = f"http://127.0.0.1:{port}/api"
    with _server(cmd, root / "server.log", env, url, "prefect server"):
        yield url


def workspace(path: Path) -> Path:
    """A directory the image's non-root user can write when bind-mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chown(path, APP_UID, APP_UID)
    return path


def run_args(ws: Path, env: dict[str, str]) -> list[str]:
    """``docker run`` flags of a stage container: host network, read-only root filesystem
    (tmpfs for /tmp and the home's caches), the workspace bind-mounted as the working dir."""
    user = [] if os.getuid() == 0 else ["--user", f"{os.getuid()}:{os.getgid()}"]
    flags = ["--network", "host", "--read-only", "--tmpfs", "/tmp:rw,mode=1777",
             "--tmpfs", "/home/app:rw,mode=1777", "-v", f"{ws}:/workspace", "-w", "/workspace", *user]
    for key, value in {**QUIET_ENV, **env}.items():
        flags += ["-e", f"{key}={value}"]
    return flags
