"""The scoring server process: MLflow's pyfunc scoring app behind a guard.

``transfer serve`` runs ``python -m tasks.adapters.scoring_app -m <model uri> -h HOST -p PORT``: it
downloads the model (any URI ``mlflow models serve`` takes: ``models:/name@alias``,
``models:/name/3``, ``runs:/...``), then runs uvicorn on MLflow's own app
(``mlflow.pyfunc.scoring_server.init``: same endpoints, same request formats) wrapped in
``Guard``, which

- asks for ``Authorization: Bearer <token>`` on every path but ``/health`` and ``/ping`` when
  ``TRANSFER_SERVE_AUTH_TOKEN_ENV`` names an environment variable holding the token
  (constant-time comparison; the token never leaves that variable);
- bounds the request body (413 before reading a declared oversize body);
- answers malformed JSON, CSV and unknown columns itself, with one short line (MLflow echoes
  the whole body back and its CSV path fails on this model's schema);
- rewrites every error reply to ``{"error_code", "message"}``: no ``stack_trace``, the message
  cut to its first line and ``MAX_MESSAGE`` characters, so no reply repeats the input.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hmac
import io
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The *name* of the variable holding the token travels, never the token (params.yaml and the
# MLflow params hold serve.auth_token_env, the name).
ENV_AUTH_TOKEN_ENV = "TRANSFER_SERVE_AUTH_TOKEN_ENV"
ENV_MODEL_PATH = "__pyfunc_model_path__"  # what mlflow.pyfunc.scoring_server.app reads
OPEN_PATHS = frozenset({"/health", "/ping"})  # liveness probes: no model output, no token
MIN_TOKEN_CHARS = 16  # guessable tokens are no protection
MAX_MESSAGE = 300  # characters of an error message a reply may carry
COLUMNS = ("image", "tensor")  # tasks.adapters.pyfunc_model.IMAGE_COLUMN / TENSOR_COLUMN
FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


class ConfigError(Exception):
    """The server cannot start safely (e.g. the token variable is named but empty)."""


def auth_token(name: str | None) -> str | None:
    """The bearer token held by the variable ``name`` (serve.auth_token_env); None: no auth."""
    if not name:
        return None
    token = os.environ.get(name, "").strip()  # a trailing newline from a secrets file
    if not token:
        raise ConfigError(
            f"serve.auth_token_env names {name}, but {name} is not set or empty: export the "
            "token there (or unset serve.auth_token_env to serve without one)"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the token in {name} has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}: "
            "use a random one, e.g. $(openssl rand -hex 32)"
        )
    return token


def authorized(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    """Does the request carry ``Authorization: Bearer <token>``? Constant-time comparison."""
    value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
    scheme, _, given = value.partition(b" ")
    if scheme.lower() != b"bearer":
        given = b""
    return hmac.compare_digest(given.strip(), token.encode())


def short(message: str) -> str:
    """An error message fit to send back: its point, one line, at most MAX_MESSAGE chars.

    MLflow prefixes model errors with ``Failed to predict data '<the whole input>'.`` and
    follows parse errors with ``Input: <the whole body>``: keep only the error itself.
    """
    if message.startswith("Failed to predict data") and "Error: " in message:
        message = message.rsplit("Error: ", 1)[1]
    line = message.strip().split("\n", 1)[0].strip()
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def clean_error(status: int, body: bytes) -> bytes:
    """Any error reply -> ``{"error_code", "message"}`` without stack trace or echoed input."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and "message" in payload:
        code, message = str(payload.get("error_code", "BAD_REQUEST")), str(payload["message"])
    elif isinstance(payload, dict) and "detail" in payload:  # FastAPI's own errors (404, 405)
        code, message = _code(status), str(payload["detail"])
    else:
        code, message = _code(status), body.decode("utf-8", "replace")
    return json.dumps({"error_code": code, "message": short(message)}).encode()


def _code(status: int) -> str:
    return {
        401: "UNAUTHENTICATED", 404: "ENDPOINT_NOT_FOUND", 413: "REQUEST_LIMIT_EXCEEDED",
        415: "BAD_REQUEST", 504: "DEADLINE_EXCEEDED",
    }.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")


class RequestError(Exception):
    """A request the guard answers itself (status + one-line message)."""

    def __init__(self, status: int, message: str, error_code: str = "BAD_REQUEST"):
        super().__init__(message)
        self.status, self.error_code = status, error_code


def request_columns(payload: Any) -> list[str] | None:
    """The column names a JSON request carries, or None when its shape does not say."""
    if not isinstance(payload, dict):
        return None
    keys = [key for key in FORMATS if key in payload]
    if len(keys) != 1:
        return None  # MLflow answers "exactly one of ..." itself
    data = payload[keys[0]]
    if keys[0] == "dataframe_split" and isinstance(data, dict):
        columns = data.get("columns")
        return [str(c) for c in columns] if isinstance(columns, list) else None
    if keys[0] == "inputs" and isinstance(data, dict):
        return [str(c) for c in data]
    if isinstance(data, list) and data and all(isinstance(row, dict) for row in data):
        return sorted({str(c) for row in data for c in row})
    return None


def check_columns(columns: list[str] | None) -> None:
    if columns is not None and not any(c in columns for c in COLUMNS):
        got = ", ".join(repr(c) for c in columns[:20]) or "none"
        more = f" (+{len(columns) - 20} more)" if len(columns) > 20 else ""
        raise RequestError(
            400,
            f"expected a column 'image' (base64 PNG/JPEG) or 'tensor' (nested lists); "
            f"got columns: {short(got)}{more}",
            "INVALID_PARAMETER_VALUE",
        )


