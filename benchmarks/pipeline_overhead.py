"""Orchestration + tracking overhead: the full ``transfer run`` flow vs the core alone.

Both paths do the same work from nothing (render/prepare the data, pretrain the source,
fine-tune, train the scratch baseline, evaluate both) in fresh temp directories, in one
process: first the core functions called directly (plain PyTorch + our stages, no
Prefect, no MLflow, no GX, no DVC), then the Prefect flow with MLflow tracking, GX
validation, model logging and registry promotion. The ratio is flow / core, for the
first flow run in a process (it also starts the temporary Prefect API and creates the
MLflow schema) and for later runs (what a scheduled or served deployment pays).

    python benchmarks/pipeline_overhead.py [--set finetune.epochs=10 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from transfer import stages
from transfer.config import Params, load_params

RESULTS = Path(__file__).parent / "results"


@contextmanager
def fresh_dir() -> Iterator[Path]:
    before = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(before)


def core_only(params: Params) -> float:
    started = time.perf_counter()
    stages.prepare(params, strict=False, progress=False)
    source = stages.pretrain(params, "artifacts/source", progress=False)
    tuned = stages.finetune(params, source.model_dir, "artifacts/finetune", progress=False)
    scratch = stages.train_scratch(params, "artifacts/scratch", progress=False)
    stages.evaluate(params, tuned.model_dir, "artifacts/eval", name="transfer")
    stages.evaluate(params, scratch.model_dir, "artifacts/eval", name="scratch")
    return time.perf_counter() - started


def full_flow(params: Params, tracking_db: Path) -> tuple[float, dict]:
    """Seconds for one ``transfer_pipeline`` run in the current (fresh) directory.

    The first call in the process also pays the imports and the temporary Prefect API's
    start; the first on a new ``tracking_db`` pays MLflow's schema creation.
    """
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tracking_db}"
    started = time.perf_counter()
    from flows.pipeline import transfer_pipeline  # noqa: PLC0415 (import cost counts as overhead)

    summary = transfer_pipeline(params=params)
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--repeats", type=int, default=2, help="core runs and warm flow runs")
    args = parser.parse_args()
    params = load_params(Path(args.params).resolve(), args.overrides)
    cores = []
    for _ in range(args.repeats):
        with fresh_dir():
            cores.append(core_only(params))
    with tempfile.TemporaryDirectory(prefix="overhead-mlflow-") as store:
        db = Path(store) / "mlflow.db"
        with fresh_dir():  # every run starts from nothing: the source-model cache key differs
            cold, summary = full_flow(params, db)
        warms = []
        for _ in range(args.repeats):
            with fresh_dir():
                seconds, summary = full_flow(params, db)
                if summary["source_reused"]:
                    raise SystemExit("the warm run reused a cached source model: not the same work")
                warms.append(seconds)
    core, warm = statistics.median(cores), statistics.median(warms)
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
        f"default params{' + ' + ', '.join(args.overrides) if args.overrides else ''}. "
        f"Every run from nothing (data rendered, source pretrained) in a fresh directory; "
        f"core and warm-flow rows are medians of {args.repeats}.",
        "",
        "| path | wall time (s) | ratio vs core |",
        "|---|---|---|",
        f"| core stages alone (no Prefect/MLflow/GX/DVC) | {core:.1f} | 1.00 |",
        f"| `transfer run` flow, first in a process (imports, temporary Prefect API start, "
        f"MLflow schema creation) | {cold:.1f} | {cold / core:.2f} |",
        f"| `transfer run` flow, Prefect API up and MLflow store existing | {warm:.1f} | {warm / core:.2f} |",
        "",
        f"Runs (s): core {', '.join(f'{c:.1f}' for c in cores)}; warm flow {', '.join(f'{w:.1f}' for w in warms)}.",
        f"Last flow result: {summary['strategy']} transfer accuracy {summary['transfer_accuracy']:.3f} vs scratch "
        f"{summary['scratch_accuracy']:.3f}, promoted={summary['promoted']}.",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_overhead.md").write_text(table + "\n")
    (RESULTS / "pipeline_overhead.json").write_text(json.dumps(
        {"core_seconds": cores, "flow_cold_seconds": cold, "flow_warm_seconds": warms,
         "ratio_cold": cold / core, "ratio_warm": warm / core, "summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
