"""Multitask learning (Caruana 1997): one shared body, one linear head per task.

Auxiliary tasks for digits come for free from the class names (parity, ``>= 5``), so the
target data needs no extra labels. Two ways to train:

- :func:`train_multitask`: a :class:`MultiTaskNet` on any per-sample task labels;
- :func:`run_multitask`: the pipeline strategy: a ``TransferNet`` (main head = digit class)
  trained by :func:`transfer.train.fit` with the auxiliary heads as an extra loss.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.config import OptimParams
from transfer.data import ImageTensors
from transfer.errors import DataError, TransferError
from transfer.techniques._common import FeatureTap, TechniqueInputs, fit_full, full_finetune_copy
from transfer.train import Features, Objective, StepOut, _Loop, accuracy, fit

MAIN_TASK = "class"


class MultiTaskNet(nn.Module):
    """Shared ``body`` ((B,C,H,W) -> (B,F)) and one ``nn.Linear(F, K_task)`` per task."""

    def __init__(self, body: nn.Module, feature_dim: int, heads: Mapping[str, int]) -> None:
        super().__init__()
        if not heads:
            raise TransferError("MultiTaskNet needs at least one head")
        self.body = body
        self.feature_dim = feature_dim
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, k) for name, k in heads.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x)  # (B, F)
        return {name: head(feats) for name, head in self.heads.items()}  # name -> (B, K_task)

    def task(self, name: str) -> nn.Module:
        """A module mapping images to the logits of one task (for evaluation/serving)."""
        return TaskView(self, name)


class TaskView(nn.Module):
    """``x -> net(x)[task]``: one head of a :class:`MultiTaskNet` as a plain classifier."""

    def __init__(self, net: MultiTaskNet, task: str) -> None:
        super().__init__()
        if task not in net.heads:
            raise TransferError(f"unknown task {task!r}; the net has {sorted(net.heads)}")
        self.net, self.task_name = net, task

    def forward(self, x: Tensor) -> Tensor:
        return self.net.heads[self.task_name](self.net.body(x))  # (B, K_task)


def normalise_weights(
    weights: Mapping[str, float] | Sequence[float] | None, tasks: Sequence[str]
) -> dict[str, float]:
    """Task weights as a dict; a sequence is matched to ``tasks`` in order; None = all 1."""
    if weights is None:
        return {t: 1.0 for t in tasks}
    if isinstance(weights, Mapping):
        missing = [t for t in tasks if t not in weights]
        if missing:
            raise TransferError(f"no loss weight for task(s) {missing}")
        return {t: float(weights[t]) for t in tasks}
    if len(weights) != len(tasks):
        raise TransferError(f"{len(weights)} loss weight(s) for {len(tasks)} task(s) {list(tasks)}")
    return {t: float(w) for t, w in zip(tasks, weights, strict=True)}


def task_losses(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Cross-entropy per task; targets of -1 are ignored (a sample may lack a task label)."""
    return {
        name: F.cross_entropy(outputs[name].float(), targets[name], ignore_index=-1)
        for name in outputs
        if name in targets
    }


def multitask_loss(
    outputs: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    weights: Mapping[str, float] | Sequence[float] | None = None,
) -> Tensor:
    """``sum_t w_t * CE(outputs[t], targets[t])`` over the tasks present in both dicts."""
    losses = task_losses(outputs, targets)
    w = normalise_weights(weights, list(losses))
    return torch.stack([w[t] * loss for t, loss in losses.items()]).sum()


# --- derived labels: auxiliary tasks computed from digit class names -----------------


def digit_value(class_name: str) -> int:
    """The digit a class name stands for: ``"7"``, ``"digit_7"``, ``"7_seven"`` -> 7."""
    found = re.findall(r"\d+", class_name)
    if len(found) != 1:
        raise DataError(f"class name {class_name!r} does not name one digit")
    return int(found[0])


def class_table(classes: Sequence[str], rule: Callable[[int], int]) -> Tensor:
    """(K,) int64: the auxiliary label of each class index, ``rule(digit)``."""
    return torch.tensor([rule(digit_value(c)) for c in classes], dtype=torch.int64)


