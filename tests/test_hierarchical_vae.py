"""The hierarchical VAE and the shared Gaussian KL against independent references: torch.distributions, densities
written out here in float64, a top-down pass wired by hand from the model's modules, and hand-computed objectives."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributions import Normal, kl_divergence
from torch.testing import assert_close

import vqtok
from vqtok import AutoencoderConfig, ConfigError, load_yaml
from vqtok.bottleneck import DiagonalGaussian
from vqtok.bottleneck.kl import KLObjective, balance_coefficients, gaussian_kl
from vqtok.config import TrainConfig, from_dict, save_yaml
from vqtok.models.hierarchical_vae import HierarchicalVAE, HierarchicalVAEConfig

LOG_2PI = math.log(2 * math.pi)
EPS32 = torch.finfo(torch.float32).eps
TINY = {"in_channels": 1, "resolution": 8, "scales": (4, 2), "groups_per_scale": (1, 1), "latent_channels": 2,
        "width": 8, "encoder_cells": 1, "cells_per_group": 1}


def tiny(**overrides) -> HierarchicalVAEConfig:
    """8x8 grey images; group 0 is 2x2 at factor 4 (prior N(0, I)), group 1 is 4x4 at factor 2 (a learned prior);
    factor 1 has no latents."""
    return HierarchicalVAEConfig(**{**TINY, **overrides})


def build(*, heads: float = 0.0, double: bool = True, seed: int = 0, **overrides) -> HierarchicalVAE:
    """A tiny model in evaluation mode. `heads` > 0 replaces the zero-initialised last layer of every prior and
    posterior by N(0, heads^2) weights, so that q != p and the learned prior is not N(0, I)."""
    torch.manual_seed(seed)
    model = HierarchicalVAE(tiny(**overrides)).eval()
    model = model.double() if double else model
    if heads:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for group in model.groups:
                for head in (group.prior, group.posterior):
                    for p in () if head is None else (head.c4.weight, head.c4.bias):
                        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * heads)
    return model


def binary_images(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype).round()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((z - mean) ** 2 / torch.exp(logvar) + logvar + LOG_2PI)


def log_bernoulli(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return x * logits - F.softplus(logits)


def per_image(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(dim=1)


# ---- the KL and the log-density of diagonal Gaussians ----------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions_over_extreme_scales():
    g = gen(0)
    n = 4096
    lv_q, lv_p = (torch.empty(n, dtype=torch.float64).uniform_(-25, 18, generator=g) for _ in range(2))
    # mean differences from 1e-3 to 1e3 (relative to sigma_p from e^-12.5 to e^9: up to ~1e8 standard deviations)
    m_q = torch.randn(n, generator=g, dtype=torch.float64) * 100
    m_p = m_q + torch.randn(n, generator=g, dtype=torch.float64) * 10 ** torch.empty(n, dtype=torch.float64).uniform_(
        -3, 3, generator=g)
    corners = torch.tensor([-25.0, 0.0, 18.0], dtype=torch.float64)  # every pair of extremes, equal means or 1e3 apart
    lq, lp, dm = torch.cartesian_prod(corners, corners, torch.tensor([0.0, 1e3], dtype=torch.float64)).T
    lv_q, lv_p, m_q, m_p = torch.cat([lv_q, lq]), torch.cat([lv_p, lp]), torch.cat([m_q, dm]), torch.cat([m_p, 0 * dm])
    reference = kl_divergence(Normal(m_q, torch.exp(0.5 * lv_q)), Normal(m_p, torch.exp(0.5 * lv_p)))
    ours = gaussian_kl(m_q, lv_q, m_p, lv_p)
    assert ours.dtype == torch.float64
    assert_close(ours, reference, rtol=1e-10, atol=0)
    assert_close(DiagonalGaussian(m_q, lv_q).kl(DiagonalGaussian(m_p, lv_p)), reference, rtol=1e-10, atol=0)
    assert ours[-18:][::2].eq(0).sum() == 3  # q = p exactly (equal log-variances, equal means): exactly 0


def test_gaussian_kl_without_p_is_the_kl_to_the_standard_normal():
    g = gen(1)
    mean = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 30
    logvar = torch.empty(3, 2, 4, 4, dtype=torch.float64).uniform_(-25, 18, generator=g)
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    assert_close(gaussian_kl(mean, logvar), reference, rtol=1e-10, atol=0)
    assert_close(DiagonalGaussian(mean, logvar).kl(), reference, rtol=1e-10, atol=0)


@pytest.mark.parametrize("distance", [1e-2, 1e-4])
def test_gaussian_kl_in_float32_is_accurate_near_the_prior(distance):
    """q ~= p: KL ~ distance^2. From float32 parameters the float32 result is within a few float32 roundings of
    |lv_q - lv_p| and of the KL itself (the float64 reference takes the same float32 inputs); the naive
    r - 1 - log r is off by about one rounding of 1, which for these KLs (1e-4 ... 1e-9) is far worse. (Measured:
    at most 0.9 of the bound's unit eps (|d| + KL); the naive formula's median error is 12 and 300 units.)"""
    g = gen(2)
    n = 10_000
    lv_p = torch.randn(n, generator=g) * 3
    m_p = torch.randn(n, generator=g) * 3
    lv_q = lv_p + torch.randn(n, generator=g) * distance
    m_q = m_p + torch.randn(n, generator=g) * distance * torch.exp(0.5 * lv_p)
    ours = gaussian_kl(m_q, lv_q, m_p, lv_p)
    as64 = [t.double() for t in (m_q, lv_q, m_p, lv_p)]
    reference = kl_divergence(Normal(as64[0], torch.exp(0.5 * as64[1])), Normal(as64[2], torch.exp(0.5 * as64[3])))
    bound = 3 * EPS32 * ((as64[1] - as64[3]).abs() + reference)
    assert ours.dtype == torch.float32 and (ours >= 0).all()
    assert ((ours.double() - reference).abs() <= bound).all()
    assert abs(ours.double().sum() / reference.sum() - 1) < 1e-4  # a group's KL, summed
    r = torch.exp(lv_q - lv_p)
    naive = 0.5 * ((m_q - m_p) ** 2 / torch.exp(lv_p) + r - 1 - torch.log(r))
    assert ((naive.double() - reference).abs() > bound).float().mean() > 0.5  # the regime where cancellation bites
    half = gaussian_kl(*(t.bfloat16() for t in (m_q, lv_q, m_p, lv_p)))
    assert half.dtype == torch.float32  # bf16 parameters are computed with in float32


def test_log_prob_matches_torch_distributions():
    g = gen(3)
    mean = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 50
    logvar = torch.empty(2, 3, 4, 4, dtype=torch.float64).uniform_(-25, 18, generator=g)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 5
    z[0, 0] = mean[0, 0]  # exactly at the mean
    reference = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z)
    ours = DiagonalGaussian(mean, logvar).log_prob(z)
    assert ours.dtype == torch.float64
    assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    assert DiagonalGaussian(mean.float(), logvar.float()).log_prob(z.float()).dtype == torch.float32


# ---- the top-down pass, written out for the two-group layout ---------------------------------------------------------


def upsample(h: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2: every pixel repeated into a 2x2 block."""
    return h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def hand_pass(model: HierarchicalVAE, x: torch.Tensor, zs: list[torch.Tensor]):
    """The tiny layout's pass given each group's z: h from the learned constant; group 0 at factor 4 (prior N(0, I),
    posterior from [h, act]); up; group 1 at factor 2 (prior and features from h, posterior = prior + the posterior
    head's output); up; the factor-1 cells; the head. Returns [(prior mean, logvar, posterior mean, logvar)] per group
    and the pixel logits."""
    c = model.config.latent_channels
    acts = model.bottom_up(x)
    g0, g1 = model.groups
    h = model.top_bias.expand(x.shape[0], -1, -1, -1)
    zero = torch.zeros_like(zs[0])
    dm0, dlv0 = g0.posterior(torch.cat([h, acts[4]], dim=1)).split([c, c], dim=1)
    params = [(zero, zero, dm0, dlv0)]
    h = upsample(g0.cells(h + g0.z_proj(zs[0])))
    pm, plv, features = g1.prior(h).split([c, c, h.shape[1]], dim=1)
    dm1, dlv1 = g1.posterior(torch.cat([h, acts[2]], dim=1)).split([c, c], dim=1)
    params.append((pm, plv, pm + dm1, plv + dlv1))
    h = upsample(g1.cells(h + features + g1.z_proj(zs[1])))
    return params, model.head(F.gelu(model.refine["1"](h)))


