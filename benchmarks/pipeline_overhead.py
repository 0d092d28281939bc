"""Orchestration overhead: what `transfer run` costs beyond the bare stages, and where.

Totals, side by side in one run, every run from nothing (data rendered, source pretrained,
every seed of fine-tune and scratch trained and scored) in a fresh directory:
- **bare stages**: the core functions alone in a fresh interpreter (no Prefect, MLflow, GX,
  DVC), timed from outside like the others, so interpreter start and torch import count;
- **cold** `transfer run`: a fresh interpreter, a new MLflow store, no Prefect API running
  (imports, Prefect's temporary API start, MLflow schema creation all count);
- **warm** `transfer run`: a kept local Prefect API (`transfer server`, found on
  PREFECT_SERVER_API_PORT) and an existing MLflow store.

Components, each on its own in the same run: interpreter imports (each library in a fresh
interpreter), the temporary Prefect API start, MLflow store creation, `dvc repro prepare`
and `dvc status` on an unchanged workspace against the stat fast path that now answers
instead, GX validation (first in a process and later), and per flow task its time in the
warm runs against the bare stage it wraps (the difference is tracking, plots, logging and
registering the model, and Prefect's task engine).

    python benchmarks/pipeline_overhead.py [--repeats 3] [--quick] [--scale 10] [--set k=v ...]

``--quick``: one repeat on a smaller workload (a smoke run of the benchmark itself).
``--scale K``: also measure bare stages vs warm run with K times the training epochs
(pretrain and fine-tune; the same data), where the fixed cost weighs less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(REPO))

from flows.runtime import RUNTIME_ENV, configure_runtime  # noqa: E402
from transfer.config import Params, load_params  # noqa: E402

QUICK = ["pretrain.epochs=1", "finetune.epochs=5", "finetune.seeds=1", "data.source.n=2000"]
IMPORTS = {"prefect": "prefect", "mlflow": "mlflow", "dvc": "dvc.repo", "great_expectations": "great_expectations",
           "the whole flow (flows.pipeline)": "flows.pipeline", "core: transfer.stages (torch; not overhead)":
           "transfer.stages"}
# a flow task -> the bare stages it wraps (core_stages' keys)
TASK_CORE = {"version-data": ["prepare"], "pretrain-source": ["pretrain"], "finetune-target": ["finetune"],
             "scratch-baseline": ["scratch"], "evaluate": ["evaluate"]}


# --------------------------------------------------------------------------- helpers


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def cell(stat: dict[str, Any]) -> str:
    return f"{stat['median']:.2f} ({stat['min']:.2f}-{stat['max']:.2f})"


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, **RUNTIME_ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out.pop("PREFECT_API_URL", None)
    return {**out, **extra}


def timed_process(cmd: list[str], cwd: Path, environ: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def python_seconds(code: str, environ: dict[str, str], cwd: Path = REPO) -> float:
    """A number the snippet prints last, run in a fresh interpreter."""
    _, out = timed_process([sys.executable, "-c", code], cwd, environ)
    return float(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_project(base: Path, name: str, params: Params) -> Path:
    folder = base / name
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(params.dump(), sort_keys=False))
    return folder


# --------------------------------------------------------------------------- totals

CORE = """
import json, sys, time
started = time.perf_counter()
from transfer import stages
from transfer.config import load_params
params = load_params("params.yaml")
seconds = {"imports": time.perf_counter() - started}
def timed(name, fn):
    t = time.perf_counter(); out = fn(); seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t; return out
timed("prepare", lambda: stages.prepare(params, strict=False, progress=False))
source = timed("pretrain", lambda: stages.pretrain(params, "artifacts/source", progress=False))
tuned = [timed("finetune", lambda s=s: stages.finetune(params.with_seed(s), source.model_dir, f"artifacts/ft{s}",
                                                        progress=False)) for s in params.seeds()]
scratch = [timed("scratch", lambda s=s: stages.train_scratch(params.with_seed(s), f"artifacts/sc{s}", progress=False))
           for s in params.seeds()] if params.finetune.scratch_baseline else []
