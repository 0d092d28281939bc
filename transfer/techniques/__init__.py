"""Transfer techniques beyond layer freezing, each a small module with a uniform entry.

    run_technique(name, source_model, target_train, target_val, params, device, seed, progress)
        -> (model_for_eval, history)

``model_for_eval`` maps float images (B, C, H, W) to logits over the target classes;
``history`` is a list of per-epoch dicts (``EpochStats.as_dict()`` for fit-based ones).
Names: ``l2sp`` and ``distill`` (conservative training), ``gradual`` (gradual unfreezing with
discriminative LRs), ``progressive`` (progressive networks), ``multitask`` (class + parity
heads). Techniques with other data needs have their own entries: :func:`run_dann`
(labelled source + unlabelled target) and :func:`run_zero_shot` (seen/unseen classes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from transfer.config import FinetuneParams
from transfer.data import ImageTensors
from transfer.errors import TransferError
from transfer.techniques.conservative import (
    L2SP,
    Distillation,
    distance_to_source,
    run_distill,
    run_l2sp,
)
from transfer.techniques.dann import (
    DANN,
    GradReverse,
    dann_lambda,
    grad_reverse,
    run_dann,
    train_dann,
)
from transfer.techniques.gradual import GradualUnfreezing, run_gradual
from transfer.techniques.multitask import (
    MultiTaskNet,
    at_least_labels,
    evaluate_multitask,
    multitask_loss,
    parity_labels,
    run_multitask,
    train_multitask,
)
from transfer.techniques.progressive import ProgressiveNet, run_progressive
from transfer.techniques.zeroshot import (
    DIGIT_ATTRIBUTES,
    attribute_classifier,
    chance_level,
    conse_predict,
    run_zero_shot,
    zero_shot_accuracy,
)

TechniqueFn = Callable[
    [nn.Module, ImageTensors, "ImageTensors | None", FinetuneParams, torch.device, int, bool],
    tuple[nn.Module, list[dict[str, Any]]],
]

TECHNIQUES: dict[str, TechniqueFn] = {
    "l2sp": run_l2sp,
    "distill": run_distill,
    "gradual": run_gradual,
    "progressive": run_progressive,
    "multitask": run_multitask,
}


def run_technique(
    name: str,
    source_model: nn.Module,
    target_train: ImageTensors,
    target_val: ImageTensors | None,
    params: FinetuneParams,
    device: torch.device,
    seed: int,
    progress: bool = False,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Adapt ``source_model`` (a TransferNet, left unchanged) to the target with ``name``."""
    if name not in TECHNIQUES:
        raise TransferError(f"unknown technique {name!r}; known: {', '.join(sorted(TECHNIQUES))}")
    return TECHNIQUES[name](source_model, target_train, target_val, params, device, seed, progress)


__all__ = [
    "DANN", "DIGIT_ATTRIBUTES", "Distillation", "GradReverse", "GradualUnfreezing", "L2SP",
    "MultiTaskNet", "ProgressiveNet", "TECHNIQUES", "at_least_labels", "attribute_classifier",
    "chance_level", "conse_predict", "dann_lambda", "distance_to_source", "evaluate_multitask",
    "grad_reverse", "multitask_loss", "parity_labels", "run_dann", "run_technique",
    "run_zero_shot", "train_dann", "train_multitask", "zero_shot_accuracy",
]
