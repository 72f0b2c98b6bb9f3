"""The Gaussian bottleneck of a VAE: q(z|x) = N(mu, diag sigma^2), reparameterized, with a closed-form KL to N(0, I).

For one latent element, KL(N(mu, sigma^2) || N(0, 1)) = 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2) (`kl.gaussian_kl`,
shared with the hierarchical VAE's groups). The loss is the KL summed over the latent grid and averaged over the batch
(nats per image, the scale of a summed reconstruction log-likelihood), times beta. Free bits (Kingma et al. 2016)
apply per latent element to the average over the batch: sum_i max(lambda, E_batch KL_i), so no element is pushed
below lambda nats while the reported 'kl' stays unclamped. The forward's own `loss` takes the batch it is given as the
batch; `vqtok train` applies the floor to the optimizer step's whole batch instead (over micro-batches and processes)
through `kl_units` and `kl_objective` (see kl.KLObjective).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch

from vqtok.bottleneck.base import Bottleneck, BottleneckOutput
from vqtok.bottleneck.kl import KLObjective, gaussian_kl
from vqtok.config import GaussianConfig
from vqtok.seeds import keyed_seed

LOGVAR_RANGE = (-30.0, 20.0)  # as diffusers: keeps exp(logvar) finite in float32 and bf16
LOG_2PI = math.log(2 * math.pi)
Noise = Union[torch.Generator, Sequence[torch.Generator], None]  # see DiagonalGaussian.sample


NOISE_KEY = 2  # distinguishes these streams from the loop's other per-image draws (flips, binarization)


def image_noise(seed: int, step: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, step, image index): posterior samples that are the same whatever
    the micro-batch, process or resume point an image is drawn in. `indices`: Python ints (the training loop's; a
    tensor's entries would each be read on the host)."""
    return [torch.Generator().manual_seed(keyed_seed(seed, step, int(i), NOISE_KEY)) for i in indices]


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: on CUDA copied from pinned memory, asynchronously."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class DiagonalGaussian:
    """A diagonal Gaussian over latents [B, C, h, w] with `.sample()`, `.mode()`, `.kl()` (to N(0, I) or to another
    diagonal Gaussian) and `.log_prob(z)`."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split features [B, 2C, h, w] into mean and log-variance halves."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: Noise = None, temperature: float = 1.0) -> torch.Tensor:
        """Reparameterized sample mu + t sigma eps, differentiable in mu and sigma (t: the temperature).

        `generator`: one torch.Generator for the batch, or one per image (a list, CPU generators), which makes each
        image's noise independent of the batch it is in (the training loop's, keyed by image: see `image_noise`)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {self.mean.shape[0]}")
            eps = to_device(torch.stack([torch.randn(self.mean.shape[1:], generator=g, dtype=self.mean.dtype)
                                         for g in generator]), self.mean.device)
        else:  # drawn where the generator lives (a CPU generator gives the same samples on every device)
            device = generator.device if generator is not None else self.mean.device
            eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
            eps = eps.to(self.mean.device)
        return self.mean + (self.std * temperature if temperature != 1.0 else self.std) * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) per latent element in nats (other None: N(0, I)), float32 (or float64), same shape as
        the mean (see kl.gaussian_kl)."""
        if other is None:
            return gaussian_kl(self.mean, self.logvar)
        return gaussian_kl(self.mean, self.logvar, other.mean, other.logvar)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; mu, sigma^2) per element, in float32 (float64 stays float64)."""
        dtype = torch.promote_types(self.mean.dtype, torch.float32)
        mean, logvar, z = self.mean.to(dtype), self.logvar.to(dtype), z.to(dtype)
        return -0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI)


class GaussianBottleneck(Bottleneck):
    """Takes 2 * dim channels (mean and log-variance), gives dim channels: a sample in training, the mean in eval."""

    def __init__(self, config: GaussianConfig):
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.in_channels = 2 * config.dim
        self.kl_objective = KLObjective(beta=config.beta, free_bits=config.free_bits)

    def forward(self, h: torch.Tensor, generator: Noise = None) -> BottleneckOutput:
        """A sample of the posterior in training (drawn with `generator`, see DiagonalGaussian.sample), its mean in
        evaluation."""
        posterior = self.encode(h)
        z = posterior.sample(generator) if self.training else posterior.mode()
        kl = posterior.kl()
        kl_units = kl.flatten(1)  # free bits' units: the latent elements
        stats = {
            "kl_per_element": kl.detach().mean(),
            "posterior_std": posterior.std.detach().float().mean(),
        }
        return BottleneckOutput(
            z=z,
            loss=self.kl_objective.loss(kl_units),
            terms={"kl": kl_units.sum(dim=1).mean()},
            stats=stats,
            posterior=posterior,
            kl_units=kl_units,
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
