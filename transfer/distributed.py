"""Data-parallel training with ``torch.distributed`` (DDP), launched by ``torchrun``.

Every rank draws the same global batch (same seed, same generator), augments it the same
way, and trains on its slice ``batch[rank::world]``; DDP averages the gradients. So the
optimiser sees the global batch's gradient, the number of steps matches a single process,
and results agree with single-process training up to BatchNorm statistics (computed per
rank) and float summation order. gloo on CPU, nccl on CUDA. Only rank 0 writes
checkpoints, model directories and progress bars.

    torchrun --nproc-per-node 2 -m transfer.cli pretrain --set runtime.distributed=true
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from transfer.errors import TransferError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group torchrun set up (env:// rendezvous); idempotent."""
    if not launched_by_torchrun():
        raise TransferError(
            "runtime.distributed=true needs several processes: launch with "
            "`torchrun --nproc-per-node N -m transfer.cli <stage> --set runtime.distributed=true`"
        )
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(batch: Tensor) -> Tensor:
    """This rank's slice of a global batch."""
    return batch[rank() :: world_size()]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
