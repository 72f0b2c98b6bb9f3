"""Two processes (torchrun, gloo, DDP with buffer broadcast off): the EMA statistics after a step equal those of
one process on the concatenated batch (VQ, every residual VQ level; FSQ's and LFQ's perplexity and usage, LFQ's
bit entropy), and k-means
initialisation and restarts are identical on every rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.scripts.common import batch, ema_model, fsq_model, lfq_model, rvq_model, train_step

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


@pytest.mark.parametrize("name, build, exact, close", [
    ("fsq", fsq_model, ("usage",), ("perplexity",)),
    ("lfq", lfq_model, (), ("perplexity", "bit_entropy")),  # code and bit counts reduced in one call
])
def test_implicit_codebook_statistics_are_those_of_the_whole_batch(two_ranks, name, build, exact, close):
    model = build()
    stats = train_step(model, model, batch())
    for rank in two_ranks:
        assert torch.equal(rank[f"{name}_last_used"], model.bottleneck.last_used)
        assert all(float(rank[f"{name}_{k}"]) == float(stats[k]) for k in exact)
        assert all(float(rank[f"{name}_{k}"]) == pytest.approx(float(stats[k]), rel=1e-5) for k in close)
    half = build()  # one rank's half alone is not the whole batch's: the reduction is what makes them equal
    statistic = close[-1]
    assert float(train_step(half, half, batch().chunk(2)[0])[statistic]) != pytest.approx(float(stats[statistic]),
                                                                                           rel=1e-5)


def test_every_residual_level_reduces_its_statistics_over_the_whole_batch(two_ranks):
    model = rvq_model()
    stats = train_step(model, model, batch())
    state = model.bottleneck.state_dict()
    for rank in two_ranks:
        for level in range(2):
            key = f"levels.{level}.ema_count"
            torch.testing.assert_close(rank[f"rvq_{key}"], state[key], rtol=0, atol=0)
            torch.testing.assert_close(rank[f"rvq_levels.{level}.codebook"], state[f"levels.{level}.codebook"],
                                       rtol=1e-5, atol=1e-6)
        assert float(rank["rvq_perplexity"]) == pytest.approx(float(stats["perplexity"]), rel=1e-5)


def test_ranks_draw_their_own_quantizer_dropout(two_ranks):
    r0, r1 = (rank["rvq_dropout_masks"] for rank in two_ranks)
    assert r0.shape == (3, 64, 1, 1, 1) and not torch.equal(r0, r1)  # same seed, step and images, other ranks
    one = rvq_model(depth=3, quantizer_dropout=1.0).bottleneck._dropout_masks(torch.zeros(64, 4, 1, 1))
    assert torch.equal(one, r0)  # rank 0's first micro-batch draws as one process's does; rank 1 its own
