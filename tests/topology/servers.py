"""The production topology's servers on loopback, reusable by any test (host or container):
a throw-away PostgreSQL cluster, `mlflow server` on it (basic-auth, proxied artifacts) and
`prefect server start` on it (basic auth), plus helpers to run the pipeline against them as
one "machine" (its own working directory and environment) and to check the registry after
several machines promoted at once.

Every daemon is started by this module and stopped by PID (pg_ctl for PostgreSQL, the
process group for the others)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import BIN, REPO, TINY_PARAMS, free_port, init_workspace
from tests.pipeline.test_prefect_server import _healthy, _start, _stop, _tail

START_TIMEOUT_S = 300  # MLflow's auth app on a busy 2-core machine: 80 s and more
PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")
PIPELINE_USER = "pipeline"
MODEL_NAME = "digits-transfer"
# Smaller than TINY_PARAMS: two runs share 2 cores here; one seed, no scratch baseline.
TOPOLOGY_PARAMS = {
    **TINY_PARAMS,
    "pretrain": {**TINY_PARAMS["pretrain"], "epochs": 2},
    "finetune": {**TINY_PARAMS["finetune"], "epochs": 3, "seeds": 1, "scratch_baseline": False},
    "promote": {**TINY_PARAMS["promote"], "require_beats_scratch": False},
    "runtime": {**TINY_PARAMS["runtime"], "num_threads": 1},  # two runs, two cores: no oversubscription
}
RUN_TIMEOUT_S = 900


def pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((str(Path(d) / name) for d in PG_BIN_DIRS if (Path(d) / name).exists()), None)


def why_no_postgres() -> str | None:
    """None when a throw-away cluster can be started here, else the one-line reason."""
    if not (pg_tool("initdb") and pg_tool("pg_ctl")):
        return "PostgreSQL (initdb, pg_ctl) not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: initdb refuses root"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no unprivileged 'postgres' user for initdb"
    return None


def wait_until(check: Any, proc: subprocess.Popen | None, log: Path, what: str,
               timeout_s: float = START_TIMEOUT_S) -> float:
    """Poll ``check()`` until true; returns the seconds it took. Fails with the log's tail
    if the process exits or the deadline passes."""
    start = time.monotonic()
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"{what} not up within {timeout_s} s:\n{_tail(log)}")
        time.sleep(0.5)
    return time.monotonic() - start


# ---------------------------------------------------------------- PostgreSQL
@dataclass
class Postgres:
    """One cluster on 127.0.0.1:port (password auth over TCP), socket in its own dir."""

    root: Path
    port: int
    password: str
    started_s: float = 0.0
    user: str = "postgres"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        _as_owner([pg_tool("createdb") or "createdb", "-h", str(self.root / "socket"),
                   "-p", str(self.port), "-U", self.user, name])


def _as_owner(cmd: list[str]) -> subprocess.CompletedProcess:
    """initdb/pg_ctl refuse root: run them as the unprivileged ``postgres`` user then."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def postgres_cluster(databases: tuple[str, ...]) -> Iterator[Postgres]:
    """initdb in a fresh temp dir (owned by the cluster's user), start on a free loopback
    port with scram password auth over TCP, create ``databases``; stop and delete at exit."""
    root = Path(tempfile.mkdtemp(prefix="topology-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    pg = Postgres(root=root, port=free_port(), password=secrets.token_hex(16))
    data, socket_dir, pwfile = root / "data", root / "socket", root / "pwfile"
    _as_owner(["mkdir", "-p", str(socket_dir)])
    _as_owner(["sh", "-c", f"umask 077; printf %s {pg.password} > {pwfile}"])
    started = time.monotonic()
    _as_owner([pg_tool("initdb"), "-D", str(data), "-U", pg.user, f"--pwfile={pwfile}",
               "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-instructions"])
    (root / "pwfile").unlink()
    options = f"-p {pg.port} -k {socket_dir} -h 127.0.0.1 -c fsync=off -c max_connections=200"
    try:
        _as_owner([pg_tool("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                   "-w", "-t", "60", "start"])
        pg.started_s = time.monotonic() - started
        for name in databases:
            pg.create_database(name)
        yield pg
    finally:
        if (data / "postmaster.pid").exists():
            _as_owner([pg_tool("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _daemon(proc: subprocess.Popen, server: Any, base_url: str, started: float, wait: bool,
            then: Any = None) -> Iterator[None]:
    """Give ``server`` its ``wait_ready()`` (``base_url``/health answers, then ``then()``),
    call it unless ``wait`` is False, and stop ``proc`` at exit whatever happens."""
    def ready() -> None:
        wait_until(lambda: _healthy(base_url), proc, server.log, type(server).__name__)
        server.started_s = time.monotonic() - started
        if then is not None:
            then()

    server.wait_ready = ready
    try:
        if wait:
            ready()
        yield
    finally:
        _stop(proc)


# ---------------------------------------------------------------- MLflow (basic-auth)
@dataclass
class MlflowServer:
    url: str
    admin: tuple[str, str]
    pipeline: tuple[str, str]
    artifacts: Path
    log: Path
    started_s: float = 0.0
    wait_ready: Any = None

    def client_env(self, user: tuple[str, str] | None) -> dict[str, str]:
        """MLflow's standard client variables for ``user`` (None: unauthenticated)."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        if user is not None:
            env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
        return env


def basic_auth_ini(path: Path, database_uri: str) -> Path:
    """The auth app's config: its own user database; every signed-in user may read what
    it does not own (default_permission READ); the admin comes from MLFLOW_AUTH_ADMIN_*."""
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # one PBKDF2 check per user a minute, not per request
    )
    return path


@contextmanager
def mlflow_server(backend_uri: str, auth_db_uri: str, workdir: Path, wait: bool = True) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth` on ``backend_uri`` with proxied artifacts in
    ``workdir/artifacts``; a ``pipeline`` user is created through the admin API once it is
    up (``wait=False``: yields at once, call ``server.wait_ready()`` before use)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    admin = ("admin", secrets.token_urlsafe(18))
    server = MlflowServer(url=f"http://127.0.0.1:{port}", admin=admin,
                          pipeline=(PIPELINE_USER, secrets.token_urlsafe(18)),
                          artifacts=workdir / "artifacts", log=workdir / "mlflow.log")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(basic_auth_ini(workdir / "basic_auth.ini", auth_db_uri)),
           "MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),  # CSRF key, required
           # the store URI holds the database password: by environment, not on the command line (ps)
           "MLFLOW_BACKEND_STORE_URI": backend_uri,
           # the server's own artifact I/O must not read a client's credentials
           "MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""}
    started = time.monotonic()
    proc = _start([str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--serve-artifacts",
                   "--artifacts-destination", str(server.artifacts),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                  server.log, cwd=workdir, env=env)
    with _daemon(proc, server, server.url, started, wait, lambda: create_mlflow_user(server, *server.pipeline)):
        yield server


def create_mlflow_user(server: MlflowServer, username: str, password: str) -> None:
    """A user through the auth app's admin REST API (as the admin)."""
    status, body = http_json(f"{server.url}/api/2.0/mlflow/users/create",
                             {"username": username, "password": password}, server.admin)
    if status != 200:
        raise RuntimeError(f"creating MLflow user {username}: HTTP {status} {body}")


def http_json(url: str, payload: dict[str, Any] | None, user: tuple[str, str] | None,
              method: str = "POST") -> tuple[int, str]:
    """(status, body) of one JSON request, with basic auth when ``user`` is given."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(user).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


# ---------------------------------------------------------------- Prefect (basic auth)
@dataclass
class PrefectServer:
    api_url: str
    auth_string: str
    log: Path
    home: Path
    started_s: float = 0.0
    wait_ready: Any = None

    def client_env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url, "PREFECT_API_AUTH_STRING": self.auth_string}


@contextmanager
def prefect_server(database_url: str, workdir: Path, wait: bool = True) -> Iterator[PrefectServer]:
    """`prefect server start` on ``database_url`` (postgresql+asyncpg://) with basic auth
    (``wait=False``: yields at once, call ``server.wait_ready()`` before use)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = PrefectServer(api_url=f"http://127.0.0.1:{port}/api",
                           auth_string=f"pipeline:{secrets.token_urlsafe(18)}",
                           log=workdir / "prefect.log", home=workdir / "home")
    env = {**clean_env(), "PREFECT_HOME": str(server.home),
           "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
           "PREFECT_SERVER_API_AUTH_STRING": server.auth_string,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    started = time.monotonic()
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                   "--no-ui"], server.log, cwd=workdir, env=env)
    with _daemon(proc, server, server.api_url, started, wait):
        yield server


def clean_env() -> dict[str, str]:
    """This process's env without any Prefect/MLflow client settings (a test harness or an
    earlier test may have set them): each machine gets exactly what it is given."""
    drop = ("PREFECT_API_", "MLFLOW_TRACKING_", "MLFLOW_REGISTRY_", "PREFECT_HOME")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# ---------------------------------------------------------------- one "machine"
@dataclass
class Machine:
    """A working directory + environment that runs the pipeline as one host would."""

    root: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    def start_run(self, *args: str) -> subprocess.Popen:
        log = (self.root.parent / f"{self.root.name}-run.log").open("w")
        return subprocess.Popen([str(BIN / "transfer"), "run", *args], cwd=self.root, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)

    def finish(self, proc: subprocess.Popen, timeout_s: float = RUN_TIMEOUT_S) -> str:
        proc.wait(timeout_s)
        out = (self.root.parent / f"{self.root.name}-run.log").read_text(errors="replace")
        self.outputs.append(out)
        if proc.returncode != 0:
            raise AssertionError(f"transfer run on {self.root.name} exited {proc.returncode}:\n{out[-4000:]}")
        return out


def machine(root: Path, mlflow: MlflowServer, prefect: PrefectServer,
            extra_env: dict[str, str] | None = None) -> Machine:
    """A workspace at ``root`` whose runs talk only to the shared servers, as the pipeline user."""
    init_workspace(root, root.parent / f"{root.name}-dvc-remote", TOPOLOGY_PARAMS)
    env = {**clean_env(), **mlflow.client_env(mlflow.pipeline), **prefect.client_env(),
           "PREFECT_HOME": str(root.parent / f"{root.name}-prefect-home"),
           "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           **(extra_env or {})}
    return Machine(root=root, env=env)


# ---------------------------------------------------------------- after the runs
def decision_of(client: Any, run_id: str) -> dict[str, Any]:
    """The promotion decision a pipeline run logged (promotion/decision.json), over HTTP."""
    # through ``client`` (the server), never the fluent API's URI, which an earlier test may have set
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, "promotion/decision.json", tmp)
        return json.loads(Path(local).read_text())


def check_serialised_promotions(client: Any, decisions: list[dict[str, Any]], name: str = MODEL_NAME) -> None:
    """After several runs promoted at once: distinct versions, and the promotions form one
    chain (each compared against the champion the one before left), ending where the
    aliases point: no two runs saw the same old champion, no alias was lost."""
    versions = sorted(int(d["version"]) for d in decisions)
    assert len(set(versions)) == len(decisions), decisions
    registered = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    assert set(versions) <= set(registered), (versions, registered)
    champion, previous = None, None
    for decision in sorted(decisions, key=lambda d: int(d["version"])):  # registration order = lock order
        assert decision["previous_champion"] == champion, (decision, decisions)
        if decision["promoted"]:
            champion, previous = decision["version"], champion
    aliases = dict(client.get_registered_model(name).aliases)
    assert aliases.get("champion") == champion, (aliases, decisions)
    assert aliases.get("previous") == previous, (aliases, decisions)


def tracked_text(client: Any, run_ids: list[str], dst: Path) -> str:
    """Everything one pipeline run left in MLflow, as text: params, tags, metrics' names,
    and every artifact downloaded (model files included)."""
    chunks = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        chunks += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(list(run.data.metrics))]
        (dst / run_id).mkdir(parents=True, exist_ok=True)
        local = Path(client.download_artifacts(run_id, "", str(dst / run_id)))
        chunks += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    return "\n".join(chunks)
