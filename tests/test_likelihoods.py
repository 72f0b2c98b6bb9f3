"""Discrete likelihoods: the discretized logistic mixture is a proper distribution over the 8-bit grid (against
brute force), and evaluation reports code lengths (bits per dimension, the negative ELBO) for them and for
Bernoulli on binarized MNIST."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

from vqtok.losses import (
    discretized_logistic_mixture_log_prob,
    mixture_channels,
    mixture_mode_image,
    reconstruction_loss,
)

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 8-bit values in [-1, 1]


def random_params(k: int, c: int, seed: int, h: int = 1, w: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(1, mixture_channels(k, c), h, w, generator=g, dtype=torch.float64)
    logits, means, log_scales, coeffs = p.split([k, k * c, k * c, k * c * (c - 1) // 2], dim=1)
    # means over and beyond the range, scales from very sharp (e^-7 is sharper than a bin) to very wide
    return torch.cat([logits * 2, means * 1.5, log_scales * 3 - 2, coeffs * 2], dim=1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3])
def test_the_256_bins_of_one_channel_sum_to_one(seed, k):
    params = random_params(k, 1, seed).expand(256, -1, -1, -1)
    log_p = discretized_logistic_mixture_log_prob(GRID.view(256, 1, 1, 1), params, k)
    assert abs(torch.logsumexp(log_p.flatten(), 0).item()) < 1e-9


def test_the_joint_rgb_bins_sum_to_one_with_channel_coupling():
    k = 2
    params = random_params(k, 3, 0)
    colours = torch.cartesian_prod(GRID, GRID)  # every (green, blue) pair
    total = []
    for reds in GRID.split(16):  # all 256^3 colours, 16 red values at a time, as a 1 x N image
        x = torch.cat([reds.repeat_interleave(len(colours))[None], colours.repeat(len(reds), 1).T])[None, :, None]
        log_p = discretized_logistic_mixture_log_prob(x, params.expand(-1, -1, 1, x.shape[-1]), k)
        total.append(torch.logsumexp(log_p.flatten(), 0))
    assert abs(torch.logsumexp(torch.stack(total), 0).item()) < 1e-9


def test_interior_bins_match_the_logistic_cdf_of_torch_distributions():
    mean, log_scale = 0.1, -3.0
    logistic = TransformedDistribution(Uniform(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
                                       [SigmoidTransform().inv, AffineTransform(mean, math.exp(log_scale))])
    half = 1 / 255
    inside = GRID[(GRID > -0.5) & (GRID < 0.7)]
    expected = torch.log(logistic.cdf(inside + half) - logistic.cdf(inside - half))
    params = torch.tensor([0.0, mean, log_scale], dtype=torch.float64).view(1, 3, 1, 1).expand(len(inside), -1, -1, -1)
    actual = discretized_logistic_mixture_log_prob(inside.view(-1, 1, 1, 1), params, 1).flatten()
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    # the edge bins take the tails: P(x = -1) = CDF(-1 + 1/255), P(x = 1) = 1 - CDF(1 - 1/255)
    edges = discretized_logistic_mixture_log_prob(torch.tensor([-1.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1),
                                                  params[:2], 1).flatten()
    torch.testing.assert_close(edges, torch.log(torch.stack([logistic.cdf(torch.tensor(-1 + half, dtype=torch.float64)),
                                                             1 - logistic.cdf(torch.tensor(1 - half, dtype=torch.float64))])))


def test_a_mixture_weights_its_components_and_couples_channels_as_written():
    k, c = 2, 3
    params = random_params(k, c, 7)
    x = torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.round((x + 1) * 127.5) / 127.5 - 1
    logits, means, log_scales, coeffs = params.flatten().split([k, k * c, k * c, k * 3])
    means, log_scales, coeffs = means.view(k, c), log_scales.view(k, c), torch.tanh(coeffs.view(k, 3))
    v = x.flatten()
    per_component = []
    for j in range(k):
        mu = [means[j, 0], means[j, 1] + coeffs[j, 0] * v[0], means[j, 2] + coeffs[j, 1] * v[0] + coeffs[j, 2] * v[1]]
        one = [discretized_logistic_mixture_log_prob(v[i].view(1, 1, 1, 1), torch.stack(
            [torch.zeros((), dtype=torch.float64), mu[i], log_scales[j, i]]).view(1, 3, 1, 1), 1) for i in range(3)]
        per_component.append(sum(one) + torch.log_softmax(logits, 0)[j])
    expected = torch.logsumexp(torch.stack(per_component).flatten(), 0)
    torch.testing.assert_close(discretized_logistic_mixture_log_prob(x, params, k).flatten()[0], expected)


def test_a_sharp_distribution_on_a_constant_image_costs_almost_no_bits():
    x = torch.full((1, 3, 4, 4), 100 / 127.5 - 1, dtype=torch.float64)
    params = torch.cat([torch.zeros(1, 1, 4, 4), x, torch.full((1, 3, 4, 4), -20.0), torch.zeros(1, 3, 4, 4)], 1).double()
    bits_per_dim = -discretized_logistic_mixture_log_prob(x, params, 1, min_log_scale=-20).sum() / (48 * math.log(2))
    assert 0 <= bits_per_dim.item() < 1e-6
    # PixelCNN++'s default floor on the log-scale (-7) bounds the sharpness: about 0.04 bits per dimension
    floor = -discretized_logistic_mixture_log_prob(x, params, 1).sum() / (48 * math.log(2))
    assert 0.03 < floor.item() < 0.05


def test_extreme_parameters_give_finite_values_and_gradients():
    x = (torch.randint(0, 256, (2, 3, 4, 4)).float() / 127.5) - 1
    for log_scale in (-30.0, 0.0, 30.0):
        params = torch.cat([torch.zeros(2, 1, 4, 4), torch.randn(2, 3, 4, 4) * 3, torch.full((2, 3, 4, 4), log_scale),
                            torch.zeros(2, 3, 4, 4)], 1).requires_grad_()
        loss = reconstruction_loss("logistic_mixture", params, x)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(params.grad).all(), log_scale


def logistic_bin_log_prob(x: float, mean: float, log_scale: float):
    """log P(the 8-bit bin of value x in [-1, 1]) under a logistic(mean, e^log_scale), in mpmath at the working
    precision: each mass a difference of CDFs on the mean's near side (of survival functions above it), so that
    nothing cancels. The bin is x +- 1/255, the lowest and highest take the tails."""
    import mpmath  # installed with torch (through sympy)

    sigmoid = lambda t: 1 / (1 + mpmath.exp(-t))  # noqa: E731
    scale, half = mpmath.exp(log_scale), mpmath.mpf(1) / 255
    centered = mpmath.mpf(x) - mean
    upper, lower = (centered + half) / scale, (centered - half) / scale
    if x < -1 + half:
        return mpmath.log(sigmoid(upper))
    if x > 1 - half:
        return mpmath.log(sigmoid(-lower))
    if centered > 0:
        return mpmath.log(sigmoid(-lower) - sigmoid(-upper))
    return mpmath.log(sigmoid(upper) - sigmoid(lower))


@pytest.mark.parametrize("mean", [-0.9, 0.0, 0.47])
def test_float32_bin_masses_match_a_high_precision_reference_from_sharp_to_very_wide(mean):
    """In float32, at log-scales -7 to 16: sharp scales put bins in the far tails (log p near -2000), wide ones make
    each bin's mass a tiny difference of two near-equal CDFs, which the difference of the two rounded edges loses.
    Against 60-digit values of the same float32 inputs: within float32 resolution, and the gradient (finite,
    non-zero) within 1e-5 of mpmath's derivative."""
    import mpmath

    bins = [0, 1, 2, 37, 100, 127, 128, 129, 200, 253, 254, 255]
    x = (torch.tensor(bins, dtype=torch.float32) / 127.5 - 1).view(-1, 1, 1, 1)
    mean = float(torch.tensor(mean, dtype=torch.float32))
    with mpmath.workdps(60):
        for log_scale in range(-7, 17):
            params = torch.tensor([0.0, mean, float(log_scale)]).view(1, 3, 1, 1).repeat(len(bins), 1, 1, 1)
            params.requires_grad_()
            log_p = discretized_logistic_mixture_log_prob(x, params, 1, min_log_scale=-8).flatten()
            log_p.sum().backward()
            expected = torch.tensor([float(logistic_bin_log_prob(v, mean, log_scale)) for v in x.flatten().tolist()],
                                    dtype=torch.float64)
            message = lambda m: f"log-scale {log_scale}: {m}"  # noqa: E731
            torch.testing.assert_close(log_p.double(), expected, rtol=5e-7, atol=5e-6, msg=message)
            if log_scale in (-6, 0, 9, 13, 16):
                gradient = params.grad[:, 1:].flatten(1).double()  # d/d mean, d/d log-scale, per bin
                reference = torch.tensor([[float(mpmath.diff(lambda m: logistic_bin_log_prob(v, m, log_scale), mean)),
                                           float(mpmath.diff(lambda s: logistic_bin_log_prob(v, mean, s), log_scale))]
                                          for v in x.flatten().tolist()], dtype=torch.float64)
                torch.testing.assert_close(gradient, reference, rtol=1e-5, atol=1e-5, msg=message)
                assert (gradient[:, 1] != 0).all(), log_scale  # inside, at wide scales, d/d log-scale is -1


