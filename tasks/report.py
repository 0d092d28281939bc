"""The transfer report of one pipeline run (``transfer report``): gather, sweep, render, log.

Reads what the pipeline recorded in MLflow (the parent run tagged ``stage=pipeline``: its
params, tags, metrics, ``summary.json`` and ``evaluation/metrics_*.json``), the source
model dir and the dataset manifests under ``data/``; runs the sample-efficiency sweep from
the run's source model; writes the report with :func:`transfer.report.build_report` and
logs ``report/report.html`` + ``report/report.png`` (+ ``report/report.json``) to the run.
"""

from __future__ import annotations

import ast
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from tasks.adapters import tracking
from tasks.common import stage_task
from transfer import checks as sense
from transfer import report as core
from transfer import stages
from transfer import sweep as sweeping
from transfer.config import ConfigError, Params, SweepParams, params_from_dict
from transfer.data import dataset_version
from transfer.errors import TransferError

log = logging.getLogger(__name__)

ARTIFACT_DIR = "report"
# Sections of the run's own params the report re-uses (runtime: only the seed; device,
# tracking store and artifacts dir are the caller's, since the sweep runs here and now).
RUN_SECTIONS = ("data", "validate", "pretrain", "finetune", "evaluate", "promote")


# --------------------------------------------------------------------------- finding the run


def find_pipeline_run(client: MlflowClient, params: Params, run_id: str | None = None) -> Run:
    """The pipeline parent run: ``run_id`` (a stage run id leads to its parent) or the latest."""
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise TransferError(
                f"no MLflow run {run_id!r} in {tracking.redact(tracking.tracking_uri(params))}"
            ) from None
        if run.data.tags.get("stage") == "pipeline":
            return run
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            return find_pipeline_run(client, params, parent)
        raise TransferError(f"run {run_id} is not a pipeline run (no tag stage=pipeline)")
    experiment = client.get_experiment_by_name(params.runtime.experiment)
    runs = []
    if experiment is not None:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.stage = 'pipeline' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    if not runs:
        raise TransferError(
            f"no finished pipeline run in experiment {params.runtime.experiment!r} at "
            f"{tracking.redact(tracking.tracking_uri(params))}: run `transfer run` first, or pass --run-id"
        )
    return runs[0]


def child_runs(client: MlflowClient, run: Run) -> dict[str, Run]:
    """Stage runs (pretrain, finetune, scratch) nested under the pipeline run, by stage tag."""
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    out: dict[str, Run] = {}
    for child in found:
        out.setdefault(child.data.tags.get("stage", child.info.run_name or "?"), child)
    return out


# --------------------------------------------------------------------------- the run's params


def _parse(raw: str, current: Any) -> Any:
    if raw == "None":
        return None
    if isinstance(current, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def params_of_run(run: Run, base: Params) -> tuple[Params, list[str]]:
    """The params the run was made with (logged flat as strings), runtime from ``base``."""
    logged = run.data.params
    raw = base.dump()
    for key, current in tracking.flatten("", raw).items():
        if key in logged and (key.split(".")[0] in RUN_SECTIONS or key == "runtime.seed"):
            _set(raw, key.split("."), _parse(logged[key], current))
    try:
        return params_from_dict(raw), []
    except ConfigError as error:
        return base, [f"could not rebuild the run's params ({error}); the current params are used"]


# --------------------------------------------------------------------------- artifacts


def _download_json(params: Params, run_id: str, artifact: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=artifact,
                dst_path=tmp,
                tracking_uri=tracking.tracking_uri(params),
            )
            return json.loads(Path(local).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def _evaluation(params: Params, run_id: str, name: str) -> dict[str, Any] | None:
    """``metrics_<name>.json`` from the run's artifacts, else from the local evaluation dir."""
    report = _download_json(params, run_id, f"evaluation/metrics_{name}.json")
    local = Path(params.runtime.artifacts_dir) / "evaluation" / run_id / f"metrics_{name}.json"
    if report is None and local.is_file():
        report = json.loads(local.read_text())
    if not report or "confusion_matrix" not in report:
        return None
    return {
        "matrix": report["confusion_matrix"],
        "classes": list((report.get("per_class_recall") or {}).keys()) or None,
        "accuracy": report.get("accuracy"),
        "accuracy_ci": report.get("accuracy_ci"),
        "calibration": {k: report.get(k) for k in ("ece_uncalibrated", "ece", "temperature")}
        | {"reliability": report.get("reliability")},
    }


# --------------------------------------------------------------------------- source model


def _read_meta(model_dir: Path) -> dict[str, Any] | None:
    meta = model_dir / "model.json"
    if not meta.is_file() or not (model_dir / "model.pt").is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def _download_source(params: Params, reference: str) -> Path | None:
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                reference,
                dst_path=tempfile.mkdtemp(prefix="report-source-"),
                tracking_uri=tracking.tracking_uri(params),
            )
        )
    except (MlflowException, OSError):
        return None
    found = sorted(p.parent for p in local.rglob("model.json"))
    return found[0] if found else None


