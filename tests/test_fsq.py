"""Finite scalar quantization: the index <-> code bijection, rounding against a float64 reference (bf16 included, .5
boundaries), the straight-through gradient, the peer's codes, statistics with a masked skipped step, strict
save/load, config errors, and an FSQ tokenizer through training -> token store -> prior -> samples -> images."""

import json
import math
import re

import numpy as np
import pytest
import torch

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
from vqtok.bottleneck import FiniteScalarQuantizer, FSQConfig, build_bottleneck
from vqtok.bottleneck.fsq import BOUND_EPS, round_ste
from vqtok.config import AutoencoderConfig, load_yaml
from vqtok.metrics import perplexity
from vqtok.train.loop import train


def reference_levels(h: np.ndarray, levels) -> tuple[np.ndarray, np.ndarray]:
    """The paper's bound and rounding in float64 (numpy, independent of torch): (bounded b [N, d], round(b))."""
    L = np.asarray(levels, dtype=np.float64)
    half_l = (L - 1) * (1 + BOUND_EPS) / 2
    offset = np.where(L % 2 == 0, 0.5, 0.0)
    b = np.tanh(h + np.arctanh(offset / half_l)) * half_l - offset
    return b, np.round(b)  # numpy rounds half to even


def reference_index(rounded: np.ndarray, levels) -> np.ndarray:
    """Mixed radix, channel 0 fastest, from the integer levels round(b) [N, d]."""
    L = np.asarray(levels)
    k = rounded.astype(np.int64) + L // 2
    assert (k >= 0).all() and (k < L).all()
    basis = np.cumprod([1, *levels[:-1]])
    return (k * basis).sum(axis=1)


def as_grid(rows: torch.Tensor) -> torch.Tensor:
    """[N, d] -> features [1, d, N, 1]."""
    return rows.T[None, :, :, None].contiguous()


LEVELS = (8, 8, 8, 5, 5, 5)


def test_every_index_maps_to_a_distinct_code_and_back():
    q = FiniteScalarQuantizer(FSQConfig(levels=LEVELS))
    assert q.vocab_size == 64_000 and q.dim == 6
    idx = torch.arange(64_000)
    vectors = q.codes_to_vectors(idx)
    assert vectors.shape == (64_000, 6) and torch.unique(vectors, dim=0).shape[0] == 64_000
    assert torch.equal(q.vectors_to_codes(vectors), idx)
    # the grid per channel: k / (L // 2) for k in -L/2 .. L/2 - 1 (even L) or -(L-1)/2 .. (L-1)/2 (odd L)
    for c, n in enumerate(LEVELS):
        expected = (torch.arange(n) - n // 2) / (n // 2)
        assert torch.equal(torch.unique(vectors[:, c]), expected)
    # quantizing a code vector's preimage gives the code back, and forward's output is that code's vector
    h = torch.atanh(torch.clamp((vectors * q._half_width.view(-1) + q._offset.view(-1)) / q._half_l.view(-1),
                                -0.999999, 0.999999)) - q._shift.view(-1)
    assert torch.equal(q.encode(as_grid(h)).view(-1), idx)
    out = q(as_grid(h))
    assert torch.equal(out.z[0, :, :, 0].T, vectors) and torch.equal(out.codes.view(-1), idx)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64000\)"):
        q.decode(torch.tensor([[[64_000]]]))


