"""Gradual unfreezing with discriminative learning rates (ULMFiT: Howard & Ruder 2018).

Training starts with the body frozen (head only); every ``every_n_epochs`` epochs the next
block from the top is unfrozen and joins the optimizer as its own param group with a
smaller learning rate: ``lr * layer_decay ** depth`` (depth 1 = the top block).
"""

from __future__ import annotations

import torch
from torch import nn

from transfer import freezing
from transfer.errors import TransferError
from transfer.train import Callback


def blocks_unfrozen_at(epoch: int, every_n_epochs: int, n_blocks: int) -> int:
    """How many top blocks are trainable during ``epoch`` (1-based): 0 for the first N epochs."""
    return min((epoch - 1) // every_n_epochs, n_blocks)


class GradualUnfreezing(Callback):
    """Callback for :func:`transfer.train.fit`: unfreeze one more top block every N epochs.

    At the start of epoch ``e`` the top ``(e - 1) // every_n_epochs`` blocks of
    ``model.blocks`` are trainable. Each newly unfrozen block is added to the optimizer as
    a param group named ``body.<block name>`` with ``initial_lr = lr * layer_decay ** depth``;
    its current ``lr`` is that value scaled by where the LR schedule of group 0 stands
    (``lr / initial_lr`` of group 0), so a block unfrozen late does not jump to a large LR.

    BatchNorm: a frozen block stays in eval mode (``TransferNet.train`` keeps blocks whose
    parameters are all frozen in eval), so its running mean/var stay those of the source.
    Once unfrozen, the block follows ``model.train()`` like any trainable module: its BN
    layers leave eval mode and update their statistics on target batches.

    The hook is a pure function of the epoch number, so the replay that ``fit`` performs
    when it resumes from a checkpoint rebuilds the same param groups.
    """

    def __init__(self, every_n_epochs: int, lr: float, layer_decay: float = 1.0) -> None:
        if every_n_epochs < 1:
            raise TransferError(f"unfreeze_every must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.lr, self.layer_decay = float(lr), float(layer_decay)

    def block_lr(self, depth: int) -> float:
        return freezing.block_lr(self.lr, depth, layer_decay=self.layer_decay)

    def on_epoch_start(
        self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        blocks = list(model.blocks)
        n = blocks_unfrozen_at(epoch, self.every_n_epochs, len(blocks))
        if n == 0:
            return
        freezing.unfreeze_top(model, n)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for depth in range(1, n + 1):
            new = [
                p for p in blocks[-depth].parameters()
                if p.requires_grad and id(p) not in in_optimizer
            ]
            if new:
                names = getattr(model, "block_names", None)
                name = f"body.{names[-depth]}" if names else f"block-{depth}"
                self._add_group(optimizer, new, depth, name)
                in_optimizer.update(id(p) for p in new)

    def _add_group(
        self, optimizer: torch.optim.Optimizer, params: list, depth: int, name: str
    ) -> None:
        first = optimizer.param_groups[0]
        initial_first = first.get("initial_lr", first["lr"])
        schedule = first["lr"] / initial_first if initial_first else 1.0
        initial = self.block_lr(depth)
        optimizer.add_param_group(
            {"params": params, "lr": initial * schedule, "initial_lr": initial, "name": name}
        )
