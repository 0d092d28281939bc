"""Zero target labels: source-only vs DANN, and zero-shot ConSE, over seeds with intervals.

Moved out of ``transfer_gain.py`` (whose table is about k labels per class). One source
model is pretrained (``runtime.seed`` of params.yaml); for each seed s, DANN adapts it with
the unlabelled target train pool (no target label), and zero-shot ConSE learns the digits
other than {7, 8, 9} from k labels each and is scored on 7, 8, 9 only (chance 1/3). Figures
are target TEST accuracies: mean over seeds [95% t-interval]; DANN against source-only is
compared paired by seed (t-test) and per seed by exact McNemar on the test images.

    python benchmarks/no_labels.py             # 3 seeds
    python benchmarks/no_labels.py --quick     # 1 seed, 1 pretrain / 1 DANN / 1 zero-shot epoch
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from transfer import stages
from transfer.config import load_params
from transfer.efficiency import seed_gain
from transfer.models import load_model_dir
from transfer.stats import mcnemar_exact, over_seeds
from transfer.train import predict_proba, resolve_device

RESULTS = Path(__file__).parent / "results"
UNSEEN = ["7", "8", "9"]


def _correct(model: torch.nn.Module, data: Any, device: torch.device) -> torch.Tensor:
    return predict_proba(model.to(device), data, device).argmax(1) == data.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    from transfer.techniques.dann import run_dann
    from transfer.techniques.zeroshot import run_zero_shot

    params = load_params(args.params, (["pretrain.epochs=1"] if args.quick else []) + args.overrides)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    started = time.perf_counter()
    stages.prepare(params, strict=True, progress=False)
    device = resolve_device(params.runtime.device)
    test = stages._load(params, "target", "test")
    rows: dict[str, list[float]] = {"source_only": [], "dann": [], "zero_shot": []}
    mcnemar: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        source = stages.pretrain(params, Path(tmp) / "source", progress=False)
        source_correct = _correct(load_model_dir(source.model_dir)[0], test, device)
        for seed in seeds:
            p = params.model_copy(deep=True)
            p.runtime.seed = seed
            p.finetune.epochs = 1 if args.quick else 5  # DANN walks the whole source set each epoch
            dann, _ = run_dann(load_model_dir(source.model_dir)[0], stages._load(p, "source", "train"),
                               stages.unlabelled_target(p), stages._load(p, "target", "val"), p.finetune, device, seed)
            dann_correct = _correct(dann, test, device)
            zs, _ = run_zero_shot(load_model_dir(source.model_dir)[0], stages.target_splits(p)["train"], test,
                                  UNSEEN, p.finetune if args.quick else params.finetune, device, seed)
            rows["source_only"].append(float(source_correct.float().mean()))
            rows["dann"].append(float(dann_correct.float().mean()))
            rows["zero_shot"].append(float(zs["accuracy"]))
            mcnemar.append(mcnemar_exact(dann_correct, source_correct))
            print(f"seed={seed} source-only {rows['source_only'][-1]:.3f} dann {rows['dann'][-1]:.3f} "
                  f"zero-shot {zs['accuracy']:.3f} (chance {zs['chance']:.3f})", flush=True)
    summary = {name: over_seeds(values).to_json() for name, values in rows.items()}
    gain = seed_gain(rows["dann"], rows["source_only"])
    lines = [
        f"{'--quick smoke run. ' if args.quick else ''}{len(seeds)} seed(s), one source model; "
        f"total {time.perf_counter() - started:.0f} s. Test accuracy: mean [95% t-interval over seeds].",
        "",
        "| no target labels | test accuracy |",
        "|---|---|",
        *(f"| {label} | {summary[key]['mean']:.3f} [{max(summary[key]['ci_low'], 0):.3f}, "
          f"{min(summary[key]['ci_high'], 1):.3f}] |"
          for key, label in (("source_only", "source model as is (source-only)"),
                             ("dann", "DANN, unlabelled target train pool"),
                             ("zero_shot", "zero-shot ConSE on unseen digits 7, 8, 9 (chance 0.333)"))),
        "",
        f"DANN over source-only: {gain.describe()}; exact McNemar per seed: "
        + ", ".join(f"{p:.2g}" for p in mcnemar) + ".",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = "no_labels_quick" if args.quick else "no_labels"
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"seeds": seeds, "values": rows, "summary": summary, "dann_gain": gain.to_json(),
         "mcnemar_per_seed": mcnemar}, indent=2))


if __name__ == "__main__":
    main()
