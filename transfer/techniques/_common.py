"""Small helpers shared by the techniques: state snapshots, frozen teachers, feature taps,
and the full fine-tuning entry (a fresh-headed copy trained by ``fit`` with an extra loss)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from transfer import freezing
from transfer.config import FinetuneParams
from transfer.data import ImageTensors
from transfer.errors import TransferError
from transfer.train import LossFn, fit, seed_everything


@dataclass(frozen=True)
class TechniqueInputs:
    """What a technique trains from besides the source model: the target splits, the
    fine-tune params, the device, the seed and whether to draw progress."""

    train: ImageTensors
    val: ImageTensors | None
    params: FinetuneParams
    device: torch.device
    seed: int
    progress: bool = False


def snapshot(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copy of a state dict, so later training cannot change it."""
    return {name: t.detach().to("cpu", copy=True) for name, t in state_dict.items()}


def frozen_copy(module: nn.Module) -> nn.Module:
    """Deep copy in eval mode with every parameter ``requires_grad=False`` (a fixed teacher)."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.eval()


def body_of(model: nn.Module) -> nn.Module:
    """The feature extractor of a ``TransferNet``-like model (``model.body``)."""
    body = getattr(model, "body", None)
    if not isinstance(body, nn.Module):
        raise TransferError(f"{type(model).__name__} has no .body: expected a TransferNet")
    return body


class FeatureTap:
    """Remember what ``model.body`` returned in the forward pass that made the logits.

    Extra losses (:data:`transfer.train.LossFn`) receive ``(model, x, y, logits)`` but not the
    body features. A forward hook on the body keeps the last (input, output) pair; when the
    input is the very tensor the loss gets, the stored features are reused (no second
    forward pass, no second BatchNorm update). Otherwise the body runs again.
    Call :meth:`close` (or use ``with``) to remove the hook when training is over.
    """

    def __init__(self) -> None:
        self._handle: Any = None
        self._body: nn.Module | None = None
        self._input: Tensor | None = None
        self._output: Tensor | None = None

    def features(self, model: nn.Module, x: Tensor) -> Tensor:
        body = body_of(model)
        if self._body is not body:
            self.close()
            self._body = body
            self._handle = body.register_forward_hook(self._remember)
        if self._input is x and self._output is not None:
            feats = self._output
        else:
            feats = body(x)  # (B, F)
        self._input = self._output = None
        return feats

    def _remember(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        self._input = inputs[0] if inputs else None
        self._output = output

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._body, self._input, self._output = None, None, None, None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def full_finetune_copy(source_model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of the source model with a new head of ``num_classes``, every layer trainable."""
    seed_everything(seed)  # the new head's init depends on the seed only
    model = copy.deepcopy(source_model)
    model.reset_classifier(num_classes)
    freezing.apply_freeze(model, "full")
    return model


def fit_full(
    model: nn.Module,
    extra: LossFn,
    inputs: TechniqueInputs,
    name: str,
    *,
    extra_groups: Sequence[dict] = (),
    weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """``fit`` every layer (the finetune LR per layer) with ``extra`` added to the loss;
    ``extra_groups`` join the optimizer (e.g. auxiliary heads). Returns the history dicts."""
    params = inputs.params
    groups = freezing.param_groups(
        model, params.lr, body_lr_mult=params.body_lr_mult, layer_decay=params.layer_decay
    )
    groups.extend(extra_groups)
    cfg = params if weight_decay is None else params.model_copy(update={"weight_decay": weight_decay})
    result = fit(
        model, inputs.train, inputs.val, cfg, device=inputs.device, seed=inputs.seed, param_groups=groups,
        extra_loss=extra, progress=inputs.progress, desc=f"finetune ({name})",
    )
    return [stats.as_dict() for stats in result.history]
