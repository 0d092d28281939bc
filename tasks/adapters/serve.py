"""Serve a registered model with MLflow's scoring app; predict image files offline.

``transfer serve`` runs ``python -m tasks.adapters.scoring_app -m models:/<name>/<version>`` in this
same Python environment: MLflow's scoring app (what ``mlflow models serve --env-manager local``
runs) behind a guard for the bearer token, body limits and error replies without echo (see
``tasks/adapters/scoring_app.py``). The alias (or ``--version``, or a whole URI) is resolved to one
version first, so the version printed is the version served. The server loads the model once
at start: to serve a newly promoted champion, restart it (see docs/deploy.md).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tasks.adapters.tracking import redact
from transfer.config import Params
from transfer.errors import DataError, TransferError

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Deployment overrides of serve.host / serve.port (the Docker image binds 0.0.0.0:5001);
# explicit arguments of ``serve()`` win over them.
ENV_HOST = "TRANSFER_SERVE_HOST"
ENV_PORT = "TRANSFER_SERVE_PORT"


def model_uri(params: Params, alias: str | None = None) -> str:
    """``models:/<promote.model_name>@<alias or serve.alias>``."""
    return f"models:/{params.model_name()}@{alias or params.serve.alias}"


def version_uri(name: str, version: str | int) -> str:
    return f"models:/{name}/{version}"


def serve_command(
    model_uri: str, host: str, port: int, workers: int = 1, timeout: int | None = None
) -> list[str]:
    """argv of the guarded scoring server (``tasks.adapters.scoring_app``) run by this interpreter."""
    argv = [sys.executable, "-m", "tasks.adapters.scoring_app", "-m", model_uri, "-h", host, "-p", str(port)]
    if workers != 1:
        argv += ["-w", str(workers)]
    if timeout is not None:
        argv += ["-t", str(timeout)]
    return argv


def serve_env(
    tracking_uri: str | None,
    max_batch: int | None = None,
    max_image_bytes: int | None = None,
    base: dict[str, str] | None = None,
    auth_token_env: str | None = None,
    max_image_pixels: int | None = None,
) -> dict[str, str]:
    """Environment for the server: the registry, the limits, the *name* of the token's
    variable (the token stays in that variable), and this venv first on PATH."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in server logs
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
        env["MLFLOW_REGISTRY_URI"] = tracking_uri
    from tasks.adapters.pyfunc_model import ENV_MAX_BATCH, ENV_MAX_IMAGE_BYTES, ENV_MAX_IMAGE_PIXELS

    if max_batch is not None:
        env[ENV_MAX_BATCH] = str(max_batch)
    if max_image_bytes is not None:
        env[ENV_MAX_IMAGE_BYTES] = str(max_image_bytes)
    if max_image_pixels is not None:
        env[ENV_MAX_IMAGE_PIXELS] = str(max_image_pixels)
    from tasks.adapters.scoring_app import ENV_AUTH_TOKEN_ENV

    env.pop(ENV_AUTH_TOKEN_ENV, None)  # params decide, not a stale variable
    if auth_token_env:
        env[ENV_AUTH_TOKEN_ENV] = auth_token_env
    return env


