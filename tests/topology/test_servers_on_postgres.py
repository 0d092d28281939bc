"""The production topology's servers for real, on loopback: MLflow (PostgreSQL store,
basic-auth, proxied artifacts) and Prefect (PostgreSQL, basic auth), one PostgreSQL cluster.

Two "machines" (two working directories, two `transfer run` processes, nothing shared but
the servers) run the pipeline at once with a secret planted in their environment: the
promotions are serialised by the Prefect server's global concurrency limit, the champion
loads over HTTP from a third directory, and no secret reaches MLflow, the logs or the
report. Unauthenticated (and read-only) clients cannot register a version or move an alias.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.topology.servers import (
    MODEL_NAME, MlflowServer, PrefectServer, check_serialised_promotions, clean_env, decision_of, http_json,
    machine, tracked_text,
)
from tasks.adapters.mlflow_users import ensure_user
from tasks.promote import concurrency_limit_name

pytestmark = [pytest.mark.slow, pytest.mark.server]

LOAD_CHAMPION = """
import json, sys, numpy as np, pandas as pd, mlflow
from PIL import Image
from tests.pipeline.test_pipeline import _png_b64
model = mlflow.pyfunc.load_model("models:/{name}@champion")
images = [_png_b64(np.asarray(Image.open(p))) for p in sys.argv[1:]]
print(json.dumps(list(model.predict(pd.DataFrame({{"image": images}}))["label"])))
"""


@pytest.fixture
def as_user(mlflow_pg: MlflowServer, monkeypatch: pytest.MonkeyPatch):
    """An MlflowClient of this process for a given user (None: no credentials)."""
    def client(user: tuple[str, str] | None) -> MlflowClient:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(key, raising=False)
        for key, value in mlflow_pg.client_env(user).items():
            monkeypatch.setenv(key, value)
        return MlflowClient(mlflow_pg.url, mlflow_pg.url)
    return client


def _prefect_logs(prefect: PrefectServer) -> str:
    """Every log line the Prefect server holds (flow and task runs of both machines)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect.api_url, PREFECT_API_AUTH_STRING: prefect.auth_string}):
        from prefect import get_client

        with get_client(sync_client=True) as client:
            assert isinstance(client, SyncPrefectClient)
            lines, offset = [], 0
            while batch := client.read_logs(LogFilter(), limit=200, offset=offset):
                lines += [entry.message for entry in batch]
                offset += len(batch)
            flow_runs = client.read_flow_runs()
            limit = client.read_global_concurrency_limit_by_name(concurrency_limit_name(MODEL_NAME))
    assert len(flow_runs) >= 2 and all(r.state.is_completed() for r in flow_runs), [
        (r.name, r.state) for r in flow_runs]
    assert limit.limit == 1 and limit.active_slots == 0  # held during promotion only, released
    return "\n".join(lines)


def _files_text(*paths: Path) -> str:
    """The bytes of every file at or under ``paths`` (git's object store aside), as text."""
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*"))
             if p.is_file() and ".git" not in p.parts]
    return "\n".join(p.read_bytes().decode("latin-1") for p in files)


