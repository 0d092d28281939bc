"""Dataset layer: splits, manifests, rendering, bad inputs, tensor cache (tiny data, fast)."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer.config import ConfigError, DataParams, params_from_dict
from transfer.data import (
    MANIFEST_COLUMNS,
    ImageTensors,
    assign_splits,
    clear_memory_cache,
    dataset_version,
    inspect_image,
    list_imagefolder,
    digit_fonts,
    load_split,
    prepare_datasets,
    prepare_source,
    prepare_target,
    random_shift,
    read_manifest,
    render_digit,
    split_counts,
    subsample_per_class,
    to_float,
    write_font_digits,
)
from transfer.data.splits import check_splits
from transfer.errors import DataError, TransferError

# ---------------------------------------------------------------- fixtures


def make_image(path: Path, size: tuple[int, int] = (8, 8), mode: str = "L", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def make_folder(root: Path, counts: dict[str, int], **kw) -> Path:
    """root/<class>/<i>.png with distinct random pixels (distinct hashes)."""
    for c, (label, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            make_image(root / label / f"{i:03d}.png", seed=1000 * c + i, **kw)
    return root


def folder_params(tmp_path: Path, root: Path, **kw) -> DataParams:
    """Both datasets from ImageFolder trees: source = target = ``root`` unless given."""
    return DataParams(
        root=str(tmp_path / "data"), image_size=8, **kw,
        source={"kind": "imagefolder", "path": str(root)},
        target={"kind": "imagefolder", "path": str(root), "test_size": 0.2},
    )


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    clear_memory_cache()
    yield
    clear_memory_cache()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "in", {"a": 10, "b": 10, "c": 10})


@pytest.fixture
def prepared(tmp_path: Path, folder: Path) -> Path:
    params = folder_params(tmp_path, folder)
    return prepare_target(params, progress=False)


# ---------------------------------------------------------------- errors


def test_error_hierarchy():
    assert issubclass(DataError, TransferError)
    assert issubclass(ConfigError, TransferError) and issubclass(ConfigError, ValueError)
    from transfer.errors import ConfigError as reexported

    assert reexported is ConfigError


# ---------------------------------------------------------------- splits


def _keys_labels(counts: dict[str, int]) -> tuple[list[str], list[str]]:
    keys = [f"{c}/{i:04d}.png" for c, n in counts.items() for i in range(n)]
    return keys, [k.split("/")[0] for k in keys]


def test_splits_deterministic_disjoint_stratified():
    keys, labels = _keys_labels({"a": 50, "b": 30, "c": 20})
    first = assign_splits(keys, labels, test_size=0.2, val_size=0.1, seed=3)
    assert first == assign_splits(keys, labels, test_size=0.2, val_size=0.1, seed=3)
    assert first != assign_splits(keys, labels, test_size=0.2, val_size=0.1, seed=4)
    counts = Counter(zip(labels, first))
    assert counts[("a", "test")] == 10 and counts[("b", "test")] == 6 and counts[("c", "test")] == 4
    assert counts[("a", "val")] == 5 and counts[("c", "train")] == 14
    assert set(first) == {"train", "val", "test"}  # one split per key: disjoint by construction


def test_splits_independent_of_listing_order():
    keys, labels = _keys_labels({"a": 20, "b": 20})
    expected = dict(zip(keys, assign_splits(keys, labels, test_size=0.2, val_size=0.2, seed=0)))
    order = list(range(len(keys)))
    random.Random(1).shuffle(order)
    shuffled = assign_splits([keys[i] for i in order], [labels[i] for i in order],
                             test_size=0.2, val_size=0.2, seed=0)
    assert dict(zip([keys[i] for i in order], shuffled)) == expected


def test_split_counts_exact_total_and_minimum_one():
    sizes = {str(d): n for d, n in enumerate([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])}
    counts = split_counts(sizes, 797, 100)
    assert sum(t for _, _, t in counts.values()) == 797
    assert sum(v for _, v, _ in counts.values()) == 100
    tiny = split_counts({"big": 100, "tiny": 3}, 0.1, 0.1)
    assert tiny["tiny"] == (1, 1, 1)


def test_duplicates_share_a_split():
    keys = [f"a/{i}" for i in range(10)] + [f"b/{i}" for i in range(10)]
    labels = [k[0] for k in keys]
    groups = [k if k not in ("a/1", "a/7") else "same" for k in keys]
    splits = assign_splits(keys, labels, test_size=0.3, val_size=0.2, seed=0, groups=groups)
    assert splits[1] == splits[7]


def test_tiny_class_raises():
    keys, labels = _keys_labels({"a": 10, "rare": 2})
    with pytest.raises(DataError, match="'rare' \\(2\\)"):
        assign_splits(keys, labels, test_size=0.2, val_size=0.1, seed=0)


def test_check_splits_names_class_and_split():
    with pytest.raises(DataError, match="class 'b' has no images in the test split"):
        check_splits(["a", "a", "a", "b", "b"], ["train", "val", "test", "train", "val"], "x")


# ---------------------------------------------------------------- manifest / imagefolder


def test_manifest_columns_hashes_and_bytes(tmp_path: Path, folder: Path):
    make_image(folder / "a" / "rgb.jpg", size=(12, 9), mode="RGB")
    dest = prepare_target(folder_params(tmp_path, folder), progress=False)
    header = (dest / "manifest.csv").read_text().splitlines()[0]
    assert header == ",".join(MANIFEST_COLUMNS)
    rows = {r.path: r for r in read_manifest(dest)}
    assert len(rows) == 31 and all(r.readable and r.error == "" for r in rows.values())
    rgb = rows["a/rgb.jpg"]
    assert (rgb.width, rgb.height, rgb.mode, rgb.channels) == (12, 9, "RGB", 3)
    for rel, row in rows.items():
        data = (dest / rel).read_bytes()
        assert data == (folder / rel).read_bytes()  # copied unchanged
        assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert {r.split for r in rows.values()} == {"train", "val", "test"}


def test_dataset_version_tracks_content(tmp_path: Path, folder: Path):
    dest = prepare_target(folder_params(tmp_path, folder), progress=False)
    version = dataset_version(dest)
    assert version == dataset_version(dest) and len(version) == 64
    other = prepare_target(folder_params(tmp_path, folder, seed=5), progress=False)
    assert dataset_version(other) != version  # a different split is a different dataset


def test_unlabelled_folder(tmp_path: Path, folder: Path):
    for i in range(4):
        make_image(folder / "_unlabelled" / f"u{i}.png", seed=900 + i)
    dest = prepare_target(folder_params(tmp_path, folder), progress=False)
    rows = [r for r in read_manifest(dest) if r.split == "unlabelled"]
    assert len(rows) == 4 and all(r.label == "" for r in rows)
    data = load_split(dest, "unlabelled", 8, 1)
    assert data.labels.tolist() == [-1] * 4 and data.classes == ["a", "b", "c"]


# ---------------------------------------------------------------- bad inputs


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def test_missing_root(tmp_path: Path):
    # params reject it before anything runs; the data layer names it too
    with pytest.raises(ConfigError, match="data.source.path=.*nowhere.*no such directory"):
        params_from_dict({"data": {"source": {"kind": "imagefolder", "path": str(tmp_path / "nowhere")}}})
    with pytest.raises(DataError, match="nowhere"):
        list_imagefolder(tmp_path / "nowhere")


def test_empty_class_folder(tmp_path: Path, folder: Path):
    (folder / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        prepare_source(folder_params(tmp_path, folder), progress=False)


def test_strict_prepare_names_empty_classes_and_unreadable_files_at_once(
    tmp_path: Path, folder: Path
):
    (folder / "empty").mkdir()
    _truncate(folder / "a" / "003.png")
    with pytest.raises(DataError) as info:
        prepare_source(folder_params(tmp_path, folder), progress=False)
    message = str(info.value)
    assert "a/003.png" in message and str(folder / "empty") in message


def test_record_bad_keeps_empty_and_too_small_classes_for_validation(
    tmp_path: Path, folder: Path, caplog
):
    (folder / "empty").mkdir()
    make_folder(folder, {"zz": 2})
    with caplog.at_level(logging.WARNING):
        dest = prepare_source(folder_params(tmp_path, folder), strict=False, progress=False)
    assert (dest / "empty").is_dir()  # validation reports it as a class without images
    assert {r.split for r in read_manifest(dest) if r.label == "zz"} == {"train"}
    assert "empty" in caplog.text and "zz" in caplog.text


def test_single_class(tmp_path: Path):
    root = make_folder(tmp_path / "one", {"only": 5})
    with pytest.raises(DataError, match="single class.*only"):
        prepare_source(folder_params(tmp_path, root), progress=False)


def test_class_too_small_for_splits(tmp_path: Path, folder: Path):
    make_folder(folder, {"zz": 2})
    with pytest.raises(DataError, match="'zz'"):
        prepare_source(folder_params(tmp_path, folder), progress=False)


def test_corrupt_and_non_image_files_strict(tmp_path: Path, folder: Path):
    _truncate(folder / "a" / "003.png")
    (folder / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as info:
        prepare_source(folder_params(tmp_path, folder), progress=False)
    message = str(info.value)
    assert "a/003.png" in message and "b/notes.txt" in message and "2 unreadable" in message
    assert "skip_bad_images=true" in message
    assert not (tmp_path / "data" / "source").exists()  # nothing half-written
    assert not list((tmp_path / "data").glob(".source.tmp-*"))


def test_bad_files_listed_when_not_strict(tmp_path: Path, folder: Path):
    _truncate(folder / "a" / "003.png")
    dest = prepare_source(folder_params(tmp_path, folder), strict=False, progress=False)
    bad = [r for r in read_manifest(dest) if not r.readable]
    assert [r.path for r in bad] == ["a/003.png"] and bad[0].error
    assert " at 0x" not in bad[0].error  # stable text: same data, same manifest bytes
    assert bad[0].split == "train"  # never takes a val/test slot
    assert len(load_split(dest, "train", 8, 1)) + len(load_split(dest, "val", 8, 1)) + len(
        load_split(dest, "test", 8, 1)) == 29  # the unreadable row is skipped


def test_skip_bad_images_drops_with_warning(tmp_path: Path, folder: Path, caplog):
    _truncate(folder / "c" / "001.png")
    (folder / "b" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        dest = prepare_source(folder_params(tmp_path, folder, skip_bad_images=True),
                              progress=False)
    assert "c/001.png" in caplog.text and "notes.txt" in caplog.text
    paths = {r.path for r in read_manifest(dest)}
    assert len(paths) == 29 and "c/001.png" not in paths
    assert not (dest / "c" / "001.png").exists() and not (dest / "b" / "notes.txt").exists()


def test_skip_leaving_class_empty_names_it(tmp_path: Path, folder: Path):
    for path in (folder / "c").iterdir():
        _truncate(path)
    with pytest.raises(DataError, match="c"):
        prepare_source(folder_params(tmp_path, folder, skip_bad_images=True), progress=False)


def test_failed_rebuild_keeps_previous_dataset(tmp_path: Path, folder: Path):
    params = folder_params(tmp_path, folder)
    dest = prepare_source(params, progress=False)
    before = (dest / "manifest.csv").read_bytes()
    _truncate(folder / "a" / "000.png")
    with pytest.raises(DataError):
        prepare_source(params, progress=False)
    assert (dest / "manifest.csv").read_bytes() == before


def test_unchanged_recipe_is_reused_and_changes_rebuild(tmp_path: Path, folder: Path):
    params = folder_params(tmp_path, folder)
    dest = prepare_source(params, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["a", "b", "c", "manifest.csv"]  # data only
    stamp = (dest / "manifest.csv").stat().st_mtime_ns
    prepare_source(params, progress=False)
    assert (dest / "manifest.csv").stat().st_mtime_ns == stamp
    make_image(folder / "a" / "new.png", seed=77)
    prepare_source(params, progress=False)
    assert "a/new.png" in {r.path for r in read_manifest(dest)}


# ---------------------------------------------------------------- embedded datasets


def test_digit_fonts_skip_symbol_fonts():
    names = {Path(p).name for p in digit_fonts()}
    assert "DejaVuSans.ttf" in names and "cmr10.ttf" in names
    assert not names & {"cmex10.ttf", "cmsy10.ttf", "LastResortHE-Regular.ttf",
                        "DejaVuSansDisplay.ttf", "STIXSizOneSymReg.ttf"}


def test_font_rendering_deterministic(tmp_path: Path):
    rows = write_font_digits(tmp_path / "a", 50, 16, seed=0, progress=False)
    again = write_font_digits(tmp_path / "b", 50, 16, seed=0, progress=False)
    other = write_font_digits(tmp_path / "c", 50, 16, seed=1, progress=False)
    assert [r.sha256 for r in rows] == [r.sha256 for r in again]
    assert [r.sha256 for r in rows] != [r.sha256 for r in other]
    assert len(rows) == 50 and Counter(r.label for r in rows) == {str(d): 5 for d in range(10)}
    assert all((r.width, r.height, r.mode) == (16, 16, "L") for r in rows)
    for row in rows[:5]:  # rows built without re-decoding match a real inspection
        assert row == inspect_image((tmp_path / "a" / row.path).read_bytes(), row.path, row.label)


def test_font_rendering_same_with_worker_processes(tmp_path: Path, monkeypatch):
    import transfer.data.fonts as fonts

    serial = write_font_digits(tmp_path / "a", 300, 8, seed=0, progress=False)
    monkeypatch.setattr(fonts, "_workers", lambda n: 2)
    parallel = write_font_digits(tmp_path / "b", 300, 8, seed=0, progress=False)
    assert serial == parallel


def test_rendered_digit_is_white_ink_on_black():
    fonts = digit_fonts()
    images = np.stack([render_digit(i % 10, 32, 0, i, fonts) for i in range(40)])
    assert images.shape == (40, 32, 32) and images.dtype == np.uint8
    assert np.median(images) < 40 and images.max(axis=(1, 2)).min() > 120


def test_source_fonts_prepared(tmp_path: Path):
    params = DataParams(root=str(tmp_path / "data"), image_size=16, source={"n": 60})
    dest = prepare_source(params, progress=False)
    rows = read_manifest(dest)
    # 6 test images over 10 classes: every class still gets one in each split
    assert len(rows) == 60
    assert Counter(r.split for r in rows) == {"train": 40, "val": 10, "test": 10}


def test_sklearn_target_counts(tmp_path: Path):
    params = DataParams(root=str(tmp_path / "data"), image_size=8)
    dest = prepare_target(params, progress=False)
    rows = read_manifest(dest)
    splits = Counter(r.split for r in rows)
    assert len(rows) == 1797 and splits == {"test": 797, "val": 100, "train": 900}
    assert {r.label for r in rows} == {str(d) for d in range(10)}
    test = load_split(dest, "test", 8, 1)
    assert len(test) == 797 and test.images.shape == (797, 1, 8, 8)
    assert test.images.float().mean() < 100  # mostly background (low), ink high


def test_prepare_datasets_returns_both(tmp_path: Path, folder: Path):
    dirs = prepare_datasets(folder_params(tmp_path, folder), progress=False)
    assert set(dirs) == {"source", "target"} and all((d / "manifest.csv").is_file()
                                                       for d in dirs.values())


# ---------------------------------------------------------------- load_split / cache


def test_load_split_shapes_and_channels(prepared: Path):
    gray = load_split(prepared, "train", 12, 1)
    rgb = load_split(prepared, "train", 12, 3)
    assert gray.images.shape[1:] == (1, 12, 12) and rgb.images.shape[1:] == (3, 12, 12)
    assert gray.images.dtype == torch.uint8 and gray.labels.dtype == torch.int64
    assert gray.classes == ["a", "b", "c"] and set(gray.labels.tolist()) == {0, 1, 2}
    sub = gray.subset([0, 2])
    assert len(sub) == 2 and torch.equal(sub.images[1], gray.images[2])


def test_decode_handles_modes_and_formats(tmp_path: Path):
    from transfer.data import decode_image

    rng = np.random.default_rng(0)
    samples = {
        "rgba.png": Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA"),
        "pal.gif": Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert("P"),
        "deep.png": Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16)),
        "bw.bmp": Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).convert("1"),
        "cmyk.jpg": Image.new("CMYK", (7, 9), (10, 20, 30, 40)),
        "big.tif": Image.new("RGB", (40, 30), (200, 10, 10)),
        "small.webp": Image.new("L", (3, 5), 255),
    }
    for name, image in samples.items():
        image.save(tmp_path / name)
        for channels in (1, 3):
            array = decode_image(tmp_path / name, 8, channels)
            assert array.shape == (channels, 8, 8) and array.dtype == np.uint8, name


def test_load_split_uses_caches(prepared: Path, monkeypatch):
    first = load_split(prepared, "val", 8, 1)
    cache_files = list((prepared.parent / ".cache").glob("*.pt"))
    assert len(cache_files) == 1
    opens = []
    original = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opens.append(a) or original(*a, **k))
    assert load_split(prepared, "val", 8, 1) is first  # in-process cache
    clear_memory_cache()
    again = load_split(prepared, "val", 8, 1)  # disk cache: no decoding
    assert opens == [] and torch.equal(again.images, first.images)
    clear_memory_cache()
    load_split(prepared, "val", 10, 1)  # another size is another key
    assert len(opens) == len(first)


def test_unreadable_file_listed_readable(prepared: Path):
    row = next(r for r in read_manifest(prepared) if r.split == "test")
    _truncate(prepared / row.path)
    with pytest.raises(DataError, match=row.path):
        load_split(prepared, "test", 8, 1)


def test_load_split_unknown_split(prepared: Path):
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split(prepared, "dev", 8, 1)


def test_missing_manifest(tmp_path: Path):
    with pytest.raises(DataError, match="no manifest"):
        load_split(tmp_path, "train", 8, 1)


# ---------------------------------------------------------------- tensor ops


def _tensors(per_class: list[int]) -> ImageTensors:
    labels = torch.tensor([c for c, n in enumerate(per_class) for _ in range(n)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    return ImageTensors(images.contiguous(), labels, [f"k{c}" for c in range(len(per_class))])


def test_subsample_per_class():
    data = _tensors([6, 5, 7])
    sub = subsample_per_class(data, 3, seed=0)
    assert sub.class_counts() == {"k0": 3, "k1": 3, "k2": 3}
    assert torch.equal(sub.images, subsample_per_class(data, 3, seed=0).images)
    with pytest.raises(DataError, match="class 'k1' holds 5 image.*labels_per_class"):
        subsample_per_class(data, 6, seed=0)


def test_to_float_range():
    x = to_float(torch.tensor([0, 128, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32 and x[0] == -1 and x[2] == 1 and abs(x[1]) < 0.01


def test_random_shift():
    batch = torch.zeros(8, 1, 9, 9)
    batch[:, :, 4, 4] = 1.0
    gen = torch.Generator().manual_seed(0)
    out = random_shift(batch, 2, generator=gen)
    assert out.shape == batch.shape and torch.all(out.sum(dim=(1, 2, 3)) == 1)
    peaks = {tuple(int(i) for i in torch.nonzero(img[0])[0]) for img in out}
    assert len(peaks) > 1 and all(2 <= r <= 6 and 2 <= c <= 6 for r, c in peaks)
    again = random_shift(batch, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(random_shift(batch, 0), batch)
