"""One flow per training stage, for one deployment (and container) each; see prefect.yaml.

They exchange only MLflow URIs and small dicts, so each can run on its own machine
with no shared disk (every stage re-versions the data itself: ``dvc repro prepare`` is a
no-op where the data is already there):

    pretrain_flow  -> {source_model_uri, ...}           (runs:/<run>/source_model)
    finetune_flow(source_model_uri) -> handoff          (runs:/<run>/model_dir, for both models)
    evaluate_flow(handoff)          -> promotion decision

Flow names = deployment names: "pretrain/pretrain", "finetune/finetune",
"evaluate/evaluate"; ``flows/chained.py`` runs the three deployments in turn.
Results are persisted so ``run_deployment``'s caller can read them.
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
from tasks.retrain import changed_datasets, data_fingerprint
from tasks.adapters.stage_io import fetch_model_dir, publish_model_dir
from tasks.train import finetune_task, pretrain_task, scratch_task
from tasks.validate_gate import validate_gate_task
from transfer.config import load_params
from transfer.errors import TransferError

# Persisted (pickle, Prefect's default) so run_deployment's caller can read them. Not JSON:
# Prefect 3.8.8 misreads a bare JSON flow result that has a "data" key as its legacy
# result-blob format (ResultRecord.deserialize) and returns that key's value instead.
STAGE_RESULTS = {"persist_result": True, "log_prints": True}


@flow(name="pretrain", **STAGE_RESULTS)
def pretrain_flow(
    params_file: str = "params.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Version + validate the data, pretrain (or reuse) the source model, publish it.

    Returns ``{source_model_uri, weights_sha256, validation_passed, data, mlflow_run_id}``.
    """
    configure_runtime()  # the process settings, for a worker that imported this flow
    params = load_params(params_file, overrides or [])
    run_id = start_pipeline_run(params, "stage: pretrain")
    report_dir = str(Path(params.runtime.artifacts_dir) / "validation" / run_id)
    with failing_pipeline_run(params, run_id, report_dir):
        data = version_data_task(params)
        log_data_version(params, run_id, data)
        validation = validate_gate_task(params, data, report_dir, run_id)
        source = pretrain_task(params, data, run_id)
        log_source_model(params, run_id, source)
        uri = publish_model_dir(params, run_id, source["model_dir"], "source_model")
    result = {
        "stage": "pretrain", "mlflow_run_id": run_id, "source_model_uri": uri,
        "weights_sha256": source["weights_sha256"], "source_reused": source["reused"],
        "validation_passed": validation["passed"], "data": data,
    }
    return finish_pipeline_run(params, run_id, result)


@flow(name="finetune", **STAGE_RESULTS)
def finetune_flow(
    source_model_uri: str, params_file: str = "params.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Fine-tune the published source model (and train the scratch baseline); publish both.

    Every seed of ``params.seeds()`` is trained and published. Returns the hand-off for
    ``evaluate_flow``: ``{tuned_runs: [{model_uri, run_id, seed, val_accuracy, strategy,
    reason}, ...], scratch_runs: [...], source: {weights_sha256, origin}, data, mlflow_run_id}``.
    """
    overrides = [*(overrides or []), f"pretrain.source_model={source_model_uri}"]
    configure_runtime()  # the process settings, for a worker that imported this flow
    params = load_params(params_file, overrides)
    run_id = start_pipeline_run(params, "stage: finetune")
    with failing_pipeline_run(params, run_id):
        data = version_data_task(params)
        log_data_version(params, run_id, data)
        source = pretrain_task(params, data, run_id)  # resolves the URI: downloads, never trains
        log_source_model(params, run_id, source)
        tuned_runs = [finetune_task(params.with_seed(s), data, source, run_id) for s in params.seeds()]
        scratch_runs = ([scratch_task(params.with_seed(s), data, run_id) for s in params.seeds()]
                        if params.finetune.scratch_baseline else [])
        for trained in (*tuned_runs, *scratch_runs):
            trained["model_uri"] = publish_model_dir(params, trained["run_id"], trained["model_dir"], "model_dir")

    def portable(trained: dict[str, Any]) -> dict[str, Any]:  # local paths mean nothing elsewhere
        return {k: v for k, v in trained.items() if k != "model_dir"}

    result = {
        "stage": "finetune", "mlflow_run_id": run_id,
        "tuned_runs": [portable(t) for t in tuned_runs],
        "scratch_runs": [portable(t) for t in scratch_runs],
        "source": {"weights_sha256": source["weights_sha256"], "origin": source_model_uri},
        "data": data,
    }
    return finish_pipeline_run(params, run_id, result)


def _same_data(expected: dict[str, Any], data: dict[str, Any]) -> None:
    changed = changed_datasets(data_fingerprint(expected), data_fingerprint(data))
    if changed:
        raise TransferError(
            f"{' and '.join(changed)} data changed between the stages (this machine has another "
            "version than the models were trained on): rerun the chain"
        )


@flow(name="evaluate", **STAGE_RESULTS)
def evaluate_flow(
    handoff: dict[str, Any], validation_passed: bool = True, params_file: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate the published models against scratch and the champion; gate the promotion.

    ``handoff`` is ``finetune_flow``'s result (every seed's ``model_uri`` is downloaded from
    MLflow; the seed registered is chosen on val). Returns the promotion decision with the
    test accuracies.
    """
    configure_runtime()  # the process settings, for a worker that imported this flow
    params = load_params(params_file, overrides or [])
    run_id = start_pipeline_run(params, "stage: evaluate")
    with failing_pipeline_run(params, run_id):
        data = version_data_task(params)
        _same_data(handoff["data"], data)
        log_data_version(params, run_id, data)
        tuned_runs = [{**t, "model_dir": fetch_model_dir(params, t["model_uri"])} for t in handoff["tuned_runs"]]
        scratch_runs = [{**t, "model_dir": fetch_model_dir(params, t["model_uri"])}
                        for t in handoff.get("scratch_runs") or []]
        evaluation = evaluate_task(params, tuned_runs, scratch_runs, run_id)
        decision = promote_task(
            params, data, handoff["source"], evaluation["selected"], evaluation, validation_passed, run_id
        )
    summary = {
        "stage": "evaluate", "mlflow_run_id": run_id,
        **evaluation_summary(evaluation),
        **decision,
    }
    return finish_pipeline_run(params, run_id, summary)
