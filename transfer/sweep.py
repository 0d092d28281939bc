"""The sample-efficiency sweep: test accuracy vs labels per class, per strategy, over seeds.

Pure core (no MLflow, no Prefect). :func:`sample_efficiency` trains every point (each cached
under a work dir by a key of what determines it); :func:`run_sweep` is the ``sweep`` stage
(``transfer sweep``, ``dvc.yaml``): the whole sweep keyed on its inputs (the ``sweep``
params, the fine-tune params, the source model's weights, the target data version and the
code fingerprint) and written to one JSON file. A rerun with the same inputs finds that
file current and trains nothing; ``transfer report`` reads it (or runs the same function).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transfer import fingerprint
from transfer.config import Params
from transfer.errors import TransferError

log = logging.getLogger(__name__)

SCRATCH = "scratch"
DEFAULT_KS = (1, 5, 10, 50)
DEFAULT_STRATEGIES = ("head", "full")
DEFAULT_SEEDS = 3  # seeds per sweep point: error bars and a paired t-test need more than one
STAGE_OUTPUT = Path("metrics/sweep.json")  # what dvc.yaml's sweep stage writes (the report reads it)


class Curves(dict):
    """``curves[strategy][k]`` = mean test accuracy over seeds, with ``notes`` (skipped points),
    ``points`` (one per strategy, k, seed), ``seeds[strategy][k]`` and ``val[strategy][k]``
    (per-seed test / validation accuracies, seed order) and ``floors[floor][k]`` (per-seed
    test accuracies of the classical floors, same k-label subsets)."""

    def __init__(self, *args: Any, notes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notes: list[str] = list(notes or [])
        self.points: list[dict[str, Any]] = []
        self.seeds: dict[str, dict[int, list[float]]] = {}
        self.val: dict[str, dict[int, list[float]]] = {}
        self.floors: dict[str, dict[int, list[float]]] = {}
        self.seed_list: list[int] = []

    def to_json(self) -> dict[str, Any]:
        return {"curves": dict(self), "notes": self.notes, "points": self.points, "seeds": self.seeds,
                "val": self.val, "floors": self.floors, "seed_list": self.seed_list}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Curves:
        """Back from JSON, where every k became a string."""
        def by_k(grid: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, Any]]:
            return {name: {int(k): v for k, v in row.items()} for name, row in (grid or {}).items()}

        curves = cls(by_k(data.get("curves") or {}), notes=data.get("notes"))
        curves.points = list(data.get("points") or [])
        curves.seeds, curves.val, curves.floors = (by_k(data.get(n) or {}) for n in ("seeds", "val", "floors"))
        curves.seed_list = list(data.get("seed_list") or [])
        return curves


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Point:
    """One training of the sweep: strategy ``name`` at ``k`` labels per class, seed ``seed``."""

    name: str
    k: int
    seed: int
    params: Params
    key: str
    dir: Path

    @property
    def cached(self) -> bool:
        return (self.dir / "result.json").exists()


@dataclass
class Plan:
    """What a sweep trains, decided before anything trains: its ``key`` names the result."""

    names: list[str]
    ks: list[int]
    seeds: list[int]
    points: list[Point]
    notes: list[str] = field(default_factory=list)
    floors: bool = True

    @property
    def key(self) -> str:
        return _key([p.key for p in self.points], self.ks, self.notes, self.floors)


def _check_strategies(strategies: Sequence[str]) -> list[str]:
    from transfer.strategies import AUTO, strategy_names

    known = {AUTO, *strategy_names(), SCRATCH}
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise TransferError(f"unknown strategies {unknown}; known: {', '.join(sorted(known))}")
    return list(dict.fromkeys(strategies))


def plan(
    params: Params,
    source_model_dir: str | Path,
    ks: Sequence[int] = DEFAULT_KS,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    work_dir: str | Path = "artifacts/report/sweep",
    *,
    epochs: int | None = None,
    include_scratch: bool = True,
    seeds: Sequence[int] | None = None,
    floors: bool = True,
) -> Plan:
    """The points of a sweep (see :func:`sample_efficiency`) and their cache keys."""
    from transfer import stages
    from transfer.data import dataset_version, load_split
    from transfer.models import load_model_dir

    names = _check_strategies(strategies)
    if include_scratch and SCRATCH not in names:
        names = [SCRATCH, *names]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise TransferError(f"labels per class must be >= 1, got {ks}")
    seed_list = list(dict.fromkeys(int(s) for s in (seeds if seeds else [params.runtime.seed])))
    target_dir = stages.dataset_dirs(params)["target"]
    size, channels = params.data.image_size, params.data.channels
    counts = load_split(target_dir, "train", size, channels).class_counts()
    smallest = min(counts.values()) if counts else 0
    _, source_meta = load_model_dir(source_model_dir)
    notes = []
    for k in ks:
        if k > smallest:
            tight = min(counts, key=counts.get) if counts else "?"
            notes.append(f"k={k} skipped: class '{tight}' holds only {smallest} training images")
    usable = [k for k in ks if k <= smallest]
    # the code fingerprint too: after an edit to transfer/ a point is retrained
    base = {"target": dataset_version(target_dir), "arch": params.pretrain.arch, "size": size,
            "channels": channels, "code": fingerprint.code_fingerprint()}
    points = []
    for name in names:
        for k in usable:
            for seed in seed_list:
                p = params.model_copy(deep=True)
                p.finetune.labels_per_class = k
                p.runtime.seed = seed
                p.data.seed = seed  # the k-label draw (target_splits) varies with the seed too
                if epochs is not None:
                    p.finetune.epochs = epochs
                source_sha = None if name == SCRATCH else source_meta.get("weights_sha256")
                key = _key({**base, "seed": seed}, name, p.finetune.model_dump(mode="json"), source_sha)
                points.append(Point(name, k, seed, p, key, Path(work_dir) / f"{name}-k{k}-s{seed}-{key}"))
    return Plan(names, usable, seed_list, points, notes, floors)


def sample_efficiency(
    params: Params,
    source_model_dir: str | Path,
    ks: Sequence[int] = DEFAULT_KS,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    work_dir: str | Path = "artifacts/report/sweep",
    progress: bool = False,
    *,
    epochs: int | None = None,
    include_scratch: bool = True,
    keep_models: bool = False,
    on_point: Callable[[str, int, float], None] | None = None,
    seeds: Sequence[int] | None = None,
    floors: bool = True,
) -> Curves:
    """Test accuracy vs labels per class over seeds, from scratch and for each strategy.

    Every point trains with ``params`` except ``finetune.labels_per_class = k``,
    ``runtime.seed = seed`` (the k-label subset and the init; default: ``[runtime.seed]``)
    and ``finetune.epochs = epochs`` when given, for a quick sweep. Each is scored on the
    target validation split (what choices use) and the fixed test split (what is shown).
    With ``floors`` the classical floors (``transfer.baselines``) train on the same k-label
    subsets. A k larger than the smallest class of the target train split is skipped with a
    note. Points are cached under ``work_dir`` by a key of everything that determines them,
    so a second report of the same run trains nothing.
    """
    swept = plan(params, source_model_dir, ks, strategies, work_dir, epochs=epochs,
                 include_scratch=include_scratch, seeds=seeds, floors=floors)
    return execute(swept, params, source_model_dir, progress, keep_models=keep_models, on_point=on_point)


def execute(
    swept: Plan,
    params: Params,
    source_model_dir: str | Path,
    progress: bool = False,
    *,
    keep_models: bool = False,
    on_point: Callable[[str, int, float], None] | None = None,
) -> Curves:
    """Train (or read back) every point of ``swept``, then the floors."""
    from transfer import stages
    from transfer.data import load_split
    from transfer.train import resolve_device

    target_dir = stages.dataset_dirs(params)["target"]
    size, channels = params.data.image_size, params.data.channels
    eval_splits = {name: load_split(target_dir, name, size, channels) for name in ("test", "val")}
    eval_splits = {name: data for name, data in eval_splits.items() if len(data)}
    device = resolve_device(params.runtime.device)
    curves = Curves(notes=swept.notes)
    curves.seed_list = swept.seeds
    total = len(swept.points)
    by_name_k: dict[tuple[str, int], list[tuple[int, Point]]] = {}
    for i, point in enumerate(swept.points, 1):
        by_name_k.setdefault((point.name, point.k), []).append((i, point))
    for name in swept.names:
        for k in swept.ks:
            try:
                for done, point in by_name_k[(name, k)]:
                    if not point.cached:
                        log.info("sample efficiency %d/%d: training %s k=%d seed=%d", done, total, name, k,
                                 point.seed)
                    acc, seconds, cached = _point(stages, point, source_model_dir, eval_splits, device,
                                                  progress, keep_models)
                    curves.seeds.setdefault(name, {}).setdefault(k, []).append(acc["test"])
                    if "val" in acc:
                        curves.val.setdefault(name, {}).setdefault(k, []).append(acc["val"])
                    curves.points.append(
                        {"strategy": name, "k": k, "seed": point.seed, "accuracy": acc["test"],
                         "val_accuracy": acc.get("val"), "seconds": seconds, "cached": cached}
                    )
                    log.info("sample efficiency: %s k=%d seed=%d -> %.4f (%.1fs%s)", name, k, point.seed,
                             acc["test"], seconds, ", cached" if cached else "")
            except TransferError as error:
                curves.notes.append(f"{name} skipped from k={k} on: {error}")
                curves.seeds.get(name, {}).pop(k, None)
                curves.val.get(name, {}).pop(k, None)
                break
            curves.setdefault(name, {})[k] = float(np.mean(curves.seeds[name][k]))
            if on_point is not None:
                on_point(name, k, curves[name][k])
    if swept.floors:
        _floors(curves, stages, params, swept.ks, swept.seeds, eval_splits["test"])
    return curves


def _accuracy_on(model_dir: Path, splits: Mapping[str, Any], device: Any) -> dict[str, float]:
    from transfer.models import load_model_dir
    from transfer.train import accuracy

    model, meta = load_model_dir(model_dir)
    out = {}
    for name, data in splits.items():
        if list(meta.get("classes", data.classes)) != list(data.classes):
            raise TransferError(
                f"{model_dir} knows classes {meta.get('classes')}, the {name} split {data.classes}"
            )
        out[name] = accuracy(model, data, device)
    return out


def _floors(curves: Curves, stages: Any, params: Params, ks: Sequence[int], seeds: Sequence[int],
            test: Any) -> None:
    """Logistic regression, RBF SVC, LabelSpreading on raw pixels, same k-label subsets."""
    from transfer.baselines import classical_floors

    for k in ks:
        for seed in seeds:
            p = params.model_copy(deep=True)
            p.finetune.labels_per_class, p.runtime.seed = k, seed
            p.data.seed = seed  # the k-label draw (target_splits) varies with the seed too
            try:
                train = stages.target_splits(p)["train"]
                result = classical_floors(train, test, stages.unlabelled_target(p), seed=seed)["test"]
            except (TransferError, ValueError) as error:
                curves.notes.append(f"classical floors skipped at k={k}: {error}")
                break
            for name, floor in result.items():
                curves.floors.setdefault(name, {}).setdefault(k, []).append(floor.accuracy)


def _point(
    stages: Any,
    point: Point,
    source_model_dir: str | Path,
    splits: Mapping[str, Any],
    device: Any,
    progress: bool,
    keep_models: bool,
) -> tuple[dict[str, float], float, bool]:
    result_file = point.dir / "result.json"
    if result_file.exists():
        cached = json.loads(result_file.read_text())
        acc = {"test": float(cached["accuracy"])}
        if cached.get("val_accuracy") is not None:
            acc["val"] = float(cached["val_accuracy"])
        return acc, float(cached["seconds"]), True
    params = point.params
    started = time.perf_counter()
    if point.name == SCRATCH:
        trained = stages.train_scratch(params, point.dir, progress=progress)
    else:
        strategy = None if point.name == "auto" else point.name
        trained = stages.finetune(params, source_model_dir, point.dir, strategy=strategy, progress=progress)
    acc = _accuracy_on(Path(trained.model_dir), splits, device)
    seconds = time.perf_counter() - started
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(
        {"strategy": point.name, "resolved_strategy": trained.strategy, "k": point.k, "seed": point.seed,
         "epochs": params.finetune.epochs, "accuracy": acc["test"], "val_accuracy": acc.get("val"),
         "seconds": seconds},
        indent=2,
    ))
    if not keep_models:
        for sub in ("model", "checkpoints"):
            shutil.rmtree(point.dir / sub, ignore_errors=True)
    return acc, seconds, False


# --------------------------------------------------------------------------- the sweep stage


@dataclass
class Sweep:
    """A sweep's result: its curves, the file holding them, and whether it was reused."""

    key: str
    curves: Curves
    path: Path
    epochs: int | None
    reused: bool
    trained: int


