"""The one training loop: pretraining, fine-tuning, the baseline and every technique.

:func:`fit` trains any module on images (``ImageTensors``) or on float inputs such as
cached body features (:class:`Features`). What a batch costs is an :class:`Objective`
(default: cross-entropy on the model's logits plus ``extra_loss``); DANN and multitask
plug in their own, so batching, AMP, DDP, checkpoints/resume and progress are written once.

Data lives in memory as uint8 tensors (``ImageTensors``), so an epoch is a shuffled
walk over index batches: no DataLoader workers, no re-decoding. A split larger than memory
is memory-mapped (``transfer.data.mapped``): the same index batches are read from the file
by a ``DataLoader`` (workers, pinned memory on CUDA), so the batches, their order and the
augmentation draws are those of the in-memory path and the result is the same. On CUDA each split is
copied to the GPU once (through pinned memory) and batches are gathered, converted and
augmented there; the loop syncs with the host once per epoch. The loop checkpoints
every epoch (model, optimizer, scheduler, loss scaler, RNG state) and resumes from the
last checkpoint, giving the same final weights as an uninterrupted run with the same seed.
A checkpoint records the code fingerprint, the optimisation params and the seed; one
written by other code or for other params is not resumed (the run starts over and logs
why). A finished run deletes its checkpoint: only a crashed run can be resumed, never a
finished one (whose "resume" would train nothing and hand back the old weights).

Devices (``runtime.device: auto|cpu|cuda``): CPU trains in float32 and is bit-for-bit
reproducible for a seed. CUDA trains under autocast (bf16 where the GPU has it, else
fp16 with a GradScaler) with cuDNN autotuning: fast, not bit-reproducible. Conv nets train
in channels_last on both (the saved weights are contiguous again). Data-parallel
training (DDP under torchrun): see ``distributed``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
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

from transfer import distributed, fingerprint
from transfer.config import OptimParams, RuntimeParams
from transfer.data import ImageTensors, random_shift, to_float
from transfer.data.mapped import batch_loader
from transfer.disk import guard_disk_full
from transfer.errors import TransferError

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
# (optimizer, steps per epoch) -> an LR scheduler that fit steps after every batch
BatchSchedule = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]

# A split is kept on the GPU when it takes less than this share of the free GPU memory;
# a bigger one stays in host memory and each batch is copied through pinned memory.
_RESIDENT_SHARE = 0.4


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TransferError("runtime.device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def set_num_threads(num_threads: int) -> None:
    """``torch.set_num_threads`` when ``num_threads > 0`` (0 keeps torch's default)."""
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def runtime_device(runtime: RuntimeParams) -> torch.device:
    """The device the ``runtime`` params ask for, after applying ``runtime.num_threads``."""
    set_num_threads(runtime.num_threads)
    return resolve_device(runtime.device)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every CUDA device) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA GPUs that have it (Ampere+), else fp16; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (see :func:`amp_dtype`); full precision on CPU (reproducible)."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def uses_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Conv nets train in channels_last: cuDNN's NHWC kernels under CUDA autocast, and
    oneDNN's on CPU (small_cnn on 2 cores: 1.3x without augmentation, same speed with it)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # an objective's own per-epoch metrics

    def as_dict(self) -> dict[str, Any]:
        """One flat dict: the fields, then the objective's metrics (none on the plain path)."""
        flat = asdict(self)
        extra = flat.pop("extra")
        return {**flat, **extra}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> EpochStats:
        names = [f for f in cls.__dataclass_fields__ if f != "extra"]
        return cls(*(record[f] for f in names), extra={k: v for k, v in record.items() if k not in names})


@dataclass(frozen=True)
class Features:
    """Float inputs (N, ...) that need no conversion or augmentation, e.g. cached body
    features, with their labels (N,): what :func:`fit` trains a head on. ``images`` is
    named so for the splits' sake; it holds the features."""

    images: Tensor
    labels: Tensor
    mapped = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def as_input(batch: Tensor) -> Tensor:
    """What the model reads: uint8 images -> float in [-1, 1]; float inputs as they are."""
    return to_float(batch) if batch.dtype == torch.uint8 else batch


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


# --------------------------------------------------------------------------- data placement


