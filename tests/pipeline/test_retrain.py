"""Scheduled retraining retrains only when the data version moved, then gates as usual."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
NAME = "digits-transfer"


def _versions() -> int:
    return len(MlflowClient().search_model_versions(f"name='{NAME}'"))


def test_retrain_only_when_data_changed(dvc_repo: Path) -> None:
    from flows.retrain import retrain_flow

    first = retrain_flow()
    assert first["retrained"] and first["reason"] == "no champion yet" and first["promoted"]
    assert _versions() == 1

    same = retrain_flow()
    assert not same["retrained"] and "unchanged" in same["reason"]
    assert _versions() == 1  # nothing trained, nothing registered

    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["data"]["target"]["test_size"] = 320  # new split = new data version (dvc repro re-runs prepare)
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = retrain_flow()
    assert changed["retrained"] and changed["changed"] == ["target"]
    assert _versions() == 2
    version = MlflowClient().get_model_version(NAME, changed["model_version"])
    assert "promoted" in version.tags or "rejected" in version.tags  # went through the gates

    forced = retrain_flow(force=True)
    assert forced["retrained"] and forced["reason"] == "forced"
