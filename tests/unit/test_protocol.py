"""The evaluation protocol: nothing the pipeline chooses depends on the test holdout.

Choices = the strategy ``auto`` runs, the seed that gets registered, the temperature, the
source ranking that ``pretrain.source: auto`` follows. The
test permutes the test split's labels on disk and checks every choice is unchanged, while
the test figures do change (so the permutation really reached the data).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from transfer import stages
from transfer.config import params_from_dict


def _params(root: Path):
    return params_from_dict({
        "data": {"root": str(root / "data"), "image_size": 12, "source": {"n": 300},
                 "target": {"test_size": 200}},
        "pretrain": {"arch": "tiny_cnn", "epochs": 1, "batch_size": 64},
        "finetune": {"strategy": "auto", "labels_per_class": 3, "epochs": 3, "batch_size": 16, "seeds": 3},
        "runtime": {"device": "cpu", "artifacts_dir": str(root / "artifacts")},
    })


def _choices(params, source_dir: str, out: Path) -> tuple[dict, list[dict]]:
    runs = []
    for seed in params.seeds():
        trained = stages.finetune(params.with_seed(seed), source_dir, out / f"seed{seed}", progress=False)
        runs.append({"seed": seed, "strategy": trained.strategy, "model_dir": trained.model_dir, **trained.info})
    keep = ("seed", "strategy", "temperature", "val_accuracy", "val_nll")
    return {k: stages.best_on_validation(runs)[k] for k in keep}, [{k: r[k] for k in keep} for r in runs]


def _ranking(params, source_dir: str, cache_dir: Path) -> list[tuple]:
    from transfer.data import dataset_version
    from transfer.feature_cache import FeatureCache
    from transfer.ranking import local_candidate, rank_candidates

    candidates = [local_candidate(source_dir, params), local_candidate("random", params)]
    ranking = rank_candidates(candidates, stages.target_splits(params)["train"], FeatureCache(cache_dir),
                              dataset_version(stages.dataset_dirs(params)["target"]), "logme")
    return [(r["name"], r["logme"], r["leep"], r["nce"], r["h_score"]) for r in ranking.rows]


def _permute_test_labels(dataset: Path, seed: int = 0) -> None:
    manifest = dataset / "manifest.csv"
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [i for i, row in enumerate(rows) if row["split"] == "test"]
    labels = np.random.default_rng(seed).permutation([rows[i]["label"] for i in test])
    for i, label in zip(test, labels):
        rows[i]["label"] = str(label)
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.slow  # prepare, pretrain, two fine-tune sweeps, two rankings: end to end
def test_permuting_test_labels_changes_no_choice(tmp_path: Path) -> None:
    params = _params(tmp_path)
    stages.prepare(params, progress=False)
    source = stages.pretrain(params, tmp_path / "source", progress=False)
    chosen, per_seed = _choices(params, source.model_dir, tmp_path / "before")
    assert len({r["temperature"] for r in per_seed}) > 1  # seeds really differ: the choice is real
    test_before = stages.evaluate(params, Path(tmp_path / "before" / f"seed{chosen['seed']}" / "model"),
                                  tmp_path / "eval-before", plots=False)

    ranking = _ranking(params, source.model_dir, tmp_path / "features-before")

    _permute_test_labels(Path(params.data.root) / "target")
    chosen_after, per_seed_after = _choices(params, source.model_dir, tmp_path / "after")
    assert chosen_after == chosen and per_seed_after == per_seed
    assert _ranking(params, source.model_dir, tmp_path / "features-after") == ranking
    test_after = stages.evaluate(params, Path(tmp_path / "after" / f"seed{chosen['seed']}" / "model"),
                                 tmp_path / "eval-after", plots=False)
    assert test_after["correct"] != test_before["correct"]  # the holdout did change


def test_the_registered_seed_is_the_best_on_validation() -> None:
    runs = [{"seed": 0, "val_accuracy": 0.80, "val_nll": 0.5}, {"seed": 1, "val_accuracy": 0.85, "val_nll": 0.7},
            {"seed": 2, "val_accuracy": 0.85, "val_nll": 0.6}]
    assert stages.best_on_validation(runs)["seed"] == 2  # tie on accuracy: lower NLL wins
    with pytest.raises(Exception, match="no trained seed"):
        stages.best_on_validation([])
