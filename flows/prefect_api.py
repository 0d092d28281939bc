"""Which Prefect API a run talks to: a configured one, a local one a user keeps running
(``transfer server`` / ``prefect server start``), else Prefect's temporary one.

A temporary API costs seconds per process (start, database migration); a kept server
costs nothing per run, so ``transfer run`` looks for one before falling back.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Callable, Iterator

PROBE_TIMEOUT_S = 0.5


def local_api_url() -> str:
    """Where ``prefect server start`` listens by default (Prefect's own settings)."""
    host = os.environ.get("PREFECT_SERVER_API_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{host}:{os.environ.get('PREFECT_SERVER_API_PORT', '4200')}/api"


def answers(api_url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when a Prefect API answers its health check at ``api_url``."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as reply:
            return reply.status == 200
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def running_prefect_api(note: Callable[[str], None] = lambda text: None) -> Iterator[str | None]:
    """Within: the configured API, else a local server that answers, else the temporary one
    (yields the URL used, or None for the temporary API)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    local = local_api_url()
    if not answers(local):
        yield None
        return
    note(f"using the Prefect API at {local} (a kept server: no temporary API to start)")
    with temporary_settings(updates={PREFECT_API_URL: local}):
        yield local
