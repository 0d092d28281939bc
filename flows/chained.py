"""The pipeline as three deployments chained with ``run_deployment``: each stage runs as its
own flow run (its own container on the Docker work pool of prefect.yaml); this flow only
waits and passes the MLflow URIs along:

    pretrain/pretrain -> finetune/finetune(source_model_uri) -> evaluate/evaluate(handoff)

Stage results travel through Prefect's result storage (the stage flows persist them). With
workers on several machines that storage must be shared: set
``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` (e.g. an S3/GCS/remote-file-system block) or mount
one volume at ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` in every job; see docs/scheduling.md.

``deploy_stages`` registers the four deployments for a local *process* work pool (what the
Prefect-server test and docs/scheduling.md use); prefect.yaml does the same for Docker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.deployments import run_deployment

from transfer.errors import TransferError

PRETRAIN, FINETUNE, EVALUATE = "pretrain/pretrain", "finetune/finetune", "evaluate/evaluate"
CHAINED = "chained-pipeline/chained-pipeline"

# deployment name -> entrypoint (relative to the project root), as in prefect.yaml
ENTRYPOINTS = {
    "pretrain": "flows/stages.py:pretrain_flow",
    "finetune": "flows/stages.py:finetune_flow",
    "evaluate": "flows/stages.py:evaluate_flow",
    "chained-pipeline": "flows/chained.py:chained_pipeline",
}


def run_stage(name: str, parameters: dict[str, Any], timeout_s: float | None) -> Any:
    """Run deployment ``name`` ("<flow>/<deployment>"), wait, return its persisted result."""
    flow_run = run_deployment(name, parameters=parameters, timeout=timeout_s)
    state = flow_run.state
    if state is None or not state.is_final():
        raise TransferError(
            f"deployment {name}: flow run {flow_run.name} did not finish within {timeout_s} s "
            f"(state {state.name if state else 'unknown'}); is a worker polling its work pool?"
        )
    if not state.is_completed():
        raise TransferError(
            f"deployment {name}: flow run {flow_run.name} ended {state.name}: {state.message}"
        )
    return state.result()


@flow(name="chained-pipeline", persist_result=True, log_prints=True)
def chained_pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None,
    stage_timeout_s: float | None = 6 * 3600,
) -> dict[str, Any]:
    """pretrain -> finetune -> evaluate, one deployment (container) each.

    Returns ``evaluate_flow``'s decision plus ``source_model_uri`` and the model URIs.
    """
    common = {"params_file": params_file, "overrides": list(overrides or [])}
    pretrained = run_stage(PRETRAIN, common, stage_timeout_s)
    print(f"source model: {pretrained['source_model_uri']}")
    handoff = run_stage(
        FINETUNE, {**common, "source_model_uri": pretrained["source_model_uri"]}, stage_timeout_s
    )
    print("fine-tuned models: " + ", ".join(t["model_uri"] for t in handoff["tuned_runs"]))
    decision = run_stage(
        EVALUATE,
        {**common, "handoff": handoff, "validation_passed": pretrained["validation_passed"]},
        stage_timeout_s,
    )
    return {
        **decision,
        "source_model_uri": pretrained["source_model_uri"],
        "transfer_model_uris": [t["model_uri"] for t in handoff["tuned_runs"]],
        "scratch_model_uris": [t["model_uri"] for t in handoff.get("scratch_runs") or []],
    }


def deploy_stages(
    work_pool: str, source: str | Path = ".", job_variables: dict[str, Any] | None = None
) -> dict[str, UUID]:
    """Register pretrain/finetune/evaluate/chained-pipeline on a process work pool.

    ``source`` is the project directory the worker runs the flows from (its working
    directory, so relative paths in params.yaml resolve there). Needs ``PREFECT_API_URL``.
    """
    from prefect import Flow

    ids = {}
    for name, entrypoint in ENTRYPOINTS.items():
        loaded = Flow.from_source(source=str(Path(source).resolve()), entrypoint=entrypoint)
        ids[name] = loaded.deploy(
            name=name, work_pool_name=work_pool, job_variables=job_variables or {},
            build=False, push=False, print_next_steps=False, tags=["transfer", "stage"],
        )
    return ids
