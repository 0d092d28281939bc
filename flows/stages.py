"""One flow per training stage, for one deployment (and container) each; see prefect.yaml.

They exchange only MLflow URIs and small dicts, so each can run on its own machine:
    pretrain_flow -> {source_model_uri} -> finetune_flow -> {model URIs} -> evaluate_flow
``flows/chained.py`` runs the three deployments in turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from tasks.data import version_data_task
from tasks.evaluate import evaluate_task
from tasks.pipeline_run import fail_pipeline_run, finish_pipeline_run, start_pipeline_run
from tasks.promote import promote_task
from tasks.stage_io import fetch_model_dir, publish_model_dir
from tasks.train import finetune_task, pretrain_task, scratch_task
from tasks.validate_gate import validate_gate_task
from transfer.config import load_params


@flow(name="pretrain", persist_result=True, log_prints=True)
def pretrain_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Version + validate the data, pretrain (or reuse) the source model, publish it."""
    params = load_params(params_file, overrides or [])
    run_id = start_pipeline_run(params, "stage: pretrain")
    report_dir = str(Path(params.runtime.artifacts_dir) / "validation" / run_id)
    try:
        data = version_data_task(params)
        validation = validate_gate_task(params, data, report_dir, run_id)
        source = pretrain_task(params, data, run_id)
        uri = publish_model_dir(params, run_id, source["model_dir"], "source_model")
    except BaseException as error:
        fail_pipeline_run(params, run_id, f"{type(error).__name__}: {error}", report_dir)
        raise
    result = {"source_model_uri": uri, "weights_sha256": source["weights_sha256"],
              "validation_passed": validation["passed"], "data": data}
    finish_pipeline_run(params, run_id, {"stage": "pretrain", "source_model_uri": uri})
    return result


@flow(name="finetune", persist_result=True, log_prints=True)
def finetune_flow(
    source_model_uri: str, params_file: str = "params.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Fine-tune the published source model and train the scratch baseline; publish both."""
    params = load_params(params_file, [*(overrides or []), f"pretrain.source_model={source_model_uri}"])
    run_id = start_pipeline_run(params, "stage: finetune")
    try:
        data = version_data_task(params)
        source = pretrain_task(params, data, run_id)  # resolves the URI: downloads, never trains
        tuned = finetune_task(params, data, source, run_id)
        scratch = scratch_task(params, data, run_id)
        tuned["model_uri"] = publish_model_dir(params, tuned["run_id"], tuned["model_dir"], "model_dir")
        scratch["model_uri"] = publish_model_dir(params, scratch["run_id"], scratch["model_dir"], "model_dir")
    except BaseException as error:
        fail_pipeline_run(params, run_id, f"{type(error).__name__}: {error}")
        raise
    finish_pipeline_run(params, run_id, {"stage": "finetune", "strategy": tuned["strategy"]})
    return {"tuned": tuned, "scratch": scratch, "source": {**source, "origin": source_model_uri}, "data": data}


@flow(name="evaluate", persist_result=True, log_prints=True)
def evaluate_flow(
    handoff: dict[str, Any], validation_passed: bool = True, params_file: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate the published models against scratch and the champion; gate the promotion."""
    params = load_params(params_file, overrides or [])
    run_id = start_pipeline_run(params, "stage: evaluate")
    try:
        tuned = {**handoff["tuned"], "model_dir": fetch_model_dir(params, handoff["tuned"]["model_uri"])}
        scratch = {**handoff["scratch"], "model_dir": fetch_model_dir(params, handoff["scratch"]["model_uri"])}
        evaluation = evaluate_task(params, tuned, scratch, run_id)
        decision = promote_task(params, handoff["data"], handoff["source"], tuned, evaluation, validation_passed, run_id)
    except BaseException as error:
        fail_pipeline_run(params, run_id, f"{type(error).__name__}: {error}")
        raise
    summary = {"stage": "evaluate", "transfer_accuracy": evaluation["transfer"]["accuracy"],
               "scratch_accuracy": evaluation["scratch"]["accuracy"], **decision}
    return finish_pipeline_run(params, run_id, summary)