def test_the_loss_and_the_mode_image():
    k, c = 3, 3
    params = random_params(k, c, 3, h=4, w=5).float().repeat(2, 1, 1, 1)
    x = (torch.randint(0, 256, (2, 3, 4, 5)).float() / 127.5) - 1
    loss = reconstruction_loss("logistic_mixture", params, x)
    torch.testing.assert_close(loss, -discretized_logistic_mixture_log_prob(x, params, k).sum() / 2)
    image = mixture_mode_image(params, k, c)
    assert image.shape == (2, 3, 4, 5) and image.min() >= -1 and image.max() <= 1
    with pytest.raises(ValueError, match="needs 30 parameter channels"):
        discretized_logistic_mixture_log_prob(x, params[:, :29], k)


# ---- in the tokenizer -------------------------------------------------------------------------------------------------


def test_config_contradictions_raise():
    from vqtok.config import AutoencoderConfig, ConfigError, GaussianConfig, TrainConfig

    with pytest.raises(ConfigError, match="num_mixtures is set for, and only for"):
        AutoencoderConfig(num_mixtures=5)
    with pytest.raises(ConfigError, match="num_mixtures is set for, and only for"):
        AutoencoderConfig(decoder_output="logistic_mixture")
    with pytest.raises(ConfigError, match="set input_range to '-1,1'"):
        AutoencoderConfig(decoder_output="logistic_mixture", num_mixtures=5, input_range="0,1")
    with pytest.raises(ConfigError, match="go together"):
        TrainConfig(model=AutoencoderConfig(decoder_output="logistic_mixture", num_mixtures=5), loss="mse")
    TrainConfig(model=AutoencoderConfig(bottleneck=GaussianConfig(), decoder_output="logistic_mixture",
                                        num_mixtures=5), loss="logistic_mixture")