def locate_source_model(
    params: Params, tags: dict[str, str]
) -> tuple[Path | None, dict[str, Any], list[str]]:
    """The run's source model dir: matched by the weights sha256 the run recorded.

    Candidates: the explicit ``pretrain.source_model`` (dir or MLflow URI), the keyed
    ``artifacts/source/<key>/source_model`` re-derived from the run's params and source
    data version, then every ``artifacts/source/*/source_model``.
    """
    from tasks.train import source_dir

    wanted = tags.get("source_weights_sha256")
    origin = tags.get("source_origin") or params.pretrain.source_model or ""
    candidates: list[Path] = []
    reference = params.pretrain.source_model or origin
    if reference and Path(reference).is_dir():
        candidates.append(Path(reference))
    version = tags.get("data.source.version")
    if version:
        candidates.append(source_dir(params, {"source": {"version": version}}) / "source_model")
    candidates += sorted((Path(params.runtime.artifacts_dir) / "source").glob("*/source_model"))
    if reference and ":/" in reference:
        downloaded = _download_source(params, reference)
        if downloaded is not None:
            candidates.insert(0, downloaded)
    first_existing: tuple[Path, dict[str, Any]] | None = None
    for candidate in candidates:
        meta = _read_meta(candidate)
        if meta is None:
            continue
        if wanted and meta.get("weights_sha256") == wanted:
            return candidate, meta, []
        first_existing = first_existing or (candidate, meta)
    if not wanted and first_existing is not None:
        return (
            first_existing[0],
            first_existing[1],
            [
                "the run recorded no source_weights_sha256: using the source model re-derived "
                f"from its params ({first_existing[0]}), which cannot be verified"
            ],
        )
    return (
        None,
        {},
        [
            f"source model with weights sha256 {wanted or '?'} not found (looked in "
            f"{', '.join(str(c) for c in candidates[:4]) or 'nothing'}): no sample-efficiency sweep"
        ],
    )


def _source_block(
    path: Path | None, meta: dict[str, Any], tags: dict[str, str], pretrain_run: Run | None
) -> dict[str, Any]:
    accuracy = meta.get("source_test_accuracy")
    if accuracy is None and pretrain_run is not None:
        accuracy = pretrain_run.data.metrics.get("source_test_accuracy")
    return {
        "weights_sha256": meta.get("weights_sha256") or tags.get("source_weights_sha256"),
        "recorded_weights_sha256": tags.get("source_weights_sha256"),
        "origin": tags.get("source_origin"),
        "reused": tags.get("source_reused"),
        "initial_weights": meta.get("initial_weights"),
        "source_data_version": meta.get("source_data_version") or tags.get("data.source.version"),
        "source_test_accuracy": accuracy,
        "arch": meta.get("arch"),
        "classes": meta.get("classes"),
        "run_id": tags.get("source_run_id") or meta.get("mlflow_run_id"),
        "model_dir": str(path) if path else None,
    }


# --------------------------------------------------------------------------- gathering


def _float(value: Any) -> float | None:
    try:
        return None if value in (None, "", "None") else float(value)
    except (TypeError, ValueError):
        return None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool) or value is None:
        return value
    return {"true": True, "false": False}.get(str(value).lower())


def _interval(metrics: dict[str, float], key: str) -> list[float] | None:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return None if low is None or high is None else [low, high]


def _registry_state(client: MlflowClient, name: str, version: Any) -> dict[str, Any]:
    """The version's aliases now and the current champion: what the run recorded at promotion
    goes stale after a rollback."""
    if version in (None, ""):
        return {}
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return {}
    return {"aliases_now": sorted(a for a, v in aliases.items() if str(v) == str(version)),
            "champion_now": aliases.get("champion")}


