"""Between user images (PIL, uint8 arrays/tensors) and model tensors [B, C, H, W] in the model's input range."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

ImageInput = Union[Image.Image, Sequence[Image.Image], np.ndarray, torch.Tensor]


def pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
    """A PIL image as uint8 [H, W, channels] (grey <-> RGB converted). 16-bit images are scaled to 8 bits (PIL's
    own conversion would clip them to 255); floating-point and 32-bit images are refused."""
    if channels not in (1, 3):
        raise ValueError(f"PIL images can be converted to 1 or 3 channels, the model takes {channels}")
    if image.mode.startswith("I"):
        values = np.array(image, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"a {image.mode} image with values outside 0..65535; convert it to 8 or 16 bits")
        image = Image.fromarray((values >> 8).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("floating-point (mode F) images are not supported; convert them to 8 or 16 bits")
    array = np.array(image.convert("L" if channels == 1 else "RGB"))
    return array[..., None] if array.ndim == 2 else array


def to_uint8_batch(images: ImageInput, channels: int) -> torch.Tensor:
    """PIL image(s), uint8 numpy HWC/NHWC or uint8 tensor CHW/NCHW -> uint8 tensor [B, channels, H, W]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("a list of images must hold PIL images only")
        arrays = [pil_to_array(im, channels) for im in images]
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"images in one batch must have the same size, got {sorted(sizes)}")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (HWC or NHWC), got {images.dtype}")
        array = images[None] if images.ndim == 3 else images
        if array.ndim == 2 or array.ndim != 4:
            raise ValueError(f"numpy images must be HWC or NHWC, got shape {images.shape}")
        return _check_channels(torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2), channels)
    if torch.is_tensor(images):
        if images.dtype != torch.uint8:
            raise TypeError(
                f"tensor images for preprocess must be uint8 (CHW or NCHW), got {images.dtype}; float tensors "
                "already in the model's range go to encode() directly"
            )
        batch = images[None] if images.ndim == 3 else images
        if batch.ndim != 4:
            raise ValueError(f"tensor images must be CHW or NCHW, got shape {tuple(images.shape)}")
        return _check_channels(batch, channels)
    raise TypeError(f"cannot read images of type {type(images).__name__}")


def _check_channels(batch: torch.Tensor, channels: int) -> torch.Tensor:
    if batch.shape[1] != channels:
        raise ValueError(f"images have {batch.shape[1]} channels, the model takes {channels}")
    return batch


def resize_and_crop(batch: torch.Tensor, resize: int | None, crop: int | None, multiple: int = 1) -> torch.Tensor:
    """uint8 [..., C, H, W]: shorter side to `resize` (bicubic, antialiased), then a centre crop to `crop` x `crop`,
    then a centre crop of each side down to a multiple of `multiple` (a model's downsampling factor: the sizes its
    `encode` takes; a no-op when the crop already is one). A None step is skipped."""
    if resize is not None or crop is not None:
        from torchvision.transforms.v2 import functional as TF  # imported on first use: ~1 s, paid by every worker

        if resize is not None and min(batch.shape[-2:]) != resize:
            batch = TF.resize(batch, [resize], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if crop is not None:
            if min(batch.shape[-2:]) < crop:
                raise ValueError(f"image of size {tuple(batch.shape[-2:])} is smaller than the crop {crop}")
            batch = TF.center_crop(batch, [crop, crop])
    return trim_to_multiple(batch, multiple)


def trim_to_multiple(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """uint8 [..., C, H, W] centre-cropped (torchvision's `center_crop`) to the largest sides that are multiples of
    `multiple`."""
    height, width = batch.shape[-2:]
    if height % multiple == 0 and width % multiple == 0:
        return batch
    if height < multiple or width < multiple:
        raise ValueError(f"image of size {height}x{width} is smaller than {multiple}, the downsampling factor: every "
                         "side must be at least that")
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(batch, [height - height % multiple, width - width % multiple])


def is_binary(images: torch.Tensor) -> bool:
    """Whether every value of uint8 images is 0 or 255 (binary images, what a Bernoulli likelihood codes)."""
    return bool(((images == 0) | (images == 255)).all())


def uint8_to_range(batch: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    return batch.float().div(255.0).mul(hi - lo).add(lo)


def range_to_uint8(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    return ((x.detach().float() - lo) / (hi - lo) * 255.0).round().clamp(0, 255).to(torch.uint8)


def to_pil(batch: torch.Tensor) -> list[Any]:
    """uint8 [B, C, H, W] -> list of PIL images (mode L for 1 channel, RGB for 3)."""
    arrays = batch.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
