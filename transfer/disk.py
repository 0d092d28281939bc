"""A full disk while writing weights: one line naming the folder and the size, no retry,
no half-written temporary file left behind to keep the disk full."""

from __future__ import annotations

import errno
import math
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from transfer.errors import DiskFullError

# torch.save reports a short write as a RuntimeError from its zip writer, not an OSError.
_TORCH_WRITE_FAILED = ("no space left", "enforce fail at inline_container", "file write failed")


def payload_nbytes(payload: Any) -> int:
    """Bytes of the tensors in a (nested) state dict / list: what a save has to write."""
    if isinstance(payload, torch.Tensor):
        return payload.nbytes
    if isinstance(payload, Mapping):
        return sum(payload_nbytes(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(payload_nbytes(v) for v in payload)
    return 0


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILED)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def guard_disk_full(
    temp: Path | str, payload: Any, *, setting: str = "runtime.artifacts_dir"
) -> Iterator[None]:
    """Around a write to ``temp`` (a temporary file or folder, renamed into place after):
    on any failure ``temp`` is removed; a full disk becomes a ``DiskFullError`` naming
    ``temp``'s folder, the size of ``payload`` and ``setting`` (where to write instead)."""
    temp = Path(temp)
    try:
        yield
    except BaseException as error:
        _remove(temp)
        if isinstance(error, Exception) and is_disk_full(error):
            mb = max(1, math.ceil(payload_nbytes(payload) / 1e6))
            raise DiskFullError(
                f"no space left on {temp.resolve().parent} (need about {mb} MB): "
                f"free space or point {setting} elsewhere"
            ) from error
        raise
