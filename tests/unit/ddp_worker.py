"""Run by tests/unit/test_distributed.py under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import sys

import torch

from transfer import distributed
from transfer.config import OptimParams
from transfer.data import ImageTensors
from transfer.models import create_model
from transfer.train import fit, predict_proba


def toy(n: int = 96, size: int = 8, seed: int = 0) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 1, size, size), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, :, y * 3 : y * 3 + 2] = 200
    return ImageTensors(images, labels, ["a", "b", "c"])


def train(ddp: bool) -> tuple[float, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, 1)
    cfg = OptimParams(epochs=6, batch_size=16, lr=0.01)
    fit(model, toy(), None, cfg, device=torch.device("cpu"), seed=1, progress=False,
        distributed_data_parallel=ddp)
    test = toy(seed=2)
    acc = (predict_proba(model, test, torch.device("cpu")).argmax(1) == test.labels).float().mean().item()
    return acc, model


if __name__ == "__main__":
    acc, model = train(ddp=True)
    if distributed.is_main():
        torch.save({"accuracy": acc, "world": distributed.world_size(), "state": model.state_dict()}, sys.argv[1])
