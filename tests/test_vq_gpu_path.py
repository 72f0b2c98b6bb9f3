"""The quantizer's GPU path: counts without bincount, a training step (forward, backward, on_optimizer_step) that
never makes the host wait for the device - proved on CPU with tests.host_sync.no_host_sync and, where CUDA exists,
under torch.cuda.set_sync_debug_mode("error") - and `skipped` as a device tensor: a masked no-op when True, the
plain step bit for bit when False."""

from __future__ import annotations

import pytest
import torch

from tests.host_sync import HostSync, no_host_sync
from vqtok.bottleneck import VectorQuantizer
from vqtok.bottleneck.search import code_counts
from vqtok.bottleneck.vq import random_indices
from vqtok.config import VQConfig

CONFIGS = {  # name -> VQConfig keywords; k-means init on, so the step after it is what is checked
    "ema+restarts": dict(dead_threshold=0.5),
    "ema": dict(dead_threshold=0.0),
    "gradient codebook+restarts": dict(ema=False, codebook_weight=1.0, dead_threshold=0.5),
    "l2+restarts": dict(l2_normalize=True, dead_threshold=0.5),
    "rotation trick+restarts": dict(rotation_trick=True, dead_threshold=0.5),
    "l2+rotation trick": dict(l2_normalize=True, rotation_trick=True, dead_threshold=0.0),
}


def initialised(device: str = "cpu", **kw) -> VectorQuantizer:
    """A quantizer past its k-means initialisation (which may synchronise: once per run)."""
    torch.manual_seed(0)
    config = VQConfig(codebook_size=64, dim=4, kmeans_samples=256, kmeans_iters=2, decay=0.5, **kw)
    vq = VectorQuantizer(config).to(device).train()
    vq(torch.randn(1, 4, 16, 16, device=device))
    assert "kmeans_samples" in vq.on_optimizer_step()
    return vq


def train_step(vq: VectorQuantizer, h: torch.Tensor, skipped) -> dict[str, torch.Tensor]:
    h = h.clone().requires_grad_()
    out = vq(h)
    (out.z.square().mean() + out.loss).backward()
    return vq.on_optimizer_step(skipped)


def batches(n: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 4, 8, 8, generator=g) * 2).to(device) for _ in range(n)]


def test_code_counts_equal_bincount():
    g = torch.Generator().manual_seed(0)
    for n, k in [(0, 5), (1, 1), (1000, 7), (4096, 3000)]:
        codes = torch.randint(k, (n,), generator=g)
        counts = code_counts(codes, k)
        assert counts.dtype == torch.float32
        assert torch.equal(counts, torch.bincount(codes, minlength=k).float())
    assert torch.equal(code_counts(torch.tensor([[2, 2], [0, 2]]), 4), torch.tensor([1.0, 0, 3, 0]))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("skipped", ["bool", "tensor False", "tensor True"])
def test_training_step_never_syncs(name, skipped):
    vq = initialised(**CONFIGS[name])
    flag = False if skipped == "bool" else torch.tensor(skipped == "tensor True")
    for h in batches(3):
        with no_host_sync():
            stats = train_step(vq, h, flag)
            vq.codebook_stats()  # computed on the device; read only at log steps
    assert stats and all(v.device == vq.codebook.device for v in stats.values())


def test_the_guard_sees_a_bincount():
    """The step test can fail: the op the quantizer used before is refused by the guard."""
    with pytest.raises(HostSync), no_host_sync():
        torch.bincount(torch.tensor([1, 2]), minlength=4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_skipped_as_a_tensor_matches_the_bool(name):
    """Steps applied / skipped / applied, with `skipped` as Python bools and as device tensors: the same state bit for
    bit (restarts included: a skipped step does not advance `steps`, which keys the draw), and a skipped step
    changes no buffer."""
    plain, masked = initialised(**CONFIGS[name]), initialised(**CONFIGS[name])
    restarted = 0
    for i, h in enumerate(batches(6)):
        skip = i in (1, 2, 4)
        before = {k: v.clone() for k, v in masked.state_dict().items()}
        stats = train_step(masked, h, torch.tensor(skip))
        train_step(plain, h, skip)
        if skip:
            assert all(torch.equal(v, before[k]) for k, v in masked.state_dict().items()), f"step {i} changed state"
            assert "restarted" not in stats or int(stats["restarted"]) == 0
        restarted += int(stats.get("restarted", 0))
        for key, value in plain.state_dict().items():
            assert torch.equal(value, masked.state_dict()[key]), f"{key} differs after step {i}"
    if CONFIGS[name]["dead_threshold"] > 0:
        assert restarted > 0, "no restarts: their agreement is not earned"


def test_skipped_must_be_a_bool_tensor():
    vq = initialised()
    with pytest.raises(ValueError, match="0-d bool tensor"):
        vq.on_optimizer_step(torch.tensor(1.0))


def test_restart_draws_are_uniform_and_keyed():
    """The counter-based draw: every value in [0, high) about equally often, and a different stream per step, salt
    and seed (so ranks and steps do not repeat each other's restarts)."""
    seed, step, keys = torch.tensor(12345), torch.tensor(7), torch.arange(100_000)
    draws = random_indices(seed, step, 0, keys, 10)
    assert draws.min() == 0 and draws.max() == 9
    frequencies = torch.bincount(draws, minlength=10).double() / len(keys)
    assert (frequencies - 0.1).abs().max() < 0.005  # ~5 sigma
    assert torch.equal(draws, random_indices(seed, step, 0, keys, 10))
    for other in [random_indices(seed, step + 1, 0, keys, 10), random_indices(seed, step, 1, keys, 10),
                  random_indices(seed + 1, step, 0, keys, 10)]:
        assert (other == draws).double().mean() < 0.12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_never_syncs_on_cuda(name):
    vq = initialised("cuda", **CONFIGS[name])
    data = batches(4, "cuda")
    train_step(vq, data[0], torch.full((), False, device="cuda"))  # warm-up: the search budget is asked once
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for h, skip in zip(data[1:], [False, True, False]):
            train_step(vq, h, torch.full((), skip, device="cuda"))  # a fill: no host-to-device copy
            vq.codebook_stats()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restart_draws_are_the_same_on_cuda_and_cpu():
    """int64 arithmetic wraps alike on both, so a run's restarts do not depend on the device it resumes on."""
    args = torch.tensor(987654321987), torch.tensor(42), 3, torch.arange(50_000)
    cuda = random_indices(*(a.cuda() if torch.is_tensor(a) else a for a in args), 1000)
    assert torch.equal(cuda.cpu(), random_indices(*args, 1000))
