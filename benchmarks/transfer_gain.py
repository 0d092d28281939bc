"""Transfer gain on the default scenario: test accuracy of every strategy vs from-scratch.

Synthetic font digits (source) -> scikit-learn handwritten digits (target), k labelled
target images per class for k in {5, 10, 50}, the fixed 797-image test split. Beside the
pipeline's strategies, a plain PyTorch reference (a hand-written 3-conv CNN and loop, the
DESIGN.md reference script) runs in the same process on the same tensors.

    python benchmarks/transfer_gain.py            # all strategies, k = 5, 10, 50
    python benchmarks/transfer_gain.py --ks 10 --strategies head,full
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transfer import stages
from transfer.config import Params, load_params
from transfer.data import ImageTensors, subsample_per_class, to_float
from transfer.train import predict_proba, resolve_device

FREEZE = ["head", "last_k", "full", "gradual"]
TECHNIQUES = ["l2sp", "distill", "progressive", "multitask"]
RESULTS = Path(__file__).parent / "results"


def _accuracy(model: nn.Module, data: ImageTensors, device: torch.device) -> float:
    probs = predict_proba(model, data, device)
    return (probs.argmax(1) == data.labels).float().mean().item()


# ---------------------------------------------------------------- plain PyTorch reference
class ReferenceCNN(nn.Module):
    """The reference script's model: 3 conv layers, written out by hand."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _plain_train(model: nn.Module, data: ImageTensors, epochs: int, lr: float, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x_all, y_all = to_float(data.images), data.labels
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y_all)).split(batch):
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def plain_reference(params: Params, source: ImageTensors, target: dict[str, ImageTensors], ks: list[int]) -> dict[str, Any]:
    """DESIGN.md's reference: pretrain 5 epochs, then scratch / head / full at each k."""
    cpu = torch.device("cpu")
    started = time.perf_counter()
    torch.manual_seed(0)
    pretrained = ReferenceCNN(len(source.classes))
    _plain_train(pretrained, source, 5, 1e-3, 128, 0)
    pretrain_s = time.perf_counter() - started
    rows: dict[str, Any] = {"pretrain_seconds": pretrain_s, "k": {}}
    for k in ks:
        train = subsample_per_class(target["pool"], k, params.runtime.seed)
        accs = {}
        for name in ("scratch", "head", "full"):
            torch.manual_seed(1)
            model = ReferenceCNN(len(train.classes))
            if name != "scratch":
                model.body.load_state_dict(pretrained.body.state_dict())
            if name == "head":
                model.body.requires_grad_(False)
            _plain_train(model, train, params.finetune.epochs, params.finetune.lr, params.finetune.batch_size, 1)
            model.eval()
            accs[name] = _accuracy(model, target["test"], cpu)
        rows["k"][k] = accs
    rows["seconds"] = time.perf_counter() - started
    return rows


# ---------------------------------------------------------------- the pipeline's strategies
def pipeline_strategies(params: Params, ks: list[int], strategies: list[str], work: Path) -> dict[str, Any]:
    device = resolve_device(params.runtime.device)
    started = time.perf_counter()
    source = stages.pretrain(params, work / "source", progress=False)
    out: dict[str, Any] = {"pretrain_seconds": time.perf_counter() - started,
                           "source_test_accuracy": source.info["source_test_accuracy"], "k": {}}
    for k in ks:
        p = params.model_copy(deep=True)
        p.finetune.labels_per_class = k
        test = stages.target_splits(p)["test"]
        row: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        scratch = stages.train_scratch(p, work / f"scratch-{k}", progress=False)
        row["scratch"] = {"accuracy": _accuracy(_load(scratch), test, device), "seconds": time.perf_counter() - t0}
        for strategy in strategies:
            t0 = time.perf_counter()
            trained = stages.finetune(p, source.model_dir, work / f"{strategy}-{k}", strategy=strategy, progress=False)
            row[strategy] = {"accuracy": _accuracy(_load(trained), test, device), "seconds": time.perf_counter() - t0}
            print(f"k={k:>3} {strategy:<12} acc {row[strategy]['accuracy']:.4f}  ({row[strategy]['seconds']:.1f} s)", flush=True)
        out["k"][k] = row
    out["no_labels"] = no_label_techniques(params, source.model_dir, params.runtime.seed)
    out["seconds"] = time.perf_counter() - started
    return out


