"""Freeze strategies: the source body with a new head; which blocks train is
:mod:`transfer.freezing`'s (``head``, ``last_k``, ``full``, ``gradual``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from transfer import freezing
from transfer.feature_cache import FeatureCache, train_head_cached
from transfer.strategies.registry import StrategyContext, StrategyResult, register_strategy
from transfer.techniques.gradual import GradualUnfreezing
from transfer.train import Callback, fit, seed_everything


def _fit_frozen(
    ctx: StrategyContext, *, body_lr_mult: float = 1.0, callbacks: Sequence[Callback] = ()
) -> StrategyResult:
    """New head (seeded init), ``freezing.apply_freeze(ctx.name)``, then ``fit`` on the target."""
    params, ft, train = ctx.params, ctx.params.finetune, ctx.splits["train"]
    model = ctx.source_model()
    seed_everything(params.runtime.seed)  # the new head's init is part of the result
    model.reset_classifier(len(train.classes))
    freezing.apply_freeze(model, ctx.name, last_k=ft.last_k)
    groups = freezing.param_groups(model, ft.lr, body_lr_mult=body_lr_mult, layer_decay=ft.layer_decay)
    result = fit(
        model, train, ctx.splits["val"], ft, device=ctx.device, seed=params.runtime.seed,
        param_groups=groups, callbacks=list(callbacks), checkpoint_dir=ctx.out_dir / "checkpoints",
        distributed_data_parallel=params.runtime.distributed, progress=ctx.progress,
        desc=f"finetune ({ctx.name})", loader_workers=params.data.loader_workers,
    )
    return StrategyResult.of_fit(model, result)


def _head_on_cached_features(ctx: StrategyContext) -> StrategyResult:
    """Frozen body: compute its features once per dataset version, train only the head on them.

    Same result as ``fit`` through the frozen body without augmentation (the body is
    deterministic in eval mode), at a fraction of the cost per epoch.
    """
    params = ctx.params
    model = ctx.source_model()
    seed_everything(params.runtime.seed)
    model.reset_classifier(len(ctx.splits["train"].classes))
    freezing.apply_freeze(model, "head")
    cache = FeatureCache(Path(params.data.root) / ".cache" / "features")
    started = time.perf_counter()
    history = train_head_cached(
        model, ctx.splits["train"], ctx.splits["val"], params.finetune, cache,
        ctx.target_version, params.runtime.seed, ctx.device,
    )
    return StrategyResult(model, history, time.perf_counter() - started)


@register_strategy("head", description="the new head only; body frozen, BatchNorm statistics fixed "
                   "(on cached body features when finetune.feature_cache)")
def head(ctx: StrategyContext) -> StrategyResult:
    return _head_on_cached_features(ctx) if ctx.params.finetune.feature_cache else _fit_frozen(ctx)


@register_strategy("last_k", description="the last finetune.last_k blocks + head")
def last_k(ctx: StrategyContext) -> StrategyResult:
    return _fit_frozen(ctx)


@register_strategy("full", description="every layer, body at lr x finetune.body_lr_mult")
def full(ctx: StrategyContext) -> StrategyResult:
    return _fit_frozen(ctx, body_lr_mult=ctx.params.finetune.body_lr_mult)


@register_strategy("gradual", description="head first, one more block every finetune.unfreeze_every "
                   "epochs, LR decayed per block (ULMFiT)")
def gradual(ctx: StrategyContext) -> StrategyResult:
    ft = ctx.params.finetune
    return _fit_frozen(ctx, callbacks=[GradualUnfreezing(ft.unfreeze_every, ft.lr, ft.layer_decay)])
