"""Hand-off between stage flows that may run in separate containers: MLflow artifact URIs.

A stage publishes its model directory as artifacts of its MLflow run and passes on the
``runs:/<run_id>/<path>`` URI; the next stage downloads it. No shared disk is assumed, only
the same MLflow tracking server (``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

from pathlib import Path

from tasks.adapters import tracking
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


def fetch(params: Params, uri: str) -> str:
    """Download ``uri``'s model directory (kept until this process ends: the next tasks read it)."""
    tracking.configure(params)
    return str(tracking.kept_download(uri))


publish_model_dir = stage_task("publish-model-dir")(publish)
fetch_model_dir = stage_task("fetch-model-dir")(fetch)
