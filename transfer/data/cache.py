"""``load_split``: decode a split once, then serve it from memory or the on-disk cache.

Cache key = (manifest sha256, split, image size, channels, code of ``transfer/data``). The
manifest holds every file's sha256, so any change to the data changes the key, and so does
an edit to the decoder; stale entries are never read.
Disk cache: ``<dataset_dir>/../.cache/<dataset>-<split>-<size>px-<c>ch-<sha16>-<code16>.pt``
for a split held in memory; ``<same key>.mmap/`` for one larger than ``memory_mb``
(``storage="auto"``), read in batches from a memory-mapped file (``transfer.data.mapped``).
A resize/crop ratio other than 1 (torchvision weights' preprocessing) adds ``-r<ratio>``.
Decoding runs on a thread pool (PIL releases the GIL while it decodes and resizes), one
chunk at a time, so a memory-mapped split is built without holding it in memory.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from transfer import fingerprint
from transfer.data import mapped
from transfer.data.images import decode_image
from transfer.data.manifest import SPLITS, UNLABELLED, class_names, manifest_sha256, read_manifest
from transfer.data.tensors import UNLABELLED_INDEX, ImageTensors
from transfer.disk import guard_disk_full
from transfer.errors import DataError

log = logging.getLogger(__name__)

_MEMORY: dict[tuple, ImageTensors] = {}
DECODE_CHUNK = 1024  # images decoded per step (bounds the memory of the mmap build)


def clear_memory_cache() -> None:
    _MEMORY.clear()


def cache_dir(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir).resolve().parent / ".cache"


def _cache_file(
    dataset_dir: Path, sha: str, split: str, size: int, channels: int, ratio: float = 1.0,
    suffix: str = ".pt",
) -> Path:
    crop = f"-r{ratio:.4f}" if ratio != 1.0 else ""
    name = (f"{dataset_dir.name}-{split}-{size}px-{channels}ch{crop}-{sha[:16]}-"
            f"{fingerprint.code_fingerprint('data')}{suffix}")
    return cache_dir(dataset_dir) / name


def _split_rows(dataset_dir: Path, split: str) -> tuple[list, list[str], np.ndarray]:
    """The readable rows of ``split``, the class names and their label indices."""
    rows = read_manifest(dataset_dir)
    classes = class_names(rows)
    index = {name: i for i, name in enumerate(classes)}
    chosen = [r for r in rows if r.split == split and r.readable]
    if not chosen:
        raise DataError(f"{dataset_dir}: the manifest lists no readable images in split '{split}'")
    labels = np.array([index[r.label] if r.label else UNLABELLED_INDEX for r in chosen], dtype=np.int64)
    return chosen, classes, labels


def _decode_one(path: Path, size: int, channels: int, ratio: float) -> np.ndarray:
    try:
        return decode_image(path, size, channels, resize_ratio=ratio)
    except Exception as error:  # the manifest said readable: the file changed since
        raise DataError(
            f"{path} is listed as readable in the manifest but cannot be "
            f"decoded ({type(error).__name__}: {error}); re-run the prepare step"
        ) from None


def decode_chunks(
    dataset_dir: Path, rows: list, size: int, channels: int, ratio: float = 1.0,
    workers: int | None = None,
) -> Iterator[np.ndarray]:
    """Decoded images (n, C, S, S) in row order, ``DECODE_CHUNK`` at a time, in parallel."""
    workers = workers or os.cpu_count() or 1
    decode = functools.partial(_decode_one, size=size, channels=channels, ratio=ratio)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(rows), DECODE_CHUNK):
            paths = [dataset_dir / r.path for r in rows[start : start + DECODE_CHUNK]]
            yield np.stack(list(pool.map(decode, paths)))


def _decode_split(dataset_dir: Path, split: str, size: int, channels: int, ratio: float = 1.0) -> ImageTensors:
    chosen, classes, labels = _split_rows(dataset_dir, split)
    images = np.empty((len(chosen), channels, size, size), dtype=np.uint8)
    start = 0
    for chunk in decode_chunks(dataset_dir, chosen, size, channels, ratio):
        images[start : start + len(chunk)] = chunk
        start += len(chunk)
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels), classes)


def _mapped_split(
    dataset_dir: Path, folder: Path, split: str, size: int, channels: int, ratio: float,
    memory_bytes: int,
) -> ImageTensors:
    """The memory-mapped split in ``folder``, decoded and written there first if missing."""
    if not mapped.is_complete(folder):
        chosen, classes, labels = _split_rows(dataset_dir, split)
        shape = (len(chosen), channels, size, size)
        payload = torch.empty(shape, dtype=torch.uint8, device="meta")  # its size, for the message
        with guard_disk_full(folder, payload, setting="data.root"):
            mapped.write_split(folder, shape, decode_chunks(dataset_dir, chosen, size, channels, ratio),
                               labels, classes)
    images, labels_t, classes = mapped.read_split(folder, memory_bytes)
    return ImageTensors(images, labels_t, classes)


def split_bytes(dataset_dir: Path, split: str, size: int, channels: int) -> int:
    """Decoded size of a split, from the manifest alone."""
    rows = [r for r in read_manifest(dataset_dir) if r.split == split and r.readable]
    return len(rows) * channels * size * size


def _read_disk(path: Path) -> ImageTensors | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        return ImageTensors(blob["images"], blob["labels"], list(blob["classes"]))
    except Exception as error:  # a torn or foreign file: rebuild rather than fail
        log.warning("ignoring unreadable tensor cache %s (%s)", path, error)
        return None


def _write_disk(path: Path, data: ImageTensors) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    blob = {"images": data.images, "labels": data.labels, "classes": list(data.classes)}
    with guard_disk_full(tmp, blob, setting="data.root"):  # the cache lives beside the data
        torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: readers never see a half-written cache


def load_split(
    dataset_dir: str | Path, split: str, image_size: int, channels: int, *,
    resize_ratio: float = 1.0, storage: str = "auto", memory_mb: float = 1024.0,
) -> ImageTensors:
    """Images of one split (train/val/test/unlabelled) as uint8 (N, C, S, S) images.

    ``storage``: "memory" (a tensor), "mmap" (a memory-mapped file, read in batches) or
    "auto": memory-mapped when the decoded split is larger than ``memory_mb`` MB.
    """
    if split not in (*SPLITS, UNLABELLED):
        known = ", ".join((*SPLITS, UNLABELLED))
        raise DataError(f"unknown split '{split}': expected one of {known}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    dataset_dir = Path(dataset_dir)
    sha = manifest_sha256(dataset_dir)
    memory_bytes = int(memory_mb * 1e6)
    if storage == "auto":
        too_big = split_bytes(dataset_dir, split, image_size, channels) > memory_bytes
        storage = "mmap" if too_big else "memory"
    key = (str(dataset_dir.resolve()), sha, split, image_size, channels, resize_ratio, storage, memory_bytes)
    if key in _MEMORY:
        return _MEMORY[key]
    if storage == "mmap":
        folder = _cache_file(dataset_dir, sha, split, image_size, channels, resize_ratio, ".mmap")
        _MEMORY[key] = _mapped_split(dataset_dir, folder, split, image_size, channels, resize_ratio, memory_bytes)
        return _MEMORY[key]
    path = _cache_file(dataset_dir, sha, split, image_size, channels, resize_ratio)
    data = _read_disk(path)
    if data is None:
        data = _decode_split(dataset_dir, split, image_size, channels, resize_ratio)
        try:
            _write_disk(path, data)
        except OSError as error:  # read-only data dir: still works, just slower next run
            log.warning("could not write tensor cache %s (%s)", path, error)
    _MEMORY[key] = data
    return data
