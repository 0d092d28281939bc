"""The scoring server as an untrusted client meets it: bearer token, error replies, secrets.

One real server (``transfer serve --version 2``, loopback, a token planted in the variable
``serve.auth_token_env`` names) serves the module's registry; the requests below go over HTTP.
"""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from tasks.adapters import tracking
from tasks.adapters.pyfunc_model import log_pyfunc_model
from tasks.adapters.scoring_app import MAX_MESSAGE, clean_error, short
from tasks.adapters.serve import bind_warning, invocations_payload, probe_url, redact, resolve_model
from tests.serving.test_serving import (  # noqa: F401  (registry: a module fixture)
    CLASSES,
    MAX_BATCH,
    MAX_IMAGE_BYTES,
    NAME,
    REPO,
    SIZE,
    b64,
    free_port,
    png,
    registry,
)
from transfer.config import load_params
from transfer.errors import TransferError
from transfer.models import create_model, save_model_dir
from transfer.predict import Predictor

TOKEN_ENV = "TRANSFER_TEST_SERVE_TOKEN"
# Large enough that a 50 MB body is read and parsed (the body limit follows these two).
BIG_IMAGE_BYTES = 40_000_000


@pytest.fixture(scope="module")
def version2(registry) -> Predictor:
    """NAME v2: other weights than v1 (@champion), so serving the wrong version shows."""
    torch.manual_seed(1)
    model = create_model("tiny_cnn", num_classes=len(CLASSES), in_channels=1)
    model_dir = save_model_dir(model, registry["tmp"] / "model-v2", {"classes": CLASSES, "image_size": SIZE})
    info = log_pyfunc_model(model_dir, registered_model_name=NAME, run_id=registry["run_id"],
                            max_batch=MAX_BATCH, max_image_bytes=MAX_IMAGE_BYTES)
    assert info.registered_model_version == 2
    return Predictor.from_dir(model_dir)


@pytest.fixture(scope="module")
def server(registry, version2, tmp_path_factory: pytest.TempPathFactory):
    """``transfer serve --version 2`` with a secret token; yields url, token, log path."""
    tmp = tmp_path_factory.mktemp("secure-server")
    token = "tok-" + secrets.token_urlsafe(24)
    port = free_port()
    log_path = tmp / "server.log"
    env = {**os.environ, TOKEN_ENV: token, "MLFLOW_TRACKING_URI": registry["uri"]}
    argv = [
        sys.executable, "-m", "flows.cli", "serve", "-p", str(REPO / "params.yaml"),
        "--set", f"promote.model_name={NAME}", "--set", f"serve.max_batch={MAX_BATCH}",
        "--set", f"serve.max_image_bytes={BIG_IMAGE_BYTES}", "--set", f"serve.auth_token_env={TOKEN_ENV}",
        "--version", "2", "--port", str(port),
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        announced = wait_for_line(log_path, proc, "serving models:/")
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "log": log_path, "proc": proc,
               "announced": announced, "port": port}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for_line(path: Path, proc: subprocess.Popen, prefix: str) -> str:
    """The first line of the server's output starting with ``prefix`` (fails if it exits)."""
    deadline = time.monotonic() + 240  # a guard against a hang, not a timing assertion
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            pytest.fail(f"server exited ({proc.returncode}):\n{path.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no '{prefix}' line:\n{path.read_text()[-4000:]}")


