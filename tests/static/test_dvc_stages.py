"""dvc.yaml says what each stage reads: the code it imports, the params and files it reads.

Both sides come from the code, never from a list kept by hand:
- code: the project modules a stage's ``transfer ...`` command imports (AST, transitively,
  imports inside functions included: the lazily imported DANN code is the stage's too);
- params and files: each stage command runs for real on tiny data (``stage_reads.py``) with
  a recorder on the params sections and an audit hook on ``open``.
A missing dep or param reruns nothing after a change (a stale model); a dep on code the
stage never imports reruns it for nothing. Each check names what is wrong and where.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TINY_PARAMS, write_yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("transfer", "tasks", "flows")
CLI_MODULES = ("transfer.cli", "flows.cli")  # the core commands, and the glue's


def stages(path: Path = REPO / "dvc.yaml") -> dict[str, dict[str, Any]]:
    return yaml.safe_load(path.read_text())["stages"]


# --------------------------------------------------------------------------- code


def module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _project_modules(names: Iterable[str]) -> set[str]:
    """The project modules among ``names``, with every package on their way (``a.b`` runs ``a``)."""
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] in PACKAGES:
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if module_file(".".join(parts[:i]))}
    return found


def imports_of(nodes: Iterable[ast.AST], module: str) -> set[str]:
    """Project modules imported anywhere inside ``nodes`` (function bodies included)."""
    package = module if module_file(module).name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base_parts = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return _project_modules(names)


def command_function(argv: list[str]) -> tuple[str, str]:
    """The module and the name of the function that ``transfer <argv>`` runs (the console
    command is ``flows/cli.py``'s composition of the core commands and the glue's)."""
    from flows import cli

    def name_of(info: Any) -> str:
        return info.name or info.callback.__name__.replace("_", "-")

    whole = cli.composed()
    groups = {g.name: g.typer_instance for g in whole.registered_groups}
    app, words = (groups[argv[0]], argv[1:]) if argv[0] in groups else (whole, argv)
    for info in app.registered_commands:
        if name_of(info) == words[0]:
            return info.callback.__module__, info.callback.__name__
    raise AssertionError(f"no transfer command {' '.join(argv)}")


def stage_modules(cmd: str) -> set[str]:
    """Every project module ``cmd`` imports: the module-level imports of the CLI module that
    defines its command and that command's body, then the modules those import, transitively
    (of a CLI module only its module-level imports: its other commands are not the stage's)."""
    argv = shlex.split(cmd)
    assert argv[0] == "transfer", f"{cmd!r} is not a transfer command"
    words = [w for w in argv[1:] if not w.startswith("-")][:2]
    module, function = command_function(words)
    tree = ast.parse(module_file(module).read_text())
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
    # the packages on the way run too (``flows.cli`` runs ``flows/__init__.py``)
    seen, todo = {module}, [*_project_modules([module]), *imports_of([*_top_imports(tree), *body], module)]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            tree = ast.parse(module_file(module).read_text())
            todo += imports_of(_top_imports(tree) if module in CLI_MODULES else [tree], module)
    return seen


def _top_imports(tree: ast.Module) -> list[ast.AST]:
    return [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def code_files(modules: Iterable[str]) -> set[str]:
    """Repo-relative files of ``modules``; empty ``__init__.py`` files hold no code."""
    files = {module_file(m) for m in modules}
    return {f.relative_to(REPO).as_posix() for f in files if f.stat().st_size}


def _deps(spec: dict[str, Any]) -> list[str]:
    return [str(d) for d in spec.get("deps", [])]


def _is_code(path: str) -> bool:
    return path.split("/")[0] in PACKAGES


def _under(path: str, dep: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def code_problems(name: str, spec: dict[str, Any], imported: set[str]) -> list[str]:
    """What dvc.yaml gets wrong about the code stage ``name`` imports (empty: nothing)."""
    code_deps = [d for d in _deps(spec) if _is_code(d)]
    problems = [f"stage {name}: imports {f} but dvc.yaml lists no dep on it"
                for f in sorted(imported) if not any(_under(f, d) for d in code_deps)]
    for dep in code_deps:
        target = REPO / dep
        if not target.exists():
            problems.append(f"stage {name}: dep {dep} does not exist")
            continue
        files = [target] if target.is_file() else sorted(target.rglob("*.py"))
        unused = [p.relative_to(REPO).as_posix() for p in files if p.stat().st_size]
        unused = [f for f in unused if f not in imported]
        if unused:
            problems.append(f"stage {name}: dep {dep} holds code the stage never imports "
                            f"({', '.join(unused)}): a change there would rerun it for nothing")
    return problems


def test_every_stage_depends_on_exactly_the_code_it_imports() -> None:
    problems = [p for name, spec in stages().items()
                for p in code_problems(name, spec, code_files(stage_modules(spec["cmd"])))]
    assert not problems, "dvc.yaml code deps:\n" + "\n".join(problems)


def test_the_code_check_catches_drift() -> None:
    spec = stages()["evaluate"]
    imported = code_files(stage_modules(spec["cmd"]))
    assert "transfer/metrics.py" in imported and "transfer/cli.py" in imported
    assert "tasks/validate.py" in code_files(stage_modules(stages()["validate"]["cmd"]))
    drifted = {**spec, "deps": [d for d in _deps(spec) if d != "transfer/metrics.py"] + ["transfer/report.py"]}
    problems = "\n".join(code_problems("evaluate", drifted, imported))
    assert "imports transfer/metrics.py but dvc.yaml lists no dep on it" in problems
    assert "dep transfer/report.py holds code the stage never imports" in problems


# --------------------------------------------------------------------------- params and files


def _covered(read: str, entries: Iterable[str]) -> bool:
    return any(read == e or read.startswith(e + ".") for e in entries)


def param_problems(name: str, spec: dict[str, Any], reads: Iterable[str]) -> list[str]:
    entries = [str(p) for p in spec.get("params", [])]
    reads = sorted(reads)
    problems = [f"stage {name}: reads param {r} but dvc.yaml does not list it"
                for r in reads if not _covered(r, entries)]
    problems += [f"stage {name}: lists param {e} but never reads it"
                 for e in entries if not any(_covered(r, [e]) or _covered(e, [r]) for r in reads)]
    return problems


def _outs(spec: dict[str, Any]) -> list[str]:
    entries = [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries]


# read by a stage but not inputs: dvc tracks params.yaml through `params:`; data/.cache holds
# decoded tensors and dataset stamps derived from data/ and the code (keyed on both);
# artifacts/report/sweep: the sweep's own points (written, read back; keyed the same way)
NOT_INPUTS = ("params.yaml", "data/.cache", "artifacts/report/sweep")


def file_problems(name: str, spec: dict[str, Any], files: Iterable[str]) -> list[str]:
    deps, outs = _deps(spec), _outs(spec)
    inputs = sorted(f for f in files if not any(_under(f, p) for p in (*outs, *NOT_INPUTS)))
    return [f"stage {name}: reads {f} but dvc.yaml lists no dep on it"
            for f in inputs if not any(_under(f, d) for d in deps)]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    """Every stage of dvc.yaml run once on tiny data (1 epoch), recording what it reads."""
    work = tmp_path_factory.mktemp("stages")
    tiny = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "epochs": 1},
            "finetune": {**TINY_PARAMS["finetune"], "epochs": 1}}
    write_yaml(work / "params.yaml", tiny)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("stage_reads.py")), str(REPO / "dvc.yaml"), "reads.json"],
        cwd=work, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"running the stages failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((work / "reads.json").read_text())


