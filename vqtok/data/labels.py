"""Class labels of images, checked for a class-conditional model (`AutoencoderConfig.num_classes` N > 0).

Such a model is trained, evaluated and encoded with each image's label, one of 0 .. N - 1. vqtok's datasets give a
label per image (-1 where the source has none: an IDX file without its labels file, binarized MNIST's .amat files,
an image folder without class sub-folders), so a conditional model refuses data whose images lack one, or whose
labels reach N, naming the first such image: before anything is trained or written where the dataset lists its
labels (`check_dataset_labels`), else batch by batch as the images are read (`check_batch_labels`; a user's own
dataset).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

LABELLED_SOURCES = ("idx with a labels file (idx:IMAGES,LABELS), an image folder with one sub-folder per class, "
                    "torchvision, digits, or a dataset of (image, label) items")


def check_dataset_labels(dataset: Dataset, num_classes: int, what: str) -> None:
    """For a dataset that lists its labels (`dataset.labels`, as `ImageDataset` does): every image's label is in
    [0, num_classes), or a ValueError names the first image without one, else one with the largest label (so that
    the message says how many classes the data needs; `what`: the dataset's role, e.g. 'data').
    Datasets without the list are checked batch by batch instead (`check_batch_labels`)."""
    labels = getattr(dataset, "labels", None)
    if labels is None or len(labels) == 0:
        return
    values = np.asarray(labels, dtype=np.int64)
    missing, beyond = np.flatnonzero(values < 0), np.flatnonzero(values >= num_classes)
    if missing.size or beyond.size:  # the first image without a label, else one with the largest label
        index, count = (int(missing[0]), missing.size) if missing.size else (int(np.argmax(values)), beyond.size)
        raise ValueError(label_problem(f"{what}: {_describe(dataset, index)}", int(values[index]), num_classes,
                                       others=int(count) - 1))


def check_batch_labels(labels: torch.Tensor, num_classes: int, name: Callable[[int], str]) -> None:
    """A batch's labels [B] are each in [0, num_classes), or a ValueError names the first item that is not (`name(j)`
    names item j of the batch)."""
    bad = torch.nonzero((labels < 0) | (labels >= num_classes)).flatten()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(label_problem(name(j), int(labels[j]), num_classes))


def label_problem(name: str, value: int, num_classes: int, others: int = 0) -> str:
    """The one-line message for an image (`name`) whose label `value` a model of num_classes classes cannot take."""
    more = f" (like {others:,} other images)" if others else ""
    if value < 0:
        return (f"{name} has no class label{more}, but a class-conditional model (num_classes {num_classes}) needs one "
                f"for every image: use labelled data ({LABELLED_SOURCES})")
    return (f"{name} has label {value}{more}, but the model's num_classes is {num_classes} (labels 0 to "
            f"{num_classes - 1}): set model.num_classes to at least {value + 1}")


def _describe(dataset: Dataset, index: int) -> str:
    source = getattr(dataset, "source", None)
    return source.describe(index) if source is not None else f"item {index}"