def parity_table(classes: Sequence[str]) -> Tensor:
    """(K,) 0 = even digit, 1 = odd digit."""
    return class_table(classes, lambda d: d % 2)


def at_least_table(classes: Sequence[str], threshold: int = 5) -> Tensor:
    """(K,) 1 when the digit is ``>= threshold``."""
    return class_table(classes, lambda d: int(d >= threshold))


def _apply_table(table: Tensor, labels: Tensor) -> Tensor:
    out = torch.full_like(labels, -1)
    known = labels >= 0
    out[known] = table.to(labels.device)[labels[known]]
    return out  # (N,), -1 where the class is unknown


def parity_labels(labels: Tensor, classes: Sequence[str]) -> Tensor:
    """(N,) parity of each sample's digit (0 even, 1 odd; -1 for unlabelled samples)."""
    return _apply_table(parity_table(classes), labels)


def at_least_labels(labels: Tensor, classes: Sequence[str], threshold: int = 5) -> Tensor:
    """(N,) 1 when the sample's digit is ``>= threshold`` (-1 for unlabelled samples)."""
    return _apply_table(at_least_table(classes, threshold), labels)


DERIVED_TASKS: dict[str, Callable[[Sequence[str]], Tensor]] = {
    "parity": parity_table,
    "ge5": at_least_table,
}


# --- generic training on per-sample task labels ----------------------------------------


def _check_task_labels(net: MultiTaskNet, n: int, task_labels: Mapping[str, Tensor]) -> None:
    for name, labels in task_labels.items():
        if name not in net.heads:
            raise TransferError(
                f"labels for task {name!r}, but the net has heads {sorted(net.heads)}"
            )
        if labels.shape != (n,):
            raise TransferError(f"task {name!r}: {tuple(labels.shape)} labels for {n} images")


class MultiTaskObjective(Objective):
    """:func:`transfer.train.fit`'s per-batch loss for a :class:`MultiTaskNet`:
    ``sum_t w_t * CE_t`` over the heads, labels of every task indexed by the batch; the
    loop's ``train_acc`` scores the main task (the first one when there is no ``class``)."""

    def __init__(self, targets: Mapping[str, Tensor], weights: Mapping[str, float]) -> None:
        self.targets, self.weights = dict(targets), dict(weights)
        self.main = MAIN_TASK if MAIN_TASK in targets else next(iter(targets))
        self._sums: dict[str, float] = {}
        self._seen = 0

    def step(self, loop: _Loop, x: Tensor, y: Tensor, idx: Tensor) -> StepOut:
        outputs = loop.forward(x)  # name -> (B, K_task)
        batch = {name: t[idx.to(t.device)] for name, t in self.targets.items()}
        losses = task_losses(outputs, batch)
        loss = torch.stack([self.weights[t] * value for t, value in losses.items()]).sum()
        n = len(idx)
        self._seen += n
        for name, value in losses.items():
            self._sums[f"loss_{name}"] = self._sums.get(f"loss_{name}", 0.0) + value.item() * n
            hits = (outputs[name].argmax(1) == batch[name]).sum().item()
            self._sums[f"acc_{name}"] = self._sums.get(f"acc_{name}", 0.0) + hits
        return StepOut(loss, loss.detach().double() * n, outputs[self.main], batch[self.main])

    def epoch_start(self, loop: _Loop) -> None:
        self._sums, self._seen = {}, 0

    def epoch_metrics(self, loop: _Loop) -> dict[str, Any]:
        return {k: v / max(self._seen, 1) for k, v in self._sums.items()}


