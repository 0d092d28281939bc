"""The ``transfer`` command.

Stage commands (``data prepare``, ``pretrain``, ``finetune``, ``baseline``, ``evaluate``)
work standalone on files and are what ``dvc.yaml`` calls; ``run`` starts the Prefect flow.
Orchestration/tracking modules are imported inside the commands that need them, so the
core stays importable without Prefect or MLflow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transfer.config import Params, load_params
from transfer.errors import TransferError

app = typer.Typer(help="Transfer-learning pipeline: pretrain on a big source task, fine-tune on a small target.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: materialise and inspect.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", metavar="FILE",
                                          help="params file (YAML, one section per stage)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="SECTION.KEY=VALUE", help="override a param: section.key=value (repeatable)"),
]


def _params(path: Path, overrides: list[str] | None) -> Params:
    if not path.exists():
        _no_params_file(path)
    return load_params(path, overrides or [])


def _no_params_file(path: Path) -> None:
    """A missing default params.yaml means "not in a project": say what is used and where
    state goes; a missing file the user named is an error."""
    if path != Path("params.yaml"):
        raise TransferError(f"params file {path} not found")
    _note(f"no params.yaml in {Path.cwd()}: using the built-in defaults (transfer --help); "
          "data/, artifacts/ and mlruns/ are written here")


def _note(text: str) -> None:
    err_console.print(f"[yellow]note:[/yellow] {escape(text)}", soft_wrap=True)


def _write_json(path: str | Path, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=str))


@data_app.command("prepare")
def data_prepare(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    record_bad: Annotated[bool, typer.Option(
        "--record-bad", help="record unreadable files in the manifest (readable=false) instead of failing; "
        "`transfer validate` then reports them (what dvc.yaml and the flow do)")] = False,
) -> None:
    """Materialise the source and target datasets as ImageFolder trees + manifests under data/."""
    # transfer.data only (what stages.prepare calls), not stages: dvc.yaml's prepare depends
    # on the code it imports, and an edit to the training code must not re-render the data
    from transfer.data import dataset_version, prepare_datasets

    params = _params(params_file, overrides)
    dirs = prepare_datasets(params.data, strict=not (params.data.skip_bad_images or record_bad), progress=True,
                            min_per_split=params.validate_.min_per_class)
    for name, path in dirs.items():
        console.print(f"[green]{name}[/green]: {escape(str(path))} (version {dataset_version(path)[:12]})")


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
def pretrain(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="output dir (source_model/ + checkpoints/)")] = Path("models/source"),
    metrics: Annotated[Path, typer.Option(help="metrics JSON")] = Path("metrics/pretrain.json"),
) -> None:
    """Train the backbone on the source dataset (resumes from the last checkpoint)."""
    from transfer import stages

    from transfer import distributed

    trained = stages.pretrain(_params(params_file, overrides), out)
    if not distributed.is_main():
        return  # under torchrun, rank 0 reports
    _write_json(metrics, {**trained.info, "seconds": trained.seconds})
    console.print(f"source model: {escape(str(trained.model_dir))} (source test accuracy {trained.info['source_test_accuracy']:.4f})")


@app.command()
def finetune(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    source: Annotated[Path, typer.Option(help="source model dir")] = Path("models/source/source_model"),
    out: Annotated[Path, typer.Option(help="output dir (model/ + checkpoints/)")] = Path("models/finetune"),
    strategy: Annotated[str | None, typer.Option(help="override finetune.strategy")] = None,
) -> None:
    """Fine-tune the source model on the target's k labels per class."""
    from transfer import stages

    params = _params(params_file, overrides)
    trained = stages.finetune(params, source, out, strategy=strategy)
    _write_json(out / "history.json", trained.history)
    console.print(escape(f"fine-tuned ({trained.strategy}: {trained.info['reason']}) -> {trained.model_dir}"))


@app.command()
def baseline(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="output dir")] = Path("models/scratch"),
) -> None:
    """Train the same architecture from random init on the same target budget."""
    from transfer import stages

    trained = stages.train_scratch(_params(params_file, overrides), out)
    _write_json(out / "history.json", trained.history)
    console.print(f"scratch baseline -> {escape(str(trained.model_dir))}")


