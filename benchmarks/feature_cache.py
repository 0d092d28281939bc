"""Frozen-feature cache: head-only fine-tuning on cached body features vs through the body.

Same source model, same target split (k labels/class), same optimiser settings, no
augmentation (so both paths see identical inputs); reports the median seconds per epoch
of each path over repeats, the speed-up ratio, and both test accuracies, in one run.

    python benchmarks/feature_cache.py [--k 10] [--epochs 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from transfer import freezing, stages
from transfer.config import load_params
from transfer.data import dataset_version
from transfer.feature_cache import FeatureCache, train_head_cached
from transfer.models import load_model_dir
from transfer.train import accuracy, fit, resolve_device

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = load_params(args.params, [f"finetune.labels_per_class={args.k}", f"finetune.epochs={args.epochs}",
                                       "finetune.augment=false", "pretrain.epochs=2"])
    device = resolve_device(params.runtime.device)
    stages.prepare(params, progress=False)
    splits = stages.target_splits(params)
    version = dataset_version(stages.dataset_dirs(params)["target"])
    with tempfile.TemporaryDirectory() as tmp:
        source = stages.pretrain(params, Path(tmp) / "source", progress=False)
        base, _ = load_model_dir(source.model_dir)
        base.reset_classifier(len(splits["train"].classes))
        freezing.apply_freeze(base, "head")
        plain_s, cached_s, warm_s, acc = [], [], [], {}
        for r in range(args.repeats):
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            fit(model, splits["train"], splits["val"], params.finetune, device=device, seed=0, progress=False,
                param_groups=freezing.param_groups(model, params.finetune.lr))
            plain_s.append((time.perf_counter() - t0) / args.epochs)
            acc["through the frozen body"] = accuracy(model, splits["test"], device)
            cache = FeatureCache(Path(tmp) / f"cache-{r}")
            for seconds, label in ((cached_s, "cached features, cold"), (warm_s, "cached features, warm")):
                # cold: the features are computed (and stored) first; warm: read from disk
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                train_head_cached(model, splits["train"], splits["val"], params.finetune, cache, version, 0, device)
                seconds.append((time.perf_counter() - t0) / args.epochs)
                acc[label] = accuracy(model, splits["test"], device)
    p, c, w = statistics.median(plain_s), statistics.median(cached_s), statistics.median(warm_s)
    table = "\n".join([
        f"k={args.k} labels/class, {args.epochs} epochs, {args.repeats} repeats, {torch.get_num_threads()} threads, "
        f"device {device.type}. Cold: the features are computed and stored first (per dataset version "
        f"and body), amortised over the epochs; warm: they are read from the cache.",
        "",
        "| head-only path | median s/epoch | speed-up | test accuracy |",
        "|---|---|---|---|",
        f"| through the frozen body (fit) | {p:.4f} | 1.0x | {acc['through the frozen body']:.4f} |",
        f"| cached features, cold cache | {c:.4f} | {p / c:.1f}x | {acc['cached features, cold']:.4f} |",
        f"| cached features, warm cache | {w:.4f} | {p / w:.1f}x | {acc['cached features, warm']:.4f} |",
    ])
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_cache.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
