"""Rank candidate source models on the target before any fine-tuning.

A candidate is a source model (a TransferNet whose body gives features and whose head, if
trained on a source task, gives LEEP/NCE their source labels). Its body's features of the
k labelled target *train* images come from the frozen-feature cache; the test split is
never read here, so a choice made from the ranking cannot leak the holdout.

Candidate specs (``pretrain.candidates``, ``transfer rank --candidate``), resolved here
when local and by ``tasks/rank.py`` when they need MLflow or pretraining:
``random`` (random-init body of ``pretrain.arch``: an unrelated anchor that should rank
last), ``hub`` or a weights file (torchvision layout, into ``pretrain.arch``), a model
directory; glue-side: ``data`` (the pipeline's own source), ``data:<kind>`` or
``data:<ImageFolder dir>`` (a source pretrained on it), ``models:/...``/``runs:/...``, and
``registered`` (every source model registered in MLflow).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.config import Params, SourceData
from transfer.data import ImageTensors
from transfer.errors import TransferError
from transfer.feature_cache import FeatureCache, body_sha256, data_fingerprint, feature_key
from transfer.models import TransferNet, create_model, load_model_dir, weights_sha256
from transfer.train import seed_everything
from transfer.transferability import ESTIMATORS, NEEDS_SOURCE_HEAD, score_all

log = logging.getLogger(__name__)

TIE_RTOL = 1e-6  # scores closer than this (relative) are a tie


@dataclass
class Candidate:
    name: str
    model: TransferNet
    origin: str  # where it came from: path, URI, "random init", ...
    source_head: bool  # its head was trained on a source task (LEEP and NCE read it)
    model_dir: str | None = None  # a model dir the pipeline can start from
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ranking:
    estimator: str
    rows: list[dict[str, Any]]  # best first: name, origin, rank, scores, seconds
    chosen: dict[str, Any]
    reason: str
    ties: list[str]
    n_images: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def local_candidate(spec: str, params: Params) -> Candidate:
    """``random``, ``hub``/a weights file, or a model directory."""
    arch, channels = params.pretrain.arch, params.data.channels
    if spec == "random":
        seed_everything(params.runtime.seed)
        return Candidate("random", create_model(arch, 10, channels).eval(), f"random init ({arch})", True)
    path = Path(spec).expanduser()
    if path.is_dir():
        model, meta = load_model_dir(path)
        name = meta.get("source_name") or meta.get("source_kind") or path.resolve().parent.name
        return Candidate(str(name), model, str(path), True, str(path), _provenance(meta))
    if spec == "hub" or path.is_file():
        model = create_model(arch, 10, channels, weights=spec).eval()
        return Candidate(f"weights:{path.name if spec != 'hub' else 'hub'}", model, spec, False)
    raise _unknown_spec(spec)


def check_candidate_spec(spec: str) -> None:
    """Refuse a spec that no candidate resolver takes, before any data is prepared or a
    source pretrained (a typo then costs seconds, not a pretraining)."""
    named = spec in ("random", "hub", "data", "registered") or spec.startswith(("data:", "models:/", "runs:/"))
    if not (named or Path(spec).expanduser().exists()):
        raise _unknown_spec(spec)


def _unknown_spec(spec: str) -> TransferError:
    return TransferError(f"source candidate {spec!r} is not 'random', 'hub', a weights file, a model directory, "
                         "'data', 'data:<kind or folder>', 'registered' or an MLflow URI (models:/..., runs:/...)")


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("arch", "stage", "source_kind", "source_data_version", "source_test_accuracy", "weights_sha256")
    return {k: meta[k] for k in keys if k in meta}


def candidate_params(params: Params, spec: str) -> Params:
    """Params that pretrain a source on ``data:<kind>`` or ``data:<ImageFolder dir>``, in
    their own data root (data/candidates/<name>), so the pipeline's data/source stays."""
    what = spec.removeprefix("data:")
    source = SourceData(kind="imagefolder", path=what) if Path(what).is_dir() else _kind(what)
    name = Path(what).name if source.kind == "imagefolder" else what
    data = params.data.model_copy(update={"source": source,
                                          "root": str(Path(params.data.root) / "candidates" / name)})
    return params.model_copy(update={"data": data})


def _kind(kind: str) -> SourceData:
    kinds = [k for k in SourceData.model_fields["kind"].annotation.__args__ if k != "imagefolder"]
    if kind not in kinds:
        raise TransferError(f"source candidate data:{kind}: no such source kind or folder (kinds: {', '.join(kinds)})")
    return SourceData(kind=kind)


def _features(candidate: Candidate, train: ImageTensors, cache: FeatureCache, version: str,
              device: torch.device) -> torch.Tensor:
    """The frozen body's features (N, D) of the labelled images, through the shared cache."""
    shape = "x".join(str(s) for s in train.images.shape[1:])
    key = feature_key(version, body_sha256(candidate.model.body), "train", shape, data_fingerprint(train)[:16])
    return cache.get_or_compute(candidate.model.body, train, key, device)


