"""Untrusted files: pickled weights, ImageFolder trees with escaping links, image bombs."""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.adapters.serve import encode_file
from transfer.config import DataParams, load_params
from transfer.data import images as image_limits
from transfer.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, decode_image, set_pixel_limit
from transfer.data.imagefolder import FolderFile, copy_imagefolder, list_imagefolder
from transfer.data.manifest import MANIFEST_NAME, inspect_image, read_manifest
from transfer.data.prepare import prepare_target
from transfer.errors import DataError, TransferError
from transfer.models import create_model, load_model_dir, save_model_dir
from transfer.predict import InputError
from transfer.predict import decode_image as serve_decode

REPO = Path(__file__).resolve().parents[2]


def png(seed: int, shape: tuple[int, ...] = (20, 24)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb(side: int = 8000) -> bytes:
    """A ~10 KB PNG that decodes to side x side pixels (64 M at 8000: over the 40 M limit)."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tree(root: Path, per_class: int = 6) -> Path:
    for c, label in enumerate(("a", "b")):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            (root / label / f"{i}.png").write_bytes(png(10 * c + i))
    return root


# --- weights ----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create ``marker``: what a hostile model.pt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_weights_load_refuses_pickled_code(tmp_path: Path) -> None:
    model_dir = save_model_dir(
        create_model("tiny_cnn", num_classes=2, in_channels=1), tmp_path / "m",
        {"classes": ["a", "b"], "image_size": 16},
    )
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Payload(marker)}, model_dir / "model.pt")
    with pytest.raises(TransferError, match="cannot read weights file"):
        load_model_dir(model_dir)
    assert not marker.exists()  # weights_only=True: the payload never ran


def test_every_torch_load_is_weights_only() -> None:
    calls = []
    for package in ("transfer", "tasks", "flows"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"):
                    flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                    calls.append((f"{path.name}:{node.lineno}", flags.get("weights_only")))
    assert len(calls) >= 3
    assert [where for where, flag in calls if flag is not True] == []


# --- ImageFolder trees ------------------------------------------------------------------------


def test_symlinked_file_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "in")
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(99))
    (root / "a" / "leak.png").symlink_to(secret)
    with pytest.raises(DataError, match="leads out of the ImageFolder root"):
        list_imagefolder(root)


def test_symlinked_class_folder_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "in")
    outside = make_tree(tmp_path / "elsewhere")
    (root / "c").symlink_to(outside / "a", target_is_directory=True)
    with pytest.raises(DataError, match="leads out of the ImageFolder root"):
        list_imagefolder(root)


def test_symlink_inside_the_root_is_fine(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "in")
    (root / "b" / "same.png").symlink_to(root / "a" / "0.png")
    files = list_imagefolder(root)
    assert FolderFile("b/same.png", "b") in files
    rows = copy_imagefolder(root, tmp_path / "out", files=files, progress=False)
    assert all(row.readable for row in rows)


@pytest.mark.parametrize("rel", ["../outside.png", "a/../../outside.png", "/etc/hostname"])
def test_names_leaving_the_root_are_refused(tmp_path: Path, rel: str) -> None:
    root = make_tree(tmp_path / "in")
    (tmp_path / "outside.png").write_bytes(png(5))
    with pytest.raises(DataError, match="leads out of the ImageFolder root"):
        copy_imagefolder(root, tmp_path / "out", files=[FolderFile(rel, "a")], progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_manifest_paths_leaving_the_dataset_are_refused(tmp_path: Path) -> None:
    dataset = tmp_path / "ds"
    dataset.mkdir()
    header = "path,label,split,width,height,mode,channels,sha256,readable,error\n"
    (dataset / MANIFEST_NAME).write_text(header + "../../etc/passwd,a,train,1,1,L,1,x,true,\n")
    with pytest.raises(DataError, match="leaves the dataset directory"):
        read_manifest(dataset)


# --- decoding bounds ---------------------------------------------------------------------------


def test_pil_limit_is_set_explicitly() -> None:
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS == DataParams().max_image_pixels
    assert load_params(None, []).serve.max_image_pixels == DEFAULT_MAX_PIXELS


def test_bombs_are_refused_before_decoding() -> None:
    data = bomb()
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match="8000x8000 pixels"):
        decode_image(data, 16, 1)
    row = inspect_image(data, "a/bomb.png", "a")
    assert not row.readable and "image too large" in row.error
    with pytest.raises(InputError, match="row 0: image too large"):
        serve_decode(base64.b64encode(data).decode(), 16, 1, max_bytes=10**6, index=0)
    with pytest.raises(InputError, match=r"24x20 pixels, the limit is 100 pixels \(serve.max_image_pixels\)"):
        serve_decode(png(1), 16, 1, max_pixels=100)


def test_byte_limit_on_files(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(png(1))
    with pytest.raises(ImageTooLarge, match="image file too large"):
        decode_image(path, 16, 1, max_bytes=100)
    assert decode_image(path, 16, 1).shape == (1, 16, 16)
    with pytest.raises(DataError, match=r"image too large: \d+ bytes, the limit is 100 bytes"):
        encode_file(path, max_bytes=100)  # transfer predict: refused before it is read


def test_imagefolder_limits_come_from_params(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "in")
    big = root / "a" / "big.png"
    big.write_bytes(png(7, (200, 200)))
    (root / "b" / "bomb.png").write_bytes(bomb(300))  # 90 000 pixels
    rows = copy_imagefolder(root, tmp_path / "out", files=list_imagefolder(root), progress=False,
                            max_bytes=20_000, max_pixels=50_000)
    by_path = {row.path: row for row in rows}
    assert not by_path["a/big.png"].readable and "data.max_image_bytes" in by_path["a/big.png"].error
    assert by_path["a/big.png"].sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    assert (tmp_path / "out" / "a" / "big.png").read_bytes() == big.read_bytes()  # still copied
    assert not by_path["b/bomb.png"].readable and "300x300 pixels" in by_path["b/bomb.png"].error
    assert sum(row.readable for row in rows) == 12

    params = DataParams(root=str(tmp_path / "data"), image_size=8, max_image_pixels=50_000,
                        target={"kind": "imagefolder", "path": str(root), "test_size": 0.25})
    try:
        with pytest.raises(DataError, match="bomb.png"):
            prepare_target(params, progress=False)
        assert Image.MAX_IMAGE_PIXELS == 50_000  # PIL's guard follows data.max_image_pixels
    finally:
        set_pixel_limit(DEFAULT_MAX_PIXELS)
    assert image_limits.Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS
    os.remove(root / "b" / "bomb.png")
