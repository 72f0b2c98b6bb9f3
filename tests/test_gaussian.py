"""The Gaussian bottleneck against independent references: torch.distributions, analytic gradients, hand cases."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vqtok.bottleneck import DiagonalGaussian, GaussianBottleneck
from vqtok.config import GaussianConfig


def test_kl_matches_torch_distributions_per_dimension():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * 3
    ours = DiagonalGaussian(mean, logvar).kl()
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mean), 1.0))
    assert ours.shape == mean.shape
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_reparameterized_gradient_matches_analytic():
    # E[z^2] = mu^2 + sigma^2 for z ~ N(mu, sigma^2): d/dmu = 2 mu, d/dlogvar = sigma^2.
    torch.manual_seed(0)
    mu = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([-0.4, 0.9], dtype=torch.float64, requires_grad=True)
    n = 400_000
    posterior = DiagonalGaussian(mu[None, :, None, None].expand(n, 2, 1, 1), logvar[None, :, None, None].expand(n, 2, 1, 1))
    z = posterior.sample()
    z.pow(2).mean(0).sum().backward()
    sigma2 = logvar.detach().exp()
    torch.testing.assert_close(mu.grad, 2 * mu.detach(), rtol=0, atol=0.02)
    torch.testing.assert_close(logvar.grad, sigma2, rtol=0, atol=0.03)


def test_sample_moments_and_mode():
    mean = torch.full((20000, 1, 1, 1), 1.5)
    logvar = torch.full((20000, 1, 1, 1), float(torch.log(torch.tensor(0.25))))
    posterior = DiagonalGaussian(mean, logvar)
    z = posterior.sample(generator=torch.Generator().manual_seed(1))
    assert abs(z.mean().item() - 1.5) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    assert torch.equal(posterior.mode(), mean)


def test_loss_is_beta_times_kl_per_image():
    h = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(2))
    mean, logvar = h.chunk(2, dim=1)
    expected_kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean()
    out = GaussianBottleneck(GaussianConfig(dim=3, beta=0.3))(h)
    torch.testing.assert_close(out.terms["kl"], expected_kl)
    torch.testing.assert_close(out.loss, 0.3 * expected_kl)


def test_free_bits_hand_computed():
    # Two latent elements, batch of 2. Element KLs: e0 = [0.2, 1.6] nats, e1 = [2.0, 4.0] nats (per image).
    # kl(mu) = mu^2 / 2 with logvar = 0, so mu = sqrt(2 * kl).
    kls = torch.tensor([[0.2, 2.0], [1.6, 4.0]])
    mean = (2 * kls).sqrt().reshape(2, 2, 1, 1)
    h = torch.cat([mean, torch.zeros_like(mean)], dim=1)
    out = GaussianBottleneck(GaussianConfig(dim=2, free_bits=1.0))(h)
    # Free bits apply to each element's batch mean: e0 = 0.9 -> clamped to 1.0; e1 = 3.0 -> kept. Loss = 4.0.
    # (Clamping each image's elements instead would give ((1.0 + 2.0) + (1.6 + 4.0)) / 2 = 4.3.)
    torch.testing.assert_close(out.loss, torch.tensor(4.0))
    torch.testing.assert_close(out.terms["kl"], torch.tensor((2.2 + 5.6) / 2))  # reported unclamped
    # The clamped element gets no gradient in either image, also in the second, whose own 1.6 nats are above the
    # floor: free bits stop the push below the floor of the batch mean.
    mean = mean.clone().requires_grad_(True)
    GaussianBottleneck(GaussianConfig(dim=2, free_bits=1.0))(torch.cat([mean, torch.zeros_like(mean)], 1)).loss.backward()
    assert mean.grad[:, 0].abs().sum() == 0 and (mean.grad[:, 1] != 0).all()


def test_train_samples_eval_uses_mean():
    layer = GaussianBottleneck(GaussianConfig(dim=2))
    h = torch.randn(2, 4, 3, 3)
    assert torch.equal(layer.eval()(h).z, h[:, :2])
    assert not torch.equal(layer.train()(h).z, h[:, :2])


def test_wrong_feature_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects features \[B, 4, h, w\]"):
        GaussianBottleneck(GaussianConfig(dim=2))(torch.randn(1, 3, 2, 2))


def test_kl_under_bf16_autocast_matches_float64():
    """Near the prior the KL is a small difference of large terms: it must not be computed in bf16."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(4, 8, 8, 8, generator=g) * 0.05).bfloat16()
    reference = DiagonalGaussian(*h.double().chunk(2, dim=1)).kl()
    layer = GaussianBottleneck(GaussianConfig(dim=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = layer.encode(h).kl()
        out = layer(h)
    assert kl.dtype == torch.float32 and (kl >= 0).all()
    torch.testing.assert_close(kl.double(), reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.terms["kl"].double(), reference.sum(dim=(1, 2, 3)).mean(), rtol=1e-4, atol=1e-5)
