"""`transfer schedule`: serve the retrain flow on a cron schedule (Prefect ``flow.serve``).

``schedule`` blocks: it registers the deployment "retrain/retrain-schedule" with the cron
schedule and runs each scheduled flow run in a subprocess of this process, until Ctrl-C
(which pauses the schedule). It needs a Prefect API: ``PREFECT_API_URL`` of a server
(``prefect server start``), or, when unset, a temporary local one that lives as long as
this process. Each tick re-reads ``params_file``, so data changes made in ``params.yaml``
(then picked up by ``dvc repro``) are seen by the next run; see docs/scheduling.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from transfer.config import Params, load_params
from transfer.errors import TransferError

DEPLOYMENT = "retrain-schedule"


def validate_cron(expression: str | None) -> str:
    """The expression back if Prefect's ``CronSchedule`` accepts it, else a ``TransferError``."""
    from prefect.client.schemas.schedules import CronSchedule

    expression = (expression or "").strip()
    try:
        CronSchedule(cron=expression)
    except ValidationError:
        raise TransferError(
            f"invalid cron expression {expression!r}: expected 5 fields, minute hour "
            "day-of-month month day-of-week, each in range (e.g. '0 3 * * *' = daily 03:00)"
        ) from None
    return expression


def serve_kwargs(
    params_file: str | Path = "params.yaml",
    overrides: list[str] | None = None,
    cron: str | None = None,
    params: Params | None = None,
) -> dict[str, Any]:
    """The arguments ``schedule`` gives ``retrain_flow.serve`` (also for ``to_deployment``).

    ``cron`` defaults to ``schedule.cron`` of the params; params are validated here, so a
    bad key fails before anything is registered.
    """
    params = params or load_params(params_file, overrides or [])
    return {
        "name": DEPLOYMENT,
        "cron": validate_cron(cron or params.schedule.cron),
        "parameters": {
            "params_file": str(Path(params_file).resolve()),
            "overrides": list(overrides or []),
            "force": False,
        },
        "description": "Retrain when the data version differs from the champion's, "
        "then gate the promotion like any pipeline run.",
        "tags": ["transfer", "retrain"],
    }


def schedule(
    params_file: str | Path = "params.yaml",
    overrides: list[str] | None = None,
    cron: str | None = None,
    *,
    params: Params | None = None,
) -> None:
    """Blocks: a long-lived process that starts a retrain run at every cron tick."""
    from flows.retrain import retrain_flow

    retrain_flow.serve(**serve_kwargs(params_file, overrides, cron, params))
