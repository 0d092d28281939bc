"""Frozen-feature cache: same head as training through the frozen body, computed once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from transfer import freezing
from transfer.config import FinetuneParams
from transfer.data import ImageTensors
from transfer.feature_cache import (
    FeatureCache,
    body_sha256,
    compute_features,
    data_fingerprint,
    feature_key,
    train_head_cached,
    train_head_on_features,
)
from transfer.models import TransferNet, create_model
from transfer.train import fit, seed_everything

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_data(n_per: int, seed: int, classes: int = 3, size: int = 12) -> ImageTensors:
    """Class k = a bright horizontal band k, plus noise."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k in range(classes):
        for _ in range(n_per):
            img = torch.rand(1, size, size, generator=g) * 80
            img[:, k * size // classes:k * size // classes + 3, :] += 150
            images.append(img.clamp(0, 255))
            labels.append(k)
    return ImageTensors(torch.stack(images).to(torch.uint8), torch.tensor(labels),
                        [str(k) for k in range(classes)])


def frozen_model(dropout: float = 0.0) -> TransferNet:
    seed_everything(0)
    model = create_model("tiny_cnn", 3)
    model.drop = nn.Dropout(dropout)
    freezing.apply_freeze(model, "head")
    return model


class CountCalls:
    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.n += 1


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cached_head_training_equals_training_through_the_frozen_body(tmp_path, dropout):
    train, val = tiny_data(8, 0), tiny_data(4, 1)
    cfg = FinetuneParams(epochs=4, batch_size=8, lr=1e-2, weight_decay=1e-3, label_smoothing=0.1,
                         augment=False)
    through = frozen_model(dropout)
    cached = copy.deepcopy(through)
    result = fit(through, train, val, cfg, device=CPU, seed=3,
                 param_groups=freezing.param_groups(through, cfg.lr), progress=False)
    cache = FeatureCache(tmp_path)
    history = train_head_cached(cached, train, val, cfg, cache, "data-v1", seed=3, device=CPU)
    for a, b in zip(through.head.parameters(), cached.head.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert [h["val_acc"] for h in history] == [s.val_acc for s in result.history]
    for h, s in zip(history, result.history, strict=True):
        assert h["train_loss"] == pytest.approx(s.train_loss, abs=1e-5)
        assert h["lr"] == pytest.approx(s.lr)
    assert torch.equal(through.body.state_dict()["stages.block1.1.running_mean"],
                       cached.body.state_dict()["stages.block1.1.running_mean"])


def test_second_call_hits_the_cache_without_running_the_body(tmp_path):
    model, data = frozen_model(), tiny_data(4, 0)
    calls = CountCalls(model.body)
    cache = FeatureCache(tmp_path / "features")
    key = feature_key("data-v1", body_sha256(model.body), "train")
    first = cache.get_or_compute(model.body, data, key, CPU, batch_size=5)
    assert first.shape == (12, model.feature_dim) and calls.n == 3 and cache.misses == 1
    second = FeatureCache(tmp_path / "features").get_or_compute(model.body, data, key, CPU)
    assert torch.equal(first, second) and calls.n == 3  # read from disk, body not run
    assert cache.path(key).suffix == ".pt"
    assert [p.name for p in (tmp_path / "features").iterdir()] == [cache.path(key).name]
    assert torch.allclose(first, compute_features(model.body, data, CPU), atol=1e-6)


def test_key_follows_the_weights_the_data_and_the_split(tmp_path):
    model, data = frozen_model(), tiny_data(4, 0)
    sha = body_sha256(model.body)
    key = feature_key("data-v1", sha, "train")
    assert key != feature_key("data-v1", sha, "val") != feature_key("data-v2", sha, "val")
    with torch.no_grad():
        model.body.stages.block1[0].weight.add_(0.01)
    assert body_sha256(model.body) != sha
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(model.body, data, key, CPU)
    new_key = feature_key("data-v1", body_sha256(model.body), "train")
    cache.get_or_compute(model.body, data, new_key, CPU)
    assert (cache.hits, cache.misses) == (0, 2)
    assert data_fingerprint(data) != data_fingerprint(data.subset([0, 1, 2]))


def test_unreadable_or_foreign_files_are_recomputed(tmp_path):
    model, data = frozen_model(), tiny_data(2, 0)
    cache = FeatureCache(tmp_path)
    cache.path("k").write_bytes(b"not a torch file")
    feats = cache.get_or_compute(model.body, data, "k", CPU)
    assert cache.misses == 1
    # a stored file for the same key but another number of images is not trusted
    cache.get_or_compute(model.body, tiny_data(3, 0), "k", CPU)
    assert cache.misses == 2
    loaded = torch.load(cache.path("k"), weights_only=True)
    assert loaded["key"] == "k" and loaded["features"].shape[0] == 9 and feats.shape[0] == 6


def test_head_training_rejects_mismatched_rows():
    head = nn.Linear(4, 2)
    cfg = FinetuneParams(epochs=1, augment=False)
    with pytest.raises(Exception, match="feature rows"):
        train_head_on_features(head, torch.zeros(3, 4), torch.zeros(2).long(), None, None, cfg, 0)
