"""Stage 2 in the flow: run the GX suites, log the report to MLflow, stop on failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.adapters import tracking
from tasks.validate import validate_stage
from transfer.config import Params

# Never cached: the same params must be re-validated whenever the data changes. The task
# lives here, not in tasks/validate.py: `transfer validate` (a DVC stage) needs no Prefect.
validate_data = task(name="validate-data", retries=0, cache_policy=NO_CACHE)(validate_stage)


@task(name="validate-gate", retries=0)
def validate_gate_task(
    params: Params, data: dict[str, Any], report_dir: str, run_id: str
) -> dict[str, Any]:
    """Raises ``DataValidationError`` (a user error: no retry) when an expectation fails."""
    report = validate_data.fn(params, report_dir)  # publishes the Prefect markdown artifact
    client = tracking.configure(params)
    tracking.log_files(
        client, run_id, sorted(Path(report_dir).glob("validation_report.*")), "validation"
    )
    doubts = [c["check"] for c in report.sense if c["level"] in ("warn", "fail")]
    tracking.set_tags(client, run_id, {
        "validation": report.summary(),
        "transfer_sense": ", ".join(doubts) if doubts else "all checks pass",
    })
    return {
        "passed": report.passed,
        "summary": report.summary(),
        "warnings": len(report.warnings()),
        "transfer_sense": report.sense,  # shown before training (validate stage logs them)
    }