def log_weight_of(x: torch.Tensor, logits: torch.Tensor, zs, params) -> torch.Tensor:
    """log p(x | z) + sum_g [log N(z_g; prior) - log N(z_g; posterior)] per image, Bernoulli pixels."""
    log_w = per_image(log_bernoulli(x, logits))
    for z, (pm, plv, qm, qlv) in zip(zs, params):
        log_w = log_w + per_image(log_normal(z, pm, plv) - log_normal(z, qm, qlv))
    return log_w


def test_the_two_group_pass_and_its_log_weight_match_a_pass_written_out_by_hand():
    model = build(heads=0.3)
    x = binary_images(3)
    with torch.no_grad():
        log_w = model.log_weights(x, 1, gen(5))[:, 0]
        logits, passes = model.top_down(3, acts=model.bottom_up(x), sample=True, generator=gen(5))
        zs = [p.z for p in passes]
        params, hand_logits = hand_pass(model, x, zs)
    eps = iter([torch.randn(z.shape, generator=g, dtype=z.dtype) for g in [gen(5)] for z in zs])  # draws in group order
    for p, (pm, plv, qm, qlv) in zip(passes, params):
        for ours, theirs in [(p.prior.mean, pm), (p.prior.logvar, plv), (p.posterior.mean, qm),
                             (p.posterior.logvar, qlv)]:
            assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        assert_close(p.z, qm + torch.exp(0.5 * qlv) * next(eps), rtol=1e-12, atol=1e-12)  # z ~ q, reparameterised
    assert passes[1].prior.logvar.abs().min() > 0 and passes[1].prior.mean.abs().min() > 0  # a learned prior at work
    assert_close(logits, hand_logits, rtol=1e-12, atol=1e-12)
    assert_close(log_w, log_weight_of(x, hand_logits, zs, params), rtol=1e-12, atol=1e-10)


