"""Training objectives: reconstruction likelihoods and the KL weight schedules against posterior collapse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import reduce

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def reconstruction_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reconstruction term of the objective, computed in float32.

    'mse' and 'l1' are means over pixels (the VQ-VAE/VQGAN convention). 'gaussian' (unit variance) and 'bernoulli'
    (output = logits, target in [0, 1]) are negative log-likelihoods in nats per image, summed over pixels and
    averaged over the batch, so that adding a KL in nats per image gives the negative ELBO.
    """
    output, target = output.float(), target.float()
    if kind == "mse":
        return F.mse_loss(output, target)
    if kind == "l1":
        return F.l1_loss(output, target)
    if kind == "gaussian":
        nll = 0.5 * (output - target).pow(2) + HALF_LOG_2PI
    elif kind == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}")
    return reduce(nll, "b ... -> b", "sum").mean()


def kl_weight(schedule: str, step: int, *, warmup_steps: int = 0, cycle_steps: int = 0) -> float:
    """Multiplier of the KL term at optimizer step `step` (0-based): 'constant' 1; 'linear' a ramp from 0 to 1 over
    warmup_steps; 'cyclical' that ramp restarted every cycle_steps (Fu et al. 2019)."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return min(1.0, step / warmup_steps)
    if schedule == "cyclical":
        return min(1.0, (step % cycle_steps) / warmup_steps)
    raise ValueError(f"unknown KL schedule {schedule!r}")


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0, then cosine decay to `min_ratio` of the peak at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
