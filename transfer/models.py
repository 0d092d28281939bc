"""Backbone zoo, head surgery and weight loading (timm-like factory).

Every architecture is a :class:`TransferNet`: a ``body`` that maps images to a feature
vector and a linear ``head``. The body is cut into ``blocks`` (stages, input -> output)
so that freezing strategies can freeze or unfreeze whole stages. Weights are only ever
read from local files: a torchvision/TransferNet state_dict, or ``"hub"`` for the
standard file in the torch hub cache. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from transfer.disk import guard_disk_full
from transfer.errors import TransferError
from transfer.preprocessing import Preprocessing, from_torchvision, normaliser, torchvision_entry

StateDict = Mapping[str, Tensor]
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- the network


class Body(nn.Module):
    """Input normalisation -> conv stages -> global average pool -> optional neck:
    (B, C, H, W) -> (B, F). ``normalise`` is the identity for own models and the weights'
    mean/std for torchvision bodies (``transfer.preprocessing``; not in the state_dict)."""

    def __init__(self, stages: OrderedDict[str, nn.Module], neck: nn.Module | None = None) -> None:
        super().__init__()
        self.stages = nn.Sequential(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.neck = neck if neck is not None else nn.Identity()
        self.normalise: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.normalise(x))  # (B, F0, h, w)
        x = self.pool(x)  # (B, F0)
        return self.neck(x)  # (B, F)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def is_frozen(module: nn.Module) -> bool:
    """A module with parameters, none of which is trainable."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


class TransferNet(nn.Module):
    """``forward(x) = head(dropout(body(x)))``; ``blocks`` are the body stages used by freezing."""

    def __init__(
        self,
        arch: str,
        body: Body,
        feature_dim: int,
        num_classes: int,
        in_channels: int,
        dropout: float = 0.0,
        head: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.body = body
        self.drop = nn.Dropout(dropout)
        self.head = head if head is not None else nn.Linear(feature_dim, num_classes)
        self.preprocessing = Preprocessing(0, in_channels)  # own; create_model sets the real one

    @property
    def block_names(self) -> list[str]:
        names = [name for name, _ in self.body.stages.named_children()]
        return names + (["neck"] if _has_params(self.body.neck) else [])

    @property
    def blocks(self) -> list[nn.Module]:
        """Body stages, input -> output (the neck, when it has weights, is the last one)."""
        blocks = list(self.body.stages.children())
        return blocks + ([self.body.neck] if _has_params(self.body.neck) else [])

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, C, H, W) -> (B, F)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.body(x)))  # (B, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Head surgery: a fresh, randomly initialised head with ``num_classes`` outputs."""
        old = self.head.weight
        self.head = nn.Linear(self.feature_dim, num_classes).to(device=old.device, dtype=old.dtype)
        self.num_classes = num_classes

    def train(self, mode: bool = True) -> TransferNet:
        """Like ``nn.Module.train`` but frozen blocks stay in eval mode (BatchNorm stats fixed)."""
        super().train(mode)
        if mode:
            for block in self.blocks:
                if is_frozen(block):
                    block.eval()
        return self


# --------------------------------------------------------------------------- architectures


def _conv_bn_relu(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))  # (B, c_out, H/2, W/2)
    return nn.Sequential(*layers)


def _plain_cnn(
    arch: str, widths: tuple[int, ...], num_classes: int, in_channels: int, dropout: float
) -> TransferNet:
    """conv-BN-ReLU(-maxpool) stages, pooling after every stage but the last."""
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = in_channels
    for i, width in enumerate(widths):
        stages[f"block{i + 1}"] = _conv_bn_relu(c_in, width, pool=i < len(widths) - 1)
        c_in = width
    return TransferNet(arch, Body(stages), c_in, num_classes, in_channels, dropout)


def _small_cnn(num_classes: int, in_channels: int) -> TransferNet:
    """Measured on 2 CPU threads (32x32, batch 128, fwd+bwd+AdamW): ~1,800 images/s, and
    it transfers from font digits to handwritten ones as well as 32-64-128-128 (2.5x slower)."""
    # (B, C, 32, 32) -> 16 -> 8 -> (B, 128, 4, 4) -> pool (B, 128)
    return _plain_cnn("small_cnn", (16, 32, 64, 128), num_classes, in_channels, dropout=0.2)