for i, model in enumerate([*tuned, *scratch]):
    timed("evaluate", lambda: stages.evaluate(params, model.model_dir, "artifacts/eval", name=f"m{i}", plots=i == 0))
print(json.dumps(seconds))
"""


def bare_stages(base: Path, params: Params, i: int) -> tuple[float, dict[str, float]]:
    project = fresh_project(base, f"core-{i}", params)
    seconds, out = timed_process([sys.executable, "-c", CORE], project, env())
    return seconds, json.loads(out.strip().splitlines()[-1])


def transfer_run(base: Path, params: Params, name: str, environ: dict[str, str]) -> float:
    project = fresh_project(base, name, params)
    seconds, out = timed_process([sys.executable, "-m", "flows.cli", "run"], project, environ)
    if "source_reused" in out and "True" in out.split("source_reused", 1)[1].splitlines()[0]:
        raise SystemExit(f"{name} reused a cached source model: not the same work")
    return seconds


class KeptPrefectAPI:
    """`transfer server` on a free port, as a user keeps it running."""

    def __init__(self, environ: dict[str, str], log: Path) -> None:
        self.environ, self.log = environ, log
        self.url = f"http://127.0.0.1:{environ['PREFECT_SERVER_API_PORT']}/api"

    def __enter__(self) -> KeptPrefectAPI:
        from flows.prefect_api import answers

        started = time.perf_counter()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "server", "--port", self.environ["PREFECT_SERVER_API_PORT"]],
                env=self.environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while not answers(self.url, timeout=2):
            if self.proc.poll() is not None or time.perf_counter() - started > 300:
                raise SystemExit(f"transfer server did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        self.start_seconds = time.perf_counter() - started
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def task_seconds(api_url: str, runs: int) -> dict[str, list[float]]:
    """Per flow task (and the whole flow), seconds in each of the last ``runs`` flow runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out: dict[str, list[float]] = {}
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=runs)
        for flow_run in flow_runs:
            per_task: dict[str, float] = {}
            for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))):
                if task_run.start_time and task_run.end_time:
                    name = task_run.name.rsplit("-", 1)[0]  # "finetune-a1b": one row per task
                    per_task[name] = per_task.get(name, 0.0) + (task_run.end_time - task_run.start_time).total_seconds()
            per_task["(whole flow)"] = (flow_run.end_time - flow_run.start_time).total_seconds()
            for name, seconds in per_task.items():
                out.setdefault(name, []).append(seconds)
    return out


# --------------------------------------------------------------------------- components


def import_costs(repeats: int) -> dict[str, dict[str, Any]]:
    code = "import time; t = time.perf_counter(); import {0}; print(time.perf_counter() - t)"
    return {f"import {label} (fresh interpreter)": spread([python_seconds(code.format(module), env())
                                                          for _ in range(repeats)])
            for label, module in IMPORTS.items()}


PREFECT_START = """
import time
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
t = time.perf_counter(); server.start(timeout=300); seconds = time.perf_counter() - t
server.stop()
print(seconds)
"""


def prefect_start_costs(base: Path, repeats: int) -> dict[str, dict[str, Any]]:
    home = base / "prefect-home-api"
    first = python_seconds(PREFECT_START, env(PREFECT_HOME=str(home)))
    later = [python_seconds(PREFECT_START, env(PREFECT_HOME=str(home))) for _ in range(repeats)]
    return {"temporary Prefect API start, new database (first ever: migration)": spread([first]),
            "temporary Prefect API start, database existing (every cold run)": spread(later)}


MLFLOW_STORE = """
import os, sys, time
from transfer.config import load_params
from tasks.adapters import tracking
params = load_params(sys.argv[1])
t = time.perf_counter(); tracking.configure(params); print(time.perf_counter() - t)
"""