def check_alias(tracking_uri: str, name: str, alias: str) -> str:
    """The version behind ``name@alias``; TransferError (one clear line) if there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        version = MlflowClient(tracking_uri, tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as error:
        raise TransferError(
            f"no model to serve: registered model '{name}' has no alias '{alias}' in "
            f"{tracking_uri} ({error.error_code}); run the pipeline (or promote) first"
        ) from None
    return str(version.version)


def start_server(
    model_uri: str,
    host: str,
    port: int,
    env: dict[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen:
    """Start the scoring server in its own process group (see ``stop_server``).

    The group holds the mlflow CLI and the uvicorn it starts; on Linux the CLI also gets
    SIGTERM if this process dies (as MLflow does for uvicorn), so no server outlives its owner.
    Call it from the main thread: the death signal follows the starting thread.
    """
    return subprocess.Popen(
        serve_command(model_uri, host, port),
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        **popen,
    )


def _die_with_parent() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the whole group (mlflow CLI + uvicorn), SIGKILL what is left after ``timeout``."""
    _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
        time.sleep(0.1)
    if _group_alive(proc.pid):
        _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Any process left in the group? Reaps the group's exited children first: zombies count
    as members, and as PID 1 of a container this process inherits the orphaned uvicorn."""
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def resolve_model(tracking_uri: str, uri: str) -> tuple[str, str]:
    """A ``models:/`` URI (alias, version, stage, latest) -> (``models:/name/N``, "version N").

    Pinning the version before the download means the version printed is the one served, even
    if the alias moves meanwhile. Other URIs (``runs:/``, a path) are served as given.
    """
    if not uri.startswith("models:/"):
        return uri, uri
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    try:
        found = get_model_name_and_version(MlflowClient(tracking_uri, tracking_uri), uri)
        if len(found) == 1:  # models:/<model id>: a logged model, no registry version
            return uri, uri
        name, version = found
        MlflowClient(tracking_uri, tracking_uri).get_model_version(name, str(version))
    except MlflowException as error:
        detail = error.message.splitlines()[0][:200]
        raise TransferError(
            f"no model to serve at {uri} in {redact(tracking_uri)}: {detail}; "
            "run the pipeline (or promote) first, or check the name/version"
        ) from None
    return version_uri(name, version), f"version {version}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, port: int, with_token: bool) -> str | None:
    """What to say when the server is reachable beyond this machine without a token."""
    if with_token or is_loopback(host):
        return None
    return (
        f"warning: binding {host}:{port} without a token: anyone who reaches this port can "
        "query the model; set serve.auth_token_env (see README, Security)"
    )


def probe_url(host: str, port: int) -> str:
    """Where this host can reach the server: a wildcard bind answers on loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve(
    params: Params,
    alias: str | None = None,
    port: int | None = None,
    tracking_uri: str | None = None,
    host: str | None = None,
    version: int | None = None,
    model: str | None = None,
) -> int:
    """Run the scoring server in the foreground until it exits; returns its exit code.

    The model: ``model`` (any ``models:/`` URI), else ``models:/<promote.model_name>/<version>``,
    else ``models:/<promote.model_name>@<alias or serve.alias>``, pinned to one version.
    Host/port: the arguments, else ``TRANSFER_SERVE_HOST`` / ``TRANSFER_SERVE_PORT``, else
    ``params.serve``. With ``serve.auth_token_env`` set, requests need that variable's token.
    "serving on ..." is printed once ``/health`` answers.

    SIGTERM / SIGINT / SIGHUP are forwarded to the server's process group, so
    ``docker stop`` (this process may be PID 1) and Ctrl-C shut uvicorn down cleanly.
    """
    from tasks.adapters.scoring_app import ConfigError, auth_token
    from tasks.adapters.tracking import tracking_uri as default_tracking_uri

    uri = tracking_uri or default_tracking_uri(params)
    token_env = params.serve.auth_token_env
    try:  # fail closed: a named but empty variable must not mean "no auth"
        token = auth_token(token_env)
    except ConfigError as error:
        raise TransferError(str(error)) from None
    requested = requested_uri(params, uri, alias, version, model)
    target, which = resolve_model(uri, requested)
    host = host or os.environ.get(ENV_HOST) or params.serve.host
    port = port or int(os.environ.get(ENV_PORT) or params.serve.port)
    if warning := bind_warning(host, port, token is not None):
        print(warning, file=sys.stderr, flush=True)
    print(f"loading {requested} ({which}) from {redact(uri)}", flush=True)
    env = serve_env(
        uri, params.serve.max_batch, params.serve.max_image_bytes, auth_token_env=token_env,
        max_image_pixels=params.serve.max_image_pixels,
    )
    proc = start_server(target, host, port, env=env)

    stopped: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        _signal_group(proc, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        _announce_when_ready(proc, host, port, target, which, token is not None)
        code = proc.wait()
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # let uvicorn finish its graceful shutdown
        return 0 if stopped else code  # asked to stop (docker stop, Ctrl-C): a clean exit
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None or _group_alive(proc.pid):
            stop_server(proc)


def requested_uri(
    params: Params, tracking_uri: str, alias: str | None, version: int | None, model: str | None
) -> str:
    """The model URI asked for: ``model``, a version, else an alias (checked to exist)."""
    if sum(x is not None for x in (alias, version, model)) > 1:
        raise TransferError("give one of --alias, --version, --model-uri")
    if model is not None:
        return model
    if version is not None:
        return version_uri(params.model_name(), version)
    check_alias(tracking_uri, params.model_name(), alias or params.serve.alias)
    return model_uri(params, alias)


def _announce_when_ready(
    proc: subprocess.Popen, host: str, port: int, target: str, which: str, with_token: bool
) -> bool:
    """Print "serving ... on ..." once ``/health`` answers; False if the server exited first."""
    try:
        wait_until_ready(probe_url(host, port), timeout=None, proc=proc)
    except TransferError:
        return False
    auth = "bearer token required" if with_token else "no token"
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    print(f"serving {target} ({which}) on http://{shown}:{port}/invocations ({auth})", flush=True)
    return True


def wait_until_ready(
    url: str, timeout: float | None = 60.0, proc: subprocess.Popen | None = None
) -> float:
    """Poll ``<url>/health`` (open without a token) until it answers 200; returns seconds waited.

    Raises TransferError if ``proc`` exits first, TimeoutError after ``timeout`` seconds
    (None: wait as long as ``proc`` runs).
    """
    ping = url.rstrip("/") + "/health"
    start = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise TransferError(
                f"the scoring server exited with code {proc.returncode} before it was ready"
            )
        try:
            with urllib.request.urlopen(ping, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"{ping} did not answer within {timeout:.0f} s")
        time.sleep(0.25)


def encode_file(path: str | Path, max_bytes: int | None = None) -> str:
    """An image file -> base64 text, as a client puts it in the ``image`` column; a file over
    ``max_bytes`` is refused before it is read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such image file: {path}")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise DataError(
            f"{path}: image too large: {path.stat().st_size} bytes, the limit is {max_bytes} "
            "bytes (serve.max_image_bytes)"
        )
    return base64.b64encode(path.read_bytes()).decode("ascii")


def predict_files(
    paths: Sequence[str | Path], model_uri: str, tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """Offline ``transfer predict IMAGE...``: the served pyfunc, loaded in-process.

    Returns ``[{path, label, probability, probabilities}]`` in input order; batches larger
    than the model's ``max_batch`` are sent in chunks.
    """
    import mlflow
    import pandas as pd

    if not paths:
        raise TransferError("no image files given")
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:  # before the (slow) model load
        raise DataError(f"no such image file: {missing[0]}")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as error:
        raise TransferError(f"cannot load {model_uri}: {error.message.splitlines()[0]}") from None
    config = model.model_config or {}
    chunk = int(config.get("max_batch", 256))
    encoded = [encode_file(path, int(config.get("max_image_bytes", 2_000_000))) for path in paths]
    results: list[dict[str, Any]] = []
    for start in range(0, len(encoded), chunk):
        frame = model.predict(pd.DataFrame({"image": encoded[start : start + chunk]}))
        results.extend(frame.to_dict(orient="records"))
    return [{"path": str(path), **row} for path, row in zip(paths, results, strict=True)]


def invocations_payload(images: Iterable[str], orient: str = "split") -> bytes:
    """JSON body for ``POST /invocations`` from base64 image strings."""
    images = list(images)
    if orient == "split":
        body = {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}
    else:
        body = {"dataframe_records": [{"image": image} for image in images]}
    return json.dumps(body).encode()
