"""docker-compose.yml describes the topology tests/topology/ runs on the host: PostgreSQL
under MLflow (basic-auth, proxied artifacts) and Prefect (basic auth), a Docker worker and
the model server, every secret from the environment. Checked with the real compose CLI."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.static.test_container_config import REPO, compose, compose_cli, compose_config, example_env

SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_PIPELINE_PASSWORD",
           "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_AUTH_STRING")


@pytest.fixture(scope="module")
def cli() -> list[str]:
    found = compose_cli()
    if found is None:
        pytest.skip("no docker compose CLI here (Debian: apt-get install docker-compose)")
    return found


def test_every_secret_is_required_from_the_environment(cli: list[str]) -> None:
    text = (REPO / "docker-compose.yml").read_text()
    assert set(SECRETS) <= set(example_env())  # .env.example lists them all, empty
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (name, uses)  # no default value
        missing = compose(cli, {k: v for k, v in example_env().items() if k != name}, "config", "-q")
        assert missing.returncode != 0 and name in missing.stderr, (name, missing.stderr)


def test_resolved_topology_wires_postgres_auth_and_proxied_artifacts(cli: list[str]) -> None:
    env = {**example_env(), **{name: f"planted-{name.lower()}" for name in SECRETS}}
    proc = compose(cli, env, "config")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    mlflow = services["mlflow"]
    assert {"--app-name=basic-auth", "--serve-artifacts"} <= set(mlflow["command"])
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"] == (
        "postgresql+psycopg2://transfer:planted-postgres_password@postgres:5432/mlflow")
    assert not any("planted" in part for part in mlflow["command"])  # not on a command line (ps)
    prefect = services["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://transfer:planted-")
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"] == "planted-prefect_auth_string"
    for client in ("gpu-worker", "model-server"):
        environment = services[client]["environment"]
        assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert environment["MLFLOW_TRACKING_PASSWORD"] == "planted-mlflow_pipeline_password"
    assert services["gpu-worker"]["environment"]["PREFECT_API_AUTH_STRING"] == "planted-prefect_auth_string"
    assert "ports" not in services["postgres"]  # the database is reachable from the network only
    for name in ("mlflow", "prefect-server"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_every_image_is_built_here_or_named_in_the_header() -> None:
    compose_file = compose_config()
    header = (REPO / "docker-compose.yml").read_text().split("services:")[0]
    for name, service in compose_file["services"].items():
        if "build" in service:
            continue  # the project image, from ./Dockerfile
        image = service["image"].split(":")[0]
        assert image in header, f"{name}: image {service['image']} neither built nor documented"
