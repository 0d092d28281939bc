"""The training loop: learns, is deterministic on CPU, resumes after a crash to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transfer.config import OptimParams
from transfer.data import ImageTensors
from transfer.errors import TransferError
from transfer.models import create_model
from transfer.train import CrashAfterEpoch, fit, predict_proba, resolve_device

CPU = torch.device("cpu")


def _toy(n: int = 48, size: int = 8, seed: int = 0) -> ImageTensors:
    """Three classes told apart by which third of the image is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 40, (n, 1, size, size), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, :, y * 3 : y * 3 + 2] = 220
    return ImageTensors(images, labels, ["a", "b", "c"])


def _cfg(epochs: int = 4, **kw) -> OptimParams:
    return OptimParams(epochs=epochs, batch_size=16, lr=0.01, **kw)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def test_overfits_a_small_set() -> None:
    data = _toy()
    model = create_model("tiny_cnn", 3, 1)
    result = fit(model, data, data, _cfg(epochs=15, augment=False), device=CPU, seed=0, progress=False)
    assert result.history[-1].train_loss < 0.3 < result.history[0].train_loss
    assert result.best_val_acc == 1.0


def test_same_seed_same_weights_on_cpu() -> None:
    torch.manual_seed(0)
    a = create_model("tiny_cnn", 3, 1)
    b = create_model("tiny_cnn", 3, 1)
    b.load_state_dict(a.state_dict())
    fit(a, _toy(), None, _cfg(), device=CPU, seed=7, progress=False)
    torch.manual_seed(999)
    fit(b, _toy(), None, _cfg(), device=CPU, seed=7, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b)))


def test_resume_after_crash_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    init = create_model("tiny_cnn", 3, 1).state_dict()
    straight = create_model("tiny_cnn", 3, 1)
    straight.load_state_dict(init)
    fit(straight, _toy(), _toy(seed=1), _cfg(), device=CPU, seed=3, progress=False)

    crashed = create_model("tiny_cnn", 3, 1)
    crashed.load_state_dict(init)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, _toy(), _toy(seed=1), _cfg(), device=CPU, seed=3, progress=False,
            checkpoint_dir=tmp_path, callbacks=[CrashAfterEpoch(2)])
    assert (tmp_path / "last.pt").exists() and not list(tmp_path.glob("*.tmp"))

    resumed = create_model("tiny_cnn", 3, 1)  # a fresh process: weights come from the checkpoint
    result = fit(resumed, _toy(), _toy(seed=1), _cfg(), device=CPU, seed=3, progress=False, checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 2 and [s.epoch for s in result.history] == [1, 2, 3, 4]
    assert all(torch.equal(x, y) for x, y in zip(_weights(straight), _weights(resumed)))


def test_predict_proba_rows_sum_to_one() -> None:
    probs = predict_proba(create_model("tiny_cnn", 3, 1), _toy(n=10), CPU, batch_size=4)
    assert probs.shape == (10, 3) and torch.allclose(probs.sum(1), torch.ones(10))


def test_user_errors() -> None:
    model = create_model("tiny_cnn", 3, 1)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TransferError, match="frozen"):
        fit(model, _toy(), None, _cfg(), device=CPU, seed=0, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(TransferError, match="no CUDA"):
            resolve_device("cuda")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "last.pt").write_bytes(b"torn write")
    with pytest.raises(TransferError, match="unreadable"):
        fit(create_model("tiny_cnn", 3, 1), _toy(), None, _cfg(), device=CPU, seed=0, progress=False,
            checkpoint_dir=tmp_path)
