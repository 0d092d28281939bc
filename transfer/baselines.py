"""Classical floors: what plain scikit-learn gets from the same k labels on raw pixels.

A transfer strategy the pipeline recommends has to beat these at the same budget, or the
report says it does not. Each floor is trained on the same labelled subset the network sees
and scored on the same images, so its per-image correctness vector can be compared paired
(``transfer.stats.compare_paired``) with the network's.

Settings (fixed beforehand, never tuned on test; scikit-learn defaults where they fit):

- features: raw pixels scaled to [0, 1] (uint8 / 255), flattened (C*H*W values);
- ``logreg``: ``LogisticRegression(C=1.0, max_iter=2000)`` (lbfgs, multinomial);
- ``svc_rbf``: ``SVC(kernel="rbf", C=1.0, gamma="scale")``;
- ``label_spreading``: ``LabelSpreading(kernel="knn", n_neighbors=7, alpha=0.2,
  max_iter=1000)`` on the labelled subset plus the unlabelled pool (labels hidden). The knn
  kernel, because the default rbf kernel (gamma=20) underflows to an all-zero graph on
  1,024 pixels in [0, 1] (squared distances in the tens); knn graphs do not depend on scale.
  Without an unlabelled pool it spreads over the labelled images only. The pool may hold the
  labelled images too (the pipeline's unlabelled target is the whole train pool): a labelled
  image's unlabelled copy is its own nearest neighbour and takes its label, harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.semi_supervised import LabelSpreading
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from transfer.data.tensors import ImageTensors

FLOORS = ("logreg", "svc_rbf", "label_spreading")
LABEL_SPREADING_NEIGHBOURS = 7


@dataclass(frozen=True)
class FloorResult:
    """One classical model on one evaluation split."""

    name: str
    accuracy: float
    correct: np.ndarray  # (N,) bool, image i of the evaluation split right or not
    n_labelled: int
    n_unlabelled: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "accuracy": self.accuracy, "n_labelled": self.n_labelled,
                "n_unlabelled": self.n_unlabelled}


def pixels(data: ImageTensors) -> np.ndarray:
    """(N, C*H*W) float64 in [0, 1]."""
    return data.images.reshape(len(data), -1).numpy().astype(np.float64) / 255.0


def _models(seed: int, n_train: int) -> dict[str, Any]:
    neighbours = max(1, min(LABEL_SPREADING_NEIGHBOURS, n_train - 1))
    return {
        "logreg": LogisticRegression(C=1.0, max_iter=2000, random_state=seed),
        "svc_rbf": SVC(kernel="rbf", C=1.0, gamma="scale", random_state=seed),
        "label_spreading": LabelSpreading(kernel="knn", n_neighbors=neighbours, alpha=0.2, max_iter=1000),
    }


def classical_floors(
    train: ImageTensors,
    test: ImageTensors,
    unlabelled: ImageTensors | None = None,
    *,
    seed: int = 0,
    also: dict[str, ImageTensors] | None = None,
) -> dict[str, dict[str, FloorResult]]:
    """Fit the three floors on ``train`` (+ ``unlabelled`` for LabelSpreading), score them.

    Returns ``{split: {floor: FloorResult}}`` for ``"test"`` and every split in ``also``
    (e.g. ``{"val": val}``), each model fitted once. ``unlabelled`` labels are ignored.
    """
    if len(train) == 0 or int((train.labels >= 0).sum()) == 0:
        raise ValueError("classical floors need at least one labelled training image")
    x, y = pixels(train), train.labels.numpy()
    x_u = pixels(unlabelled) if unlabelled is not None and len(unlabelled) else np.zeros((0, x.shape[1]))
    splits = {"test": test, **(also or {})}
    with threadpool_limits(1):  # tiny problems: BLAS threads only contend (30x slower under load)
        return _fit_and_score(x, y, x_u, splits, seed)


def _fit_and_score(x: np.ndarray, y: np.ndarray, x_u: np.ndarray, splits: dict[str, ImageTensors],
                   seed: int) -> dict[str, dict[str, FloorResult]]:
    out: dict[str, dict[str, FloorResult]] = {name: {} for name in splits}
    for name, model in _models(seed, len(x) + len(x_u)).items():
        if name == "label_spreading":
            model.fit(np.vstack([x, x_u]), np.concatenate([y, np.full(len(x_u), -1)]))
        elif len(np.unique(y)) < 2:
            model = _Constant(int(y[0]))  # one class seen: sklearn refuses, the floor is constant
        else:
            model.fit(x, y)
        for split, data in splits.items():
            with np.errstate(invalid="ignore", divide="ignore"):  # knn spreading: unreached images
                correct = model.predict(pixels(data)) == data.labels.numpy()
            out[split][name] = FloorResult(name, float(correct.mean()) if len(correct) else 0.0,
                                           correct, len(x), len(x_u) if name == "label_spreading" else 0)
    return out


class _Constant:
    def __init__(self, label: int) -> None:
        self.label = label

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.label)
