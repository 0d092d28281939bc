"""The core stays core: no module of ``transfer/`` imports the orchestration glue or its
libraries, at import time or inside a function.

Two checks, since each misses what the other sees: the AST of every module (lazy imports
inside functions included, which importing never runs), and importing every module for
real in a fresh interpreter (what a module pulls in through a third party counts too).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

CORE = REPO / "transfer"
GLUE = ("prefect", "mlflow", "tasks", "flows", "great_expectations", "dvc")


def core_modules() -> list[str]:
    """Every module of the core package, by dotted name (packages included)."""
    names = []
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def glue_imports(path: Path) -> list[str]:
    """``line: name`` of every absolute import in ``path`` whose top package is glue."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue  # relative imports stay inside transfer/
        found += [f"{node.lineno}: {name}" for name in names if name.split(".")[0] in GLUE]
    return found


def test_the_walk_covers_every_module() -> None:
    modules = core_modules()
    assert "transfer.cli" in modules and "transfer.data" in modules and "transfer.techniques" in modules
    assert len(modules) == len(list(CORE.rglob("*.py")))


def test_no_core_module_names_the_glue() -> None:
    problems = {str(p.relative_to(REPO)): glue_imports(p) for p in sorted(CORE.rglob("*.py"))}
    problems = {path: lines for path, lines in problems.items() if lines}
    assert not problems, f"core modules importing orchestration code: {problems}"


def test_the_static_check_sees_a_lazy_glue_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import json\n\ndef f():\n    from tasks.adapters.tracking import configure\n    import mlflow.pyfunc\n")
    assert glue_imports(module) == ["4: tasks.adapters.tracking", "5: mlflow.pyfunc"]


IMPORT_EACH = """
import importlib, json, sys
glue = {glue!r}
pulled = {{}}
for name in {modules!r}:
    importlib.import_module(name)
    new = sorted(m for m in sys.modules if m.split('.')[0] in glue and m not in pulled.values())
    if new:
        pulled[name] = new[0]
print(json.dumps(pulled))
"""


def test_importing_every_core_module_loads_no_glue() -> None:
    """One interpreter imports the modules one by one and notes which first pulls in glue
    (the same verdict as a fresh interpreter per module, at a fraction of the start-ups)."""
    code = IMPORT_EACH.format(glue=GLUE, modules=core_modules())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
