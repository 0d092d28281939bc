"""Decoded datasets: uint8 images + labels, and the ops training needs on them.

The images are a tensor in memory, or (a split larger than ``data.in_memory_max_mb``) a
``MappedImages`` view of a memory-mapped file that reads rows on demand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from transfer.data.mapped import MappedImages
from transfer.errors import DataError

UNLABELLED_INDEX = -1


@dataclass
class ImageTensors:
    """A decoded split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), -1 = unlabelled.

    Tensors may be shared with the load cache: treat them as read-only.
    """

    images: Tensor | MappedImages
    labels: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels {tuple(self.labels.shape)} do not match "
                             f"{self.images.shape[0]} images")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mapped(self) -> bool:
        return isinstance(self.images, MappedImages)

    def subset(self, indices: Sequence[int] | np.ndarray | Tensor) -> ImageTensors:
        index = np.asarray(indices, dtype=np.int64)
        images = self.images.take(index) if self.mapped else self.images[torch.as_tensor(index)]
        return ImageTensors(images, self.labels[torch.as_tensor(index)], list(self.classes))

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts.tolist(), strict=True)}


def to_float(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5 (training, eval, serving)."""
    return (images.to(torch.float32) / 255.0 - 0.5) / 0.5


def subsample_per_class(data: ImageTensors, k: int, seed: int) -> ImageTensors:
    """Exactly ``k`` images of every class, chosen deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    chosen: list[np.ndarray] = []
    for index, name in enumerate(data.classes):
        members = np.flatnonzero(labels == index)
        if len(members) < k:
            raise DataError(
                f"class '{name}' holds {len(members)} image(s) in this split but "
                f"{k} per class were requested: lower finetune.labels_per_class"
            )
        chosen.append(rng.choice(members, size=k, replace=False))
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return data.subset(indices)


def random_shift(
    batch: Tensor, max_shift: int = 2, generator: torch.Generator | None = None,
    shard: tuple[int, int, int] | None = None,
) -> Tensor:
    """Translate each image by up to ``max_shift`` px (edge-replicate pad + random crop).

    ``batch``: float (B, C, H, W) on any device; offsets are drawn on the generator's device.
    ``shard=(global_b, rank, world)``: ``batch`` is rank's share ``[rank::world]`` of a
    global batch; offsets are drawn for the global batch (the same draws as one process).
    """
    if max_shift <= 0 or batch.shape[0] == 0:
        return batch
    b, _, h, w = batch.shape
    padded = F.pad(batch, (max_shift,) * 4, mode="replicate")  # (B, C, H+2m, W+2m)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    drawn = shard[0] if shard is not None else b
    offsets = torch.randint(0, 2 * max_shift + 1, (2, drawn), generator=generator, device=gen_device)
    if shard is not None:
        offsets = offsets[:, shard[1] :: shard[2]]  # (2, b)
    offsets = offsets.to(batch.device)
    rows = offsets[0][:, None] + torch.arange(h, device=batch.device)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=batch.device)  # (B, W)
    batch_index = torch.arange(b, device=batch.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
