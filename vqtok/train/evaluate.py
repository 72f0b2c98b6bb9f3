"""Evaluating a tokenizer on images: PSNR, SSIM, code usage, perplexity and unused codes (VQ), likelihood bounds (the
negative ELBO and the IWAE bound), the posterior-collapse diagnostics of VAEs (KL per channel or group, active units;
vqtok.diagnostics), and the PNG grids a person looks at (inputs above reconstructions; prior samples for VAEs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from vqtok.data.labels import check_batch_labels
from vqtok.diagnostics import (
    ACTIVE_UNIT_THRESHOLD,
    CodeCounts,
    LatentStatistics,
    posterior_passes,
    posterior_terms,
)
from vqtok.images import is_binary, uint8_to_range
from vqtok.losses import DISCRETE_LIKELIHOODS
from vqtok.metrics import psnr_from_mse, squared_error, ssim
from vqtok.models import Autoencoder, HierarchicalVAE
from vqtok.nn.conditioning import dataset_labels, label_arguments
from vqtok.nn.perceptual import LPIPS

IWAE_BATCH = 1024  # images x importance samples decoded at once by the IWAE bound
MIN_CODE_USAGE = 0.10
"""A VQ tokenizer that used fewer than this fraction of its codes over the last `usage_window` training steps ends
its training run with a warning (`codebook_warnings`): most of its vocabulary is dead, so its tokens say less than
the codebook size promises and a prior trained on them sees few symbols. Healthy runs use most of their codes; a
run that never initialised its codebook uses almost none (e.g. 0.1%)."""


@torch.inference_mode()
def evaluate(
    model: Autoencoder | HierarchicalVAE, dataset: Dataset, *, limit: int | None = None, batch_size: int = 64,
    num_workers: int = 0, perceptual: LPIPS | None = None, iwae: int | None = None, iwae_batch: int = IWAE_BATCH,
    progress: bool = False, latents: LatentStatistics | None = None, codes: CodeCounts | None = None,
) -> dict[str, float]:
    """Reconstruction metrics of `model` (in eval mode, so nothing is accumulated or communicated) on the first
    `limit` images of `dataset`. PSNR, SSIM and, given `perceptual`, the mean LPIPS distance compare 8-bit images,
    as a person would see them. PSNR comes from the MSE pooled over every value of every image, not from a mean of
    per-image PSNRs (in which a pixel-exact image would count as infinitely many dB); SSIM and LPIPS are means over
    images; reconstructions use the posterior means.

    With a discrete likelihood (the logistic mixture, or Bernoulli on binary images) also -log p(x | z) in bits per
    dimension and, for VAEs (Gaussian and hierarchical), likelihood bounds with beta 1 and no free bits, whatever the
    training objective: the negative ELBO (one posterior sample per image, the KL analytic) and, with `iwae` = k, the
    IWAE bound -log (1/k) sum_i p(x, z_i) / q(z_i | x), computed in log space, `iwae_batch` images x samples at a
    time, in nats per image and bits per dimension.

    VAEs also report the posterior-collapse diagnostics (vqtok.diagnostics), so that collapse is visible:
    `kl_nats_per_image`, the active units (Burda et al.: latent elements whose posterior mean varies over the images
    by more than 0.01; `active_units` of `latent_units`) and, for a Gaussian autoencoder, the KL and active units of
    every latent channel (`kl_nats/channel_C`, `active_units/channel_C`), for a hierarchical VAE of every group
    (`kl_nats/group_L`, `active_units/group_L`). The KL per channel or group sums to `kl_nats_per_image`: with a
    discrete likelihood, the hierarchical VAE's are the negative ELBO's, at one posterior sample of the groups above;
    otherwise at their posterior means (the forward pass's). VQ tokenizers report the usage, perplexity and unused
    fraction of their codes (`code_usage`, `code_perplexity`, `code_unused`; a residual VQ's over all its levels, the
    perplexity the mean of the levels', and each level's under `/level_l`). To keep the per-element arrays, pass an
    empty LatentStatistics as `latents` (VAEs) or an empty CodeCounts as `codes` (VQ: the count of every code): this
    fills them.

    A class-conditional model is given each image's label (its reconstructions, code lengths and bounds are those of
    p(x | y)); an image without one (-1) is an error. `progress` shows a progress bar over the images (on stderr;
    `vqtok eval`)."""
    was_training = model.training
    model.eval()
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    device = next(model.parameters()).device
    perceptual = perceptual.to(device) if perceptual is not None else None
    value_range = model.config.value_range
    totals: dict[str, float] = {"squared_error": 0.0, "ssim": 0.0, "kl": 0.0, "nll": 0.0, "lpips": 0.0, "iwae": 0.0}
    discrete = model.config.decoder_output in DISCRETE_LIKELIHOODS
    variational = model.kl_objective is not None
    if iwae is not None and not (variational and discrete):
        raise ValueError("the IWAE bound needs a VAE (Gaussian or hierarchical) with a discrete likelihood (bernoulli_logits "
                         "on binary images, or logistic_mixture)")
    generator = torch.Generator(device).manual_seed(0)  # the posterior samples of the code length and the bounds
    kl_groups, statistics = 0.0, latents if latents is not None else LatentStatistics()
    depth = getattr(model.bottleneck, "code_depth", None) if model.vocab_size else None  # a residual VQ's levels
    codes = codes if codes is not None else CodeCounts(model.vocab_size or 0, depth)
    n = dims = values = 0
    num_classes = getattr(model.config, "num_classes", 0)
    bar = tqdm(total=len(dataset), unit="img", desc="eval", disable=not progress)
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        if num_classes:
            check_batch_labels(labels, num_classes, lambda j: f"evaluate: image {n + j} of the dataset")
        images, conditioning = images.to(device), dataset_labels(model, labels)
        x = uint8_to_range(images, value_range)
        if model.config.decoder_output == "bernoulli_logits":  # a code length only for binary images
            binary = is_binary(images)
            if iwae is not None and not binary:
                raise ValueError("the IWAE bound of a Bernoulli likelihood needs binary images (0 or 255); binarize "
                                 "them (e.g. vqtok eval --binarize SEED)")
            if n > 0 and binary != discrete:
                raise ValueError("the images are binary in part and grey in part: a Bernoulli likelihood's code length "
                                 "needs all of them binary (binarize them, e.g. vqtok eval --binarize SEED)")
            discrete = binary
        out = model(x, **conditioning)
        if discrete:
            terms = model.code_length(x, generator, output=out, **conditioning)
            totals["nll"] += terms["nll"].sum().item()
            dims = images[0].numel()
            if variational:
                totals["kl"] += terms["kl"].sum().item()
                kl_groups = kl_groups + terms["kl_groups"].double().sum(dim=0)
        if iwae is not None:
            totals["iwae"] += iwae_bound(model, x, iwae, generator, batch=iwae_batch, **conditioning).sum().item()
        if variational:
            statistics.add(*posterior_terms(posterior_passes(model, out)))
            if not discrete:
                totals["kl"] += out.bottleneck.terms["kl"].item() * images.shape[0]
        recon = model.postprocess(model.to_image(out.reconstruction)).float()
        totals["squared_error"] += squared_error(recon, images)
        totals["ssim"] += ssim(recon, images.float(), 255.0).sum().item()
        if perceptual is not None:  # LPIPS takes [-1, 1]
            pair = (uint8_to_range(recon, (-1.0, 1.0)), uint8_to_range(images, (-1.0, 1.0)))
            totals["lpips"] += perceptual(*pair).sum().item()
        if out.bottleneck.codes is not None:
            codes.add(out.bottleneck.codes)
        n += images.shape[0]
        values += images.numel()
        bar.update(images.shape[0])
    bar.close()
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no images to evaluate (an empty dataset or limit 0)")
    psnr = psnr_from_mse(totals["squared_error"] / values, 255.0)
    metrics: dict[str, Any] = {"psnr": psnr, "ssim": totals["ssim"] / n, "images": n}
    if perceptual is not None:
        metrics["lpips"] = totals["lpips"] / n
    bits = lambda nats: nats / (dims * math.log(2))  # noqa: E731  (nats per image -> bits per dimension)
    if discrete:  # bits per dimension on the 8-bit (or binary) grid: a code length
        metrics["nll_bits_per_dim"] = bits(totals["nll"] / n)
        if variational:
            metrics["neg_elbo_nats"] = (totals["nll"] + totals["kl"]) / n
            metrics["neg_elbo_bits_per_dim"] = bits(metrics["neg_elbo_nats"])
        if iwae is not None:
            metrics["iwae_nats"] = totals["iwae"] / n
            metrics["iwae_bits_per_dim"] = bits(metrics["iwae_nats"])
            metrics["iwae_samples"] = iwae
    if model.vocab_size:
        metrics.update({f"code_{k}": v for k, v in codes.usage().items()})
        if (initialized := getattr(getattr(model, "bottleneck", None), "initialized", None)) is not None:
            metrics["codebook_initialized"] = bool(initialized)
    if variational:
        metrics.update(collapse_metrics(model, statistics, totals["kl"] / n,
                                        [v / n for v in kl_groups.tolist()] if discrete else None))
    return metrics


def collapse_metrics(model: Autoencoder | HierarchicalVAE, statistics: LatentStatistics, kl_per_image: float,
                     sampled_group_kl: list[float] | None = None) -> dict[str, Any]:
    """evaluate()'s posterior-collapse metrics of a VAE from its LatentStatistics; a hierarchical VAE's KL per group
    is `sampled_group_kl` when given (the negative ELBO's, at posterior samples), else at the posterior means."""
    metrics: dict[str, Any] = {"kl_nats_per_image": kl_per_image}
    if isinstance(model, HierarchicalVAE):
        group_kl = sampled_group_kl if sampled_group_kl is not None else statistics.kl_per_group()
        metrics.update({f"kl_nats/group_{i}": v for i, v in enumerate(group_kl)})
    metrics["active_units"] = statistics.active_units(ACTIVE_UNIT_THRESHOLD)
    metrics["latent_units"] = statistics.units
    if isinstance(model, HierarchicalVAE):
        metrics.update({f"active_units/group_{i}": a for i, a in enumerate(statistics.active_per_group())})
    else:
        metrics.update({f"kl_nats/channel_{c}": v for c, v in enumerate(statistics.kl_per_channel())})
        metrics.update({f"active_units/channel_{c}": a for c, a in enumerate(statistics.active_per_channel())})
    return metrics


def codebook_health(model: Autoencoder | HierarchicalVAE) -> dict[str, Any]:
    """For a discrete tokenizer (VQ, FSQ, LFQ, residual VQ), from the state saved with it: whether k-means
    initialised its codebook (`codebook_initialized`; every level's for a residual VQ; always true for FSQ and LFQ,
    whose codebooks are implicit) and the fraction of
    codes used over its last `usage_window` training steps (`train_code_usage`; None when its quantizer recorded no
    training step: converted from another library, or never initialised); {} for other models."""
    bottleneck = getattr(model, "bottleneck", None)
    if getattr(bottleneck, "codebook_stats", None) is None:
        return {}
    trained = int(bottleneck.steps) > 0
    return {"codebook_initialized": bool(getattr(bottleneck, "initialized", True)),
            "train_code_usage": float(bottleneck.codebook_stats()["usage"]) if trained else None}


def codebook_warnings(health: dict[str, Any], vq: Any, steps: int | None = None) -> list[str]:
    """What is wrong with a trained discrete bottleneck, from `codebook_health` (and its config `vq`, a VQConfig,
    FSQConfig, LFQConfig or RVQConfig, after `steps` of training when known): one sentence each, none when it is healthy."""
    if not health:
        return []
    if not health["codebook_initialized"] and vq.kind == "rvq":
        gathered = f"{steps} training steps" if steps is not None else "its training"
        return [f"a residual VQ codebook was never initialised: each level's k-means waits for {vq.kmeans_reservoir:,} "
                f"residuals (bottleneck.kmeans_samples) gathered after the levels above it are initialised, and "
                f"{gathered} did not get through all {vq.depth} levels, so the last ones are random vectors the EMA "
                "never updated; train longer, lower kmeans_samples, or set kmeans_init: false"]
    if not health["codebook_initialized"]:
        gathered = f"{steps} training steps" if steps is not None else "its training"
        return [f"the VQ codebook was never initialised: k-means waits for {vq.kmeans_reservoir:,} encoder outputs "
                f"(bottleneck.kmeans_samples) and {gathered} did not gather them, so its codes are the random "
                "initial vectors and the EMA never updated them; train longer, lower kmeans_samples, or set "
                "kmeans_init: false"]
    if health["train_code_usage"] is not None and health["train_code_usage"] < MIN_CODE_USAGE and vq.kind == "fsq":
        return [f"the FSQ codes are barely used: {health['train_code_usage']:.1%} of its {vq.vocab_size:,} codes "
                f"(levels {list(vq.levels)}) over the last {vq.usage_window} steps (warning below "
                f"{MIN_CODE_USAGE:.0%}); train longer, or use fewer levels"]
    if health["train_code_usage"] is not None and health["train_code_usage"] < MIN_CODE_USAGE and vq.kind == "lfq":
        return [f"the LFQ codes are barely used: {health['train_code_usage']:.1%} of its {vq.vocab_size:,} codes "
                f"({vq.bits} bits) over the last {vq.usage_window} steps (warning below {MIN_CODE_USAGE:.0%}); "
                "train longer, raise entropy_weight or diversity_weight, or use fewer bits"]
    if health["train_code_usage"] is not None and health["train_code_usage"] < MIN_CODE_USAGE and vq.kind == "rvq":
        return [f"the residual VQ's codebooks are barely used: {health['train_code_usage']:.1%} of its {vq.depth} x "
                f"{vq.codebook_size} codes over the last {vq.usage_window} steps (warning below {MIN_CODE_USAGE:.0%}); "
                "train longer, or use smaller codebooks or dead-code restarts (dead_threshold)"]
    if health["train_code_usage"] is not None and health["train_code_usage"] < MIN_CODE_USAGE:
        return [f"the VQ codebook is barely used: {health['train_code_usage']:.1%} of its {vq.codebook_size} codes "
                f"over the last {vq.usage_window} steps (warning below {MIN_CODE_USAGE:.0%}); most codes are dead - "
                "train longer, or use a smaller codebook or dead-code restarts (dead_threshold)"]
    return []


def iwae_bound(model: Autoencoder | HierarchicalVAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
               *, batch: int = IWAE_BATCH, labels: Any = None) -> torch.Tensor:
    """The IWAE bound's negative, -log (1/k) sum_i p(x, z_i) / q(z_i | x), in nats per image [B] (Burda et al. 2016),
    from k importance samples drawn in chunks of about `batch` images x samples, combined with logsumexp in
    float64 (`labels`: a class-conditional model's, None, an int or one per image)."""
    if x.shape[0] > batch:  # fewer images than a batch at a time
        parts = x.split(batch)
        per_image = labels is not None and torch.as_tensor(labels).ndim > 0
        part_labels = torch.as_tensor(labels).split(batch) if per_image else [labels] * len(parts)
        return torch.cat([iwae_bound(model, part, k, generator, batch=batch, labels=part_labels[i])
                          for i, part in enumerate(parts)])
    per_call = max(1, batch // x.shape[0])
    conditioning = label_arguments(model, labels)
    log_weights = []
    for start in range(0, k, per_call):
        log_weights.append(model.log_weights(x, min(per_call, k - start), generator, **conditioning).double())
    log_w = torch.cat(log_weights, dim=1)
    return -(torch.logsumexp(log_w, dim=1) - math.log(k))


@torch.inference_mode()
def save_reconstruction_grid(model: Autoencoder, images: torch.Tensor, path: str | Path, *,
                             labels: torch.Tensor | None = None) -> Path:
    """PNG: a row of uint8 inputs [B, C, H, W] above their reconstructions (posterior mean for Gaussian models;
    `labels` [B]: each image's class, for a class-conditional model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = uint8_to_range(images.to(device), model.config.value_range)
    given = {} if labels is None else {"labels": labels.to(device)}
    recon = model.postprocess(model.to_image(model(x, **given).reconstruction))
    model.train(was_training)
    tiles = _enlarge(torch.cat([images.to(device), recon]).float() / 255.0)
    return _save(make_grid(tiles, nrow=images.shape[0], padding=2), path)


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
