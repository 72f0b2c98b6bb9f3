"""Lookup-free quantization (LFQ, BSQ): the bits <-> index bijection, codes and values against a float64 reference
(bf16 included), the straight-through gradient and the commitment's closed form, the entropy terms and their
gradients against a float64 brute force over all 2^d codes (grouped batch entropy included), the loss and codes of
vector-quantize-pytorch's LFQ, the largest tensor at 18 bits, statistics with a masked skipped step (sync-free),
strict save/load, config and code errors, and an LFQ tokenizer through training -> token store -> prior -> images."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vqtok
import vqtok.cli
from tests.conftest import tiny_config
from tests.host_sync import no_host_sync
from tests.scripts.common import (
    bottleneck_config_error,
    saved_and_reloaded,
    through_store_and_prior,
    tiny_train_config,
)
from vqtok.bottleneck import LFQConfig, LookupFreeQuantizer, build_bottleneck
from vqtok.bottleneck.lfq import batch_entropy, sample_entropy, sign_ste
from vqtok.config import AutoencoderConfig, ConfigError, DataConfig, load_yaml
from vqtok.data import TokenDataset, encode_dataset
from vqtok.train.loop import train


def as_grid(rows: torch.Tensor) -> torch.Tensor:
    """[N, d] -> features [1, d, N, 1]."""
    return rows.T[None, :, :, None].contiguous()


def as_rows(grid: torch.Tensor) -> torch.Tensor:
    """[1, d, N, 1] -> [N, d]."""
    return grid[0, :, :, 0].T


def reference_bits(index: np.ndarray, d: int) -> np.ndarray:
    """Index [...] -> bits [..., d], channel 0 least significant (numpy, independent of the quantizer)."""
    return (index[..., None] >> np.arange(d)) & 1


def reference_quantize(rows: np.ndarray, spherical: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In float64: (u, the quantized values, the index) of rows [N, d]: u normalised for BSQ, bit i = u_i > 0."""
    d = rows.shape[1]
    u = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12) if spherical else rows
    s = 1 / math.sqrt(d) if spherical else 1.0
    bits = u > 0
    return u, np.where(bits, s, -s), (bits * (1 << np.arange(d))).sum(axis=1)


def brute_force_entropies(u: torch.Tensor, temperature: float, spherical: bool, groups=None):
    """Float64, no factorisation: p(c | u_n) = softmax over the explicit 2^d codebook of 2 u.c / T; returns (mean
    per-sample entropy, entropy of the batch mean, and with `groups` the sum of the batch mean's group-marginal
    entropies)."""
    n, d = u.shape
    s = 1 / math.sqrt(d) if spherical else 1.0
    codebook = torch.from_numpy(np.where(reference_bits(np.arange(1 << d), d), s, -s))  # [2^d, d]
    log_p = torch.log_softmax(2 * u @ codebook.T / temperature, dim=1)
    p = log_p.exp()
    per_sample = -(p * log_p).sum(dim=1).mean()
    q = p.mean(dim=0)
    entropy = lambda m: -(m * torch.log(m.clamp_min(1e-300))).sum()  # noqa: E731
    if groups is None:
        return per_sample, entropy(q)
    q_axes = q.reshape([2] * d)  # C order: axis j is bit d - 1 - j
    total, start = 0.0, 0
    for size in groups:
        keep = {d - 1 - i for i in range(start, start + size)}
        total = total + entropy(q_axes.sum(dim=tuple(j for j in range(d) if j not in keep)).reshape(-1))
        start += size
    return per_sample, entropy(q), total


