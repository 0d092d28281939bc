"""Conservative training: full fine-tuning kept close to the source model."""

from __future__ import annotations

from transfer.strategies.registry import (
    StrategyContext, StrategyResult, register_strategy, run_technique,
)
from transfer.techniques.conservative import run_distill, run_l2sp


@register_strategy("l2sp", description="every layer, weights pulled towards the source's (L2-SP)")
def l2sp(ctx: StrategyContext) -> StrategyResult:
    return run_technique(ctx, run_l2sp)


@register_strategy("distill",
                   description="every layer, source-task outputs kept by distillation (LwF)")
def distill(ctx: StrategyContext) -> StrategyResult:
    return run_technique(ctx, run_distill)