def score_candidate(candidate: Candidate, train: ImageTensors, cache: FeatureCache, version: str,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Every estimator on one candidate, timed (feature extraction included)."""
    if candidate.model.in_channels != train.images.shape[1]:
        raise TransferError(f"source candidate {candidate.name} takes {candidate.model.in_channels} channel(s), "
                            f"the target has {train.images.shape[1]} (data.channels)")
    started = time.perf_counter()
    feats = _features(candidate, train, cache, version, torch.device(device))
    probs = None
    if candidate.source_head:
        with torch.no_grad():
            probs = candidate.model.head.cpu().eval()(feats).softmax(dim=1).numpy()
    scores = score_all(feats.numpy(), train.labels.numpy(), probs)
    return {"name": candidate.name, "origin": candidate.origin, "model_dir": candidate.model_dir,
            "provenance": candidate.provenance, "feature_dim": int(feats.shape[1]),
            **{e: _finite(scores.get(e)) for e in ESTIMATORS}, "seconds": time.perf_counter() - started}


def _finite(value: float | None) -> float | None:
    return value if value is not None and np.isfinite(value) else None  # NaN must not rank


def _order_key(row: dict[str, Any], estimator: str) -> tuple:
    # missing scores last; ties fall through to the other estimators, then listing order
    others = [e for e in ESTIMATORS if e != estimator]
    return tuple((row[e] is None, -(row[e] or 0.0)) for e in [estimator, *others])


def _tied(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= TIE_RTOL * max(abs(a), abs(b), 1e-12)


# ``auto``: the best audited record (benchmarks/transferability.py: weighted tau against the
# fine-tuned val accuracy, 4 sources x k in 1-20 x 3 seeds) is LEEP's; it needs every
# candidate's source head, so without one the ranking falls back to LogME, the best of the
# estimators that score features alone. One estimator ranks all rows: scores of two
# estimators are not comparable.
AUTO_PREFERRED, AUTO_HEADLESS = "leep", "logme"


def resolve_estimator(rows: list[dict[str, Any]], estimator: str) -> tuple[str, str]:
    """The estimator that ranks ``rows`` and, for ``auto``, why it was picked."""
    if estimator != "auto":
        return estimator, ""
    headless = [r["name"] for r in rows if r.get(AUTO_PREFERRED) is None]
    if not headless:
        return AUTO_PREFERRED, f"auto: {AUTO_PREFERRED} (best audited record)"
    return AUTO_HEADLESS, (f"auto: {AUTO_HEADLESS}, since {', '.join(headless)} has no source head "
                           f"for {AUTO_PREFERRED}")


def rank_rows(rows: list[dict[str, Any]], estimator: str) -> tuple[list[dict[str, Any]], str, list[str]]:
    """Rows best first (with ``rank``), the reason for the first and the ties at the top."""
    if estimator not in (*ESTIMATORS, "auto"):
        raise TransferError(f"unknown estimator {estimator!r}; one of auto, {', '.join(ESTIMATORS)}")
    if not rows:
        raise TransferError("no source candidate to rank: set pretrain.candidates")
    estimator, why = resolve_estimator(rows, estimator)
    ordered = sorted(rows, key=lambda r: _order_key(r, estimator))  # stable: listing order breaks full ties
    for i, row in enumerate(ordered, 1):
        row["rank"] = i
    best = ordered[0]
    if best[estimator] is None:
        raise TransferError(f"estimator {estimator} needs a source head that no candidate has: "
                            "use pretrain.rank_estimator=auto, logme or h_score")
    ties = [r["name"] for r in ordered[1:] if _tied(r[estimator], best[estimator])]
    runner = (f", next {ordered[1]['name']} {ordered[1][estimator]:.4g}"
              if len(ordered) > 1 and ordered[1][estimator] is not None else "")
    reason = f"{best['name']} ranked first of {len(ordered)} by {estimator} = {best[estimator]:.4g}{runner}"
    if ties:
        reason += f"; tied with {', '.join(ties)}: broken by the other estimators, then listing order"
    if why:
        reason += f" ({why})"
    return ordered, reason, ties


def _distinct(candidates: list[Candidate]) -> list[Candidate]:
    """One row per set of weights: the same model named twice (``data`` and ``registered``)
    is scored once, under its first name."""
    seen: dict[str, str] = {}
    kept = []
    for candidate in candidates:
        sha = weights_sha256(candidate.model.state_dict())
        if sha in seen:
            log.info("source candidate %s is %s again: scored once", candidate.origin, seen[sha])
            continue
        seen[sha] = candidate.name
        kept.append(candidate)
    return kept


def rank_candidates(candidates: list[Candidate], train: ImageTensors, cache: FeatureCache, version: str,
                    estimator: str, device: torch.device | str = "cpu") -> Ranking:
    """Score every candidate on the k labelled target train images and rank them."""
    started = time.perf_counter()
    candidates = _distinct(candidates)
    names = [c.name for c in candidates]
    duplicates = {n for n in names if names.count(n) > 1}
    for candidate in candidates:  # two candidates with one name would be unreadable in the table
        if candidate.name in duplicates:
            candidate.name = f"{candidate.name} ({candidate.origin})"
    rows = [score_candidate(c, train, cache, version, device) for c in candidates]
    ordered, reason, ties = rank_rows(rows, estimator)
    used = resolve_estimator(ordered, estimator)[0]
    return Ranking(used, ordered, ordered[0], reason, ties, len(train), time.perf_counter() - started)

