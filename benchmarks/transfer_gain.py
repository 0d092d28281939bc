"""Transfer gain on the default scenario, over seeds, against scratch and classical floors.

Synthetic font digits (source) -> scikit-learn handwritten digits (target). ONE source
model is pretrained (with ``runtime.seed`` of params.yaml) and shared by every run. Then for
each k (labels per class) and seed s = 0..S-1 (s draws both the k-label subset of the target
train pool and the network init), each strategy trains through the pipeline's own stage
functions (``transfer.stages``) and is scored on

- the target VALIDATION split: every choice here (strategy ranking, the recommended default
  k) is made on validation figures only;
- the target TEST split (797 images): final figures only, with 95% intervals.

Beside them, the classical floors (``transfer.baselines``: logistic regression, RBF SVC,
LabelSpreading with the unlabelled train pool) on raw pixels, same k-label subset, same run.

Statistics: per cell the mean test accuracy over seeds with a t-interval, and the pooled
Wilson interval over all (seed, image) predictions; each strategy's gain over scratch as the
mean over seeds with a paired t-test across seeds (the combined figure), plus the exact
McNemar test on the test images per seed (how many seeds reach p < 0.05).

DANN and zero-shot (no target labels) are not in this table: see benchmarks/results of the
previous revision; distill / progressive / multitask are left out to keep the run under 15
minutes on 2 cores (pass them with --strategies).

    python benchmarks/transfer_gain.py            # k = 1,5,10,20, 5 seeds, 6 strategies
    python benchmarks/transfer_gain.py --quick    # smoke: 2 seeds, k = 1,5, 4 / 1 epochs
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer import stages
from transfer.baselines import FLOORS, classical_floors
from transfer.config import Params, load_params
from transfer.data import ImageTensors
from transfer.efficiency import (
    ALPHA, SCRATCH, best_by_val, gain_stops_significant, gains_over_scratch, labels_saved,
    means, recommend_default_k, seed_gain,
)
from transfer.models import load_model_dir
from transfer.stats import accuracy_ci, format_p, mcnemar_exact, over_seeds
from transfer.train import predict_proba, resolve_device

STRATEGIES = ["head", "last_k", "full", "gradual", "l2sp"]
RESULTS = Path(__file__).parent / "results"


def _correct(model_dir: str, data: ImageTensors, device: torch.device) -> np.ndarray:
    model, _ = load_model_dir(model_dir)
    model.to(device)
    return (predict_proba(model, data, device).argmax(1) == data.labels).numpy()


def run_one(params: Params, name: str, source_dir: str, work: Path, splits: dict[str, ImageTensors],
            device: torch.device) -> dict[str, Any]:
    """Train one strategy (or scratch) through the pipeline's stages; val acc + test correctness."""
    t0 = time.perf_counter()
    if name == SCRATCH:
        trained = stages.train_scratch(params, work, progress=False)
    else:
        trained = stages.finetune(params, source_dir, work, strategy=name, progress=False)
    val = _correct(trained.model_dir, splits["val"], device)
    test = _correct(trained.model_dir, splits["test"], device)
    return {"val": float(val.mean()), "test": float(test.mean()), "test_correct": test,
            "seconds": time.perf_counter() - t0}


def sweep(params: Params, ks: list[int], seeds: list[int], names: list[str], work: Path) -> dict[str, Any]:
    device = resolve_device(params.runtime.device)
    t0 = time.perf_counter()
    source = stages.pretrain(params, work / "source", progress=False)
    print(f"pretrained one source model (seed {params.runtime.seed}) in {time.perf_counter() - t0:.1f} s, "
          f"source test accuracy {source.info['source_test_accuracy']:.3f}", flush=True)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {k: [] for k in ks} for n in [*names, *FLOORS]}
    for k in ks:
        for seed in seeds:
            p = params.model_copy(deep=True)
            p.finetune.labels_per_class, p.runtime.seed = k, seed
            p.data.seed = seed  # the k-label draw (target_splits) varies with the seed too
            splits = stages.target_splits(p)
            for name in names:
                r = run_one(p, name, source.model_dir, work / f"{name}-k{k}-s{seed}", splits, device)
                runs[name][k].append(r)
                print(f"k={k:>3} seed={seed} {name:<8} val {r['val']:.3f} test {r['test']:.3f} "
                      f"({r['seconds']:.1f} s)", flush=True)
            t1 = time.perf_counter()
            floors = classical_floors(splits["train"], splits["test"], stages.unlabelled_target(p),
                                      seed=seed, also={"val": splits["val"]})
            for name in FLOORS:
                runs[name][k].append({"val": floors["val"][name].accuracy, "test": floors["test"][name].accuracy,
                                      "test_correct": floors["test"][name].correct, "seconds": 0.0})
            print(f"k={k:>3} seed={seed} floors   " + " ".join(
                f"{n} {floors['test'][n].accuracy:.3f}" for n in FLOORS) + f" ({time.perf_counter() - t1:.1f} s)",
                flush=True)
    return {"source_test_accuracy": source.info["source_test_accuracy"], "runs": runs,
            "n_val": len(splits["val"]), "n_test": len(splits["test"])}


