"""transfer.predict: decoding, input checks and class-name predictions (fast, no MLflow)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from transfer.data import decode_image as training_decode
from transfer.data import to_float
from transfer.errors import TransferError
from transfer.models import create_model, save_model_dir
from transfer.predict import InputError, Predictor, decode_base64, decode_image, prepare_batch

CLASSES = ["cat", "dog", "eel"]
SIZE = 16


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise(seed: int, shape: tuple[int, ...] = (20, 24, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=len(CLASSES), in_channels=1)
    return Predictor(model, {"classes": CLASSES, "image_size": SIZE, "in_channels": 1}, max_batch=8,
                     max_image_bytes=50_000)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("PNG", m) for m in ("RGB", "RGBA", "L", "P", "1", "I;16")] + [("JPEG", "RGB"), ("JPEG", "L")],
)
def test_decode_matches_training_preprocessing(fmt: str, mode: str) -> None:
    data = encode(noise(1), fmt, mode)
    ours = decode_image(b64(data), SIZE, 1)
    assert ours.shape == (1, SIZE, SIZE) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, training_decode(data, SIZE, 1))


def test_rgb_model_gets_three_channels_from_grayscale() -> None:
    out = decode_image(encode(noise(2, (40, 10)), "PNG"), SIZE, 3)
    assert out.shape == (3, SIZE, SIZE)


def test_prepare_batch_normalises_like_to_float() -> None:
    data = encode(noise(3))
    batch = prepare_batch([b64(data), data], SIZE, 1)
    expected = to_float(torch.from_numpy(training_decode(data, SIZE, 1).copy())[None])
    assert batch.shape == (2, 1, SIZE, SIZE) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0:1], expected.float())
    torch.testing.assert_close(batch[1:2], expected.float())
    assert -1.0 <= float(batch.min()) and float(batch.max()) <= 1.0


def test_data_url_and_wrapped_base64_are_accepted() -> None:
    data = encode(noise(4))
    text = b64(data)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert decode_base64("data:image/png;base64," + text) == data
    assert decode_base64(wrapped) == data


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("not base64 at all!", "row 1: not valid base64"),
        (b64(b"plain text, not an image"), "row 1: cannot decode image"),
        (b"", "row 1: empty image"),
        ("   ", "row 1: empty image string"),
        (None, "row 1: missing image"),
    ],
)
def test_bad_images_name_the_row(predictor: Predictor, item: object, message: str) -> None:
    good = b64(encode(noise(5)))
    with pytest.raises(InputError, match=message):
        predictor.predict([good, item])


def test_truncated_png_is_an_input_error(predictor: Predictor) -> None:
    data = encode(noise(6, (64, 64, 3)))
    with pytest.raises(InputError, match="row 0: cannot decode image"):
        predictor.predict([data[: len(data) // 2]])


def test_image_too_large(predictor: Predictor) -> None:
    big = encode(noise(7, (200, 200, 3)))  # ~120 KB of noise
    assert len(big) > predictor.max_image_bytes
    with pytest.raises(InputError, match=r"row 0: image too large: about \d+ bytes.*50000"):
        predictor.predict([b64(big)])
    with pytest.raises(InputError, match=r"row 0: image too large: \d+ bytes"):
        predictor.predict([big])


def test_decompression_bomb_is_refused() -> None:
    bomb = encode(np.zeros((8000, 6000), dtype=np.uint8))  # 48 Mpx, a few KB as PNG
    with pytest.raises(InputError, match="too large: 6000x8000 pixels"):
        decode_image(bomb, SIZE, 1, max_bytes=len(bomb) + 1)


def test_unsupported_format_is_refused() -> None:
    buffer = io.BytesIO()
    Image.fromarray(noise(8)).save(buffer, format="PPM")
    with pytest.raises(InputError, match="unsupported image format PPM"):
        decode_image(buffer.getvalue(), SIZE, 1)


def test_batch_too_large(predictor: Predictor) -> None:
    with pytest.raises(InputError, match=r"batch too large: 9 rows, the limit is 8"):
        predictor.predict([b"x"] * 9)
    with pytest.raises(InputError, match=r"batch too large: 9 rows"):
        predictor.predict(torch.zeros(9, 1, SIZE, SIZE))
    with pytest.raises(InputError, match="empty batch"):
        predictor.predict([])


@pytest.mark.parametrize(
    "batch",
    [
        torch.zeros(3, 1, SIZE, SIZE),
        np.zeros((3, SIZE, SIZE), dtype=np.float64),  # (N, H, W) for a 1-channel model
        [np.zeros((1, SIZE, SIZE)), [[0.0] * SIZE] * SIZE, torch.zeros(SIZE, SIZE)],
    ],
)
def test_tensor_inputs(predictor: Predictor, batch: object) -> None:
    results = predictor.predict(batch)
    assert len(results) == 3


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (torch.zeros(2, 3, SIZE, SIZE), r"input: tensor has shape \(2, 3, 16, 16\), expected \(N, 1, 16, 16\)"),
        (torch.zeros(2, 1, 8, 8), r"tensor has shape \(2, 1, 8, 8\)"),
        ([torch.zeros(1, SIZE, SIZE), torch.zeros(SIZE, 5)], r"row 1: tensor has shape \(16, 5\), expected \(1, 16, 16\)"),
        ([[[0.0, 1.0], [0.0]]], r"row 0: tensor is not a rectangular array"),
        ([[["a"] * SIZE] * SIZE], r"row 0: tensor is not a rectangular array"),
        (np.zeros((2, 1, SIZE, SIZE), dtype=np.uint8), r"dtype uint8"),
        (np.full((2, 1, SIZE, SIZE), "x"), r"dtype <U1, expected float"),
    ],
)
def test_bad_tensors(predictor: Predictor, batch: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        predictor.predict(batch)


def test_non_finite_tensor_names_the_row(predictor: Predictor) -> None:
    batch = torch.zeros(4, 1, SIZE, SIZE)
    batch[2, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match="row 2: tensor holds NaN or infinite"):
        predictor.predict(batch)
    rows = [torch.zeros(SIZE, SIZE), torch.full((SIZE, SIZE), float("inf"))]
    with pytest.raises(InputError, match="row 1: tensor holds NaN"):
        predictor.predict(rows)


def test_a_single_image_is_not_a_batch(predictor: Predictor) -> None:
    with pytest.raises(InputError, match="expected a list of images"):
        predictor.predict(b64(encode(noise(9))))


def test_predictions_carry_class_names(predictor: Predictor) -> None:
    images = [b64(encode(noise(seed))) for seed in range(5)]
    results = predictor.predict(images)
    assert len(results) == 5
    for row in results:
        assert row["label"] in CLASSES
        assert set(row["probabilities"]) == set(CLASSES)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["probability"] == max(row["probabilities"].values())
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)


def test_same_image_same_answer_as_a_tensor(predictor: Predictor) -> None:
    data = encode(noise(10))
    tensor = prepare_batch([data], SIZE, 1)
    by_image = predictor.predict([data])[0]
    by_tensor = predictor.predict(tensor.numpy().tolist())[0]  # JSON-style nested lists
    assert by_image["label"] == by_tensor["label"]
    assert by_image["probability"] == pytest.approx(by_tensor["probability"], abs=1e-6)


def test_from_dir_round_trip(tmp_path, predictor: Predictor) -> None:
    save_model_dir(predictor.model, tmp_path / "m", {"classes": CLASSES, "image_size": SIZE})
    loaded = Predictor.from_dir(tmp_path / "m")
    images = [encode(noise(seed)) for seed in range(3)]
    assert [r["label"] for r in loaded.predict(images)] == [r["label"] for r in predictor.predict(images)]
    assert loaded.classes == CLASSES and loaded.image_size == SIZE and loaded.channels == 1


def test_input_error_is_a_user_error() -> None:
    assert issubclass(InputError, TransferError)


def test_core_module_imports_no_mlflow() -> None:
    import ast
    import transfer.predict as module

    tree = ast.parse(open(module.__file__).read())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not names & {"mlflow", "prefect", "pandas"}