def _resident_on(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= _RESIDENT_SHARE * free


class _Split:
    """A split placed for batch gathering: one uint8 tensor on the device when it fits
    (copied once through pinned memory), else in host memory with per-batch copies."""

    def __init__(self, data: ImageTensors | Features, device: torch.device) -> None:
        self.device = device
        self.n = len(data)
        self.cpu_labels = data.labels
        images, labels = data.images, data.labels
        self.resident = images.device.type == device.type or _resident_on(device, images.nbytes)
        if device.type == "cuda":
            if images.device.type == "cpu" and self.resident:
                images = images.pin_memory()
            if labels.device.type == "cpu":
                labels = labels.pin_memory()
        self.images = images.to(device, non_blocking=True) if self.resident else images
        self.labels = labels.to(device, non_blocking=True)  # (N,) int64: always small
        self.index_device = device if self.resident else torch.device("cpu")

    def gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images (B, C, H, W) and labels (B,) on the device; ``idx`` on index_device."""
        if self.resident:
            return self.images[idx], self.labels[idx]
        images = self.images[idx].pin_memory().to(self.device, non_blocking=True)
        return images, self.labels[idx.to(self.device, non_blocking=True)]

    def slice(self, start: int, stop: int) -> Tensor:
        images = self.images[start:stop]
        if not self.resident:
            images = images.pin_memory().to(self.device, non_blocking=True)
        return images

    def read(self, batches: Sequence[Tensor], world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """(uint8 images, labels) of every index batch, on the device (the global batch)."""
        for idx in batches:
            yield self.gather(idx)

    def chunks(self, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, self.n, batch_size):
            yield self.slice(start, start + batch_size)


class _MappedSplit:
    """A memory-mapped split: every index batch read from the file through a DataLoader.

    Under DDP each rank reads only its own share ``[rank::world]`` of every global batch.
    """

    sharded = True
    index_device = torch.device("cpu")

    def __init__(self, data: ImageTensors, device: torch.device, workers: int | None = None) -> None:
        self.data, self.device, self.workers = data, device, workers
        self.n = len(data)
        self.cpu_labels = data.labels

    def read(self, batches: Sequence[Tensor], world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        own = [distributed.shard(idx) for idx in batches] if world > 1 else list(batches)
        loader = batch_loader(self.data.images, self.data.labels, own, workers=self.workers,
                              pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def chunks(self, batch_size: int) -> Iterator[Tensor]:
        for images, _ in self.read(torch.arange(self.n).split(batch_size)):
            yield images


def place(data: ImageTensors | Features, device: torch.device, workers: int | None = None) -> _Split | _MappedSplit:
    """The split placed for training/evaluation: in memory, or memory-mapped."""
    return _MappedSplit(data, device, workers) if data.mapped else _Split(data, device)


def index_batches(
    n: int, batch_size: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> tuple[Tensor, ...]:
    """An epoch's index batches: shuffled by the CPU ``generator`` (the same order on every
    device and rank), in order when it is None; moved to ``device`` in one copy."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if device is not None and device.type != "cpu":
        order = order.to(device, non_blocking=True)
    return order.split(batch_size)


@torch.no_grad()
def fill_rows(chunks: Iterator[Tensor], n: int) -> Tensor | None:
    """Per-batch (B, D) outputs written into one (N, D) buffer, allocated at the first
    (None when there is none). Not a list + ``torch.cat``: small outputs interleaved with
    the big per-batch inputs fragment the heap, and resident memory grew with N (+660 MB
    over 12,000 mapped 64 px images in prediction, measured) where it now stays flat."""
    out, start = None, 0
    for chunk in chunks:
        if out is None:
            out = torch.empty(n, chunk.shape[1], dtype=chunk.dtype, device=chunk.device)
        out[start : start + len(chunk)] = chunk
        start += len(chunk)
    return out


def _predict(model: nn.Module, split: _Split | _MappedSplit, device: torch.device, batch_size: int) -> Tensor:
    def probabilities() -> Iterator[Tensor]:
        for images in split.chunks(batch_size):
            with autocast_for(device):
                logits = model(as_input(images))  # (B, K)
            yield logits.float().softmax(dim=1)

    probs = fill_rows(probabilities(), split.n)
    return probs.cpu() if probs is not None else torch.empty(0, 0)


