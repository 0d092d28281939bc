"""Run by tests/unit/test_distributed.py under torchrun (2 CPU processes, gloo).

One launch, three checks (process start-up is most of the cost):
1. plain DDP training -> accuracy and weights, compared with one process by the test;
2. gradual unfreezing (the trainable set grows mid-run) -> every rank ends with the same
   weights (DDP must be rebuilt to sync the newly unfrozen blocks);
3. a crash after epoch 2, then a rerun on the same checkpoint dir -> the weights of the
   uninterrupted run of check 1;
4. the same data as a memory-mapped split (each rank reads only its share of every global
   batch from the file) -> exactly the weights of check 1.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import torch
import torch.distributed as dist

from transfer import distributed, freezing
from transfer.config import OptimParams
from transfer.data import ImageTensors, mapped
from transfer.models import create_model
from transfer.techniques.gradual import GradualUnfreezing
from transfer.train import CrashAfterEpoch, fit, predict_proba

CFG = OptimParams(epochs=6, batch_size=16, lr=0.01)


def toy(n: int = 96, size: int = 8, seed: int = 0) -> ImageTensors:
    """Three classes told apart by which third of the image is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 1, size, size), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, :, y * 3 : y * 3 + 2] = 200
    return ImageTensors(images, labels, ["a", "b", "c"])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_cnn", 3, 1)


def accuracy(model: torch.nn.Module) -> float:
    test = toy(seed=2)
    return (predict_proba(model, test, torch.device("cpu")).argmax(1) == test.labels).float().mean().item()


def train(ddp: bool, checkpoint_dir: Path | None = None, callbacks: tuple = (),
          data: ImageTensors | None = None) -> tuple[float, torch.nn.Module]:
    model = _model()
    fit(model, data if data is not None else toy(), None, CFG, device=torch.device("cpu"), seed=1, progress=False,
        distributed_data_parallel=ddp, checkpoint_dir=checkpoint_dir, callbacks=callbacks)
    return accuracy(model), model


def max_rank_difference(model: torch.nn.Module) -> float:
    """Largest |w_rank - w_rank0| over all weights and ranks."""
    flat = torch.cat([v.detach().float().flatten() for v in model.state_dict().values()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def gradual() -> float:
    model = _model()
    freezing.apply_freeze(model, "head")
    cfg = CFG.model_copy(update={"epochs": 4})
    fit(model, toy(), None, cfg, device=torch.device("cpu"), seed=1, progress=False,
        param_groups=freezing.param_groups(model, cfg.lr), callbacks=[GradualUnfreezing(1, cfg.lr)],
        distributed_data_parallel=True)
    return max_rank_difference(model)


def crash_and_resume(reference: torch.nn.Module) -> bool:
    # every rank must use the same directory: rank 0 picks it
    path = distributed.broadcast_object(tempfile.mkdtemp(prefix="ddp-ckpt-") if distributed.is_main() else None)
    try:
        train(ddp=True, checkpoint_dir=Path(path), callbacks=(CrashAfterEpoch(2),))
    except RuntimeError as error:
        assert "simulated crash" in str(error)
    else:
        raise AssertionError("the crash did not happen")
    _, resumed = train(ddp=True, checkpoint_dir=Path(path))
    ref, got = reference.state_dict(), resumed.state_dict()
    return all(torch.equal(ref[k], got[k]) for k in ref)


def mapped_equal(reference: torch.nn.Module) -> bool:
    """Check 4: rank 0 writes the toy split memory-mapped; every rank trains from the file."""
    folder = Path(distributed.broadcast_object(tempfile.mkdtemp(prefix="ddp-mmap-") if distributed.is_main() else None)) / "train.mmap"
    data = toy()
    if distributed.is_main():
        mapped.write_split(folder, tuple(data.images.shape), [data.images.numpy()], data.labels.numpy(), data.classes)
    distributed.barrier()
    images, labels, classes = mapped.read_split(folder, memory_bytes=0)
    on_disk = ImageTensors(images, labels, classes)
    assert on_disk.mapped
    _, model = train(ddp=True, data=on_disk)
    ref, got = reference.state_dict(), model.state_dict()
    return all(torch.equal(ref[k], got[k]) for k in ref)


if __name__ == "__main__":
    acc, model = train(ddp=True)
    result = {
        "accuracy": acc, "world": distributed.world_size(), "state": model.state_dict(),
        "gradual_max_rank_difference": gradual(),
        "resume_equal": crash_and_resume(model),
        "mapped_equal": mapped_equal(model),
    }
    if distributed.is_main():
        torch.save(result, sys.argv[1])
