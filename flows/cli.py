"""The ``transfer`` console command: the core commands (``transfer/cli.py``) plus the
orchestration commands, registered here on the glue side so the core imports nothing of
Prefect, MLflow, tasks or flows.

Each command imports the glue it needs inside its body, so a command pays only for the
libraries it uses (``transfer validate``, a DVC stage, imports neither Prefect nor MLflow).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transfer import cli as core
from transfer.cli import ParamsOpt, SetOpt, _note, _params, _print_mapping, console, err_console
from transfer.config import Params

app = typer.Typer()  # the glue's commands; `composed()` merges them with the core's


@app.command()
def validate(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    report_dir: Annotated[Path, typer.Option(help="where the report is written")] = Path("artifacts/validation/latest"),
) -> None:
    """Run the great-expectations suites on the prepared datasets (no training)."""
    from tasks.validate import DataValidationError, validate_stage

    params = _params(params_file, overrides)
    _prepare_if_stale(params)
    try:
        report = validate_stage(params, report_dir)
    except DataValidationError as error:  # show why transfer may not help, then the one line
        if error.report is not None:
            _print_sense(error.report.sense)
        raise
    _print_sense(report.sense)
    for warning in report.warnings():
        console.print(f"[yellow]warning:[/yellow] {escape(f'{warning.headline()}: {warning.details}')}",
                      soft_wrap=True)
    console.print(f"[green]{escape(report.summary())}[/green] "
                  f"(report in {escape(str(report_dir))}/validation_report.md)", soft_wrap=True)


def _prepare_if_stale(params: Params) -> None:
    """Validate the data the params name, never what an earlier run left in data/.

    Stale data is prepared here (as dvc.yaml and the flow do: unreadable files recorded,
    for the report) rather than refused: DVC can restore the outputs of `prepare` from its
    run cache without running it, which leaves a recipe stamp that no longer matches."""
    from transfer.data import prepare_source, prepare_target
    from transfer.data.prepare import stale_datasets

    minimum = params.validate_.min_per_class
    stale = stale_datasets(params.data, min_per_split=minimum)
    if stale:
        _note(f"{', '.join(map(str, stale.values()))} not prepared from these params: preparing first")
    for name in stale:
        prepare = prepare_source if name == "source" else prepare_target
        prepare(params.data, strict=False, progress=True, min_per_split=minimum)


@app.command()
def run(params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Run the whole Prefect flow: data -> validate -> pretrain -> fine-tune -> evaluate -> promote."""
    params = _params(params_file, overrides)  # bad keys fail here, before anything starts
    from flows.pipeline import transfer_pipeline
    from transfer.stages import resolve_strategy

    resolve_strategy(params)  # and an unknown finetune.strategy (checked by the registry, not config)
    from flows.prefect_api import running_prefect_api
    from tasks.adapters import tracking
    from tasks.common import quiet_user_errors_on_console

    quiet_user_errors_on_console()
    tracking.fail_orphaned_runs(tracking.configure(params), params)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: unwind, close the runs
    try:
        with running_prefect_api(_note):
            summary = transfer_pipeline(params=params)
    except KeyboardInterrupt:
        closed = tracking.end_own_runs(tracking.configure(params), params, "interrupted (SIGTERM or Ctrl-C)")
        err_console.print(f"[bold red]interrupted:[/bold red] {closed} open MLflow run(s) marked KILLED",
                          soft_wrap=True)
        raise typer.Exit(130) from None
    _print_mapping("transfer run", summary)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@app.command()
