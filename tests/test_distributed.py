"""Two processes (torchrun, gloo, DDP with buffer broadcast off): the EMA statistics after a step equal those of
one process on the concatenated batch, and k-means initialisation and restarts are identical on every rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.scripts.common import batch, ema_model, train_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "scripts" / "vq_two_ranks.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [load_file(out / f"rank{r}.safetensors") for r in range(2)]


def test_two_ranks_really_ran(two_ranks):
    assert [int(r["world"]) for r in two_ranks] == [2, 2]


def test_ema_statistics_equal_one_process_on_the_concatenated_batch(two_ranks):
    model = ema_model()
    train_step(model, model, batch())
    vq = model.bottleneck
    for rank in two_ranks:
        torch.testing.assert_close(rank["ema_count"], vq.ema_count, rtol=0, atol=0)
        torch.testing.assert_close(rank["ema_sum"], vq.ema_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["codebook"], vq.codebook, rtol=1e-5, atol=1e-6)


def test_kmeans_and_restarts_are_identical_on_every_rank(two_ranks):
    r0, r1 = two_ranks
    assert int(r0["restarted"]) > 0  # restarts happened, so their agreement is earned
    assert torch.equal(r0["kmeans_codebook"], r1["kmeans_codebook"])
    assert torch.equal(r0["kmeans_ema_count"], r1["kmeans_ema_count"])
