"""Fine-tuning strategies, one registry (``finetune.strategy`` names one of them, or ``auto``).

A strategy is a function ``run(ctx: StrategyContext) -> StrategyResult`` registered under
its name::

    @register_strategy("mine", description="what it trains, in one line")
    def mine(ctx: StrategyContext) -> StrategyResult: ...

A built-in one is a module in this package, imported below so that it registers itself
(and so that ``dvc.yaml``'s dep on this folder covers it); code elsewhere registers by
being imported before ``stages.finetune`` runs. ``transfer strategies`` lists them all.
"""

from transfer.strategies.registry import (
    AUTO,
    Strategy,
    StrategyContext,
    StrategyResult,
    get_strategy,
    register_strategy,
    run_technique,
    strategy_names,
    unregister_strategy,
)
# the built-in strategies: importing a module registers what it defines
from transfer.strategies import conservative, dann, freeze, multitask, progressive  # noqa: E402, F401

__all__ = [
    "AUTO", "Strategy", "StrategyContext", "StrategyResult", "get_strategy", "register_strategy",
    "run_technique", "strategy_names", "unregister_strategy",
]
