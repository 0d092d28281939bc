"""The stage functions on tiny data: every strategy trains, exports and evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transfer import freezing, stages
from transfer.config import params_from_dict
from transfer.errors import TransferError
from transfer.models import load_model_dir
from transfer.strategies import (
    StrategyContext, StrategyResult, register_strategy, strategy_names, unregister_strategy,
)
from transfer.train import fit, predict_proba


def _accuracy_of(model_dir: Path, params, dataset: str) -> float:
    """Test accuracy recomputed from the saved model: what the stage must have reported."""
    model, _ = load_model_dir(model_dir)
    test = stages._load(params, dataset, "test")
    predicted = predict_proba(model, test, torch.device("cpu")).argmax(dim=1)
    return float((predicted == test.labels).float().mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stages")
    params = params_from_dict({
        "data": {"root": str(root / "data"), "image_size": 12, "source": {"n": 300},
                 "target": {"test_size": 200}},
        "pretrain": {"arch": "tiny_cnn", "epochs": 1, "batch_size": 64},
        "finetune": {"labels_per_class": 3, "epochs": 2, "batch_size": 16},
        "runtime": {"device": "cpu", "artifacts_dir": str(root / "artifacts")},
    })
    stages.prepare(params, progress=False)
    source = stages.pretrain(params, root / "source", progress=False)
    return params, source, root


def test_pretrain_records_provenance(tiny) -> None:
    params, source, _ = tiny
    meta = json.loads((Path(source.model_dir) / "model.json").read_text())
    assert len(meta["weights_sha256"]) == 64
    assert meta["classes"] == [str(i) for i in range(10)]
    assert len(source.history) == 1
    recomputed = _accuracy_of(Path(source.model_dir), params, "source")
    assert source.info["source_test_accuracy"] == pytest.approx(recomputed) == meta["source_test_accuracy"]


@pytest.mark.parametrize("strategy", strategy_names())
def test_every_strategy_exports_a_loadable_model(tiny, strategy: str) -> None:
    params, source, root = tiny
    trained = stages.finetune(params, source.model_dir, root / strategy, strategy=strategy, progress=False)
    model, meta = load_model_dir(trained.model_dir)
    assert meta["strategy"] == strategy and meta["source_weights_sha256"] == source.info["weights_sha256"]
    report = stages.evaluate(params, trained.model_dir, root / "eval", name=strategy)
    assert report["n_test"] == 200  # the temperature rescales, never reorders: same argmax
    assert report["accuracy"] == pytest.approx(_accuracy_of(Path(trained.model_dir), params, "target"))
    assert report["accuracy"] == pytest.approx(sum(report["correct"]) / 200)
    assert model(torch.zeros(3, 1, 12, 12)).shape == (3, 10)


def test_head_on_cached_features_leaves_body_untouched(tiny) -> None:
    params, source, root = tiny
    before, _ = load_model_dir(source.model_dir)
    trained = stages.finetune(params, source.model_dir, root / "head-check", strategy="head", progress=False)
    after, _ = load_model_dir(trained.model_dir)
    for (name, a), b in zip(before.body.state_dict().items(), after.body.state_dict().values()):
        assert torch.equal(a, b), name
    assert list((Path(params.data.root) / ".cache" / "features").glob("*.pt"))


@pytest.fixture
def toy_strategy():
    """A strategy from outside transfer/: one function, registered here, gone after the test."""

    @register_strategy("toy_head", description="the new head alone, one epoch of plain fit")
    def toy_head(ctx: StrategyContext) -> StrategyResult:
        model = ctx.source_model()
        model.reset_classifier(len(ctx.splits["train"].classes))
        freezing.apply_freeze(model, "head")
        one_epoch = ctx.params.finetune.model_copy(update={"epochs": 1})
        result = fit(model, ctx.splits["train"], ctx.splits["val"], one_epoch, device=ctx.device,
                     seed=ctx.params.runtime.seed, progress=False)
        return StrategyResult.of_fit(model, result)

    yield "toy_head"
    unregister_strategy("toy_head")


def test_a_new_strategy_is_one_function(tiny, toy_strategy: str) -> None:
    params, source, root = tiny
    p = params.model_copy(deep=True)
    p.finetune.strategy = toy_strategy  # named in params, like any built-in one
    trained = stages.finetune(p, source.model_dir, root / toy_strategy, progress=False)
    assert trained.strategy == toy_strategy and trained.info["reason"] == f"strategy={toy_strategy} set in params"
    assert len(trained.history) == 1 and trained.info["val_accuracy"] is not None
    before, _ = load_model_dir(source.model_dir)
    after, meta = load_model_dir(trained.model_dir)
    assert meta["strategy"] == toy_strategy and meta["trainable"]["frozen_blocks"] == before.block_names
    body_before, body_after = before.body.state_dict().values(), after.body.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(body_before, body_after, strict=True))
    report = stages.evaluate(p, trained.model_dir, root / "eval-toy", name=toy_strategy, plots=False)
    assert report["accuracy"] == pytest.approx(_accuracy_of(Path(trained.model_dir), p, "target"))


def test_auto_strategy_explains_itself(tiny) -> None:
    params, _, _ = tiny
    p = params.model_copy(deep=True)
    p.finetune.strategy = "auto"
    strategy, reason = stages.resolve_strategy(p)
    assert strategy == "gradual" and str(p.finetune.labels_per_class) in reason


def test_evaluate_rejects_a_model_of_other_classes(tiny, tmp_path: Path) -> None:
    params, source, _ = tiny
    from transfer.models import create_model, save_model_dir

    other = save_model_dir(create_model("tiny_cnn", 3, 1), tmp_path / "m", {"classes": ["a", "b", "c"]})
    with pytest.raises(TransferError, match="classes"):
        stages.evaluate(params, other, tmp_path / "eval")


def test_same_seed_same_source_model(tiny, tmp_path: Path) -> None:
    """CPU runs with the same seed match bit for bit, whatever the process did before."""
    params, source, _ = tiny
    torch.manual_seed(12345)  # disturb the global RNG: the stage must seed its own init
    again = stages.pretrain(params, tmp_path / "again", progress=False)
    assert again.info["weights_sha256"] == source.info["weights_sha256"]
