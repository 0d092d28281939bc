"""The embedded default target: scikit-learn's handwritten digits (1,797 images, 8x8, 0..16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from transfer.data.images import png_bytes
from transfer.data.manifest import ManifestRow, generated_row
from transfer.data.progress import progress_bar

LEVELS = 16  # sklearn digits: each 8x8 cell counts the inked pixels of a 4x4 block (0..16)
UPSAMPLE = Image.Resampling.BILINEAR


def levels_to_image(levels: np.ndarray, image_size: int) -> Image.Image:
    """(h, w) grey levels 0..16 (high = ink) -> 8-bit L image of image_size x image_size.

    Used for the real target and for the source's low-resolution degradation, so both
    look alike after upscaling.
    """
    scaled = np.clip(np.round(np.asarray(levels, dtype=np.float64) * 255.0 / LEVELS), 0, 255)
    image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    return image.resize((image_size, image_size), UPSAMPLE)


def write_sklearn_digits(dest: Path, image_size: int, progress: bool = True) -> list[ManifestRow]:
    """Write ``dest/<digit>/<index>.png`` for all 1,797 images; return their manifest rows."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    rows = []
    for label in sorted({str(t) for t in digits.target}):
        (dest / label).mkdir(parents=True, exist_ok=True)
    with progress_bar(progress) as bar:
        for i in bar(range(len(digits.images)), description="target: sklearn digits"):
            data = png_bytes(levels_to_image(digits.images[i], image_size))
            rel = f"{digits.target[i]}/{i:04d}.png"
            (dest / rel).write_bytes(data)
            rows.append(generated_row(data, rel, str(digits.target[i]), image_size))
    return rows
