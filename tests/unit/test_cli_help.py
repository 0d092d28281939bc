"""`transfer ... --help` reads like a CLI: click-style metavars, not Typer's Python types."""

from __future__ import annotations

import re

import click
import typer
from click.testing import CliRunner

from flows.cli import composed
from transfer.cli import plain_metavars

# Typer 0.29 prints the annotation: `--help <bool>`, `--set <list[str]>`, `--out <path>`
PYTHON_TYPE = re.compile(r"<(bool|str|int|float|path|Path|list\[[^\]]*\]|int range)>")


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


def test_every_help_page_has_plain_metavars() -> None:
    command = plain_metavars(typer.main.get_command(composed()))
    runner = CliRunner()
    pages = {}
    for path in _commands(command):
        result = runner.invoke(command, [*path, "--help"], env={"COLUMNS": "120"}, prog_name="transfer")
        assert result.exit_code == 0, result.output
        pages[" ".join(path)] = result.output
    assert len(pages) > 10  # every command and the data sub-app
    for name, text in pages.items():
        assert not PYTHON_TYPE.search(text), f"transfer {name} --help:\n{text}"
    run = pages["run"]
    assert re.search(r"--set\s+-s\s+SECTION\.KEY=VALUE", run) and re.search(r"--params\s+-p\s+FILE", run)
    assert re.search(r"--help\s+Show this message", run)  # a flag takes no value
    assert re.search(r"--seeds\s+INTEGER \[x>=1\]", pages["report"])
    assert re.search(r"--record-bad\s+record unreadable", pages["data prepare"])
