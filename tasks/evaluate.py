"""Stage 5: evaluate the fine-tuned model and the scratch baseline on the held-out test set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks import tracking
from tasks.common import stage_task
from transfer import stages
from transfer.config import Params
from transfer.metrics import plot_transfer_gain

SUMMARY_METRICS = ("accuracy", "macro_f1", "ece")


def evaluate_models(
    params: Params, tuned: dict[str, Any], scratch: dict[str, Any] | None, parent_run_id: str
) -> dict[str, Any]:
    """Test metrics for both models, the transfer gain, plots; all logged to MLflow."""
    client = tracking.configure(params)
    out = Path(params.runtime.artifacts_dir) / "evaluation" / parent_run_id
    transfer_report = stages.evaluate(params, tuned["model_dir"], out, name="transfer")
    result: dict[str, Any] = {"transfer": transfer_report, "out_dir": str(out)}
    tracking.log_metrics(
        client, tuned["run_id"], {f"test_{k}": transfer_report[k] for k in SUMMARY_METRICS}
    )
    accuracies = {tuned["strategy"]: transfer_report["accuracy"]}
    if scratch is not None:
        scratch_report = stages.evaluate(params, scratch["model_dir"], out, name="scratch")
        tracking.log_metrics(
            client, scratch["run_id"], {f"test_{k}": scratch_report[k] for k in SUMMARY_METRICS}
        )
        result["scratch"] = scratch_report
        result["gain"] = stages.transfer_gain(
            transfer_report["accuracy"],
            scratch_report["accuracy"],
            params.evaluate.negative_transfer_margin,
        )
        accuracies = {"scratch": scratch_report["accuracy"], **accuracies}
        tracking.log_metrics(
            client,
            parent_run_id,
            {
                "scratch_test_accuracy": scratch_report["accuracy"],
                "transfer_gain": result["gain"]["gain"],
            },
        )
        tracking.set_tags(
            client, parent_run_id, {"negative_transfer": result["gain"]["negative_transfer"]}
        )
    plot_transfer_gain(accuracies, out / "transfer_gain.png", "Test accuracy: scratch vs transfer")
    tracking.log_metrics(
        client,
        parent_run_id,
        {
            "test_accuracy": transfer_report["accuracy"],
            "test_macro_f1": transfer_report["macro_f1"],
        },
    )
    tracking.log_files(client, parent_run_id, sorted(out.glob("*.png")), "plots")
    tracking.log_files(client, parent_run_id, sorted(out.glob("*.json")), "evaluation")
    return result


evaluate_task = stage_task("evaluate")(evaluate_models)