def test_two_machines_run_promote_and_serve_through_the_authenticated_servers(
    mlflow_pg: MlflowServer, prefect_pg: PrefectServer, postgres, tmp_path: Path, as_user
) -> None:
    planted = {"TRANSFER_PLANTED_TOKEN": secrets.token_hex(20),
               "DATABASE_URL": f"postgresql://app:{secrets.token_hex(12)}@db.internal:5432/app"}
    machines = [machine(tmp_path / name, mlflow_pg, prefect_pg, planted) for name in ("machine-a", "machine-b")]
    procs = [m.start_run() for m in machines]  # at once: their promotions race for the lock
    for m, proc in zip(machines, procs):
        m.finish(proc)

    client = as_user(mlflow_pg.pipeline)
    experiment = client.get_experiment_by_name("transfer-pipeline")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'pipeline'")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    decisions = [decision_of(client, r.info.run_id) for r in parents]
    check_serialised_promotions(client, decisions)
    assert sum(d["promoted"] for d in decisions) >= 1, decisions
    assert all(d["serialised_by"].startswith(f"prefect concurrency limit {concurrency_limit_name(MODEL_NAME)}")
               for d in decisions), decisions

    # Artifacts went through the server: its destination holds them, no client wrote any.
    all_runs = client.search_runs([experiment.experiment_id])
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in all_runs)
    assert any(mlflow_pg.artifacts.rglob("MLmodel"))
    for m in machines:
        local_store = m.root / "mlruns"
        assert not local_store.exists() or {p.name for p in local_store.iterdir()} <= {
            f".promote-{MODEL_NAME}.lock"}, list(local_store.iterdir())

    # The champion loads and predicts over HTTP from a directory that holds nothing.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    images = sorted((machines[0].root / "data/target/3").glob("*.png"))[:3]
    env = {**clean_env(), **mlflow_pg.client_env(mlflow_pg.pipeline), "PYTHONPATH": str(REPO)}
    loaded = subprocess.run([sys.executable, "-c", LOAD_CHAMPION.format(name=MODEL_NAME), *map(str, images)],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert len(json.loads(loaded.stdout.strip().splitlines()[-1])) == 3
    assert list(elsewhere.iterdir()) == []

    # No secret anywhere: planted ones, and the real credentials the runs were given.
    leaked = [*planted.values(), planted["DATABASE_URL"].split(":")[2].split("@")[0],
              mlflow_pg.pipeline[1], mlflow_pg.admin[1], prefect_pg.auth_string.split(":", 1)[1],
              postgres.password]
    haystacks = {
        "MLflow (params, tags, artifacts)": tracked_text(client, [r.info.run_id for r in all_runs],
                                                         tmp_path / "downloaded"),
        "run output": "\n".join(m.outputs[-1] for m in machines),
        "Prefect logs": _prefect_logs(prefect_pg),
        "workspace files (reports, artifacts, metrics)": _files_text(*(m.root for m in machines)),
        "server logs": _files_text(mlflow_pg.log, prefect_pg.log),
    }
    for where, text in haystacks.items():
        assert len(text) > 1000, where  # there really is something to search
        found = [s[:6] + "..." for s in leaked if s in text]
        assert not found, f"secret(s) {found} found in {where}"


def test_only_authenticated_writers_register_versions_or_move_the_champion(
    mlflow_pg: MlflowServer, as_user, tmp_path: Path
) -> None:
    name = "auth-probe"
    owner = as_user(mlflow_pg.pipeline)  # the pipeline's user creates and so owns the model
    run = owner.create_run(owner.create_experiment(f"auth-probe-{secrets.token_hex(4)}"))
    (tmp_path / "weights.txt").write_text("weights")
    owner.log_artifact(run.info.run_id, str(tmp_path / "weights.txt"), "model")
    owner.create_registered_model(name)
    source = f"{run.info.artifact_uri}/model"
    first = owner.create_model_version(name, source, run.info.run_id)
    owner.set_registered_model_alias(name, "champion", first.version)

    reader = ("reader", secrets.token_urlsafe(12))
    as_user(mlflow_pg.admin)  # tasks.adapters.mlflow_users runs as the admin, like compose's mlflow-users
    assert ensure_user(mlflow_pg.url, *reader) and not ensure_user(mlflow_pg.url, *reader)  # idempotent
    refused = {"no credentials": (None, 401), "wrong password": ((mlflow_pg.pipeline[0], "wrong"), 401),
               "read-only user": (reader, 403)}
    for who, (user, status) in refused.items():
        api = f"{mlflow_pg.url}/api/2.0/mlflow"
        assert http_json(f"{api}/model-versions/create", {"name": name, "source": source, "run_id": run.info.run_id},
                         user)[0] == status, who
        assert http_json(f"{api}/registered-models/alias", {"name": name, "alias": "champion", "version": "1"},
                         user)[0] == status, who
        # ... and through MLflow's own client, as a pipeline without the env vars would
        with pytest.raises(MlflowException, match="not authenticated|Permission denied|PERMISSION_DENIED|401|403"):
            as_user(user).set_registered_model_alias(name, "champion", first.version)
    assert http_json(f"{mlflow_pg.url}/api/2.0/mlflow/registered-models/get?name={name}", None, reader,
                     method="GET")[0] == 200  # reading is what default_permission READ allows

    owner = as_user(mlflow_pg.pipeline)
    second = owner.create_model_version(name, source, run.info.run_id)
    owner.set_registered_model_alias(name, "champion", second.version)
    assert owner.get_registered_model(name).aliases == {"champion": second.version}
    assert len(owner.search_model_versions(f"name='{name}'")) == 2  # the refused ones left nothing
