"""The core of the ``transfer`` command: the stage commands and the CLI's conventions.

Stage commands (``data prepare``, ``pretrain``, ``finetune``, ``baseline``, ``evaluate``, ``sweep``)
work standalone on files and are what ``dvc.yaml`` calls. The orchestration commands
(``run``, ``validate``, ``serve``, ...) are registered from the glue side (``flows/cli.py``,
the console entry point), so this package imports nothing of Prefect, MLflow, tasks or
flows; ``python -m transfer.cli`` is the core alone (what ``torchrun`` starts).
"""

from __future__ import annotations

import json
import re
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



def new_app() -> typer.Typer:
    """The top-level app's settings: the core app and the composed one share them."""
    return typer.Typer(help="Transfer-learning pipeline: pretrain on a big source task, fine-tune on a small target.",
                       no_args_is_help=True, pretty_exceptions_enable=False)


app = new_app()
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
    strategy: Annotated[str | None, typer.Option(help="override finetune.strategy (`transfer strategies` lists them)")] = None,
) -> None:
    """Fine-tune the source model on the target's k labels per class."""
    from transfer import stages

    params = _params(params_file, overrides)
    trained = stages.finetune(params, source, out, strategy=strategy)
    _write_json(out / "history.json", trained.history)
    console.print(escape(f"fine-tuned ({trained.strategy}: {trained.info['reason']}) -> {trained.model_dir}"))


@app.command()
def strategies() -> None:
    """List the fine-tuning strategies finetune.strategy can name (plus auto)."""
    from transfer.strategies import AUTO, get_strategy, strategy_names

    table = Table("strategy", "trains", "reads")
    table.add_row(AUTO, "picks head / last_k / the auto_above strategy from labels per class", "")
    for name in strategy_names():
        entry = get_strategy(name)
        table.add_row(name, escape(entry.description), "source data too" if entry.needs_source_data else "")
    Console(width=max(console.width, 120)).print(table)


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
def sweep(
    params_file: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None,
    source: Annotated[Path, typer.Option(help="source model dir")] = Path("models/source/source_model"),
    out: Annotated[Path, typer.Option(help="sweep result JSON (`transfer report` reads it)")] = Path(
        "metrics/sweep.json"),
) -> None:
    """Sample-efficiency sweep (params.sweep): accuracy vs labels per class, scratch and each
    strategy, over seeds; a rerun with the same inputs trains nothing."""
    from transfer.sweep import run_sweep

    log_progress()
    result = run_sweep(_params(params_file, overrides), source, out)
    state = "current, nothing trained" if result.reused else f"{result.trained} point(s) trained"
    console.print(escape(f"sweep {result.key}: {result.path} ({state})"))


def log_progress() -> None:
    """What a long command computes, one line each on stderr (``transfer.*`` INFO logs)."""
    import logging

    logger = logging.getLogger("transfer")
    if not any(getattr(h, "transfer_progress", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.transfer_progress = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _print_mapping(title: str, data: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in data.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(escape(str(key)), escape(str(value)))
    Console(width=max(console.width, 120)).print(table)  # the CI and p lines fit on one row each


def main() -> None:
    """The core commands alone (``python -m transfer.cli``, torchrun)."""
    run_app(app)


def run_app(typer_app: typer.Typer) -> None:
    """Run ``typer_app``: user errors print as one line (exit 2), never a traceback."""
    try:
        plain_metavars(typer.main.get_command(typer_app))()
    except TransferError as error:
        # one line, printed as is: a message may hold [brackets] rich would take for markup
        err_console.print(f"[bold red]error:[/bold red] {escape(one_line(error))}", soft_wrap=True)
        sys.exit(2)


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


def one_line(error: BaseException) -> str:
    """The message on one line: a user error is one line of the console, whatever its text."""
    return " ".join(str(error).split())


if __name__ == "__main__":
    main()
