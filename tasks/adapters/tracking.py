"""MLflow plumbing: where the tracking store is, and run/metric/artifact helpers.

Runs are addressed by id through ``MlflowClient`` rather than MLflow's fluent
"active run" stack, so Prefect tasks on any thread log to the right (nested) run.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from transfer.config import Params
from transfer.errors import TransferError

MLRUNS = "mlruns"


def tracking_uri(params: Params) -> str:
    """``MLFLOW_TRACKING_URI`` > ``runtime.tracking_uri`` > sqlite under ``mlruns/``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.runtime.tracking_uri
    if uri:
        return uri
    Path(MLRUNS).mkdir(exist_ok=True)
    return f"sqlite:///{Path(MLRUNS).resolve() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """A URI fit for a log line or an error: ``user:password@`` replaced by ``***@``
    (a postgresql:// store or an http://user:pw@ server URI must not leak its password)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def store_dir(uri: str) -> Path:
    """The local folder of a sqlite store (the database's folder); ``mlruns/`` otherwise.

    Artifacts and the promotion lock live there, so they stay with the store whatever
    directory a run starts in.
    """
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).resolve().parent  # "sqlite:////abs" -> "/abs"
    return Path(MLRUNS).resolve()


def artifact_root(sqlite_uri: str) -> str:
    """``artifacts/`` beside the sqlite file (``mlruns/artifacts`` by default)."""
    return (store_dir(sqlite_uri) / "artifacts").as_uri()


def configure(params: Params) -> MlflowClient:
    """Point MLflow at the store (explicit, never at import time) and ensure the experiment.

    A store that cannot be opened (unwritable path, server down) is a ``TransferError``
    naming the URI: one line, not MLflow's traceback after minutes of HTTP retries."""
    uri = _store_uri(params)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if (uri, params.runtime.experiment) in _ready:  # every task calls this: set up once
        return _clients[uri]
    try:
        _check_reachable(uri)
        client = _open_store(uri, params)
    except (OSError, mlflow.exceptions.MlflowException, SQLAlchemyError) as error:
        raise _store_error(uri, error) from error
    _ready.add((uri, params.runtime.experiment))
    _clients.setdefault(uri, client)
    return _clients[uri]


def _store_uri(params: Params) -> str:
    try:
        return tracking_uri(params)
    except OSError as error:  # mlruns/ cannot be created here
        raise _store_error(f"sqlite under {Path(MLRUNS).resolve()}", error) from error


def _store_error(uri: str, error: BaseException) -> TransferError:
    reason = " ".join(str(error).split())
    password = urllib.parse.urlsplit(uri).password
    if password:  # the driver's message may quote the URI it was given
        reason = reason.replace(password, "***")
    reason = reason[:300]
    return TransferError(
        f"MLflow tracking store {redact(uri)} cannot be opened ({type(error).__name__}: {reason}); "
        "set MLFLOW_TRACKING_URI (or runtime.tracking_uri) to a writable sqlite:///path "
        "or a reachable tracking server")


def _check_reachable(uri: str, timeout: float = 10.0) -> None:
    """One quick request: MLflow's client retries a dead server for minutes."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri, timeout=timeout)  # any HTTP answer (even 401/404) will do
        except requests.RequestException as error:
            raise OSError(f"no answer from the server: {type(error).__name__}") from error


def _open_store(uri: str, params: Params) -> MlflowClient:
    with _store_init_lock(uri):
        client = MlflowClient(uri, uri)
        client.search_registered_models(max_results=1)  # opens (and creates) the registry tables too
        if client.get_experiment_by_name(params.runtime.experiment) is None:
            location = artifact_root(uri) if uri.startswith("sqlite:///") else None
            try:
                client.create_experiment(params.runtime.experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException:
                pass  # another run created it meanwhile (a tracking server has no local lock)
    return client


# (tracking URI, experiment) pairs this process has set up, and one client per store
# (thread-safe: it holds no state beyond the store, which pools its connections)
_ready: set[tuple[str, str]] = set()
_clients: dict[str, MlflowClient] = {}


def _store_init_lock(uri: str) -> contextlib.AbstractContextManager:
    """Two runs opening a new sqlite store at once would both create its schema (an alembic
    error for one of them): let one process at a time open a local store."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()  # a tracking server creates its own schema once
    folder = store_dir(uri)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / ".store-init.lock"), timeout=600)


