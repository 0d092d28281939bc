"""The strategy registry: names, lookups and errors (no training here; test_stages.py trains)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from flows.cli import composed
from transfer import freezing, stages
from transfer.config import params_from_dict
from transfer.errors import TransferError
from transfer.strategies import (
    AUTO,
    StrategyContext,
    StrategyResult,
    get_strategy,
    register_strategy,
    strategy_names,
    unregister_strategy,
)


def test_an_unknown_name_is_one_line_naming_every_known_one() -> None:
    with pytest.raises(TransferError) as caught:
        get_strategy("magic")
    message = str(caught.value)
    assert "\n" not in message and "'magic'" in message
    assert all(name in message for name in [AUTO, *strategy_names()])


def test_params_take_any_name_and_the_registry_rejects_unknown_ones() -> None:
    params = params_from_dict({"finetune": {"strategy": "magic"}})  # config does not import the registry
    with pytest.raises(TransferError, match="unknown finetune.strategy 'magic'"):
        stages.resolve_strategy(params)


def test_the_freeze_family_registers_every_freeze_strategy() -> None:
    assert set(freezing.STRATEGIES) <= set(strategy_names())
    assert get_strategy("dann").needs_source_data and not get_strategy("head").needs_source_data


def _noop(ctx: StrategyContext) -> StrategyResult:
    raise AssertionError("never run")


def _other(ctx: StrategyContext) -> StrategyResult:
    raise AssertionError("never run")


def test_register_and_unregister() -> None:
    register_strategy("noop_for_test", description="nothing")(_noop)
    try:
        assert get_strategy("noop_for_test").run is _noop
        with pytest.raises(ValueError, match="already registered by tests.unit.test_strategies._noop"):
            register_strategy("noop_for_test", description="again")(_other)
        register_strategy("noop_for_test", description="reloaded")(_noop)  # a module reload: no error
        assert get_strategy("noop_for_test").description == "reloaded"
    finally:
        unregister_strategy("noop_for_test")
    assert "noop_for_test" not in strategy_names()
    with pytest.raises(TransferError):
        get_strategy("noop_for_test")


@pytest.mark.parametrize("name", [AUTO, "two words", ""])
def test_reserved_or_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="identifier other than"):
        register_strategy(name, description="x")


def test_transfer_strategies_lists_every_registered_one() -> None:
    result = CliRunner().invoke(composed(), ["strategies"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    first_cells = {re.split(r"[\s│┃|]+", line.strip(" │┃|"))[0] for line in result.output.splitlines()}
    assert first_cells >= {AUTO, *strategy_names()}
    assert "source data too" in result.output  # dann's