def no_label_techniques(params: Params, source_model_dir: str, seed: int) -> dict[str, Any]:
    """Zero target labels: source-only vs DANN (unlabelled target), and zero-shot ConSE on
    held-out digits {7, 8, 9} (seen: the other seven, k labels each) against chance."""
    from transfer.models import load_model_dir
    from transfer.techniques.dann import run_dann
    from transfer.techniques.zeroshot import run_zero_shot

    device = resolve_device(params.runtime.device)
    test = stages._load(params, "target", "test")
    source, _ = load_model_dir(source_model_dir)
    out: dict[str, Any] = {"source_only": _accuracy(source, test, device)}
    t0 = time.perf_counter()
    p = params.model_copy(deep=True)
    p.finetune.epochs = 5  # DANN walks the whole source set each epoch
    dann, _ = run_dann(source, stages._load(params, "source", "train"), stages.unlabelled_target(params),
                       stages._load(params, "target", "val"), p.finetune, device, seed)
    out["dann"], out["dann_seconds"] = _accuracy(dann, test, device), time.perf_counter() - t0
    zs, _ = run_zero_shot(load_model_dir(source_model_dir)[0], stages.target_splits(params)["train"], test,
                          ["7", "8", "9"], params.finetune, device, seed)
    out["zero_shot"], out["zero_shot_chance"] = zs["accuracy"], zs["chance"]
    return out


def _load(trained: stages.TrainedModel) -> nn.Module:
    from transfer.models import load_model_dir

    return load_model_dir(trained.model_dir)[0]


def markdown(ours: dict[str, Any], plain: dict[str, Any], strategies: list[str], total: float) -> str:
    cols = ["scratch", *strategies]
    lines = [
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}; total wall time {total:.0f} s.",
        "",
        "| labels/class | " + " | ".join(cols) + " | plain scratch | plain head | plain full |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for k, row in ours["k"].items():
        ref = plain["k"][k]
        best = max(row[c]["accuracy"] for c in strategies)
        cells = [f"**{row[c]['accuracy']:.3f}**" if c != "scratch" and row[c]["accuracy"] == best
                 else f"{row[c]['accuracy']:.3f}" for c in cols]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {ref['scratch']:.3f} | {ref['head']:.3f} | {ref['full']:.3f} |")
    med = {c: statistics.median(row[c]["seconds"] for row in ours["k"].values()) for c in cols}
    lines += [
        "",
        "Median fine-tune wall time per strategy (s): " + ", ".join(f"{c} {med[c]:.1f}" for c in cols),
        f"Pretraining (pipeline small_cnn): {ours['pretrain_seconds']:.1f} s, source test accuracy "
        f"{ours['source_test_accuracy']:.3f}; plain reference pretraining: {plain['pretrain_seconds']:.1f} s "
        f"(ratio {ours['pretrain_seconds'] / plain['pretrain_seconds']:.2f}x).",
        f"Whole pipeline part: {ours['seconds']:.0f} s; whole plain reference: {plain['seconds']:.0f} s.",
    ]
    nl = ours.get("no_labels")
    if nl:
        lines += [
            "",
            "| no target labels | test accuracy |",
            "|---|---|",
            f"| source model as is (source-only) | {nl['source_only']:.3f} |",
            f"| DANN, unlabelled target ({nl['dann_seconds']:.0f} s) | {nl['dann']:.3f} |",
            f"| zero-shot ConSE on unseen digits 7, 8, 9 (chance {nl['zero_shot_chance']:.3f}) | {nl['zero_shot']:.3f} |",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--ks", default="5,10,50")
    parser.add_argument("--strategies", default=",".join(FREEZE + TECHNIQUES))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    params = load_params(args.params, args.overrides)
    ks = [int(k) for k in args.ks.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]
    started = time.perf_counter()
    stages.prepare(params, strict=True, progress=False)
    load = lambda name, split: stages._load(params, name, split)  # noqa: E731
    target = {"pool": load("target", "train"), "test": load("target", "test")}
    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_reference(params, load("source", "train"), target, ks)
        ours = pipeline_strategies(params, ks, strategies, Path(tmp))
    total = time.perf_counter() - started
    table = markdown(ours, plain, strategies, total)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transfer_gain.md").write_text(table + "\n")
    (RESULTS / "transfer_gain.json").write_text(json.dumps({"pipeline": ours, "plain": plain}, indent=2, default=str))


if __name__ == "__main__":
    main()
