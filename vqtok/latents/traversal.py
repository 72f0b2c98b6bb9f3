"""Latent traversals: what a single latent element does to an image's reconstruction.

Gaussian autoencoder: one latent element z_j of an image's posterior mean is replaced by each of `steps` values
evenly spaced over [-span, span] prior standard deviations around the prior's mean - the prior is N(0, 1), so by the
values themselves - while every other element stays at the image's posterior mean; the decoded images are one row of
the grid, one row per element. The rows are the `dims` elements of largest average KL to the prior
(vqtok.diagnostics; over a dataset, or over the image itself when none is given), largest first: those that carry the
most information about the images. A collapsed element (KL about 0) changes nothing and would waste a row.

Hierarchical VAE: the groups are traversed in turn, top group first, `dims` rows each: in group l, the elements of
largest average KL(q(z_l | x, z_<l) || p(z_l | z_<l)), largest first, each varied over mu_p + t sigma_p for t in
[-span, span], where (mu_p, sigma_p) is that element's learned prior p(z_l | z_<l) given the image's posterior means
of the groups above. This is the autoencoder's scale (for the top group, whose prior is N(0, I), the values are t
themselves): a step of one prior standard deviation is one the model itself considers typical for that element, and
an element of a lower group is moved within what its prior allows at this image, not in units that mean nothing
there. Every other element of every group stays at the image's posterior mean as `encode` gives it (each group's
mean given the means above, before the change): the groups below are not inferred again, which would let them
explain the change away.

Elements are named (group, channel, y, x) of the latents [C, h, w] of their group (group 0 for the autoencoder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqtok.diagnostics import LatentStatistics, posterior_passes, posterior_terms
from vqtok.nn.conditioning import label_arguments
from vqtok.train.evaluate import save_image_grid


@dataclass
class TraversedElement:
    """One row of a traversal: the element (group, channel, y, x), its average KL to the prior (what orders the
    rows), the image's posterior mean of it, its prior's mean and standard deviation at this image, and the values it
    takes (prior mean + offset x prior std, one per column)."""

    group: int
    channel: int
    y: int
    x: int
    kl_nats: float
    posterior_mean: float
    prior_mean: float
    prior_std: float
    values: list[float]


@dataclass
class Traversal:
    """images: the decoded rows [rows, steps, C, H, W] in the model's range; elements: what each row varies;
    offsets: the columns, in prior standard deviations [steps]."""

    images: torch.Tensor
    elements: list[TraversedElement]
    offsets: torch.Tensor

    def legend(self) -> str:
        """One line per row: which element it varies and over which values (for a person reading the grid)."""
        lines = []
        for row, e in enumerate(self.elements):
            lines.append(f"row {row}: group {e.group}, channel {e.channel}, y {e.y}, x {e.x}: KL {e.kl_nats:.4f} nats, "
                         f"posterior mean {e.posterior_mean:.4f}, values {e.values[0]:.4f} .. {e.values[-1]:.4f} "
                         f"(prior mean {e.prior_mean:.4f}, std {e.prior_std:.4f})")
        return "\n".join(lines)


@torch.inference_mode()
def traverse(model: Any, x: torch.Tensor, *, statistics: LatentStatistics | None = None, dims: int = 8,
             steps: int = 7, span: float = 3.0, labels: Any = None) -> Traversal:
    """The traversal grid of one image `x` [1, C, H, W] (model range) of a Gaussian autoencoder or a hierarchical
    VAE (see the module docstring): `dims` elements (a hierarchical VAE: per group), ordered by their average KL in
    `statistics` (vqtok.diagnostics.latent_statistics over a dataset; None: this image's own KL), each varied over
    `steps` values from -`span` to `span` prior standard deviations. `labels`: a class-conditional model's label for
    the image (None: its null label)."""
    _check_request(model, x, dims, steps, span)
    was_training = model.training
    model.eval()
    conditioning = label_arguments(model, labels)
    output = model(x, **conditioning)
    hierarchical = getattr(output, "groups", None) is not None  # decode takes a list of groups
    passes = posterior_passes(model, output)
    if statistics is None:
        statistics = LatentStatistics()
        statistics.add(*posterior_terms(passes))
    shapes = [tuple(p.posterior.mean.shape[1:]) for p in passes]
    if statistics.shapes != shapes:
        raise ValueError(f"the statistics that order the rows are of latents {statistics.shapes}, this image's are "
                         f"{shapes}: gather them on images of the size of this one")
    _check_dims(statistics, dims, hierarchical)
    offsets = torch.linspace(-span, span, steps, dtype=torch.float64)
    means = [p.posterior.mode() for p in passes]
    rows, elements = [], []
    for g, c, i, j in _chosen(statistics, dims, hierarchical=hierarchical):
        prior = passes[g].prior
        prior_mean, prior_std = float(prior.mean[0, c, i, j]), float(prior.std[0, c, i, j])
        values = (prior_mean + offsets * prior_std).to(means[g].dtype)
        latents = [m.expand(steps, -1, -1, -1).clone() for m in means]
        latents[g][:, c, i, j] = values.to(latents[g].device)
        rows.append(model.decode(latents if hierarchical else latents[0], **conditioning))
        elements.append(TraversedElement(g, c, i, j, float(statistics.kl()[g][c, i, j]), float(means[g][0, c, i, j]),
                                         prior_mean, prior_std, values.tolist()))
    model.train(was_training)
    return Traversal(images=torch.stack(rows), elements=elements, offsets=offsets)


def save_traversal_grid(model: Any, traversal: Traversal, path: str | Path) -> Path:
    """The traversal as a PNG grid: one row per element (`traversal.elements`, in order), one column per value (small
    images enlarged)."""
    steps = traversal.images.shape[1]
    images = model.postprocess(traversal.images.flatten(0, 1)).cpu()
    return save_image_grid(images, path, nrow=steps)


def _chosen(statistics: LatentStatistics, dims: int, *, hierarchical: bool) -> list[tuple[int, int, int, int]]:
    """The traversed elements in row order: the `dims` of largest KL (a hierarchical VAE: of each group, top first)."""
    if not hierarchical:
        return statistics.ranking()[:dims]
    return [e for g in range(len(statistics.shapes)) for e in statistics.ranking(g)[:dims]]


def _check_dims(statistics: LatentStatistics, dims: int, hierarchical: bool) -> None:
    sizes = [math.prod(shape) for shape in statistics.shapes]
    available, where = (min(sizes), "the smallest group has") if hierarchical else (sum(sizes), "the latents have")
    if dims > available:
        raise ValueError(f"dims {dims}: {where} only {available} elements")


def check_traversable(model: Any) -> None:
    """A clear error for a model that has no traversal: a VQ tokenizer."""
    if getattr(model, "kl_objective", None) is None:
        raise ValueError("a VQ tokenizer cannot be traversed: its latents are discrete codes, with no Gaussian "
                         "posterior or prior along which one element could move continuously; traversals need a "
                         "Gaussian autoencoder or a hierarchical VAE")


def _check_request(model: Any, x: torch.Tensor, dims: int, steps: int, span: float) -> None:
    check_traversable(model)
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"traverse takes one image [1, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the values from -span to span), got {steps}")
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a positive number of prior standard deviations, got {span}")
