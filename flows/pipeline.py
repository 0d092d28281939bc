"""The transfer pipeline: composition only, every step lives in ``tasks/``.

    data version (DVC) -> validate (GX) -> pretrain source (cached) -> fine-tune + scratch
      -> evaluate -> promote (MLflow alias)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.runtime import configure_runtime
from tasks.data import version_data_task
from tasks.evaluate import evaluate_summary as evaluation_summary
from tasks.evaluate import evaluate_task
from tasks.pipeline_run import (
    failing_pipeline_run, finish_pipeline_run, log_data_version, log_source_model, start_pipeline_run,
)
from tasks.promote import promote_task
from tasks.train import finetune_task, pretrain_task, scratch_task
from tasks.validate_gate import validate_gate_task
from transfer.config import Params, load_params
from transfer.stages import resolve_strategy


@flow(name="transfer-pipeline", log_prints=True)
def transfer_pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None, params: Params | None = None
) -> dict[str, Any]:
    """Run every stage; the champion alias moves only if all promotion gates pass."""
    configure_runtime()  # the process settings, for a worker that imported this flow
    params = params or load_params(params_file, overrides or [])
    resolve_strategy(params)  # an unknown finetune.strategy fails now, not after pretraining
    run_id = start_pipeline_run(params)
    report_dir = str(Path(params.runtime.artifacts_dir) / "validation" / run_id)
    with failing_pipeline_run(params, run_id, report_dir):
        data = version_data_task(params)
        log_data_version(params, run_id, data)
        validation = validate_gate_task(params, data, report_dir, run_id)
        source = pretrain_task(params, data, run_id)
        log_source_model(params, run_id, source)
        seeds = params.seeds()  # each trained seed is its own nested run; val picks one
        tuned_runs = [finetune_task(params.with_seed(s), data, source, run_id) for s in seeds]
        scratch_runs = ([scratch_task(params.with_seed(s), data, run_id) for s in seeds]
                        if params.finetune.scratch_baseline else [])
        evaluation = evaluate_task(params, tuned_runs, scratch_runs, run_id)
        tuned = evaluation["selected"]
        decision = promote_task(params, data, source, tuned, evaluation, validation["passed"], run_id)
    summary = {
        "mlflow_run_id": run_id,
        # the DVC md5 of each dataset folder (dvc.lock), else the manifest hash outside DVC
        "source_data_version": data["source"]["dvc_md5"] or data["source"]["version"],
        "target_data_version": data["target"]["dvc_md5"] or data["target"]["version"],
        "dvc_tracked": data["dvc"],
        "strategy": tuned["strategy"], "strategy_reason": tuned["reason"],
        "labels_per_class": params.finetune.labels_per_class,
        "source_reused": source["reused"], "source_weights_sha256": source["weights_sha256"],
        **evaluation_summary(evaluation),
        "model_name": decision["model_name"], "model_version": decision["version"],
        "promoted": decision["promoted"], "promotion_reason": decision["reason"],
    }
    return finish_pipeline_run(params, run_id, summary)
