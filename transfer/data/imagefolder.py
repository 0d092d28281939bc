"""Generic ImageFolder input: ``root/<class>/<image>`` (class folders may nest sub-folders).

Class names are the sorted folder names. A top-level ``_unlabelled/`` folder holds
unlabelled images (label "", split "unlabelled") for domain-adversarial training.
Hidden files and folders (``.DS_Store``, ``.cache``) and loose files at the top level
(a README, a manifest) are ignored. An empty class folder is not an error here: prepare
copies it as an empty folder and validation reports it with the dataset's other problems.
The tree is untrusted: a symlink that leads out of the root is refused (one inside it is
fine), a file over the byte limit is recorded unreadable without being read, and an image
over the pixel limit without being decoded.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from transfer.data.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from transfer.data.manifest import ManifestRow, inspect_image
from transfer.data.progress import progress_bar
from transfer.errors import DataError

UNLABELLED_DIR = "_unlabelled"
EMPTY_MARKER = ".empty-class"  # hidden: never listed as a file


@dataclass(frozen=True)
class FolderFile:
    rel: str  # posix path relative to the root, e.g. "cat/001.jpg"
    label: str  # "" for files under _unlabelled/


def _visible_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def inside(root: Path, rel: str | Path) -> Path:
    """``root / rel``, refused (DataError) unless it resolves inside ``root``: no ``..``, no
    absolute path, no symlink out of the dataset."""
    path = root / rel
    escapes = Path(rel).is_absolute() or ".." in Path(rel).parts
    if escapes or not path.resolve().is_relative_to(root.resolve()):
        target = path.resolve() if path.is_symlink() else path
        raise DataError(
            f"{path} leads out of the ImageFolder root {root} (to {target}): copy the files "
            "into the root instead of linking them"
        )
    return path


def list_imagefolder(root: str | Path) -> list[FolderFile]:
    """All files of an ImageFolder tree, sorted; DataError for a tree that cannot work."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"ImageFolder root {root} does not exist: check data.*.path")
    if not root.is_dir():
        raise DataError(f"ImageFolder root {root} is not a directory: check data.*.path")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [p for p in folders if p.name != UNLABELLED_DIR]
    if not classes:
        raise DataError(
            f"{root} has no class folders: expected the ImageFolder layout root/<class>/<image>"
        )
    if len(classes) == 1:
        raise DataError(
            f"{root} holds a single class ('{classes[0].name}'): classification needs at least "
            "two class folders"
        )
    files: list[FolderFile] = []
    for folder in folders:
        inside(root, folder.name)
        found = [inside(root, p.relative_to(root)) for p in _visible_files(folder)]
        label = "" if folder.name == UNLABELLED_DIR else folder.name
        files += [FolderFile(p.relative_to(root).as_posix(), label) for p in found]
    return files


def empty_class_folders(root: str | Path) -> list[str]:
    """Class folders holding no visible file (sorted names)."""
    root = Path(root)
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != UNLABELLED_DIR
        and not _visible_files(p)
    )


def copy_imagefolder(
    root: str | Path, dest: Path, *, files: list[FolderFile], empty: Sequence[str] = (),
    progress: bool = True, max_bytes: int = DEFAULT_MAX_FILE_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[ManifestRow]:
    """Copy the files byte-for-byte into ``dest`` and describe each (readable or not).

    ``empty`` class folders are created empty: validation counts them as classes with no
    images and says so. A file over ``max_bytes`` (data.max_image_bytes) is streamed, not
    read into memory, and recorded unreadable; ``max_pixels`` (data.max_image_pixels) bounds
    decoding.
    """
    root = Path(root)
    for name in empty:
        (dest / name).mkdir(parents=True, exist_ok=True)
        # DVC and git restore no empty folder: a hidden marker keeps the class on checkout
        (dest / name / EMPTY_MARKER).write_text("class folder without images (see validation)\n")
    copy = functools.partial(_copy_one, root, dest, max_bytes=max_bytes, max_pixels=max_pixels)
    # threads: hashing, file I/O and PIL's decode release the GIL; map keeps the order
    with progress_bar(progress) as track, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(track(pool.map(copy, files), description=f"copying {root.name}", total=len(files)))


def _copy_one(root: Path, dest: Path, item: FolderFile, *, max_bytes: int, max_pixels: int) -> ManifestRow:
    source, target = inside(root, item.rel), inside(dest, item.rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    size = source.stat().st_size
    if size > max_bytes:
        return _oversize(source, target, item, size, max_bytes)
    data = source.read_bytes()
    target.write_bytes(data)  # same bytes we hashed: the manifest matches the copy
    return inspect_image(data, item.rel, item.label, max_pixels=max_pixels)


def _oversize(source: Path, target: Path, item: FolderFile, size: int, limit: int) -> ManifestRow:
    shutil.copyfile(source, target)
    with target.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    error = f"file too large: {size} bytes, the limit is {limit} bytes (data.max_image_bytes)"
    return ManifestRow(item.rel, item.label, "", 0, 0, "", 0, digest, False, error)
