"""Real pretrained backbones and data larger than memory.

- torchvision-layout weights select the weights' preprocessing everywhere: the training
  batches the body sees, model.json, and the pyfunc model's input path (checked against
  torchvision's own transforms preset);
- a split over the in-memory limit trains through the memory-mapped path with the same
  result as the in-memory path (same seed);
- the peak RSS of a training epoch over a memory-mapped split stays bounded (subprocess).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer.config import DataParams, OptimParams, SourceData
from transfer.data import ImageTensors, clear_memory_cache, load_split, prepare_source, to_float
from transfer.data import mapped
from transfer.models import create_model, load_model_dir, save_model_dir, weights_preprocessing
from transfer.preprocessing import Preprocessing
from transfer.train import fit, predict_proba

CPU = torch.device("cpu")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state_dict in torchvision's layout under torchvision's file name (nothing downloaded)."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


class _Inputs:
    """Records what the first conv stage of a body receives."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        model.body.stages.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].detach().clone()))


def _toy_rgb(n: int = 32, size: int = 32, seed: int = 0) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n) % 2, ["a", "b"])


def test_torchvision_weights_bring_their_preprocessing(resnet_file: Path, tmp_path: Path) -> None:
    prep = weights_preprocessing("resnet18", resnet_file, channels=3, image_size=None)
    assert prep.source == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert prep.mean == pytest.approx(IMAGENET_MEAN) and prep.std == pytest.approx(IMAGENET_STD)
    assert prep.image_size == 224 and prep.resize_ratio == pytest.approx(256 / 224)
    grey = weights_preprocessing("resnet18", resnet_file, channels=1, image_size=32)
    assert grey.image_size == 32 and grey.replicate_grey  # grey -> RGB for the RGB first conv
    summed = weights_preprocessing("resnet18", resnet_file, 1, 32, grey_to_rgb="conv")
    assert not summed.replicate_grey and summed.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    # our own model files (TransferNet layout) and no weights keep the pipeline's normalisation
    own_file = tmp_path / "own.pt"
    torch.save(create_model("resnet18", 2, 3).state_dict(), own_file)
    assert weights_preprocessing("resnet18", own_file, 3, None) is None
    assert weights_preprocessing("resnet18", None, 3, None) is None


def test_training_batches_are_normalised_with_the_weights_statistics(resnet_file: Path) -> None:
    prep = weights_preprocessing("resnet18", resnet_file, channels=3, image_size=32)
    data = _toy_rgb()
    model = create_model("resnet18", 2, 3, weights=resnet_file, preprocessing=prep)
    inputs = _Inputs(model)
    fit(model, data, None, OptimParams(epochs=1, batch_size=16, augment=False), device=CPU, seed=0,
        progress=False)
    seen = torch.cat(inputs.seen)  # every training image once, shuffled
    x01 = data.images.float() / 255
    expected = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert seen.mean(dim=(0, 2, 3)) == pytest.approx(expected.mean(dim=(0, 2, 3)).tolist(), abs=1e-4)
    assert seen.std(dim=(0, 2, 3)) == pytest.approx(expected.std(dim=(0, 2, 3)).tolist(), abs=1e-4)
    # an own model sees today's [-1, 1] input, unchanged
    own = create_model("tiny_cnn", 2, 3)
    own_inputs = _Inputs(own)
    fit(own, data, None, OptimParams(epochs=1, batch_size=32, augment=False), device=CPU, seed=0, progress=False)
    assert own_inputs.seen[0].sort(dim=0).values.equal(to_float(data.images).sort(dim=0).values)


def test_pyfunc_input_path_matches_torchvision_transforms(resnet_file: Path, tmp_path: Path) -> None:
    from mlflow.pyfunc import PythonModelContext
    from torchvision.models import ResNet18_Weights

    from tasks.adapters.pyfunc_model import MODEL_DIR_ARTIFACT, TransferPyfuncModel

    prep = weights_preprocessing("resnet18", resnet_file, channels=3, image_size=None)
    model = create_model("resnet18", 2, 3, weights=resnet_file, preprocessing=prep)
    meta = {"classes": ["a", "b"], "image_size": prep.image_size, "preprocessing": prep.to_meta()}
    model_dir = save_model_dir(model, tmp_path / "model", meta)
    assert json.loads((model_dir / "model.json").read_text())["preprocessing"]["source"] == prep.source
    loaded, _ = load_model_dir(model_dir)  # the normalisation is rebuilt from model.json
    assert loaded.preprocessing == prep

    pyfunc = TransferPyfuncModel()
    pyfunc.load_context(PythonModelContext({MODEL_DIR_ARTIFACT: str(model_dir)}, {}))
    inputs = _Inputs(pyfunc.predictor.model)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))  # not square
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    import pandas as pd

    pyfunc.predict(None, pd.DataFrame({"image": [buffer.getvalue()]}))
    reference = ResNet18_Weights.IMAGENET1K_V1.transforms()(image)  # (3, 224, 224)
    assert inputs.seen[0].shape == (1, 3, 224, 224)
    assert torch.allclose(inputs.seen[0][0], reference, atol=1e-4)