def test_the_posterior_is_the_prior_plus_the_posterior_head_output():
    model = build(heads=0.3)
    x = binary_images(2)
    c = model.config.latent_channels
    outputs = []
    handles = [g.posterior.register_forward_hook(lambda m, i, o: outputs.append(o)) for g in model.groups]
    with torch.no_grad():
        _, passes = model.top_down(2, acts=model.bottom_up(x), sample=True, generator=gen(0))
    for h in handles:
        h.remove()
    assert len(outputs) == 2
    for p, out in zip(passes, outputs):
        assert_close(p.posterior.mean - p.prior.mean, out[:, :c], rtol=0, atol=1e-12)
        assert_close(p.posterior.logvar - p.prior.logvar, out[:, c:], rtol=0, atol=1e-12)


# ---- importance weights and the IWAE bound ---------------------------------------------------------------------------


def test_one_importance_weight_is_log_p_x_z_minus_log_q_z_at_the_same_sample():
    model = build(heads=0.3)
    x = binary_images(3)
    with torch.no_grad():
        log_w = model.log_weights(x, 1, gen(7))
        logits, passes = model.top_down(3, acts=model.bottom_up(x), sample=True, generator=gen(7))
    expected = log_weight_of(x, logits, [p.z for p in passes],
                             [(p.prior.mean, p.prior.logvar, p.posterior.mean, p.posterior.logvar) for p in passes])
    assert log_w.shape == (3, 1) and log_w.dtype == torch.float64
    assert_close(log_w[:, 0], expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("k", [2, 5, 50])
def test_the_iwae_bound_is_above_the_mean_log_weight_image_by_image(k):
    """Jensen: log(1/k sum w_i) >= 1/k sum log w_i, strictly when the weights differ: the k samples of an image are
    distinct draws (a copy of one sample k times would make the two equal)."""
    model = build(heads=0.3)
    with torch.no_grad():
        log_w = model.log_weights(binary_images(4), k, gen(k))
    assert log_w.shape == (4, k) and torch.isfinite(log_w).all()
    iwae = torch.logsumexp(log_w, dim=1) - math.log(k)
    assert (iwae > log_w.mean(dim=1)).all()


def test_the_expected_iwae_bound_grows_with_the_number_of_samples():
    """E[IWAE_1] < E[IWAE_5] < E[IWAE_50] (Burda et al. 2016; strict when q is not the true posterior, as here), each
    estimated from S independent bounds per image with independent generators.

    Margin: each difference must exceed 3 of its standard errors, measured from its B x S independent terms (the
    between-image spread included, which only makes it larger): a chance of about 1 in 700 each, were the true
    gains zero. Measured (B = 4, S = 32): IWAE_5 - IWAE_1 = 1.42 nats with a standard error of 0.24 (5.9 of them),
    IWAE_50 - IWAE_5 = 0.86 with 0.15 (5.8)."""
    model = build(heads=0.3)
    x = binary_images(4)
    s = 32
    bounds = {}
    with torch.no_grad():
        for k in (1, 5, 50):
            log_w = model.log_weights(x, k * s, gen(100 + k)).view(4, s, k)  # S independent groups of k per image
            bounds[k] = torch.logsumexp(log_w, dim=2) - math.log(k)
    for low, high in [(1, 5), (5, 50)]:
        gain = (bounds[high] - bounds[low]).flatten()
        standard_error = gain.std() / math.sqrt(gain.numel())
        assert gain.mean() > 3 * standard_error, (low, high, gain.mean().item(), standard_error.item())


# ---- sampling --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.4, 1.0, 1.6])
def test_temperature_scales_the_standard_deviation_of_every_group(t):
    """From the prior at temperature t, (z - mu_p) / sigma_p is N(0, t^2) in every group: the top group's prior is
    N(0, I), the second's comes from the pass. Tolerances: 5 standard errors of N i.i.d. normals, t/sqrt(N) for the
    mean and t/sqrt(2N) for the standard deviation."""
    model = build(heads=0.3)
    c = model.config.latent_channels
    with torch.no_grad():
        model.groups[1].prior.c4.bias[c:2 * c] += math.log(0.25)  # sigma_p about 1/2, so that forgetting it shows
        _, passes = model.top_down(4000, temperature=t, generator=gen(11))
    top, second = passes
    assert top.posterior is None and second.posterior is None
    assert torch.equal(top.prior.mean, torch.zeros_like(top.z)) and torch.equal(top.prior.std, torch.ones_like(top.z))
    assert second.prior.std.max() < 0.8 and second.prior.std.std() > 0.01  # varies with z_1 and the position
    for eps in (top.z, (second.z - second.prior.mean) / second.prior.std):
        n = eps.numel()
        assert abs(eps.mean().item()) < 5 * t / math.sqrt(n)
        assert abs(eps.std().item() / t - 1) < 5 / math.sqrt(2 * n)


def test_temperature_zero_gives_the_prior_means():
    model = build(heads=0.5)
    with torch.no_grad():
        _, passes = model.top_down(3, temperature=0.0, generator=gen(0))
        assert torch.equal(model.sample(2, temperature=0.0, seed=1), model.sample(2, temperature=0.0, seed=2))
    for p in passes:
        assert torch.equal(p.z, p.prior.mean)
    assert passes[1].z.abs().min() > 0  # the second group's mean is not trivially 0


# ---- a fresh model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_a_fresh_model_has_its_posteriors_equal_to_its_priors_and_zero_kl(training):
    torch.manual_seed(0)
    model = HierarchicalVAE(tiny(groups_per_scale=(2, 1), latent_channels=3)).train(training)
    x = torch.rand(3, 1, 8, 8, generator=gen(1))
    out = model(x)
    assert len(out.groups) == 3
    for p in out.groups:
        assert torch.equal(p.posterior.mean, p.prior.mean) and torch.equal(p.posterior.logvar, p.prior.logvar)
        assert torch.equal(p.prior.mean, torch.zeros_like(p.z)) and torch.equal(p.prior.logvar, torch.zeros_like(p.z))
    assert torch.equal(out.bottleneck.kl_units, torch.zeros(3, 3))
    assert out.loss.item() == 0 and out.bottleneck.terms["kl"].item() == 0


# ---- save and load ---------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = build(heads=0.3, double=False)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_save_and_load_is_bit_identical(saved):
    model, path = saved
    loaded = vqtok.load(path)
    assert type(loaded) is HierarchicalVAE and loaded.config == model.config and not loaded.training
    assert list(loaded.state_dict()) == list(model.state_dict())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(model.sample(3, temperature=0.8, seed=4), loaded.sample(3, temperature=0.8, seed=4))
    x = binary_images(3, dtype=torch.float32)
    assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "hierarchical_vae"
    assert config["latent_shapes"] == [[2, 2, 2], [2, 4, 4]] and config["value_range"] == [0.0, 1.0]


@pytest.mark.parametrize("change, match", [
    ("missing", r"missing 1 tensor.*groups\.1\.prior\.c4\.bias"),
    ("extra", r"unexpected 1 tensor.*groups\.0\.prior\.c4\.bias"),  # the top group has no learned prior
])
def test_weights_that_do_not_match_are_refused(saved, change, match):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    if change == "missing":
        del tensors["groups.1.prior.c4.bias"]
    else:
        tensors["groups.0.prior.c4.bias"] = tensors["groups.1.prior.c4.bias"].clone()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        vqtok.load(path)


# ---- bad input -------------------------------------------------------------------------------------------------------


def _nan_images() -> torch.Tensor:
    x = torch.rand(2, 1, 8, 8)
    x[1, 0, 3, 3] = float("nan")
    return x


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(torch.rand(2, 1, 16, 16)), ValueError, r"images of its resolution 8x8, got 16x16"),
    (lambda m: m.reconstruct(torch.rand(2, 3, 8, 8)), ValueError, r"expected images \[B, 1, H, W\], got shape \(2, 3"),
    (lambda m: m.encode(_nan_images()), ValueError, "input images contain NaN or infinite values"),
    (lambda m: m.log_weights(torch.ones(2, 1, 8, 8, dtype=torch.uint8), 2), TypeError, "expected a float tensor"),
    (lambda m: m.decode([torch.zeros(1, 2, 2, 2)]), ValueError, r"a list of 2 latent tensors \(one per group"),
    (lambda m: m.decode(torch.zeros(1, 2, 2, 2)), ValueError, r"a list of 2 latent tensors"),
    (lambda m: m.decode([torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)]), ValueError,
     r"latents of group 1 must be float \[B, 2, 4, 4\], got torch.float32 \[1, 2, 2, 2\]"),
    (lambda m: m.decode([torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, 4, 4)]), ValueError,
     "every group's latents need the same batch size, group 1 has 2"),
    (lambda m: m.decode([torch.full((1, 2, 2, 2), float("nan")), torch.zeros(1, 2, 4, 4)]), ValueError,
     "latents of group 0 contain NaN"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(build(double=False))


# ---- the config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    ({"scales": (3, 2)}, r"scales must be powers of two .*got \[3, 2\]"),
    ({"scales": (2, 4)}, r"scales must be distinct and listed coarsest first .*got \[2, 4\]"),
    ({"scales": (4, 4)}, r"scales must be distinct"),
    ({"groups_per_scale": (1,)}, r"groups_per_scale needs one entry per scale \(2\), got \[1\]"),
    ({"groups_per_scale": (0, 0)}, r"groups_per_scale must be >= 0, with at least one group at the coarsest scale .* got \[0, 0\]"),
    ({"groups_per_scale": (0, 1)}, r"groups_per_scale must be >= 0, with at least one group at the coarsest scale .* got \[0, 1\]"),
    ({"groups_per_scale": (2, -1)}, r"groups_per_scale must be >= 0"),
    ({"resolution": 10}, r"resolution \(10\) must be a positive multiple of the coarsest scale's factor 4"),
    ({"latent_channels": 0}, "latent_channels must be >= 1"),
])
def test_bad_config_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**overrides)
    data = {"loss": "bernoulli", "model": {"kind": "hierarchical_vae", **TINY, **overrides}}
    with pytest.raises(ConfigError, match="^test.yaml: model." + match):
        from_dict(TrainConfig, data, source="test.yaml")


