"""Growing regularization under FSDP2: the penalty reaches sharded gradients exactly, and the pruning recipe
keeps every rank identical."""
import os
import subprocess
import sys

import torch


def test_fsdp2_penalty_equals_one_process_and_ranks_stay_identical_through_pruning(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
               "--rdzv-endpoint=127.0.0.1:0", worker, str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert rank0["0.weight"].shape == (4, 1, 3, 3) and rank0["3.weight"].shape == (8, 4, 3, 3)  # pruned by half
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