def analyse(runs: dict[str, dict[int, list[dict[str, Any]]]], ks: list[int], names: list[str],
            *, floor: float = 0.0, n_val: int | None = None) -> dict[str, Any]:
    """Every figure of the table; choices from val, final figures from test."""
    val = {n: {k: [r["val"] for r in runs[n][k]] for k in ks} for n in runs}
    test = {n: {k: [r["test"] for r in runs[n][k]] for k in ks} for n in runs}
    strategies = [n for n in names if n != SCRATCH]
    gains = gains_over_scratch({n: test[n] for n in [SCRATCH, *strategies]})
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for n in runs:
        for k in ks:
            rs = runs[n][k]
            cell: dict[str, Any] = {
                "val_mean": float(np.mean(val[n][k])),
                "test": over_seeds(test[n][k]).to_json(),
                "test_pooled_wilson": accuracy_ci(np.concatenate([r["test_correct"] for r in rs])).to_json(),
            }
            if n != SCRATCH:
                base = runs[SCRATCH][k]
                mcn = [mcnemar_exact(r["test_correct"], b["test_correct"]) for r, b in zip(rs, base, strict=True)]
                g = gains[n][k] if n in gains else seed_gain(test[n][k], test[SCRATCH][k])
                cell["gain_over_scratch"] = g.to_json() | {"significant": g.better(ALPHA)}
                cell["mcnemar_p_per_seed"] = mcn
                cell["mcnemar_significant_seeds"] = sum(p < ALPHA for p in mcn)
            cells.setdefault(n, {})[k] = cell
    ranking = {k: sorted(strategies, key=lambda n: -cells[n][k]["val_mean"]) for k in ks}
    best = {k: best_by_val({n: val[n] for n in strategies}, k, exclude=()) for k in ks}
    floors_vs_best = {
        k: {f: seed_gain(test[best[k]][k], test[f][k]).to_json()
            | {"beats": seed_gain(test[best[k]][k], test[f][k]).better(ALPHA)} for f in FLOORS}
        for k in ks
    }
    default = recommend_default_k({n: val[n] for n in [SCRATCH, *strategies]}, ks, floor=floor, n_val=n_val)
    k_star, s_star = default["k"], default["strategy"]
    scratch_mean = means({SCRATCH: test[SCRATCH]})[SCRATCH]
    saved = labels_saved(scratch_mean, cells[s_star][k_star]["test"]["mean"], k_star) if k_star else None
    best_gains = {k: gains[best[k]][k] for k in ks}
    stops = gain_stops_significant(best_gains)
    return {"cells": cells, "val_ranking": ranking, "val_best": best, "floors_vs_val_best": floors_vs_best,
            "default": default, "labels_saved": saved, "gain_stops_significant": stops}


def _m(cell: dict[str, Any]) -> str:
    """Mean [t-interval], the interval clipped to [0, 1] for display (raw in the JSON)."""
    t = cell["test"]
    return f"{t['mean']:.3f} [{max(t['ci_low'], 0.0):.3f}, {min(t['ci_high'], 1.0):.3f}]"


def markdown(a: dict[str, Any], ks: list[int], names: list[str], seeds: list[int], meta: dict[str, Any]) -> str:
    cells, rank = a["cells"], a["val_ranking"]
    lines = [
        f"{len(seeds)} seeds (seed = k-label subset + init), one source model (source test accuracy "
        f"{meta['source_test_accuracy']:.3f}); val {meta['n_val']} images (every choice), test {meta['n_test']} "
        f"images (final figures). Test: mean over seeds [95% t-interval over seeds]; pooled Wilson over all "
        f"(seed, image) predictions. Gain over scratch: mean over seeds [95% t-interval], paired t-test across "
        f"seeds; McNemar: seeds with exact McNemar p < {ALPHA} on the test images. Val rank 1 = best mean "
        f"val accuracy at that k. Floors: raw pixels in [0, 1], same k-label subsets.",
        "",
        "| k | model | val rank | val acc | test acc [95% CI over seeds] | pooled Wilson | gain over scratch [95% CI] | p (paired t) | McNemar p<0.05 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        for n in [SCRATCH, *rank[k], *FLOORS]:
            c = cells[n][k]
            w = c["test_pooled_wilson"]
            r = str(rank[k].index(n) + 1) if n in rank[k] else "-"
            label = f"**{n}**" if r == "1" else (f"floor: {n}" if n in FLOORS else n)
            if n == SCRATCH:
                gain = p = mc = "-"
            else:
                g = c["gain_over_scratch"]
                gain = f"{g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
                p = "n/a" if g["p_value"] is None else format_p(g["p_value"])
                mc = f"{c['mcnemar_significant_seeds']}/{len(seeds)}"
            lines.append(f"| {k} | {label} | {r} | {c['val_mean']:.3f} | {_m(c)} | "
                         f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}] | {gain} | {p} | {mc} |")
    lines += ["", *verdicts(a, ks, seeds)]
    return "\n".join(lines)


