"""The pipeline stages as plain functions: params in, result out.

Prefect tasks (``tasks/``), DVC stages (through the CLI) and benchmarks all call these,
so every entry point runs the same code. Nothing here knows about MLflow or Prefect.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from transfer import distributed, fingerprint, freezing, stats
from transfer.calibration import apply_temperature, fit_temperature, nll
from transfer.config import Params
from transfer.data import ImageTensors, dataset_version, load_split, prepare_datasets, subsample_per_class
from transfer.errors import TransferError
from transfer.metrics import classification_report, expected_calibration_error, reliability_table
from transfer.models import (
    TransferNet, create_model, load_model_dir, save_model_dir, weights_preprocessing, weights_sha256,
)
from transfer.plots import plot_confusion_matrix, plot_learning_curves, plot_reliability
from transfer.preprocessing import Preprocessing
from transfer.strategies import AUTO, StrategyContext, get_strategy
from transfer.strategies.dann import unlabelled_target as dann_unlabelled_target
from transfer.train import fit, predict_proba, runtime_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """What a training stage hands on: where the model is and how it got there."""

    model_dir: str
    stage: str
    strategy: str
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def dataset_dirs(params: Params) -> dict[str, Path]:
    root = Path(params.data.root)
    return {"source": root / "source", "target": root / "target"}


def prepare(params: Params, *, strict: bool = True, progress: bool = True) -> dict[str, Any]:
    """Materialise source and target ImageFolder trees + manifests; return their versions."""
    dirs = prepare_datasets(params.data, strict=strict, progress=progress,
                            min_per_split=params.validate_.min_per_class)
    return {name: {"dir": str(path), "version": dataset_version(path)} for name, path in dirs.items()}


def input_preprocessing(params: Params) -> Preprocessing:
    """What pretraining (and scratch, at the same resolution) feeds the model: torchvision
    weights' own preprocessing when ``pretrain.weights`` is a torchvision-layout file or
    ``hub``, else the pipeline's (x/255 - 0.5) / 0.5 at ``data.image_size``."""
    data, pre = params.data, params.pretrain
    prep = weights_preprocessing(pre.arch, pre.weights, data.channels, pre.input_size, pre.grey_to_rgb)
    return prep or Preprocessing(pre.input_size or data.image_size, data.channels)


def model_preprocessing(params: Params, meta: dict[str, Any]) -> Preprocessing:
    """A saved model's preprocessing (``model.json``); the params' for a model saved before
    the record existed."""
    return Preprocessing.from_meta(meta) if meta.get("preprocessing") else input_preprocessing(params)


def _load(params: Params, name: str, split: str, prep: Preprocessing | None = None) -> ImageTensors:
    prep = prep or input_preprocessing(params)
    data = params.data
    return load_split(dataset_dirs(params)[name], split, prep.image_size, prep.channels,
                      resize_ratio=prep.resize_ratio, storage=data.split_storage,
                      memory_mb=data.in_memory_max_mb)


def _loader(params: Params, prep: Preprocessing | None) -> Callable[[str, str], ImageTensors]:
    """``(dataset, split) -> tensors`` with ``prep``: how a strategy reads more than its splits."""
    return lambda name, split: _load(params, name, split, prep)


def target_splits(params: Params, prep: Preprocessing | None = None) -> dict[str, ImageTensors]:
    """Target train (k labels per class), val and test, all from the manifest.

    The k labels are drawn with ``data.seed``: every training seed of a run sees the same
    labelled images, as a user's fixed labelled set would be.
    """
    k, seed = params.finetune.labels_per_class, params.data.seed
    prep = prep or input_preprocessing(params)
    return {
        "train": subsample_per_class(_load(params, "target", "train", prep), k, seed),
        "val": _load(params, "target", "val", prep),
        "test": _load(params, "target", "test", prep),
    }


