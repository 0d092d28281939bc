"""The served model end to end: a real sqlite MLflow registry, the pyfunc, the scoring server.

One tiny model is logged and registered once per module (``models:/<name>@champion``), then
loaded in-process, in a clean process from another working directory, through
``predict_files``, and served over HTTP by ``mlflow models serve --env-manager local``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

from tasks.adapters.pyfunc_model import (
    REQUIREMENTS,
    ServingInputError,
    dataframe_to_rows,
    log_pyfunc_model,
    pip_requirements,
)
from tasks.adapters.serve import (
    check_alias,
    invocations_payload,
    predict_files,
    serve_command,
    serve_env,
    wait_until_ready,
)
from tests.conftest import free_port, mlflow_uris
from transfer.errors import DataError, TransferError
from transfer.models import create_model, save_model_dir
from transfer.predict import InputError, Predictor

NAME = "tiny-digits"
CLASSES = ["cat", "dog", "eel"]
SIZE = 16
MAX_BATCH = 8
MAX_IMAGE_BYTES = 20_000
REPO = Path(__file__).resolve().parents[2]


def png(seed: int, shape: tuple[int, ...] = (20, 24, 3)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """A sqlite registry in tmp holding NAME v1 @champion (+ the Predictor it must agree with)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with mlflow_uris(uri):
        torch.manual_seed(0)
        model = create_model("tiny_cnn", num_classes=len(CLASSES), in_channels=1)
        model_dir = save_model_dir(model, tmp / "model", {"classes": CLASSES, "image_size": SIZE})
        client = mlflow.MlflowClient(uri, uri)
        experiment = client.create_experiment("serving", artifact_location=(tmp / "artifacts").as_uri())
        run_id = client.create_run(experiment, run_name="finetune").info.run_id
        started = time.perf_counter()
        info = log_pyfunc_model(
            model_dir, registered_model_name=NAME, run_id=run_id,
            max_batch=MAX_BATCH, max_image_bytes=MAX_IMAGE_BYTES,
        )
        log_seconds = time.perf_counter() - started
        client.set_terminated(run_id)
        client.set_registered_model_alias(NAME, "champion", info.registered_model_version)
        yield {
            "uri": uri, "tmp": tmp, "info": info, "run_id": run_id, "experiment": experiment,
            "predictor": Predictor.from_dir(model_dir), "log_seconds": log_seconds,
            "champion": f"models:/{NAME}@champion",
        }


@pytest.fixture(scope="module")
def champion(registry):
    return mlflow.pyfunc.load_model(registry["champion"])


# --- the logged model ------------------------------------------------------------------------


def test_logged_quickly_in_the_runs_experiment(registry) -> None:
    info = registry["info"]
    print(f"log_pyfunc_model: {registry['log_seconds']:.1f} s")
    assert registry["log_seconds"] < 20  # explicit requirements: no slow inference
    assert info.registered_model_version == 1
    logged = mlflow.MlflowClient(registry["uri"]).get_logged_model(info.model_id)
    assert logged.source_run_id == registry["run_id"]
    assert logged.experiment_id == registry["experiment"]
    assert str(registry["tmp"] / "artifacts") in logged.artifact_location


