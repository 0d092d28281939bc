"""Shared fixtures: one Prefect test harness per session, tiny params, temp DVC repos."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from flows.runtime import configure_runtime

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# the CLI's process settings, before anything imports Prefect; then the tests' own
configure_runtime()
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# `make test-fast` runs two pytest-xdist workers on a 2-core machine: one torch thread each
# (and in the processes they start), not two workers each spinning two threads on two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# dvc runs stage commands through the shell: this venv's `transfer` must be on PATH.
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (~25 s to start, then ~1 s a flow)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


TINY_PARAMS = {
    "data": {"image_size": 16, "source": {"n": 1000}, "target": {"test_size": 300}},
    "validate": {"min_per_class": 3},
    "pretrain": {"arch": "small_cnn", "epochs": 4, "batch_size": 64},
    "finetune": {"strategy": "full", "labels_per_class": 5, "epochs": 6, "batch_size": 16, "seeds": 2},
    "promote": {"accuracy_floor": 0.0, "min_delta": 0.0},
    "sweep": {"ks": [1, 2], "strategies": ["head"], "seeds": 1, "epochs": 1},
    "runtime": {"device": "cpu"},
}


def write_yaml(path: Path, data: dict) -> Path:
    """Write params with every key spelled out: dvc.yaml's per-stage params must exist."""
    from transfer.config import params_from_dict

    path.write_text(yaml.safe_dump(params_from_dict(data).dump(), sort_keys=False))
    return path


@contextmanager
def small_tmpfs(path: Path, size: str = "1m") -> Iterator[bool]:
    """Mount a ``size``-limited tmpfs at ``path`` (a real full disk); yields False where
    mounting is not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def init_workspace(repo: Path, dvc_remote: Path, params: dict) -> Path:
    """A fresh git + DVC repo at ``repo`` holding the project's dvc.yaml, code and ``params``."""
    repo.mkdir(parents=True)
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "ci@example.com"], repo)
    run(["git", "config", "user.name", "ci"], repo)
    run([str(BIN / "dvc"), "init", "-q"], repo)
    run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(dvc_remote)], repo)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    # dvc.yaml deps name source folders of the project: mirror them so `dvc repro` resolves.
    for package in ("transfer", "tasks", "flows"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    write_yaml(repo / "params.yaml", params)
    return repo


@pytest.fixture
def dvc_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh git + DVC repo holding the project's dvc.yaml and tiny params, as cwd."""
    repo = init_workspace(tmp_path / "repo", tmp_path / "dvc-remote", TINY_PARAMS)
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # An earlier test's flow set MLflow's process-wide URIs (they beat the env var): reset
    # them, so a bare MlflowClient() in this test reads this repo's store.
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return repo


@contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri``, then restore exactly what was there before.

    ``set_tracking_uri`` / ``set_registry_uri`` also export MLFLOW_TRACKING_URI /
    MLFLOW_REGISTRY_URI; restoring with the public setters would pin a value that later tests
    expect to come from their own environment, so the module globals are put back as well.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in names}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def free_port() -> int:
    """A loopback port nothing listens on (now): for a server a test starts, or to probe a closed one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