def test_a_training_config_picks_the_model_by_kind_and_round_trips_through_yaml(tmp_path):
    config = from_dict(TrainConfig, {"loss": "bernoulli", "model": {"kind": "hierarchical_vae", **TINY}})
    assert isinstance(config.model, HierarchicalVAEConfig) and config.model == tiny() and config.variational
    save_yaml(config, tmp_path / "train.yaml")
    assert load_yaml(tmp_path / "train.yaml", TrainConfig) == config
    assert "kind: hierarchical_vae" in (tmp_path / "train.yaml").read_text()
    plain = from_dict(TrainConfig, {"model": {"resolution": 16}})
    assert isinstance(plain.model, AutoencoderConfig) and plain.model.resolution == 16


@pytest.mark.parametrize("overrides", [
    {},
    {"scales": (8, 2), "groups_per_scale": (2, 1), "resolution": 16, "encoder_cells": 0, "cells_per_group": 2,
     "bottleneck_ratio": 0.5, "in_channels": 3, "input_range": "-1,1", "decoder_output": "logistic_mixture",
     "num_mixtures": 2},
])
def test_num_elements_counts_the_built_model(overrides):
    config = tiny(**overrides)
    model = HierarchicalVAE(config)
    assert config.num_elements == sum(p.numel() for p in model.parameters())
    assert config.num_elements == sum(t.numel() for t in model.state_dict().values())