def experiment_id(client: MlflowClient, params: Params) -> str:
    return client.get_experiment_by_name(params.runtime.experiment).experiment_id


def start_run(
    client: MlflowClient,
    params: Params,
    name: str,
    parent_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    all_tags = {**dict(tags or {}), **_owner_tags()}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    run = client.create_run(experiment_id(client, params), run_name=name, tags=all_tags)
    return run.info.run_id


@contextlib.contextmanager
def tracked_run(
    client: MlflowClient,
    params: Params,
    name: str,
    parent_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """A (nested) run for the with-block: FINISHED after it, FAILED if anything escapes it
    (Ctrl-C included), so no error leaves a run RUNNING. Yields the run id."""
    run_id = start_run(client, params, name, parent_id, tags)
    try:
        yield run_id
    except BaseException:
        end_run(client, run_id, ok=False)
        raise
    end_run(client, run_id)


# ---------------------------------------------------------------- runs left RUNNING
OWNER_PID, OWNER_HOST, END_REASON = "transfer.pid", "transfer.host", "transfer.end_reason"


def _owner_tags() -> dict[str, str]:
    """Which process owns a run: a run it leaves RUNNING can be told from a live one."""
    return {OWNER_PID: str(os.getpid()), OWNER_HOST: socket.gethostname()}


def _running_runs(client: MlflowClient, params: Params) -> list[Any]:
    experiment = client.get_experiment_by_name(params.runtime.experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=1000)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def end_own_runs(client: MlflowClient, params: Params, reason: str) -> int:
    """Mark KILLED every run this process still has RUNNING (after SIGTERM / Ctrl-C)."""
    mine = _owner_tags()
    runs = [r for r in _running_runs(client, params)
            if all(r.data.tags.get(k) == v for k, v in mine.items())]
    for run in runs:
        _terminate(client, run.info.run_id, RunStatus.KILLED, reason)
    return len(runs)


def fail_orphaned_runs(client: MlflowClient, params: Params) -> int:
    """Mark FAILED the runs left RUNNING by a process of this host that is gone (kill -9,
    power loss): otherwise they read as running forever."""
    host, orphans = socket.gethostname(), 0
    for run in _running_runs(client, params):
        pid = run.data.tags.get(OWNER_PID, "")
        if run.data.tags.get(OWNER_HOST) == host and pid.isdigit() and not _alive(int(pid)):
            _terminate(client, run.info.run_id, RunStatus.FAILED,
                       f"process {pid} on {host} ended without closing this run (killed?)")
            orphans += 1
    return orphans


def _terminate(client: MlflowClient, run_id: str, status: int, reason: str) -> None:
    client.set_tag(run_id, END_REASON, reason)
    client.set_terminated(run_id, status=RunStatus.to_string(status))


def end_run(client: MlflowClient, run_id: str, ok: bool = True) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    client.set_terminated(run_id, status=status)


# ---------------------------------------------------------------- model downloads
@contextlib.contextmanager
def downloaded(uri: str, model_dir: bool = True) -> Iterator[Path]:
    """Download ``uri`` (``runs:/``, ``models:/``) into a temporary folder that is removed
    when the block ends, also on error. Yields the transfer model directory inside it
    (model.json + model.pt), or with ``model_dir=False`` the artifact root (a pyfunc model).
    The one MLflow -> local model download."""
    tmp = tempfile.mkdtemp(prefix="mlflow-model-")
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        yield _transfer_model_dir(local, uri) if model_dir else local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _transfer_model_dir(local: Path, uri: str) -> Path:
    found = sorted(p.parent for p in local.rglob("model.json"))
    if not found:
        raise TransferError(f"{uri} holds no transfer model (model.json)")
    return found[0]


# downloads whose path outlives the function that made it (a later task of the same flow
# reads it): removed when this process exits, not left in /tmp
_process_downloads = contextlib.ExitStack()
_process_downloads_lock = threading.Lock()
atexit.register(_process_downloads.close)


def kept_download(uri: str) -> Path:
    """:func:`downloaded` (the model directory) kept until this process exits."""
    download = downloaded(uri)
    path = download.__enter__()  # outside the lock: threads download side by side
    with _process_downloads_lock:
        _process_downloads.push(download)
    return path


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` for MLflow params/tags."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), child))
        return out
    return {prefix: value}


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    log_batch(client, run_id, params=params)


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    log_batch(client, run_id, metrics=metrics, step=step)


def log_history(client: MlflowClient, run_id: str, history: Iterable[Mapping[str, Any]]) -> None:
    """Per-epoch curves: train_loss, train_acc, val_loss, val_acc, lr with step = epoch."""
    log_batch(client, run_id, history=history)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    log_batch(client, run_id, tags=tags)


HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


def log_batch(
    client: MlflowClient,
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    history: Iterable[Mapping[str, Any]] = (),
    tags: Mapping[str, Any] | None = None,
    step: int = 0,
) -> None:
    """Params (flattened), metrics at ``step``, per-epoch curves and tags (flattened; None
    dropped) in as few store round trips as MLflow's batch limits allow: one per run's
    outcome instead of one per kind, which a local sqlite store pays in commits."""
    from mlflow.entities import Metric, Param, RunTag

    now = mlflow.utils.time.get_current_time_millis()
    metric_items = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
    metric_items += [Metric(key, float(row[key]), now, int(row["epoch"]))
                     for row in history for key in HISTORY_KEYS if row.get(key) is not None]
    param_items = [Param(k, str(v)[:6000]) for k, v in flatten("", params or {}).items()]
    tag_items = [RunTag(k, str(v)) for k, v in flatten("", tags or {}).items() if v is not None]
    # MLflow's limits per call: 1000 metrics, 100 params and 100 tags, 1000 entities in all
    while metric_items or param_items or tag_items:
        params_now, tags_now = param_items[:100], tag_items[:100]
        metrics_now = metric_items[:1000 - len(params_now) - len(tags_now)]
        client.log_batch(run_id, metrics=metrics_now, params=params_now, tags=tags_now)
        metric_items = metric_items[len(metrics_now):]
        param_items, tag_items = param_items[100:], tag_items[100:]


# How the stores word a unique-key collision (PostgreSQL, sqlite, MySQL)
_UNIQUE_CONFLICT = ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry")


def log_inputs(client: MlflowClient, run_id: str, datasets: list[Any], attempts: int = 4) -> None:
    """``client.log_inputs`` that survives a concurrent run logging the same dataset.

    MLflow's store looks a dataset up and inserts it when missing, in one transaction but
    without a lock, so two runs of the same data at once (two machines on one tracking
    server) can both insert it and one gets a unique-key error. That error is the race, not
    the input: on a retry the row exists and only this run's link to it is written."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except mlflow.exceptions.MlflowException as error:
            if attempt == attempts - 1 or not any(word in str(error) for word in _UNIQUE_CONFLICT):
                raise
            time.sleep(0.1 * 2 ** attempt)


def log_json(client: MlflowClient, run_id: str, data: Any, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(data, indent=2, default=str))
        client.log_artifact(
            run_id, str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None
        )


def log_files(
    client: MlflowClient, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None
) -> None:
    for path in paths:
        if Path(path).exists():
            client.log_artifact(run_id, str(path), artifact_path)


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
