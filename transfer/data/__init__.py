"""Datasets: ImageFolder trees + manifests on disk, uint8 tensors in memory.

    prepare_datasets(params.data) -> {"source": Path, "target": Path}
    load_split(dataset_dir, "train", image_size, channels) -> ImageTensors
    subsample_per_class(data, k, seed) -> ImageTensors
    to_float(images_uint8) -> float32 in [-1, 1]
"""

from transfer.data.cache import clear_memory_cache, load_split
from transfer.data.digits import write_sklearn_digits
from transfer.data.fonts import digit_fonts, render_digit, write_font_digits
from transfer.data.images import decode_image, to_array
from transfer.data.imagefolder import UNLABELLED_DIR, list_imagefolder
from transfer.data.manifest import (
    IMAGE_EXTENSIONS,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    SPLITS,
    UNLABELLED,
    ManifestRow,
    class_names,
    dataset_version,
    inspect_image,
    manifest_sha256,
    read_manifest,
    write_manifest,
)
from transfer.data.prepare import prepare_datasets, prepare_source, prepare_target
from transfer.data.splits import assign_splits, split_counts
from transfer.data.tensors import ImageTensors, random_shift, subsample_per_class, to_float

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "SPLITS",
    "UNLABELLED",
    "UNLABELLED_DIR",
    "ImageTensors",
    "ManifestRow",
    "assign_splits",
    "class_names",
    "clear_memory_cache",
    "dataset_version",
    "decode_image",
    "digit_fonts",
    "inspect_image",
    "list_imagefolder",
    "load_split",
    "manifest_sha256",
    "prepare_datasets",
    "prepare_source",
    "prepare_target",
    "random_shift",
    "read_manifest",
    "render_digit",
    "split_counts",
    "subsample_per_class",
    "to_array",
    "to_float",
    "write_font_digits",
    "write_manifest",
    "write_sklearn_digits",
]
