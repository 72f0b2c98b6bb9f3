"""Anomaly scores: how unusual each image is to a tokenizer, and how well a score tells two sets of images apart.

`score_images` gives every image of a dataset one value per score kind:

    mse            the mean squared error of its 8-bit reconstruction against the 8-bit image (as `evaluate` compares
                   them: the decoder's output at the posterior mean or the codes, rounded to 0..255)
    psnr           that error's 8-bit PSNR, 10 log10(255^2 / mse) in dB (inf for an exact reconstruction)
    neg_elbo_nats  VAEs (Gaussian autoencoders, the hierarchical VAE) with a discrete likelihood: -log p(x | z) +
                   KL(q(z | x) || p(z)) in nats, beta 1 and no free bits, one posterior sample (`code_length`)
    iwae_nats      with `iwae` = k: the IWAE bound -log (1/k) sum_i p(x, z_i) / q(z_i | x) in nats (`iwae_bound`)
    prior_bits     VQ tokenizers given a transformer prior: -log2 p(codes) of the image's codes under the prior
                   (its unconditional pass: the null class), in bits per image

Every kind is oriented so that a larger value is more anomalous (a worse reconstruction, a longer code), except
psnr, which is reported as it is (larger: a better reconstruction) and negated for the AUROC. `auroc` is the
probability that a random anomalous image scores higher than a random normal one, ties counting one half (the
Mann-Whitney U statistic over the product of the sets' sizes): 1 separates them perfectly, 0.5 is chance, and
below 0.5 the score finds the anomalies MORE typical than the normal images. That happens: likelihoods of deep
generative models can rank some out-of-distribution sets as more likely than their own test set (Nalisnick et al.
2019, "Do deep generative models know what they don't know?": models trained on Fashion-MNIST give MNIST higher
likelihoods), so measure both directions. `save_histograms` draws both sets' distributions of every kind, one
panel each (PIL only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vqtok.images import is_binary, uint8_to_range
from vqtok.losses import DISCRETE_LIKELIHOODS
from vqtok.metrics import psnr_from_mse
from vqtok.models import Autoencoder, HierarchicalVAE, TransformerPrior
from vqtok.train.evaluate import IWAE_BATCH, iwae_bound

SCORE_KINDS = ("mse", "psnr", "neg_elbo_nats", "iwae_nats", "prior_bits")
"""Every score kind, in the order they are reported."""
LARGER_IS_NORMAL = frozenset({"psnr"})
"""The kinds whose larger values mean a more typical image: negated for the AUROC."""
UNITS = {"mse": "squared error per value (8-bit)", "psnr": "dB", "neg_elbo_nats": "nats per image",
         "iwae_nats": "nats per image", "prior_bits": "bits per image"}


@dataclass
class ImageScores:
    """The scores of a dataset's images: `indices` [N] int64, the images' positions in the dataset, and `scores`,
    score kind -> [N] float64 (kinds in SCORE_KINDS order, only those the model and options give)."""

    indices: np.ndarray
    scores: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@torch.inference_mode()
def score_images(
    model: Autoencoder | HierarchicalVAE, dataset: Dataset, *, prior: TransformerPrior | None = None,
    iwae: int | None = None, labels: int | Sequence[int] | torch.Tensor | None = None, limit: int | None = None,
    batch_size: int = 64, num_workers: int = 0, iwae_batch: int = IWAE_BATCH, progress: bool = False,
    desc: str = "score",
) -> ImageScores:
    """The anomaly scores (see the module's docstring) of the first `limit` images of `dataset`, uint8 (image,
    label) pairs, with `model` in eval mode (its mode, and the prior's, come back afterwards).

    The likelihood scores are those of `evaluate`, image by image: the same batches (`batch_size`) and the same
    posterior samples (a generator seeded with 0 on the model's device, drawn by the negative ELBO and then the
    IWAE bound of every batch), so their means are evaluate's `neg_elbo_nats` and `iwae_nats` (for a
    class-conditional model, when `labels` are the dataset's, as evaluate passes them). `prior`, a
    transformer prior over the codes of this VQ tokenizer, is refused if it was trained on another tokenizer's codes
    (the weight hash it records, as when it samples), models another vocabulary or another code grid; it is moved
    to the model's device.

    `labels` (class-conditional models only): None, the unconditional pass (the null label); one class for every
    image; or one per image of `dataset`. The prior always scores with its null class. `progress` shows a progress
    bar (stderr) named `desc`."""
    check_scoring(model, prior=prior, iwae=iwae)
    label_of = _image_labels(model, labels, len(dataset))
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    was_training = model.training, prior.training if prior is not None else False
    model.eval()
    device = next(model.parameters()).device
    if prior is not None:
        prior.to(device).eval()
    likelihood = model.is_gaussian and model.config.decoder_output in DISCRETE_LIKELIHOODS
    generator = torch.Generator(device).manual_seed(0)  # evaluate's posterior samples
    columns: dict[str, list[torch.Tensor]] = {}
    n = 0
    try:
        bar = tqdm(total=len(dataset), unit="img", desc=desc, disable=not progress)
        for images, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
            images = images.to(device)
            given = {} if label_of is None else {"labels": label_of[n : n + len(images)].to(device)}
            batch = _score_batch(model, images, given, generator, prior=prior, likelihood=likelihood, iwae=iwae,
                                 iwae_batch=iwae_batch)
            for kind, values in batch.items():
                columns.setdefault(kind, []).append(values.double().cpu())
            n += len(images)
            bar.update(len(images))
        bar.close()
    finally:
        model.train(was_training[0])
        if prior is not None:
            prior.train(was_training[1])
    if n == 0:
        raise ValueError("score_images: no images to score (an empty dataset or limit 0)")
    scores = {kind: torch.cat(columns[kind]).numpy() for kind in SCORE_KINDS if kind in columns}
    return ImageScores(indices=np.arange(n, dtype=np.int64), scores=scores)


def check_scoring(model: Autoencoder | HierarchicalVAE, *, prior: TransformerPrior | None = None,
                  iwae: int | None = None) -> None:
    """Refuse, with one clear line, what `score_images` cannot score: the IWAE bound of a model that is not a VAE
    with a discrete likelihood, a prior for a Gaussian tokenizer, a prior of another tokenizer's codes or
    vocabulary (`TransformerPrior.check_tokenizer`: the recorded weight hash)."""
    if not isinstance(model, (Autoencoder, HierarchicalVAE)):
        raise TypeError(f"anomaly scores need an image tokenizer (Autoencoder or HierarchicalVAE), got "
                        f"{type(model).__name__}")
    if iwae is not None:
        if iwae < 1:
            raise ValueError(f"iwae (importance samples per image) must be >= 1, got {iwae}")
        if not (model.is_gaussian and model.config.decoder_output in DISCRETE_LIKELIHOODS):
            kind = "a VQ tokenizer" if not model.is_gaussian else (
                f"a VAE with decoder_output {model.config.decoder_output!r}")
            raise ValueError(f"the IWAE bound needs a VAE (a Gaussian autoencoder or a hierarchical VAE) with a "
                             f"discrete likelihood (bernoulli_logits on binary images, or logistic_mixture); this "
                             f"is {kind}")
    if prior is not None:
        if not isinstance(prior, TransformerPrior):
            raise TypeError(f"prior must be a TransformerPrior, got {type(prior).__name__}")
        if model.vocab_size is None:
            raise ValueError("a prior scores the codes of a VQ tokenizer, and this tokenizer is Gaussian (no codes); "
                             "its likelihood scores are neg_elbo_nats and, with iwae, iwae_nats")
        prior.check_tokenizer(model)


def _score_batch(model: Autoencoder | HierarchicalVAE, images: torch.Tensor, given: dict[str, torch.Tensor],
                 generator: torch.Generator, *, prior: TransformerPrior | None, likelihood: bool, iwae: int | None,
                 iwae_batch: int) -> dict[str, torch.Tensor]:
    """The scores [B] of one batch of uint8 images, in evaluate's order of posterior draws."""
    x = uint8_to_range(images, model.config.value_range)
    if likelihood and model.config.decoder_output == "bernoulli_logits" and not is_binary(images):
        raise ValueError("a Bernoulli likelihood scores binary images only (0 or 255), and these are grey: binarize "
                         "them (vqtok score --binarize SEED, or data.binarize 'once')")
    out = model(x, **given)
    recon = model.postprocess(model.to_image(out.reconstruction))
    mse = (recon.double() - images.double()).pow(2).flatten(1).mean(dim=1)
    scores = {"mse": mse, "psnr": psnr_from_mse(mse, 255.0)}
    if likelihood:
        terms = model.code_length(x, generator, output=out, **given)
        scores["neg_elbo_nats"] = terms["nll"].double() + terms["kl"].double()
    if iwae is not None:
        scores["iwae_nats"] = iwae_bound(model, x, iwae, generator, batch=iwae_batch, **given)
    if prior is not None:
        scores["prior_bits"] = _code_bits(prior, out.bottleneck.codes)
    return scores


def _code_bits(prior: TransformerPrior, codes: torch.Tensor) -> torch.Tensor:
    """-log2 p(codes) per image [B] under the prior's unconditional pass (null class), summed over the codes in
    float64."""
    grid = tuple(prior.config.grid)
    if tuple(codes.shape[1:]) != grid:
        given = "x".join(str(n) for n in codes.shape[1:])
        raise ValueError(f"the prior models grids of {'x'.join(str(n) for n in grid)} codes (a sequence of "
                         f"{prior.config.seq_len}), but the tokenizer gives {given} codes for these images")
    flat = codes.flatten(1)
    log_p = torch.log_softmax(prior(flat).double(), dim=-1).gather(-1, flat[..., None]).squeeze(-1)
    return -log_p.sum(dim=1) / math.log(2)


def _image_labels(model: Autoencoder | HierarchicalVAE, labels: Any, n: int) -> torch.Tensor | None:
    """The class of each of the n images as LongTensor [n], or None: nothing is passed to the model (an
    unconditional model, or the null label of a conditional one). The model checks the values' range."""
    if labels is None:
        return None
    if getattr(model.config, "num_classes", 0) <= 0:
        raise ValueError("labels were given, but this model is unconditional (num_classes 0): give none")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.ndim > 1 or (labels.ndim == 1 and len(labels) != n):
        raise ValueError(f"labels must be one class for every image or one per image of the dataset ({n}), got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    return labels.long().expand(n) if labels.ndim == 0 else labels.long()


# ----------------------------------------------------------------------------------------------------------------
# How well a score separates two sets


def auroc(normal_scores: Any, anomalous_scores: Any) -> float:
    """The area under the ROC curve of telling anomalous images from normal ones by their score (larger = more
    anomalous): the probability that a random anomalous image scores higher than a random normal one, ties counting
    one half. Computed as the Mann-Whitney U statistic with average ranks over both sets, in float64; equal to
    scikit-learn's `roc_auc_score` with the anomalies as the positive class. Empty or non-finite inputs are refused."""
    normal, anomalous = _finite_scores(normal_scores, "normal"), _finite_scores(anomalous_scores, "anomalous")
    values, inverse, counts = np.unique(np.concatenate([normal, anomalous]), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based ranks; a tie shares the mean of its ranks
    ranks = average_rank[inverse.reshape(-1)]
    n, m = len(normal), len(anomalous)
    u = ranks[n:].sum() - m * (m + 1) / 2.0  # pairs (normal, anomalous) with the anomaly higher, ties as 1/2
    return float(u / (n * m))


def _finite_scores(scores: Any, name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"auroc: the {name} scores are empty")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"auroc: {bad} of the {array.size} {name} scores are NaN or infinite")
    return array


def anomaly_order(scores: ImageScores, kind: str) -> np.ndarray:
    """The values of a score kind oriented so that larger is more anomalous: the scores themselves, or for psnr
    (larger: a better reconstruction) -psnr, ranked as the mse it is a decreasing function of. The two give the
    same order, hence the same AUROC, and mse stays finite where a reconstruction is exact (psnr = inf)."""
    if kind not in scores.scores:
        raise KeyError(f"no {kind} scores (these are {', '.join(scores.scores)})")
    if kind in LARGER_IS_NORMAL:
        return scores.scores["mse"] if kind == "psnr" and "mse" in scores.scores else -scores.scores[kind]
    return scores.scores[kind]


def auroc_by_kind(normal: ImageScores, anomalous: ImageScores) -> dict[str, float]:
    """The AUROC (`auroc`) of every score kind that both sets have, each oriented by `anomaly_order`."""
    kinds = [k for k in normal.scores if k in anomalous.scores]
    return {k: auroc(anomaly_order(normal, k), anomaly_order(anomalous, k)) for k in kinds}


# ----------------------------------------------------------------------------------------------------------------
# Outputs: a CSV and the histograms


def scores_csv(sets: Mapping[str, ImageScores], *, index_offset: int = 0) -> str:
    """CSV text: columns set, index (an image's position in its dataset plus `index_offset`, e.g. the source's
    offset) and one per score kind, a row per image, the sets in the given order; floats written exactly (repr)."""
    import csv
    import io

    kinds = list(next(iter(sets.values())).scores)
    for name, scores in sets.items():
        if list(scores.scores) != kinds:
            raise ValueError(f"the sets have different score kinds: {name} has {list(scores.scores)}, not {kinds}")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["set", "index", *kinds])
    for name, scores in sets.items():
        for row, index in enumerate(scores.indices):
            writer.writerow([name, int(index) + index_offset, *(repr(float(scores.scores[k][row])) for k in kinds)])
    return text.getvalue()


PANEL_SIZE = (760, 250)  # width, height of one score kind's panel, in pixels
PALETTE = ((31, 119, 180), (230, 115, 0), (44, 160, 44), (200, 40, 40))  # one colour per set, in order


def save_histograms(sets: Mapping[str, ImageScores], path: str | Path, *, aurocs: Mapping[str, float] | None = None,
                    bins: int = 30) -> Path:
    """A PNG of every score kind's distribution in each set (name -> scores; e.g. reference then data), one panel
    per kind stacked vertically: side-by-side bars of each set's fraction of images per bin (shared bins over the
    finite values of all sets), a legend with each set's size and mean, the axis' minimum and maximum, and the
    kind's AUROC (`aurocs`, when given) in the title. Values that are not finite (psnr's inf) are counted in the
    legend, not drawn."""
    from PIL import Image, ImageDraw

    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    kinds = [k for k in next(iter(sets.values())).scores if all(k in s.scores for s in sets.values())]
    width, height = PANEL_SIZE
    image = Image.new("RGB", (width, height * len(kinds)), "white")
    draw = ImageDraw.Draw(image)
    for row, kind in enumerate(kinds):
        title = kind + (f"   AUROC {aurocs[kind]:.4f}" if aurocs and kind in aurocs else "")
        title += ("   (larger = less anomalous; AUROC of -psnr)" if kind in LARGER_IS_NORMAL
                  else "   (larger = more anomalous)")
        _draw_panel(draw, (0, row * height), title, kind, {name: s.scores[kind] for name, s in sets.items()}, bins)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from vqtok.files import staged

    with staged(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _draw_panel(draw: Any, origin: tuple[int, int], title: str, kind: str, values: Mapping[str, np.ndarray],
                bins: int) -> None:
    """One histogram panel at `origin` (its top-left corner) of PANEL_SIZE."""
    x0, y0 = origin
    width, height = PANEL_SIZE
    font, small = _font(15), _font(12)
    grey, black = (120, 120, 120), (0, 0, 0)
    draw.line([(x0, y0), (x0 + width, y0)], fill=(200, 200, 200))
    draw.text((x0 + 12, y0 + 8), title, fill=black, font=font)
    finite = {name: v[np.isfinite(v)] for name, v in values.items()}
    x = x0 + 12
    for (name, v), colour in zip(values.items(), PALETTE):  # the legend: colour, name, size, mean
        left_out = len(v) - len(finite[name])
        text = f"{name}: n={len(v)}, mean {np.mean(v):.5g}"
        text += f" ({left_out} not finite, not drawn)" if left_out else ""
        draw.rectangle([x, y0 + 36, x + 11, y0 + 47], fill=colour)
        draw.text((x + 17, y0 + 34), text, fill=black, font=small)
        x += 17 + int(draw.textlength(text, font=small)) + 28
    left, right, top, bottom = x0 + 64, x0 + width - 24, y0 + 62, y0 + height - 44
    everything = np.concatenate([v for v in finite.values()]) if finite else np.zeros(0)
    low, high = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    fractions = {name: np.histogram(v, bins=edges)[0] / max(1, len(values[name])) for name, v in finite.items()}
    peak = max([f.max() for f in fractions.values() if f.size] + [1e-12])
    bin_width = (right - left) / bins
    bar = bin_width / len(values)
    for i, (name, fraction) in enumerate(fractions.items()):
        colour = PALETTE[i % len(PALETTE)]
        for b, f in enumerate(fraction):
            if f > 0:
                x_left = left + b * bin_width + i * bar
                y_top = bottom - (bottom - top) * f / peak
                draw.rectangle([x_left, y_top, x_left + max(1.0, bar - 1), bottom], fill=colour)
    draw.rectangle([left, top, right, bottom], outline=grey)
    _text(draw, (left - 6, top), f"{peak:.3g}", small, "ra")
    _text(draw, (left - 6, bottom), "0", small, "rd")
    _text(draw, (left - 6, (top + bottom) / 2), "fraction", small, "rm", fill=grey)
    _text(draw, (left, bottom + 4), f"{low:.5g}", small, "la")
    _text(draw, (right, bottom + 4), f"{high:.5g}", small, "ra")
    _text(draw, ((left + right) / 2, bottom + 20), f"{kind} ({UNITS.get(kind, '')})", small, "ma", fill=grey)


def _text(draw: Any, xy: tuple[float, float], text: str, font: Any, anchor: str,
          fill: tuple[int, ...] = (0, 0, 0)) -> None:
    """Text placed by a two-letter anchor, horizontal (l, m, r) then vertical (a top, m middle, d bottom), computed
    here: PIL's own anchors need a FreeType font, and the fallback bitmap font has none."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - {"l": left, "m": (left + right) / 2, "r": right}[anchor[0]]
    y = xy[1] - {"a": top, "m": (top + bottom) / 2, "d": bottom}[anchor[1]]
    draw.text((x, y), text, fill=fill, font=font)
