"""Domain-adversarial training, DANN (Ganin & Lempitsky 2015).

A feature extractor (the body) feeds a label head, trained on labelled *source* images,
and a domain classifier, trained to tell source from unlabelled *target* images, behind a
gradient-reversal layer: the body receives the negated domain gradient and so learns
features that the domain classifier cannot separate, i.e. features that transfer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.config import FinetuneParams, OptimParams
from transfer.data import ImageTensors, to_float
from transfer.errors import TransferError
from transfer.train import (
    Callback, EpochStats, Features, Objective, StepOut, _Loop, accuracy, fit, index_batches, predict_proba,
    seed_everything,
)


SOURCE_DOMAIN, TARGET_DOMAIN = 0, 1


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambd``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lambd * grad, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """The gradient-reversal layer ``R_lambda``: ``R(x) = x``, ``dR/dx = -lambda I``."""
    return GradReverse.apply(x, float(lambd))


def dann_lambda(progress: float, lambda_max: float = 1.0, gamma: float = 10.0) -> float:
    """Adaptation weight ramp ``lambda_max * (2 / (1 + exp(-gamma p)) - 1)``, p in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return lambda_max * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


def dann_lr(lr: float, progress: float) -> float:
    """The paper's annealed learning rate ``lr / (1 + 10 p) ** 0.75``."""
    return lr / (1.0 + 10.0 * min(max(progress, 0.0), 1.0)) ** 0.75


