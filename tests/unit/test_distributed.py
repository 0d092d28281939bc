"""DDP on CPU: 2 processes (torchrun, gloo) match single-process training."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfer import distributed
from transfer.errors import TransferError

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_match_single_process(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    from ddp_worker import train

    single_acc, single = train(ddp=False)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(HERE / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2
    assert abs(ddp["accuracy"] - single_acc) <= 0.05, (ddp["accuracy"], single_acc)
    # Same global batches and steps: the weights end up close (not equal: BatchNorm
    # statistics are computed per rank, on half a batch each).
    names = [n for n, v in single.state_dict().items() if v.is_floating_point() and "running" not in n]
    a = torch.cat([single.state_dict()[n].flatten() for n in names])
    b = torch.cat([ddp["state"][n].flatten() for n in names])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


def test_distributed_without_torchrun_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TransferError, match="torchrun"):
        distributed.init(torch.device("cpu"))
    assert distributed.is_main() and distributed.world_size() == 1
