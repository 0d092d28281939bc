"""Conservative training: keep the fine-tuned model close to the source model.

Two regularisers, both usable as ``extra_loss`` of :func:`transfer.train.fit`
(signature ``(model, x, y, logits) -> Tensor``):

- :class:`L2SP`: L2-SP (Li et al. 2018): pull the weights towards the source weights.
- :class:`Distillation`: LwF-style output distillation (Li & Hoiem 2016): keep the
  outputs of the source task unchanged while learning the target task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.errors import TransferError
from transfer.techniques._common import (
    FeatureTap, TechniqueInputs, fit_full, frozen_copy, full_finetune_copy, snapshot,
)


class L2SP:
    """L2-SP (Li et al. 2018): ``alpha/2 ||w_body - w_source||^2 + beta/2 ||w_new||^2``.

    A trainable parameter counts as *body* when the source state dict holds a tensor of
    the same name and shape and the name does not start with one of ``new_prefixes``
    (default ``head.``: the re-initialised classifier is new even when its shape matches
    the source head). Every other trainable parameter is *new* and gets plain L2 decay.
    Use with ``weight_decay=0``: ordinary weight decay pulls towards zero, against L2-SP.
    """

    def __init__(
        self,
        source_state_dict: dict[str, Tensor],
        alpha: float,
        beta: float,
        new_prefixes: Sequence[str] = ("head.",),
    ) -> None:
        self.source = snapshot(source_state_dict)
        self.alpha, self.beta = float(alpha), float(beta)
        self.new_prefixes = tuple(new_prefixes)
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}

    def is_body(self, name: str, param: Tensor) -> bool:
        ref = self.source.get(name)
        return (
            ref is not None
            and ref.shape == param.shape
            and not name.startswith(self.new_prefixes)
        )

    def _reference(self, name: str, device: torch.device) -> Tensor:
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = self.source[name].to(device)
        return self._on_device[key]

    def penalty(self, model: nn.Module) -> Tensor:
        """The regulariser alone (a scalar tensor on the model's device)."""
        body_sq: list[Tensor] = []
        new_sq: list[Tensor] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if self.is_body(name, p):
                body_sq.append((p - self._reference(name, p.device)).pow(2).sum())
            else:
                new_sq.append(p.pow(2).sum())
        device = next(model.parameters()).device
        zero = torch.zeros((), device=device)
        body = torch.stack(body_sq).sum() if body_sq else zero
        new = torch.stack(new_sq).sum() if new_sq else zero
        return 0.5 * self.alpha * body + 0.5 * self.beta * new

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        return self.penalty(model)


def distance_to_source(
    model: nn.Module, source_state_dict: dict[str, Tensor], new_prefixes: Sequence[str] = ("head.",)
) -> float:
    """Euclidean distance between the model's body parameters and the source weights."""
    total = 0.0
    for name, p in model.named_parameters():
        ref = source_state_dict.get(name)
        if ref is None or ref.shape != p.shape or name.startswith(tuple(new_prefixes)):
            continue
        total += (p.detach().cpu() - ref.detach().cpu()).pow(2).sum().item()
    return total**0.5


DistillMode = Literal["logits", "features"]


class Distillation:
    """LwF-style output distillation (Li & Hoiem 2016) against a frozen source model.

    The target task usually has other classes than the source, so the student's source-task
    outputs come from a *frozen copy of the source head attached to the student body*:

    - ``mode="logits"`` (default): ``weight * T^2 * KL(softmax(t/T) || softmax(s/T))`` with
      ``t = teacher(x)`` (B, K_source) and ``s = source_head(student.body(x))`` (B, K_source).
      Unlike LwF the old head stays fixed, so the loss constrains the shared body only.
    - ``mode="features"``: ``weight * mean((student.body(x) - teacher.body(x))^2)`` (B, F),
      for when the source head is not meaningful.

    The teacher is deep-copied and frozen (eval mode, no gradients). The student's body
    features are taken from its forward pass through a :class:`FeatureTap`; call
    :meth:`close` after training to remove the hook.
    """

    def __init__(
        self, teacher: nn.Module, weight: float, temperature: float, mode: DistillMode = "logits"
    ) -> None:
        if mode not in ("logits", "features"):
            raise TransferError(f"distillation mode must be 'logits' or 'features', got {mode!r}")
        if temperature <= 0:
            raise TransferError(f"distillation temperature must be > 0, got {temperature}")
        self.teacher = frozen_copy(teacher)
        self.source_head = frozen_copy(teacher.head) if mode == "logits" else None
        self.weight, self.temperature, self.mode = float(weight), float(temperature), mode
        self.tap = FeatureTap()

    def _to(self, device: torch.device) -> None:
        self.teacher.to(device)
        if self.source_head is not None:
            self.source_head.to(device)

    def student_source_logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """Source-task logits of the student: the frozen source head on its body features."""
        if self.source_head is None:
            raise TransferError("student_source_logits needs mode='logits'")
        self._to(x.device)
        return self.source_head(self.tap.features(model, x))  # (B, K_source)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        if self.weight == 0:
            return torch.zeros((), device=x.device)
        self._to(x.device)
        student = self.tap.features(model, x).float()  # (B, F)
        with torch.no_grad():
            teacher_feats = self.teacher.features(x).float()  # (B, F)
        if self.mode == "features":
            return self.weight * F.mse_loss(student, teacher_feats)
        t = self.temperature
        with torch.no_grad():
            teacher_logits = self.teacher.head(teacher_feats).float()  # (B, K_source)
        student_logits = self.source_head(student).float()  # (B, K_source)
        kl = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return self.weight * t * t * kl

    def close(self) -> None:
        self.tap.close()


def run_l2sp(
    source_model: nn.Module, inputs: TechniqueInputs
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Full fine-tuning (new head) with the L2-SP penalty instead of weight decay."""
    params = inputs.params
    model = full_finetune_copy(source_model, inputs.train.num_classes, inputs.seed)
    penalty = L2SP(source_model.state_dict(), params.l2sp_alpha, params.l2sp_beta)
    history = fit_full(model, penalty, inputs, "l2sp", weight_decay=0.0)
    return model, history


def run_distill(
    source_model: nn.Module, inputs: TechniqueInputs
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Full fine-tuning (new head) plus LwF output distillation from the frozen source model."""
    params = inputs.params
    model = full_finetune_copy(source_model, inputs.train.num_classes, inputs.seed)
    distill = Distillation(source_model, params.distill_weight, params.distill_temperature)
    try:
        history = fit_full(model, distill, inputs, "distill")
    finally:
        distill.close()
    return model, history
