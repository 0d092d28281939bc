"""Shared Prefect task settings: retry transient failures with backoff, never user errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

from transfer.errors import TransferError


def retry_unless_user_error(task_: Any, task_run: Any, state: Any) -> bool:
    """A bad image or bad params fails the same way every time: retrying only wastes time."""
    return not isinstance(state.data, TransferError)


def stage_task(name: str, retries: int = 2, **kwargs: Any) -> Callable[[Callable], Any]:
    """``@task`` with the project's retry policy (exponential backoff from 2 s)."""
    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=2),
        retry_jitter_factor=0.2,
        retry_condition_fn=retry_unless_user_error,
        **kwargs,
    )
