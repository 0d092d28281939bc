"""Container figures: image size, build times, container start, one stage in a container vs
on the host, and the pipeline through the Prefect Docker work pool against the same pipeline
on the host with Prefect's temporary API. The work-pool run is
``tests/container/test_docker_work_pool.py`` itself (Prefect server, ``docker`` pool, worker,
pretrain -> finetune -> evaluate each a flow run in its own container; it prints its wall time,
read here); the host run is ``transfer run`` on the same params (the suite's tiny params).

Needs a Docker engine (``docker info``) and the local base image; pip's loopback mirror
args as for the tests (``../shared/containers/engine.sh``'s ``ctr_pip_mirror_start``) are
passed after ``--``:

    python benchmarks/containers.py [--image transfer-pipeline:test] [--cold] -- --build-arg PIP_FIND_LINKS=...

Writes benchmarks/results/containers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))  # the work-pool test's params (tests/container/conftest.py)
# One stage long enough that start-up is not all of it, short enough for 2 cores.
STAGE_PARAMS = ["data.image_size=16", "data.source.n=1000", "pretrain.arch=small_cnn",
                "pretrain.epochs=4", "pretrain.batch_size=64", "runtime.device=cpu"]
QUIET = {"TQDM_DISABLE": "1", "GX_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
         "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def timed(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def build(context: Path, tag: str, base: str, extra: list[str], cold: bool = False) -> float:
    return timed(["docker", "build", "--network", "host", *(["--no-cache"] if cold else []), *extra,
                  "--build-arg", f"BASE_IMAGE={base}", "-t", tag, str(context)])


def code_change_build(tag: str, base: str, extra: list[str]) -> float:
    """Rebuild after a one-line code edit (undone afterwards): the code layer only."""
    init = REPO / "transfer" / "__init__.py"
    original = init.read_text()
    init.write_text(original + f"\n# edited {time.time()}\n")
    try:
        return build(REPO, f"{tag}-edited", base, extra)
    finally:
        init.write_text(original)


def ws_flags(ws: Path) -> list[str]:
    env = [f"-e{k}={v}" for k, v in QUIET.items()]
    return ["--network", "host", "--read-only", "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs",
            "/home/app:rw,mode=1777", "-v", f"{ws}:/workspace", "-w", "/workspace", *env]


def stage_vs_host(image: str, repeats: int) -> dict[str, list[float]]:
    """``transfer pretrain`` (fresh output dir each time) on the host and in a container, alternately."""
    sets = [a for p in STAGE_PARAMS for a in ("--set", p)]
    env = {**os.environ, **QUIET}
    times: dict[str, list[float]] = {"host": [], "container": []}
    with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
        ws = Path(tmp)
        timed([str(BIN / "transfer"), "data", "prepare", *sets], cwd=ws, env=env)
        subprocess.run(["chown", "-R", "1000:1000", str(ws)], check=False)  # the image's user
        for i in range(repeats):
            times["host"].append(timed([str(BIN / "transfer"), "pretrain", *sets, "--out", f"models/h{i}",
                                        "--metrics", f"metrics/h{i}.json"], cwd=ws, env=env))
            subprocess.run(["chown", "-R", "1000:1000", str(ws)], check=False)  # the host run's dirs
            times["container"].append(timed(["docker", "run", "--rm", *ws_flags(ws), image, "pretrain", *sets,
                                              "--out", f"models/c{i}", "--metrics", f"metrics/c{i}.json"]))
    return times


def host_pipeline(repeats: int) -> list[float]:
    """``transfer run`` (one flow, Prefect's temporary API, sqlite MLflow) on the work-pool
    test's params, in a fresh directory each time."""
    from tests.conftest import write_yaml
    from tests.container.conftest import PARAMS

    out = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="run-") as tmp:
            params = {**PARAMS, "data": {**PARAMS["data"], "root": f"{tmp}/data"}}
            write_yaml(Path(tmp) / "params.yaml", params)
            out.append(timed([str(BIN / "transfer"), "run", "--params", "params.yaml"], cwd=tmp,
                             env={**os.environ, **QUIET}))
    return out


def pool_pipeline() -> float:
    """Wall time of the chained pipeline on the Docker work pool, as the work-pool test prints it."""
    proc = subprocess.run([str(BIN / "pytest"), "tests/container/test_docker_work_pool.py", "-q", "-s",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("work-pool chained pipeline:")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the work-pool test failed:\n{proc.stdout[-3000:]}")
    return float(lines[-1].split(":")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="transfer-pipeline:test")
    parser.add_argument("--base", default="local/debian-py:bookworm")
    parser.add_argument("--cold", action="store_true", help="also time a --no-cache build")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-pipeline", action="store_true", help="skip the host and work-pool pipeline runs")
    parser.add_argument("--pool-repeats", type=int, default=1, help="work-pool runs (each ~3 min on 2 cores)")
    parser.add_argument("build_args", nargs="*", help="after --: extra docker build args")
    args = parser.parse_args()
    extra = args.build_args
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "image": args.image}
    if args.cold:
        result["build_cold_s"] = build(REPO, args.image, args.base, extra, cold=True)
    result["build_warm_unchanged_s"] = build(REPO, args.image, args.base, extra)
    result["build_code_change_s"] = code_change_build(args.image, args.base, extra)
    subprocess.run(["docker", "rmi", f"{args.image}-edited"], capture_output=True)
    size = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", args.image],
                          capture_output=True, text=True, check=True).stdout
    result["image_size_gb"] = int(size) / 1e9
    result["container_start_true_s"] = statistics.median(
        timed(["docker", "run", "--rm", "--network", "host", "--entrypoint", "true", args.image]) for _ in range(3))
    result["container_help_s"] = statistics.median(
        timed(["docker", "run", "--rm", "--network", "host", args.image, "--help"]) for _ in range(3))
    result["host_help_s"] = statistics.median(timed([str(BIN / "transfer"), "--help"]) for _ in range(3))
    stage = stage_vs_host(args.image, args.repeats)
    result["stage_pretrain_s"] = stage
    result["stage_ratio_median"] = statistics.median(stage["container"]) / statistics.median(stage["host"])
    if not args.no_pipeline:
        result["host_pipeline_ephemeral_s"] = host_pipeline(args.repeats)
        result["pool_pipeline_s"] = [pool_pipeline() for _ in range(args.pool_repeats)]
        result["pool_over_host_median"] = (statistics.median(result["pool_pipeline_s"])
                                           / statistics.median(result["host_pipeline_ephemeral_s"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "containers.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
