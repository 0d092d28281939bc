"""Freeze strategies: which pretrained blocks train, and at which learning rate.

The rule of thumb: few target labels -> freeze the pretrained body and train only the
new head; more labels -> also unfreeze the last block(s); lots of labels -> fine-tune
everything from the pretrained weights (the body at a smaller learning rate). Frozen
blocks have ``requires_grad=False``, are left out of the optimizer and stay in eval mode
(``TransferNet.train``), so their BatchNorm statistics do not move either.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from transfer.errors import TransferError
from transfer.models import TransferNet, is_frozen

STRATEGIES = ("head", "last_k", "full", "gradual")


def choose_strategy(
    labels_per_class: int, head_max: int, last_k_max: int, above: str = "full",
) -> tuple[str, str]:
    """``auto``: <= head_max labels/class -> head, <= last_k_max -> last_k, more -> ``above``
    (``full``, or ``gradual``: unfreeze from the top, one block at a time)."""
    if head_max > last_k_max:
        raise TransferError(
            f"auto_head_max={head_max} must not exceed auto_last_k_max={last_k_max}"
        )
    k = labels_per_class
    if k <= head_max:
        return "head", (
            f"{k} labels/class <= auto_head_max={head_max}: too few to move the body, "
            "so freeze the pretrained body and train only the new head"
        )
    if k <= last_k_max:
        return "last_k", (
            f"{head_max} < {k} labels/class <= auto_last_k_max={last_k_max}: enough to adapt "
            "the last block(s) on top of the frozen early layers"
        )
    if above == "gradual":
        return "gradual", (
            f"{k} labels/class > auto_last_k_max={last_k_max}: enough labels to adapt every layer, "
            "unfrozen gradually from the top (auto_above=gradual)"
        )
    return "full", (
        f"{k} labels/class > auto_last_k_max={last_k_max}: plenty of labels, so fine-tune "
        "every layer starting from the pretrained weights"
    )


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def _check_k(model: TransferNet, k: int, what: str) -> None:
    n = len(model.blocks)
    if not 0 <= k <= n:
        names = ", ".join(model.block_names)
        raise TransferError(f"{what}={k} but {model.arch} has {n} blocks ({names})")


def apply_freeze(model: TransferNet, strategy: str, last_k: int = 1) -> None:
    """Set ``requires_grad`` per strategy; frozen blocks switch to eval mode at once."""
    if strategy not in STRATEGIES:
        raise TransferError(f"unknown freeze strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    _set_trainable(model, True)
    if strategy in ("head", "gradual"):
        _set_trainable(model.body, False)
    elif strategy == "last_k":
        if last_k < 1:
            raise TransferError(f"last_k must be >= 1, got {last_k}")
        _check_k(model, last_k, "last_k")
        _set_trainable(model.body, False)
        unfreeze_top(model, last_k)
    model.train(model.training)  # re-apply: frozen blocks to eval, trainable ones follow the model


def unfreeze_top(model: TransferNet, n_blocks: int) -> None:
    """Gradual unfreezing: make the top ``n_blocks`` body blocks (and the head) trainable."""
    _check_k(model, n_blocks, "n_blocks")
    _set_trainable(model.head, True)
    for block in model.blocks[len(model.blocks) - n_blocks:]:
        _set_trainable(block, True)
        block.train(model.training)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def block_lr(lr: float, distance: int, body_lr_mult: float = 1.0, layer_decay: float = 1.0) -> float:
    """The discriminative LR of the body block ``distance`` from the top (top block = 1)."""
    return lr * body_lr_mult * layer_decay**distance


def param_groups(
    model: TransferNet, lr: float, body_lr_mult: float = 1.0, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer groups of trainable params only: head at ``lr``, body block at distance d
    from the top (top block d=1) at ``lr * body_lr_mult * layer_decay**d``."""
    groups: list[dict[str, Any]] = []
    head = _trainable(model.head)
    if head:
        groups.append({"name": "head", "params": head, "lr": lr})
    seen = {id(p) for p in head}
    pairs = list(zip(model.block_names, model.blocks))
    for distance, (name, block) in enumerate(reversed(pairs), start=1):
        params = _trainable(block)
        seen.update(id(p) for p in params)
        if params:
            groups.append({"name": f"body.{name}", "params": params,
                           "lr": block_lr(lr, distance, body_lr_mult, layer_decay)})
    rest = [p for p in _trainable(model) if id(p) not in seen]  # modules outside head/blocks
    if rest:
        groups.append({"name": "other", "params": rest, "lr": lr})
    return groups


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def trainable_summary(model: TransferNet) -> dict[str, Any]:
    """JSON-able: trainable/total params and which blocks are frozen."""
    trainable, total = _count(_trainable(model)), _count(model.parameters())
    names, blocks = model.block_names, model.blocks
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": round(trainable / total, 6) if total else 0.0,
        "blocks": names,
        "frozen_blocks": [n for n, b in zip(names, blocks) if is_frozen(b)],
        "trainable_blocks": [n for n, b in zip(names, blocks) if not is_frozen(b)],
        "head_trainable": bool(_trainable(model.head)),
    }
