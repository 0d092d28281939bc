"""Serving load test: MLflow's scoring server vs the same model called in-process.

Starts the scoring server ``transfer serve`` runs (MLflow's scoring app behind the guard of
``tasks/adapters/scoring_app.py``) on loopback for a registered model, sends
a bounded number of requests (base64 PNGs, ``dataframe_split``) from a fixed number of client
threads with keep-alive connections, and reports requests/s, images/s and p50/p99 latency per
batch size. In the same run, two in-process baselines on the same batches:
``Predictor.predict`` (decode + preprocess + forward: what the pyfunc does, minus HTTP, JSON and
pandas) and the plain PyTorch forward on already-prepared tensors.

    python benchmarks/serve_load.py                                  # fresh small_cnn, temp registry
    python benchmarks/serve_load.py --model-dir models/finetune/model
    python benchmarks/serve_load.py --model-uri models:/digits-transfer@champion \\
        --tracking-uri sqlite:///mlruns/mlflow.db

Writes the markdown table to benchmarks/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.adapters.serve import serve_env, start_server, stop_server, wait_until_ready  # noqa: E402
from transfer.predict import Predictor  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "serve_load.md"


@dataclass
class Phase:
    batch: int
    requests: int


@dataclass
class Result:
    how: str
    batch: int
    requests: int
    seconds: float
    latencies: list[float]
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000

    def row(self) -> str:
        return (
            f"| {self.how} | {self.batch} | {self.requests} | {self.rps:.1f} | "
            f"{self.rps * self.batch:.0f} | {self.percentile(0.5):.1f} | {self.percentile(0.99):.1f} |"
            + (f" {self.errors} errors |" if self.errors else " |")
        )


def parse_phases(text: str) -> list[Phase]:
    """``"1x200,32x50"`` -> batch 1 x 200 requests, batch 32 x 50 requests."""
    phases = []
    for item in text.split(","):
        batch, _, count = item.partition("x")
        phases.append(Phase(int(batch), int(count)))
    return phases


def make_images(n: int, size: int, seed: int = 0) -> list[str]:
    """Base64 PNGs of digit-like noise (``size`` x ``size`` grayscale)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def batch_of(images: list[str], index: int, size: int) -> list[str]:
    return [images[(index * size + j) % len(images)] for j in range(size)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def register_model_dir(model_dir: Path, workdir: Path) -> tuple[str, str]:
    """Log ``model_dir`` into a temp sqlite registry as bench@champion -> (uri, tracking uri)."""
    import mlflow

    from tasks.adapters.pyfunc_model import log_pyfunc_model

    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    client = mlflow.MlflowClient(tracking, tracking)
    experiment = client.create_experiment("serve-load", artifact_location=(workdir / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="serve-load").info.run_id
    info = log_pyfunc_model(model_dir, registered_model_name="bench", run_id=run_id, max_batch=256)
    client.set_terminated(run_id)
    client.set_registered_model_alias("bench", "champion", info.registered_model_version)
    return "models:/bench@champion", tracking


def fresh_model_dir(workdir: Path, arch: str, size: int) -> Path:
    from transfer.models import create_model, save_model_dir

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1)
    meta = {"classes": [str(i) for i in range(10)], "image_size": size, "source": {"kind": "benchmark"}}
    return save_model_dir(model, workdir / "model", meta)


def run_http(url: str, images: list[str], phase: Phase, threads: int, deadline: float) -> Result:
    host, port = url.removeprefix("http://").split(":")
    bodies = [
        json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image] for image in batch_of(images, i, phase.batch)]}}).encode()
        for i in range(16)
    ]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(phase.requests))

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                conn.request("POST", "/invocations", bodies[i % len(bodies)], {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status == 200 and len(json.loads(payload)["predictions"]) == phase.batch:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
        finally:
            conn.close()

    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - start
    return Result("HTTP scoring server", phase.batch, len(latencies), seconds, latencies, errors[0])


def run_inprocess(how: str, call: Callable[[int], object], phase: Phase, deadline: float) -> Result:
    latencies = []
    start = time.perf_counter()
    for i in range(phase.requests):
        if time.monotonic() >= deadline:
            break
        t0 = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - t0)
    return Result(how, phase.batch, len(latencies), time.perf_counter() - start, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-uri", help="registered model to serve, e.g. models:/name@champion")
    parser.add_argument("--tracking-uri", help="tracking/registry URI for --model-uri")
    parser.add_argument("--model-dir", type=Path, help="saved model dir to log into a temp registry")
    parser.add_argument("--arch", default="small_cnn", help="fresh model when neither is given")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--phases", default="1x200,32x50", help="BATCHxREQUESTS,...")
    parser.add_argument("--threads", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--time-cap", type=float, default=60.0, help="seconds per measured phase, at most")
    parser.add_argument(
        "--torch-threads", type=int, default=0,
        help="torch CPU threads for the server and the baselines alike (0 = torch's default)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # the server reads it at start
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    phases = parse_phases(args.phases)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        workdir = Path(tmp)
        if args.model_uri:
            model_uri, tracking = args.model_uri, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            import mlflow

            if tracking:
                mlflow.set_tracking_uri(tracking)
                mlflow.set_registry_uri(tracking)
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(workdir / "dl")))
            model_dir = local / "artifacts" / next(iter(os.listdir(local / "artifacts")))
            source = model_uri
        else:
            model_dir = args.model_dir or fresh_model_dir(workdir, args.arch, args.image_size)
            started = time.perf_counter()
            model_uri, tracking = register_model_dir(Path(model_dir), workdir)
            print(f"logged + registered {model_dir} in {time.perf_counter() - started:.1f} s")
            source = str(args.model_dir) if args.model_dir else f"fresh {args.arch} (random weights)"

        predictor = Predictor.from_dir(model_dir, max_batch=max(p.batch for p in phases))
        images = make_images(256, predictor.image_size)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(workdir / "server.log", "w+")  # noqa: SIM115
        started = time.perf_counter()
        proc = start_server(model_uri, "127.0.0.1", port, env=serve_env(tracking), stdout=log, stderr=log)
        results: list[Result] = []
        try:
            try:
                wait_until_ready(url, timeout=180, proc=proc)
            except Exception:
                log.seek(0)
                print(log.read()[-4000:], file=sys.stderr)
                raise
            startup = time.perf_counter() - started
            print(f"scoring server ready in {startup:.1f} s at {url}")
            run_http(url, images, Phase(1, 8), 1, time.monotonic() + 30)  # warm-up
            for phase in phases:
                result = run_http(url, images, phase, args.threads, time.monotonic() + args.time_cap)
                print(result.row(), flush=True)
                results.append(result)
        finally:
            stop_server(proc)
            log.close()

        for phase in phases:
            batches = [batch_of(images, i, phase.batch) for i in range(16)]  # as the HTTP bodies
            tensors = [predictor.prepare(b) for b in batches]
            predictor.predict(batches[0])  # warm-up
            deadline = time.monotonic() + args.time_cap
            result = run_inprocess(
                "in-process Predictor (decode + forward)",
                lambda i: predictor.predict(batches[i % len(batches)]), phase, deadline,
            )
            print(result.row(), flush=True)
            results.append(result)

            model = predictor.model

            def forward(i: int) -> None:
                with torch.inference_mode():
                    torch.softmax(model(tensors[i % len(tensors)]), dim=1)

            result = run_inprocess("plain PyTorch forward (prepared tensors)", forward, phase, time.monotonic() + args.time_cap)
            print(result.row(), flush=True)
            results.append(result)

    report = render(results, source, startup, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print()
    print(report)
    print(f"written to {args.out}")


def render(results: list[Result], source: str, startup: float, args: argparse.Namespace) -> str:
    order = {"HTTP scoring server": 0}
    results = sorted(results, key=lambda r: (r.batch, order.get(r.how, 1), r.how))
    lines = [
        "# Serving load: MLflow scoring server vs in-process PyTorch",
        "",
        f"Model: {source}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} CPU thread(s) in server and baselines), "
        "CPU only, "
        f"Python {platform.python_version()}.",
        "Server: MLflow's scoring app behind `tasks.adapters.scoring_app` (what `transfer serve` runs), "
        "1 uvicorn worker, on 127.0.0.1; "
        f"started (registry download + model load) in {startup:.1f} s.",
        f"HTTP clients: {args.threads} threads with keep-alive connections, base64 PNG "
        f"`dataframe_split` bodies; in-process baselines run one call at a time. "
        f"Each phase is capped at {args.time_cap:.0f} s.",
        "",
        "| how | batch | requests | requests/s | images/s | p50 ms | p99 ms | |",
        "|---|---|---|---|---|---|---|---|",
        *[r.row() for r in results],
        "",
        "HTTP latencies include queueing (4 clients, one server worker); the in-process rows are "
        "one call at a time. Client and server share the same cores, so the HTTP rows also pay "
        "for the client's JSON work. The gap between the two in-process rows is image decoding "
        "and preprocessing; the gap to the HTTP rows is HTTP + JSON + pandas + the pyfunc.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
