"""Stage 5: score every seed of the fine-tuned model and of the scratch baseline on the test
holdout; report the selected seeds' figures with intervals and the paired transfer gain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.adapters import tracking
from tasks.common import stage_task
from transfer import stages, stats
from transfer.config import Params
from transfer.plots import plot_runs_learning_curves, plot_transfer_gain

SUMMARY_METRICS = ("accuracy", "macro_f1", "ece", "ece_uncalibrated")


def _score_seeds(
    params: Params, client: Any, runs: list[dict[str, Any]], selected: dict[str, Any], out: Path, name: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every seed's test report (logged to its own run); the selected seed's report first."""
    reports = []
    for run in runs:
        chosen = run["model_dir"] == selected["model_dir"]
        report = stages.evaluate(params, run["model_dir"], out, name=name if chosen else f"{name}_seed{run['seed']}",
                                 plots=chosen)
        tracking.log_metrics(client, run["run_id"], {f"test_{k}": report[k] for k in SUMMARY_METRICS}
                             | {"test_accuracy_ci_low": report["accuracy_ci"][0],
                                "test_accuracy_ci_high": report["accuracy_ci"][1]})
        reports.append(report)
    best = next(r for r, run in zip(reports, runs) if run["model_dir"] == selected["model_dir"])
    return best, reports


