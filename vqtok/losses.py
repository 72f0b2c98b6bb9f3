"""Training objectives: reconstruction likelihoods and the adversarial terms of the VQGAN recipe (the KL objective is
bottleneck/kl.py's; the learning-rate and KL schedules are train/schedules.py's)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import reduce

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


DISCRETE_LIKELIHOODS = {"bernoulli_logits": "bernoulli", "logistic_mixture": "logistic_mixture"}  # output -> loss


def reconstruction_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reconstruction term of the objective, computed in float32.

    'mse' and 'l1' are means over pixels (the VQ-VAE/VQGAN convention). 'gaussian' (unit variance), 'bernoulli'
    (output = logits, target in [0, 1]) and 'logistic_mixture' (output = mixture parameters, target 8-bit values in
    [-1, 1]) are negative log-likelihoods in nats per image, summed over pixels and averaged over the batch, so that
    adding a KL in nats per image gives the negative ELBO (a code length for the discrete ones).
    """
    if kind == "mse":
        return F.mse_loss(output.float(), target.float())
    if kind == "l1":
        return F.l1_loss(output.float(), target.float())
    return nll_per_image(kind, output, target).mean()


def nll_per_image(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(target | decoder output) in nats per image [B] for the likelihoods 'gaussian', 'bernoulli' and
    'logistic_mixture', in float32 (float64 stays float64)."""
    if kind == "logistic_mixture":  # output: the mixture's parameters; target: 8-bit values in [-1, 1]
        k = output.shape[1] // mixture_channels(1, target.shape[1])
        nll = -discretized_logistic_mixture_log_prob(target, output, k)
    else:
        dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
        output, target = output.to(dtype), target.to(dtype)
        if kind == "gaussian":
            nll = 0.5 * (output - target).pow(2) + HALF_LOG_2PI
        elif kind == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        else:
            raise ValueError(f"unknown reconstruction loss {kind!r}")
    return reduce(nll, "b ... -> b", "sum")


def mixture_channels(num_mixtures: int, channels: int) -> int:
    """Decoder output channels of a discretized logistic mixture: per component a logit, and per image channel a
    mean and a log-scale, plus the C(C-1)/2 coefficients that let a channel's mean depend on the earlier channels
    (PixelCNN++: green on red, blue on red and green)."""
    return num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def discretized_logistic_mixture_log_prob(
    x: torch.Tensor, params: torch.Tensor, num_mixtures: int, *, bins: int = 256, min_log_scale: float = -7.0
) -> torch.Tensor:
    """log p(x) per pixel [B, H, W] (channels jointly) of 8-bit values x [B, C, H, W] in [-1, 1] (on the grid
    2k/(bins-1) - 1) under a mixture of discretized logistics (Salimans et al. 2017, PixelCNN++).

    Each value owns the interval of width 2/(bins-1) around it; the lowest and highest values own everything below
    and above, so the bins of any parameters sum to 1 and -log p is a code length in nats. Every bin's mass is
    computed exactly, with no density approximation in the tails and none for wide scales: in float32 within 5e-6
    nats + 5e-7 |log p| of a 60-digit reference at log-scales -7 to 16, with its gradients (tests/test_likelihoods).
    Computed in float32 (float64 stays float64). `params` [B, mixture_channels(K, C), H, W] holds, in order: K
    logits, K*C means, K*C log-scales (clamped below at `min_log_scale`), K*C(C-1)/2 coefficients (tanh-squashed).
    """
    dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
    x, params = x.to(dtype), params.to(dtype)
    k, c = num_mixtures, x.shape[1]
    if params.shape[1] != mixture_channels(k, c):
        raise ValueError(f"a {k}-component mixture over {c} channels needs {mixture_channels(k, c)} parameter "
                         f"channels, got {params.shape[1]}")
    n_coeff = c * (c - 1) // 2
    logits, means, log_scales, coeffs = params.split([k, k * c, k * c, k * n_coeff], dim=1)
    means = means.unflatten(1, (k, c))  # [B, K, C, H, W]
    log_scales = log_scales.unflatten(1, (k, c)).clamp_min(min_log_scale)
    coeffs = torch.tanh(coeffs.unflatten(1, (k, n_coeff))) if n_coeff else None
    x = x.unsqueeze(1)  # [B, 1, C, H, W]
    if coeffs is not None:  # channel j's mean shifts by a coefficient times each earlier channel's value
        shifted, index = [means[:, :, 0]], 0
        for j in range(1, c):
            shift = sum(coeffs[:, :, index + i] * x[:, :, i] for i in range(j))
            shifted.append(means[:, :, j] + shift)
            index += j
        means = torch.stack(shifted, dim=2)
    half_bin = 1.0 / (bins - 1)
    centered = x - means
    inv_scale = torch.exp(-log_scales)
    upper = inv_scale * (centered + half_bin)
    lower = inv_scale * (centered - half_bin)
    log_cdf_upper = F.logsigmoid(upper)  # the lowest bin's mass: everything below its upper edge
    log_sf_lower = F.logsigmoid(-lower)  # the highest bin's mass: everything above its lower edge
    # An interior bin: sigmoid(upper) - sigmoid(lower) = sigmoid(upper) sigmoid(-lower) (1 - e^-(upper - lower)),
    # exact in both tails and for wide scales, where upper - lower = bin width / scale is formed from the log-scale
    # (the difference of the two rounded edges loses it; PixelCNN++ falls back to density x width in the tails).
    log_width = math.log(2 * half_bin) - log_scales  # log(upper - lower)
    log_mass = log_cdf_upper + log_sf_lower + _log1mexp(log_width)
    edge = 1 - half_bin  # values beyond this are the extreme bins
    log_p = torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, log_mass))
    log_p = log_p.sum(dim=2) + torch.log_softmax(logits, dim=1)  # channels jointly, then the component weight
    return torch.logsumexp(log_p, dim=1)


def _log1mexp(log_w: torch.Tensor) -> torch.Tensor:
    """log(1 - e^-w) for w = e^log_w > 0, accurate for every w (Maechler 2012): log w - w/2 where w is tiny (also
    where e^log_w underflows), log(-expm1(-w)) up to w = log 2, log1p(-e^-w) above. Every branch is kept finite, or
    where() would pass NaN gradients."""
    w = torch.exp(log_w)
    tiny, near = log_w < -20, w < math.log(2)  # below e^-20 the next term, w^2/24, is under 1e-18
    series = log_w - w / 2
    small = torch.log(-torch.expm1(-w.clamp(math.exp(-20), math.log(2))))
    large = torch.log1p(-torch.exp(-w.clamp_min(math.log(2))))
    return torch.where(tiny, series, torch.where(near, small, large))


def mixture_mode_image(params: torch.Tensor, num_mixtures: int, channels: int) -> torch.Tensor:
    """A point image [B, C, H, W] in [-1, 1] from mixture parameters: each pixel's most probable component, its
    means coupled through its coefficients (the centre of that component; sampling would add logistic noise)."""
    k, c = num_mixtures, channels
    n_coeff = c * (c - 1) // 2
    logits, means, _, coeffs = params.float().split([k, k * c, k * c, k * n_coeff], dim=1)
    best = logits.argmax(dim=1, keepdim=True)  # [B, 1, H, W]
    pick = lambda t, per: t.unflatten(1, (k, per)).gather(1, best[:, :, None].expand(-1, 1, per, -1, -1))[:, 0]  # noqa: E731
    mean = pick(means, c)
    if n_coeff:
        coeff = torch.tanh(pick(coeffs, n_coeff))
        out, index = [mean[:, 0].clamp(-1, 1)], 0
        for j in range(1, c):
            out.append((mean[:, j] + sum(coeff[:, index + i] * out[i] for i in range(j))).clamp(-1, 1))
            index += j
        mean = torch.stack(out, dim=1)
    return mean.clamp(-1, 1)


def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss on real and reconstructed patch logits: 'hinge' (mean relu(1 - D(x)) + mean
    relu(1 + D(x_hat)), halved as in taming) or 'non_saturating' (the cross-entropy of the original GAN,
    softplus(-D(x)) + softplus(D(x_hat)), halved)."""
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise ValueError(f"unknown adversarial loss {kind!r}")


def generator_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """The tokenizer's adversarial term on its reconstructions' patch logits: -mean D(x_hat) with the hinge loss
    (taming), softplus(-D(x_hat)) (the non-saturating loss) otherwise."""
    if kind == "hinge":
        return -logits_fake.float().mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake.float()).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}")


def adaptive_gan_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor, *,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance (Esser et al. 2021, eq. 7): ||grad_w L_rec|| / (||grad_w L_G|| + 1e-4) at the decoder's last
    layer w, clamped to [0, max_weight] and detached, so that the adversarial gradient reaching the decoder stays
    in proportion to the reconstruction's whatever their scales. Keeps both graphs for the backward that follows."""
    g_rec, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    g_adv, = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    dtype = torch.promote_types(g_rec.dtype, torch.float32)  # float32 at least (the norms of bf16 gradients)
    ratio = torch.linalg.vector_norm(g_rec, dtype=dtype) / (torch.linalg.vector_norm(g_adv, dtype=dtype) + 1e-4)
    return ratio.clamp(0.0, max_weight).detach()