def work_dir_of(params: Params) -> Path:
    """Where sweep points are cached: shared by ``transfer sweep`` and ``transfer report``."""
    return Path(params.runtime.artifacts_dir) / "report" / "sweep"


def read_current(path: Path, key: str) -> Curves | None:
    """The curves in ``path`` when it holds the sweep ``key`` (same inputs), else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return Curves.from_json(data) if isinstance(data, dict) and data.get("key") == key else None


def run_sweep(
    params: Params,
    source_model_dir: str | Path,
    out: str | Path | None = None,
    *,
    reuse: Sequence[str | Path] = (),
    progress: bool = False,
) -> Sweep:
    """The ``sweep`` stage: the sweep ``params.sweep`` names, from ``source_model_dir``.

    Seeds are ``runtime.seed``, +1, ... (``sweep.seeds`` of them); ``sweep.epochs`` overrides
    ``finetune.epochs``. The result goes to ``out`` and ``<work dir>/sweep-<key>.json``
    unless ``out``, one of ``reuse`` or that keyed file already holds this sweep (same key):
    then it is read back (copied to ``out``) and nothing trains. Otherwise the points not
    cached yet train.
    """
    settings = params.sweep
    seeds = [params.runtime.seed + i for i in range(settings.seeds)]
    work = work_dir_of(params)
    swept = plan(params, source_model_dir, settings.ks, settings.strategies, work,
                 epochs=settings.epochs, seeds=seeds)
    key = swept.key
    keyed = work / f"sweep-{key}.json"
    target = Path(out) if out is not None else keyed
    for candidate in dict.fromkeys((target, *map(Path, reuse), keyed)):
        curves = read_current(candidate, key)
        if curves is None:
            if candidate.is_file():
                log.info("sample-efficiency sweep %s: %s holds another sweep (other inputs)", key, candidate)
            continue
        log.info("sample-efficiency sweep %s: current in %s (same inputs): nothing to train", key, candidate)
        if out is not None and candidate != target:  # the stage's output must exist
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(candidate, target)
            candidate = target
        return Sweep(key, curves, candidate, settings.epochs, True, 0)
    to_train = [p for p in swept.points if not p.cached]
    log.info("sample-efficiency sweep %s: k=%s, %s, %d seed(s): %d of %d points to train (the rest cached "
             "under %s), then the classical floors", key, swept.ks, ", ".join(swept.names), len(seeds),
             len(to_train), len(swept.points), work)
    curves = execute(swept, params, source_model_dir, progress)
    text = json.dumps({"key": key, "epochs": settings.epochs, **curves.to_json()}, indent=2)
    for path in dict.fromkeys((target, keyed)):  # the keyed copy: a later report finds it
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Sweep(key, curves, target, settings.epochs, False, len(to_train))
