"""Image-quality and codebook metrics: PSNR, SSIM, code usage, perplexity and unused codes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def squared_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """The sum of squared differences of all values, in float64 (exact for 8-bit values: integers below 2^53)."""
    return (x.double() - y.double()).pow(2).sum().item()


def psnr_from_mse(mse: float | torch.Tensor, data_range: float) -> float | torch.Tensor:
    """10 log10(data_range^2 / mse) in dB; infinite for mse 0 (a reconstruction without error). `mse` a number, or a
    tensor of them (e.g. one per image), computed elementwise in its dtype."""
    if torch.is_tensor(mse):
        db = 10 * torch.log10(data_range**2 / mse.clamp_min(torch.finfo(mse.dtype).tiny))
        return torch.where(mse > 0, db, torch.full_like(mse, math.inf))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB of a batch [B, C, H, W] from its pooled MSE, the mean squared error over
    every value of every image (float64). Not the mean of per-image PSNRs, in which one pixel-exact image would
    count as infinitely many dB; infinite only when the whole batch is reproduced exactly."""
    return psnr_from_mse(squared_error(x, y) / x.numel(), data_range)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image, averaged over channels: [B, C, H, W] -> [B], computed in float64.

    The convention is Wang et al. 2004's reference code (`ssim_index.m`): a Gaussian window of 11 x 11 with sigma
    1.5, K1 0.01, K2 0.03, population (not sample) variances, and the SSIM map averaged over the *valid* window
    positions only, those where the whole window lies inside the image, so no pixel is invented at the border. A
    16 x 16 image thus has 6 x 6 positions. scikit-image's `structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=...)` follows the same convention and agrees to float
    precision at every size (tested). torchmetrics (1.x) instead averages over every pixel of the image padded by
    reflection, whose border windows see mirrored pixels. On small images the two differ: the quickstart's 16 x 16
    test digits scored 0.982 here against torchmetrics' 0.971 after 600 steps, 0.930 against 0.885 after 100. The
    gap shrinks as the image grows and the border's share of the positions falls.

    Images smaller than the window in height or width use a square window of the smaller side (one position along
    that side), with the same sigma.

    Args:
        x: images [B, C, H, W] in [0, data_range] (e.g. 8-bit values as floats, and data_range 255).
        y: the images to compare them with, of the same shape and range.
        data_range: the images' value range, which sets the stabilising constants (K1 L)^2 and (K2 L)^2.
        window: the window's side in pixels.
        sigma: the Gaussian's standard deviation in pixels.
    """
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
    """From code counts over a dataset: the fraction of codes used at least once, the perplexity, and the fraction
    never used (dead codes on this data: they carry no information about it)."""
    return {"usage": float((counts > 0).float().mean()), "perplexity": float(perplexity(counts)),
            "unused": float((counts == 0).double().mean())}