@app.command()
def evaluate(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    model: Annotated[Path, typer.Option(help="fine-tuned model dir")] = Path("models/finetune/model"),
    baseline_model: Annotated[Path | None, typer.Option("--baseline", help="scratch model dir")] = Path("models/scratch/model"),
    out: Annotated[Path, typer.Option(help="metrics/plots dir")] = Path("metrics"),
) -> None:
    """Test-set metrics (accuracy, macro-F1, per-class recall, ECE), confusion matrix, transfer gain."""
    from transfer import stages
    from transfer.plots import plot_transfer_gain

    params = _params(params_file, overrides)
    report = stages.evaluate(params, model, out, name="transfer")
    summary: dict[str, Any] = {
        "accuracy": report["accuracy"], "accuracy_ci_low": report["accuracy_ci"][0],
        "accuracy_ci_high": report["accuracy_ci"][1], "macro_f1": report["macro_f1"],
        "ece": report["ece"], "ece_uncalibrated": report["ece_uncalibrated"], "temperature": report["temperature"],
    }
    if baseline_model is not None and Path(baseline_model).exists():
        scratch = stages.evaluate(params, baseline_model, out, name="scratch")
        gain = stages.transfer_gain(report, scratch, params.promote.alpha)
        summary.update({k: v for k, v in gain.items() if k not in ("gain_ci", "described")},
                       gain_ci_low=gain["gain_ci"][0], gain_ci_high=gain["gain_ci"][1])
        plot_transfer_gain({"scratch": scratch["accuracy"], "transfer": report["accuracy"]},
                           out / "transfer_gain.png", "Test accuracy: scratch vs transfer")
    _write_json(out / "evaluate.json", summary)
    _print_mapping("evaluation", summary)


@app.command()
def run(params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Run the whole Prefect flow: data -> validate -> pretrain -> fine-tune -> evaluate -> promote."""
    params = _params(params_file, overrides)  # bad keys fail here, before anything starts
    from flows.pipeline import transfer_pipeline
    from tasks import tracking
    from tasks.common import quiet_user_errors_on_console

    quiet_user_errors_on_console()
    tracking.fail_orphaned_runs(tracking.configure(params), params)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: unwind, close the runs
    try:
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
    stages.prepare(params, progress=False)
    ranking = rank_sources(params, candidate_specs(params, candidate), estimator)
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
    from tasks import tracking
    from tasks.history import recent_runs

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
    from tasks.serve import serve as run_server
    from tasks.tracking import tracking_uri

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
    from tasks.serve import model_uri, predict_files
    from tasks.tracking import tracking_uri

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
    ks: Annotated[str, typer.Option(help="labels per class for the sample-efficiency curve")] = "1,5,10,50",
    strategies: Annotated[str, typer.Option(help="strategies on the curve (scratch always)")] = "head,full",
    epochs: Annotated[int | None, typer.Option(help="fine-tune epochs for the curve (default finetune.epochs)")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds per curve point (error bars, paired t-test)")] = 3,
) -> None:
    """HTML + PNG transfer report of a run, also logged to its MLflow run."""
    import logging

    from tasks.report import report_for_run

    params = _params(params_file, overrides)
    # say what it computes: a line per sweep point trained (cached ones are reused) and per epoch
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("transfer").addHandler(handler)
    logging.getLogger("transfer").setLevel(logging.INFO)
    _note(f"sample-efficiency sweep: k={ks}, {strategies} and scratch, {seeds} seed(s) per point; "
          f"points already under {params.runtime.artifacts_dir}/report/sweep are reused")
    paths = report_for_run(params, run_id, out, [int(k) for k in ks.split(",")],
                           [s for s in strategies.split(",") if s], epochs, seeds=seeds)
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


def _print_mapping(title: str, data: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in data.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(escape(str(key)), escape(str(value)))
    Console(width=max(console.width, 120)).print(table)  # the CI and p lines fit on one row each


# Offline machines: no usage telemetry from the libraries (each would log a network error);
# the temporary Prefect API migrates its database on first use, which can outlast the 20 s
# default start-up timeout on a 2-core machine.
OFFLINE_ENV = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


METAVARS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH"}


def plain_metavars(command: click.Command) -> click.Command:
    """Click-style metavars in --help (FILE, INTEGER, a flag none), not Typer's Python types
    (``<bool>`` after every flag, ``<list[str]>`` after a repeatable option)."""
    ctx = click.Context(command)
    help_option = command.get_help_option(ctx)
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.metavar is None and hasattr(param, "display_type"):
            shown = re.sub(r"^list\[(.*)\]$", r"\1", param.display_type(ctx).strip("<>")).split()[0]
            param.metavar = METAVARS.get(shown.lower(), shown.upper())
        if param.param_type_name == "argument":  # its name column already shows the metavar
            param.display_type_rich = lambda ctx: None
    for sub in getattr(command, "commands", {}).values():
        plain_metavars(sub)
    return command


def main() -> None:
    """Entry point: user errors print as one line (exit 2), never a traceback."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        plain_metavars(typer.main.get_command(app))()
    except TransferError as error:
        # one line, printed as is: a message may hold [brackets] rich would take for markup
        err_console.print(f"[bold red]error:[/bold red] {escape(one_line(error))}", soft_wrap=True)
        sys.exit(2)


def one_line(error: BaseException) -> str:
    """The message on one line: a user error is one line of the console, whatever its text."""
    return " ".join(str(error).split())


if __name__ == "__main__":
    main()