def test_a_gaussian_tokenizer_with_a_mixture_reports_its_negative_elbo_in_bits_per_dim(tmp_path):
    from tests.scripts.common import tiny_train_config
    from vqtok.config import GaussianConfig
    from vqtok.data import build_dataset
    from vqtok.train import evaluate, train

    base = tiny_train_config(str(tmp_path / "run"))
    model = base.model.__class__(**{**base.model.__dict__, "bottleneck": GaussianConfig(dim=4),
                                    "decoder_output": "logistic_mixture", "num_mixtures": 2})
    config = base.__class__(**{**base.__dict__, "model": model, "loss": "logistic_mixture", "max_steps": 3})
    folder = train(config)
    import vqtok

    tok = vqtok.load(folder)
    assert tok.decoder.conv_out.out_channels == mixture_channels(2, 1) == 6
    dataset = build_dataset(config.data, channels=1, preprocess=model.preprocess, size=model.resolution)
    metrics = evaluate(tok, dataset, limit=32)
    images = torch.stack([dataset[i][0] for i in range(32)])
    x = tok.preprocess(images)
    terms = tok.code_length(x, torch.Generator().manual_seed(0))
    expected = (terms["nll"] + terms["kl"]).sum() / (32 * 256 * math.log(2))  # the same posterior draws
    torch.testing.assert_close(torch.tensor(metrics["neg_elbo_bits_per_dim"]), expected.float(), rtol=1e-4, atol=0)
    assert 0 < metrics["nll_bits_per_dim"] < metrics["neg_elbo_bits_per_dim"] < 8
    assert tok.to_image(tok(x).reconstruction).abs().max() <= 1