def test_every_index_maps_to_its_bits_and_back():
    for spherical in (False, True):
        q = LookupFreeQuantizer(LFQConfig(bits=10, spherical=spherical))
        assert q.vocab_size == 1024 and q.dim == q.in_channels == 10
        idx = torch.arange(1024)
        vectors = q.codes_to_vectors(idx)
        s = 1 / math.sqrt(10) if spherical else 1.0
        expected = np.where(reference_bits(idx.numpy(), 10), np.float32(s), -np.float32(s))
        assert vectors.dtype == torch.float32 and np.array_equal(vectors.numpy(), expected)
        assert torch.unique(vectors, dim=0).shape[0] == 1024
        assert torch.equal(q.vectors_to_codes(vectors), idx)
        if spherical:
            torch.testing.assert_close(vectors.norm(dim=1), torch.ones(1024))
        # quantizing a code's vector gives the code back, and forward's output is exactly that vector
        assert torch.equal(q.encode(as_grid(vectors)).view(-1), idx)
        out = q(as_grid(vectors))
        assert torch.equal(as_rows(out.z), vectors) and torch.equal(out.codes.view(-1), idx)
        assert torch.equal(q.decode(idx.view(1, 32, 32)), vectors.view(1, 32, 32, 10).permute(0, 3, 1, 2))


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_codes_and_values_match_a_float64_reference(spherical, bf16):
    """Random features (bf16 ones: what a conv gives under bf16 autocast), with exact zeros and -0.0 (bit 0, the
    value -s: the peer's tie), quantized under bf16 autocast, against float64."""
    q = LookupFreeQuantizer(LFQConfig(bits=12, spherical=spherical))
    rows = torch.randn(20_000, 12, generator=torch.Generator().manual_seed(0))
    rows[:100, 3], rows[100:200, 7], rows[200] = 0.0, -0.0, 0.0
    if bf16:
        rows = rows.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, out = q.encode(as_grid(rows)).view(-1), q(as_grid(rows))
    assert out.z.dtype == rows.dtype and out.loss.dtype == torch.float32
    _, values, index = reference_quantize(rows.double().numpy(), spherical)
    assert np.array_equal(codes.numpy(), index) and np.array_equal(out.codes.view(-1).numpy(), index)
    assert torch.equal(as_rows(out.z), torch.from_numpy(values).to(rows.dtype))  # +-s in the features' dtype
    assert (codes[:100] & (1 << 3) == 0).all() and (codes[100:200] & (1 << 7) == 0).all() and codes[200] == 0


@pytest.mark.parametrize("spherical", [False, True])
def test_straight_through_gradient_and_the_commitment(spherical):
    """With no loss, d out / d u is the identity (through the normalisation for BSQ: (w - u (u.w)) / ||z||); the
    commitment mean((u - q)^2) and its gradient 2 (u - q) / (N d), through the normalisation too."""
    q = LookupFreeQuantizer(LFQConfig(bits=6, spherical=spherical, entropy_weight=0.0, beta=1.0))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64)
    norm = z.norm(dim=1, keepdim=True) if spherical else torch.ones(())
    u = z / norm
    through_norm = (lambda v: (v - u * (u * v).sum(dim=1, keepdim=True)) / norm) if spherical else (lambda v: v)
    h = z.float().requires_grad_()
    out = q(h)
    assert set(out.terms) == {"commitment"}
    (grad,) = torch.autograd.grad((out.z * w.float()).sum(), h)
    torch.testing.assert_close(grad.double(), through_norm(w), rtol=1e-5, atol=1e-6)
    if not spherical:
        assert torch.equal(grad, w.float())  # exactly the identity
    s = 1 / math.sqrt(6) if spherical else 1.0
    quantized = torch.where(u > 0, s, -s)
    torch.testing.assert_close(out.loss.double(), ((u - quantized) ** 2).mean(), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(q(h).loss, h)
    torch.testing.assert_close(grad.double(), through_norm(2 * (u - quantized) / u.numel()), rtol=1e-4, atol=1e-9)
    # sign_ste itself: exactly +-value, the tie at 0 (and -0.0) to -value, gradient 1 everywhere
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0], requires_grad=True)
    y = sign_ste(x, 0.5)
    assert y.tolist() == [-0.5, -0.5, -0.5, 0.5, 0.5]
    assert torch.equal(torch.autograd.grad(y, x, torch.arange(1.0, 6.0))[0], torch.arange(1.0, 6.0))


def normalised(z: torch.Tensor, spherical: bool) -> torch.Tensor:
    """u: z itself, or l2-normalised over the channels (BSQ)."""
    return z / z.norm(dim=1, keepdim=True) if spherical else z


