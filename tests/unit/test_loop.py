"""One training loop: ``fit`` with a pluggable objective trains any module, on images or on
float inputs, and resumes a non-plain objective (DANN) to the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer.config import OptimParams
from transfer.data import ImageTensors
from transfer.errors import TransferError
from transfer.techniques.dann import DANN, train_dann
from transfer.train import CrashAfterEpoch, Features, Objective, StepOut, _Loop, accuracy, fit, seed_everything

CPU = torch.device("cpu")


class Hinge(Objective):
    """A multiclass hinge loss instead of cross-entropy; counts its steps (state to resume)."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self, loop: _Loop, x: Tensor, y: Tensor, idx: Tensor) -> StepOut:
        logits = loop.forward(x)  # (b, K)
        loss = F.multi_margin_loss(logits, y)
        self.steps += 1
        return StepOut(loss, loss.detach().double() * len(y), logits, y)

    def epoch_metrics(self, loop: _Loop) -> dict[str, Any]:
        return {"steps": self.steps}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


def _separable(n: int = 60, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 5, generator=g) + 3.0 * F.one_hot(y, 5).float()  # (N, 5)
    return Features(x, y)


def test_a_custom_objective_trains_a_plain_module_on_features() -> None:
    data, cfg = _separable(), OptimParams(epochs=6, batch_size=16, lr=0.05, augment=True)
    seed_everything(0)
    model = nn.Linear(5, 3)
    before = accuracy(model, data, CPU)
    objective = Hinge()
    result = fit(model, data, _separable(seed=1), cfg, device=CPU, seed=0, objective=objective, progress=False)
    losses = [s.train_loss for s in result.history]
    assert losses[-1] < 0.5 * losses[0]  # the hinge loss is what was minimised
    assert accuracy(model, _separable(seed=1), CPU) >= 0.9 > before
    assert [s.as_dict()["steps"] for s in result.history] == [4 * e for e in range(1, 7)]  # 60 / 16 -> 4 a epoch


def test_a_resumed_custom_objective_gets_its_state_back(tmp_path: Path) -> None:
    cfg = OptimParams(epochs=4, batch_size=16, lr=0.05)
    seed_everything(0)
    init = nn.Linear(5, 3).state_dict()
    straight = nn.Linear(5, 3)
    straight.load_state_dict(init)
    fit(straight, _separable(), None, cfg, device=CPU, seed=0, objective=Hinge(), progress=False)
    crashed = nn.Linear(5, 3)
    crashed.load_state_dict(init)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, _separable(), None, cfg, device=CPU, seed=0, objective=Hinge(), progress=False,
            checkpoint_dir=tmp_path, callbacks=[CrashAfterEpoch(2)])
    resumed, objective = nn.Linear(5, 3), Hinge()
    result = fit(resumed, _separable(), None, cfg, device=CPU, seed=0, objective=objective, progress=False,
                 checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 2 and objective.steps == 16
    assert [s.extra["steps"] for s in result.history] == [4, 8, 12, 16]  # extras come back from the checkpoint
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def _domain(n: int, shift: int, seed: int) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 60, (n, 1, 8, 8), generator=g).float()
    images[labels == 0, :, :4] += 120
    images[labels == 1, :, 4:] += 120
    return ImageTensors((images + shift).clamp(0, 255).to(torch.uint8), labels, ["top", "bottom"])


def _dann() -> DANN:
    seed_everything(0)
    return DANN(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU()), 8, 2)


def test_dann_resumes_mid_run_to_the_same_weights(tmp_path: Path) -> None:
    # 24 source images in batches of 10 (3 steps an epoch) against 14 target images (2
    # batches a pass): the target pass, the lambda ramp and the annealed LR are mid-way at
    # the crash, and only the objective's and scheduler's checkpointed state restore them.
    source, target = _domain(24, 0, 0), _domain(14, 80, 1)
    unlabelled = ImageTensors(target.images, torch.full_like(target.labels, -1), target.classes)
    kw: dict[str, Any] = {"epochs": 4, "lr": 3e-3, "batch_size": 10, "seed": 0, "augment": True,
                          "target_eval": target}
    straight = _dann()
    expected = train_dann(straight, source, unlabelled, **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_dann(_dann(), source, unlabelled, checkpoint_dir=tmp_path, callbacks=[CrashAfterEpoch(2)], **kw)
    resumed = _dann()
    history = train_dann(resumed, source, unlabelled, checkpoint_dir=tmp_path, **kw)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in expected]
    assert history[-1]["lr"] < kw["lr"] and 0.9 < history[-1]["lambda"] <= 1.0


def test_accuracy_scores_only_the_labelled_samples() -> None:
    data = _separable(30)
    seed_everything(0)
    model = nn.Linear(5, 3)
    fit(model, data, None, OptimParams(epochs=5, batch_size=10, lr=0.05), device=CPU, seed=0, progress=False)
    right = (model(data.images).argmax(1) == data.labels)
    wrong = (~right).nonzero().flatten()
    assert len(wrong) < 30
    # the samples it gets wrong, unlabelled: only the right ones are left to score
    unlabelled = data.labels.clone()
    unlabelled[wrong] = -1
    assert accuracy(model, Features(data.images, unlabelled), CPU) == 1.0
    assert accuracy(model, data, CPU) == pytest.approx(right.float().mean().item())
    assert torch.isnan(torch.tensor(accuracy(model, Features(data.images, torch.full((30,), -1)), CPU)))


def test_a_custom_objective_is_refused_under_ddp() -> None:
    with pytest.raises(TransferError, match="Hinge does not train under DDP"):
        fit(nn.Linear(5, 3), _separable(), None, OptimParams(epochs=1), device=CPU, seed=0, objective=Hinge(),
            progress=False, distributed_data_parallel=True)


def test_a_dann_checkpoint_for_another_lambda_is_not_resumed(tmp_path: Path, caplog) -> None:
    source, target = _domain(24, 0, 0), _domain(14, 80, 1)
    unlabelled = ImageTensors(target.images, torch.full_like(target.labels, -1), target.classes)
    kw: dict[str, Any] = {"epochs": 3, "lr": 3e-3, "batch_size": 10, "seed": 0}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_dann(_dann(), source, unlabelled, lambda_max=1.0, checkpoint_dir=tmp_path,
                   callbacks=[CrashAfterEpoch(1)], **kw)
    straight = _dann()
    train_dann(straight, source, unlabelled, lambda_max=0.5, **kw)
    again = _dann()
    history = train_dann(again, source, unlabelled, lambda_max=0.5, checkpoint_dir=tmp_path, **kw)
    assert "written for another objective" in caplog.text and len(history) == 3
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), again.state_dict().values()))