def _describe(prep: Preprocessing) -> str:
    if prep.is_own:
        return "(x/255 - 0.5) / 0.5"
    return f"(x/255 - {list(prep.mean)}) / {list(prep.std)}"


def _model_meta(
    params: Params, model: TransferNet, classes: list[str], prep: Preprocessing, **extra: Any
) -> dict[str, Any]:
    return {
        "arch": params.pretrain.arch,
        "image_size": prep.image_size,
        "channels": prep.channels,
        "classes": classes,
        "normalisation": _describe(prep),
        "preprocessing": prep.to_meta(),
        "code_fingerprint": fingerprint.code_fingerprint(),  # the transfer/ code that trained it
        **extra,
    }


def _history(result: Any) -> list[dict[str, Any]]:
    return [stats.as_dict() for stats in result.history]


def select_on_validation(model: torch.nn.Module, val: ImageTensors, params: Params,
                         device: torch.device) -> dict[str, Any]:
    """What the selection split says about a trained model: accuracy, NLL and the fitted
    temperature (calibration), the figures every choice of the pipeline is made on."""
    if len(val) == 0:
        return {"val_accuracy": None, "val_nll": None, "temperature": 1.0}
    probs = predict_proba(model, val, device)
    bins = params.evaluate.calibration_bins
    temperature = fit_temperature(probs, val.labels) if params.evaluate.calibrate else 1.0
    calibrated = apply_temperature(probs, temperature)
    return {
        "val_accuracy": float((probs.argmax(dim=1) == val.labels).float().mean()),
        "val_nll": nll(probs, val.labels, temperature),
        "temperature": temperature,
        "val_ece_uncalibrated": expected_calibration_error(probs, val.labels, bins),
        "val_ece": expected_calibration_error(calibrated, val.labels, bins),
    }


def pretrain(params: Params, out_dir: str | Path, *, progress: bool = True) -> TrainedModel:
    """Train the backbone on the source task; checkpoints let a crashed run resume."""
    out = Path(out_dir)
    device = runtime_device(params.runtime)
    prep = input_preprocessing(params)
    train, val = _load(params, "source", "train", prep), _load(params, "source", "val", prep)
    seed_everything(params.runtime.seed)  # the initial weights too, not only the batches
    model = create_model(
        params.pretrain.arch, len(train.classes), prep.channels, weights=params.pretrain.weights,
        preprocessing=prep,
    )
    init = {"weights": params.pretrain.weights or "random", "sha256": weights_sha256(model.state_dict())}
    result = fit(
        model, train, val, params.pretrain, device=device, seed=params.runtime.seed,
        checkpoint_dir=out / "checkpoints", distributed_data_parallel=params.runtime.distributed, progress=progress, desc="pretrain (source)",
        loader_workers=params.data.loader_workers,
    )
    test = _load(params, "source", "test", prep)
    report = classification_report(predict_proba(model, test, device), test.labels, test.classes)
    meta = _model_meta(
        params, model, train.classes, prep, stage="pretrain", initial_weights=init,
        source_kind=params.data.source.kind,
        source_data_version=dataset_version(dataset_dirs(params)["source"]),
        source_test_accuracy=report["accuracy"],
    )
    model_dir = out / "source_model"
    _save_on_main(model, model_dir, meta)
    saved = json.loads((model_dir / "model.json").read_text())
    return TrainedModel(
        str(model_dir), "pretrain", "source", _history(result), result.seconds,
        {"source_test_accuracy": report["accuracy"], "weights_sha256": saved["weights_sha256"],
         "resumed_from_epoch": result.resumed_from_epoch},
    )


def resolve_strategy(params: Params) -> tuple[str, str]:
    """The strategy to run and why (``auto`` decides from labels per class)."""
    ft = params.finetune
    if ft.strategy != AUTO:
        get_strategy(ft.strategy)  # an unknown name: one line naming the registered ones
        return ft.strategy, f"strategy={ft.strategy} set in params"
    return freezing.choose_strategy(ft.labels_per_class, ft.auto_head_max, ft.auto_last_k_max, ft.auto_above)


