"""Inference on a saved model dir: decode and check what a client sends, predict class names.

Pure core (torch, numpy, PIL; no MLflow): the MLflow pyfunc wrapper (``tasks/adapters/pyfunc_model.py``),
the offline ``transfer predict`` command and the benchmarks all go through ``Predictor``, so
serving preprocesses exactly like training: image -> ``to_array`` (mode, square resize, or
the torchvision weights' resize + centre crop recorded in ``model.json``) -> uint8
(C, S, S) -> ``to_float`` i.e. ``(x / 255 - 0.5) / 0.5``; a model whose body came from
torchvision weights maps that to the weights' ``(x / 255 - mean) / std`` itself (its first
module, rebuilt from ``model.json``: ``transfer.preprocessing``), as it did in training.

One batch item (a "row") is one of:
- an encoded image: ``bytes``, or a ``str`` holding base64 (a ``data:image/...;base64,`` prefix
  is accepted), PNG / JPEG / BMP / GIF / TIFF / WebP, any size and mode;
- a ``PIL.Image.Image``;
- a float tensor already in the model's input space: (C, S, S), or (S, S) for 1-channel
  models, as a ``torch.Tensor``, ``np.ndarray`` or nested lists.
A whole batch can also be one float tensor / array (N, C, S, S) or (N, S, S).

Every problem a client can fix raises ``InputError`` naming the row and what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from transfer.data import to_float
from transfer.data.images import to_array
from transfer.errors import TransferError

DEFAULT_MAX_BATCH = 256  # serve.max_batch
DEFAULT_MAX_IMAGE_BYTES = 2_000_000  # serve.max_image_bytes
MAX_PIXELS = 40_000_000  # serve.max_image_pixels: a 2 MB PNG can claim 100k x 100k pixels
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"})
INFERENCE_CHUNK = 256  # rows per forward pass, bounds activation memory

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


class InputError(TransferError):
    """A request the client can fix: undecodable image, wrong shape or dtype, too large."""


def _row(index: int | None) -> str:
    return "input" if index is None else f"row {index}"


def _preview(text: str, limit: int = 20) -> str:
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# --- encoded images -------------------------------------------------------------------------


def decode_base64(text: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, index: int | None = None) -> bytes:
    """base64 text (optionally a data URL) -> bytes; rejects bad base64 and oversize payloads."""
    body = _DATA_URL.sub("", text.strip(), count=1)
    body = "".join(body.split())  # tolerate line-wrapped base64 (MIME style)
    if not body:
        raise InputError(f"{_row(index)}: empty image string")
    if len(body) // 4 * 3 > max_bytes + 2:  # check before decoding: bounds memory
        raise InputError(
            f"{_row(index)}: image too large: about {len(body) // 4 * 3} bytes after base64 "
            f"decoding, the limit is {max_bytes} bytes (serve.max_image_bytes)"
        )
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{_row(index)}: not valid base64 (got {_preview(body)}); send the PNG/JPEG file "
            "bytes base64-encoded"
        ) from None
    return raw


def decode_image(
    data: bytes | str | Image.Image,
    image_size: int,
    channels: int,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    index: int | None = None,
    max_pixels: int = MAX_PIXELS,
    resize_ratio: float = 1.0,
) -> np.ndarray:
    """Encoded image -> uint8 array (C, S, S), preprocessed exactly like the training data."""
    if isinstance(data, Image.Image):
        return to_array(data, image_size, channels, resize_ratio)
    raw = decode_base64(data, max_bytes, index) if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise InputError(
            f"{_row(index)}: image too large: {len(raw)} bytes, the limit is {max_bytes} bytes "
            "(serve.max_image_bytes)"
        )
    if not raw:
        raise InputError(f"{_row(index)}: empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(io.BytesIO(raw)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise InputError(
                        f"{_row(index)}: unsupported image format {image.format}; "
                        f"use one of {', '.join(sorted(IMAGE_FORMATS))}"
                    )
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(
                        f"{_row(index)}: image too large: {width}x{height} pixels, the limit is "
                        f"{max_pixels} pixels (serve.max_image_pixels)"
                    )
                image.load()
                return to_array(image, image_size, channels, resize_ratio)
    except InputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InputError(f"{_row(index)}: image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise InputError(
            f"{_row(index)}: cannot decode image ({len(raw)} bytes): not an image file "
            f"({', '.join(sorted(IMAGE_FORMATS))})"
        ) from None
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
        detail = str(error).split("\n")[0][:200]
        raise InputError(
            f"{_row(index)}: cannot decode image ({len(raw)} bytes): {type(error).__name__}: {detail}"
        ) from None


# --- raw tensors ---------------------------------------------------------------------------


def _expected(image_size: int, channels: int) -> str:
    one = f" or ({image_size}, {image_size})" if channels == 1 else ""
    return f"({channels}, {image_size}, {image_size}){one}"


def _as_float_array(value: Any, index: int | None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise InputError(f"{_row(index)}: tensor has dtype {value.dtype}, expected float")
        if value.dtype == np.uint8:
            raise InputError(
                f"{_row(index)}: tensor has dtype uint8; tensors must already be in the model's "
                "input space ((x/255 - 0.5) / 0.5, float); send raw pixels as an encoded image"
            )
        return value.astype(np.float32, copy=False)
    try:  # nested lists from JSON: ints and floats are both numbers there
        return np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as error:
        detail = str(error).split("\n")[0][:160]
        raise InputError(
            f"{_row(index)}: tensor is not a rectangular array of numbers ({detail})"
        ) from None


def _check_finite(array: np.ndarray, first_row: int) -> None:
    bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
    if bad.any():
        row = first_row + int(np.argmax(bad))
        raise InputError(f"row {row}: tensor holds NaN or infinite values")


def tensor_rows(value: Any, image_size: int, channels: int, index: int | None = None) -> torch.Tensor:
    """One row (C, S, S) / (S, S), or a batch (N, C, S, S) / (N, S, S) -> float32 (N, C, S, S)."""
    array = _as_float_array(value, index)
    single = (channels, image_size, image_size)
    if array.shape == single or (channels == 1 and array.shape == single[1:]):
        array = array.reshape(1, *single)  # one row
    elif index is None and array.ndim == 4 and array.shape[1:] == single:
        pass  # (N, C, S, S)
    elif index is None and channels == 1 and array.ndim == 3 and array.shape[1:] == single[1:]:
        array = array[:, None]  # (N, S, S) -> (N, 1, S, S)
    else:
        what = _expected(image_size, channels)
        if index is None:
            what = f"(N, {channels}, {image_size}, {image_size})" + (
                f" or (N, {image_size}, {image_size})" if channels == 1 else ""
            )
        raise InputError(f"{_row(index)}: tensor has shape {tuple(array.shape)}, expected {what}")
    _check_finite(array, 0 if index is None else index)
    return torch.from_numpy(np.ascontiguousarray(array))


# --- batches -------------------------------------------------------------------------------


def _is_encoded(item: Any) -> bool:
    return isinstance(item, (str, bytes, bytearray, memoryview, Image.Image))


def prepare_batch(
    images: Any,
    image_size: int,
    channels: int,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = MAX_PIXELS,
    resize_ratio: float = 1.0,
) -> torch.Tensor:
    """Anything ``Predictor.predict`` accepts -> float32 (N, C, S, S) in the model input space."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        batch = tensor_rows(images, image_size, channels)
        if batch.shape[0] > max_batch:
            raise InputError(_too_many(batch.shape[0], max_batch))
        if batch.shape[0] == 0:
            raise InputError("empty batch: send at least one image")
        return batch
    if _is_encoded(images) or isinstance(images, (Mapping, Path)):
        raise InputError(
            f"expected a list of images or tensors, got a single {type(images).__name__}"
        )
    items = list(images)
    if not items:
        raise InputError("empty batch: send at least one image")
    if len(items) > max_batch:
        raise InputError(_too_many(len(items), max_batch))
    rows = []
    for index, item in enumerate(items):
        if _is_encoded(item):
            pixels = decode_image(item, image_size, channels, max_image_bytes, index, max_pixels,
                                  resize_ratio)
            rows.append(to_float(torch.tensor(pixels)[None]).to(torch.float32))  # copy: PIL arrays are read-only
        elif item is None or (isinstance(item, float) and np.isnan(item)):
            raise InputError(f"row {index}: missing image")
        else:
            rows.append(tensor_rows(item, image_size, channels, index))
    return torch.cat(rows)