def test_binarized_mnist_amat_files_and_the_bernoulli_code_length(tmp_path):
    import gzip

    from tests.scripts.common import tiny_train_config
    from vqtok import Autoencoder
    from vqtok.cli import parse_data_spec
    from vqtok.config import AutoencoderConfig, DataConfig, GaussianConfig, PreprocessConfig
    from vqtok.data import build_dataset
    from vqtok.data.sources import read_amat
    from vqtok.train import evaluate

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 2, (20, 16 * 16), generator=g)
    path = tmp_path / "tiny.amat.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(" ".join(str(int(v)) for v in row) + "\n" for row in pixels)
    images = read_amat(path)
    assert images.shape == (20, 16, 16) and np.array_equal(images.reshape(20, -1) // 255, pixels.numpy())
    assert parse_data_spec(f"amat:{path}") == DataConfig(source="amat", path=str(path))
    bad = tmp_path / "bad.amat"
    bad.write_text("0 1 1 0\n0 1 2 0\n")
    with pytest.raises(ValueError, match="line 2 is not 2x2 binary pixels"):
        read_amat(bad)

    base = tiny_train_config(str(tmp_path / "run")).model
    config = AutoencoderConfig(**{**base.__dict__, "bottleneck": GaussianConfig(dim=2), "input_range": "0,1",
                                  "decoder_output": "bernoulli_logits", "preprocess": PreprocessConfig()})
    torch.manual_seed(0)
    model = Autoencoder(config).eval()
    dataset = build_dataset(DataConfig(source="amat", path=str(path)), channels=1, preprocess=config.preprocess, size=16)
    metrics = evaluate(model, dataset)
    x = torch.stack([dataset[i][0] for i in range(20)]).float() / 255
    terms = model.code_length(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.tensor(metrics["neg_elbo_nats"]),
                               (terms["nll"] + terms["kl"]).mean().float(), rtol=1e-5, atol=0)
    # grey images: a Bernoulli likelihood of them is no code length, so no bits per dimension are reported
    grey = build_dataset(DataConfig(source="digits", limit=20), channels=1, preprocess=PreprocessConfig(resize=16), size=16)
    assert "neg_elbo_bits_per_dim" not in evaluate(model, grey)


def test_the_negative_elbo_uses_beta_1_and_the_unclamped_kl_whatever_the_objective():
    """A Gaussian tokenizer whose objective has beta 0.3 and free bits of 3 nats: evaluation's negative ELBO is
    still -log p(x | z) + KL(q || N(0, I)) in full, against torch.distributions (the same posterior draws)."""
    from torch.distributions import Bernoulli, Normal, kl_divergence
    from torch.utils.data import TensorDataset

    from tests.scripts.common import tiny_train_config
    from vqtok import Autoencoder
    from vqtok.config import AutoencoderConfig, GaussianConfig, PreprocessConfig
    from vqtok.train import evaluate

    base = tiny_train_config("unused").model
    config = AutoencoderConfig(**{**base.__dict__, "bottleneck": GaussianConfig(dim=2, beta=0.3, free_bits=3.0),
                                  "input_range": "0,1", "decoder_output": "bernoulli_logits",
                                  "preprocess": PreprocessConfig()})
    torch.manual_seed(0)
    model = Autoencoder(config).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 2, (12, 1, 16, 16), generator=g, dtype=torch.uint8) * 255
    metrics = evaluate(model, TensorDataset(images, torch.zeros(12)), batch_size=12)

    x = images.float() / 255
    with torch.no_grad():
        posterior = model.encode(x)
        q = Normal(posterior.mean, posterior.std)
        kl = kl_divergence(q, Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))  # evaluate's draws
        z = posterior.mean + posterior.std * eps
        logits = model.decoder(model.post_quant_conv(z))
        nll = -Bernoulli(logits=logits).log_prob(x).sum(dim=(1, 2, 3))
        objective = model.bottleneck(model.quant_conv(model.encoder(x))).loss  # beta x the clamped KL
    assert abs(objective.item() - kl.mean().item()) > 10  # the training objective's KL term is another figure
    torch.testing.assert_close(torch.tensor(metrics["kl_nats_per_image"]), kl.mean().float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(metrics["neg_elbo_nats"]), (nll + kl).mean().float(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(metrics["neg_elbo_bits_per_dim"]),
                               ((nll + kl).sum() / (12 * 256 * math.log(2))).float(), rtol=1e-5, atol=0)
