"""Splits larger than memory: decoded uint8 images in a ``.npy`` file, read in batches.

A split is stored once, beside today's tensor cache and under the same key, as a folder
``<key>.mmap/`` holding ``images.npy`` (uint8 (N, C, S, S), written in chunks by plain
sequential writes, so the writer never holds more than one chunk), ``labels.npy`` and
``classes.json``. It is built under a temporary name and renamed into place: a reader
never sees half a split. The file is a plain ``.npy`` (``np.load(path, mmap_mode="r")``
maps it); batches are read with ``os.preadv`` straight into the batch buffer rather than
through a mapping: a page fault on a mapping pulls whole page-cache folios into the
process's resident set (measured here: 64 random rows of a 147 MB file added 85 MB of
RSS), while a read copies exactly the rows asked for, so resident memory stays at the
batches in flight however large the split.

``MappedImages`` stands in for the images tensor of an ``ImageTensors``: it has the
shape, dtype and indexing (which returns a plain tensor of the rows asked for) that the
training and evaluation code uses, and ``batch_loader`` streams index batches through a
``torch.utils.data.DataLoader`` (worker processes, pinned memory for CUDA).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

IMAGES, LABELS, CLASSES = "images.npy", "labels.npy", "classes.json"


class MappedImages:
    """uint8 images (N, C, H, W) in an ``.npy`` file; ``rows`` selects a subset lazily.

    A subset of at most ``memory_bytes`` is read into memory (``take``): the k labelled
    images per class of a fine-tune stay on today's in-memory fast path.
    """

    dtype = torch.uint8
    ndim = 4
    device = torch.device("cpu")

    def __init__(self, path: str | Path, rows: np.ndarray | None = None, memory_bytes: int = 0) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            self._offset = handle.tell()  # where row 0 starts
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ValueError(f"{self.path}: expected a C-order uint8 (N, C, H, W) array")
        self._full_shape = tuple(int(d) for d in shape)
        self._row_bytes = int(np.prod(self._full_shape[1:]))
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.memory_bytes = int(memory_bytes)

    @property
    def shape(self) -> torch.Size:
        n = self._full_shape[0] if self.rows is None else len(self.rows)
        return torch.Size((n, *self._full_shape[1:]))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, index: np.ndarray) -> Tensor:
        """A copy of the rows ``index`` (positions in this view) as a uint8 tensor."""
        index = np.asarray(index, dtype=np.int64)
        if self.rows is not None:
            index = self.rows[index]
        out = np.empty((len(index), *self._full_shape[1:]), dtype=np.uint8)
        if len(index) and (index.min() < 0 or index.max() >= self._full_shape[0]):
            raise IndexError(f"row index out of range for {self._full_shape[0]} images")
        flat = out.reshape(len(index), self._row_bytes)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if len(index) and np.all(np.diff(index) == 1):  # contiguous: one sequential read
                self._read_into(fd, memoryview(out.reshape(-1)), int(index[0]))
            else:
                for j, row in enumerate(index.tolist()):
                    self._read_into(fd, memoryview(flat[j]), row)
        finally:
            os.close(fd)
        return torch.from_numpy(out)

    def _read_into(self, fd: int, buffer: memoryview, row: int) -> None:
        offset, done = self._offset + row * self._row_bytes, 0
        while done < len(buffer):  # preadv may return short
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: file ends before row {row}")
            done += got

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray | Tensor) -> Tensor:
        if isinstance(key, int):
            return self.read(np.array([key]))[0]
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key])
        if isinstance(key, Tensor):
            key = key.cpu().numpy()
        return self.read(np.asarray(key))

    def take(self, index: np.ndarray) -> MappedImages | Tensor:
        """The subset ``index``: in memory when it is small enough, else a mapped view."""
        index = np.asarray(index, dtype=np.int64)
        rows = index if self.rows is None else self.rows[index]
        if len(rows) * int(np.prod(self._full_shape[1:])) <= self.memory_bytes:
            return self.read(index)
        return MappedImages(self.path, rows, self.memory_bytes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Tensor:
        """The whole view in memory (for code paths that need a split at once: DANN, ...)."""
        return self.read(np.arange(len(self))).to(device, non_blocking=non_blocking)

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def chunks(self, size: int = 4096) -> Iterator[Tensor]:
        """The images in order, ``size`` at a time (bounded memory: hashing, statistics)."""
        for start in range(0, len(self), size):
            yield self.read(np.arange(start, min(start + size, len(self))))


# --------------------------------------------------------------------------- storage


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (IMAGES, LABELS, CLASSES))


def write_split(
    folder: Path, shape: tuple[int, int, int, int], chunks: Iterable[np.ndarray],
    labels: np.ndarray, classes: list[str],
) -> Path:
    """Write a split chunk by chunk to ``folder`` (atomically: temp folder + rename)."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with open(tmp / IMAGES, "wb") as handle:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                      "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_2_0(handle, header)
            written = 0
            for chunk in chunks:  # (n, C, S, S) uint8, in row order
                handle.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
                written += len(chunk)
        if written != shape[0]:
            raise ValueError(f"wrote {written} images, expected {shape[0]}")
        np.save(tmp / LABELS, labels.astype(np.int64))
        (tmp / CLASSES).write_text(json.dumps(classes))
        try:
            os.replace(tmp, folder)  # atomic; fails if another process finished first
        except OSError:
            if not is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_split(folder: Path, memory_bytes: int) -> tuple[MappedImages, Tensor, list[str]]:
    images = MappedImages(folder / IMAGES, memory_bytes=memory_bytes)
    labels = torch.from_numpy(np.load(folder / LABELS))
    classes = json.loads((folder / CLASSES).read_text())
    if labels.shape != (len(images),):
        raise ValueError(f"{folder}: {len(labels)} labels for {len(images)} images")
    return images, labels, classes


# --------------------------------------------------------------------------- batches


@functools.cache
def bound_heap() -> None:
    """glibc: allocations of 1 MB and more come from mmap and go back to the OS when freed.

    By default glibc raises that threshold as big blocks are freed, and then serves the
    per-batch tensors (uint8 batch, its float copy) from the heap, where their alternation
    fragments it: streaming 12,000 mapped 64 px images grew resident memory by ~200 MB,
    flat with this setting. Process-wide, set once, only when a mapped split is read.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass



class _Batches(Dataset):
    """Item ``i`` of a DataLoader over a list of index batches: batch ``i``'s images and labels."""

    def __init__(self, images: MappedImages | Tensor, labels: Tensor, batches: Sequence[Tensor]) -> None:
        self.images, self.labels, self.batches = images, labels, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        idx = self.batches[i]
        return self.images[idx], self.labels[idx]


def default_workers() -> int:
    """Half the cores (the other half trains), at most 4; 0 (in process) on a 1-2 core host."""
    return min(4, (os.cpu_count() or 1) // 2) if (os.cpu_count() or 1) > 2 else 0


def batch_loader(
    images: MappedImages | Tensor, labels: Tensor, batches: Sequence[Tensor], *,
    workers: int | None = None, pin_memory: bool = False,
) -> DataLoader:
    """Yield (uint8 images, labels) per index batch, in order, read by ``workers`` processes."""
    workers = default_workers() if workers is None else workers
    bound_heap()
    return DataLoader(
        _Batches(images, labels, [b.cpu() for b in batches]), batch_size=None, shuffle=False,
        num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
    )