def _summary(
    client: MlflowClient, run: Run, recorded: dict[str, Any], children: dict[str, Run], rp: Params
) -> dict[str, Any]:
    metrics, tags = run.data.metrics, run.data.tags
    tuned = children.get("finetune")
    strategy = recorded.get("strategy") or (tuned.data.tags.get("strategy") if tuned else None)
    reason = recorded.get("strategy_reason") or (
        tuned.data.params.get("strategy_reason") if tuned else None
    )
    ft = rp.finetune
    rule = (
        f"strategy=auto: <= {ft.auto_head_max} labels/class -> head, <= {ft.auto_last_k_max} -> "
        f"last_k, more -> {ft.auto_above}"
        if ft.strategy == "auto"
        else None
    )
    return {
        "transfer_accuracy": _float(
            recorded.get("transfer_accuracy", metrics.get("test_accuracy"))
        ),
        "scratch_accuracy": _float(
            recorded.get("scratch_accuracy", metrics.get("scratch_test_accuracy"))
        ),
        "gain": _float(recorded.get("gain", metrics.get("transfer_gain"))),
        # 95% intervals (Wilson; paired bootstrap for the gain) and McNemar's p, as logged
        "transfer_accuracy_ci": _interval(metrics, "test_accuracy"),
        "scratch_accuracy_ci": _interval(metrics, "scratch_test_accuracy"),
        "gain_ci": _interval(metrics, "transfer_gain"),
        "gain_p_value": metrics.get("transfer_gain_p_value"),
        "gain_verdict": tags.get("transfer_verdict"),
        "negative_transfer_margin": rp.evaluate.negative_transfer_margin,
        "strategy": strategy or tags.get("finetune.strategy"),
        "strategy_reason": reason,
        "strategy_rule": rule,
        "labels_per_class": recorded.get("labels_per_class", ft.labels_per_class),
        "model_name": recorded.get("model_name", rp.model_name()),
        "model_version": recorded.get("model_version", tags.get("model_version")),
        "promoted": _bool(recorded.get("promoted", tags.get("promoted"))),
        **_registry_state(client, recorded.get("model_name", rp.model_name()),
                          recorded.get("model_version", tags.get("model_version"))),
        "promotion_reason": recorded.get("promotion_reason"),
        "data_version": {
            name: tags.get(f"data.{name}.dvc_md5") or tags.get(f"data.{name}.version")
            for name in ("source", "target")
        },
        # what each hash is: the DVC md5 of the folder (dvc.lock), else the manifest hash
        "data_version_kind": {
            name: "DVC md5" if tags.get(f"data.{name}.dvc_md5") else "manifest sha256"
            for name in ("source", "target")
        },
    }


