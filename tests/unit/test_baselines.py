"""Classical floors on raw pixels: they learn, and LabelSpreading uses the unlabelled pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from transfer.baselines import FLOORS, classical_floors
from transfer.data import ImageTensors, subsample_per_class


@pytest.fixture(scope="module")
def digits() -> tuple[ImageTensors, ImageTensors]:
    """scikit-learn's 8x8 digits as uint8 images, every other image as test."""
    bunch = load_digits()
    images = torch.from_numpy((bunch.images * 255 / 16).round().astype(np.uint8))[:, None]
    data = ImageTensors(images, torch.from_numpy(bunch.target), [str(i) for i in range(10)])
    index = np.arange(len(data))
    return data.subset(index[1::2]), data.subset(index[::2])


def test_floors_learn_from_five_labels_per_class(digits):
    pool, test = digits
    train = subsample_per_class(pool, 5, seed=0)
    out = classical_floors(train, test, pool, seed=0, also={"val": test.subset(range(100))})
    assert set(out) == {"test", "val"} and set(out["test"]) == set(FLOORS)
    for name, result in out["test"].items():
        assert result.correct.shape == (len(test),) and result.correct.dtype == bool
        assert result.accuracy == pytest.approx(result.correct.mean())
        assert result.accuracy > 0.7, name  # chance is 0.1
        assert out["val"][name].correct.shape == (100,)
    assert out["test"]["label_spreading"].n_unlabelled == len(pool)
    assert out["test"]["logreg"].n_unlabelled == 0


def test_label_spreading_gains_from_the_unlabelled_pool(digits):
    pool, test = digits
    train = subsample_per_class(pool, 1, seed=0)
    hidden = ImageTensors(pool.images, torch.full_like(pool.labels, -1), pool.classes)
    alone = classical_floors(train, test, None, seed=0)["test"]["label_spreading"]
    spread = classical_floors(train, test, hidden, seed=0)["test"]["label_spreading"]
    assert alone.n_unlabelled == 0 and spread.n_unlabelled == len(pool)
    assert spread.accuracy > alone.accuracy + 0.1


def test_floors_need_a_labelled_image(digits):
    pool, test = digits
    with pytest.raises(ValueError, match="at least one labelled"):
        classical_floors(pool.subset([]), test)
