"""Read-side helpers over the tracking store (the `transfer runs` command)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from tasks import tracking
from transfer.config import Params


def recent_runs(params: Params, limit: int = 10) -> list[dict[str, Any]]:
    """Newest pipeline (parent) runs first, with their headline metrics and promotion outcome."""
    client = tracking.configure(params)
    experiment = client.get_experiment_by_name(params.runtime.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.stage = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    rows = []
    for run in runs:
        metrics, tags = run.data.metrics, run.data.tags
        rows.append(
            {
                "start": datetime.fromtimestamp(
                    run.info.start_time / 1000, tz=timezone.utc
                ).strftime("%Y-%m-%d %H:%M:%S"),
                "run_id": run.info.run_id,
                "status": run.info.status,
                "strategy": tags.get("finetune.strategy", ""),
                "test_accuracy": _fmt(metrics.get("test_accuracy")),
                "scratch_test_accuracy": _fmt(metrics.get("scratch_test_accuracy")),
                "promoted": tags.get("promoted", ""),
                "model_version": tags.get("model_version", ""),
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