def finetune(
    params: Params,
    source_model_dir: str | Path,
    out_dir: str | Path,
    *,
    strategy: str | None = None,
    progress: bool = True,
) -> TrainedModel:
    """Re-use the source body, train it on the target with the chosen strategy
    (``transfer/strategies/``: each one re-initialises the head its own way)."""
    chosen, reason = (strategy, "requested") if strategy and strategy != AUTO else resolve_strategy(params)
    run = get_strategy(chosen).run  # an unknown name fails before any data is read
    out = Path(out_dir)
    _, source_meta = load_model_dir(source_model_dir)  # validates the dir: a clear error if broken
    prep = model_preprocessing(params, source_meta)  # the body's input: the source's preprocessing
    splits = target_splits(params, prep)
    device = runtime_device(params.runtime)
    target_version = dataset_version(dataset_dirs(params)["target"])
    ft = params.finetune
    result = run(StrategyContext(
        chosen, params, Path(source_model_dir), splits, prep, device, out, progress, target_version,
        _loader(params, prep),
    ))
    model = result.model
    log.info("fine-tuned with strategy=%s (%s)", chosen, reason)
    selection = select_on_validation(model, splits["val"], params, device)
    meta = _model_meta(
        params, model, splits["train"].classes, prep, stage="finetune", strategy=chosen, strategy_reason=reason,
        labels_per_class=ft.labels_per_class, source_model=source_meta, seed=params.runtime.seed,
        temperature=selection["temperature"], selection=selection,
        source_weights_sha256=source_meta.get("weights_sha256"),
        target_data_version=target_version,
        trainable=freezing.trainable_summary(model) if isinstance(model, TransferNet) else {},
    )
    model_dir = out / "model"
    _save_any(model, model_dir, {**meta, **result.meta})
    return TrainedModel(str(model_dir), "finetune", chosen, result.history, result.seconds,
                        {"reason": reason, **selection})


def unlabelled_target(params: Params, prep: Preprocessing | None = None) -> ImageTensors:
    """Target images for domain adaptation, labels dropped (see :func:`transfer.strategies.dann.unlabelled_target`)."""
    return dann_unlabelled_target(_loader(params, prep))


def _save_on_main(model: torch.nn.Module, model_dir: Path, meta: dict[str, Any]) -> None:
    """Under DDP every rank holds the same weights: rank 0 writes, the others wait."""
    if distributed.is_main():
        save_model_dir(model.cpu(), model_dir, meta)
    distributed.barrier()


def _save_any(model: torch.nn.Module, model_dir: Path, meta: dict[str, Any]) -> None:
    """A TransferNet, or another model whose strategy named its loader (``meta["technique"]``)."""
    if not isinstance(model, TransferNet) and "technique" not in meta:
        raise TransferError(f"strategy {meta.get('strategy')} produced a {type(model).__name__}, which cannot be exported")
    _save_on_main(model, model_dir, meta)


def train_scratch(params: Params, out_dir: str | Path, *, progress: bool = True) -> TrainedModel:
    """Baseline: the same architecture and target budget from random init."""
    out = Path(out_dir)
    prep = input_preprocessing(params).own()  # same resolution, random init: own normalisation
    splits = target_splits(params, prep)
    seed_everything(params.runtime.seed)
    model = create_model(params.pretrain.arch, len(splits["train"].classes), prep.channels,
                         preprocessing=prep)
    device = runtime_device(params.runtime)
    result = fit(
        model, splits["train"], splits["val"], params.finetune, device=device, seed=params.runtime.seed,
        checkpoint_dir=out / "checkpoints", distributed_data_parallel=params.runtime.distributed, progress=progress, desc="scratch baseline",
        loader_workers=params.data.loader_workers,
    )
    selection = select_on_validation(model, splits["val"], params, device)
    meta = _model_meta(params, model, splits["train"].classes, prep, stage="scratch", strategy="scratch",
                       seed=params.runtime.seed, temperature=selection["temperature"], selection=selection)
    model_dir = out / "model"
    _save_on_main(model, model_dir, meta)
    return TrainedModel(str(model_dir), "scratch", "scratch", _history(result), result.seconds, selection)


