"""Great Expectations plumbing for the validation stage.

One ephemeral GX context per process (created on first use, progress bars off), one
pandas data source with a whole-dataframe batch definition per table kind, and
``run_suite`` which validates one pandas frame against one expectation suite and hands
back, per expectation, GX's own result with the failing rows identified by index
columns (file paths, class names), so the report can say *which* files failed.

GX is imported lazily: importing ``tasks.validate`` (and so the flow modules) stays
cheap, and only a validation run pays GX's import time (a few seconds).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

MAX_FAILING_ROWS = 20
_DATASOURCE = "transfer"
_BATCH = "whole"

_lock = threading.RLock()
_context: Any = None
_batch_definitions: dict[str, Any] = {}


def gx_module() -> Any:
    """``great_expectations`` itself (imported on first use)."""
    import great_expectations as gx

    return gx


def expectations() -> Any:
    """``great_expectations.expectations`` (the ``Expect...`` classes)."""
    return gx_module().expectations


def _get_context() -> Any:
    global _context
    if _context is None:
        gx = gx_module()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        gx_logger = logging.getLogger("great_expectations")
        if gx_logger.level == logging.NOTSET:
            gx_logger.setLevel(logging.WARNING)
        # this GX module pins its own logger to INFO and announces a temporary docs dir
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
        context = gx.get_context(mode="ephemeral")
        # GX draws a tqdm "Calculating Metrics" bar per validation unless told not to.
        context.variables.progress_bars = ProgressBarsConfig(
            globally=False, metric_calculations=False
        )
        context.data_sources.add_pandas(_DATASOURCE)
        _context = context
    return _context


def _batch_definition(table: str) -> Any:
    """A whole-dataframe batch definition for ``table`` (one data asset per table kind)."""
    if table not in _batch_definitions:
        datasource = _get_context().data_sources.get(_DATASOURCE)
        asset = datasource.add_dataframe_asset(table)
        _batch_definitions[table] = asset.add_batch_definition_whole_dataframe(_BATCH)
    return _batch_definitions[table]


@dataclass
class Check:
    """One expectation plus how to explain it to a person.

    ``describe`` turns one failing row (a dict holding the expectation's column and the
    suite's index columns) into a line of the report; ``severity`` is "error" (fails the
    gate) or "warning" (reported only). It is mirrored into GX's own ``severity`` field.
    """

    expectation: Any
    title: str
    describe: Callable[[dict[str, Any]], str] | None = None
    severity: str = "error"
    column: str | None = None


@dataclass
class CheckResult:
    check: Check
    success: bool
    result: dict[str, Any]
    exception: str | None


def _exception_message(info: Any) -> str | None:
    """GX nests exception info per metric when a metric fails; find the first message."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception") and info.get("exception_message"):
        return str(info["exception_message"])
    for value in info.values():
        message = _exception_message(value)
        if message:
            return message
    return None


def run_suite(
    suite_name: str,
    table: str,
    frame: pd.DataFrame,
    checks: Sequence[Check],
    index_columns: Sequence[str],
) -> list[CheckResult]:
    """Validate ``frame`` against a suite made of ``checks``; results in ``checks`` order."""
    if not checks:
        return []
    with _lock:
        gx = gx_module()
        from great_expectations.expectations.metadata_types import FailureSeverity

        _get_context()  # suites need the active context (GX's "current project")

        suite = gx.ExpectationSuite(name=suite_name)
        for i, check in enumerate(checks):
            check.expectation.meta = {"check_index": i, "title": check.title}
            check.expectation.severity = (
                FailureSeverity.CRITICAL if check.severity == "error" else FailureSeverity.WARNING
            )
            suite.add_expectation(check.expectation)
        batch = _batch_definition(table).get_batch(batch_parameters={"dataframe": frame})
        result_format = {
            "result_format": "SUMMARY",
            "partial_unexpected_count": MAX_FAILING_ROWS,
            "unexpected_index_column_names": list(index_columns),
        }
        suite_result = batch.validate(suite, result_format=result_format)
    by_index: dict[int, CheckResult] = {}
    for item in suite_result.results:
        index = int((item.expectation_config.meta or {}).get("check_index", -1))
        if 0 <= index < len(checks):
            by_index[index] = CheckResult(
                check=checks[index],
                success=bool(item.success),
                result=dict(item.result or {}),
                exception=_exception_message(item.exception_info),
            )
    missing = [i for i in range(len(checks)) if i not in by_index]
    for i in missing:  # should not happen; never drop a check silently
        by_index[i] = CheckResult(
            checks[i], False, {}, "GX returned no result for this expectation"
        )
    return [by_index[i] for i in range(len(checks))]
