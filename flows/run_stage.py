"""Run one stage flow of ``flows/stages.py`` as its own process (one ``docker run`` each).

The stages hand off through JSON files in one directory (``--handoff``), each holding the
flow's result: MLflow URIs and small dicts, no local paths, so every stage can run in a fresh
container that shares only that directory and the tracking server::

    python -m flows.run_stage pretrain --handoff results   # -> results/pretrain.json
    python -m flows.run_stage finetune --handoff results   # reads pretrain.json -> finetune.json
    python -m flows.run_stage evaluate --handoff results   # reads both -> evaluate.json (promotion)

With ``PREFECT_API_URL`` set the flow runs are recorded there; without it each process starts
Prefect's temporary API (slower: ~10-20 s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from transfer.errors import TransferError

STAGES = ("pretrain", "finetune", "evaluate")


def _read(handoff: Path, stage: str) -> dict[str, Any]:
    path = handoff / f"{stage}.json"
    if not path.is_file():
        raise TransferError(f"{path} not found: run `python -m flows.run_stage {stage}` first")
    return json.loads(path.read_text())


def run_stage(stage: str, handoff: Path, params_file: str, overrides: list[str]) -> dict[str, Any]:
    """Run ``stage``'s flow with the results of the stages before it; write and return its own."""
    from flows.stages import evaluate_flow, finetune_flow, pretrain_flow

    common = {"params_file": params_file, "overrides": overrides}
    if stage == "pretrain":
        result = pretrain_flow(**common)
    elif stage == "finetune":
        result = finetune_flow(source_model_uri=_read(handoff, "pretrain")["source_model_uri"], **common)
    else:
        result = evaluate_flow(
            handoff=_read(handoff, "finetune"),
            validation_passed=_read(handoff, "pretrain")["validation_passed"], **common,
        )
    handoff.mkdir(parents=True, exist_ok=True)
    (handoff / f"{stage}.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.run_stage", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--handoff", type=Path, default=Path("handoff"), help="dir of the stages' JSON results")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args(argv)
    try:
        run_stage(args.stage, args.handoff, args.params, args.overrides)
    except TransferError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
