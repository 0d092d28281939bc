"""Image decoding shared by dataset loading and serving: one preprocessing path."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking (PIL scales the filter)
# Untrusted files: a few-KB PNG can claim 100k x 100k pixels, a "JPEG" can be gigabytes.
DEFAULT_MAX_PIXELS = 40_000_000  # data.max_image_pixels, serve.max_image_pixels
DEFAULT_MAX_FILE_BYTES = 50_000_000  # data.max_image_bytes


class ImageTooLarge(ValueError):
    """An image over the pixel or byte limit: refused before it is decoded."""


def set_pixel_limit(max_pixels: int) -> None:
    """Set PIL's decompression-bomb limit explicitly (it warns above it, raises above twice
    it); ``open_bounded`` refuses anything above it."""
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


set_pixel_limit(DEFAULT_MAX_PIXELS)  # explicit, not PIL's default of ~89 M


@contextmanager
def open_bounded(
    source: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[Image.Image]:
    """``Image.open`` that refuses (ImageTooLarge) files over ``max_bytes`` and images over
    ``max_pixels`` from the header alone, before any pixel is decoded."""
    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ImageTooLarge(f"image file too large: {size} bytes, the limit is {max_bytes} bytes")
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            image = Image.open(handle)
    except Image.DecompressionBombError:  # over twice PIL's limit
        raise ImageTooLarge(
            f"image too large: more than {Image.MAX_IMAGE_PIXELS} pixels (decompression-bomb guard)"
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"image too large: {width}x{height} pixels, the limit is {max_pixels} pixels"
            )
        yield image


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit by min-max scaling (convert("L") clips)."""
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _resize_crop(image: Image.Image, image_size: int, resize_ratio: float) -> Image.Image:
    """torchvision's Resize(shorter side) + CenterCrop, with its rounding: the shorter side
    to image_size * ratio, the longer in proportion, then the centred square."""
    short = round(image_size * resize_ratio)
    width, height = image.size
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, RESAMPLE)
    left, top = int(round((size[0] - image_size) / 2.0)), int(round((size[1] - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size))


def to_array(image: Image.Image, image_size: int, channels: int, resize_ratio: float = 1.0) -> np.ndarray:
    """PIL image -> uint8 array (C, S, S), 1 (L) or 3 (RGB) channels: resized to a square
    (ratio 1, own models), or resized and centre-cropped (torchvision weights' ratio)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    image = image.convert("L" if channels == 1 else "RGB")
    if resize_ratio != 1.0:
        image = _resize_crop(image, image_size, resize_ratio)
    elif image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), RESAMPLE)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)  # (C, S, S)


def decode_image(
    source: bytes | str | Path,
    image_size: int,
    channels: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    resize_ratio: float = 1.0,
) -> np.ndarray:
    """Decode bytes or a file -> uint8 array (C, S, S); raises ImageTooLarge or what PIL raises."""
    with open_bounded(source, max_pixels, max_bytes) as image:
        image.load()
        return to_array(image, image_size, channels, resize_ratio)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
