"""``load_split``: decode a split once, then serve it from memory or the on-disk cache.

Cache key = (manifest sha256, split, image size, channels, code of ``transfer/data``). The
manifest holds every file's sha256, so any change to the data changes the key, and so does
an edit to the decoder; stale entries are never read.
Disk cache: ``<dataset_dir>/../.cache/<dataset>-<split>-<size>px-<c>ch-<sha16>-<code16>.pt``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from transfer import fingerprint
from transfer.data.images import decode_image
from transfer.data.manifest import SPLITS, UNLABELLED, class_names, manifest_sha256, read_manifest
from transfer.data.tensors import UNLABELLED_INDEX, ImageTensors
from transfer.disk import guard_disk_full
from transfer.errors import DataError

log = logging.getLogger(__name__)

_MEMORY: dict[tuple[str, str, str, int, int], ImageTensors] = {}


def clear_memory_cache() -> None:
    _MEMORY.clear()


def cache_dir(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir).resolve().parent / ".cache"


def _cache_file(dataset_dir: Path, sha: str, split: str, size: int, channels: int) -> Path:
    name = f"{dataset_dir.name}-{split}-{size}px-{channels}ch-{sha[:16]}-{fingerprint.code_fingerprint('data')}.pt"
    return cache_dir(dataset_dir) / name


def _decode_split(dataset_dir: Path, split: str, size: int, channels: int) -> ImageTensors:
    rows = read_manifest(dataset_dir)
    classes = class_names(rows)
    index = {name: i for i, name in enumerate(classes)}
    chosen = [r for r in rows if r.split == split and r.readable]
    if not chosen:
        raise DataError(f"{dataset_dir}: the manifest lists no readable images in split '{split}'")
    images = np.empty((len(chosen), channels, size, size), dtype=np.uint8)
    for i, row in enumerate(chosen):
        try:
            images[i] = decode_image(dataset_dir / row.path, size, channels)
        except Exception as error:  # the manifest said readable: the file changed since
            raise DataError(
                f"{dataset_dir / row.path} is listed as readable in the manifest but cannot be "
                f"decoded ({type(error).__name__}: {error}); re-run the prepare step"
            ) from None
    labels = [index[r.label] if r.label else UNLABELLED_INDEX for r in chosen]
    return ImageTensors(torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), classes)


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
    dataset_dir: str | Path, split: str, image_size: int, channels: int
) -> ImageTensors:
    """Images of one split (train/val/test/unlabelled) as uint8 (N, C, S, S) tensors."""
    if split not in (*SPLITS, UNLABELLED):
        known = ", ".join((*SPLITS, UNLABELLED))
        raise DataError(f"unknown split '{split}': expected one of {known}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    dataset_dir = Path(dataset_dir)
    sha = manifest_sha256(dataset_dir)
    key = (str(dataset_dir.resolve()), sha, split, image_size, channels)
    if key in _MEMORY:
        return _MEMORY[key]
    path = _cache_file(dataset_dir, sha, split, image_size, channels)
    data = _read_disk(path)
    if data is None:
        data = _decode_split(dataset_dir, split, image_size, channels)
        try:
            _write_disk(path, data)
        except OSError as error:  # read-only data dir: still works, just slower next run
            log.warning("could not write tensor cache %s (%s)", path, error)
    _MEMORY[key] = data
    return data