@pytest.fixture(scope="module")
def fonts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return prepare_source(DataParams(root=str(root), source=SourceData(n=400)), progress=False)


@pytest.mark.slow  # a second pytest process, two trainings
def test_split_over_the_memory_limit_trains_memory_mapped_like_in_memory(fonts_dir: Path) -> None:
    """In a fresh interpreter: a forked DataLoader worker died (exit 1) when this ran late in
    the whole suite's process, after the pipeline tests (not yet diagnosed; the product's
    default is in-process reads on a 1-2 core host)."""
    if os.environ.get("TRANSFER_TEST_CHILD") != "1":
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"{__file__}::test_split_over_the_memory_limit_trains_memory_mapped_like_in_memory"],
            env={**os.environ, "TRANSFER_TEST_CHILD": "1"}, capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return
    clear_memory_cache()
    in_memory = load_split(fonts_dir, "train", 16, 1, storage="auto", memory_mb=100)
    big = load_split(fonts_dir, "train", 16, 1, storage="auto", memory_mb=0.01)  # 10 kB limit
    assert not in_memory.mapped and big.mapped
    assert big.images.cpu().equal(in_memory.images) and big.labels.equal(in_memory.labels)
    assert list(fonts_dir.parent.joinpath(".cache").glob("*.mmap"))  # stored once, keyed
    val = load_split(fonts_dir, "val", 16, 1, storage="mmap", memory_mb=0.01)
    cfg = OptimParams(epochs=2, batch_size=32, lr=0.01)
    results = []
    for train, workers in ((in_memory, None), (big, 1)):  # 1 worker process reads the file
        torch.manual_seed(0)
        model = create_model("tiny_cnn", len(train.classes), 1)
        fit(model, train, val, cfg, device=CPU, seed=3, progress=False, loader_workers=workers)
        results.append((model, predict_proba(model, val, CPU)))
    (a, probs_a), (b, probs_b) = results
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert torch.equal(probs_a, probs_b)
    accuracy = (probs_a.argmax(1) == val.labels).float().mean().item()
    assert accuracy > 0.2  # it learned something (10 classes)


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from transfer.config import OptimParams
    from transfer.data import ImageTensors
    from transfer.data.mapped import MappedImages
    from transfer.train import fit, predict_proba

    folder = sys.argv[1]
    labels = torch.from_numpy(__import__("numpy").load(folder + "/labels.npy"))
    data = ImageTensors(MappedImages(folder + "/images.npy"), labels, ["a", "b"])
    model = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    cfg, cpu = OptimParams(epochs=1, batch_size=64, augment=True), torch.device("cpu")
    # warm-up on 256 images: the first steps' one-time allocations (autograd, optimiser,
    # allocator pools; ~170 MB here, whatever N) are not the split's
    small = data.subset(range(256))
    fit(model, small, None, cfg, device=cpu, seed=0, progress=False, loader_workers=0)
    predict_proba(model, small, cpu)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fit(model, data, None, cfg, device=cpu, seed=0, progress=False, loader_workers=0)
    predict_proba(model, data, cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak}))
""")


@pytest.mark.slow  # an epoch over a 147 MB split in a fresh interpreter
def test_peak_rss_of_an_epoch_over_a_mapped_split_stays_bounded(tmp_path: Path) -> None:
    n, shape = 12_000, (3, 64, 64)  # 147 MB decoded
    rng = np.random.default_rng(0)
    chunks = (rng.integers(0, 256, (1000, *shape), dtype=np.uint8) for _ in range(n // 1000))
    folder = mapped.write_split(tmp_path / "split.mmap", (n, *shape), chunks, np.arange(n) % 2, ["a", "b"])
    env = {"PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = rss["peak"] - rss["before"]
    split_bytes = n * int(np.prod(shape))
    # the batches' working memory only (float copies, augmentation): not the split
    assert grown < 48e6 < split_bytes / 3, f"peak RSS grew {grown / 1e6:.0f} MB over a {split_bytes / 1e6:.0f} MB split"


def test_preprocessing_meta_round_trip_and_old_models() -> None:
    prep = Preprocessing(224, 1, IMAGENET_MEAN, IMAGENET_STD, 256 / 224, True, "torchvision:X.Y")
    assert Preprocessing.from_meta({"preprocessing": json.loads(json.dumps(prep.to_meta()))}) == prep
    old = Preprocessing.from_meta({"image_size": 32, "in_channels": 1})  # saved before the record
    assert old.is_own and old.image_size == 32 and old.own() == old
