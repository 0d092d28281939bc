"""Start-up times of the production topology's servers on loopback (PostgreSQL, MLflow on
it with basic-auth and proxied artifacts, Prefect on it with basic auth), and one pipeline run
(tests/topology's small params) against them vs the same run on a local sqlite store with
Prefect's temporary API. Prints a markdown table; `--out FILE` also writes it.

    python benchmarks/topology_servers.py [--out benchmarks/results/topology_servers.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.topology.servers import (  # noqa: E402
    TOPOLOGY_PARAMS, Machine, clean_env, machine, mlflow_server, postgres_cluster, prefect_server,
)
from tests.conftest import BIN, init_workspace  # noqa: E402

PSYCOPG2 = "postgresql+psycopg2"


def timed_run(root: Path, env: dict[str, str]) -> float:
    m = Machine(root=root, env=env)
    start = time.monotonic()
    m.finish(m.start_run())
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        # the same run on a local sqlite store, Prefect's temporary API (the default)
        local = init_workspace(work / "local", work / "local-remote", TOPOLOGY_PARAMS)
        env = {**clean_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'local-mlflow.db'}"}
        rows.append(("pipeline run, sqlite store + temporary Prefect API", timed_run(local, env)))

        pg = stack.enter_context(postgres_cluster(("mlflow", "mlflow_auth", "prefect")))
        rows.append(("PostgreSQL: initdb + start", pg.started_s))
        mlflow = stack.enter_context(mlflow_server(pg.url("mlflow", PSYCOPG2), pg.url("mlflow_auth", PSYCOPG2),
                                                   work / "mlflow"))
        rows.append(("MLflow server (new PostgreSQL schema, basic-auth) until /health", mlflow.started_s))
        prefect = stack.enter_context(prefect_server(pg.url("prefect", "postgresql+asyncpg"), work / "prefect"))
        rows.append(("Prefect server (new PostgreSQL schema, basic auth) until /api/health", prefect.started_s))
        remote = machine(work / "remote", mlflow, prefect)
        rows.append(("pipeline run, MLflow + Prefect on PostgreSQL with auth", timed_run(remote.root, remote.env)))
    table = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}", "",
             "| what | seconds |", "|---|---|", *[f"| {what} | {secs:.1f} |" for what, secs in rows]]
    text = "\n".join(table)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
