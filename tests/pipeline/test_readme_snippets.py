"""The README's snippets, run as written from a project root after a (tiny) `transfer run`.

`make run` is `transfer run` after the install: the test runs that in a fresh DVC repo with
the tiny params and MLflow's default store (no MLFLOW_TRACKING_URI), then the README's Python
snippet and the `transfer` lines of its "Using it" block, each exactly as the README spells it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

pytestmark = pytest.mark.slow

README = (REPO / "README.md").read_text()
# Lines of "Using it" not run here, and why (each is covered by its own pipeline test).
NOT_RUN = {
    "source .venv/bin/activate": "the venv this test already runs in",
    "transfer run --set finetune.strategy=head --set finetune.labels_per_class=5":
        "a second training run: tests/pipeline/test_pipeline.py",
    "transfer rollback": "needs a previous champion: tests/pipeline/test_pipeline.py",
}


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def section(title: str, text: str = README) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def commands(block: str) -> list[str]:
    """Each line without its trailing comment."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    # as a newcomer has it: no URI set (an earlier test's mlflow.set_tracking_uri exported both)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(name, None)
    return env


def _sh(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    argv[0] = str(BIN / argv[0])  # this venv's `transfer`
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1800)


def test_the_readme_names_the_snippets_this_test_runs() -> None:
    python = blocks("python")
    assert len(python) == 1 and "models:/digits-transfer@champion" in python[0]
    using = commands(blocks("bash", section("Using it"))[0])
    assert set(NOT_RUN) <= set(using), using
    assert {"transfer --help", "transfer runs", "transfer validate"} <= set(using) - set(NOT_RUN)


def test_readme_snippets_work_as_written_after_a_run(dvc_repo: Path) -> None:
    first = _sh("transfer run", dvc_repo)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (dvc_repo / "mlruns" / "mlflow.db").is_file()
    log = first.stdout + first.stderr  # progress: one line per training epoch through Prefect's log
    assert re.search(r"Task run 'pretrain-source-\w+' - pretrain \(source\): epoch 4/4 loss ", log), log[-3000:]

    snippet = blocks("python")[0]
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=dvc_repo, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    assert "label" in printed and "probabilities" in printed, printed
    assert len(re.findall(r"^\d+\s", printed, flags=re.M)) == 3, printed  # one row per image
    assert not (dvc_repo / "mlflow.db").exists(), "the snippet created an empty store in the project root"

    for line in commands(blocks("bash", section("Using it"))[0]):
        if line in NOT_RUN:
            continue
        result = _sh(line, dvc_repo)
        assert result.returncode == 0, f"{line}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert not (dvc_repo / "mlflow.db").exists()
