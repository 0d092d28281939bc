"""The training loop: learns, is deterministic on CPU, resumes after a crash to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transfer import fingerprint
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


def test_resume_after_crash_gives_the_uninterrupted_weights(tmp_path: Path, caplog) -> None:
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
    assert "resuming from epoch 2 of 4" in caplog.text  # never silently
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


def test_checkpoint_holds_everything_to_resume(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(create_model("tiny_cnn", 3, 1), _toy(), None, _cfg(epochs=3), device=CPU, seed=0, progress=False,
            checkpoint_dir=tmp_path, callbacks=[CrashAfterEpoch(2)])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert {"model", "optimizer", "scheduler", "rng", "origin"} <= set(state)
    assert state["origin"]["code_fingerprint"] == fingerprint.code_fingerprint() and state["origin"]["seed"] == 0
    assert sorted(tmp_path.iterdir()) == [tmp_path / "last.pt"]  # written atomically: no .tmp left


def test_a_finished_fit_leaves_nothing_to_resume(tmp_path: Path) -> None:
    """A finished run's checkpoint would "resume" to no training at all and hand back the old
    weights, whatever changed since: finishing deletes it, so a second fit trains again."""
    first = fit(create_model("tiny_cnn", 3, 1), _toy(), None, _cfg(epochs=2), device=CPU, seed=0,
                progress=False, checkpoint_dir=tmp_path)
    assert len(first.history) == 2 and not (tmp_path / "last.pt").exists()
    again = fit(create_model("tiny_cnn", 3, 1), _toy(), None, _cfg(epochs=2), device=CPU, seed=0,
                progress=False, checkpoint_dir=tmp_path)
    assert again.resumed_from_epoch == 0 and [s.epoch for s in again.history] == [1, 2]


def test_a_checkpoint_from_other_code_is_not_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    init = create_model("tiny_cnn", 3, 1).state_dict()
    crashed = create_model("tiny_cnn", 3, 1)
    crashed.load_state_dict(init)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, _toy(), None, _cfg(), device=CPU, seed=3, progress=False, checkpoint_dir=tmp_path,
            callbacks=[CrashAfterEpoch(2)])
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda subpackage=None: "edited-code")
    rerun = create_model("tiny_cnn", 3, 1)
    rerun.load_state_dict(init)
    with caplog.at_level("WARNING", logger="transfer.train"):
        result = fit(rerun, _toy(), None, _cfg(), device=CPU, seed=3, progress=False, checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 0 and [s.epoch for s in result.history] == [1, 2, 3, 4]
    assert "written by other code" in caplog.text
    straight = create_model("tiny_cnn", 3, 1)  # trained from the start: the uninterrupted weights
    straight.load_state_dict(init)
    fit(straight, _toy(), None, _cfg(), device=CPU, seed=3, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(_weights(straight), _weights(rerun)))


@pytest.mark.parametrize("change", [{"lr": 0.02}, {"epochs": 5}, {"seed": 4}])
def test_a_checkpoint_for_other_params_is_not_resumed(tmp_path: Path, change: dict) -> None:
    seed = change.pop("seed", 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(create_model("tiny_cnn", 3, 1), _toy(), None, _cfg(), device=CPU, seed=3, progress=False,
            checkpoint_dir=tmp_path, callbacks=[CrashAfterEpoch(2)])
    cfg = _cfg().model_copy(update=change)
    result = fit(create_model("tiny_cnn", 3, 1), _toy(), None, cfg, device=CPU, seed=seed, progress=False,
                 checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 0 and len(result.history) == cfg.epochs


def test_a_checkpoint_from_before_fingerprints_is_not_resumed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(create_model("tiny_cnn", 3, 1), _toy(), None, _cfg(), device=CPU, seed=3, progress=False,
            checkpoint_dir=tmp_path, callbacks=[CrashAfterEpoch(2)])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["origin"]  # what an older version wrote
    torch.save(state, tmp_path / "last.pt")
    result = fit(create_model("tiny_cnn", 3, 1), _toy(), None, _cfg(), device=CPU, seed=3, progress=False,
                 checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 0 and len(result.history) == 4


def test_cpu_runs_full_precision_and_leaves_contiguous_weights() -> None:
    from transfer.train import amp_dtype, autocast_for, uses_channels_last

    model = create_model("tiny_cnn", 3, 1)
    assert amp_dtype(CPU) is None and uses_channels_last(model, CPU)
    assert not uses_channels_last(torch.nn.Linear(4, 2), CPU)  # nothing to gain without convs
    with autocast_for(CPU):
        assert model(torch.zeros(2, 1, 8, 8)).dtype == torch.float32
    fit(model, _toy(), None, _cfg(epochs=1), device=CPU, seed=0, progress=False)
    # trained in channels_last, handed back in the usual layout (what save/export expect)
    assert all(p.is_contiguous() for p in model.parameters())


def test_runtime_params_pick_device_and_threads() -> None:
    from transfer.config import RuntimeParams
    from transfer.train import runtime_device

    before = torch.get_num_threads()
    try:
        assert runtime_device(RuntimeParams(device="cpu", num_threads=1)) == CPU
        assert torch.get_num_threads() == 1
        runtime_device(RuntimeParams(device="cpu", num_threads=0))  # 0 = leave torch's default alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- CUDA (skipped on CPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = torch.device("cuda") if torch.cuda.is_available() else None


@pytest.mark.gpu
@cuda
def test_cuda_training_learns_and_leaves_a_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, 1)
    result = fit(model, _toy(), _toy(seed=1), _cfg(epochs=15), device=GPU, seed=0, progress=False,
                 checkpoint_dir=tmp_path)
    assert result.best_val_acc >= 0.9
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_cuda and conv.weight.is_contiguous()  # channels_last only while training
    with pytest.raises(RuntimeError, match="simulated crash"):  # a crashed run keeps its checkpoint
        fit(create_model("tiny_cnn", 3, 1), _toy(), None, _cfg(epochs=2), device=GPU, seed=0, progress=False,
            checkpoint_dir=tmp_path, callbacks=[CrashAfterEpoch(1)])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "augment" in state["rng"] and "cuda" in state["rng"]
    probs = predict_proba(model, _toy(n=10), GPU)
    assert probs.device.type == "cpu" and probs.shape == (10, 3)


@pytest.mark.gpu
@cuda
def test_cuda_resume_after_crash_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    init = create_model("tiny_cnn", 3, 1).state_dict()
    straight = create_model("tiny_cnn", 3, 1)
    straight.load_state_dict(init)
    fit(straight, _toy(), None, _cfg(), device=GPU, seed=3, progress=False)
    crashed = create_model("tiny_cnn", 3, 1)
    crashed.load_state_dict(init)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, _toy(), None, _cfg(), device=GPU, seed=3, progress=False, checkpoint_dir=tmp_path,
            callbacks=[CrashAfterEpoch(2)])
    resumed = create_model("tiny_cnn", 3, 1)
    fit(resumed, _toy(), None, _cfg(), device=GPU, seed=3, progress=False, checkpoint_dir=tmp_path)
    # same batches and augmentation offsets (device generator restored); cuDNN may pick
    # other kernels, so close rather than bit-equal
    for x, y in zip(_weights(straight), _weights(resumed)):
        assert torch.allclose(x.float(), y.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@cuda
def test_cuda_fp16_scaler_and_host_resident_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older GPUs (no bf16) train in fp16 with a GradScaler; a split too big for the GPU
    stays in host memory and is copied per batch: both still learn."""
    import transfer.train as train_module

    monkeypatch.setattr(train_module, "amp_dtype", lambda device: torch.float16)
    monkeypatch.setattr(train_module, "_RESIDENT_SHARE", 0.0)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, 1)
    result = fit(model, _toy(), _toy(seed=1), _cfg(epochs=15), device=GPU, seed=0, progress=False)
    assert result.best_val_acc >= 0.9