def _tiny_cnn(num_classes: int, in_channels: int) -> TransferNet:
    return _plain_cnn("tiny_cnn", (8, 16), num_classes, in_channels, dropout=0.0)


def _first_conv_for(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        bias=conv.bias is not None,
    )


def _torchvision(arch: str, num_classes: int) -> nn.Module:
    from torchvision import models

    return models.get_model(arch, weights=None, num_classes=num_classes)


def _resnet18(num_classes: int, in_channels: int) -> TransferNet:
    tv = _torchvision("resnet18", num_classes)
    tv.conv1 = _first_conv_for(tv.conv1, in_channels)
    stem = nn.Sequential(OrderedDict(conv1=tv.conv1, bn1=tv.bn1, relu=tv.relu, maxpool=tv.maxpool))
    layers = {name: getattr(tv, name) for name in ("layer1", "layer2", "layer3", "layer4")}
    body = Body(OrderedDict(stem=stem, **layers))  # 32x32 -> (B, 512, 1, 1) -> (B, 512)
    net = TransferNet("resnet18", body, tv.fc.in_features, num_classes, in_channels, head=tv.fc)
    return _remember_keys(net, tv)


def _group_features(
    features: nn.Sequential, groups: dict[str, range]
) -> OrderedDict[str, nn.Module]:
    return OrderedDict(
        (name, nn.Sequential(*(features[i] for i in idx))) for name, idx in groups.items()
    )


def _adapt_features_stem(features: nn.Sequential, in_channels: int) -> None:
    stem = features[0]  # Conv2dNormActivation: [conv, bn, act]
    stem[0] = _first_conv_for(stem[0], in_channels)


def _mobilenet_v3_small(num_classes: int, in_channels: int) -> TransferNet:
    tv = _torchvision("mobilenet_v3_small", num_classes)
    _adapt_features_stem(tv.features, in_channels)
    # strides: 0 -> /2, 1 -> /4, 2-3 -> /8, 4-8 -> /16, 9-12 -> /32 (1x1 at 32x32 input)
    groups = {"stem": range(0, 1), "stage1": range(1, 2), "stage2": range(2, 4),
              "stage3": range(4, 9), "stage4": range(9, 13)}
    pre_logits, dropout, head = tv.classifier[0], tv.classifier[2].p, tv.classifier[3]
    neck = nn.Sequential(pre_logits, tv.classifier[1])  # (B, 576) -> (B, 1024)
    body = Body(_group_features(tv.features, groups), neck)
    net = TransferNet("mobilenet_v3_small", body, pre_logits.out_features, num_classes, in_channels,
                      dropout=dropout, head=head)
    return _remember_keys(net, tv)


def _efficientnet_b0(num_classes: int, in_channels: int) -> TransferNet:
    tv = _torchvision("efficientnet_b0", num_classes)
    _adapt_features_stem(tv.features, in_channels)
    # strides: 0 -> /2, 2 -> /4, 3 -> /8, 4 -> /16, 6 -> /32
    groups = {"stem": range(0, 2), "stage1": range(2, 3), "stage2": range(3, 4),
              "stage3": range(4, 6), "stage4": range(6, 9)}
    dropout, head = tv.classifier[0].p, tv.classifier[1]
    body = Body(_group_features(tv.features, groups))
    net = TransferNet("efficientnet_b0", body, head.in_features, num_classes, in_channels,
                      dropout=dropout, head=head)
    return _remember_keys(net, tv)


def _remember_keys(net: TransferNet, tv: nn.Module) -> TransferNet:
    """Map raw torchvision state_dict keys to ours, by tensor identity (the modules are shared)."""
    ours = {id(t): name for name, t in net.state_dict(keep_vars=True).items()}
    net._torchvision_keys = {
        name: ours[id(t)] for name, t in tv.state_dict(keep_vars=True).items() if id(t) in ours
    }
    return net


Builder = Callable[[int, int], TransferNet]
_ARCHS: dict[str, Builder] = {
    "small_cnn": _small_cnn,
    "tiny_cnn": _tiny_cnn,
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
    "efficientnet_b0": _efficientnet_b0,
}
_TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