def _datasets(rp: Params, tags: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    out, notes = {}, []
    for name, directory in stages.dataset_dirs(rp).items():
        try:
            out[name] = sense.dataset_summary(
                directory, name, rp.finetune.labels_per_class if name == "target" else None
            )
            now, then = dataset_version(directory), tags.get(f"data.{name}.version")
        except TransferError as error:
            notes.append(f"{name} dataset: {error}")
            continue
        out[name]["version"] = now
        if then and now != then:
            notes.append(
                f"the {name} data under {directory} (version {now[:12]}) is not the data the run "
                f"saw ({then[:12]}): sizes and the sweep reflect the data on disk"
            )
    return out, notes


def gather(
    params: Params, run_id: str | None = None
) -> tuple[dict[str, Any], Params, Path | None, Run]:
    """Everything the report shows except the sweep: (data, run params, source dir, run)."""
    client = tracking.configure(params)
    run = find_pipeline_run(client, params, run_id)
    rid, tags = run.info.run_id, run.data.tags
    rp, notes = params_of_run(run, params)
    children = child_runs(client, run)
    recorded = _download_json(params, rid, "summary.json") or {}
    if not recorded:
        notes.append("the run has no summary.json artifact: numbers come from its metrics and tags")
    source_path, source_meta, source_notes = locate_source_model(rp, tags)
    notes += source_notes
    datasets, data_notes = _datasets(rp, tags)
    notes += data_notes
    confusion = {}
    for name in ("transfer", "scratch"):
        block = _evaluation(params, rid, name)
        if block is not None:
            confusion[name] = block
        elif name == "transfer" or rp.finetune.scratch_baseline:
            notes.append(f"no confusion matrix for {name} (evaluation/metrics_{name}.json missing)")
    data = {
        "title": "Transfer report",
        "run": {
            "run_id": rid,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": _time(run.info.start_time),
            "experiment": params.runtime.experiment,
            "git_commit": tags.get("git_commit"),
        },
        "summary": _summary(client, run, recorded, children, rp),
        "datasets": datasets,
        "confusion": confusion,
        "source_model": _source_block(source_path, source_meta, tags, children.get("pretrain")),
        "notes": notes,
    }
    if datasets.get("source") and datasets.get("target"):  # the run's own thresholds
        data["checks"] = sense.transfer_sense_checks(
            datasets["source"], datasets["target"], rp.validate_
        )
    return data, rp, source_path, run


def _time(millis: int | None) -> str | None:
    if not millis:
        return None
    return datetime.fromtimestamp(millis / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------- entry point


def _sweep(
    rp: Params, source_path: Path | None, ks: Sequence[int] | None, strategies: Sequence[str] | None,
    epochs: int | None, seeds: int | None, progress: bool, notes: list[str],
) -> sweeping.Sweep | None:
    """The run's sweep: the stage's result when current, else computed (points cached)."""
    settings = rp.sweep.model_dump()
    given = {"ks": ks, "strategies": strategies, "epochs": epochs, "seeds": seeds}
    settings.update({k: list(v) if isinstance(v, Sequence) else v for k, v in given.items() if v is not None})
    if source_path is None or not settings["ks"] or not settings["strategies"]:
        return None
    try:
        swept = rp.model_copy(update={"sweep": SweepParams(**settings)})
        with warnings.catch_warnings():  # a warning repeated by every sweep point shows once
            warnings.simplefilter("once")
            return sweeping.run_sweep(swept, source_path, reuse=[sweeping.STAGE_OUTPUT], progress=progress)
    except (TransferError, ValidationError) as error:
        notes.append(f"sample-efficiency sweep failed: {' '.join(str(error).split())}")
        return None


def report_for_run(
    params: Params,
    run_id: str | None = None,
    out_dir: str | Path | None = None,
    ks: Sequence[int] | None = None,
    strategies: Sequence[str] | None = None,
    epochs: int | None = None,
    *,
    progress: bool = False,
    seeds: int | None = None,
) -> dict[str, Path]:
    """Write the report of a pipeline run (default: the latest finished one), log it to the run.

    ``out_dir`` defaults to ``<artifacts_dir>/report/<run_id>``. The sample-efficiency sweep
    is ``params.sweep`` (``ks``, ``strategies``, ``epochs``, ``seeds`` override it; empty
    ``ks`` or ``strategies``: no sweep) from the run's params and source model: read from
    the ``sweep`` stage's ``metrics/sweep.json`` when that holds this very sweep, else run
    by the same cached function (:func:`transfer.sweep.run_sweep`). Returns the written
    files (``html``, ``png``, ``json``, ``curve``, ``confusion_*``).
    """
    data, rp, source_path, run = gather(params, run_id)
    rid = run.info.run_id
    swept = _sweep(rp, source_path, ks, strategies, epochs, seeds, progress, data["notes"])
    curves = swept.curves if swept is not None else None
    if swept is not None:
        data["sample_efficiency"] = {
            **curves.to_json(),
            "curves": dict(curves),
            "epochs": swept.epochs,
            "file": str(swept.path),
            "reused": swept.reused,
            "analysis": core.efficiency_analysis(
                curves.seeds, curves.val, curves.floors, rp.finetune.labels_per_class
            ),
        }
    out = Path(out_dir) if out_dir else Path(params.runtime.artifacts_dir) / "report" / rid
    paths = core.build_report(data, out)
    client = tracking.configure(params)
    tracking.log_files(client, rid, [paths["html"], paths["png"], paths["json"]], ARTIFACT_DIR)
    if curves:
        now = mlflow.utils.time.get_current_time_millis()
        items = [
            Metric(f"sample_efficiency_{name}", acc, now, int(k))
            for name, curve in curves.items()
            for k, acc in curve.items()
        ]
        client.log_batch(rid, metrics=items)
    tracking.set_tags(client, rid, {"report": f"{ARTIFACT_DIR}/report.html"})
    return paths


report_task = stage_task("transfer-report", retries=0)(report_for_run)