def evaluate(
    params: Params, model_dir: str | Path, out_dir: str | Path, *, name: str = "model", plots: bool = True,
) -> dict[str, Any]:
    """Test-holdout report: accuracy with its Wilson 95% CI, macro-F1, per-class recall, ECE
    before and after the model's temperature, per-image correctness (for paired tests),
    confusion matrix and reliability plots. Nothing here feeds a choice: test is for figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_model_dir(model_dir)
    test = _load(params, "target", "test", model_preprocessing(params, meta))
    if test.classes != meta["classes"]:
        raise TransferError(
            f"model {model_dir} knows classes {meta['classes']} but the target test split has {test.classes}"
        )
    device = runtime_device(params.runtime)
    raw = predict_proba(model, test, device)
    temperature = float(meta.get("temperature", 1.0))
    probs = apply_temperature(raw, temperature)
    bins = params.evaluate.calibration_bins
    report = classification_report(probs, test.labels, test.classes, bins)
    correct = (probs.argmax(dim=1) == test.labels).numpy()
    interval = stats.accuracy_ci(correct)
    report.update(
        n_test=len(test), accuracy_ci=[interval.ci_low, interval.ci_high], temperature=temperature,
        ece_uncalibrated=expected_calibration_error(raw, test.labels, bins),
        seed=meta.get("seed"), val_accuracy=meta.get("selection", {}).get("val_accuracy"),
        correct=correct.astype(int).tolist(),
        reliability={"uncalibrated": reliability_table(raw, test.labels, bins),
                     "calibrated": reliability_table(probs, test.labels, bins)},
    )
    if plots:
        plot_confusion_matrix(
            report["confusion_matrix"], test.classes, out / f"confusion_{name}.png", f"{name}: confusion matrix"
        )
        plot_reliability(raw, test.labels, out / f"reliability_{name}_uncalibrated.png", bins,
                         f"{name}, uncalibrated (T = 1)")
        plot_reliability(probs, test.labels, out / f"reliability_{name}.png", bins,
                         f"{name}, temperature T = {temperature:.2f}")
    (out / f"metrics_{name}.json").write_text(json.dumps(report, indent=2))
    return report


def best_on_validation(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed to register: highest val accuracy, then lowest val NLL, then lowest seed.

    Only selection-split figures enter: the test holdout never picks a model.
    """
    if not runs:
        raise TransferError("no trained seed to choose from")

    def rank(run: dict[str, Any]) -> tuple[float, float, int]:
        acc, loss = run.get("val_accuracy"), run.get("val_nll")
        return (-(acc if acc is not None else -1.0), loss if loss is not None else float("inf"), run["seed"])

    return min(runs, key=rank)


def learning_curve_plot(trained: TrainedModel, path: str | Path) -> Path:
    plot_learning_curves(trained.history, path, f"{trained.stage} ({trained.strategy})")
    return Path(path)


def transfer_gain(transfer: dict[str, Any], scratch: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Transfer vs scratch on the same test images: paired bootstrap CI and exact McNemar.

    Negative transfer = scratch significantly better; a CI covering zero = no measurable gain.
    """
    comparison = stats.compare_paired(transfer["correct"], scratch["correct"])
    return {
        "transfer_accuracy": transfer["accuracy"], "scratch_accuracy": scratch["accuracy"],
        "gain": comparison.delta, "gain_ci": [comparison.ci_low, comparison.ci_high],
        "p_value": comparison.p_value, "significant": comparison.better(alpha),
        "negative_transfer": comparison.worse(alpha), "verdict": stats.gain_verdict(comparison, alpha),
        "described": comparison.describe(),
    }
