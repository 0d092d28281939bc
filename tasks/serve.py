"""Serve the registry's champion with MLflow's scoring server; predict image files offline.

``transfer serve`` runs ``mlflow models serve -m models:/<name>@<alias> --env-manager local``
in this same Python environment (the default ``virtualenv`` env manager would need the
network). The scoring server loads the model once at start: to serve a newly promoted
champion, restart it (see docs/deploy.md).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

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


def serve_command(
    model_uri: str, host: str, port: int, workers: int = 1, timeout: int | None = None
) -> list[str]:
    """argv of ``mlflow models serve`` run by this interpreter, with the local env manager."""
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
    ]
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
) -> dict[str, str]:
    """Environment for the server: the registry, the limits, and this venv first on PATH.

    ``mlflow models serve`` starts ``bash -c "exec uvicorn ..."``: ``uvicorn`` is looked up on
    PATH, so the interpreter's bin dir goes first or another environment's uvicorn could run.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in server logs
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
        env["MLFLOW_REGISTRY_URI"] = tracking_uri
    from tasks.pyfunc_model import ENV_MAX_BATCH, ENV_MAX_IMAGE_BYTES

    if max_batch is not None:
        env[ENV_MAX_BATCH] = str(max_batch)
    if max_image_bytes is not None:
        env[ENV_MAX_IMAGE_BYTES] = str(max_image_bytes)
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


def serve(
    params: Params,
    alias: str | None = None,
    port: int | None = None,
    tracking_uri: str | None = None,
    host: str | None = None,
) -> int:
    """Run the scoring server in the foreground until it exits; returns its exit code.

    Host/port: the arguments, else ``TRANSFER_SERVE_HOST`` / ``TRANSFER_SERVE_PORT``, else
    ``params.serve``. The model: ``models:/<promote.model_name>@<alias or serve.alias>``.

    SIGTERM / SIGINT / SIGHUP are forwarded to the server's process group, so
    ``docker stop`` (this process may be PID 1) and Ctrl-C shut uvicorn down cleanly.
    """
    from tasks.tracking import tracking_uri as default_tracking_uri

    uri = tracking_uri or default_tracking_uri(params)
    alias = alias or params.serve.alias
    version = check_alias(uri, params.model_name(), alias)
    target = model_uri(params, alias)
    host = host or os.environ.get(ENV_HOST) or params.serve.host
    port = port or int(os.environ.get(ENV_PORT) or params.serve.port)
    print(
        f"serving {target} (version {version}) on http://{host}:{port}/invocations "
        f"(tracking {uri})",
        flush=True,
    )
    env = serve_env(uri, params.serve.max_batch, params.serve.max_image_bytes)
    proc = start_server(target, host, port, env=env)

    stopped: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        _signal_group(proc, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
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


def wait_until_ready(
    url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None
) -> float:
    """Poll ``<url>/ping`` until it answers 200; returns seconds waited.

    Raises TransferError if ``proc`` exits first, TimeoutError after ``timeout`` seconds.
    """
    ping = url.rstrip("/") + "/ping"
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
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{ping} did not answer within {timeout:.0f} s")
        time.sleep(0.25)


def encode_file(path: str | Path) -> str:
    """An image file -> base64 text, as a client puts it in the ``image`` column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such image file: {path}")
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
    encoded = [encode_file(path) for path in paths]
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except mlflow.exceptions.MlflowException as error:
        raise TransferError(f"cannot load {model_uri}: {error.message.splitlines()[0]}") from None
    chunk = int((model.model_config or {}).get("max_batch", 256))
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
