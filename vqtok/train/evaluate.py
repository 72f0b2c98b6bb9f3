"""Evaluating a tokenizer on images: PSNR, SSIM, code usage and perplexity (VQ), likelihood bounds (the negative ELBO
and the IWAE bound), KL per group and active units (VAEs), and the PNG grids a person looks at (inputs above
reconstructions; prior samples for VAEs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from vqtok.data.labels import check_batch_labels
from vqtok.images import uint8_to_range
from vqtok.losses import DISCRETE_LIKELIHOODS
from vqtok.metrics import code_usage, psnr_from_mse, squared_error, ssim
from vqtok.models import Autoencoder, HierarchicalVAE
from vqtok.nn.perceptual import LPIPS

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: a latent dimension is active if Cov_x(E_q[z]) > 0.01
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
    progress: bool = False,
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
    time, in nats per image and bits per dimension. VAEs also report the KL of every group and the active units
    (Burda et al.: latent dimensions whose posterior mean varies over the images by more than 0.01), so that
    posterior collapse is visible. `progress` shows a progress bar over the images (on stderr; `vqtok eval`).

    A class-conditional model (config.num_classes > 0) is evaluated with each image's label from the dataset (its
    reconstructions, code lengths and bounds are those of p(x | y)); an image without one (-1) is an error."""
    was_training = model.training
    model.eval()
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    device = next(model.parameters()).device
    perceptual = perceptual.to(device) if perceptual is not None else None
    value_range = model.config.value_range
    totals: dict[str, float] = {"squared_error": 0.0, "ssim": 0.0, "kl": 0.0, "nll": 0.0, "lpips": 0.0, "iwae": 0.0}
    counts = torch.zeros(model.vocab_size or 1, dtype=torch.long, device=device)
    discrete = model.config.decoder_output in DISCRETE_LIKELIHOODS
    variational = model.kl_objective is not None
    if iwae is not None and not (variational and discrete):
        raise ValueError("the IWAE bound needs a VAE (Gaussian or hierarchical) with a discrete likelihood (bernoulli_logits "
                         "on binary images, or logistic_mixture)")
    generator = torch.Generator(device).manual_seed(0)  # the posterior samples of the code length and the bounds
    kl_groups, posterior_means = 0.0, LatentVariance()
    n = dims = values = 0
    num_classes = getattr(model.config, "num_classes", 0)
    bar = tqdm(total=len(dataset), unit="img", desc="eval", disable=not progress)
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        given = {}  # a conditional model's labels, the keyword of all its calls
        if num_classes:
            check_batch_labels(labels, num_classes, lambda j: f"evaluate: image {n + j} of the dataset")
            given = {"labels": labels.to(device)}
        images = images.to(device)
        x = uint8_to_range(images, value_range)
        if model.config.decoder_output == "bernoulli_logits":  # a code length only for binary images
            binary = bool(((images == 0) | (images == 255)).all())
            if iwae is not None and not binary:
                raise ValueError("the IWAE bound of a Bernoulli likelihood needs binary images (0 or 255); binarize "
                                 "them (e.g. vqtok eval --binarize SEED)")
            if n > 0 and binary != discrete:
                raise ValueError("the images are binary in part and grey in part: a Bernoulli likelihood's code length "
                                 "needs all of them binary (binarize them, e.g. vqtok eval --binarize SEED)")
            discrete = binary
        out = model(x, **given)
        if discrete:
            terms = model.code_length(x, generator, output=out, **given)
            totals["nll"] += terms["nll"].sum().item()
            dims = images[0].numel()
            if variational:
                totals["kl"] += terms["kl"].sum().item()
                kl_groups = kl_groups + terms["kl_groups"].double().sum(dim=0)
        if iwae is not None:
            totals["iwae"] += iwae_bound(model, x, iwae, generator, batch=iwae_batch, **given).sum().item()
        if variational:
            posterior_means.add([q.mode() for q in _posteriors(out)])
            if not discrete:
                totals["kl"] += out.bottleneck.terms["kl"].item() * images.shape[0]
        recon = model.postprocess(model.to_image(out.reconstruction)).float()
        totals["squared_error"] += squared_error(recon, images)
        totals["ssim"] += ssim(recon, images.float(), 255.0).sum().item()
        if perceptual is not None:  # LPIPS takes [-1, 1]
            pair = (uint8_to_range(recon, (-1.0, 1.0)), uint8_to_range(images, (-1.0, 1.0)))
            totals["lpips"] += perceptual(*pair).sum().item()
        if out.bottleneck.codes is not None:
            counts += torch.bincount(out.bottleneck.codes.flatten(), minlength=counts.numel())
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
        metrics.update({f"code_{k}": v for k, v in code_usage(counts).items()})
        if (initialized := getattr(getattr(model, "bottleneck", None), "initialized", None)) is not None:
            metrics["codebook_initialized"] = bool(initialized)
    if variational:
        metrics["kl_nats_per_image"] = totals["kl"] / n
        if discrete and isinstance(model, HierarchicalVAE):
            metrics.update({f"kl_nats/group_{i}": v / n for i, v in enumerate(kl_groups.tolist())})
        active = posterior_means.active_units(ACTIVE_UNIT_THRESHOLD)
        metrics["active_units"] = int(sum(active))
        metrics["latent_units"] = int(posterior_means.units)
        if isinstance(model, HierarchicalVAE):
            metrics.update({f"active_units/group_{i}": int(a) for i, a in enumerate(active)})
    return metrics