TEMPERATURES = (0.01, 0.1, 1.0)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("d", [1, 4, 10])
def test_entropies_equal_a_float64_brute_force_over_all_codes(d, spherical):
    """The per-sample entropy (factorised) and the batch entropy (one group) exactly, values and gradients, against
    the explicit softmax over all 2^d codes; features scaled so that each temperature has soft and sharp rows."""
    g = torch.Generator().manual_seed(d)
    z = torch.randn(96, d, generator=g, dtype=torch.float64) * torch.logspace(-3, 0, 96, dtype=torch.float64)[:, None]
    s = 1 / math.sqrt(d) if spherical else 1.0
    for temperature in TEMPERATURES:
        u = normalised(z, spherical).requires_grad_()
        ours = sample_entropy(u * (4 * s / temperature)), batch_entropy(u * (4 * s / temperature), (d,))
        reference = brute_force_entropies(u, temperature, spherical)
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(torch.autograd.grad(a, u)[0], torch.autograd.grad(b, u, retain_graph=True)[0],
                                       rtol=1e-8, atol=1e-10)
        # the module in float32, under bf16 autocast, gives the same terms (from the float32 features)
        q = LookupFreeQuantizer(LFQConfig(bits=d, spherical=spherical, temperature=temperature))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = q(as_grid(z.float())).terms
        u32 = normalised(z.float().double(), spherical)
        reference32 = brute_force_entropies(u32, temperature, spherical)
        torch.testing.assert_close(terms["sample_entropy"].double(), reference32[0], rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(terms["batch_entropy"].double(), reference32[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("d, groups", [(4, (2, 2)), (4, (1, 1, 1, 1)), (10, (4, 3, 3)), (10, (5, 5))])
def test_grouped_batch_entropy_is_the_sum_of_group_marginal_entropies(d, groups, spherical):
    """With groups, the batch entropy equals the float64 brute-force sum of the entropies of the batch mean's group
    marginals (values and gradients), and exceeds the joint entropy (subadditivity; strictly, on these rows)."""
    g = torch.Generator().manual_seed(d + len(groups))
    z = torch.randn(64, d, generator=g, dtype=torch.float64) * 0.05
    s = 1 / math.sqrt(d) if spherical else 1.0
    for temperature in TEMPERATURES:
        u = normalised(z, spherical).requires_grad_()
        ours = batch_entropy(u * (4 * s / temperature), groups)
        _, joint, grouped = brute_force_entropies(u, temperature, spherical, groups)
        torch.testing.assert_close(ours, grouped, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(ours, u)[0], torch.autograd.grad(grouped, u)[0],
                                   rtol=1e-8, atol=1e-10)
        assert float(ours.detach()) > float(joint.detach()) + 1e-6
    # the config's grouping: balanced consecutive groups of at most entropy_group_bits
    assert LFQConfig(bits=10, entropy_group_bits=4).entropy_groups == (4, 3, 3)
    assert LFQConfig(bits=10).entropy_groups == (10,) and LFQConfig(bits=11).entropy_groups == (6, 5)
    assert LFQConfig(bits=18).entropy_groups == (9, 9) and LFQConfig(bits=24).entropy_groups == (8, 8, 8)
    assert LFQConfig(bits=13, entropy_group_bits=9).entropy_groups == (7, 6)


def bit_reversed(index: torch.Tensor, d: int) -> torch.Tensor:
    bits = (index.long()[..., None] >> torch.arange(d)) & 1
    return (bits * (1 << torch.arange(d - 1, -1, -1))).sum(dim=-1)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("d", [3, 6])
def test_loss_and_codes_equal_the_peers(d, spherical):
    """vector-quantize-pytorch's LFQ with commitment_loss_weight = beta, entropy_loss_weight, diversity_gamma and
    inv_temperature = 1 / temperature: the same loss and terms (its entropies clamp probabilities at 1e-5, which lowers
    them by at most 2^d * 1e-5 / e each; with soft assignments the terms agree to float32), gradients and outputs; its
    indices are ours with the bits reversed."""
    peer_lfq = pytest.importorskip("vector_quantize_pytorch").LFQ
    g = torch.Generator().manual_seed(d)
    for inv_temperature, scale in ((1.0, 0.2), (100.0, 1.0)):
        config = LFQConfig(bits=d, spherical=spherical, beta=0.3, entropy_weight=0.2, diversity_weight=0.7,
                           temperature=1 / inv_temperature)
        peer = peer_lfq(dim=d, entropy_loss_weight=0.2, commitment_loss_weight=0.3, diversity_gamma=0.7,
                        spherical=spherical, num_codebooks=1, frac_per_sample_entropy=1.0).train()
        ours = LookupFreeQuantizer(config).train()
        x = (torch.randn(4, d, 8, 8, generator=g) * scale).requires_grad_()
        (out, indices, aux), (per_sample, batch, commitment) = peer(x, inv_temperature=inv_temperature,
                                                                   return_loss_breakdown=True)
        mine = ours(x)
        assert torch.equal(mine.codes, bit_reversed(indices, d)) and torch.equal(ours.encode(x), mine.codes)
        torch.testing.assert_close(mine.z, out, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.terms["commitment"], commitment, rtol=1e-6, atol=1e-7)
        slack = (1 << d) * 1e-5 / math.e + 1e-5
        for name, theirs in (("sample_entropy", per_sample), ("batch_entropy", batch)):
            gap = float((mine.terms[name] - theirs).detach())
            assert -1e-5 <= gap <= slack, (name, gap)
        if inv_temperature == 1.0:  # soft: no probability under 1e-5, the peer's clamp is inactive
            torch.testing.assert_close(mine.loss, aux, rtol=1e-5, atol=1e-6)
            (ours_grad,) = torch.autograd.grad(mine.loss, x)
            (peer_grad,) = torch.autograd.grad(aux, x)
            torch.testing.assert_close(ours_grad, peer_grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours.codes_to_vectors(bit_reversed(torch.arange(1 << d), d)),
                                   peer.maybe_l2norm(peer.codebook), rtol=1e-7, atol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the number of elements of the largest tensor any op creates, and how many ops ran."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.largest = max([self.largest] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_the_largest_tensor_at_18_bits_is_n_times_2_to_the_group_bits():
    """d = 18 bits, N = 16,384 feature vectors, forward and backward (on fake tensors: shapes, no storage, so a
    broken grouping records its N x 2^18 instead of allocating 17 GB): the largest tensor is one group's N x 2^9
    log-probabilities, 2^9 times smaller than N x 2^18."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, d = 16_384, 18
    q = LookupFreeQuantizer(LFQConfig(bits=d)).train()
    assert q.config.entropy_groups == (9, 9)
    with FakeTensorMode(allow_non_fake_inputs=True):
        h = torch.randn(1, d, 128, 128, requires_grad=True)
        with _LargestTensor() as forward:
            out = q(h)
        with _LargestTensor() as backward:
            (out.loss + out.z.float().sum()).backward()
    assert backward.ops > 50 and h.grad.shape == h.shape
    assert forward.largest == n * 2**9 and backward.largest <= n * 2**9  # vs N x 2^18 = 4,294,967,296


def test_statistics_a_masked_skipped_step_and_the_usage_window():
    q = LookupFreeQuantizer(LFQConfig(bits=4, usage_window=2)).train()
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2, 4, 4, 4, generator=g) - 0.3).requires_grad_()
    b = torch.randn(3, 4, 4, 4, generator=g) - 0.3
    with no_host_sync():  # a training step: forward, backward and the step hook with the skip as a device tensor
        out_a, out_b = q(a), q(b)
        (out_a.loss + out_a.z.sum()).backward()
        stats = q.on_optimizer_step(torch.tensor(False))
    both = torch.cat([out_a.codes.flatten(), out_b.codes.flatten()]).numpy()
    counts = np.bincount(both, minlength=16).astype(np.float64)
    p = counts / counts.sum()
    assert math.isclose(float(stats["perplexity"]), math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel_tol=1e-5)
    f = reference_bits(both, 4).mean(axis=0)
    assert 0 < f.min() and f.max() < 1
    expected = (-(f * np.log2(f) + (1 - f) * np.log2(1 - f))).mean()
    assert math.isclose(float(stats["bit_entropy"]), expected, rel_tol=1e-5)
    assert float(stats["usage"]) == pytest.approx((counts > 0).mean()) and int(q.steps) == 1
    assert not list(q.parameters())
    # a skipped step (a device tensor, never read): every buffer as it was, for a code the step had not used
    unused = int(np.flatnonzero(counts == 0)[0])
    features = q.codes_to_vectors(torch.tensor(unused)).view(1, 4, 1, 1).expand(1, 4, 4, 4)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with no_host_sync():
        q(features)
        q.on_optimizer_step(torch.tensor(True))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    # two steps of one code only: the window (2) forgets the first step's codes; constant bits have entropy 0
    for _ in range(2):
        one = q(torch.full((1, 4, 4, 4), 5.0)).codes
        stats = q.on_optimizer_step(False)
    assert int(q.steps) == 3 and float(q.codebook_stats()["usage"]) == pytest.approx(1 / 16)
    assert int(one[0, 0, 0]) == 15 and int(q.last_used[15]) == 3 and float(stats["bit_entropy"]) == 0.0
    assert q.on_optimizer_step(True) == {}
    q.eval()(a)
    assert q.on_optimizer_step(False) == {}  # nothing gathered in eval mode


def test_save_load_strict_model_card_and_info(tmp_path, capsys):
    torch.manual_seed(0)
    model = vqtok.Autoencoder(tiny_config(LFQConfig(bits=10, spherical=True))).train()
    model(torch.rand(2, 3, 16, 16) * 2 - 1)
    model.on_optimizer_step()
    keys = [k for k in model.state_dict() if k.startswith("bottleneck.")]
    assert sorted(keys) == ["bottleneck.last_used", "bottleneck.steps"]
    _, config = saved_and_reloaded(model, tmp_path, required_key="bottleneck.last_used",
                                   unexpected_key="bottleneck.codebook")
    assert config["bottleneck"] == {"kind": "lfq", "bits": 10, "spherical": True, "beta": 0.25, "entropy_weight": 0.1,
                                    "diversity_weight": 1.0, "temperature": 0.01, "entropy_group_bits": None,
                                    "usage_window": 100}
    assert config["vocab_size"] == 1024 and config["latent_dim"] == 10
    readme = (tmp_path / "tok" / "README.md").read_text()
    assert "A BSQ image tokenizer made with" in readme and "vocabulary of 1,024 (10 bits)" in readme
    assert vqtok.cli.main(["info", str(tmp_path / "tok")]) == 0
    assert '"kind": "lfq"' in capsys.readouterr().out
    summary = vqtok.cli._summary(model.config, 1)[0]
    assert summary == "bottleneck: BSQ, 10 bits: 1,024 codes of dim 10 (on the unit sphere)"


def test_bad_codes_are_refused_in_one_line():
    q = LookupFreeQuantizer(LFQConfig(bits=4))
    for codes, error, match in ((torch.tensor([[[16]]]), ValueError, r"codes must lie in \[0, 16\)"),
                                (torch.tensor([[[-1]]]), ValueError, r"codes must lie in \[0, 16\)"),
                                (torch.zeros(1, 2, 2), TypeError, "codes must be an integer tensor"),
                                (torch.zeros(2, 2, dtype=torch.long), ValueError, r"shape \[B, h, w\]")):
        with pytest.raises(error, match=match) as e:
            q.decode(codes)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"expects features \[B, 4, h, w\]"):
        q(torch.zeros(1, 5, 2, 2))
    assert torch.equal(q.decode(torch.tensor([[[5]]], dtype=torch.uint8)).view(-1), torch.tensor([1.0, -1, 1, -1]))


@pytest.mark.parametrize("bottleneck, match", [
    ({"kind": "lfq", "bits": 0}, r"bottleneck.bits must be an integer in \[1, 24\], got 0"),
    ({"kind": "lfq", "bits": 25}, r"bits must be an integer in \[1, 24\], got 25"),
    ({"kind": "lfq", "bits": 2.5}, r"'model.bottleneck.bits' must be an integer"),
    ({"kind": "lfq", "temperature": 0}, "temperature must be finite and >= 1e-06, got 0"),
    ({"kind": "lfq", "temperature": 1e-37}, "temperature must be finite and >= 1e-06"),
    ({"kind": "lfq", "beta": -1}, "beta must be finite and >= 0"),
    ({"kind": "lfq", "entropy_weight": -0.1}, "entropy_weight must be finite and >= 0"),
    ({"kind": "lfq", "diversity_weight": -0.5}, "diversity_weight must be finite and >= 0"),
    ({"kind": "lfq", "bits": 10, "entropy_group_bits": 11}, r"entropy_group_bits must be in \[1, 10\]"),
    ({"kind": "lfq", "bits": 20, "entropy_group_bits": 17}, r"entropy_group_bits must be in \[1, 16\]"),
    ({"kind": "lfq", "entropy_group_bits": 5, "entropy_weight": 0}, "entropy_group_bits set but entropy_weight is 0"),
    ({"kind": "lfq", "temperature": 0.1, "diversity_weight": 2, "entropy_weight": 0},
     "diversity_weight, temperature set but entropy_weight is 0, so there is no entropy loss for them to shape"),
    ({"kind": "lfq", "usage_window": 0}, "usage_window must be >= 1"),
    ({"kind": "lfq", "dim": 10}, "unknown key"),
    ({"kind": "lfq", "spherical": "yes"}, "spherical"),
])
def test_bad_configs_are_refused_in_one_line(tmp_path, bottleneck, match):
    assert re.search(match, bottleneck_config_error(tmp_path, bottleneck))


def test_the_entropy_loss_defaults_are_written_out_only_when_there_is_one():
    assert (LFQConfig().temperature, LFQConfig().diversity_weight) == (0.01, 1.0)
    assert LFQConfig() == LFQConfig(temperature=0.01, diversity_weight=1.0)  # a saved config reloads equal
    off = LFQConfig(entropy_weight=0)
    assert (off.temperature, off.diversity_weight, off.entropy_group_bits) == (None, None, None)
    assert LookupFreeQuantizer(off)(torch.randn(2, 10, 2, 2)).terms.keys() == {"commitment"}


def test_non_finite_weights_are_refused():
    for key in ("beta", "entropy_weight", "diversity_weight", "temperature"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=f"{key} must be finite"):
                LFQConfig(**{key: value})


def test_the_cifar10_config_loads():
    from vqtok.config import TrainConfig

    config = load_yaml("configs/cifar10_lfq.yaml", TrainConfig)
    assert config.model.bottleneck == LFQConfig(bits=10) and config.model.bottleneck.vocab_size == 1024
    fsq = load_yaml("configs/cifar10_fsq.yaml", TrainConfig)  # the same network and budget, FSQ's bottleneck
    assert dataclasses.replace(config, model=fsq.model, output_dir=fsq.output_dir) == fsq
    assert isinstance(AutoencoderConfig(bottleneck=LFQConfig()).bottleneck, LFQConfig)
    assert isinstance(build_bottleneck(LFQConfig(bits=3)), LookupFreeQuantizer)


def test_an_lfq_tokenizer_trains_encodes_and_feeds_a_prior_that_samples(tmp_path, capsys):
    """Training (a few steps) -> `vqtok info` -> a token store of uint16 codes (2^10) -> a prior -> sampled codes ->
    images; an 18-bit tokenizer's store holds int32 codes."""
    torch.manual_seed(0)
    tok_dir = train(tiny_train_config(str(tmp_path / "run"), vq=LFQConfig(bits=10), max_steps=4, eval_every=4,
                                      checkpoint_every=4))
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert 0 < metrics["code_usage"] <= 1 and metrics["code_perplexity"] > 1
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("vq/bit_entropy" in r and "batch_entropy" in r for r in logged)
    tokenizer = vqtok.load(tok_dir)
    assert tokenizer.vocab_size == 1024 and int(tokenizer.bottleneck.steps) == 4
    assert vqtok.cli.main(["info", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert '"usage"' in out and '"kind": "lfq"' in out
    through_store_and_prior(tok_dir, tmp_path, vocab_size=1024, dtype="uint16")
    # 2^18 codes need more than uint16
    wide = vqtok.Autoencoder(tiny_train_config(str(tmp_path / "wide"), vq=LFQConfig(bits=18)).model)
    wide.save_pretrained(tmp_path / "wide")
    encode_dataset(str(tmp_path / "wide"), DataConfig(source="digits", limit=8), tmp_path / "wide_store",
                   num_workers=0, progress=False)
    wide_store = TokenDataset(tmp_path / "wide_store")
    assert wide_store.vocab_size == 1 << 18 and wide_store.manifest["dtype"] == "int32"
    assert np.load(next((tmp_path / "wide_store" / "shards").glob("codes-*.npy"))).dtype == np.int32


def test_codebook_health_and_warnings_cover_lfq():
    from vqtok.train.evaluate import MIN_CODE_USAGE, codebook_health, codebook_warnings

    model = vqtok.Autoencoder(tiny_config(LFQConfig(bits=6))).train()
    assert codebook_health(model) == {"codebook_initialized": True, "train_code_usage": None}  # no step yet
    model(torch.rand(2, 3, 16, 16) * 2 - 1)
    model.on_optimizer_step()
    health = codebook_health(model)
    assert health["codebook_initialized"] and 0 < health["train_code_usage"] <= 1
    [warning] = codebook_warnings({**health, "train_code_usage": MIN_CODE_USAGE / 2}, model.config.bottleneck, 5)
    assert "LFQ codes are barely used" in warning and "64 codes (6 bits)" in warning and "\n" not in warning
