"""Domain-adversarial training (Ganin & Lempitsky): labelled source + unlabelled target."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from transfer.data import ImageTensors
from transfer.errors import TransferError
from transfer.strategies.registry import StrategyContext, StrategyResult, register_strategy
from transfer.techniques.dann import run_dann


def unlabelled_target(load_split: Callable[[str, str], ImageTensors]) -> ImageTensors:
    """Target images for domain adaptation, labels dropped: the ``unlabelled`` split when the
    dataset has one, else the whole target train pool (DANN never sees a target label)."""
    try:
        pool = load_split("target", "unlabelled")
    except TransferError:
        pool = None
    if pool is None or len(pool) == 0:
        pool = load_split("target", "train")
    return ImageTensors(pool.images, torch.full_like(pool.labels, -1), pool.classes)


@register_strategy("dann", needs_source_data=True,
                   description="domain-adversarial: labelled source data + unlabelled target images")
def dann(ctx: StrategyContext) -> StrategyResult:
    source = ctx.source_model()
    started = time.perf_counter()
    model, history = run_dann(
        source, ctx.load_split("source", "train"), unlabelled_target(ctx.load_split), ctx.splits["val"],
        ctx.params.finetune, ctx.device, ctx.params.runtime.seed, ctx.progress,
        checkpoint_dir=ctx.out_dir / "checkpoints",  # a crashed run resumes, as the freeze strategies do
    )
    return StrategyResult(model, history, time.perf_counter() - started)
