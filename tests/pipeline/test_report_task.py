"""`report_for_run` against what the pipeline really records in MLflow (tiny data).

The real pipeline flow runs (Prefect test harness, MLflow sqlite in a temp dir, outside DVC:
the manifest hash is the data version); the report must find everything from the run alone.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from transfer.config import SweepParams, params_from_dict, write_params
from transfer.errors import TransferError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

RUN_PARAMS = {
    "data": {"image_size": 16, "source": {"n": 600}, "target": {"test_size": 300}},
    "pretrain": {"arch": "tiny_cnn", "epochs": 2, "batch_size": 64},
    "finetune": {"strategy": "auto", "labels_per_class": 5, "epochs": 3, "batch_size": 16, "seeds": 1},
    "validate": {"min_source_ratio": 5.0},  # the report must apply the run's thresholds
    "promote": {"accuracy_floor": 0.0, "require_beats_scratch": False},
    "runtime": {"device": "cpu"},
}


def _pipeline_run(params) -> dict:
    """The pipeline flow itself; returns its summary."""
    from flows.pipeline import transfer_pipeline

    return transfer_pipeline(params=params)


def test_report_for_run_reads_the_run_sweeps_and_logs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from mlflow.tracking import MlflowClient

    from tasks.report import report_for_run

    # The caller's params differ from the run's (image size, k, arch): the run's win.
    caller = params_from_dict({"runtime": {"device": "cpu"}})
    with pytest.raises(TransferError, match="no finished pipeline run"):
        report_for_run(caller, None, tmp_path / "none", [1], ["head"], 1)

    run_params = params_from_dict(RUN_PARAMS)
    summary = _pipeline_run(run_params)
    run_id = summary["mlflow_run_id"]

    paths = report_for_run(caller, None, tmp_path / "report", [1, 5, 1000], ["head"], 1)
    text = paths["html"].read_text()
    for anchor in (
        "summary",
        "data-sizes",
        "transfer-checks",
        "sample-efficiency",
        "confusion-matrices",
        "calibration",
        "provenance",
        "strategy",
    ):
        assert f'<section id="{anchor}">' in text
    assert run_id in text and summary["source_weights_sha256"] in text
    from mlflow.tracking import MlflowClient as _Client

    logged = _Client().get_run(run_id).data.metrics  # the summary cards carry the 95% intervals
    assert f"[{logged['test_accuracy_ci_low']:.3f}, {logged['test_accuracy_ci_high']:.3f}]" in text
    assert f"[{logged['transfer_gain_ci_low']:+.3f}, {logged['transfer_gain_ci_high']:+.3f}]" in text
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) == 4  # curve, 2 confusions, calibration
    assert re.search(r"\d\.\d{3} before, <b>\d\.\d{3}</b> after temperature scaling", text)
    assert "k=1000 skipped" in text and html.escape(summary["strategy_reason"]) in text  # why auto chose it
    data = json.loads(paths["json"].read_text())
    assert data["datasets"]["target"]["labelled_budget"] == 50  # the run's k=5, not the default 10
    assert data["datasets"]["source"]["width"]["median"] == 16  # the run's image size
    assert data["source_model"]["arch"] == "tiny_cnn"
    assert data["source_model"]["initial_weights"]["weights"] == "random"
    assert data["confusion"]["transfer"]["classes"] == [str(i) for i in range(10)]
    assert set(data["sample_efficiency"]["curves"]) == {"scratch", "head"}
    analysis = data["sample_efficiency"]["analysis"]  # over the default 3 seeds, floors beside
    assert analysis["n_seeds"] == 3 and set(analysis["floors"]) == {"logreg", "svc_rbf", "label_spreading"}
    assert "labels_saved" in analysis and "Labels saved" in text
    assert data["summary"]["gain"] == pytest.approx(summary["gain"])
    assert data["notes"] == []
    assert not data["sample_efficiency"]["reused"]  # computed (and kept, keyed) by the sweep function
    assert Path(data["sample_efficiency"]["file"]).name.startswith("sweep-")
    checks = {c["check"]: c for c in data["checks"]}  # transfer.checks, the run's params
    assert "threshold 5x, validate.min_source_ratio" in checks["source_much_larger"]["detail"]

    client = MlflowClient()
    logged = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.html", "report/report.png"} <= logged
    run = client.get_run(run_id)
    assert run.data.tags["report"] == "report/report.html"
    assert "sample_efficiency_head" in run.data.metrics

    # A stage run id leads to its pipeline run; an unknown id is a user error.
    from tasks.report import find_pipeline_run

    stage_runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert stage_runs and all(find_pipeline_run(client, caller, r.info.run_id).info.run_id == run_id
                              for r in stage_runs)
    with pytest.raises(TransferError, match="no MLflow run"):
        report_for_run(caller, "0" * 32, tmp_path / "bad", [1], ["head"], 1)

    # `transfer sweep` (the dvc stage) with the run's params: the same sweep, so it trains
    # nothing; a report after it reads metrics/sweep.json, even with the points gone.
    from tasks.report import params_of_run

    rp, _ = params_of_run(run, caller)
    settings = SweepParams(ks=[1, 5, 1000], strategies=["head"], epochs=1, seeds=3)
    write_params(rp.model_copy(update={"sweep": settings}), tmp_path / "params.yaml")
    proc = subprocess.run(["transfer", "sweep", "--source", data["source_model"]["model_dir"]],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "nothing to train" in proc.stderr, proc.stderr[-2000:]
    shutil.rmtree(tmp_path / "artifacts" / "report" / "sweep")
    proc = subprocess.run(["transfer", "report", "--run-id", run_id, "--out", "again"],  # params.sweep
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "current in metrics/sweep.json (same inputs): nothing to train" in proc.stderr  # says so
    again = json.loads((tmp_path / "again" / "report.json").read_text())["sample_efficiency"]
    assert again["reused"] and again["file"] == "metrics/sweep.json"
    assert not (tmp_path / "artifacts" / "report" / "sweep").exists()  # no point trained again
    assert again["curves"] == data["sample_efficiency"]["curves"]

    # `transfer runs`: the strategy auto resolved to, and the model's name
    from tasks.adapters.history import recent_runs

    row = recent_runs(caller)[0]
    assert row["run_id"] == run_id and row["strategy"] == summary["strategy"] != "auto"
    assert row["model_name"] == summary["model_name"] == "digits-transfer"
    assert row["model_version"] == str(summary["model_version"])

    # The version badge follows the registry now, not the run's record: once the champion
    # alias has moved away (a rollback), this run's version no longer reads as promoted.
    version = summary["model_version"]
    assert summary["promoted"] and f"v{version} (promoted)</div>" in text
    client.delete_registered_model_alias(summary["model_name"], "champion")
    later = report_for_run(caller, run_id, tmp_path / "later", [], [])["html"].read_text()
    assert f"v{version} (promoted, no longer champion: no champion now)</div>" in later
