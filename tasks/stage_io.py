"""Hand-off between stage flows that may run in separate containers: MLflow artifact URIs.

A stage publishes its model directory as artifacts of its MLflow run and passes on the
``runs:/<run_id>/<path>`` URI; the next stage downloads it. No shared disk is assumed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from prefect import task

from tasks import tracking
from transfer.config import Params
from transfer.errors import TransferError


@task(name="publish-model-dir", retries=2, retry_delay_seconds=5)
def publish_model_dir(params: Params, run_id: str, model_dir: str, artifact_path: str) -> str:
    client = tracking.configure(params)
    client.log_artifacts(run_id, model_dir, artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


@task(name="fetch-model-dir", retries=2, retry_delay_seconds=5)
def fetch_model_dir(params: Params, uri: str) -> str:
    tracking.configure(params)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp(prefix="stage-")))
    found = sorted(p.parent for p in local.rglob("model.json"))
    if not found:
        raise TransferError(f"{uri} holds no transfer model (model.json)")
    return str(found[0])
