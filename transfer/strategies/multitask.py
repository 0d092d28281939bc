"""Multi-task fine-tuning: the target classes plus an auxiliary head (digit parity)."""

from __future__ import annotations

from transfer.strategies.registry import (
    StrategyContext, StrategyResult, register_strategy, run_technique,
)
from transfer.techniques.multitask import run_multitask


@register_strategy("multitask", description="every layer, class head + auxiliary parity head")
def multitask(ctx: StrategyContext) -> StrategyResult:
    return run_technique(ctx, run_multitask)
