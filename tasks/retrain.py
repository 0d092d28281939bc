"""Retrain only when the data moved: compare today's data version with the champion's.

Every registered model version carries the data it was trained on as tags
(``data.<dataset>.version``: the manifest content hash; ``data.<dataset>.dvc_md5``: the
md5 that ``dvc.lock`` records for the dataset, when DVC prepared it; see
``tasks/promote.py``). The decision:

- ``force``                                -> retrain ("forced")
- no ``champion`` alias yet                -> retrain ("no champion yet")
- champion without data-version tags       -> retrain (nothing to compare with)
- a dataset's version or dvc md5 differs   -> retrain, unless a version registered after
  the champion was already trained on exactly today's data (the gates rejected it, or it was
  rolled back: same data, code and seed would give the same model again every night;
  ``force`` retries anyway)
- otherwise                                -> skip ("data unchanged since champion vN")
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task

from tasks.adapters import tracking
from tasks.promote import CHAMPION, alias_version
from transfer.config import Params

DATASETS = ("source", "target")


def data_fingerprint(data: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """``{dataset: {version, dvc_md5}}`` from ``tasks.data.version_data``'s result."""
    return {
        name: {"version": data[name].get("version"), "dvc_md5": data[name].get("dvc_md5")}
        for name in DATASETS
    }


def version_fingerprint(tags: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """The same shape, read from a model version's ``data.<dataset>.*`` tags."""
    return {
        name: {
            "version": tags.get(f"data.{name}.version"),
            "dvc_md5": tags.get(f"data.{name}.dvc_md5") or None,
        }
        for name in DATASETS
    }


def changed_datasets(
    trained_on: dict[str, dict[str, str | None]], current: dict[str, dict[str, str | None]]
) -> list[str]:
    """Datasets whose content version differs, or whose DVC md5 differs (when both have one).

    A missing md5 on either side (data prepared outside DVC) is not a change by itself:
    the content version still compares the files.
    """
    changed = []
    for name in DATASETS:
        old, new = trained_on[name], current[name]
        md5_differs = bool(old["dvc_md5"] and new["dvc_md5"] and old["dvc_md5"] != new["dvc_md5"])
        if old["version"] != new["version"] or md5_differs:
            changed.append(name)
    return changed


def _already_tried(
    client: MlflowClient, name: str, champion_version: str, current: dict[str, Any]
) -> Any | None:
    """A version newer than the champion, trained on today's data (i.e. rejected), if any."""
    newer = [
        v for v in client.search_model_versions(f"name='{name}'")
        if int(v.version) > int(champion_version)
    ]
    for version in sorted(newer, key=lambda v: int(v.version), reverse=True):
        if not changed_datasets(version_fingerprint(version.tags), current):
            return version
    return None


def should_retrain(params: Params, data: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Decide whether to retrain. Returns ``{retrain, reason, champion_version, champion_data,
    current_data, changed}``; ``*_data`` are ``{dataset: {version, dvc_md5}}``."""
    client = tracking.configure(params)
    name = params.model_name()
    champion = alias_version(client, name, CHAMPION)
    current = data_fingerprint(data)
    decision: dict[str, Any] = {
        "champion_version": champion.version if champion else None,
        "champion_data": version_fingerprint(champion.tags) if champion else None,
        "current_data": current,
        "changed": [],
    }

    def decide(retrain: bool, reason: str) -> dict[str, Any]:
        return {"retrain": retrain, "reason": reason, **decision}

    if force:
        return decide(True, "forced")
    if champion is None:
        return decide(True, "no champion yet")
    if not any(decision["champion_data"][d]["version"] for d in DATASETS):
        return decide(True, f"champion v{champion.version} has no data-version tags")
    decision["changed"] = changed_datasets(decision["champion_data"], current)
    if not decision["changed"]:
        short = (current["target"]["dvc_md5"] or current["target"]["version"] or "")[:12]
        return decide(False, f"data unchanged since champion v{champion.version} (target {short})")
    what = " and ".join(decision["changed"])
    tried = _already_tried(client, name, champion.version, current)
    if tried is not None:
        why = f"rejected: {tried.tags['rejected']}" if "rejected" in tried.tags else "rolled back"
        return decide(
            False,
            f"{what} data changed since champion v{champion.version}, but v{tried.version} was "
            f"already trained on this data and is not the champion ({why}); force to retry",
        )
    return decide(True, f"{what} data changed since champion v{champion.version} was trained")


should_retrain_task = task(name="should-retrain", retries=2, retry_delay_seconds=5)(should_retrain)
