"""The parent MLflow run of one pipeline run: opened first, closed last (FAILED on error)."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.adapters import tracking
from transfer.config import Params


@task(name="start-pipeline-run")
def start_pipeline_run(params: Params, run_name: str | None = None) -> str:
    client = tracking.configure(params)
    run_id = tracking.start_run(
        client, params, run_name or "transfer-pipeline", tags={"stage": "pipeline"}
    )
    tracking.log_params(client, run_id, params.dump())
    tracking.set_tags(
        client,
        run_id,
        {"git_commit": tracking.git_commit(), "finetune.strategy": params.finetune.strategy},
    )
    return run_id


DATA_CONTEXT = {"source": "pretraining", "target": "fine-tuning"}


@task(name="log-data-version")
def log_data_version(params: Params, run_id: str, data: dict[str, Any]) -> None:
    """Tag the run with the data it saw and log both datasets as MLflow run inputs
    (digest = the DVC md5, source = the DVC-tracked folder), so every model traces back."""
    client = tracking.configure(params)
    tags = {"data.dvc_tracked": data["dvc"]}
    for name in ("source", "target"):
        tags[f"data.{name}.version"] = data[name]["version"]
        tags[f"data.{name}.dvc_md5"] = data[name].get("dvc_md5")
    tracking.set_tags(client, run_id, tags)
    kinds = {"source": params.data.source.kind, "target": params.data.target.kind}
    tracking.log_inputs(client, run_id, [dataset_input(name, data[name], kinds[name]) for name in DATA_CONTEXT])


def dataset_input(name: str, info: dict[str, Any], kind: str) -> DatasetInput:
    with warnings.catch_warnings():  # a local path matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(info["dir"]).resolve()))
    digest = (info.get("dvc_md5") or info["version"]).removesuffix(".dir")
    dataset = MetaDataset(source=source, name=f"{name}-{kind}", digest=digest[:36])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", DATA_CONTEXT[name])])


def run_name(summary: dict[str, Any]) -> str:
    """What the run did, for the MLflow runs table: strategy, k, version and outcome."""
    outcome = "promoted" if summary.get("promoted") else "kept champion"
    return (f"{summary.get('strategy', '?')} k={summary.get('labels_per_class', '?')} "
            f"v{summary.get('model_version', '?')} {outcome}")


@task(name="log-source-model")
def log_source_model(params: Params, run_id: str, source: dict[str, Any]) -> None:
    client = tracking.configure(params)
    tracking.set_tags(
        client,
        run_id,
        {
            "source_weights_sha256": source.get("weights_sha256"),
            "source_origin": source.get("origin"),
            "source_reused": source.get("reused"),
            "source_run_id": source.get("run_id"),
            "source_choice_reason": source.get("choice_reason"),  # pretrain.source=auto only
        },
    )


@task(name="finish-pipeline-run")
def finish_pipeline_run(
    params: Params, run_id: str, summary: dict[str, Any], ok: bool = True
) -> dict[str, Any]:
    client = tracking.configure(params)
    tracking.log_json(client, run_id, summary, "summary.json")
    if ok and "model_version" in summary:
        client.update_run(run_id, name=run_name(summary))
        tracking.set_tags(client, run_id, {"model_name": summary.get("model_name")})  # `transfer runs`
    tracking.end_run(client, run_id, ok=ok)
    if ok:
        create_markdown_artifact(
            markdown=summary_markdown(summary),
            key="transfer-summary",
            description="transfer pipeline summary",
        )
    return summary


@task(name="fail-pipeline-run")
def fail_pipeline_run(
    params: Params, run_id: str, error: str, report_dir: str | None = None
) -> None:
    client = tracking.configure(params)
    if report_dir and Path(report_dir).exists():
        tracking.log_files(
            client, run_id, sorted(Path(report_dir).glob("validation_report.*")), "validation"
        )
    tracking.set_tags(client, run_id, {"error": error[:4000]})
    tracking.end_run(client, run_id, ok=False)


@contextlib.contextmanager
def failing_pipeline_run(params: Params, run_id: str, report_dir: str | None = None) -> Iterator[None]:
    """Around a flow's body: whatever escapes it (an error, Ctrl-C, a Prefect cancel's
    ``TerminationSignal``) marks the parent run FAILED with the error first, then propagates.

    Not a Prefect ``on_failure`` / ``on_crashed`` / ``on_cancellation`` hook: under a
    runner (a deployment's flow run, which is how the stage flows run) Prefect runs the
    cancellation hooks in the runner's process, which knows neither this run id nor the
    store, so a cancelled run would stay RUNNING; and a hook sees only the flow run's
    state, not the run id made inside the flow."""
    try:
        yield
    except BaseException as error:
        fail_pipeline_run(params, run_id, f"{type(error).__name__}: {error}", report_dir)
        raise


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {k} | {v} |" for k, v in summary.items() if not isinstance(v, (dict, list))
    )
    return f"# Transfer pipeline run\n\n| field | value |\n|---|---|\n{rows}\n\n```json\n{json.dumps(summary, indent=2, default=str)}\n```\n"