@pytest.mark.parametrize("bf16", [False, True])
def test_codes_match_a_float64_reference(bf16):
    """Random features (bf16 ones: what a conv gives under bf16 autocast), quantized under bf16 autocast, against
    the float64 bound and rounding of the same values; points within 1e-5 of a .5 boundary (where float32's tanh may
    fairly differ from float64's) are left out, and are few."""
    q = FiniteScalarQuantizer(FSQConfig(levels=LEVELS))
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50_000, 6, generator=g) * 2
    if bf16:
        rows = rows.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, out = q.encode(as_grid(rows)).view(-1), q(as_grid(rows)).z
    assert out.dtype == rows.dtype
    b, rounded = reference_levels(rows.double().numpy(), LEVELS)
    clear = (np.abs(np.abs(b - np.floor(b)) - 0.5) > 1e-5).all(axis=1)
    assert clear.mean() > 0.999
    assert np.array_equal(codes.numpy()[clear], reference_index(rounded, LEVELS)[clear])
    expected = rounded / (np.asarray(LEVELS) // 2)
    assert np.array_equal(out[0, :, :, 0].T.double().numpy()[clear], expected[clear])
    # every channel uses all its levels
    levels = q.code_levels(codes)
    assert [len(torch.unique(levels[:, c])) for c in range(6)] == list(LEVELS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_on_half_boundaries_is_half_to_even_as_float64(dtype):
    values = torch.arange(-9, 9, dtype=torch.float64) + 0.5  # exact in bf16 and float32
    values = torch.cat([values, values + 0.25, values - 0.25, values.nextafter(torch.tensor(100.0, dtype=torch.float64))])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = round_ste(values.to(dtype))
    assert torch.equal(got.double(), torch.from_numpy(np.round(values.to(dtype).double().numpy())))
    # the bound itself: b(h) for even L sits on the levels' midpoints at h = atanh((k + 1/2 + o) / half_l) - s;
    # whatever float32 gives there, the code is one of the two neighbours and round(b) agrees with float64's
    q = FiniteScalarQuantizer(FSQConfig(levels=(4,)))
    half_l, s = 3 * (1 + BOUND_EPS) / 2, math.atanh(0.5 / (3 * (1 + BOUND_EPS) / 2))
    for k in (-2, -1, 0):
        h = torch.tensor([[math.atanh((k + 1.0) / half_l) - s]])  # b = k + 1/2
        b = q.bound(as_grid(h)).item()
        assert abs(b - (k + 0.5)) < 1e-5
        assert q.encode(as_grid(h)).item() == round(b) + 2  # Python's round: half to even, in float64


def test_straight_through_gradient():
    """d round_ste(b) / d b = 1 everywhere (inside the bound, on .5 boundaries, beyond); d out / d h is then the
    bound's derivative tanh'(h + s) * half_l / (L // 2), smooth, vanishing (0 in float32) far outside the bound."""
    b = torch.tensor([-5.3, -2.5, -0.5, 0.0, 0.49, 0.5, 1.7, 3.5, 40.0], requires_grad=True)
    (grad,) = torch.autograd.grad(round_ste(b), b, torch.arange(1.0, 10.0))
    assert torch.equal(grad, torch.arange(1.0, 10.0))
    q = FiniteScalarQuantizer(FSQConfig(levels=(8, 5)))
    h = (torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    w = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (grad,) = torch.autograd.grad((q(h).z * w).sum(), h)
    L = torch.tensor([8.0, 5.0], dtype=torch.float64).view(1, 2, 1, 1)
    half_l, offset = (L - 1) * (1 + BOUND_EPS) / 2, (L % 2 == 0).double() / 2
    expected = w.double() * (1 - torch.tanh(h.double() + torch.atanh(offset / half_l)) ** 2) * half_l / (L // 2)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)
    far = torch.tensor([[[[-30.0]], [[30.0]]]], requires_grad=True)
    (grad,) = torch.autograd.grad(q(far).z.sum(), far)
    assert torch.equal(grad, torch.zeros_like(far))


def test_codes_and_output_equal_the_peers():
    """vector-quantize-pytorch's FSQ has the same bound (eps 1e-3, half-level offset, tanh), basis and output."""
    peer_fsq = pytest.importorskip("vector_quantize_pytorch").FSQ
    for levels in ((8, 5, 5, 5), LEVELS, (7, 3, 4)):
        ours, peer = FiniteScalarQuantizer(FSQConfig(levels=levels)), peer_fsq(list(levels))
        h = torch.randn(4, len(levels), 16, 16, generator=torch.Generator().manual_seed(2)) * 3
        out, indices = peer(h)
        assert torch.equal(ours.encode(h), indices.long())
        assert torch.equal(ours(h).z, out)
        assert torch.equal(ours.codes_to_vectors(torch.arange(ours.vocab_size)), peer.implicit_codebook)


def test_statistics_a_masked_skipped_step_and_the_usage_window():
    q = FiniteScalarQuantizer(FSQConfig(levels=(4, 3), usage_window=2)).train()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 2, 4, 4, generator=g) * 0.2, torch.randn(3, 2, 4, 4, generator=g) * 0.2  # not 5.0's code
    with no_host_sync():
        out_a, out_b = q(a), q(b)  # two micro-batches of one step
        stats = q.on_optimizer_step(torch.tensor(False))
    both = torch.cat([out_a.codes.flatten(), out_b.codes.flatten()])
    counts = np.bincount(both.numpy(), minlength=12).astype(np.float64)
    p = counts / counts.sum()
    assert math.isclose(float(stats["perplexity"]), math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel_tol=1e-5)
    assert float(stats["usage"]) == pytest.approx((counts > 0).mean()) and int(q.steps) == 1
    assert out_a.loss.item() == 0.0 and not list(q.parameters())
    # a skipped step (a device tensor, never read): every buffer as it was
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with no_host_sync():
        q(torch.full((1, 2, 4, 4), 5.0))
        q.on_optimizer_step(torch.tensor(True))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    # two steps of one code only: the window (2) forgets the first step's codes
    for _ in range(2):
        one = q(torch.full((1, 2, 4, 4), 5.0)).codes
        q.on_optimizer_step(False)
    assert int(q.steps) == 3 and float(q.codebook_stats()["usage"]) == pytest.approx(1 / 12)
    assert int(q.last_used[one[0, 0, 0]]) == 3
    assert q.on_optimizer_step(True) == {} and perplexity(torch.ones(4)).item() == pytest.approx(4)
    q.eval()(a)
    assert q.on_optimizer_step(False) == {}  # nothing gathered in eval mode


def test_save_load_strict_and_float32_under_casts(tmp_path):
    torch.manual_seed(0)
    model = vqtok.Autoencoder(tiny_config(FSQConfig(levels=(8, 5, 5, 5)))).train()
    model(torch.rand(2, 3, 16, 16) * 2 - 1)
    model.on_optimizer_step()
    keys = [k for k in model.state_dict() if k.startswith("bottleneck.")]
    assert sorted(keys) == ["bottleneck.last_used", "bottleneck.steps"]
    _, config = saved_and_reloaded(model, tmp_path, required_key="bottleneck.last_used",
                                   unexpected_key="bottleneck.codebook")
    assert config["bottleneck"] == {"kind": "fsq", "levels": [8, 5, 5, 5], "usage_window": 100}
    assert config["vocab_size"] == 1000 and config["latent_dim"] == 4
    half = build_bottleneck(FSQConfig(levels=(8, 5))).bfloat16()
    assert half._half_l.dtype == half._shift.dtype == torch.float32
    assert "FSQ image tokenizer" in (tmp_path / "tok" / "README.md").read_text()


@pytest.mark.parametrize("bottleneck, match", [
    ({"kind": "fsq", "levels": [8, 1]}, r"bottleneck.levels must be integers >= 2, got \[8, 1\]"),
    ({"kind": "fsq", "levels": []}, "levels must name at least one channel"),
    ({"kind": "fsq", "levels": [8, 2.5]}, r"'model.bottleneck.levels\[1\]' must be an integer"),
    ({"kind": "fsq", "levels": [1 << 16, 1 << 16]}, "give 4,294,967,296 codes, more than"),
    ({"kind": "fsq", "levels": [8, 5], "dim": 2}, "unknown key"),
    ({"kind": "fsq", "levels": [8, 5], "usage_window": 0}, "usage_window must be >= 1"),
])
def test_bad_configs_are_refused_in_one_line(tmp_path, bottleneck, match):
    assert re.search(match, bottleneck_config_error(tmp_path, bottleneck))


def test_the_cifar10_config_loads():
    from vqtok.config import TrainConfig

    config = load_yaml("configs/cifar10_fsq.yaml", TrainConfig)
    assert config.model.bottleneck == FSQConfig(levels=(8, 5, 5, 5)) and config.model.bottleneck.vocab_size == 1000
    vq = load_yaml("configs/cifar10_vq.yaml", TrainConfig)
    assert config.model.channel_mult == vq.model.channel_mult and config.max_steps == vq.max_steps
    assert isinstance(AutoencoderConfig(bottleneck=FSQConfig()).bottleneck, FSQConfig)


def test_an_fsq_tokenizer_trains_encodes_and_feeds_a_prior_that_samples(tmp_path, capsys):
    """Training (a few steps) -> a token store of uint16 codes (64,000) -> a prior -> sampled codes -> images."""
    torch.manual_seed(0)
    tok_dir = train(tiny_train_config(str(tmp_path / "run"), vq=FSQConfig(levels=LEVELS), max_steps=4,
                                      eval_every=4, checkpoint_every=4))
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert 0 < metrics["code_usage"] <= 1 and metrics["code_perplexity"] > 1
    tokenizer = vqtok.load(tok_dir)
    assert tokenizer.vocab_size == 64_000 and int(tokenizer.bottleneck.steps) == 4
    assert vqtok.cli.main(["info", str(tok_dir)]) == 0
    assert '"usage"' in capsys.readouterr().out
    through_store_and_prior(tok_dir, tmp_path, vocab_size=64_000, dtype="uint16")


def test_codebook_health_and_warnings_cover_fsq():
    from vqtok.train.evaluate import MIN_CODE_USAGE, codebook_health, codebook_warnings

    model = vqtok.Autoencoder(tiny_config(FSQConfig(levels=(8, 5)))).train()
    assert codebook_health(model) == {"codebook_initialized": True, "train_code_usage": None}  # no step yet
    model(torch.rand(2, 3, 16, 16) * 2 - 1)
    model.on_optimizer_step()
    health = codebook_health(model)
    assert health["codebook_initialized"] and 0 < health["train_code_usage"] <= 1
    [warning] = codebook_warnings({**health, "train_code_usage": MIN_CODE_USAGE / 2}, model.config.bottleneck, 5)
    assert "FSQ codes are barely used" in warning and "40 codes" in warning and "\n" not in warning
