"""Stages 3-4: source pretraining, target fine-tuning and the from-scratch baseline.

Each stage's output directory is keyed by a hash of everything that determines it
(params of that stage, data versions, the source weights, and the fingerprint of the
``transfer/`` code, see ``transfer.fingerprint``), so:
- a finished source model for the same code+data+params is reused, never retrained;
- after an edit to ``transfer/`` every stage trains again, into a new directory;
- a crashed fine-tune resumes from its per-epoch checkpoint when the flow is rerun;
- two concurrent pipeline runs never write into each other's directories (file lock).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock
from prefect.context import TaskRunContext

from tasks.adapters import tracking
from tasks.common import core_logs_in_prefect, stage_task
from transfer import fingerprint, stages
from transfer.config import Params
from transfer.errors import TransferError
from transfer.models import load_model_dir
from transfer.strategies import get_strategy


def content_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# what picks or lists sources, not how one is pretrained: not part of a source's key
NOT_PRETRAINING = {"source_model", "source", "candidates", "rank_estimator"}


def _source_key(params: Params, data: dict[str, Any]) -> str:
    return content_key(
        params.pretrain.model_dump(mode="json", exclude=NOT_PRETRAINING),
        params.data.image_size,
        params.data.channels,
        params.runtime.seed,
        data["source"]["version"],
        fingerprint.code_fingerprint(),
    )


def source_dir(params: Params, data: dict[str, Any]) -> Path:
    return Path(params.runtime.artifacts_dir) / "source" / _source_key(params, data)


def _stage_code_hash() -> str:
    """The code that trains the stages: all of ``transfer/``, not one module of it."""
    return fingerprint.code_fingerprint()


def _pretrain_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Prefect cache key: where the source model lives + stage code, once the model exists.

    The resolved directory is part of the key: Prefect's result store is shared by every
    project on the machine, and a cached result must point at this project's model."""
    params, data = parameters["params"], parameters["data"]
    model_json = source_dir(params, data) / "source_model" / "model.json"
    if params.pretrain.source_model or params.pretrain.source == "auto" or not model_json.exists():
        return None
    return f"pretrain-{content_key(str(model_json.resolve()), _source_key(params, data))}-{_stage_code_hash()}"


def _log_trained(client: Any, run_id: str, trained: stages.TrainedModel, plot_name: str) -> None:
    tracking.log_history(client, run_id, trained.history)
    with tempfile.TemporaryDirectory() as tmp:
        plot = stages.learning_curve_plot(trained, Path(tmp) / plot_name)
        tracking.log_files(client, run_id, [plot], "plots")


def _resolve_source_reference(reference: str, params: Params) -> Path:
    """An explicit source model: a model dir, or an MLflow URI whose artifacts hold one."""
    if Path(reference).is_dir():
        return Path(reference)
    if ":/" not in reference:
        raise TransferError(
            f"pretrain.source_model={reference!r} is neither a model directory nor an MLflow URI"
        )
    tracking.configure(params)
    return tracking.kept_download(reference)  # the run's later tasks read it


def pretrain_source(
    params: Params, data: dict[str, Any], parent_run_id: str | None
) -> dict[str, Any]:
    """Train (or reuse) the source model; log a nested MLflow run when it trains."""
    client = tracking.configure(params)
    if params.pretrain.source == "auto":  # rank the candidates on the target, take the best
        from tasks.rank import choose_source

        chosen = choose_source(params, parent_run_id)
        print(chosen["choice_reason"])
        return chosen
    if params.pretrain.source_model:
        model_dir = _resolve_source_reference(params.pretrain.source_model, params)
        _, meta = load_model_dir(model_dir)
        return {
            "model_dir": str(model_dir),
            "weights_sha256": meta.get("weights_sha256"),
            "origin": params.pretrain.source_model,
            "reused": True,
            "run_id": None,
        }
    out = source_dir(params, data)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        model_json = out / "source_model" / "model.json"
        if model_json.exists():
            meta = json.loads(model_json.read_text())
            return {
                "model_dir": str(model_json.parent),
                "weights_sha256": meta["weights_sha256"],
                "origin": f"pretrained here ({out.name})",
                "reused": True,
                "run_id": meta.get("mlflow_run_id"),
            }
        with tracking.tracked_run(
            client, params, "pretrain", parent_run_id, {"stage": "pretrain"}
        ) as run_id:
            tracking.log_params(
                client,
                run_id,
                {
                    "pretrain": params.pretrain.model_dump(mode="json"),
                    "data": params.data.model_dump(mode="json"),
                },
            )
            with core_logs_in_prefect():  # one line per epoch instead of a bar
                trained = stages.pretrain(params, out, progress=False)
            _log_trained(client, run_id, trained, "learning_curves_pretrain.png")
            tracking.log_metrics(
                client, run_id, {"source_test_accuracy": trained.info["source_test_accuracy"]}
            )
            tracking.set_tags(
                client,
                run_id,
                {
                    "source_weights_sha256": trained.info["weights_sha256"],
                    "data.source.version": data["source"]["version"],
                },
            )
            _stamp_run_id(Path(trained.model_dir), run_id)
        return {
            "model_dir": trained.model_dir,
            "weights_sha256": trained.info["weights_sha256"],
            "origin": f"pretrained here ({out.name})",
            "reused": False,
            "run_id": run_id,
            "source_test_accuracy": trained.info["source_test_accuracy"],
        }