def _too_many(n: int, max_batch: int) -> str:
    return f"batch too large: {n} rows, the limit is {max_batch} (serve.max_batch); split the request"


class Predictor:
    """A model plus its meta (classes, image_size, in_channels): inputs in, class names out."""

    def __init__(
        self,
        model: torch.nn.Module,
        meta: Mapping[str, Any],
        max_batch: int = DEFAULT_MAX_BATCH,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        device: str | torch.device = "cpu",
        max_pixels: int = MAX_PIXELS,
    ):
        self.classes = [str(name) for name in meta["classes"]]
        self.image_size = int(meta["image_size"])
        self.channels = int(meta.get("in_channels", 1))
        self.resize_ratio = float((meta.get("preprocessing") or {}).get("resize_ratio", 1.0))
        self.max_batch = int(max_batch)
        self.max_image_bytes = int(max_image_bytes)
        self.max_pixels = int(max_pixels)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = dict(meta)
        # fitted on the selection split at training time: served probabilities are calibrated
        self.temperature = float(meta.get("temperature", 1.0))

    @classmethod
    def from_dir(cls, model_dir: str | Path, **kwargs: Any) -> Predictor:
        """Load a saved model dir (``model.pt`` state_dict read with weights_only=True + ``model.json``)."""
        from transfer.models import load_model_dir

        model, meta = load_model_dir(model_dir)
        return cls(model, meta, **kwargs)

    def prepare(self, images: Any) -> torch.Tensor:
        return prepare_batch(
            images, self.image_size, self.channels, self.max_batch, self.max_image_bytes,
            self.max_pixels, self.resize_ratio,
        )

    @torch.inference_mode()
    def predict_proba(self, batch: torch.Tensor) -> torch.Tensor:
        """float (N, C, S, S) -> softmax(logits / temperature) (N, K) on the CPU."""
        out = [
            torch.softmax(self.model(chunk.to(self.device)).float() / self.temperature, dim=1).cpu()
            for chunk in batch.split(INFERENCE_CHUNK)
        ]
        probs = torch.cat(out)
        if probs.shape[1] != len(self.classes):
            raise TransferError(
                f"model has {probs.shape[1]} outputs but model.json lists {len(self.classes)} classes"
            )
        return probs

    def predict(self, images: Any) -> list[dict[str, Any]]:
        """-> ``[{label, probability, probabilities: {class: p}}]``, one dict per row."""
        probs = self.predict_proba(self.prepare(images)).tolist()
        results = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {
                    "label": self.classes[best],
                    "probability": row[best],
                    "probabilities": dict(zip(self.classes, row, strict=True)),
                }
            )
        return results