def rank(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    candidate: Annotated[list[str] | None, typer.Option(
        "--candidate", "-c", help="a source candidate besides pretrain.candidates: random, hub, a weights file, "
        "a model dir, data:<kind or folder>, models:/..., runs:/..., registered (repeatable)")] = None,
    estimator: Annotated[str | None, typer.Option(help="rank by (default pretrain.rank_estimator)")] = None,
) -> None:
    """Score every candidate source on the target's k labels (LogME, LEEP, NCE, H-score), ranked; logged to MLflow."""
    from tasks.rank import candidate_specs, rank_sources
    from transfer import stages
    from transfer.transferability import ESTIMATORS

    params = _params(params_file, overrides)
    specs = candidate_specs(params, candidate)  # a bad spec fails before any data is prepared
    stages.prepare(params, progress=False)
    ranking = rank_sources(params, specs, estimator)
    table = Table("rank", "source", *ESTIMATORS, "seconds", "origin",
                  title=f"sources ranked by {ranking.estimator} on {ranking.n_images} labelled target images")
    for row in ranking.rows:
        table.add_row(str(row["rank"]), escape(row["name"]),
                      *["-" if row[e] is None else f"{row[e]:.4f}" for e in ESTIMATORS],
                      f"{row['seconds']:.2f}", escape(str(row["origin"])))
    Console(width=max(console.width, 140)).print(table)
    console.print(escape(f"best: {ranking.reason}"), soft_wrap=True)


@app.command()
def rollback(params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Point `champion` back at the `previous` version (and vice versa)."""
    from tasks.promote import rollback as do_rollback

    result = do_rollback(_params(params_file, overrides))
    console.print(escape(f"{result['model_name']}: champion -> v{result['champion']}, previous -> v{result['previous']}"))


@app.command()
def runs(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    limit: Annotated[int, typer.Option(help="how many runs")] = 10,
) -> None:
    """Recent pipeline runs from MLflow with their accuracy and promotion outcome."""
    from tasks.adapters import tracking
    from tasks.adapters.history import recent_runs

    params = _params(params_file, overrides)
    tracking.fail_orphaned_runs(tracking.configure(params), params)  # so none reads RUNNING forever
    rows = recent_runs(params, limit)
    columns = {"start": "started", "run_id": "run id", "status": "status", "strategy": "strategy",
               "test_accuracy": "transfer acc [95% CI]", "scratch_test_accuracy": "scratch acc [95% CI]",
               "gain": "gain [95% CI] McNemar p", "promoted": "promoted", "model_name": "model",
               "model_version": "version"}
    table = Table(*columns.values())
    for column in table.columns:
        column.no_wrap = True
    for row in rows:
        table.add_row(*[escape(str(row.get(k, ""))) for k in columns])
    # its natural width, whatever the terminal's: a wide table is never cut or wrapped at 80 columns
    Console(width=10_000).print(table, crop=False)


@app.command()
def serve(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    alias: Annotated[str | None, typer.Option(help="registry alias to serve (default serve.alias)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default serve.port)")] = None,
    host: Annotated[str | None, typer.Option(help="host (default serve.host)")] = None,
    version: Annotated[int | None, typer.Option(help="registry version to serve instead of an alias", min=1)] = None,
    model_uri: Annotated[str | None, typer.Option(
        "--model-uri", "-m", help="any model URI, e.g. models:/<name>/3 or models:/<name>@<alias>")] = None,
) -> None:
    """Serve models:/<name>@<alias> (or a version, or a URI) with MLflow's scoring app (POST /invocations)."""
    from tasks.adapters.serve import serve as run_server
    from tasks.adapters.tracking import tracking_uri

    params = _params(params_file, overrides)
    raise typer.Exit(run_server(
        params, alias=alias, port=port, tracking_uri=tracking_uri(params), host=host, version=version,
        model=model_uri,
    ))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files (PNG/JPEG)", exists=True, dir_okay=False,
                                                 metavar="IMAGE")],
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    alias: Annotated[str | None, typer.Option(help="registry alias (default serve.alias)")] = None,
) -> None:
    """Classify image files offline with the registered model (same code path as the server)."""
    from tasks.adapters.serve import model_uri, predict_files
    from tasks.adapters.tracking import tracking_uri

    params = _params(params_file, overrides)
    rows = predict_files(images, model_uri(params, alias), tracking_uri(params))
    table = Table("image", "label", "probability")
    for row in rows:
        table.add_row(escape(str(row["path"])), escape(str(row["label"])), f"{row['probability']:.3f}")
    console.print(table)