@torch.no_grad()
def predict_proba(
    model: nn.Module, data: ImageTensors | Features, device: torch.device, batch_size: int = 512
) -> Tensor:
    """Class probabilities (N, K) on CPU, model in eval mode."""
    was_training = model.training
    model.to(device).eval()  # a freshly loaded model sits on the CPU
    try:
        return _predict(model, place(data, device), device, batch_size)
    finally:
        model.train(was_training)


def accuracy(
    model: nn.Module, data: ImageTensors | Features, device: torch.device, batch_size: int = 512
) -> float:
    """Top-1 accuracy on the labelled samples of ``data`` (label -1 = unlabelled; nan if none)."""
    known = data.labels >= 0
    if not bool(known.any()):
        return float("nan")
    hits = predict_proba(model, data, device, batch_size).argmax(dim=1) == data.labels
    return hits[known].float().mean().item()


@torch.no_grad()
def _evaluate(model: nn.Module, split: _Split | _MappedSplit, device: torch.device) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    try:
        probs = _predict(model, split, device, 512)
    finally:
        model.train(was_training)
    labels = split.cpu_labels
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    acc = (probs.argmax(dim=1) == labels).float().mean().item()
    return loss, acc


# --------------------------------------------------------------------------- optimisation


def _make_optimizer(
    model: nn.Module, cfg: OptimParams, param_groups: Sequence[dict] | None
) -> torch.optim.Optimizer:
    groups = list(param_groups) if param_groups is not None else None
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    if not any(g["params"] for g in groups):
        raise TransferError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class _Loop:
    """What one training step needs besides the batch."""

    model: nn.Module
    forward: nn.Module  # the model, or its DDP wrapper
    cfg: OptimParams
    optimizer: torch.optim.Optimizer
    device: torch.device
    shuffle: torch.Generator  # CPU: batch order
    augment: torch.Generator  # on the device: augmentation offsets (the shuffle one on CPU)
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None
    channels_last: bool = False
    world: int = 1  # > 1: this rank trains on its shard of every global batch
    extra_loss: LossFn | None = None
    objective: Objective = field(default_factory=lambda: Objective())
    batch_scheduler: Any = None  # an LR scheduler stepped after every optimizer step, or None


@dataclass
class StepOut:
    """One batch's result: ``loss`` is what backward runs on; ``reported`` the batch's summed
    loss (float64, for train_loss); ``logits`` (b, K) are scored against ``labels`` (b,)."""

    loss: Tensor
    reported: Tensor
    logits: Tensor
    labels: Tensor


