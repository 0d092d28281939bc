"""Scaling: cost per image and peak memory of the data path as the dataset grows.

For each N in ``--sizes`` a generated RGB ImageFolder (10 classes, 64 px PNGs) is run
through, each phase in its own subprocess (so its peak RSS is its own,
``resource.getrusage``, children included):

- prepare:   copy + sha256 + full decode check + manifest (``prepare_target``)
- validate:  the GX suites of the dataset (``tasks.validate.validate_dataset``)
- decode:    first load of the train split as a memory-mapped split (decode + write)
- epoch:     one training epoch of small_cnn over the memory-mapped split (DataLoader)
- plain:     the same epoch through a plain torchvision ``ImageFolder`` + ``DataLoader``
             (PNG decoded every epoch, ToTensor + Normalize), the usual baseline

and, on ``--resnet-n`` images at 224 px, one epoch of resnet18 from a torchvision-layout
state_dict (random weights, saved locally: nothing is downloaded) with the weights'
preprocessing, beside the same plain loop with ``ResNet18_Weights.transforms()``.

    python benchmarks/scale.py                       # 1k and 10k (this 2-core machine)
    python benchmarks/scale.py --sizes 1000 10000 100000

Writes ``benchmarks/results/scale.{json,md,png}``; records the machine and
``os.getloadavg()`` before and after (a shared machine shows in it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLASSES = 10
PHASES = ("prepare", "validate", "decode", "features", "predict", "epoch", "plain")


# --------------------------------------------------------------------------- data


def generate(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n RGB PNGs in CLASSES folders: a class-coloured square on noise (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % CLASSES
        pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        pixels[size // 4 : size // 2, size // 4 : size // 2, c % 3] = 120 + 13 * c
        Image.fromarray(pixels).save(folder / f"c{c}" / f"{i:06d}.png")
    return folder


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux: kB


# --------------------------------------------------------------------------- phases (subprocess)


def _data_params(work: Path, images: Path):
    from transfer.config import DataParams, TargetData

    return DataParams(root=str(work / "data"), image_size=64, channels=3,
                      target=TargetData(kind="imagefolder", path=str(images), test_size=0.2))


def _model(arch: str, weights: Path | None, size: int):
    from transfer.models import create_model, weights_preprocessing

    prep = weights_preprocessing(arch, weights, 3, size) if weights else None
    return create_model(arch, CLASSES, 3, weights=weights, preprocessing=prep), prep


def phase(name: str, work: Path, images: Path, arch: str, size: int, weights: Path | None) -> dict:
    import torch

    from transfer.config import OptimParams
    from transfer.data import load_split, prepare_target
    from transfer.train import fit

    torch.set_num_threads(os.cpu_count() or 1)
    params = _data_params(work, images)
    target = work / "data" / "target"
    cfg = OptimParams(epochs=1, batch_size=128, augment=True)
    started = time.perf_counter()
    if name == "prepare":
        prepare_target(params, progress=False, min_per_split=1)
        n = sum(1 for _ in images.rglob("*.png"))
    elif name == "validate":
        from tasks.validate import validate_dataset
        from transfer.config import ValidateParams

        outcomes = validate_dataset(target, "target", ValidateParams(min_per_class=1))
        n = sum(1 for _ in images.rglob("*.png"))
        assert all(o.success for o in outcomes), [o for o in outcomes if not o.success][:2]
    elif name in ("decode", "epoch"):
        ratio = 1.0
        model, prep = _model(arch, weights, size)
        if prep is not None:
            ratio = prep.resize_ratio
        load = lambda: load_split(target, "train", size, 3, resize_ratio=ratio, storage="mmap")  # noqa: E731
        if name == "epoch":
            data = load()  # decoded by the decode phase; not timed here
            started = time.perf_counter()
            fit(model, data, None, cfg, device=torch.device("cpu"), seed=0, progress=False)
        else:
            data = load()
        n = len(data)
    elif name in ("features", "predict"):  # the frozen-feature cache; evaluation's forward pass
        from transfer.feature_cache import FeatureCache, body_sha256, data_fingerprint, feature_key
        from transfer.train import predict_proba

        model, _ = _model(arch, weights, size)
        data = load_split(target, "train", size, 3, storage="mmap")  # decoded by the decode phase
        started = time.perf_counter()
        if name == "features":  # the key hashes the split chunk by chunk, then the body runs
            key = feature_key("bench", body_sha256(model.body), "train", data_fingerprint(data))
            FeatureCache(work / "features").get_or_compute(model.body, data, key, torch.device("cpu"))
        else:
            predict_proba(model, data, torch.device("cpu"))
        n = len(data)
    elif name == "plain":
        n = plain_epoch(target, arch, size, weights, cfg)
    else:
        raise SystemExit(f"unknown phase {name}")
    seconds = time.perf_counter() - started
    return {"phase": name, "n": n, "seconds": seconds, "per_image_ms": 1000 * seconds / n, "peak_rss_mb": _peak_mb()}


def plain_epoch(target: Path, arch: str, size: int, weights: Path | None, cfg) -> int:
    """The textbook loop: ImageFolder over the train split's files, decoded every epoch."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from transfer.data import read_manifest
    from transfer.data.mapped import default_workers

    if weights is not None:
        from transfer.preprocessing import torchvision_entry

        tf = torchvision_entry(arch, weights).transforms()
    else:
        tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                 transforms.Normalize([0.5] * 3, [0.5] * 3)])
    folder = datasets.ImageFolder(str(target), transform=tf)
    train = {r.path for r in read_manifest(target) if r.split == "train"}
    index = [i for i, (p, _) in enumerate(folder.samples) if Path(p).relative_to(target).as_posix() in train]
    loader = DataLoader(Subset(folder, index), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=default_workers())
    model, _ = _model(arch, weights, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(index)


def run_phase(name: str, work: Path, images: Path, arch: str, size: int, weights: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--work", str(work), "--images", str(images),
           "--arch", arch, "--size", str(size)] + (["--weights", str(weights)] if weights else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name:9s} N={result['n']:>7}  {result['per_image_ms']:.3f} ms/image  peak {result['peak_rss_mb']:.0f} MB",
          flush=True)
    return result


