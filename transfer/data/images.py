"""Image decoding shared by dataset loading and serving: one preprocessing path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking (PIL scales the filter)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit by min-max scaling (convert("L") clips)."""
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def to_array(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 array (C, S, S): resized to a square, 1 (L) or 3 (RGB) channels."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), RESAMPLE)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)  # (C, S, S)


def decode_image(source: bytes | str | Path, image_size: int, channels: int) -> np.ndarray:
    """Decode bytes or a file -> uint8 array (C, S, S); raises what PIL raises."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(handle) as image:
        image.load()
        return to_array(image, image_size, channels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
