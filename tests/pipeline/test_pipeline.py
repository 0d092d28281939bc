"""End to end on tiny data: real Prefect (test harness), MLflow (sqlite in tmp), DVC, GX."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import TINY_PARAMS, write_yaml
from transfer.config import load_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
NAME = "digits-transfer"


def _run(overrides: list[str] | None = None) -> dict:
    from flows.pipeline import transfer_pipeline

    return transfer_pipeline(params_file="params.yaml", overrides=overrides or [])


def _aliases(client: MlflowClient) -> dict[str, str]:
    return dict(client.get_registered_model(NAME).aliases)


def _png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_promote_reject_rollback_and_serve_batch(dvc_repo: Path) -> None:
    # A first model with an untrained head: the first version passes on the floor alone.
    weak = _run(["finetune.epochs=0", "promote.require_beats_scratch=false"])
    client = MlflowClient()
    assert weak["promoted"], weak
    assert weak["dvc_tracked"] and len(weak["target_data_version"]) >= 32
    assert (dvc_repo / "dvc.lock").exists()  # the data version came from `dvc repro prepare`

    # A clearly better challenger (trained head) moves the champion: significant on the paired test.
    first = _run()
    assert first["source_reused"]
    assert first["promoted"], first
    assert _aliases(client) == {"champion": first["model_version"], "previous": weak["model_version"]}
    assert "significant gain" in first["gain_paired"] and "McNemar p" in first["gain_paired"]

    # An identical rerun (same data, params, code) never moves the champion; the reason says why.
    second = _run()
    assert not second["promoted"], second
    reason = client.get_model_version(NAME, second["model_version"]).tags["rejected"]
    assert reason.startswith("kept champion: +0.000, 95% CI [+0.000, +0.000], McNemar p = 1.000"), reason
    assert _aliases(client) == {"champion": first["model_version"], "previous": weak["model_version"]}

    # A worse model (no fine-tuning epochs) is registered but rejected; champion stays.
    worse = _run(["finetune.epochs=0"])
    assert not worse["promoted"]
    version = client.get_model_version(NAME, worse["model_version"])
    assert "kept champion: -" in version.tags["rejected"]
    assert _aliases(client)["champion"] == first["model_version"]

    # Every version traces back to its data and source weights.
    tags = client.get_model_version(NAME, first["model_version"]).tags
    assert tags["data.target.dvc_md5"] == first["target_data_version"]
    assert len(tags["source_weights_sha256"]) == 64

    # Rollback swaps champion and previous.
    from tasks.promote import rollback

    rollback(load_params("params.yaml"))
    assert _aliases(client) == {"champion": weak["model_version"], "previous": first["model_version"]}

    # The champion loads by alias and predicts a batch of several images, with class names.
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    digits = [np.asarray(Image.open(p)) for p in sorted((dvc_repo / "data/target/3").glob("*.png"))[:5]]
    out = model.predict(pd.DataFrame({"image": [_png_b64(d) for d in digits]}))
    assert len(out) == 5
    assert set(out["label"]) <= {str(i) for i in range(10)}

    # The parent run carries the data version, plots and the summary.
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.tags["data.target.dvc_md5"] == first["target_data_version"]
    assert run.info.run_name == f"full k=5 v{first['model_version']} promoted"
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"source-fonts", "target-sklearn_digits"}
    assert first["target_data_version"].startswith(inputs["target-sklearn_digits"].digest)
    artifacts = {a.path for a in client.list_artifacts(first["mlflow_run_id"], "plots")}
    assert "plots/transfer_gain.png" in artifacts and "plots/confusion_transfer.png" in artifacts
    assert {"plots/reliability_transfer.png", "plots/reliability_transfer_uncalibrated.png",
            "plots/learning_curves.png"} <= artifacts
    metrics = run.data.metrics
    assert metrics["test_accuracy_ci_low"] < metrics["test_accuracy"] < metrics["test_accuracy_ci_high"]
    assert metrics["transfer_gain_ci_low"] <= metrics["transfer_gain"] <= metrics["transfer_gain_ci_high"]

    # The served probabilities carry the temperature fitted on val (rollback put weak back: re-point).
    from tasks.promote import rollback as swap

    swap(load_params("params.yaml"))
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": [_png_b64(d) for d in digits]}))
    meta_t = float(client.get_model_version(NAME, first["model_version"]).tags["temperature"])
    from transfer.predict import Predictor
    from tasks.adapters.tracking import downloaded

    with downloaded(f"models:/{NAME}/{first['model_version']}") as model_dir:
        predictor = Predictor.from_dir(model_dir)
        assert predictor.temperature == pytest.approx(meta_t) and meta_t != 1.0
        uncalibrated = Predictor.from_dir(model_dir)
        uncalibrated.temperature = 1.0
        raw = uncalibrated.predict([_png_b64(d) for d in digits])
    assert [r["probability"] for r in predictor.predict([_png_b64(d) for d in digits])] == pytest.approx(
        list(served["probability"]))
    assert list(served["probability"]) != pytest.approx([r["probability"] for r in raw])


def _imagefolder(root: Path, classes: int = 3, per_class: int = 14, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            img = np.zeros((size, size), np.uint8)
            img[:, c * 4 : c * 4 + 4] = 200 + rng.integers(0, 55)
            img[rng.integers(0, size), rng.integers(0, size)] = rng.integers(0, 255)
            Image.fromarray(img).save(root / str(c) / f"{i}.png")
    return root


def test_corrupt_image_fails_validation_and_registers_nothing(dvc_repo: Path, tmp_path: Path) -> None:
    from tasks.validate import DataValidationError

    user_data = _imagefolder(tmp_path / "user")
    (user_data / "1" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    params = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"],
                                      "target": {"kind": "imagefolder", "path": str(user_data), "test_size": 0.3}}}
    write_yaml(dvc_repo / "params.yaml", params)
    with pytest.raises(DataValidationError) as error:
        _run()
    assert "1/5.png" in str(error.value)
    client = MlflowClient()
    assert client.search_model_versions(f"name='{NAME}'") == []
    failed = client.search_runs([client.get_experiment_by_name("transfer-pipeline").experiment_id],
                                filter_string="tags.stage = 'pipeline'")
    assert failed[0].info.status == "FAILED"
    assert any(a.path.startswith("validation") for a in client.list_artifacts(failed[0].info.run_id))


def test_bad_override_fails_before_anything_runs(dvc_repo: Path) -> None:
    from transfer.config import ConfigError

    with pytest.raises(ConfigError, match="finetune.nope"):
        _run(["finetune.nope=1"])
    assert not (dvc_repo / "data").exists()


def test_crash_in_finetune_leaves_registry_alone_and_rerun_resumes(
    dvc_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transfer import stages
    from transfer.strategies import freeze
    from transfer.train import CrashAfterEpoch

    real_fit, calls, resumed = stages.fit, [], []

    def flaky_fit(*args, **kwargs):
        if not kwargs.get("desc", "").startswith("finetune"):
            return real_fit(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the machine dies after epoch 2 ...
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), CrashAfterEpoch(2)]
        elif len(calls) <= 3:  # ... and the task's two retries find it still gone
            raise RuntimeError("worker lost")
        result = real_fit(*args, **kwargs)
        resumed.append(result.resumed_from_epoch)
        return result

    monkeypatch.setattr(stages, "fit", flaky_fit)
    monkeypatch.setattr(freeze, "fit", flaky_fit)  # the fine-tune strategies call fit from there
    with pytest.raises(RuntimeError, match="worker lost"):
        _run()
    assert len(calls) == 3  # first try + 2 retries with backoff
    client = MlflowClient()
    assert client.search_model_versions(f"name='{NAME}'") == []  # nothing registered, no alias

    summary = _run()  # rerun: source model reused, fine-tune resumes at its checkpoint
    assert summary["source_reused"] and resumed == [2, 0]  # seed 0 resumes; seed 1 never started
    assert summary["promoted"] and _aliases(client) == {"champion": summary["model_version"]}
