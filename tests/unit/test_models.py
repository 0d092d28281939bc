"""Backbone zoo: head surgery, weight loading (local files only), model dirs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from transfer.errors import TransferError
from transfer.models import (
    TransferNet,
    create_model,
    list_archs,
    load_model_dir,
    save_model_dir,
    weights_sha256,
)

TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0"]


def _body_state(model: TransferNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("body.")}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("arch", list_archs())
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_arch_runs_on_small_images(arch: str, in_channels: int) -> None:
    model = create_model(arch, 7, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, model.feature_dim)
    assert model.head.in_features == model.feature_dim and model.head.out_features == 7
    assert (model.arch, model.num_classes, model.in_channels) == (arch, 7, in_channels)
    assert len(model.blocks) == len(model.block_names) >= 2
    body_params = {id(p) for p in model.body.parameters()}
    block_params = {id(p) for b in model.blocks for p in b.parameters()}
    assert body_params == block_params  # freezing the blocks freezes the whole body


def test_resnet18_blocks_are_stem_and_layers() -> None:
    model = create_model("resnet18", 10)
    assert model.block_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert isinstance(model.blocks[0].conv1, nn.Conv2d) and model.blocks[0].conv1.in_channels == 1


def test_unknown_arch_lists_known_ones() -> None:
    with pytest.raises(TransferError, match="known archs: .*small_cnn"):
        create_model("vgg99", 10)


def test_reset_classifier_gives_fresh_head_and_keeps_body() -> None:
    model = create_model("small_cnn", 10)
    body = _body_state(model)
    old_head = model.head
    model.reset_classifier(3)
    assert model.head is not old_head
    assert model.head.out_features == 3 and model.head.in_features == model.feature_dim
    assert model.num_classes == 3
    _assert_same(body, _body_state(model))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    torch.manual_seed(1)
    other = create_model("small_cnn", 10)
    other.reset_classifier(3)
    assert not torch.equal(model.head.weight, other.head.weight)  # randomly initialised


def test_load_raw_torchvision_resnet18_file(tmp_path) -> None:
    from torchvision.models import resnet18

    source = resnet18(weights=None)  # 3-channel, 1000 classes, as torchvision saves it
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", 10, in_channels=3, weights=path)
    assert torch.equal(model.body.stages.stem.conv1.weight, source.conv1.weight)
    ours_bn, their_bn = model.body.stages.layer4[1].bn2, source.layer4[1].bn2
    assert torch.equal(ours_bn.running_var, their_bn.running_var)
    assert model.head.out_features == 10  # 1000-class source head dropped
    source.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval().features(x), source.eval()(x), atol=1e-5)


def test_grey_input_sums_rgb_filters(tmp_path) -> None:
    from torchvision.models import resnet18

    source = resnet18(weights=None).eval()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = create_model("resnet18", 10, in_channels=1, weights=tmp_path / "r18.pth").eval()
    assert model.body.stages.stem.conv1.weight.shape == (64, 1, 7, 7)
    summed = source.conv1.weight.sum(dim=1, keepdim=True)  # (64, 1, 7, 7)
    assert torch.allclose(model.body.stages.stem.conv1.weight, summed)
    grey = torch.randn(2, 1, 32, 32)
    source.fc = nn.Identity()
    # a grey image repeated over RGB gives the same features as the adapted 1-channel net
    assert torch.allclose(model.features(grey), source(grey.repeat(1, 3, 1, 1)), atol=1e-4)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0"])
def test_load_raw_torchvision_other_archs(arch: str, tmp_path) -> None:
    from torchvision import models

    source = models.get_model(arch, weights=None)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = create_model(arch, 4, in_channels=3, weights=tmp_path / "w.pth")
    ours = model.state_dict()
    mapping = model._torchvision_keys
    theirs = source.state_dict()
    assert set(mapping) == set(theirs)  # every torchvision tensor has a home
    for key, value in theirs.items():
        if not mapping[key].startswith("head."):
            assert torch.equal(ours[mapping[key]], value), key


def test_same_class_count_keeps_source_head(tmp_path) -> None:
    from torchvision.models import resnet18

    source = resnet18(weights=None, num_classes=5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = create_model("resnet18", 5, in_channels=3, weights=tmp_path / "w.pt")
    assert torch.equal(model.head.weight, source.fc.weight)


def test_load_transfernet_state_dict_and_checkpoint(tmp_path) -> None:
    source = create_model("small_cnn", 10)
    torch.save(source.state_dict(), tmp_path / "ours.pt")
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    for name in ("ours.pt", "ckpt.pt"):
        model = create_model("small_cnn", 4, weights=tmp_path / name)
        _assert_same(_body_state(source), _body_state(model))
        assert model.head.out_features == 4


def test_weights_of_another_arch_are_rejected(tmp_path) -> None:
    torch.save(create_model("tiny_cnn", 10).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(TransferError, match="do not fit arch small_cnn"):
        create_model("small_cnn", 10, weights=tmp_path / "tiny.pt")


def test_missing_or_corrupt_weights_file(tmp_path) -> None:
    with pytest.raises(TransferError, match="does not exist"):
        create_model("small_cnn", 10, weights=tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TransferError, match="cannot read weights file"):
        create_model("small_cnn", 10, weights=tmp_path / "bad.pt")


def test_hub_without_cache_is_a_clear_error_and_downloads_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    missing = r"resnet18-f37072fd\.pth is missing; nothing is downloaded"
    with pytest.raises(TransferError, match=missing):
        create_model("resnet18", 10, weights="hub")
    assert not any(tmp_path.rglob("*.pth"))
    with pytest.raises(TransferError, match="torchvision arch"):
        create_model("small_cnn", 10, weights="hub")


def test_hub_reads_the_cached_torchvision_file(tmp_path, monkeypatch) -> None:
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    source = resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = create_model("resnet18", 10, in_channels=3, weights="hub")
    assert torch.equal(model.body.stages.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_weights_sha256_is_stable_over_key_order(tmp_path) -> None:
    state = create_model("tiny_cnn", 3).state_dict()
    reordered = dict(reversed(list(state.items())))
    assert weights_sha256(state) == weights_sha256(reordered)
    changed = {k: v.clone() for k, v in state.items()}
    changed["head.bias"][0] += 1
    assert weights_sha256(changed) != weights_sha256(state)
    path = tmp_path / "w.pt"
    path.write_bytes(b"abc")
    sha_abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert weights_sha256(path) == sha_abc


def test_save_load_round_trip(tmp_path) -> None:
    model = create_model("small_cnn", 10).eval()
    x = torch.randn(3, 1, 32, 32)
    target = tmp_path / "models" / "m"
    save_model_dir(model, target, {"classes": list("abcdefghij"), "image_size": 32})
    loaded, meta = load_model_dir(target)
    assert torch.equal(loaded(x), model(x))
    assert meta["arch"] == "small_cnn" and meta["num_classes"] == 10 and meta["in_channels"] == 1
    assert meta["classes"] == list("abcdefghij")
    assert meta["weights_sha256"] == weights_sha256(model.state_dict())
    assert json.loads((target / "model.json").read_text()) == meta


def test_save_replaces_existing_dir_without_leftovers(tmp_path) -> None:
    target = tmp_path / "m"
    save_model_dir(create_model("tiny_cnn", 2), target, {"version": 1})
    save_model_dir(create_model("tiny_cnn", 5), target, {"version": 2})
    _, meta = load_model_dir(target)
    assert meta["version"] == 2 and meta["num_classes"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "model.pt"]


def test_failed_save_keeps_previous_model(tmp_path, monkeypatch) -> None:
    target = tmp_path / "m"
    save_model_dir(create_model("tiny_cnn", 2), target, {"version": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(create_model("tiny_cnn", 2), target, {"version": 2})
    monkeypatch.undo()
    assert load_model_dir(target)[1]["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_model_dir_errors(tmp_path) -> None:
    with pytest.raises(TransferError, match="does not exist"):
        load_model_dir(tmp_path / "missing")
    target = tmp_path / "m"
    save_model_dir(create_model("tiny_cnn", 2), target, {})
    (target / "model.json").write_text("{not json")
    with pytest.raises(TransferError, match="corrupt"):
        load_model_dir(target)
    save_model_dir(create_model("tiny_cnn", 2), target, {})
    (target / "model.pt").write_bytes(b"garbage")
    with pytest.raises(TransferError, match="cannot read"):
        load_model_dir(target)
    save_model_dir(create_model("tiny_cnn", 2), target, {})
    (target / "model.pt").unlink()
    with pytest.raises(TransferError, match="model.pt is missing"):
        load_model_dir(target)


def test_tampered_weights_are_detected(tmp_path) -> None:
    target = tmp_path / "m"
    save_model_dir(create_model("tiny_cnn", 2), target, {})
    state = torch.load(target / "model.pt", weights_only=True)
    state["head.bias"] += 1
    torch.save(state, target / "model.pt")
    with pytest.raises(TransferError, match="does not match the weights_sha256"):
        load_model_dir(target)