def _seed_table(runs: list[dict[str, Any]], reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed val (selection) and test figures, and the test accuracy over seeds."""
    rows = [{"seed": run["seed"], "val_accuracy": run.get("val_accuracy"), "test_accuracy": rep["accuracy"]}
            for run, rep in zip(runs, reports)]
    return {"seeds": rows, "over_seeds": stats.over_seeds([r["test_accuracy"] for r in rows]).to_json()}


def _interval_metrics(prefix: str, report: dict[str, Any], seeds: dict[str, Any]) -> dict[str, float]:
    over = seeds["over_seeds"]
    return {
        f"{prefix}accuracy": report["accuracy"],
        f"{prefix}accuracy_ci_low": report["accuracy_ci"][0],
        f"{prefix}accuracy_ci_high": report["accuracy_ci"][1],
        f"{prefix}accuracy_seed_mean": over["mean"],
        f"{prefix}accuracy_seed_std": over["std"],
    }


def evaluate_models(
    params: Params, tuned_runs: list[dict[str, Any]], scratch_runs: list[dict[str, Any]], parent_run_id: str,
) -> dict[str, Any]:
    """Test metrics for every seed, the transfer gain of the selected seeds, plots; all in MLflow."""
    client = tracking.configure(params)
    out = Path(params.runtime.artifacts_dir) / "evaluation" / parent_run_id
    tuned = stages.best_on_validation(tuned_runs)
    transfer_report, transfer_all = _score_seeds(params, client, tuned_runs, tuned, out, "transfer")
    result: dict[str, Any] = {"transfer": transfer_report, "out_dir": str(out),
                              "transfer_seeds": _seed_table(tuned_runs, transfer_all), "selected": tuned}
    metrics = _interval_metrics("test_", transfer_report, result["transfer_seeds"]) | {
        "test_macro_f1": transfer_report["macro_f1"], "test_ece": transfer_report["ece"],
        "test_ece_uncalibrated": transfer_report["ece_uncalibrated"],
        "temperature": transfer_report["temperature"], "selected_seed": tuned["seed"],
    }
    accuracies = {tuned["strategy"]: transfer_report["accuracy"]}
    intervals = {tuned["strategy"]: tuple(transfer_report["accuracy_ci"])}
    tracking.set_tags(client, parent_run_id, {"strategy": tuned["strategy"], "selected_seed": tuned["seed"]})
    if scratch_runs:
        scratch = stages.best_on_validation(scratch_runs)
        scratch_report, scratch_all = _score_seeds(params, client, scratch_runs, scratch, out, "scratch")
        result["scratch"] = scratch_report
        result["scratch_seeds"] = _seed_table(scratch_runs, scratch_all)
        result["gain"] = stages.transfer_gain(transfer_report, scratch_report, params.promote.alpha)
        result["gain_over_seeds"] = stats.over_seeds(
            [t["accuracy"] - s["accuracy"] for t, s in zip(transfer_all, scratch_all)]).to_json()
        gain = result["gain"]
        metrics |= _interval_metrics("scratch_test_", scratch_report, result["scratch_seeds"]) | {
            "transfer_gain": gain["gain"], "transfer_gain_ci_low": gain["gain_ci"][0],
            "transfer_gain_ci_high": gain["gain_ci"][1], "transfer_gain_p_value": gain["p_value"],
        }
        tracking.set_tags(client, parent_run_id, {"negative_transfer": gain["negative_transfer"],
                                                  "transfer_verdict": gain["verdict"]})
        accuracies = {"scratch": scratch_report["accuracy"], **accuracies}
        intervals["scratch"] = tuple(scratch_report["accuracy_ci"])
    tracking.log_metrics(client, parent_run_id, metrics)
    _plot_seed_curves(tuned_runs, scratch_runs, out / "learning_curves.png")
    plot_transfer_gain(accuracies, out / "transfer_gain.png", "Test accuracy (95% CI): scratch vs transfer",
                       intervals=intervals)
    tracking.log_files(client, parent_run_id, sorted(out.glob("*.png")), "plots")
    tracking.log_files(client, parent_run_id, sorted(out.glob("*.json")), "evaluation")
    return result


def _plot_seed_curves(tuned_runs: list[dict[str, Any]], scratch_runs: list[dict[str, Any]], path: Path) -> None:
    """One figure with every trained seed's curves (the seeds' own runs hold them as metrics)."""
    curves = {f"{run['strategy']} seed {run['seed']}": run["history"]
              for run in [*tuned_runs, *scratch_runs] if run.get("history")}
    if curves:
        plot_runs_learning_curves(curves, path, "Learning curves: every seed, fine-tune vs scratch")


evaluate_task = stage_task("evaluate")(evaluate_models)


def evaluate_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The run summary's evaluation lines: every figure with its interval, in words."""
    transfer, selected = evaluation["transfer"], evaluation["selected"]
    seeds = evaluation["transfer_seeds"]["over_seeds"]
    low, high = transfer["accuracy_ci"]
    summary: dict[str, Any] = {
        "selected_seed": f"{selected['seed']} of {len(seeds['values'])} "
                         f"(best val accuracy {selected.get('val_accuracy') or 0:.3f})",
        "transfer_accuracy": transfer["accuracy"],
        "transfer_accuracy_95ci": f"[{low:.3f}, {high:.3f}] (Wilson, n={transfer['n_test']})",
        "transfer_over_seeds": _seeds_text(seeds),
        "ece": f"{transfer['ece_uncalibrated']:.3f} -> {transfer['ece']:.3f} "
               f"(temperature {transfer['temperature']:.2f}, fitted on val)",
    }
    if "gain" in evaluation:
        scratch, gain = evaluation["scratch"], evaluation["gain"]
        s_low, s_high = scratch["accuracy_ci"]
        summary |= {
            "scratch_accuracy": scratch["accuracy"],
            "scratch_accuracy_95ci": f"[{s_low:.3f}, {s_high:.3f}]",
            "scratch_over_seeds": _seeds_text(evaluation["scratch_seeds"]["over_seeds"]),
            "gain": gain["gain"],
            "gain_paired": f"{gain['described']}: {gain['verdict']}",
            "negative_transfer": gain["negative_transfer"],
        }
    return summary


def _seeds_text(over: dict[str, Any]) -> str:
    values = ", ".join(f"{v:.3f}" for v in over["values"])
    return f"mean {over['mean']:.3f} ± {over['std']:.3f} sd ({values})"