def _stamp_run_id(model_dir: Path, run_id: str) -> None:
    meta_path = model_dir / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["mlflow_run_id"] = run_id
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)


def _train_target(
    kind: str,
    params: Params,
    data: dict[str, Any],
    source: dict[str, Any] | None,
    parent_run_id: str | None,
) -> dict[str, Any]:
    """Shared by fine-tune and scratch: keyed out dir (resume on rerun), nested run, plots."""
    client = tracking.configure(params)
    strategy, reason = (
        stages.resolve_strategy(params) if kind == "finetune" else ("scratch", "baseline")
    )
    inputs = [
        kind, strategy, params.finetune.model_dump(mode="json", exclude={"seeds"}), params.pretrain.arch,
        params.data.image_size, params.data.channels, params.runtime.seed,
        data["target"]["version"], source["weights_sha256"] if source else None,
        {"code_fingerprint": fingerprint.code_fingerprint(), "label_seed": params.data.seed,
         "calibration": params.evaluate.model_dump(mode="json", include={"calibrate", "calibration_bins"})},
    ]
    if kind == "finetune" and get_strategy(strategy).needs_source_data:  # DANN trains on source images
        inputs.append({"source_data_version": (data.get("source") or {}).get("version")})
    out = Path(params.runtime.artifacts_dir) / kind / content_key(*inputs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inputs.json").write_text(json.dumps(inputs, indent=1, default=str))  # what keyed this dir
    with tracking.tracked_run(
        client, params, f"{kind} seed {params.runtime.seed}", parent_run_id,
        {"stage": kind, "strategy": strategy, "seed": str(params.runtime.seed)},
    ) as run_id:
        with FileLock(str(out) + ".lock"):
            tracking.log_params(
                client,
                run_id,
                {
                    "finetune": params.finetune.model_dump(mode="json"),
                    "strategy": strategy,
                    "strategy_reason": reason,
                },
            )
            trained = _finished(out, kind, strategy)  # same code + inputs: the same model
            if trained is not None:
                tracking.set_tags(client, run_id, {"reused": True, "reused_from": trained.model_dir})
            else:
                with core_logs_in_prefect():  # one line per epoch instead of a bar
                    trained = (stages.finetune(params, source["model_dir"], out, strategy=strategy, progress=False)
                               if kind == "finetune" else stages.train_scratch(params, out, progress=False))
                _write_history(out, trained)  # marks the dir finished
            # one store round trip for the outcome; the curves are drawn once per pipeline
            # run, every seed in one figure (evaluate), and MLflow's UI charts them per run
            tracking.log_batch(
                client, run_id, history=trained.history,
                metrics={k: trained.info.get(k) for k in
                         ("val_accuracy", "val_nll", "temperature", "val_ece", "val_ece_uncalibrated")},
                tags={
                    "data.target.version": data["target"]["version"],
                    "data.target.dvc_md5": data["target"].get("dvc_md5"),
                    "source_weights_sha256": source["weights_sha256"] if source else None,
                },
            )
    return {
        "model_dir": trained.model_dir,
        "strategy": strategy,
        "reason": reason,
        "run_id": run_id,
        "seconds": trained.seconds,
        "epochs": len(trained.history),
        "seed": params.runtime.seed,
        "history": trained.history,
        **{k: trained.info.get(k) for k in ("val_accuracy", "val_nll", "temperature")},
    }


def _finished(out: Path, kind: str, strategy: str) -> stages.TrainedModel | None:
    """A model a finished run left in this keyed dir (the key covers code, params and data)."""
    model_json, history = out / "model" / "model.json", out / "history.json"
    if not (model_json.is_file() and history.is_file()):
        return None
    meta = json.loads(model_json.read_text())
    return stages.TrainedModel(str(model_json.parent), kind, strategy, json.loads(history.read_text()), 0.0,
                               {"reason": meta.get("strategy_reason"), **(meta.get("selection") or {})})


def _write_history(out: Path, trained: stages.TrainedModel) -> None:
    tmp = out / "history.json.tmp"
    tmp.write_text(json.dumps(trained.history, default=str))
    tmp.replace(out / "history.json")  # last: its presence marks the dir finished


def finetune_target(
    params: Params, data: dict[str, Any], source: dict[str, Any], parent_run_id: str | None
) -> dict[str, Any]:
    return _train_target("finetune", params, data, source, parent_run_id)


def train_baseline(
    params: Params, data: dict[str, Any], parent_run_id: str | None
) -> dict[str, Any]:
    return _train_target("scratch", params, data, None, parent_run_id)


pretrain_task = stage_task("pretrain-source", cache_key_fn=_pretrain_cache_key)(pretrain_source)
finetune_task = stage_task("finetune-target")(finetune_target)
scratch_task = stage_task("scratch-baseline")(train_baseline)
