"""Scheduled retraining retrains only when the data version moved, then gates as usual."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from transfer.errors import TransferError

NAME = "digits-transfer"


def _fingerprint(target_version: str, target_md5: str | None = "m1") -> dict:
    return {"source": {"version": "s", "dvc_md5": "s1"},
            "target": {"version": target_version, "dvc_md5": target_md5}}


def test_changed_datasets_compares_content_version_and_dvc_md5() -> None:
    from tasks.retrain import changed_datasets

    champion = _fingerprint("t")
    assert changed_datasets(champion, _fingerprint("t")) == []
    assert changed_datasets(champion, _fingerprint("t2")) == ["target"]
    assert changed_datasets(champion, _fingerprint("t", "m2")) == ["target"]
    # Data prepared outside DVC has no md5: the content version alone decides.
    assert changed_datasets(champion, _fingerprint("t", None)) == []


def test_cron_expressions_are_validated_before_serving() -> None:
    from flows.retrain import retrain_flow
    from flows.serve_schedule import serve_kwargs, validate_cron

    assert validate_cron(" 0 3 * * 1 ") == "0 3 * * 1"
    for bad in ("61 * * * *", "* * * *", "every night", "", None):
        with pytest.raises(TransferError, match="invalid cron expression"):
            validate_cron(bad)
    from transfer.config import params_from_dict

    kwargs = serve_kwargs("params.yaml", ["finetune.epochs=3"], params=params_from_dict({}))
    assert kwargs["cron"] == "0 3 * * *"  # schedule.cron
    deployment = retrain_flow.to_deployment(**{**kwargs, "cron": "*/30 * * * *"})
    assert deployment.name == "retrain-schedule"
    assert [s.schedule.cron for s in deployment.schedules] == ["*/30 * * * *"]
    assert deployment.parameters == {"params_file": str(Path("params.yaml").resolve()),
                                     "overrides": ["finetune.epochs=3"], "force": False}


def _versions() -> int:
    return len(MlflowClient().search_model_versions(f"name='{NAME}'"))


def _merge(into: dict, changes: dict) -> dict:
    for key, value in changes.items():
        into[key] = _merge(into[key], value) if isinstance(value, dict) else value
    return into


def _edit_params(repo: Path, **changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, changes), sort_keys=False))


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_retrain_only_when_data_changed(dvc_repo: Path) -> None:
    from flows.retrain import retrain_flow

    client = MlflowClient()
    first = retrain_flow()
    assert first["retrained"] and first["reason"] == "no champion yet" and first["promoted"], first
    assert _versions() == 1

    same = retrain_flow()
    assert not same["retrained"] and "unchanged" in same["reason"], same
    assert same["champion_data"] == same["current_data"]
    assert _versions() == 1  # nothing trained, nothing registered

    # A new test split is a new target dataset: `dvc repro prepare` re-runs, the md5 moves.
    # min_delta=1 makes the champion gate fail, so this retrain is gated out for sure.
    _edit_params(dvc_repo, data={"target": {"test_size": 320}}, promote={"min_delta": 1.0})
    changed = retrain_flow()
    assert changed["retrained"] and changed["changed"] == ["target"], changed
    assert changed["current_data"]["target"]["dvc_md5"] != first["current_data"]["target"]["dvc_md5"]
    assert _versions() == 2
    version = client.get_model_version(NAME, changed["model_version"])
    assert not changed["promoted"] and "champion" in version.tags["rejected"]  # the gates ran
    assert version.tags["data.target.dvc_md5"] == changed["current_data"]["target"]["dvc_md5"]
    assert client.get_registered_model(NAME).aliases["champion"] == first["model_version"]

    # The same data again: the champion's data still differs, but this data was already
    # tried and rejected; retraining would give the same model, so it waits for new data.
    again = retrain_flow()
    assert not again["retrained"] and "already trained on this data" in again["reason"], again
    assert _versions() == 2

    _edit_params(dvc_repo, promote={"min_delta": 0.0})
    forced = retrain_flow(force=True)
    assert forced["retrained"] and forced["reason"] == "forced" and forced["source_reused"], forced
    assert _versions() == 3
    # through the same gates: the decision, the version's tags and the aliases agree
    tags = client.get_model_version(NAME, forced["model_version"]).tags
    champion = client.get_registered_model(NAME).aliases["champion"]
    if forced["promoted"]:
        assert tags.get("promoted") == "true" and "rejected" not in tags and champion == forced["model_version"]
    else:
        assert tags["rejected"] and "promoted" not in tags and champion == first["model_version"]