def mlflow_store_costs(base: Path, params_file: Path, repeats: int) -> dict[str, dict[str, Any]]:
    """A new sqlite store (schema creation), and opening an existing one, in fresh processes."""
    new, existing = [], []
    for i in range(repeats):
        uri = f"sqlite:///{base / f'mlflow-{i}' / 'mlflow.db'}"
        (base / f"mlflow-{i}").mkdir()
        for bucket in (new, existing):
            _, out = timed_process([sys.executable, "-c", MLFLOW_STORE, str(params_file)], REPO,
                                   env(MLFLOW_TRACKING_URI=uri))
            bucket.append(float(out.strip().splitlines()[-1]))
    return {"MLflow store creation (new sqlite: schema, experiment)": spread(new),
            "MLflow store opening (existing; once per process)": spread(existing)}


def dvc_costs(base: Path, params: Params, repeats: int) -> dict[str, dict[str, Any]]:
    """An unchanged DVC workspace: `dvc repro prepare`, `dvc status`, and the fast path."""
    from tasks import data as data_stage

    repo = base / "dvc-repo"
    repo.mkdir()
    environ = env()
    for cmd in (["git", "init", "-q"], [data_stage.dvc_executable(), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, env=environ, capture_output=True)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    for package in ("transfer", "tasks", "flows"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params.dump(), sort_keys=False))
    dvc = [data_stage.dvc_executable()]
    first, _ = timed_process([*dvc, "repro", "prepare"], repo, environ)
    repro = [timed_process([*dvc, "repro", "prepare"], repo, environ)[0] for _ in range(repeats)]
    status = [timed_process([*dvc, "status", "prepare"], repo, environ)[0] for _ in range(repeats)]
    data_stage._record_repro_state(repo)

    def fast() -> float:
        t = time.perf_counter()
        assert data_stage.repro_unchanged(repo), "the fast path missed an unchanged workspace"
        return time.perf_counter() - t

    return {"`dvc repro prepare`, first (renders the data: core work)": spread([first]),
            "`dvc repro prepare`, unchanged workspace (before: every run)": spread(repro),
            "`dvc status prepare`, unchanged workspace": spread(status),
            "fast path: stat walk of deps/outs vs the last repro (now: every unchanged run)":
                spread([fast() for _ in range(repeats)])}


GX = """
import sys, time
from transfer.config import load_params
from transfer import stages
params = load_params("params.yaml")
stages.prepare(params, strict=False, progress=False)
import great_expectations  # its import is measured apart
from tasks.validate import validate_stage
for i in range({repeats} + 1):
    t = time.perf_counter(); validate_stage(params, f"reports/v{{i}}"); print(time.perf_counter() - t)
"""


def gx_costs(base: Path, params: Params, repeats: int) -> dict[str, dict[str, Any]]:
    project = fresh_project(base, "gx", params)
    _, out = timed_process([sys.executable, "-c", GX.format(repeats=repeats)], project, env())
    seconds = [float(line) for line in out.strip().splitlines()[-(repeats + 1):]]
    return {"GX validation of both datasets, first in a process (context, suites)": spread(seconds[:1]),
            "GX validation of both datasets, later in the process": spread(seconds[1:])}


