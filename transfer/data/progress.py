"""Rich progress bars for long data steps, silent when ``progress=False``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[..., Iterable]]:
    """Yield ``track(iterable, description=..., total=None)``; a pass-through when disabled."""
    if not enabled:
        yield lambda iterable, description="", total=None: iterable
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        def track(iterable: Iterable[T], description: str = "", total: int | None = None):
            return bar.track(iterable, total=total, description=description)

        yield track
