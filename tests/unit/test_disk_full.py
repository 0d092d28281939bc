"""A full disk while writing weights, checkpoints or caches: one DiskFullError line with
the folder and the size, and no temporary file left. On a real size-limited tmpfs where
this process may mount one; elsewhere torch.save is replaced by a writer that leaves a
partial file and fails with ENOSPC, as a full disk does."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import small_tmpfs
from transfer.data import ImageTensors
from transfer.data.cache import _write_disk
from transfer.disk import guard_disk_full, is_disk_full, payload_nbytes
from transfer.errors import DiskFullError, TransferError
from transfer.feature_cache import FeatureCache
from transfer.models import create_model, save_model_dir
from transfer.train import _save_checkpoint

MB = 1_000_000


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 1 MB filesystem (a tmpfs), or a folder whose torch.save runs out of space."""
    with small_tmpfs(tmp_path / "disk", "1m") as mounted:
        if not mounted:
            real_save = torch.save

            def save_on_1mb(obj: object, f: str | Path, *args: object, **kwargs: object) -> None:
                if payload_nbytes(obj) < MB:
                    return real_save(obj, f, *args, **kwargs)
                Path(f).write_bytes(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(torch, "save", save_on_1mb)
        yield tmp_path / "disk"


def _left(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _check(error: pytest.ExceptionInfo[DiskFullError], folder: Path, mb: int, setting: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"no space left on {folder.resolve()} (need about {mb} MB): "
                       f"free space or point {setting} elsewhere"), message
    assert isinstance(error.value, TransferError)  # one CLI line, no Prefect retry


def test_checkpoint_save_on_a_full_disk(full_disk: Path) -> None:
    state = {"model": {"w": torch.zeros(3 * MB // 4)}, "optimizer": {"m": torch.zeros(MB // 4)}}  # 4 MB
    with pytest.raises(DiskFullError) as error:
        _save_checkpoint(full_disk / "last.pt", state)
    _check(error, full_disk, 4, "runtime.artifacts_dir")
    assert _left(full_disk) == []  # no partial last.tmp filling the disk


def test_checkpoint_save_keeps_the_previous_checkpoint(full_disk: Path) -> None:
    _save_checkpoint(full_disk / "last.pt", {"epoch": 1, "w": torch.zeros(10)})
    with pytest.raises(DiskFullError):
        _save_checkpoint(full_disk / "last.pt", {"epoch": 2, "w": torch.zeros(MB)})
    assert _left(full_disk) == ["last.pt"]
    assert torch.load(full_disk / "last.pt", weights_only=True)["epoch"] == 1  # resumable


def test_model_dir_on_a_full_disk(full_disk: Path) -> None:
    model = create_model("resnet18", num_classes=4, in_channels=3)
    nbytes = sum(t.nbytes for t in model.state_dict().values())
    with pytest.raises(DiskFullError) as error:
        save_model_dir(model, full_disk / "models" / "finetuned", {"stage": "finetune"})
    _check(error, full_disk / "models", -(-nbytes // MB), "runtime.artifacts_dir")
    assert _left(full_disk) == ["models"]  # neither the temp dir nor a half model dir


def test_caches_on_a_full_disk_name_data_root(full_disk: Path) -> None:
    with pytest.raises(DiskFullError) as error:
        FeatureCache(full_disk / "features").save("key", torch.zeros(2, MB // 2))  # 4 MB of float32
    _check(error, full_disk / "features", 4, "data.root")
    images = ImageTensors(torch.zeros(300, 3, 64, 64, dtype=torch.uint8), torch.zeros(300, dtype=torch.long), ["a"])
    with pytest.raises(DiskFullError) as error:
        _write_disk(full_disk / "cache" / "x.pt", images)
    _check(error, full_disk / "cache", 4, "data.root")  # 3.7 MB of images + 2.4 kB of labels
    assert _left(full_disk) == ["cache", "features"]


def test_other_write_errors_are_not_disk_full(tmp_path: Path) -> None:
    temp = tmp_path / "x.tmp"
    with pytest.raises(RuntimeError, match="unrelated"), guard_disk_full(temp, {}):
        temp.write_bytes(b"partial")
        raise RuntimeError("unrelated failure")
    assert not temp.exists()  # removed whatever the failure
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
