"""Transferability scores against hand-computed cases and reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import BayesianRidge

from transfer.errors import TransferError
from transfer.transferability import h_score, leep, logme, nce, score_all


def _bayesian_ridge_evidence(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME's quantity by scikit-learn: the maximised log marginal likelihood of a Bayesian
    linear regression per one-hot column (near-flat gamma priors), / N, mean over classes."""
    n = len(labels)
    evidences = []
    for c in np.unique(labels):
        fit = BayesianRidge(fit_intercept=False, compute_score=True, tol=1e-10, max_iter=1000,
                            alpha_1=1e-12, alpha_2=1e-12, lambda_1=1e-12, lambda_2=1e-12)
        fit.fit(features, (labels == c).astype(float))
        evidences.append(fit.scores_[-1] / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize("n,d", [(200, 16), (50, 128)])  # more and fewer images than dimensions
def test_logme_equals_the_bayesian_ridge_evidence(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, d))
    labels = np.arange(n) % 5
    assert logme(features, labels) == pytest.approx(_bayesian_ridge_evidence(features, labels), abs=1e-4)


def test_logme_prefers_features_that_separate_the_classes() -> None:
    rng = np.random.default_rng(1)
    labels = np.arange(60) % 3
    noise = rng.normal(size=(60, 8))
    informative = noise * 0.1 + np.eye(8)[labels] * 3.0  # class c lights up dimension c
    assert logme(informative, labels) > logme(noise, labels) + 0.5


def test_leep_by_hand() -> None:
    # theta = [[.8,.2],[.2,.8]], y = [0,1]: P(y,z) = theta/2, P(z) = [.5,.5], P(y|z) = theta;
    # EEP of each true label = .8*.8 + .2*.2 = .68
    probs = np.array([[0.8, 0.2], [0.2, 0.8]])
    assert leep(probs, np.array([0, 1])) == pytest.approx(math.log(0.68))
    # the source head predicts the target label exactly: log 1
    assert leep(np.eye(3), np.array([0, 1, 2])) == pytest.approx(0.0)
    # an uninformative head on two balanced classes: log 1/2
    assert leep(np.full((4, 3), 1 / 3), np.array([0, 0, 1, 1])) == pytest.approx(math.log(0.5))


def test_nce_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    assert nce(np.array([0, 0, 1, 1]), y) == pytest.approx(0.0)  # Z determines Y: H(Y|Z) = 0
    assert nce(np.array([5, 5, 7, 7]), y) == pytest.approx(0.0)  # source label names do not matter
    assert nce(np.array([0, 0, 0, 0]), y) == pytest.approx(-math.log(2))  # Z says nothing
    # z = [0,0,0,1]: z=0 holds y (0,0,1): -(3/4) H(2/3, 1/3); z=1 is pure
    expected = 0.75 * (2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert nce(np.array([0, 0, 0, 1]), y) == pytest.approx(expected)


def test_h_score_by_hand_and_shrinkage() -> None:
    f, y = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0, 0, 1, 1])
    # cov f = var(0,1,2,3) = 5/3; g = class means (.5,.5,2.5,2.5), cov g = 4/3: H = 0.8
    assert h_score(f, y, shrinkage=False) == pytest.approx(0.8)
    # with fewer images than dimensions the plain pseudo-inverse gives C - 1 for any features
    rng = np.random.default_rng(2)
    labels = np.arange(20) % 4
    assert h_score(rng.normal(size=(20, 64)), labels, shrinkage=False) == pytest.approx(3.0)
    # enough images per class: features that separate the classes score higher (bounded by C - 1)
    labels = np.arange(400) % 4
    informative = rng.normal(size=(400, 16)) * 0.1 + np.eye(16)[labels] * 3.0
    assert 2.9 < h_score(informative, labels) < 3.1
    assert h_score(rng.normal(size=(400, 16)), labels) < 0.5


def test_score_all_without_a_source_head_and_bad_shapes() -> None:
    rng = np.random.default_rng(3)
    feats, labels = rng.normal(size=(10, 4)), np.arange(10) % 2
    assert set(score_all(feats, labels, None)) == {"logme", "h_score"}
    assert set(score_all(feats, labels, np.full((10, 3), 1 / 3))) == {"logme", "h_score", "leep", "nce"}
    with pytest.raises(TransferError, match="N labels"):
        logme(feats, labels[:5])
