"""Scheduled retraining: re-version the data, retrain only if it changed (or forced).

    version data (dvc repro prepare) -> should retrain? (vs the champion's data tags)
      -> yes: the transfer-pipeline flow as a subflow (same validation + promotion gates)
      -> no:  done, nothing trained, nothing registered

Deployed by prefect.yaml ("retrain/retrain", weekly cron) and served by
``transfer schedule`` (``flows/serve_schedule.py``, "retrain/retrain-schedule").
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import transfer_pipeline
from tasks.data import version_data_task
from tasks.retrain import should_retrain_task
from transfer.config import load_params


# Result persisted so a deployment run's caller (run_deployment, the UI) can read the decision.
@flow(name="retrain", persist_result=True, log_prints=True)
def retrain_flow(
    params_file: str = "params.yaml", overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """``{retrained, reason, champion_version, champion_data, current_data, changed}``, plus
    the pipeline summary (``model_version``, ``promoted``, ...) when it retrained.

    ``force`` (or ``schedule.force`` in params) retrains even when the data is unchanged.
    """
    params = load_params(params_file, overrides or [])
    data = version_data_task(params)
    decision = should_retrain_task(params, data, force or params.schedule.force)
    print(f"retrain: {decision['retrain']} ({decision['reason']})")
    result = {"retrained": decision.pop("retrain"), **decision}
    if not result["retrained"]:
        return result
    summary = transfer_pipeline(params=params)
    return {**result, **summary}
