"""Image-quality and codebook metrics: PSNR, SSIM, code usage and perplexity."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, [B, C, H, W] -> [B]."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))).float()


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid region) per
    image, averaged over channels: [B, C, H, W] -> [B]. Images smaller than the window use a window of their size."""
    x, y = x.double(), y.double()
    channels = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(window, sigma, channels, x.device, x.dtype)
    blur = lambda t: F.conv2d(t, w, groups=channels)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution given by counts: K for uniform use, 1 for a single code."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def code_usage(counts: torch.Tensor) -> dict[str, float]:
    """From code counts over a dataset: fraction of codes used at least once, and perplexity."""
    return {"usage": float((counts > 0).float().mean()), "perplexity": float(perplexity(counts))}
