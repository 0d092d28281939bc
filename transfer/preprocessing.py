"""How uint8 pixels become a model's input: one record for training, evaluation and serving.

Own source models keep the pipeline's normalisation, ``(x / 255 - 0.5) / 0.5`` (a square
resize, no crop). A body loaded from torchvision weights (a local file in torchvision's
layout, or ``hub``) takes that weights entry's own preprocessing, read offline from
torchvision's weights enums (``ResNet18_Weights.IMAGENET1K_V1.transforms()``): its mean/std,
its crop size as the default input resolution, and its resize/crop ratio (256 -> 224: the
shorter side is resized to 256/224 of the input size, then the centre is cropped).

The mean/std is applied inside the model (``Body.normalise``), after the shared
``to_float`` ([-1, 1]), so every path that feeds the model (the training loop, the
frozen-feature cache, the techniques, evaluation and the pyfunc) applies the same one and
a client's float tensor stays in the documented [-1, 1] input space. The record is saved
in ``model.json`` under ``preprocessing`` and rebuilds the model's normalisation on load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

OWN_MEAN, OWN_STD = (0.5,), (0.5,)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int  # decoded square side (the model's input resolution)
    channels: int  # decoded channels: 1 grey, 3 RGB
    mean: tuple[float, ...] = OWN_MEAN  # per channel, on x / 255
    std: tuple[float, ...] = OWN_STD
    resize_ratio: float = 1.0  # > 1: shorter side to image_size * ratio, centre crop
    replicate_grey: bool = False  # grey input copied to RGB for an RGB first conv
    source: str = "own"  # "own" or "torchvision:<Weights enum entry>"

    @property
    def is_own(self) -> bool:
        return self.source == "own"

    def to_meta(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocessing:
        """From ``model.json``; a model saved before this record existed is an own one."""
        saved = meta.get("preprocessing")
        if not saved:
            return cls(int(meta.get("image_size", 32)), int(meta.get("in_channels", 1)))
        return cls(**{**saved, "mean": tuple(saved["mean"]), "std": tuple(saved["std"])})

    def own(self) -> Preprocessing:
        """The same input resolution with the pipeline's own normalisation (scratch models)."""
        return replace(self, mean=OWN_MEAN, std=OWN_STD, replicate_grey=False, source="own")


def torchvision_entry(arch: str, weights_file: Path | None = None) -> Any:
    """The torchvision weights enum entry a file holds: matched by torchvision's file name
    (``resnet18-f37072fd.pth``), else the arch's DEFAULT entry."""
    from torchvision import models

    enum = models.get_model_weights(arch)
    if weights_file is not None:
        for entry in enum:
            if entry.url.rsplit("/", 1)[-1] == Path(weights_file).name:
                return entry
    return enum.DEFAULT


def from_torchvision(entry: Any, channels: int, image_size: int | None, grey_to_rgb: str) -> Preprocessing:
    """The weights entry's preprocessing (offline: the enum's transforms preset)."""
    preset = entry.transforms()
    crop, resize = int(preset.crop_size[0]), int(preset.resize_size[0])
    mean, std = tuple(float(m) for m in preset.mean), tuple(float(s) for s in preset.std)
    replicate = channels == 1 and grey_to_rgb != "conv"
    if channels == 1 and not replicate:  # a summed first conv sees one grey channel
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return Preprocessing(image_size or crop, channels, mean, std, resize / crop, replicate,
                         f"torchvision:{type(entry).__name__}.{entry.name}")


class InputNorm(nn.Module):
    """[-1, 1] (``to_float``) -> (x / 255 - mean) / std per channel; grey -> RGB if asked.

    Constants are non-persistent buffers: they move with the model but stay out of the
    state_dict (``model.json`` holds them), so weights files keep torchvision's layout.
    """

    def __init__(self, prep: Preprocessing) -> None:
        super().__init__()
        mean, std = torch.tensor(prep.mean), torch.tensor(prep.std)
        self.register_buffer("scale", (0.5 / std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((0.5 - mean) / std).view(1, -1, 1, 1), persistent=False)
        self.replicate = prep.replicate_grey

    def forward(self, x: Tensor) -> Tensor:
        if self.replicate and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 1, H, W) -> (B, 3, H, W)
        return x * self.scale + self.shift  # x01 = x * 0.5 + 0.5; (x01 - mean) / std


def normaliser(prep: Preprocessing) -> nn.Module:
    """Identity for own models (today's path, unchanged), else the weights' normalisation."""
    return nn.Identity() if prep.is_own else InputNorm(prep)
