"""What every image model of vqtok shares at its two ends: images in and out of the model's range, and the pixel
likelihood its decoder's output parameterises (an image itself, Bernoulli logits, or a discretized logistic mixture).

`PixelModel` is a mixin for models whose config has `in_channels`, `input_range`/`value_range`, `preprocess`,
`decoder_output` and `num_mixtures` (the autoencoder and the hierarchical VAE).
"""

from __future__ import annotations

from typing import Any

import torch

from vqtok.images import ImageInput, range_to_uint8, resize_and_crop, to_pil, to_uint8_batch, uint8_to_range
from vqtok.losses import DISCRETE_LIKELIHOODS, mixture_channels, mixture_mode_image, nll_per_image


class PixelModel:
    """Mixin: preprocess/postprocess, the decoder's output as an image, and -log p(x | decoder output)."""

    config: Any

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """PIL image(s) or uint8 arrays/tensors -> float [B, C, H, W] in the model's input range, on its device,
        resized and cropped as recorded in the config (`config.preprocess`; by default to the model's resolution),
        each side then trimmed to a multiple of the downsampling factor where it is not one. What comes out is a size
        `encode` takes, or this is an error naming the sizes and the config's preprocessing."""
        batch = to_uint8_batch(images, self.config.in_channels)
        p = self.config.preprocess
        before = tuple(batch.shape[-2:])
        try:
            batch = resize_and_crop(batch, p.resize, p.crop, self.size_multiple())
            x = uint8_to_range(batch.to(self._device()), self.config.value_range)
            self.check_images(x)  # type: ignore[attr-defined]
        except ValueError as e:
            raise ValueError(f"preprocess (config.preprocess: resize {p.resize}, crop {p.crop}) cannot make "
                             f"{before[0]}x{before[1]} images into a size this model encodes: {e}") from None
        return x

    def size_multiple(self) -> int:
        """What every side of an input must be a multiple of: an autoencoder's downsampling factor (1 for a model
        that takes one size only, whose `check_images` says which)."""
        return getattr(self.config, "downsampling_factor", 1)

    def postprocess(self, x: torch.Tensor, output_type: str = "uint8") -> torch.Tensor | list[Any]:
        """Model-range images -> uint8 [B, C, H, W] (rounded, clipped), or a list of PIL images with 'pil'."""
        if output_type not in ("uint8", "pil"):
            raise ValueError(f"output_type must be 'uint8' or 'pil', got {output_type!r}")
        batch = range_to_uint8(x, self.config.value_range)
        return to_pil(batch) if output_type == "pil" else batch

    def to_image(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """The decoder's output as an image in the model range: itself, the mean (sigmoid) of Bernoulli logits, or
        the centre of each pixel's most probable logistic component."""
        kind = self.config.decoder_output
        if kind == "bernoulli_logits":
            return torch.sigmoid(decoder_output)
        if kind == "logistic_mixture":
            return mixture_mode_image(decoder_output, self.config.num_mixtures, self.config.in_channels)
        return decoder_output

    def output_channels(self) -> int:
        """Channels of the decoder's output: the image's, or the mixture's parameters."""
        c = self.config
        return mixture_channels(c.num_mixtures, c.in_channels) if c.decoder_output == "logistic_mixture" else c.in_channels

    def discrete_likelihood(self) -> str:
        """The name of the discrete pixel likelihood (for code lengths and bounds), or an error if there is none."""
        kind = DISCRETE_LIKELIHOODS.get(self.config.decoder_output)
        if kind is None:
            raise ValueError(f"decoder_output {self.config.decoder_output!r} is not a discrete likelihood: no code length")
        return kind

    def pixel_nll(self, decoder_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | decoder output) in nats per image [B] under the discrete pixel likelihood."""
        return nll_per_image(self.discrete_likelihood(), decoder_output, x)

    def check_input(self, x: torch.Tensor, *, values: bool = True) -> None:
        """A float tensor [B, C, H, W] of finite values, with a clear error otherwise (sizes: the model's own).
        `values=False` checks the type and shape only: reading the values waits for the device (the training loop,
        whose images come from uint8, skips it)."""
        c = self.config.in_channels
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(
                f"expected a float tensor [B, {c}, H, W] in the model's range {self.config.value_range}, got "
                f"{getattr(x, 'dtype', type(x).__name__)}; use preprocess() for uint8 or PIL images"
            )
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"expected images [B, {c}, H, W], got shape {tuple(x.shape)}")
        if values and not torch.isfinite(x).all():
            raise ValueError("input images contain NaN or infinite values")

    def _device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]
