"""Metrics agree with scikit-learn; calibration and plots behave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from transfer.metrics import (
    accuracy,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    per_class_recall,
)
from transfer.plots import (
    plot_confusion_matrix, plot_learning_curves, plot_reliability, plot_runs_learning_curves, plot_transfer_gain,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
K = 5


@pytest.fixture
def labels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, K, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, K, 300))
    y_pred[y_pred == 4] = 3  # class 4 is never predicted: F1 0 for it
    return y_true, y_pred


def test_metrics_match_sklearn(labels) -> None:
    y_true, y_pred = labels
    assert accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(
        confusion_matrix(y_true, y_pred, K), skm.confusion_matrix(y_true, y_pred, labels=range(K))
    )
    np.testing.assert_allclose(
        per_class_recall(y_true, y_pred, K),
        skm.recall_score(y_true, y_pred, labels=range(K), average=None, zero_division=0),
    )
    assert macro_f1(y_true, y_pred, K) == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=range(K), average="macro", zero_division=0)
    )


def test_absent_class_counts_in_macro_average() -> None:
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert macro_f1(y_true, y_pred, 3) == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert per_class_recall(y_true, y_pred, 3).tolist() == [0.5, 1.0, 0.0]


def test_accepts_torch_tensors(labels) -> None:
    y_true, y_pred = labels
    assert accuracy(torch.from_numpy(y_true), torch.from_numpy(y_pred)) == accuracy(y_true, y_pred)


def test_out_of_range_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix([0, 3], [0, 1], 3)


def test_ece_is_zero_for_a_perfectly_calibrated_toy() -> None:
    # 10 samples at confidence 0.8 of which 8 are right, 10 at 0.6 of which 6 are right
    probs = np.array([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 10)
    y_true = np.array([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4)
    assert expected_calibration_error(probs, y_true, n_bins=10) == pytest.approx(0.0)


def test_ece_of_an_overconfident_toy() -> None:
    probs = np.array([[0.9, 0.1]] * 10)  # 90 % sure, 50 % right
    y_true = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, y_true) == pytest.approx(0.4)
    # confidence exactly on a bin edge falls in the lower bin (lo, hi]
    edge = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert expected_calibration_error(edge, np.array([0, 0]), n_bins=2) == pytest.approx(0.25)


def test_classification_report_is_json_able() -> None:
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(50, 3)))
    probs, y_true = logits.softmax(dim=1), torch.from_numpy(rng.integers(0, 3, 50))
    report = classification_report(probs, y_true, ["a", "b", "c"], n_bins=5)
    again = json.loads(json.dumps(report))
    assert again == report
    assert set(report) == {"accuracy", "macro_f1", "ece", "per_class_recall", "confusion_matrix"}
    assert list(report["per_class_recall"]) == ["a", "b", "c"]
    assert np.array(report["confusion_matrix"]).sum() == 50
    pred = probs.argmax(dim=1).numpy()
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true.numpy(), pred))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        classification_report(probs, y_true, ["a", "b", "c", "d"])


def _assert_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_png_files(tmp_path, labels) -> None:
    y_true, y_pred = labels
    cm = confusion_matrix(y_true, y_pred, K)
    _assert_png(plot_confusion_matrix(cm.tolist(), list("abcde"), tmp_path / "cm" / "cm.png", "cm"))
    history = [
        {"epoch": 1, "train_loss": 2.0, "val_loss": 1.8, "train_acc": 0.3, "val_acc": 0.35},
        {"epoch": 2, "train_loss": 1.2, "val_loss": None, "train_acc": 0.6, "val_acc": None},
        {"epoch": 3, "train_loss": 0.8, "val_loss": 1.0, "train_acc": 0.8, "val_acc": 0.7},
    ]
    _assert_png(plot_learning_curves(history, tmp_path / "curves.png", "finetune"))
    _assert_png(plot_runs_learning_curves({"gradual seed 0": history, "scratch seed 0": history[:2]},
                                          tmp_path / "seeds.png"))
    gains = {"scratch": 0.16, "head": 0.56, "last_k": 0.7, "full": 0.8, "bad": 0.1}
    _assert_png(plot_transfer_gain(gains, tmp_path / "gain.png", "transfer gain"))
    _assert_png(plot_transfer_gain({"full": 0.8}, tmp_path / "gain_no_baseline.png"))
    probs = np.random.default_rng(0).dirichlet(np.ones(K), size=len(y_true))
    _assert_png(plot_reliability(probs, y_true, tmp_path / "rel.png"))
