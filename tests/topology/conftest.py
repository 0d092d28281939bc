"""Session-wide servers of the production topology on loopback, started once: one
throw-away PostgreSQL cluster holding the MLflow store, MLflow's auth database and the
Prefect database; `mlflow server --app-name basic-auth --serve-artifacts` and
`prefect server start` (basic auth) on it. Skipped with one line where PostgreSQL or the
drivers are missing."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.topology.servers import (
    MlflowServer, Postgres, PrefectServer, mlflow_server, postgres_cluster, prefect_server, why_no_postgres,
)

PSYCOPG2 = "postgresql+psycopg2"  # SQLAlchemy 2 picks psycopg 3 for a bare postgresql://
DATABASES = ("mlflow", "mlflow_auth", "prefect")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    reason = why_no_postgres()
    if reason is None and importlib.util.find_spec("psycopg2") is None:
        reason = "psycopg2 not installed (pip install '.[dev]')"
    if reason:
        pytest.skip(reason)
    with postgres_cluster(DATABASES) as pg:
        yield pg


@pytest.fixture(scope="session")
def servers(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowServer, PrefectServer]]:
    """Both servers, started side by side (each takes 40-80 s on a busy 2-core machine)."""
    if importlib.util.find_spec("flask_wtf") is None:
        pytest.skip("MLflow's basic-auth app needs Flask-WTF (pip install '.[dev]')")
    with contextlib.ExitStack() as stack:
        mlflow = stack.enter_context(mlflow_server(
            postgres.url("mlflow", PSYCOPG2), postgres.url("mlflow_auth", PSYCOPG2),
            tmp_path_factory.mktemp("mlflow-server"), wait=False))
        prefect = stack.enter_context(prefect_server(
            postgres.url("prefect", "postgresql+asyncpg"), tmp_path_factory.mktemp("prefect-server"), wait=False))
        mlflow.wait_ready()
        prefect.wait_ready()
        yield mlflow, prefect


@pytest.fixture(scope="session")
def mlflow_pg(servers: tuple[MlflowServer, PrefectServer]) -> MlflowServer:
    return servers[0]


@pytest.fixture(scope="session")
def prefect_pg(servers: tuple[MlflowServer, PrefectServer]) -> PrefectServer:
    return servers[1]
