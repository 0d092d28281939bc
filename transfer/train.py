"""The training loop shared by pretraining, fine-tuning and the from-scratch baseline.

Data lives in memory as uint8 tensors (``ImageTensors``), so an epoch is a shuffled
walk over index batches: no DataLoader workers, no re-decoding. The loop checkpoints
every epoch (model, optimizer, scheduler, RNG state) and resumes from the last
checkpoint, giving the same final weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer import distributed
from transfer.config import OptimParams
from transfer.data import ImageTensors, random_shift, to_float
from transfer.errors import TransferError

LossFn = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TransferError("runtime.device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaler needed); full precision on CPU for reproducibility."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    history: list[EpochStats] = field(default_factory=list)
    best_val_acc: float | None = None
    seconds: float = 0.0
    resumed_from_epoch: int = 0


class Callback:
    """Hooks into :func:`fit`; subclass and override what you need."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def on_epoch_start(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def on_epoch_end(self, stats: EpochStats, model: nn.Module) -> None:
        pass


class CrashAfterEpoch(Callback):
    """Test/fault-injection helper: raise after a given epoch (simulates a crash mid-training)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, stats: EpochStats, model: nn.Module) -> None:
        if stats.epoch == self.epoch:
            raise RuntimeError(f"simulated crash after epoch {self.epoch}")


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


def _to_device(data: ImageTensors, device: torch.device) -> tuple[Tensor, Tensor]:
    images, labels = data.images, data.labels
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@torch.no_grad()
def predict_proba(
    model: nn.Module, data: ImageTensors, device: torch.device, batch_size: int = 512
) -> Tensor:
    """Class probabilities (N, K) on CPU, model in eval mode."""
    was_training = model.training
    model.to(device).eval()  # a freshly loaded model sits on the CPU
    images, _ = _to_device(data, device)
    outputs = []
    for idx in _batches(len(data), batch_size, None):
        with autocast_for(device):
            logits = model(to_float(images[idx]))
        outputs.append(logits.float().softmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, 0)


@torch.no_grad()
def _evaluate(model: nn.Module, data: ImageTensors, device: torch.device) -> tuple[float, float]:
    probs = predict_proba(model, data, device)
    labels = data.labels
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    acc = (probs.argmax(dim=1) == labels).float().mean().item()
    return loss, acc


def _make_optimizer(
    model: nn.Module, cfg: OptimParams, param_groups: Sequence[dict] | None
) -> torch.optim.Optimizer:
    groups = list(param_groups) if param_groups is not None else None
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    if not any(g["params"] for g in groups):
        raise TransferError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # Write then rename, so a crash during the save keeps the previous checkpoint intact.
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}


def _restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])


def _train_one_epoch(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: OptimParams,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    extra_loss: LossFn | None,
    on_batch: Callable[[], None],
    forward: nn.Module | None = None,
) -> tuple[float, float]:
    """One pass over the data. ``forward`` is the DDP wrapper when distributed: every rank
    draws and augments the same global batch, then trains on its own slice of it."""
    model.train()
    forward = forward or model
    split = distributed.shard if forward is not model else (lambda t: t)
    total_loss, correct, seen = 0.0, 0, 0
    for idx in _batches(len(labels), cfg.batch_size, generator):
        x = to_float(images[idx])  # (B, C, H, W) float in [-1, 1]
        if cfg.augment:
            x = random_shift(x, 2, generator=generator)
        x, y = split(x), split(labels[idx])
        with autocast_for(device):
            logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if extra_loss is not None:
                loss = loss + extra_loss(model, x, y, logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(dim=1) == y).sum().item()
        seen += len(y)
        on_batch()
    total_loss, correct, seen = distributed.all_reduce_sum([total_loss, correct, seen], device)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def fit(
    model: nn.Module,
    train: ImageTensors,
    val: ImageTensors | None,
    cfg: OptimParams,
    *,
    device: torch.device,
    seed: int,
    param_groups: Sequence[dict] | None = None,
    extra_loss: LossFn | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    distributed_data_parallel: bool = False,
) -> FitResult:
    """Train ``model`` in place with AdamW + cosine LR; resume from ``checkpoint_dir/last.pt``."""
    if len(train) == 0:
        raise TransferError(f"{desc}: the training split is empty")
    seed_everything(seed)
    model.to(device)
    forward = None
    if distributed_data_parallel:
        distributed.init(device)
        forward = distributed.wrap(model, device)
        progress = progress and distributed.is_main()
    optimizer = _make_optimizer(model, cfg, param_groups)
    steps = max(cfg.epochs, 1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    result = FitResult()
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    start_epoch = 1
    for cb in callbacks:
        cb.on_train_start(model, optimizer)
    if ckpt is not None and ckpt.exists():
        start_epoch = _resume(ckpt, model, optimizer, scheduler, generator, result, callbacks)
    images, labels = _to_device(train, device)
    started = time.perf_counter()
    with _progress(progress, desc, cfg.epochs - start_epoch + 1, len(labels), cfg.batch_size) as bar:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            for cb in callbacks:
                cb.on_epoch_start(epoch, model, optimizer)
            lr = optimizer.param_groups[0]["lr"]
            loss, acc = _train_one_epoch(
                model, images, labels, cfg, optimizer, generator, device, extra_loss, bar.advance_batch,
                forward,
            )
            scheduler.step()
            val_loss, val_acc = _evaluate(model, val, device) if val is not None and len(val) else (None, None)
            stats = EpochStats(epoch, loss, acc, val_loss, val_acc, lr, time.perf_counter() - t0)
            result.history.append(stats)
            if val_acc is not None:
                result.best_val_acc = max(result.best_val_acc or 0.0, val_acc)
            bar.end_epoch(stats)
            if ckpt is not None and distributed.is_main():
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(ckpt, _checkpoint_state(epoch, model, optimizer, scheduler, generator, result))
            distributed.barrier()
            for cb in callbacks:
                cb.on_epoch_end(stats, model)
    result.seconds = time.perf_counter() - started
    return result


def _checkpoint_state(
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    result: FitResult,
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(generator),
        "history": [s.as_dict() for s in result.history],
    }


def _resume(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    result: FitResult,
    callbacks: Sequence[Callback],
) -> int:
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn file from a crash mid-save: start over, say so
        raise TransferError(f"checkpoint {ckpt} is unreadable ({error}); delete it to restart") from None
    model.load_state_dict(state["model"])
    # Gradual unfreezing grows the optimizer: replay the epoch-start hooks up to the
    # checkpoint so the param groups match before loading the optimizer state.
    for epoch in range(1, state["epoch"] + 1):
        for cb in callbacks:
            cb.on_epoch_start(epoch, model, optimizer)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng"], generator)
    result.history = [EpochStats(**s) for s in state["history"]]
    vals = [s.val_acc for s in result.history if s.val_acc is not None]
    result.best_val_acc = max(vals) if vals else None
    result.resumed_from_epoch = state["epoch"]
    return state["epoch"] + 1


class _NoBar:
    def advance_batch(self) -> None:
        pass

    def end_epoch(self, stats: EpochStats) -> None:
        pass


class _RichBar:
    """Rich progress: one bar over all batches, the last epoch's metrics in the description."""

    def __init__(self, desc: str, epochs: int, n: int, batch_size: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.desc = desc
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), transient=False,
        )
        batches = -(-n // batch_size)
        self.task = self.progress.add_task(desc, total=max(epochs, 0) * batches, metrics="")

    def advance_batch(self) -> None:
        self.progress.advance(self.task)

    def end_epoch(self, stats: EpochStats) -> None:
        text = f"epoch {stats.epoch} loss {stats.train_loss:.3f} acc {stats.train_acc:.3f}"
        if stats.val_acc is not None:
            text += f" val_acc {stats.val_acc:.3f}"
        self.progress.update(self.task, metrics=text)


@contextlib.contextmanager
def _progress(enabled: bool, desc: str, epochs: int, n: int, batch_size: int) -> Iterator[Any]:
    if not enabled or epochs <= 0:
        yield _NoBar()
        return
    bar = _RichBar(desc, epochs, n, batch_size)
    with bar.progress:
        yield bar
