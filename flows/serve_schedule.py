"""`transfer schedule`: serve the retrain flow on a cron schedule (Prefect ``flow.serve``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from flows.retrain import retrain_flow
from transfer.errors import TransferError


def validate_cron(expression: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=expression)
    except ValidationError:
        raise TransferError(f"invalid cron expression {expression!r}: expected 5 fields, e.g. '0 3 * * *'") from None
    return expression


def schedule(params_file: str | Path, overrides: list[str], cron: str) -> None:
    """Blocks: a long-lived process that starts a retrain run at every cron tick."""
    retrain_flow.serve(
        name="retrain-schedule",
        cron=validate_cron(cron),
        parameters={"params_file": str(Path(params_file).resolve()), "overrides": overrides, "force": False},
        description="Retrain when the data version differs from the champion's, then gate the promotion.",
    )
