"""Evaluating a tokenizer on images: PSNR, SSIM, code usage and perplexity (VQ), KL (Gaussian), and the PNG grids
a person looks at (inputs above reconstructions; prior samples for Gaussian models)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.utils import make_grid, save_image

from vqtok.images import uint8_to_range
from vqtok.losses import DISCRETE_LIKELIHOODS
from vqtok.metrics import code_usage, psnr_from_mse, squared_error, ssim
from vqtok.models import Autoencoder
from vqtok.nn.perceptual import LPIPS


@torch.inference_mode()
def evaluate(
    model: Autoencoder, dataset: Dataset, *, limit: int | None = None, batch_size: int = 64, num_workers: int = 0,
    perceptual: LPIPS | None = None,
) -> dict[str, float]:
    """Reconstruction metrics of `model` (in eval mode, so nothing is accumulated or communicated) on the first
    `limit` images of `dataset`. PSNR, SSIM and, given `perceptual`, the mean LPIPS distance compare 8-bit images,
    as a person would see them. PSNR comes from the MSE pooled over every value of every image, not from a mean of
    per-image PSNRs (in which a pixel-exact image would count as infinitely many dB); SSIM and LPIPS are means over
    images. With a discrete likelihood (the logistic mixture, or Bernoulli on binary images) also -log p(x | z) in
    bits per dimension and, for Gaussian models, the negative ELBO with beta 1 and the unclamped KL - whatever the
    training objective."""
    was_training = model.training
    model.eval()
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    device = next(model.parameters()).device
    perceptual = perceptual.to(device) if perceptual is not None else None
    value_range = model.config.value_range
    totals: dict[str, float] = {"squared_error": 0.0, "ssim": 0.0, "kl": 0.0, "nll": 0.0, "lpips": 0.0}
    counts = torch.zeros(model.vocab_size or 1, dtype=torch.long, device=device)
    discrete = model.config.decoder_output in DISCRETE_LIKELIHOODS
    generator = torch.Generator(device).manual_seed(0)  # the posterior samples of the code length
    n = dims = values = 0
    for images, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        images = images.to(device)
        x = uint8_to_range(images, value_range)
        if model.config.decoder_output == "bernoulli_logits" and not ((images == 0) | (images == 255)).all():
            discrete = False  # a Bernoulli likelihood of grey values is no code length
        out = model(x)
        if discrete:  # the KL term is the forward's own (unclamped), summed below
            totals["nll"] += model.code_length(x, generator, output=out)["nll"].sum().item()
            dims = images[0].numel()
        recon = model.postprocess(model.to_image(out.reconstruction)).float()
        totals["squared_error"] += squared_error(recon, images)
        totals["ssim"] += ssim(recon, images.float(), 255.0).sum().item()
        if perceptual is not None:  # LPIPS takes [-1, 1]
            pair = (uint8_to_range(recon, (-1.0, 1.0)), uint8_to_range(images, (-1.0, 1.0)))
            totals["lpips"] += perceptual(*pair).sum().item()
        if out.bottleneck.codes is not None:
            counts += torch.bincount(out.bottleneck.codes.flatten(), minlength=counts.numel())
        if "kl" in out.bottleneck.terms:
            totals["kl"] += out.bottleneck.terms["kl"].item() * images.shape[0]
        n += images.shape[0]
        values += images.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no images to evaluate (an empty dataset or limit 0)")
    psnr = psnr_from_mse(totals["squared_error"] / values, 255.0)
    metrics = {"psnr": psnr, "ssim": totals["ssim"] / n, "images": float(n)}
    if perceptual is not None:
        metrics["lpips"] = totals["lpips"] / n
    if discrete:  # bits per dimension on the 8-bit (or binary) grid: a code length
        metrics["nll_bits_per_dim"] = totals["nll"] / (n * dims * math.log(2))
        if model.is_gaussian:  # the negative ELBO, beta 1, unclamped KL, one posterior sample per image
            metrics["neg_elbo_bits_per_dim"] = (totals["nll"] + totals["kl"]) / (n * dims * math.log(2))
            metrics["neg_elbo_nats_per_image"] = (totals["nll"] + totals["kl"]) / n
    if model.vocab_size:
        metrics.update({f"code_{k}": v for k, v in code_usage(counts).items()})
    else:
        metrics["kl_nats_per_image"] = totals["kl"] / n
    return metrics


@torch.inference_mode()
def save_reconstruction_grid(model: Autoencoder, images: torch.Tensor, path: str | Path) -> Path:
    """PNG: a row of uint8 inputs [B, C, H, W] above their reconstructions (posterior mean for Gaussian models)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = uint8_to_range(images.to(device), model.config.value_range)
    recon = model.postprocess(model.to_image(model(x).reconstruction))
    model.train(was_training)
    tiles = _enlarge(torch.cat([images.to(device), recon]).float() / 255.0)
    return _save(make_grid(tiles, nrow=images.shape[0], padding=2), path)


@torch.inference_mode()
def save_prior_samples(model: Autoencoder, n: int, path: str | Path, *, seed: int = 0) -> Path:
    """PNG: decodings of latents drawn from the Gaussian prior N(0, I) at the model's latent grid."""
    device = next(model.parameters()).device
    h, w = model.config.latent_grid
    z = torch.randn(n, model.bottleneck.dim, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    return save_image_grid(model.postprocess(model.decode(z)), path)


def _enlarge(images: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour enlargement of small images (e.g. 16x16 digits) so that a person can see them."""
    factor = max(1, min_side // max(images.shape[-2:]))
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """PNG grid of uint8 images [B, C, H, W] (small ones enlarged)."""
    tiles = _enlarge(images.float() / 255.0)
    return _save(make_grid(tiles, nrow=nrow or max(1, int(len(images) ** 0.5)), padding=2), path)


def _save(grid: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


def format_table(metrics: dict[str, Any]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items())
