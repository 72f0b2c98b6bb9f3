"""vqtok.metrics.ssim against scikit-image's SSIM (an independent implementation of the same convention: Gaussian
window 11, sigma 1.5, population variances, the mean over valid window positions) at the small sizes where the
border convention matters, and against a float64 brute force for images smaller than the window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from vqtok.metrics import ssim


def _eight_bit_pairs(batch: int, channels: int, height: int, width: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with structure (smoothed noise, so windows differ in mean and variance) and noisy copies of them, as
    8-bit values in float32, the form evaluation passes."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(batch, channels, height + 2, width + 2, generator=g), 3, stride=1) * 255
    y = x + 25 * torch.randn(x.shape, generator=g)
    return x.round().clamp(0, 255), y.round().clamp(0, 255)


def _skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """scikit-image per image and channel in float64, averaged over channels as vqtok does."""
    values = [[structural_similarity(a.numpy().astype(np.float64), b.numpy().astype(np.float64), data_range=255.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
               for a, b in zip(xi, yi)] for xi, yi in zip(x, y)]
    return torch.tensor(values, dtype=torch.float64).mean(dim=1)


@pytest.mark.parametrize("size", [(11, 11), (16, 16), (16, 21), (24, 24), (32, 32)])
def test_ssim_matches_scikit_image(size):
    """The quickstart's 16 x 16 images included: at 16 px a padded ('same') convention would differ by ~1e-2."""
    x, y = _eight_bit_pairs(3, 3, *size, seed=sum(size))
    torch.testing.assert_close(ssim(x, y, 255.0).double(), _skimage_ssim(x, y), rtol=0, atol=1e-6)


def test_ssim_of_images_smaller_than_the_window_uses_a_window_of_their_size():
    """8 x 10 images: one 8 x 8 Gaussian window (sigma 1.5) at each of the 3 valid positions, in float64 by hand."""
    x, y = _eight_bit_pairs(2, 1, 8, 10, seed=1)
    coords = torch.arange(8, dtype=torch.float64) - 3.5
    w1 = torch.exp(-coords**2 / (2 * 1.5**2))
    w = torch.outer(w1, w1) / torch.outer(w1, w1).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    expected = []
    for a_img, b_img in zip(x[:, 0].double(), y[:, 0].double()):
        values = []
        for j in range(3):
            a, b = a_img[:, j : j + 8], b_img[:, j : j + 8]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cov = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2, (w * a * b).sum() - ma * mb
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        expected.append(torch.stack(values).mean())
    torch.testing.assert_close(ssim(x, y, 255.0).double(), torch.stack(expected), rtol=0, atol=1e-6)
