"""The schedules of a training run, as functions of the optimizer step: the learning rate's warm-up and cosine decay,
and the KL weight's warm-up against posterior collapse (constant, linear, cyclical)."""

from __future__ import annotations

import math


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