def call(
    url: str, path: str = "/invocations", body: bytes | None = None, token: str | None = None,
    content_type: str = "application/json", headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    all_headers = {"Content-Type": content_type, **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=body, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def assert_short_error(status: int, text: str, expected_status: int, *fragments: str) -> dict:
    assert status == expected_status, text[:2000]
    assert len(text) < 1000, f"{len(text)} bytes: {text[:300]}"
    body = json.loads(text)
    assert set(body) == {"error_code", "message"}  # no stack_trace, nothing else
    assert "Traceback" not in text and 'File "' not in text
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    return body


def images(n: int = 3) -> list[bytes]:
    return [png(seed) for seed in range(n)]


# --- start-up ----------------------------------------------------------------------------------


def test_announced_once_listening_and_serves_the_version_asked(server, registry, version2) -> None:
    assert server["announced"].startswith(f"serving models:/{NAME}/2 (version 2) on http://127.0.0.1:")
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=5):
        pass  # listening when announced: no retry needed
    log = server["log"].read_text()
    assert log.index("GET /health") < log.index("serving models:/")
    status, text = call(server["url"], body=invocations_payload([b64(i) for i in images()]), token=server["token"])
    assert status == 200, text
    got = [row["probability"] for row in json.loads(text)["predictions"]]
    want_v2 = [row["probability"] for row in version2.predict(images())]
    want_v1 = [row["probability"] for row in registry["predictor"].predict(images())]
    assert got == pytest.approx(want_v2, abs=1e-6)
    assert got != pytest.approx(want_v1, abs=1e-6)


def test_models_uris_resolve_to_one_version(registry, version2) -> None:
    uri = registry["uri"]
    assert resolve_model(uri, f"models:/{NAME}@champion") == (f"models:/{NAME}/1", "version 1")
    assert resolve_model(uri, f"models:/{NAME}/2") == (f"models:/{NAME}/2", "version 2")
    assert resolve_model(uri, f"models:/{NAME}/latest") == (f"models:/{NAME}/2", "version 2")
    with pytest.raises(TransferError, match=f"no model to serve at models:/{NAME}/9"):
        resolve_model(uri, f"models:/{NAME}/9")


@pytest.mark.slow  # three `transfer serve` processes
def test_cli_refuses_unset_or_weak_tokens_and_two_model_choices(registry, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "NO_SUCH_TOKEN_VAR": ""}
    base = [sys.executable, "-m", "flows.cli", "serve", "-p", str(REPO / "params.yaml"),
            "--set", f"promote.model_name={NAME}", "--port", str(free_port())]
    proc = subprocess.run(
        [*base, "--set", "serve.auth_token_env=NO_SUCH_TOKEN_VAR"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )
    said = " ".join(proc.stderr.split())  # rich wraps the line
    assert proc.returncode == 2, said
    assert "NO_SUCH_TOKEN_VAR is not set or empty" in said and "Traceback" not in said
    proc = subprocess.run([*base, "--set", "serve.auth_token_env=SHORT_TOKEN_VAR"], cwd=tmp_path,
                          env={**env, "SHORT_TOKEN_VAR": "hunter2"}, capture_output=True, text=True,
                          timeout=120)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "fewer than 16" in said and "hunter2" not in said
    proc = subprocess.run([*base, "--version", "1", "--alias", "champion"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give one of --alias, --version, --model-uri" in " ".join(proc.stderr.split())


def test_binding_wider_without_a_token_warns() -> None:
    assert bind_warning("127.0.0.1", 5001, with_token=False) is None
    assert bind_warning("::1", 5001, with_token=False) is None
    assert "without a token" in bind_warning("0.0.0.0", 5001, with_token=False)
    assert bind_warning("0.0.0.0", 5001, with_token=True) is None
    assert probe_url("0.0.0.0", 5001) == "http://127.0.0.1:5001"
    assert probe_url("::", 5001) == "http://[::1]:5001"
    assert redact("https://bob:hunter2@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_token_env_must_be_a_variable_name() -> None:
    with pytest.raises(TransferError):
        load_params(None, ["serve.auth_token_env=not a name!"])
    assert load_params(None, []).serve.auth_token_env is None  # default: no token (loopback)


# --- the bearer token --------------------------------------------------------------------------


def test_requests_need_the_token(server) -> None:
    body = invocations_payload([b64(png(0))])
    for token in (None, "", "wrong", server["token"] + "x", server["token"][:-1]):
        status, text = call(server["url"], body=body, token=token)
        assert_short_error(status, text, 401, "bearer token")
        assert "predictions" not in text
    status, text = call(server["url"], body=body, headers={"Authorization": f"Basic {server['token']}"})
    assert status == 401
    status, text = call(server["url"], "/version")  # everything but the probes is behind it
    assert status == 401
    status, text = call(server["url"], body=body, headers={"Authorization": f"bearer {server['token']}"})
    assert status == 200 and "predictions" in text


def test_probes_stay_open(server) -> None:
    for path in ("/health", "/ping"):
        with urllib.request.urlopen(server["url"] + path, timeout=10) as response:
            assert response.status == 200


# --- error replies: short, no stack trace, no echo ------------------------------------------------


def test_csv_requests_are_served(server, version2) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image"])
    writer.writerows([b64(i)] for i in images())
    status, text = call(server["url"], body=buffer.getvalue().encode(), token=server["token"],
                        content_type="text/csv")
    assert status == 200, text
    assert [r["label"] for r in json.loads(text)["predictions"]] == [r["label"] for r in version2.predict(images())]
    status, text = call(server["url"], body=b"tensor\n[[0.0]]\n", token=server["token"], content_type="text/csv")
    assert_short_error(status, text, 400, "CSV requests carry images only")
    status, text = call(server["url"], body=b"foo,bar\n1,2\n", token=server["token"], content_type="text/csv")
    assert_short_error(status, text, 400, "got columns: 'foo', 'bar'")


def test_unknown_columns_are_named(server) -> None:
    for body in (
        {"dataframe_split": {"columns": ["img", "x"], "data": [["a", 1]]}},
        {"dataframe_records": [{"img": "a", "x": 1}]},
    ):
        status, text = call(server["url"], body=json.dumps(body).encode(), token=server["token"])
        assert_short_error(status, text, 400, "expected a column 'image'", "'img'", "'x'")


def test_a_50_mb_malformed_body_is_not_echoed(server) -> None:
    body = b'{"dataframe_split": ' + b"x" * 50_000_000
    status, text = call(server["url"], body=body, token=server["token"])
    assert_short_error(status, text, 400, "not valid JSON")
    assert "xxxxxxxxxx" not in text


def test_mlflow_errors_lose_their_stack_trace_and_input(server) -> None:
    status, text = call(server["url"], body=b"x" * 5000, token=server["token"],
                        content_type="application/vnd.apache.parquet")  # MLflow attaches a traceback
    assert_short_error(status, text, 400, "Parquet")
    status, text = call(server["url"], body=json.dumps({"nope": "y" * 5000}).encode(), token=server["token"])
    assert_short_error(status, text, 400, "exactly one of the input fields")
    assert "yyyyyyyyyy" not in text
    status, text = call(server["url"], body=b"abc", token=server["token"], content_type="text/plain")
    assert_short_error(status, text, 415, "content types")
    status, text = call(server["url"], body=invocations_payload(["%%% " + "z" * 5000]), token=server["token"])
    assert_short_error(status, text, 400, "row 0: not valid base64")
    assert "zzzzzzzzzzzzzzzzzzzzzzzzz" not in text


def test_decompression_bombs_are_refused(server) -> None:
    """A ~10 KB PNG claiming 8000 x 8000 pixels passes the byte limit, not the pixel limit."""
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")
    status, text = call(server["url"], body=invocations_payload([b64(buffer.getvalue())]), token=server["token"])
    assert_short_error(status, text, 400, "row 0: image too large")


def test_oversize_bodies_are_refused_before_reading(server) -> None:
    """A declared length over the limit: 413 from the headers alone (no body is sent)."""
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {server['token']}\r\nContent-Length: {10**12}\r\n\r\n".encode()
        )
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        text = reply.read().decode()
    assert_short_error(reply.status, text, 413, "request too large")
    assert re.search(r"the limit is \d+ bytes", text)


def test_error_messages_are_cut() -> None:
    huge = "Failed to predict data '" + "q" * 10**6 + "'. \nError: row 3: bad"
    assert short(huge) == "row 3: bad"
    assert len(short("w" * 10**6)) == MAX_MESSAGE
    body = json.loads(clean_error(400, json.dumps({"error_code": "BAD_REQUEST", "message": "m\nInput: " + "q" * 99,
                                                   "stack_trace": "Traceback ..."}).encode()))
    assert body == {"error_code": "BAD_REQUEST", "message": "m"}


# --- secrets ---------------------------------------------------------------------------------------


def test_the_token_is_in_no_log_param_or_store(server, registry, tmp_path: Path) -> None:
    """After requests (good and bad) and a pipeline-style params logging with the token
    planted, the token appears in no server output, MLflow param/tag or stored file."""
    token = server["token"]
    call(server["url"], body=invocations_payload([b64(png(0))]), token=token)
    call(server["url"], body=b"{bad", token=token)
    call(server["url"], body=b"{}", token=token + "x")
    os.environ[TOKEN_ENV] = token
    try:
        params = load_params(None, [f"serve.auth_token_env={TOKEN_ENV}", f"runtime.tracking_uri={registry['uri']}",
                                    "runtime.experiment=secrets"])
        client = tracking.configure(params)
        run_id = tracking.start_run(client, params, "pipeline")
        tracking.log_params(client, run_id, params.dump())
        tracking.end_run(client, run_id)
    finally:
        del os.environ[TOKEN_ENV]
    run = mlflow.MlflowClient(registry["uri"]).get_run(run_id)
    assert run.data.params["serve.auth_token_env"] == TOKEN_ENV
    assert token not in json.dumps({**run.data.params, **run.data.tags})
    os.killpg(server["proc"].pid, signal.SIGTERM)  # stop it: its last words are logged too
    server["proc"].wait(timeout=30)
    needle = token.encode()
    stored = [p for p in Path(registry["tmp"]).rglob("*") if p.is_file()] + [server["log"]]
    assert len(stored) > 5
    leaked = [str(p) for p in stored if needle in p.read_bytes()]
    assert not leaked
    assert "Authorization" not in server["log"].read_text()
