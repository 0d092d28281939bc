"""Scheduled retraining: re-version the data, retrain only if it changed (or forced).

A retrain goes through the same flow, so the same validation and promotion gates apply.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import transfer_pipeline
from tasks.data import version_data_task
from tasks.retrain import should_retrain_task
from transfer.config import load_params


@flow(name="retrain", log_prints=True)
def retrain_flow(
    params_file: str = "params.yaml", overrides: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    params = load_params(params_file, overrides or [])
    data = version_data_task(params)
    decision = should_retrain_task(params, data, force or params.schedule.force)
    print(f"retrain: {decision['retrain']} ({decision['reason']})")
    if not decision["retrain"]:
        return {"retrained": False, **decision}
    summary = transfer_pipeline(params=params)
    return {"retrained": True, **decision, **summary}
