"""Orchestration + tracking overhead: the full ``transfer run`` flow vs the core alone.

Both paths do the same work from nothing (render/prepare the data, pretrain the source,
fine-tune, train the scratch baseline, evaluate both) in fresh temp directories, in one
process: first the core functions called directly (plain PyTorch + our stages, no
Prefect, no MLflow, no GX, no DVC), then the Prefect flow with MLflow tracking, GX
validation, model logging and registry promotion. The ratio is flow / core.

    python benchmarks/pipeline_overhead.py [--set finetune.epochs=10 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def full_flow(params: Params) -> tuple[float, float, dict]:
    """Returns (total seconds incl. Prefect API start, flow-only seconds, summary)."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"
    Path("mlruns").mkdir()
    started = time.perf_counter()
    from flows.pipeline import transfer_pipeline  # noqa: PLC0415 (import cost counts as overhead)

    t_flow = time.perf_counter()
    summary = transfer_pipeline(params=params)
    end = time.perf_counter()
    return end - started, end - t_flow, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    params = load_params(Path(args.params).resolve(), args.overrides)
    with fresh_dir():
        core = core_only(params)
    with fresh_dir():
        total, flow_only, summary = full_flow(params)
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
        f"default params{' + ' + ', '.join(args.overrides) if args.overrides else ''}.",
        "",
        "| path | wall time (s) | ratio vs core |",
        "|---|---|---|",
        f"| core stages alone (no Prefect/MLflow/GX/DVC) | {core:.1f} | 1.00 |",
        f"| `transfer run` flow, incl. Prefect/MLflow imports | {total:.1f} | {total / core:.2f} |",
        f"| flow run only | {flow_only:.1f} | {flow_only / core:.2f} |",
        "",
        f"Flow result: {summary['strategy']} transfer accuracy {summary['transfer_accuracy']:.3f} vs scratch "
        f"{summary['scratch_accuracy']:.3f}, promoted={summary['promoted']}.",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_overhead.md").write_text(table + "\n")
    (RESULTS / "pipeline_overhead.json").write_text(json.dumps(
        {"core_seconds": core, "flow_total_seconds": total, "flow_only_seconds": flow_only,
         "ratio": total / core, "summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
