"""Training throughput: the pipeline's ``fit()`` against a plain PyTorch loop, same run.

Same model (small_cnn, 10 classes, 1 channel), same data (random uint8 32x32 images),
batch 128, AdamW, same precision (float32 on CPU; bf16 autocast on CUDA where the GPU has
it). The plain loop is the textbook one: a ``TensorDataset`` of float images in a
``DataLoader`` (shuffle, ``pin_memory`` on CUDA), ``.to(device, non_blocking=True)`` per
batch and ``loss.item()`` per step. ``fit()`` keeps the uint8 split on the device, gathers
batches there, syncs once per epoch, and on CUDA uses channels_last. Both without
augmentation; ``fit()`` with its random-shift augmentation is an extra row.

Each repeat trains a fresh model for ``--epochs`` epochs after one untimed warm-up run;
images/s = images x epochs / seconds, median of ``--repeats``.

    python benchmarks/train_speed.py [--n 4096] [--epochs 2] [--repeats 3] [--device auto]

Writes benchmarks/results/train_speed.md (CPU) or train_speed_gpu.md (CUDA).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from transfer.config import OptimParams
from transfer.data import ImageTensors, to_float
from transfer.models import create_model
from transfer.train import amp_dtype, autocast_for, fit, resolve_device, set_num_threads

RESULTS = Path(__file__).parent / "results"
BATCH = 128


def synthetic(n: int, seed: int = 0) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageTensors(images, labels, [str(i) for i in range(10)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_fit(data: ImageTensors, epochs: int, device: torch.device, augment: bool) -> float:
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 1)
    cfg = OptimParams(epochs=epochs, batch_size=BATCH, lr=1e-3, augment=augment)
    _sync(device)
    t0 = time.perf_counter()
    fit(model, data, None, cfg, device=device, seed=0, progress=False)
    _sync(device)
    return time.perf_counter() - t0


def run_plain(data: ImageTensors, epochs: int, device: torch.device, augment: bool = False) -> float:
    """The textbook loop (no augmentation)."""
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    dataset = TensorDataset(to_float(data.images), data.labels)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, pin_memory=device.type == "cuda")
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        total = 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_for(device):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
    _sync(device)
    return time.perf_counter() - t0


def measure(fn: Callable[..., float], data: ImageTensors, epochs: int, repeats: int, device: torch.device,
            **kw: bool) -> tuple[float, list[float]]:
    fn(data.subset(range(min(len(data), 4 * BATCH))), 1, device, **kw)  # warm-up (kernels, allocator)
    rates = [len(data) * epochs / fn(data, epochs, device, **kw) for _ in range(repeats)]
    return statistics.median(rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="images (default 4096 on CPU, 50000 on CUDA)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per repeat (default 2 CPU, 5 CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    set_num_threads(args.threads)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    n = args.n or (50_000 if on_cuda else 4096)
    epochs = args.epochs or (5 if on_cuda else 2)
    data = synthetic(n)

    rows = [
        ("plain PyTorch loop (DataLoader)", *measure(run_plain, data, epochs, args.repeats, device)),
        ("fit()", *measure(run_fit, data, epochs, args.repeats, device, augment=False)),
        ("fit() + random-shift augmentation", *measure(run_fit, data, epochs, args.repeats, device, augment=True)),
    ]
    plain = rows[0][1]
    name = torch.cuda.get_device_name(device) if on_cuda else f"{platform.machine()} CPU"
    precision = str(amp_dtype(device)).replace("torch.", "") if on_cuda else "float32"
    lines = [
        f"Device: {name} ({device.type}, {precision}); torch {torch.__version__}, {torch.get_num_threads()} CPU "
        f"threads. small_cnn, {n} random 1x32x32 images, batch {BATCH}, {epochs} epochs per repeat, "
        f"median of {args.repeats} repeats after a warm-up.",
        "",
        "| training loop | images/s (median) | repeats | vs plain |",
        "|---|---|---|---|",
    ]
    for label, median, rates in rows:
        lines.append(f"| {label} | {median:,.0f} | {', '.join(f'{r:,.0f}' for r in rates)} | {median / plain:.2f}x |")
    text = "\n".join(lines)
    print(text)
    out = args.out or RESULTS / ("train_speed_gpu.md" if on_cuda else "train_speed.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