def list_archs() -> list[str]:
    return sorted(_ARCHS)


# --------------------------------------------------------------------------- weights


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """Accept a bare state_dict or a checkpoint holding one under ``state_dict``/``model``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TransferError(f"weights file {source} does not hold a state_dict of tensors")
    prefixes = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers
    out = {}
    for key, value in obj.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise TransferError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickle of code objects, ...
        raise TransferError(f"cannot read weights file {path}: {error}") from None
    return _unwrap(obj, str(path))


def hub_weights_path(arch: str) -> Path:
    """Where torchvision would cache the default ImageNet weights of ``arch``."""
    if arch not in _TORCHVISION:
        known = ", ".join(_TORCHVISION)
        raise TransferError(f"weights='hub' needs a torchvision arch ({known}), got {arch}")
    from torchvision import models

    url = models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _resolve_weights(arch: str, weights: str | Path) -> Path:
    if str(weights) != "hub":
        return Path(weights).expanduser()
    path = hub_weights_path(arch)
    if not path.is_file():
        raise TransferError(
            f"weights='hub': {path} is missing; nothing is downloaded. Copy the torchvision file "
            f"there (or set TORCH_HOME), or pass a local weights file path instead"
        )
    return path


def _to_our_keys(model: TransferNet, state: dict[str, Tensor]) -> dict[str, Tensor]:
    if any(k.startswith(("body.", "head.")) for k in state):
        return state
    mapping: dict[str, str] = getattr(model, "_torchvision_keys", {})
    return {mapping.get(k, k): v for k, v in state.items()}


def _first_conv_key(model: TransferNet) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    raise TransferError(f"{model.arch} has no convolution")


def adapt_conv_weight(weight: Tensor, in_channels: int) -> Tensor:
    """(O, I, k, k) -> (O, in_channels, k, k): sum over RGB for grey; spread grey over RGB."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)  # (O, 1, k, k)
    return weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)  # (O, in_channels, k, k)


