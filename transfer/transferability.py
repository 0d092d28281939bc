"""Transferability scores: how well a frozen source body suits a target, before training.

Each score reads the body's features (N, D) of the k labelled target images (from the
frozen-feature cache) and, for LEEP and NCE, the source head's outputs on them; higher is
better for all four. Inputs are numpy arrays; labels are 0..C-1.

- :func:`logme`: evidence of a Bayesian linear model on the features (You et al., ICML 2021)
- :func:`leep`: log expected empirical prediction of the source head (Nguyen et al., ICML 2020)
- :func:`nce`: negative conditional entropy of target labels given source labels (Tran et al., ICCV 2019)
- :func:`h_score`: between-class over total feature covariance (Bao et al., ICIP 2019),
  with Ledoit-Wolf shrinkage for few images (Ibrahim et al., ICLR 2022)
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

from transfer.errors import TransferError

ESTIMATORS = ("logme", "leep", "nce", "h_score")
NEEDS_SOURCE_HEAD = {"leep", "nce"}  # they read the source classifier, not only the body


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f, y = np.asarray(features, dtype=np.float64), np.asarray(labels).astype(int)
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y) or len(y) < 2:
        raise TransferError(f"scores need (N, D) features and N labels, N >= 2; got {f.shape} and {y.shape}")
    return f, y


def _evidence(sigma: np.ndarray, vt_fy: np.ndarray, vt: np.ndarray, f: np.ndarray, y: np.ndarray,
              max_iter: int = 100) -> float:
    """Maximised log evidence / N for one target column (LogME Algorithm 1, Eq. 2-6).

    ``sigma``: eigenvalues of F^T F (D,), ``vt``: its eigenvectors as rows, ``vt_fy`` = V^T F^T y.
    alpha (prior precision) and beta (noise precision) follow MacKay's fixed point."""
    n, d = f.shape
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        gamma = float((beta * sigma / (alpha + beta * sigma)).sum())  # effective parameters
        m = vt.T @ (beta * vt_fy / (alpha + beta * sigma))  # posterior mean of the weights (D,)
        res2 = float(((f @ m - y) ** 2).sum())
        m2 = float(m @ m)
        new_alpha, new_beta = gamma / (m2 + 1e-12), (n - gamma) / (res2 + 1e-12)
        converged = abs(new_alpha / new_beta - alpha / beta) <= 1e-3 * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    m = vt.T @ (beta * vt_fy / (alpha + beta * sigma))
    res2, m2 = float(((f @ m - y) ** 2).sum()), float(m @ m)
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * sigma).sum()
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))  # Eq. 2
    return float(evidence / n)


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning", ICML 2021): for each class c, the log marginal likelihood (evidence) of a
    linear model w ~ N(0, 1/alpha), y_c = F w + N(0, 1/beta) on the one-hot column y_c,
    maximised over alpha and beta (Eq. 2, fixed point of Algorithm 1), divided by N and
    averaged over classes. One eigendecomposition of F^T F serves every class."""
    f, y = _check(features, labels)
    sigma, vecs = np.linalg.eigh(f.T @ f)  # (D,), (D, D) columns = eigenvectors
    sigma = np.clip(sigma, 0.0, None)
    vt = vecs.T
    evidences = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        evidences.append(_evidence(sigma, vt @ (f.T @ target), vt, f, target))
    return float(np.mean(evidences))


def _joint(source_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Empirical joint P(y, z) (C_target, Z_source) = 1/N sum_{i: y_i = y} theta(x_i)_z."""
    p, y = np.asarray(source_probs, dtype=np.float64), np.asarray(labels).astype(int)
    if p.ndim != 2 or len(p) != len(y):
        raise TransferError(f"source outputs (N, Z) and N labels expected; got {p.shape} and {y.shape}")
    joint = np.zeros((int(y.max()) + 1, p.shape[1]))
    np.add.at(joint, y, p)
    return joint / len(y)


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations", ICML 2020), Eq. 2: T = 1/N sum_i log sum_z P(y_i | z) theta(x_i)_z,
    with the empirical conditional P(y | z) = P(y, z) / P(z) of Eq. 1 built from the source
    head's softmax outputs theta(x) (N, Z)."""
    joint = _joint(source_probs, labels)
    conditional = joint / np.clip(joint.sum(axis=0, keepdims=True), 1e-300, None)  # P(y | z)
    p, y = np.asarray(source_probs, dtype=np.float64), np.asarray(labels).astype(int)
    eep = (p * conditional[y]).sum(axis=1)  # expected empirical prediction of the true label
    return float(np.log(np.clip(eep, 1e-300, None)).mean())


def nce(source_labels: np.ndarray, labels: np.ndarray) -> float:
    """NCE (Tran et al., "Transferability and Hardness of Supervised Classification Tasks",
    ICCV 2019), Eq. 3-4: -H(Y | Z) = sum_{y,z} P(y, z) log P(y | z), from the counts of
    (target label y, source hard label z = argmax of the source head) pairs."""
    z = np.asarray(source_labels).astype(int)
    one_hot = np.zeros((len(z), int(z.max()) + 1))
    one_hot[np.arange(len(z)), z] = 1.0
    joint = _joint(one_hot, labels)
    marginal = joint.sum(axis=0, keepdims=True)  # P(z)
    mask = joint > 0
    return float((joint[mask] * np.log(joint[mask] / np.broadcast_to(marginal, joint.shape)[mask])).sum())


def h_score(features: np.ndarray, labels: np.ndarray, shrinkage: bool = True) -> float:
    """H-score (Bao et al., "An Information-Theoretic Approach to Transferability in Task
    Transfer Learning", ICIP 2019), Eq. 2: tr(cov(f)^-1 cov(E[f | y])).

    ``shrinkage``: cov(f) by Ledoit-Wolf (sklearn), the regularised H-score of Ibrahim et al.
    ("Newer is not always better", ICLR 2022): with fewer images than feature dimensions the
    plain pseudo-inverse makes the score the constant C - 1 whatever the features. Even so,
    with a few images per class the class means of pure-noise dimensions vary by chance and
    inflate cov(E[f | y]): at small k the score is biased towards wide noisy features (see
    the audit in benchmarks/results/transferability.md)."""
    f, y = _check(features, labels)
    f = f - f.mean(axis=0)
    cov_f = LedoitWolf(assume_centered=True).fit(f).covariance_ if shrinkage else np.cov(f, rowvar=False)
    cov_f = np.atleast_2d(cov_f)
    class_means = np.zeros_like(f)
    for c in np.unique(y):
        class_means[y == c] = f[y == c].mean(axis=0)  # g(x) = E[f | y(x)]
    cov_g = np.atleast_2d(np.cov(class_means, rowvar=False, bias=shrinkage))
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15, hermitian=True) @ cov_g))


def score_all(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None) -> dict[str, float]:
    """Every estimator the inputs allow (LEEP and NCE need the source head's outputs)."""
    scores = {"logme": logme(features, labels), "h_score": h_score(features, labels)}
    if source_probs is not None:
        scores["leep"] = leep(source_probs, labels)
        scores["nce"] = nce(np.asarray(source_probs).argmax(axis=1), labels)
    return scores
