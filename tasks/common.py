"""Shared Prefect task settings: retry transient failures with backoff, never user errors."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

from transfer.errors import TransferError


def retry_unless_user_error(task_: Any, task_run: Any, state: Any) -> bool:
    """A bad image or bad params fails the same way every time: retrying only wastes time."""
    return not (isinstance(state.data, BaseException) and is_user_error(state.data))


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


def is_user_error(error: BaseException | None) -> bool:
    """A ``TransferError``, or an error raised while handling / because of one."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, TransferError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class UserErrorConsoleFilter(logging.Filter):
    """Keep Prefect's tracebacks of user errors off the console: the CLI prints the one
    line that matters. The API log handler (the Prefect UI) still gets them, and any other
    error keeps its full traceback on the console."""

    def __init__(self) -> None:
        super().__init__()
        self._failed_runs: set[str] = set()  # task/flow runs that failed with a user error

    def filter(self, record: logging.LogRecord) -> bool:
        run = getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None)
        if record.exc_info and is_user_error(record.exc_info[1]):
            if run is not None:
                self._failed_runs.add(str(run))
            return False
        if run is not None and str(run) in self._failed_runs and record.getMessage().startswith("Finished in state"):
            # not the whole message again: the CLI prints it last. (The API handler, on a
            # child logger, has handled this record already.)
            record.msg, record.args = "Finished in state Failed (the error: line below says why)", ()
        return True


def quiet_user_errors_on_console() -> None:
    """Install ``UserErrorConsoleFilter`` on Prefect's console handlers (once).

    Prefect's engines log every task/flow exception with ``exc_info``; a filter on the
    console handler is the supported hook (logging config stays Prefect's), and leaves
    the API handler, which feeds the UI, untouched."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("prefect", "prefect.flow_runs",
                                                                      "prefect.task_runs"))]
    for handler in {h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}:
        if not any(isinstance(f, UserErrorConsoleFilter) for f in handler.filters):
            handler.addFilter(UserErrorConsoleFilter())


class _ToRunLogger(logging.Handler):
    """Forwards this thread's records (tasks may run side by side on threads) to a run logger."""

    def __init__(self, run_logger: Any) -> None:
        super().__init__(logging.INFO)
        self.run_logger, self.thread = run_logger, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.run_logger.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def core_logs_in_prefect() -> Iterator[None]:
    """The core's INFO lines (``transfer.*``: one per training epoch) in the task run's log,
    so a flow's long pretraining shows its progress in the CLI and the Prefect UI."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        run_logger = get_run_logger()
    except MissingContextError:  # called outside a flow or task run: nothing to forward to
        yield
        return
    core = logging.getLogger("transfer")
    handler = _ToRunLogger(run_logger)
    level, propagate = core.level, core.propagate
    core.addHandler(handler)
    core.setLevel(logging.INFO)
    core.propagate = False  # the run logger prints them once; root handlers would repeat them
    try:
        yield
    finally:
        core.removeHandler(handler)
        core.setLevel(level)
        core.propagate = propagate
