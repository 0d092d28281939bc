"""Temperature scaling: fitted on one split, it lowers the ECE of an over-confident model."""

from __future__ import annotations

import torch

from transfer.calibration import apply_temperature, fit_temperature, nll
from transfer.metrics import expected_calibration_error


def _overconfident(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 5-class model right ~70% of the time whose logits are scaled up 6x (too sure)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(n, 5, generator=g)
    logits[torch.arange(n), labels] += 1.5
    return torch.softmax(6.0 * logits, dim=1), labels


def test_temperature_lowers_ece_on_held_out_data() -> None:
    val_probs, val_labels = _overconfident(2000, seed=0)
    test_probs, test_labels = _overconfident(2000, seed=1)
    temperature = fit_temperature(val_probs, val_labels)
    assert temperature > 3.0  # undoes most of the 6x over-confidence
    before = expected_calibration_error(test_probs, test_labels)
    after = expected_calibration_error(apply_temperature(test_probs, temperature), test_labels)
    assert before > 0.15 and after < 0.05
    assert nll(test_probs, test_labels, temperature) < nll(test_probs, test_labels)


def test_temperature_never_changes_a_prediction() -> None:
    probs, _ = _overconfident(500, seed=2)
    assert torch.equal(apply_temperature(probs, 3.7).argmax(dim=1), probs.argmax(dim=1))
    assert torch.allclose(apply_temperature(probs, 1.0), probs)


def test_no_validation_data_keeps_the_model_as_is() -> None:
    assert fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.int64)) == 1.0