class DANN(nn.Module):
    """Body + label head + domain classifier (behind a gradient-reversal layer).

    ``forward(x)`` returns class logits (B, K), so a trained DANN evaluates and serves like
    any classifier; :meth:`forward_train` also returns domain logits (B, 2).
    ``head`` may be passed to re-use an existing ``nn.Linear`` (e.g. a TransferNet's head).
    """

    def __init__(
        self,
        body: nn.Module,
        feature_dim: int,
        num_classes: int,
        head: nn.Linear | None = None,
        domain_hidden: int = 64,
    ) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.head = head if head is not None else nn.Linear(feature_dim, num_classes)
        if self.head.out_features != num_classes:
            raise TransferError(
                f"head gives {self.head.out_features} classes, expected {num_classes}"
            )
        self.domain_classifier = nn.Sequential(
            nn.Linear(feature_dim, domain_hidden), nn.ReLU(), nn.Linear(domain_hidden, 2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (B, K)

    def forward_train(self, x: Tensor, lambd: float) -> tuple[Tensor, Tensor]:
        feats = self.body(x)  # (B, F)
        domain = self.domain_classifier(grad_reverse(feats, lambd))  # (B, 2)
        return self.head(feats), domain


class DannSchedule(torch.optim.lr_scheduler.LRScheduler):
    """The paper's annealed LR per optimizer step: ``dann_lr(base_lr, step / total_steps)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        self.total_steps = max(total_steps, 1)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [dann_lr(base, self.last_epoch / self.total_steps) for base in self.base_lrs]


class DannObjective(Objective):
    """:func:`transfer.train.fit`'s per-batch loss for DANN.

    Each source batch (B_s) is joined by an equally large batch of unlabelled target
    images, cycled through in shuffled passes drawn on the loop's generator; both run
    through the body together (one augmentation draw over the joined batch) and the loss is
    ``CE(class | source) + CE(domain)``, the domain gradient reversed with weight
    ``dann_lambda(step / total_steps)``.
    """

    def __init__(self, source: ImageTensors, target: ImageTensors, device: torch.device,
                 total_steps: int, lambda_max: float, target_eval: ImageTensors | None) -> None:
        self.source, self.target, self.target_eval = source, target, target_eval
        self.target_images = target.images.to(device)
        self.total_steps, self.lambda_max = max(total_steps, 1), lambda_max
        self.steps = 0  # optimizer steps so far (the lambda ramp's progress)
        self._batches: tuple[Tensor, ...] = ()  # the current pass over the target images
        self._next = 0  # its next batch
        self.lambd, self.lr = 0.0, 0.0
        self._sums = [0.0, 0.0, 0]  # class loss, domain loss (summed over samples), samples

    def _target_batch(self, loop: _Loop, size: int) -> Tensor:
        if self._next >= len(self._batches):
            self._batches, self._next = index_batches(len(self.target), loop.cfg.batch_size, loop.shuffle), 0
        self._next += 1
        return self._batches[self._next - 1][:size]

    def inputs(self, loop: _Loop, x: Tensor, idx: Tensor, shard: tuple[int, int, int] | None) -> Tensor:
        target = to_float(self.target_images[self._target_batch(loop, len(idx))])
        return super().inputs(loop, torch.cat([x, target]), idx, shard)  # (B_s + B_t, C, H, W)

    def step(self, loop: _Loop, x: Tensor, y: Tensor, idx: Tensor) -> StepOut:
        n = len(idx)
        self.lambd = dann_lambda(self.steps / self.total_steps, self.lambda_max)
        self.lr = loop.optimizer.param_groups[0]["lr"]
        domains = torch.cat([
            torch.full((n,), SOURCE_DOMAIN, device=x.device),
            torch.full((len(x) - n,), TARGET_DOMAIN, device=x.device),
        ])  # (B_s + B_t,)
        class_logits, domain_logits = loop.model.forward_train(x, self.lambd)
        class_loss = F.cross_entropy(class_logits[:n].float(), y)
        domain_loss = F.cross_entropy(domain_logits.float(), domains)
        loss = class_loss + domain_loss  # the GRL already scales the body's domain gradient
        self.steps += 1
        self._sums[0] += class_loss.item() * n
        self._sums[1] += domain_loss.item() * n
        self._sums[2] += n
        return StepOut(loss, loss.detach().double() * n, class_logits[:n], y)

    def epoch_start(self, loop: _Loop) -> None:
        self._sums = [0.0, 0.0, 0]

    def epoch_metrics(self, loop: _Loop) -> dict[str, Any]:
        seen = max(self._sums[2], 1)
        record: dict[str, Any] = {
            "class_loss": self._sums[0] / seen, "domain_loss": self._sums[1] / seen,
            "domain_acc": domain_accuracy(loop.model, self.source, self.target, loop.device),
            "lambda": self.lambd, "lr": self.lr,
        }
        if self.target_eval is not None and bool((self.target_eval.labels >= 0).any()):
            record["target_acc"] = accuracy(loop.model, self.target_eval, loop.device)
        return record

    def origin(self) -> dict[str, Any]:
        return {"technique": "dann", "lambda_max": self.lambda_max, "total_steps": self.total_steps,
                "source": len(self.source), "target": len(self.target)}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "target_batches": list(self._batches), "next": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self._batches, self._next = state["steps"], tuple(state["target_batches"]), state["next"]


class _DomainClassifier(nn.Module):
    """``x -> domain logits (B, 2)`` of a :class:`DANN` (for :func:`transfer.train.predict_proba`)."""

    def __init__(self, model: DANN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.domain_classifier(self.model.body(x))


def domain_accuracy(
    model: DANN, source: ImageTensors, target: ImageTensors, device: torch.device, limit: int = 512
) -> float:
    """Accuracy of the domain classifier (eval mode) on up to ``limit`` images of each domain.

    0.5 = chance: the features no longer tell the domains apart (what DANN aims for).
    """
    hits, seen = 0, 0
    for data, domain in ((source, SOURCE_DOMAIN), (target, TARGET_DOMAIN)):
        n = min(len(data), limit)
        images = Features(data.images[:n], torch.full((n,), domain))
        hits += int((predict_proba(_DomainClassifier(model), images, device).argmax(1) == domain).sum())
        seen += n
    return hits / max(seen, 1)


def train_dann(
    model: DANN,
    source: ImageTensors,
    target_unlabelled: ImageTensors,
    epochs: int,
    lr: float,
    batch_size: int,
    lambda_max: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    target_eval: ImageTensors | None = None,
    weight_decay: float = 0.0,
    augment: bool = False,
    checkpoint_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> list[dict[str, Any]]:
    """Train ``model`` in place through :func:`transfer.train.fit` with a
    :class:`DannObjective` and the annealed LR (:class:`DannSchedule`); one epoch = one pass
    over the labelled source images. ``lambda_max=0`` = source-only training.
    Records per epoch: ``train_loss``, ``class_loss``, ``domain_loss``, ``train_acc`` (source),
    ``domain_acc`` (:func:`domain_accuracy` at the epoch's end; 0.5 = chance), ``lambda``, ``lr``
    (of the epoch's last step), ``target_acc`` (when ``target_eval`` has labels), ``seconds``.
    """
    if len(source) == 0 or len(target_unlabelled) == 0:
        raise TransferError("DANN needs labelled source images and unlabelled target images")
    device = torch.device(device)
    cfg = OptimParams(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      label_smoothing=0.0, augment=augment)
    total_steps = epochs * math.ceil(len(source) / batch_size)
    objective = DannObjective(source, target_unlabelled, device, total_steps, lambda_max, target_eval)
    result = fit(
        model, source, None, cfg, device=device, seed=seed, objective=objective,
        lr_schedule=lambda optimizer, _: DannSchedule(optimizer, total_steps),
        checkpoint_dir=checkpoint_dir, callbacks=callbacks, progress=progress, desc="dann",
    )
    keys = ["epoch", "train_loss", "class_loss", "domain_loss", "train_acc", "domain_acc", "lambda", "lr",
            "target_acc", "seconds"]
    return [{k: record[k] for k in keys if k in record} for record in map(EpochStats.as_dict, result.history)]


def run_dann(
    source_model_or_arch: nn.Module | str,
    source_train: ImageTensors,
    target_unlabelled: ImageTensors,
    target_test: ImageTensors | None,
    params: FinetuneParams,
    device: torch.device,
    seed: int,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """DANN from a source ``TransferNet`` (its body and, when it fits, its head) or an arch name.

    Source and target must share the label space (``source_train.classes``); the target
    labels are never used for training, only ``target_test`` for the ``target_acc`` record.
    Returns the trained ``TransferNet`` (body + label head; the domain classifier is
    dropped) and the history of :func:`train_dann` (epochs, lr, batch size, weight decay,
    augmentation and ``dann_lambda_max`` from ``params``).
    """
    classes = source_train.classes
    if target_test is not None and target_test.classes != classes:
        raise TransferError(
            f"DANN needs one label space: source classes {classes}, "
            f"target classes {target_test.classes}"
        )
    seed_everything(seed)
    if isinstance(source_model_or_arch, str):
        from transfer.models import create_model

        channels = source_train.images.shape[1]
        model = create_model(source_model_or_arch, len(classes), in_channels=channels)
    else:
        model = copy.deepcopy(source_model_or_arch)
        if model.head.out_features != len(classes):
            model.reset_classifier(len(classes))
    for p in model.parameters():
        p.requires_grad_(True)
    dann = DANN(model.body, model.feature_dim, len(classes), head=model.head)
    history = train_dann(
        dann, source_train, target_unlabelled, params.epochs, params.lr, params.batch_size,
        params.dann_lambda_max, seed, device, progress, target_eval=target_test,
        weight_decay=params.weight_decay, augment=params.augment, checkpoint_dir=checkpoint_dir,
    )
    return model, history
