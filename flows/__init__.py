"""Prefect flows: composition only; every step lives in ``tasks/``."""

import os

# A first temporary Prefect API migrates its database, which can outlast Prefect's 20 s
# start-up timeout on a small machine; and nothing here should phone home (no network).
for _key, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_key, _value)
