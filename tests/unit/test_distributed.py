"""DDP on CPU: 2 processes (torchrun with c10d rendezvous, gloo) match single-process
training, in memory and over a memory-mapped split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from transfer import distributed
from transfer.errors import TransferError

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_cpu_processes_match_single_process(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    try:
        from ddp_worker import train
    finally:
        sys.path.remove(str(HERE))

    single_acc, single = train(ddp=False)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # the multi-node form of the command (c10d rendezvous; one node here): on N machines the
    # same line with --nnodes N and this node's address as the endpoint (docs/scaling.md)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test",
           str(HERE / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2
    assert abs(ddp["accuracy"] - single_acc) <= 0.05, (ddp["accuracy"], single_acc)
    # Same global batches, same steps, the global batch's gradient: the weights end up
    # close (not equal: BatchNorm statistics are computed per rank, on half a batch each).
    names = [n for n, v in single.state_dict().items() if v.is_floating_point() and "running" not in n]
    a = torch.cat([single.state_dict()[n].flatten() for n in names])
    b = torch.cat([ddp["state"][n].flatten() for n in names])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95
    # Blocks unfrozen mid-run are synchronised too; resume after a crash on every rank.
    assert ddp["gradual_max_rank_difference"] == 0.0
    assert ddp["resume_equal"]
    # A memory-mapped split, each rank reading only its share of every global batch from
    # the file: exactly the weights of the in-memory DDP run.
    assert ddp["mapped_equal"]


def test_distributed_without_torchrun_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TransferError, match="torchrun"):
        distributed.init(torch.device("cpu"))
    assert not distributed.is_distributed()
    assert distributed.is_main() and distributed.rank() == 0 and distributed.world_size() == 1


def test_shard_indices_split_a_batch_exactly_once() -> None:
    batch = torch.arange(11)
    shards = [distributed.shard_indices(batch, r, 3) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == batch.tolist()
    assert [len(s) for s in shards] == [4, 4, 3]
    assert distributed.shard_indices([0, 1, 2, 3], 1, 2) == [1, 3]
    assert torch.equal(distributed.shard(batch), batch)  # no process group: the whole batch
    with pytest.raises(ValueError):
        distributed.shard_indices(batch, 2, 2)


def test_backend_follows_the_device() -> None:
    assert distributed.default_backend(torch.device("cpu")) == "gloo"
    assert distributed.default_backend(torch.device("cuda")) == "nccl"
    assert distributed.all_reduce_sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    distributed.barrier()
    distributed.cleanup()  # no group: nothing to do