def codebook_health(model: Autoencoder | HierarchicalVAE) -> dict[str, Any]:
    """For a VQ tokenizer, from the state saved with it: whether k-means initialised its codebook
    (`codebook_initialized`) and the fraction of codes used over its last `usage_window` training steps
    (`train_code_usage`; None when its quantizer recorded no training step: converted from another library, or
    never initialised); {} for other models."""
    bottleneck = getattr(model, "bottleneck", None)
    if getattr(bottleneck, "initialized", None) is None:
        return {}
    trained = int(bottleneck.steps) > 0
    return {"codebook_initialized": bool(bottleneck.initialized),
            "train_code_usage": float(bottleneck.codebook_stats()["usage"]) if trained else None}


def codebook_warnings(health: dict[str, Any], vq: Any, steps: int | None = None) -> list[str]:
    """What is wrong with a trained VQ codebook, from `codebook_health` (and its VQConfig `vq`, after `steps` of
    training when known): one sentence each, none when it is healthy."""
    if not health:
        return []
    if not health["codebook_initialized"]:
        gathered = f"{steps} training steps" if steps is not None else "its training"
        return [f"the VQ codebook was never initialised: k-means waits for {vq.kmeans_reservoir:,} encoder outputs "
                f"(bottleneck.kmeans_samples) and {gathered} did not gather them, so its codes are the random "
                "initial vectors and the EMA never updated them; train longer, lower kmeans_samples, or set "
                "kmeans_init: false"]
    if health["train_code_usage"] is not None and health["train_code_usage"] < MIN_CODE_USAGE:
        return [f"the VQ codebook is barely used: {health['train_code_usage']:.1%} of its {vq.codebook_size} codes "
                f"over the last {vq.usage_window} steps (warning below {MIN_CODE_USAGE:.0%}); most codes are dead - "
                "train longer, or use a smaller codebook or dead-code restarts (dead_threshold)"]
    return []


def iwae_bound(model: Autoencoder | HierarchicalVAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
               *, batch: int = IWAE_BATCH, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The IWAE bound's negative, -log (1/k) sum_i p(x, z_i) / q(z_i | x), in nats per image [B] (Burda et al. 2016),
    from k importance samples drawn in chunks of about `batch` images x samples, combined with logsumexp in
    float64. `labels` [B], the classes of a class-conditional model's images, go to its `log_weights` with them
    (None: none are passed)."""
    if x.shape[0] > batch:  # fewer images than a batch at a time
        label_parts = labels.split(batch) if labels is not None else [None] * -(-x.shape[0] // batch)
        return torch.cat([iwae_bound(model, part, k, generator, batch=batch, labels=part_labels)
                          for part, part_labels in zip(x.split(batch), label_parts)])
    per_call = max(1, batch // x.shape[0])
    given = {} if labels is None else {"labels": labels}
    log_weights = []
    for start in range(0, k, per_call):
        log_weights.append(model.log_weights(x, min(per_call, k - start), generator, **given).double())
    log_w = torch.cat(log_weights, dim=1)
    return -(torch.logsumexp(log_w, dim=1) - math.log(k))


class LatentVariance:
    """Running per-dimension variance over images of posterior means, one tensor per latent group (float64)."""

    def __init__(self) -> None:
        self.count, self.sums, self.squares = 0, None, None

    def add(self, means: list[torch.Tensor]) -> None:
        flat = [m.double().flatten(1) for m in means]
        if self.sums is None:
            self.sums, self.squares = [f.sum(0) for f in flat], [f.pow(2).sum(0) for f in flat]
        else:
            self.sums = [s + f.sum(0) for s, f in zip(self.sums, flat)]
            self.squares = [q + f.pow(2).sum(0) for q, f in zip(self.squares, flat)]
        self.count += flat[0].shape[0]

    @property
    def units(self) -> int:
        return sum(s.numel() for s in self.sums)

    def active_units(self, threshold: float) -> list[int]:
        """Per group, the number of dimensions whose variance over images (unbiased) exceeds `threshold`."""
        if self.count < 2:
            return [0 for _ in self.sums]
        variances = [(q - s.pow(2) / self.count) / (self.count - 1) for s, q in zip(self.sums, self.squares)]
        return [int((v > threshold).sum()) for v in variances]


def _posteriors(out: Any) -> list[Any]:
    """The posterior of every latent group of a forward's output (one for a Gaussian autoencoder)."""
    posterior = out.bottleneck.posterior
    return list(posterior) if isinstance(posterior, (list, tuple)) else [posterior]


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
