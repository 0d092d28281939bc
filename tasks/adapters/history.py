"""Read-side helpers over the tracking store (the `transfer runs` command)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from tasks.adapters import tracking
from transfer.config import Params
from transfer.stats import format_p


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
                "strategy": _strategy(tags),
                "model_name": tags.get("model_name", ""),
                "test_accuracy": _with_ci(metrics, "test_accuracy"),
                "scratch_test_accuracy": _with_ci(metrics, "scratch_test_accuracy"),
                "gain": _gain(metrics),
                "promoted": tags.get("promoted", ""),
                "model_version": tags.get("model_version", ""),
            }
        )
    return rows


def _strategy(tags: dict[str, str]) -> str:
    """The strategy the run trained (``auto`` resolved); a run that stopped before fine-tuning
    shows what it asked for."""
    if tags.get("strategy"):
        return tags["strategy"]
    requested = tags.get("finetune.strategy")
    return f"{requested} (not trained)" if requested else ""


def _with_ci(metrics: dict[str, float], key: str) -> str:
    """``0.949 [0.932, 0.962]``: the accuracy with its 95% interval (older runs: no interval)."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    text = _fmt(metrics.get(key), 3)
    return f"{text} [{low:.3f}, {high:.3f}]" if text and low is not None and high is not None else text


def _gain(metrics: dict[str, float]) -> str:
    """``+0.039 [+0.021, +0.058] p=0.0001``: the paired difference, its CI and McNemar's p."""
    gain, p = metrics.get("transfer_gain"), metrics.get("transfer_gain_p_value")
    low, high = metrics.get("transfer_gain_ci_low"), metrics.get("transfer_gain_ci_high")
    if gain is None:
        return ""
    if low is None or p is None:
        return f"{gain:+.3f}"
    return f"{gain:+.3f} [{low:+.3f}, {high:+.3f}] p={format_p(p)}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"
