"""Freezing really freezes: no grads, not in the optimizer, weights and BN stats unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfer.errors import TransferError
from transfer.freezing import (
    apply_freeze,
    choose_strategy,
    param_groups,
    trainable_summary,
    unfreeze_top,
)
from transfer.models import TransferNet, create_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _train_steps(model: TransferNet, groups: list[dict], steps: int = 3) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 1, 32, 32) * 3 + 1, torch.randint(0, 4, (8,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return optimizer


def _optimizer_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _assert_frozen(block: nn.Module, before: dict[str, torch.Tensor], optimizer) -> None:
    assert not block.training  # eval mode: BN uses and keeps its running stats
    in_optimizer = _optimizer_ids(optimizer)
    for param in block.parameters():
        assert not param.requires_grad and param.grad is None and id(param) not in in_optimizer
    after = block.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # weights AND running_mean/var/num_batches


def _assert_changed(block: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = block.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_head_strategy_trains_only_the_head(arch: str) -> None:
    model = create_model(arch, 4)
    apply_freeze(model, "head")
    blocks_before = [_snapshot(b) for b in model.blocks]
    head_before = _snapshot(model.head)
    groups = param_groups(model, lr=0.01)
    assert [g["name"] for g in groups] == ["head"]
    optimizer = _train_steps(model, groups)
    for block, before in zip(model.blocks, blocks_before):
        _assert_frozen(block, before, optimizer)
    _assert_changed(model.head, head_before)
    assert model.head.training


def test_last_k_unfreezes_the_top_blocks() -> None:
    model = create_model("small_cnn", 4)
    apply_freeze(model, "last_k", last_k=2)
    before = [_snapshot(b) for b in model.blocks]
    groups = param_groups(model, lr=0.01)
    assert [g["name"] for g in groups] == ["head", "body.block4", "body.block3"]
    optimizer = _train_steps(model, groups)
    for block, snap in zip(model.blocks[:2], before[:2]):
        _assert_frozen(block, snap, optimizer)
    for block, snap in zip(model.blocks[2:], before[2:]):
        assert block.training
        _assert_changed(block, snap)  # weights and BN running stats move


def test_last_k_larger_than_the_body_is_an_error() -> None:
    model = create_model("small_cnn", 4)
    with pytest.raises(TransferError, match="last_k=5 but small_cnn has 4 blocks"):
        apply_freeze(model, "last_k", last_k=5)
    with pytest.raises(TransferError, match="unknown freeze strategy"):
        apply_freeze(model, "most")


def test_full_trains_everything_with_a_smaller_body_lr() -> None:
    model = create_model("small_cnn", 4)
    apply_freeze(model, "head")
    apply_freeze(model, "full")  # re-applying resets earlier freezing
    assert all(p.requires_grad for p in model.parameters())
    groups = param_groups(model, lr=0.01, body_lr_mult=0.1)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] == 0.01
    assert all(lrs[f"body.block{i}"] == pytest.approx(0.001) for i in range(1, 5))
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == len(list(model.parameters()))
    model.train()
    assert all(m.training for m in model.modules())


def test_layer_decay_lowers_lr_with_depth() -> None:
    model = create_model("small_cnn", 4)
    apply_freeze(model, "full")
    groups = param_groups(model, lr=1.0, body_lr_mult=0.5, layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in groups}
    # head at lr; the top block is at distance 1: 1.0 * 0.5 * 0.5**1, then halving per block
    expected = {"head": 1.0, "body.block4": 0.25, "body.block3": 0.125,
                "body.block2": 0.0625, "body.block1": 0.03125}
    assert lrs == pytest.approx(expected)


def test_gradual_starts_as_head_then_unfreezes_from_the_top() -> None:
    model = create_model("resnet18", 4)
    apply_freeze(model, "gradual")
    model.train()
    assert trainable_summary(model)["frozen_blocks"] == model.block_names
    unfreeze_top(model, 1)
    assert model.blocks[-1].training  # follows the model's train mode at once
    summary = trainable_summary(model)
    assert summary["trainable_blocks"] == ["layer4"]
    unfreeze_top(model, 3)
    assert trainable_summary(model)["frozen_blocks"] == ["stem", "layer1"]
    names = [g["name"] for g in param_groups(model, 0.1)]
    assert names == ["head", "body.layer4", "body.layer3", "body.layer2"]
    with pytest.raises(TransferError):
        unfreeze_top(model, 6)


def test_frozen_batchnorm_stats_survive_train_mode_forwards() -> None:
    model = create_model("mobilenet_v3_small", 4)
    apply_freeze(model, "last_k", last_k=1)  # only the neck (a Linear) trains
    frozen = [_snapshot(b) for b in model.blocks[:-1]]
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, 32, 32) * 5 + 2)
    for block, snap in zip(model.blocks[:-1], frozen):
        after = block.state_dict()
        assert all(torch.equal(after[k], v) for k, v in snap.items())


def test_trainable_summary_counts() -> None:
    model = create_model("small_cnn", 4)
    apply_freeze(model, "head")
    summary = trainable_summary(model)
    head_params = sum(p.numel() for p in model.head.parameters())
    assert summary["trainable_params"] == head_params
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    assert summary["frozen_blocks"] == ["block1", "block2", "block3", "block4"]
    assert summary["head_trainable"] is True


@pytest.mark.parametrize(
    ("labels", "expected"),
    [(1, "head"), (10, "head"), (11, "last_k"), (50, "last_k"), (51, "full"), (1000, "full")],
)
def test_auto_rule_at_the_boundaries(labels: int, expected: str) -> None:
    strategy, reason = choose_strategy(labels, head_max=10, last_k_max=50)
    assert strategy == expected
    assert str(labels) in reason and ("10" in reason or "50" in reason)


def test_auto_rule_rejects_inverted_thresholds() -> None:
    with pytest.raises(TransferError, match="must not exceed"):
        choose_strategy(5, head_max=60, last_k_max=50)


def test_auto_defaults_follow_the_validation_ranking() -> None:
    """Defaults (from the benchmark's val ranking): last_k at k <= 1, gradual above."""
    from transfer.config import FinetuneParams

    ft = FinetuneParams()
    pick = {k: choose_strategy(k, ft.auto_head_max, ft.auto_last_k_max, ft.auto_above)[0] for k in (1, 5, 50)}
    assert pick == {1: "last_k", 5: "gradual", 50: "gradual"}
    assert choose_strategy(50, 0, 1, "full")[0] == "full"
