"""Transfer techniques beyond layer freezing, each a small module.

Most share one signature, which ``transfer.strategies.run_technique`` calls::

    run_l2sp / run_distill / run_progressive / run_multitask(
        source_model, TechniqueInputs(target_train, target_val, params, device, seed, progress)
    ) -> (model_for_eval, history)

``model_for_eval`` maps float images (B, C, H, W) to logits over the target classes;
``history`` is a list of per-epoch dicts (``EpochStats.as_dict()``): every technique trains
through ``transfer.train.fit``, DANN and multitask with their own ``Objective``.
:class:`GradualUnfreezing` is a ``fit`` callback (the ``gradual`` freeze strategy's).
Techniques with other data needs have their own entries: :func:`run_dann` (labelled source +
unlabelled target) and :func:`run_zero_shot` (seen/unseen classes). The strategies that
``finetune.strategy`` names live in ``transfer/strategies/``.
"""

from __future__ import annotations

from transfer.techniques._common import TechniqueInputs
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
from transfer.techniques.gradual import GradualUnfreezing
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

__all__ = [
    "DANN", "DIGIT_ATTRIBUTES", "Distillation", "GradReverse", "GradualUnfreezing", "L2SP",
    "MultiTaskNet", "ProgressiveNet", "TechniqueInputs", "at_least_labels", "attribute_classifier",
    "chance_level", "conse_predict", "dann_lambda", "distance_to_source", "evaluate_multitask",
    "grad_reverse", "multitask_loss", "parity_labels", "run_dann", "run_distill", "run_l2sp",
    "run_multitask", "run_progressive", "run_zero_shot", "train_dann", "train_multitask", "zero_shot_accuracy",
]
