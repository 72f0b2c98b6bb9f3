"""Latent arithmetic: attribute vectors from the latent means of labelled classes, applied to new images, and
analogies.

An attribute vector is the difference of two class means of the latents (White 2016, "Sampling generative
networks"; Larsen et al. 2016 for VAEs):

    v = mean(z | class `to`) - mean(z | class `from`),

and applying it with strength s decodes z + s v for each image's latents z (s = 0: the reconstruction; s = 1 moves
the image by the whole difference of the means; negative strengths move it the other way). The analogy "a is to b
as c is to ?" decodes z_a - z_b + z_c. The latents are those of `vqtok.latents.space` (the posterior mean, a VQ
tokenizer's features - decoded through the quantizer - or every group of a hierarchical VAE); the means are summed in
float64, and the arithmetic is done in float64 before the result is cast back to the latents' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vqtok.images import uint8_to_range
from vqtok.latents.space import Labels, float64_cpu, latent_space

NO_LABEL = -1  # the label of an image whose source has none (vqtok's data sources)


@dataclass
class ClassMeans:
    """The mean latents of some classes of a dataset: `means[c]` holds one float64 CPU tensor per latent group (the
    latent of one image, without the batch dimension), `counts[c]` the number of images averaged."""

    means: dict[int, list[torch.Tensor]]
    counts: dict[int, int]


@torch.no_grad()
def class_means(model: Any, dataset: Dataset, classes: Sequence[int], *, limit: int | None = None,
                batch_size: int = 64, labels: Labels = None, progress: bool = True) -> ClassMeans:
    """The mean latent of each class in `classes` over the (uint8 image [C, H, W], label) items of `dataset` (a
    vqtok `ImageDataset`, or any such dataset), from the first `limit` images of each class (None: all), summed in
    float64. Only the chosen images are read: the labels come from `dataset.labels` where it has them.

    `model`: a vqtok model or any `LatentSpace`. `labels`: the class given to a class-conditional model's encoder for
    every image (None: its unconditional pass); not the dataset's labels, which say what is averaged. A class with no
    image, or a dataset without labels, is an error naming it. `progress`: a progress bar over the images (stderr)."""
    space = latent_space(model)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 image per class (None: all), got {limit}")
    chosen = _class_indices(dataset, classes, limit)
    sums: dict[int, list[torch.Tensor]] = {}
    bar = tqdm(total=sum(len(i) for i in chosen.values()), unit="img", desc="class means", disable=not progress)
    subset = Subset(dataset, sorted(i for indices in chosen.values() for i in indices))
    for images, image_labels in DataLoader(subset, batch_size=batch_size):
        if images.dtype != torch.uint8:
            raise TypeError(f"class_means reads uint8 images [C, H, W] (a vqtok ImageDataset's), got {images.dtype}")
        latents = [float64_cpu(z) for z in space.encode(uint8_to_range(images, space.value_range), labels)]
        for c in chosen:
            members = torch.as_tensor(image_labels) == c
            if members.any():
                batch_sums = [z[members].sum(dim=0) for z in latents]
                sums[c] = [s + t for s, t in zip(sums[c], batch_sums)] if c in sums else batch_sums
        bar.update(len(images))
    bar.close()
    counts = {c: len(indices) for c, indices in chosen.items()}
    return ClassMeans(means={c: [s / counts[c] for s in sums[c]] for c in chosen}, counts=counts)


def attribute_vector(means: ClassMeans, from_class: int, to_class: int) -> list[torch.Tensor]:
    """mean(z | to_class) - mean(z | from_class), one float64 tensor per latent group."""
    for c in (from_class, to_class):
        if c not in means.means:
            raise ValueError(f"class {c}: no mean computed (classes with means: {sorted(means.means)})")
    if from_class == to_class:
        raise ValueError(f"from and to are the same class ({from_class}): the attribute vector would be zero")
    return [to - fro for to, fro in zip(means.means[to_class], means.means[from_class])]


@torch.no_grad()
def apply_attribute(model: Any, x: torch.Tensor, vector: Sequence[torch.Tensor], strengths: Sequence[float], *,
                    labels: Labels = None) -> torch.Tensor:
    """Images [B, C, H, W] (model range) moved along an attribute vector: for each strength s, the decoded z + s v
    (z: each image's latents) -> images [B, S, C, H, W] in the model's range, one column per strength.

    `model`: a vqtok model or any `LatentSpace`; `vector`: one tensor per latent group, shaped like one image's
    latents (`attribute_vector`); `labels`: the class(es) of a class-conditional model (None: unconditional)."""
    space = latent_space(model)
    strengths = [float(s) for s in strengths]
    if not strengths or not all(math.isfinite(s) for s in strengths):
        raise ValueError(f"strengths must be one or more finite numbers, got {strengths}")
    z = space.encode(x, labels)
    _check_vector(z, vector)
    return torch.stack([space.decode(_shifted(z, vector, s), labels) for s in strengths], dim=1)


@torch.no_grad()
def analogy(model: Any, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, labels: Labels = None) -> torch.Tensor:
    """The analogy "a is to b as c is to ?": the images decoded from z_a - z_b + z_c (batches [B, C, H, W] of one
    shape, model range; computed per image and group, in float64). `labels`: as `apply_attribute`."""
    space = latent_space(model)
    if not a.shape == b.shape == c.shape:
        raise ValueError(f"an analogy takes three batches of one shape, got {tuple(a.shape)}, {tuple(b.shape)}, "
                         f"{tuple(c.shape)}")
    za, zb, zc = (space.encode(images, labels) for images in (a, b, c))
    latents = [(float64_cpu(p) - float64_cpu(q) + float64_cpu(r)).to(p.device, p.dtype) for p, q, r in zip(za, zb, zc)]
    return space.decode(latents, labels)


def _class_indices(dataset: Dataset, classes: Sequence[int], limit: int | None) -> dict[int, list[int]]:
    """For each class, the indices of its first `limit` images in `dataset`."""
    known = getattr(dataset, "labels", None)
    if known is None:  # a dataset without a label list: read its items (images too)
        known = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    known = [int(label) for label in known]
    if all(label == NO_LABEL for label in known):
        raise ValueError("the data has no labels (give a labelled source: idx:IMAGES,LABELS, a folder of class "
                         "sub-folders, digits or a torchvision dataset)")
    present = sorted(set(known))
    chosen = {}
    for c in dict.fromkeys(int(c) for c in classes):
        indices = [i for i, label in enumerate(known) if label == c][:limit]
        if not indices:
            raise ValueError(f"class {c}: no image of the data has this label (its labels: "
                             f"{', '.join(map(str, present))})")
        chosen[c] = indices
    return chosen


def _check_vector(z: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]) -> None:
    if len(vector) != len(z):
        raise ValueError(f"the attribute vector has {len(vector)} group(s), the latents {len(z)}")
    for i, (zg, v) in enumerate(zip(z, vector)):
        if tuple(v.shape) != tuple(zg.shape[1:]):
            raise ValueError(f"group {i}: the images' latents are {list(zg.shape[1:])}, the attribute vector "
                             f"{list(v.shape)}; give images of the size the class means were computed at")


def _shifted(z: Sequence[torch.Tensor], vector: Sequence[torch.Tensor], strength: float) -> list[torch.Tensor]:
    """z + strength v per group, in float64, cast back to each group's dtype and device."""
    return [(float64_cpu(zg) + strength * float64_cpu(v)).to(zg.device, zg.dtype) for zg, v in zip(z, vector)]
