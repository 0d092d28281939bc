"""Bad input, as the user sees it: the real `transfer` CLI in a subprocess, one line on
stderr, exit code 2, no traceback, no retry; and nothing stale is validated."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import BIN, REPO, TINY_PARAMS, free_port, write_yaml

pytestmark = pytest.mark.slow


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
               "COLUMNS": "80", **env}
    return subprocess.run([str(BIN / "transfer"), *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback, exactly one `error:` line (returned), printed unwrapped."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _project(path: Path, params: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_yaml(path / "params.yaml", params or TINY_PARAMS)
    return path


# ---------------------------------------------------------------- A: user errors inside the flow


def test_user_error_inside_the_flow_is_one_line_and_not_retried(tmp_path: Path) -> None:
    """k larger than the training split: the validation task fails inside the Prefect flow."""
    proc = _cli(["run", "--set", "finetune.labels_per_class=500"], _project(tmp_path / "p"))
    line = _one_error_line(proc)
    assert "finetune.labels_per_class=500" in line
    assert "[enough images per class in every labelled split]" in line  # E: brackets kept
    assert "Retry" not in proc.stderr  # a retry logs "Retry 1/2 will start"
    assert "Finished in state Failed (the error: line below says why)" in proc.stderr


def test_unreachable_tracking_store_is_one_line_naming_the_uri(tmp_path: Path) -> None:
    """I: a sqlite path under a file, a server nobody answers at; in `transfer runs` and
    `transfer run` (which opens the store before the flow starts)."""
    project = _project(tmp_path / "p")
    (tmp_path / "a-file").write_text("")
    bad_sqlite = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    line = _one_error_line(_cli(["runs"], project, MLFLOW_TRACKING_URI=bad_sqlite))
    assert bad_sqlite in line and "cannot be opened" in line
    server = f"http://127.0.0.1:{free_port()}"
    line = _one_error_line(_cli(["runs"], project, MLFLOW_TRACKING_URI=server))
    assert server in line and "no answer" in line
    proc = _cli(["run"], project, MLFLOW_TRACKING_URI=bad_sqlite)
    assert bad_sqlite in _one_error_line(proc) and "Retry" not in proc.stderr


def test_console_filter_drops_user_error_tracebacks_only() -> None:
    """The filter the CLI installs on Prefect's console handler, on a real handler."""
    from prefect.logging.handlers import PrefectConsoleHandler

    from tasks.common import UserErrorConsoleFilter
    from transfer.errors import DataError

    stream = io.StringIO()
    handler = PrefectConsoleHandler(stream=stream)
    handler.addFilter(UserErrorConsoleFilter())
    logger = logging.getLogger("tests.console_filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for error in (DataError("bad image x.png"), RuntimeError("worker lost")):
            try:
                raise error
            except Exception:
                logger.error("Task run failed with exception: %r", error, exc_info=True,
                             extra={"task_run_id": type(error).__name__})
            logger.error("Finished in state Failed(%r)", str(error), extra={"task_run_id": type(error).__name__})
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "bad image x.png" not in text  # neither traceback nor repeated message
    assert "Finished in state Failed (the error: line below says why)" in text
    assert "Traceback" in text and "RuntimeError: worker lost" in text  # unexpected: full traceback


# ---------------------------------------------------------------- B, F, H: params


def test_path_for_a_kind_without_one_or_missing_is_an_error(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    line = _one_error_line(_cli(["validate", "--set", "data.target.path=/nonexistent"], project))
    assert "data.target.kind=sklearn_digits takes no path" in line
    line = _one_error_line(_cli(["validate", "--set", "data.target.kind=imagefolder",
                                 "--set", "data.target.path=/nonexistent"], project))
    assert "'/nonexistent': no such directory" in line
    assert not (project / "data").exists()


def test_an_unknown_strategy_stops_the_run_before_anything_starts(tmp_path: Path) -> None:
    """config takes any name; the strategy registry rejects it before data, Prefect or MLflow."""
    project = _project(tmp_path / "p")
    line = _one_error_line(_cli(["run", "--set", "finetune.strategy=magic"], project))
    assert line.startswith("error: unknown finetune.strategy 'magic'; known: auto, ") and "gradual" in line
    assert [p.name for p in project.iterdir()] == ["params.yaml"]


def test_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text("data:\n  image_size: 16\n  channels: [1\nfinetune: {}\n")
    proc = _cli(["runs"], project)
    line = _one_error_line(proc)
    assert line == "error: params.yaml:4:9: invalid YAML: expected ',' or ']', but got ':'", line
    assert len(proc.stderr.strip().splitlines()) == 1


def test_outside_a_project_says_which_params_and_where_state_goes(tmp_path: Path) -> None:
    proc = _cli(["runs"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"no params.yaml in {tmp_path}: using the built-in defaults" in proc.stderr
    line = _one_error_line(_cli(["runs", "--params", "missing.yaml"], tmp_path))
    assert "params file missing.yaml not found" in line


# ---------------------------------------------------------------- C, E, G: the user's own data


def _shapes(root: Path, per_class: int = 30) -> Path:
    """4 classes, RGB, odd sizes, half JPEG half PNG."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "cross", "square", "triangle"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(19, 61, 2))
            image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            image[:, :, c % 3] += 120
            image[h // 4 : h // 2, w // 4 : w // 2] = 255 - 40 * c
            Image.fromarray(image).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_own_imagefolder_with_default_params_prepares_and_validates(tmp_path: Path) -> None:
    """The project's params.yaml as shipped, plus only kind and path (source shrunk to
    keep the test short: it is not what is tested)."""
    from transfer.data import read_manifest

    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    shapes = _shapes(tmp_path / "shapes")
    own = ["--set", "data.target.kind=imagefolder", "--set", f"data.target.path={shapes}",
           "--set", "data.source.n=1000"]
    proc = _cli(["data", "prepare", *own], project)
    assert proc.returncode == 0, proc.stderr
    for channels in (1, 3):
        proc = _cli(["validate", *own, "--set", f"data.channels={channels}"], project)
        assert proc.returncode == 0, proc.stderr
        assert "data validation PASSED" in proc.stdout and "not prepared" not in proc.stderr
        assert "[yellow]" not in proc.stdout  # E: markup rendered, never printed
    counts: dict[tuple[str, str], int] = {}
    for row in read_manifest(project / "data" / "target"):
        counts[row.label, row.split] = counts.get((row.label, row.split), 0) + 1
    assert len(counts) == 12 and min(counts.values()) >= 5  # validate.min_per_class per split

    # G: other params name other data: validate prepares and checks *that* (here a corrupt
    # image), never the dataset left in data/ by the command above.
    broken = _shapes(tmp_path / "broken")
    (broken / "cross" / "3.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    proc = _cli(["validate", "--set", "data.target.kind=imagefolder", "--set", f"data.target.path={broken}",
                 "--set", "data.source.n=1000"], project)
    assert "data/target not prepared from these params: preparing first" in proc.stderr
    assert "cross/3.jpg" in _one_error_line(proc)


# ---------------------------------------------------------------- K: interrupted runs


def _start_run_until_pretraining(project: Path) -> tuple[subprocess.Popen, MlflowClient]:
    """`transfer run` in the background, returned once its pretrain MLflow run is RUNNING."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen([str(BIN / "transfer"), "run"], cwd=project, env=env,
                            stdout=(project / "out.txt").open("w"), stderr=(project / "err.txt").open("w"))
    client = MlflowClient(uri, uri)
    for _ in range(300):  # a bound, not a timing assertion
        assert proc.poll() is None, (project / "err.txt").read_text()[-3000:]
        if (project / "mlflow.db").exists() and _runs(client, "tags.stage = 'pretrain'"):
            return proc, client
        time.sleep(1)
    proc.kill()
    raise AssertionError("pretraining never started")


def _runs(client: MlflowClient, filter_string: str = "") -> list:
    experiment = client.get_experiment_by_name("transfer-pipeline")
    return client.search_runs([experiment.experiment_id], filter_string) if experiment else []


def test_sigterm_stops_the_run_and_closes_its_mlflow_runs(tmp_path: Path) -> None:
    proc, client = _start_run_until_pretraining(_project(tmp_path / "p"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "p" / "err.txt").read_text()
    assert "interrupted:" in err and "Traceback" not in err, err[-3000:]
    statuses = {r.info.run_name: r.info.status for r in _runs(client)}
    assert statuses and set(statuses.values()) <= {"FAILED", "KILLED"}, statuses
    assert client.search_registered_models() == []


def test_runs_of_a_killed_process_are_marked_failed_with_a_reason(tmp_path: Path) -> None:
    import psutil

    proc, client = _start_run_until_pretraining(_project(tmp_path / "p"))
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()  # kill -9: no handler runs
    proc.wait(timeout=60)
    for child in children:  # the temporary Prefect API it started outlives it: end it here
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    assert {r.info.status for r in _runs(client)} == {"RUNNING"}
    proc = _cli(["runs"], tmp_path / "p")
    assert proc.returncode == 0, proc.stderr
    for run in _runs(client):
        assert run.info.status == "FAILED"
        assert "ended without closing this run" in run.data.tags["transfer.end_reason"]