def test_mlmodel_signature_requirements_and_code(registry, tmp_path: Path) -> None:
    local = Path(mlflow.artifacts.download_artifacts(registry["champion"], dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # no pickled model object
    assert (local / "code" / "transfer" / "predict.py").is_file()
    assert (local / "code" / "transfer" / "models.py").is_file()
    assert flavor["config"] == {"max_batch": MAX_BATCH, "max_image_bytes": MAX_IMAGE_BYTES}
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [(col["name"], col["type"]) for col in inputs] == [("image", "string"), ("tensor", "any")]
    assert all("shape" not in col for col in inputs)  # column specs: no baked batch size
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == pip_requirements()
    assert {r.split("==")[0] for r in requirements} == set(REQUIREMENTS)
    assert all("==" in r for r in requirements)
    example = json.loads((local / "serving_input_example.json").read_text())
    assert len(example["dataframe_split"]["data"]) == 2


# --- in-process pyfunc -----------------------------------------------------------------------


def test_champion_predicts_a_batch_with_class_names(registry, champion) -> None:
    images = [png(seed) for seed in range(5)]
    out = champion.predict(pd.DataFrame({"image": [b64(i) for i in images]}))
    assert list(out.columns) == ["label", "probability", "probabilities"]
    assert len(out) == 5
    assert set(out["label"]) <= set(CLASSES)
    expected = registry["predictor"].predict(images)
    assert list(out["label"]) == [row["label"] for row in expected]
    for got, want in zip(out.to_dict(orient="records"), expected, strict=True):
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
        assert set(got["probabilities"]) == set(CLASSES)


def test_tensor_rows_and_mixed_rows(registry, champion) -> None:
    tensors = registry["predictor"].prepare([png(1), png(2)]).numpy()
    by_tensor = champion.predict(pd.DataFrame({"tensor": [t.tolist() for t in tensors]}))
    by_image = champion.predict(pd.DataFrame({"image": [b64(png(1)), b64(png(2))]}))
    assert list(by_tensor["label"]) == list(by_image["label"])
    mixed = pd.DataFrame({"image": [b64(png(1)), None], "tensor": [None, tensors[1][0].tolist()]})
    assert list(champion.predict(mixed)["label"]) == list(by_image["label"])


def test_input_errors_are_400s_and_user_errors(champion) -> None:
    # the loaded model runs its own copy of tasks/adapters/pyfunc_model.py: catch the shared bases
    with pytest.raises(InputError) as caught:
        champion.predict(pd.DataFrame({"image": [b64(png(1)), "%%% not base64"]}))
    error = caught.value
    assert isinstance(error, MlflowException) and isinstance(error, TransferError)
    assert type(error).__name__ == ServingInputError.__name__
    assert error.get_http_status_code() == 400
    body = json.loads(error.serialize_as_json())
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"].startswith("row 1: not valid base64")
    assert "stack_trace" not in body
    error.message = "Failed to predict data '<the whole request>'. Error: ..."  # the server does this
    assert error.message.startswith("row 1: not valid base64")


def test_batch_limit_from_the_model_config(champion) -> None:
    with pytest.raises(InputError, match=f"batch too large: {MAX_BATCH + 1} rows"):
        champion.predict(pd.DataFrame({"image": [b64(png(1))] * (MAX_BATCH + 1)}))


def test_rows_need_an_image_or_a_tensor() -> None:
    with pytest.raises(TransferError, match="expected a column 'image'"):
        dataframe_to_rows(pd.DataFrame({"foo": [1]}), 8)
    with pytest.raises(TransferError, match="row 1: no 'image' and no 'tensor'"):
        dataframe_to_rows(pd.DataFrame({"image": ["x", None]}), 8)


def test_predict_files(registry, tmp_path: Path) -> None:
    paths = []
    for seed in range(3):
        path = tmp_path / f"img{seed}.png"
        path.write_bytes(png(seed))
        paths.append(path)
    results = predict_files(paths, registry["champion"])
    assert [r["path"] for r in results] == [str(p) for p in paths]
    expected = registry["predictor"].predict([p.read_bytes() for p in paths])
    assert [r["label"] for r in results] == [r["label"] for r in expected]
    with pytest.raises(DataError, match="no such image file"):
        predict_files([tmp_path / "missing.png"], registry["champion"])


@pytest.mark.slow
def test_loads_from_another_cwd_without_the_installed_package(registry, tmp_path: Path) -> None:
    """code_paths carries ``transfer``: load with the project neither installed nor on sys.path."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
        sys.path[:] = [p for p in sys.path if p not in ("", {str(REPO)!r})]
        import base64, io, mlflow, pandas as pd
        from PIL import Image
        buffer = io.BytesIO(); Image.new("RGB", (30, 20), "white").save(buffer, "JPEG")
        image = base64.b64encode(buffer.getvalue()).decode()
        model = mlflow.pyfunc.load_model({registry["champion"]!r})
        out = model.predict(pd.DataFrame({{"image": [image, image]}}))
        print(sys.modules["transfer"].__file__)
        print(",".join(out["label"]))
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    module_file, labels = proc.stdout.strip().splitlines()[-2:]
    assert not module_file.startswith(str(REPO)), module_file
    assert f"{os.sep}code{os.sep}transfer{os.sep}" in module_file
    assert all(label in CLASSES for label in labels.split(","))


# --- serving helpers -------------------------------------------------------------------------


def test_serve_command_uses_this_environment() -> None:
    argv = serve_command("models:/m@champion", "0.0.0.0", 5001)
    assert argv[:3] == [sys.executable, "-m", "tasks.adapters.scoring_app"]  # MLflow's app, guarded
    assert argv[3:] == ["-m", "models:/m@champion", "-h", "0.0.0.0", "-p", "5001"]
    env = serve_env("sqlite:///x.db", max_batch=4, max_image_bytes=10, base={"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # our uvicorn
    assert env["MLFLOW_TRACKING_URI"] == env["MLFLOW_REGISTRY_URI"] == "sqlite:///x.db"
    assert env["TRANSFER_SERVE_MAX_BATCH"] == "4" and env["TRANSFER_SERVE_MAX_IMAGE_BYTES"] == "10"


def test_missing_alias_is_one_clear_error(registry) -> None:
    assert check_alias(registry["uri"], NAME, "champion") == "1"
    with pytest.raises(TransferError, match=f"'{NAME}' has no alias 'production'"):
        check_alias(registry["uri"], NAME, "production")


def test_wait_until_ready_times_out() -> None:
    with pytest.raises(TimeoutError):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", timeout=0.5)


# --- the real scoring server -----------------------------------------------------------------


def post(url: str, body: dict | bytes) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url + "/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def assert_client_error(status: int, text: str, *fragments: str) -> None:
    assert status == 400, text
    body = json.loads(text)
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    assert "stack_trace" not in body
    assert "Traceback" not in text and 'File "' not in text
    assert "Failed to predict data" not in text  # the request is not echoed back
    assert len(text) < 1000


@pytest.mark.slow
def test_scoring_server_over_http(registry, tmp_path: Path) -> None:
    """``serve()`` -> ``mlflow models serve --env-manager local`` from another cwd; then SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = textwrap.dedent(
        f"""
        import sys
        from transfer.config import load_params
        from tasks.adapters.serve import serve
        params = load_params(None, [
            "promote.model_name={NAME}", "serve.max_batch={MAX_BATCH}",
            "serve.max_image_bytes={MAX_IMAGE_BYTES}",
        ])
        sys.exit(serve(params, alias="champion", port={port}, tracking_uri={registry["uri"]!r}))
        """
    )
    log = (tmp_path / "server.log").open("w+")
    tmp = tmp_path / "tmp"  # where the server downloads the model
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)},
    )
    try:
        try:
            wait_until_ready(url, timeout=120, proc=proc)
        except (TransferError, TimeoutError):
            log.seek(0)
            pytest.fail(f"server did not start:\n{log.read()[-4000:]}")

        assert len(list(tmp.glob("mlflow-model-*/**/MLmodel"))) == 1  # served from there
        images = [png(seed) for seed in range(6)]
        expected = [row["label"] for row in registry["predictor"].predict(images)]
        status, text = post(url, invocations_payload([b64(i) for i in images]))
        assert status == 200, text
        predictions = json.loads(text)["predictions"]
        assert [p["label"] for p in predictions] == expected
        assert all(set(p["probabilities"]) == set(CLASSES) for p in predictions)

        status, text = post(url, invocations_payload([b64(i) for i in images[:3]], orient="records"))
        assert status == 200 and [p["label"] for p in json.loads(text)["predictions"]] == expected[:3]

        tensors = registry["predictor"].prepare(images[:2]).numpy().tolist()
        status, text = post(url, {"dataframe_records": [{"tensor": t} for t in tensors]})
        assert status == 200 and [p["label"] for p in json.loads(text)["predictions"]] == expected[:2]

        status, text = post(url, invocations_payload([b64(images[0]), "this is not base64!"]))
        assert_client_error(status, text, "row 1", "not valid base64")

        status, text = post(url, {"dataframe_records": [{"tensor": [[0.0] * 5] * SIZE}]})
        assert_client_error(status, text, "row 0", "shape (16, 5)", "expected (1, 16, 16)")

        status, text = post(url, invocations_payload([b64(images[0])] * (MAX_BATCH + 1)))
        assert_client_error(status, text, f"batch too large: {MAX_BATCH + 1} rows", str(MAX_BATCH))

        big = png(0, (120, 120, 3))
        assert len(big) > MAX_IMAGE_BYTES
        status, text = post(url, invocations_payload([b64(big)]))
        assert_client_error(status, text, "row 0: image too large")

        status, text = post(url, invocations_payload([b64(b"GIF89a but not really")]))
        assert_client_error(status, text, "row 0: cannot decode image")

        proc.send_signal(signal.SIGTERM)  # serve() forwards it to the mlflow CLI + uvicorn
        assert proc.wait(timeout=30) == 0  # a requested stop is a clean exit
        assert list(tmp.glob("mlflow-model-*")) == []  # the downloaded model went with the server
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        log.close()
