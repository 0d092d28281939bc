"""The per-stage flows (one deployment/container each) hand off through MLflow URIs only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_stage_flows_chain_through_mlflow_uris(dvc_repo: Path) -> None:
    from flows.stages import evaluate_flow, finetune_flow, pretrain_flow

    pretrained = pretrain_flow()
    assert pretrained["source_model_uri"].startswith("runs:/") and pretrained["validation_passed"]
    tuned = finetune_flow(source_model_uri=pretrained["source_model_uri"])
    assert tuned["source"]["weights_sha256"] == pretrained["weights_sha256"]
    shutil.rmtree(dvc_repo / "artifacts")  # nothing on local disk survives between containers
    decision = evaluate_flow(handoff=tuned, validation_passed=pretrained["validation_passed"])
    assert decision["promoted"], decision
    aliases = MlflowClient().get_registered_model("digits-transfer").aliases
    assert aliases["champion"] == decision["version"]
