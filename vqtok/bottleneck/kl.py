"""The KL divergence between diagonal Gaussians, written once, and the KL objective built on it.

KL(N(mu_q, var_q) || N(mu_p, var_p)) per element is 0.5 ((mu_q - mu_p)^2 / var_p + r - 1 - log r), r = var_q / var_p.
The single Gaussian bottleneck uses it with p = N(0, I); every latent group of the hierarchical VAE with its learned
prior p(z_l | z_<l). Computed from log-variances as 0.5 ((mu_q - mu_p)^2 e^-lv_p + expm1(d) - d), d = lv_q - lv_p,
in at least float32: near the prior, r - 1 - log r cancels catastrophically in bf16 (11% low, with negative values).

`KLObjective` turns per-unit KLs into the training regulariser: beta x sum over units, where a unit is a latent
element (single Gaussian) or a latent group (hierarchical). Free bits (Kingma et al. 2016) hold each unit's KL at a
floor: sum_u max(lambda, KL_u), KL_u averaged over the optimizer step's whole batch, so no unit is pushed below lambda
nats. The floor needs that average before any backward: the training loop computes it (over every micro-batch and
process) and passes it as `step_mean`; without it the batch at hand is the step's batch (a plain loop). NVAE's KL
balancing (Vahdat & Kautz 2020) weights the units during KL warm-up by gamma_u proportional to their own average KL
(plus 0.01) over alpha_u, normalised to mean 1, so that no group is switched off while the KL weight is small; NVAE's
alpha is a group's size over the number of groups at its scale.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def gaussian_kl(mean_q: torch.Tensor, logvar_q: torch.Tensor, mean_p: torch.Tensor | None = None,
                logvar_p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q || p) per element in nats for diagonal Gaussians given by means and log-variances (p = N(0, I) when its
    parameters are None), broadcast, in float32 (float64 stays float64)."""
    dtype = torch.promote_types(mean_q.dtype, torch.float32)
    mean_q, logvar_q = mean_q.to(dtype), logvar_q.to(dtype)
    if mean_p is None:
        mean_p = torch.zeros((), dtype=dtype, device=mean_q.device)
    if logvar_p is None:
        logvar_p = torch.zeros((), dtype=dtype, device=mean_q.device)
    mean_p, logvar_p = mean_p.to(dtype), logvar_p.to(dtype)
    d = logvar_q - logvar_p
    return 0.5 * ((mean_q - mean_p).pow(2) * torch.exp(-logvar_p) + torch.expm1(d) - d)


@dataclass(frozen=True)
class KLObjective:
    """beta x the free-bits KL over units, optionally KL-balanced during warm-up (see the module docstring).

    `balance_alpha` are KL balancing's alpha_u (relative; NVAE: a group's size over the groups at its scale); None
    gives every unit the same.
    """

    beta: float = 1.0
    free_bits: float = 0.0
    balance: bool = False
    balance_alpha: tuple[float, ...] | None = None

    def needs_step_mean(self, kl_weight: float) -> bool:
        """Whether the loss depends on the step's average KL per unit (not only on each image's KL)."""
        return self.free_bits > 0 or self.balancing(kl_weight)

    def balancing(self, kl_weight: float) -> bool:
        return self.balance and kl_weight < 1.0

    def loss(self, kl_units: torch.Tensor, step_mean: torch.Tensor | None = None, *,
             kl_weight: float = 1.0) -> torch.Tensor:
        """The regulariser of a (micro-)batch, kl_weight x beta x sum_u gamma_u max(lambda, KL_u), from the KL per
        image and unit `kl_units` [B, U] (differentiable) and the step's average KL per unit `step_mean` [U] (None:
        this batch's). With micro-batches of equal size, their losses averaged are the step's loss exactly, and so
        are their gradients: a floored unit gets none in any micro-batch."""
        batch_mean = kl_units.mean(dim=0)
        step_mean = batch_mean.detach() if step_mean is None else step_mean.to(batch_mean)
        per_unit = batch_mean
        if self.free_bits > 0:
            per_unit = torch.where(step_mean > self.free_bits, batch_mean,
                                   torch.full_like(batch_mean, self.free_bits))
        if self.balancing(kl_weight):
            per_unit = per_unit * balance_coefficients(step_mean, self.balance_alpha)
        return kl_weight * self.beta * per_unit.sum()


def balance_coefficients(step_mean: torch.Tensor, alpha: tuple[float, ...] | None) -> torch.Tensor:
    """NVAE's KL balancing coefficients gamma_u = (|KL_u| + 0.01) / alpha_u, normalised to mean 1 (detached), alpha
    relative to its smallest entry (None: all 1): a large group's KL is larger for its size alone."""
    step_mean = step_mean.detach()
    if alpha is None:
        alpha = torch.ones_like(step_mean)
    else:
        alpha = _relative_alpha(tuple(alpha), step_mean.dtype, step_mean.device)
    gamma = (step_mean.abs() + 0.01) / alpha
    return gamma / gamma.mean()


@functools.lru_cache(maxsize=16)
def _relative_alpha(alpha: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """alpha / min(alpha) as a tensor on `device`, made once: a copy from host memory on every micro-batch would make
    a GPU training step wait for the device."""
    alpha_tensor = torch.tensor(alpha, dtype=dtype, device=device)
    return alpha_tensor / alpha_tensor.min()