# --------------------------------------------------------------------------- driver


def median_of(runs: list[dict]) -> dict:
    """One row per phase: the median run's figures, with every run's time and peak RSS."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    row = dict(ordered[len(ordered) // 2])
    row.update(repeats=len(runs), per_image_ms_runs=[r["per_image_ms"] for r in runs],
               peak_rss_mb=max(r["peak_rss_mb"] for r in runs))
    return row


def bench_size(n: int, scratch: Path, arch: str = "small_cnn", size: int = 64,
               weights: Path | None = None, phases: tuple[str, ...] = PHASES, repeats: int = 1) -> list[dict]:
    """Every phase once, then the two training epochs (ours, plain) ``repeats`` times in all,
    alternately, so the throughput ratio is not one draw of a noisy machine."""
    work = scratch / f"{arch}-{n}"
    images = generate(work / "images", n, 64 if weights is None else 256)
    print(f"N = {n} ({arch}, {size} px)", flush=True)
    prerequisites = [p for p in ("prepare", "decode") if p not in phases]  # later phases read their output
    for p in prerequisites:
        run_phase(p, work, images, arch, size, weights)
    runs: dict[str, list[dict]] = {p: [run_phase(p, work, images, arch, size, weights)] for p in phases}
    for _ in range(repeats - 1):
        for p in ("plain", "epoch"):
            if p in phases:
                runs[p].append(run_phase(p, work, images, arch, size, weights))
    shutil.rmtree(work, ignore_errors=True)
    return [{**median_of(runs[p]), "arch": arch, "size": size, "dataset_n": n} for p in phases]


def resnet_weights(folder: Path) -> Path:
    import torch
    import torchvision

    path = folder / "resnet18-f37072fd.pth"  # torchvision's file name: its enum entry is found
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _earlier() -> dict:
    path = RESULTS / "scale.json"
    return json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}


def kept_rows(sizes: list[int], resnet_n: int, phases: tuple[str, ...]) -> list[dict]:
    """``--keep``: the earlier run's rows of the (size, phase) pairs not measured now."""
    def remeasured(r: dict) -> bool:
        if r["phase"] not in phases:
            return False
        return (r["arch"] == "small_cnn" and r.get("dataset_n", r["n"]) in sizes) or (r["arch"] != "small_cnn" and resnet_n)

    return [r for r in _earlier()["rows"] if not remeasured(r)]


