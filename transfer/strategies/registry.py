"""The strategy registry: a name -> one function that takes a :class:`StrategyContext`.

``stages.finetune`` builds the context (source model dir, target splits, device, ...) once
and looks the name up here; it knows no strategy by name. A strategy module registers its
functions with :func:`register_strategy` when it is imported (``transfer/strategies/__init__.py``
imports the built-in ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transfer.errors import TransferError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from transfer.config import Params
    from transfer.data import ImageTensors
    from transfer.models import TransferNet
    from transfer.preprocessing import Preprocessing
    from transfer.train import FitResult

AUTO = "auto"  # a params value, not a strategy: stages.resolve_strategy picks one by labels/class


@dataclass(frozen=True)
class StrategyContext:
    """What every strategy gets: the same inputs whichever strategy runs."""

    name: str  # the registered name (one function may serve several)
    params: Params
    source_model_dir: Path
    splits: Mapping[str, ImageTensors]  # target train (k labels per class), val, test
    prep: Preprocessing  # the source body's input preprocessing, which the splits use
    device: torch.device
    out_dir: Path  # checkpoints go under it
    progress: bool
    target_version: str  # the target dataset's version (cache keys)
    load_split: Callable[[str, str], ImageTensors]  # (dataset, split) -> tensors with ``prep``

    def source_model(self) -> TransferNet:
        """A fresh copy of the source model (each call loads it again)."""
        from transfer.models import load_model_dir

        model, _ = load_model_dir(self.source_model_dir)
        return model


@dataclass
class StrategyResult:
    """The trained model (maps images to target logits), its per-epoch history, the seconds
    training took, and ``meta``: extra ``model.json`` entries the loader needs for it."""

    model: nn.Module
    history: list[dict[str, Any]]
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_fit(cls, model: nn.Module, result: FitResult) -> StrategyResult:
        return cls(model, [stats.as_dict() for stats in result.history], result.seconds)


StrategyFn = Callable[[StrategyContext], StrategyResult]
# a technique in transfer/techniques/: (source model, TechniqueInputs) -> (model, history)
TechniqueFn = Callable[..., tuple["nn.Module", list[dict[str, Any]]]]


def run_technique(ctx: StrategyContext, technique: TechniqueFn) -> StrategyResult:
    """Run a technique on a fresh source model; its seconds exclude loading that model."""
    source = ctx.source_model()
    started = time.perf_counter()
    from transfer.techniques._common import TechniqueInputs

    model, history = technique(source, TechniqueInputs(
        ctx.splits["train"], ctx.splits["val"], ctx.params.finetune, ctx.device, ctx.params.runtime.seed,
        ctx.progress))
    return StrategyResult(model, history, time.perf_counter() - started)


@dataclass(frozen=True)
class Strategy:
    """One registry entry: what ``get_strategy`` returns and ``transfer strategies`` lists."""

    name: str
    run: StrategyFn
    description: str
    needs_source_data: bool = False  # reads the source dataset too (not only the source model)


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(
    name: str, *, description: str, needs_source_data: bool = False
) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: make ``fn(ctx) -> StrategyResult`` the strategy ``name``."""
    if name == AUTO or not name.isidentifier():
        raise ValueError(f"strategy name {name!r} must be an identifier other than {AUTO!r}")

    def register(fn: StrategyFn) -> StrategyFn:
        old = _REGISTRY.get(name)
        # two functions claiming one name: a silent shadow would run the wrong one (the same
        # function again is a module reload)
        if old is not None and _where(old.run) != _where(fn):
            raise ValueError(f"strategy {name!r} is already registered by {_where(old.run)}")
        _REGISTRY[name] = Strategy(name, fn, description, needs_source_data)
        return fn

    return register


def _where(fn: StrategyFn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def unregister_strategy(name: str) -> None:
    """Remove ``name`` (tests that register a strategy of their own clean up with this)."""
    _REGISTRY.pop(name, None)


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    if name not in _REGISTRY:
        raise TransferError(
            f"unknown finetune.strategy {name!r}; known: {', '.join([AUTO, *strategy_names()])}"
        )
    return _REGISTRY[name]
