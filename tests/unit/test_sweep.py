"""The sweep stage (``transfer sweep``): keyed on its inputs, a rerun trains nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.unit.test_report import tiny_target  # noqa: F401  (the fixture: 4 stripe classes, tiny_cnn source)
from transfer.config import Params, SweepParams, write_params
from transfer.models import create_model, save_model_dir
from transfer.sweep import Curves, run_sweep, work_dir_of

SETTINGS = {"ks": [1, 4], "strategies": ["head"], "seeds": 1, "epochs": 1}


def _with(params: Params, tmp_path: Path, **sweep) -> Params:
    runtime = params.runtime.model_copy(update={"artifacts_dir": str(tmp_path / "artifacts")})
    return params.model_copy(update={"sweep": SweepParams(**{**SETTINGS, **sweep}), "runtime": runtime})


def _points(params: Params) -> dict[str, int]:
    """Each trained point's dir -> its result's mtime: a retrained point shows as changed."""
    return {p.parent.name: p.stat().st_mtime_ns for p in work_dir_of(params).glob("*/result.json")}


def test_the_sweep_stage_is_keyed_on_its_inputs(tiny_target, tmp_path: Path, caplog) -> None:  # noqa: F811
    base, source_dir = tiny_target
    torch.set_num_threads(1)
    params, out = _with(base, tmp_path), tmp_path / "metrics" / "sweep.json"
    caplog.set_level(logging.INFO, logger="transfer")

    first = run_sweep(params, source_dir, out)
    assert not first.reused and first.trained == 4  # scratch + head, k = 1 and 4, one seed
    stored = json.loads(out.read_text())
    assert stored["key"] == first.key and set(stored["curves"]) == {"scratch", "head"}
    assert Curves.from_json(stored) == first.curves and set(first.curves.floors) >= {"logreg"}
    stamp, points = out.stat().st_mtime_ns, _points(params)

    caplog.clear()
    again = run_sweep(params, source_dir, out)  # same inputs: read back, nothing trains
    assert again.reused and again.trained == 0 and again.key == first.key
    assert "nothing to train" in caplog.text and "training" not in caplog.text
    assert out.stat().st_mtime_ns == stamp and _points(params) == points
    assert dict(again.curves) == dict(first.curves) and again.curves.seeds == first.curves.seeds

    # The stage's output gone, the keyed copy under the work dir still holds it: no training.
    out.unlink()
    copied = run_sweep(params, source_dir, out)
    assert copied.reused and copied.trained == 0 and json.loads(out.read_text())["key"] == first.key

    # One more seed: only its points train; the seed-0 points are read back.
    more = run_sweep(_with(base, tmp_path, seeds=2), source_dir, out)
    assert not more.reused and more.trained == 4 and more.key != first.key
    assert more.curves.seed_list == [0, 1] and json.loads(out.read_text())["key"] == more.key

    # Another source model (other weights): the transfer points train again, scratch does not.
    torch.manual_seed(1234)  # not the init the fixture's source got (training reseeds the RNG)
    other = save_model_dir(create_model("tiny_cnn", 4), tmp_path / "other_source",
                           {"image_size": 12, "channels": 1, "classes": ["0", "1", "2", "3"]})
    assert json.loads((other / "model.json").read_text())["weights_sha256"] != json.loads(
        (Path(source_dir) / "model.json").read_text())["weights_sha256"]
    moved = run_sweep(params, other, out)
    assert not moved.reused and moved.trained == 2 and moved.key != first.key


@pytest.mark.slow  # two CLI processes; run_sweep's reuse is checked in-process above
def test_transfer_sweep_twice_trains_once(tiny_target, tmp_path: Path) -> None:  # noqa: F811
    base, source_dir = tiny_target
    write_params(_with(base, tmp_path), tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    command = [sys.executable, "-m", "flows.cli", "sweep", "--source", str(source_dir)]

    def sweep() -> subprocess.CompletedProcess:
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    first = sweep()
    assert "training head k=4 seed=0" in first.stderr and "4 point(s) trained" in first.stdout
    assert json.loads((tmp_path / "metrics" / "sweep.json").read_text())["curves"]["head"]
    second = sweep()
    assert "nothing to train" in second.stderr and "training" not in second.stderr
    assert "current, nothing trained" in second.stdout


def test_a_bad_sweep_setting_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--set", "sweep.seeds=0"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "sweep.seeds" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("bad", ["sweep.ks=[]", "sweep.epochs=-1"])
def test_sweep_params_are_checked(bad: str) -> None:
    from transfer.config import ConfigError, load_params

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_params(None, [bad])