@app.command()
def schedule(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    cron: Annotated[str | None, typer.Option(help='cron expression (default schedule.cron), e.g. "0 3 * * *"')] = None,
) -> None:
    """Serve the retraining flow on a cron schedule (retrains only when the data changed)."""
    from flows.serve_schedule import schedule as serve_schedule
    from flows.serve_schedule import validate_cron

    params = _params(params_file, overrides)
    expression = validate_cron(cron or params.schedule.cron)
    console.print(f"serving the retrain flow on '{escape(expression)}' (Ctrl-C to stop)")
    serve_schedule(params_file, overrides or [], expression)


@app.command()
def report(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    run_id: Annotated[str | None, typer.Option(help="pipeline run id (default: the latest)")] = None,
    out: Annotated[Path, typer.Option(help="output dir")] = Path("artifacts/report"),
    ks: Annotated[str | None, typer.Option(help="labels per class for the sample-efficiency curve "
                                                "(default sweep.ks)")] = None,
    strategies: Annotated[str | None, typer.Option(help="strategies on the curve, scratch always "
                                                        "(default sweep.strategies)")] = None,
    epochs: Annotated[int | None, typer.Option(help="fine-tune epochs for the curve (default sweep.epochs)")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="seeds per curve point (default sweep.seeds)")] = None,
) -> None:
    """HTML + PNG transfer report of a run, also logged to its MLflow run."""
    from tasks.report import report_for_run

    params = _params(params_file, overrides)
    core.log_progress()  # says what it computes: the sweep it reuses, or each point it trains
    paths = report_for_run(params, run_id, out, None if ks is None else [int(k) for k in ks.split(",")],
                           None if strategies is None else [s for s in strategies.split(",") if s], epochs,
                           seeds=seeds)
    for name, path in paths.items():
        console.print(escape(f"{name}: {path}"))


def _print_sense(checks: list[dict[str, Any]]) -> None:
    """The transfer-sense checks (transfer/checks.py), one unwrapped line each."""
    from transfer.checks import describe

    if not checks:
        console.print("transfer-sense checks not evaluated (a dataset manifest is missing)")
        return
    console.print("Does transfer make sense? (thresholds: params.validate)")
    for line in describe(checks):
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def server(
    # the same variables `transfer run` reads to find the server (flows/prefect_api.py)
    host: Annotated[str, typer.Option(envvar="PREFECT_SERVER_API_HOST",
                                      help="address to listen on (loopback: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PREFECT_SERVER_API_PORT",
                                      help="port; `transfer run` looks for a server on PREFECT_SERVER_API_PORT "
                                           "(default 4200)")] = 4200,
) -> None:
    """Keep a local Prefect API running (Ctrl-C stops it): `transfer run` then uses it instead of starting a temporary one."""
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect) if prefect.exists() else "prefect", "server", "start", "--host", host, "--port", str(port)]
    console.print(f"Prefect API on http://{escape(host)}:{port}/api; in another shell, `transfer run` finds it"
                  + ("" if port == 4200 else f" with PREFECT_SERVER_API_PORT={port}"), soft_wrap=True)
    os.execvp(command[0], command)  # the server is Prefect's own; Ctrl-C reaches it directly


# The order `transfer --help` lists the commands in (unlisted ones follow, groups last).
HELP_ORDER = ("validate", "pretrain", "finetune", "baseline", "evaluate", "sweep", "run", "rank", "rollback", "runs", "serve",
              "predict", "schedule", "report", "server")


def composed() -> typer.Typer:
    """The core app with these commands registered on it, in ``HELP_ORDER``."""
    whole = core.new_app()
    commands = [*core.app.registered_commands, *app.registered_commands]
    rank = {name: i for i, name in enumerate(HELP_ORDER)}
    whole.registered_commands = sorted(commands, key=lambda c: rank.get(_name(c), len(rank)))
    whole.registered_groups = [*core.app.registered_groups, *app.registered_groups]
    return whole


def _name(info: Any) -> str:
    return info.name or info.callback.__name__.replace("_", "-")


def main() -> None:
    """Console entry point: process settings first (Prefect reads them when imported)."""
    from flows.runtime import configure_runtime

    configure_runtime()
    core.run_app(composed())


if __name__ == "__main__":
    main()
