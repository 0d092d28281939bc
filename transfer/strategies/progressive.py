"""Progressive networks: a new target column next to the frozen source column."""

from __future__ import annotations

from transfer.strategies.registry import (
    StrategyContext, StrategyResult, register_strategy, run_technique,
)
from transfer.techniques.progressive import run_progressive


@register_strategy("progressive",
                   description="a new target column + lateral adapters beside the frozen source")
def progressive(ctx: StrategyContext) -> StrategyResult:
    result = run_technique(ctx, run_progressive)
    source = result.model.source
    # the loader rebuilds the net from its source column's arch (transfer.models.load_model_dir)
    result.model.arch, result.model.in_channels = source.arch, source.in_channels
    result.meta = {"technique": "progressive", "num_source_classes": source.num_classes}
    return result