def check_json(body: bytes) -> None:
    """Malformed JSON or no known column -> RequestError with a short message."""
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise RequestError(
            400,
            f"request body is not valid JSON: {error.msg} at line {error.lineno} column "
            f"{error.colno} ({len(body)} bytes)",
        ) from None
    check_columns(request_columns(payload))


def csv_to_json(body: bytes) -> bytes:
    """A CSV request (header + one base64 image per row) -> the equivalent JSON split body.

    MLflow's CSV path types columns from the signature and fails on the ``tensor`` (any)
    column; an image column is all CSV can carry anyway.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RequestError(400, "CSV request is not valid UTF-8") from None
    csv.field_size_limit(max(len(text), 1 << 17))  # base64 images are long fields
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if not header:
            raise RequestError(
                400, "CSV request is empty: send a header line 'image' and one row per image"
            )
        columns = [c.strip() for c in header]
        check_columns(columns)
        if "image" not in columns:
            raise RequestError(
                400, "CSV requests carry images only (a column 'image'); send tensors as JSON",
                "INVALID_PARAMETER_VALUE",
            )
        at = columns.index("image")
        data = [[row[at] if at < len(row) and row[at] else None] for row in reader]
    except csv.Error as error:
        raise RequestError(400, f"request body is not valid CSV: {short(str(error))}") from None
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()


class Guard:
    """ASGI middleware: token, body limit, input checks, error replies without echo."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.token is not None and not authorized(scope.get("headers", []), self.token):
            await _reply(
                send, 401, "UNAUTHENTICATED",
                "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        try:
            if path == "/invocations" and scope.get("method") == "POST":
                scope, receive = await self._checked(scope, receive)
        except RequestError as error:
            await _reply(send, error.status, error.error_code, str(error))
            return
        await self.app(scope, receive, _cleaning(send))

    async def _checked(self, scope: Scope, receive: Receive) -> tuple[Scope, Receive]:
        """Read the body (bounded), check it, and hand the app a replay of it."""
        headers = scope.get("headers", [])
        declared = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise RequestError(
                413, _too_large(int(declared), self.max_body), "REQUEST_LIMIT_EXCEEDED"
            )
        body = await _read_body(receive, self.max_body)
        mime = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        mime = mime.decode("latin-1").split(";")[0].strip().lower()
        if mime == "application/json":
            check_json(body)
        elif mime == "text/csv":
            body = csv_to_json(body)
            dropped = (b"content-type", b"content-length")
            headers = [(k, v) for k, v in headers if k.lower() not in dropped]
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            scope = {**scope, "headers": headers}
        return scope, _replay(body)


def _too_large(size: int, limit: int) -> str:
    return (
        f"request too large: {size} bytes, the limit is {limit} bytes "
        "(serve.max_batch x serve.max_image_bytes, base64); split the request"
    )


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, _too_large(size, limit), "REQUEST_LIMIT_EXCEEDED")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _cleaning(send: Send) -> Send:
    """Pass 2xx/3xx replies through; buffer an error reply and send ``clean_error`` of it."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                await send(message)
            else:
                start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            await _send_json(send, start["status"], clean_error(start["status"], b"".join(chunks)))

    return wrapped


async def _reply(
    send: Send, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"error_code": code, "message": short(message)}).encode()
    await _send_json(send, status, body, extra)


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def max_body_bytes(model: Any) -> int:
    """Largest acceptable request: max_batch rows of the larger of a base64 image at the byte
    limit and a float tensor as JSON (~24 chars a value), plus 1 MiB of framing."""
    predictor = getattr(model.unwrap_python_model(), "predictor", None)
    if predictor is None:
        return 1 << 30
    tensor = predictor.channels * predictor.image_size**2 * 24
    row = max(math.ceil(predictor.max_image_bytes * 4 / 3), tensor) + 64
    return predictor.max_batch * row + (1 << 20)


def create_app() -> ASGIApp:
    """uvicorn factory: load the model from ``__pyfunc_model_path__`` and guard MLflow's app."""
    from mlflow.pyfunc import scoring_server

    token = auth_token(os.environ.get(ENV_AUTH_TOKEN_ENV))
    model = scoring_server.load_model_with_mlflow_config(os.environ[ENV_MODEL_PATH])
    return Guard(scoring_server.init(model), token, max_body_bytes(model))


def _exit_on_stop_signals() -> None:
    """uvicorn re-raises SIGTERM / SIGHUP once it has shut down gracefully: exit through
    Python then (exit code 128 + signal, as a shell reports it) so ``finally`` blocks run."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.adapters.scoring_app", add_help=False)
    parser.add_argument("-m", "--model-uri", required=True)
    parser.add_argument("-h", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5001)
    parser.add_argument("-w", "--workers", type=int, default=1)
    parser.add_argument("-t", "--timeout", type=int, default=None)
    parser.add_argument("--help", action="help")
    args = parser.parse_args(argv)
    try:
        auth_token(os.environ.get(ENV_AUTH_TOKEN_ENV))  # fail before the download, not per worker
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import uvicorn
    from mlflow.exceptions import MlflowException

    from tasks.adapters.tracking import downloaded

    _exit_on_stop_signals()
    with contextlib.ExitStack() as stack:  # the downloaded model is removed when the server stops
        try:
            local = stack.enter_context(downloaded(args.model_uri, model_dir=False))
        except MlflowException as error:
            print(f"error: cannot download {args.model_uri}: {short(error.message)}", file=sys.stderr)
            return 2
        os.environ[ENV_MODEL_PATH] = str(local)
        if args.timeout is not None:
            os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(args.timeout)
        uvicorn.run(
            "tasks.adapters.scoring_app:create_app", factory=True, host=args.host, port=args.port,
            workers=args.workers, log_level="info",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
