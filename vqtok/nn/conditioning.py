"""Class labels for class-conditional autoencoders (CVAEs): the label embedding added to a network's features, and
the checking of the labels a user passes, and the keyword arguments that pass labels to a model only when it is
conditional (`label_arguments`, `dataset_labels`), for the tools that take any model.

A conditional autoencoder of N classes (`AutoencoderConfig.num_classes`) has two `LabelEmbedding`s: the encoder adds
one to its conv_in output, the decoder one to its conv_in output (before its mid block). Each table has N + 1 rows;
the last, label N, is the null label: a row of zeros that gets no gradient (`padding_idx`), so a pass with the null
label computes exactly what the same network without embeddings computes. That pass is the unconditional model
which `TrainConfig.class_dropout` trains and which `labels=None` selects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

Labels = int | Sequence[int] | torch.Tensor | None
"""What the conditional models' `labels=` take: one label for every image, one per image, or None (the null label)."""


class LabelEmbedding(nn.Module):
    """A learned vector per class, added to features [B, C, H, W] at every position: `h + e[label][:, :, None, None]`.

    `weight` [num_classes + 1, channels], initialised N(0, 1) (torch's default for embeddings) with the last row, the
    null label, zero and frozen there (no gradient ever reaches it)."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.null_class = num_classes
        self.table = nn.Embedding(num_classes + 1, channels, padding_idx=num_classes)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """`labels` LongTensor [B] (checked by `label_tensor`); None adds nothing (the null label's zero row)."""
        if labels is None:
            return h
        return h + self.table(labels).to(h.dtype)[:, :, None, None]


def label_tensor(labels: Labels, n: int, num_classes: int, device: torch.device | str) -> torch.Tensor | None:
    """Labels as a LongTensor [n] on `device` for a model of `num_classes` classes (label `num_classes` is the null
    label), or None for None. One label (an int or a 0-d tensor) is every image's. Refused with a one-line
    ValueError: labels for an unconditional model (num_classes 0), a bool or floating-point type, a shape other than
    [n], values outside [0, num_classes]."""
    if labels is None:
        return None
    if num_classes == 0:
        raise ValueError("labels given to an unconditional model (num_classes 0); leave labels out, or train a "
                         "class-conditional one (model.num_classes N)")
    try:
        tensor = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"labels must be integers (one, or one per image), got {type(labels).__name__}: {e}") from None
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"labels must be integers, got {tensor.dtype}")
    if tensor.ndim == 0:
        tensor = tensor.expand(n)
    if tuple(tensor.shape) != (n,):
        raise ValueError(f"labels must be one integer or {n} (one per image), got shape {list(tensor.shape)}")
    if n:
        low, high = (int(v) for v in torch.aminmax(tensor))
        if low < 0 or high > num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes} classes; {num_classes} is the null "
                             f"label), got values in [{low}, {high}]")
    return tensor.to(device=device, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# Passing labels to any model: what the tools that take a model (evaluation, diagnostics, latent spaces) share


def label_arguments(model: Any, labels: Labels = None) -> dict[str, Any]:
    """The keyword arguments that pass `labels` (None, an int, or one per image) to `model`'s methods: {'labels':
    labels} for a class-conditional model (None: its null label, the unconditional pass), {} for an unconditional
    one, which refuses labels."""
    if is_conditional(model):
        return {"labels": labels}
    if labels is not None:
        raise ValueError(f"labels were given, but this {type(model).__name__} is not class-conditional "
                         "(config.num_classes is 0); leave the labels out")
    return {}


def dataset_labels(model: Any, labels: torch.Tensor) -> dict[str, Any]:
    """Label arguments from a batch of dataset labels: a class-conditional model gets them (an image without a
    label, -1, gets the null label), an unconditional model nothing."""
    if not is_conditional(model):
        return {}
    labels = torch.as_tensor(labels).long().to(next(model.parameters()).device)
    return {"labels": torch.where(labels < 0, model.config.num_classes, labels)}


def is_conditional(model: Any) -> bool:
    """Whether `model` (any vqtok model, or a stand-in with a `config`) is class-conditional: num_classes > 0."""
    return getattr(model.config, "num_classes", 0) > 0
