"""Multitask vs single-task: each task of the joint model against its own single-task model.

Default scenario: the pretrained source body, the target's k labels per class, two tasks
from the digit labels (``class``: 10 digits, ``parity``: even/odd). Three fine-tunes from
the same source body, same seed, same budget (``finetune.epochs``, ``finetune.lr``,
batch size): joint (both heads, equal weights), class alone, parity alone. Accuracy on the
target test split, median of ``--repeats`` seeds.

    python benchmarks/multitask_tasks.py [--k 5 10] [--repeats 3]

Writes benchmarks/results/multitask_tasks.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

from transfer import stages
from transfer.config import load_params
from transfer.models import load_model_dir
from transfer.techniques.multitask import MultiTaskNet, evaluate_multitask, parity_labels, train_multitask
from transfer.train import resolve_device

RESULTS = Path(__file__).parent / "results"
TASKS = {"class": 10, "parity": 2}


def accuracies(body: torch.nn.Module, dim: int, heads: dict[str, int], splits: dict, labels: dict,
               params, seed: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(seed)  # head init
    net = MultiTaskNet(copy.deepcopy(body), dim, heads)
    ft = params.finetune
    train_labels = {name: labels["train"][name] for name in heads}
    train_multitask(net, splits["train"], train_labels, None, ft.epochs, ft.lr, ft.batch_size, seed, device,
                    ft.weight_decay)
    return evaluate_multitask(net, splits["test"], {name: labels["test"][name] for name in heads}, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = load_params(args.params)
    device = resolve_device(base.runtime.device)
    stages.prepare(base, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = stages.pretrain(base, Path(tmp) / "source", progress=False)
        model, _ = load_model_dir(source.model_dir)
        body, dim = model.body, model.feature_dim
        for k in args.k:
            params = load_params(args.params, [f"finetune.labels_per_class={k}"])
            splits = stages.target_splits(params)
            labels = {
                split: {"class": splits[split].labels,
                        "parity": parity_labels(splits[split].labels, splits[split].classes)}
                for split in ("train", "test")
            }
            runs: dict[str, list[float]] = {}
            for seed in range(args.repeats):
                joint = accuracies(body, dim, TASKS, splits, labels, params, seed, device)
                for task, n in TASKS.items():
                    single = accuracies(body, dim, {task: n}, splits, labels, params, seed, device)
                    runs.setdefault(f"{task} single", []).append(single[task])
                    runs.setdefault(f"{task} joint", []).append(joint[task])
            for task in TASKS:
                s, j = statistics.median(runs[f"{task} single"]), statistics.median(runs[f"{task} joint"])
                rows.append(f"| {k} | {task} | {s:.3f} | {j:.3f} | {j - s:+.3f} |")
                print(rows[-1], flush=True)
    ft = base.finetune
    table = "\n".join([
        f"Source body pretrained once; {ft.epochs} epochs, lr {ft.lr}, batch {ft.batch_size}, all layers trained, "
        f"equal task weights; median test accuracy over {args.repeats} seeds; device {device.type}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| labels/class | task | single-task model | multitask model | multitask - single |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "multitask_tasks.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
