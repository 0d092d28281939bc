"""Run dvc.yaml's stage commands in order and record what each one reads.

``python stage_reads.py dvc.yaml out.json`` (cwd: a folder holding params.yaml) runs every
stage's ``transfer ...`` command in this one process, in file order, with

- a recorder on the params sections: every field read (``section.field``; a whole
  section when it is dumped) is noted against the running stage;
- an audit hook on ``open``: every file opened for reading, relative to the cwd.

and writes ``{stage: {"params": [...], "files": [...]}}``. The finetune stage runs once per
strategy (each takes its own code path, DANN reads the source data too) and its record is
the union. Used by test_dvc_stages.py.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from transfer import config
from transfer.strategies import AUTO, strategy_names

# extra runs of a stage: `--set` overrides, one run each, reads pooled with the plain run's
VARIANTS = {"finetune": [[f"finetune.strategy={s}"] for s in [AUTO, *strategy_names()]]}
DUMPS = {"model_dump", "model_dump_json", "dump"}  # read every field at once


def section_paths() -> dict[type, str]:
    """Each params section class -> its dotted path in params.yaml (``data.source``, ...)."""
    paths: dict[type, str] = {}

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, config._Section):
                path = f"{prefix}{field.alias or name}"
                paths[kind] = path
                walk(kind, path + ".")

    walk(config.Params, "")
    return paths


class Recorder:
    def __init__(self) -> None:
        self.paths = section_paths()
        self.params: set[str] = set()
        self.files: set[str] = set()
        self.cwd = Path.cwd().resolve()
        self.paused = False

    def install(self) -> None:
        recorder, paths = self, self.paths

        def getattribute(obj: Any, name: str) -> Any:
            value = object.__getattribute__(obj, name)
            path = paths.get(type(obj))
            if path is not None and not recorder.paused and not isinstance(value, config._Section):
                if name in type(obj).model_fields:
                    recorder.params.add(f"{path}.{name}")
                elif name in DUMPS:
                    recorder.params.add(path)
            return value

        config._Section.__getattribute__ = getattribute
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], (str, Path)):
            return
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        if any(c in mode for c in "wax+"):
            return
        path = Path(args[0])
        full = path if path.is_absolute() else self.cwd / path
        # only files that exist are read: the import system also probes sys.path entries
        # such as the editable install's path hook, which name no file
        try:
            if not full.is_file():
                return
            relative = full.resolve().relative_to(self.cwd)
        except (ValueError, OSError):
            return
        self.files.add(relative.as_posix())

    def pausing(self, load: Any) -> Any:
        """``load`` with recording off: validators read fields while params are built."""

        def loaded(*args: Any, **kwargs: Any) -> Any:
            self.paused = True
            try:
                return load(*args, **kwargs)
            finally:
                self.paused = False

        return loaded

    def take(self) -> dict[str, list[str]]:
        taken = {"params": sorted(self.params), "files": sorted(self.files)}
        self.params, self.files = set(), set()
        return taken


def run_stages(dvc_yaml: Path) -> dict[str, dict[str, list[str]]]:
    from typer.main import get_command

    from flows.cli import composed
    from transfer import cli
    from transfer.data import clear_memory_cache

    command = get_command(composed())
    recorder = Recorder()
    recorder.install()
    cli.load_params = recorder.pausing(cli.load_params)
    out = {}
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        argv = shlex.split(stage["cmd"])
        assert argv[0] == "transfer", f"stage {name}: {stage['cmd']!r} is not a transfer command"
        for overrides in [[], *VARIANTS.get(name, [])]:
            clear_memory_cache()  # each run reads its inputs as a fresh `dvc repro` process would
            sets = [arg for override in overrides for arg in ("--set", override)]
            command.main([*argv[1:], *sets], prog_name="transfer", standalone_mode=False)
        out[name] = recorder.take()
    return out


if __name__ == "__main__":
    result = run_stages(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1))
