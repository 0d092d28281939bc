"""Process settings for the orchestration libraries, in one place and never at import.

Called by the CLI entry point (``flows/cli.py``), the test suite (``tests/conftest.py``) and
the flows: Prefect reads its settings when it is first imported, so the CLI and the tests
call this before anything imports Prefect; a flow calls it again for the settings read
when used (MLflow's progress bar).
"""

from __future__ import annotations

import os

# Offline machines: no usage telemetry from the libraries (each would log a network error);
# the temporary Prefect API migrates its database on first use, which can outlast the 20 s
# default start-up timeout on a 2-core machine.
RUNTIME_ENV = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def configure_runtime() -> None:
    """Set the defaults above where the user has not set them (a user's value wins)."""
    for key, value in RUNTIME_ENV.items():
        os.environ.setdefault(key, value)