# --------------------------------------------------------------------------- report


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every measurement; ``save`` gets the result so far after each (a long run on a busy
    machine leaves what it measured)."""
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    params = load_params(Path(args.params).resolve(), overrides)
    repeats = 1 if args.quick and args.repeats is None else (args.repeats or 3)
    result: dict[str, Any] = {"load_start": loadavg(), "repeats": repeats, "overrides": overrides,
                              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        base = Path(tmp)
        (base / "params.yaml").write_text(yaml.safe_dump(params.dump(), sort_keys=False))
        components: dict[str, dict[str, Any]] = {}
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("imports", lambda: import_costs(repeats)),
            ("prefect", lambda: prefect_start_costs(base, repeats)),
            ("mlflow", lambda: mlflow_store_costs(base, base / "params.yaml", repeats)),
            ("dvc", lambda: dvc_costs(base, params, repeats)),
            ("gx", lambda: gx_costs(base, params, repeats)),
        ]
        result["totals"] = {}  # first: the figures the targets are about
        if not args.components_only:
            totals(base, params, repeats, result["totals"], lambda: save(result))
        result["components"] = components
        for name, step in steps:
            print(f"measuring {name} ...", flush=True)
            components.update(step())
            save(result)
        if args.scale:
            scaled = load_params(Path(args.params).resolve(), [
                *overrides, f"pretrain.epochs={params.pretrain.epochs * args.scale}",
                f"finetune.epochs={params.finetune.epochs * args.scale}"])
            result["scaled"] = {"scale": args.scale}
            totals(base / "scaled", scaled, 1, result["scaled"], lambda: save(result), cold=False)
    result["load_end"] = loadavg()
    return result


def totals(base: Path, params: Params, repeats: int, out: dict[str, Any], save: Callable[[], None],
           cold: bool = True) -> None:
    """Bare stages, cold and warm `transfer run` into ``out``, interleaved (bare, cold, warm)
    per repeat: load that drifts during the run weighs on the three alike, and a run stopped
    early still holds whole triples."""
    base.mkdir(exist_ok=True)
    no_api_port = str(free_port())  # nothing listens there: a cold run starts a temporary API
    home = base / "prefect-home"
    warm_env = env(PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(free_port()),
                   MLFLOW_TRACKING_URI=f"sqlite:///{base / 'warm-store' / 'mlflow.db'}")
    runs: dict[str, list[float]] = {"bare": [], "cold": [], "warm": []}
    stages: list[dict[str, float]] = []
    with KeptPrefectAPI(warm_env, base / "server.log") as api:
        out["kept_api_start"] = api.start_seconds
        subprocess.run([sys.executable, "-c", MLFLOW_STORE, str(base / "params.yaml")], env=warm_env, check=True,
                       capture_output=True)  # the store exists before the first warm run
        cold_home = base / "prefect-home-cold"  # its own database: never the kept server's
        if cold:  # a user's database exists after their first run: migrate it here, once
            out["cold_home_first_api_start"] = python_seconds(PREFECT_START, env(PREFECT_HOME=str(cold_home)))
        for i in range(repeats):
            print(f"repeat {i + 1}/{repeats}: bare stages ...", flush=True)
            seconds, per_stage = bare_stages(base, params, i)
            runs["bare"].append(seconds)
            stages.append(per_stage)
            if cold:
                print(f"repeat {i + 1}/{repeats}: cold transfer run ...", flush=True)
                runs["cold"].append(transfer_run(base, params, f"cold-{i}", env(
                    PREFECT_HOME=str(cold_home), PREFECT_SERVER_API_PORT=no_api_port,
                    MLFLOW_TRACKING_URI=f"sqlite:///{base / f'cold-store-{i}' / 'mlflow.db'}")))
            print(f"repeat {i + 1}/{repeats}: warm transfer run ...", flush=True)
            runs["warm"].append(transfer_run(base, params, f"warm-{i}", warm_env))
            out.update({name: spread(values) for name, values in runs.items() if values})
            out["bare_stages"] = {k: spread([s[k] for s in stages]) for k in stages[0]}
            out["warm_tasks"] = {k: spread(v) for k, v in task_seconds(api.url, i + 1).items()}
            save()


def markdown(result: dict[str, Any]) -> str:
    """The tables; a partial result (a run stopped early) renders what it holds."""
    t = result["totals"]
    end = result.get("load_end") or f"{result.get('load_now')} when stopped (partial run)"
    if "bare" not in t:
        return "\n".join([f"Machine: {result['machine']}; load average (1, 5, 15 min) {result['load_start']} at "
                          f"start, {end} at end. Medians of {result['repeats']} (min-max).",
                          *_component_lines(result)]) + "\n"
    bare = t["bare"]["median"]
    lines = [
        f"Machine: {result['machine']}; shared with other work: load average (1, 5, 15 min) "
        f"{result['load_start']} at start, {end} at end. Medians of {result['repeats']} "
        f"(min-max); params.yaml{' + ' + ', '.join(result['overrides']) if result['overrides'] else ''}.",
        "",
        "Totals: every run from nothing in a fresh directory and a fresh interpreter, timed from outside.",
        "",
        "| path | wall time (s) | ratio | target |",
        "|---|---|---|---|",
        f"| bare stages (core functions only) | {cell(t['bare'])} | 1.00 | |",
    ]
    if "cold" in t:
        lines.append(f"| cold `transfer run` (new MLflow store, temporary Prefect API) | {cell(t['cold'])} | "
                     f"**{t['cold']['median'] / bare:.2f}** | <= 1.25 |")
    if "warm" not in t:
        return "\n".join([*lines, "", "(stopped before the warm runs)", *_component_lines(result)]) + "\n"
    lines += [
        f"| warm `transfer run` (kept `transfer server`, existing store) | {cell(t['warm'])} | "
        f"**{t['warm']['median'] / bare:.2f}** | <= 1.10 |",
        "",
        f"Fixed per-run overhead: cold {t.get('cold', t['warm'])['median'] - bare:+.1f} s, "
        f"warm {t['warm']['median'] - bare:+.1f} s. The kept API took {t['kept_api_start']:.1f} s to start, once.",
    ]
    if "warm" in result.get("scaled", {}):
        s = result["scaled"]
        lines.append(f"At {s['scale']}x the training epochs (same data): bare {s['bare']['median']:.1f} s, warm "
                     f"{s['warm']['median']:.1f} s, ratio **{s['warm']['median'] / s['bare']['median']:.2f}**.")
    else:
        scale = 10
        train = sum(t["bare_stages"][k]["median"] for k in ("pretrain", "finetune", "scratch"))
        grown = bare + (scale - 1) * train
        lines.append(f"At {scale}x the training work (extrapolated, not measured: training "
                     f"{train:.1f} s of the bare {bare:.1f} s grows {scale}x, the overhead stays): warm ratio "
                     f"{(grown + t['warm']['median'] - bare) / grown:.2f}, cold "
                     f"{(grown + t.get('cold', t['warm'])['median'] - bare) / grown:.2f}.")
    lines += _component_lines(result)
    lines += ["", "Flow tasks in the warm runs against the bare stages they wrap (the difference: MLflow runs, "
              "params, curves and plots, model logging and registration, Prefect's task engine):", "",
              "| task | flow (s) | bare stage (s) | overhead (s) |", "|---|---|---|---|"]
    for name, stat in sorted(t["warm_tasks"].items(), key=lambda kv: -kv[1]["median"]):
        core = sum(t["bare_stages"][k]["median"] for k in TASK_CORE.get(name, []) if k in t["bare_stages"])
        core_cell = f"{core:.2f}" if name in TASK_CORE else "-"
        over = stat["median"] - core if name != "(whole flow)" else stat["median"] - (bare - t["bare_stages"]["imports"]["median"])
        lines.append(f"| {name} | {cell(stat)} | {core_cell} | {over:+.2f} |")
    lines.append("")
    lines.append("Bare stages (s, median): " + ", ".join(f"{k} {v['median']:.2f}" for k, v in t["bare_stages"].items()))
    return "\n".join(lines) + "\n"


def _component_lines(result: dict[str, Any]) -> list[str]:
    lines = ["", "Components, each measured on its own:", "", "| component | seconds |", "|---|---|"]
    return lines + [f"| {name} | {cell(stat)} |" for name, stat in result.get("components", {}).items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller workload, one repeat: a smoke run")
    parser.add_argument("--scale", type=int, default=0, help="also measure at K times the training epochs")
    parser.add_argument("--out", default=None, help="results stem (default results/pipeline_overhead[_quick])")
    parser.add_argument("--components-only", action="store_true", help="only the per-component costs")
    parser.add_argument("--render", default=None, help="only write the tables of this (partial) result JSON")
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return
    configure_runtime()
    stem = Path(args.out) if args.out else RESULTS / ("pipeline_overhead_quick" if args.quick else "pipeline_overhead")
    stem.parent.mkdir(parents=True, exist_ok=True)
    partial = stem.with_name(stem.name + ".partial.json")

    def save(result: dict[str, Any]) -> None:
        partial.write_text(json.dumps({**result, "load_now": loadavg()}, indent=2, default=str))

    result = run(args, save)
    partial.unlink(missing_ok=True)
    text = markdown(result)
    print(text)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
