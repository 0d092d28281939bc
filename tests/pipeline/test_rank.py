"""`transfer rank` and `pretrain.source: auto`: real pretraining on tiny data, a real sqlite
MLflow store; the ranking's table, its MLflow artifact and the choice it drives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, TINY_PARAMS, mlflow_uris, write_yaml
from transfer.config import load_params
from transfer.transferability import ESTIMATORS

TRANSFER = str(Path(sys.executable).parent / "transfer")
# half the source images of TINY_PARAMS: the fonts source still ranks far above the random
# body (LEEP about -1.7 against -2.30), which is all the ranking here needs
PARAMS = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "source": {"n": 500}},
          "pretrain": {**TINY_PARAMS["pretrain"], "candidates": ["random"]}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One project: `transfer rank` run once (pretrains the fonts source, registers it)."""
    root = tmp_path_factory.mktemp("rank")
    write_yaml(root / "params.yaml", PARAMS)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # the registry too: an earlier test's in-process run may have exported MLFLOW_REGISTRY_URI
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([TRANSFER, "rank"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"root": root, "uri": uri, "stdout": proc.stdout, "env": env}


def _rank_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("transfer-pipeline")
    return client.search_runs([experiment.experiment_id], "tags.stage = 'rank'", order_by=["attribute.start_time ASC"])


def test_rank_prints_the_table_and_logs_it_to_mlflow(project: dict) -> None:
    client = MlflowClient(project["uri"], registry_uri=project["uri"])
    (run,) = _rank_runs(client)
    ranking = json.loads(Path(client.download_artifacts(run.info.run_id, "ranking/ranking.json")).read_text())
    names = [row["name"] for row in ranking["rows"]]
    assert names == ["source-fonts", "random"]  # the unrelated random body ranks last
    assert load_params(project["root"] / "params.yaml").pretrain.rank_estimator == "auto"
    assert ranking["estimator"] == "leep"  # auto, and every candidate here has its source head
    for row in ranking["rows"]:
        assert all(row[e] is not None for e in ESTIMATORS)
        assert run.data.metrics[f"logme.{row['name']}"] == pytest.approx(row["logme"])
    assert ranking["n_images"] == 5 * 10  # the k labels of the train pool, nothing else
    assert run.data.tags["chosen_source"] == "source-fonts"
    lines = [line for line in project["stdout"].splitlines() if "source-fonts" in line or "random" in line]
    assert lines[0].split("│")[1].strip() == "1" and "source-fonts" in lines[0]
    assert f"best: {ranking['reason']}" in " ".join(project["stdout"].split())


def test_pretrained_source_is_registered_with_its_provenance(project: dict) -> None:
    client = MlflowClient(project["uri"], registry_uri=project["uri"])
    (model,) = client.search_registered_models(filter_string="tags.`transfer.role` = 'source'")
    assert model.name == "source-fonts"
    (version,) = client.search_model_versions("name='source-fonts'")
    assert version.tags["data.source.kind"] == "fonts" and len(version.tags["weights_sha256"]) == 64
    assert version.tags["pretrain_run_id"] == version.run_id


def test_source_auto_uses_the_top_ranked_candidate(project: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.train import pretrain_source
    from transfer.models import load_model_dir

    monkeypatch.chdir(project["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project["uri"])
    params = load_params("params.yaml", ["pretrain.source=auto", "pretrain.candidates=[random, registered]"])
    with mlflow_uris(project["uri"]):  # restored after: later tests read their own store
        source = pretrain_source(params, {}, None)
    client = MlflowClient(project["uri"], registry_uri=project["uri"])
    last = _rank_runs(client)[-1]
    ranking = json.loads(Path(client.download_artifacts(last.info.run_id, "ranking/ranking.json")).read_text())
    top = ranking["rows"][0]
    assert source["chosen_source"] == top["name"] == "source-fonts"
    assert load_model_dir(source["model_dir"])[1]["weights_sha256"] == source["weights_sha256"]
    assert source["choice_reason"].startswith("pretrain.source=auto: source-fonts ranked first of 2 by leep")
    assert "(auto: leep (best audited record))" in source["choice_reason"]
    assert last.data.tags["choice_reason"] in source["choice_reason"]


def test_unknown_candidate_is_one_line(project: dict) -> None:
    proc = subprocess.run([TRANSFER, "rank", "--candidate", "nowhere"], cwd=project["root"], env=project["env"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "source candidate 'nowhere' is not" in proc.stderr and "Traceback" not in proc.stderr