def _p(p: float | None) -> str:
    return "n/a" if p is None else format_p(p)


def verdicts(a: dict[str, Any], ks: list[int], seeds: list[int]) -> list[str]:
    out = []
    for k in ks:
        best, fl = a["val_best"][k], a["floors_vs_val_best"][k]
        beaten = [f for f in FLOORS if fl[f]["beats"]]
        detail = ", ".join(f"{f} {fl[f]['mean']:+.3f} (p {_p(fl[f]['p_value'])})" for f in FLOORS)
        verdict = ("beats all three floors" if len(beaten) == len(FLOORS)
                   else f"does NOT beat {', '.join(f for f in FLOORS if f not in beaten)} significantly")
        out.append(f"- k={k}: val-best strategy {best} {verdict} (test, paired t across seeds: {detail}).")
    d = a["default"]
    out.append(f"- Recommended default finetune.labels_per_class = {d['k']} (strategy {d['strategy']}), "
               f"chosen on VALIDATION only: {d['reason']}.")
    if d["k"] is not None:
        c = a["cells"][d["strategy"]][d["k"]]
        s = a["cells"][SCRATCH][d["k"]]
        g = c["gain_over_scratch"]
        out.append(f"- Test figures at k={d['k']}: {d['strategy']} {_m(c)}, scratch {_m(s)}, gain "
                   f"{g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] (paired t p = "
                   f"{'n/a' if g['p_value'] is None else format_p(g['p_value'])}, McNemar p < {ALPHA} in "
                   f"{c['mcnemar_significant_seeds']}/{len(seeds)} seeds); floors "
                   + ", ".join(f"{f} {_m(a['cells'][f][d['k']])}" for f in FLOORS) + ".")
    if a["labels_saved"]:
        out.append(f"- Labels saved: {a['labels_saved']['text']}.")
    out.append(f"- Significance of the val-best strategy's gain over k: {a['gain_stops_significant']['text']}.")
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return "".join("1" if v else "0" for v in obj.tolist())  # per-image correctness, compact
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--ks", default=None, help="labels per class (default 1,5,10,20; --quick 1,5)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 5; --quick 2)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, k=1,5, 4 fine-tune / 1 pretrain epochs")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--reanalyse", type=Path, default=None,
                        help="re-table a saved results JSON (no training): e.g. after changing the analysis")
    args = parser.parse_args()
    if args.reanalyse:
        return reanalyse(args.reanalyse, load_params(args.params, args.overrides))
    overrides = (["finetune.epochs=4", "pretrain.epochs=1"] if args.quick else []) + args.overrides
    params = load_params(args.params, overrides)
    ks = [int(k) for k in (args.ks or ("1,5" if args.quick else "1,5,10,20")).split(",")]
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    names = [SCRATCH, *[s for s in args.strategies.split(",") if s and s != SCRATCH]]
    started = time.perf_counter()
    stages.prepare(params, strict=True, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = sweep(params, ks, seeds, names, Path(tmp))
    analysis = analyse(result["runs"], ks, names, floor=params.promote.accuracy_floor, n_val=result["n_val"])
    total = time.perf_counter() - started
    meta = {k: result[k] for k in ("source_test_accuracy", "n_val", "n_test")}
    table = (f"{'--quick smoke run. ' if args.quick else ''}Machine: {platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}; "
             f"finetune.epochs={params.finetune.epochs}, pretrain.epochs={params.pretrain.epochs}; "
             f"total wall time {total:.0f} s.\n\n" + markdown(analysis, ks, names, seeds, meta))
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = "transfer_gain_quick" if args.quick else "transfer_gain"
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(_jsonable(
        {"ks": ks, "seeds": seeds, "strategies": names, "seconds": total, "quick": args.quick,
         "finetune_epochs": params.finetune.epochs, "pretrain_epochs": params.pretrain.epochs,
         **meta, "analysis": analysis, "runs": result["runs"]}), indent=2))


def reanalyse(path: Path, params: Any) -> None:
    """The tables of a saved run again, from its per-run figures (the same analysis code)."""
    saved = json.loads(path.read_text())
    ks, names = saved["ks"], saved["strategies"]
    runs = {n: {int(k): [{**r, "test_correct": np.frombuffer(r["test_correct"].encode(), np.uint8) == ord("1")} for r in rs]
                for k, rs in by_k.items()} for n, by_k in saved["runs"].items()}
    saved["analysis"] = analyse(runs, ks, names, floor=params.promote.accuracy_floor, n_val=saved["n_val"])
    meta = {k: saved[k] for k in ("source_test_accuracy", "n_val", "n_test")}
    table = (f"Machine: as recorded; finetune.epochs={saved['finetune_epochs']}, "
             f"pretrain.epochs={saved['pretrain_epochs']}; total wall time {saved['seconds']:.0f} s "
             f"(re-tabled from {path.name}).\n\n" + markdown(saved["analysis"], ks, names, saved["seeds"], meta))
    print(table)
    path.with_suffix(".md").write_text(table + "\n")
    path.write_text(json.dumps(_jsonable(saved), indent=2))


if __name__ == "__main__":
    main()