def kept_meta() -> list[dict]:
    """The runs the kept rows come from: the earlier file's own run and the ones it kept."""
    meta = _earlier()["meta"]
    older = meta.get("kept_from_earlier_runs") or ([meta["kept_from_earlier_run"]] if "kept_from_earlier_run" in meta else [])
    own = {k: meta.get(k) for k in ("load_before", "load_after", "seconds", "sizes", "resnet_n", "repeats", "phases")}
    return [*older, own]


def row_order(r: dict) -> tuple:
    return (r["arch"] != "small_cnn", r.get("dataset_n", r["n"]),
            PHASES.index(r["phase"]))


def write_results(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Machine: {meta['machine']}; load average before {meta['load_before']}, after {meta['load_after']}; "
             f"total {meta['seconds']:.0f} s."]
    for kept in meta.get("kept_from_earlier_runs", []):
        lines.append(f"Rows not measured now kept from an earlier run (`--keep`): sizes {kept['sizes']}, phases "
                     f"{kept.get('phases') or 'prepare, validate, decode, epoch, plain'}, load average before {kept['load_before']}, after "
                     f"{kept['load_after']}, {kept.get('repeats') or 1} repeat(s).")
    lines += ["",
             "| arch | px | phase | dataset N | images timed | ms / image (median) | runs (ms / image) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = ", ".join(f"{v:.3f}" for v in r.get("per_image_ms_runs", [r["per_image_ms"]]))
        lines.append(f"| {r['arch']} | {r['size']} | {r['phase']} | {r.get('dataset_n', r['n'])} | {r['n']} | "
                     f"{r['per_image_ms']:.3f} | {spread} | {r['peak_rss_mb']:.0f} |")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    small = [r for r in rows if r["arch"] == "small_cnn"]
    sizes = sorted({r["n"] for r in small if r["phase"] == "prepare"})
    for name in PHASES:
        pts = sorted((r["n"], r["per_image_ms"], r["peak_rss_mb"]) for r in small if r["phase"] == name)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1] for p in pts], marker="o", label=name)
        ax2.plot(xs, [p[2] for p in pts], marker="o", label=name)
    for ax, label in ((ax1, "ms per image"), (ax2, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("images (N; the train split for decode and later phases)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.legend()
    ax1.set_title(f"cost per image, 64 px RGB (N = {', '.join(map(str, sizes))})")
    ax2.set_title("peak resident memory per phase")
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--resnet-n", type=int, default=256, help="images for the resnet18 224 px run (0: skip)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="training epochs (ours and plain, alternately) per size; medians reported")
    parser.add_argument("--repeats-max-n", type=int, default=10000,
                        help="sizes above this run each epoch once (a 100k epoch takes minutes on 2 cores)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                        help="prepare (and decode) always run when a later phase needs their output")
    parser.add_argument("--keep", action="store_true",
                        help="merge into the existing results: rows of other sizes stay")
    parser.add_argument("--phase")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--weights", type=Path)
    args = parser.parse_args()
    if args.phase:  # one measured phase, in this subprocess
        print(json.dumps(phase(args.phase, args.work, args.images, args.arch, args.size, args.weights)))
        return
    started, load_before = time.perf_counter(), [round(v, 2) for v in os.getloadavg()]
    rows: list[dict] = []
    phases = tuple(args.phases)
    kept = kept_rows(args.sizes, args.resnet_n, phases) if args.keep else []
    earlier = kept_meta() if kept else None  # read now: every save() below rewrites the file

    def save() -> None:  # after every size: an interrupted run keeps what it measured
        import torch

        meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
                           f"torch {torch.__version__}",
                "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
                "seconds": time.perf_counter() - started, "sizes": args.sizes, "resnet_n": args.resnet_n,
                "repeats": args.repeats, "repeats_max_n": args.repeats_max_n, "phases": list(phases)}
        if earlier:
            meta["kept_from_earlier_runs"] = earlier
        write_results(sorted(kept + rows, key=row_order), meta)

    with tempfile.TemporaryDirectory(prefix="scale-", dir=os.environ.get("SCALE_TMP")) as scratch:
        for n in args.sizes:
            rows += bench_size(n, Path(scratch), phases=phases,
                               repeats=args.repeats if n <= args.repeats_max_n else 1)
            save()
        if args.resnet_n:
            weights = resnet_weights(Path(scratch))
            rows += bench_size(args.resnet_n, Path(scratch), "resnet18", 224, weights,
                               tuple(p for p in phases if p != "validate"), repeats=args.repeats)
            save()
    print((RESULTS / "scale.md").read_text())


if __name__ == "__main__":
    main()
