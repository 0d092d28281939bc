"""Domain-adversarial training, DANN (Ganin & Lempitsky 2015).

A feature extractor (the body) feeds a label head, trained on labelled *source* images,
and a domain classifier, trained to tell source from unlabelled *target* images, behind a
gradient-reversal layer: the body receives the negated domain gradient and so learns
features that the domain classifier cannot separate, i.e. features that transfer.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.config import FinetuneParams
from transfer.data import ImageTensors, random_shift, to_float
from transfer.errors import TransferError
from transfer.techniques._common import Timer, index_batches
from transfer.train import seed_everything

log = logging.getLogger(__name__)

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


def _cycle_batches(n: int, batch_size: int, generator: torch.Generator) -> Any:
    while True:
        yield from index_batches(n, batch_size, generator)


@torch.no_grad()
def accuracy(
    model: nn.Module, data: ImageTensors, device: torch.device, batch_size: int = 512
) -> float:
    """Top-1 accuracy of ``model`` on the labelled samples of ``data`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct, seen = 0, 0
    for idx in index_batches(len(data), batch_size, None):
        labels = data.labels[idx]
        known = labels >= 0
        logits = model(to_float(data.images[idx].to(device)))  # (B, K)
        correct += (logits.argmax(1).cpu()[known] == labels[known]).sum().item()
        seen += int(known.sum())
    model.train(was_training)
    return correct / seen if seen else float("nan")


@torch.no_grad()
def domain_accuracy(
    model: DANN, source: ImageTensors, target: ImageTensors, device: torch.device, limit: int = 512
) -> float:
    """Accuracy of the domain classifier (eval mode) on up to ``limit`` images of each domain.

    0.5 = chance: the features no longer tell the domains apart (what DANN aims for).
    """
    was_training = model.training
    model.eval()
    hits, seen = 0, 0
    for data, domain in ((source, SOURCE_DOMAIN), (target, TARGET_DOMAIN)):
        for idx in index_batches(min(len(data), limit), 512, None):
            _, logits = model.forward_train(to_float(data.images[idx].to(device)), 0.0)  # (B, 2)
            hits += (logits.argmax(1) == domain).sum().item()
            seen += len(idx)
    model.train(was_training)
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
) -> list[dict[str, Any]]:
    """Train ``model`` in place; one epoch = one pass over the labelled source images.

    Each step takes a source batch (B_s) and an equally large unlabelled target batch, runs
    both through the body together, and minimises ``CE(class | source) + CE(domain)`` with
    the domain gradient reversed (weight ``dann_lambda(p)``) and the LR annealed
    (``dann_lr``), p = training progress in [0, 1]. ``lambda_max=0`` = source-only training.
    Records per epoch: ``train_loss``, ``class_loss``, ``domain_loss``, ``train_acc`` (source),
    ``domain_acc`` (:func:`domain_accuracy` at the epoch's end; 0.5 = chance), ``lambda``, ``lr``,
    ``target_acc`` (when ``target_eval`` has labels), ``seconds``.
    """
    if len(source) == 0 or len(target_unlabelled) == 0:
        raise TransferError("DANN needs labelled source images and unlabelled target images")
    device = torch.device(device)
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    xs_all, ys_all = source.images.to(device), source.labels.to(device)
    xt_all = target_unlabelled.images.to(device)
    steps_per_epoch = math.ceil(len(source) / batch_size)
    total_steps = max(epochs * steps_per_epoch, 1)
    target_batches = _cycle_batches(len(target_unlabelled), batch_size, generator)
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, epochs + 1):
        timer = Timer()
        model.train()
        sums = {"train_loss": 0.0, "class_loss": 0.0, "domain_loss": 0.0, "train_acc": 0.0}
        seen, lambd = 0, 0.0
        for idx in index_batches(len(source), batch_size, generator):
            p = step / total_steps
            lambd = dann_lambda(p, lambda_max)
            for group in optimizer.param_groups:
                group["lr"] = dann_lr(lr, p)
            t_idx = next(target_batches)[: len(idx)]
            x = torch.cat([to_float(xs_all[idx]), to_float(xt_all[t_idx])])  # (B_s + B_t, C, H, W)
            if augment:
                x = random_shift(x, 2, generator=generator)
            domains = torch.cat([
                torch.full((len(idx),), SOURCE_DOMAIN, device=device),
                torch.full((len(t_idx),), TARGET_DOMAIN, device=device),
            ])  # (B_s + B_t,)
            class_logits, domain_logits = model.forward_train(x, lambd)
            y = ys_all[idx]
            class_loss = F.cross_entropy(class_logits[: len(idx)].float(), y)
            domain_loss = F.cross_entropy(domain_logits.float(), domains)
            loss = class_loss + domain_loss  # the GRL already scales the body's domain gradient
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n = len(idx)
            seen += n
            sums["train_loss"] += loss.item() * n
            sums["class_loss"] += class_loss.item() * n
            sums["domain_loss"] += domain_loss.item() * n
            sums["train_acc"] += (class_logits[:n].argmax(1) == y).sum().item()
        record: dict[str, Any] = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()}}
        record["domain_acc"] = domain_accuracy(model, source, target_unlabelled, device)
        record["lambda"] = lambd
        record["lr"] = optimizer.param_groups[0]["lr"]
        if target_eval is not None and bool((target_eval.labels >= 0).any()):
            record["target_acc"] = accuracy(model, target_eval, device)
        record["seconds"] = timer.seconds()
        history.append(record)
        if progress:
            log.info("dann epoch %d: %s", epoch, {k: round(v, 4) for k, v in record.items()})
    return history


def run_dann(
    source_model_or_arch: nn.Module | str,
    source_train: ImageTensors,
    target_unlabelled: ImageTensors,
    target_test: ImageTensors | None,
    params: FinetuneParams,
    device: torch.device,
    seed: int,
    progress: bool = False,
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
        weight_decay=params.weight_decay, augment=params.augment,
    )
    return model, history
