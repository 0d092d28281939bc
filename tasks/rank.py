"""Rank source candidates on the target (``transfer rank``, ``pretrain.source: auto``): the
MLflow side. Scoring is ``transfer.ranking``; here candidates that need MLflow or
pretraining are resolved, sources pretrained for a candidate are registered under their
own names with their provenance, and every ranking is logged as a run (table artifact +
one metric per estimator and candidate)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.adapters import tracking
from transfer import stages
from transfer.config import Params
from transfer.data import dataset_version, prepare_source
from transfer.errors import TransferError
from transfer.feature_cache import FeatureCache
from transfer.models import load_model_dir
from transfer.ranking import (
    Candidate,
    Ranking,
    candidate_params,
    check_candidate_spec,
    local_candidate,
    rank_candidates,
)
from transfer.train import runtime_device
from transfer.transferability import ESTIMATORS

ROLE_TAG = "transfer.role"  # registered models with this tag = "source" are source candidates
DEFAULT_CANDIDATES = ["data", "random"]  # `transfer rank` with no pretrain.candidates


def source_model_name(params: Params) -> str:
    """``source-<kind>`` (``source-<folder>`` for an ImageFolder), the registry name."""
    spec = params.data.source
    name = Path(spec.path).resolve().name if spec.kind == "imagefolder" and spec.path else spec.kind
    return "source-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "imagefolder")


def register_source(client: MlflowClient, params: Params, source: dict[str, Any]) -> str | None:
    """Register a source model pretrained here under its own name (once per weights)."""
    run_id = source.get("run_id")
    if not run_id:
        return None
    name = source_model_name(params)
    sha = source["weights_sha256"]
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get("weights_sha256") == sha:
            return f"models:/{name}/{version.version}"
    client.log_artifacts(run_id, source["model_dir"], "source_model")
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        try:
            client.create_registered_model(name, tags={ROLE_TAG: "source"})
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise  # anything but another machine registering it meanwhile
    spec = params.data.source
    tags = {"weights_sha256": sha, "data.source.kind": spec.kind, "data.source.path": spec.path or "",
            "data.source.version": source.get("data_version", ""), "arch": params.pretrain.arch,
            "source_test_accuracy": str(source.get("source_test_accuracy", "")), "pretrain_run_id": run_id}
    version = client.create_model_version(name, f"{client.get_run(run_id).info.artifact_uri}/source_model",
                                          run_id=run_id, tags=tags)
    return f"models:/{name}/{version.version}"


def _pretrained_source(params: Params, register: bool) -> dict[str, Any]:
    """The pipeline's source for these params: prepared, pretrained once (keyed), registered."""
    from tasks.train import pretrain_source

    version = dataset_version(prepare_source(params.data, progress=False,
                                             min_per_split=params.validate_.min_per_class))
    plain = params.model_copy(update={"pretrain": params.pretrain.model_copy(
        update={"source": "data", "source_model": None})})
    source = pretrain_source(plain, {"source": {"version": version}}, None)
    source["data_version"] = version
    if register:
        source["registered_as"] = register_source(tracking.configure(params), params, source)
    return source


def _from_dir(model_dir: str | Path, name: str, origin: str) -> Candidate:
    model, meta = load_model_dir(model_dir)
    keep = ("arch", "source_kind", "source_data_version", "source_test_accuracy", "weights_sha256")
    return Candidate(name, model, origin, True, str(model_dir), {k: meta[k] for k in keep if k in meta})


def _registered(client: MlflowClient) -> list[str]:
    uris = []
    for model in client.search_registered_models(filter_string=f"tags.`{ROLE_TAG}` = 'source'"):
        versions = client.search_model_versions(f"name='{model.name}'")
        if versions:
            uris.append(f"models:/{model.name}/{max(int(v.version) for v in versions)}")
    return uris


def resolve(params: Params, spec: str, register: bool = True) -> list[Candidate]:
    """One candidate spec -> the candidates it names (``registered`` may name several)."""
    if spec == "data":
        source = _pretrained_source(params, register)
        return [_from_dir(source["model_dir"], source_model_name(params), "data.source (this pipeline)")]
    if spec.startswith("data:"):
        cparams = candidate_params(params, spec)
        source = _pretrained_source(cparams, register)
        return [_from_dir(source["model_dir"], source_model_name(cparams), spec)]
    if spec == "registered":
        client = tracking.configure(params)
        return [c for uri in _registered(client) for c in resolve(params, uri, register)]
    if spec.startswith(("models:/", "runs:/")):
        tracking.configure(params)
        model_dir = tracking.kept_download(spec)  # the chosen one is the run's source model
        name = spec.removeprefix("models:/").split("/")[0].split("@")[0] if spec.startswith("models:/") else spec
        return [_from_dir(model_dir, name, spec)]
    return [local_candidate(spec, params)]


