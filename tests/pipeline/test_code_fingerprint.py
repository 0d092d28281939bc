"""Stage outputs are keyed on the code too: an edit to ``transfer/`` retrains, same code reuses.

The stage functions the Prefect tasks wrap run for real (tiny data, real MLflow in a
temp sqlite store); "an edit" is a changed code fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS
from transfer import fingerprint
from transfer.config import params_from_dict

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(dvc_repo: Path):
    from transfer import stages

    raw = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "epochs": 1},
           "finetune": {**TINY_PARAMS["finetune"], "epochs": 2}}
    params = params_from_dict(raw)
    return params, stages.prepare(params, progress=False)


def _edit_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda subpackage=None: "0123456789abcdef")


def test_same_code_reuses_and_an_edit_retrains_every_stage(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.train import _pretrain_cache_key, finetune_target, pretrain_source, train_baseline

    params, data = setup
    cache_key = lambda: _pretrain_cache_key(None, {"params": params, "data": data})  # noqa: E731
    assert cache_key() is None  # nothing trained yet
    source = pretrain_source(params, data, None)
    meta = json.loads((Path(source["model_dir"]) / "model.json").read_text())
    assert not source["reused"] and meta["code_fingerprint"] == fingerprint.code_fingerprint()
    key = cache_key()
    again = pretrain_source(params, data, None)  # same code: the model on disk
    assert again["reused"] and again["model_dir"] == source["model_dir"] and cache_key() == key

    tuned, scratch = finetune_target(params, data, source, None), train_baseline(params, data, None)
    tuned_dir, scratch_dir = Path(tuned["model_dir"]).parent, Path(scratch["model_dir"]).parent
    inputs = json.loads((tuned_dir / "inputs.json").read_text())
    assert inputs[-1]["code_fingerprint"] == fingerprint.code_fingerprint()  # explains the dir
    # finished: no checkpoint that a later run could "resume" into handing back these weights
    for out in (Path(source["model_dir"]).parent, tuned_dir, scratch_dir):
        assert not list(out.rglob("last.pt"))
    again_tuned = finetune_target(params, data, source, None)  # same code + inputs: reused, not retrained
    assert Path(again_tuned["model_dir"]).parent == tuned_dir
    from mlflow.tracking import MlflowClient

    assert MlflowClient().get_run(again_tuned["run_id"]).data.tags["reused"] == "True"
    assert again_tuned["val_accuracy"] == tuned["val_accuracy"] and again_tuned["temperature"] == tuned["temperature"]

    _edit_the_code(monkeypatch)
    assert cache_key() is None  # no Prefect cache hit for the old model
    edited = pretrain_source(params, data, None)
    assert not edited["reused"] and edited["model_dir"] != source["model_dir"]
    meta = json.loads((Path(edited["model_dir"]) / "model.json").read_text())
    assert meta["code_fingerprint"] == "0123456789abcdef"
    retuned = finetune_target(params, data, source, None)  # the same source weights, new code
    assert Path(retuned["model_dir"]).parent != tuned_dir and retuned["epochs"] == 2
    assert Path(train_baseline(params, data, None)["model_dir"]).parent != scratch_dir
