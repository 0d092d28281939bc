"""Data-parallel training with ``torch.distributed`` (DDP), launched by ``torchrun``.

Every rank draws the same global batch (same seed, same generators), augments it the same
way, and trains on its slice ``batch[rank::world]``; the loss is scaled so that DDP's
gradient average equals the gradient of the global batch's mean loss. So the optimiser
sees the same gradient, the number of steps matches a single process, and results agree
with single-process training up to BatchNorm statistics (computed per rank) and float
summation order. gloo on CPU, nccl on CUDA. Only rank 0 writes checkpoints, model
directories and progress bars; every rank resumes from the same checkpoint.

    torchrun --nproc-per-node 2 -m transfer.cli pretrain --set runtime.distributed=true

This module holds no state of its own: the process group is torch's, set up from the
environment torchrun exports (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``).
"""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from transfer.errors import TransferError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_cleanup_registered = False


def launched_by_torchrun() -> bool:
    """The torchrun (``torch.distributed.run``) environment is present."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def is_distributed() -> bool:
    """A process group is up (this process is one rank of a DDP job)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and prints."""
    return rank() == 0


def default_backend(device: torch.device | None = None) -> str:
    """nccl for CUDA training, gloo otherwise (CPU)."""
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "nccl" if on_cuda else "gloo"


def init_from_env(backend: str | None = None, device: torch.device | None = None) -> None:
    """Join the process group that torchrun describes (env:// rendezvous); idempotent.

    ``backend`` defaults to nccl when training on CUDA, else gloo. On CUDA each process
    takes the GPU of its ``LOCAL_RANK``. The group is destroyed at interpreter exit.
    """
    global _cleanup_registered
    if is_distributed():
        return
    if not launched_by_torchrun():
        raise TransferError(
            "runtime.distributed=true needs the torchrun launcher: run "
            "`torchrun --nproc-per-node N -m transfer.cli <stage> --set runtime.distributed=true`"
        )
    if not dist.is_available():
        raise TransferError("this torch build has no torch.distributed support")
    backend = backend or default_backend(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise TransferError("the nccl backend needs CUDA; use runtime.device=cpu (gloo) on this machine")
        if local_rank() >= torch.cuda.device_count():
            raise TransferError(
                f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPU(s) visible: "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    if not _cleanup_registered:
        atexit.register(cleanup)
        _cleanup_registered = True


def init(device: torch.device) -> None:
    """:func:`init_from_env` with the backend that suits ``device``."""
    init_from_env(device=device)


def cleanup() -> None:
    """Leave the process group (safe to call twice, or without one)."""
    if is_distributed():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``device``).

    Frozen parameters (``requires_grad=False``) are left out of gradient synchronisation by
    DDP itself; when the trainable set changes (gradual unfreezing), wrap again.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    # A conv with one input channel gets gradients whose strides differ from its weight's
    # only along that size-1 dimension: the same memory, a harmless warning per step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def shard_indices(batch_idx: Tensor | Sequence[int], rank: int, world: int) -> Tensor | Sequence[int]:
    """Rank ``rank``'s share of a global batch: every ``world``-th item from ``rank``.

    Shares differ in size by at most one and together hold the batch exactly once.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return batch_idx[rank::world]


def shard(batch: Tensor) -> Tensor:
    """This process's slice of a global batch (the whole batch without a process group)."""
    return shard_indices(batch, rank(), world_size())


def all_reduce_sum(values: list[float] | Tensor, device: torch.device) -> list[float]:
    """Sum numbers over ranks (one collective); identity without a process group."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if is_distributed():
        # nccl reduces CUDA tensors only; gloo takes CPU ones
        tensor = tensor.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Make every rank's buffers equal: float ones (BatchNorm running statistics, which each
    rank updated on its own shard in the last step) averaged over ranks, the rest rank 0's."""
    if not is_distributed():
        return
    world = world_size()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)
        else:
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` from rank ``src`` on every rank (identity without a process group)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