class Objective:
    """The per-batch part of :func:`fit`: inputs -> loss. This one is cross-entropy on the
    model's logits plus the loop's ``extra_loss``; a technique subclasses it (DANN: class +
    domain loss; multitask: a loss per head). Subclasses that keep state across batches
    (counters, a second data stream) return it from :meth:`state_dict` so a resumed run
    goes on where the checkpoint stopped."""

    def inputs(self, loop: _Loop, x: Tensor, idx: Tensor, shard: tuple[int, int, int] | None) -> Tensor:
        """The float batch as the model reads it: random shifts when ``cfg.augment``."""
        if loop.cfg.augment and x.ndim == 4:
            x = random_shift(x, 2, generator=loop.augment, shard=shard)
        return x

    def step(self, loop: _Loop, x: Tensor, y: Tensor, idx: Tensor) -> StepOut:
        cfg, world = loop.cfg, loop.world
        logits = loop.forward(x)  # (b, K)
        if world > 1:
            ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="sum")
            loss, reported = ce * (world / len(idx)), ce.detach().double()
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            reported = loss.detach().double() * len(y)
        if loop.extra_loss is not None:
            extra = loop.extra_loss(loop.model, x, y, logits)
            loss = loss + extra
            reported = reported + extra.detach().double() * len(y)
        return StepOut(loss, reported, logits, y)

    def epoch_start(self, loop: _Loop) -> None:
        """Reset per-epoch sums."""

    def epoch_metrics(self, loop: _Loop) -> dict[str, Any]:
        """Extra per-epoch metrics (``EpochStats.extra``), after the epoch's last step."""
        return {}

    def origin(self) -> dict[str, Any]:
        """The settings a checkpoint must have been written with to be resumed (e.g. DANN's
        lambda_max); empty for the default objective."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _train_one_epoch(
    loop: _Loop, data: _Split | _MappedSplit, on_batch: Callable[[], None]
) -> tuple[float, float]:
    """One pass over the data; (mean loss, accuracy) over all ranks, one host sync.

    Under DDP every rank draws and augments the same global batch, then trains on its
    shard. The loss is the shard's summed loss times ``world / global batch``, so DDP's
    gradient average is the gradient of the global batch's mean loss, as in one process.
    """
    cfg, device, world = loop.cfg, loop.device, loop.world
    loop.forward.train()
    loop.objective.epoch_start(loop)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, correct
    seen = 0
    # a last global batch too small to give every rank a sample is skipped
    batches = [idx for idx in index_batches(data.n, cfg.batch_size, loop.shuffle, data.index_device)
               if len(idx) >= world]
    sharded = world > 1 and getattr(data, "sharded", False)  # read only this rank's share
    for idx, (raw, y) in zip(batches, data.read(batches, world), strict=True):
        shard = (len(idx), distributed.rank(), world) if sharded else None
        x = loop.objective.inputs(loop, as_input(raw), idx, shard)  # (B, ...) float
        if world > 1 and not sharded:
            x, y = distributed.shard(x), distributed.shard(y)
        if loop.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(device):
            out = loop.objective.step(loop, x, y, idx)
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.scaler is not None:
            loop.scaler.scale(out.loss).backward()
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
        else:
            out.loss.backward()
            loop.optimizer.step()
        if loop.batch_scheduler is not None:
            loop.batch_scheduler.step()
        sums[0] += out.reported
        sums[1] += (out.logits.argmax(dim=1) == out.labels).sum()
        seen += len(out.labels)
        on_batch()
    totals = torch.cat([sums, torch.tensor([seen], dtype=torch.float64, device=device)])
    total_loss, correct, seen_all = distributed.all_reduce_sum(totals, device) if world > 1 else totals.tolist()
    return total_loss / max(seen_all, 1), correct / max(seen_all, 1)


def _trainable(model: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, p in model.named_parameters() if p.requires_grad)


def fit(
    model: nn.Module,
    train: ImageTensors | Features,
    val: ImageTensors | Features | None,
    cfg: OptimParams,
    *,
    device: torch.device,
    seed: int,
    param_groups: Sequence[dict] | None = None,
    extra_loss: LossFn | None = None,
    objective: Objective | None = None,
    lr_schedule: BatchSchedule | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    distributed_data_parallel: bool = False,
    loader_workers: int | None = None,
) -> FitResult:
    """Train ``model`` in place with AdamW + cosine LR; resume from ``checkpoint_dir/last.pt``.

    ``objective`` turns a batch into a loss (default: cross-entropy + ``extra_loss``);
    ``lr_schedule(optimizer, steps_per_epoch)`` replaces the per-epoch cosine schedule by a
    scheduler stepped after every batch.

    CPU: float32, bit-for-bit reproducible for a seed. CUDA: autocast (bf16, or fp16 with a
    GradScaler), channels_last for conv nets, data resident on the GPU. With
    ``distributed_data_parallel`` (under torchrun) the model is wrapped in DDP, each global
    batch is split across ranks, metrics are summed over ranks and only rank 0 writes
    checkpoints and draws the progress bar.
    """
    if len(train) == 0:
        raise TransferError(f"{desc}: the training split is empty")
    objective = objective if objective is not None else Objective()
    if distributed_data_parallel and type(objective) is not Objective:
        raise TransferError(f"{desc}: {type(objective).__name__} does not train under DDP")
    seed_everything(seed)
    if distributed_data_parallel:
        distributed.init(device)
        progress = progress and distributed.is_main()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device)
    channels_last = uses_channels_last(model, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    optimizer = _make_optimizer(model, cfg, param_groups)
    if lr_schedule is None:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    else:
        scheduler = lr_schedule(optimizer, -(-len(train) // cfg.batch_size))
    shuffle = torch.Generator().manual_seed(seed)
    augment = shuffle if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype(device) == torch.float16 else None
    loop = _Loop(model, model, cfg, optimizer, device, shuffle, augment, scaler, channels_last,
                 distributed.world_size() if distributed_data_parallel else 1, extra_loss, objective,
                 scheduler if lr_schedule is not None else None)
    result = FitResult()
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    start_epoch = 1
    for cb in callbacks:
        cb.on_train_start(model, optimizer)
    written_by = _checkpoint_origin(cfg, seed, objective.origin())
    if ckpt is not None and ckpt.exists():
        start_epoch = _resume(ckpt, loop, scheduler, result, callbacks, written_by)
        # a warning: the previous attempt stopped there, and a resume must never be silent
        log.warning("%s: resuming from epoch %d of %d (checkpoint %s)", desc,
                    result.resumed_from_epoch, cfg.epochs, ckpt)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_split = place(train, device, loader_workers)
    val_split = place(val, device, loader_workers) if val is not None and len(val) else None
    wrapped_for: tuple[str, ...] | None = None
    started = time.perf_counter()
    try:
        with _progress(progress, desc, cfg.epochs - start_epoch + 1, len(train), cfg.batch_size,
                       cfg.epochs) as bar:
            for epoch in range(start_epoch, cfg.epochs + 1):
                t0 = time.perf_counter()
                for cb in callbacks:
                    cb.on_epoch_start(epoch, model, optimizer)
                if distributed_data_parallel and _trainable(model) != wrapped_for:
                    # DDP syncs the parameters that were trainable when it was built: wrap
                    # again when a callback (gradual unfreezing) changed the set.
                    loop.forward = model
                    gc.collect()  # the old wrapper's gradient hooks go with it
                    loop.forward, wrapped_for = distributed.wrap(model, device), _trainable(model)
                lr = optimizer.param_groups[0]["lr"]
                loss, acc = _train_one_epoch(loop, train_split, bar.advance_batch)
                if distributed_data_parallel:
                    distributed.sync_buffers(model)  # every rank evaluates and saves one model
                if loop.batch_scheduler is None:
                    scheduler.step()
                val_loss, val_acc = _evaluate(model, val_split, device) if val_split else (None, None)
                extra = objective.epoch_metrics(loop)
                stats = EpochStats(epoch, loss, acc, val_loss, val_acc, lr, time.perf_counter() - t0, extra)
                result.history.append(stats)
                if val_acc is not None:
                    result.best_val_acc = max(result.best_val_acc or 0.0, val_acc)
                bar.end_epoch(stats)
                if ckpt is not None and distributed.is_main():
                    ckpt.parent.mkdir(parents=True, exist_ok=True)
                    _save_checkpoint(ckpt, _checkpoint_state(epoch, loop, scheduler, result, written_by))
                distributed.barrier()  # no rank resumes from a checkpoint rank 0 is still writing
                for cb in callbacks:
                    cb.on_epoch_end(stats, model)
    finally:
        loop.forward = model
        if channels_last:  # saved weights keep the usual layout, whatever trained them
            model.to(memory_format=torch.contiguous_format)
    if ckpt is not None and distributed.is_main():
        ckpt.unlink(missing_ok=True)  # finished: nothing is left to resume
    distributed.barrier()
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # Write then rename, so a crash during the save keeps the previous checkpoint intact.
    tmp = path.with_suffix(".tmp")
    with guard_disk_full(tmp, state):
        torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state(loop: _Loop) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "shuffle": loop.shuffle.get_state()}
    if loop.augment is not loop.shuffle:
        state["augment"] = loop.augment.get_state()
    if loop.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(loop.device)
    return state


def _restore_rng(state: dict[str, Any], loop: _Loop) -> None:
    torch.set_rng_state(state["torch"])
    loop.shuffle.set_state(state["shuffle"])
    # A checkpoint from another device kind lacks (or has extra) device RNG state: the run
    # goes on with the freshly seeded device generators.
    if "augment" in state and loop.augment is not loop.shuffle:
        loop.augment.set_state(state["augment"])
    if "cuda" in state and loop.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], loop.device)


def _checkpoint_origin(cfg: OptimParams, seed: int, objective: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the code, the optimisation params, the seed
    (and the objective's settings, when it has any)."""
    optim = {name: getattr(cfg, name) for name in OptimParams.model_fields}  # what fit reads, no more
    origin = {"code_fingerprint": fingerprint.code_fingerprint(), "cfg": optim, "seed": seed}
    return {**origin, "objective": objective} if objective else origin