# ---- the KL objective ------------------------------------------------------------------------------------------------

# Two micro-batches of two images, three units, free bits 1 nat. Unit 0's step mean is 1.1 (kept) though the first
# micro-batch's is 0.3; unit 1's is 0.85 (floored) though the first micro-batch's is 1.6; unit 2's is 4 (kept).
KL_UNITS = [[0.2, 1.5, 3.0], [0.4, 1.7, 5.0], [1.8, 0.1, 4.0], [2.0, 0.1, 4.0]]
STEP_MEAN = [1.1, 0.85, 4.0]


def test_free_bits_on_the_step_mean_hand_computed():
    kl = torch.tensor(KL_UNITS, dtype=torch.float64, requires_grad=True)
    objective = KLObjective(beta=0.5, free_bits=1.0)
    loss = objective.loss(kl, kl_weight=0.4)
    assert_close(loss, torch.tensor(0.4 * 0.5 * (1.1 + 1.0 + 4.0), dtype=torch.float64), rtol=1e-14, atol=0)
    loss.backward()
    # d/dKL[b, u] = kl_weight beta / B for a kept unit, 0 for a floored one
    assert_close(kl.grad, torch.tensor([[0.05, 0.0, 0.05]] * 4, dtype=torch.float64), rtol=1e-15, atol=0)
    # the given step mean decides the floor, not the batch at hand (means 0.3, 1.6, 4): unit 0 kept at 0.3 nats,
    # unit 1 floored and without gradient
    first = kl[:2].detach().requires_grad_(True)
    loss = objective.loss(first, torch.tensor([1.5, 0.5, 4.0]), kl_weight=1.0)
    assert_close(loss, torch.tensor(0.5 * (0.3 + 1.0 + 4.0), dtype=torch.float64), rtol=1e-14, atol=0)
    loss.backward()
    assert_close(first.grad, torch.tensor([[0.25, 0.0, 0.25]] * 2, dtype=torch.float64), rtol=1e-15, atol=0)
    assert objective.needs_step_mean(1.0) and not KLObjective().needs_step_mean(0.5)


