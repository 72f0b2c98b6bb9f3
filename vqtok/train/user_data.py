"""A user's own torch Dataset as training data (`vqtok.train.train(config, dataset=...)`).

The dataset must be map-style (`__len__` and `__getitem__` by index: the training sampler draws indices, a function
of the seed and the step alone, which is what makes a resumed run exact). Item i is an image, or a tuple whose first
element is the image (e.g. (image, label); the rest is ignored: unconditional tokenizers train without labels). A
class-conditional model (model.num_classes N > 0) needs (image, label, ...) items whose label is an integer in
[0, N): a Python or NumPy integer, or a 0-d integer tensor. The image is a
torch tensor [C, H, W] with the model's `in_channels` and `resolution` (C x resolution x resolution), either uint8
(0-255) or floating point in [0, 1] (torchvision's ToTensor), which is rounded to the 8-bit grid that vqtok trains and
evaluates on. Item i must be the same image at every read (apply random augmentations with the config's `hflip`
instead), or a resumed run cannot repeat the original.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils.data import Dataset, IterableDataset


class UserImages(Dataset):
    """Items of a user's dataset as vqtok's datasets give them, (uint8 image [C, H, W], label), checked one by one:
    an item of another shape, type or range is an error naming its index. The label is the item's second element
    with `labels` (a class-conditional model), else -1 (none)."""

    skipped = 0  # (vqtok's own datasets count unreadable images skipped)

    def __init__(self, dataset: Dataset, *, channels: int, size: int, labels: bool = False):
        map_style = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        if isinstance(dataset, IterableDataset) or not map_style:
            raise TypeError(f"dataset: a {type(dataset).__name__} is not a map-style Dataset (with __len__ and "
                            "__getitem__): training draws items by index, which keeps a resumed run exact")
        if len(dataset) == 0:
            raise ValueError(f"dataset: the {type(dataset).__name__} is empty")
        self.dataset, self.shape, self.with_labels = dataset, (channels, size, size), labels
        self[0]  # a dataset that does not fit the model is refused before the run writes anything

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        label = to_label(item, f"dataset item {index}") if self.with_labels else -1
        return to_uint8(image, self.shape, f"dataset item {index}"), label

    def describe(self) -> str:
        """How the run records it: 'user dataset CLASS, N items'."""
        return f"user dataset {type(self.dataset).__name__}, {len(self.dataset)} items"


def to_label(item: object, what: str) -> int:
    """The integer label of an (image, label, ...) item."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"{what}: a class-conditional model trains on (image, label) items, got "
                        f"{'an image alone' if isinstance(item, torch.Tensor) else type(item).__name__}")
    label = item[1]
    if isinstance(label, torch.Tensor) and label.ndim == 0 and not label.is_floating_point() \
            and label.dtype != torch.bool:
        return int(label)
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
        return int(label)
    raise TypeError(f"{what}: the label must be an integer (a class index), got {type(label).__name__} {label!r:.40}")


def to_uint8(image: object, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """A uint8 [C, H, W] image of `shape` from a uint8 tensor or a floating-point one in [0, 1]."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{what}: the image is a {type(image).__name__}; give a torch tensor [C, H, W] (uint8, or "
                        "float in [0, 1])")
    if tuple(image.shape) != shape:
        raise ValueError(f"{what}: the image has shape {list(image.shape)}; the model trains on {list(shape)} "
                         "(model.in_channels x model.resolution x model.resolution)")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise TypeError(f"{what}: the image is {image.dtype}; give uint8 (0-255) or floating point in [0, 1]")
    low, high = float(image.min()), float(image.max())
    if not (low >= 0.0 and high <= 1.0):  # also refuses NaN
        raise ValueError(f"{what}: a floating-point image must lie in [0, 1] (as torchvision's ToTensor gives); its "
                         f"values span [{low:.3g}, {high:.3g}]")
    return (image.float() * 255.0).round().to(torch.uint8)