def _checkpoint_state(
    epoch: int, loop: _Loop, scheduler: Any, result: FitResult, origin: dict[str, Any]
) -> dict[str, Any]:
    state = {
        "origin": origin,
        "epoch": epoch,
        "model": {k: v.contiguous() for k, v in loop.model.state_dict().items()},
        "trainable": list(_trainable(loop.model)),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(loop),
        "history": [s.as_dict() for s in result.history],
        "objective": loop.objective.state_dict(),
    }
    if loop.scaler is not None:
        state["scaler"] = loop.scaler.state_dict()
    return state


def _stale_reason(saved: dict[str, Any] | None, wanted: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot be resumed by this run (None: it can)."""
    if saved is None:
        return "it records no code fingerprint (written by an older version)"
    if saved.get("code_fingerprint") != wanted["code_fingerprint"]:
        return f"it was written by other code ({saved.get('code_fingerprint')}, now {wanted['code_fingerprint']})"
    changed = sorted(k for k in wanted["cfg"] if saved.get("cfg", {}).get(k) != wanted["cfg"][k])
    if changed:
        return f"it was written for other params ({', '.join(changed)})"
    if saved.get("seed") != wanted["seed"]:
        return f"it was written for seed {saved.get('seed')}, not {wanted['seed']}"
    if saved.get("objective") != wanted.get("objective"):
        return f"it was written for another objective ({saved.get('objective')}, now {wanted.get('objective')})"
    return None


def _resume(
    ckpt: Path, loop: _Loop, scheduler: Any, result: FitResult, callbacks: Sequence[Callback],
    origin: dict[str, Any],
) -> int:
    """Load ``ckpt`` into the loop; the epoch to go on from (1: the checkpoint was stale)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn file from a crash mid-save: start over, say so
        raise TransferError(f"checkpoint {ckpt} is unreadable ({error}); delete it to restart") from None
    reason = _stale_reason(state.get("origin"), origin)
    if reason is not None:
        log.warning("not resuming from %s: %s; training from the start", ckpt, reason)
        return 1
    model, optimizer = loop.model, loop.optimizer
    model.load_state_dict(state["model"])
    # Gradual unfreezing grows the optimizer: replay the epoch-start hooks up to the
    # checkpoint so the param groups match before loading the optimizer state.
    for epoch in range(1, state["epoch"] + 1):
        for cb in callbacks:
            cb.on_epoch_start(epoch, model, optimizer)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if loop.scaler is not None and "scaler" in state:
        loop.scaler.load_state_dict(state["scaler"])
    _restore_rng(state["rng"], loop)
    loop.objective.load_state_dict(state.get("objective", {}))
    result.history = [EpochStats.from_dict(s) for s in state["history"]]
    vals = [s.val_acc for s in result.history if s.val_acc is not None]
    result.best_val_acc = max(vals) if vals else None
    result.resumed_from_epoch = state["epoch"]
    return state["epoch"] + 1


# --------------------------------------------------------------------------- progress


def epoch_line(desc: str, stats: EpochStats, epochs: int) -> str:
    text = f"{desc}: epoch {stats.epoch}/{epochs} loss {stats.train_loss:.3f} acc {stats.train_acc:.3f}"
    if stats.val_acc is not None:
        text += f" val_acc {stats.val_acc:.3f}"
    return f"{text} ({stats.seconds:.1f} s)"


class _LogLines:
    """Without a bar (the flow, a log file): one INFO line per epoch on ``transfer.train``."""

    def __init__(self, desc: str, last_epoch: int) -> None:
        self.desc, self.last_epoch = desc, last_epoch

    def advance_batch(self) -> None:
        pass

    def end_epoch(self, stats: EpochStats) -> None:
        log.info("%s", epoch_line(self.desc, stats, self.last_epoch))


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
def _progress(enabled: bool, desc: str, epochs: int, n: int, batch_size: int,
              last_epoch: int | None = None) -> Iterator[Any]:
    if not enabled or epochs <= 0:
        yield _LogLines(desc, last_epoch or epochs)
        return
    bar = _RichBar(desc, epochs, n, batch_size)
    with bar.progress:
        yield bar
