"""Hand-off between stage flows that may run in separate containers: MLflow artifact URIs.

A stage publishes its model directory as artifacts of its MLflow run and passes on the
``runs:/<run_id>/<path>`` URI; the next stage downloads it. No shared disk is assumed, only
the same MLflow tracking server (``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow

from tasks import tracking
from tasks.common import stage_task
from transfer.config import Params
from transfer.errors import TransferError


def publish(params: Params, run_id: str, model_dir: str | Path, artifact_path: str) -> str:
    """Log ``model_dir`` (model.pt + model.json) under ``artifact_path`` of run ``run_id``."""
    if not (Path(model_dir) / "model.json").exists():
        raise TransferError(f"{model_dir} is not a model directory (no model.json)")
    client = tracking.configure(params)
    client.log_artifacts(run_id, str(model_dir), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def download_model_dir(uri: str, destination: str | Path) -> Path:
    """Download ``uri`` (``runs:/``, ``models:/``) into ``destination``; the transfer model
    directory (model.json + model.pt) inside it. The one MLflow -> model-dir download."""
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(destination)))
    found = sorted(p.parent for p in local.rglob("model.json"))
    if not found:
        raise TransferError(f"{uri} holds no transfer model (model.json)")
    return found[0]


@contextlib.contextmanager
def downloaded_model_dir(uri: str) -> Iterator[Path]:
    """:func:`download_model_dir` into a temporary folder that is removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="model-")
    try:
        yield download_model_dir(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(params: Params, uri: str) -> str:
    """Download ``uri`` into a fresh temporary dir (kept: the next tasks read it)."""
    tracking.configure(params)
    return str(download_model_dir(uri, tempfile.mkdtemp(prefix="stage-")))


publish_model_dir = stage_task("publish-model-dir")(publish)
fetch_model_dir = stage_task("fetch-model-dir")(fetch)