def candidate_specs(params: Params, extra: list[str] | None = None) -> list[str]:
    """What is ranked: the pipeline's own source first, then pretrain.candidates (or the
    defaults), then ``extra``; each once, in that order (the order breaks full ties)."""
    specs = ["data", *(params.pretrain.candidates or DEFAULT_CANDIDATES[1:]), *(extra or [])]
    specs = list(dict.fromkeys(specs))
    for spec in specs:
        check_candidate_spec(spec)
    return specs


def rank_sources(params: Params, specs: list[str], estimator: str | None = None,
                 parent_run_id: str | None = None) -> Ranking:
    """Score every candidate on the target train pool's k labels; log the ranking to MLflow."""
    candidates = [c for spec in specs for c in resolve(params, spec)]
    train = stages.target_splits(params)["train"]  # the k labels; val and test are not read
    version = dataset_version(stages.dataset_dirs(params)["target"])
    cache = FeatureCache(Path(params.data.root) / ".cache" / "features")
    ranking = rank_candidates(candidates, train, cache, version, estimator or params.pretrain.rank_estimator,
                              runtime_device(params.runtime))
    log_ranking(params, ranking, parent_run_id)
    return ranking


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", name)


def ranking_markdown(ranking: Ranking) -> str:
    lines = [f"estimator: {ranking.estimator}; {ranking.reason}", "",
             "| rank | source | " + " | ".join(ESTIMATORS) + " | seconds | origin |",
             "|---|---|" + "---|" * len(ESTIMATORS) + "---|---|"]
    for row in ranking.rows:
        scores = " | ".join("-" if row[e] is None else f"{row[e]:.4f}" for e in ESTIMATORS)
        lines.append(f"| {row['rank']} | {row['name']} | {scores} | {row['seconds']:.2f} | {row['origin']} |")
    return "\n".join(lines) + "\n"


def log_ranking(params: Params, ranking: Ranking, parent_run_id: str | None = None) -> str:
    """One MLflow run: ranking.json + ranking.md, metrics ``<estimator>.<source>``, the choice."""
    client = tracking.configure(params)
    with tracking.tracked_run(client, params, "rank sources", parent_run_id, {"stage": "rank"}) as run_id:
        tracking.log_params(client, run_id, {"rank_estimator": ranking.estimator, "n_images": ranking.n_images,
                                             "candidates": ",".join(r["name"] for r in ranking.rows)})
        tracking.log_metrics(client, run_id, {
            f"{e}.{_metric_name(r['name'])}": r[e] for r in ranking.rows for e in ESTIMATORS if r[e] is not None})
        tracking.log_metrics(client, run_id, {"rank_seconds": ranking.seconds})
        tracking.set_tags(client, run_id, {"chosen_source": ranking.chosen["name"], "choice_reason": ranking.reason,
                                           "ties": ",".join(ranking.ties)})
        tracking.log_json(client, run_id, ranking.to_json(), "ranking/ranking.json")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ranking.md"
            path.write_text(ranking_markdown(ranking))
            client.log_artifact(run_id, str(path), "ranking")
    return run_id


def choose_source(params: Params, parent_run_id: str | None) -> dict[str, Any]:
    """``pretrain.source: auto``: the best-ranked candidate's model dir, with the reason."""
    ranking = rank_sources(params, candidate_specs(params), parent_run_id=parent_run_id)
    best = ranking.chosen
    if not best.get("model_dir"):
        raise TransferError(f"pretrain.source=auto: the best-ranked candidate {best['name']} ({best['origin']}) "
                            "is not a trained source model: remove it from pretrain.candidates")
    _, meta = load_model_dir(best["model_dir"])
    return {"model_dir": best["model_dir"], "weights_sha256": meta.get("weights_sha256"),
            "origin": f"pretrain.source=auto: {best['origin']}", "reused": True, "run_id": None,
            "chosen_source": best["name"], "choice_reason": f"pretrain.source=auto: {ranking.reason}",
            "ranking": json.loads(json.dumps(ranking.rows, default=str))}