@pytest.mark.slow
def test_every_stage_lists_the_params_and_files_it_reads(recorded) -> None:
    assert set(recorded) == set(stages())
    problems = [p for name, spec in stages().items()
                for p in (*param_problems(name, spec, recorded[name]["params"]),
                          *file_problems(name, spec, recorded[name]["files"]))]
    assert not problems, "dvc.yaml params/deps:\n" + "\n".join(problems)


@pytest.mark.slow
def test_the_params_check_catches_drift(recorded) -> None:
    """The drift this test was written for: the baseline trains with label smoothing and
    ``data.channels``, so ``-S data.channels=3`` must rerun it."""
    baseline = recorded["baseline"]
    assert {"finetune.label_smoothing", "data.channels", "runtime.seed"} <= set(baseline["params"])
    assert "data.channels" not in recorded["validate"]["params"]
    spec = stages()["baseline"]
    old = ("finetune.label_smoothing", "data.channels")  # what the baseline's list once lacked
    drifted = {**spec, "params": [p for p in spec["params"] if p not in old] + ["promote"]}
    problems = "\n".join(param_problems("baseline", drifted, baseline["params"]))
    assert "reads param finetune.label_smoothing but dvc.yaml does not list it" in problems
    assert "reads param data.channels but dvc.yaml does not list it" in problems
    assert "lists param promote but never reads it" in problems
    no_data = {**spec, "deps": [d for d in _deps(spec) if d != "data/target"]}
    assert any("reads data/target/" in p for p in file_problems("baseline", no_data, baseline["files"]))


# --------------------------------------------------------------------------- experiments


def _metrics_files() -> list[str]:
    return [next(iter(m)) if isinstance(m, dict) else str(m)
            for spec in stages().values() for m in spec.get("metrics", [])]


def test_experiment_commits_hold_the_metrics_and_autostage_is_off() -> None:
    """`dvc exp show` reads metrics from each experiment's commit: a git-ignored metrics
    file shows as `!`. DVC's autostage would `git add` dvc.lock behind the user's back."""
    files = _metrics_files()
    assert files, "dvc.yaml declares no metrics"
    proc = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.strip() == "", f"git ignores these dvc metrics (exp show prints `!`): {proc.stdout.split()}"
    config = (REPO / ".dvc" / "config").read_text().replace(" ", "").lower()
    assert "autostage=true" not in config, ".dvc/config turns on autostage (stages dvc.lock silently)"
