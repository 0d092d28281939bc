"""The "data unchanged" fast path of the data stage: `dvc repro prepare` is skipped only
when nothing it reads or writes changed since it last ran, and runs after any change."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tasks import data as data_stage
from transfer.config import load_params


def _dvc_calls(monkeypatch) -> list[tuple[str, ...]]:
    """Record each real `dvc` invocation (the call still runs)."""
    calls: list[tuple[str, ...]] = []
    real = data_stage.run_dvc

    def recording(*args: str, root: str | Path = ".") -> str:
        calls.append(args)
        return real(*args, root=root)

    monkeypatch.setattr(data_stage, "run_dvc", recording)
    return calls


def _edit_params(edit) -> None:
    spec = yaml.safe_load(Path("params.yaml").read_text())
    edit(spec)
    Path("params.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def test_unchanged_data_skips_dvc_and_any_change_runs_it(dvc_repo: Path, monkeypatch) -> None:
    _edit_params(lambda spec: spec["data"]["source"].update(n=100))  # fewer files for DVC to hash
    calls = _dvc_calls(monkeypatch)
    params = load_params("params.yaml")
    first = data_stage.version_data(params)
    assert calls == [("repro", "prepare")] and first["dvc"] and first["target"]["dvc_md5"]
    assert data_stage.repro_unchanged()

    again = data_stage.version_data(params)
    assert calls == [("repro", "prepare")], "an unchanged workspace ran dvc again"
    assert again == first

    image = next(Path("data/target").rglob("*.png"))
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: DVC must look
    assert not data_stage.repro_unchanged()
    data_stage.version_data(params)
    assert len(calls) == 2 and data_stage.repro_unchanged()

    _edit_params(lambda spec: spec["data"]["target"].update(val_fraction=0.2))  # DVC re-prepares the target
    changed = data_stage.version_data(load_params("params.yaml"))
    assert len(calls) == 3
    assert changed["target"]["dvc_md5"] != first["target"]["dvc_md5"]
    assert changed["source"]["dvc_md5"] == first["source"]["dvc_md5"]
