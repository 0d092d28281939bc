"""The pipeline as three deployments chained with ``run_deployment``: each stage runs in its
own container (GPU pool), this flow only waits and passes the MLflow URIs along.

Stage results travel through Prefect's result storage: with workers on several machines,
configure a shared result storage (e.g. ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.deployments import run_deployment

from transfer.errors import TransferError


def _run(name: str, parameters: dict[str, Any]) -> Any:
    flow_run = run_deployment(name, parameters=parameters, timeout=None)
    if not flow_run.state or not flow_run.state.is_completed():
        raise TransferError(f"deployment {name} ended {flow_run.state.name if flow_run.state else 'without a state'}")
    return flow_run.state.result()


@flow(name="chained-pipeline", log_prints=True)
def chained_pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    common = {"params_file": params_file, "overrides": overrides or []}
    pretrained = _run("pretrain/pretrain", common)
    tuned = _run("finetune/finetune", {**common, "source_model_uri": pretrained["source_model_uri"]})
    return _run("evaluate/evaluate", {**common, "handoff": tuned,
                                      "validation_passed": pretrained["validation_passed"]})