def _compatible(model: TransferNet, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Adapt the first conv, drop a source head of another shape, reject anything else."""
    own = model.state_dict()
    conv_key = _first_conv_key(model)
    if conv_key in state:  # the conv's own input channels: 3 when grey is replicated to RGB
        state[conv_key] = adapt_conv_weight(state[conv_key], own[conv_key].shape[1])
    kept, mismatched = {}, []
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if key.startswith("head."):
                continue  # source classifier for another label set: keep the fresh head
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        kept[key] = value
    unexpected = sorted(set(kept) - set(own))
    missing = sorted(k for k in set(own) - set(kept)
                     if not k.startswith("head.") and not k.endswith("num_batches_tracked"))
    if mismatched or unexpected or missing:
        details = "; ".join(
            f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (("shape mismatch", mismatched), ("unexpected", unexpected),
                                 ("missing", missing)) if items
        )
        raise TransferError(f"weights {source} do not fit arch {model.arch} ({details})")
    return kept


def load_weights(model: TransferNet, weights: str | Path) -> TransferNet:
    """Load a local torchvision or TransferNet state_dict (or ``"hub"``) into ``model``."""
    path = _resolve_weights(model.arch, weights)
    state = _to_our_keys(model, _read_state_dict(path))
    model.load_state_dict(_compatible(model, state, str(path)), strict=False)
    return model


def is_torchvision_layout(state: StateDict) -> bool:
    return not any(k.startswith(("body.", "head.")) for k in state)


def weights_preprocessing(
    arch: str, weights: str | Path | None, channels: int, image_size: int | None,
    grey_to_rgb: str = "auto",
) -> Preprocessing | None:
    """The torchvision weights entry's preprocessing when ``weights`` is a torchvision-layout
    file (or ``hub``) for a torchvision arch; None for no weights or a TransferNet file."""
    if weights is None or arch not in _TORCHVISION:
        return None
    path = _resolve_weights(arch, weights)
    if not is_torchvision_layout(_read_state_dict(path)):
        return None
    return from_torchvision(torchvision_entry(arch, path), channels, image_size, grey_to_rgb)


def set_preprocessing(model: nn.Module, prep: Preprocessing) -> nn.Module:
    """Give every body in ``model`` the normalisation of ``prep`` (on the model's device)."""
    device = next(model.parameters()).device
    for module in model.modules():
        if isinstance(module, Body):
            module.normalise = normaliser(prep).to(device)
        if isinstance(module, TransferNet):
            module.preprocessing = prep
    return model


def create_model(
    arch: str, num_classes: int, in_channels: int = 1, weights: str | Path | None = None,
    preprocessing: Preprocessing | None = None,
) -> TransferNet:
    """Build ``arch`` with a fresh head of ``num_classes``; optionally load local weights.

    ``preprocessing`` (default: own, at no fixed size) sets the body's input normalisation;
    with ``replicate_grey`` a grey input feeds an RGB first conv (torchvision weights).
    """
    if arch not in _ARCHS:
        raise TransferError(f"unknown arch {arch!r}; known archs: {', '.join(list_archs())}")
    if num_classes < 1 or in_channels < 1:
        raise TransferError(
            f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}"
        )
    prep = preprocessing or Preprocessing(0, in_channels)
    conv_channels = 3 if prep.replicate_grey and in_channels == 1 else in_channels
    model = _ARCHS[arch](num_classes, conv_channels)
    model.in_channels = in_channels
    set_preprocessing(model, prep)
    if weights is not None:
        load_weights(model, weights)
    return model


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_sha256(weights: StateDict | str | Path) -> str:
    """SHA-256 of a state_dict (keys in sorted order, so dict order does not matter) or a file."""
    digest = hashlib.sha256()
    if isinstance(weights, (str, Path)):
        with open(weights, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    for key in sorted(weights):
        tensor = weights[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


# --------------------------------------------------------------------------- model dirs

MODEL_FILE, META_FILE = "model.pt", "model.json"


def _write_model_files(model: TransferNet, directory: Path, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / MODEL_FILE)
    full = {
        **meta,
        "arch": model.arch,
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "weights_sha256": weights_sha256(state),
        "file_sha256": weights_sha256(directory / MODEL_FILE),
    }
    (directory / META_FILE).write_text(json.dumps(full, indent=2, default=str))


def save_model_dir(model: TransferNet, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``model.pt`` + ``model.json`` atomically: a crash never leaves a half-written dir."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with guard_disk_full(tmp, model.state_dict()):
            _write_model_files(model, tmp, meta)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_meta(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise TransferError(f"model dir {directory} does not exist")
    meta_path, model_path = directory / META_FILE, directory / MODEL_FILE
    for path in (meta_path, model_path):
        if not path.is_file():
            raise TransferError(f"model dir {directory} is incomplete: {path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TransferError(f"{meta_path} is corrupt: {error}") from None
    missing = [k for k in ("arch", "num_classes", "in_channels") if k not in meta]
    if missing:
        raise TransferError(f"{meta_path} lacks {', '.join(missing)}")
    return meta


def _empty_model(meta: dict[str, Any]) -> nn.Module:
    """The untrained architecture a saved state dict loads into."""
    num_classes, in_channels = int(meta["num_classes"]), int(meta["in_channels"])
    if meta.get("technique") == "progressive":
        from transfer.techniques.progressive import ProgressiveNet  # techniques build on models

        size = int(meta["image_size"])
        net = ProgressiveNet.empty(meta["arch"], int(meta["num_source_classes"]), num_classes, (in_channels, size, size))
        return set_preprocessing(net, Preprocessing.from_meta(meta))
    return create_model(meta["arch"], num_classes, in_channels, preprocessing=Preprocessing.from_meta(meta))


def load_model_dir(directory: str | Path) -> tuple[TransferNet, dict[str, Any]]:
    """Rebuild the model from ``model.json`` and load ``model.pt`` (weights_only); eval mode."""
    directory = Path(directory)
    meta = _read_meta(directory)
    model = _empty_model(meta)
    state = _read_state_dict(directory / MODEL_FILE)
    expected = meta.get("weights_sha256")
    if expected and weights_sha256(state) != expected:
        raise TransferError(
            f"{directory / MODEL_FILE} does not match the weights_sha256 in {META_FILE}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise TransferError(
            f"{directory / MODEL_FILE} does not fit {meta['arch']}: {error}"
        ) from None
    return model.eval(), meta
