"""Retrain only when the data moved: compare today's data version with the champion's."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks import tracking
from tasks.promote import CHAMPION, alias_version
from transfer.config import Params

DATASETS = ("source", "target")


def should_retrain(params: Params, data: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """``{retrain, reason, champion_version, changed}`` from the champion's data-version tags."""
    client = tracking.configure(params)
    champion = alias_version(client, params.promote.model_name, CHAMPION)
    decision: dict[str, Any] = {"champion_version": champion.version if champion else None, "changed": []}
    if force:
        return {**decision, "retrain": True, "reason": "forced"}
    if champion is None:
        return {**decision, "retrain": True, "reason": "no champion yet"}
    changed = [name for name in DATASETS if champion.tags.get(f"data.{name}.version") != data[name]["version"]]
    if changed:
        reason = f"{' and '.join(changed)} data changed since champion v{champion.version} was trained"
        return {**decision, "changed": changed, "retrain": True, "reason": reason}
    reason = f"data unchanged since champion v{champion.version} (target {data['target']['version'][:12]})"
    return {**decision, "retrain": False, "reason": reason}


should_retrain_task = task(name="should-retrain", retries=2, retry_delay_seconds=5)(should_retrain)
