"""Create the pipeline's MLflow user on a basic-auth tracking server (docker-compose.yml's
one-shot ``mlflow-users`` service): ``python -m tasks.adapters.mlflow_users``.

Runs as the MLflow admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD); the new
user's name and password come from MLFLOW_PIPELINE_USERNAME / MLFLOW_PIPELINE_PASSWORD.
The pipeline then owns (MANAGE) the experiment and the registered model it creates, so
only it and the admin can register versions and move ``champion``. Idempotent."""

from __future__ import annotations

import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client


def ensure_user(tracking_uri: str, username: str, password: str) -> bool:
    """True when the user was created, False when it already existed."""
    client = get_app_client("basic-auth", tracking_uri=tracking_uri)
    try:
        client.create_user(username=username, password=password)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False
    return True


def main() -> int:
    username = os.environ.get("MLFLOW_PIPELINE_USERNAME", "pipeline")
    created = ensure_user(os.environ["MLFLOW_TRACKING_URI"], username, os.environ["MLFLOW_PIPELINE_PASSWORD"])
    print(f"MLflow user {username!r} {'created' if created else 'already exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
