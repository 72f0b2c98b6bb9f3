"""The Gaussian bottleneck of a VAE: q(z|x) = N(mu, diag sigma^2), reparameterized, with a closed-form KL to N(0, I).

For one latent element, KL(N(mu, sigma^2) || N(0, 1)) = 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2). The loss is the KL
summed over the latent grid and averaged over the batch (nats per image, the scale of a summed reconstruction
log-likelihood), times beta. Free bits (Kingma et al. 2016) apply per latent element to the batch average:
sum_i max(lambda, E_batch KL_i), so no element is pushed below lambda nats while the reported 'kl' stays unclamped.
"""

from __future__ import annotations

import torch
from einops import reduce

from vqtok.bottleneck.base import Bottleneck, BottleneckOutput
from vqtok.config import GaussianConfig

LOGVAR_RANGE = (-30.0, 20.0)  # as diffusers: keeps exp(logvar) finite in float32 and bf16


class DiagonalGaussian:
    """A diagonal Gaussian over latents [B, C, h, w] with `.sample()`, `.mode()` and `.kl()` (to N(0, I))."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split features [B, 2C, h, w] into mean and log-variance halves."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized sample mu + sigma * eps, differentiable in mu and sigma."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per latent element, in nats, float32 (or float64), same shape as the mean.

        Computed as 0.5 (mu^2 + expm1(logvar) - logvar) in at least float32: in bf16, exp(lv) - 1 - lv cancels
        catastrophically near the prior (11% low, with negative elements, in a near-prior case).
        """
        dtype = torch.promote_types(self.mean.dtype, torch.float32)
        mean, logvar = self.mean.to(dtype), self.logvar.to(dtype)
        return 0.5 * (mean.pow(2) + torch.expm1(logvar) - logvar)


class GaussianBottleneck(Bottleneck):
    """Takes 2 * dim channels (mean and log-variance), gives dim channels: a sample in training, the mean in eval."""

    def __init__(self, config: GaussianConfig):
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.in_channels = 2 * config.dim

    def forward(self, h: torch.Tensor) -> BottleneckOutput:
        posterior = self.encode(h)
        z = posterior.sample() if self.training else posterior.mode()
        kl = posterior.kl()
        kl_per_image = reduce(kl, "b c h w -> b", "sum").mean()
        if self.config.free_bits > 0:
            per_element = reduce(kl, "b c h w -> c h w", "mean")
            regulariser = per_element.clamp_min(self.config.free_bits).sum()
        else:
            regulariser = kl_per_image
        stats = {
            "kl_per_element": kl.detach().mean(),
            "posterior_std": posterior.std.detach().float().mean(),
        }
        return BottleneckOutput(
            z=z,
            loss=self.config.beta * regulariser,
            terms={"kl": kl_per_image},
            stats=stats,
            posterior=posterior,
        )

    def encode(self, h: torch.Tensor) -> DiagonalGaussian:
        self.check_features(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(latents) or not latents.is_floating_point():
            raise TypeError(f"Gaussian latents must be a float tensor, got {type(latents).__name__}")
        if latents.ndim != 4 or latents.shape[1] != self.dim:
            raise ValueError(f"expected latents [B, {self.dim}, h, w], got {tuple(latents.shape)}")
        return latents