@pytest.mark.parametrize("kl_weight", [0.3, 1.0])
def test_micro_batches_with_the_step_mean_give_the_whole_batch_loss_and_gradient(kl_weight):
    objective = KLObjective(beta=0.7, free_bits=1.0, balance=True, balance_alpha=(1, 2, 4))
    theta = torch.tensor(KL_UNITS, dtype=torch.float64).sqrt().requires_grad_(True)
    kl = theta**2
    whole = objective.loss(kl, kl_weight=kl_weight)
    (whole_grad,) = torch.autograd.grad(whole, theta, retain_graph=True)
    step_mean = kl.detach().mean(dim=0)
    assert_close(step_mean, torch.tensor(STEP_MEAN, dtype=torch.float64), rtol=1e-15, atol=0)
    micro = sum(objective.loss(kl[i:i + 2], step_mean, kl_weight=kl_weight) for i in (0, 2)) / 2
    (micro_grad,) = torch.autograd.grad(micro, theta)
    assert_close(micro, whole, rtol=1e-14, atol=0)
    assert_close(micro_grad, whole_grad, rtol=1e-14, atol=0)
    assert whole_grad[:, 1].abs().sum() == 0 and (whole_grad[:, [0, 2]] != 0).all()


def test_balance_coefficients_hand_computed():
    step_mean = torch.tensor(STEP_MEAN, dtype=torch.float64)
    # (KL_u + 0.01) / alpha_u with alpha = size / smallest size = (1, 2, 4), then divided by their mean
    raw = [1.11 / 1, 0.86 / 2, 4.01 / 4]
    expected = torch.tensor([r / (sum(raw) / 3) for r in raw], dtype=torch.float64)
    gamma = balance_coefficients(step_mean, (1, 2, 4))
    assert_close(gamma, expected, rtol=1e-14, atol=0)
    assert_close(gamma.mean(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-15, atol=0)
    assert not balance_coefficients(step_mean.clone().requires_grad_(True), (1, 2, 4)).requires_grad  # constants
    equal_sizes = balance_coefficients(step_mean, None)
    assert_close(equal_sizes, (step_mean + 0.01) / (step_mean + 0.01).mean(), rtol=1e-15, atol=0)


def test_balancing_applies_only_during_warm_up():
    kl = torch.tensor(KL_UNITS, dtype=torch.float64, requires_grad=True)
    objective = KLObjective(beta=2.0, balance=True, balance_alpha=(1, 2, 4))
    gamma = balance_coefficients(torch.tensor(STEP_MEAN, dtype=torch.float64), (1, 2, 4))
    during = objective.loss(kl, kl_weight=0.5)
    assert_close(during, 0.5 * 2.0 * (gamma * torch.tensor(STEP_MEAN, dtype=torch.float64)).sum(), rtol=1e-14, atol=0)
    during.backward()
    assert_close(kl.grad, (0.5 * 2.0 / 4 * gamma).expand(4, 3), rtol=1e-14, atol=0)  # gamma is a constant
    after = objective.loss(kl, kl_weight=1.0)
    assert_close(after, torch.tensor(2.0 * sum(STEP_MEAN), dtype=torch.float64), rtol=1e-14, atol=0)
    assert objective.needs_step_mean(0.5) and not objective.needs_step_mean(1.0)


@pytest.mark.parametrize("k", [0, -1])
def test_importance_weights_need_at_least_one_sample(k):
    x = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        HierarchicalVAE(tiny()).log_weights(x, k)
    from tests.conftest import tiny_config
    from vqtok import Autoencoder, GaussianConfig
    from vqtok.config import PreprocessConfig

    gaussian = Autoencoder(tiny_config(GaussianConfig(dim=2), in_channels=1, resolution=8, input_range="0,1",
                                       decoder_output="bernoulli_logits", preprocess=PreprocessConfig()))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        gaussian.log_weights(x, k)


def test_spectral_regularisation_is_the_sum_of_largest_singular_values():
    """NVAE's spectral regulariser: spectral_reg x the sum over every convolution of its weight's largest singular
    value, against numpy's SVD in float64; off (0) it adds nothing."""
    model = HierarchicalVAE(tiny(spectral_reg=0.1)).double()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    expected = sum(np.linalg.svd(m.weight.detach().reshape(m.weight.shape[0], -1).numpy(), compute_uv=False)[0]
                   for m in convs)
    assert model.spectral_norm_sum().item() == pytest.approx(expected, rel=1e-6)
    x = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) > 0.5).double()
    out = model(x)  # a fresh model: KL 0, so the regulariser is the spectral term alone
    assert model.regularisation(out).item() == pytest.approx(0.1 * expected, rel=1e-6)
    off = HierarchicalVAE(tiny()).double()
    off.load_state_dict(model.state_dict())
    assert off.regularisation(off(x)).item() == 0.0


def test_kl_balancing_alpha_is_a_groups_size_over_its_scales_groups():
    """NVAE's alpha: with one group of 2x2x2 at the top and two of 4x4x2 below, alpha = (8 / 1, 32 / 2, 32 / 2)."""
    model = HierarchicalVAE(tiny(groups_per_scale=(1, 2)))
    assert model.kl_objective.balance_alpha == (8.0, 16.0, 16.0)