def _constant_lr(optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train_multitask(
    net: MultiTaskNet,
    data: ImageTensors,
    task_labels: Mapping[str, Tensor],
    weights: Mapping[str, float] | Sequence[float] | None = None,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Joint training of all heads on ``data.images`` with per-task labels (N,) each, through
    :func:`transfer.train.fit` with a :class:`MultiTaskObjective` (constant LR, no augmentation).

    Returns one record per epoch: ``epoch``, ``train_loss`` (weighted sum), ``loss_<task>``
    and ``acc_<task>`` (on the training batches), ``seconds``.
    """
    _check_task_labels(net, len(data), task_labels)
    device = torch.device(device)
    targets = {name: t.to(device) for name, t in task_labels.items()}
    cfg = OptimParams(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      label_smoothing=0.0, augment=False)
    objective = MultiTaskObjective(targets, normalise_weights(weights, list(targets)))
    result = fit(net, data, None, cfg, device=device, seed=seed, objective=objective, progress=False,
                 desc="multitask", lr_schedule=_constant_lr)
    drop = ("train_acc", "val_loss", "val_acc", "lr")
    return [{k: v for k, v in stats.as_dict().items() if k not in drop} for stats in result.history]


def evaluate_multitask(
    net: MultiTaskNet,
    data: ImageTensors,
    task_labels: Mapping[str, Tensor],
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> dict[str, float]:
    """Accuracy per task (samples labelled -1 for a task are left out of its accuracy)."""
    _check_task_labels(net, len(data), task_labels)
    device = torch.device(device)
    return {name: accuracy(net.task(name), Features(data.images, labels), device, batch_size)
            for name, labels in task_labels.items()}


# --- the pipeline strategy: TransferNet + derived auxiliary heads through fit() ---------


class AuxiliaryTasks:
    """Extra loss for :func:`transfer.train.fit`: auxiliary heads on the model's body features.

    With task weights ``w_main`` and ``w_t`` the total loss is
    ``w_main * CE_main + sum_t w_t * CE_t``: fit already adds ``CE_main`` once, so this adds
    ``(w_main - 1) * CE_main``. Auxiliary labels come from per-class tables (K,) applied to
    the batch labels ``y``. The heads live here (not in the model) so the trained model
    stays a plain ``TransferNet``; pass :meth:`parameters` to the optimizer.
    """

    def __init__(
        self,
        feature_dim: int,
        tables: Mapping[str, Tensor],
        main_weight: float = 1.0,
        weights: Mapping[str, float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        self.tables = {name: t.clone() for name, t in tables.items()}
        self.heads = nn.ModuleDict(
            {name: nn.Linear(feature_dim, int(t.max()) + 1) for name, t in self.tables.items()}
        )
        self.main_weight = float(main_weight)
        self.weights = normalise_weights(weights, list(self.tables))
        self.label_smoothing = label_smoothing
        self.tap = FeatureTap()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        self.heads.to(x.device)
        feats = self.tap.features(model, x)  # (B, F)
        total = (self.main_weight - 1.0) * F.cross_entropy(
            logits.float(), y, label_smoothing=self.label_smoothing
        )
        for name, head in self.heads.items():
            target = self.tables[name].to(y.device)[y]  # (B,)
            total = total + self.weights[name] * F.cross_entropy(head(feats).float(), target)
        return total

    def close(self) -> None:
        self.tap.close()


def run_multitask(
    source_model: nn.Module, inputs: TechniqueInputs
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fine-tune all layers on digit class (main head) + parity (auxiliary head).

    ``params.multitask_weights = [w_class, w_parity]``. The returned model is the
    ``TransferNet`` with the main head; the parity head is dropped after training.
    """
    params, train = inputs.params, inputs.train
    if len(params.multitask_weights) != 2:
        raise TransferError(
            "finetune.multitask_weights needs 2 values [class, parity], "
            f"got {params.multitask_weights}"
        )
    w_main, w_parity = params.multitask_weights
    model = full_finetune_copy(source_model, train.num_classes, inputs.seed)
    aux = AuxiliaryTasks(
        model.feature_dim, {"parity": parity_table(train.classes)}, w_main, {"parity": w_parity},
        params.label_smoothing,
    )
    try:
        history = fit_full(model, aux, inputs, "multitask",
                           extra_groups=[{"params": aux.parameters(), "lr": params.lr, "name": "aux-heads"}])
    finally:
        aux.close()
    return model, history
