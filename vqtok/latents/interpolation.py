"""Interpolation between two images in a model's latent space: linear and spherical (slerp), k steps.

Both images are encoded (`vqtok.latents.space`), the path between their latents is sampled at k evenly spaced
t in [0, 1] - t = 0 and t = 1 give the two latents exactly - and every point is decoded.

Slerp (Shoemake 1985; White 2016 for generative models) follows the great circle between the two latents, each image's
and group's latent taken as one flattened vector:

    slerp(a, b, t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b,    theta = angle(a, b).

It is the usual path for Gaussian latents: under N(0, I) in d dimensions almost all mass lies near the sphere of
radius sqrt(d), and the straight line between two typical latents cuts through the low-norm interior, where the
decoder has seen few latents (midpoints come out washed-out); slerp between vectors of equal norm keeps that norm at
every t. Vectors that are (nearly) parallel or opposite (sin theta < `PARALLEL_SIN`), or zero, have no unique great
circle: slerp falls back to the straight line there.

Linear interpolation is the default for a VQ tokenizer's encoder features: they are not N(0, I) latents, and the
nearest-code search compares them - norms included, unless the codebook is l2-normalised - with code vectors that lie
where the encoder puts its features. Every step is quantized before it is decoded (`VQFeatures.decode`), so a VQ
strip shows real code grids: the path moves through the codes in jumps, not smoothly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vqtok.latents.space import Labels, LatentSpace, float64_cpu, latent_space

METHODS = ("slerp", "linear")
PARALLEL_SIN = 1e-6
"""slerp falls back to lerp where sin(theta) is below this. For nearly parallel vectors the line is then within
theta^2 / 8 of the norm (below 2e-13) of the arc; for opposite ones no great circle is the one, and the line passes
through the origin (the prior's mode)."""


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b, elementwise; t = 0 gives a and t = 1 gives b exactly."""
    _check_pair(a, b)
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    return torch.lerp(a, b, t)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of every row a[i], b[i] (tensors [B, ...], each row one flattened vector), computed in
    float64 and returned in a's dtype and device. t = 0 gives a and t = 1 gives b exactly; for rows of equal norm the
    result keeps that norm (on the great circle); rows with sin(theta) < PARALLEL_SIN are interpolated linearly."""
    _check_pair(a, b)
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    rows = a.shape[0] if a.ndim > 1 else 1  # a single vector is one row
    u, v = float64_cpu(a).reshape(rows, -1), float64_cpu(b).reshape(rows, -1)
    u_norm, v_norm = u.norm(dim=1, keepdim=True), v.norm(dim=1, keepdim=True)
    u_dir, v_dir = u / u_norm.clamp_min(1e-300), v / v_norm.clamp_min(1e-300)
    # 2 atan2(|u - v|, |u + v|) of the unit vectors: accurate at every angle, unlike acos of the dot product
    theta = 2 * torch.atan2((u_dir - v_dir).norm(dim=1, keepdim=True), (u_dir + v_dir).norm(dim=1, keepdim=True))
    sin = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * u + torch.sin(t * theta) * v) / sin.clamp_min(PARALLEL_SIN)
    straight = (1 - t) * u + t * v
    degenerate = (sin < PARALLEL_SIN) | (u_norm == 0) | (v_norm == 0)
    return torch.where(degenerate, straight, spherical).view(a.shape).to(a.device, a.dtype)


def interpolation_times(steps: int) -> list[float]:
    """The k = `steps` evenly spaced t in [0, 1], both ends included (exactly 0.0 and 1.0)."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (the two endpoints), got {steps}")
    return [i / (steps - 1) for i in range(steps)]


def interpolate_latents(za: Sequence[torch.Tensor], zb: Sequence[torch.Tensor], steps: int,
                        method: str = "slerp") -> list[list[torch.Tensor]]:
    """The latents of every step (one list of groups per step) between latents `za` and `zb` (one tensor [B, ...]
    per group each), by `method` 'slerp' or 'linear', per image and per group. Step 0 is `za`, the last `zb`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(za) != len(zb):
        raise ValueError(f"the two latents have {len(za)} and {len(zb)} groups")
    path = slerp if method == "slerp" else lerp
    return [[path(a, b, t) for a, b in zip(za, zb)] for t in interpolation_times(steps)]


def default_method(space: Any) -> str:
    """The interpolation a latent space names (`default_method`): slerp for Gaussian latents, linear for a VQ
    tokenizer's features; slerp for a space that names none."""
    return getattr(latent_space(space), "default_method", "slerp")


@torch.no_grad()
def interpolate(model: Any, a: torch.Tensor, b: torch.Tensor, steps: int = 8, *, method: str | None = None,
                labels: Labels = None) -> torch.Tensor:
    """Images along the latent path from each image of `a` to the same image of `b` (batches of pairs [B, C, H, W],
    in the model's range) -> images [B, steps, C, H, W] in the model's range, step 0 decoded from a's latents and the
    last from b's (reconstructions, not the inputs).

    `model`: a vqtok model or any `LatentSpace`. `method`: 'slerp' or 'linear' (None: the space's default, slerp for
    Gaussian latents and linear for a VQ tokenizer, whose steps are quantized; see the module docstring). `labels`:
    the class(es) of a class-conditional model, for encoding and decoding (None: its unconditional pass)."""
    space: LatentSpace = latent_space(model)
    if a.shape != b.shape:
        raise ValueError(f"the two batches of images differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    path = interpolate_latents(space.encode(a, labels), space.encode(b, labels), steps, method or default_method(space))
    return torch.stack([space.decode(latents, labels) for latents in path], dim=1)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"latents to interpolate must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not a.is_floating_point() or not b.is_floating_point():
        raise TypeError(f"latents to interpolate must be float tensors, got {a.dtype} and {b.dtype}")
